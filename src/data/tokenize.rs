//! Tokenizer glue: a Hugging Face `tokenizer.json` with its own padding
//! switched off (batches are padded dynamically by [`super::make_batch`]) and
//! truncation to a fixed maximum length (longest-first for pairs).

use std::path::{Path, PathBuf};

use rayon::prelude::*;
use tokenizers::{
    PostProcessor, Tokenizer, TruncationDirection, TruncationParams, TruncationStrategy,
};

use super::tasks::Example;
use crate::error::{Error, Result};

/// Token ids and segment (token type) ids of one example, special tokens included.
#[derive(Clone, Debug, PartialEq)]
pub struct Encoding {
    pub ids: Vec<u32>,
    pub type_ids: Vec<u32>,
}

impl Encoding {
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
}

/// A loaded tokenizer (see the module docs).
pub struct TextTokenizer {
    tk: Tokenizer,
    path: PathBuf,
    max_len: usize,
    pad_id: Option<u32>,
}

impl std::fmt::Debug for TextTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextTokenizer")
            .field("path", &self.path)
            .field("max_len", &self.max_len)
            .field("pad_id", &self.pad_id)
            .finish_non_exhaustive()
    }
}

impl TextTokenizer {
    /// Load `tokenizer.json`; encodings are truncated to `max_len` tokens,
    /// special tokens included. Errors name the file.
    pub fn from_file(path: &Path, max_len: usize) -> Result<Self> {
        if crate::weights::gguf::is_gguf_path(path) {
            return Self::from_gguf(path, max_len);
        }
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        // Check the JSON first: `tokenizers` (0.22) panics instead of
        // failing on some malformed files (a syntax error, or a string with
        // an invalid escape such as a lone surrogate, inside "decoder" hits
        // an `expect("Helper")`). The pass decodes every string (serde's
        // `IgnoredAny` skips escapes unchecked) but keeps nothing.
        serde_json::from_slice::<StrictJson>(&bytes).map_err(|e| {
            Error::file(
                path,
                format!("not a valid tokenizer.json: not valid JSON: {e}"),
            )
        })?;
        // And a backstop for any other panic inside the library.
        let parsed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            Tokenizer::from_bytes(&bytes)
        }))
        .map_err(|p| {
            let m = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            Error::file(
                path,
                format!("not a valid tokenizer.json: the tokenizers library failed on it ({m})"),
            )
        })?;
        let tk =
            parsed.map_err(|e| Error::file(path, format!("not a valid tokenizer.json: {e}")))?;
        check_post_processor(&tk)
            .map_err(|m| Error::file(path, format!("not a valid tokenizer.json: {m}")))?;
        Self::finish(tk, path, max_len)
    }

    /// Wrap an already-built tokenizer (e.g. one built from GGUF metadata);
    /// as [`TextTokenizer::from_file`], with the tokenizer's own padding
    /// switched off (its pad id is kept as [`TextTokenizer::pad_id`]) and
    /// truncation to `max_len`. Messages name `<in-memory tokenizer>`.
    pub fn from_tokenizer(tk: Tokenizer, max_len: usize) -> Result<Self> {
        Self::from_tokenizer_at(tk, Path::new("<in-memory tokenizer>"), max_len)
    }

    /// As [`TextTokenizer::from_tokenizer`], with `source` naming the
    /// tokenizer in messages.
    pub fn from_tokenizer_at(tk: Tokenizer, source: &Path, max_len: usize) -> Result<Self> {
        check_post_processor(&tk).map_err(|m| Error::file(source, m))?;
        Self::finish(tk, source, max_len)
    }

    /// Padding off (its id kept), truncation to `max_len`, after checking
    /// that the post-processor's special tokens leave room for text.
    fn finish(mut tk: Tokenizer, source: &Path, max_len: usize) -> Result<Self> {
        let pad_id = tk
            .get_padding()
            .map(|p| p.pad_id)
            .or_else(|| tk.token_to_id("[PAD]"))
            .or_else(|| tk.token_to_id("<pad>"));
        let added = tk
            .get_post_processor()
            .map_or(0, |p| p.added_tokens(false).max(p.added_tokens(true)));
        if max_len <= added {
            return Err(Error::file(
                source,
                format!(
                    "maximum length {max_len} leaves no room for text: the post-processor adds {added} special tokens"
                ),
            ));
        }
        tk.with_padding(None);
        tk.with_truncation(Some(TruncationParams {
            direction: TruncationDirection::Right,
            max_length: max_len,
            strategy: TruncationStrategy::LongestFirst,
            stride: 0,
        }))
        .map_err(|e| Error::file(source, format!("cannot set truncation to {max_len}: {e}")))?;
        Ok(TextTokenizer {
            tk,
            path: source.to_path_buf(),
            max_len,
            pad_id,
        })
    }

    /// The tokenizer of a `.gguf` model file, built from its
    /// `tokenizer.ggml.*` metadata (see [`crate::weights::gguf::build_tokenizer`]).
    pub fn from_gguf(path: &Path, max_len: usize) -> Result<Self> {
        let g = crate::weights::gguf::GgufFile::open(path)?;
        let tk = crate::weights::gguf::build_tokenizer(&g)?;
        Self::from_tokenizer_at(tk, path, max_len)
    }

    /// The underlying Hugging Face tokenizer.
    pub fn inner(&self) -> &Tokenizer {
        &self.tk
    }

    /// Encode a text or a text pair, with the special tokens of the
    /// tokenizer's post-processor (e.g. `[CLS] a [SEP] b [SEP]`).
    pub fn encode(&self, text: &str, pair: Option<&str>) -> Result<Encoding> {
        // A panic inside `tokenizers` (a malformed file it accepted) becomes
        // an error naming the file.
        let enc = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| match pair {
            Some(p) => self.tk.encode((text, p), true),
            None => self.tk.encode(text, true),
        }))
        .map_err(|_| {
            Error::file(
                &self.path,
                "encoding failed: the tokenizers library panicked (is the tokenizer file consistent?)",
            )
        })?
        .map_err(|e| Error::file(&self.path, format!("encoding failed: {e}")))?;
        Ok(Encoding {
            ids: enc.get_ids().to_vec(),
            type_ids: enc.get_type_ids().to_vec(),
        })
    }

    /// Encode every example (in parallel), in order.
    pub fn encode_all(&self, examples: &[Example]) -> Result<Vec<Encoding>> {
        examples
            .par_iter()
            .enumerate()
            .map(|(i, e)| {
                self.encode(&e.text, e.text_pair.as_deref())
                    .map_err(|err| err.context(format!("example {i}")))
            })
            .collect()
    }

    /// Vocabulary size, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.tk.get_vocab_size(true)
    }

    /// The padding id: from the file's padding config, else the `[PAD]` or `<pad>` token.
    pub fn pad_id(&self) -> Option<u32> {
        self.pad_id
    }

    /// The truncation length given to [`TextTokenizer::from_file`].
    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// The id of a token, if it is in the vocabulary.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.tk.token_to_id(token)
    }

    /// The file this tokenizer was loaded from.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Check what `tokenizers` does not check when it reads a post-processor
/// from JSON (its builder validates, its deserializer does not, and encoding
/// then panics): every special token a `TemplateProcessing` template names
/// is defined, each with as many tokens as ids, and the single-sequence
/// template does not use the second sequence. Nested `Sequence`
/// post-processors are checked too.
fn check_post_processor(tk: &Tokenizer) -> std::result::Result<(), String> {
    use serde_json::Value;
    fn walk(v: &Value) -> std::result::Result<(), String> {
        match v {
            Value::Array(a) => a.iter().try_for_each(walk),
            Value::Object(o) => {
                if o.get("type").and_then(Value::as_str) == Some("TemplateProcessing") {
                    let specials = o.get("special_tokens").and_then(Value::as_object);
                    for (name, t) in specials.into_iter().flatten() {
                        let len = |k: &str| t.get(k).and_then(Value::as_array).map(Vec::len);
                        if len("ids") != len("tokens") {
                            return Err(format!(
                                "post_processor: special token '{name}' has {} ids but {} tokens",
                                len("ids").unwrap_or(0),
                                len("tokens").unwrap_or(0)
                            ));
                        }
                    }
                    for which in ["single", "pair"] {
                        let pieces = o.get(which).and_then(Value::as_array);
                        for piece in pieces.into_iter().flatten() {
                            if let Some(id) =
                                piece.pointer("/SpecialToken/id").and_then(Value::as_str)
                            {
                                if !specials.is_some_and(|m| m.contains_key(id)) {
                                    return Err(format!(
                                        "post_processor: the '{which}' template uses special token '{id}', which \"special_tokens\" does not define"
                                    ));
                                }
                            }
                            if which == "single"
                                && piece.pointer("/Sequence/id").and_then(Value::as_str)
                                    == Some("B")
                            {
                                return Err(
                                    "post_processor: the 'single' template uses the second sequence (B)".into(),
                                );
                            }
                        }
                    }
                }
                o.values().try_for_each(walk)
            }
            _ => Ok(()),
        }
    }
    match tk.get_post_processor() {
        None => Ok(()),
        Some(pp) => {
            let v = serde_json::to_value(pp)
                .map_err(|e| format!("post_processor cannot be inspected: {e}"))?;
            walk(&v)
        }
    }
}

/// Any JSON value, every string decoded (escapes checked), nothing kept.
struct StrictJson;

impl<'de> serde::Deserialize<'de> for StrictJson {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        d.deserialize_any(StrictVisitor).map(|()| StrictJson)
    }
}

struct StrictVisitor;

impl<'de> serde::de::Visitor<'de> for StrictVisitor {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E>(self, _: bool) -> std::result::Result<(), E> {
        Ok(())
    }
    fn visit_i64<E>(self, _: i64) -> std::result::Result<(), E> {
        Ok(())
    }
    fn visit_u64<E>(self, _: u64) -> std::result::Result<(), E> {
        Ok(())
    }
    fn visit_f64<E>(self, _: f64) -> std::result::Result<(), E> {
        Ok(())
    }
    fn visit_str<E>(self, _: &str) -> std::result::Result<(), E> {
        Ok(())
    }
    fn visit_unit<E>(self) -> std::result::Result<(), E> {
        Ok(())
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(
        self,
        mut a: A,
    ) -> std::result::Result<(), A::Error> {
        while a.next_element::<StrictJson>()?.is_some() {}
        Ok(())
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(
        self,
        mut a: A,
    ) -> std::result::Result<(), A::Error> {
        while a.next_entry::<StrictJson, StrictJson>()?.is_some() {}
        Ok(())
    }
}
