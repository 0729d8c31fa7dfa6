//! Random-weight models of a given shape, written as a Hugging Face
//! directory: for benchmarks at real shapes without downloading weights.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

use serde_json::json;

use crate::error::{Error, Result};
use crate::rng::Rng;
use crate::weights::write_safetensors;

/// The shape of a BERT-style encoder.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BertShape {
    pub vocab: usize,
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub intermediate: usize,
    pub max_positions: usize,
}

impl BertShape {
    /// all-MiniLM-L6-v2.
    pub const MINILM_L6: BertShape = BertShape {
        vocab: 30522,
        hidden: 384,
        layers: 6,
        heads: 12,
        intermediate: 1536,
        max_positions: 512,
    };
    /// bert-base.
    pub const BERT_BASE: BertShape = BertShape {
        vocab: 30522,
        hidden: 768,
        layers: 12,
        heads: 12,
        intermediate: 3072,
        max_positions: 512,
    };
}

/// Write `config.json` and `model.safetensors` (f32, N(0, 0.02²) weights,
/// unit LayerNorm scales, small random biases) for a BERT of `shape`.
pub fn write_random_bert(dir: &Path, shape: BertShape, seed: u64) -> Result<()> {
    fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let s = shape;
    let cfg = json!({
        "model_type": "bert", "vocab_size": s.vocab, "hidden_size": s.hidden, "num_hidden_layers": s.layers,
        "num_attention_heads": s.heads, "intermediate_size": s.intermediate, "hidden_act": "gelu",
        "max_position_embeddings": s.max_positions, "type_vocab_size": 2, "layer_norm_eps": 1e-12, "pad_token_id": 0
    });
    let cfg_path = dir.join("config.json");
    fs::write(&cfg_path, cfg.to_string()).map_err(|e| Error::io(&cfg_path, e))?;
    let mut rng = Rng::new(seed);
    let mut t: Vec<(String, Vec<usize>, Vec<f32>)> = Vec::new();
    let mut add = |name: String, shape: Vec<usize>, mean: f64, std: f64| {
        let n: usize = shape.iter().product();
        t.push((
            name,
            shape,
            (0..n).map(|_| (mean + rng.normal() * std) as f32).collect(),
        ));
    };
    let (d, ff) = (s.hidden, s.intermediate);
    add(
        "embeddings.word_embeddings.weight".into(),
        vec![s.vocab, d],
        0.0,
        0.02,
    );
    add(
        "embeddings.position_embeddings.weight".into(),
        vec![s.max_positions, d],
        0.0,
        0.02,
    );
    add(
        "embeddings.token_type_embeddings.weight".into(),
        vec![2, d],
        0.0,
        0.02,
    );
    add("embeddings.LayerNorm.weight".into(), vec![d], 1.0, 0.0);
    add("embeddings.LayerNorm.bias".into(), vec![d], 0.0, 0.01);
    for l in 0..s.layers {
        let p = format!("encoder.layer.{l}.");
        for (name, o, i) in [
            ("attention.self.query", d, d),
            ("attention.self.key", d, d),
            ("attention.self.value", d, d),
            ("attention.output.dense", d, d),
            ("intermediate.dense", ff, d),
            ("output.dense", d, ff),
        ] {
            add(format!("{p}{name}.weight"), vec![o, i], 0.0, 0.02);
            add(format!("{p}{name}.bias"), vec![o], 0.0, 0.01);
        }
        for name in ["attention.output.LayerNorm", "output.LayerNorm"] {
            add(format!("{p}{name}.weight"), vec![d], 1.0, 0.0);
            add(format!("{p}{name}.bias"), vec![d], 0.0, 0.01);
        }
    }
    add("pooler.dense.weight".into(), vec![d, d], 0.0, 0.02);
    add("pooler.dense.bias".into(), vec![d], 0.0, 0.01);
    write_safetensors(&dir.join("model.safetensors"), &t, &BTreeMap::new())
}
