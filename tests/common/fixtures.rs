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

/// Largest |got − want| relative to `scale`.
pub fn rel_err(got: &[f64], want: &[f64], scale: f64) -> f64 {
    assert_eq!(got.len(), want.len());
    got.iter()
        .zip(want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max)
        / scale.max(1e-30)
}
