//! The CPU's f32 FMA peak, measured: a loop of independent fused
//! multiply-adds on the widest vectors the CPU offers (AVX-512, else
//! AVX2+FMA), with enough accumulators to hide the FMA latency, run on
//! every thread of the pool at once. This is the CPU's GEMM ceiling in
//! `beft bench` (and `examples/fma_peak.rs`); with `BEFT_CPU_GEMM=bf16` the
//! ceiling is the same loop of AVX-512 BF16 dot products (`vdpbf16ps`: two
//! multiply-adds per lane), [`measure_bf16`], or where the CPU has AMX a
//! loop of tile products (`tdpbf16ps`), [`measure_amx`].

use std::time::Instant;

/// A measured FMA peak.
#[derive(Clone, Debug, serde::Serialize)]
pub struct FmaPeak {
    /// `avx512`, `avx2+fma`, `avx512_bf16` or `amx_bf16`.
    pub isa: String,
    /// Best single-thread rate, GFLOP/s (2 FLOPs per FMA lane).
    pub gflops_per_core: f64,
    /// All `threads` threads at once, GFLOP/s.
    pub gflops_all: f64,
    pub threads: usize,
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn fma_avx512(iters: u64) -> f32 {
    use std::arch::x86_64::*;
    let a = _mm512_set1_ps(0.999_999);
    let b = _mm512_set1_ps(1e-7);
    let mut acc = [_mm512_set1_ps(1.0); 12];
    for _ in 0..iters {
        for r in acc.iter_mut() {
            *r = _mm512_fmadd_ps(*r, a, b);
        }
    }
    let mut out = [0f32; 16];
    let mut s = 0.0;
    for r in acc {
        _mm512_storeu_ps(out.as_mut_ptr(), r);
        s += out.iter().sum::<f32>();
    }
    s
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn fma_avx2(iters: u64) -> f32 {
    use std::arch::x86_64::*;
    let a = _mm256_set1_ps(0.999_999);
    let b = _mm256_set1_ps(1e-7);
    let mut acc = [_mm256_set1_ps(1.0); 12];
    for _ in 0..iters {
        for r in acc.iter_mut() {
            *r = _mm256_fmadd_ps(*r, a, b);
        }
    }
    let mut out = [0f32; 8];
    let mut s = 0.0;
    for r in acc {
        _mm256_storeu_ps(out.as_mut_ptr(), r);
        s += out.iter().sum::<f32>();
    }
    s
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn dot_bf16(iters: u64) -> f32 {
    use std::arch::x86_64::*;
    // Pairs of bf16 (0.999, 1e-7): the sums stay finite.
    let a: __m512bh = std::mem::transmute(_mm512_set1_epi32(0x33d6_3f80));
    let b: __m512bh = std::mem::transmute(_mm512_set1_epi32(0x3f7f_3f7f));
    let mut acc = [_mm512_set1_ps(1.0); 12];
    for _ in 0..iters {
        for r in acc.iter_mut() {
            *r = _mm512_dpbf16_ps(*r, a, b);
        }
    }
    let mut s = 0.0;
    for r in acc {
        s += _mm512_reduce_add_ps(r);
    }
    s
}

/// Measure the bf16 dot-product peak (the ceiling of the bf16 GEMM) like
/// [`measure`]: `None` without AVX-512 BF16.
pub fn measure_bf16(iters: u64, tries: usize) -> Option<FmaPeak> {
    #[cfg(target_arch = "x86_64")]
    {
        if !crate::backend::fast::gemm16::available() {
            return None;
        }
        // 16 lanes × 2 products × 2 FLOPs per instruction.
        Some(time_peak("avx512_bf16", iters, tries, 64, dot_bf16))
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (iters, tries);
        None
    }
}

/// Twelve AMX `tdpbf16ps` per iteration into four C tiles from fixed A
/// and B tiles (each instruction 16 × 16 × 32 multiply-adds).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn dot_amx(iters: u64) -> f32 {
    use crate::backend::fast::amx;
    use std::arch::asm;
    // Pairs of bf16 (1.0, 2^-10): the sums stay finite.
    let a = [0x3a80_3f80u32; 256];
    let mut c = [0f32; 256];
    amx::configure();
    asm!(
        "tileloadd tmm4, [{a} + {s}*1]",
        "tileloadd tmm6, [{a} + {s}*1]",
        "tilezero tmm0",
        "tilezero tmm1",
        "tilezero tmm2",
        "tilezero tmm3",
        a = in(reg) a.as_ptr(),
        s = in(reg) 64usize,
        options(nostack, readonly),
    );
    for _ in 0..iters {
        asm!(
            "tdpbf16ps tmm0, tmm4, tmm6",
            "tdpbf16ps tmm1, tmm4, tmm6",
            "tdpbf16ps tmm2, tmm4, tmm6",
            "tdpbf16ps tmm3, tmm4, tmm6",
            "tdpbf16ps tmm0, tmm4, tmm6",
            "tdpbf16ps tmm1, tmm4, tmm6",
            "tdpbf16ps tmm2, tmm4, tmm6",
            "tdpbf16ps tmm3, tmm4, tmm6",
            "tdpbf16ps tmm0, tmm4, tmm6",
            "tdpbf16ps tmm1, tmm4, tmm6",
            "tdpbf16ps tmm2, tmm4, tmm6",
            "tdpbf16ps tmm3, tmm4, tmm6",
            options(nostack, nomem),
        );
    }
    asm!(
        "tilestored [{c} + {s}*1], tmm0",
        c = in(reg) c.as_mut_ptr(),
        s = in(reg) 64usize,
        options(nostack),
    );
    amx::release();
    c.iter().sum()
}

/// Measure the AMX bf16 tile peak (the ceiling of the bf16 GEMM where it
/// runs on AMX) like [`measure`], with `iters / 16` iterations (one tile
/// product is 16 cycles or more): `None` without AMX-BF16.
pub fn measure_amx(iters: u64, tries: usize) -> Option<FmaPeak> {
    #[cfg(target_arch = "x86_64")]
    {
        if !crate::backend::fast::amx::available() {
            return None;
        }
        // 16 × 16 outputs × 32 products × 2 FLOPs per instruction.
        Some(time_peak(
            "amx_bf16",
            iters / 16 + 1,
            tries,
            16 * 16 * 32 * 2,
            dot_amx,
        ))
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (iters, tries);
        None
    }
}

/// Measure the FMA peak with `iters` iterations of 12 vector FMAs per
/// measurement (best of `tries`), on one thread and on every thread of the
/// rayon pool at once. `None` when the CPU has neither AVX-512 nor
/// AVX2+FMA (or is not x86-64).
pub fn measure(iters: u64, tries: usize) -> Option<FmaPeak> {
    #[cfg(target_arch = "x86_64")]
    {
        let (isa, lanes, run): (&str, u64, unsafe fn(u64) -> f32) =
            if is_x86_feature_detected!("avx512f") {
                ("avx512", 16, fma_avx512)
            } else if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                ("avx2+fma", 8, fma_avx2)
            } else {
                return None;
            };
        Some(time_peak(isa, iters, tries, lanes * 2, run))
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (iters, tries);
        None
    }
}

/// Time `run` (12 vector instructions of `flops_per_op` FLOPs per
/// iteration), best of `tries`, on one thread and on every pool thread.
#[cfg(target_arch = "x86_64")]
fn time_peak(
    isa: &str,
    iters: u64,
    tries: usize,
    flops_per_op: u64,
    run: unsafe fn(u64) -> f32,
) -> FmaPeak {
    // SAFETY: the caller detected the instruction set.
    let call = |n: u64| unsafe { run(n) };
    let flops = (iters * 12 * flops_per_op) as f64;
    let mut sink = call(iters / 10 + 1);
    let mut one = 0f64;
    for _ in 0..tries.max(1) {
        let t = Instant::now();
        sink += call(iters);
        one = one.max(flops / t.elapsed().as_secs_f64() / 1e9);
    }
    let threads = rayon::current_num_threads().max(1);
    let mut all = 0f64;
    for _ in 0..tries.max(1) {
        let t = Instant::now();
        let sinks = rayon::broadcast(|_| call(iters));
        let s = t.elapsed().as_secs_f64();
        sink += sinks.iter().sum::<f32>();
        all = all.max(flops * threads as f64 / s / 1e9);
    }
    // Keep the result alive so that the loops are not optimised away.
    std::hint::black_box(sink);
    FmaPeak {
        isa: isa.into(),
        gflops_per_core: one,
        gflops_all: all,
        threads,
    }
}
