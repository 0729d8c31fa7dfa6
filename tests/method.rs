//! The BEFT method commands on tiny random models: `rank` (three scores per
//! term and layer, plots), `sweep` (grid, resume, tables, plot) and `plot`.

mod common;

use std::fs;
use std::path::Path;
use std::process::{Command, Output};

use beft::method::rank::beft_score;
use common::{write_tiny_model, write_tiny_sst2, TinyArch};

fn beft(args: &[&str]) -> Output {
    let o = Command::new(env!("CARGO_BIN_EXE_beft"))
        .args(args)
        .args(["--threads", "1"])
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "beft {args:?} failed:\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

fn is_png(p: &Path) -> bool {
    fs::read(p)
        .map(|b| b.len() > 1000 && b.starts_with(b"\x89PNG\r\n\x1a\n"))
        .unwrap_or(false)
}

fn setup() -> (tempfile::TempDir, String, String) {
    let tmp = tempfile::TempDir::new().unwrap();
    let model = tmp.path().join("model");
    let data = tmp.path().join("data");
    write_tiny_model(&model, TinyArch::Bert, 1, None);
    write_tiny_sst2(&data, 40, 16);
    let (m, d) = (model.display().to_string(), data.display().to_string());
    (tmp, m, d)
}

#[test]
fn beft_score_definition() {
    let b0 = [1.0, -2.0, 0.5];
    assert!(
        beft_score(&b0, &b0).abs() < 1e-15,
        "unchanged bias scores 0"
    );
    let doubled: Vec<f64> = b0.iter().map(|x| 2.0 * x).collect();
    // 1 − (b·2b)/max(|b|,|2b|)² = 1 − 2|b|²/4|b|² = 0.5
    assert!((beft_score(&b0, &doubled) - 0.5).abs() < 1e-12);
    let flipped: Vec<f64> = b0.iter().map(|x| -x).collect();
    assert!((beft_score(&b0, &flipped) - 2.0).abs() < 1e-12);
}

#[test]
fn rank_writes_scores_and_plots() {
    let (tmp, m, d) = setup();
    let out = tmp.path().join("rank");
    let o = beft(&[
        "rank",
        "--model",
        &m,
        "--task",
        "sst2",
        "--data",
        &d,
        "--epochs",
        "2",
        "--batch",
        "8",
        "--lr",
        "1e-2",
        "--pooling",
        "mean",
        "--quiet",
        "--out",
        out.to_str().unwrap(),
    ]);
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(stdout.contains("by fisher:"), "{stdout}");
    let r: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(out.join("ranking.json")).unwrap()).unwrap();
    let terms = r["terms"].as_object().unwrap();
    assert_eq!(terms.len(), 8);
    for (name, t) in terms {
        assert_eq!(
            t["fisher"].as_array().unwrap().len(),
            2,
            "{name}: one score per layer"
        );
        for k in ["beft_score_mean", "magnitude_mean", "fisher_mean"] {
            assert!(t[k].as_f64().unwrap().is_finite(), "{name}.{k}");
        }
    }
    // b_k's gradient vanishes: its Fisher score is negligible next to b_v's.
    let fk = terms["k"]["fisher_mean"].as_f64().unwrap();
    let fv = terms["v"]["fisher_mean"].as_f64().unwrap();
    assert!(fv > 0.0 && fk < 1e-6 * fv, "fisher k {fk} vs v {fv}");
    assert!(
        terms["v"]["magnitude_mean"].as_f64().unwrap() > 0.0,
        "the all-bias run moved b_v"
    );
    for f in [
        "heatmap_beft_score.png",
        "heatmap_fisher.png",
        "heatmap_magnitude.png",
        "bars_beft_score.png",
        "bars_fisher.png",
        "bars_magnitude.png",
    ] {
        assert!(is_png(&out.join(f)), "{f}");
    }
    assert!(out.join("bitfit/biases.safetensors").is_file());
}

#[test]
fn sweep_runs_the_grid_resumes_and_tabulates() {
    let (tmp, m, d) = setup();
    let out = tmp.path().join("sweep");
    let args = [
        "sweep",
        "--model",
        &m,
        "--task",
        "sst2",
        "--data",
        &d,
        "--epochs",
        "2",
        "--batch",
        "8",
        "--pooling",
        "mean",
        "--terms",
        "v,all",
        "--seeds",
        "0,1",
        "--lr",
        "1e-2",
        "--quiet",
        "--out",
        out.to_str().unwrap(),
    ];
    beft(&args);
    let csv = fs::read_to_string(out.join("results.csv")).unwrap();
    assert_eq!(csv.lines().count(), 1 + 4, "{csv}");
    let md = fs::read_to_string(out.join("results.md")).unwrap();
    assert!(
        md.contains("| v |") && md.contains("| all |") && md.contains(" ± "),
        "{md}"
    );
    assert!(is_png(&out.join("dev_metric_by_epoch.png")));
    // Resume: finished cells are not rerun.
    let stamp = fs::metadata(out.join("runs/v-seed0/summary.json"))
        .unwrap()
        .modified()
        .unwrap();
    let o = beft(&args);
    assert!(String::from_utf8_lossy(&o.stderr).contains("done already"));
    assert_eq!(
        stamp,
        fs::metadata(out.join("runs/v-seed0/summary.json"))
            .unwrap()
            .modified()
            .unwrap()
    );
    // A learning-rate grid adds a dimension.
    let out2 = tmp.path().join("lr");
    beft(&[
        "sweep",
        "--model",
        &m,
        "--task",
        "sst2",
        "--data",
        &d,
        "--epochs",
        "1",
        "--batch",
        "8",
        "--pooling",
        "mean",
        "--terms",
        "v",
        "--seeds",
        "0",
        "--lrs",
        "1e-3,1e-2",
        "--quiet",
        "--out",
        out2.to_str().unwrap(),
    ]);
    assert_eq!(
        fs::read_to_string(out2.join("results.csv"))
            .unwrap()
            .lines()
            .count(),
        3
    );
}

#[test]
fn plot_draws_a_run() {
    let (tmp, m, d) = setup();
    let run = tmp.path().join("run");
    beft(&[
        "train",
        "--model",
        &m,
        "--task",
        "sst2",
        "--data",
        &d,
        "--epochs",
        "2",
        "--batch",
        "8",
        "--quiet",
        "--out",
        run.to_str().unwrap(),
    ]);
    beft(&["plot", run.to_str().unwrap()]);
    assert!(is_png(&run.join("loss.png")));
    assert!(is_png(&run.join("dev_metric.png")));
}
