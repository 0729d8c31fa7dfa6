//! The machine's f32 FMA peak per core, measured (`beft::bench::peak`): a
//! loop of independent fused multiply-adds on the widest vectors the CPU
//! offers (AVX-512, else AVX2+FMA), enough accumulators to hide the FMA
//! latency. The matmul benchmark's GFLOP/s divided by this (times the
//! threads) is the "% of peak" in docs/performance.md; `beft bench --device
//! cpu` measures the same thing as its GEMM ceiling. The second line is the
//! AVX-512 BF16 dot-product peak, the ceiling of `BEFT_CPU_GEMM=bf16`; the
//! third, where the CPU has AMX, the tile peak that replaces it.
//!
//! ```sh
//! cargo run --release --example fma_peak
//! ```

fn main() {
    match beft::bench::peak::measure(20_000_000, 5) {
        Some(p) => println!(
            "{{\"isa\": \"{}\", \"fma_peak_gflops_per_core\": {:.1}, \"fma_peak_gflops_all_threads\": {:.1}, \"threads\": {}}}",
            p.isa, p.gflops_per_core, p.gflops_all, p.threads
        ),
        None => println!("fma_peak: no AVX2/AVX-512 FMA on this CPU (x86-64 only)"),
    }
    match beft::bench::peak::measure_bf16(20_000_000, 5) {
        Some(p) => println!(
            "{{\"isa\": \"{}\", \"dot_peak_gflops_per_core\": {:.1}, \"dot_peak_gflops_all_threads\": {:.1}, \"threads\": {}}}",
            p.isa, p.gflops_per_core, p.gflops_all, p.threads
        ),
        None => println!("fma_peak: no AVX-512 BF16 on this CPU (the bf16 GEMM is unavailable)"),
    }
    match beft::bench::peak::measure_amx(20_000_000, 5) {
        Some(p) => println!(
            "{{\"isa\": \"{}\", \"tile_peak_gflops_per_core\": {:.1}, \"tile_peak_gflops_all_threads\": {:.1}, \"threads\": {}}}",
            p.isa, p.gflops_per_core, p.gflops_all, p.threads
        ),
        None => println!("fma_peak: no AMX-BF16 here (the bf16 GEMM runs on AVX-512 BF16)"),
    }
}
