//! Random-weight models of a given shape, written as a Hugging Face
//! directory: for benchmarks at real shapes without downloading weights.
//! BERT models are small enough to build in memory; OPT models (up to
//! 6.7B parameters) are streamed to disk chunk by chunk.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

use serde_json::json;

use crate::error::{Error, Result};
use crate::rng::Rng;
use crate::weights::{write_safetensors, write_safetensors_with, DType};

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

/// The shape of an OPT decoder (pre-LN, ReLU MLP, learned positions, tied
/// LM head), as Hugging Face's `OPTConfig` describes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OptShape {
    pub vocab: usize,
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub ffn: usize,
    pub max_positions: usize,
}

impl OptShape {
    /// A tiny OPT for tests (a few hundred thousand parameters).
    pub const TINY: OptShape = OptShape {
        vocab: 1000,
        hidden: 64,
        layers: 2,
        heads: 4,
        ffn: 256,
        max_positions: 256,
    };
    /// facebook/opt-125m.
    pub const OPT_125M: OptShape = OptShape {
        vocab: 50272,
        hidden: 768,
        layers: 12,
        heads: 12,
        ffn: 3072,
        max_positions: 2048,
    };
    /// facebook/opt-1.3b.
    pub const OPT_1_3B: OptShape = OptShape {
        vocab: 50272,
        hidden: 2048,
        layers: 24,
        heads: 32,
        ffn: 8192,
        max_positions: 2048,
    };
    /// facebook/opt-6.7b.
    pub const OPT_6_7B: OptShape = OptShape {
        vocab: 50272,
        hidden: 4096,
        layers: 32,
        heads: 32,
        ffn: 16384,
        max_positions: 2048,
    };

    /// Every tensor of the checkpoint, in file order: Hugging Face name,
    /// shape and how it is initialised.
    fn tensors(&self) -> Vec<(String, Vec<usize>, Init)> {
        let (d, f) = (self.hidden, self.ffn);
        let p = "model.decoder.";
        let mut t = vec![
            (
                format!("{p}embed_tokens.weight"),
                vec![self.vocab, d],
                Init::Normal(0.02),
            ),
            // OPT's learned positions are offset by 2.
            (
                format!("{p}embed_positions.weight"),
                vec![self.max_positions + 2, d],
                Init::Normal(0.02),
            ),
        ];
        let ln = |t: &mut Vec<(String, Vec<usize>, Init)>, name: String| {
            t.push((format!("{name}.weight"), vec![d], Init::One));
            t.push((format!("{name}.bias"), vec![d], Init::Normal(0.01)));
        };
        for l in 0..self.layers {
            let b = format!("{p}layers.{l}.");
            for (name, o, i) in [
                ("self_attn.q_proj", d, d),
                ("self_attn.k_proj", d, d),
                ("self_attn.v_proj", d, d),
                ("self_attn.out_proj", d, d),
                ("fc1", f, d),
                ("fc2", d, f),
            ] {
                t.push((format!("{b}{name}.weight"), vec![o, i], Init::Normal(0.02)));
                t.push((format!("{b}{name}.bias"), vec![o], Init::Normal(0.01)));
            }
            ln(&mut t, format!("{b}self_attn_layer_norm"));
            ln(&mut t, format!("{b}final_layer_norm"));
        }
        ln(&mut t, format!("{p}final_layer_norm"));
        t
    }

    /// Number of parameters (the LM head is tied to the token embedding).
    pub fn params(&self) -> u64 {
        self.tensors()
            .iter()
            .map(|(_, s, _)| s.iter().product::<usize>() as u64)
            .sum()
    }
}

/// How a random tensor is initialised.
#[derive(Clone, Copy, Debug)]
enum Init {
    /// Approximately N(0, std²) (see [`fill_normalish`]).
    Normal(f64),
    One,
}

/// Elements per generated chunk (each chunk has its own seed, so the file is
/// the same whatever the thread count).
const CHUNK: usize = 1 << 20;

/// `out[i] = std · z_i` with `z_i` approximately standard normal: the sum of
/// four 16-bit uniforms from one SplitMix64 draw, centred and scaled to unit
/// variance (Irwin–Hall; bounded by ±3.46). One draw per value, so a 6.7B
/// model is generated in seconds.
fn fill_normalish(out: &mut [f32], std: f64, seed: u64) {
    let mut rng = Rng::new(seed);
    let scale = (std * 3f64.sqrt() / 65536.0) as f32;
    for x in out.iter_mut() {
        let r = rng.next_u64();
        let s = (r & 0xffff) + ((r >> 16) & 0xffff) + ((r >> 32) & 0xffff) + (r >> 48);
        *x = (s as f32 - 131_070.0) * scale;
    }
}

/// Encode f32 values as little-endian `dtype` bytes, appended to `out`.
fn encode(vals: &[f32], dtype: DType, out: &mut Vec<u8>) {
    match dtype {
        DType::F32 => {
            for v in vals {
                out.extend_from_slice(&v.to_le_bytes());
            }
        }
        DType::F16 => {
            for v in vals {
                out.extend_from_slice(&half::f16::from_f32(*v).to_le_bytes());
            }
        }
        DType::BF16 => {
            for v in vals {
                out.extend_from_slice(&half::bf16::from_f32(*v).to_le_bytes());
            }
        }
    }
}

/// Write `config.json` and `model.safetensors` for a random OPT of `shape`
/// in `dtype` (BF16 as the released checkpoints, or F32/F16). Weight
/// matrices and embeddings are ~N(0, 0.02²), biases ~N(0, 0.01²), LayerNorm
/// gains 1. The file is streamed ([`write_safetensors_with`]): the header
/// first, then each tensor chunk by chunk (chunks generated in parallel), so
/// memory stays at a few chunks however large the model (OPT-6.7B in bf16
/// is 13.3 GB). The file is written under a temporary name and renamed when
/// complete.
/// `progress(done, total)` is called with bytes of tensor data written.
/// Returns the size of `model.safetensors` in bytes.
pub fn write_random_opt(
    dir: &Path,
    shape: OptShape,
    dtype: DType,
    seed: u64,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<u64> {
    let s = shape;
    if !s.hidden.is_multiple_of(s.heads) {
        return Err(Error::msg(format!(
            "random OPT: hidden size {} is not divisible by {} heads",
            s.hidden, s.heads
        )));
    }
    fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let torch_dtype = match dtype {
        DType::F32 => "float32",
        DType::F16 => "float16",
        DType::BF16 => "bfloat16",
    };
    let cfg = json!({
        "model_type": "opt", "architectures": ["OPTForCausalLM"],
        "vocab_size": s.vocab, "hidden_size": s.hidden, "num_hidden_layers": s.layers,
        "num_attention_heads": s.heads, "ffn_dim": s.ffn, "max_position_embeddings": s.max_positions,
        "word_embed_proj_dim": s.hidden, "do_layer_norm_before": true, "activation_function": "relu",
        "enable_bias": true, "layer_norm_elementwise_affine": true, "tie_word_embeddings": true,
        "dropout": 0.1, "attention_dropout": 0.0, "pad_token_id": 1, "bos_token_id": 2,
        "eos_token_id": 2, "torch_dtype": torch_dtype
    });
    let cfg_path = dir.join("config.json");
    fs::write(&cfg_path, cfg.to_string()).map_err(|e| Error::io(&cfg_path, e))?;

    let tensors = s.tensors();
    let entries: Vec<(String, DType, Vec<usize>)> = tensors
        .iter()
        .map(|(name, shape, _)| (name.clone(), dtype, shape.clone()))
        .collect();
    let total: u64 = entries
        .iter()
        .map(|(_, _, shape)| (shape.iter().product::<usize>() * dtype.size()) as u64)
        .sum();
    let metadata = BTreeMap::from([("format".to_string(), "pt".to_string())]);
    let threads = rayon::current_num_threads().max(1);
    let mut done = 0u64;
    progress(0, total);
    write_safetensors_with(
        &dir.join("model.safetensors"),
        &entries,
        &metadata,
        &mut |w| {
            for (ti, (_, shape, init)) in tensors.iter().enumerate() {
                let n: usize = shape.iter().product();
                let chunks = n.div_ceil(CHUNK);
                // A group of chunks is generated in parallel, then written in order.
                for group in (0..chunks).collect::<Vec<_>>().chunks(2 * threads) {
                    use rayon::prelude::*;
                    let bytes: Vec<Vec<u8>> = group
                        .par_iter()
                        .map(|&c| {
                            let len = CHUNK.min(n - c * CHUNK);
                            let mut vals = vec![0f32; len];
                            match init {
                                Init::One => vals.fill(1.0),
                                Init::Normal(std) => fill_normalish(
                                    &mut vals,
                                    *std,
                                    crate::backend::sub_seed(seed, ((ti as u64) << 32) | c as u64),
                                ),
                            }
                            let mut out = Vec::with_capacity(len * dtype.size());
                            encode(&vals, dtype, &mut out);
                            out
                        })
                        .collect();
                    for b in bytes {
                        w.write_all(&b)?;
                        done += b.len() as u64;
                    }
                    progress(done, total);
                }
            }
            Ok(())
        },
    )
}
