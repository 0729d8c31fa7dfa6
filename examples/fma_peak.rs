//! The machine's f32 FMA peak per core, measured: a loop of independent
//! fused multiply-adds on the widest vectors the CPU offers (AVX-512, else
//! AVX2+FMA), enough accumulators to hide the FMA latency. The matmul
//! benchmark's GFLOP/s divided by this (times the threads) is the "% of
//! peak" in docs/performance.md.
//!
//! ```sh
//! cargo run --release --example fma_peak
//! ```

use std::time::Instant;

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

fn main() {
    #[cfg(target_arch = "x86_64")]
    {
        let (name, lanes, run): (&str, u64, unsafe fn(u64) -> f32) =
            if is_x86_feature_detected!("avx512f") {
                ("avx512", 16, fma_avx512)
            } else if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                ("avx2+fma", 8, fma_avx2)
            } else {
                println!("no AVX2/AVX-512 FMA on this CPU");
                return;
            };
        let iters = 20_000_000u64;
        // SAFETY: the feature was detected above.
        unsafe { run(iters / 10) };
        let mut best = 0f64;
        let mut sink = 0f32;
        for _ in 0..5 {
            let t = Instant::now();
            sink += unsafe { run(iters) };
            let s = t.elapsed().as_secs_f64();
            let flops = (iters * 12 * lanes * 2) as f64;
            best = best.max(flops / s / 1e9);
        }
        println!(
            "{{\"isa\": \"{name}\", \"fma_peak_gflops_per_core\": {best:.1}, \"sink\": {}}}",
            sink.is_finite()
        );
    }
    #[cfg(not(target_arch = "x86_64"))]
    println!("fma_peak: x86-64 only");
}
