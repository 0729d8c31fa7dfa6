//! One bias-only training step (`--bias v`, head trainable) and one
//! forward-only step of an all-MiniLM-L6-v2-shaped encoder (random weights)
//! at batch 16 × 128 tokens, on the fast CPU backend (`--device cpu`) and
//! the reference (`--device cpu-ref`). Criterion reports tokens/s (2,048
//! tokens per step).

use beft::backend::cpu::CpuBackend;
use beft::backend::fast::FastCpu;
use beft::backend::{Backend, PoolKind};
use beft::data::Batch;
use beft::model::config::ModelDir;
use beft::model::random::{write_random_bert, BertShape};
use beft::model::{BiasTerm, Encoder, EncoderOptions};
use beft::rng::Rng;
use beft::train::Slab;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

/// Large buffers on cache-line boundaries, so that the bf16 products can
/// write them with streaming stores (`beft::alloc`).
#[global_allocator]
static ALLOC: beft::alloc::LineAligned = beft::alloc::LineAligned;

fn bench_steps(c: &mut Criterion) {
    let tmp = tempfile::TempDir::new().unwrap();
    let shape = BertShape::MINILM_L6;
    write_random_bert(tmp.path(), shape, 0).unwrap();
    let md = ModelDir::open(tmp.path()).unwrap();
    bench_backend(c, &md, &FastCpu::new(), "minilm_cpu_b16_t128");
    bench_backend(c, &md, &CpuBackend::<f32>::new(), "minilm_cpu_ref_b16_t128");
}

fn bench_backend<B: Backend>(c: &mut Criterion, md: &ModelDir, be: &B, group: &str) {
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
    .unwrap();
    let (b, t) = (16usize, 128usize);
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
    let db = enc.upload_batch(be, &batch).unwrap();
    let mut slab = Slab::new(be, &enc.init);
    let mut g = c.benchmark_group(group);
    g.sample_size(10);
    g.throughput(Throughput::Elements((b * t) as u64));
    let mut step = 0u64;
    g.bench_function("train_step_bias_v", |bench| {
        bench.iter(|| {
            step += 1;
            be.fill(&mut slab.grads, 0.0);
            let (loss, _) = enc.loss_and_grad(be, &slab.params, &mut slab.grads, &db, Some(step));
            slab.clip(be, 1.0);
            slab.step(be, beft::backend::AdamW::with_defaults(1e-4, step));
            loss
        })
    });
    g.bench_function("forward_eval", |bench| {
        bench.iter(|| enc.logits(be, &slab.params, &db))
    });
    g.finish();
}

criterion_group!(benches, bench_steps);
criterion_main!(benches);
