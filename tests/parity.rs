//! Parity with Hugging Face transformers: logits, loss and the gradient of
//! every bias (and the classifier head) on tiny random BERT/RoBERTa models,
//! from fixtures written by `scripts/make_fixtures.py` (computed in float64
//! by PyTorch). The engine runs in f32; each tensor must match within a
//! relative error of 1e-4 of its own largest magnitude. The key bias, whose
//! gradient is zero in exact arithmetic, is compared against the scale of
//! all gradients instead.

mod common;

use beft::backend::cpu::CpuBackend;
use beft::backend::Backend;
use beft::data::Batch;
use beft::model::config::ModelDir;
use beft::model::{BiasTerm, Encoder, EncoderOptions};
use beft::train::Slab;
use common::fixtures::{fixture, max_abs, read_expected, rel_err};

fn check_case(case: &str) {
    let exp = read_expected(case);
    let md = ModelDir::open(&fixture(case).join("model")).expect("fixture model opens");
    let (lshape, logits_want) = exp.tensors["logits"].clone();
    let num_labels = lshape[1];
    let pooling = match exp.meta.get("pooling").map(|s| s.as_str()) {
        Some("mean") => beft::backend::PoolKind::Mean,
        _ => beft::backend::PoolKind::Cls,
    };
    if pooling == beft::backend::PoolKind::Mean {
        assert_eq!(
            md.default_pooling,
            Some(pooling),
            "{case}: 1_Pooling/config.json picked up"
        );
    }
    let be = CpuBackend::<f32>::new();
    let terms = BiasTerm::parse_set("all").unwrap();
    let enc = Encoder::load(
        &be,
        &md,
        EncoderOptions {
            pooling,
            num_labels,
            terms,
            seed: 0,
        },
    )
    .expect("encoder loads");
    assert!(enc.head_from_checkpoint, "{case}: the saved head is used");

    let (ishape, ids) = &exp.tensors["input_ids"];
    let (b, t) = (ishape[0], ishape[1]);
    let mask: Vec<f32> = exp.tensors["attention_mask"]
        .1
        .iter()
        .map(|x| *x as f32)
        .collect();
    let batch = Batch {
        batch: b,
        seq: t,
        ids: ids.iter().map(|x| *x as u32).collect(),
        type_ids: exp.tensors["token_type_ids"]
            .1
            .iter()
            .map(|x| *x as u32)
            .collect(),
        tokens: mask.iter().filter(|m| **m > 0.0).count(),
        mask,
        labels: exp.tensors["labels"].1.iter().map(|x| *x as f32).collect(),
    };
    let db = enc.upload_batch(&be, &batch).expect("batch uploads");
    let mut slab = Slab::new(&be, &enc.init);
    let (loss, logits) = enc.loss_and_grad(&be, &slab.params, &mut slab.grads, &db, None);
    let logits: Vec<f64> = logits.iter().map(|x| *x as f64).collect();
    let e = rel_err(&logits, &logits_want, max_abs(&logits_want));
    println!("{case}: logits rel err {e:.2e}");
    assert!(
        e <= 1e-4,
        "{case}: logits differ (rel err {e:.2e})\n got {logits:?}\nwant {logits_want:?}"
    );
    let loss_want = exp.tensors["loss"].1[0];
    let e = (loss - loss_want).abs() / loss_want.abs();
    assert!(e <= 1e-4, "{case}: loss {loss} vs {loss_want}");
    // Eval-mode logits (no gradient) agree with the training pass.
    let eval_logits: Vec<f64> = enc
        .logits(&be, &slab.params, &db)
        .iter()
        .map(|x| *x as f64)
        .collect();
    assert!(rel_err(&eval_logits, &logits, max_abs(&logits)) < 1e-6);

    let grads: Vec<f64> = be.download(&slab.grads).iter().map(|x| *x as f64).collect();
    let all_scale = exp
        .tensors
        .iter()
        .filter(|(k, _)| k.starts_with("grad."))
        .map(|(_, (_, v))| max_abs(v))
        .fold(0.0, f64::max);
    let mut checked = 0;
    for slot in &enc.layout.slots {
        let (gshape, want) = exp
            .tensors
            .get(&format!("grad.{}", slot.name))
            .unwrap_or_else(|| panic!("{case}: no fixture gradient for {}", slot.name));
        assert_eq!(gshape, &slot.shape, "{case}: {} shape", slot.name);
        let got = &grads[slot.offset..slot.offset + slot.len()];
        let is_key = slot.name.contains("attention.self.key");
        let scale = if is_key { all_scale } else { max_abs(want) };
        let e = rel_err(got, want, scale);
        assert!(
            e <= 1e-4,
            "{case}: gradient of {} differs (rel err {e:.2e})",
            slot.name
        );
        if is_key {
            assert!(
                max_abs(got) <= 1e-5 * all_scale,
                "{case}: b_k gradient should vanish, got {}",
                max_abs(got)
            );
        }
        checked += 1;
    }
    let n_fixture = exp
        .tensors
        .keys()
        .filter(|k| k.starts_with("grad."))
        .count();
    assert_eq!(
        checked, n_fixture,
        "{case}: every fixture gradient has a trainable slot"
    );
    println!("{case}: {checked} gradients match");
}

#[test]
fn bert_cls_matches_transformers() {
    check_case("bert_cls");
}

#[test]
fn bert_pair_regression_matches_transformers() {
    check_case("bert_pair_regression");
}

#[test]
fn roberta_cls_matches_transformers() {
    check_case("roberta_cls");
}

#[test]
fn bert_mean_pooling_matches_transformers() {
    check_case("bert_mean");
}

#[test]
fn bert_bf16_weights_match_transformers() {
    check_case("bert_cls_bf16");
}

#[test]
fn bert_sharded_checkpoint_matches_transformers() {
    check_case("bert_cls_sharded");
}
