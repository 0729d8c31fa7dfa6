//! GGUF import: hand-written tiny files round-trip exactly, K-quants match
//! the Python `gguf` package (fixture written by `scripts/check_gguf.py
//! fixtures`), malformed files are clean errors, LLaMA-family names, the Q/K
//! un-permutation, the config and the tokenizer; and the real SmolLM2-135M
//! (and, if present, Qwen2.5-Coder-0.5B) files against values recorded from
//! Hugging Face transformers (`scripts/check_gguf.py reference`).

use std::path::{Path, PathBuf};

use beft::data::TextTokenizer;
use beft::model::config::{Arch, ModelDir};
use beft::weights::gguf::{
    dequantize_into, hf_config, hf_tensor_name, unpermute_rows, GgmlType, GgufFile, GgufValue,
};
use serde_json::Value;

// ---------------------------------------------------------------------------
// A tiny GGUF writer (independent of the loader)
// ---------------------------------------------------------------------------

#[derive(Clone, Debug)]
enum V {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    Str(String),
    /// Element tag and elements.
    Arr(u32, Vec<V>),
    U64(u64),
    I64(i64),
    F64(f64),
}

fn s(x: &str) -> V {
    V::Str(x.to_string())
}

fn strs(xs: &[&str]) -> V {
    V::Arr(8, xs.iter().map(|x| s(x)).collect())
}

fn tag_of(v: &V) -> u32 {
    match v {
        V::U8(_) => 0,
        V::I8(_) => 1,
        V::U16(_) => 2,
        V::I16(_) => 3,
        V::U32(_) => 4,
        V::I32(_) => 5,
        V::F32(_) => 6,
        V::Bool(_) => 7,
        V::Str(_) => 8,
        V::Arr(..) => 9,
        V::U64(_) => 10,
        V::I64(_) => 11,
        V::F64(_) => 12,
    }
}

fn put_str(b: &mut Vec<u8>, x: &str) {
    b.extend_from_slice(&(x.len() as u64).to_le_bytes());
    b.extend_from_slice(x.as_bytes());
}

fn put_val(b: &mut Vec<u8>, v: &V) {
    match v {
        V::U8(x) => b.push(*x),
        V::I8(x) => b.push(*x as u8),
        V::U16(x) => b.extend_from_slice(&x.to_le_bytes()),
        V::I16(x) => b.extend_from_slice(&x.to_le_bytes()),
        V::U32(x) => b.extend_from_slice(&x.to_le_bytes()),
        V::I32(x) => b.extend_from_slice(&x.to_le_bytes()),
        V::F32(x) => b.extend_from_slice(&x.to_le_bytes()),
        V::Bool(x) => b.push(*x as u8),
        V::Str(x) => put_str(b, x),
        V::Arr(t, xs) => {
            b.extend_from_slice(&t.to_le_bytes());
            b.extend_from_slice(&(xs.len() as u64).to_le_bytes());
            for x in xs {
                put_val(b, x);
            }
        }
        V::U64(x) => b.extend_from_slice(&x.to_le_bytes()),
        V::I64(x) => b.extend_from_slice(&x.to_le_bytes()),
        V::F64(x) => b.extend_from_slice(&x.to_le_bytes()),
    }
}

#[derive(Clone)]
struct T {
    name: String,
    ne: Vec<u64>,
    ty: u32,
    data: Vec<u8>,
}

fn t(name: &str, ne: &[u64], ty: u32, data: Vec<u8>) -> T {
    T {
        name: name.to_string(),
        ne: ne.to_vec(),
        ty,
        data,
    }
}

/// Header + metadata + tensor infos with explicit offsets, padded to
/// `align`, then `data`.
fn build_raw(
    version: u32,
    kvs: &[(&str, V)],
    infos: &[(&str, Vec<u64>, u32, u64)],
    data: &[u8],
    align: usize,
) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(b"GGUF");
    b.extend_from_slice(&version.to_le_bytes());
    b.extend_from_slice(&(infos.len() as u64).to_le_bytes());
    b.extend_from_slice(&(kvs.len() as u64).to_le_bytes());
    for (k, v) in kvs {
        put_str(&mut b, k);
        b.extend_from_slice(&tag_of(v).to_le_bytes());
        put_val(&mut b, v);
    }
    for (name, ne, ty, off) in infos {
        put_str(&mut b, name);
        b.extend_from_slice(&(ne.len() as u32).to_le_bytes());
        for d in ne {
            b.extend_from_slice(&d.to_le_bytes());
        }
        b.extend_from_slice(&ty.to_le_bytes());
        b.extend_from_slice(&off.to_le_bytes());
    }
    while b.len() % align != 0 {
        b.push(0);
    }
    b.extend_from_slice(data);
    b
}

/// A well-formed v3 file: tensors laid out in order, each aligned.
fn build(kvs: &[(&str, V)], tensors: &[T]) -> Vec<u8> {
    let align = kvs
        .iter()
        .find(|(k, _)| *k == "general.alignment")
        .and_then(|(_, v)| match v {
            V::U32(a) => Some(*a as usize),
            _ => None,
        })
        .unwrap_or(32);
    let mut data = Vec::new();
    let mut infos = Vec::new();
    for x in tensors {
        while data.len() % align != 0 {
            data.push(0);
        }
        infos.push((x.name.as_str(), x.ne.clone(), x.ty, data.len() as u64));
        data.extend_from_slice(&x.data);
    }
    build_raw(3, kvs, &infos, &data, align)
}

fn write_tmp(dir: &tempfile::TempDir, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.path().join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

// ---- block encoders (from the GGML block layouts) --------------------------

fn f16b(x: f32) -> [u8; 2] {
    let h = half::f16::from_f32(x);
    assert_eq!(h.to_f32(), x, "{x} is not exact in f16");
    h.to_le_bytes()
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Q8_0: d, 32 × i8.
fn q8_0(d: f32, q: &[i8; 32]) -> Vec<u8> {
    let mut b = f16b(d).to_vec();
    b.extend(q.iter().map(|&x| x as u8));
    b
}

/// Nibble packing shared by Q4_0/Q4_1/Q5_*: byte j = q[j] | q[j+16] << 4.
fn nibbles(q: &[u8; 32]) -> Vec<u8> {
    (0..16)
        .map(|j| (q[j] & 15) | ((q[j + 16] & 15) << 4))
        .collect()
}

fn q4_0(d: f32, q: &[u8; 32]) -> Vec<u8> {
    let mut b = f16b(d).to_vec();
    b.extend(nibbles(q));
    b
}

fn q4_1(d: f32, m: f32, q: &[u8; 32]) -> Vec<u8> {
    let mut b = f16b(d).to_vec();
    b.extend(f16b(m));
    b.extend(nibbles(q));
    b
}

fn fifth_bits(q: &[u8; 32]) -> [u8; 4] {
    let mut qh = 0u32;
    for (j, &x) in q.iter().enumerate() {
        qh |= (((x >> 4) & 1) as u32) << j;
    }
    qh.to_le_bytes()
}

fn q5_0(d: f32, q: &[u8; 32]) -> Vec<u8> {
    let mut b = f16b(d).to_vec();
    b.extend(fifth_bits(q));
    b.extend(nibbles(q));
    b
}

fn q5_1(d: f32, m: f32, q: &[u8; 32]) -> Vec<u8> {
    let mut b = f16b(d).to_vec();
    b.extend(f16b(m));
    b.extend(fifth_bits(q));
    b.extend(nibbles(q));
    b
}

/// A tiny deterministic generator.
struct Lcg(u64);
impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn ids<const N: usize>(g: &mut Lcg, n: u64) -> [u8; N] {
    std::array::from_fn(|_| g.below(n) as u8)
}

// ---------------------------------------------------------------------------
// Round trips of hand-written files
// ---------------------------------------------------------------------------

#[test]
fn hand_written_blocks_round_trip_exactly() {
    let mut g = Lcg(1);
    let mut tensors = Vec::new();
    let mut expected: Vec<(&str, Vec<usize>, Vec<f32>)> = Vec::new();

    // F32 [3, 5] (ne = [5, 3]).
    let f: Vec<f32> = (0..15).map(|i| i as f32 * 0.37 - 2.0).collect();
    tensors.push(t("f32", &[5, 3], 0, f32_bytes(&f)));
    expected.push(("f32", vec![3, 5], f.clone()));
    // F16: quarters are exact.
    let h: Vec<f32> = (0..8).map(|i| i as f32 * 0.25 - 1.0).collect();
    tensors.push(t("f16", &[8], 1, h.iter().flat_map(|&x| f16b(x)).collect()));
    expected.push(("f16", vec![8], h.clone()));
    // BF16.
    let bf: Vec<f32> = vec![1.0, -2.5, 393216.0, -0.125];
    tensors.push(t(
        "bf16",
        &[4],
        30,
        bf.iter()
            .flat_map(|&x| half::bf16::from_f32(x).to_le_bytes())
            .collect(),
    ));
    expected.push(("bf16", vec![4], bf.clone()));
    // Q8_0: 2 rows of 64 (4 blocks).
    {
        let mut data = Vec::new();
        let mut vals = Vec::new();
        for blk in 0..4 {
            let d = [0.5f32, 0.25, 2.0, 0.125][blk];
            let q: [i8; 32] = std::array::from_fn(|_| g.below(256) as u8 as i8);
            data.extend(q8_0(d, &q));
            vals.extend(q.iter().map(|&x| x as f32 * d));
        }
        tensors.push(t("q8_0", &[64, 2], 8, data));
        expected.push(("q8_0", vec![2, 64], vals));
    }
    // Q4_0, Q4_1, Q5_0, Q5_1: 2 blocks each.
    {
        let (mut d0, mut v0) = (Vec::new(), Vec::new());
        let (mut d1, mut v1) = (Vec::new(), Vec::new());
        let (mut d2, mut v2) = (Vec::new(), Vec::new());
        let (mut d3, mut v3) = (Vec::new(), Vec::new());
        for blk in 0..2 {
            let d = [0.25f32, 0.5][blk];
            let m = [-2.0f32, 1.5][blk];
            let q4: [u8; 32] = ids(&mut g, 16);
            let q5: [u8; 32] = ids(&mut g, 32);
            d0.extend(q4_0(d, &q4));
            v0.extend(q4.iter().map(|&x| (x as f32 - 8.0) * d));
            d1.extend(q4_1(d, m, &q4));
            v1.extend(q4.iter().map(|&x| x as f32 * d + m));
            d2.extend(q5_0(d, &q5));
            v2.extend(q5.iter().map(|&x| (x as f32 - 16.0) * d));
            d3.extend(q5_1(d, m, &q5));
            v3.extend(q5.iter().map(|&x| x as f32 * d + m));
        }
        tensors.push(t("q4_0", &[64], 2, d0));
        expected.push(("q4_0", vec![64], v0));
        tensors.push(t("q4_1", &[32, 2], 3, d1));
        expected.push(("q4_1", vec![2, 32], v1));
        tensors.push(t("q5_0", &[64], 6, d2));
        expected.push(("q5_0", vec![64], v2));
        tensors.push(t("q5_1", &[32, 1, 2], 7, d3));
        expected.push(("q5_1", vec![2, 1, 32], v3));
    }

    let kvs = vec![
        ("general.architecture", s("test")),
        ("general.name", s("tiny")),
        ("u8", V::U8(200)),
        ("i8", V::I8(-5)),
        ("u16", V::U16(65000)),
        ("i16", V::I16(-30000)),
        ("u32", V::U32(4_000_000_000)),
        ("i32", V::I32(-2_000_000_000)),
        ("f32", V::F32(1.5)),
        ("bool", V::Bool(true)),
        ("u64", V::U64(1 << 40)),
        ("i64", V::I64(-(1 << 40))),
        ("f64", V::F64(-2.25)),
        ("arr.i32", V::Arr(5, vec![V::I32(1), V::I32(-2), V::I32(3)])),
        ("arr.str", strs(&["a", "", "ü"])),
        (
            "arr.nested",
            V::Arr(
                9,
                vec![V::Arr(0, vec![V::U8(1), V::U8(2)]), V::Arr(0, vec![])],
            ),
        ),
        ("arr.empty", V::Arr(8, vec![])),
    ];
    let bytes = build(&kvs, &tensors);
    let dir = tempfile::tempdir().unwrap();
    let p = write_tmp(&dir, "tiny.gguf", &bytes);
    let gf = GgufFile::open(&p).unwrap();
    assert_eq!(gf.version(), 3);
    assert_eq!(gf.alignment(), 32);
    assert_eq!(gf.tensors().len(), expected.len());
    assert_eq!(gf.get("general.name"), Some(&GgufValue::Str("tiny".into())));
    assert_eq!(gf.get("u8"), Some(&GgufValue::U8(200)));
    assert_eq!(gf.get("i8"), Some(&GgufValue::I8(-5)));
    assert_eq!(gf.get("u16"), Some(&GgufValue::U16(65000)));
    assert_eq!(gf.get("i16"), Some(&GgufValue::I16(-30000)));
    assert_eq!(gf.get("u32"), Some(&GgufValue::U32(4_000_000_000)));
    assert_eq!(gf.get("i32"), Some(&GgufValue::I32(-2_000_000_000)));
    assert_eq!(gf.get("f32"), Some(&GgufValue::F32(1.5)));
    assert_eq!(gf.get("bool"), Some(&GgufValue::Bool(true)));
    assert_eq!(gf.get("u64"), Some(&GgufValue::U64(1 << 40)));
    assert_eq!(gf.get("i64"), Some(&GgufValue::I64(-(1 << 40))));
    assert_eq!(gf.get("f64"), Some(&GgufValue::F64(-2.25)));
    assert_eq!(
        gf.get("arr.i32"),
        Some(&GgufValue::Array(vec![
            GgufValue::I32(1),
            GgufValue::I32(-2),
            GgufValue::I32(3)
        ]))
    );
    assert_eq!(
        gf.get("arr.str")
            .and_then(|v| v.as_array())
            .map(|a| a.len()),
        Some(3)
    );
    assert_eq!(
        gf.get("arr.str").unwrap().as_array().unwrap()[2].as_str(),
        Some("ü")
    );
    assert_eq!(
        gf.get("arr.nested"),
        Some(&GgufValue::Array(vec![
            GgufValue::Array(vec![GgufValue::U8(1), GgufValue::U8(2)]),
            GgufValue::Array(vec![])
        ]))
    );
    assert_eq!(gf.get("arr.empty"), Some(&GgufValue::Array(vec![])));
    for (name, shape, vals) in &expected {
        let ti = gf.tensor(name).unwrap();
        assert_eq!(&ti.shape(), shape, "{name}");
        assert_eq!(ti.offset % 32, 0);
        let got = gf.dequantize(ti).unwrap();
        assert_eq!(&got, vals, "{name} does not round-trip");
    }

    // Version 2 has the same layout.
    let mut v2 = bytes.clone();
    v2[4..8].copy_from_slice(&2u32.to_le_bytes());
    let p2 = write_tmp(&dir, "v2.gguf", &v2);
    let g2 = GgufFile::open(&p2).unwrap();
    assert_eq!(g2.version(), 2);
    assert_eq!(g2.dequantize_named("q4_1").unwrap(), expected[5].2);

    // A custom alignment.
    let mut kvs64 = kvs.clone();
    kvs64.push(("general.alignment", V::U32(64)));
    let p3 = write_tmp(&dir, "a64.gguf", &build(&kvs64, &tensors));
    let g3 = GgufFile::open(&p3).unwrap();
    assert_eq!(g3.alignment(), 64);
    assert_eq!(g3.data_start() % 64, 0);
    for (name, _, vals) in &expected {
        assert_eq!(&g3.dequantize_named(name).unwrap(), vals);
    }
}

#[test]
fn dequantize_into_checks_sizes() {
    let mut out = vec![0f32; 32];
    assert!(dequantize_into(GgmlType::Q8_0, &[0u8; 33], &mut out).is_err());
    assert!(dequantize_into(GgmlType::Q8_0, &[0u8; 34], &mut out).is_ok());
    let mut odd = vec![0f32; 31];
    assert!(dequantize_into(GgmlType::Q4_0, &[0u8; 18], &mut odd).is_err());
    for ty in GgmlType::ALL {
        assert_eq!(GgmlType::from_id(ty.id()), Some(ty));
    }
    assert_eq!(GgmlType::Q4_K.type_size(), 144);
    assert_eq!(GgmlType::Q5_K.type_size(), 176);
    assert_eq!(GgmlType::Q6_K.type_size(), 210);
    assert_eq!(GgmlType::from_id(10), None);
}

// ---------------------------------------------------------------------------
// K-quants (and the rest) against the Python gguf package
// ---------------------------------------------------------------------------

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/gguf")
        .join(name)
}

#[test]
fn every_block_format_matches_python_gguf() {
    let p = fixture("quants.gguf");
    let gf = GgufFile::open(&p).unwrap();
    assert_eq!(
        gf.get("general.architecture").and_then(|v| v.as_str()),
        Some("beft-test")
    );
    let mut checked = Vec::new();
    for ty in GgmlType::ALL {
        let name = ty.name();
        let ti = gf
            .tensor(name)
            .unwrap_or_else(|| panic!("fixture lacks {name}"));
        assert_eq!(ti.ggml_type, ty);
        let got = gf.dequantize(ti).unwrap();
        let want = gf.dequantize_named(&format!("{name}.expected")).unwrap();
        assert_eq!(got.len(), want.len());
        let scale = want.iter().fold(0f32, |m, x| m.max(x.abs()));
        assert!(scale > 0.0, "{name}: fixture is all zeros");
        for (i, (a, b)) in got.iter().zip(&want).enumerate() {
            // Up to rounding of the product order in f32.
            assert!(
                (a - b).abs() <= 1e-6 * b.abs().max(1e-3),
                "{name}[{i}]: beft {a} vs gguf-py {b}"
            );
        }
        checked.push(name);
    }
    assert_eq!(checked.len(), 11);
}

// ---------------------------------------------------------------------------
// Malformed input
// ---------------------------------------------------------------------------

/// Opening must fail with a message naming the file (and `needles`).
fn expect_err(dir: &tempfile::TempDir, bytes: &[u8], needles: &[&str]) -> String {
    let p = write_tmp(dir, "bad.gguf", bytes);
    let err = GgufFile::open(&p).expect_err("malformed file was accepted");
    let msg = err.to_string();
    assert!(
        msg.contains(&p.display().to_string()),
        "message does not name the file: {msg}"
    );
    for n in needles {
        assert!(msg.contains(n), "message lacks {n:?}: {msg}");
    }
    msg
}

fn one_tensor_file(ty: u32, ne: Vec<u64>, offset: u64, data_len: usize) -> Vec<u8> {
    build_raw(
        3,
        &[("general.architecture", s("llama"))],
        &[("blk.0.attn_q.weight", ne, ty, offset)],
        &vec![0u8; data_len],
        32,
    )
}

#[test]
fn unknown_and_unsupported_tensor_types_are_named() {
    let dir = tempfile::tempdir().unwrap();
    expect_err(
        &dir,
        &one_tensor_file(99, vec![32], 0, 64),
        &["blk.0.attn_q.weight", "99", "not supported"],
    );
    expect_err(
        &dir,
        &one_tensor_file(10, vec![256], 0, 256),
        &["blk.0.attn_q.weight", "10", "Q2_K"],
    );
}

#[test]
fn truncated_files_are_errors_at_every_length() {
    let dir = tempfile::tempdir().unwrap();
    let tensors = vec![
        t("a", &[32], 8, q8_0(0.5, &[3; 32])),
        t("b", &[4], 0, f32_bytes(&[1.0, 2.0, 3.0, 4.0])),
    ];
    let kvs = vec![
        ("general.architecture", s("llama")),
        ("tokenizer.ggml.tokens", strs(&["a", "b", "c"])),
    ];
    let full = build(&kvs, &tensors);
    let p = write_tmp(&dir, "full.gguf", &full);
    GgufFile::open(&p).unwrap();
    for n in 0..full.len() {
        let p = write_tmp(&dir, "cut.gguf", &full[..n]);
        let err = GgufFile::open(&p)
            .err()
            .unwrap_or_else(|| panic!("a file cut to {n} of {} bytes was accepted", full.len()));
        assert!(err.to_string().contains("cut.gguf"), "{err}");
    }
    // Cut inside the last tensor's data: the message says so.
    let msg = expect_err(&dir, &full[..full.len() - 3], &["'b'", "beyond the end"]);
    assert!(msg.contains("truncated"), "{msg}");
}

#[test]
fn lying_lengths_are_refused_without_allocating() {
    let dir = tempfile::tempdir().unwrap();
    // An array claiming 2^60 elements.
    let mut b = Vec::new();
    b.extend_from_slice(b"GGUF");
    b.extend_from_slice(&3u32.to_le_bytes());
    b.extend_from_slice(&0u64.to_le_bytes());
    b.extend_from_slice(&1u64.to_le_bytes());
    put_str(&mut b, "tokenizer.ggml.tokens");
    b.extend_from_slice(&9u32.to_le_bytes()); // array
    b.extend_from_slice(&8u32.to_le_bytes()); // of strings
    b.extend_from_slice(&(1u64 << 60).to_le_bytes());
    b.extend_from_slice(&[0u8; 64]);
    expect_err(&dir, &b, &["tokenizer.ggml.tokens", "1152921504606846976"]);
    // Array of u8 claiming u64::MAX elements (count × size overflows).
    let mut b2 = b.clone();
    let at = b2.len() - 64 - 8;
    b2[at - 4..at].copy_from_slice(&0u32.to_le_bytes());
    b2[at..at + 8].copy_from_slice(&u64::MAX.to_le_bytes());
    expect_err(&dir, &b2, &["tokenizer.ggml.tokens", "elements"]);
    // A string claiming 2^60 bytes.
    let mut c = Vec::new();
    c.extend_from_slice(b"GGUF");
    c.extend_from_slice(&3u32.to_le_bytes());
    c.extend_from_slice(&0u64.to_le_bytes());
    c.extend_from_slice(&1u64.to_le_bytes());
    put_str(&mut c, "general.name");
    c.extend_from_slice(&8u32.to_le_bytes());
    c.extend_from_slice(&(1u64 << 60).to_le_bytes());
    c.extend_from_slice(b"abc");
    expect_err(&dir, &c, &["general.name", "1152921504606846976"]);
    // A key whose own length lies.
    let mut k = Vec::new();
    k.extend_from_slice(b"GGUF");
    k.extend_from_slice(&3u32.to_le_bytes());
    k.extend_from_slice(&0u64.to_le_bytes());
    k.extend_from_slice(&1u64.to_le_bytes());
    k.extend_from_slice(&u64::MAX.to_le_bytes());
    k.extend_from_slice(&[b'x'; 16]);
    expect_err(&dir, &k, &["metadata key #0"]);
    // Counts in the header larger than the file can hold.
    let mut h = Vec::new();
    h.extend_from_slice(b"GGUF");
    h.extend_from_slice(&3u32.to_le_bytes());
    h.extend_from_slice(&(1u64 << 62).to_le_bytes());
    h.extend_from_slice(&0u64.to_le_bytes());
    h.extend_from_slice(&[0u8; 32]);
    expect_err(&dir, &h, &["tensors"]);
    let mut h2 = h.clone();
    h2[8..16].copy_from_slice(&0u64.to_le_bytes());
    h2[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
    expect_err(&dir, &h2, &["metadata entries"]);
    // Tensor dimensions whose product overflows.
    expect_err(
        &dir,
        &one_tensor_file(0, vec![1 << 32, 1 << 32, 1 << 32], 0, 64),
        &["blk.0.attn_q.weight", "overflow"],
    );
    // Dimensions claiming far more data than the file holds.
    expect_err(
        &dir,
        &one_tensor_file(0, vec![1 << 20, 1 << 20], 0, 64),
        &["blk.0.attn_q.weight", "beyond the end"],
    );
}

#[test]
fn bad_tensor_infos_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    // Offset past the end.
    expect_err(
        &dir,
        &one_tensor_file(0, vec![4], 1 << 40, 64),
        &["blk.0.attn_q.weight", "beyond the end"],
    );
    expect_err(
        &dir,
        &one_tensor_file(0, vec![4], u64::MAX - 31, 64),
        &["blk.0.attn_q.weight"],
    );
    // More than 4 dimensions.
    expect_err(
        &dir,
        &one_tensor_file(0, vec![1, 1, 1, 1, 2], 0, 64),
        &["blk.0.attn_q.weight", "5 dimensions"],
    );
    // Misaligned offset.
    expect_err(
        &dir,
        &one_tensor_file(0, vec![4], 4, 64),
        &["blk.0.attn_q.weight", "alignment"],
    );
    // Row length not a whole number of blocks.
    expect_err(
        &dir,
        &one_tensor_file(8, vec![48], 0, 128),
        &["blk.0.attn_q.weight", "multiple"],
    );
    // Overlapping tensors.
    let b = build_raw(
        3,
        &[],
        &[("x", vec![16], 0, 0), ("y", vec![16], 0, 32)],
        &[0u8; 128],
        32,
    );
    expect_err(&dir, &b, &["overlap"]);
    // Duplicate tensor names and duplicate keys.
    let b = build_raw(
        3,
        &[],
        &[("x", vec![4], 0, 0), ("x", vec![4], 0, 32)],
        &[0u8; 64],
        32,
    );
    expect_err(&dir, &b, &["'x'", "twice"]);
    let b = build_raw(3, &[("k", V::U8(1)), ("k", V::U8(2))], &[], &[], 32);
    expect_err(&dir, &b, &["'k'", "twice"]);
    // Bad magic, bad version, bad alignment, bad bool, unknown value type.
    let good = one_tensor_file(0, vec![4], 0, 64);
    let mut m = good.clone();
    m[..4].copy_from_slice(b"GGML");
    expect_err(&dir, &m, &["not a GGUF file"]);
    let mut v = good.clone();
    v[4..8].copy_from_slice(&1u32.to_le_bytes());
    expect_err(&dir, &v, &["version 1"]);
    let b = build_raw(3, &[("general.alignment", V::U32(24))], &[], &[], 32);
    expect_err(&dir, &b, &["general.alignment"]);
    let b = build_raw(3, &[("general.alignment", V::U64(32))], &[], &[], 32);
    expect_err(&dir, &b, &["general.alignment"]);
    let b = build_raw(3, &[("flag", V::U8(2))], &[], &[], 32);
    let mut b = b;
    // retag the u8 as a bool with value 2
    let pos = 24 + 8 + 4;
    b[pos..pos + 4].copy_from_slice(&7u32.to_le_bytes());
    expect_err(&dir, &b, &["'flag'", "bool"]);
    let mut b = build_raw(3, &[("odd", V::U8(0))], &[], &[], 32);
    let pos = 24 + 8 + 3;
    b[pos..pos + 4].copy_from_slice(&77u32.to_le_bytes());
    expect_err(&dir, &b, &["'odd'", "77"]);
    // Not UTF-8.
    let mut b = build_raw(3, &[("name", s("ab"))], &[], &[], 32);
    let at = b.windows(2).position(|w| w == b"ab").unwrap();
    b[at + 1] = 0xFF;
    expect_err(&dir, &b, &["UTF-8"]);
    // Deeply nested arrays.
    let mut deep = V::Arr(0, vec![]);
    for _ in 0..20 {
        deep = V::Arr(9, vec![deep]);
    }
    let b = build_raw(3, &[("deep", deep)], &[], &[], 32);
    expect_err(&dir, &b, &["'deep'", "nested"]);
    // Empty and tiny files.
    expect_err(&dir, b"", &["not a GGUF file"]);
    expect_err(&dir, b"GGUF\x03\0\0\0", &["GGUF"]);
}

#[test]
fn random_corruption_never_panics() {
    let dir = tempfile::tempdir().unwrap();
    let tensors = vec![
        t("a", &[32], 8, q8_0(0.5, &[3; 32])),
        t("b", &[4], 0, f32_bytes(&[1.0, 2.0, 3.0, 4.0])),
    ];
    let kvs = vec![
        ("general.architecture", s("llama")),
        ("tokenizer.ggml.tokens", strs(&["a", "b", "c"])),
        ("x", V::Arr(5, vec![V::I32(1), V::I32(2)])),
    ];
    let full = build(&kvs, &tensors);
    let mut g = Lcg(42);
    let p = dir.path().join("fuzz.gguf");
    for _ in 0..600 {
        let mut b = full.clone();
        for _ in 0..1 + g.below(4) {
            let i = g.below(b.len() as u64) as usize;
            b[i] = match g.below(4) {
                0 => 0xFF,
                1 => 0,
                _ => g.below(256) as u8,
            };
        }
        std::fs::write(&p, &b).unwrap();
        if let Ok(gf) = GgufFile::open(&p) {
            for ti in gf.tensors() {
                let _ = gf.dequantize(ti);
            }
        }
    }
}

// ---------------------------------------------------------------------------
// LLaMA-family mapping
// ---------------------------------------------------------------------------

#[test]
fn llama_names_map_to_hugging_face() {
    let cases = [
        ("token_embd.weight", "model.embed_tokens.weight"),
        ("output_norm.weight", "model.norm.weight"),
        ("output.weight", "lm_head.weight"),
        (
            "blk.0.attn_q.weight",
            "model.layers.0.self_attn.q_proj.weight",
        ),
        (
            "blk.12.attn_k.weight",
            "model.layers.12.self_attn.k_proj.weight",
        ),
        ("blk.3.attn_v.bias", "model.layers.3.self_attn.v_proj.bias"),
        ("blk.3.attn_q.bias", "model.layers.3.self_attn.q_proj.bias"),
        (
            "blk.7.attn_output.weight",
            "model.layers.7.self_attn.o_proj.weight",
        ),
        (
            "blk.7.attn_norm.weight",
            "model.layers.7.input_layernorm.weight",
        ),
        (
            "blk.7.ffn_norm.weight",
            "model.layers.7.post_attention_layernorm.weight",
        ),
        (
            "blk.29.ffn_gate.weight",
            "model.layers.29.mlp.gate_proj.weight",
        ),
        ("blk.29.ffn_up.weight", "model.layers.29.mlp.up_proj.weight"),
        (
            "blk.29.ffn_down.weight",
            "model.layers.29.mlp.down_proj.weight",
        ),
    ];
    for (g, h) in cases {
        assert_eq!(hf_tensor_name(g).as_deref(), Some(h), "{g}");
    }
    for g in [
        "rope_freqs.weight",
        "blk.x.attn_q.weight",
        "blk.0.attn_qkv.weight",
        "blk.0.attn_q.scale",
        "token_embd",
    ] {
        assert_eq!(hf_tensor_name(g), None, "{g}");
    }
}

/// llama.cpp's converter: `w.reshape(n_head, 2, rows/n_head/2, cols).swapaxes(1, 2)`.
fn converter_permute(w: &[f32], rows: usize, cols: usize, n_head: usize) -> Vec<f32> {
    let dh = rows / n_head;
    let half = dh / 2;
    let mut out = vec![0f32; w.len()];
    for h in 0..n_head {
        for i in 0..2 {
            for j in 0..half {
                // out[h, j, i] = in[h, i, j]
                let src = h * dh + i * half + j;
                let dst = h * dh + j * 2 + i;
                out[dst * cols..(dst + 1) * cols].copy_from_slice(&w[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}

#[test]
fn unpermute_inverts_the_converter() {
    // One head of 4 rows: HF rows [r0 r1 r2 r3] (pairs (r0,r2), (r1,r3)) are
    // stored as [r0 r2 r1 r3] (adjacent pairs).
    let gguf = [0.0, 2.0, 1.0, 3.0];
    assert_eq!(
        unpermute_rows(&gguf, 4, 1, 1).unwrap(),
        vec![0.0, 1.0, 2.0, 3.0]
    );
    let (rows, cols) = (24, 5);
    for n_head in [1, 2, 3, 6] {
        let w: Vec<f32> = (0..rows * cols).map(|i| i as f32).collect();
        let p = converter_permute(&w, rows, cols, n_head);
        assert_ne!(p, w);
        assert_eq!(
            unpermute_rows(&p, rows, cols, n_head).unwrap(),
            w,
            "{n_head} heads"
        );
    }
    assert!(
        unpermute_rows(&[0.0; 6], 6, 1, 2).is_none(),
        "odd head size"
    );
    assert!(unpermute_rows(&[0.0; 6], 6, 1, 0).is_none());
}

// ---------------------------------------------------------------------------
// A tiny LLaMA and Qwen2 GGUF: config, weights, tokenizer
// ---------------------------------------------------------------------------

const HIDDEN: u64 = 8;
const HEADS: u64 = 2;
const KV: u64 = 1;
const FFN: u64 = 32;

/// Byte-level vocabulary: specials, single characters, merged tokens.
const TOKENS: &[&str] = &[
    "<s>", "</s>", "<pad>", "a", "b", "c", "Ġ", "1", "2", "ab", "Ġc", "abc", "Ġab", "<tool>",
];
const MERGES: &[&str] = &["a b", "Ġ c", "ab c", "Ġ ab"];
const TYPES: &[i32] = &[3, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 4];

fn tiny_model(arch: &str, add_bos: bool, tied: bool) -> (Vec<u8>, Vec<(String, Vec<f32>)>) {
    let vocab = TOKENS.len() as u64;
    let mut g = Lcg(7);
    let mut rnd = |n: u64| -> Vec<f32> {
        (0..n)
            .map(|_| (g.below(2001) as f32 - 1000.0) / 1000.0)
            .collect()
    };
    let kv_dim = HIDDEN / HEADS * KV;
    let mut tensors = Vec::new();
    let mut raw = Vec::new();
    let mut add = |name: &str, ne: &[u64], vals: Vec<f32>| {
        tensors.push(t(name, ne, 0, f32_bytes(&vals)));
        raw.push((name.to_string(), vals));
    };
    add("token_embd.weight", &[HIDDEN, vocab], rnd(HIDDEN * vocab));
    add("output_norm.weight", &[HIDDEN], rnd(HIDDEN));
    if !tied {
        add("output.weight", &[HIDDEN, vocab], rnd(HIDDEN * vocab));
    }
    add("blk.0.attn_norm.weight", &[HIDDEN], rnd(HIDDEN));
    add(
        "blk.0.attn_q.weight",
        &[HIDDEN, HIDDEN],
        rnd(HIDDEN * HIDDEN),
    );
    add(
        "blk.0.attn_k.weight",
        &[HIDDEN, kv_dim],
        rnd(HIDDEN * kv_dim),
    );
    add(
        "blk.0.attn_v.weight",
        &[HIDDEN, kv_dim],
        rnd(HIDDEN * kv_dim),
    );
    if arch == "qwen2" {
        add("blk.0.attn_q.bias", &[HIDDEN], rnd(HIDDEN));
        add("blk.0.attn_k.bias", &[kv_dim], rnd(kv_dim));
        add("blk.0.attn_v.bias", &[kv_dim], rnd(kv_dim));
    }
    add(
        "blk.0.attn_output.weight",
        &[HIDDEN, HIDDEN],
        rnd(HIDDEN * HIDDEN),
    );
    add("blk.0.ffn_norm.weight", &[HIDDEN], rnd(HIDDEN));
    add("blk.0.ffn_gate.weight", &[HIDDEN, FFN], rnd(HIDDEN * FFN));
    add("blk.0.ffn_up.weight", &[HIDDEN, FFN], rnd(HIDDEN * FFN));
    add("blk.0.ffn_down.weight", &[FFN, HIDDEN], rnd(HIDDEN * FFN));
    let a = |k: &str| format!("{arch}.{k}");
    let keys: Vec<(String, V)> = vec![
        ("general.architecture".into(), s(arch)),
        (a("block_count"), V::U32(1)),
        (a("context_length"), V::U32(64)),
        (a("embedding_length"), V::U32(HIDDEN as u32)),
        (a("feed_forward_length"), V::U32(FFN as u32)),
        (a("attention.head_count"), V::U32(HEADS as u32)),
        (a("attention.head_count_kv"), V::U32(KV as u32)),
        (a("rope.freq_base"), V::F32(500000.0)),
        (a("attention.layer_norm_rms_epsilon"), V::F32(1e-5)),
        ("tokenizer.ggml.model".into(), s("gpt2")),
        (
            "tokenizer.ggml.pre".into(),
            s(if arch == "qwen2" { "qwen2" } else { "smollm" }),
        ),
        ("tokenizer.ggml.tokens".into(), strs(TOKENS)),
        ("tokenizer.ggml.merges".into(), strs(MERGES)),
        (
            "tokenizer.ggml.token_type".into(),
            V::Arr(5, TYPES.iter().map(|&x| V::I32(x)).collect()),
        ),
        ("tokenizer.ggml.bos_token_id".into(), V::U32(0)),
        ("tokenizer.ggml.eos_token_id".into(), V::U32(1)),
        ("tokenizer.ggml.padding_token_id".into(), V::U32(2)),
        ("tokenizer.ggml.add_bos_token".into(), V::Bool(add_bos)),
    ];
    let kvs: Vec<(&str, V)> = keys.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
    (build(&kvs, &tensors), raw)
}

#[test]
fn tiny_llama_gguf_opens_as_a_model_dir() {
    let dir = tempfile::tempdir().unwrap();
    let (bytes, raw) = tiny_model("llama", true, true);
    let p = write_tmp(&dir, "tiny-llama.gguf", &bytes);
    let gf = GgufFile::open(&p).unwrap();
    let cfg = hf_config(&gf).unwrap();
    assert_eq!(cfg["model_type"], "llama");
    assert_eq!(cfg["hidden_size"], HIDDEN);
    assert_eq!(cfg["intermediate_size"], FFN);
    assert_eq!(cfg["num_hidden_layers"], 1);
    assert_eq!(cfg["num_attention_heads"], HEADS);
    assert_eq!(cfg["num_key_value_heads"], KV);
    assert_eq!(cfg["rope_theta"], 500000.0);
    assert_eq!(cfg["max_position_embeddings"], 64);
    assert_eq!(cfg["vocab_size"], TOKENS.len());
    assert_eq!(cfg["tie_word_embeddings"], true);
    assert_eq!(cfg["bos_token_id"], 0);
    assert_eq!(cfg["eos_token_id"], 1);
    assert!((cfg["rms_norm_eps"].as_f64().unwrap() - 1e-5).abs() < 1e-10);

    let md = ModelDir::open(&p).unwrap();
    assert_eq!(md.name, "tiny-llama");
    assert_eq!(md.dir, dir.path());
    assert_eq!(md.config.arch, Arch::Llama);
    assert_eq!(md.config.num_layers, 1);
    assert_eq!(md.config.hidden_size, HIDDEN as usize);
    assert_eq!(md.config.vocab_size, TOKENS.len());
    assert!(md.config.tie_word_embeddings);
    assert_eq!(md.tokenizer.as_deref(), Some(p.as_path()));
    let w = &md.weights;
    assert!(w.try_get("lm_head.weight").is_none());
    let emb = w.get("model.embed_tokens.weight").unwrap();
    assert_eq!(emb.shape, vec![TOKENS.len(), HIDDEN as usize]);
    assert_eq!(emb.to_f32_vec(), raw[0].1);
    let down = w.get("model.layers.0.mlp.down_proj.weight").unwrap();
    assert_eq!(down.shape, vec![HIDDEN as usize, FFN as usize]);
    let gate = w.get("model.layers.0.mlp.gate_proj.weight").unwrap();
    assert_eq!(gate.shape, vec![FFN as usize, HIDDEN as usize]);
    // Q and K come back un-permuted; V as stored.
    let find = |n: &str| raw.iter().find(|(k, _)| k == n).unwrap().1.clone();
    let q = w.get("model.layers.0.self_attn.q_proj.weight").unwrap();
    assert_eq!(q.shape, vec![HIDDEN as usize, HIDDEN as usize]);
    let q_gguf = find("blk.0.attn_q.weight");
    assert_eq!(
        converter_permute(
            &q.to_f32_vec(),
            HIDDEN as usize,
            HIDDEN as usize,
            HEADS as usize
        ),
        q_gguf
    );
    let k = w.get("model.layers.0.self_attn.k_proj.weight").unwrap();
    let kv_dim = (HIDDEN / HEADS * KV) as usize;
    assert_eq!(k.shape, vec![kv_dim, HIDDEN as usize]);
    assert_eq!(
        converter_permute(&k.to_f32_vec(), kv_dim, HIDDEN as usize, KV as usize),
        find("blk.0.attn_k.weight")
    );
    assert_eq!(
        w.get("model.layers.0.self_attn.v_proj.weight")
            .unwrap()
            .to_f32_vec(),
        find("blk.0.attn_v.weight")
    );
    assert_eq!(w.metadata().get("format").map(String::as_str), Some("gguf"));
    assert_eq!(
        w.metadata().get("general.architecture").map(String::as_str),
        Some("llama")
    );
    assert_eq!(w.fingerprint().len(), 16);

    // The tokenizer, from the same file.
    let tok = TextTokenizer::from_file(&p, 16).unwrap();
    assert_eq!(tok.vocab_size(), TOKENS.len());
    assert_eq!(tok.pad_id(), Some(2));
    let e = tok.encode("ab c abc", None).unwrap();
    // BOS, "ab", "Ġc", "Ġ", "abc": " abc" is Ġ a b c; merge ranks: a b (0),
    // then ab c (2) before Ġ ab (3).
    assert_eq!(e.ids, vec![0, 9, 10, 6, 11]);
    let e = tok.encode("<tool>ab</s>", None).unwrap();
    assert_eq!(e.ids, vec![0, 13, 9, 1]);
    // Digits split one by one (smollm pre-tokenizer).
    let e = tok.encode("12", None).unwrap();
    assert_eq!(e.ids, vec![0, 7, 8]);
    assert_eq!(
        tok.inner().decode(&[9, 10, 6, 11], true).unwrap(),
        "ab c abc"
    );
    // Truncation to max_len.
    let long = "ab ".repeat(40);
    assert_eq!(tok.encode(&long, None).unwrap().ids.len(), 16);
}

#[test]
fn tiny_qwen2_gguf_keeps_biases_unpermuted() {
    let dir = tempfile::tempdir().unwrap();
    let (bytes, raw) = tiny_model("qwen2", false, false);
    let p = write_tmp(&dir, "tiny-qwen.gguf", &bytes);
    let md = ModelDir::open(&p).unwrap();
    assert_eq!(md.config.arch, Arch::Qwen2);
    assert!(!md.config.tie_word_embeddings);
    let w = &md.weights;
    let find = |n: &str| raw.iter().find(|(k, _)| k == n).unwrap().1.clone();
    for (hf, gg) in [
        (
            "model.layers.0.self_attn.q_proj.weight",
            "blk.0.attn_q.weight",
        ),
        (
            "model.layers.0.self_attn.k_proj.weight",
            "blk.0.attn_k.weight",
        ),
        ("model.layers.0.self_attn.q_proj.bias", "blk.0.attn_q.bias"),
        ("model.layers.0.self_attn.k_proj.bias", "blk.0.attn_k.bias"),
        ("model.layers.0.self_attn.v_proj.bias", "blk.0.attn_v.bias"),
        ("lm_head.weight", "output.weight"),
    ] {
        assert_eq!(w.get(hf).unwrap().to_f32_vec(), find(gg), "{hf}");
    }
    let tok = TextTokenizer::from_file(&p, 16).unwrap();
    // No BOS for this file.
    assert_eq!(tok.encode("ab c", None).unwrap().ids, vec![9, 10]);
}

#[test]
fn gguf_model_errors_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    // An architecture outside the LLaMA family.
    let (bytes, _) = tiny_model("gpt2", false, true);
    let p = write_tmp(&dir, "gpt2.gguf", &bytes);
    let err = ModelDir::open(&p).unwrap_err().to_string();
    assert!(err.contains("gpt2.gguf") && err.contains("'gpt2'"), "{err}");
    // A missing required key.
    let b = build(
        &[
            ("general.architecture", s("llama")),
            ("llama.block_count", V::U32(1)),
        ],
        &[],
    );
    let p = write_tmp(&dir, "nokeys.gguf", &b);
    let err = ModelDir::open(&p).unwrap_err().to_string();
    assert!(
        err.contains("nokeys.gguf") && err.contains("llama.embedding_length"),
        "{err}"
    );
    // A SentencePiece vocabulary has no tokenizer here (but the model opens).
    let (bytes, _) = tiny_model("llama", false, true);
    let mut gf_bytes = bytes;
    let pos = gf_bytes
        .windows(4)
        .position(|w| w == b"gpt2")
        .expect("tokenizer model string");
    gf_bytes[pos..pos + 4].copy_from_slice(b"spm!");
    let p = write_tmp(&dir, "spm.gguf", &gf_bytes);
    assert!(ModelDir::open(&p).is_ok());
    let err = TextTokenizer::from_file(&p, 16).unwrap_err().to_string();
    assert!(err.contains("spm.gguf") && err.contains("spm!"), "{err}");
    // A missing file.
    let err = ModelDir::open(&dir.path().join("none.gguf"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("none.gguf"), "{err}");
}

// ---------------------------------------------------------------------------
// Real files (skipped with a reason when absent)
// ---------------------------------------------------------------------------

fn cache_model(file: &str) -> Option<PathBuf> {
    let cache = std::env::var_os("BEFT_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/beft")))?;
    let p = cache.join("models").join(file);
    if p.is_file() {
        Some(p)
    } else {
        eprintln!(
            "SKIP: {} not found (run scripts/fetch_smollm2.sh)",
            p.display()
        );
        None
    }
}

fn reference(name: &str) -> Value {
    let p = fixture(name);
    serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap()
}

/// The weights and token ids of `md` against a `check_gguf.py reference` file.
fn check_against_reference(md: &ModelDir, gguf: &Path, refv: &Value) {
    for (name, r) in refv["tensors"].as_object().unwrap() {
        if name == "lm_head.weight" && md.config.tie_word_embeddings {
            // transformers lists the tied head; beft reads the embeddings.
            assert!(md.weights.try_get(name).is_none());
            continue;
        }
        let t = md
            .weights
            .get(name)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let shape: Vec<usize> = r["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as usize)
            .collect();
        assert_eq!(t.shape, shape, "{name}");
        let v = t.to_f32_vec();
        for (i, want) in r["first"].as_array().unwrap().iter().enumerate() {
            let want = want.as_f64().unwrap() as f32;
            assert!(
                (v[i] - want).abs() <= 1e-6 * want.abs().max(1e-3),
                "{name}[{i}]: {} vs {want}",
                v[i]
            );
        }
        for (i, want) in r["at"].as_object().unwrap() {
            let i: usize = i.parse().unwrap();
            let want = want.as_f64().unwrap() as f32;
            assert!(
                (v[i] - want).abs() <= 1e-6 * want.abs().max(1e-3),
                "{name}[{i}]: {} vs {want}",
                v[i]
            );
        }
        let sum: f64 = v.iter().map(|&x| x as f64).sum();
        let sum_sq: f64 = v.iter().map(|&x| (x as f64) * (x as f64)).sum();
        let (rs, rq) = (r["sum"].as_f64().unwrap(), r["sum_sq"].as_f64().unwrap());
        assert!(
            (sum - rs).abs() <= 1e-6 * rq.sqrt().max(1.0) * (v.len() as f64).sqrt(),
            "{name}: sum {sum} vs {rs}"
        );
        assert!(
            (sum_sq - rq).abs() <= 1e-5 * rq,
            "{name}: sum_sq {sum_sq} vs {rq}"
        );
    }
    let tok = TextTokenizer::from_file(gguf, 512).unwrap();
    for case in refv["tokens"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let want: Vec<u32> = case["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect();
        let got = tok.encode(text, None).unwrap().ids;
        assert_eq!(got, want, "token ids of {text:?}");
        assert_eq!(
            tok.inner().decode(&got, false).unwrap(),
            case["decoded"].as_str().unwrap(),
            "decoding {text:?}"
        );
    }
}

#[test]
fn smollm2_gguf_loads_and_matches_transformers() {
    let Some(p) = cache_model("SmolLM2-135M-Instruct.Q4_1.gguf") else {
        return;
    };
    let md = ModelDir::open(&p).unwrap();
    let c = &md.config;
    assert_eq!(c.arch, Arch::Llama);
    assert_eq!(c.num_layers, 30);
    assert_eq!(c.hidden_size, 576);
    assert_eq!(c.num_heads, 9);
    assert_eq!(c.num_kv_heads, 3);
    assert_eq!(c.intermediate_size, 1536);
    assert_eq!(c.vocab_size, 49152);
    assert!(c.tie_word_embeddings);
    assert_eq!(c.rope_theta, 100000.0);
    assert_eq!(md.name, "SmolLM2-135M-Instruct.Q4_1");
    // 1 embedding + final norm + 9 per layer.
    assert_eq!(md.weights.names().len(), 2 + 30 * 9);
    check_against_reference(
        &md,
        &p,
        &reference("SmolLM2-135M-Instruct.Q4_1.reference.json"),
    );
    let tok = TextTokenizer::from_file(&p, 64).unwrap();
    let e = tok.encode("The capital of France is", None).unwrap();
    assert_eq!(e.ids, vec![504, 3575, 282, 4649, 314]);
    assert_eq!(tok.vocab_size(), 49152);
}

#[test]
fn qwen2_gguf_loads_if_present() {
    let Some(p) = cache_model("Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf") else {
        return;
    };
    let md = ModelDir::open(&p).unwrap();
    let c = &md.config;
    assert_eq!(c.arch, Arch::Qwen2);
    assert_eq!(c.num_layers, 24);
    assert_eq!(c.hidden_size, 896);
    assert_eq!(c.num_heads, 14);
    assert_eq!(c.num_kv_heads, 2);
    assert!(md
        .weights
        .get("model.layers.0.self_attn.v_proj.bias")
        .is_ok());
    let refname = "Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.reference.json";
    if fixture(refname).is_file() {
        check_against_reference(&md, &p, &reference(refname));
    }
}

// ---------------------------------------------------------------------------
// SmolLM2 as a decoder: greedy continuation and perplexity
// ---------------------------------------------------------------------------

#[test]
fn smollm2_gguf_greedy_continuation_and_perplexity() {
    check_decoder(
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "SmolLM2-135M-Instruct.Q4_1.reference.json",
        " Paris",
    );
}

#[test]
fn qwen2_gguf_greedy_continuation_and_perplexity_if_present() {
    check_decoder(
        "Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf",
        "Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.reference.json",
        " Paris",
    );
}

/// The model in the cache's `file` as a beft decoder against the greedy
/// continuation and perplexity recorded from transformers in `refname`.
fn check_decoder(file: &str, refname: &str, starts: &str) {
    use beft::backend::cpu::CpuBackend;
    use beft::model::{BiasTerm, Decoder, DecoderOptions};
    use beft::train::Slab;

    if cfg!(debug_assertions) && std::env::var_os("BEFT_SLOW_TESTS").is_none() {
        eprintln!("SKIP: {file}: the forward pass takes minutes in a debug build (run with --release, or set BEFT_SLOW_TESTS=1)");
        return;
    }
    let Some(p) = cache_model(file) else {
        return;
    };
    let refv = reference(refname);
    let md = ModelDir::open(&p).unwrap();
    let tok = TextTokenizer::from_file(&p, 512).unwrap();
    let be = CpuBackend::<f32>::new();
    // b_v trains: SmolLM2's are added as zeros, Qwen2's are its own, so the
    // forward pass is that of the base model either way.
    let dec = Decoder::load(
        &be,
        &md,
        DecoderOptions {
            terms: BiasTerm::parse_set("v").unwrap(),
            ..Default::default()
        },
    )
    .unwrap();
    let slab = Slab::new(&be, &dec.init);
    let as_ids = |v: &Value| -> Vec<u32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect()
    };

    // Greedy continuation of the fixed prompt, as recorded from transformers.
    let g = &refv["greedy"];
    let prompt = tok.encode(g["prompt"].as_str().unwrap(), None).unwrap().ids;
    assert_eq!(prompt, as_ids(&g["prompt_ids"]));
    let want = as_ids(&g["new_ids"]);
    let out = dec
        .generate_greedy(
            &be,
            &slab.params,
            std::slice::from_ref(&prompt),
            want.len(),
            &|_| false,
        )
        .unwrap();
    let text = tok.inner().decode(&out[0], false).unwrap();
    println!("{file}: {:?} -> {text:?}", g["prompt"].as_str().unwrap());
    assert_eq!(out[0], want, "{file}: greedy continuation {text:?}");
    assert!(text.starts_with(starts), "{text:?}");

    // Perplexity of the fixed text: mean next-token NLL over positions 1..n.
    let pp = &refv["perplexity"];
    let ids = tok.encode(pp["text"].as_str().unwrap(), None).unwrap().ids;
    assert_eq!(ids, as_ids(&pp["ids"]));
    let n = ids.len();
    let x = dec.upload(&be, 1, n, &ids, &vec![1.0; n]).unwrap();
    let rows: Vec<u32> = (0..n as u32 - 1).collect();
    let rt = dec.row_targets(&be, &x, &rows, &ids[1..]).unwrap();
    let logits: Vec<f64> = dec
        .logits_at(&be, &slab.params, &x, &rt)
        .iter()
        .map(|v| *v as f64)
        .collect();
    let vs = md.config.vocab_size;
    let mut nll = 0.0;
    for r in 0..n - 1 {
        let row = &logits[r * vs..(r + 1) * vs];
        let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let lse = m + row.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
        nll += lse - row[ids[r + 1] as usize];
    }
    let mean_nll = nll / (n - 1) as f64;
    let ppl = mean_nll.exp();
    let want_nll = pp["mean_nll"].as_f64().unwrap();
    println!(
        "{file}: perplexity {ppl:.4} (transformers {:.4})",
        want_nll.exp()
    );
    assert!(ppl.is_finite());
    // Recorded band: within 1% of transformers' NLL (f32 sums differ).
    assert!(
        (mean_nll - want_nll).abs() <= 0.01 * want_nll,
        "{file}: mean NLL {mean_nll} vs transformers {want_nll}"
    );
    // The first logits, value by value.
    let lh = &refv["logits_head"];
    for (r, want_row) in lh["first8"].as_array().unwrap().iter().enumerate() {
        for (j, w) in want_row.as_array().unwrap().iter().enumerate() {
            let (got, w) = (logits[r * vs + j], w.as_f64().unwrap());
            assert!(
                (got - w).abs() <= 2e-3 * w.abs().max(1.0),
                "{file}: logit[{r}][{j}] {got} vs {w}"
            );
        }
    }
}
