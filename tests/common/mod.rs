//! Shared test helpers: tiny random models and a hand-written tokenizer.
#![allow(dead_code)]

pub mod fixtures;

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

use beft::rng::Rng;
use beft::weights::write_safetensors;
use serde_json::json;

/// `v` rounded to bf16 (nearest even) and back: values bf16 holds exactly,
/// as a bf16 device or product sees them.
pub fn bf16_round(v: &[f32]) -> Vec<f32> {
    v.iter()
        .map(|x| half::bf16::from_f32(*x).to_f32())
        .collect()
}

/// A tiny BERT-style WordPiece tokenizer.json, written by hand.
pub fn tiny_tokenizer_json(padding: bool) -> String {
    let vocab = [
        "[PAD]", "[UNK]", "[CLS]", "[SEP]", "hello", "world", "good", "movie", "##s", "bad", "the",
        "a", ".",
    ];
    let vocab_json: Vec<String> = vocab
        .iter()
        .enumerate()
        .map(|(i, t)| format!("\"{t}\": {i}"))
        .collect();
    let added: Vec<String> = vocab[..4]
        .iter()
        .enumerate()
        .map(|(i, t)| {
            format!(
                "{{\"id\": {i}, \"content\": \"{t}\", \"single_word\": false, \"lstrip\": false, \"rstrip\": false, \"normalized\": false, \"special\": true}}"
            )
        })
        .collect();
    let pad = if padding {
        r#"{"strategy": {"Fixed": 16}, "direction": "Right", "pad_to_multiple_of": null, "pad_id": 0, "pad_type_id": 0, "pad_token": "[PAD]"}"#
    } else {
        "null"
    };
    format!(
        r###"{{
  "version": "1.0",
  "truncation": {{"direction": "Right", "max_length": 512, "strategy": "LongestFirst", "stride": 0}},
  "padding": {pad},
  "added_tokens": [{added}],
  "normalizer": {{"type": "BertNormalizer", "clean_text": true, "handle_chinese_chars": true, "strip_accents": null, "lowercase": true}},
  "pre_tokenizer": {{"type": "BertPreTokenizer"}},
  "post_processor": {{
    "type": "TemplateProcessing",
    "single": [{{"SpecialToken": {{"id": "[CLS]", "type_id": 0}}}}, {{"Sequence": {{"id": "A", "type_id": 0}}}}, {{"SpecialToken": {{"id": "[SEP]", "type_id": 0}}}}],
    "pair": [{{"SpecialToken": {{"id": "[CLS]", "type_id": 0}}}}, {{"Sequence": {{"id": "A", "type_id": 0}}}}, {{"SpecialToken": {{"id": "[SEP]", "type_id": 0}}}},
             {{"Sequence": {{"id": "B", "type_id": 1}}}}, {{"SpecialToken": {{"id": "[SEP]", "type_id": 1}}}}],
    "special_tokens": {{"[CLS]": {{"id": "[CLS]", "ids": [2], "tokens": ["[CLS]"]}}, "[SEP]": {{"id": "[SEP]", "ids": [3], "tokens": ["[SEP]"]}}}}
  }},
  "decoder": {{"type": "WordPiece", "prefix": "##", "cleanup": true}},
  "model": {{"type": "WordPiece", "unk_token": "[UNK]", "continuing_subword_prefix": "##", "max_input_chars_per_word": 100, "vocab": {{{vocab}}}}}
}}"###,
        added = added.join(", "),
        vocab = vocab_json.join(", ")
    )
}

/// Architecture of a tiny random model.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum TinyArch {
    Bert,
    Roberta,
}

pub const TINY_VOCAB: usize = 13;

/// config.json of a tiny random model.
pub fn tiny_config(
    arch: TinyArch,
    hidden: usize,
    layers: usize,
    heads: usize,
    ff: usize,
) -> serde_json::Value {
    match arch {
        TinyArch::Bert => json!({
            "model_type": "bert", "vocab_size": TINY_VOCAB, "hidden_size": hidden, "num_hidden_layers": layers,
            "num_attention_heads": heads, "intermediate_size": ff, "hidden_act": "gelu",
            "max_position_embeddings": 64, "type_vocab_size": 2, "layer_norm_eps": 1e-12, "pad_token_id": 0
        }),
        TinyArch::Roberta => json!({
            "model_type": "roberta", "vocab_size": TINY_VOCAB, "hidden_size": hidden, "num_hidden_layers": layers,
            "num_attention_heads": heads, "intermediate_size": ff, "hidden_act": "gelu",
            "max_position_embeddings": 66, "type_vocab_size": 1, "layer_norm_eps": 1e-5, "pad_token_id": 1
        }),
    }
}

/// Write a tiny random model directory (config.json, model.safetensors,
/// tokenizer.json). Weights are "loud" (N(0, 0.3²)), every bias non-zero.
/// With `head = Some(n)`, a classifier head of n labels is saved too.
pub fn write_tiny_model(dir: &Path, arch: TinyArch, seed: u64, head: Option<usize>) {
    let (d, layers, heads, ff) = (8usize, 2usize, 2usize, 12usize);
    let cfg = tiny_config(arch, d, layers, heads, ff);
    fs::create_dir_all(dir).unwrap();
    fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    fs::write(dir.join("tokenizer.json"), tiny_tokenizer_json(false)).unwrap();
    let mut rng = Rng::new(seed);
    let mut t: Vec<(String, Vec<usize>, Vec<f32>)> = Vec::new();
    let mut rand = |name: String, shape: Vec<usize>, mean: f64, std: f64| {
        let n: usize = shape.iter().product();
        let v = (0..n).map(|_| (mean + rng.normal() * std) as f32).collect();
        t.push((name, shape, v));
    };
    let p = match arch {
        TinyArch::Bert => "bert.",
        TinyArch::Roberta => "roberta.",
    };
    let max_pos = cfg["max_position_embeddings"].as_u64().unwrap() as usize;
    let types = cfg["type_vocab_size"].as_u64().unwrap() as usize;
    rand(
        format!("{p}embeddings.word_embeddings.weight"),
        vec![TINY_VOCAB, d],
        0.0,
        0.5,
    );
    rand(
        format!("{p}embeddings.position_embeddings.weight"),
        vec![max_pos, d],
        0.0,
        0.3,
    );
    rand(
        format!("{p}embeddings.token_type_embeddings.weight"),
        vec![types, d],
        0.0,
        0.3,
    );
    rand(format!("{p}embeddings.LayerNorm.weight"), vec![d], 1.0, 0.1);
    rand(format!("{p}embeddings.LayerNorm.bias"), vec![d], 0.0, 0.1);
    for l in 0..layers {
        let q = format!("{p}encoder.layer.{l}.");
        for (name, o, i) in [
            ("attention.self.query", d, d),
            ("attention.self.key", d, d),
            ("attention.self.value", d, d),
            ("attention.output.dense", d, d),
            ("intermediate.dense", ff, d),
            ("output.dense", d, ff),
        ] {
            rand(format!("{q}{name}.weight"), vec![o, i], 0.0, 0.4);
            rand(format!("{q}{name}.bias"), vec![o], 0.0, 0.1);
        }
        for name in ["attention.output.LayerNorm", "output.LayerNorm"] {
            rand(format!("{q}{name}.weight"), vec![d], 1.0, 0.1);
            rand(format!("{q}{name}.bias"), vec![d], 0.0, 0.1);
        }
    }
    match arch {
        TinyArch::Bert => {
            rand(format!("{p}pooler.dense.weight"), vec![d, d], 0.0, 0.4);
            rand(format!("{p}pooler.dense.bias"), vec![d], 0.0, 0.1);
            if let Some(c) = head {
                rand("classifier.weight".into(), vec![c, d], 0.0, 0.4);
                rand("classifier.bias".into(), vec![c], 0.0, 0.1);
            }
        }
        TinyArch::Roberta => {
            rand("classifier.dense.weight".into(), vec![d, d], 0.0, 0.4);
            rand("classifier.dense.bias".into(), vec![d], 0.0, 0.1);
            if let Some(c) = head {
                rand("classifier.out_proj.weight".into(), vec![c, d], 0.0, 0.4);
                rand("classifier.out_proj.bias".into(), vec![c], 0.0, 0.1);
            }
        }
    }
    write_safetensors(&dir.join("model.safetensors"), &t, &BTreeMap::new()).unwrap();
}

/// Write an SST-2-style data directory with `n` train and `n_dev` dev rows
/// of a trivially learnable task ("good" → 1, "bad" → 0).
pub fn write_tiny_sst2(dir: &Path, n: usize, n_dev: usize) {
    fs::create_dir_all(dir).unwrap();
    let mut rng = Rng::new(3);
    for (file, rows) in [("train.tsv", n), ("dev.tsv", n_dev)] {
        let mut s = String::from("sentence\tlabel\n");
        for _ in 0..rows {
            let pos = rng.below(2) == 1;
            let filler = ["the movie", "a movie", "the world", "hello world ."][rng.below(4)];
            let w = if pos { "good" } else { "bad" };
            s.push_str(&format!("{filler} {w} {filler}\t{}\n", pos as u8));
        }
        fs::write(dir.join(file), s).unwrap();
    }
}
