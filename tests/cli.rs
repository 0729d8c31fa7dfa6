//! The `beft` binary end to end on tiny random models: a full run and its
//! files, reproducibility, `eval`, and every kind of bad input — each must
//! exit non-zero with a message naming the file and the problem, never
//! panic, and leave nothing in the run directory.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{write_tiny_model, write_tiny_sst2, TinyArch};
use tempfile::TempDir;

/// The CLI on this machine's own devices: without the CUDA emulator that
/// `BEFT_CUDA_EMU` may name (tests/cuda_ops.rs runs the CLI on it).
fn beft(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_beft"))
        .env_remove("BEFT_CUDA_EMU")
        .args(args)
        .arg("--threads")
        .arg("1")
        .output()
        .expect("run beft")
}

struct Setup {
    tmp: TempDir,
    model: PathBuf,
    data: PathBuf,
}

fn setup() -> Setup {
    let tmp = TempDir::new().unwrap();
    let model = tmp.path().join("model");
    let data = tmp.path().join("data");
    write_tiny_model(&model, TinyArch::Bert, 1, None);
    write_tiny_sst2(&data, 64, 32);
    Setup { tmp, model, data }
}

fn train_args(s: &Setup, out: &str, extra: &[&str]) -> Vec<String> {
    let defaults: Vec<(&str, String)> = vec![
        ("--model", s.model.display().to_string()),
        ("--task", "sst2".into()),
        ("--data", s.data.display().to_string()),
        ("--out", s.tmp.path().join(out).display().to_string()),
        ("--epochs", "2".into()),
        ("--batch", "8".into()),
        ("--lr", "1e-2".into()),
    ];
    let mut v: Vec<String> = vec!["train".into(), "--quiet".into()];
    for (flag, value) in defaults {
        if !extra.contains(&flag) {
            v.push(flag.into());
            v.push(value);
        }
    }
    v.extend(extra.iter().map(|x| x.to_string()));
    v
}

/// `beft eval --json` of a biases file on the setup's model and dev set
/// (`extra` flags override them), checked to succeed.
fn eval_json(s: &Setup, biases: &Path, extra: &[&str]) -> serde_json::Value {
    let (m, d) = (s.model.to_str().unwrap(), s.data.to_str().unwrap());
    let mut a = vec!["eval", "--biases", biases.to_str().unwrap(), "--json"];
    for (flag, value) in [("--model", m), ("--task", "sst2"), ("--data", d)] {
        if !extra.contains(&flag) {
            a.extend([flag, value]);
        }
    }
    a.extend(extra);
    let o = beft(&a);
    assert!(o.status.success(), "eval failed:\n{}", stderr(&o));
    serde_json::from_slice(&o.stdout).expect("one JSON object on stdout")
}

/// A tiny LLaMA GGUF with its own tokenizer (vocabulary: a, b, c, ab,
/// abc, 1, 2 and specials).
fn tiny_llama() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/fuzz/seeds/tiny_llama.gguf")
}

fn run(args: &[String]) -> Output {
    let a: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    beft(&a)
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

/// `o` failed, and its stderr says each of `phrases`.
fn assert_fails_saying(o: &Output, phrases: &[&str]) {
    assert!(!o.status.success(), "expected failure:\n{}", stderr(o));
    for p in phrases {
        assert!(stderr(o).contains(p), "should say '{p}':\n{}", stderr(o));
    }
}

/// A bad input: non-zero exit, no panic, the message names `file` and
/// contains `phrase`, and no run directory (nor staging directory) is left.
fn assert_clean_failure(s: &Setup, o: &Output, file: &str, phrase: &str) {
    let err = stderr(o);
    assert!(
        !o.status.success(),
        "expected failure, got success; stderr:\n{err}"
    );
    assert!(!err.contains("panicked"), "panicked:\n{err}");
    assert!(err.contains(file), "message should name {file}:\n{err}");
    assert!(
        err.to_lowercase().contains(&phrase.to_lowercase()),
        "message should say '{phrase}':\n{err}"
    );
    assert!(
        !s.tmp.path().join("out").exists(),
        "run directory must not exist after a failure"
    );
    let leftovers: Vec<_> = fs::read_dir(s.tmp.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains("partial"))
        .collect();
    assert!(leftovers.is_empty(), "staging directory left behind");
}

#[test]
fn train_writes_a_complete_run_and_eval_agrees() {
    let s = setup();
    let o = run(&train_args(&s, "out", &["--bias", "v,q"]));
    assert!(o.status.success(), "train failed:\n{}", stderr(&o));
    let out = s.tmp.path().join("out");
    for f in [
        "metrics.jsonl",
        "biases.safetensors",
        "summary.json",
        "steps.jsonl",
        "config.json",
    ] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    let summary: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    for key in [
        "task",
        "bias",
        "trainable_params",
        "final_dev_metric",
        "best_dev_metric",
        "metric_name",
        "train_tokens_per_s",
        "step_seconds_median",
        "peak_rss_bytes",
    ] {
        assert!(summary.get(key).is_some(), "summary.json lacks {key}");
    }
    assert_eq!(summary["task"], "sst2");
    assert_eq!(summary["bias"], "q,v");
    // 2 layers × (q + v) × 8 + pooler bias 8 + head 2×8 + 2.
    assert_eq!(summary["trainable_params"], 2 * 2 * 8 + 8 + 16 + 2);
    assert!(summary["train_tokens_per_s"].as_f64().unwrap() > 0.0);
    assert!(summary["peak_rss_bytes"].as_u64().unwrap() > 0);
    // One metrics line per evaluation: before training and after each epoch.
    let lines = fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    assert_eq!(lines.lines().count(), 3);
    // The biases file holds only the trained vectors and its metadata.
    let bytes = fs::read(out.join("biases.safetensors")).unwrap();
    assert!(bytes.len() < 4096, "biases file is {} bytes", bytes.len());
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert!(st
        .names()
        .iter()
        .any(|n| n.ends_with("attention.self.value.bias")));
    assert!(!st
        .names()
        .iter()
        .any(|n| n.ends_with(".weight") && !n.starts_with("classifier")));
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let meta = meta.metadata().clone().unwrap();
    assert_eq!(meta["bias_terms"], "q,v");
    assert!(meta.contains_key("base_model_fingerprint"));

    // eval --json on the same dev set reproduces the final metric.
    let r = eval_json(&s, &out.join("biases.safetensors"), &[]);
    assert_eq!(r["metric_name"], "accuracy");
    assert_eq!(r["examples"], 32);
    assert_eq!(r["metric"].as_f64(), summary["final_dev_metric"].as_f64());

    // A finished run is not overwritten by accident.
    let o = run(&train_args(&s, "out", &[]));
    assert!(!o.status.success() && stderr(&o).contains("already holds a finished run"));
}

/// Settings under which the tiny model learns the good/bad task.
const LEARNS: &[&str] = &[
    "--bias",
    "all",
    "--epochs",
    "10",
    "--lr",
    "1e-2",
    "--pooling",
    "mean",
];

#[test]
fn training_learns_a_trivial_task_and_is_reproducible() {
    let s = setup();
    let a = run(&train_args(&s, "a", LEARNS));
    assert!(a.status.success(), "{}", stderr(&a));
    let b = run(&train_args(&s, "b", LEARNS));
    assert!(b.status.success());
    let fa = fs::read(s.tmp.path().join("a/biases.safetensors")).unwrap();
    let fb = fs::read(s.tmp.path().join("b/biases.safetensors")).unwrap();
    assert_eq!(fa, fb, "same seed, same machine: bit-identical biases");
    let summary: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(s.tmp.path().join("a/summary.json")).unwrap())
            .unwrap();
    assert!(
        summary["best_dev_metric"].as_f64().unwrap() >= 0.9,
        "good/bad task not learned: {summary}"
    );
    let c = run(&train_args(&s, "c", &[LEARNS, &["--seed", "1"]].concat()));
    assert!(c.status.success());
    assert_ne!(
        fa,
        fs::read(s.tmp.path().join("c/biases.safetensors")).unwrap(),
        "another seed, another run"
    );
}

/// `--group-by-length`: same examples per epoch in other batches (so other
/// biases), reproducible, and the task is still learned.
#[test]
fn grouping_by_length_learns_and_is_reproducible() {
    let s = setup();
    let with = |out: &str, grouped: bool| {
        let mut extra = LEARNS.to_vec();
        if grouped {
            extra.push("--group-by-length");
        }
        let o = run(&train_args(&s, out, &extra));
        assert!(o.status.success(), "{}", stderr(&o));
        let dir = s.tmp.path().join(out);
        let steps: Vec<serde_json::Value> = fs::read_to_string(dir.join("steps.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        // Real tokens per epoch, and the tokens of each step.
        let mut per_epoch = std::collections::BTreeMap::new();
        for st in &steps {
            *per_epoch.entry(st["epoch"].as_u64().unwrap()).or_insert(0) +=
                st["tokens"].as_u64().unwrap();
        }
        let tokens: Vec<u64> = steps
            .iter()
            .map(|st| st["tokens"].as_u64().unwrap())
            .collect();
        let summary: serde_json::Value =
            serde_json::from_str(&fs::read_to_string(dir.join("summary.json")).unwrap()).unwrap();
        (
            fs::read(dir.join("biases.safetensors")).unwrap(),
            per_epoch,
            tokens,
            summary,
        )
    };
    let (plain, plain_epochs, plain_tokens, plain_summary) = with("plain", false);
    let (g1, g1_epochs, g1_tokens, summary) = with("g1", true);
    let (g2, ..) = with("g2", true);
    assert_eq!(g1, g2, "same seed, same machine: bit-identical biases");
    assert_ne!(g1, plain, "grouped batches are other batches");
    assert_ne!(g1_tokens, plain_tokens, "grouped batches are other batches");
    assert_eq!(g1_tokens.len(), plain_tokens.len(), "same steps per epoch");
    assert_eq!(g1_epochs, plain_epochs, "every example once per epoch");
    assert!(
        summary["best_dev_metric"].as_f64().unwrap() >= 0.9,
        "good/bad task not learned with grouped batches: {summary}"
    );
    // The summary reports the padding share, and grouping lowers it.
    let pad = |s: &serde_json::Value| s["train_padding"].as_f64().unwrap();
    assert!(
        (0.0..1.0).contains(&pad(&summary)) && pad(&summary) < pad(&plain_summary),
        "padding grouped {} vs plain {}",
        pad(&summary),
        pad(&plain_summary)
    );
    let config: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(s.tmp.path().join("g1/config.json")).unwrap())
            .unwrap();
    assert_eq!(config["group_by_length"], true);
}

/// `beft predict`: one line per text, in input order, agreeing with the
/// dev accuracy of the run; JSON lines; stdin; clear errors.
#[test]
fn predict_classifies_texts_like_eval() {
    let s = setup();
    let o = run(&train_args(&s, "run", LEARNS));
    assert!(o.status.success(), "{}", stderr(&o));
    let biases = s.tmp.path().join("run/biases.safetensors");
    let summary: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(s.tmp.path().join("run/summary.json")).unwrap())
            .unwrap();
    let dev = fs::read_to_string(s.data.join("dev.tsv")).unwrap();
    let rows: Vec<(&str, &str)> = dev
        .lines()
        .skip(1)
        .map(|l| l.split_once('\t').unwrap())
        .collect();
    let input = s.tmp.path().join("texts.txt");
    let texts: Vec<&str> = rows.iter().map(|r| r.0).collect();
    fs::write(&input, texts.join("\n") + "\n").unwrap();
    let (m, b, i) = (
        s.model.to_str().unwrap(),
        biases.to_str().unwrap(),
        input.to_str().unwrap(),
    );
    let o = beft(&["predict", "--model", m, "--biases", b, "--input", i]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = String::from_utf8(o.stdout).unwrap();
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), rows.len());
    let mut correct = 0;
    for (line, (text, label)) in lines.iter().zip(&rows) {
        let f: Vec<&str> = line.splitn(3, '\t').collect();
        assert_eq!(f[2], *text, "results stay in input order");
        let p: f64 = f[1].parse().unwrap();
        assert!((0.5..=1.0).contains(&p), "{line}");
        correct += (f[0] == *label) as usize;
    }
    let acc = correct as f64 / rows.len() as f64;
    assert_eq!(
        acc,
        summary["final_dev_metric"].as_f64().unwrap(),
        "predict disagrees with the run's dev accuracy"
    );

    // JSON lines, texts from --text.
    let o = beft(&[
        "predict", "--model", m, "--biases", b, "--json", "--text", texts[0], "--text", texts[1],
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let js: Vec<serde_json::Value> = String::from_utf8(o.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(js.len(), 2);
    for (j, line) in js.iter().zip(&lines) {
        let probs: Vec<f64> = j["probabilities"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        assert!((probs.iter().sum::<f64>() - 1.0).abs() < 1e-5);
        assert_eq!(
            j["label"].as_str().unwrap(),
            line.split('\t').next().unwrap()
        );
    }

    // stdin.
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_beft"))
        .args(["predict", "--model", m, "--biases", b])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(format!("{}\n{}\n", texts[0], texts[1]).as_bytes())
        .unwrap();
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success());
    assert_eq!(
        String::from_utf8(o.stdout)
            .unwrap()
            .lines()
            .collect::<Vec<_>>(),
        lines[..2]
    );

    // --bf16: BEFT_CPU_GEMM=bf16's predictions, not the f32 ones.
    let o = beft(&[
        "predict", "--model", m, "--biases", b, "--input", i, "--bf16",
    ]);
    if beft::backend::fast::gemm16::available() {
        assert!(o.status.success(), "{}", stderr(&o));
        let env = Command::new(env!("CARGO_BIN_EXE_beft"))
            .args(["predict", "--model", m, "--biases", b, "--input", i])
            .args(["--threads", "1"])
            .env("BEFT_CPU_GEMM", "bf16")
            .output()
            .expect("run beft");
        assert_eq!(o.stdout, env.stdout);
        assert_ne!(String::from_utf8(o.stdout).unwrap(), out);
    } else {
        assert_fails_saying(&o, &["AVX-512 BF16"]);
    }

    // Errors name the file, exit non-zero, print nothing on stdout.
    let missing = s.tmp.path().join("missing.txt");
    let empty = s.tmp.path().join("empty.txt");
    fs::write(&empty, "").unwrap();
    for (args, phrase) in [
        (vec!["--input", missing.to_str().unwrap()], "missing.txt"),
        (
            vec!["--input", empty.to_str().unwrap()],
            "no texts to classify",
        ),
        (
            vec!["--input", i, "--text", "x"],
            "either --text or --input",
        ),
    ] {
        let mut a = vec!["predict", "--model", m, "--biases", b];
        a.extend(args);
        let o = beft(&a);
        assert!(!o.status.success() && o.stdout.is_empty(), "{a:?}");
        assert!(stderr(&o).contains(phrase), "{a:?}: {}", stderr(&o));
    }
    let gguf = tiny_llama();
    let o = beft(&[
        "predict",
        "--model",
        gguf.to_str().unwrap(),
        "--biases",
        b,
        "--text",
        "x",
    ]);
    // A decoder with an encoder's biases file.
    assert_fails_saying(&o, &["is not a decoder's biases file"]);
}

#[test]
fn eval_without_biases_needs_a_saved_head() {
    let s = setup();
    let o = beft(&[
        "eval",
        "--model",
        s.model.to_str().unwrap(),
        "--task",
        "sst2",
        "--data",
        s.data.to_str().unwrap(),
    ]);
    assert_fails_saying(&o, &["no classification head"]);
    // With a saved head it evaluates.
    let with_head = s.tmp.path().join("with-head");
    write_tiny_model(&with_head, TinyArch::Bert, 1, Some(2));
    let o = beft(&[
        "eval",
        "--model",
        with_head.to_str().unwrap(),
        "--task",
        "sst2",
        "--data",
        s.data.to_str().unwrap(),
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn biases_of_another_model_are_refused() {
    let s = setup();
    assert!(run(&train_args(&s, "out", &["--epochs", "1"]))
        .status
        .success());
    let other = s.tmp.path().join("other");
    write_tiny_model(&other, TinyArch::Bert, 2, None);
    let biases = s.tmp.path().join("out/biases.safetensors");
    let o = beft(&[
        "eval",
        "--model",
        other.to_str().unwrap(),
        "--biases",
        biases.to_str().unwrap(),
        "--task",
        "sst2",
        "--data",
        s.data.to_str().unwrap(),
    ]);
    assert_fails_saying(&o, &["different base model", "biases.safetensors"]);
}

fn safetensors_header(path: &Path) -> (serde_json::Value, Vec<u8>) {
    let bytes = fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    (
        serde_json::from_slice(&bytes[8..8 + n]).unwrap(),
        bytes[8 + n..].to_vec(),
    )
}

fn write_with_header(path: &Path, header: &serde_json::Value, data: &[u8]) {
    let h = header.to_string().into_bytes();
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend(h);
    out.extend(data);
    fs::write(path, out).unwrap();
}

#[test]
fn truncated_safetensors_file() {
    let s = setup();
    let p = s.model.join("model.safetensors");
    let bytes = fs::read(&p).unwrap();
    fs::write(&p, &bytes[..bytes.len() - 100]).unwrap();
    assert_clean_failure(
        &s,
        &run(&train_args(&s, "out", &[])),
        "model.safetensors",
        "truncated",
    );
}

#[test]
fn header_offsets_outside_the_file() {
    let s = setup();
    let p = s.model.join("model.safetensors");
    let (mut h, data) = safetensors_header(&p);
    let name = h
        .as_object()
        .unwrap()
        .keys()
        .find(|k| *k != "__metadata__")
        .unwrap()
        .clone();
    let len = data.len() as u64;
    h[&name]["data_offsets"] = serde_json::json!([len - 4, len + 1_000_000]);
    write_with_header(&p, &h, &data);
    assert_clean_failure(
        &s,
        &run(&train_args(&s, "out", &[])),
        "model.safetensors",
        &name,
    );
}

#[test]
fn missing_tensor() {
    let s = setup();
    let p = s.model.join("model.safetensors");
    let (mut h, data) = safetensors_header(&p);
    h.as_object_mut()
        .unwrap()
        .remove("bert.encoder.layer.1.attention.self.value.weight");
    write_with_header(&p, &h, &data);
    assert_clean_failure(
        &s,
        &run(&train_args(&s, "out", &[])),
        "bert.encoder.layer.1.attention.self.value.weight",
        "not found",
    );
}

#[test]
fn tensor_shape_disagrees_with_config() {
    let s = setup();
    let p = s.model.join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(&p).unwrap()).unwrap();
    cfg["intermediate_size"] = serde_json::json!(16);
    fs::write(&p, cfg.to_string()).unwrap();
    assert_clean_failure(
        &s,
        &run(&train_args(&s, "out", &[])),
        "intermediate.dense",
        "config.json",
    );
}

#[test]
fn unknown_model_type() {
    let s = setup();
    let p = s.model.join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(&p).unwrap()).unwrap();
    cfg["model_type"] = serde_json::json!("t5");
    fs::write(&p, cfg.to_string()).unwrap();
    assert_clean_failure(
        &s,
        &run(&train_args(&s, "out", &[])),
        "config.json",
        "unknown model_type 't5'",
    );
}

#[test]
fn tokenizer_larger_than_the_model_vocabulary() {
    let s = setup();
    // A tokenizer from another model: more tokens than the embedding has rows.
    let p = s.model.join("tokenizer.json");
    let mut tok: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(&p).unwrap()).unwrap();
    let vocab = tok["model"]["vocab"].as_object_mut().unwrap();
    let n = vocab.len();
    for i in 0..5 {
        vocab.insert(format!("extra{i}"), serde_json::json!(n + i));
    }
    fs::write(&p, tok.to_string()).unwrap();
    assert_clean_failure(
        &s,
        &run(&train_args(&s, "out", &[])),
        "tokenizer.json",
        "tokenizer and model do not match",
    );
}

#[test]
fn pickle_only_model_directory() {
    let s = setup();
    fs::remove_file(s.model.join("model.safetensors")).unwrap();
    fs::write(s.model.join("pytorch_model.bin"), b"not really a pickle").unwrap();
    assert_clean_failure(
        &s,
        &run(&train_args(&s, "out", &[])),
        "model",
        "safetensors",
    );
}

#[test]
fn label_outside_the_label_set() {
    let s = setup();
    fs::write(
        s.data.join("dev.tsv"),
        "sentence\tlabel\ngood movie\t1\nbad movie\t2\n",
    )
    .unwrap();
    assert_clean_failure(&s, &run(&train_args(&s, "out", &[])), "dev.tsv:3", "label");
}

#[test]
fn empty_dataset() {
    let s = setup();
    fs::write(s.data.join("train.tsv"), "sentence\tlabel\n").unwrap();
    assert_clean_failure(&s, &run(&train_args(&s, "out", &[])), "train.tsv", "empty");
}

#[test]
fn malformed_tsv_row() {
    let s = setup();
    fs::write(
        s.data.join("train.tsv"),
        "sentence\tlabel\ngood movie\t1\nbad movie\t0\textra\n",
    )
    .unwrap();
    assert_clean_failure(
        &s,
        &run(&train_args(&s, "out", &[])),
        "train.tsv:3",
        "columns",
    );
}

#[test]
fn over_long_tsv_row() {
    let s = setup();
    let long = "good ".repeat(300_000);
    fs::write(
        s.data.join("train.tsv"),
        format!("sentence\tlabel\n{long}\t1\n"),
    )
    .unwrap();
    assert_clean_failure(&s, &run(&train_args(&s, "out", &[])), "train.tsv:2", "long");
}

#[test]
fn max_len_beyond_the_model_positions() {
    // Deliberate behaviour: inputs are truncated to the model's positions.
    let s = setup();
    let o = run(&train_args(
        &s,
        "out",
        &["--max-len", "100", "--epochs", "1"],
    ));
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("truncating inputs to 64 tokens"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn bad_flags_are_errors_not_panics() {
    let s = setup();
    assert_clean_failure(
        &s,
        &run(&train_args(&s, "out", &["--bias", "w"])),
        "--bias",
        "unknown bias term",
    );
    assert_clean_failure(
        &s,
        &run(&train_args(&s, "out", &["--pooling", "max"])),
        "--pooling",
        "unknown pooling",
    );
    assert_clean_failure(
        &s,
        &run(&train_args(&s, "out", &["--device", "cuda"])),
        "--device cuda",
        "cpu",
    );
    assert_clean_failure(
        &s,
        &run(&train_args(&s, "out", &["--task", "squad"])),
        "squad",
        "unknown task",
    );
}

/// `BEFT_CPU_GEMM`: a bad value is a clean error; `bf16` trains where the
/// CPU has AVX-512 BF16 (on AMX where it has that too, unless
/// `BEFT_CPU_AMX=0`) and is refused, by name, where it has not.
#[test]
fn cpu_gemm_setting_is_checked() {
    let s = setup();
    let with = |value: &str, out: &str| {
        Command::new(env!("CARGO_BIN_EXE_beft"))
            .args(train_args(&s, out, &[]))
            .args(["--threads", "1"])
            .env("BEFT_CPU_GEMM", value)
            .output()
            .expect("run beft")
    };
    assert_clean_failure(
        &s,
        &with("fp8", "out"),
        "BEFT_CPU_GEMM=fp8",
        "expected f32 or bf16",
    );
    let o = with("bf16", "bf16");
    if beft::backend::fast::gemm16::available() {
        assert!(o.status.success(), "{}", stderr(&o));
        assert!(s.tmp.path().join("bf16/summary.json").exists());
        // The run names its kernel: AMX where this CPU and OS offer it,
        // and not with BEFT_CPU_AMX=0.
        let said = |o: &Output| String::from_utf8_lossy(&o.stdout).to_string() + &stderr(o);
        let amx = beft::backend::fast::amx::available();
        assert_eq!(said(&o).contains("bf16 matmul on AMX"), amx, "{}", said(&o));
        let off = Command::new(env!("CARGO_BIN_EXE_beft"))
            .args(train_args(&s, "dot", &[]))
            .args(["--threads", "1"])
            .env("BEFT_CPU_GEMM", "bf16")
            .env("BEFT_CPU_AMX", "0")
            .output()
            .expect("run beft");
        assert!(off.status.success(), "{}", stderr(&off));
        assert!(said(&off).contains("bf16 matmul"), "{}", said(&off));
        assert!(!said(&off).contains("on AMX"), "{}", said(&off));
    } else {
        println!("this CPU has no AVX-512 BF16: checking the refusal instead");
        assert_fails_saying(&o, &["AVX-512 BF16"]);
    }
}

/// The per-step log of a finished run: (loss, gradient norm, tokens).
fn step_log(dir: &Path) -> Vec<(f64, f64, u64)> {
    fs::read_to_string(dir.join("steps.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (
                v["loss"].as_f64().unwrap(),
                v["grad_norm"].as_f64().unwrap(),
                v["tokens"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// `--grad-accum N`: the batch in N micro-batches (here 8 examples as
/// 3 + 3 + 2, so the parts differ in size, and with answers of different
/// lengths, so a token-level loss must weight them by target tokens) gives
/// the whole batch's loss and gradient at every step, for an encoder, a
/// decoder scoring candidates and a decoder trained on answers (teacher
/// forcing); without dropout, so that the steps see the same masks.
#[test]
fn gradient_accumulation_matches_the_whole_batch() {
    let s = setup();
    let gguf = tiny_llama();
    let squad = s.tmp.path().join("squad");
    fs::create_dir_all(&squad).unwrap();
    let qas: Vec<serde_json::Value> = (0..24)
        .map(|i| {
            let answer = ["good", "bad movie", "the world is good", "hello"][i % 4];
            serde_json::json!({"id": format!("q{i}"), "question": format!("what is {i}?"),
                "answers": [{"text": answer, "answer_start": 0}]})
        })
        .collect();
    let doc = serde_json::json!({"data": [{"title": "t", "paragraphs": [
        {"context": "the movie is good and the world is bad", "qas": qas}]}]});
    for f in ["train.json", "dev.json"] {
        fs::write(squad.join(f), doc.to_string()).unwrap();
    }
    let (m, g) = (s.model.to_str().unwrap(), gguf.to_str().unwrap());
    let (d, q) = (s.data.to_str().unwrap(), squad.to_str().unwrap());
    let cases: [(&str, &[&str]); 3] = [
        ("encoder", &["--model", m, "--data", d, "--pooling", "mean"]),
        ("candidates", &["--model", g, "--data", d]),
        (
            "answers",
            &[
                "--model",
                g,
                "--data",
                q,
                "--task",
                "squad",
                "--max-new-tokens",
                "4",
            ],
        ),
    ];
    for (name, extra) in cases {
        let with = |accum: &str| {
            let out = format!("{name}-{accum}");
            let mut a: Vec<&str> = extra.to_vec();
            a.extend([
                "--bias",
                "all",
                "--epochs",
                "1",
                "--no-dropout",
                "--no-eval-before",
                "--grad-accum",
                accum,
            ]);
            let o = run(&train_args(&s, &out, &a));
            assert!(o.status.success(), "{name}: {}", stderr(&o));
            step_log(&s.tmp.path().join(out))
        };
        let (whole, parts) = (with("1"), with("3"));
        assert!(whole.len() >= 3, "{name}: {whole:?}");
        assert_eq!(whole.len(), parts.len(), "{name}: same steps");
        for (i, (w, p)) in whole.iter().zip(&parts).enumerate() {
            let close = |a: f64, b: f64| (a - b).abs() <= 1e-4 * a.abs().max(1e-3);
            assert!(
                close(w.0, p.0) && close(w.1, p.1) && w.2 == p.2,
                "{name}, step {}: whole batch (loss, grad norm, tokens) {w:?}, in 3 parts {p:?}",
                i + 1
            );
        }
    }
    // More parts than examples, or none: a clean error.
    for n in ["0", "9"] {
        assert_clean_failure(
            &s,
            &run(&train_args(&s, "out", &["--grad-accum", n])),
            "--grad-accum",
            "between 1 and --batch (8)",
        );
    }
}

/// Settings under which the tiny model's dev metric peaks before the last
/// of its 8 epochs (a learning rate high enough to move past its best).
const PEAKS: &[&str] = &[
    "--bias",
    "all",
    "--pooling",
    "mean",
    "--epochs",
    "8",
    "--lr",
    "0.1",
];

/// A finished training run with `PEAKS` plus `extra`: its summary, dev
/// metric per evaluation (epoch 0 first), stdout and stderr.
fn peaked_run(
    s: &Setup,
    out: &str,
    extra: &[&str],
) -> (serde_json::Value, Vec<f64>, String, String) {
    let mut a = PEAKS.to_vec();
    a.extend(extra);
    let o = run(&train_args(s, out, &a));
    assert!(o.status.success(), "{}", stderr(&o));
    let dir = s.tmp.path().join(out);
    let summary: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(dir.join("summary.json")).unwrap()).unwrap();
    let metrics: Vec<f64> = fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["metric"]
                .as_f64()
                .unwrap()
        })
        .collect();
    (
        summary,
        metrics,
        String::from_utf8_lossy(&o.stdout).to_string(),
        stderr(&o),
    )
}

/// `--save-best`: the biases file holds the best epoch's values (its dev
/// metric, re-evaluated by `beft eval`, is the run's best), not the last
/// epoch's; training itself is unchanged.
#[test]
fn save_best_keeps_the_best_epoch() {
    let s = setup();
    let with = |out: &str, best: bool| {
        let (summary, _, printed, _) =
            peaked_run(&s, out, if best { &["--save-best"] } else { &[] });
        let r = eval_json(&s, &s.tmp.path().join(out).join("biases.safetensors"), &[]);
        (summary, r["metric"].as_f64().unwrap(), printed)
    };
    let (last, last_eval, _) = with("last", false);
    let (best, best_eval, printed) = with("best", true);
    for k in ["best_dev_metric", "best_epoch", "final_dev_metric", "steps"] {
        assert_eq!(
            last[k], best[k],
            "{k}: --save-best must not change training"
        );
    }
    let (best_epoch, epochs) = (
        best["best_epoch"].as_u64().unwrap(),
        best["epochs"].as_u64().unwrap(),
    );
    assert!(
        best_epoch < epochs && best["best_dev_metric"] != best["final_dev_metric"],
        "this setup should peak before its last epoch: {best}"
    );
    assert_eq!(last["saved_epoch"].as_u64(), Some(epochs));
    assert_eq!(best["saved_epoch"].as_u64(), Some(best_epoch));
    assert_eq!(last_eval, last["final_dev_metric"].as_f64().unwrap());
    assert_eq!(best_eval, best["best_dev_metric"].as_f64().unwrap());
    assert!(
        printed.contains(&format!("biases saved from epoch {best_epoch}")),
        "{printed}"
    );
}

/// `--early-stopping N`: the run ends after the first epoch whose best dev
/// metric is N epochs old (found here from the full run's log), with the
/// same epochs up to there, and says so.
#[test]
fn early_stopping_ends_when_the_metric_stalls() {
    let s = setup();
    let with = |out: &str, extra: &[&str]| {
        let (summary, metrics, _, err) = peaked_run(&s, out, extra);
        (summary, metrics, err)
    };
    let (full, full_metrics, _) = with("full", &[]);
    assert_eq!(full["stopped_early"], false);
    // Epoch 0 is the evaluation before training; epochs 1.. follow.
    let patience = 1;
    let mut best = (f64::NEG_INFINITY, 0);
    let mut stop = None;
    for (e, &m) in full_metrics.iter().enumerate().skip(1) {
        if m > best.0 {
            best = (m, e);
        }
        if e >= best.1 + patience {
            stop = Some(e);
            break;
        }
    }
    let stop = stop
        .filter(|&e| e < 8)
        .expect("this setup should stall before its last epoch");
    let (early, early_metrics, err) = with("early", &["--early-stopping", "1"]);
    assert_eq!(early["stopped_early"], true, "{early}");
    assert_eq!(early["epochs"].as_u64(), Some(stop as u64));
    assert_eq!(
        early_metrics,
        full_metrics[..=stop],
        "the same epochs up to the stop"
    );
    assert!(
        err.contains("early stopping: no better dev metric for 1 epochs"),
        "{err}"
    );
    assert_clean_failure(
        &s,
        &run(&train_args(&s, "out", &["--early-stopping", "0"])),
        "--early-stopping",
        "at least 1",
    );
}

/// `beft predict` with a decoder: each text goes through the task's prompt
/// and the label verbalisers are scored; the predictions agree with `beft
/// eval`'s accuracy on the same dev texts, unnamed labels go by their
/// verbalisers, and what cannot be predicted is a clean error.
#[test]
fn predict_with_a_decoder_scores_the_verbalisers() {
    let s = setup();
    let gguf = tiny_llama();
    let g = gguf.to_str().unwrap();
    let o = run(&train_args(
        &s,
        "dec",
        &[
            "--model", g, "--bias", "all", "--epochs", "10", "--lr", "1e-2",
        ],
    ));
    assert!(o.status.success(), "{}", stderr(&o));
    let biases = s.tmp.path().join("dec/biases.safetensors");
    let b = biases.to_str().unwrap();
    let acc = eval_json(&s, &biases, &["--model", g])["metric"]
        .as_f64()
        .unwrap();
    let dev = fs::read_to_string(s.data.join("dev.tsv")).unwrap();
    let rows: Vec<(&str, u64)> = dev
        .lines()
        .skip(1)
        .map(|l| l.split_once('\t').unwrap())
        .map(|(t, l)| (t, l.parse().unwrap()))
        .collect();
    let input = s.tmp.path().join("texts.txt");
    fs::write(
        &input,
        rows.iter().map(|r| r.0).collect::<Vec<_>>().join("\n"),
    )
    .unwrap();
    let o = beft(&[
        "predict",
        "--model",
        g,
        "--biases",
        b,
        "--input",
        input.to_str().unwrap(),
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out: Vec<serde_json::Value> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(out.len(), rows.len(), "one line per text");
    let mut correct = 0;
    for (p, (text, gold)) in out.iter().zip(&rows) {
        assert_eq!(p["text"], *text, "input order");
        let id = p["label_id"].as_u64().unwrap();
        assert_eq!(
            p["label"],
            ["terrible", "great"][id as usize],
            "sst2's verbalisers name its labels"
        );
        let probs: Vec<f64> = p["probabilities"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        assert!(
            probs.len() == 2 && (probs.iter().sum::<f64>() - 1.0).abs() < 1e-5,
            "{p}"
        );
        correct += (id == *gold) as usize;
    }
    assert!(
        acc >= 0.9,
        "the decoder should learn the good/bad task: dev accuracy {acc}"
    );
    assert_eq!(
        correct as f64 / rows.len() as f64,
        acc,
        "predict agrees with eval"
    );
    // Tab-separated output, and errors.
    let o = beft(&[
        "predict",
        "--model",
        g,
        "--biases",
        b,
        "--text",
        "a good movie",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let line = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(
        line.ends_with("\ta good movie\n") && line.split('\t').count() == 3,
        "{line}"
    );
    for (args, phrase) in [
        (vec!["--task", "stsb"], "classification task"),
        (vec!["--task", "copa"], "own choices"),
        (
            vec!["--task", "boolq"],
            "pairs of texts: give both, separated by a tab",
        ),
    ] {
        let mut a = vec!["predict", "--model", g, "--biases", b, "--text", "x"];
        a.extend(args);
        let o = beft(&a);
        assert!(!o.status.success() && o.stdout.is_empty(), "{a:?}");
        assert!(stderr(&o).contains(phrase), "{a:?}: {}", stderr(&o));
    }
    let enc_biases = s.tmp.path().join("enc.safetensors");
    let o = run(&train_args(&s, "enc", &["--epochs", "1"]));
    assert!(o.status.success(), "{}", stderr(&o));
    fs::copy(s.tmp.path().join("enc/biases.safetensors"), &enc_biases).unwrap();
    let o = beft(&[
        "predict",
        "--model",
        g,
        "--biases",
        enc_biases.to_str().unwrap(),
        "--text",
        "x",
    ]);
    assert_fails_saying(&o, &["not a decoder's biases file"]);
    let m = s.model.to_str().unwrap();
    let o = beft(&[
        "predict", "--model", m, "--biases", b, "--text", "x", "--task", "sst2",
    ]);
    assert_fails_saying(&o, &["apply to decoders"]);
}

/// `beft predict` with a decoder trained on a generation task (SQuAD
/// format): each line is a context and a question; the answers are
/// evaluation's (their F1 against the references is `beft eval`'s, on a
/// dev set without titles), and a line without its question is a clear
/// error.
#[test]
fn predict_with_a_decoder_answers_questions() {
    let s = setup();
    let gguf = tiny_llama();
    let g = gguf.to_str().unwrap();
    let squad = s.tmp.path().join("squad");
    fs::create_dir_all(&squad).unwrap();
    // Words of the tiny model's vocabulary (a, b, c, ab, abc, 1, 2), so that
    // its answers can overlap the references.
    let context = "abc ab c 1 2";
    let qas: Vec<(String, String)> = (0..16)
        .map(|i| {
            (
                format!("ab {} c", 1 + i % 2),
                ["abc", "ab c", "c", "a b"][i % 4].to_string(),
            )
        })
        .collect();
    let doc = serde_json::json!({"data": [{"title": "", "paragraphs": [{"context": context, "qas":
        qas.iter().enumerate().map(|(i, (q, a))| serde_json::json!({"id": format!("q{i}"), "question": q,
            "answers": [{"text": a, "answer_start": 0}]})).collect::<Vec<_>>()}]}]});
    for f in ["train.json", "dev.json"] {
        fs::write(squad.join(f), doc.to_string()).unwrap();
    }
    let q = squad.to_str().unwrap();
    let gen = [
        "--model",
        g,
        "--data",
        q,
        "--task",
        "squad",
        "--max-new-tokens",
        "4",
    ];
    let mut a = gen.to_vec();
    a.extend(["--bias", "all", "--epochs", "2"]);
    let o = run(&train_args(&s, "gen", &a));
    assert!(o.status.success(), "{}", stderr(&o));
    let b = s.tmp.path().join("gen/biases.safetensors");
    let b = b.to_str().unwrap();
    let f1 = eval_json(&s, Path::new(b), &gen)["metric"]
        .as_f64()
        .unwrap();
    let input = s.tmp.path().join("questions.txt");
    let lines: Vec<String> = qas.iter().map(|(q, _)| format!("{context}\t{q}")).collect();
    fs::write(&input, lines.join("\n")).unwrap();
    let i = input.to_str().unwrap();
    let o = beft(&[
        "predict",
        "--model",
        g,
        "--biases",
        b,
        "--input",
        i,
        "--json",
        "--max-new-tokens",
        "4",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out: Vec<serde_json::Value> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(out.len(), qas.len(), "one answer per line");
    let mut sum = 0.0;
    for (p, (line, (_, gold))) in out.iter().zip(lines.iter().zip(&qas)) {
        assert_eq!(p["text"], *line, "input order");
        sum += beft::data::generation::best_f1_em(
            p["answer"].as_str().unwrap(),
            std::slice::from_ref(gold),
        )
        .0;
    }
    let got = sum / qas.len() as f64;
    assert!(
        f1 > 0.0,
        "some answers should overlap the references (dev F1 {f1})"
    );
    assert!(
        (got - f1).abs() < 1e-12,
        "predict's answers score F1 {got}, eval {f1}"
    );
    let o = beft(&[
        "predict",
        "--model",
        g,
        "--biases",
        b,
        "--text",
        "no question here",
    ]);
    assert_fails_saying(&o, &["give the context, a tab, then the question"]);
}

/// `--bf16` (as Hugging Face's flag): the same run as `BEFT_CPU_GEMM=bf16`
/// where the CPU has AVX-512 BF16 (one thread each), not the f32 one, and
/// named in `summary.json`; a clean refusal on a backend without bf16
/// products.
#[test]
fn bf16_flag_runs_the_bf16_products() {
    let s = setup();
    assert_clean_failure(
        &s,
        &run(&train_args(&s, "ref", &["--bf16", "--device", "cpu-ref"])),
        "--bf16",
        "cpu-ref",
    );
    #[cfg(feature = "wgpu")]
    assert_clean_failure(
        &s,
        &run(&train_args(&s, "wg", &["--bf16", "--device", "wgpu"])),
        "--bf16",
        "f32 products only",
    );
    let flag = run(&train_args(&s, "flag", &["--bf16"]));
    if !beft::backend::fast::gemm16::available() {
        println!("this CPU has no AVX-512 BF16: checking the refusal instead");
        assert_clean_failure(&s, &flag, "--bf16", "AVX-512 BF16");
        return;
    }
    assert!(flag.status.success(), "{}", stderr(&flag));
    let env = Command::new(env!("CARGO_BIN_EXE_beft"))
        .args(train_args(&s, "env", &["--threads", "1"]))
        .env_remove("BEFT_CUDA_EMU")
        .env("BEFT_CPU_GEMM", "bf16")
        .output()
        .expect("run beft");
    assert!(env.status.success(), "{}", stderr(&env));
    let f32 = run(&train_args(&s, "f32", &[]));
    assert!(f32.status.success(), "{}", stderr(&f32));
    let dir = |n: &str| s.tmp.path().join(n);
    assert_eq!(step_log(&dir("flag")), step_log(&dir("env")));
    assert_ne!(step_log(&dir("flag")), step_log(&dir("f32")));
    let device = |n: &str| {
        let v: serde_json::Value =
            serde_json::from_str(&fs::read_to_string(dir(n).join("summary.json")).unwrap())
                .unwrap();
        v["device"].as_str().unwrap().to_string()
    };
    assert!(device("flag").contains("bf16 matmul"), "{}", device("flag"));
    assert!(!device("f32").contains("bf16"), "{}", device("f32"));
}

/// `beft devices` lists the CPU backends, and says whether `--bf16` runs
/// here and on which instructions.
#[test]
fn devices_lists_the_cpu_and_its_bf16_products() {
    let o = beft(&["devices"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    let cpu = out
        .lines()
        .find(|l| l.ends_with("[--device cpu]"))
        .unwrap_or_else(|| panic!("no cpu line:\n{out}"));
    let (avx, amx) = (
        beft::backend::fast::gemm16::available(),
        beft::backend::fast::amx::available(),
    );
    assert_eq!(cpu.contains("no bf16 products"), !avx, "{cpu}");
    assert_eq!(cpu.contains("on AMX tiles"), amx, "{cpu}");
    assert!(out.contains("[--device cpu-ref]"), "{out}");
}
