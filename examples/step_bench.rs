//! Time beft's training step or forward pass at a fixed shape and print one
//! JSON line (used by `benches/compare/compare_cpu.sh` next to `benches/compare/pytorch_cpu.py`).
//!
//! ```sh
//! cargo run --release --example step_bench -- --shape minilm --batch 16 --seq 128 --threads 2
//! cargo run --release --example step_bench -- --model ~/.cache/beft/models/all-MiniLM-L6-v2 --mode eval
//! ```
//!
//! A training step is `--bias v` with the classifier head trainable, mean
//! pooling, dropout on, clipping at 1.0 and an AdamW step, as in `beft
//! train`; an eval step is the forward pass only. Without `--model` the
//! weights are random (written to a temporary directory).

use std::time::Instant;

use beft::backend::cpu::CpuBackend;
use beft::backend::fast::FastCpu;
use beft::backend::{AdamW, Backend, PoolKind};
use beft::data::Batch;
use beft::model::config::ModelDir;
use beft::model::random::{write_random_bert, BertShape};
use beft::model::{BiasTerm, Encoder, EncoderOptions};
use beft::rng::Rng;
use beft::train::Slab;

/// Large buffers on cache-line boundaries, so that the bf16 products can
/// write them with streaming stores (`beft::alloc`).
#[global_allocator]
static ALLOC: beft::alloc::LineAligned = beft::alloc::LineAligned;

struct Args {
    shape: String,
    model: Option<String>,
    mode: String,
    device: String,
    batch: usize,
    seq: usize,
    threads: usize,
    steps: usize,
    warmup: usize,
}

fn parse() -> Args {
    let mut a = Args {
        shape: "minilm".into(),
        model: None,
        mode: "train".into(),
        device: "cpu".into(),
        batch: 16,
        seq: 128,
        threads: 2,
        steps: 5,
        warmup: 1,
    };
    let v: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < v.len() {
        let val = v.get(i + 1).cloned().unwrap_or_default();
        match v[i].as_str() {
            "--shape" => a.shape = val,
            "--model" => a.model = Some(val).filter(|s| !s.is_empty()),
            "--mode" => a.mode = val,
            "--device" => a.device = val,
            "--batch" => a.batch = val.parse().expect("--batch"),
            "--seq" => a.seq = val.parse().expect("--seq"),
            "--threads" => a.threads = val.parse().expect("--threads"),
            "--steps" => a.steps = val.parse().expect("--steps"),
            "--warmup" => a.warmup = val.parse().expect("--warmup"),
            other => panic!("unknown argument {other}"),
        }
        i += 2;
    }
    a
}

fn peak_rss() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .unwrap_or(0)
        * 1024
}

/// CPU time (user + system) of this process so far, in seconds.
fn cpu_seconds() -> f64 {
    let s = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let rest = s.rsplit_once(')').map(|x| x.1).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let tick = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // Fields 14 and 15 of /proc/PID/stat (utime, stime), in clock ticks.
    (tick(11) + tick(12)) / 100.0
}

fn run<B: Backend>(be: &B, a: &Args, md: &ModelDir) -> (Vec<f64>, Vec<f64>) {
    let enc = Encoder::load(
        be,
        md,
        EncoderOptions {
            pooling: PoolKind::Mean,
            num_labels: 2,
            terms: vec![BiasTerm::V],
            seed: 0,
        },
    )
    .expect("encoder loads");
    let (b, t) = (a.batch, a.seq);
    let mut rng = Rng::new(1);
    let batch = Batch {
        batch: b,
        seq: t,
        ids: (0..b * t).map(|_| 1000 + rng.below(20000) as u32).collect(),
        type_ids: vec![0; b * t],
        mask: vec![1.0; b * t],
        labels: (0..b).map(|i| (i % 2) as f32).collect(),
        tokens: b * t,
    };
    let db = enc.upload_batch(be, &batch).expect("batch");
    let mut slab = Slab::new(be, &enc.init);
    let mut times = Vec::new();
    let mut cpu = Vec::new();
    for step in 0..(a.warmup + a.steps) as u64 {
        let t0 = Instant::now();
        let c0 = cpu_seconds();
        if a.mode == "train" {
            be.fill(&mut slab.grads, 0.0);
            let _ = enc.loss_and_grad(be, &slab.params, &mut slab.grads, &db, Some(step + 1));
            slab.clip(be, 1.0);
            slab.step(be, AdamW::with_defaults(1e-4, step + 1));
        } else {
            let _ = enc.logits(be, &slab.params, &db);
        }
        if step as usize >= a.warmup {
            times.push(t0.elapsed().as_secs_f64());
            cpu.push(cpu_seconds() - c0);
        }
    }
    (times, cpu)
}

fn main() {
    let a = parse();
    rayon::ThreadPoolBuilder::new()
        .num_threads(a.threads)
        .build_global()
        .expect("thread pool");
    let tmp;
    let (dir, weights) = match &a.model {
        Some(m) => (std::path::PathBuf::from(m), "real"),
        None => {
            tmp = tempfile::TempDir::new().expect("tempdir");
            let shape = match a.shape.as_str() {
                "minilm" => BertShape::MINILM_L6,
                "bert-base" => BertShape::BERT_BASE,
                s => panic!("unknown shape {s} (minilm, bert-base)"),
            };
            write_random_bert(tmp.path(), shape, 0).expect("random model");
            (tmp.path().to_path_buf(), "random")
        }
    };
    let md = ModelDir::open(&dir).expect("model dir");
    let ((times, cpu), name) = match a.device.as_str() {
        "cpu" => {
            let be = FastCpu::from_env().unwrap_or_else(|e| panic!("{e}"));
            (run(&be, &a, &md), be.name())
        }
        "cpu-ref" => {
            let be = CpuBackend::<f32>::new();
            (run(&be, &a, &md), be.name())
        }
        d => panic!("unknown device {d} (cpu, cpu-ref)"),
    };
    let mut sorted = times.clone();
    sorted.sort_by(|x, y| x.partial_cmp(y).unwrap());
    let med = sorted[sorted.len() / 2];
    println!(
        "{}",
        serde_json::json!({
            "engine": "beft",
            "device": name,
            "shape": a.shape,
            "weights": weights,
            "mode": a.mode,
            "batch": a.batch,
            "seq": a.seq,
            "threads": a.threads,
            "step_s_median": med,
            "step_s": times,
            "cpu_s": cpu,
            "tokens_per_s": (a.batch * a.seq) as f64 / med,
            "peak_rss_bytes": peak_rss(),
        })
    );
}
