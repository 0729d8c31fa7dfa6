//! The CUDA backend against the CPU oracle: every op on fresh random inputs
//! at ragged shapes (sizes that are not multiples of any tile, odd head
//! counts, grouped-query attention, the KV-cache shape), outputs poisoned
//! with NaN before each run so that an element the kernel never writes
//! fails; then whole training steps (loss and every bias gradient) of tiny
//! random BERT and RoBERTa models and, when it is in the cache,
//! all-MiniLM-L6-v2.
//!
//! Tolerance per element: `|gpu - cpu| <= atol + rtol·|cpu|`. Each check
//! prints its maximum error (run with `--nocapture` to collect them).
//!
//! The same on the CPU emulator of the kernels (`BEFT_CUDA_EMU`, see
//! docs/cuda-emulator.md; `.ci/run` sets it), plus `beft train --device
//! cuda` against `--device cpu`. Without a CUDA driver or the emulator every
//! test prints "skipped: no CUDA driver" and returns; the no-driver CLI
//! behaviour is checked by `cuda_device_without_driver_is_a_clean_error`,
//! which runs only then (or, on the emulator, in a child process without it).
#![cfg(feature = "cuda")]

mod common;

use std::path::PathBuf;

use beft::backend::cpu::{attn_dropout_index, CpuBackend, CpuBuf};
use beft::backend::cuda::{
    driver_present, Attn, CudaBackend, CudaBuf, Gemm, WeightDtype, NO_DRIVER,
};
use beft::backend::fault::{catch_device_fault, DeviceFault};
use beft::backend::{
    dropout_keep, Act, AdamW, AttnDims, Backend, CandidateIndex, Dropout, PoolKind,
};
use beft::data::Batch;
use beft::model::config::ModelDir;
use beft::model::{BiasTerm, Encoder, EncoderOptions};
use beft::rng::Rng;
use beft::weights::{write_safetensors, TensorView, WeightStore};
use common::{bf16_round, write_tiny_model, write_tiny_sst2, TinyArch, TINY_VOCAB};
use tempfile::TempDir;

type Cpu = CpuBackend<f32>;

/// Print device faults. A CUDA error inside an op (a failed launch, an
/// illegal address) is raised as a `DeviceFault` panic, whose payload the
/// library's panic hook keeps silent (the CLI reports it as an error); in a
/// test nothing would say which kernel failed or why.
fn loud_device_faults() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // Let the library install its quiet hook first, then print ahead of it.
        let _ = catch_device_fault(|| ());
        let prev = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if let Some(f) = info.payload().downcast_ref::<DeviceFault>() {
                let at = info
                    .location()
                    .map(|l| format!(" at {}:{}", l.file(), l.line()))
                    .unwrap_or_default();
                eprintln!("device fault{at}: {}", f.0);
            }
            prev(info)
        }));
    });
}

/// The GPU backend (weights as `dt`), or `None` after printing why.
fn gpu(dt: WeightDtype) -> Option<CudaBackend> {
    if !driver_present() {
        eprintln!("skipped: no CUDA driver");
        return None;
    }
    loud_device_faults();
    match CudaBackend::with_weight_dtype(0, dt) {
        Ok(b) => {
            eprintln!("device: {}", b.name());
            Some(b)
        }
        Err(e) => panic!("a CUDA driver is present but the backend failed to start: {e}"),
    }
}

/// The GPU backend twice: f32 weights and bf16 weights.
fn gpus() -> Option<(CudaBackend, CudaBackend)> {
    Some((gpu(WeightDtype::F32)?, gpu(WeightDtype::Bf16)?))
}

fn rand_vec(rng: &mut Rng, n: usize, scale: f64) -> Vec<f32> {
    (0..n).map(|_| (rng.normal() * scale) as f32).collect()
}

fn nan(g: &CudaBackend, n: usize) -> CudaBuf {
    g.upload(&vec![f32::NAN; n])
}

/// Assert `got` matches `want` element-wise; returns the max absolute error.
fn close(what: &str, got: &[f32], want: &[f32], atol: f32, rtol: f32) -> f32 {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let mut worst = 0f32;
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        if w.is_infinite() || w.is_nan() {
            assert!(
                g == w || (g.is_nan() && w.is_nan()),
                "{what}[{i}]: got {g}, want {w}"
            );
            continue;
        }
        let e = (g - w).abs();
        assert!(
            e <= atol + rtol * w.abs(),
            "{what}[{i}]: got {g}, want {w} (|err| {e:.3e} > {:.3e})",
            atol + rtol * w.abs()
        );
        worst = worst.max(e);
    }
    eprintln!("{what}: max |err| = {worst:.3e} over {} values", want.len());
    worst
}

fn cv(b: &CpuBuf<f32>) -> Vec<f32> {
    b.to_vec()
}

// ---- dense algebra ----------------------------------------------------------

/// Naive f64 product and the bound Σ|a||b| per element.
fn naive_matmul(
    a: &[f32],
    b: &[f32],
    m: usize,
    n: usize,
    k: usize,
    ta: bool,
    tb: bool,
) -> (Vec<f64>, Vec<f64>) {
    let mut c = vec![0f64; m * n];
    let mut bound = vec![0f64; m * n];
    for i in 0..m {
        for j in 0..n {
            let (mut s, mut sa) = (0f64, 0f64);
            for p in 0..k {
                let av = if ta { a[p * m + i] } else { a[i * k + p] } as f64;
                let bv = if tb { b[j * k + p] } else { b[p * n + j] } as f64;
                s += av * bv;
                sa += (av * bv).abs();
            }
            c[i * n + j] = s;
            bound[i * n + j] = sa;
        }
    }
    (c, bound)
}

/// `got` against the f64 product `want` within `rel · Σ|a||b| + 1e-6`.
fn check_product(what: &str, got: &[f32], want: &[f64], bound: &[f64], rel: f64) {
    let mut worst = 0f64;
    for (i, ((g, w), s)) in got.iter().zip(want).zip(bound).enumerate() {
        let e = (*g as f64 - w).abs();
        assert!(
            e <= rel * s + 1e-6,
            "{what}[{i}]: got {g}, want {w} (|err| {e:.3e}, bound {:.3e})",
            rel * s + 1e-6
        );
        worst = worst.max(e);
    }
    eprintln!("{what}: max |err| = {worst:.3e} over {} values", got.len());
}

const MATMUL_SHAPES: &[(usize, usize, usize)] = &[
    (1, 1, 1),
    (3, 5, 7),
    (17, 9, 33),
    (70, 3, 5),
    (65, 130, 97),
    (128, 384, 384),
    (200, 64, 1536),
];

/// The tiled GEMMs (kernels/gemm.cu, and kernels/gemm_sm90.cu on compute
/// capability 9.0) against the f64 product, on the shapes they take
/// (activations k-contiguous, k and n multiples of 8; ragged m, n and k
/// against their 128×128×32 and 128×256×64 tiles, odd and even k-tile
/// counts; more than 8 block rows), for both weight layouts, with and
/// without accumulation; the simple kernel on the same inputs beside them.
#[test]
fn tiled_gemm_matches_cpu_and_the_simple_kernel() {
    let Some(mut g) = gpu(WeightDtype::Bf16) else {
        return;
    };
    let mut rng = Rng::new(11);
    for &(m, n, k) in &[
        (77, 136, 200),
        (300, 264, 512),
        (129, 8, 8),
        (5, 392, 40),
        (1100, 64, 96),
        (70, 520, 136),
        (256, 768, 768),
    ] {
        for tb in [true, false] {
            let a = rand_vec(&mut rng, m * k, 1.0);
            let b = rand_vec(&mut rng, k * n, 1.0);
            let c0 = rand_vec(&mut rng, m * n, 1.0);
            let (a16, b16) = (bf16_round(&a), bf16_round(&b));
            let shape = if tb { vec![n, k] } else { vec![k, n] };
            let bw = TensorView::from_f32("w", shape, &b);
            let (ga, gb) = (g.upload(&a), g.weight(&bw).unwrap());
            // The f64 references: activations as given, and rounded to bf16
            // (for the modes that round them).
            let refs = [
                naive_matmul(&a, &b16, m, n, k, false, tb),
                naive_matmul(&a16, &b16, m, n, k, false, tb),
            ];
            // The bias slab: this product's bias at offset 3 of it.
            let slab = rand_vec(&mut rng, n + 5, 1.0);
            let gslab = g.upload(&slab);
            // Epilogues: overwrite, accumulate, and the fused bias (matmul_bias).
            for (acc, bias) in [(false, false), (true, false), (false, true)] {
                for (mode, rounded, rel) in [
                    (Gemm::Simple, false, 2e-5),
                    (Gemm::Tiled, false, 2e-5),
                    (Gemm::Bf16, true, 2e-5),
                    (Gemm::Wgmma, false, 2e-5),
                    (Gemm::WgmmaBf16, true, 2e-5),
                ] {
                    g.set_gemm(mode);
                    let hopper = matches!(mode, Gemm::Wgmma | Gemm::WgmmaBf16);
                    assert!(
                        !(hopper && g.gemm() != mode && g.name().contains(", sm_90,")),
                        "{mode:?}: the wgmma kernels did not load on this sm_90 device (see the \
                         warning above)"
                    );
                    if g.gemm() != mode {
                        eprintln!(
                            "skipped {mode:?}: not on this GPU (the tiled kernels need their shared \
                             memory, the wgmma ones compute capability 9.0)"
                        );
                        continue;
                    }
                    let mut c = if acc { g.upload(&c0) } else { nan(&g, m * n) };
                    if bias {
                        g.matmul_bias(&mut c, &ga, &gb, (&gslab, 3), m, n, k, false, tb);
                    } else {
                        g.matmul(&mut c, &ga, &gb, m, n, k, false, tb, acc);
                    }
                    let (want, bound) = &refs[rounded as usize];
                    let mut want = want.clone();
                    if acc {
                        for (w, c) in want.iter_mut().zip(&c0) {
                            *w += *c as f64;
                        }
                    }
                    if bias {
                        for (i, w) in want.iter_mut().enumerate() {
                            *w += slab[3 + i % n] as f64;
                        }
                    }
                    let tag = format!("gemm {mode:?} {m}x{n}x{k} tb={tb} acc={acc} bias={bias}");
                    check_product(&tag, &g.download(&c), &want, bound, rel);
                }
            }
        }
    }
    g.set_gemm(Gemm::Tiled);
}

/// The tiled GEMMs' fused activation epilogues: `linear_act` (the product
/// plus bias, `pre`, and `act(pre)` in one pass) and `matmul_act_grad` (act'(pre) applied
/// to the product), every activation, both weight layouts, with and without
/// a bias, on ragged shapes, in every GEMM mode this GPU runs (the simple
/// mode and odd shapes take the unfused fallback). `pre` against the f64
/// product; the activation against the CPU oracle's `act_fwd` of the GPU's
/// own `pre`; the gradient against the CPU oracle's `act_bwd` of the same
/// GPU's bare product, and the bias gradient fused with it (column sums per
/// 128-row tile) against the oracle's `bias_grad` of the GPU's gradient.
/// Outputs poisoned.
#[test]
fn fused_activation_epilogues_match_the_unfused_ops() {
    let Some(mut g) = gpu(WeightDtype::Bf16) else {
        return;
    };
    let cpu = Cpu::new();
    let mut rng = Rng::new(13);
    let acts = [Act::Gelu, Act::GeluTanh, Act::Relu, Act::Tanh, Act::Silu];
    for (case, &(m, n, k)) in [
        (77, 136, 200),
        (300, 264, 64),
        (130, 24, 36),
        (9, 30, 7),
        (20, 16, 0),
    ]
    .iter()
    .enumerate()
    {
        for tb in [true, false] {
            let a = rand_vec(&mut rng, m * k, 1.0);
            let b = rand_vec(&mut rng, k * n, 0.3);
            let pre_in = rand_vec(&mut rng, m * n, 2.0);
            let b16 = bf16_round(&b);
            let shape = if tb { vec![n, k] } else { vec![k, n] };
            let (ga, gb) = (
                g.upload(&a),
                g.weight(&TensorView::from_f32("w", shape, &b)).unwrap(),
            );
            let slab = rand_vec(&mut rng, n + 5, 1.0);
            let (gslab, gpre_in) = (g.upload(&slab), g.upload(&pre_in));
            for mode in [
                Gemm::Simple,
                Gemm::Tiled,
                Gemm::Bf16,
                Gemm::Wgmma,
                Gemm::WgmmaBf16,
            ] {
                g.set_gemm(mode);
                if g.gemm() != mode {
                    continue; // not on this GPU (see the tiled GEMM test)
                }
                // The bf16 modes round the activations where the tiled
                // kernels run (k, n multiples of 8); other shapes fall back.
                let tiled = k % 8 == 0 && n % 8 == 0;
                let rounded = tiled && matches!(mode, Gemm::Bf16 | Gemm::WgmmaBf16);
                let a_seen = if rounded { bf16_round(&a) } else { a.clone() };
                let (want, bound) = naive_matmul(&a_seen, &b16, m, n, k, false, tb);
                let act = acts[(case + tb as usize) % acts.len()];
                for bias in [false, true] {
                    let tag =
                        format!("linear_act {act:?} {mode:?} {m}x{n}x{k} tb={tb} bias={bias}");
                    let (mut pre, mut out) = (nan(&g, m * n), nan(&g, m * n));
                    let bias_ref = bias.then_some((&gslab, 3));
                    g.linear_act(&mut pre, &mut out, act, &ga, &gb, bias_ref, m, n, k, tb);
                    let pre_got = g.download(&pre);
                    let mut want = want.clone();
                    if bias {
                        for (i, w) in want.iter_mut().enumerate() {
                            *w += slab[3 + i % n] as f64;
                        }
                    }
                    check_product(&format!("{tag} pre"), &pre_got, &want, &bound, 2e-5);
                    let mut cout = cpu.zeros(m * n);
                    cpu.act_fwd(act, &mut cout, &cpu.upload(&pre_got), m * n);
                    close(
                        &format!("{tag} out"),
                        &g.download(&out),
                        &cv(&cout),
                        1e-6,
                        1e-5,
                    );
                }
                // The gradient: the bare product on this GPU, then the oracle's act_bwd.
                let mut prod = nan(&g, m * n);
                g.matmul(&mut prod, &ga, &gb, m, n, k, false, tb, false);
                let mut cdx = cpu.zeros(m * n);
                let (cpre, cprod) = (cpu.upload(&pre_in), cpu.upload(&g.download(&prod)));
                cpu.act_bwd(act, &mut cdx, &cpre, &cprod, m * n);
                for with_db in [false, true] {
                    let mut dx = nan(&g, m * n);
                    // The bias gradient at offset 3 of a slab that holds
                    // earlier gradients (it adds to them).
                    let mut gdb = g.upload(&slab);
                    let db = with_db.then_some((&mut gdb, 3));
                    g.matmul_act_grad(&mut dx, act, &gpre_in, &ga, &gb, db, m, n, k, tb);
                    let tag = format!("matmul_act_grad {act:?} {mode:?} {m}x{n}x{k} tb={tb}");
                    let dx = g.download(&dx);
                    close(&tag, &dx, &cv(&cdx), 1e-6, 1e-5);
                    // The oracle's bias_grad of this GPU's dx.
                    let mut cdb = cpu.upload(&slab);
                    if with_db {
                        cpu.bias_grad(&mut cdb, 3, &cpu.upload(&dx), m, n);
                    }
                    close(
                        &format!("{tag} db"),
                        &g.download(&gdb),
                        &cv(&cdb),
                        1e-6,
                        1e-6,
                    );
                }
                // SwiGLU: pre_in plays the gate. Forward: up against the f64
                // product, h against the oracle's swiglu_fwd of the GPU's up.
                for bias in [false, true] {
                    let tag = format!("linear_swiglu {mode:?} {m}x{n}x{k} tb={tb} bias={bias}");
                    let (mut up, mut h) = (nan(&g, m * n), nan(&g, m * n));
                    let bias_ref = bias.then_some((&gslab, 3));
                    g.linear_swiglu(&mut up, &mut h, &gpre_in, &ga, &gb, bias_ref, m, n, k, tb);
                    let up_got = g.download(&up);
                    let mut want = want.clone();
                    if bias {
                        for (i, w) in want.iter_mut().enumerate() {
                            *w += slab[3 + i % n] as f64;
                        }
                    }
                    check_product(&format!("{tag} up"), &up_got, &want, &bound, 2e-5);
                    let mut ch = cpu.zeros(m * n);
                    let (cgate, cup) = (cpu.upload(&pre_in), cpu.upload(&up_got));
                    cpu.swiglu_fwd(&mut ch, &cgate, &cup, m * n);
                    close(&format!("{tag} h"), &g.download(&h), &cv(&ch), 1e-6, 1e-5);
                }
                // Backward: the oracle's swiglu_bwd of this GPU's bare
                // product (the gradient at h), pre_in the gate, a fresh up.
                let up_in = rand_vec(&mut rng, m * n, 1.5);
                let gup = g.upload(&up_in);
                let (mut cdg, mut cdu) = (cpu.zeros(m * n), cpu.zeros(m * n));
                let (cgate, cup) = (cpu.upload(&pre_in), cpu.upload(&up_in));
                cpu.swiglu_bwd(&mut cdg, &mut cdu, &cprod, &cgate, &cup, m * n);
                let (mut dg, mut du) = (nan(&g, m * n), nan(&g, m * n));
                g.matmul_swiglu_grad(&mut dg, &mut du, &gpre_in, &gup, &ga, &gb, m, n, k, tb);
                let tag = format!("matmul_swiglu_grad {mode:?} {m}x{n}x{k} tb={tb}");
                close(
                    &format!("{tag} dgate"),
                    &g.download(&dg),
                    &cv(&cdg),
                    1e-6,
                    1e-5,
                );
                close(
                    &format!("{tag} dup"),
                    &g.download(&du),
                    &cv(&cdu),
                    1e-6,
                    1e-5,
                );
            }
        }
    }
    g.set_gemm(Gemm::Tiled);
}

/// (kind, backend, a, b, a as the GPU sees it, b likewise, relative bound)
type MatmulCase<'a> = (
    &'a str,
    &'a CudaBackend,
    CudaBuf,
    CudaBuf,
    &'a [f32],
    &'a [f32],
    f64,
);

#[test]
fn matmul_every_dtype_and_transpose() {
    let Some((g32, g16)) = gpus() else {
        return;
    };
    let mut rng = Rng::new(1);
    for &(m, n, k) in MATMUL_SHAPES {
        for ta in [false, true] {
            for tb in [false, true] {
                let a = rand_vec(&mut rng, m * k, 1.0);
                let b = rand_vec(&mut rng, k * n, 1.0);
                let c0 = rand_vec(&mut rng, m * n, 1.0);
                let b16 = bf16_round(&b);
                let a16 = bf16_round(&a);
                // The weight's shape only matters for its rank (a matrix: bf16).
                let bw = TensorView::from_f32("w", vec![k, n], &b);
                let aw = TensorView::from_f32("w", vec![m, k], &a);
                for acc in [false, true] {
                    let tag = format!("{m}x{n}x{k} ta={ta} tb={tb} acc={acc}");
                    let cases: Vec<MatmulCase> = vec![
                        (
                            "f32 x f32",
                            &g32,
                            g32.upload(&a),
                            g32.upload(&b),
                            &a,
                            &b,
                            1e-5,
                        ),
                        (
                            "f32 x bf16",
                            &g16,
                            g16.upload(&a),
                            g16.weight(&bw).unwrap(),
                            &a,
                            &b16,
                            2e-5,
                        ),
                        (
                            "bf16 x f32",
                            &g16,
                            g16.weight(&aw).unwrap(),
                            g16.upload(&b),
                            &a16,
                            &b,
                            2e-5,
                        ),
                        (
                            "bf16 x bf16",
                            &g16,
                            g16.weight(&aw).unwrap(),
                            g16.weight(&bw).unwrap(),
                            &a16,
                            &b16,
                            1e-5,
                        ),
                    ];
                    for (kind, be, ga, gb, ra, rb, rel) in cases {
                        let mut c = if acc { be.upload(&c0) } else { nan(be, m * n) };
                        be.matmul(&mut c, &ga, &gb, m, n, k, ta, tb, acc);
                        let (mut want, bound) = naive_matmul(ra, rb, m, n, k, ta, tb);
                        if acc {
                            for (w, c) in want.iter_mut().zip(&c0) {
                                *w += *c as f64;
                            }
                        }
                        check_product(
                            &format!("matmul {kind} {tag}"),
                            &be.download(&c),
                            &want,
                            &bound,
                            rel,
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn bias_elementwise_and_reductions() {
    let Some(g) = gpu(WeightDtype::Bf16) else {
        return;
    };
    let cpu = Cpu::new();
    let mut rng = Rng::new(2);
    for &(rows, cols) in &[(1, 1), (7, 33), (130, 384), (1000, 3), (2049, 770)] {
        let off = 5;
        let bias = rand_vec(&mut rng, cols + off + 2, 1.0);
        let y0 = rand_vec(&mut rng, rows * cols, 1.0);
        // bias_add
        let (mut gy, mut cy) = (g.upload(&y0), cpu.upload(&y0));
        g.bias_add(&mut gy, &g.upload(&bias), off, rows, cols);
        cpu.bias_add(&mut cy, &cpu.upload(&bias), off, rows, cols);
        close(
            &format!("bias_add {rows}x{cols}"),
            &g.download(&gy),
            &cv(&cy),
            1e-6,
            1e-6,
        );
        // bias_grad accumulates into an offset slot
        let dy = rand_vec(&mut rng, rows * cols, 1.0);
        let (mut gdb, mut cdb) = (g.upload(&bias), cpu.upload(&bias));
        g.bias_grad(&mut gdb, off, &g.upload(&dy), rows, cols);
        cpu.bias_grad(&mut cdb, off, &cpu.upload(&dy), rows, cols);
        close(
            &format!("bias_grad {rows}x{cols}"),
            &g.download(&gdb),
            &cv(&cdb),
            1e-5,
            1e-6,
        );
        // add, scale_rows, scale
        let n = rows * cols;
        let x = rand_vec(&mut rng, n, 1.0);
        let (mut gy, mut cy) = (g.upload(&y0), cpu.upload(&y0));
        g.add(&mut gy, &g.upload(&x), n);
        cpu.add(&mut cy, &cpu.upload(&x), n);
        let w = rand_vec(&mut rng, rows, 1.0);
        g.scale_rows(&mut gy, &g.upload(&w), rows, cols);
        cpu.scale_rows(&mut cy, &cpu.upload(&w), rows, cols);
        g.scale(&mut gy, -0.37, n);
        cpu.scale(&mut cy, -0.37, n);
        close(
            &format!("add/scale_rows/scale {rows}x{cols}"),
            &g.download(&gy),
            &cv(&cy),
            1e-6,
            1e-6,
        );
        // sum_sq
        let (gs, cs) = (g.sum_sq(&g.upload(&x), n), cpu.sum_sq(&cpu.upload(&x), n));
        assert!(
            (gs - cs).abs() <= 1e-9 * cs.max(1.0),
            "sum_sq: {gs} vs {cs}"
        );
        eprintln!("sum_sq n={n}: |err| = {:.3e}", (gs - cs).abs());
    }
    // fill and copy (f32, and from a bf16 weight, at offsets)
    let src = rand_vec(&mut rng, 1000, 1.0);
    let mut d = nan(&g, 777);
    g.fill(&mut d, 0.25);
    assert!(g.download(&d).iter().all(|v| *v == 0.25), "fill");
    g.copy(&mut d, 3, &g.upload(&src), 11, 500);
    let mut want = vec![0.25f32; 777];
    want[3..503].copy_from_slice(&src[11..511]);
    close("copy f32", &g.download(&d), &want, 0.0, 0.0);
    let wt = g
        .weight(&TensorView::from_f32("w", vec![10, 100], &src))
        .unwrap();
    assert!(wt.is_bf16(), "matrix weights are held in bf16");
    g.copy(&mut d, 0, &wt, 100, 400);
    want[..400].copy_from_slice(&bf16_round(&src[100..500]));
    close("copy bf16 weight", &g.download(&d), &want, 0.0, 0.0);
    let vec_w = g
        .weight(&TensorView::from_f32("b", vec![1000], &src))
        .unwrap();
    assert!(!vec_w.is_bf16(), "rank-1 weights stay f32");
    close("rank-1 weight upload", &g.download(&vec_w), &src, 0.0, 0.0);
}

#[test]
fn activations_swiglu_and_dropout() {
    let Some(g) = gpu(WeightDtype::Bf16) else {
        return;
    };
    let cpu = Cpu::new();
    let mut rng = Rng::new(3);
    for &n in &[1usize, 33, 4099, 100_003] {
        let x = rand_vec(&mut rng, n, 3.0);
        let dy = rand_vec(&mut rng, n, 1.0);
        for act in [Act::Gelu, Act::GeluTanh, Act::Relu, Act::Tanh, Act::Silu] {
            let (mut gy, mut cy) = (nan(&g, n), cpu.zeros(n));
            g.act_fwd(act, &mut gy, &g.upload(&x), n);
            cpu.act_fwd(act, &mut cy, &cpu.upload(&x), n);
            close(
                &format!("act_fwd {act:?} n={n}"),
                &g.download(&gy),
                &cv(&cy),
                1e-6,
                1e-5,
            );
            let (mut gd, mut cd) = (nan(&g, n), cpu.zeros(n));
            g.act_bwd(act, &mut gd, &g.upload(&x), &g.upload(&dy), n);
            cpu.act_bwd(act, &mut cd, &cpu.upload(&x), &cpu.upload(&dy), n);
            close(
                &format!("act_bwd {act:?} n={n}"),
                &g.download(&gd),
                &cv(&cd),
                1e-6,
                1e-5,
            );
        }
        let up = rand_vec(&mut rng, n, 1.0);
        let (mut gh, mut ch) = (nan(&g, n), cpu.zeros(n));
        g.swiglu_fwd(&mut gh, &g.upload(&x), &g.upload(&up), n);
        cpu.swiglu_fwd(&mut ch, &cpu.upload(&x), &cpu.upload(&up), n);
        close(
            &format!("swiglu_fwd n={n}"),
            &g.download(&gh),
            &cv(&ch),
            1e-6,
            1e-5,
        );
        let (mut gg, mut gu, mut cg, mut cu) = (nan(&g, n), nan(&g, n), cpu.zeros(n), cpu.zeros(n));
        g.swiglu_bwd(
            &mut gg,
            &mut gu,
            &g.upload(&dy),
            &g.upload(&x),
            &g.upload(&up),
            n,
        );
        cpu.swiglu_bwd(
            &mut cg,
            &mut cu,
            &cpu.upload(&dy),
            &cpu.upload(&x),
            &cpu.upload(&up),
            n,
        );
        close(
            &format!("swiglu_bwd dgate n={n}"),
            &g.download(&gg),
            &cv(&cg),
            1e-6,
            1e-5,
        );
        close(
            &format!("swiglu_bwd dup n={n}"),
            &g.download(&gu),
            &cv(&cu),
            1e-6,
            1e-5,
        );
        for (p, seed) in [(0.1f32, 7u64), (0.5, 0xdead_beef_0000_1234)] {
            let (mut gy, mut cy) = (g.upload(&x), cpu.upload(&x));
            g.dropout(&mut gy, n, p, seed);
            cpu.dropout(&mut cy, n, p, seed);
            let got = g.download(&gy);
            // The same mask exactly (the shared counter hash).
            for i in 0..n {
                assert_eq!(
                    got[i] == 0.0 && x[i] != 0.0,
                    !dropout_keep(seed, i as u32, p),
                    "dropout mask [{i}]"
                );
            }
            close(&format!("dropout p={p} n={n}"), &got, &cv(&cy), 0.0, 1e-6);
            // The fused forms: y = dropout(y) + r and y = dropout(r), against
            // the CPU's two passes; outputs poisoned for the out-of-place one.
            let r = rand_vec(&mut rng, n, 1.0);
            let (gr, cr) = (g.upload(&r), cpu.upload(&r));
            let (mut gy, mut cy) = (g.upload(&x), cpu.upload(&x));
            g.dropout_add(&mut gy, &gr, n, p, seed);
            cpu.dropout(&mut cy, n, p, seed);
            cpu.add(&mut cy, &cr, n);
            let tag = format!("dropout_add p={p} n={n}");
            close(&tag, &g.download(&gy), &cv(&cy), 0.0, 1e-6);
            let mut gy = nan(&g, n);
            g.dropout_from(&mut gy, &gr, n, p, seed);
            let mut cy = cpu.upload(&r);
            cpu.dropout(&mut cy, n, p, seed);
            let tag = format!("dropout_from p={p} n={n}");
            close(&tag, &g.download(&gy), &cv(&cy), 0.0, 1e-6);
        }
    }
}

#[test]
fn layernorm_and_rmsnorm() {
    let Some(g) = gpu(WeightDtype::Bf16) else {
        return;
    };
    let cpu = Cpu::new();
    let mut rng = Rng::new(4);
    // Each kernel family: a warp a row (up to 1024 columns, the edge
    // included), a block a row (up to 4096), the re-reading kernels beyond.
    for &(rows, cols) in &[
        (1, 1),
        (5, 8),
        (37, 33),
        (130, 384),
        (9, 1024),
        (6, 1025),
        (7, 2050),
        (2, 4096),
        (3, 4097),
    ] {
        let x: Vec<f32> = rand_vec(&mut rng, rows * cols, 2.0)
            .into_iter()
            .map(|v| v + 0.7)
            .collect();
        let gamma = rand_vec(&mut rng, cols, 1.0);
        let beta = rand_vec(&mut rng, cols + 3, 1.0);
        let dy = rand_vec(&mut rng, rows * cols, 1.0);
        let n = rows * cols;
        let tag = format!("{rows}x{cols}");
        // LayerNorm
        let (mut gy, mut gh, mut gr) = (nan(&g, n), nan(&g, n), nan(&g, rows));
        let (mut cy, mut ch, mut cr) = (cpu.zeros(n), cpu.zeros(n), cpu.zeros(rows));
        g.layernorm_fwd(
            &mut gy,
            &mut gh,
            &mut gr,
            &g.upload(&x),
            &g.upload(&gamma),
            &g.upload(&beta),
            3,
            rows,
            cols,
            1e-12,
        );
        cpu.layernorm_fwd(
            &mut cy,
            &mut ch,
            &mut cr,
            &cpu.upload(&x),
            &cpu.upload(&gamma),
            &cpu.upload(&beta),
            3,
            rows,
            cols,
            1e-12,
        );
        close(
            &format!("layernorm_fwd y {tag}"),
            &g.download(&gy),
            &cv(&cy),
            1e-5,
            1e-4,
        );
        close(
            &format!("layernorm_fwd xhat {tag}"),
            &g.download(&gh),
            &cv(&ch),
            1e-5,
            1e-4,
        );
        close(
            &format!("layernorm_fwd rstd {tag}"),
            &g.download(&gr),
            &cv(&cr),
            1e-6,
            1e-4,
        );
        let mut gdx = nan(&g, n);
        let mut cdx = cpu.zeros(n);
        g.layernorm_bwd(
            &mut gdx,
            &g.upload(&dy),
            &gh,
            &gr,
            &g.upload(&gamma),
            rows,
            cols,
        );
        cpu.layernorm_bwd(
            &mut cdx,
            &cpu.upload(&dy),
            &ch,
            &cr,
            &cpu.upload(&gamma),
            rows,
            cols,
        );
        close(
            &format!("layernorm_bwd {tag}"),
            &g.download(&gdx),
            &cv(&cdx),
            1e-4,
            1e-4,
        );
        // LayerNorm of a residual sum, LN(drop(s) + res): one pass on the
        // GPU, the oracle's dropout_add then layernorm_fwd.
        let res = rand_vec(&mut rng, n, 1.0);
        for drop in [
            None,
            Some(Dropout {
                p: 0.25,
                seed: 0x1234_5678_9abc,
            }),
        ] {
            let (mut gy, mut gh, mut gr) = (nan(&g, n), nan(&g, n), nan(&g, rows));
            let (mut cy, mut ch, mut cr) = (cpu.zeros(n), cpu.zeros(n), cpu.zeros(rows));
            let (gs, gres, ggam, gbeta) = (
                &mut g.upload(&x),
                &g.upload(&res),
                &g.upload(&gamma),
                &g.upload(&beta),
            );
            g.residual_layernorm_fwd(
                &mut gy, &mut gh, &mut gr, gs, gres, drop, ggam, gbeta, 3, rows, cols, 1e-12,
            );
            let (cs, cres, cgam, cbeta) = (
                &mut cpu.upload(&x),
                &cpu.upload(&res),
                &cpu.upload(&gamma),
                &cpu.upload(&beta),
            );
            cpu.residual_layernorm_fwd(
                &mut cy, &mut ch, &mut cr, cs, cres, drop, cgam, cbeta, 3, rows, cols, 1e-12,
            );
            let tag = format!("residual_layernorm_fwd {tag} drop={}", drop.is_some());
            close(&format!("{tag} y"), &g.download(&gy), &cv(&cy), 1e-5, 1e-4);
            close(
                &format!("{tag} xhat"),
                &g.download(&gh),
                &cv(&ch),
                1e-5,
                1e-4,
            );
            close(
                &format!("{tag} rstd"),
                &g.download(&gr),
                &cv(&cr),
                1e-6,
                1e-4,
            );
        }
        // RMSNorm
        let (mut gy, mut gh, mut gr) = (nan(&g, n), nan(&g, n), nan(&g, rows));
        let (mut cy, mut ch, mut cr) = (cpu.zeros(n), cpu.zeros(n), cpu.zeros(rows));
        g.rmsnorm_fwd(
            &mut gy,
            &mut gh,
            &mut gr,
            &g.upload(&x),
            &g.upload(&gamma),
            rows,
            cols,
            1e-6,
        );
        cpu.rmsnorm_fwd(
            &mut cy,
            &mut ch,
            &mut cr,
            &cpu.upload(&x),
            &cpu.upload(&gamma),
            rows,
            cols,
            1e-6,
        );
        close(
            &format!("rmsnorm_fwd y {tag}"),
            &g.download(&gy),
            &cv(&cy),
            1e-5,
            1e-4,
        );
        close(
            &format!("rmsnorm_fwd xhat {tag}"),
            &g.download(&gh),
            &cv(&ch),
            1e-5,
            1e-4,
        );
        close(
            &format!("rmsnorm_fwd rstd {tag}"),
            &g.download(&gr),
            &cv(&cr),
            1e-6,
            1e-4,
        );
        let mut gdx = nan(&g, n);
        let mut cdx = cpu.zeros(n);
        g.rmsnorm_bwd(
            &mut gdx,
            &g.upload(&dy),
            &gh,
            &gr,
            &g.upload(&gamma),
            rows,
            cols,
        );
        cpu.rmsnorm_bwd(
            &mut cdx,
            &cpu.upload(&dy),
            &ch,
            &cr,
            &cpu.upload(&gamma),
            rows,
            cols,
        );
        close(
            &format!("rmsnorm_bwd {tag}"),
            &g.download(&gdx),
            &cv(&cdx),
            1e-4,
            1e-4,
        );
    }
}

// ---- attention ----------------------------------------------------------------

struct AttnCase {
    dims: AttnDims,
    /// Real tokens per example (the rest of the key row is padding).
    lens: Vec<usize>,
    dropout: Option<Dropout>,
}

fn attn_cases() -> Vec<AttnCase> {
    let d = AttnDims::self_attn;
    let drop = Some(Dropout {
        p: 0.1,
        seed: 0x1234_5678_9abc_def0,
    });
    vec![
        // Encoder: padding, a fully padded example (lse = -inf), tiny head.
        AttnCase {
            dims: d(3, 7, 3, 3, 5, false),
            lens: vec![7, 4, 0],
            dropout: None,
        },
        // MiniLM-like: 12 heads of 32, ragged T, dropout.
        AttnCase {
            dims: d(2, 37, 12, 12, 32, false),
            lens: vec![37, 20],
            dropout: drop,
        },
        // BERT-base head size, T crossing two 32-key tiles.
        AttnCase {
            dims: d(2, 65, 2, 2, 64, false),
            lens: vec![65, 64],
            dropout: None,
        },
        // Decoder: causal, GQA (odd group count), odd head_dim.
        AttnCase {
            dims: d(2, 45, 6, 2, 24, true),
            lens: vec![45, 30],
            dropout: drop,
        },
        AttnCase {
            dims: d(1, 33, 5, 1, 128, true),
            lens: vec![33],
            dropout: None,
        },
        // Large heads: smaller tiles, the opt-in shared memory.
        AttnCase {
            dims: d(1, 19, 2, 2, 256, false),
            lens: vec![17],
            dropout: drop,
        },
        AttnCase {
            dims: d(2, 9, 4, 2, 200, true),
            lens: vec![9, 5],
            dropout: None,
        },
    ]
}

fn attn_mask(dims: &AttnDims, lens: &[usize]) -> Vec<f32> {
    let mut m = vec![0f32; dims.batch * dims.kv_seq];
    for (b, &l) in lens.iter().enumerate() {
        for j in 0..l.min(dims.kv_seq) {
            m[b * dims.kv_seq + j] = 1.0;
        }
    }
    m
}

/// Tolerances of an attention output under `mode`: (atol, rtol) for the
/// f32 kernels; for the tensor-core kernels, whose products take the
/// probabilities (or dS) rounded to bf16 (relative error <= 2^-9 each, on
/// inputs the reference also rounds), 1 % of the tensor's largest value
/// plus 1 % of each element (a wrong index or a lost tile is off by the
/// order of the largest value).
fn attn_tol(mode: Attn, want: &[f32], atol: f32, rtol: f32) -> (f32, f32) {
    match mode {
        Attn::F32 => (atol, rtol),
        Attn::Bf16 => {
            let big = want
                .iter()
                .filter(|x| x.is_finite())
                .fold(0f32, |m, x| m.max(x.abs()));
            (1e-2 * big, 1e-2)
        }
    }
}

/// The head dimensions the tensor-core kernels take (else they fall back).
fn attn_mma_dim(dh: usize) -> bool {
    matches!(dh, 32 | 64 | 128)
}

#[test]
fn attention_forward_and_backward() {
    let Some(mut g) = gpu(WeightDtype::Bf16) else {
        return;
    };
    let cpu = Cpu::new();
    let mut rng = Rng::new(5);
    let drop = Some(Dropout {
        p: 0.1,
        seed: 0x1234_5678_9abc_def0,
    });
    // The tensor-core kernels' own edges: 64-query/64-key tiles crossed
    // raggedly, a fully padded example, causal GQA across several tiles,
    // the 32-query dk/dv tiles of head dimension 128.
    let mut cases = attn_cases();
    cases.extend([
        AttnCase {
            dims: AttnDims::self_attn(3, 130, 2, 2, 64, false),
            lens: vec![130, 70, 0],
            dropout: drop,
        },
        AttnCase {
            dims: AttnDims::self_attn(2, 100, 6, 2, 128, true),
            lens: vec![100, 61],
            dropout: None,
        },
        AttnCase {
            dims: AttnDims::self_attn(1, 70, 6, 2, 32, true),
            lens: vec![70],
            dropout: drop,
        },
    ]);
    for mode in [Attn::F32, Attn::Bf16] {
        g.set_attn(mode);
        for c in &cases {
            if mode == Attn::Bf16 && !attn_mma_dim(c.dims.head_dim) {
                continue;
            }
            check_attention(&g, &cpu, c, mode, &mut rng, true);
        }
    }
}

/// One attention case on the GPU (kernels `mode`) against the CPU: the
/// forward, then (`backward`) the backward from the CPU's saved tensors.
/// For the tensor-core kernels the CPU gets q, k, v and dO rounded to bf16,
/// as the kernels see them.
fn check_attention(
    g: &CudaBackend,
    cpu: &Cpu,
    c: &AttnCase,
    mode: Attn,
    rng: &mut Rng,
    backward: bool,
) {
    let dm = c.dims;
    let qn = dm.batch * dm.seq * dm.heads * dm.head_dim;
    let kn = dm.batch * dm.kv_seq * dm.kv_heads * dm.head_dim;
    let ln = dm.batch * dm.heads * dm.seq;
    let round = |v: Vec<f32>| match mode {
        Attn::F32 => v,
        Attn::Bf16 => bf16_round(&v),
    };
    let (q, k, v) = (
        round(rand_vec(rng, qn, 1.0)),
        round(rand_vec(rng, kn, 1.0)),
        round(rand_vec(rng, kn, 1.0)),
    );
    let mask = attn_mask(&dm, &c.lens);
    let tag = format!(
        "{mode:?} b{} t{} (keys {}, from {}) h{}/{} dh{} causal={} dropout={}",
        dm.batch,
        dm.seq,
        dm.kv_seq,
        dm.q_start,
        dm.heads,
        dm.kv_heads,
        dm.head_dim,
        dm.causal,
        c.dropout.is_some()
    );
    let (gq, gk, gv, gm) = (g.upload(&q), g.upload(&k), g.upload(&v), g.upload(&mask));
    let (cq, ck, cvv, cm) = (
        cpu.upload(&q),
        cpu.upload(&k),
        cpu.upload(&v),
        cpu.upload(&mask),
    );
    let (mut go, mut gl) = (nan(g, qn), nan(g, ln));
    let (mut co, mut cl) = (cpu.zeros(qn), cpu.zeros(ln));
    g.attention_fwd(&mut go, &mut gl, &gq, &gk, &gv, &gm, dm, c.dropout);
    cpu.attention_fwd(&mut co, &mut cl, &cq, &ck, &cvv, &cm, dm, c.dropout);
    let want = cv(&co);
    let (atol, rtol) = attn_tol(mode, &want, 1e-5, 1e-4);
    close(
        &format!("attention_fwd out {tag}"),
        &g.download(&go),
        &want,
        atol,
        rtol,
    );
    // The scores are exact products of the (rounded) inputs in both modes.
    close(
        &format!("attention_fwd lse {tag}"),
        &g.download(&gl),
        &cv(&cl),
        1e-5,
        1e-5,
    );
    if !backward {
        return;
    }
    // Backward from the CPU's saved tensors (the same inputs on both).
    let dout = round(rand_vec(rng, qn, 1.0));
    let (gdo, gout, glse) = (g.upload(&dout), g.upload(&cv(&co)), g.upload(&cv(&cl)));
    let (mut gdq, mut gdk, mut gdv) = (nan(g, qn), nan(g, kn), nan(g, kn));
    let (mut cdq, mut cdk, mut cdv) = (cpu.zeros(qn), cpu.zeros(kn), cpu.zeros(kn));
    g.attention_bwd(
        &mut gdq, &mut gdk, &mut gdv, &gdo, &gq, &gk, &gv, &gout, &glse, &gm, dm, c.dropout,
    );
    cpu.attention_bwd(
        &mut cdq,
        &mut cdk,
        &mut cdv,
        &cpu.upload(&dout),
        &cq,
        &ck,
        &cvv,
        &co,
        &cl,
        &cm,
        dm,
        c.dropout,
    );
    for (what, got, want) in [("dq", &gdq, &cdq), ("dk", &gdk, &cdk), ("dv", &gdv, &cdv)] {
        let want = cv(want);
        let (atol, rtol) = attn_tol(mode, &want, 1e-4, 1e-4);
        close(
            &format!("attention_bwd {what} {tag}"),
            &g.download(got),
            &want,
            atol,
            rtol,
        );
    }
}

#[test]
fn attention_kv_cache_shape() {
    let Some(mut g) = gpu(WeightDtype::Bf16) else {
        return;
    };
    let cpu = Cpu::new();
    let mut rng = Rng::new(6);
    // New queries at positions q_start.. against every cached key (the
    // forward alone: the backward takes the training shape only).
    for mode in [Attn::F32, Attn::Bf16] {
        g.set_attn(mode);
        for &(b, seq, kv_seq, q_start, h, kvh, dh) in &[
            (1usize, 1usize, 20usize, 19usize, 4usize, 2usize, 16usize),
            (2, 3, 40, 37, 6, 3, 64),
            (2, 5, 70, 10, 2, 1, 33), // queries before the end of the cache
            (1, 70, 140, 70, 4, 2, 128),
            (2, 1, 75, 74, 2, 2, 32),
        ] {
            if mode == Attn::Bf16 && !attn_mma_dim(dh) {
                continue;
            }
            let c = AttnCase {
                dims: AttnDims {
                    batch: b,
                    seq,
                    kv_seq,
                    q_start,
                    heads: h,
                    kv_heads: kvh,
                    head_dim: dh,
                    scale: 1.0 / (dh as f64).sqrt(),
                    causal: true,
                },
                lens: vec![kv_seq; b],
                dropout: None,
            };
            check_attention(&g, &cpu, &c, mode, &mut rng, false);
        }
    }
    // The dropout index is the CPU's.
    let dm = AttnDims::self_attn(2, 3, 2, 2, 4, false);
    let (b, h, i, j) = (1usize, 1usize, 2usize, 1usize);
    assert_eq!(
        attn_dropout_index(&dm, b, h, i, j),
        ((((b * 2 + h) * 3 + i) * 3) + j) as u32
    );
}

// ---- decoder ops, embeddings, pooling, losses, optimiser ----------------------

#[test]
fn rope_embeddings_and_pooling() {
    let Some(g) = gpu(WeightDtype::Bf16) else {
        return;
    };
    let cpu = Cpu::new();
    let mut rng = Rng::new(7);
    // RoPE forward and inverse at large positions.
    for &(rows, heads, hd) in &[(1usize, 1usize, 2usize), (37, 3, 64), (20, 2, 128)] {
        let n = rows * heads * hd;
        let x = rand_vec(&mut rng, n, 1.0);
        let pos: Vec<u32> = (0..rows).map(|r| (r * 113 + 7) as u32).collect();
        for inverse in [false, true] {
            let (mut gx, mut cx) = (g.upload(&x), cpu.upload(&x));
            g.rope(
                &mut gx,
                &g.upload_ids(&pos),
                rows,
                heads,
                hd,
                10000.0,
                inverse,
            );
            cpu.rope(&mut cx, &pos, rows, heads, hd, 10000.0, inverse);
            close(
                &format!("rope {rows}x{heads}x{hd} inverse={inverse}"),
                &g.download(&gx),
                &cv(&cx),
                1e-5,
                1e-5,
            );
        }
    }
    // Embedding gathers (f32 table, bf16 weight table), accumulating.
    for &(vocab, rows, dim) in &[(13usize, 5usize, 8usize), (1000, 333, 384)] {
        let table = rand_vec(&mut rng, vocab * dim, 1.0);
        let ids: Vec<u32> = (0..rows).map(|_| rng.below(vocab) as u32).collect();
        let gids = g.upload_ids(&ids);
        let tw = TensorView::from_f32("emb", vec![vocab, dim], &table);
        for (kind, gt, ct) in [
            ("f32", g.upload(&table), cpu.upload(&table)),
            (
                "bf16",
                g.weight(&tw).unwrap(),
                cpu.upload(&bf16_round(&table)),
            ),
        ] {
            let base = rand_vec(&mut rng, rows * dim, 1.0);
            for acc in [false, true] {
                let mut go = if acc {
                    g.upload(&base)
                } else {
                    nan(&g, rows * dim)
                };
                let mut co = cpu.upload(&base);
                g.embedding_fwd(&mut go, &gt, &gids, rows, dim, acc);
                cpu.embedding_fwd(&mut co, &ct, &ids, rows, dim, acc);
                close(
                    &format!("embedding_fwd {kind} {vocab}x{dim} rows={rows} acc={acc}"),
                    &g.download(&go),
                    &cv(&co),
                    0.0,
                    1e-7,
                );
            }
        }
        // Scatter-add with repeated indices, and with distinct ascending
        // ones (the row-parallel kernel).
        let distinct: Vec<u32> = (0..rows.min(vocab) as u32)
            .map(|i| i * (vocab / rows.min(vocab)) as u32)
            .collect();
        for (kind, ids) in [("repeated", &ids), ("distinct", &distinct)] {
            let rows = ids.len();
            let dy = rand_vec(&mut rng, rows * dim, 1.0);
            let dx0 = rand_vec(&mut rng, vocab * dim, 1.0);
            let (mut gdx, mut cdx) = (g.upload(&dx0), cpu.upload(&dx0));
            g.scatter_add_rows(&mut gdx, &g.upload(&dy), &g.upload_ids(ids), rows, dim);
            cpu.scatter_add_rows(&mut cdx, &cpu.upload(&dy), ids, rows, dim);
            close(
                &format!("scatter_add_rows {vocab}x{dim} rows={rows} ({kind})"),
                &g.download(&gdx),
                &cv(&cdx),
                0.0,
                0.0,
            );
        }
    }
    // Pooling.
    for &(b, t, d) in &[(1usize, 1usize, 1usize), (3, 7, 33), (16, 128, 384)] {
        let h = rand_vec(&mut rng, b * t * d, 1.0);
        let mut mask = vec![0f32; b * t];
        for bi in 0..b {
            let len = 1 + rng.below(t);
            for ti in 0..len {
                mask[bi * t + ti] = 1.0;
            }
        }
        let dout = rand_vec(&mut rng, b * d, 1.0);
        for kind in [PoolKind::Cls, PoolKind::Mean] {
            let (mut go, mut co) = (nan(&g, b * d), cpu.zeros(b * d));
            g.pool_fwd(kind, &mut go, &g.upload(&h), &g.upload(&mask), b, t, d);
            cpu.pool_fwd(kind, &mut co, &cpu.upload(&h), &cpu.upload(&mask), b, t, d);
            close(
                &format!("pool_fwd {kind:?} {b}x{t}x{d}"),
                &g.download(&go),
                &cv(&co),
                1e-6,
                1e-5,
            );
            let (mut gdh, mut cdh) = (nan(&g, b * t * d), cpu.zeros(b * t * d));
            g.pool_bwd(kind, &mut gdh, &g.upload(&dout), &g.upload(&mask), b, t, d);
            cpu.pool_bwd(
                kind,
                &mut cdh,
                &cpu.upload(&dout),
                &cpu.upload(&mask),
                b,
                t,
                d,
            );
            close(
                &format!("pool_bwd {kind:?} {b}x{t}x{d}"),
                &g.download(&gdh),
                &cv(&cdh),
                1e-6,
                1e-5,
            );
        }
    }
}

#[test]
fn losses_and_adamw() {
    let Some(g) = gpu(WeightDtype::Bf16) else {
        return;
    };
    let cpu = Cpu::new();
    let mut rng = Rng::new(8);
    // Cross-entropy from 2 classes to a GPT-2-size vocabulary.
    for &(rows, classes) in &[(1usize, 2usize), (16, 3), (7, 1000), (5, 50_257)] {
        let x = rand_vec(&mut rng, rows * classes, 3.0);
        let labels: Vec<u32> = (0..rows).map(|_| rng.below(classes) as u32).collect();
        let (mut gl, mut gd) = (nan(&g, rows), nan(&g, rows * classes));
        let (mut cl, mut cd) = (cpu.zeros(rows), cpu.zeros(rows * classes));
        g.cross_entropy(
            &mut gl,
            &mut gd,
            &g.upload(&x),
            &g.upload_ids(&labels),
            rows,
            classes,
            0.25,
        );
        cpu.cross_entropy(
            &mut cl,
            &mut cd,
            &cpu.upload(&x),
            &labels,
            rows,
            classes,
            0.25,
        );
        close(
            &format!("cross_entropy loss {rows}x{classes}"),
            &g.download(&gl),
            &cv(&cl),
            1e-5,
            1e-5,
        );
        close(
            &format!("cross_entropy dlogits {rows}x{classes}"),
            &g.download(&gd),
            &cv(&cd),
            1e-7,
            1e-4,
        );
    }
    // MSE.
    let rows = 37;
    let (x, t) = (rand_vec(&mut rng, rows, 1.0), rand_vec(&mut rng, rows, 1.0));
    let (mut gl, mut gd, mut cl, mut cd) = (
        nan(&g, rows),
        nan(&g, rows),
        cpu.zeros(rows),
        cpu.zeros(rows),
    );
    g.mse(&mut gl, &mut gd, &g.upload(&x), &g.upload(&t), rows, 0.5);
    cpu.mse(
        &mut cl,
        &mut cd,
        &cpu.upload(&x),
        &cpu.upload(&t),
        rows,
        0.5,
    );
    close("mse loss", &g.download(&gl), &cv(&cl), 1e-7, 1e-6);
    close("mse dx", &g.download(&gd), &cv(&cd), 1e-7, 1e-6);
    // Candidate scoring: 3 examples with 2, 4 and 3 candidates of ragged lengths.
    let cands_per = [2usize, 4, 3];
    let (mut tok_cand, mut cand_ex, mut gold) = (vec![], vec![], vec![]);
    let mut c = 0u32;
    for (e, &nc) in cands_per.iter().enumerate() {
        gold.push(rng.below(nc) as u32 + c);
        for _ in 0..nc {
            cand_ex.push(e as u32);
            for _ in 0..1 + rng.below(5) {
                tok_cand.push(c);
            }
            c += 1;
        }
    }
    // Rows of one candidate need not be contiguous.
    rng.shuffle(&mut tok_cand);
    let (nr, nc, ne) = (tok_cand.len(), cand_ex.len(), gold.len());
    let tl: Vec<f32> = rand_vec(&mut rng, nr, 1.0)
        .iter()
        .map(|v| v.abs())
        .collect();
    let gidx = (
        g.upload_ids(&tok_cand),
        g.upload_ids(&cand_ex),
        g.upload_ids(&gold),
    );
    let gi = CandidateIndex {
        tok_cand: &gidx.0,
        cand_ex: &gidx.1,
        gold: &gidx.2,
        rows: nr,
        cands: nc,
        examples: ne,
    };
    let ci = CandidateIndex {
        tok_cand: &tok_cand,
        cand_ex: &cand_ex,
        gold: &gold,
        rows: nr,
        cands: nc,
        examples: ne,
    };
    let (mut ge, mut gs, mut gw) = (nan(&g, ne), nan(&g, nc), nan(&g, nr));
    let (mut ce, mut cs, mut cw) = (cpu.zeros(ne), cpu.zeros(nc), cpu.zeros(nr));
    g.candidate_loss(&mut ge, &mut gs, &mut gw, &g.upload(&tl), &gi, 0.5);
    cpu.candidate_loss(&mut ce, &mut cs, &mut cw, &cpu.upload(&tl), &ci, 0.5);
    close(
        "candidate_loss ex_loss",
        &g.download(&ge),
        &cv(&ce),
        1e-6,
        1e-6,
    );
    close(
        "candidate_loss scores",
        &g.download(&gs),
        &cv(&cs),
        1e-6,
        1e-6,
    );
    close(
        "candidate_loss row_w",
        &g.download(&gw),
        &cv(&cw),
        1e-7,
        1e-6,
    );
    // AdamW, three steps, with weight decay.
    let n = 3074;
    let p0 = rand_vec(&mut rng, n, 1.0);
    let (mut gp, mut gm, mut gv) = (g.upload(&p0), g.zeros(n), g.zeros(n));
    let (mut cp, mut cm, mut cvv) = (cpu.upload(&p0), cpu.zeros(n), cpu.zeros(n));
    for step in 1..=3 {
        let grad = rand_vec(&mut rng, n, 0.1);
        let h = AdamW {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
            step,
        };
        g.adamw(&mut gp, &g.upload(&grad), &mut gm, &mut gv, n, h);
        cpu.adamw(&mut cp, &cpu.upload(&grad), &mut cm, &mut cvv, n, h);
    }
    close("adamw params", &g.download(&gp), &cv(&cp), 1e-7, 1e-6);
    close("adamw m", &g.download(&gm), &cv(&cm), 1e-9, 1e-6);
    close("adamw v", &g.download(&gv), &cv(&cvv), 1e-12, 1e-6);
}

// ---- whole training steps -------------------------------------------------------

fn tiny_batch(
    pad: u32,
    vocab: usize,
    labels: Vec<f32>,
    lens: &[usize],
    t: usize,
    seed: u64,
) -> Batch {
    let b = lens.len();
    let mut rng = Rng::new(seed);
    let mut ids = vec![pad; b * t];
    let mut type_ids = vec![0u32; b * t];
    let mut mask = vec![0f32; b * t];
    for bi in 0..b {
        for ti in 0..lens[bi] {
            ids[bi * t + ti] = 2 + rng.below(vocab - 2) as u32;
            type_ids[bi * t + ti] = (ti >= lens[bi] / 2) as u32;
            mask[bi * t + ti] = 1.0;
        }
    }
    Batch {
        batch: b,
        seq: t,
        ids,
        type_ids,
        mask,
        labels,
        tokens: lens.iter().sum(),
    }
}

/// Loss and slab gradients of one step on `be`.
fn step<B: Backend<T = f32>>(
    be: &B,
    md: &ModelDir,
    opts: &EncoderOptions,
    batch: &Batch,
    dropout: Option<u64>,
) -> (f64, Vec<f32>, Vec<(String, usize, usize)>) {
    let enc = Encoder::load(be, md, opts.clone()).unwrap();
    let db = enc.upload_batch(be, batch).unwrap();
    let init: Vec<f32> = enc.init.iter().map(|v| *v as f32).collect();
    let mut grads = be.zeros(enc.layout.len);
    let (loss, _) = enc.loss_and_grad(be, &be.upload(&init), &mut grads, &db, dropout);
    let slots = enc
        .layout
        .slots
        .iter()
        .map(|s| (s.name.clone(), s.offset, s.len()))
        .collect();
    (loss, be.download(&grads), slots)
}

/// Compare a GPU step with the CPU's: the loss, and each slot's gradient
/// relative to the largest gradient of the slab.
fn compare_steps(
    what: &str,
    cpu: (f64, Vec<f32>, Vec<(String, usize, usize)>),
    gpu: (f64, Vec<f32>, Vec<(String, usize, usize)>),
    rtol: f64,
) {
    let (cl, cg, slots) = cpu;
    let (gl, gg, _) = gpu;
    assert!(
        (cl - gl).abs() <= rtol * cl.abs().max(1e-3),
        "{what}: loss {gl} on the GPU vs {cl} on the CPU"
    );
    let scale = cg.iter().fold(0f32, |a, b| a.max(b.abs())).max(1e-6);
    eprintln!(
        "{what}: loss {gl:.6} vs {cl:.6} (|err| {:.3e})",
        (cl - gl).abs()
    );
    for (name, off, len) in slots {
        let (g, c) = (&gg[off..off + len], &cg[off..off + len]);
        let worst = g.iter().zip(c).fold(0f32, |a, (x, y)| a.max((x - y).abs()));
        assert!(
            g.iter().all(|v| v.is_finite()) && worst as f64 <= rtol * scale as f64,
            "{what}: gradient of {name}: max |err| {worst:.3e} vs scale {scale:.3e}"
        );
        eprintln!("{what}: grad {name}: max |err| = {worst:.3e} (scale {scale:.3e})");
    }
}

/// A copy of a model directory whose weights are rounded to bf16 (still
/// stored as f32): the CPU on this copy computes what the GPU's bf16
/// weights should give.
fn bf16_rounded_copy(src: &std::path::Path, dst: &std::path::Path) {
    std::fs::create_dir_all(dst).unwrap();
    for f in ["config.json", "tokenizer.json"] {
        if src.join(f).exists() {
            std::fs::copy(src.join(f), dst.join(f)).unwrap();
        }
    }
    let ws = WeightStore::open_file(&src.join("model.safetensors")).unwrap();
    let mut tensors = Vec::new();
    for name in ws.names() {
        let t = ws.get(name).unwrap();
        let v = t.to_f32_vec();
        let v = if t.shape.len() >= 2 {
            bf16_round(&v)
        } else {
            v
        };
        tensors.push((name.to_string(), t.shape.clone(), v));
    }
    write_safetensors(
        &dst.join("model.safetensors"),
        &tensors,
        &Default::default(),
    )
    .unwrap();
}

#[test]
fn training_step_on_tiny_models_matches_cpu() {
    let Some((g32, g16)) = gpus() else {
        return;
    };
    let cpu = Cpu::new();
    let tmp = TempDir::new().unwrap();
    for (arch, pooling, labels, terms, dropout) in [
        (TinyArch::Bert, PoolKind::Cls, 3usize, "all", Some(1234u64)),
        (TinyArch::Bert, PoolKind::Mean, 2, "v", Some(99)),
        (TinyArch::Bert, PoolKind::Cls, 1, "q,mlp-in,ln2", None),
        (TinyArch::Roberta, PoolKind::Mean, 3, "emb-ln,o", Some(3)),
    ] {
        let what = format!("{arch:?} {pooling:?} {labels} labels bias={terms} dropout={dropout:?}");
        let dir = tmp.path().join(format!("{arch:?}-{terms}"));
        write_tiny_model(&dir, arch, 11, None);
        let rounded = tmp.path().join(format!("{arch:?}-{terms}-bf16"));
        bf16_rounded_copy(&dir, &rounded);
        let opts = EncoderOptions {
            pooling,
            num_labels: labels,
            terms: BiasTerm::parse_set(terms).unwrap(),
            seed: 5,
        };
        let lab: Vec<f32> = if labels == 1 {
            vec![0.3, -1.2, 2.0, 0.5]
        } else {
            vec![0.0, 1.0, (labels - 1) as f32, 1.0]
        };
        let md = ModelDir::open(&dir).unwrap();
        let batch = tiny_batch(
            md.config.pad_token_id,
            TINY_VOCAB,
            lab,
            &[6, 4, 1, 9],
            9,
            17,
        );
        let c = step(&cpu, &md, &opts, &batch, dropout);
        compare_steps(
            &format!("{what} (f32 weights)"),
            c,
            step(&g32, &md, &opts, &batch, dropout),
            1e-4,
        );
        let mdr = ModelDir::open(&rounded).unwrap();
        let cr = step(&cpu, &mdr, &opts, &batch, dropout);
        compare_steps(
            &format!("{what} (bf16 weights)"),
            cr,
            step(&g16, &md, &opts, &batch, dropout),
            1e-3,
        );
    }
}

/// Decoder training steps (GPT-2, OPT pre-/post-LN, LLaMA with GQA and
/// RoPE, Qwen2; every bias trainable, zero biases added where the model has
/// none) against the CPU, with f32 weights and with bf16 weights (against
/// the CPU on bf16-rounded weights); then the same step with streamed
/// layers (copied on the side stream) and recomputed activations against
/// the resident GPU step.
#[test]
fn training_step_on_tiny_decoders_matches_cpu_resident_and_streamed() {
    use beft::model::Offload;
    use common::fixtures::{decoder_fixture_step, fixture, DECODER_CASES};
    let Some((g32, g16)) = gpus() else {
        return;
    };
    let cpu = Cpu::new();
    let tmp = TempDir::new().unwrap();
    for case in DECODER_CASES {
        let rounded = tmp.path().join(case);
        bf16_rounded_copy(&fixture(case).join("model"), &rounded);
        for (g, model, tol, dt) in [
            (&g32, None, 1e-4, "f32"),
            (&g16, Some(rounded.as_path()), 1e-3, "bf16"),
        ] {
            let (cl, clog, cgr) = decoder_fixture_step(&cpu, case, model, Offload::Resident, false);
            let scale = cgr.iter().fold(0f32, |a, b| a.max(b.abs()));
            let (gl, glog, ggr) = decoder_fixture_step(g, case, None, Offload::Resident, false);
            let what = format!("decoder step {case} ({dt} weights)");
            assert!(
                (gl - cl).abs() <= tol * cl.abs().max(1e-3),
                "{what}: loss {gl} on the GPU vs {cl} on the CPU"
            );
            eprintln!("{what}: loss |err| {:.3e}", (gl - cl).abs());
            // As for the encoders: every error within tol × the tensor's
            // largest magnitude.
            let lscale = clog.iter().fold(0f32, |a, b| a.max(b.abs()));
            close(
                &format!("{what} logits"),
                &glog,
                &clog,
                tol as f32 * lscale,
                0.0,
            );
            close(
                &format!("{what} grads"),
                &ggr,
                &cgr,
                tol as f32 * scale,
                0.0,
            );
            let (sl, slog, sgr) = decoder_fixture_step(g, case, None, Offload::Stream, true);
            let what = format!("{what}, streamed + recompute vs resident");
            assert!(
                (sl - gl).abs() <= 1e-6 * gl.abs().max(1.0),
                "{what}: loss {sl} vs {gl}"
            );
            close(&format!("{what} logits"), &slog, &glog, 1e-6, 1e-5);
            close(&format!("{what} grads"), &sgr, &ggr, 1e-6 * scale, 1e-5);
        }
    }
}

fn minilm_dir() -> Option<PathBuf> {
    let base = match std::env::var_os("BEFT_CACHE") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(std::env::var_os("HOME")?).join(".cache/beft"),
    };
    let d = base.join("models/all-MiniLM-L6-v2");
    d.join("model.safetensors").exists().then_some(d)
}

#[test]
fn training_step_on_minilm_matches_cpu() {
    let Some(g16) = gpu(WeightDtype::Bf16) else {
        return;
    };
    let Some(dir) = minilm_dir() else {
        eprintln!("skipped: all-MiniLM-L6-v2 not in the cache (scripts/fetch_default.sh)");
        return;
    };
    let cpu = Cpu::new();
    let tmp = TempDir::new().unwrap();
    let rounded = tmp.path().join("minilm-bf16");
    bf16_rounded_copy(&dir, &rounded);
    let md = ModelDir::open(&dir).unwrap();
    let mdr = ModelDir::open(&rounded).unwrap();
    let opts = EncoderOptions {
        pooling: PoolKind::Mean,
        num_labels: 2,
        // b_v, and the FFN's input bias: its gradient is summed in the
        // input-gradient GEMM's epilogue (EPI_PART) at MiniLM's shapes.
        terms: BiasTerm::parse_set("v,mlp-in").unwrap(),
        seed: 0,
    };
    // On the CPU emulator (BEFT_CUDA_EMU) a quarter of the batch: the same
    // kernels and shapes per sequence, in a minute instead of five.
    let n = if beft::backend::cuda::emulated() {
        4
    } else {
        16
    };
    let lens: Vec<usize> = (0..n).map(|i| 5 + (i * 37) % 124).collect();
    let labels: Vec<f32> = (0..n).map(|i| (i % 2) as f32).collect();
    let batch = tiny_batch(
        md.config.pad_token_id,
        md.config.vocab_size,
        labels,
        &lens,
        128,
        3,
    );
    let c = step(&cpu, &mdr, &opts, &batch, Some(42));
    compare_steps(
        "all-MiniLM-L6-v2 bias=v,mlp-in (bf16 weights)",
        c.clone(),
        step(&g16, &md, &opts, &batch, Some(42)),
        2e-3,
    );
    // The tensor-core attention kernels (head dimension 32) in the whole
    // step: q, k, v, dO and the probabilities rounded to bf16 in each of the
    // six layers, so a looser bound (bf16's 2^-8 relative, compounded
    // through the layers; measured 3.2e-3 on the emulator); a kernel or
    // wiring error is off by the order of the gradients themselves.
    let mut g16 = g16;
    g16.set_attn(Attn::Bf16);
    compare_steps(
        "all-MiniLM-L6-v2 bias=v,mlp-in (bf16 weights, tensor-core attention)",
        c,
        step(&g16, &md, &opts, &batch, Some(42)),
        1e-2,
    );
}

// ---- the CLI on the device ---------------------------------------------------------

/// `beft train --quiet --task sst2` of `model` on `data` into `out`, with
/// `args`; `emulator`: whether the child may use the CUDA emulator that
/// `BEFT_CUDA_EMU` names.
fn cli_train(
    model: &std::path::Path,
    data: &std::path::Path,
    out: &std::path::Path,
    args: &[&str],
    emulator: bool,
) -> std::process::Output {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_beft"));
    cmd.args(["train", "--quiet", "--task", "sst2"])
        .args(args)
        .arg("--model")
        .arg(model)
        .arg("--data")
        .arg(data)
        .arg("--out")
        .arg(out);
    if !emulator {
        cmd.env_remove(beft::backend::cuda::EMU_VAR);
    }
    cmd.output().unwrap()
}

/// The `loss` and `grad_norm` of every step of a run (steps.jsonl), and
/// its last dev metric (metrics.jsonl).
fn run_curve(out: &std::path::Path) -> (Vec<(f64, f64)>, f64) {
    let lines = |f: &str| -> Vec<serde_json::Value> {
        std::fs::read_to_string(out.join(f))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let steps = lines("steps.jsonl")
        .iter()
        .map(|v| {
            (
                v["loss"].as_f64().unwrap(),
                v["grad_norm"].as_f64().unwrap(),
            )
        })
        .collect();
    let dev = lines("metrics.jsonl")
        .iter()
        .rev()
        .filter(|v| v["split"] == "dev")
        .find_map(|v| v["metric"].as_f64())
        .unwrap_or(f64::NAN);
    (steps, dev)
}

/// `beft train --device cuda`, the CLI end to end (a tiny BERT, 48
/// SST-2-shaped examples, 2 epochs, dropout on): every step's loss and
/// gradient norm follow `--device cpu` (the GPU holds the weights in bf16,
/// hence the tolerance), and the run finishes with its summary.
#[test]
fn cli_training_on_cuda_follows_the_cpu() {
    if gpu(WeightDtype::Bf16).is_none() {
        return;
    }
    let tmp = TempDir::new().unwrap();
    let (model, data) = (tmp.path().join("m"), tmp.path().join("d"));
    write_tiny_model(&model, TinyArch::Bert, 5, None);
    write_tiny_sst2(&data, 48, 16);
    let train = |device: &str| {
        let out = tmp.path().join(device);
        let o = cli_train(
            &model,
            &data,
            &out,
            &[
                "--epochs",
                "2",
                "--batch",
                "8",
                "--lr",
                "1e-2",
                "--bias",
                "all",
                "--threads",
                "1",
                "--device",
                device,
            ],
            true,
        );
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "beft train --device {device}:\n{err}");
        assert!(
            out.join("summary.json").is_file(),
            "{device}: no summary.json"
        );
        run_curve(&out)
    };
    // `beft devices` lists the device the run below uses.
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_beft"))
        .arg("devices")
        .output()
        .unwrap();
    let listed = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success() && listed.contains("cuda:0: "),
        "{listed}"
    );
    let (cpu, cpu_dev) = train("cpu");
    let (gpu, gpu_dev) = train("cuda");
    assert_eq!(cpu.len(), gpu.len(), "step counts");
    assert!(cpu.len() >= 12, "{} steps", cpu.len());
    let mut worst = 0f64;
    for (i, ((cl, cg), (gl, gg))) in cpu.iter().zip(&gpu).enumerate() {
        let (el, eg) = ((cl - gl).abs() / cl.abs(), (cg - gg).abs() / cg.abs());
        assert!(
            el < 1e-2 && eg < 3e-2,
            "step {i}: loss {gl} vs {cl} on the CPU, grad norm {gg} vs {cg}"
        );
        worst = worst.max(el);
    }
    eprintln!(
        "CLI: {} steps, worst relative loss error {worst:.2e}; dev accuracy {gpu_dev} (CPU {cpu_dev})",
        cpu.len()
    );
    assert!(
        (gpu_dev - cpu_dev).abs() <= 2.0 / 16.0 + 1e-9,
        "dev accuracy {gpu_dev} vs {cpu_dev} on the CPU"
    );
}

// ---- the CLI without a driver ---------------------------------------------------

#[test]
fn cuda_device_without_driver_is_a_clean_error() {
    // On the emulator this process has a "driver"; the CLI below runs
    // without it, and skips the check if the machine has a real one.
    let emulated = beft::backend::cuda::emulated();
    if !emulated && driver_present() {
        eprintln!("skipped: a CUDA driver is present (this checks the no-driver message)");
        return;
    }
    let tmp = TempDir::new().unwrap();
    let (model, data, out) = (
        tmp.path().join("m"),
        tmp.path().join("d"),
        tmp.path().join("out"),
    );
    write_tiny_model(&model, TinyArch::Bert, 1, None);
    write_tiny_sst2(&data, 16, 8);
    let o = cli_train(
        &model,
        &data,
        &out,
        &["--epochs", "1", "--device", "cuda"],
        false,
    );
    let err = String::from_utf8_lossy(&o.stderr);
    if emulated && o.status.success() {
        eprintln!("skipped: a CUDA driver is present (this checks the no-driver message)");
        return;
    }
    assert!(!o.status.success(), "expected failure; stderr:\n{err}");
    assert!(!err.contains("panicked"), "panicked:\n{err}");
    assert!(
        err.contains(NO_DRIVER),
        "stderr should say '{NO_DRIVER}':\n{err}"
    );
    assert!(!out.exists(), "no run directory after a failure");
    // The library says the same (in a process without the emulator).
    if emulated {
        return;
    }
    match CudaBackend::new(0) {
        Err(e) => assert_eq!(e.message(), NO_DRIVER),
        Ok(_) => panic!("a backend without a driver"),
    }
}
