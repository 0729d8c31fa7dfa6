//! The decoders' bias gradients against central finite differences in f64
//! (tiny random GPT-2, OPT pre-/post-LN, LLaMA with GQA + RoPE + SwiGLU and
//! added zero biases, Qwen2; left and right padding), for the next-token
//! loss and for the candidate-scoring objective; and bad configurations.

mod decoder_common;

use beft::backend::cpu::CpuBackend;
use beft::backend::Backend;
use beft::model::config::{ModelConfig, ModelDir};
use beft::model::{BiasTerm, Decoder, DecoderOptions};
use decoder_common::*;
use tempfile::TempDir;

fn load(arch: Tiny, terms: &str) -> (TempDir, Decoder<CpuBackend<f64>>, CpuBackend<f64>) {
    let dir = TempDir::new().unwrap();
    write_tiny_decoder(dir.path(), arch, 17);
    let md = ModelDir::open(dir.path()).unwrap();
    let be = CpuBackend::<f64>::new();
    let dec = Decoder::load(
        &be,
        &md,
        DecoderOptions {
            terms: BiasTerm::parse_set(terms).unwrap(),
            ..Default::default()
        },
    )
    .unwrap();
    (dir, dec, be)
}

/// Compare `grad` (analytic, at `init`) with central differences of `loss`.
fn fd_check(what: &str, dec: &Decoder<CpuBackend<f64>>, got: &[f64], loss: &dyn Fn(&[f64]) -> f64) {
    let eps = 1e-6;
    let scale = got.iter().fold(0.0f64, |a, b| a.max(b.abs()));
    assert!(scale > 1e-6, "{what}: gradients are not all zero");
    let mut p = dec.init.clone();
    for slot in &dec.layout.slots {
        for i in slot.offset..slot.offset + slot.len() {
            let o = p[i];
            p[i] = o + eps;
            let a = loss(&p);
            p[i] = o - eps;
            let b = loss(&p);
            p[i] = o;
            let num = (a - b) / (2.0 * eps);
            assert!(
                (got[i] - num).abs() <= 1e-6 * scale.max(1.0),
                "{what}: {}[{}]: analytic {} vs numeric {num}",
                slot.name,
                i - slot.offset,
                got[i]
            );
        }
    }
}

fn check_lm(arch: Tiny, terms: &str, left: bool) {
    check_lm_lens(arch, terms, left, &[6, 4, 2]);
}

fn check_lm_lens(arch: Tiny, terms: &str, left: bool, lens: &[usize]) {
    let (_dir, dec, be) = load(arch, terms);
    let (b, t, ids, mask) = tiny_batch(lens, left, 3);
    let x = dec.upload(&be, b, t, &ids, &mask).unwrap();
    let (rows, targets) = next_token_rows(b, t, &ids, &mask);
    let rt = dec.row_targets(&be, &x, &rows, &targets).unwrap();
    let n = dec.layout.len;
    let mut g = be.zeros(n);
    dec.lm_loss_and_grad(&be, &be.upload(&dec.init), &mut g, &x, &rt);
    let got = be.download(&g);
    let what = format!("{arch:?} lm {terms} left={left}");
    fd_check(&what, &dec, &got, &|p| {
        let mut g = be.zeros(n);
        dec.lm_loss_and_grad(&be, &be.upload(p), &mut g, &x, &rt)
    });
    // Accumulation.
    dec.lm_loss_and_grad(&be, &be.upload(&dec.init), &mut g, &x, &rt);
    for (a, b) in be.download(&g).iter().zip(&got) {
        assert!((a - 2.0 * b).abs() <= 1e-12 * (1.0 + b.abs()));
    }
}

/// Two examples with 2 and 3 candidates: each candidate is a prompt plus a
/// 1–2 token option; the loss is the cross-entropy of the candidates'
/// length-normalised log-likelihoods.
fn check_candidates(arch: Tiny, terms: &str, left: bool) {
    let (_dir, dec, be) = load(arch, terms);
    let lens = [6, 5, 4, 6, 3];
    let ans = [2usize, 1, 2, 1, 2]; // answer tokens at the end of each candidate
    let (b, t, ids, mask) = tiny_batch(&lens, left, 9);
    let (rows, targets, tok_cand) = answer_rows(&lens, &ans, left, t, &ids);
    let cand_ex = [0u32, 0, 1, 1, 1];
    let gold = [1u32, 2];
    let n = dec.layout.len;
    let mk = || {
        let x = dec.upload(&be, b, t, &ids, &mask).unwrap();
        dec.cand_batch(&be, x, &rows, &targets, &tok_cand, &cand_ex, &gold)
            .unwrap()
    };
    let cb = mk();
    let mut g = be.zeros(n);
    let (loss, scores) = dec.candidate_loss_and_grad(&be, &be.upload(&dec.init), &mut g, &cb);
    assert_eq!(scores.len(), 5);
    let (eval_loss, eval_scores) = dec.candidate_scores(&be, &be.upload(&dec.init), &cb);
    assert!((eval_loss - loss).abs() < 1e-12);
    assert_eq!(scores, eval_scores);
    let got = be.download(&g);
    let what = format!("{arch:?} candidates {terms} left={left}");
    fd_check(&what, &dec, &got, &|p| {
        let mut g = be.zeros(n);
        dec.candidate_loss_and_grad(&be, &be.upload(p), &mut g, &cb)
            .0
    });
}

/// More loss rows than the LM head evaluates at once (`HEAD_CHUNK`): the
/// chunked loss and head gradient still match finite differences.
#[test]
fn lm_loss_over_more_rows_than_one_head_chunk() {
    let lens = [30, 29, 30, 28, 30, 30, 27, 30, 30, 30];
    let rows: usize = lens.iter().map(|l| l - 1).sum();
    assert!(rows > beft::model::HEAD_CHUNK, "{rows} rows");
    check_lm_lens(Tiny::Opt, "v,mlp-out", false, &lens);
    check_lm_lens(Tiny::Llama, "v", true, &lens);
}

#[test]
fn gpt2_all_biases_right_padding() {
    check_lm(Tiny::Gpt2, "all", false);
}

#[test]
fn gpt2_value_slice_left_padding() {
    check_lm(Tiny::Gpt2, "v,emb-ln", true);
}

#[test]
fn opt_all_biases_left_padding() {
    check_lm(Tiny::Opt, "all", true);
}

#[test]
fn opt_post_ln_with_projections() {
    check_lm(Tiny::OptPost, "all", false);
}

#[test]
fn llama_gqa_added_biases_left_padding() {
    check_lm(Tiny::Llama, "all", true);
}

#[test]
fn llama_gqa_added_biases_right_padding() {
    check_lm(Tiny::Llama, "q,k,v,o,mlp-in,mlp-out", false);
}

#[test]
fn llama_value_bias_only_upper_layer_stops_early() {
    check_lm(Tiny::Llama, "v", true);
}

#[test]
fn qwen2_all_biases() {
    check_lm(Tiny::Qwen2, "all", false);
}

#[test]
fn candidate_scoring_llama_left_padding() {
    check_candidates(Tiny::Llama, "v,mlp-in", true);
}

#[test]
fn candidate_scoring_gpt2_right_padding() {
    check_candidates(Tiny::Gpt2, "all", false);
}

#[test]
fn candidate_scoring_opt() {
    check_candidates(Tiny::Opt, "v,o,ln2", true);
}

#[test]
fn added_biases_are_named_and_zero() {
    let (_d, dec, _be) = load(Tiny::Llama, "v");
    assert_eq!(
        dec.added,
        vec![
            "model.layers.0.self_attn.v_proj.bias",
            "model.layers.1.self_attn.v_proj.bias"
        ]
    );
    assert!(dec.init.iter().all(|x| *x == 0.0));
    let (_d, dec, _be) = load(Tiny::Qwen2, "v,o");
    // Qwen2 has v biases (from the checkpoint) but no o bias (added).
    assert_eq!(
        dec.added,
        vec![
            "model.layers.0.self_attn.o_proj.bias",
            "model.layers.1.self_attn.o_proj.bias"
        ]
    );
    let (_d, dec, _be) = load(Tiny::Gpt2, "v");
    assert_eq!(
        dec.layout.slots[0].name,
        "transformer.h.0.attn.c_attn.bias[v]"
    );
    assert!(dec.added.is_empty());
}

fn err_of<T>(r: beft::Result<T>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn rmsnorm_bias_is_a_clear_error() {
    let dir = TempDir::new().unwrap();
    write_tiny_decoder(dir.path(), Tiny::Llama, 1);
    let md = ModelDir::open(dir.path()).unwrap();
    let be = CpuBackend::<f64>::new();
    let e = err_of(Decoder::load(
        &be,
        &md,
        DecoderOptions {
            terms: vec![BiasTerm::Ln1],
            ..Default::default()
        },
    ));
    assert!(e.contains("llama") && e.contains("RMSNorm"), "{e}");
}

#[test]
fn heads_that_do_not_divide_hidden_are_a_clear_error() {
    let p = std::path::Path::new("/m/config.json");
    for v in [
        serde_json::json!({"model_type": "llama", "vocab_size": 10, "hidden_size": 10, "intermediate_size": 8,
                           "num_hidden_layers": 1, "num_attention_heads": 3}),
        serde_json::json!({"model_type": "gpt2", "vocab_size": 10, "n_embd": 10, "n_layer": 1, "n_head": 4}),
        serde_json::json!({"model_type": "opt", "vocab_size": 10, "hidden_size": 10, "ffn_dim": 8,
                           "num_hidden_layers": 1, "num_attention_heads": 4}),
    ] {
        let e = err_of(ModelConfig::from_json(&v, p));
        assert!(
            e.contains("/m/config.json") && e.contains("not divisible"),
            "{e}"
        );
    }
    let v = serde_json::json!({"model_type": "llama", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 8,
                               "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 3});
    let e = err_of(ModelConfig::from_json(&v, p));
    assert!(e.contains("num_key_value_heads"), "{e}");
}

#[test]
fn llama_style_config_keys() {
    // The keys a GGUF importer fills in (Hugging Face's names).
    let v = serde_json::json!({"model_type": "llama", "vocab_size": 49152, "hidden_size": 576,
        "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
        "rms_norm_eps": 1e-5, "rope_theta": 100000.0, "max_position_embeddings": 8192,
        "tie_word_embeddings": true, "bos_token_id": 1, "eos_token_id": 2});
    let c = ModelConfig::from_json(&v, std::path::Path::new("x.gguf")).unwrap();
    assert_eq!((c.num_heads, c.num_kv_heads, c.head_dim()), (9, 3, 64));
    assert_eq!(
        (c.rope_theta, c.layer_norm_eps, c.tie_word_embeddings),
        (100000.0, 1e-5, true)
    );
    assert_eq!((c.bos_token_id, c.eos_token_id), (Some(1), Some(2)));
    assert!(c.arch.is_decoder());
}
