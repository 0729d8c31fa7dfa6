//! Safetensors loading (`beft::weights`) and model configuration
//! (`beft::model::config`).

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use beft::backend::{Act, PoolKind};
use beft::model::config::{Arch, ModelConfig, ModelDir};
use beft::weights::{write_safetensors, DType, WeightStore};
use serde_json::json;

// ---- helpers ---------------------------------------------------------------

/// Write a safetensors file by hand: header length, header, data.
fn raw(dir: &Path, name: &str, header: &str, data: &[u8]) -> PathBuf {
    let mut b = (header.len() as u64).to_le_bytes().to_vec();
    b.extend_from_slice(header.as_bytes());
    b.extend_from_slice(data);
    let p = dir.join(name);
    fs::write(&p, b).unwrap();
    p
}

fn err_of<T: std::fmt::Debug>(r: beft::Result<T>) -> String {
    r.unwrap_err().to_string()
}

/// `msg` names `file` and contains every phrase.
fn assert_msg(msg: &str, file: &str, phrases: &[&str]) {
    assert!(msg.contains(file), "message does not name {file}: {msg}");
    for ph in phrases {
        assert!(msg.contains(ph), "message lacks '{ph}': {msg}");
    }
}

fn t(name: &str, shape: &[usize], values: Vec<f32>) -> (String, Vec<usize>, Vec<f32>) {
    (name.to_string(), shape.to_vec(), values)
}

fn bert_config() -> serde_json::Value {
    json!({
        "model_type": "bert",
        "vocab_size": 100,
        "hidden_size": 8,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 16,
        "hidden_act": "gelu",
        "max_position_embeddings": 32,
        "type_vocab_size": 2,
        "layer_norm_eps": 1e-12,
        "hidden_dropout_prob": 0.1,
        "attention_probs_dropout_prob": 0.1
    })
}

// ---- safetensors -------------------------------------------------------------

#[test]
fn round_trip_values_shapes_metadata() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("w.safetensors");
    let mut meta = BTreeMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    meta.insert("base".to_string(), "abc".to_string());
    let a: Vec<f32> = (0..6).map(|i| i as f32 * 0.5 - 1.0).collect();
    let tensors = vec![
        t("a.weight", &[2, 3], a.clone()),
        t("b.bias", &[3], vec![1.0, f32::MIN_POSITIVE, -7.25]),
        t("scalar", &[], vec![42.0]),
        t("empty", &[0, 4], vec![]),
    ];
    write_safetensors(&p, &tensors, &meta).unwrap();
    // No temporary file is left behind.
    let files: Vec<_> = fs::read_dir(d.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(files.len(), 1, "{files:?}");

    let s = WeightStore::open_file(&p).unwrap();
    assert_eq!(s.names(), vec!["a.weight", "b.bias", "empty", "scalar"]);
    assert_eq!(s.metadata(), &meta);
    let ta = s.get("a.weight").unwrap();
    assert_eq!(ta.shape, vec![2, 3]);
    assert_eq!(ta.dtype, DType::F32);
    assert_eq!(ta.to_f32_vec(), a);
    // Zero-copy view straight into the memory map.
    assert_eq!(ta.as_f32_slice().unwrap(), &a[..]);
    assert_eq!(
        s.get("b.bias").unwrap().to_f32_vec(),
        vec![1.0, f32::MIN_POSITIVE, -7.25]
    );
    assert_eq!(s.get("scalar").unwrap().to_f32_vec(), vec![42.0]);
    assert_eq!(s.get("empty").unwrap().numel(), 0);

    // Overwriting replaces the file.
    write_safetensors(&p, &[t("x", &[1], vec![3.0])], &BTreeMap::new()).unwrap();
    let s2 = WeightStore::open_file(&p).unwrap();
    assert_eq!(s2.names(), vec!["x"]);
    assert!(s2.metadata().is_empty());
    // The earlier store still reads its (unlinked) map.
    assert_eq!(s.get("a.weight").unwrap().to_f32_vec(), a);
}

#[test]
fn write_rejects_bad_input_without_leaving_a_file() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("bad.safetensors");
    let e = err_of(write_safetensors(
        &p,
        &[t("x", &[2, 2], vec![1.0; 3])],
        &BTreeMap::new(),
    ));
    assert_msg(&e, "bad.safetensors", &["'x'", "shape"]);
    let e = err_of(write_safetensors(
        &p,
        &[t("x", &[1], vec![1.0]), t("x", &[1], vec![2.0])],
        &BTreeMap::new(),
    ));
    assert_msg(&e, "bad.safetensors", &["duplicate"]);
    assert_eq!(fs::read_dir(d.path()).unwrap().count(), 0);
    // A directory that does not exist: an error, nothing written.
    let e = err_of(write_safetensors(
        &d.path().join("nope/out.safetensors"),
        &[t("x", &[1], vec![1.0])],
        &BTreeMap::new(),
    ));
    assert!(e.contains("out.safetensors"), "{e}");
}

#[test]
fn f16_and_bf16_tensors() {
    let d = tempfile::tempdir().unwrap();
    let vals = [1.0f32, -2.5, 0.125, 65504.0];
    let mut data = Vec::new();
    for v in vals {
        data.extend_from_slice(&half::f16::from_f32(v).to_le_bytes());
    }
    for v in vals {
        data.extend_from_slice(&half::bf16::from_f32(v).to_le_bytes());
    }
    let h = r#"{"h":{"dtype":"F16","shape":[2,2],"data_offsets":[0,8]},"b":{"dtype":"BF16","shape":[4],"data_offsets":[8,16]}}"#;
    let p = raw(d.path(), "half.safetensors", h, &data);
    let s = WeightStore::open_file(&p).unwrap();
    let th = s.get("h").unwrap();
    assert_eq!(th.dtype, DType::F16);
    assert_eq!(th.shape, vec![2, 2]);
    assert_eq!(th.to_f32_vec(), vals.to_vec());
    assert!(th.as_f32_slice().is_none());
    let tb = s.get("b").unwrap();
    assert_eq!(tb.dtype, DType::BF16);
    // 65504 is not exact in bf16.
    let expect: Vec<f32> = vals
        .iter()
        .map(|&v| half::bf16::from_f32(v).to_f32())
        .collect();
    assert_eq!(tb.to_f32_vec(), expect);
    assert_eq!(&tb.to_f32_vec()[..3], &vals[..3]);
}

#[test]
fn unsupported_dtype_is_skipped_and_an_error_when_asked_for() {
    // BERT checkpoints often carry an I64 `position_ids` buffer.
    let d = tempfile::tempdir().unwrap();
    let mut data = Vec::new();
    for i in 0..4i64 {
        data.extend_from_slice(&i.to_le_bytes());
    }
    data.extend_from_slice(&1.5f32.to_le_bytes());
    let h = r#"{"embeddings.position_ids":{"dtype":"I64","shape":[1,4],"data_offsets":[0,32]},"w":{"dtype":"F32","shape":[1],"data_offsets":[32,36]}}"#;
    let p = raw(d.path(), "ints.safetensors", h, &data);
    let s = WeightStore::open_file(&p).unwrap();
    assert_eq!(s.names(), vec!["w"]);
    let e = err_of(s.get("embeddings.position_ids"));
    assert_msg(
        &e,
        "ints.safetensors",
        &["embeddings.position_ids", "I64", "supported"],
    );

    // An unknown dtype string is malformed.
    let h = r#"{"w":{"dtype":"F33","shape":[1],"data_offsets":[0,4]}}"#;
    let p = raw(d.path(), "f33.safetensors", h, &[0; 4]);
    let e = err_of(WeightStore::open_file(&p));
    assert_msg(&e, "f33.safetensors", &["'w'", "F33", "dtype"]);
}

#[test]
fn malformed_files_are_errors_naming_the_file() {
    let d = tempfile::tempdir().unwrap();
    let dp = d.path();
    let f32x2 = [0u8; 8];

    // Shorter than 8 bytes (and empty).
    fs::write(dp.join("short.safetensors"), [1, 2, 3]).unwrap();
    let e = err_of(WeightStore::open_file(&dp.join("short.safetensors")));
    assert_msg(&e, "short.safetensors", &["shorter than"]);
    fs::write(dp.join("empty.safetensors"), []).unwrap();
    let e = err_of(WeightStore::open_file(&dp.join("empty.safetensors")));
    assert_msg(&e, "empty.safetensors", &["shorter than"]);

    // Header length larger than the file.
    let mut b = 1000u64.to_le_bytes().to_vec();
    b.extend_from_slice(b"{}");
    fs::write(dp.join("hlen.safetensors"), &b).unwrap();
    let e = err_of(WeightStore::open_file(&dp.join("hlen.safetensors")));
    assert_msg(
        &e,
        "hlen.safetensors",
        &["header length", "larger than the file"],
    );

    // Header length absurd (no allocation of it).
    let mut b = u64::MAX.to_le_bytes().to_vec();
    b.extend_from_slice(b"{}");
    fs::write(dp.join("huge.safetensors"), &b).unwrap();
    let e = err_of(WeightStore::open_file(&dp.join("huge.safetensors")));
    assert_msg(&e, "huge.safetensors", &["header length", "limit"]);

    // Header not JSON.
    let p = raw(dp, "notjson.safetensors", "{not json", &[]);
    assert_msg(
        &err_of(WeightStore::open_file(&p)),
        "notjson.safetensors",
        &["not valid JSON"],
    );
    let p = raw(dp, "array.safetensors", "[1,2]", &[]);
    assert_msg(
        &err_of(WeightStore::open_file(&p)),
        "array.safetensors",
        &["not a JSON object"],
    );

    // begin after end.
    let h = r#"{"a":{"dtype":"F32","shape":[0],"data_offsets":[8,4]}}"#;
    let p = raw(dp, "order.safetensors", h, &f32x2);
    assert_msg(
        &err_of(WeightStore::open_file(&p)),
        "order.safetensors",
        &["'a'", "out of order"],
    );

    // Overlapping tensors.
    let h = r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#;
    let p = raw(dp, "overlap.safetensors", h, &f32x2);
    assert_msg(
        &err_of(WeightStore::open_file(&p)),
        "overlap.safetensors",
        &["'a'", "'b'", "overlap"],
    );

    // Truncated file: offsets beyond the end.
    let h = r#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#;
    let p = raw(dp, "trunc.safetensors", h, &f32x2);
    assert_msg(
        &err_of(WeightStore::open_file(&p)),
        "trunc.safetensors",
        &["'a'", "beyond the end", "truncated"],
    );

    // Length disagrees with dtype × shape.
    let h = r#"{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#;
    let p = raw(dp, "len.safetensors", h, &f32x2);
    assert_msg(
        &err_of(WeightStore::open_file(&p)),
        "len.safetensors",
        &["'a'", "needs 12"],
    );

    // Shape whose element count overflows.
    let big = u64::MAX / 2;
    let h = format!(r#"{{"a":{{"dtype":"F32","shape":[{big},{big},4],"data_offsets":[0,8]}}}}"#);
    let p = raw(dp, "overflow.safetensors", &h, &f32x2);
    assert_msg(
        &err_of(WeightStore::open_file(&p)),
        "overflow.safetensors",
        &["'a'", "overflows"],
    );
    let h = format!(
        r#"{{"a":{{"dtype":"F32","shape":[{}],"data_offsets":[0,8]}}}}"#,
        u64::MAX / 2
    );
    let p = raw(dp, "overflow2.safetensors", &h, &f32x2);
    assert_msg(
        &err_of(WeightStore::open_file(&p)),
        "overflow2.safetensors",
        &["'a'", "overflows"],
    );

    // Negative / non-integer shape, missing offsets, non-string metadata.
    let h = r#"{"a":{"dtype":"F32","shape":[-1],"data_offsets":[0,8]}}"#;
    let p = raw(dp, "neg.safetensors", h, &f32x2);
    assert_msg(
        &err_of(WeightStore::open_file(&p)),
        "neg.safetensors",
        &["'a'", "shape"],
    );
    let h = r#"{"a":{"dtype":"F32","shape":[2]}}"#;
    let p = raw(dp, "nooff.safetensors", h, &f32x2);
    assert_msg(
        &err_of(WeightStore::open_file(&p)),
        "nooff.safetensors",
        &["'a'", "data_offsets"],
    );
    let h = r#"{"__metadata__":{"k":3}}"#;
    let p = raw(dp, "meta.safetensors", h, &[]);
    assert_msg(
        &err_of(WeightStore::open_file(&p)),
        "meta.safetensors",
        &["__metadata__", "'k'"],
    );

    // Missing file.
    let e = err_of(WeightStore::open_file(&dp.join("absent.safetensors")));
    assert!(e.contains("absent.safetensors"), "{e}");
}

#[test]
fn gaps_and_any_header_order_are_accepted() {
    // Offsets need not follow the header's key order, and padding between
    // tensors is tolerated.
    let d = tempfile::tempdir().unwrap();
    let mut data = Vec::new();
    data.extend_from_slice(&2.0f32.to_le_bytes());
    data.extend_from_slice(&[0; 4]);
    data.extend_from_slice(&1.0f32.to_le_bytes());
    let h = r#"{"z":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[8,12]}}"#;
    let p = raw(d.path(), "gap.safetensors", h, &data);
    let s = WeightStore::open_file(&p).unwrap();
    assert_eq!(s.get("a").unwrap().to_f32_vec(), vec![1.0]);
    assert_eq!(s.get("z").unwrap().to_f32_vec(), vec![2.0]);
}

#[test]
fn missing_tensor_and_shape_mismatch() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("m.safetensors");
    write_safetensors(
        &p,
        &[
            t(
                "encoder.layer.0.attention.self.value.bias",
                &[4],
                vec![0.0; 4],
            ),
            t(
                "encoder.layer.0.attention.self.query.bias",
                &[4],
                vec![0.0; 4],
            ),
        ],
        &BTreeMap::new(),
    )
    .unwrap();
    let s = WeightStore::open_file(&p).unwrap();
    let e = err_of(s.get("encoder.layer.0.attention.self.value.biass"));
    assert_msg(
        &e,
        "m.safetensors",
        &["tensor 'encoder.layer.0.attention.self.value.biass' not found"],
    );
    assert!(
        e.contains("'encoder.layer.0.attention.self.value.bias'"),
        "close names: {e}"
    );
    assert!(s.try_get("nothing").is_none());
    let e = err_of(s.get("nothing"));
    assert_msg(&e, "m.safetensors", &["tensor 'nothing' not found"]);

    assert!(s
        .get_shaped("encoder.layer.0.attention.self.value.bias", &[4])
        .is_ok());
    let e = err_of(s.get_shaped("encoder.layer.0.attention.self.value.bias", &[8]));
    assert_msg(
        &e,
        "m.safetensors",
        &[
            "encoder.layer.0.attention.self.value.bias",
            "[4]",
            "[8]",
            "config.json",
        ],
    );
}

#[test]
fn layernorm_gamma_beta_aliases() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("old.safetensors");
    write_safetensors(
        &p,
        &[
            t("bert.embeddings.LayerNorm.gamma", &[2], vec![1.0, 2.0]),
            t("bert.embeddings.LayerNorm.beta", &[2], vec![3.0, 4.0]),
            t("new.LayerNorm.weight", &[1], vec![5.0]),
            t("new.LayerNorm.bias", &[1], vec![6.0]),
        ],
        &BTreeMap::new(),
    )
    .unwrap();
    let s = WeightStore::open_file(&p).unwrap();
    assert_eq!(
        s.get("bert.embeddings.LayerNorm.weight")
            .unwrap()
            .to_f32_vec(),
        vec![1.0, 2.0]
    );
    assert_eq!(
        s.get("bert.embeddings.LayerNorm.bias")
            .unwrap()
            .to_f32_vec(),
        vec![3.0, 4.0]
    );
    assert_eq!(
        s.get("bert.embeddings.LayerNorm.gamma")
            .unwrap()
            .to_f32_vec(),
        vec![1.0, 2.0]
    );
    assert_eq!(
        s.get("new.LayerNorm.gamma").unwrap().to_f32_vec(),
        vec![5.0]
    );
    assert_eq!(s.get("new.LayerNorm.beta").unwrap().to_f32_vec(), vec![6.0]);
    assert!(s
        .get_shaped("bert.embeddings.LayerNorm.weight", &[2])
        .is_ok());
    assert_eq!(
        s.find_prefix("embeddings.LayerNorm.weight", &["", "roberta.", "bert."])
            .as_deref(),
        Some("bert.")
    );
    assert_eq!(
        s.find_prefix("new.LayerNorm.bias", &["x.", ""]).as_deref(),
        Some("")
    );
    assert_eq!(s.find_prefix("absent", &["", "bert."]), None);
}

#[test]
fn directory_single_file_and_sharded() {
    let single = tempfile::tempdir().unwrap();
    let tensors = vec![
        t("a", &[2], vec![1.0, 2.0]),
        t("b", &[3], vec![3.0, 4.0, 5.0]),
        t("c", &[1], vec![6.0]),
    ];
    let mut meta = BTreeMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    write_safetensors(&single.path().join("model.safetensors"), &tensors, &meta).unwrap();
    let s1 = WeightStore::open_dir(single.path()).unwrap();

    let sharded = tempfile::tempdir().unwrap();
    let sp = sharded.path();
    write_safetensors(
        &sp.join("model-00001-of-00002.safetensors"),
        &tensors[..2],
        &meta,
    )
    .unwrap();
    write_safetensors(
        &sp.join("model-00002-of-00002.safetensors"),
        &tensors[2..],
        &BTreeMap::new(),
    )
    .unwrap();
    let index = json!({
        "metadata": {"total_size": 24},
        "weight_map": {
            "a": "model-00001-of-00002.safetensors",
            "b": "model-00001-of-00002.safetensors",
            "c": "model-00002-of-00002.safetensors"
        }
    });
    fs::write(sp.join("model.safetensors.index.json"), index.to_string()).unwrap();
    let s2 = WeightStore::open_dir(sp).unwrap();
    assert_eq!(s2.names(), vec!["a", "b", "c"]);
    assert_eq!(s2.get("c").unwrap().to_f32_vec(), vec![6.0]);
    assert!(s2
        .get("c")
        .unwrap()
        .file
        .ends_with("model-00002-of-00002.safetensors"));
    assert_eq!(s2.get("b").unwrap().to_f32_vec(), vec![3.0, 4.0, 5.0]);
    assert_eq!(s2.metadata(), &meta);
    // The fingerprint does not depend on sharding, and is 16 hex digits.
    let fp = s1.fingerprint();
    assert_eq!(fp.len(), 16);
    assert!(fp.chars().all(|c| c.is_ascii_hexdigit()));
    assert_eq!(fp, s2.fingerprint());
    // Missing tensors name the directory.
    let e = err_of(s2.get("zz"));
    assert!(
        e.contains(&sp.display().to_string()) && e.contains("'zz' not found"),
        "{e}"
    );

    // A shard that the index names but that is missing.
    fs::remove_file(sp.join("model-00002-of-00002.safetensors")).unwrap();
    let e = err_of(WeightStore::open_dir(sp));
    assert_msg(
        &e,
        "model.safetensors.index.json",
        &["model-00002-of-00002.safetensors", "missing"],
    );

    // The index puts a tensor in a shard that lacks it.
    write_safetensors(
        &sp.join("model-00002-of-00002.safetensors"),
        &[t("d", &[1], vec![0.0])],
        &BTreeMap::new(),
    )
    .unwrap();
    let e = err_of(WeightStore::open_dir(sp));
    assert_msg(
        &e,
        "model.safetensors.index.json",
        &["'c'", "does not contain"],
    );

    // A shard path that leaves the directory.
    let bad = json!({"weight_map": {"a": "../x.safetensors"}});
    fs::write(sp.join("model.safetensors.index.json"), bad.to_string()).unwrap();
    let e = err_of(WeightStore::open_dir(sp));
    assert_msg(
        &e,
        "model.safetensors.index.json",
        &["../x.safetensors", "plain file name"],
    );
    // Index not JSON.
    fs::write(sp.join("model.safetensors.index.json"), "{").unwrap();
    let e = err_of(WeightStore::open_dir(sp));
    assert_msg(&e, "model.safetensors.index.json", &["not valid JSON"]);
}

#[test]
fn fingerprint_tells_models_apart() {
    let d = tempfile::tempdir().unwrap();
    let p1 = d.path().join("1.safetensors");
    let p2 = d.path().join("2.safetensors");
    let big: Vec<f32> = (0..1000).map(|i| i as f32).collect();
    let mut big2 = big.clone();
    big2[999] = -1.0; // in the last 64 bytes
    write_safetensors(&p1, &[t("w", &[1000], big.clone())], &BTreeMap::new()).unwrap();
    write_safetensors(&p2, &[t("w", &[1000], big2)], &BTreeMap::new()).unwrap();
    let f1 = WeightStore::open_file(&p1).unwrap().fingerprint();
    let f2 = WeightStore::open_file(&p2).unwrap().fingerprint();
    assert_ne!(f1, f2);
    write_safetensors(&p2, &[t("w", &[10, 100], big)], &BTreeMap::new()).unwrap();
    assert_ne!(f1, WeightStore::open_file(&p2).unwrap().fingerprint());
}

#[test]
fn pickle_only_and_empty_directories() {
    let d = tempfile::tempdir().unwrap();
    fs::write(d.path().join("pytorch_model.bin"), b"\x80\x02not really").unwrap();
    let e = err_of(WeightStore::open_dir(d.path()));
    assert!(e.contains(&d.path().display().to_string()), "{e}");
    assert!(
        e.contains("safetensors") && e.contains("pickle") && e.contains("pytorch_model.bin"),
        "{e}"
    );
    assert!(e.contains("safe_serialization=True"), "{e}");

    let d = tempfile::tempdir().unwrap();
    fs::write(d.path().join("model.pt"), b"x").unwrap();
    let e = err_of(WeightStore::open_dir(d.path()));
    assert!(e.contains("pickle") && e.contains("model.pt"), "{e}");

    let d = tempfile::tempdir().unwrap();
    let e = err_of(WeightStore::open_dir(d.path()));
    assert!(
        e.contains(&d.path().display().to_string()) && e.contains("no model weights"),
        "{e}"
    );
    let e = err_of(WeightStore::open_dir(&d.path().join("nope")));
    assert!(e.contains("nope") && e.contains("no such directory"), "{e}");
}

// ---- config ------------------------------------------------------------------

#[test]
fn config_parses_and_defaults() {
    let p = Path::new("/x/config.json");
    let c = ModelConfig::from_json(&bert_config(), p).unwrap();
    assert_eq!(c.arch, Arch::Bert);
    assert_eq!(
        (c.vocab_size, c.hidden_size, c.num_layers, c.num_heads),
        (100, 8, 2, 2)
    );
    assert_eq!(c.intermediate_size, 16);
    assert_eq!(c.head_dim(), 4);
    assert_eq!(c.hidden_act, Act::Gelu);
    assert_eq!(c.num_labels, None);
    assert_eq!(c.classifier_dropout, None);
    assert_eq!(c.model_type, "bert");

    // Only the required keys: BertConfig defaults.
    let mut v = json!({
        "model_type": "bert", "vocab_size": 100, "hidden_size": 8,
        "num_hidden_layers": 1, "num_attention_heads": 4, "intermediate_size": 32
    });
    let c = ModelConfig::from_json(&v, p).unwrap();
    assert_eq!(c.layer_norm_eps, 1e-12);
    assert_eq!(c.hidden_dropout, 0.1);
    assert_eq!(c.attention_dropout, 0.1);
    assert_eq!(c.type_vocab_size, 2);
    assert_eq!(c.max_position_embeddings, 512);
    assert_eq!(c.pad_token_id, 0);
    assert_eq!(c.hidden_act, Act::Gelu);
    v["model_type"] = json!("roberta");
    let c = ModelConfig::from_json(&v, p).unwrap();
    assert_eq!((c.arch, c.pad_token_id), (Arch::Roberta, 1));
    v["model_type"] = json!("xlm-roberta");
    assert_eq!(ModelConfig::from_json(&v, p).unwrap().arch, Arch::Roberta);
    v["model_type"] = json!("camembert");
    assert_eq!(ModelConfig::from_json(&v, p).unwrap().arch, Arch::Roberta);

    // Activations, labels, classifier dropout, null as absent.
    let mut v = bert_config();
    for (name, act) in [
        ("gelu_new", Act::GeluTanh),
        ("gelu_pytorch_tanh", Act::GeluTanh),
        ("gelu_fast", Act::GeluTanh),
        ("relu", Act::Relu),
        ("silu", Act::Silu),
        ("swish", Act::Silu),
    ] {
        v["hidden_act"] = json!(name);
        assert_eq!(ModelConfig::from_json(&v, p).unwrap().hidden_act, act);
    }
    v["id2label"] = json!({"0": "neg", "1": "neu", "2": "pos"});
    v["classifier_dropout"] = json!(0.2);
    v["pad_token_id"] = serde_json::Value::Null;
    let c = ModelConfig::from_json(&v, p).unwrap();
    assert_eq!(c.num_labels, Some(3));
    assert_eq!(c.classifier_dropout, Some(0.2));
    assert_eq!(c.pad_token_id, 0);
    v["num_labels"] = json!(5);
    v["classifier_dropout"] = serde_json::Value::Null;
    let c = ModelConfig::from_json(&v, p).unwrap();
    assert_eq!(c.num_labels, Some(5));
    assert_eq!(c.classifier_dropout, None);
}

#[test]
fn config_errors() {
    let p = Path::new("/somewhere/config.json");
    let check = |v: serde_json::Value, phrases: &[&str]| {
        let e = err_of(ModelConfig::from_json(&v, p));
        assert_msg(&e, "config.json", phrases);
    };
    let with = |k: &str, val: serde_json::Value| {
        let mut v = bert_config();
        v[k] = val;
        v
    };
    check(
        with("model_type", json!("gpt-neo")),
        &["unknown model_type 'gpt-neo'", "supported: bert, roberta"],
    );
    let mut v = bert_config();
    v.as_object_mut().unwrap().remove("model_type");
    check(v, &["model_type", "missing"]);
    check(
        with("num_attention_heads", json!(3)),
        &["hidden_size 8", "num_attention_heads 3", "divisible"],
    );
    for key in [
        "vocab_size",
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "intermediate_size",
    ] {
        let mut v = bert_config();
        v.as_object_mut().unwrap().remove(key);
        check(v, &[key, "missing"]);
    }
    check(
        with("hidden_size", json!(0)),
        &["hidden_size", "out of range"],
    );
    check(
        with("num_hidden_layers", json!(20_000)),
        &["num_hidden_layers", "out of range"],
    );
    check(
        with("vocab_size", json!(-5)),
        &["vocab_size", "non-negative integer"],
    );
    check(with("hidden_size", json!("big")), &["hidden_size"]);
    check(with("hidden_act", json!("mish")), &["hidden_act", "'mish'"]);
    check(with("layer_norm_eps", json!(0.0)), &["layer_norm_eps"]);
    check(
        with("hidden_dropout_prob", json!(1.5)),
        &["hidden_dropout_prob"],
    );
    check(
        with("pad_token_id", json!(100)),
        &["pad_token_id", "vocab_size"],
    );
    check(json!([1, 2]), &["not a JSON object"]);
}

// ---- model directories --------------------------------------------------------

fn tiny_model_dir(dir: &Path, config: &serde_json::Value) {
    fs::write(dir.join("config.json"), config.to_string()).unwrap();
    write_safetensors(
        &dir.join("model.safetensors"),
        &[t(
            "embeddings.word_embeddings.weight",
            &[100, 8],
            vec![0.0; 800],
        )],
        &BTreeMap::new(),
    )
    .unwrap();
}

#[test]
fn model_dir_open_and_pooling() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("tiny-bert");
    fs::create_dir(&dir).unwrap();
    tiny_model_dir(&dir, &bert_config());
    let m = ModelDir::open(&dir).unwrap();
    assert_eq!(m.name, "tiny-bert");
    assert_eq!(m.config.hidden_size, 8);
    assert!(m.tokenizer.is_none());
    assert_eq!(m.default_pooling, None);
    assert!(m
        .weights
        .get_shaped("embeddings.word_embeddings.weight", &[100, 8])
        .is_ok());

    // Tokenizer, _name_or_path and sentence-transformers mean pooling.
    fs::write(dir.join("tokenizer.json"), "{}").unwrap();
    fs::create_dir(dir.join("1_Pooling")).unwrap();
    let pool = |cls: bool, mean: bool| {
        json!({"word_embedding_dimension": 8, "pooling_mode_cls_token": cls,
               "pooling_mode_mean_tokens": mean, "pooling_mode_max_tokens": false,
               "pooling_mode_mean_sqrt_len_tokens": false})
        .to_string()
    };
    fs::write(dir.join("1_Pooling/config.json"), pool(false, true)).unwrap();
    let mut cfg = bert_config();
    cfg["_name_or_path"] = json!("org/tiny");
    fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    let m = ModelDir::open(&dir).unwrap();
    assert_eq!(
        m.name,
        dir.file_name().unwrap().to_string_lossy(),
        "the directory names the model, not _name_or_path"
    );
    assert_eq!(
        m.tokenizer.as_deref(),
        Some(dir.join("tokenizer.json").as_path())
    );
    assert_eq!(m.default_pooling, Some(PoolKind::Mean));

    fs::write(dir.join("1_Pooling/config.json"), pool(true, false)).unwrap();
    assert_eq!(
        ModelDir::open(&dir).unwrap().default_pooling,
        Some(PoolKind::Cls)
    );
    // Several modes at once (concatenation) is not one of ours.
    fs::write(dir.join("1_Pooling/config.json"), pool(true, true)).unwrap();
    assert_eq!(ModelDir::open(&dir).unwrap().default_pooling, None);

    // modules.json may put the pooling module elsewhere.
    fs::create_dir(dir.join("2_Pool")).unwrap();
    fs::write(dir.join("2_Pool/config.json"), pool(false, true)).unwrap();
    let modules = json!([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "2_Pool", "type": "sentence_transformers.models.Pooling"}
    ]);
    fs::write(dir.join("modules.json"), modules.to_string()).unwrap();
    assert_eq!(
        ModelDir::open(&dir).unwrap().default_pooling,
        Some(PoolKind::Mean)
    );

    // A malformed pooling config is an error naming it.
    fs::write(dir.join("2_Pool/config.json"), "{").unwrap();
    let e = err_of(ModelDir::open(&dir));
    assert!(e.contains("2_Pool") && e.contains("config.json"), "{e}");
}

#[test]
fn model_dir_errors() {
    let d = tempfile::tempdir().unwrap();
    let e = err_of(ModelDir::open(&d.path().join("missing")));
    assert!(
        e.contains("missing") && e.contains("no such directory"),
        "{e}"
    );
    let f = d.path().join("file");
    fs::write(&f, "x").unwrap();
    let e = err_of(ModelDir::open(&f));
    assert!(e.contains("not a directory"), "{e}");
    let e = err_of(ModelDir::open(d.path()));
    assert!(e.contains("config.json"), "{e}");
    // Config fine, weights pickle-only.
    fs::write(d.path().join("config.json"), bert_config().to_string()).unwrap();
    fs::write(d.path().join("pytorch_model.bin"), "x").unwrap();
    let e = err_of(ModelDir::open(d.path()));
    assert!(e.contains("pickle") && e.contains("safetensors"), "{e}");
    // A config.json that is not JSON.
    fs::write(d.path().join("config.json"), "{,").unwrap();
    let e = err_of(ModelDir::open(d.path()));
    assert!(
        e.contains("config.json") && e.contains("not valid JSON"),
        "{e}"
    );
}

#[test]
fn real_all_minilm_l6_v2() {
    let candidates: Vec<PathBuf> = [
        std::env::var_os("BEFT_CACHE").map(|c| PathBuf::from(c).join("models/all-MiniLM-L6-v2")),
        std::env::var_os("HOME")
            .map(|h| PathBuf::from(h).join(".cache/beft/models/all-MiniLM-L6-v2")),
    ]
    .into_iter()
    .flatten()
    .collect();
    let Some(dir) = candidates.into_iter().find(|d| d.is_dir()) else {
        println!("skipped: no all-MiniLM-L6-v2 under $BEFT_CACHE/models or ~/.cache/beft/models");
        return;
    };
    let m = ModelDir::open(&dir).unwrap();
    assert_eq!(m.config.arch, Arch::Bert);
    assert_eq!(m.config.num_layers, 6);
    assert_eq!(m.config.hidden_size, 384);
    assert_eq!(m.config.head_dim(), 32);
    if dir.join("1_Pooling").is_dir() {
        assert_eq!(m.default_pooling, Some(PoolKind::Mean));
    }
    let prefix = m
        .weights
        .find_prefix("embeddings.word_embeddings.weight", &["", "bert."])
        .expect("word embeddings");
    let emb = m
        .weights
        .get_shaped(
            &format!("{prefix}embeddings.word_embeddings.weight"),
            &[m.config.vocab_size, m.config.hidden_size],
        )
        .unwrap();
    assert!(emb.to_f32_vec().iter().all(|x| x.is_finite()));
    assert_eq!(m.weights.fingerprint().len(), 16);
}
