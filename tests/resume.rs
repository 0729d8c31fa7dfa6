//! Crash safety: a real training process killed with SIGKILL at a random
//! moment, then `beft train --resume`, ends bit-identical to an
//! uninterrupted run; faults keep the last good state; a stale unfinished
//! run is never silently overwritten.

mod common;

use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

use beft::rng::Rng;
use common::{write_tiny_model, write_tiny_sst2, TinyArch};

fn cmd() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_beft"));
    c.args(["--threads", "1"]);
    c
}

fn train_args<'a>(m: &'a str, d: &'a str, out: &'a str) -> Vec<&'a str> {
    vec![
        "train",
        "--model",
        m,
        "--task",
        "sst2",
        "--data",
        d,
        "--out",
        out,
        "--epochs",
        "40",
        "--batch",
        "4",
        "--lr",
        "1e-2",
        "--bias",
        "all",
        "--pooling",
        "mean",
        "--checkpoint-every",
        "3",
        "--quiet",
    ]
}

#[test]
fn sigkill_then_resume_is_bit_identical() {
    let tmp = tempfile::TempDir::new().unwrap();
    let (model, data) = (tmp.path().join("model"), tmp.path().join("data"));
    write_tiny_model(&model, TinyArch::Bert, 3, None);
    write_tiny_sst2(&data, 64, 16);
    let (m, d) = (model.to_str().unwrap(), data.to_str().unwrap());

    // The uninterrupted reference, timed.
    let full = tmp.path().join("full");
    let t0 = Instant::now();
    let o = cmd()
        .args(train_args(m, d, full.to_str().unwrap()))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let took = t0.elapsed();

    // Kill another run at a random moment inside its training (seeded by the
    // clock, printed so a failure can be reproduced), then resume it.
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    let mut rng = Rng::new(seed);
    let mut killed = 0;
    for attempt in 0..5 {
        let out = tmp.path().join(format!("killed{attempt}"));
        let frac = 0.15 + 0.7 * rng.next_f64();
        let wait = took.mul_f64(frac);
        println!("attempt {attempt}: kill after {wait:?} of a {took:?} run (seed {seed})");
        let mut child = cmd()
            .args(train_args(m, d, out.to_str().unwrap()))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(wait);
        child.kill().unwrap(); // SIGKILL
        let status = child.wait().unwrap();
        if status.success() || out.join("summary.json").exists() {
            continue; // finished before the kill: try again with another moment
        }
        killed += 1;
        assert!(!out.exists(), "a killed run must not leave a run directory");
        let o = cmd()
            .args(["train", "--resume", out.to_str().unwrap(), "--quiet"])
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "resume failed:\n{}",
            String::from_utf8_lossy(&o.stderr)
        );
        assert_eq!(
            fs::read(full.join("biases.safetensors")).unwrap(),
            fs::read(out.join("biases.safetensors")).unwrap(),
            "resumed biases differ from the uninterrupted run's"
        );
        let metrics = |p: &Path| -> Vec<(i64, f64)> {
            fs::read_to_string(p.join("metrics.jsonl"))
                .unwrap()
                .lines()
                .map(|l| {
                    let v: serde_json::Value = serde_json::from_str(l).unwrap();
                    (v["epoch"].as_i64().unwrap(), v["metric"].as_f64().unwrap())
                })
                .collect()
        };
        assert_eq!(
            metrics(&full),
            metrics(&out),
            "one evaluation line per epoch, same values"
        );
        let losses = |p: &Path| -> Vec<String> {
            fs::read_to_string(p.join("steps.jsonl"))
                .unwrap()
                .lines()
                .map(|l| {
                    let v: serde_json::Value = serde_json::from_str(l).unwrap();
                    format!("{}:{}", v["step"], v["loss"])
                })
                .collect()
        };
        assert_eq!(
            losses(&full),
            losses(&out),
            "the step log is continuous and identical"
        );
        assert!(
            !beft::train::checkpoint::staging_dir(&out).exists(),
            "no state left behind after success"
        );
    }
    assert!(killed > 0, "never managed to kill the run mid-training");
}

#[test]
fn unfinished_run_is_not_silently_overwritten() {
    let tmp = tempfile::TempDir::new().unwrap();
    let (model, data) = (tmp.path().join("model"), tmp.path().join("data"));
    write_tiny_model(&model, TinyArch::Bert, 3, None);
    write_tiny_sst2(&data, 16, 8);
    let out = tmp.path().join("run");
    let staging = beft::train::checkpoint::staging_dir(&out);
    fs::create_dir_all(&staging).unwrap();
    fs::write(staging.join("run_args.json"), "{}").unwrap();
    let o = cmd()
        .args(train_args(
            model.to_str().unwrap(),
            data.to_str().unwrap(),
            out.to_str().unwrap(),
        ))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("--resume") && err.contains("--overwrite"),
        "{err}"
    );
    assert!(staging.exists(), "the unfinished state is kept");
    // Resuming a finished run, or nothing, is a clear error.
    let o = cmd()
        .args([
            "train",
            "--resume",
            tmp.path().join("nothing").to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(
        !o.status.success() && String::from_utf8_lossy(&o.stderr).contains("no unfinished run")
    );
}

#[test]
fn non_finite_loss_stops_and_keeps_the_last_good_state() {
    let tmp = tempfile::TempDir::new().unwrap();
    let (model, data) = (tmp.path().join("model"), tmp.path().join("data"));
    write_tiny_model(&model, TinyArch::Bert, 3, None);
    write_tiny_sst2(&data, 32, 8);
    let out = tmp.path().join("run");
    // An absurd learning rate without clipping blows the loss up.
    let o = cmd()
        .args([
            "train",
            "--model",
            model.to_str().unwrap(),
            "--task",
            "sst2",
            "--data",
            data.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ])
        .args([
            "--epochs", "30", "--batch", "4", "--lr", "1e30", "--clip", "0", "--bias", "all",
            "--quiet",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "expected a failure:\n{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(
        err.contains("non-finite") && err.contains("at step") && err.contains("training examples"),
        "{err}"
    );
    let staging = beft::train::checkpoint::staging_dir(&out);
    assert!(
        staging.join("checkpoint.safetensors").is_file(),
        "the last good checkpoint is kept"
    );
    assert!(!out.exists());
}
