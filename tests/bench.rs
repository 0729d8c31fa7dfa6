//! `beft bench` and the random-model writer: the quick op table runs on the
//! CPU and its JSON holds a positive time and rate for every op; training
//! steps are timed for a decoder and an encoder; a streamed random OPT
//! loads and trains; bad input is an error naming the bad value; the
//! PyTorch reference script runs at a tiny shape (with `BEFT_PYTHON`).

use std::path::Path;
use std::process::{Command, Output};

use beft::backend::fast::FastCpu;
use beft::backend::Backend;
use beft::float::Float;
use beft::model::config::ModelDir;
use beft::model::random::{write_random_opt, OptShape};
use beft::model::{BiasTerm, Decoder, DecoderOptions};
use beft::train::Slab;
use beft::weights::DType;
use serde_json::Value;
use tempfile::TempDir;

fn beft(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_beft"))
        .args(args)
        .args(["--threads", "1", "--quiet"])
        .output()
        .expect("run beft")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn read_json(p: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(p).expect("json written")).expect("valid JSON")
}

fn num(v: &Value, key: &str) -> f64 {
    v.get(key)
        .and_then(Value::as_f64)
        .unwrap_or_else(|| panic!("no number '{key}' in {v}"))
}

#[test]
fn quick_op_table_on_cpu_writes_positive_times_and_rates() {
    let tmp = TempDir::new().unwrap();
    let json = tmp.path().join("sub/bench.json");
    let png = tmp.path().join("ops.png");
    let o = beft(&[
        "bench",
        "--device",
        "cpu",
        "--quick",
        "--json",
        json.to_str().unwrap(),
        "--plot",
        png.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "beft bench failed: {}", stderr(&o));
    let bytes = std::fs::read(&png).expect("--plot writes the PNG");
    assert!(
        bytes.starts_with(b"\x89PNG") && bytes.len() > 10_000,
        "not a chart: {} bytes",
        bytes.len()
    );
    let table = String::from_utf8_lossy(&o.stdout);
    assert!(
        table.contains("matmul_fwd") && table.contains("copy"),
        "{table}"
    );

    let r = read_json(&json);
    assert!(r["device"].as_str().unwrap().starts_with("cpu"));
    assert!(r["date_utc"].as_str().unwrap().ends_with('Z'));
    let c = &r["ceilings"];
    let copy = num(c, "copy_gbs");
    assert!(copy.is_finite() && copy > 0.0, "copy ceiling {copy}");
    // The CPU's GEMM ceiling is the measured FMA peak (when the CPU has FMA).
    if let Some(g) = c["gemm"].as_object() {
        assert_eq!(g["source"], "cpu_fma_f32");
        assert!(g["tflops"].as_f64().unwrap() > 0.0);
    } else {
        assert!(c["gemm_note"].as_str().unwrap().contains("unavailable"));
    }
    let ops = r["ops"].as_array().unwrap();
    let names: Vec<&str> = ops.iter().map(|o| o["op"].as_str().unwrap()).collect();
    for want in [
        "matmul_fwd x·Wᵀ",
        "linear_fwd x·Wᵀ + b",
        "matmul_bwd dy·W",
        "linear_act_fwd gelu(x·Wᵀ + b)",
        "matmul_act_grad gelu'(f)·(dy·W)",
        "linear_swiglu silu(g)·(x·Wᵀ)",
        "matmul_swiglu_grad swiglu'(g, u)·(dy·W)",
        "residual_layernorm_fwd LN(s + res)",
        "bias_add",
        "bias_grad",
        "act_fwd gelu",
        "act_bwd relu",
        "layernorm_fwd",
        "layernorm_bwd",
        "rmsnorm_fwd",
        "rmsnorm_bwd",
        "attention_fwd",
        "attention_bwd",
        "embedding_fwd",
        "cross_entropy",
        "adamw",
    ] {
        assert!(names.contains(&want), "op {want} missing from {names:?}");
    }
    // fwd and bwd at 3 sizes, the fused GELU and SwiGLU gradients at ffn_down.
    assert_eq!(names.iter().filter(|n| n.starts_with("matmul")).count(), 8);
    assert_eq!(
        names.iter().filter(|n| n.starts_with("attention")).count(),
        4
    );
    for o in ops {
        let t = num(o, "median_s");
        assert!(t.is_finite() && t > 0.0, "non-positive time in {o}");
        assert!(o["launches_per_rep"].as_u64().unwrap() >= 1);
        match (o["tflops"].as_f64(), o["gbs"].as_f64()) {
            (Some(tf), None) => {
                assert!(tf > 0.0 && tf.is_finite(), "{o}");
                assert_eq!(o["ceiling"], "gemm");
            }
            (None, Some(g)) => {
                assert!(g > 0.0 && g.is_finite(), "{o}");
                assert_eq!(o["ceiling"], "copy");
                let pct = num(o, "pct_of_ceiling");
                assert!((pct - 100.0 * g / copy).abs() < 1e-6 * pct.max(1.0), "{o}");
            }
            _ => panic!("a row needs exactly one of tflops/gbs: {o}"),
        }
    }
}

#[test]
fn step_timing_for_a_decoder_and_an_encoder() {
    for (shape, kind) in [("opt-tiny", "decoder"), ("bert-tiny", "encoder")] {
        let tmp = TempDir::new().unwrap();
        let json = tmp.path().join("step.json");
        let o = Command::new(env!("CARGO_BIN_EXE_beft"))
            .args([
                "bench",
                "--device",
                "cpu",
                "--quick",
                "--step",
                "--shape",
                shape,
                "--batch",
                "2",
                "--seq",
                "16",
                "--bias",
                "v",
                "--threads",
                "1",
                "--quiet",
                "--json",
            ])
            .arg(&json)
            .env("TMPDIR", tmp.path())
            .output()
            .expect("run beft");
        assert!(o.status.success(), "{shape}: {}", stderr(&o));
        let r = read_json(&json);
        // --step alone runs no op table.
        assert!(r["ops"].as_array().unwrap().is_empty());
        let s = &r["steps"][0];
        assert_eq!(s["kind"], kind);
        assert_eq!(s["tokens_per_step"], 32);
        assert_eq!(s["step_s"].as_array().unwrap().len(), 3);
        assert!(num(s, "tokens_per_s") > 0.0);
        let tps = num(s, "tokens_per_s");
        assert!((tps - 32.0 / num(s, "step_s_median")).abs() < 1e-6 * tps);
        assert!(num(s, "first_loss").is_finite() && num(s, "last_loss").is_finite());
        assert!(num(s, "model_flops_per_step") > 0.0);
        // The CPU keeps no device-memory count; peak RSS stands in.
        assert!(s["peak_device_bytes"].is_null());
        assert!(num(s, "peak_rss_bytes") > 0.0);
        // The random model went to a temporary directory under TMPDIR
        // (here: the test's own directory), removed afterwards.
        let left: Vec<String> = std::fs::read_dir(tmp.path())
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(left, vec!["step.json".to_string()], "left behind: {left:?}");
    }
}

#[test]
fn ops_filter_times_only_the_named_families() {
    let tmp = TempDir::new().unwrap();
    let json = tmp.path().join("attn.json");
    let o = beft(&[
        "bench",
        "--quick",
        "--ops",
        "attention,adamw",
        "--json",
        json.to_str().unwrap(),
    ]);
    assert!(
        o.status.success(),
        "beft bench --ops failed: {}",
        stderr(&o)
    );
    let r = read_json(&json);
    let ops: Vec<&str> = r["ops"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["op"].as_str().unwrap())
        .collect();
    // Forward and backward, causal and padded; one AdamW row.
    assert_eq!(
        ops.iter().filter(|o| o.starts_with("attention_")).count(),
        4,
        "{ops:?}"
    );
    assert_eq!(ops.iter().filter(|o| **o == "adamw").count(), 1, "{ops:?}");
    assert_eq!(ops.len(), 5, "only the named families: {ops:?}");
}

#[test]
fn bad_input_is_an_error_naming_the_value() {
    let o = beft(&["bench", "--quick", "--ops", "attention,attn"]);
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(e.contains("--ops") && e.contains("'attn'"), "{e}");
    assert!(!e.contains("panicked"), "{e}");

    let o = beft(&["bench", "--quick", "--shapes", "bert-base,gpt-9"]);
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(e.contains("--shapes") && e.contains("'gpt-9'"), "{e}");
    assert!(!e.contains("panicked"), "{e}");

    let o = beft(&["bench", "--quick", "--step"]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("--step needs --model"),
        "{}",
        stderr(&o)
    );

    let tmp = TempDir::new().unwrap();
    let dir = tmp.path().join("m");
    let d = dir.to_str().unwrap();
    let o = beft(&[
        "bench",
        "--write-model",
        d,
        "--shape",
        "opt-tiny",
        "--dtype",
        "int8",
    ]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("'int8'"), "{}", stderr(&o));
    let o = beft(&["bench", "--write-model", d]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("needs --shape"), "{}", stderr(&o));
    let o = beft(&["bench", "--write-model", d, "--shape", "opt-7b"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("'opt-7b'"), "{}", stderr(&o));
    assert!(!dir.exists(), "nothing is written on bad input");

    let o = beft(&["bench", "--device", "tpu", "--quick"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("'tpu'"), "{}", stderr(&o));
}

#[test]
fn cuda_bench_without_a_gpu_is_a_clear_error() {
    #[cfg(feature = "cuda")]
    {
        if beft::backend::cuda::driver_present() {
            // With a GPU the quick table runs, with or without cuBLAS.
            let tmp = TempDir::new().unwrap();
            let json = tmp.path().join("cuda.json");
            let o = beft(&[
                "bench",
                "--device",
                "cuda",
                "--quick",
                "--json",
                json.to_str().unwrap(),
            ]);
            assert!(o.status.success(), "{}", stderr(&o));
            let r = read_json(&json);
            assert!(num(&r["ceilings"], "copy_gbs") > 0.0);
            assert!(
                r["ceilings"]["gemm"].is_object()
                    || r["ceilings"]["gemm_note"]
                        .as_str()
                        .unwrap()
                        .contains("unavailable")
            );
            return;
        }
        let o = beft(&["bench", "--device", "cuda", "--quick"]);
        assert!(!o.status.success());
        let e = stderr(&o);
        assert!(e.contains("no CUDA driver found"), "{e}");
        assert!(!e.contains("panicked"), "{e}");
        eprintln!(
            "skipped the CUDA run: no CUDA driver on this machine (checked the error instead)"
        );
    }
    #[cfg(not(feature = "cuda"))]
    eprintln!("skipped: built without the cuda feature");
}

/// A weight's standard deviation and whether every value is finite.
fn stats(md: &ModelDir, name: &str) -> (f64, bool) {
    let v = md.weights.get(name).unwrap().to_f64_vec();
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n;
    let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n;
    (var.sqrt(), v.iter().all(|x| x.is_finite()))
}

#[test]
fn random_opt_streams_loads_and_trains() {
    let shape = OptShape::TINY;
    let tmp = TempDir::new().unwrap();
    for (dtype, esize) in [(DType::BF16, 2u64), (DType::F32, 4)] {
        let dir = tmp.path().join(format!("opt-{dtype}"));
        let mut calls = 0;
        let mut last = (0, 0);
        let bytes = write_random_opt(&dir, shape, dtype, 3, &mut |d, t| {
            calls += 1;
            last = (d, t);
        })
        .unwrap();
        // Every parameter written once, at the dtype's width, after the header.
        let data = shape.params() * esize;
        assert_eq!(last, (data, data));
        assert!(calls >= 2);
        assert_eq!(
            std::fs::metadata(dir.join("model.safetensors"))
                .unwrap()
                .len(),
            bytes
        );
        assert!(bytes > data && bytes - data < 64 * 1024);

        let md = ModelDir::open(&dir).unwrap();
        assert_eq!(md.config.model_type, "opt");
        assert_eq!(md.config.hidden_size, shape.hidden);
        let (std, finite) = stats(&md, "model.decoder.layers.1.fc1.weight");
        assert!(finite && (std - 0.02).abs() < 0.002, "weight std {std}");
        let (std, _) = stats(&md, "model.decoder.layers.0.self_attn.v_proj.bias");
        assert!((std - 0.01).abs() < 0.004, "bias std {std}");
        let g = md
            .weights
            .get("model.decoder.final_layer_norm.weight")
            .unwrap()
            .to_f64_vec();
        assert!(g.iter().all(|&x| x == 1.0));

        // Load on the CPU and take a forward/backward pass.
        let be = FastCpu::new();
        let dec = Decoder::load(
            &be,
            &md,
            DecoderOptions {
                terms: vec![BiasTerm::V],
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(dec.trainable_params(), shape.layers * shape.hidden);
        let (b, t) = (2usize, 12usize);
        let ids: Vec<u32> = (0..b * t).map(|i| (7 + 31 * i % 990) as u32).collect();
        let mask = vec![1f32; b * t];
        let x = dec.upload(&be, b, t, &ids, &mask).unwrap();
        let rows: Vec<u32> = (0..(b * t - 1) as u32)
            .filter(|r| (r + 1) % t as u32 != 0)
            .collect();
        let targets: Vec<u32> = rows.iter().map(|&r| ids[r as usize + 1]).collect();
        let rt = dec.row_targets(&be, &x, &rows, &targets).unwrap();
        let mut slab = Slab::new(&be, &dec.init);
        let loss = dec.lm_loss_and_grad(&be, &slab.params, &mut slab.grads, &x, &rt);
        // Near-uniform predictions from small random weights: loss ≈ ln(vocab).
        let uniform = (shape.vocab as f64).ln();
        assert!(
            (loss - uniform).abs() < 0.5,
            "loss {loss} vs ln(vocab) {uniform}"
        );
        let g: Vec<f64> = be
            .download(&slab.grads)
            .iter()
            .map(|x| x.to_f64())
            .collect();
        assert!(g.iter().all(|x| x.is_finite()));
        assert!(g.iter().any(|&x| x != 0.0), "b_v gradient is all zero");
    }

    // Deterministic: the same seed gives the same bytes; another seed differs.
    let a = tmp.path().join("a");
    let b = tmp.path().join("b");
    let c = tmp.path().join("c");
    write_random_opt(&a, shape, DType::BF16, 9, &mut |_, _| {}).unwrap();
    write_random_opt(&b, shape, DType::BF16, 9, &mut |_, _| {}).unwrap();
    write_random_opt(&c, shape, DType::BF16, 10, &mut |_, _| {}).unwrap();
    let read = |d: &Path| std::fs::read(d.join("model.safetensors")).unwrap();
    assert_eq!(read(&a), read(&b));
    assert_ne!(read(&a), read(&c));
    // No temporary file is left behind.
    let names: Vec<String> = std::fs::read_dir(&a)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");
}

#[test]
fn pytorch_reference_script_runs_on_cpu() {
    let Some(py) = std::env::var_os("BEFT_PYTHON") else {
        eprintln!("skipped: BEFT_PYTHON is not set (a python with torch and transformers; see scripts/python_env.sh)");
        return;
    };
    let tmp = TempDir::new().unwrap();
    let json = tmp.path().join("torch.json");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/compare/pytorch_gpu.py");
    let o = Command::new(py)
        .arg(&script)
        .args(["--device", "cpu", "--tiny", "--json"])
        .arg(&json)
        .env("OMP_NUM_THREADS", "1")
        .output()
        .expect("run python");
    assert!(o.status.success(), "pytorch_gpu.py failed: {}", stderr(&o));
    let r = read_json(&json);
    let rows = r["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 2, "{rows:?}");
    for (row, (model, trainable)) in rows.iter().zip([
        ("opt-tiny", 2 * 64),
        ("bert-tiny", 2 * 64 + 64 * 2 + 2 + 64),
    ]) {
        assert_eq!(row["model"], model);
        assert_eq!(row["mode"], "eager");
        // Only the same biases train as in beft (--bias v; the encoder's head too).
        assert_eq!(row["trainable_params"], trainable, "{row}");
        assert!(num(row, "tokens_per_s") > 0.0);
        assert!(num(row, "last_loss").is_finite());
    }
}

#[test]
fn wgpu_bench_counts_device_memory() {
    #[cfg(feature = "wgpu")]
    {
        if beft::backend::wgpu::adapters().is_empty() {
            if std::env::var("BEFT_REQUIRE_WGPU").as_deref() == Ok("1") {
                panic!("BEFT_REQUIRE_WGPU=1 but no wgpu adapter was found");
            }
            eprintln!("skipped: no wgpu adapter (install mesa-vulkan-drivers for lavapipe)");
            return;
        }
        let tmp = TempDir::new().unwrap();
        let json = tmp.path().join("wgpu.json");
        // --step with an explicit --shapes runs the op table too.
        let o = Command::new(env!("CARGO_BIN_EXE_beft"))
            .args([
                "bench", "--device", "wgpu", "--quick", "--quiet", "--step", "--shape", "opt-tiny",
                "--shapes", "opt-tiny", "--batch", "2", "--seq", "16", "--json",
            ])
            .arg(&json)
            .env("TMPDIR", tmp.path())
            .output()
            .expect("run beft");
        assert!(o.status.success(), "{}", stderr(&o));
        let r = read_json(&json);
        assert!(r["device"].as_str().unwrap().starts_with("wgpu"));
        assert!(r["ceilings"]["gemm"].is_null());
        assert!(r["ceilings"]["gemm_note"]
            .as_str()
            .unwrap()
            .contains("unavailable"));
        assert!(num(&r["ceilings"], "copy_gbs") > 0.0);
        let ops = r["ops"].as_array().unwrap();
        // 13 product rows (3 sizes x fwd, linear, bwd; the FFN's fused GELU
        // and SwiGLU forward and backward) + 19 others (the residual
        // LayerNorm among them)
        assert_eq!(ops.len(), 32);
        for o in ops {
            assert!(num(o, "median_s") > 0.0, "{o}");
        }
        let s = &r["steps"][0];
        let (loaded, peak) = (num(s, "loaded_device_bytes"), num(s, "peak_device_bytes"));
        // The weights alone are resident after loading; the step's activations add to it.
        assert!(
            loaded > 0.0 && peak > loaded,
            "loaded {loaded}, peak {peak}"
        );
        assert!(s["mfu"].is_null());
        assert!(num(s, "last_loss").is_finite());
        // Resident layers stream nothing, so no upload bound is reported.
        assert!(s["streamed_bytes_per_step"].is_null());
        assert!(s["upload_bound_fraction"].is_null());

        // Streamed layers: the bytes streamed per step, the upload path's rate
        // and the step time it bounds.
        let o = Command::new(env!("CARGO_BIN_EXE_beft"))
            .args([
                "bench",
                "--device",
                "wgpu",
                "--quick",
                "--quiet",
                "--step",
                "--shape",
                "opt-tiny",
                "--batch",
                "2",
                "--seq",
                "16",
                "--offload",
                "stream",
                "--json",
            ])
            .arg(&json)
            .env("TMPDIR", tmp.path())
            .output()
            .expect("run beft");
        assert!(o.status.success(), "{}", stderr(&o));
        let out = String::from_utf8_lossy(&o.stdout);
        assert!(out.contains("of layer weights per step"), "{out}");
        let s = &read_json(&json)["steps"][0];
        assert_eq!(s["offload"], "stream");
        let (bytes, rate, bound) = (
            num(s, "streamed_bytes_per_step"),
            num(s, "upload_bytes_per_s"),
            num(s, "upload_bound_s"),
        );
        assert!(bytes > 0.0 && rate > 0.0, "{s}");
        assert!((bound - bytes / rate).abs() <= 1e-9 * bound.max(1.0), "{s}");
        let frac = num(s, "upload_bound_fraction");
        assert!((frac - bound / num(s, "step_s_median")).abs() < 1e-9, "{s}");
    }
    #[cfg(not(feature = "wgpu"))]
    eprintln!("skipped: built without the wgpu feature");
}
