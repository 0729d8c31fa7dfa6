//! The matrix products of a training step at batch 16 × 128 tokens, for
//! all-MiniLM-L6-v2 (d = 384, ff = 1536) and BERT-base (d = 768, ff = 3072):
//! forward `x·Wᵀ` (tb) and backward `dy·W`, on the fast backend and the
//! reference, and the fast backend's bf16 product (`BEFT_CPU_GEMM=bf16`):
//! `_fast_bf16_dot` where the CPU has AVX-512 BF16, `_fast_bf16_amx` where
//! it has AMX-BF16 too. Criterion reports FLOP/s (2·m·n·k per product).

use beft::backend::cpu::CpuBackend;
use beft::backend::fast::amx;
use beft::backend::fast::gemm16::{self, BSrc, Kernel};
use beft::backend::fast::FastCpu;
use beft::backend::Backend;
use beft::rng::Rng;
use beft::weights::TensorView;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

/// Large buffers on cache-line boundaries, so that the bf16 products can
/// write them with streaming stores (`beft::alloc`).
#[global_allocator]
static ALLOC: beft::alloc::LineAligned = beft::alloc::LineAligned;

fn bench_matmul(c: &mut Criterion) {
    let rows = 16 * 128;
    let mut rng = Rng::new(0);
    let fast = FastCpu::new();
    let reference = CpuBackend::<f32>::new();
    for (model, d, ff) in [("minilm", 384usize, 1536usize), ("bert_base", 768, 3072)] {
        let mut g = c.benchmark_group(format!("matmul_{model}"));
        g.sample_size(10);
        // (name, m, n, k, tb): forward x·Wᵀ has W stored [n, k]; backward dy·W
        // has W stored [k, n].
        for (name, n, k, tb) in [
            ("qkvo_fwd", d, d, true),
            ("mlp_in_fwd", ff, d, true),
            ("mlp_out_fwd", d, ff, true),
            ("mlp_in_bwd", d, ff, false),
            ("mlp_out_bwd", ff, d, false),
        ] {
            let m = rows;
            let a: Vec<f32> = (0..m * k).map(|_| rng.normal() as f32).collect();
            let w: Vec<f32> = (0..n * k).map(|_| rng.normal() as f32 * 0.05).collect();
            let wt = TensorView::from_f32("w", vec![n * k], &w);
            g.throughput(Throughput::Elements((2 * m * n * k) as u64));
            {
                let (a, b, mut out) = (
                    fast.upload(&a),
                    fast.weight(&wt).unwrap(),
                    fast.zeros(m * n),
                );
                g.bench_function(format!("{name}_{m}x{n}x{k}_fast"), |bch| {
                    bch.iter(|| fast.matmul(&mut out, &a, &b, m, n, k, false, tb, false))
                });
            }
            for (kernel, on) in [
                (Kernel::Dot, gemm16::available()),
                (Kernel::Amx, amx::available()),
            ] {
                if !on {
                    continue;
                }
                let mut out = vec![0f32; m * n];
                let tag = format!("{kernel:?}").to_lowercase();
                g.bench_function(format!("{name}_{m}x{n}x{k}_fast_bf16_{tag}"), |bch| {
                    bch.iter(|| {
                        let w = BSrc::F32(&w);
                        let epi = gemm16::Epilogue::default();
                        gemm16::gemm_on(
                            kernel,
                            m,
                            n,
                            k,
                            &mut out,
                            false,
                            gemm16::ASrc::F32(&a, false),
                            w,
                            tb,
                            epi,
                        )
                    })
                });
            }
            if model == "minilm" {
                let (a, b, mut out) = (
                    reference.upload(&a),
                    reference.weight(&wt).unwrap(),
                    reference.zeros(m * n),
                );
                g.bench_function(format!("{name}_{m}x{n}x{k}_reference"), |bch| {
                    bch.iter(|| reference.matmul(&mut out, &a, &b, m, n, k, false, tb, false))
                });
            }
        }
        g.finish();
    }
}

criterion_group!(benches, bench_matmul);
criterion_main!(benches);
