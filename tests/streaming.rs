//! Layer streaming (`--offload stream`) and activation recomputation
//! (`--recompute`) on the CPU backend, with a simulated small device
//! ([`SimDevice`]) that counts every buffer as device memory:
//!
//! - the four combinations of resident/streamed and kept/recomputed give
//!   the same loss and bias gradients, bit for bit, for every decoder
//!   family (GPT-2, OPT pre- and post-LN, LLaMA with GQA, Qwen2), and the
//!   same generations;
//! - streaming holds at most two layers' weights at once: its peak is below
//!   the resident peak by at least all but two layers' bytes;
//! - recomputation keeps only each layer's input: its training peak is below
//!   the kept-activation peak and close to the inference peak;
//! - under a device budget that the resident model does not fit, loading
//!   the resident model is an out-of-memory error (not a panic) and the
//!   streamed run trains with the same gradients.

mod decoder_common;

use beft::backend::fast::FastCpu;
use beft::backend::fault::catch_device_fault;
use beft::backend::sim::SimDevice;
use beft::backend::Backend;
use beft::model::config::ModelDir;
use beft::model::{BiasTerm, Decoder, DecoderOptions, Offload};
use beft::train::Slab;
use decoder_common::{next_token_rows, tiny_batch, write_decoder, write_tiny_decoder, Size, Tiny};

const ARCHS: [Tiny; 5] = [
    Tiny::Gpt2,
    Tiny::Opt,
    Tiny::OptPost,
    Tiny::Llama,
    Tiny::Qwen2,
];

fn load<B: Backend>(
    be: &B,
    md: &ModelDir,
    terms: &str,
    offload: Offload,
    recompute: bool,
) -> Decoder<B> {
    Decoder::load(
        be,
        md,
        DecoderOptions {
            terms: BiasTerm::parse_set(terms).unwrap(),
            offload,
            recompute,
        },
    )
    .expect("decoder loads")
}

/// Loss and bias gradients of one LM step on a padded batch.
fn step<B: Backend>(be: &B, dec: &Decoder<B>, lens: &[usize], seed: u64) -> (f64, Vec<f32>) {
    let (b, t, ids, mask) = tiny_batch(lens, false, seed);
    let (rows, targets) = next_token_rows(b, t, &ids, &mask);
    let x = dec.upload(be, b, t, &ids, &mask).unwrap();
    let rt = dec.row_targets(be, &x, &rows, &targets).unwrap();
    let mut slab = Slab::new(be, &dec.init);
    let loss = dec.lm_loss_and_grad(be, &slab.params, &mut slab.grads, &x, &rt);
    let g = be
        .download(&slab.grads)
        .iter()
        .map(|v| v.to_f64() as f32)
        .collect();
    (loss, g)
}

use beft::float::Float;

const MODES: [(Offload, bool); 4] = [
    (Offload::Resident, false),
    (Offload::Resident, true),
    (Offload::Stream, false),
    (Offload::Stream, true),
];

#[test]
fn streamed_and_recomputed_steps_match_resident_bit_for_bit() {
    let be = FastCpu::new().poisoned();
    for arch in ARCHS {
        let tmp = tempfile::tempdir().unwrap();
        write_tiny_decoder(tmp.path(), arch, 7);
        let md = ModelDir::open(tmp.path()).unwrap();
        for terms in ["all", "v", "mlp-out"] {
            let reference = step(
                &be,
                &load(&be, &md, terms, Offload::Resident, false),
                &[9, 5, 7],
                3,
            );
            assert!(reference.0.is_finite() && reference.1.iter().any(|g| *g != 0.0));
            for (offload, recompute) in &MODES[1..] {
                let dec = load(&be, &md, terms, *offload, *recompute);
                assert_eq!(dec.offload(), *offload);
                let got = step(&be, &dec, &[9, 5, 7], 3);
                assert_eq!(
                    got.0.to_bits(),
                    reference.0.to_bits(),
                    "{arch:?} --bias {terms} {offload:?} recompute={recompute}: loss {} vs {}",
                    got.0,
                    reference.0
                );
                assert_eq!(
                    got.1, reference.1,
                    "{arch:?} --bias {terms} {offload:?} recompute={recompute}: gradients differ"
                );
            }
        }
        println!("{arch:?}: 4 modes x 3 bias sets identical");
    }
}

#[test]
fn streamed_generation_matches_resident() {
    let be = FastCpu::new().poisoned();
    for arch in [Tiny::Opt, Tiny::Llama] {
        let tmp = tempfile::tempdir().unwrap();
        write_tiny_decoder(tmp.path(), arch, 11);
        let md = ModelDir::open(tmp.path()).unwrap();
        let prompts = vec![vec![5u32, 9, 12], vec![7u32, 3]];
        let gen = |offload| {
            let dec = load(&be, &md, "v", offload, false);
            let slab = Slab::new(&be, &dec.init);
            dec.generate_greedy(&be, &slab.params, &prompts, 6, &|_| false)
                .unwrap()
        };
        let (a, b) = (gen(Offload::Resident), gen(Offload::Stream));
        assert_eq!(a, b, "{arch:?}: streamed generation differs");
        assert!(a.iter().all(|r| r.len() == 6), "{arch:?}: {a:?}");
    }
}

/// An OPT model big enough that weights and activations are both visible
/// in the memory counts: 6 layers, hidden 64, ffn 256.
const MID: Size = Size {
    layers: 6,
    hidden: 64,
    ff: 256,
};

struct Peaks {
    load: u64,
    train: u64,
    infer: u64,
    grads: Vec<f32>,
}

fn measure(md: &ModelDir, offload: Offload, recompute: bool, cap: Option<u64>) -> Peaks {
    let be = SimDevice::new(FastCpu::new().poisoned(), cap);
    let dec = load(&be, md, "v", offload, recompute);
    let load = be.memory().unwrap().peak;
    let lens = [30, 30, 30, 30];
    let (b, t, ids, mask) = tiny_batch(&lens, false, 5);
    let (rows, targets) = next_token_rows(b, t, &ids, &mask);
    let x = dec.upload(&be, b, t, &ids, &mask).unwrap();
    let rt = dec.row_targets(&be, &x, &rows, &targets).unwrap();
    let mut slab = Slab::new(&be, &dec.init);
    be.reset_peak();
    let _ = dec.logits_at(&be, &slab.params, &x, &rt);
    let infer = be.memory().unwrap().peak;
    be.reset_peak();
    dec.lm_loss_and_grad(&be, &slab.params, &mut slab.grads, &x, &rt);
    let train = be.memory().unwrap().peak;
    let grads = be.download(&slab.grads);
    Peaks {
        load,
        train,
        infer,
        grads,
    }
}

#[test]
fn streaming_holds_two_layers_and_recompute_keeps_only_layer_inputs() {
    let tmp = tempfile::tempdir().unwrap();
    write_decoder(tmp.path(), Tiny::Opt, 3, MID);
    let md = ModelDir::open(tmp.path()).unwrap();
    let probe = SimDevice::new(FastCpu::new().poisoned(), None);
    let dec = load(&probe, &md, "v", Offload::Stream, false);
    let plan = dec.memory_plan(4, 30);
    let (other, layer, all_layers) = (plan.other_weights, plan.largest_layer, plan.all_layers);
    let nl = dec.num_layers() as u64;
    assert_eq!(nl, 6);
    assert_eq!(all_layers, nl * layer, "equal layers");
    let plan_rc = load(&probe, &md, "v", Offload::Stream, true).memory_plan(4, 30);

    let res = measure(&md, Offload::Resident, false, None);
    let st = measure(&md, Offload::Stream, false, None);
    let res_rc = measure(&md, Offload::Resident, true, None);
    let st_rc = measure(&md, Offload::Stream, true, None);
    for (name, p) in [
        ("res", &res),
        ("stream", &st),
        ("res+rc", &res_rc),
        ("stream+rc", &st_rc),
    ] {
        println!(
            "{name:>10}: load {:>8} B, inference peak {:>8} B, training peak {:>8} B (x{:.2} of inference)",
            p.load,
            p.infer,
            p.train,
            p.train as f64 / p.infer as f64
        );
        assert_eq!(p.grads, res.grads, "{name}: gradients differ from resident");
    }
    // The plan is an upper estimate of every measured peak, and not a loose one.
    for (p, est, what) in [
        (&res, plan.resident(), "resident"),
        (&st, plan.streamed(), "streamed"),
        (&res_rc, plan_rc.resident(), "resident+recompute"),
        (&st_rc, plan_rc.streamed(), "streamed+recompute"),
    ] {
        let peak = p.train.max(p.infer).max(p.load);
        println!("{what:>19}: planned {est:>8} B, measured {peak:>8} B");
        assert!(
            peak <= est,
            "{what}: measured peak {peak} above the plan {est}"
        );
        assert!(
            est <= 3 * peak,
            "{what}: plan {est} is more than 3x the peak {peak}"
        );
    }
    assert_eq!(plan.choose(plan.resident()), Offload::Resident);
    assert_eq!(plan.choose(plan.resident() - 1), Offload::Stream);
    // Resident: every layer is on the device from load on; streamed: none.
    assert!(
        res.load >= other + all_layers,
        "{} < {}",
        res.load,
        other + all_layers
    );
    assert!(
        st.load < other + layer,
        "streamed load holds layer weights: {}",
        st.load
    );
    // A streamed pass holds at most two layers at once, so it saves at
    // least all but two layers' bytes against the resident pass.
    let saving = all_layers - 2 * layer;
    for (r, s, what) in [
        (res.infer, st.infer, "inference"),
        (res.train, st.train, "training"),
        (res_rc.train, st_rc.train, "training with recompute"),
    ] {
        assert!(
            s + saving <= r,
            "{what}: streamed peak {s} is not {saving} bytes below resident {r}"
        );
    }
    // Recomputation keeps one [rows, hidden] input per layer instead of all
    // of a layer's activations.
    assert!(
        res_rc.train < res.train,
        "{} vs {}",
        res_rc.train,
        res.train
    );
    assert!(st_rc.train < st.train, "{} vs {}", st_rc.train, st.train);
    // Bias-only training with recomputation stays near inference (no weight
    // gradients, no weight optimizer state); the target on a GPU is 1.1x.
    let ratio = res_rc.train as f64 / res_rc.infer as f64;
    assert!(
        ratio < 1.5,
        "resident+recompute training/inference peak {ratio:.2}"
    );
}

#[test]
fn a_budget_the_resident_model_exceeds_is_an_oom_error_and_streaming_fits() {
    let tmp = tempfile::tempdir().unwrap();
    write_decoder(tmp.path(), Tiny::Opt, 3, MID);
    let md = ModelDir::open(tmp.path()).unwrap();
    let st = measure(&md, Offload::Stream, true, None);
    let res = measure(&md, Offload::Resident, true, None);
    let budget = st.train.max(st.infer).max(st.load) + 1024;
    assert!(
        budget < res.load,
        "the test model must not fit resident: {budget} vs {}",
        res.load
    );
    let err = catch_device_fault(|| measure(&md, Offload::Resident, true, Some(budget)))
        .err()
        .expect("the resident model does not fit the budget");
    let msg = err.to_string();
    assert!(msg.contains("out of device memory"), "{msg}");
    assert!(msg.contains("--offload stream"), "{msg}");
    let fitted = catch_device_fault(|| measure(&md, Offload::Stream, true, Some(budget)))
        .expect("the streamed model fits the budget");
    assert_eq!(fitted.grads, res.grads);
    assert!(fitted.train <= budget);
}

/// Streamed passes upload every layer once forward and once backward (the
/// recomputed forward reuses the backward's upload), and the decoder's count
/// of streamed bytes (what `beft bench --step` divides by the upload rate)
/// says so; resident layers stream nothing.
#[test]
fn streamed_bytes_count_each_layer_once_per_pass() {
    let tmp = tempfile::tempdir().unwrap();
    write_decoder(tmp.path(), Tiny::Opt, 3, MID);
    let md = ModelDir::open(tmp.path()).unwrap();
    for (offload, recompute) in MODES {
        let be = SimDevice::new(FastCpu::new().poisoned(), None);
        let dec = load(&be, &md, "v", offload, recompute);
        let all_layers = dec.memory_plan(4, 30).all_layers;
        let (b, t, ids, mask) = tiny_batch(&[30, 30, 30, 30], false, 5);
        let (rows, targets) = next_token_rows(b, t, &ids, &mask);
        let x = dec.upload(&be, b, t, &ids, &mask).unwrap();
        let rt = dec.row_targets(&be, &x, &rows, &targets).unwrap();
        let mut slab = Slab::new(&be, &dec.init);
        let _ = dec.logits_at(&be, &slab.params, &x, &rt);
        let forward = dec.streamed_bytes();
        dec.lm_loss_and_grad(&be, &slab.params, &mut slab.grads, &x, &rt);
        let step = dec.streamed_bytes() - forward;
        let what = format!("{offload:?}, recompute {recompute}");
        if offload == Offload::Stream {
            assert_eq!(forward, all_layers, "{what}: forward-only pass");
            assert_eq!(step, 2 * all_layers, "{what}: training step");
        } else {
            assert_eq!((forward, step), (0, 0), "{what}");
        }
    }
}

// ---- the command line ------------------------------------------------------

mod common;

use std::path::Path;
use std::process::{Command, Output};

fn beft(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_beft"))
        .args(["--threads", "1"])
        .args(args)
        .output()
        .unwrap()
}

/// A 6-layer OPT model directory with a (13-token) tokenizer, and SST-2-style data.
fn cli_setup(tmp: &Path) -> (String, String) {
    let model = tmp.join("opt");
    write_decoder(&model, Tiny::Opt, 3, MID);
    std::fs::write(
        model.join("tokenizer.json"),
        common::tiny_tokenizer_json(false),
    )
    .unwrap();
    let data = tmp.join("data");
    common::write_tiny_sst2(&data, 24, 8);
    (
        model.to_str().unwrap().to_string(),
        data.to_str().unwrap().to_string(),
    )
}

fn train(model: &str, data: &str, out: &Path, extra: &[&str]) -> Output {
    let mut a = vec![
        "train",
        "--model",
        model,
        "--task",
        "sst2",
        "--data",
        data,
        "--out",
        out.to_str().unwrap(),
        "--epochs",
        "2",
        "--batch",
        "4",
        "--lr",
        "1e-2",
        "--bias",
        "v",
        "--quiet",
    ];
    a.extend_from_slice(extra);
    beft(&a)
}

fn summary(out: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap()
}

fn ok(o: &Output) -> String {
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(o.status.success(), "beft failed: {err}");
    err
}

#[test]
fn cli_streamed_recomputed_training_matches_resident() {
    let tmp = tempfile::tempdir().unwrap();
    let (m, d) = cli_setup(tmp.path());
    let (a, b) = (tmp.path().join("res"), tmp.path().join("stream"));
    ok(&train(&m, &d, &a, &["--offload", "resident"]));
    ok(&train(&m, &d, &b, &["--offload", "stream", "--recompute"]));
    assert_eq!(summary(&a)["offload"], "resident");
    assert_eq!(summary(&b)["offload"], "stream");
    assert_eq!(
        std::fs::read(a.join("biases.safetensors")).unwrap(),
        std::fs::read(b.join("biases.safetensors")).unwrap(),
        "streamed + recomputed training must give the same biases"
    );

    let o = train(&m, &d, &tmp.path().join("bad"), &["--offload", "sideways"]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("--offload: unknown mode 'sideways'"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    let o = train(
        &m,
        &d,
        &tmp.path().join("bad2"),
        &["--max-gpu-memory", "lots"],
    );
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("--max-gpu-memory: cannot read 'lots'"),
        "{err}"
    );

    // Encoders refuse the decoder-only options instead of ignoring them.
    let enc = tmp.path().join("bert");
    common::write_tiny_model(&enc, common::TinyArch::Bert, 1, None);
    let o = beft(&[
        "train",
        "--model",
        enc.to_str().unwrap(),
        "--task",
        "sst2",
        "--data",
        &d,
        "--out",
        tmp.path().join("enc").to_str().unwrap(),
        "--offload",
        "stream",
        "--quiet",
    ]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("implemented for decoders"), "{err}");
}

/// On a real wgpu device (lavapipe in CI): under a budget below the
/// planned resident peak, `--offload auto` streams, stays within the budget
/// (the budget is also the allocation cap) and trains the same biases as
/// the resident run.
#[cfg(feature = "wgpu")]
#[test]
fn cli_auto_offload_streams_under_a_small_wgpu_budget() {
    if beft::backend::wgpu::adapters().is_empty() {
        assert!(
            std::env::var_os("BEFT_REQUIRE_WGPU").is_none(),
            "BEFT_REQUIRE_WGPU is set but no wgpu adapter was found"
        );
        println!("skipped: no wgpu adapter (install mesa-vulkan-drivers for lavapipe)");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (m, d) = cli_setup(tmp.path());
    let (a, b) = (tmp.path().join("res"), tmp.path().join("auto"));
    let e = ok(&train(
        &m,
        &d,
        &a,
        &["--device", "wgpu", "--max-gpu-memory", "4GiB"],
    ));
    assert!(e.contains("-> resident"), "{e}");
    let s = summary(&a);
    assert_eq!(s["offload"], "resident");
    let peak = s["peak_device_bytes"]
        .as_u64()
        .expect("wgpu counts device memory");
    // The plan is an upper estimate, so a budget just under the measured
    // resident peak is under the planned resident peak too.
    let budget = (peak - 1).to_string();
    let e = ok(&train(
        &m,
        &d,
        &b,
        &["--device", "wgpu", "--max-gpu-memory", &budget],
    ));
    assert!(e.contains("-> stream"), "{e}");
    let s = summary(&b);
    assert_eq!(s["offload"], "stream");
    let streamed = s["peak_device_bytes"].as_u64().unwrap();
    println!("wgpu peak: resident {peak} B, streamed {streamed} B (budget {budget})");
    assert!(streamed < peak, "{streamed} vs {peak}");
    assert_eq!(
        std::fs::read(a.join("biases.safetensors")).unwrap(),
        std::fs::read(b.join("biases.safetensors")).unwrap(),
    );
}

/// `--grad-accum`: the same steps (loss and gradient norm, checked in
/// tests/cli.rs) in micro-batches hold a micro-batch's activations, so the
/// training peak on the simulated device drops; the plan printed for a
/// budget is made for the micro-batch too.
#[test]
fn gradient_accumulation_lowers_the_training_peak() {
    let tmp = tempfile::tempdir().unwrap();
    let (m, d) = cli_setup(tmp.path());
    let peak = |accum: usize| {
        let args = beft::train::run::TrainArgs {
            model: m.clone().into(),
            data: d.clone().into(),
            out: tmp.path().join(format!("run-{accum}")),
            batch: 8,
            epochs: 1,
            lr: 1e-2,
            eval_batch: 2,
            eval_before: false,
            dropout: false,
            progress: false,
            grad_accum: accum,
            ..Default::default()
        };
        let be = SimDevice::new(FastCpu::new(), None);
        let s = beft::train::run::train_on(&be, &args).expect("trains");
        s.peak_device_bytes
            .expect("the simulated device counts its bytes")
    };
    let (whole, parts) = (peak(1), peak(4));
    println!("training peak: batch of 8 {whole} B, as 4 micro-batches {parts} B");
    assert!(
        (parts as f64) < 0.8 * whole as f64,
        "4 micro-batches of 2 should hold far less than a batch of 8: {parts} vs {whole} bytes"
    );
}
