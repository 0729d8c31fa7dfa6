//! cuBLAS GEMM ceilings for `beft bench`: the rate of NVIDIA's own bf16 and
//! f32 GEMM on this GPU, against which beft's kernels are judged. beft's
//! ops never call cuBLAS. The library is loaded at run time (cudarc's
//! `dynamic-loading`): without it the ceiling is reported as unavailable.

use std::sync::Arc;
use std::time::Instant;

use cudarc::cublas::sys::cublasOperation_t;
use cudarc::cublas::{CudaBlas, Gemm, GemmConfig};
use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DeviceRepr};

use crate::error::{Error, Result};
use crate::rng::Rng;

/// One measured GEMM rate.
#[derive(Clone, Debug, serde::Serialize)]
pub struct BlasCeiling {
    /// `cublas_bf16` (bf16 in and out, f32 accumulation) or `cublas_f32`
    /// (SGEMM, default math mode: no TF32).
    pub name: String,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    /// Median seconds per GEMM.
    pub seconds: f64,
    pub tflops: f64,
}

/// Whether libcublas can be loaded on this machine.
pub fn cublas_present() -> bool {
    // SAFETY: tries to dlopen libcublas by its usual names; nothing is called.
    unsafe { cudarc::cublas::sys::is_culib_present() }
}

fn host_values<T>(n: usize, seed: u64, conv: impl Fn(f32) -> T) -> Vec<T> {
    let mut rng = Rng::new(seed);
    (0..n)
        .map(|_| conv(((rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32) - 0.5))
        .collect()
}

fn upload<T: DeviceRepr>(stream: &Arc<CudaStream>, v: &[T]) -> Result<CudaSlice<T>> {
    stream
        .clone_htod(v)
        .map_err(|e| Error::msg(format!("cuBLAS ceiling: upload failed: {e}")))
}

/// Time `f` (one GEMM launch): `warmup` launches, then the median of `reps`
/// launches, each waited for.
fn time(
    stream: &Arc<CudaStream>,
    warmup: usize,
    reps: usize,
    mut f: impl FnMut() -> Result<()>,
) -> Result<f64> {
    let sync = || {
        stream
            .synchronize()
            .map_err(|e| Error::msg(format!("cuBLAS ceiling: {e}")))
    };
    for _ in 0..warmup {
        f()?;
    }
    sync()?;
    let mut t = Vec::with_capacity(reps);
    for _ in 0..reps.max(1) {
        let t0 = Instant::now();
        f()?;
        sync()?;
        t.push(t0.elapsed().as_secs_f64());
    }
    Ok(crate::train::run::median(&mut t))
}

/// Square bf16 and f32 GEMMs of side `size` on `ctx`'s default stream
/// (random inputs, so that the tensor cores see real data). Fails with a
/// message when cuBLAS cannot be loaded or a call fails (cudarc panics on a
/// missing symbol; that panic is caught and becomes the message).
pub fn gemm_ceilings(ctx: &Arc<CudaContext>, size: usize, reps: usize) -> Result<Vec<BlasCeiling>> {
    if !cublas_present() {
        return Err(Error::msg(
            "cuBLAS not found (cudarc looks for libcublas.so, libcublas.so.12, ...): no GEMM ceiling; put the directory of libcublas.so on LD_LIBRARY_PATH (a pip wheel's libcublas.so.13 needs a libcublas.so symlink)",
        ));
    }
    let prev = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| measure(ctx, size, reps)));
    std::panic::set_hook(prev);
    r.unwrap_or_else(|p| {
        let what = p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "unknown panic".into());
        Err(Error::msg(format!("cuBLAS failed: {what}")))
    })
}

fn measure(ctx: &Arc<CudaContext>, size: usize, reps: usize) -> Result<Vec<BlasCeiling>> {
    let stream = ctx.default_stream();
    let blas = CudaBlas::new(stream.clone())
        .map_err(|e| Error::msg(format!("cuBLAS: cannot create a handle: {e}")))?;
    let side = i32::try_from(size).map_err(|_| Error::msg("cuBLAS ceiling: size too large"))?;
    Ok(vec![
        square_gemm(
            &blas,
            &stream,
            "cublas_bf16",
            side,
            3,
            reps,
            (1, 2),
            half::bf16::from_f32,
        )?,
        square_gemm(&blas, &stream, "cublas_f32", side, 2, reps, (3, 4), |x| x)?,
    ])
}

/// The median rate of a `side³` GEMM (`C = A·B`, random inputs made by
/// `conv` from the two seeds) after `warmup` launches.
fn square_gemm<T>(
    blas: &CudaBlas,
    stream: &Arc<CudaStream>,
    name: &str,
    side: i32,
    warmup: usize,
    reps: usize,
    seeds: (u64, u64),
    conv: impl Fn(f32) -> T + Copy,
) -> Result<BlasCeiling>
where
    T: DeviceRepr + Copy,
    CudaBlas: Gemm<T>,
{
    let s = side as usize;
    let n = s * s;
    let a = upload(stream, &host_values(n, seeds.0, conv))?;
    let b = upload(stream, &host_values(n, seeds.1, conv))?;
    let mut c = upload(stream, &vec![conv(0.0); n])?;
    let cfg = GemmConfig {
        transa: cublasOperation_t::CUBLAS_OP_N,
        transb: cublasOperation_t::CUBLAS_OP_N,
        m: side,
        n: side,
        k: side,
        alpha: conv(1.0),
        lda: side,
        ldb: side,
        beta: conv(0.0),
        ldc: side,
    };
    // SAFETY: every operand holds side² elements with leading dimension side.
    let secs = time(stream, warmup, reps, || unsafe {
        blas.gemm(cfg, &a, &b, &mut c)
            .map_err(|e| Error::msg(format!("cuBLAS GEMM ({name}) failed: {e}")))
    })?;
    Ok(BlasCeiling {
        name: name.into(),
        m: s,
        n: s,
        k: s,
        seconds: secs,
        tflops: 2.0 * (s as f64).powi(3) / secs / 1e12,
    })
}
