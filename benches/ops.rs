//! Criterion benches of the memory-bound and attention ops of a decoder
//! step at an OPT-125M-like shape (hidden 768, ffn 3072, 12 heads × 64,
//! 1 × 512 tokens, vocabulary 50,272), on every backend this build and
//! machine have: the fast CPU backend always, wgpu when an adapter is
//! found, CUDA when a driver is present (each device waited for after every
//! iteration). Throughput is in elements of the op's main tensor.
//! `beft bench` is the tool for rates against measured ceilings; this is
//! for tracking changes with criterion's statistics.

use beft::backend::fast::FastCpu;
use beft::backend::{Act, AttnDims, Backend};
use beft::rng::Rng;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

/// Large buffers on cache-line boundaries, so that the bf16 products can
/// write them with streaming stores (`beft::alloc`).
#[global_allocator]
static ALLOC: beft::alloc::LineAligned = beft::alloc::LineAligned;

const D: usize = 768;
const FF: usize = 3072;
const HEADS: usize = 12;
const T: usize = 512;
const VOCAB: usize = 50_272;
const LOSS_ROWS: usize = 64;

fn rand(rng: &mut Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.normal() as f32).collect()
}

fn bench_backend<B: Backend<T = f32>>(c: &mut Criterion, be: &B, name: &str) {
    let mut rng = Rng::new(7);
    let up = |v: Vec<f32>| be.upload(&v);
    let mut g = c.benchmark_group(format!("ops_{name}"));
    g.sample_size(10);

    let x = up(rand(&mut rng, T * D));
    let gamma = up(rand(&mut rng, D));
    let beta = up(rand(&mut rng, D));
    let (mut y, mut xh, mut rs) = (be.zeros(T * D), be.zeros(T * D), be.zeros(T));
    g.throughput(Throughput::Elements((T * D) as u64));
    g.bench_function("layernorm_fwd", |b| {
        b.iter(|| {
            be.layernorm_fwd(&mut y, &mut xh, &mut rs, &x, &gamma, &beta, 0, T, D, 1e-5);
            be.sync();
        })
    });
    let mut dx = be.zeros(T * D);
    g.bench_function("layernorm_bwd", |b| {
        b.iter(|| {
            be.layernorm_bwd(&mut dx, &x, &xh, &rs, &gamma, T, D);
            be.sync();
        })
    });

    let f = up(rand(&mut rng, T * FF));
    let mut h = be.zeros(T * FF);
    let mut db = be.zeros(FF);
    g.throughput(Throughput::Elements((T * FF) as u64));
    g.bench_function("act_fwd_gelu", |b| {
        b.iter(|| {
            be.act_fwd(Act::Gelu, &mut h, &f, T * FF);
            be.sync();
        })
    });
    g.bench_function("bias_grad", |b| {
        b.iter(|| {
            be.bias_grad(&mut db, 0, &f, T, FF);
            be.sync();
        })
    });

    let dims = AttnDims::self_attn(1, T, HEADS, HEADS, D / HEADS, true);
    let (q, k, v) = (
        up(rand(&mut rng, T * D)),
        up(rand(&mut rng, T * D)),
        up(rand(&mut rng, T * D)),
    );
    let mask = up(vec![1.0; T]);
    let (mut out, mut lse) = (be.zeros(T * D), be.zeros(HEADS * T));
    g.throughput(Throughput::Elements((T * D) as u64));
    g.bench_function("attention_fwd_causal", |b| {
        b.iter(|| {
            be.attention_fwd(&mut out, &mut lse, &q, &k, &v, &mask, dims, None);
            be.sync();
        })
    });
    let dout = up(rand(&mut rng, T * D));
    let (mut dq, mut dk, mut dv) = (be.zeros(T * D), be.zeros(T * D), be.zeros(T * D));
    g.bench_function("attention_bwd_causal", |b| {
        b.iter(|| {
            be.attention_bwd(
                &mut dq, &mut dk, &mut dv, &dout, &q, &k, &v, &out, &lse, &mask, dims, None,
            );
            be.sync();
        })
    });

    let logits = up(rand(&mut rng, LOSS_ROWS * VOCAB));
    let labels = be.upload_ids(
        &(0..LOSS_ROWS)
            .map(|i| (i * 7919 % VOCAB) as u32)
            .collect::<Vec<_>>(),
    );
    let (mut losses, mut dl) = (be.zeros(LOSS_ROWS), be.zeros(LOSS_ROWS * VOCAB));
    g.throughput(Throughput::Elements((LOSS_ROWS * VOCAB) as u64));
    g.bench_function("cross_entropy_vocab", |b| {
        b.iter(|| {
            be.cross_entropy(
                &mut losses,
                &mut dl,
                &logits,
                &labels,
                LOSS_ROWS,
                VOCAB,
                1.0,
            );
            be.sync();
        })
    });
    g.finish();
}

fn bench_ops(c: &mut Criterion) {
    bench_backend(c, &FastCpu::new(), "cpu");
    #[cfg(feature = "wgpu")]
    {
        if beft::backend::wgpu::adapters().is_empty() {
            eprintln!("wgpu: no adapter, skipped");
        } else {
            match beft::backend::wgpu::WgpuBackend::new(None) {
                Ok(be) => bench_backend(c, &be, "wgpu"),
                Err(e) => eprintln!("wgpu: skipped ({e})"),
            }
        }
    }
    #[cfg(feature = "cuda")]
    {
        if beft::backend::cuda::driver_present() {
            match beft::backend::cuda::CudaBackend::new(0) {
                Ok(be) => bench_backend(c, &be, "cuda"),
                Err(e) => eprintln!("cuda: skipped ({e})"),
            }
        } else {
            eprintln!("cuda: no driver, skipped");
        }
    }
}

criterion_group!(benches, bench_ops);
criterion_main!(benches);
