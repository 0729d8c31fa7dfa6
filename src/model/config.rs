//! Model configuration: a Hugging Face `config.json`, checked, and a model
//! directory (config, weights, tokenizer, sentence-transformers pooling).

use std::fs;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::backend::{Act, PoolKind};
use crate::error::{Error, Result};
use crate::weights::WeightStore;

/// Model architecture families.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    /// BERT encoders (also MiniLM checkpoints, which say `"bert"`).
    Bert,
    /// RoBERTa encoders (also XLM-RoBERTa and CamemBERT).
    Roberta,
    /// GPT-2 decoders (fused `c_attn`, Conv1D weights `[in, out]`, learned
    /// positions, pre-LN, tied LM head).
    Gpt2,
    /// OPT decoders (separate q/k/v/out projections, learned positions with
    /// an offset of 2, ReLU MLP, optional project_in/out).
    Opt,
    /// LLaMA-family decoders (LLaMA, Mistral, SmolLM): RMSNorm, RoPE,
    /// SwiGLU, grouped-query attention, no biases.
    Llama,
    /// Qwen2: the LLaMA layout with biases on the q/k/v projections.
    Qwen2,
}

/// `model_type` values of config.json and the architecture each one maps to.
/// New architectures are added here (and to [`Arch`]).
const MODEL_TYPES: &[(&str, Arch)] = &[
    ("bert", Arch::Bert),
    ("roberta", Arch::Roberta),
    ("xlm-roberta", Arch::Roberta),
    ("camembert", Arch::Roberta),
    ("gpt2", Arch::Gpt2),
    ("opt", Arch::Opt),
    ("llama", Arch::Llama),
    ("mistral", Arch::Llama),
    ("qwen2", Arch::Qwen2),
];

/// The names shown in "unknown model_type" messages.
const SUPPORTED: &str = "bert, roberta, gpt2, opt, llama, mistral, qwen2";

impl Arch {
    /// The architecture of a config.json `model_type`, if supported.
    pub fn from_model_type(model_type: &str) -> Option<Arch> {
        MODEL_TYPES
            .iter()
            .find(|(t, _)| *t == model_type)
            .map(|&(_, a)| a)
    }

    /// Short lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            Arch::Bert => "bert",
            Arch::Roberta => "roberta",
            Arch::Gpt2 => "gpt2",
            Arch::Opt => "opt",
            Arch::Llama => "llama",
            Arch::Qwen2 => "qwen2",
        }
    }

    /// Whether this is a causal decoder (GPT-2, OPT, LLaMA family).
    pub fn is_decoder(self) -> bool {
        matches!(self, Arch::Gpt2 | Arch::Opt | Arch::Llama | Arch::Qwen2)
    }

    /// Whether this is a LLaMA-style decoder (RMSNorm, RoPE, SwiGLU).
    pub fn is_llama_like(self) -> bool {
        matches!(self, Arch::Llama | Arch::Qwen2)
    }

    /// Hugging Face's default `pad_token_id` for this family.
    fn default_pad_token_id(self) -> u32 {
        match self {
            Arch::Bert => 0,
            Arch::Roberta => 1,
            Arch::Opt => 1,
            Arch::Gpt2 | Arch::Llama | Arch::Qwen2 => 0,
        }
    }
}

impl std::fmt::Display for Arch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A checked model configuration.
#[derive(Clone, Debug)]
pub struct ModelConfig {
    pub arch: Arch,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub intermediate_size: usize,
    pub hidden_act: Act,
    pub max_position_embeddings: usize,
    pub type_vocab_size: usize,
    pub layer_norm_eps: f64,
    pub pad_token_id: u32,
    pub hidden_dropout: f64,
    pub attention_dropout: f64,
    pub classifier_dropout: Option<f64>,
    /// From `num_labels`, or the size of `id2label`, if present.
    pub num_labels: Option<usize>,
    /// As written in config.json.
    pub model_type: String,
    /// Key/value heads (grouped-query attention; = `num_heads` unless a
    /// LLaMA-family config says `num_key_value_heads`).
    pub num_kv_heads: usize,
    /// Width of one attention head (`hidden_size / num_heads`, or a LLaMA
    /// config's explicit `head_dim`).
    pub attn_head_dim: usize,
    /// RoPE base (`rope_theta`, or `rope_parameters.rope_theta`); LLaMA family only.
    pub rope_theta: f64,
    /// Whether the LM head shares the token embedding (decoders).
    pub tie_word_embeddings: bool,
    /// Whether the attention projections (q, k, v, o) have biases in the
    /// checkpoint (GPT-2, OPT with `enable_bias`, LLaMA with
    /// `attention_bias`; Qwen2: q, k, v only — see [`ModelConfig::has_bias`]).
    pub attention_bias: bool,
    /// Whether the MLP projections have biases in the checkpoint.
    pub mlp_bias: bool,
    /// Pre-LN blocks (GPT-2, LLaMA, OPT's `do_layer_norm_before`); false =
    /// post-LN (OPT-350m).
    pub norm_before: bool,
    /// OPT's `word_embed_proj_dim` (embedding width; = hidden_size when there is
    /// no project_in/out). Other decoders: hidden_size.
    pub word_embed_proj_dim: usize,
    /// `bos_token_id` / `eos_token_id`, if given.
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
}

/// Bounds that reject corrupt or absurd values.
const MAX_VOCAB: usize = 10_000_000;
const MAX_HIDDEN: usize = 1 << 17;
const MAX_LAYERS: usize = 10_000;
const MAX_INTERMEDIATE: usize = 1 << 20;
const MAX_POSITIONS: usize = 1 << 24;
const MAX_TYPE_VOCAB: usize = 1 << 20;
const MAX_LABELS: usize = 1 << 20;

/// Reads keys of one config.json, with messages that name the file.
struct Keys<'a> {
    obj: &'a serde_json::Map<String, Value>,
    path: &'a Path,
}

impl Keys<'_> {
    /// The value of `key`, treating JSON `null` as absent.
    fn get(&self, key: &str) -> Option<&Value> {
        self.obj.get(key).filter(|v| !v.is_null())
    }

    fn err(&self, msg: impl std::fmt::Display) -> Error {
        Error::file(self.path, msg)
    }

    /// An integer in `lo..=hi`; `default` when absent (`None`: required).
    fn usize_in(&self, key: &str, default: Option<usize>, lo: usize, hi: usize) -> Result<usize> {
        let x = match self.get(key) {
            None => default.ok_or_else(|| self.err(format!("required key '{key}' is missing")))?,
            Some(v) => v
                .as_u64()
                .and_then(|x| usize::try_from(x).ok())
                .ok_or_else(|| {
                    self.err(format!("'{key}' must be a non-negative integer, got {v}"))
                })?,
        };
        if x < lo || x > hi {
            return Err(self.err(format!(
                "'{key}' = {x} is out of range (expected {lo}..={hi})"
            )));
        }
        Ok(x)
    }

    /// A number in `[lo, hi)` (finite); `default` when absent.
    fn f64_in(&self, key: &str, default: f64, lo: f64, hi: f64) -> Result<f64> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => {
                let x = v
                    .as_f64()
                    .ok_or_else(|| self.err(format!("'{key}' must be a number, got {v}")))?;
                if !(x.is_finite() && x >= lo && x < hi) {
                    return Err(self.err(format!(
                        "'{key}' = {x} is out of range (expected {lo} <= x < {hi})"
                    )));
                }
                Ok(x)
            }
        }
    }

    fn str(&self, key: &str) -> Result<Option<&str>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_str()
                .map(Some)
                .ok_or_else(|| self.err(format!("'{key}' must be a string, got {v}"))),
        }
    }
}

impl ModelConfig {
    /// Read and check a Hugging Face `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let v = read_json(path)?;
        Self::from_json(&v, path)
    }

    /// Check a parsed config.json (`path` is used only in messages). Absent
    /// optional keys take Hugging Face `BertConfig`'s defaults.
    pub fn from_json(v: &Value, path: &Path) -> Result<Self> {
        let obj = v
            .as_object()
            .ok_or_else(|| Error::file(path, "config is not a JSON object"))?;
        let k = Keys { obj, path };

        let model_type = k
            .str("model_type")?
            .ok_or_else(|| {
                k.err(format!(
                    "required key 'model_type' is missing (supported: {SUPPORTED})"
                ))
            })?
            .to_string();
        let arch = Arch::from_model_type(&model_type).ok_or_else(|| {
            k.err(format!(
                "unknown model_type '{model_type}' (supported: {SUPPORTED})"
            ))
        })?;

        if arch.is_decoder() {
            return Self::decoder_from_keys(&k, arch, model_type);
        }

        let vocab_size = k.usize_in("vocab_size", None, 1, MAX_VOCAB)?;
        let hidden_size = k.usize_in("hidden_size", None, 1, MAX_HIDDEN)?;
        let num_layers = k.usize_in("num_hidden_layers", None, 1, MAX_LAYERS)?;
        let num_heads = k.usize_in("num_attention_heads", None, 1, MAX_HIDDEN)?;
        let intermediate_size = k.usize_in("intermediate_size", None, 1, MAX_INTERMEDIATE)?;
        if hidden_size % num_heads != 0 {
            return Err(k.err(format!(
                "hidden_size {hidden_size} is not divisible by num_attention_heads {num_heads}"
            )));
        }

        let act_name = k.str("hidden_act")?.unwrap_or("gelu");
        let hidden_act = match act_name {
            "gelu" => Act::Gelu,
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Act::GeluTanh,
            "relu" => Act::Relu,
            "silu" | "swish" => Act::Silu,
            "tanh" => Act::Tanh,
            other => {
                return Err(k.err(format!(
                    "unsupported hidden_act '{other}' (supported: gelu, gelu_new, gelu_pytorch_tanh, gelu_fast, relu, silu, swish, tanh)"
                )))
            }
        };

        let max_position_embeddings =
            k.usize_in("max_position_embeddings", Some(512), 1, MAX_POSITIONS)?;
        let type_vocab_size = k.usize_in("type_vocab_size", Some(2), 0, MAX_TYPE_VOCAB)?;
        let layer_norm_eps = k.f64_in("layer_norm_eps", 1e-12, f64::MIN_POSITIVE, 1.0)?;
        let pad = k.usize_in(
            "pad_token_id",
            Some(arch.default_pad_token_id() as usize),
            0,
            u32::MAX as usize,
        )?;
        if pad >= vocab_size {
            return Err(k.err(format!(
                "pad_token_id {pad} is not below vocab_size {vocab_size}"
            )));
        }
        let hidden_dropout = k.f64_in("hidden_dropout_prob", 0.1, 0.0, 1.0)?;
        let attention_dropout = k.f64_in("attention_probs_dropout_prob", 0.1, 0.0, 1.0)?;
        let classifier_dropout = match k.get("classifier_dropout") {
            None => None,
            Some(_) => Some(k.f64_in("classifier_dropout", 0.0, 0.0, 1.0)?),
        };

        let num_labels = if k.get("num_labels").is_some() {
            Some(k.usize_in("num_labels", None, 1, MAX_LABELS)?)
        } else {
            match k.get("id2label") {
                None => None,
                Some(Value::Object(m)) if !m.is_empty() => Some(m.len()),
                Some(v) => {
                    return Err(k.err(format!("'id2label' must be a non-empty object, got {v}")))
                }
            }
        };

        Ok(ModelConfig {
            arch,
            vocab_size,
            hidden_size,
            num_layers,
            num_heads,
            intermediate_size,
            hidden_act,
            max_position_embeddings,
            type_vocab_size,
            layer_norm_eps,
            pad_token_id: pad as u32,
            hidden_dropout,
            attention_dropout,
            classifier_dropout,
            num_labels,
            model_type,
            num_kv_heads: num_heads,
            attn_head_dim: hidden_size / num_heads,
            rope_theta: 10_000.0,
            tie_word_embeddings: false,
            attention_bias: true,
            mlp_bias: true,
            norm_before: false,
            word_embed_proj_dim: hidden_size,
            bos_token_id: None,
            eos_token_id: None,
        })
    }

    /// A decoder's config.json (GPT-2, OPT, LLaMA/Mistral/SmolLM, Qwen2),
    /// with Hugging Face's key names and defaults for each family.
    fn decoder_from_keys(k: &Keys<'_>, arch: Arch, model_type: String) -> Result<Self> {
        // A key that may be spelled two ways (GPT-2's n_embd vs hidden_size).
        let first = |a: &str, b: &str| {
            if k.get(a).is_some() {
                a.to_string()
            } else {
                b.to_string()
            }
        };
        let token_id = |key: &str| -> Result<Option<u32>> {
            match k.get(key) {
                None => Ok(None),
                Some(Value::Array(a)) => Ok(a.first().and_then(Value::as_u64).map(|x| x as u32)),
                Some(v) => v
                    .as_u64()
                    .filter(|x| *x <= u32::MAX as u64)
                    .map(|x| Some(x as u32))
                    .ok_or_else(|| k.err(format!("'{key}' must be a token id, got {v}"))),
            }
        };
        let vocab_size = k.usize_in("vocab_size", None, 1, MAX_VOCAB)?;
        let (hidden_size, num_layers, num_heads);
        let mut intermediate_size;
        let (act_key, act_default, eps_key, eps_default, pos_key, pos_default);
        match arch {
            Arch::Gpt2 => {
                hidden_size = k.usize_in(&first("n_embd", "hidden_size"), None, 1, MAX_HIDDEN)?;
                num_layers =
                    k.usize_in(&first("n_layer", "num_hidden_layers"), None, 1, MAX_LAYERS)?;
                num_heads =
                    k.usize_in(&first("n_head", "num_attention_heads"), None, 1, MAX_HIDDEN)?;
                intermediate_size =
                    k.usize_in("n_inner", Some(4 * hidden_size), 1, MAX_INTERMEDIATE)?;
                act_key = "activation_function";
                act_default = "gelu_new";
                eps_key = "layer_norm_epsilon";
                eps_default = 1e-5;
                pos_key = first("n_positions", "max_position_embeddings");
                pos_default = 1024;
            }
            Arch::Opt => {
                hidden_size = k.usize_in("hidden_size", None, 1, MAX_HIDDEN)?;
                num_layers = k.usize_in("num_hidden_layers", None, 1, MAX_LAYERS)?;
                num_heads = k.usize_in("num_attention_heads", None, 1, MAX_HIDDEN)?;
                intermediate_size = k.usize_in("ffn_dim", None, 1, MAX_INTERMEDIATE)?;
                act_key = "activation_function";
                act_default = "relu";
                eps_key = "layer_norm_eps";
                eps_default = 1e-5;
                pos_key = "max_position_embeddings".to_string();
                pos_default = 2048;
            }
            _ => {
                hidden_size = k.usize_in("hidden_size", None, 1, MAX_HIDDEN)?;
                num_layers = k.usize_in("num_hidden_layers", None, 1, MAX_LAYERS)?;
                num_heads = k.usize_in("num_attention_heads", None, 1, MAX_HIDDEN)?;
                intermediate_size = k.usize_in("intermediate_size", None, 1, MAX_INTERMEDIATE)?;
                act_key = "hidden_act";
                act_default = "silu";
                eps_key = "rms_norm_eps";
                eps_default = 1e-6;
                pos_key = "max_position_embeddings".to_string();
                pos_default = if arch == Arch::Llama { 2048 } else { 32768 };
            }
        }
        let (heads_key, hidden_key) = match arch {
            Arch::Gpt2 => (
                first("n_head", "num_attention_heads"),
                first("n_embd", "hidden_size"),
            ),
            _ => ("num_attention_heads".to_string(), "hidden_size".to_string()),
        };
        let explicit_head_dim = if arch.is_llama_like() && k.get("head_dim").is_some() {
            Some(k.usize_in("head_dim", None, 1, MAX_HIDDEN)?)
        } else {
            None
        };
        let attn_head_dim = match explicit_head_dim {
            Some(h) => h,
            None => {
                if hidden_size % num_heads != 0 {
                    return Err(k.err(format!(
                        "{hidden_key} {hidden_size} is not divisible by {heads_key} {num_heads}"
                    )));
                }
                hidden_size / num_heads
            }
        };
        if arch.is_llama_like() && attn_head_dim % 2 != 0 {
            return Err(k.err(format!(
                "head dimension {attn_head_dim} is odd: rotary embeddings need an even head dimension"
            )));
        }
        let num_kv_heads = if arch.is_llama_like() {
            k.usize_in("num_key_value_heads", Some(num_heads), 1, MAX_HIDDEN)?
        } else {
            num_heads
        };
        if num_heads % num_kv_heads != 0 {
            return Err(k.err(format!(
                "num_attention_heads {num_heads} is not divisible by num_key_value_heads {num_kv_heads}"
            )));
        }
        let act_name = k.str(act_key)?.unwrap_or(act_default);
        let hidden_act = match act_name {
            "gelu" => Act::Gelu,
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Act::GeluTanh,
            "relu" => Act::Relu,
            "silu" | "swish" => Act::Silu,
            "tanh" => Act::Tanh,
            other => {
                return Err(k.err(format!(
                    "unsupported {act_key} '{other}' (supported: gelu, gelu_new, gelu_pytorch_tanh, gelu_fast, relu, silu, swish, tanh)"
                )))
            }
        };
        if arch.is_llama_like() && hidden_act != Act::Silu {
            return Err(k.err(format!(
                "hidden_act '{act_name}': only SiLU (SwiGLU) MLPs are supported for {model_type}"
            )));
        }
        let max_position_embeddings = k.usize_in(&pos_key, Some(pos_default), 1, MAX_POSITIONS)?;
        let layer_norm_eps = k.f64_in(eps_key, eps_default, f64::MIN_POSITIVE, 1.0)?;
        // RoPE: `rope_theta`, or transformers 5's `rope_parameters`; only the
        // default (unscaled) rotary type is supported.
        let mut rope_theta = 10_000.0;
        if arch.is_llama_like() {
            rope_theta = k.f64_in("rope_theta", rope_theta, f64::MIN_POSITIVE, f64::MAX)?;
            for key in ["rope_parameters", "rope_scaling"] {
                if let Some(Value::Object(m)) = k.get(key) {
                    if let Some(t) = m.get("rope_theta").and_then(Value::as_f64) {
                        rope_theta = t;
                    }
                    let ty = m
                        .get("rope_type")
                        .or_else(|| m.get("type"))
                        .and_then(Value::as_str)
                        .unwrap_or("default");
                    if ty != "default" {
                        return Err(k.err(format!(
                            "{key}: rope type '{ty}' is not supported (only the default rotary embedding)"
                        )));
                    }
                }
            }
            if !(rope_theta.is_finite() && rope_theta > 0.0) {
                return Err(k.err(format!("rope_theta {rope_theta} must be positive")));
            }
        }
        let (tie_default, attn_bias_default, mlp_bias_default) = match arch {
            Arch::Gpt2 | Arch::Opt => (true, true, true),
            _ => (false, false, false),
        };
        let bool_key = |key: &str, default: bool| -> Result<bool> {
            match k.get(key) {
                None => Ok(default),
                Some(v) => v
                    .as_bool()
                    .ok_or_else(|| k.err(format!("'{key}' must be true or false, got {v}"))),
            }
        };
        let tie_word_embeddings = bool_key("tie_word_embeddings", tie_default)?;
        let (attention_bias, mlp_bias) = match arch {
            Arch::Opt => {
                let b = bool_key("enable_bias", true)?;
                (b, b)
            }
            Arch::Llama => (
                bool_key("attention_bias", attn_bias_default)?,
                bool_key("mlp_bias", mlp_bias_default)?,
            ),
            // Qwen2: biases on q, k, v (not o, not the MLP).
            Arch::Qwen2 => (true, false),
            _ => (true, true),
        };
        let norm_before = match arch {
            Arch::Opt => bool_key("do_layer_norm_before", true)?,
            _ => true,
        };
        let word_embed_proj_dim = match arch {
            Arch::Opt => k.usize_in("word_embed_proj_dim", Some(hidden_size), 1, MAX_HIDDEN)?,
            _ => hidden_size,
        };
        if arch == Arch::Opt && !bool_key("layer_norm_elementwise_affine", true)? {
            return Err(k.err(
                "layer_norm_elementwise_affine = false is not supported (LayerNorms without weights)",
            ));
        }
        let pad = match k.get("pad_token_id") {
            None => arch.default_pad_token_id() as usize,
            Some(_) => k.usize_in("pad_token_id", None, 0, u32::MAX as usize)?,
        };
        let (hd, ad) = match arch {
            Arch::Gpt2 => ("resid_pdrop", "attn_pdrop"),
            Arch::Opt => ("dropout", "attention_dropout"),
            _ => ("hidden_dropout", "attention_dropout"),
        };
        let hidden_dropout = k.f64_in(hd, 0.0, 0.0, 1.0)?;
        let attention_dropout = k.f64_in(ad, 0.0, 0.0, 1.0)?;
        let bos_token_id = token_id("bos_token_id")?;
        let eos_token_id = token_id("eos_token_id")?;
        if intermediate_size == 0 {
            intermediate_size = 4 * hidden_size;
        }
        Ok(ModelConfig {
            arch,
            vocab_size,
            hidden_size,
            num_layers,
            num_heads,
            intermediate_size,
            hidden_act,
            max_position_embeddings,
            type_vocab_size: 0,
            layer_norm_eps,
            // A decoder's pad id only fills padding positions (masked out);
            // clamp an out-of-vocabulary one to 0.
            pad_token_id: if pad < vocab_size { pad as u32 } else { 0 },
            hidden_dropout,
            attention_dropout,
            classifier_dropout: None,
            num_labels: None,
            model_type,
            num_kv_heads,
            attn_head_dim,
            rope_theta,
            tie_word_embeddings,
            attention_bias,
            mlp_bias,
            norm_before,
            word_embed_proj_dim,
            bos_token_id,
            eos_token_id,
        })
    }

    /// Width of one attention head.
    pub fn head_dim(&self) -> usize {
        self.attn_head_dim
    }

    /// Whether the checkpoint has a bias for `term` (decoders; encoders have
    /// every bias).
    pub fn has_bias(&self, term: crate::model::bias::BiasTerm) -> bool {
        use crate::model::bias::BiasTerm as T;
        match term {
            T::Q | T::K | T::V => self.attention_bias,
            T::O => self.attention_bias && self.arch != Arch::Qwen2,
            T::MlpIn | T::MlpOut => self.mlp_bias,
            T::Ln1 | T::Ln2 | T::EmbLn => !self.arch.is_llama_like(),
        }
    }
}

/// Read a JSON file, with messages that name it.
fn read_json(path: &Path) -> Result<Value> {
    let text = fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::file(path, format!("not valid JSON: {e}")))
}

/// A Hugging Face (or sentence-transformers) model directory.
#[derive(Debug)]
pub struct ModelDir {
    pub dir: PathBuf,
    /// The directory's file name.
    pub name: String,
    pub config: ModelConfig,
    pub weights: WeightStore,
    /// `dir/tokenizer.json`, if present.
    pub tokenizer: Option<PathBuf>,
    /// The sentence-transformers pooling (`1_Pooling/config.json`): `Mean`
    /// for `pooling_mode_mean_tokens`, `Cls` for `pooling_mode_cls_token`.
    /// `None` when the directory has no pooling config, or when it asks for
    /// a mode other than exactly one of those two (max pooling, several
    /// modes concatenated).
    pub default_pooling: Option<PoolKind>,
}

impl ModelDir {
    /// Refuse a trained-biases file whose metadata records a different base
    /// model (by `base_model_fingerprint`; a file without one is accepted).
    pub fn check_biases_base(&self, biases: &Path, store: &WeightStore) -> Result<()> {
        if let Some(fp) = store.metadata().get("base_model_fingerprint") {
            let ours = self.weights.fingerprint();
            if *fp != ours {
                return Err(Error::file(
                    biases,
                    format!(
                        "was trained on a different base model (fingerprint {fp}, {} is {ours})",
                        self.dir.display()
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Open a model directory: `config.json`, the safetensors weights, and
    /// the optional tokenizer and pooling config.
    pub fn open(dir: &Path) -> Result<Self> {
        // A single `.gguf` file: config, weights and tokenizer from it.
        if crate::weights::gguf::is_gguf_path(dir) && !dir.is_dir() {
            return crate::weights::gguf::open_model_dir(dir);
        }
        if !dir.is_dir() {
            let what = if dir.exists() {
                "not a directory"
            } else {
                "no such directory"
            };
            return Err(Error::file(
                dir,
                format!("{what} (expected a model directory with config.json)"),
            ));
        }
        let cfg_path = dir.join("config.json");
        if !cfg_path.is_file() {
            return Err(Error::file(
                dir,
                "no config.json (expected a Hugging Face model directory with config.json and model.safetensors)",
            ));
        }
        let v = read_json(&cfg_path)?;
        let config = ModelConfig::from_json(&v, &cfg_path)?;
        // The directory's name: `_name_or_path` often names the model a
        // checkpoint was derived from, not the checkpoint itself.
        let name = dir_name(dir);
        let weights = WeightStore::open_dir(dir)?;
        let tok = dir.join("tokenizer.json");
        let tokenizer = tok.is_file().then_some(tok);
        let default_pooling = read_pooling(dir)?;
        Ok(ModelDir {
            dir: dir.to_path_buf(),
            name,
            config,
            weights,
            tokenizer,
            default_pooling,
        })
    }
}

/// The file name of `dir` (resolving `.` and the like), for display.
fn dir_name(dir: &Path) -> String {
    let named = |p: &Path| p.file_name().map(|s| s.to_string_lossy().into_owned());
    named(dir)
        .or_else(|| dir.canonicalize().ok().as_deref().and_then(named))
        .unwrap_or_else(|| dir.display().to_string())
}

/// The sentence-transformers pooling of `dir`: the Pooling module named by
/// `modules.json` if there is one, else `1_Pooling/config.json`.
fn read_pooling(dir: &Path) -> Result<Option<PoolKind>> {
    let mut sub = PathBuf::from("1_Pooling");
    let modules = dir.join("modules.json");
    if modules.is_file() {
        let v = read_json(&modules)?;
        let found = v.as_array().into_iter().flatten().find_map(|m| {
            let ty = m.get("type")?.as_str()?;
            let path = m.get("path")?.as_str()?;
            let plain = !path.is_empty()
                && Path::new(path)
                    .components()
                    .all(|c| matches!(c, std::path::Component::Normal(_)));
            (ty.ends_with(".Pooling") && plain).then(|| PathBuf::from(path))
        });
        if let Some(p) = found {
            sub = p;
        }
    }
    let cfg = dir.join(sub).join("config.json");
    if !cfg.is_file() {
        return Ok(None);
    }
    let v = read_json(&cfg)?;
    let on = |key: &str| v.get(key).and_then(Value::as_bool).unwrap_or(false);
    let modes = [
        "pooling_mode_cls_token",
        "pooling_mode_mean_tokens",
        "pooling_mode_max_tokens",
        "pooling_mode_mean_sqrt_len_tokens",
        "pooling_mode_weightedmean_tokens",
        "pooling_mode_lasttoken",
    ];
    let active: Vec<&str> = modes.iter().copied().filter(|m| on(m)).collect();
    Ok(match active.as_slice() {
        ["pooling_mode_mean_tokens"] => Some(PoolKind::Mean),
        ["pooling_mode_cls_token"] => Some(PoolKind::Cls),
        _ => None,
    })
}
