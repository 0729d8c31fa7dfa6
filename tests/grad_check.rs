//! The whole model's bias gradients against central finite differences, in
//! f64, on tiny random BERT and RoBERTa models — with dropout active (its
//! mask is a pure function of the seed, so the loss is a deterministic
//! function of the trainable values), for both poolings, classification and
//! regression, and with the backward pass stopping early.

mod common;

use beft::backend::cpu::CpuBackend;
use beft::backend::{Backend, PoolKind};
use beft::data::Batch;
use beft::model::config::ModelDir;
use beft::model::{BiasTerm, Encoder, EncoderOptions};
use common::{write_tiny_model, TinyArch, TINY_VOCAB};
use tempfile::TempDir;

fn batch(pad: u32, labels: Vec<f32>) -> Batch {
    let (b, t) = (3usize, 6usize);
    let lens = [6usize, 4, 2];
    let mut ids = vec![pad; b * t];
    let mut type_ids = vec![0u32; b * t];
    let mut mask = vec![0f32; b * t];
    for bi in 0..b {
        for ti in 0..lens[bi] {
            // Ids 2.. avoid both pad ids (0 for BERT, 1 for RoBERTa).
            ids[bi * t + ti] = 2 + ((bi * 7 + ti * 3) % (TINY_VOCAB - 2)) as u32;
            type_ids[bi * t + ti] = (ti >= 3) as u32;
            mask[bi * t + ti] = 1.0;
        }
    }
    Batch {
        batch: b,
        seq: t,
        ids,
        type_ids,
        mask,
        labels,
        tokens: lens.iter().sum(),
    }
}

fn check(arch: TinyArch, pooling: PoolKind, num_labels: usize, terms: &str, dropout: Option<u64>) {
    let dir = TempDir::new().unwrap();
    write_tiny_model(dir.path(), arch, 11, None);
    let md = ModelDir::open(dir.path()).unwrap();
    let be = CpuBackend::<f64>::new();
    let terms = BiasTerm::parse_set(terms).unwrap();
    let enc = Encoder::load(
        &be,
        &md,
        EncoderOptions {
            pooling,
            num_labels,
            terms,
            seed: 5,
        },
    )
    .unwrap();
    let labels = if num_labels == 1 {
        vec![0.3, -1.2, 2.0]
    } else {
        vec![0.0, 1.0, (num_labels - 1) as f32]
    };
    let pad = md.config.pad_token_id;
    let db = enc.upload_batch(&be, &batch(pad, labels)).unwrap();
    let n = enc.layout.len;
    let loss_at = |p: &[f64]| {
        let mut g = be.zeros(n);
        enc.loss_and_grad(&be, &be.upload(p), &mut g, &db, dropout)
            .0
    };
    let mut grads = be.zeros(n);
    let (_, _) = enc.loss_and_grad(&be, &be.upload(&enc.init), &mut grads, &db, dropout);
    let got = be.download(&grads);
    let eps = 1e-6;
    let mut p = enc.init.clone();
    let scale = got.iter().fold(0.0f64, |a, b| a.max(b.abs()));
    assert!(scale > 1e-6, "gradients are not all zero");
    let what = format!("{arch:?}/{pooling:?}/{num_labels} labels/dropout {dropout:?}");
    for slot in &enc.layout.slots {
        for i in slot.offset..slot.offset + slot.len() {
            let o = p[i];
            p[i] = o + eps;
            let a = loss_at(&p);
            p[i] = o - eps;
            let b = loss_at(&p);
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
    // Gradients accumulate across calls (for micro-batching).
    let (_, _) = enc.loss_and_grad(&be, &be.upload(&enc.init), &mut grads, &db, dropout);
    let twice = be.download(&grads);
    for (a, b) in twice.iter().zip(&got) {
        assert!((a - 2.0 * b).abs() <= 1e-12 * scale.max(1.0));
    }
}

#[test]
fn bert_cls_all_biases_with_dropout() {
    check(TinyArch::Bert, PoolKind::Cls, 3, "all", Some(1234));
}

#[test]
fn bert_cls_all_biases_without_dropout() {
    check(TinyArch::Bert, PoolKind::Cls, 2, "all", None);
}

#[test]
fn bert_mean_value_bias_with_dropout() {
    check(TinyArch::Bert, PoolKind::Mean, 2, "v", Some(99));
}

#[test]
fn bert_regression_query_and_mlp() {
    check(TinyArch::Bert, PoolKind::Cls, 1, "q,mlp-in,ln2", Some(5));
}

#[test]
fn roberta_cls_all_biases_with_dropout() {
    check(TinyArch::Roberta, PoolKind::Cls, 2, "all", Some(77));
}

#[test]
fn roberta_mean_embedding_layernorm() {
    check(TinyArch::Roberta, PoolKind::Mean, 3, "emb-ln,o", Some(3));
}
