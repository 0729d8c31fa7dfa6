//! A bf16 matrix product for the fast CPU backend (`BEFT_CPU_GEMM=bf16`):
//! `C = (accumulate ? C : 0) + A·B` with A (f32 activations) and B (f32 or
//! bf16 weights) rounded to bf16 while they are packed, products summed in
//! f32 by AVX-512 BF16's `vdpbf16ps` — two multiply-adds per lane and
//! instruction, twice the f32 FMA rate on AMD Zen 4 (half of it on the
//! Intel Xeons measured, which have AMX instead: [`super::amx`] then does
//! the multiplying, on the same packed operands). The numerics
//! are those of PyTorch's bf16 autocast on a CPU: inputs to about 3
//! significant digits, sums in f32.
//!
//! Layout: A is converted to bf16 row by row (rows padded to a multiple of
//! [`MR`]) and B is packed into panels of [`NR`] columns (`[pair][NR]`),
//! both as pairs of consecutive `k` (one `u32` holds two bf16: the even `k`
//! in the low half), so that one `vdpbf16ps` multiplies a broadcast pair of
//! A by the pairs of 16 columns of B. Packing is vectorised: A's rows and
//! the rows of a `[k, n]` B convert in place order; a `[n, k]` B (the
//! forward `x·Wᵀ`) goes through 16×16 transposes. Work is split into
//! blocks of up to [`MC`] rows × [`NC`] columns (smaller when that leaves
//! too few blocks for the threads) over the rayon pool; within a block, `k` is walked in chunks of [`KCP`] pairs so
//! that a B micro-panel stays in L1 while the block's A strips (in L2) pass
//! over it.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use std::sync::OnceLock;

use rayon::prelude::*;

use super::amx;
use super::kernels;
use crate::backend::Act;

/// Rows per micro-tile (24 accumulators of 16 lanes + 2 B vectors + 1 broadcast).
pub const MR: usize = 12;
/// Columns per micro-tile (two 16-lane vectors).
pub const NR: usize = 32;
/// k pairs per cache block (B micro-panel 16 KiB, A micro-strip 6 KiB: L1).
pub const KCP: usize = 128;
/// Most rows per parallel block (16 strips; 96 KiB of A per k block: L2).
pub const MC: usize = 16 * MR;
/// Most columns per parallel block (16 panels).
pub const NC: usize = 16 * NR;

/// Whether this CPU has AVX-512 BF16 (checked once).
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static HAS: OnceLock<bool> = OnceLock::new();
        *HAS.get_or_init(|| {
            is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512bf16")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// f32 → bf16 bits, rounded to nearest even (NaN stays NaN), as the
/// project rounds everywhere (`half`).
#[inline]
fn bf16_bits(x: f32) -> u16 {
    half::bf16::from_f32(x).to_bits()
}

/// Pair `q` of a length-`k` sequence given by `bits` (bf16 of element
/// `p`): elements 2q (low half) and 2q+1 (high half, zero past the end).
#[inline]
fn pair(k: usize, q: usize, bits: impl Fn(usize) -> u16) -> u32 {
    let hi = if 2 * q + 1 < k {
        bits(2 * q + 1) as u32
    } else {
        0
    };
    bits(2 * q) as u32 | hi << 16
}

/// The right-hand operand: f32 values, or bf16 bits read in place (a
/// frozen bf16 weight in the memory map; any alignment).
#[derive(Clone, Copy)]
pub enum BSrc<'a> {
    /// f32 values.
    F32(&'a [f32]),
    /// Raw little-endian bf16 bytes.
    Bf16(&'a [u8]),
}

impl BSrc<'_> {
    fn len(&self) -> usize {
        match self {
            BSrc::F32(s) => s.len(),
            BSrc::Bf16(s) => s.len() / 2,
        }
    }

    /// bf16 bits of element `i`.
    #[inline]
    fn bits(&self, i: usize) -> u16 {
        match self {
            BSrc::F32(s) => bf16_bits(s[i]),
            BSrc::Bf16(s) => u16::from_le_bytes([s[2 * i], s[2 * i + 1]]),
        }
    }
}

/// The left-hand operand: f32 values rounded to bf16 as they are packed,
/// or packed beforehand.
#[derive(Clone, Copy)]
pub enum ASrc<'a> {
    /// `m × k` f32 values; with `true` stored `[k, m]` (transposed), else
    /// `[m, k]`.
    F32(&'a [f32], bool),
    /// Packed beforehand for the product's kernel, `m` and `k`.
    Packed(&'a PackedA),
}

/// Rows of A per packed strip on `kernel`.
fn strip_rows(kernel: Kernel) -> usize {
    match kernel {
        Kernel::Amx => amx::MR,
        Kernel::Dot => MR,
    }
}

/// A (`m × k`) as the products' packed bf16 operand, held for more than one
/// product: packed once ([`PackedA::new`]) for several products by the same
/// A (a layer's q, k and v projections), or written by the epilogue of the
/// product that computes A ([`Epilogue::packed`]), so that A is never
/// stored in f32 nor converted. Its storage comes from the fast backend's
/// buffer pool and goes back there.
pub struct PackedA {
    data: Vec<f32>,
    off: usize,
    len: usize,
    /// The kernel, `m` and `k` it is packed for.
    pub key: (Kernel, usize, usize),
}

impl PackedA {
    /// Storage for A (`m × k`) on `kernel`, to be written whole by the
    /// epilogue of the product that computes A ([`Epilogue::packed`]);
    /// until then its contents are unspecified.
    pub fn output(kernel: Kernel, m: usize, k: usize) -> PackedA {
        let mr = strip_rows(kernel);
        let len = m.div_ceil(mr) * mr * pairs_per_row(kernel, k);
        // Vectors this large come from the pool, with a line to spare for
        // starting on a 64-byte boundary.
        let mut data = super::pool::take_any(len + 16);
        let off = align_off(&mut data, len);
        PackedA {
            data,
            off,
            len,
            key: (kernel, m, k),
        }
    }

    /// Pack `a` (`m × k` f32; `ta`: stored `[k, m]`) for `kernel`.
    ///
    /// # Panics
    /// When `a` is shorter than `m·k` or the CPU lacks AVX-512 BF16.
    pub fn new(kernel: Kernel, m: usize, k: usize, a: &[f32], ta: bool) -> PackedA {
        assert!(available(), "bf16 GEMM needs AVX-512 BF16");
        assert!(a.len() >= m * k, "bf16 gemm A shape");
        let mut p = PackedA::output(kernel, m, k);
        let (mr, ld) = (strip_rows(kernel), pairs_per_row(kernel, k));
        if p.len > 0 {
            pack_strips(
                kernel,
                p.strips_mut(),
                mr * ld,
                a,
                m,
                k,
                ta,
                m * k >= 1 << 16,
            );
        }
        p
    }

    /// The packed strips.
    pub fn strips(&self) -> &[u32] {
        bytemuck::cast_slice(&self.data[self.off..self.off + self.len])
    }

    fn strips_mut(&mut self) -> &mut [u32] {
        bytemuck::cast_slice_mut(&mut self.data[self.off..self.off + self.len])
    }
}

impl Drop for PackedA {
    fn drop(&mut self) {
        super::pool::give(std::mem::take(&mut self.data));
    }
}

/// Pack all strips of A (`dst`: `strip` u32 each) for `kernel`, over the
/// pool when `par`.
#[allow(clippy::too_many_arguments)]
fn pack_strips(
    kernel: Kernel,
    dst: &mut [u32],
    strip: usize,
    a: &[f32],
    m: usize,
    k: usize,
    ta: bool,
    par: bool,
) {
    let mr = strip_rows(kernel);
    each_chunk(par, dst, strip, |s, d| match kernel {
        Kernel::Amx => pack_a_tiles(d, a, m, k, ta, s * mr),
        Kernel::Dot => pack_a(d, a, m, k, ta, s * mr),
    });
}

/// A raw pointer that may cross threads (each task writes its own block of C).
#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: tasks write disjoint blocks of C; the pointer outlives the scope.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

impl SendPtr {
    /// The pointer `i` elements on (a method, so that closures capture the
    /// whole `SendPtr`, not its raw field).
    ///
    /// # Safety
    /// `i` within the allocation.
    unsafe fn at(self, i: usize) -> *mut f32 {
        self.0.add(i)
    }
}

thread_local! {
    /// Packed A and B, kept between calls on the calling thread.
    static SCRATCH: std::cell::Cell<(Vec<u32>, Vec<u32>)> = const { std::cell::Cell::new((Vec::new(), Vec::new())) };
}

/// `c[m×n] (row stride n) = (accumulate ? c : 0) + A·B`, where A is `m×k`
/// f32 (`ta`: stored `[k, m]`, else `[m, k]`) and B is `k×n` (`tb`: stored
/// `[n, k]`, else `[k, n]`), both rounded to bf16.
///
/// Runs on AMX tiles where the CPU and OS allow ([`super::amx`]), else on
/// AVX-512 BF16 dot products.
///
/// # Panics
/// When the CPU lacks AVX-512 BF16 ([`available`]) or a slice is too short.
#[allow(clippy::too_many_arguments)]
pub fn gemm(
    m: usize,
    n: usize,
    k: usize,
    c: &mut [f32],
    accumulate: bool,
    a: &[f32],
    ta: bool,
    b: BSrc<'_>,
    tb: bool,
) {
    let epi = Epilogue::default();
    gemm_on(
        Kernel::best(),
        m,
        n,
        k,
        c,
        accumulate,
        ASrc::F32(a, ta),
        b,
        tb,
        epi,
    )
}

/// What the product does to each block of C once its sums are complete,
/// while the block is still in cache: add a bias to every row, then write
/// `act(C)` beside it (a linear layer and its activation without passes of
/// their own over C).
#[derive(Clone, Copy, Default)]
pub struct Epilogue<'a> {
    /// `n` values added to every row of C.
    bias: Option<&'a [f32]>,
    /// `out = act(C)`: the activation and where `out` goes.
    act: Option<(Act, Dst)>,
    /// C is kept for later, not read soon ([`Epilogue::kept`]).
    kept: bool,
    _out: std::marker::PhantomData<&'a mut [f32]>,
}

/// Where an epilogue writes `act(C)`.
#[derive(Clone, Copy)]
enum Dst {
    /// f32, `m × n` like C: the start and length.
    F32(SendPtr, usize),
    /// Packed as the left-hand operand of a product by `act(C)`
    /// ([`PackedA`]): the start of its strips (u32s, through an f32
    /// pointer) and its key.
    Packed(SendPtr, (Kernel, usize, usize)),
}

impl<'a> Epilogue<'a> {
    /// Add `bias` (`n` values) to every row; then, with `act = Some((f,
    /// out))`, write `out = f(C)` (`out` `m × n` like C).
    pub fn new(bias: Option<&'a [f32]>, act: Option<(Act, &'a mut [f32])>) -> Self {
        Epilogue {
            bias,
            act: act.map(|(f, out)| (f, Dst::F32(SendPtr(out.as_mut_ptr()), out.len()))),
            kept: false,
            _out: std::marker::PhantomData,
        }
    }

    /// C is kept for later rather than read by the next op (a linear
    /// layer's pre-activation, read only by the backward pass): write it
    /// with streaming stores from 1 MiB ([`streams`]). Other products
    /// leave a C that the caches can hold there, for the next op.
    pub fn kept(self) -> Self {
        Epilogue { kept: true, ..self }
    }

    /// Add `bias` (`n` values) to every row, then write `f(C)` to `out` as
    /// the packed left-hand operand of the next product (`out`: `m × n` on
    /// the product's kernel, from [`PackedA::output`]): that product then
    /// neither reads f32 values nor converts them, and `f(C)` is never
    /// stored in f32.
    pub fn packed(bias: Option<&'a [f32]>, f: Act, out: &'a mut PackedA) -> Self {
        let key = out.key;
        let p = SendPtr(out.strips_mut().as_mut_ptr() as *mut f32);
        Epilogue {
            bias,
            act: Some((f, Dst::Packed(p, key))),
            kept: false,
            _out: std::marker::PhantomData,
        }
    }
}

impl Epilogue<'_> {
    fn none(&self) -> bool {
        self.bias.is_none() && self.act.is_none()
    }

    /// Apply to rows `r0..r1`, columns `c0..c1` of C (row stride `n`).
    ///
    /// # Safety
    /// The block lies inside C and `out` (both `m × n`) and belongs to the
    /// calling task alone.
    unsafe fn apply(
        &self,
        c: SendPtr,
        n: usize,
        (r0, r1): (usize, usize),
        (c0, c1): (usize, usize),
    ) {
        if self.none() {
            return;
        }
        let w = c1 - c0;
        // A row of act(C) on its way to packed pairs.
        let mut tmp = Vec::new();
        for i in r0..r1 {
            let row = std::slice::from_raw_parts_mut(c.at(i * n + c0), w);
            if let Some(b) = self.bias {
                kernels::add_row_vec(row, &b[c0..c1]);
            }
            match self.act {
                Some((act, Dst::F32(out, _))) => {
                    let o = std::slice::from_raw_parts_mut(out.at(i * n + c0), w);
                    kernels::act_fwd(act, o, row);
                }
                Some((act, Dst::Packed(out, key))) => {
                    tmp.resize(w, 0.0);
                    kernels::act_fwd(act, &mut tmp, row);
                    put_pairs(out, key, i, c0 / 2, &tmp);
                }
                None => {}
            }
        }
        // The last strip's rows past m are zeros in a packed A.
        if let Some((_, Dst::Packed(out, key))) = self.act {
            let (kernel, m, _) = key;
            if r1 == m {
                tmp.clear();
                tmp.resize(w, 0.0);
                for i in m..m.next_multiple_of(strip_rows(kernel)) {
                    put_pairs(out, key, i, c0 / 2, &tmp);
                }
            }
        }
    }
}

/// Write `vals` (an even number of them, or the row's last) as the bf16
/// pairs `q0..` of row `i` of the packed A at `out` (key `(kernel, m, k)`).
///
/// # Safety
/// `out` holds that packed A; the pairs belong to the caller alone;
/// AVX-512 BF16 present.
unsafe fn put_pairs(
    out: SendPtr,
    (kernel, _, k): (Kernel, usize, usize),
    i: usize,
    q0: usize,
    vals: &[f32],
) {
    let ld = pairs_per_row(kernel, k);
    let np = vals.len().div_ceil(2);
    let bits = |q: usize| pair(vals.len(), q, |p| bf16_bits(vals[p]));
    let base = out.0 as *mut u32;
    match kernel {
        Kernel::Dot => {
            // A row's pairs are contiguous.
            let o = std::slice::from_raw_parts_mut(base.add(i * ld + q0), np);
            for q in convert_row(o, vals)..np {
                o[q] = bits(q);
            }
        }
        Kernel::Amx => {
            // The row's last pairs pad it to whole tiles with zeros.
            let end = if q0 + np == k.div_ceil(2) {
                ld - q0
            } else {
                np
            };
            let strip = (i / amx::MR) * amx::MR * ld;
            for q in 0..end {
                let v = if q < np { bits(q) } else { 0 };
                *base.add(strip + amx::tile_index(i % amx::MR, q0 + q)) = v;
            }
        }
    }
}

/// Which instructions multiply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel {
    /// AVX-512 BF16 `vdpbf16ps` (MR × NR register tiles).
    Dot,
    /// AMX `tdpbf16ps` (32 × 32 blocks of four tiles).
    Amx,
}

impl Kernel {
    /// AMX where the CPU and OS allow, else the dot kernel.
    pub fn best() -> Kernel {
        if amx::available() {
            Kernel::Amx
        } else {
            Kernel::Dot
        }
    }
}

/// [`gemm()`] on the given kernel, then `epi` on each block of C as its
/// sums complete.
///
/// # Panics
/// When the CPU lacks the kernel's instructions or a slice is too short.
#[allow(clippy::too_many_arguments)]
pub fn gemm_on(
    kernel: Kernel,
    m: usize,
    n: usize,
    k: usize,
    c: &mut [f32],
    accumulate: bool,
    a: ASrc<'_>,
    b: BSrc<'_>,
    tb: bool,
    epi: Epilogue<'_>,
) {
    assert!(b.len() >= k * n, "bf16 gemm B shape");
    if !check(kernel, m, n, k, c, accumulate, a, &epi) {
        return;
    }
    let (mut ap, mut bp) = SCRATCH.with(|s| s.take());
    let ld = pairs_per_row(kernel, k);
    let bp16 = aligned(&mut bp, packed_len(kernel, n, k));
    // Products under ~4M multiply-adds (tens of microseconds on one core,
    // about what waking the pool costs) stay on the calling thread.
    let par = m * n * k >= 1 << 22;
    each_chunk(par, bp16, ld * NR, |t, dst| {
        pack_b(dst, b, n, k, tb, t * NR, ld)
    });
    multiply(kernel, (m, n, k), c, accumulate, a, bp16, &mut ap, epi);
    SCRATCH.with(|s| s.set((ap, bp)));
}

/// Pairs per packed row of `k` values: AMX pads to whole tiles of `k`.
fn pairs_per_row(kernel: Kernel, k: usize) -> usize {
    match kernel {
        Kernel::Amx => k.div_ceil(2).next_multiple_of(amx::KT),
        Kernel::Dot => k.div_ceil(2),
    }
}

/// `u32`s of B (`k × n`) packed for `kernel`: whole panels of [`NR`]
/// columns, rows padded as the kernel needs.
pub fn packed_len(kernel: Kernel, n: usize, k: usize) -> usize {
    n.div_ceil(NR) * pairs_per_row(kernel, k) * NR
}

/// B (`k × n`, stored as for [`gemm_on`]) packed once for one kernel, to be
/// used by any number of [`gemm_packed`] calls: a frozen weight's panels
/// need not be rebuilt on every product.
pub struct PackedB {
    data: Vec<u32>,
    off: usize,
    len: usize,
    /// The kernel, `n`, `k` and `tb` it was packed for.
    pub key: (Kernel, usize, usize, bool),
}

impl PackedB {
    /// Pack `b` (`k × n`; `tb`: stored `[n, k]`) for `kernel`.
    ///
    /// # Panics
    /// When `b` is shorter than `k·n`.
    pub fn new(kernel: Kernel, n: usize, k: usize, b: BSrc<'_>, tb: bool) -> PackedB {
        assert!(b.len() >= k * n, "bf16 gemm B shape");
        let (ld, len) = (pairs_per_row(kernel, k), packed_len(kernel, n, k));
        let mut data = Vec::new();
        let off = align_off(&mut data, len);
        // (Nothing to pack for an empty B: k or n is 0.)
        if len > 0 {
            each_chunk(
                n * k >= 1 << 16,
                &mut data[off..off + len],
                ld * NR,
                |t, d| pack_b(d, b, n, k, tb, t * NR, ld),
            );
        }
        PackedB {
            data,
            off,
            len,
            key: (kernel, n, k, tb),
        }
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.data.capacity() * std::mem::size_of::<u32>()
    }

    fn panels(&self) -> &[u32] {
        &self.data[self.off..self.off + self.len]
    }
}

/// [`gemm_on`] with B packed beforehand ([`PackedB`], for its kernel, `n`,
/// `k` and `tb`).
///
/// # Panics
/// As [`gemm_on`].
#[allow(clippy::too_many_arguments)]
pub fn gemm_packed(
    m: usize,
    c: &mut [f32],
    accumulate: bool,
    a: ASrc<'_>,
    b: &PackedB,
    epi: Epilogue<'_>,
) {
    let (kernel, n, k, _) = b.key;
    if !check(kernel, m, n, k, c, accumulate, a, &epi) {
        return;
    }
    let (mut ap, bp) = SCRATCH.with(|s| s.take());
    multiply(
        kernel,
        (m, n, k),
        c,
        accumulate,
        a,
        b.panels(),
        &mut ap,
        epi,
    );
    SCRATCH.with(|s| s.set((ap, bp)));
}

/// The checks and the empty cases of a product: false when nothing is left
/// to multiply (`m`, `n` or `k` zero; C and the epilogue are then done).
#[allow(clippy::too_many_arguments)]
fn check(
    kernel: Kernel,
    m: usize,
    n: usize,
    k: usize,
    c: &mut [f32],
    accumulate: bool,
    a: ASrc<'_>,
    epi: &Epilogue<'_>,
) -> bool {
    assert!(available(), "bf16 GEMM needs AVX-512 BF16");
    if let Some(bias) = epi.bias {
        assert!(bias.len() >= n, "bf16 gemm bias");
    }
    match epi.act {
        Some((_, Dst::F32(_, len))) => assert!(len >= m * n, "bf16 gemm activation output"),
        Some((_, Dst::Packed(_, key))) => {
            assert!(key == (kernel, m, n), "bf16 gemm packed activation output")
        }
        None => {}
    }
    assert!(
        kernel != Kernel::Amx || amx::available(),
        "this CPU or OS offers no AMX-BF16"
    );
    match a {
        ASrc::F32(a, _) => assert!(a.len() >= m * k, "bf16 gemm A shape"),
        ASrc::Packed(p) => assert!(p.key == (kernel, m, k), "bf16 gemm packed A shape"),
    }
    assert!(c.len() >= m * n, "bf16 gemm shapes");
    if m == 0 || n == 0 {
        return false;
    }
    if k == 0 {
        if !accumulate {
            c[..m * n].fill(0.0);
        }
        // SAFETY: C is m × n and exclusively borrowed; `out` checked above.
        unsafe { epi.apply(SendPtr(c.as_mut_ptr()), n, (0, m), (0, n)) };
        return false;
    }
    true
}

/// Pack A and multiply by the packed panels `bp16` of B (`ap`: scratch for
/// packed A).
#[allow(clippy::too_many_arguments)]
fn multiply(
    kernel: Kernel,
    (m, n, k): (usize, usize, usize),
    c: &mut [f32],
    accumulate: bool,
    a: ASrc<'_>,
    bp16: &[u32],
    ap: &mut Vec<u32>,
    epi: Epilogue<'_>,
) {
    let amx = kernel == Kernel::Amx;
    // Rows per strip and pairs per packed row (AMX: whole tiles of k).
    let (mr, ld) = (strip_rows(kernel), pairs_per_row(kernel, k));
    let strips = m.div_ceil(mr);
    let panels = n.div_ceil(NR);
    let par = m * n * k >= 1 << 22;
    let ap16: &[u32] = match a {
        ASrc::F32(a, ta) => {
            let ap16 = aligned(ap, strips * mr * ld);
            pack_strips(kernel, ap16, mr * ld, a, m, k, ta, par);
            ap16
        }
        ASrc::Packed(p) => p.strips(),
    };
    // Blocks of up to MC rows × NC columns, halved until every thread has
    // about four to take (work stealing evens out the rest).
    let (mut ms, mut ns) = (MC / mr, NC / NR);
    let want = if par {
        4 * rayon::current_num_threads()
    } else {
        1
    };
    while strips.div_ceil(ms) * panels.div_ceil(ns) < want && (ms > 1 || ns > 1) {
        if ms >= ns {
            ms /= 2;
        } else {
            ns /= 2;
        }
    }
    let (mb, nb) = (strips.div_ceil(ms), panels.div_ceil(ns));
    let stream = amx && streams(m, n, epi.kept);
    let cp = SendPtr(c.as_mut_ptr());
    let (ap_ref, bp_ref) = (ap16, bp16);
    // A packed act(C): pairs per row there, and the u32 start.
    let ld_out = pairs_per_row(kernel, n);
    let block = |task: usize| {
        let (ib, jb) = (task / nb, task % nb);
        let (s0, s1) = (ib * ms, ((ib + 1) * ms).min(strips));
        let (t0, t1) = (jb * ns, ((jb + 1) * ns).min(panels));
        if amx {
            // SAFETY: AMX checked above and configured on this thread
            // before the tiles run; each strip holds mr·ld pairs, each
            // panel ld·NR; the block [s·mr.., t·NR..] (rows × cols) lies
            // inside c (m × n) and belongs to this task alone.
            #[cfg(target_arch = "x86_64")]
            unsafe {
                // All of k per block of C: blocking k (to keep the panels
                // in L1) made it slower, as C then goes to memory and back
                // once per k block.
                amx::configure();
                for t in t0..t1 {
                    let cols = NR.min(n - t * NR);
                    let bpan = bp_ref[t * ld * NR..].as_ptr();
                    for s in s0..s1 {
                        let rows = mr.min(m - s * mr);
                        let astr = ap_ref[s * mr * ld..].as_ptr();
                        let at = s * mr * n + t * NR;
                        let act = epi.act.map(|(f, dst)| match dst {
                            Dst::F32(out, _) => (f, amx::ActDst::F32(out.at(at))),
                            // This block is tile group t of strip s there.
                            Dst::Packed(out, _) => {
                                let o = (out.0 as *mut u32).add(s * mr * ld_out + t * mr * amx::KT);
                                (f, amx::ActDst::Packed(o))
                            }
                        });
                        let te = amx::TileEpilogue {
                            bias: epi.bias.map_or(std::ptr::null(), |b| b[t * NR..].as_ptr()),
                            act,
                            stream,
                        };
                        amx::tile(ld, astr, bpan, cp.at(at), n, rows, cols, accumulate, te);
                    }
                }
                amx::release();
                // Streaming stores are weakly ordered: drain them before
                // the task ends and another thread may read C.
                if stream {
                    _mm_sfence();
                }
            }
            return;
        }
        let kp = ld;
        for pc in (0..kp).step_by(KCP) {
            let kc = KCP.min(kp - pc);
            let load = accumulate || pc > 0;
            for t in t0..t1 {
                let cols = NR.min(n - t * NR);
                let bpan = &bp_ref[t * kp * NR + pc * NR..][..kc * NR];
                for s in s0..s1 {
                    let rows = MR.min(m - s * MR);
                    let astr = &ap_ref[s * MR * kp + pc..][..(MR - 1) * kp + kc];
                    // SAFETY: AVX-512 BF16 checked above; `astr` holds MR
                    // rows of kc pairs at stride kp; the tile [s·MR..,
                    // t·NR..] (rows × cols) lies inside c (m × n) and
                    // belongs to this task alone.
                    unsafe {
                        micro(
                            kc,
                            astr.as_ptr(),
                            kp,
                            bpan.as_ptr(),
                            cp.at(s * MR * n + t * NR),
                            n,
                            rows,
                            cols,
                            load,
                        );
                    }
                }
            }
        }
        // SAFETY: the block [s0·MR.., t0·NR..] lies inside c and belongs to
        // this task alone.
        unsafe {
            epi.apply(
                cp,
                n,
                (s0 * MR, (s1 * MR).min(m)),
                (t0 * NR, (t1 * NR).min(n)),
            )
        };
    };
    if par {
        (0..mb * nb).into_par_iter().for_each(block);
    } else {
        (0..mb * nb).for_each(block);
    }
}

/// Whether a product writes its `m × n` C (and the activation beside it)
/// with non-temporal (streaming) stores: on the AMX kernel, when
/// `BEFT_CPU_STREAM` is not `0` and C is at least [`STREAM_MIN_BYTES`]
/// where it is `kept` for later ([`Epilogue::kept`]), else at least
/// [`STREAM_MIN_BYTES_READ_NEXT`].
///
/// Why: with f32 results, writing C is what holds the tiles back (a
/// cache-missing store first reads its line). Streaming stores skip that
/// read, at the price of C's next reader fetching it from memory rather
/// than from the caches: a win for a large C that is not read soon (a
/// pre-activation kept for the backward pass), a loss for one the next op
/// reads, such as attention's q, k and v (`docs/performance.md`).
pub fn streams(m: usize, n: usize, kept: bool) -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    let on = *ON.get_or_init(|| std::env::var("BEFT_CPU_STREAM").map_or(true, |v| v.trim() != "0"));
    let min = if kept {
        STREAM_MIN_BYTES
    } else {
        STREAM_MIN_BYTES_READ_NEXT
    };
    on && m * n * 4 >= min
}

/// The smallest kept C (bytes, [`Epilogue::kept`]) written with streaming
/// stores (measured on MiniLM at 512 and 2,048 rows, thresholds 0, 1 and
/// 4 MiB: 1 MiB best or level).
pub const STREAM_MIN_BYTES: usize = 1 << 20;

/// The smallest C (bytes) written with streaming stores when the next op
/// reads it: about what the cores' L2 caches hold, so that a result they
/// can hold stays there for its reader. Measured with thresholds of 2, 4
/// and 8 MiB and never (2 cores of 2 MiB L2): 4 MiB best or level on the
/// MiniLM and BERT-base forward and training steps; streaming MiniLM's
/// 3 MiB q, k, v and projections cost 18 % of its forward pass, never
/// streaming BERT-base's 6 MiB ones 5–8 %.
pub const STREAM_MIN_BYTES_READ_NEXT: usize = 4 << 20;

/// `len` elements of `v` from a 64-byte boundary, so that every packed row
/// of 16 pairs is one cache line (an AMX tile row split over two lines
/// loads at half speed; a vector load across two lines costs two). The
/// caller writes every element it reads: grow only, no clearing.
pub(super) fn aligned<T: Copy + Default>(v: &mut Vec<T>, len: usize) -> &mut [T] {
    let off = align_off(v, len);
    &mut v[off..off + len]
}

/// Grow `v` to hold `len` elements from a 64-byte boundary; that boundary's
/// index.
fn align_off<T: Copy + Default>(v: &mut Vec<T>, len: usize) -> usize {
    let line = 64 / std::mem::size_of::<T>();
    if v.len() < len + line {
        v.resize(len + line, T::default());
    }
    v.as_ptr().align_offset(64).min(line)
}

/// `f(i, chunk i of v)` for chunks of `len`, over the pool when `par`.
fn each_chunk(par: bool, v: &mut [u32], len: usize, f: impl Fn(usize, &mut [u32]) + Sync) {
    if par {
        v.par_chunks_mut(len).enumerate().for_each(|(i, c)| f(i, c));
    } else {
        v.chunks_mut(len).enumerate().for_each(|(i, c)| f(i, c));
    }
}

/// Rows `r0..r0+MR` of A as bf16 pairs, row-major (`kp` pairs a row),
/// zero beyond `m`.
fn pack_a(dst: &mut [u32], a: &[f32], m: usize, k: usize, ta: bool, r0: usize) {
    let kp = k.div_ceil(2);
    for (r, out) in dst.chunks_exact_mut(kp).enumerate() {
        let i = r0 + r;
        if i >= m {
            out.fill(0);
        } else if !ta {
            let row = &a[i * k..(i + 1) * k];
            for q in convert_row(out, row)..kp {
                out[q] = pair(k, q, |p| bf16_bits(row[p]));
            }
        } else {
            for (q, o) in out.iter_mut().enumerate() {
                *o = pair(k, q, |p| bf16_bits(a[p * m + i]));
            }
        }
    }
}

/// Rows `r0..r0+amx::MR` of A as bf16 pairs in AMX tile order
/// ([`amx::tile_index`]; `dst` holds whole tiles of k), zero beyond `m`
/// and past `k`.
fn pack_a_tiles(dst: &mut [u32], a: &[f32], m: usize, k: usize, ta: bool, r0: usize) {
    let kp = k.div_ceil(2);
    let ld = dst.len() / amx::MR;
    for r in 0..amx::MR {
        let i = r0 + r;
        let mut done = 0;
        if i < m && !ta {
            let row = &a[i * k..(i + 1) * k];
            // Whole tiles of 16 pairs (32 values) convert as one vector.
            #[cfg(target_arch = "x86_64")]
            for blk in 0..k / 32 {
                let o = amx::tile_index(r, blk * amx::KT);
                // SAFETY: gemm asserts available() before packing.
                unsafe { convert_row_avx512(&mut dst[o..o + amx::KT], &row[blk * 32..][..32]) };
                done = (blk + 1) * amx::KT;
            }
            for q in done..kp {
                dst[amx::tile_index(r, q)] = pair(k, q, |p| bf16_bits(row[p]));
            }
            done = kp;
        } else if i < m {
            for q in 0..kp {
                dst[amx::tile_index(r, q)] = pair(k, q, |p| bf16_bits(a[p * m + i]));
            }
            done = kp;
        }
        for q in done..ld {
            dst[amx::tile_index(r, q)] = 0;
        }
    }
}

/// Pack columns `c0..c0+NR` of B as `[pair][NR]` (`ld` ≥ ⌈k/2⌉ pairs),
/// zero beyond `n` and past `k`.
fn pack_b(dst: &mut [u32], b: BSrc<'_>, n: usize, k: usize, tb: bool, c0: usize, ld: usize) {
    let kp = k.div_ceil(2);
    dst[kp * NR..ld * NR].fill(0);
    let cols = NR.min(n - c0);
    if tb {
        // B(p, j) = W[j·k + p]: each column is contiguous along k, so
        // blocks of 16 columns × 16 pairs are transposed.
        let done = transpose_cols(dst, b, n, k, c0);
        for q in done..kp {
            for c in 0..NR {
                let j = c0 + c;
                dst[q * NR + c] = if c < cols {
                    pair(k, q, |p| b.bits(j * k + p))
                } else {
                    0
                };
            }
        }
    } else {
        // B(p, j) = W[p·n + j]: rows 2q and 2q+1 interleave.
        for q in 0..kp {
            let out = &mut dst[q * NR..(q + 1) * NR];
            let r0 = 2 * q * n + c0;
            let r1 = (2 * q + 1 < k).then_some(r0 + n);
            #[cfg(target_arch = "x86_64")]
            if cols == NR {
                // SAFETY: gemm asserts available(); the rows hold NR
                // values from c0.
                unsafe { interleave_avx512(out, b, r0, r1) };
                continue;
            }
            for (c, o) in out.iter_mut().enumerate() {
                *o = if c < cols {
                    pair(k, q, |p| b.bits(p * n + c0 + c))
                } else {
                    0
                };
            }
        }
    }
}

/// `row` (contiguous along k) as bf16 pairs into `out`, 32 values at a time;
/// returns the pairs done (the tail is the caller's).
fn convert_row(out: &mut [u32], row: &[f32]) -> usize {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: gemm asserts available() before packing.
        unsafe { convert_row_avx512(out, row) }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (out, row);
        0
    }
}

/// The panel of columns `c0..c0+NR` of an `[n, k]` B as `[pair][NR]`, in
/// blocks of 16 pairs; returns the pairs done (the tail is the caller's).
fn transpose_cols(dst: &mut [u32], b: BSrc<'_>, n: usize, k: usize, c0: usize) -> usize {
    #[cfg(target_arch = "x86_64")]
    {
        if matches!(b, BSrc::Bf16(_)) && k % 2 == 1 {
            return 0; // pairs straddle rows: the scalar path
        }
        // SAFETY: gemm asserts available() before packing.
        unsafe { transpose_cols_avx512(dst, b, n, k, c0) }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (dst, b, n, k, c0);
        0
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn convert_row_avx512(out: &mut [u32], row: &[f32]) -> usize {
    let full = row.len() / 32;
    for blk in 0..full {
        let v = pairs32(&row[blk * 32..blk * 32 + 32]);
        _mm512_storeu_si512(out[blk * 16..blk * 16 + 16].as_mut_ptr() as *mut _, v);
    }
    full * 16
}

/// 32 consecutive f32 as 16 bf16 pairs (pair q = values 2q, 2q+1).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn pairs32(x: &[f32]) -> __m512i {
    let lo = _mm512_loadu_ps(x.as_ptr());
    let hi = _mm512_loadu_ps(x[16..32].as_ptr());
    // Element i of the result is lo[i] for i < 16, hi[i-16] after.
    std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo))
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn transpose_cols_avx512(
    dst: &mut [u32],
    b: BSrc<'_>,
    n: usize,
    k: usize,
    c0: usize,
) -> usize {
    // Whole blocks of 32 values (16 pairs) per column.
    let full = k / 32;
    for g in 0..NR / 16 {
        for blk in 0..full {
            let mut r = [_mm512_setzero_si512(); 16];
            for (c, v) in r.iter_mut().enumerate() {
                let j = c0 + g * 16 + c;
                if j < n {
                    let at = j * k + blk * 32;
                    *v = match b {
                        BSrc::F32(w) => pairs32(&w[at..at + 32]),
                        BSrc::Bf16(w) => {
                            _mm512_loadu_si512(w[2 * at..2 * at + 64].as_ptr() as *const _)
                        }
                    };
                }
            }
            transpose16(&mut r);
            for (q, v) in r.iter().enumerate() {
                let o = (blk * 16 + q) * NR + g * 16;
                _mm512_storeu_si512(dst[o..o + 16].as_mut_ptr() as *mut _, *v);
            }
        }
    }
    full * 16
}

/// Transpose a 16×16 matrix of 32-bit values held as 16 rows.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn transpose16(r: &mut [__m512i; 16]) {
    let mut t = [_mm512_setzero_si512(); 16];
    // Interleave 32-bit elements of row pairs, then 64-bit of pairs of
    // those: each 128-bit lane then holds a 4×4 block, which two rounds of
    // lane shuffles put in place.
    for i in 0..8 {
        t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    for i in 0..4 {
        let (a, b, c, d) = (t[4 * i], t[4 * i + 1], t[4 * i + 2], t[4 * i + 3]);
        r[4 * i] = _mm512_unpacklo_epi64(a, c);
        r[4 * i + 1] = _mm512_unpackhi_epi64(a, c);
        r[4 * i + 2] = _mm512_unpacklo_epi64(b, d);
        r[4 * i + 3] = _mm512_unpackhi_epi64(b, d);
    }
    for i in 0..2 {
        for j in 0..4 {
            t[8 * i + j] = _mm512_shuffle_i32x4::<0x88>(r[8 * i + j], r[8 * i + 4 + j]);
            t[8 * i + 4 + j] = _mm512_shuffle_i32x4::<0xdd>(r[8 * i + j], r[8 * i + 4 + j]);
        }
    }
    for j in 0..8 {
        r[j] = _mm512_shuffle_i32x4::<0x88>(t[j], t[8 + j]);
        r[8 + j] = _mm512_shuffle_i32x4::<0xdd>(t[j], t[8 + j]);
    }
}

/// `out[c] = bf16(B[r0 + c]) | bf16(B[r1 + c]) << 16` for 32 columns.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn interleave_avx512(out: &mut [u32], b: BSrc<'_>, r0: usize, r1: Option<usize>) {
    for h in 0..2 {
        let lo = load16(b, r0 + 16 * h);
        let hi = match r1 {
            Some(r1) => load16(b, r1 + 16 * h),
            None => _mm512_setzero_si512(),
        };
        let v = _mm512_or_si512(lo, _mm512_slli_epi32::<16>(hi));
        _mm512_storeu_si512(out.as_mut_ptr().add(16 * h) as *mut _, v);
    }
}

/// 16 bf16 values of B from element `i`, zero-extended to u32 lanes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn load16(b: BSrc<'_>, i: usize) -> __m512i {
    match b {
        BSrc::F32(s) => {
            let v = _mm512_loadu_ps(s[i..i + 16].as_ptr());
            let h: __m256i = std::mem::transmute(_mm512_cvtneps_pbh(v));
            _mm512_cvtepu16_epi32(h)
        }
        BSrc::Bf16(s) => {
            let h = _mm256_loadu_si256(s[2 * i..2 * i + 32].as_ptr() as *const __m256i);
            _mm512_cvtepu16_epi32(h)
        }
    }
}

/// Store masks for the two 16-lane halves of a row of `cols` (≤ 32) values.
#[cfg(target_arch = "x86_64")]
pub(super) fn col_masks(cols: usize) -> (u16, u16) {
    let mask = |w: usize| {
        if w >= 16 {
            0xffff
        } else {
            ((1u32 << w) - 1) as u16
        }
    };
    (mask(cols), mask(cols.saturating_sub(16)))
}

/// One `rows × cols` (≤ MR × NR) tile of C from `kc` pairs of MR rows of
/// A (row stride `lda` pairs) and a packed B panel: `C = (load ? C : 0) +
/// A·B`.
///
/// # Safety
/// AVX-512 BF16 present; `a` holds MR rows of `kc` pairs at stride `lda`,
/// `b` `kc·NR` values; `c` is valid for `rows` rows of `cols` values at
/// row stride `ldc`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
#[allow(clippy::too_many_arguments)]
unsafe fn micro(
    kc: usize,
    a: *const u32,
    lda: usize,
    b: *const u32,
    c: *mut f32,
    ldc: usize,
    rows: usize,
    cols: usize,
    load: bool,
) {
    // Bring the C tile towards L1 while the products run.
    for r in 0..MR {
        if r < rows {
            let p = c.add(r * ldc) as *const i8;
            _mm_prefetch::<_MM_HINT_T0>(p);
            _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(64));
        }
    }
    let mut acc0 = [_mm512_setzero_ps(); MR];
    let mut acc1 = [_mm512_setzero_ps(); MR];
    let (mut a, mut b) = (a, b);
    for _ in 0..kc {
        let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(b as *const _));
        let b1: __m512bh = std::mem::transmute(_mm512_loadu_si512(b.add(16) as *const _));
        for r in 0..MR {
            let av: __m512bh = std::mem::transmute(_mm512_set1_epi32(*a.add(r * lda) as i32));
            acc0[r] = _mm512_dpbf16_ps(acc0[r], av, b0);
            acc1[r] = _mm512_dpbf16_ps(acc1[r], av, b1);
        }
        a = a.add(1);
        b = b.add(NR);
    }
    let (m0, m1) = col_masks(cols);
    for r in 0..MR {
        if r < rows {
            let p = c.add(r * ldc);
            let (mut x0, mut x1) = (acc0[r], acc1[r]);
            if load {
                x0 = _mm512_add_ps(x0, _mm512_maskz_loadu_ps(m0, p));
                x1 = _mm512_add_ps(x1, _mm512_maskz_loadu_ps(m1, p.add(16)));
            }
            _mm512_mask_storeu_ps(p, m0, x0);
            _mm512_mask_storeu_ps(p.add(16), m1, x1);
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
#[allow(clippy::too_many_arguments)]
unsafe fn micro(
    _kc: usize,
    _a: *const u32,
    _lda: usize,
    _b: *const u32,
    _c: *mut f32,
    _ldc: usize,
    _rows: usize,
    _cols: usize,
    _load: bool,
) {
    unreachable!("bf16 GEMM is x86-64 only")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bf(x: f32) -> f64 {
        half::bf16::from_f32(x).to_f64()
    }

    #[test]
    fn rounding_is_nearest_even() {
        assert_eq!(bf16_bits(1.0), 0x3f80);
        // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties to even (1.0).
        assert_eq!(bf16_bits(1.0 + 1.0 / 256.0), 0x3f80);
        // 1 + 3·2^-8 is halfway between 1 + 2^-7 and 1 + 2^-6: to even.
        assert_eq!(bf16_bits(1.0 + 3.0 / 256.0), 0x3f82);
        assert_eq!(bf16_bits(-2.0), 0xc000);
        assert!(f32::from_bits((bf16_bits(f32::NAN) as u32) << 16).is_nan());
        assert_eq!(bf16_bits(f32::INFINITY), 0x7f80);
        // The vector conversion (whole blocks of 32) rounds as the scalar
        // tail does.
        if available() {
            let row: Vec<f32> = (0..32)
                .map(|i| match i % 4 {
                    0 => 1.0 + (i as f32) / 256.0,
                    1 => -(1.0 + 3.0 / 256.0) * i as f32,
                    2 => f32::INFINITY,
                    _ => 1e30 * i as f32,
                })
                .collect();
            let mut out = [0u32; 16];
            assert_eq!(convert_row(&mut out, &row), 16);
            for (q, &v) in out.iter().enumerate() {
                assert_eq!(v, pair(32, q, |p| bf16_bits(row[p])), "pair {q}");
            }
        }
    }

    #[test]
    #[cfg(target_arch = "x86_64")]
    fn transpose16_transposes() {
        if !available() {
            println!("skipped: this CPU has no AVX-512 BF16");
            return;
        }
        let m: Vec<u32> = (0..256).collect();
        let mut out = [0u32; 256];
        // SAFETY: AVX-512 checked above; loads and stores stay in 256 values.
        unsafe {
            let mut r = [_mm512_setzero_si512(); 16];
            for (i, v) in r.iter_mut().enumerate() {
                *v = _mm512_loadu_si512(m[16 * i..].as_ptr() as *const _);
            }
            transpose16(&mut r);
            for (i, v) in r.iter().enumerate() {
                _mm512_storeu_si512(out[16 * i..].as_mut_ptr() as *mut _, *v);
            }
        }
        for i in 0..16 {
            for j in 0..16 {
                assert_eq!(out[16 * i + j], m[16 * j + i], "[{i},{j}]");
            }
        }
    }

    /// The kernels this CPU runs (none without AVX-512 BF16), saying which
    /// are skipped.
    fn kernels_here() -> Vec<Kernel> {
        if !available() {
            println!("skipped: this CPU has no AVX-512 BF16");
            return vec![];
        }
        if !amx::available() {
            println!("AMX kernel skipped: this CPU or OS offers no AMX-BF16");
            return vec![Kernel::Dot];
        }
        vec![Kernel::Dot, Kernel::Amx]
    }

    /// The epilogue gives what the product followed by the bias add and the
    /// activation gives, bit for bit, on every kernel and block shape.
    #[test]
    fn epilogue_is_the_bias_add_and_activation() {
        let mut rng = crate::rng::Rng::new(11);
        for kernel in kernels_here() {
            for &(m, n, k) in &[(33, 70, 45), (64, 96, 200), (300, 530, 64), (40, 17, 0)] {
                let a: Vec<f32> = (0..m * k).map(|_| rng.normal() as f32).collect();
                let w: Vec<f32> = (0..k * n).map(|_| rng.normal() as f32).collect();
                let bias: Vec<f32> = (0..n).map(|_| rng.normal() as f32).collect();
                let run = |c: &mut [f32], epi| {
                    gemm_on(
                        kernel,
                        m,
                        n,
                        k,
                        c,
                        false,
                        ASrc::F32(&a, false),
                        BSrc::F32(&w),
                        true,
                        epi,
                    )
                };
                let mut want = vec![0f32; m * n];
                run(&mut want, Epilogue::default());
                kernels::add_row_vec(&mut want, &bias);
                let mut want_act = vec![0f32; m * n];
                kernels::act_fwd(Act::Gelu, &mut want_act, &want);
                let (mut got, mut got_act) = (vec![f32::NAN; m * n], vec![f32::NAN; m * n]);
                run(
                    &mut got,
                    Epilogue::new(Some(&bias), Some((Act::Gelu, &mut got_act))),
                );
                let same =
                    |x: &[f32], y: &[f32]| x.iter().zip(y).all(|(p, q)| p.to_bits() == q.to_bits());
                assert!(same(&got, &want), "{kernel:?} {m}x{n}x{k}: C + bias");
                assert!(
                    same(&got_act, &want_act),
                    "{kernel:?} {m}x{n}x{k}: act(C + bias)"
                );
            }
        }
    }

    /// An epilogue that writes `act(C + bias)` as the next product's packed
    /// A writes exactly what packing that f32 result gives, padding
    /// included, on every kernel, with ragged strips and an odd `n`; and
    /// the product by it is the product by the f32 result.
    #[test]
    fn packed_activation_output_is_the_packed_activation() {
        let mut rng = crate::rng::Rng::new(17);
        for kernel in kernels_here() {
            // (600, 496): large enough for streaming stores; k = 0: C is
            // the bias alone.
            for &(m, n, k) in &[(33, 70, 45), (300, 531, 64), (40, 17, 0), (600, 496, 100)] {
                let a: Vec<f32> = (0..m * k).map(|_| rng.normal() as f32).collect();
                let w: Vec<f32> = (0..k * n).map(|_| rng.normal() as f32).collect();
                let bias: Vec<f32> = (0..n).map(|_| rng.normal() as f32).collect();
                let (src, wb) = (ASrc::F32(&a, false), BSrc::F32(&w));
                let (mut c, mut g) = (vec![0f32; m * n], vec![0f32; m * n]);
                let epi = Epilogue::new(Some(&bias), Some((Act::Gelu, &mut g)));
                gemm_on(kernel, m, n, k, &mut c, false, src, wb, true, epi);
                let want = PackedA::new(kernel, m, n, &g, false);
                let mut got = PackedA::output(kernel, m, n);
                // Unspecified contents: poison them.
                got.strips_mut().fill(0x7fc0_7fc0);
                let mut c2 = vec![f32::NAN; m * n];
                // Kept: streaming stores where large (as in an MLP).
                let epi = Epilogue::packed(Some(&bias), Act::Gelu, &mut got).kept();
                gemm_on(kernel, m, n, k, &mut c2, false, src, wb, true, epi);
                let same =
                    |x: &[f32], y: &[f32]| x.iter().zip(y).all(|(p, q)| p.to_bits() == q.to_bits());
                assert!(same(&c, &c2), "{kernel:?} {m}x{n}x{k}: C + bias");
                let diff = want
                    .strips()
                    .iter()
                    .zip(got.strips())
                    .position(|(x, y)| x != y);
                assert_eq!(
                    diff, None,
                    "{kernel:?} {m}x{n}x{k}: packed act(C) (first u32 that differs)"
                );
                // The next product (k = n), by the packed A and by g.
                let n2 = 37;
                let w2: Vec<f32> = (0..n * n2).map(|_| rng.normal() as f32).collect();
                let (mut y, mut y2) = (vec![0f32; m * n2], vec![f32::NAN; m * n2]);
                let b2 = BSrc::F32(&w2);
                let epi = Epilogue::default();
                gemm_on(
                    kernel,
                    m,
                    n2,
                    n,
                    &mut y,
                    false,
                    ASrc::F32(&g, false),
                    b2,
                    false,
                    epi,
                );
                gemm_on(
                    kernel,
                    m,
                    n2,
                    n,
                    &mut y2,
                    false,
                    ASrc::Packed(&got),
                    b2,
                    false,
                    epi,
                );
                assert!(
                    same(&y, &y2),
                    "{kernel:?} {m}x{n}x{k}: product by the packed act(C)"
                );
            }
        }
    }

    /// A C large enough for streaming stores, once on line boundaries (they
    /// are used) and once a float past them (they cannot be): the same
    /// values bit for bit, with and without accumulating, through the
    /// bias and activation epilogue, with ragged last strips and panels.
    #[test]
    fn streaming_stores_write_what_ordinary_stores_do() {
        if !kernels_here().contains(&Kernel::Amx) {
            return;
        }
        let (m, n, k) = (600, 496, 100);
        if !streams(m, n, true) {
            println!("skipped: BEFT_CPU_STREAM=0 turns streaming stores off");
            return;
        }
        let mut rng = crate::rng::Rng::new(5);
        let a: Vec<f32> = (0..m * k).map(|_| rng.normal() as f32).collect();
        let w: Vec<f32> = (0..k * n).map(|_| rng.normal() as f32).collect();
        let bias: Vec<f32> = (0..n).map(|_| rng.normal() as f32).collect();
        let c0: Vec<f32> = (0..m * n).map(|_| rng.normal() as f32).collect();
        // `m × n` slices of two buffers starting `skew` floats past a
        // 64-byte boundary.
        let run = |skew: usize, acc: bool| {
            let (mut cb, mut ob) = (vec![f32::NAN; m * n + 32], vec![f32::NAN; m * n + 32]);
            let at = |v: &Vec<f32>| (16 - (v.as_ptr() as usize % 64) / 4) % 16 + skew;
            let (ci, oi) = (at(&cb), at(&ob));
            let c = &mut cb[ci..ci + m * n];
            if acc {
                c.copy_from_slice(&c0);
            }
            let out = &mut ob[oi..oi + m * n];
            let epi = Epilogue::new(Some(&bias), Some((Act::Gelu, out))).kept();
            gemm_on(
                Kernel::Amx,
                m,
                n,
                k,
                c,
                acc,
                ASrc::F32(&a, false),
                BSrc::F32(&w),
                true,
                epi,
            );
            (cb[ci..ci + m * n].to_vec(), ob[oi..oi + m * n].to_vec())
        };
        for acc in [false, true] {
            let (streamed, unaligned) = (run(0, acc), run(1, acc));
            let same = |x: &[f32], y: &[f32]| {
                x.iter()
                    .zip(y)
                    .all(|(p, q)| p.to_bits() == q.to_bits() && !p.is_nan())
            };
            assert!(same(&streamed.0, &unaligned.0), "acc={acc}: C");
            assert!(same(&streamed.1, &unaligned.1), "acc={acc}: act(C)");
        }
    }

    /// Against an f64 product of the bf16-rounded inputs: only the f32
    /// summation may differ.
    #[test]
    fn matches_the_rounded_product_on_ragged_shapes() {
        let kernels = kernels_here();
        let mut rng = crate::rng::Rng::new(7);
        for &(m, n, k, kernel) in [
            (1, 1, 1),
            (13, 33, 3),
            (12, 32, 64),
            (25, 70, 257),
            (200, 530, 300),
            (3, 17, 31),
            (40, 64, 97),
            (33, 48, 96),
            // Whole 32 × 32 AMX blocks (C read and written in place), more
            // than one k tile, and a ragged last tile.
            (64, 96, 200),
            (96, 64, 33),
        ]
        .iter()
        .flat_map(|&(m, n, k)| kernels.iter().map(move |&kr| (m, n, k, kr)))
        .collect::<Vec<_>>()
        .iter()
        {
            for &(ta, tb, acc, b16) in &[
                (false, true, false, false),
                (false, false, true, false),
                (true, true, false, false),
                (false, true, true, true),
                (false, false, false, true),
            ] {
                let a: Vec<f32> = (0..m * k).map(|_| rng.normal() as f32).collect();
                let w: Vec<f32> = (0..k * n).map(|_| rng.normal() as f32).collect();
                let wbytes: Vec<u8> = w.iter().flat_map(|&x| bf16_bits(x).to_le_bytes()).collect();
                let c0: Vec<f32> = (0..m * n).map(|_| rng.normal() as f32).collect();
                let mut c = c0.clone();
                // Poison when not accumulating: every element must be written.
                if !acc {
                    c.fill(f32::NAN);
                }
                let src = if b16 {
                    BSrc::Bf16(&wbytes)
                } else {
                    BSrc::F32(&w)
                };
                gemm_on(
                    kernel,
                    m,
                    n,
                    k,
                    &mut c,
                    acc,
                    ASrc::F32(&a, ta),
                    src,
                    tb,
                    Epilogue::default(),
                );
                // B packed beforehand: the same product, bit for bit.
                let packed = PackedB::new(kernel, n, k, src, tb);
                let mut cp = if acc {
                    c0.clone()
                } else {
                    vec![f32::NAN; m * n]
                };
                gemm_packed(
                    m,
                    &mut cp,
                    acc,
                    ASrc::F32(&a, ta),
                    &packed,
                    Epilogue::default(),
                );
                let same = c.iter().zip(&cp).all(|(x, y)| x.to_bits() == y.to_bits());
                assert!(
                    same,
                    "{kernel:?} {m}x{n}x{k} ta={ta} tb={tb} acc={acc}: packed B differs"
                );
                // A packed beforehand too: the same product again.
                let pa = PackedA::new(kernel, m, k, &a, ta);
                let mut cpa = if acc {
                    c0.clone()
                } else {
                    vec![f32::NAN; m * n]
                };
                let epi = Epilogue::default();
                gemm_packed(m, &mut cpa, acc, ASrc::Packed(&pa), &packed, epi);
                let same = c.iter().zip(&cpa).all(|(x, y)| x.to_bits() == y.to_bits());
                assert!(
                    same,
                    "{kernel:?} {m}x{n}x{k} ta={ta} tb={tb} acc={acc}: packed A differs"
                );
                for i in 0..m {
                    for j in 0..n {
                        let (mut want, mut mag) = (0f64, 0f64);
                        for p in 0..k {
                            let x = if ta { a[p * m + i] } else { a[i * k + p] };
                            let y = if tb { w[j * k + p] } else { w[p * n + j] };
                            want += bf(x) * bf(y);
                            mag += (bf(x) * bf(y)).abs();
                        }
                        if acc {
                            want += c0[i * n + j] as f64;
                            mag += (c0[i * n + j] as f64).abs();
                        }
                        let got = c[i * n + j] as f64;
                        assert!(
                            (got - want).abs() <= 1e-5 * mag + 1e-6,
                            "{kernel:?} {m}x{n}x{k} ta={ta} tb={tb} acc={acc} bf16={b16} [{i},{j}]: {got} vs {want}"
                        );
                    }
                }
            }
        }
    }
}
