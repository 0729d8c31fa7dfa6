//! Reading the Hugging Face parity fixtures of `scripts/make_fixtures.py`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use safetensors::{Dtype, SafeTensors};

/// `tests/fixtures/CASE`.
pub fn fixture(case: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(case)
}

/// Tensors by name: shape and values (widened to f64).
pub type Tensors = HashMap<String, (Vec<usize>, Vec<f64>)>;

/// A fixture's expected tensors and its string metadata.
pub struct Expected {
    pub tensors: Tensors,
    pub meta: HashMap<String, String>,
}

/// `tests/fixtures/CASE/expected.safetensors`.
pub fn read_expected(case: &str) -> Expected {
    let bytes = std::fs::read(fixture(case).join("expected.safetensors")).expect("fixture");
    let (_, meta) = SafeTensors::read_metadata(&bytes).expect("header");
    let st = SafeTensors::deserialize(&bytes).expect("fixture parses");
    let mut tensors = HashMap::new();
    for (name, t) in st.tensors() {
        let d = t.data();
        let vals: Vec<f64> = match t.dtype() {
            Dtype::F32 => d
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64)
                .collect(),
            Dtype::I32 => d
                .chunks_exact(4)
                .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64)
                .collect(),
            Dtype::I64 => d
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f64)
                .collect(),
            other => panic!("unexpected dtype {other:?}"),
        };
        tensors.insert(name, (t.shape().to_vec(), vals));
    }
    Expected {
        tensors,
        meta: meta.metadata().clone().unwrap_or_default(),
    }
}

/// Largest magnitude.
pub fn max_abs(v: &[f64]) -> f64 {
    v.iter().fold(0.0, |a, b| a.max(b.abs()))
}

/// Largest |got − want| relative to `scale`; infinite when any value is
/// NaN (`f64::max` would skip it, and an unwritten output would pass).
pub fn rel_err(got: &[f64], want: &[f64], scale: f64) -> f64 {
    assert_eq!(got.len(), want.len());
    got.iter()
        .zip(want)
        .map(|(a, b)| {
            let d = (a - b).abs();
            if d.is_nan() {
                f64::INFINITY
            } else {
                d
            }
        })
        .fold(0.0, f64::max)
        / scale.max(1e-30)
}

/// [`rel_err`] of f32 values.
pub fn rel_err_f32(got: &[f32], want: &[f32], scale: f32) -> f32 {
    let wide = |v: &[f32]| v.iter().map(|x| *x as f64).collect::<Vec<_>>();
    rel_err(&wide(got), &wide(want), scale as f64) as f32
}

/// One next-token training step of a decoder parity fixture (tiny random
/// models of `tests/fixtures/*_lm`) on `be`, with `--bias all`: the loss,
/// the logits at the loss rows and every bias gradient. `model` replaces
/// the fixture's model directory (e.g. a copy with bf16-rounded weights).
pub fn decoder_fixture_step<B: beft::backend::Backend>(
    be: &B,
    case: &str,
    model: Option<&Path>,
    offload: beft::model::Offload,
    recompute: bool,
) -> (f64, Vec<f32>, Vec<f32>) {
    use beft::float::Float;
    use beft::model::{BiasTerm, Decoder, DecoderOptions};
    let exp = read_expected(case).tensors;
    let dir = model
        .map(Path::to_path_buf)
        .unwrap_or_else(|| fixture(case).join("model"));
    let md = beft::model::config::ModelDir::open(&dir).unwrap();
    let dec = Decoder::load(
        be,
        &md,
        DecoderOptions {
            terms: BiasTerm::parse_set("all").unwrap(),
            offload,
            recompute,
        },
    )
    .unwrap();
    let u32s = |name: &str| -> Vec<u32> { exp[name].1.iter().map(|x| *x as u32).collect() };
    let shape = &exp["input_ids"].0;
    let mask: Vec<f32> = exp["attention_mask"].1.iter().map(|x| *x as f32).collect();
    let x = dec
        .upload(be, shape[0], shape[1], &u32s("input_ids"), &mask)
        .unwrap();
    let rt = dec
        .row_targets(be, &x, &u32s("rows"), &u32s("targets"))
        .unwrap();
    let mut slab = beft::train::Slab::new(be, &dec.init);
    let loss = dec.lm_loss_and_grad(be, &slab.params, &mut slab.grads, &x, &rt);
    let logits = dec.logits_at(be, &slab.params, &x, &rt);
    let f = |v: Vec<B::T>| -> Vec<f32> { v.into_iter().map(|x| x.to_f32()).collect() };
    (loss, f(logits), f(be.download(&slab.grads)))
}

/// The decoder parity fixtures.
pub const DECODER_CASES: [&str; 5] = ["gpt2_lm", "opt_lm", "opt_postln_lm", "llama_lm", "qwen2_lm"];
