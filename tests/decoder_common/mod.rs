//! Tiny random decoders (GPT-2, OPT, LLaMA, Qwen2) written as Hugging Face
//! directories, for the decoder tests.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::Path;

use beft::rng::Rng;
use beft::weights::write_safetensors;
use serde_json::json;

pub const VOCAB: usize = 40;
pub const HIDDEN: usize = 8;
pub const FF: usize = 12;
pub const POS: usize = 32;

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Tiny {
    Gpt2,
    Opt,
    /// OPT-350m style: post-LN, word_embed_proj_dim 6 (project_in/out).
    OptPost,
    /// LLaMA with 4 heads, 2 KV heads, untied head.
    Llama,
    /// Qwen2 with 2 heads, 1 KV head, tied head.
    Qwen2,
}

/// Sizes of a test decoder (the tiny default: 2 layers, hidden 8).
#[derive(Clone, Copy, Debug)]
pub struct Size {
    pub layers: usize,
    pub hidden: usize,
    pub ff: usize,
}

pub const TINY: Size = Size {
    layers: 2,
    hidden: HIDDEN,
    ff: FF,
};

pub fn write_tiny_decoder(dir: &Path, arch: Tiny, seed: u64) {
    write_decoder(dir, arch, seed, TINY)
}

/// A random decoder of `size` (vocabulary [`VOCAB`], [`POS`] positions).
pub fn write_decoder(dir: &Path, arch: Tiny, seed: u64, size: Size) {
    let nl = size.layers;
    let mut rng = Rng::new(seed);
    let mut t: Vec<(String, Vec<usize>, Vec<f32>)> = Vec::new();
    let mut w = |name: String, shape: Vec<usize>, kind: u8, rng: &mut Rng| {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|_| {
                let z = rng.normal();
                (match kind {
                    0 => 0.4 * z,       // weight
                    1 => 0.2 * z,       // bias
                    _ => 1.0 + 0.2 * z, // norm weight
                }) as f32
            })
            .collect();
        t.push((name, shape, v));
    };
    let (d, ff, v) = (size.hidden, size.ff, VOCAB);
    let config = match arch {
        Tiny::Gpt2 => {
            w("transformer.wte.weight".into(), vec![v, d], 0, &mut rng);
            w("transformer.wpe.weight".into(), vec![POS, d], 0, &mut rng);
            for l in 0..nl {
                let p = format!("transformer.h.{l}.");
                for ln in ["ln_1", "ln_2"] {
                    w(format!("{p}{ln}.weight"), vec![d], 2, &mut rng);
                    w(format!("{p}{ln}.bias"), vec![d], 1, &mut rng);
                }
                for (m, i, o) in [
                    ("attn.c_attn", d, 3 * d),
                    ("attn.c_proj", d, d),
                    ("mlp.c_fc", d, ff),
                    ("mlp.c_proj", ff, d),
                ] {
                    w(format!("{p}{m}.weight"), vec![i, o], 0, &mut rng);
                    w(format!("{p}{m}.bias"), vec![o], 1, &mut rng);
                }
            }
            w("transformer.ln_f.weight".into(), vec![d], 2, &mut rng);
            w("transformer.ln_f.bias".into(), vec![d], 1, &mut rng);
            json!({"model_type": "gpt2", "vocab_size": v, "n_embd": d, "n_layer": nl, "n_head": 2,
                   "n_inner": ff, "n_positions": POS, "activation_function": "gelu_new"})
        }
        Tiny::Opt | Tiny::OptPost => {
            let post = arch == Tiny::OptPost;
            let dp = if post { 6 } else { d };
            let p = "model.decoder.";
            w(format!("{p}embed_tokens.weight"), vec![v, dp], 0, &mut rng);
            w(
                format!("{p}embed_positions.weight"),
                vec![POS + 2, d],
                0,
                &mut rng,
            );
            if post {
                w(format!("{p}project_in.weight"), vec![d, dp], 0, &mut rng);
                w(format!("{p}project_out.weight"), vec![dp, d], 0, &mut rng);
            }
            for l in 0..nl {
                let q = format!("{p}layers.{l}.");
                for ln in ["self_attn_layer_norm", "final_layer_norm"] {
                    w(format!("{q}{ln}.weight"), vec![d], 2, &mut rng);
                    w(format!("{q}{ln}.bias"), vec![d], 1, &mut rng);
                }
                for (m, i, o) in [
                    ("self_attn.q_proj", d, d),
                    ("self_attn.k_proj", d, d),
                    ("self_attn.v_proj", d, d),
                    ("self_attn.out_proj", d, d),
                    ("fc1", d, ff),
                    ("fc2", ff, d),
                ] {
                    w(format!("{q}{m}.weight"), vec![o, i], 0, &mut rng);
                    w(format!("{q}{m}.bias"), vec![o], 1, &mut rng);
                }
            }
            if !post {
                w(format!("{p}final_layer_norm.weight"), vec![d], 2, &mut rng);
                w(format!("{p}final_layer_norm.bias"), vec![d], 1, &mut rng);
            }
            json!({"model_type": "opt", "vocab_size": v, "hidden_size": d, "num_hidden_layers": nl,
                   "num_attention_heads": 2, "ffn_dim": ff, "max_position_embeddings": POS,
                   "do_layer_norm_before": !post, "word_embed_proj_dim": dp, "pad_token_id": 1})
        }
        Tiny::Llama | Tiny::Qwen2 => {
            let qwen = arch == Tiny::Qwen2;
            let (nh, nkv) = if qwen { (2, 1) } else { (4, 2) };
            let hd = d / nh;
            w("model.embed_tokens.weight".into(), vec![v, d], 0, &mut rng);
            for l in 0..nl {
                let q = format!("model.layers.{l}.");
                w(format!("{q}input_layernorm.weight"), vec![d], 2, &mut rng);
                w(
                    format!("{q}post_attention_layernorm.weight"),
                    vec![d],
                    2,
                    &mut rng,
                );
                for (m, i, o, bias) in [
                    ("self_attn.q_proj", d, nh * hd, qwen),
                    ("self_attn.k_proj", d, nkv * hd, qwen),
                    ("self_attn.v_proj", d, nkv * hd, qwen),
                    ("self_attn.o_proj", nh * hd, d, false),
                    ("mlp.gate_proj", d, ff, false),
                    ("mlp.up_proj", d, ff, false),
                    ("mlp.down_proj", ff, d, false),
                ] {
                    w(format!("{q}{m}.weight"), vec![o, i], 0, &mut rng);
                    if bias {
                        w(format!("{q}{m}.bias"), vec![o], 1, &mut rng);
                    }
                }
            }
            w("model.norm.weight".into(), vec![d], 2, &mut rng);
            if !qwen {
                w("lm_head.weight".into(), vec![v, d], 0, &mut rng);
            }
            json!({"model_type": if qwen {"qwen2"} else {"llama"}, "vocab_size": v, "hidden_size": d,
                   "num_hidden_layers": nl, "num_attention_heads": nh, "num_key_value_heads": nkv,
                   "intermediate_size": ff, "max_position_embeddings": POS, "rms_norm_eps": 1e-6,
                   "rope_theta": 100.0, "tie_word_embeddings": qwen, "hidden_act": "silu",
                   "bos_token_id": 1, "eos_token_id": 2})
        }
    };
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string_pretty(&config).unwrap(),
    )
    .unwrap();
    write_safetensors(&dir.join("model.safetensors"), &t, &BTreeMap::new()).unwrap();
}

/// A padded batch: rows of the given real lengths, left or right padded.
pub fn tiny_batch(lens: &[usize], left: bool, seed: u64) -> (usize, usize, Vec<u32>, Vec<f32>) {
    let b = lens.len();
    let t = *lens.iter().max().unwrap();
    let mut rng = Rng::new(seed);
    let mut ids = vec![1u32; b * t];
    let mut mask = vec![0f32; b * t];
    for (bi, &n) in lens.iter().enumerate() {
        let s = if left { t - n } else { 0 };
        for i in s..s + n {
            ids[bi * t + i] = 3 + rng.below(VOCAB - 3) as u32;
            mask[bi * t + i] = 1.0;
        }
    }
    (b, t, ids, mask)
}

/// Rows whose next token is real, with that next token.
pub fn next_token_rows(b: usize, t: usize, ids: &[u32], mask: &[f32]) -> (Vec<u32>, Vec<u32>) {
    let (mut rows, mut targets) = (Vec::new(), Vec::new());
    for bi in 0..b {
        for ti in 0..t - 1 {
            let i = bi * t + ti;
            if mask[i] > 0.0 && mask[i + 1] > 0.0 {
                rows.push(i as u32);
                targets.push(ids[i + 1]);
            }
        }
    }
    (rows, targets)
}

/// Candidate answers at the end of each padded row of a [`tiny_batch`]:
/// row `c`'s last `ans[c]` real tokens are its answer. Returns, per answer
/// token, the row that predicts it (the one before), the token, and the
/// candidate (row) it belongs to.
pub fn answer_rows(
    lens: &[usize],
    ans: &[usize],
    left: bool,
    t: usize,
    ids: &[u32],
) -> (Vec<u32>, Vec<u32>, Vec<u32>) {
    let (mut rows, mut targets, mut tok_cand) = (Vec::new(), Vec::new(), Vec::new());
    for c in 0..lens.len() {
        let end = if left { t } else { lens[c] };
        for k in 0..ans[c] {
            let pos = end - ans[c] + k; // the answer token's position
            rows.push((c * t + pos - 1) as u32); // predicted from the previous row
            targets.push(ids[c * t + pos]);
            tok_cand.push(c as u32);
        }
    }
    (rows, targets, tok_cand)
}
