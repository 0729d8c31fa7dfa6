//! Device memory of a bias-only decoder training step, resident vs streamed
//! layers and kept vs recomputed activations, measured on a simulated
//! device (the fast CPU backend with every buffer counted as device memory,
//! `beft::backend::sim`). Runs one step per mode and prints the planned and
//! measured peaks, and the step time on this CPU.
//!
//! ```sh
//! cargo run --release --example stream_sim -- MODEL_DIR [BATCH] [SEQ]
//! ```
//! MODEL_DIR is a Hugging Face decoder directory (e.g. random OPT-6.7B
//! weights written by `beft bench --write-model`).

use std::time::Instant;

use beft::backend::fast::FastCpu;
use beft::backend::sim::SimDevice;
use beft::backend::Backend;
use beft::model::config::ModelDir;
use beft::model::{BiasTerm, Decoder, DecoderOptions, Offload};
use beft::rng::Rng;
use beft::train::Slab;

/// Large buffers on cache-line boundaries, so that the bf16 products can
/// write them with streaming stores (`beft::alloc`).
#[global_allocator]
static ALLOC: beft::alloc::LineAligned = beft::alloc::LineAligned;

fn gib(b: u64) -> String {
    format!("{:.3} GiB", b as f64 / (1u64 << 30) as f64)
}

fn main() -> beft::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(dir) = args.first() else {
        eprintln!("usage: stream_sim MODEL_DIR [BATCH] [SEQ]");
        std::process::exit(2);
    };
    let batch: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(1);
    let seq: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(128);
    let md = ModelDir::open(std::path::Path::new(dir))?;
    println!(
        "{}: {} layers, hidden {}, batch {batch} x {seq} tokens, --bias v",
        md.name, md.config.num_layers, md.config.hidden_size
    );
    println!("| layers | activations | planned peak | measured load | inference peak | training peak | train/infer | step s |");
    println!("|---|---|---:|---:|---:|---:|---:|---:|");
    for (offload, recompute) in [
        (Offload::Resident, false),
        (Offload::Resident, true),
        (Offload::Stream, false),
        (Offload::Stream, true),
    ] {
        let be = SimDevice::new(FastCpu::new(), None);
        let dec = Decoder::load(
            &be,
            &md,
            DecoderOptions {
                terms: vec![BiasTerm::V],
                offload,
                recompute,
            },
        )?;
        let load = be.memory().unwrap().peak;
        let plan = dec.memory_plan(batch, seq);
        let mut rng = Rng::new(1);
        let vocab = md.config.vocab_size.min(50_000);
        let ids: Vec<u32> = (0..batch * seq)
            .map(|_| 3 + rng.below(vocab - 3) as u32)
            .collect();
        let mask = vec![1f32; batch * seq];
        let (rows, targets) = beft::bench::step::next_token_rows(batch, seq, &ids);
        let x = dec.upload(&be, batch, seq, &ids, &mask)?;
        let rt = dec.row_targets(&be, &x, &rows, &targets)?;
        let mut slab = Slab::new(&be, &dec.init);
        be.reset_peak();
        let _ = dec.logits_at(&be, &slab.params, &x, &rt);
        let infer = be.memory().unwrap().peak;
        be.reset_peak();
        let t0 = Instant::now();
        dec.lm_loss_and_grad(&be, &slab.params, &mut slab.grads, &x, &rt);
        let secs = t0.elapsed().as_secs_f64();
        let train = be.memory().unwrap().peak;
        println!(
            "| {} | {} | {} | {} | {} | {} | {:.2} | {:.1} |",
            offload.name(),
            if recompute { "recompute" } else { "keep" },
            gib(match offload {
                Offload::Resident => plan.resident(),
                Offload::Stream => plan.streamed(),
            }),
            gib(load),
            gib(infer),
            gib(train),
            train as f64 / infer as f64,
            secs
        );
    }
    Ok(())
}
