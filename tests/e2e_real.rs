//! End to end on a real model and real data: a few dozen bias-only steps (one epoch of 1,000 examples) of
//! all-MiniLM-L6-v2 on GLUE SST-2 lower the loss and lift dev accuracy above
//! the majority class. Skipped, with the reason printed, when the model
//! (fetched by `scripts/fetch_default.sh`) or `../shared/data` is absent.

use std::path::PathBuf;
use std::process::Command;

use beft::data::{self, Split};

fn minilm() -> Option<PathBuf> {
    let cache = std::env::var_os("BEFT_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/beft")))?;
    let p = cache.join("models/all-MiniLM-L6-v2");
    p.join("model.safetensors").is_file().then_some(p)
}

fn sst2() -> Option<PathBuf> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/data/glue/SST-2");
    p.join("train.tsv").is_file().then_some(p)
}

#[test]
fn minilm_sst2_few_steps_learn() {
    let (Some(model), Some(data_dir)) = (minilm(), sst2()) else {
        eprintln!("skipped: needs all-MiniLM-L6-v2 (run scripts/fetch_default.sh) and ../shared/data/glue/SST-2");
        return;
    };
    let tmp = tempfile::TempDir::new().unwrap();
    let out = tmp.path().join("run");
    let dev_size = 200;
    let o = Command::new(env!("CARGO_BIN_EXE_beft"))
        .args([
            "train",
            "--task",
            "sst2",
            "--bias",
            "v",
            "--pooling",
            "mean",
            "--lr",
            "1e-3",
            "--batch",
            "16",
            "--epochs",
            "1",
        ])
        .args([
            "--train-size",
            "1000",
            "--dev-size",
            &dev_size.to_string(),
            "--seed",
            "0",
            "--quiet",
        ])
        .arg("--model")
        .arg(&model)
        .arg("--data")
        .arg(&data_dir)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    let steps: Vec<f64> = std::fs::read_to_string(out.join("steps.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"]
                .as_f64()
                .unwrap()
        })
        .collect();
    assert_eq!(steps.len(), 63);
    let first: f64 = steps[..10].iter().sum::<f64>() / 10.0;
    let last: f64 = steps[steps.len() - 10..].iter().sum::<f64>() / 10.0;
    println!("loss: first 10 steps {first:.4}, last 10 steps {last:.4}");
    assert!(
        last < first - 0.02,
        "loss did not go down: {first} -> {last}"
    );

    // The majority-class rate of exactly this dev subset.
    let task = data::task("sst2").unwrap();
    let dev = data::sample_subset(
        &data::load_split(&task, &data_dir, Split::Dev).unwrap(),
        Some(dev_size),
        0,
    );
    let pos = dev.iter().filter(|e| e.label == 1.0).count() as f64 / dev.len() as f64;
    let majority = pos.max(1.0 - pos);
    let acc = summary["final_dev_metric"].as_f64().unwrap();
    println!(
        "dev accuracy {acc:.4} (majority class {majority:.4}, before training {})",
        summary["initial_dev_metric"]
    );
    assert!(
        acc > majority + 0.05,
        "dev accuracy {acc} is not above the majority class {majority}"
    );
}
