//! The fast CPU backend (`--device cpu`): the same op vocabulary as the
//! reference [`CpuBackend`], in f32, built for speed.
//!
//! - matmul: a packed, cache-blocked SIMD GEMM (the `gemm` crate; AVX-512
//!   or AVX2 kernels picked at run time, portable fallback), threaded over
//!   the rayon pool (sized by `--threads`); with `BEFT_CPU_GEMM=bf16`, on a
//!   CPU with AVX-512 BF16, products of 32 rows or more round both operands
//!   to bf16 and sum in f32 (PyTorch's bf16 autocast numerics) at twice the
//!   f32 rate ([`gemm16`]);
//! - attention: fused per (sequence, head, block of queries), never holding
//!   more than one block of scores; see [`attn`];
//! - element-wise ops and row reductions: vectorised loops with polynomial
//!   `exp` / erf-GELU, compiled for AVX-512, AVX2 and the baseline, chosen at
//!   run time; see [`kernels`];
//! - buffers: served from a free list ([`pool`]), so a training step after
//!   the first allocates (almost) nothing; vectors unused for a few hundred
//!   requests are released when shapes change (dynamic padding), so the
//!   list does not hoard every batch length's buffers;
//! - frozen weights: f32 tensors are read in place from the memory map;
//!   f16/bf16 tensors are converted on use into a pooled scratch buffer, one
//!   matrix at a time (never a full f32 copy of the model).
//!
//! The ops that are off the hot path of an encoder step (losses, pooling,
//! the optimiser, candidate scoring, RoPE, row gathers/scatters) are the
//! reference backend's own code, called on the same buffers.

pub mod amx;
pub mod attn;
pub mod attn512;
pub mod gemm16;
pub mod kernels;
pub mod pool;

use std::ops::Deref;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use rayon::prelude::*;

use super::cpu::{CpuBackend, CpuBuf};
use super::{Act, AdamW, AttnDims, Backend, CandidateIndex, Dropout, PoolKind, Proj};
use crate::error::{Error, Result};
use crate::weights::{DType, TensorView};
use gemm16::{ASrc, BSrc, Kernel};

/// A buffer of the fast backend: the reference backend's buffer (owned f32
/// values, or a frozen weight read in place), whose owned storage goes back
/// to the free list when dropped.
#[derive(Debug)]
pub struct FastBuf(CpuBuf<f32>, Option<Arc<Packs>>);

/// A frozen weight's bf16 panels (`BEFT_CPU_GEMM=bf16`), packed on its
/// first product in each orientation and kept with the weight (shared by
/// its clones), while the process-wide total stays within
/// [`pack_cache_limit`]: the panels of a weight that is multiplied every
/// step need not be rebuilt every step.
#[derive(Default)]
pub struct Packs(Mutex<Vec<Arc<Cached>>>);

impl std::fmt::Debug for Packs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.0.lock().map(|v| v.len()).unwrap_or(0);
        write!(f, "Packs({n} packed)")
    }
}

/// Bytes of packed panels held by all weights.
static PACKED_BYTES: AtomicUsize = AtomicUsize::new(0);

/// The most bytes of packed weight panels kept: `BEFT_CPU_PACK_CACHE` MiB
/// (0: none kept, every product packs its weight), default 2048.
pub fn pack_cache_limit() -> usize {
    static LIMIT: OnceLock<usize> = OnceLock::new();
    *LIMIT.get_or_init(|| {
        let mib = std::env::var("BEFT_CPU_PACK_CACHE")
            .ok()
            .and_then(|v| v.trim().parse::<usize>().ok())
            .unwrap_or(2048);
        mib << 20
    })
}

/// Packed panels, counted against [`pack_cache_limit`] while they live.
pub struct Cached(gemm16::PackedB);

impl Drop for Cached {
    fn drop(&mut self) {
        PACKED_BYTES.fetch_sub(self.0.bytes(), Ordering::Relaxed);
    }
}

impl Packs {
    /// The panels of B for this product: kept ones, or packed now (and
    /// kept if the budget allows); `None` when over the budget (the caller
    /// packs into scratch as for any operand).
    fn get(
        &self,
        key: (Kernel, usize, usize, bool),
        b: impl FnOnce() -> Arc<Cached>,
    ) -> Option<Arc<Cached>> {
        let find = |v: &Vec<Arc<Cached>>| v.iter().find(|c| c.0.key == key).cloned();
        if let Some(c) = find(&*self.0.lock().ok()?) {
            return Some(c);
        }
        let (kernel, n, k, _) = key;
        let want = (gemm16::packed_len(kernel, n, k) + 16) * std::mem::size_of::<u32>();
        if PACKED_BYTES.load(Ordering::Relaxed) + want > pack_cache_limit() {
            return None;
        }
        // Packed outside the lock (the packing runs on the pool).
        let c = b();
        let mut v = self.0.lock().ok()?;
        if let Some(old) = find(&v) {
            return Some(old);
        }
        PACKED_BYTES.fetch_add(c.0.bytes(), Ordering::Relaxed);
        v.push(c.clone());
        Some(c)
    }
}

impl FastBuf {
    fn owned(v: Vec<f32>) -> Self {
        FastBuf(CpuBuf::Owned(v), None)
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The underlying reference-backend buffer.
    pub fn inner(&self) -> &CpuBuf<f32> {
        &self.0
    }

    /// Owned values (for tests and read-back).
    pub fn to_vec(&self) -> Vec<f32> {
        self.0.to_vec()
    }

    fn slice_mut(&mut self) -> &mut [f32] {
        self.0.slice_mut()
    }
}

impl Clone for FastBuf {
    fn clone(&self) -> Self {
        match &self.0 {
            CpuBuf::Owned(v) => {
                let mut w = pool::take(v.len());
                w.extend_from_slice(v);
                FastBuf::owned(w)
            }
            CpuBuf::Mapped(t) => FastBuf(CpuBuf::Mapped(t.clone()), self.1.clone()),
        }
    }
}

impl Drop for FastBuf {
    fn drop(&mut self) {
        if let CpuBuf::Owned(v) = &mut self.0 {
            pool::give(std::mem::take(v));
        }
    }
}

/// f32 values of a buffer: borrowed, or converted into a pooled scratch.
enum F32<'a> {
    Borrowed(&'a [f32]),
    Scratch(FastBuf),
}

impl Deref for F32<'_> {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        match self {
            F32::Borrowed(s) => s,
            F32::Scratch(b) => match &b.0 {
                CpuBuf::Owned(v) => v,
                CpuBuf::Mapped(_) => unreachable!(),
            },
        }
    }
}

/// B of a bf16 product: bf16 weights read in place (never widened), other
/// buffers as f32 (converted into `wide` where they are not f32).
fn src<'a>(b: &'a FastBuf, wide: &'a mut Option<F32<'a>>) -> BSrc<'a> {
    match &b.0 {
        CpuBuf::Mapped(t) if t.dtype == DType::BF16 => BSrc::Bf16(t.bytes()),
        _ => BSrc::F32(wide.insert(view(b))),
    }
}

fn view(b: &FastBuf) -> F32<'_> {
    match &b.0 {
        CpuBuf::Owned(v) => F32::Borrowed(v),
        CpuBuf::Mapped(t) => {
            if let Some(s) = t.as_f32_slice() {
                return F32::Borrowed(s);
            }
            let n = t.numel();
            let mut v = pool::take_any(n);
            // Convert in parallel chunks (f16/bf16 weights, one matrix).
            v.par_chunks_mut(1 << 16).enumerate().for_each(|(i, c)| {
                t.read_f32_into(i << 16, c);
            });
            F32::Scratch(FastBuf::owned(v))
        }
    }
}

/// `bias[off..off+n]` as f32 (a frozen bias may be f16/bf16).
fn small(b: &FastBuf, off: usize, n: usize) -> Vec<f32> {
    let mut v = vec![0f32; n];
    b.0.read_into(off, &mut v);
    v
}

/// `c[m×n] = (accumulate ? c : 0) + scale · A·B` with arbitrary strides
/// (row stride `rs*`, column stride `cs*`), single-threaded.
///
/// # Safety
/// Every pointer must be valid for the elements its strides reach.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn sgemm(
    m: usize,
    n: usize,
    k: usize,
    c: *mut f32,
    rsc: isize,
    accumulate: bool,
    a: *const f32,
    rsa: isize,
    csa: isize,
    b: *const f32,
    rsb: isize,
    csb: isize,
    scale: f32,
) {
    sgemm_par(
        m,
        n,
        k,
        c,
        rsc,
        accumulate,
        a,
        rsa,
        csa,
        b,
        rsb,
        csb,
        scale,
        gemm::Parallelism::None,
    )
}

#[allow(clippy::too_many_arguments)]
unsafe fn sgemm_par(
    m: usize,
    n: usize,
    k: usize,
    c: *mut f32,
    rsc: isize,
    accumulate: bool,
    a: *const f32,
    rsa: isize,
    csa: isize,
    b: *const f32,
    rsb: isize,
    csb: isize,
    scale: f32,
    par: gemm::Parallelism,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                for j in 0..n {
                    *c.offset(i as isize * rsc + j as isize) = 0.0;
                }
            }
        }
        return;
    }
    // gemm: dst = alpha·dst + beta·lhs·rhs (dst read only when asked).
    gemm::gemm(
        m, n, k, c, 1, rsc, accumulate, a, csa, rsa, b, csb, rsb, 1.0, scale, false, false, false,
        par,
    );
}

/// Elements per parallel chunk of element-wise ops.
const CHUNK: usize = 1 << 15;

/// How the fast backend multiplies matrices (`BEFT_CPU_GEMM`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CpuGemm {
    /// f32 products (the `gemm` crate). Default.
    #[default]
    F32,
    /// Products of [`BF16_MIN_ROWS`] rows or more with both operands rounded
    /// to bf16 and f32 sums ([`gemm16`]: AMX tiles where the CPU has them,
    /// else AVX-512 BF16 dot products): about 3 significant
    /// digits per input, as PyTorch's bf16 autocast; smaller ones (a single
    /// sequence's generation steps, bound by reading the weights) stay f32.
    Bf16,
}

/// Fewest rows for which `CpuGemm::Bf16` uses the bf16 product.
pub const BF16_MIN_ROWS: usize = 32;

impl CpuGemm {
    /// From `BEFT_CPU_GEMM` (`f32` or `bf16`; default `f32`).
    pub fn from_env() -> Result<Self> {
        Ok(if super::env_bf16("BEFT_CPU_GEMM")? {
            CpuGemm::Bf16
        } else {
            CpuGemm::F32
        })
    }
}

/// The fast CPU backend (f32).
#[derive(Clone, Debug, Default)]
pub struct FastCpu {
    r: CpuBackend<f32>,
    gemm: CpuGemm,
    /// Fill [`Backend::output`] buffers with NaN (tests: an element an op
    /// fails to write shows up instead of passing as a stale value).
    poison: bool,
}

impl FastCpu {
    /// LayerNorm of the rows of `src` over chunks of rows in parallel.
    #[allow(clippy::too_many_arguments)]
    fn layernorm_par(
        &self,
        y: &mut FastBuf,
        xhat: &mut FastBuf,
        rstd: &mut FastBuf,
        src: kernels::RowSrc<'_>,
        gamma: &FastBuf,
        beta: &FastBuf,
        beta_off: usize,
        rows: usize,
        cols: usize,
        eps: f64,
    ) {
        let g = view(gamma);
        let g = &g[..cols];
        let b = small(beta, beta_off, cols);
        let rb = (CHUNK / cols.max(1)).max(1);
        y.slice_mut()[..rows * cols]
            .par_chunks_mut(rb * cols)
            .zip(xhat.slice_mut()[..rows * cols].par_chunks_mut(rb * cols))
            .zip(rstd.slice_mut()[..rows].par_chunks_mut(rb))
            .enumerate()
            .for_each(|(i, ((y, xh), rs))| {
                let src = src.chunk(i * rb * cols, y.len());
                kernels::layernorm_rows(y, xh, rs, src, g, &b, cols, eps as f32)
            });
    }

    /// A new backend with f32 products; threads come from the current
    /// rayon pool.
    pub fn new() -> Self {
        FastCpu {
            r: CpuBackend::new(),
            gemm: CpuGemm::F32,
            poison: false,
        }
    }

    /// This backend with every [`Backend::output`] buffer filled with NaN
    /// (for tests: the outputs of the fast path are otherwise recycled
    /// buffers holding stale values).
    pub fn poisoned(self) -> Self {
        FastCpu {
            poison: true,
            ..self
        }
    }

    /// A backend whose products are `gemm`: an error when `Bf16` is asked
    /// of a CPU without AVX-512 BF16.
    pub fn with_gemm(gemm: CpuGemm) -> Result<Self> {
        if gemm == CpuGemm::Bf16 && !gemm16::available() {
            return Err(Error::msg(
                "bf16 products (--bf16, BEFT_CPU_GEMM=bf16) need a CPU with AVX-512 BF16 (AMD Zen 4 or later, Intel Cooper Lake / Sapphire Rapids or later), and this one has none: leave out --bf16 and unset BEFT_CPU_GEMM",
            ));
        }
        Ok(FastCpu {
            gemm,
            ..Self::new()
        })
    }

    /// The backend `BEFT_CPU_GEMM` asks for (f32 products when unset).
    pub fn from_env() -> Result<Self> {
        Self::with_gemm(CpuGemm::from_env()?)
    }

    /// The backend of a run: bf16 products where `bf16` (`--bf16`), else
    /// what `BEFT_CPU_GEMM` asks for.
    pub fn for_run(bf16: bool) -> Result<Self> {
        if bf16 {
            Self::with_gemm(CpuGemm::Bf16)
        } else {
            Self::from_env()
        }
    }

    /// How this backend multiplies matrices.
    pub fn gemm(&self) -> CpuGemm {
        self.gemm
    }

    /// Release the buffers kept for reuse.
    pub fn release_pool(&self) {
        pool::clear();
    }

    fn threads() -> usize {
        rayon::current_num_threads().max(1)
    }

    /// Whether a product of `m` rows is a bf16 one: `CpuGemm::Bf16` and
    /// [`BF16_MIN_ROWS`] rows or more.
    fn bf16_rows(&self, m: usize) -> bool {
        self.gemm == CpuGemm::Bf16 && m >= BF16_MIN_ROWS
    }

    /// `c = (accumulate ? c : 0) + op(a)·op(b)`, then `epi`, as a bf16
    /// product (where [`FastCpu::bf16_rows`]).
    #[allow(clippy::too_many_arguments)]
    fn bf16_product(
        &self,
        c: &mut FastBuf,
        a: ASrc<'_>,
        b: &FastBuf,
        (m, n, k): (usize, usize, usize),
        tb: bool,
        accumulate: bool,
        epi: gemm16::Epilogue<'_>,
    ) {
        let c = c.slice_mut();
        let kernel = Kernel::best();
        // A frozen weight: its panels, packed once.
        if let Some(packs) = &b.1 {
            let pack = || {
                let mut wide = None;
                Arc::new(Cached(gemm16::PackedB::new(
                    kernel,
                    n,
                    k,
                    src(b, &mut wide),
                    tb,
                )))
            };
            if let Some(p) = packs.get((kernel, n, k, tb), pack) {
                gemm16::gemm_packed(m, c, accumulate, a, &p.0, epi);
                return;
            }
        }
        let mut wide = None;
        gemm16::gemm_on(
            kernel,
            m,
            n,
            k,
            c,
            accumulate,
            a,
            src(b, &mut wide),
            tb,
            epi,
        );
    }

    /// A bf16 linear layer of `m` rows whose input is `a`:
    /// `c[m×n] = a·op(w) (+ bias)`, then `act` into `act_out`.
    fn bf16_linear(
        &self,
        c: &mut FastBuf,
        a: ASrc<'_>,
        p: &Proj<'_, FastBuf>,
        m: usize,
        k: usize,
        act_out: Option<(Act, &mut gemm16::PackedA)>,
        kept: bool,
    ) {
        let bv = p.bias.map(|(b, off)| small(b, off, p.n));
        let epi = match act_out {
            Some((f, out)) => gemm16::Epilogue::packed(bv.as_deref(), f, out),
            None => gemm16::Epilogue::new(bv.as_deref(), None),
        };
        let epi = if kept { epi.kept() } else { epi };
        self.bf16_product(c, a, p.w, (m, p.n, k), p.tb, false, epi);
    }
}

impl Backend for FastCpu {
    type T = f32;
    type Buf = FastBuf;
    type Ids = Vec<u32>;

    fn name(&self) -> String {
        format!(
            "cpu (fast, f32{}, {}, {} threads)",
            match self.gemm {
                CpuGemm::F32 => "",
                CpuGemm::Bf16 if amx::available() => ", bf16 matmul on AMX",
                CpuGemm::Bf16 => ", bf16 matmul",
            },
            kernels::simd_name(),
            Self::threads()
        )
    }

    fn zeros(&self, n: usize) -> FastBuf {
        let mut v = pool::take(n);
        v.resize(n, 0.0);
        FastBuf::owned(v)
    }

    fn output(&self, n: usize) -> FastBuf {
        let mut v = pool::take_any(n);
        if self.poison {
            v.fill(f32::NAN);
        }
        FastBuf::owned(v)
    }

    fn upload(&self, data: &[f32]) -> FastBuf {
        let mut v = pool::take(data.len());
        v.extend_from_slice(data);
        FastBuf::owned(v)
    }

    fn download(&self, buf: &FastBuf) -> Vec<f32> {
        buf.0.to_vec()
    }

    fn upload_ids(&self, ids: &[u32]) -> Vec<u32> {
        ids.to_vec()
    }

    fn weight(&self, t: &TensorView) -> Result<FastBuf> {
        Ok(FastBuf(
            CpuBuf::Mapped(t.clone()),
            Some(Arc::new(Packs::default())),
        ))
    }

    fn len(&self, buf: &FastBuf) -> usize {
        buf.len()
    }

    fn copy(&self, dst: &mut FastBuf, dst_off: usize, src: &FastBuf, src_off: usize, n: usize) {
        self.r.copy(&mut dst.0, dst_off, &src.0, src_off, n)
    }

    fn fill(&self, buf: &mut FastBuf, value: f64) {
        buf.slice_mut().fill(value as f32);
    }

    fn matmul(
        &self,
        c: &mut FastBuf,
        a: &FastBuf,
        b: &FastBuf,
        m: usize,
        n: usize,
        k: usize,
        ta: bool,
        tb: bool,
        accumulate: bool,
    ) {
        if self.bf16_rows(m) {
            let epi = gemm16::Epilogue::default();
            let a = view(a);
            self.bf16_product(c, ASrc::F32(&a, ta), b, (m, n, k), tb, accumulate, epi);
            return;
        }
        let a = view(a);
        let b = view(b);
        let c = c.slice_mut();
        assert!(
            a.len() >= m * k && b.len() >= k * n && c.len() >= m * n,
            "matmul shapes"
        );
        let (rsa, csa) = if ta {
            (1isize, m as isize)
        } else {
            (k as isize, 1isize)
        };
        let (rsb, csb) = if tb {
            (1isize, k as isize)
        } else {
            (n as isize, 1isize)
        };
        let threads = Self::threads();
        let par = if threads > 1 && m * n * k >= 1 << 18 {
            gemm::Parallelism::Rayon(threads)
        } else {
            gemm::Parallelism::None
        };
        // SAFETY: lengths checked above; c is exclusively borrowed.
        unsafe {
            sgemm_par(
                m,
                n,
                k,
                c.as_mut_ptr(),
                n as isize,
                accumulate,
                a.as_ptr(),
                rsa,
                csa,
                b.as_ptr(),
                rsb,
                csb,
                1.0,
                par,
            );
        }
    }

    fn matmul_bias(
        &self,
        c: &mut FastBuf,
        a: &FastBuf,
        b: &FastBuf,
        bias: (&FastBuf, usize),
        m: usize,
        n: usize,
        k: usize,
        ta: bool,
        tb: bool,
    ) {
        if !self.bf16_rows(m) {
            self.matmul(c, a, b, m, n, k, ta, tb, false);
            self.bias_add(c, bias.0, bias.1, m, n);
            return;
        }
        let bv = small(bias.0, bias.1, n);
        let epi = gemm16::Epilogue::new(Some(&bv), None);
        let a = view(a);
        self.bf16_product(c, ASrc::F32(&a, ta), b, (m, n, k), tb, false, epi);
    }

    fn linear_act(
        &self,
        pre: &mut FastBuf,
        out: &mut FastBuf,
        act: Act,
        a: &FastBuf,
        b: &FastBuf,
        bias: Option<(&FastBuf, usize)>,
        m: usize,
        n: usize,
        k: usize,
        tb: bool,
    ) {
        if !self.bf16_rows(m) {
            self.linear(pre, a, b, bias, m, n, k, tb);
            self.act_fwd(act, out, pre, m * n);
            return;
        }
        let bv = bias.map(|(b, off)| small(b, off, n));
        let epi = gemm16::Epilogue::new(bv.as_deref(), Some((act, &mut out.slice_mut()[..m * n])));
        // pre is kept for the backward pass; out is read next.
        let epi = epi.kept();
        let a = view(a);
        self.bf16_product(pre, ASrc::F32(&a, false), b, (m, n, k), tb, false, epi);
    }

    fn linears(
        &self,
        outs: &mut [&mut FastBuf],
        a: &FastBuf,
        layers: &[Proj<'_, FastBuf>],
        m: usize,
        k: usize,
    ) {
        if !self.bf16_rows(m) || layers.len() < 2 {
            return super::linears_in_turn(self, outs, a, layers, m, k);
        }
        assert_eq!(outs.len(), layers.len(), "linears: one output per layer");
        // A converted to bf16 once for all the products.
        let pa = gemm16::PackedA::new(Kernel::best(), m, k, &view(a), false);
        for (c, p) in outs.iter_mut().zip(layers) {
            self.bf16_linear(c, ASrc::Packed(&pa), p, m, k, None, false);
        }
    }

    fn mlp_fwd(
        &self,
        pre: &mut FastBuf,
        out: &mut FastBuf,
        act: Act,
        a: &FastBuf,
        (first, second): (Proj<'_, FastBuf>, Proj<'_, FastBuf>),
        m: usize,
        k: usize,
    ) {
        if !self.bf16_rows(m) {
            let layers = (first, second);
            return super::mlp_in_turn(self, pre, out, act, a, layers, m, k);
        }
        // act(pre) goes straight from the first product's epilogue into
        // the second's packed operand.
        let mut g = gemm16::PackedA::output(Kernel::best(), m, first.n);
        let av = view(a);
        self.bf16_linear(
            pre,
            ASrc::F32(&av, false),
            &first,
            m,
            k,
            Some((act, &mut g)),
            true,
        );
        self.bf16_linear(out, ASrc::Packed(&g), &second, m, first.n, None, false);
    }

    fn bias_add(&self, y: &mut FastBuf, bias: &FastBuf, bias_off: usize, rows: usize, cols: usize) {
        let b = small(bias, bias_off, cols);
        let y = &mut y.slice_mut()[..rows * cols];
        let per = (CHUNK / cols.max(1)).max(1) * cols;
        y.par_chunks_mut(per.max(1))
            .for_each(|c| kernels::add_row_vec(c, &b));
    }

    fn bias_grad(&self, db: &mut FastBuf, db_off: usize, dy: &FastBuf, rows: usize, cols: usize) {
        let dy = view(dy);
        let dy = &dy[..rows * cols];
        let per = 64 * cols.max(1);
        let acc = dy
            .par_chunks(per)
            .fold(
                || vec![0f64; cols],
                |mut a, c| {
                    kernels::col_sums_f64(&mut a, c, cols);
                    a
                },
            )
            .reduce(
                || vec![0f64; cols],
                |mut a, b| {
                    for (x, y) in a.iter_mut().zip(&b) {
                        *x += *y;
                    }
                    a
                },
            );
        let db = &mut db.slice_mut()[db_off..db_off + cols];
        for (d, a) in db.iter_mut().zip(acc) {
            *d += a as f32;
        }
    }

    fn add(&self, y: &mut FastBuf, x: &FastBuf, n: usize) {
        let x = view(x);
        y.slice_mut()[..n]
            .par_chunks_mut(CHUNK)
            .zip(x[..n].par_chunks(CHUNK))
            .for_each(|(a, b)| kernels::add(a, b));
    }

    fn scale(&self, y: &mut FastBuf, s: f64, n: usize) {
        y.slice_mut()[..n]
            .par_chunks_mut(CHUNK)
            .for_each(|a| kernels::scale(a, s as f32));
    }

    fn sum_sq(&self, y: &FastBuf, n: usize) -> f64 {
        let y = view(y);
        y[..n].chunks(CHUNK).map(kernels::sum_sq).sum()
    }

    fn act_fwd(&self, act: Act, y: &mut FastBuf, x: &FastBuf, n: usize) {
        let x = view(x);
        y.slice_mut()[..n]
            .par_chunks_mut(CHUNK)
            .zip(x[..n].par_chunks(CHUNK))
            .for_each(|(o, i)| kernels::act_fwd(act, o, i));
    }

    fn act_bwd(&self, act: Act, dx: &mut FastBuf, x: &FastBuf, dy: &FastBuf, n: usize) {
        let (x, dy) = (view(x), view(dy));
        dx.slice_mut()[..n]
            .par_chunks_mut(CHUNK)
            .zip(x[..n].par_chunks(CHUNK))
            .zip(dy[..n].par_chunks(CHUNK))
            .for_each(|((o, i), g)| kernels::act_bwd(act, o, i, g));
    }

    fn dropout(&self, y: &mut FastBuf, n: usize, p: f32, seed: u64) {
        if p <= 0.0 {
            return;
        }
        y.slice_mut()[..n]
            .par_chunks_mut(CHUNK)
            .enumerate()
            .for_each(|(i, c)| kernels::dropout(c, (i * CHUNK) as u32, p, seed));
    }

    fn layernorm_fwd(
        &self,
        y: &mut FastBuf,
        xhat: &mut FastBuf,
        rstd: &mut FastBuf,
        x: &FastBuf,
        gamma: &FastBuf,
        beta: &FastBuf,
        beta_off: usize,
        rows: usize,
        cols: usize,
        eps: f64,
    ) {
        let x = view(x);
        let src = kernels::RowSrc::Plain(&x[..rows * cols]);
        self.layernorm_par(y, xhat, rstd, src, gamma, beta, beta_off, rows, cols, eps);
    }

    // One pass: each row's residual sum is formed in xhat, normalised there.
    fn residual_layernorm_fwd(
        &self,
        y: &mut FastBuf,
        xhat: &mut FastBuf,
        rstd: &mut FastBuf,
        s: &mut FastBuf,
        res: &FastBuf,
        drop: Option<Dropout>,
        gamma: &FastBuf,
        beta: &FastBuf,
        beta_off: usize,
        rows: usize,
        cols: usize,
        eps: f64,
    ) {
        let (s, res) = (view(s), view(res));
        let drop = drop
            .filter(|d| d.p > 0.0)
            .map(|d| (d.p, (1.0 / (1.0 - d.p as f64)) as f32, d.seed));
        let src = kernels::RowSrc::Residual {
            s: &s[..rows * cols],
            res: &res[..rows * cols],
            drop,
            first: 0,
        };
        self.layernorm_par(y, xhat, rstd, src, gamma, beta, beta_off, rows, cols, eps);
    }

    fn layernorm_bwd(
        &self,
        dx: &mut FastBuf,
        dy: &FastBuf,
        xhat: &FastBuf,
        rstd: &FastBuf,
        gamma: &FastBuf,
        rows: usize,
        cols: usize,
    ) {
        let (dy, xh, rs, g) = (view(dy), view(xhat), view(rstd), view(gamma));
        let g = &g[..cols];
        let rb = (CHUNK / cols.max(1)).max(1);
        dx.slice_mut()[..rows * cols]
            .par_chunks_mut(rb * cols)
            .zip(dy[..rows * cols].par_chunks(rb * cols))
            .zip(xh[..rows * cols].par_chunks(rb * cols))
            .zip(rs[..rows].par_chunks(rb))
            .for_each(|(((dx, dy), xh), rs)| kernels::layernorm_bwd_rows(dx, dy, xh, rs, g, cols));
    }

    fn attention_fwd(
        &self,
        out: &mut FastBuf,
        lse: &mut FastBuf,
        q: &FastBuf,
        k: &FastBuf,
        v: &FastBuf,
        mask: &FastBuf,
        dims: AttnDims,
        dropout: Option<Dropout>,
    ) {
        let (q, k, v, mask) = (view(q), view(k), view(v), view(mask));
        attn::forward(
            out.slice_mut(),
            lse.slice_mut(),
            &q,
            &k,
            &v,
            &mask,
            dims,
            dropout,
        );
    }

    fn attention_bwd(
        &self,
        dq: &mut FastBuf,
        dk: &mut FastBuf,
        dv: &mut FastBuf,
        dout: &FastBuf,
        q: &FastBuf,
        k: &FastBuf,
        v: &FastBuf,
        out: &FastBuf,
        lse: &FastBuf,
        mask: &FastBuf,
        dims: AttnDims,
        dropout: Option<Dropout>,
    ) {
        let (dout, q, k, v, out, lse, mask) = (
            view(dout),
            view(q),
            view(k),
            view(v),
            view(out),
            view(lse),
            view(mask),
        );
        attn::backward(
            dq.slice_mut(),
            dk.slice_mut(),
            dv.slice_mut(),
            &dout,
            &q,
            &k,
            &v,
            &out,
            &lse,
            &mask,
            dims,
            dropout,
        );
    }

    fn rmsnorm_fwd(
        &self,
        y: &mut FastBuf,
        xhat: &mut FastBuf,
        rstd: &mut FastBuf,
        x: &FastBuf,
        gamma: &FastBuf,
        rows: usize,
        cols: usize,
        eps: f64,
    ) {
        let x = view(x);
        let g = view(gamma);
        let g = &g[..cols];
        let rb = (CHUNK / cols.max(1)).max(1);
        y.slice_mut()[..rows * cols]
            .par_chunks_mut(rb * cols)
            .zip(xhat.slice_mut()[..rows * cols].par_chunks_mut(rb * cols))
            .zip(rstd.slice_mut()[..rows].par_chunks_mut(rb))
            .zip(x[..rows * cols].par_chunks(rb * cols))
            .for_each(|(((y, xh), rs), x)| {
                kernels::rmsnorm_rows(y, xh, rs, x, g, cols, eps as f32)
            });
    }

    fn rmsnorm_bwd(
        &self,
        dx: &mut FastBuf,
        dy: &FastBuf,
        xhat: &FastBuf,
        rstd: &FastBuf,
        gamma: &FastBuf,
        rows: usize,
        cols: usize,
    ) {
        let (dy, xh, rs, g) = (view(dy), view(xhat), view(rstd), view(gamma));
        let g = &g[..cols];
        let rb = (CHUNK / cols.max(1)).max(1);
        dx.slice_mut()[..rows * cols]
            .par_chunks_mut(rb * cols)
            .zip(dy[..rows * cols].par_chunks(rb * cols))
            .zip(xh[..rows * cols].par_chunks(rb * cols))
            .zip(rs[..rows].par_chunks(rb))
            .for_each(|(((dx, dy), xh), rs)| kernels::rmsnorm_bwd_rows(dx, dy, xh, rs, g, cols));
    }

    fn rope(
        &self,
        x: &mut FastBuf,
        positions: &Vec<u32>,
        rows: usize,
        heads: usize,
        head_dim: usize,
        theta: f64,
        inverse: bool,
    ) {
        self.r
            .rope(&mut x.0, positions, rows, heads, head_dim, theta, inverse)
    }

    fn swiglu_fwd(&self, h: &mut FastBuf, gate: &FastBuf, up: &FastBuf, n: usize) {
        let (g, u) = (view(gate), view(up));
        h.slice_mut()[..n]
            .par_chunks_mut(CHUNK)
            .zip(g[..n].par_chunks(CHUNK))
            .zip(u[..n].par_chunks(CHUNK))
            .for_each(|((h, g), u)| kernels::swiglu_fwd(h, g, u));
    }

    fn swiglu_bwd(
        &self,
        dgate: &mut FastBuf,
        dup: &mut FastBuf,
        dh: &FastBuf,
        gate: &FastBuf,
        up: &FastBuf,
        n: usize,
    ) {
        let (dh, g, u) = (view(dh), view(gate), view(up));
        dgate.slice_mut()[..n]
            .par_chunks_mut(CHUNK)
            .zip(dup.slice_mut()[..n].par_chunks_mut(CHUNK))
            .zip(dh[..n].par_chunks(CHUNK))
            .zip(g[..n].par_chunks(CHUNK).zip(u[..n].par_chunks(CHUNK)))
            .for_each(|(((dg, du), dh), (g, u))| kernels::swiglu_bwd(dg, du, dh, g, u));
    }

    fn embedding_fwd(
        &self,
        out: &mut FastBuf,
        table: &FastBuf,
        ids: &Vec<u32>,
        rows: usize,
        dim: usize,
        accumulate: bool,
    ) {
        let table = &table.0;
        out.slice_mut()[..rows * dim]
            .par_chunks_mut(dim.max(1) * 64)
            .enumerate()
            .for_each(|(blk, o)| {
                let mut row = vec![0f32; dim];
                for (r, dst) in o.chunks_exact_mut(dim).enumerate() {
                    let id = ids[blk * 64 + r] as usize;
                    if accumulate {
                        table.read_into(id * dim, &mut row);
                        kernels::add(dst, &row);
                    } else {
                        table.read_into(id * dim, dst);
                    }
                }
            });
    }

    fn scatter_add_rows(
        &self,
        dx: &mut FastBuf,
        dy: &FastBuf,
        idx: &Vec<u32>,
        rows: usize,
        cols: usize,
    ) {
        self.r.scatter_add_rows(&mut dx.0, &dy.0, idx, rows, cols)
    }

    fn scale_rows(&self, y: &mut FastBuf, w: &FastBuf, rows: usize, cols: usize) {
        self.r.scale_rows(&mut y.0, &w.0, rows, cols)
    }

    fn pool_fwd(
        &self,
        kind: PoolKind,
        out: &mut FastBuf,
        h: &FastBuf,
        mask: &FastBuf,
        b: usize,
        t: usize,
        d: usize,
    ) {
        self.r.pool_fwd(kind, &mut out.0, &h.0, &mask.0, b, t, d)
    }

    fn pool_bwd(
        &self,
        kind: PoolKind,
        dh: &mut FastBuf,
        dout: &FastBuf,
        mask: &FastBuf,
        b: usize,
        t: usize,
        d: usize,
    ) {
        self.r.pool_bwd(kind, &mut dh.0, &dout.0, &mask.0, b, t, d)
    }

    fn cross_entropy(
        &self,
        losses: &mut FastBuf,
        dlogits: &mut FastBuf,
        logits: &FastBuf,
        labels: &Vec<u32>,
        rows: usize,
        classes: usize,
        grad_scale: f64,
    ) {
        if rows == 0 || classes == 0 {
            return;
        }
        let x = view(logits);
        let n = rows * classes;
        assert!(
            x.len() >= n && dlogits.len() >= n && losses.len() >= rows && labels.len() >= rows,
            "cross_entropy shapes"
        );
        let mut l = vec![0f32; rows];
        dlogits.slice_mut()[..n]
            .par_chunks_mut(classes)
            .zip(x[..n].par_chunks(classes))
            .zip(l.par_iter_mut())
            .enumerate()
            .for_each(|(r, ((d, xr), lr))| {
                *lr = kernels::xent_row(xr, d, labels[r] as usize, grad_scale as f32);
            });
        losses.slice_mut()[..rows].copy_from_slice(&l);
    }

    fn candidate_loss(
        &self,
        ex_loss: &mut FastBuf,
        scores: &mut FastBuf,
        row_w: &mut FastBuf,
        tok_loss: &FastBuf,
        idx: &CandidateIndex<'_, Vec<u32>>,
        grad_scale: f64,
    ) {
        self.r.candidate_loss(
            &mut ex_loss.0,
            &mut scores.0,
            &mut row_w.0,
            &tok_loss.0,
            idx,
            grad_scale,
        )
    }

    fn mse(
        &self,
        losses: &mut FastBuf,
        dx: &mut FastBuf,
        x: &FastBuf,
        target: &FastBuf,
        rows: usize,
        grad_scale: f64,
    ) {
        self.r
            .mse(&mut losses.0, &mut dx.0, &x.0, &target.0, rows, grad_scale)
    }

    fn adamw(
        &self,
        params: &mut FastBuf,
        grads: &FastBuf,
        m: &mut FastBuf,
        v: &mut FastBuf,
        n: usize,
        h: AdamW,
    ) {
        self.r
            .adamw(&mut params.0, &grads.0, &mut m.0, &mut v.0, n, h)
    }
}
