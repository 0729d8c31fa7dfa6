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
    // With --save-best, so that the best epoch's values go through the
    // checkpoints too.
    sigkill_then_resume(&tmp, &|out| {
        let mut a = train_args(m, d, out);
        a.push("--save-best");
        own(a)
    });
}

/// The same for a decoder (a tiny LLaMA GGUF with its own tokenizer,
/// candidate scoring, zero-initialised biases added to its bias-free
/// projections), batched with `--group-by-length`.
#[test]
fn sigkill_then_resume_is_bit_identical_for_a_decoder() {
    let tmp = tempfile::TempDir::new().unwrap();
    let data = tmp.path().join("data");
    write_tiny_sst2(&data, 64, 16);
    let model =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/fuzz/seeds/tiny_llama.gguf");
    let (m, d) = (model.to_str().unwrap(), data.to_str().unwrap());
    sigkill_then_resume(&tmp, &|out| {
        let mut a = train_args(m, d, out);
        let i = a.iter().position(|x| *x == "--pooling").unwrap();
        a.drain(i..i + 2);
        // Grouped batches (from the decoder's row lengths) must resume
        // exactly too: the epoch's order is rebuilt from run_args.json.
        a.push("--group-by-length");
        own(a)
    });
}

fn own(a: Vec<&str>) -> Vec<String> {
    a.into_iter().map(String::from).collect()
}

/// Run `args(OUT)` once uninterrupted, then kill other runs with SIGKILL at
/// random moments and resume them: biases, per-epoch metrics and the step
/// log must be bit-identical.
fn sigkill_then_resume(tmp: &tempfile::TempDir, args: &dyn Fn(&str) -> Vec<String>) {
    // The uninterrupted reference, timed.
    let full = tmp.path().join("full");
    let t0 = Instant::now();
    let o = cmd().args(args(full.to_str().unwrap())).output().unwrap();
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
            .args(args(out.to_str().unwrap()))
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
        let (full_biases, full_metrics, full_steps) = run_results(&full);
        let (biases, metrics, steps) = run_results(&out);
        assert_eq!(
            full_biases, biases,
            "resumed biases differ from the uninterrupted run's"
        );
        assert_eq!(
            full_metrics, metrics,
            "one evaluation line per epoch, same values"
        );
        assert_eq!(
            full_steps, steps,
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

/// Biases, per-epoch metrics and the step log of a finished run (the step
/// log without its timings).
fn run_results(p: &Path) -> (Vec<u8>, Vec<(i64, f64)>, Vec<String>) {
    let biases = fs::read(p.join("biases.safetensors")).unwrap();
    let metrics = fs::read_to_string(p.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (v["epoch"].as_i64().unwrap(), v["metric"].as_f64().unwrap())
        })
        .collect();
    let steps = fs::read_to_string(p.join("steps.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            format!(
                "{}:{}:{}:{}",
                v["step"], v["epoch"], v["loss"], v["grad_norm"]
            )
        })
        .collect();
    (biases, metrics, steps)
}

/// Wait (up to `limit`) until `cond` holds or the child exits; true if it holds.
fn wait_for(
    child: &mut std::process::Child,
    limit: std::time::Duration,
    cond: impl Fn() -> bool,
) -> bool {
    let t0 = Instant::now();
    while t0.elapsed() < limit {
        if cond() {
            return true;
        }
        if child.try_wait().unwrap().is_some() {
            return cond();
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    false
}

/// The step recorded in a checkpoint (its "state" metadata).
fn checkpoint_step(path: &Path) -> u64 {
    let s = beft::weights::WeightStore::open_file(path).unwrap();
    let st: serde_json::Value = serde_json::from_str(&s.metadata()["state"]).unwrap();
    st["step"].as_u64().unwrap()
}

#[test]
fn ctrl_c_saves_a_checkpoint_and_resume_is_bit_identical() {
    let tmp = tempfile::TempDir::new().unwrap();
    let (model, data) = (tmp.path().join("model"), tmp.path().join("data"));
    write_tiny_model(&model, TinyArch::Bert, 3, None);
    write_tiny_sst2(&data, 64, 16);
    let (m, d) = (model.to_str().unwrap(), data.to_str().unwrap());

    let full = tmp.path().join("full");
    let o = cmd()
        .args(train_args(m, d, full.to_str().unwrap()))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    let out = tmp.path().join("interrupted");
    let staging = beft::train::checkpoint::staging_dir(&out);
    let ckpt = staging.join(beft::train::checkpoint::CHECKPOINT);
    let steps = staging.join("steps.jsonl");
    let mut child = cmd()
        .args(train_args(m, d, out.to_str().unwrap()))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Interrupt once training is under way (a few steps logged), far from
    // the end of the 640-step run.
    let started = wait_for(&mut child, std::time::Duration::from_secs(120), || {
        fs::read_to_string(&steps).is_ok_and(|s| s.lines().count() >= 5)
    });
    assert!(started, "training never started");
    let k = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(k.success(), "kill -INT failed");
    let o = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    println!("beft said:\n{err}");
    assert!(
        !o.status.success(),
        "an interrupted run must exit non-zero:\n{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    assert!(
        err.contains("interrupted at step") && err.contains("--resume"),
        "the message must say interrupted and name --resume:\n{err}"
    );
    assert!(
        !out.exists(),
        "an interrupted run must not leave a run directory"
    );
    assert!(ckpt.is_file(), "no checkpoint in {}", staging.display());
    // The checkpoint is at the step the message names, not an older one.
    let at: u64 = err
        .split("interrupted at step ")
        .nth(1)
        .and_then(|s| s.split(':').next())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or_else(|| panic!("no step in: {err}"));
    assert_eq!(checkpoint_step(&ckpt), at, "{err}");
    assert!(at < 640, "interrupted after the run was over? {err}");

    let o = cmd()
        .args(["train", "--resume", out.to_str().unwrap(), "--quiet"])
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "resume failed:\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let (a, b) = (run_results(&full), run_results(&out));
    assert!(
        a.0 == b.0,
        "resumed biases differ from the uninterrupted run's"
    );
    assert_eq!(a.1, b.1, "per-epoch dev metrics differ");
    assert_eq!(a.2, b.2, "the step logs differ");
    assert!(!staging.exists(), "no state left behind after success");
}

#[test]
fn model_file_changed_during_a_run_is_refused_at_the_next_checkpoint() {
    let tmp = tempfile::TempDir::new().unwrap();
    let (model, data) = (tmp.path().join("model"), tmp.path().join("data"));
    write_tiny_model(&model, TinyArch::Bert, 3, None);
    write_tiny_sst2(&data, 64, 16);
    let (m, d) = (model.to_str().unwrap(), data.to_str().unwrap());
    let out = tmp.path().join("run");
    let staging = beft::train::checkpoint::staging_dir(&out);
    let ckpt = staging.join(beft::train::checkpoint::CHECKPOINT);
    let steps = staging.join("steps.jsonl");
    let mut child = cmd()
        .args(train_args(m, d, out.to_str().unwrap()))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = wait_for(&mut child, std::time::Duration::from_secs(120), || {
        fs::read_to_string(&steps).is_ok_and(|s| s.lines().count() >= 4)
    });
    assert!(started, "training never started");
    // "Rewrite" the model file under the running job: same bytes, new
    // modification time (what an in-place copy of a same-sized file does).
    let weights = model.join("model.safetensors");
    let f = fs::OpenOptions::new().write(true).open(&weights).unwrap();
    f.set_modified(std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_000_000))
        .unwrap();
    drop(f);
    let o = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    println!("beft said:\n{err}");
    assert!(
        !o.status.success(),
        "the run went on with a changed model:\n{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    assert!(
        err.contains(&weights.display().to_string()) && err.contains("changed while it was in use"),
        "the message must name the changed file:\n{err}"
    );
    assert!(err.contains("--resume"), "{err}");
    assert!(!out.exists());
    // The state from before the change is kept.
    assert!(ckpt.is_file());
    assert!(checkpoint_step(&ckpt) < 640);
}

#[test]
fn file_stamps_notice_size_and_time_changes() {
    let tmp = tempfile::TempDir::new().unwrap();
    let model = tmp.path().join("model");
    write_tiny_model(&model, TinyArch::Bert, 3, None);
    let weights = model.join("model.safetensors");
    let md = beft::model::config::ModelDir::open(&model).unwrap();
    assert_eq!(md.weights.files().len(), 1);
    assert_eq!(md.weights.files()[0].path, weights);
    md.weights.check_files_unchanged().unwrap();
    // Appended bytes (size change).
    let mut f = fs::OpenOptions::new().append(true).open(&weights).unwrap();
    std::io::Write::write_all(&mut f, &[0u8; 8]).unwrap();
    drop(f);
    let e = md.weights.check_files_unchanged().unwrap_err().to_string();
    assert!(
        e.contains(&weights.display().to_string()) && e.contains("size"),
        "{e}"
    );
    // Removed.
    fs::remove_file(&weights).unwrap();
    let e = md.weights.check_files_unchanged().unwrap_err().to_string();
    assert!(
        e.contains(&weights.display().to_string()) && e.contains("removed"),
        "{e}"
    );

    // Sharded checkpoints stamp every shard.
    let sharded =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/bert_cls_sharded/model");
    let copy = tmp.path().join("sharded");
    fs::create_dir_all(&copy).unwrap();
    for e in fs::read_dir(&sharded).unwrap() {
        let e = e.unwrap();
        fs::copy(e.path(), copy.join(e.file_name())).unwrap();
    }
    let s = beft::weights::WeightStore::open_dir(&copy).unwrap();
    assert_eq!(s.files().len(), 2);
    s.check_files_unchanged().unwrap();
    let shard2 = copy.join("model-00002-of-00002.safetensors");
    let f = fs::OpenOptions::new().write(true).open(&shard2).unwrap();
    f.set_modified(std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(7))
        .unwrap();
    drop(f);
    let e = s.check_files_unchanged().unwrap_err().to_string();
    assert!(
        e.contains("model-00002-of-00002.safetensors") && e.contains("modification time"),
        "{e}"
    );

    // A GGUF model is stamped too (its F32 tensors are read in place).
    let gguf = tmp.path().join("tiny.gguf");
    fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/fuzz/seeds/tiny_llama.gguf"),
        &gguf,
    )
    .unwrap();
    let md = beft::model::config::ModelDir::open(&gguf).unwrap();
    assert_eq!(md.weights.files().len(), 1);
    md.weights.check_files_unchanged().unwrap();
    let f = fs::OpenOptions::new().write(true).open(&gguf).unwrap();
    f.set_modified(std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(7))
        .unwrap();
    drop(f);
    let e = md.weights.check_files_unchanged().unwrap_err().to_string();
    assert!(
        e.contains(&gguf.display().to_string()) && e.contains("changed"),
        "{e}"
    );
}

// ---------------------------------------------------------------------------
// Disk full
// ---------------------------------------------------------------------------
//
// A full disk is simulated with a file-size limit (RLIMIT_FSIZE, set by the
// shell's `ulimit -f` in 512-byte blocks, with SIGXFSZ ignored so that the
// write fails with EFBIG instead of killing the process): the write fails
// part-way through the file exactly as it would with ENOSPC. This needs no
// privileges (the tests run as root, so read-only directories would not
// stop a write, and mounting a small filesystem needs CAP_SYS_ADMIN).

/// Run `program args` with the file-size limit set to `blocks` × 512 bytes.
fn limited(blocks: u64, program: &Path) -> Command {
    let mut c = Command::new("sh");
    c.args([
        "-c",
        &format!("trap '' XFSZ; ulimit -f {blocks}; exec \"$0\" \"$@\""),
        program.to_str().unwrap(),
    ]);
    c
}

const DISK_FULL_CHILD: &str = "BEFT_TEST_DISK_FULL_CHILD";

#[test]
fn disk_full_while_checkpointing_keeps_the_previous_checkpoint() {
    use beft::train::checkpoint::{load, save, LoopState};
    // In the child (under the limit): try to write a checkpoint too large
    // for it, and report what happened.
    if let Ok(path) = std::env::var(DISK_FULL_CHILD) {
        let big = vec![0.5f32; 4096];
        let st = LoopState {
            step: 99,
            epoch: 3,
            ..Default::default()
        };
        match save(Path::new(&path), &big, &big, &big, None, &st) {
            Ok(()) => println!("CHILD-RESULT: ok"),
            Err(e) => println!("CHILD-RESULT: error: {e}"),
        }
        return;
    }
    let tmp = tempfile::TempDir::new().unwrap();
    let path = tmp.path().join("checkpoint.safetensors");
    let small: Vec<f32> = (0..10).map(|i| i as f32).collect();
    let st = LoopState {
        step: 7,
        epoch: 1,
        ..Default::default()
    };
    save(&path, &small, &small, &small, None, &st).unwrap();
    let before = fs::read(&path).unwrap();

    // 48 KiB of checkpoint against a 16 KiB limit.
    let o = limited(32, &std::env::current_exe().unwrap())
        .args([
            "disk_full_while_checkpointing_keeps_the_previous_checkpoint",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(DISK_FULL_CHILD, &path)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "child failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let line = stdout
        .lines()
        .find_map(|l| l.split_once("CHILD-RESULT: ").map(|(_, r)| r))
        .unwrap_or_else(|| panic!("no result from the child:\n{stdout}"));
    assert!(
        line.starts_with("error: "),
        "the write under the limit succeeded: {line}"
    );
    assert!(
        line.contains(&path.display().to_string()) && line.contains("too large"),
        "the error must name the file and the OS error: {line}"
    );
    // The previous checkpoint is untouched and still loads; no temporary
    // file is left behind.
    assert_eq!(fs::read(&path).unwrap(), before);
    let (params, _, _, state, _) = load(&path, 10).unwrap();
    assert_eq!((params, state.step), (small, 7));
    let names: Vec<_> = fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        names,
        ["checkpoint.safetensors"],
        "temporary files left behind"
    );
}

#[test]
fn disk_full_during_training_stops_cleanly_and_resumes_bit_identical() {
    let tmp = tempfile::TempDir::new().unwrap();
    let (model, data) = (tmp.path().join("model"), tmp.path().join("data"));
    write_tiny_model(&model, TinyArch::Bert, 3, None);
    write_tiny_sst2(&data, 64, 16);
    let (m, d) = (model.to_str().unwrap(), data.to_str().unwrap());
    let full = tmp.path().join("full");
    let o = cmd()
        .args(train_args(m, d, full.to_str().unwrap()))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    // A 24 KiB file-size limit: the run's largest file (steps.jsonl, about
    // 90 KiB when complete) hits it part-way through training.
    let out = tmp.path().join("run");
    let o = limited(48, Path::new(env!("CARGO_BIN_EXE_beft")))
        .args(["--threads", "1"])
        .args(train_args(m, d, out.to_str().unwrap()))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    println!("beft said:\n{err}");
    assert!(
        !o.status.success(),
        "the run went on past a full disk:\n{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    let staging = beft::train::checkpoint::staging_dir(&out);
    assert!(
        err.contains(&staging.display().to_string()) && err.contains("too large"),
        "the error must name the file that could not be written:\n{err}"
    );
    assert!(
        err.contains("last checkpoint is kept") && err.contains("--resume"),
        "the error must say how to go on:\n{err}"
    );
    assert!(!out.exists(), "no run directory after a failed run");
    let ckpt = staging.join(beft::train::checkpoint::CHECKPOINT);
    let at = checkpoint_step(&ckpt);
    assert!(at > 0 && at < 640, "checkpoint at step {at}");

    // Space freed: the run resumes from the last good checkpoint and ends
    // exactly where an uninterrupted run does.
    let o = cmd()
        .args(["train", "--resume", out.to_str().unwrap(), "--quiet"])
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "resume failed:\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let (a, b) = (run_results(&full), run_results(&out));
    assert!(
        a.0 == b.0,
        "resumed biases differ from the uninterrupted run's"
    );
    assert_eq!(a.1, b.1, "per-epoch dev metrics differ");
    assert_eq!(a.2, b.2, "the step logs differ");
}
