//! Adapters both ways: a run's biases exported as a PEFT BEFT adapter load in
//! Hugging Face PEFT with the same logits as beft's (and as a merged model in
//! transformers), and `import-peft` reads the adapter back to the same
//! biases. The Python half needs torch, transformers and peft: the test
//! prints why it skipped when they are missing (BEFT_PYTHON names the
//! interpreter; `.ci/run` installs them and sets BEFT_REQUIRE_PEFT=1 so that
//! CI cannot skip).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{write_tiny_model, write_tiny_sst2, TinyArch};

fn beft(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_beft"))
        .args(args)
        .args(["--threads", "1"])
        .output()
        .unwrap()
}

fn ok(o: Output) -> Output {
    assert!(
        o.status.success(),
        "beft failed:\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

fn python() -> Option<String> {
    let py = std::env::var("BEFT_PYTHON").unwrap_or_else(|_| "python3".into());
    let probe = Command::new(&py)
        .args(["-c", "import torch, transformers, peft, safetensors"])
        .output();
    match probe {
        Ok(o) if o.status.success() => Some(py),
        _ => {
            assert!(
                std::env::var("BEFT_REQUIRE_PEFT").is_err(),
                "BEFT_REQUIRE_PEFT is set but {py} lacks torch/transformers/peft"
            );
            None
        }
    }
}

fn check(py: &str, args: &[&str]) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/peft_check.py");
    let o = Command::new(py).arg(script).args(args).output().unwrap();
    let out = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    println!("{out}");
    assert!(o.status.success(), "PEFT check failed:\n{out}");
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn roundtrip(arch: TinyArch, pooling: &str, bias: &str) {
    let Some(py) = python() else {
        eprintln!(
            "skipped: torch, transformers and peft are not installed for python3 (set BEFT_PYTHON)"
        );
        return;
    };
    let tmp = tempfile::TempDir::new().unwrap();
    let (model, data, run) = (
        tmp.path().join("model"),
        tmp.path().join("data"),
        tmp.path().join("run"),
    );
    write_tiny_model(&model, arch, 4, None);
    write_tiny_sst2(&data, 48, 16);
    ok(beft(&[
        "train",
        "--model",
        s(&model),
        "--task",
        "sst2",
        "--data",
        s(&data),
        "--out",
        s(&run),
        "--epochs",
        "2",
        "--batch",
        "8",
        "--lr",
        "5e-2",
        "--bias",
        bias,
        "--pooling",
        pooling,
        "--quiet",
    ]));
    let biases = run.join("biases.safetensors");
    let logits = tmp.path().join("logits.json");
    let eval = |b: &Path, dump: &Path| -> serde_json::Value {
        let o = ok(beft(&[
            "eval",
            "--model",
            s(&model),
            "--biases",
            s(b),
            "--task",
            "sst2",
            "--data",
            s(&data),
            "--json",
            "--dump-logits",
            s(dump),
        ]));
        serde_json::from_slice(&o.stdout).unwrap()
    };
    let before = eval(&biases, &logits);

    let adapter = tmp.path().join("adapter");
    ok(beft(&[
        "export",
        "--model",
        s(&model),
        "--biases",
        s(&biases),
        "--format",
        "peft",
        "--out",
        s(&adapter),
    ]));
    let cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(adapter.join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(cfg["peft_type"], "BEFT");
    check(
        &py,
        &[
            "--model",
            s(&model),
            "--adapter",
            s(&adapter),
            "--logits",
            s(&logits),
        ],
    );

    if pooling == "cls" {
        let merged = tmp.path().join("merged");
        ok(beft(&[
            "export",
            "--model",
            s(&model),
            "--biases",
            s(&biases),
            "--format",
            "merged",
            "--out",
            s(&merged),
        ]));
        check(&py, &["--merged", s(&merged), "--logits", s(&logits)]);
    }

    // Back again: the same biases, the same predictions.
    let imported: PathBuf = tmp.path().join("imported.safetensors");
    ok(beft(&[
        "import-peft",
        s(&adapter),
        "--model",
        s(&model),
        "--out",
        s(&imported),
    ]));
    let logits2 = tmp.path().join("logits2.json");
    let after = eval(&imported, &logits2);
    assert_eq!(before["metric"], after["metric"]);
    let a: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&logits).unwrap()).unwrap();
    let b: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&logits2).unwrap()).unwrap();
    for (ra, rb) in a["logits"]
        .as_array()
        .unwrap()
        .iter()
        .zip(b["logits"].as_array().unwrap())
    {
        for (x, y) in ra.as_array().unwrap().iter().zip(rb.as_array().unwrap()) {
            let (x, y) = (x.as_f64().unwrap(), y.as_f64().unwrap());
            assert!(
                (x - y).abs() <= 1e-5 * x.abs().max(1.0),
                "imported biases change the logits: {x} vs {y}"
            );
        }
    }
}

#[test]
fn bert_cls_value_query_output_and_layernorm() {
    roundtrip(TinyArch::Bert, "cls", "v,q,o,ln1,mlp-out");
}

#[test]
fn bert_mean_pooling_value_bias() {
    roundtrip(TinyArch::Bert, "mean", "v");
}

#[test]
fn roberta_cls_all_biases() {
    roundtrip(TinyArch::Roberta, "cls", "all");
}
