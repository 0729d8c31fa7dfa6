//! Element-wise and row kernels of the fast CPU backend, written as plain
//! loops over fixed-width lanes so that LLVM vectorises them, and compiled
//! three times (AVX-512, AVX2+FMA, baseline) with the widest one the CPU
//! supports picked at run time.
//!
//! `exp` and the erf-based GELU are branch-free polynomial approximations
//! (about 1e-7 and 1e-6 relative error), so that whole rows vectorise
//! instead of calling libm per element.

use std::sync::atomic::{AtomicU8, Ordering};

use crate::backend::{hash32, Act};

/// SIMD width in f32 lanes used by the lane-parallel accumulators.
pub const LANES: usize = 16;

/// 0 = baseline, 1 = AVX2+FMA, 2 = AVX-512; 255 = not yet detected.
static LEVEL: AtomicU8 = AtomicU8::new(255);

/// The SIMD level of this CPU (detected once).
#[inline]
pub fn simd_level() -> u8 {
    let l = LEVEL.load(Ordering::Relaxed);
    if l != 255 {
        return l;
    }
    let l = detect();
    LEVEL.store(l, Ordering::Relaxed);
    l
}

fn detect() -> u8 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::env::var_os("BEFT_NO_AVX512").is_none()
            && is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512vl")
            && is_x86_feature_detected!("avx512dq")
            && is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
        {
            return 2;
        }
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            return 1;
        }
    }
    0
}

/// A human-readable name of the detected SIMD level.
pub fn simd_name() -> &'static str {
    match simd_level() {
        2 => "avx512",
        1 => "avx2",
        _ => "baseline",
    }
}

/// Define `pub fn $name(args)` whose body is compiled for AVX-512, AVX2+FMA
/// and the baseline target, dispatching on [`simd_level`] at run time.
macro_rules! multiversion {
    ($(#[$m:meta])* pub fn $name:ident($($arg:ident : $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$m])*
        pub fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn inner($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512vl,avx512dq,avx2,fma")]
                unsafe fn v4($($arg: $ty),*) $(-> $ret)? { inner($($arg),*) }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn v3($($arg: $ty),*) $(-> $ret)? { inner($($arg),*) }
                match simd_level() {
                    // SAFETY: the CPU supports these features (detected).
                    2 => return unsafe { v4($($arg),*) },
                    1 => return unsafe { v3($($arg),*) },
                    _ => {}
                }
            }
            inner($($arg),*)
        }
    };
}

const LOG2E: f32 = std::f32::consts::LOG2_E;
/// 1.5·2²³: adding it rounds to an integer held in the low mantissa bits.
const MAGIC: f32 = 12_582_912.0;

/// `e^x` in f32, branch-free (vectorisable), within ~2 ulp for
/// `x ∈ [-87, 88]`; 0 below (and for -inf), saturating above. The reduction
/// and the polynomial are fused multiply-adds (`mul_add`): one instruction
/// each in the multiversioned kernels that inline this (the FMA targets), a
/// libm call only on a CPU without FMA.
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    let xc = x.clamp(-87.0, 88.0);
    let t = xc * LOG2E + MAGIC;
    let n = t - MAGIC;
    // Cody–Waite reduction: r = x - n·ln2 in two parts.
    let r = (-n).mul_add(-2.121_944_4e-4, (-n).mul_add(0.693_359_4, xc));
    let mut p = 1.987_569_1e-4f32;
    p = p.mul_add(r, 1.398_199_9e-3);
    p = p.mul_add(r, 8.333_452e-3);
    p = p.mul_add(r, 4.166_579_6e-2);
    p = p.mul_add(r, 1.666_666_5e-1);
    p = p.mul_add(r, 5.000_000_1e-1);
    let y = p.mul_add(r * r, r) + 1.0;
    let ni = (t.to_bits() as i32).wrapping_sub(0x4B40_0000);
    let scale = f32::from_bits(((ni + 127) << 23) as u32);
    let v = y * scale;
    if x < -87.0 {
        0.0
    } else {
        v
    }
}

/// `erfc(z)` for `z ≥ 0` (Chebyshev fit, fractional error < 1.2e-7 in exact
/// arithmetic; Numerical Recipes' `erfcc`).
#[inline(always)]
fn erfc_pos(z: f32) -> f32 {
    let t = 1.0 / 0.5f32.mul_add(z, 1.0);
    let mut p = 0.170_872_77f32;
    for c in [
        -0.822_152_23,
        1.488_515_9,
        -1.135_203_98,
        0.278_868_07,
        -0.186_288_06,
        0.096_784_18,
        0.374_091_96,
        1.000_023_7,
        -1.265_512_2,
    ] {
        p = p.mul_add(t, c);
    }
    t * exp_f32((-z).mul_add(z, p))
}

const FRAC_1_SQRT_2: f32 = std::f32::consts::FRAC_1_SQRT_2;
const INV_SQRT_2PI: f32 = 0.398_942_3;

/// Φ(x), the standard normal CDF, accurate in relative terms on both tails.
#[inline(always)]
fn phi(x: f32) -> f32 {
    let e = erfc_pos(x.abs() * FRAC_1_SQRT_2);
    if x >= 0.0 {
        1.0 - 0.5 * e
    } else {
        0.5 * e
    }
}

#[inline(always)]
fn gelu(x: f32) -> f32 {
    x * phi(x)
}

#[inline(always)]
fn gelu_grad(x: f32) -> f32 {
    phi(x) + x * INV_SQRT_2PI * exp_f32(-0.5 * x * x)
}

#[inline(always)]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp_f32(-x))
}

const GELU_C: f32 = 0.797_884_6;

/// tanh-GELU as `x·σ(2u)` (no cancellation near 0).
#[inline(always)]
fn gelu_tanh(x: f32) -> f32 {
    let u = GELU_C * (x + 0.044715 * x * x * x);
    x * sigmoid(2.0 * u)
}

#[inline(always)]
fn gelu_tanh_grad(x: f32) -> f32 {
    let u = GELU_C * (x + 0.044715 * x * x * x);
    let s = sigmoid(2.0 * u);
    let du = GELU_C * (1.0 + 3.0 * 0.044715 * x * x);
    s + 2.0 * x * s * (1.0 - s) * du
}

#[inline(always)]
fn silu(x: f32) -> f32 {
    x * sigmoid(x)
}

#[inline(always)]
fn silu_grad(x: f32) -> f32 {
    let s = sigmoid(x);
    s * (1.0 + x * (1.0 - s))
}

multiversion! {
    /// `y = act(x)` element-wise.
    pub fn act_fwd(act: Act, y: &mut [f32], x: &[f32]) {
        match act {
            Act::Gelu => {
                for (o, v) in y.iter_mut().zip(x) {
                    *o = gelu(*v);
                }
            }
            Act::GeluTanh => {
                for (o, v) in y.iter_mut().zip(x) {
                    *o = gelu_tanh(*v);
                }
            }
            Act::Silu => {
                for (o, v) in y.iter_mut().zip(x) {
                    *o = silu(*v);
                }
            }
            Act::Relu => {
                for (o, v) in y.iter_mut().zip(x) {
                    *o = if *v > 0.0 { *v } else { 0.0 };
                }
            }
            Act::Tanh => {
                for (o, v) in y.iter_mut().zip(x) {
                    *o = v.tanh();
                }
            }
        }
    }
}

multiversion! {
    /// `dx = dy · act'(x)` element-wise.
    pub fn act_bwd(act: Act, dx: &mut [f32], x: &[f32], dy: &[f32]) {
        match act {
            Act::Gelu => {
                for ((o, v), g) in dx.iter_mut().zip(x).zip(dy) {
                    *o = *g * gelu_grad(*v);
                }
            }
            Act::GeluTanh => {
                for ((o, v), g) in dx.iter_mut().zip(x).zip(dy) {
                    *o = *g * gelu_tanh_grad(*v);
                }
            }
            Act::Silu => {
                for ((o, v), g) in dx.iter_mut().zip(x).zip(dy) {
                    *o = *g * silu_grad(*v);
                }
            }
            Act::Relu => {
                for ((o, v), g) in dx.iter_mut().zip(x).zip(dy) {
                    *o = if *v > 0.0 { *g } else { 0.0 };
                }
            }
            Act::Tanh => {
                for ((o, v), g) in dx.iter_mut().zip(x).zip(dy) {
                    let t = v.tanh();
                    *o = *g * (1.0 - t * t);
                }
            }
        }
    }
}

multiversion! {
    /// SwiGLU forward: `h = silu(gate)·up`.
    pub fn swiglu_fwd(h: &mut [f32], gate: &[f32], up: &[f32]) {
        for ((o, g), u) in h.iter_mut().zip(gate).zip(up) {
            *o = silu(*g) * *u;
        }
    }
}

multiversion! {
    /// SwiGLU backward.
    pub fn swiglu_bwd(dgate: &mut [f32], dup: &mut [f32], dh: &[f32], gate: &[f32], up: &[f32]) {
        for i in 0..dgate.len() {
            let (g, u, d) = (gate[i], up[i], dh[i]);
            dgate[i] = d * u * silu_grad(g);
            dup[i] = d * silu(g);
        }
    }
}

/// Lane-parallel sum (no reassociation needed to vectorise).
#[inline(always)]
fn sum_lanes(x: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let mut it = x.chunks_exact(LANES);
    for c in &mut it {
        for l in 0..LANES {
            acc[l] += c[l];
        }
    }
    let mut s = 0f32;
    for v in it.remainder() {
        s += *v;
    }
    acc.iter().sum::<f32>() + s
}

/// Where the rows of a LayerNorm's input come from ([`layernorm_rows`]).
#[derive(Clone, Copy)]
pub enum RowSrc<'a> {
    /// The rows themselves.
    Plain(&'a [f32]),
    /// A residual sum `drop(s) + res`: `drop` = (p, 1/(1-p), seed) with the
    /// mask of [`dropout`] (the first element's index `first`), `None` for
    /// the plain sum — the values `dropout` and `add` would leave in `s`.
    Residual {
        s: &'a [f32],
        res: &'a [f32],
        drop: Option<(f32, f32, u64)>,
        first: u32,
    },
}

impl<'a> RowSrc<'a> {
    /// The `len` values from `start` on (a chunk of rows).
    pub fn chunk(self, start: usize, len: usize) -> RowSrc<'a> {
        match self {
            RowSrc::Plain(x) => RowSrc::Plain(&x[start..start + len]),
            RowSrc::Residual {
                s,
                res,
                drop,
                first,
            } => RowSrc::Residual {
                s: &s[start..start + len],
                res: &res[start..start + len],
                drop,
                first: first.wrapping_add(start as u32),
            },
        }
    }
}

multiversion! {
    /// LayerNorm of `rows` rows of width `cols` read from `src`: each row
    /// is formed in `xh` (where it stays, normalised), then `y = xh·g + b`.
    pub fn layernorm_rows(
        y: &mut [f32],
        xh: &mut [f32],
        rs: &mut [f32],
        src: RowSrc<'_>,
        g: &[f32],
        b: &[f32],
        cols: usize,
        eps: f32,
    ) {
        let nf = cols as f32;
        for (r, (yr, xr)) in y
            .chunks_exact_mut(cols)
            .zip(xh.chunks_exact_mut(cols))
            .enumerate()
        {
            let o = r * cols;
            match src {
                RowSrc::Plain(x) => xr.copy_from_slice(&x[o..o + cols]),
                RowSrc::Residual { s, res, drop, first } => {
                    let (s, res) = (&s[o..o + cols], &res[o..o + cols]);
                    match drop {
                        None => {
                            for c in 0..cols {
                                xr[c] = s[c] + res[c];
                            }
                        }
                        Some((p, scale, seed)) => {
                            for c in 0..cols {
                                let k = keep(seed, first.wrapping_add((o + c) as u32), p);
                                xr[c] = (if k { s[c] * scale } else { 0.0 }) + res[c];
                            }
                        }
                    }
                }
            }
            let mean = sum_lanes(xr) / nf;
            let mut acc = [0f32; LANES];
            let mut it = xr.chunks_exact(LANES);
            for c in &mut it {
                for l in 0..LANES {
                    let d = c[l] - mean;
                    acc[l] += d * d;
                }
            }
            let mut var = 0f32;
            for v in it.remainder() {
                var += (*v - mean) * (*v - mean);
            }
            var = (acc.iter().sum::<f32>() + var) / nf;
            let s = 1.0 / (var + eps).sqrt();
            rs[r] = s;
            for c in 0..cols {
                let h = (xr[c] - mean) * s;
                xr[c] = h;
                yr[c] = h * g[c] + b[c];
            }
        }
    }
}

multiversion! {
    /// LayerNorm input gradient of `rows` rows.
    pub fn layernorm_bwd_rows(
        dx: &mut [f32],
        dy: &[f32],
        xh: &[f32],
        rs: &[f32],
        g: &[f32],
        cols: usize,
    ) {
        let nf = cols as f32;
        for (r, ((dxr, dyr), xhr)) in dx
            .chunks_exact_mut(cols)
            .zip(dy.chunks_exact(cols))
            .zip(xh.chunks_exact(cols))
            .enumerate()
        {
            let mut a1 = [0f32; LANES];
            let mut a2 = [0f32; LANES];
            let full = cols / LANES * LANES;
            for c0 in (0..full).step_by(LANES) {
                for l in 0..LANES {
                    let gg = dyr[c0 + l] * g[c0 + l];
                    a1[l] += gg;
                    a2[l] += gg * xhr[c0 + l];
                }
            }
            let (mut mg, mut mgx) = (0f32, 0f32);
            for c in full..cols {
                let gg = dyr[c] * g[c];
                mg += gg;
                mgx += gg * xhr[c];
            }
            mg = (mg + a1.iter().sum::<f32>()) / nf;
            mgx = (mgx + a2.iter().sum::<f32>()) / nf;
            let s = rs[r];
            for c in 0..cols {
                dxr[c] = s * (dyr[c] * g[c] - mg - xhr[c] * mgx);
            }
        }
    }
}

multiversion! {
    /// RMSNorm of rows.
    pub fn rmsnorm_rows(
        y: &mut [f32],
        xh: &mut [f32],
        rs: &mut [f32],
        x: &[f32],
        g: &[f32],
        cols: usize,
        eps: f32,
    ) {
        let nf = cols as f32;
        for (r, ((yr, xhr), xr)) in y
            .chunks_exact_mut(cols)
            .zip(xh.chunks_exact_mut(cols))
            .zip(x.chunks_exact(cols))
            .enumerate()
        {
            let mut acc = [0f32; LANES];
            let full = cols / LANES * LANES;
            for c0 in (0..full).step_by(LANES) {
                for l in 0..LANES {
                    acc[l] += xr[c0 + l] * xr[c0 + l];
                }
            }
            let mut ms = 0f32;
            for c in full..cols {
                ms += xr[c] * xr[c];
            }
            ms = (ms + acc.iter().sum::<f32>()) / nf;
            let s = 1.0 / (ms + eps).sqrt();
            rs[r] = s;
            for c in 0..cols {
                let h = xr[c] * s;
                xhr[c] = h;
                yr[c] = h * g[c];
            }
        }
    }
}

multiversion! {
    /// RMSNorm input gradient of rows.
    pub fn rmsnorm_bwd_rows(
        dx: &mut [f32],
        dy: &[f32],
        xh: &[f32],
        rs: &[f32],
        g: &[f32],
        cols: usize,
    ) {
        let nf = cols as f32;
        for (r, ((dxr, dyr), xhr)) in dx
            .chunks_exact_mut(cols)
            .zip(dy.chunks_exact(cols))
            .zip(xh.chunks_exact(cols))
            .enumerate()
        {
            let mut acc = [0f32; LANES];
            let full = cols / LANES * LANES;
            for c0 in (0..full).step_by(LANES) {
                for l in 0..LANES {
                    acc[l] += dyr[c0 + l] * g[c0 + l] * xhr[c0 + l];
                }
            }
            let mut m = 0f32;
            for c in full..cols {
                m += dyr[c] * g[c] * xhr[c];
            }
            m = (m + acc.iter().sum::<f32>()) / nf;
            let s = rs[r];
            for c in 0..cols {
                dxr[c] = s * (dyr[c] * g[c] - xhr[c] * m);
            }
        }
    }
}

multiversion! {
    /// `acc[c] += Σ_r dy[r, c]` in f64 over whole rows of width `cols`.
    pub fn col_sums_f64(acc: &mut [f64], dy: &[f32], cols: usize) {
        for row in dy.chunks_exact(cols) {
            for (a, v) in acc.iter_mut().zip(row) {
                *a += *v as f64;
            }
        }
    }
}

multiversion! {
    /// `y[r, c] += b[c]` over whole rows.
    pub fn add_row_vec(y: &mut [f32], b: &[f32]) {
        let cols = b.len();
        for row in y.chunks_exact_mut(cols) {
            for (v, bb) in row.iter_mut().zip(b) {
                *v += *bb;
            }
        }
    }
}

multiversion! {
    /// `y += x`.
    pub fn add(y: &mut [f32], x: &[f32]) {
        for (a, b) in y.iter_mut().zip(x) {
            *a += *b;
        }
    }
}

multiversion! {
    /// `y *= s`.
    pub fn scale(y: &mut [f32], s: f32) {
        for a in y.iter_mut() {
            *a *= s;
        }
    }
}

multiversion! {
    /// `Σ y²` in f64.
    pub fn sum_sq(y: &[f32]) -> f64 {
        let mut acc = [0f64; 8];
        let mut it = y.chunks_exact(8);
        for c in &mut it {
            for l in 0..8 {
                acc[l] += c[l] as f64 * c[l] as f64;
            }
        }
        let mut s = 0f64;
        for v in it.remainder() {
            s += *v as f64 * *v as f64;
        }
        acc.iter().sum::<f64>() + s
    }
}

/// The dropout keep test of [`crate::backend::dropout_keep`], inlined for
/// vectorisation (identical result).
#[inline(always)]
pub fn keep(seed: u64, idx: u32, p: f32) -> bool {
    let h = hash32(hash32(idx ^ (seed as u32)) ^ ((seed >> 32) as u32));
    ((h >> 8) as f32) * (1.0 / 16_777_216.0) >= p
}

multiversion! {
    /// In-place inverted dropout of `y`, whose first element has index `first`.
    pub fn dropout(y: &mut [f32], first: u32, p: f32, seed: u64) {
        let s = (1.0 / (1.0 - p as f64)) as f32;
        for (i, v) in y.iter_mut().enumerate() {
            let k = keep(seed, first.wrapping_add(i as u32), p);
            *v = if k { *v * s } else { 0.0 };
        }
    }
}

multiversion! {
    /// Softmax of one score row in place, over the keys that are visible
    /// (`mask[j] > 0` and `j ≤ lim`); invisible keys get probability 0.
    /// Returns the log-sum-exp (`-inf`, and all zeros, when none is
    /// visible).
    pub fn softmax_row(s: &mut [f32], mask: &[f32], lim: usize) -> f32 {
        let n = s.len();
        let mask = &mask[..n];
        for j in 0..n {
            let vis = (mask[j] > 0.0) & (j <= lim);
            s[j] = if vis { s[j] } else { f32::NEG_INFINITY };
        }
        let (m, sum) = exp_shifted(s);
        if m == f32::NEG_INFINITY {
            s.fill(0.0);
            return f32::NEG_INFINITY;
        }
        let inv = 1.0 / sum;
        for v in s.iter_mut() {
            *v *= inv;
        }
        m + sum.ln()
    }
}

multiversion! {
    /// Attention backward, one score row: from the scores `s` (scaled
    /// q·k), the row's log-sum-exp `l` and `dp = dO·Vᵀ`, write the dropped
    /// probabilities `P̃` into `s` and `dS = P(w·dp − D)·scale` into `dp`.
    /// `drop = (seed, first index, p)`.
    pub fn attn_bwd_row(
        s: &mut [f32],
        dp: &mut [f32],
        mask: &[f32],
        lim: usize,
        l: f32,
        d: f32,
        scale: f32,
        drop: Option<(u64, u32, f32)>,
    ) {
        let n = s.len();
        match drop {
            None => {
                for j in 0..n {
                    let vis = (mask[j] > 0.0) & (j <= lim);
                    let p = if vis { exp_f32(s[j] - l) } else { 0.0 };
                    s[j] = p;
                    dp[j] = p * (dp[j] - d) * scale;
                }
            }
            Some((seed, first, pd)) => {
                let inv = (1.0 / (1.0 - pd as f64)) as f32;
                for j in 0..n {
                    let vis = (mask[j] > 0.0) & (j <= lim);
                    let p = if vis { exp_f32(s[j] - l) } else { 0.0 };
                    let w = if keep(seed, first.wrapping_add(j as u32), pd) { inv } else { 0.0 };
                    s[j] = p * w;
                    dp[j] = p * (w * dp[j] - d) * scale;
                }
            }
        }
    }
}

/// `s[j] = e^(s[j] - max)` in place; returns `(max, Σ s[j])` (the max is
/// `-inf`, and `s` untouched, when every entry is `-inf`). Inlined into the
/// multiversioned kernels that call it.
#[inline(always)]
fn exp_shifted(s: &mut [f32]) -> (f32, f32) {
    let mut mx = [f32::NEG_INFINITY; LANES];
    let mut it = s.chunks_exact(LANES);
    for c in &mut it {
        for l in 0..LANES {
            mx[l] = mx[l].max(c[l]);
        }
    }
    let mut m = f32::NEG_INFINITY;
    for v in it.remainder() {
        m = m.max(*v);
    }
    let m = mx.iter().fold(m, |a, b| a.max(*b));
    if m == f32::NEG_INFINITY {
        return (m, 0.0);
    }
    (m, exp_sum(s, m))
}

/// `s[j] = e^(s[j] − m)` in place; returns `Σ s[j]` (inlined into the
/// multiversioned kernels that call it).
#[inline(always)]
fn exp_sum(s: &mut [f32], m: f32) -> f32 {
    let mut acc = [0f32; LANES];
    let mut it = s.chunks_exact_mut(LANES);
    for c in &mut it {
        for l in 0..LANES {
            let e = exp_f32(c[l] - m);
            c[l] = e;
            acc[l] += e;
        }
    }
    let mut tail = 0f32;
    for v in it.into_remainder() {
        let e = exp_f32(*v - m);
        *v = e;
        tail += e;
    }
    acc.iter().sum::<f32>() + tail
}

multiversion! {
    /// Softmax cross-entropy of one row of logits `x` against class `y`:
    /// writes `d = (softmax(x) - onehot(y)) · scale` and returns the loss
    /// `logsumexp(x) - x[y]` (one exponential per element).
    pub fn xent_row(x: &[f32], d: &mut [f32], y: usize, scale: f32) -> f32 {
        let d = &mut d[..x.len()];
        d.copy_from_slice(x);
        let (m, sum) = exp_shifted(d);
        let k = scale / sum;
        for v in d.iter_mut() {
            *v *= k;
        }
        d[y] -= scale;
        m + sum.ln() - x[y]
    }
}

multiversion! {
    /// `s[j] = e^(s[j] − m)` in place (−∞ entries become 0); returns
    /// `Σ s[j]`.
    pub fn exp_sum_row(s: &mut [f32], m: f32) -> f32 {
        exp_sum(s, m)
    }
}

multiversion! {
    /// Multiply probabilities by the attention-dropout weights in place.
    pub fn attn_drop_row(p: &mut [f32], seed: u64, first: u32, pd: f32) {
        let inv = (1.0 / (1.0 - pd as f64)) as f32;
        for (j, v) in p.iter_mut().enumerate() {
            let w = if keep(seed, first.wrapping_add(j as u32), pd) { inv } else { 0.0 };
            *v *= w;
        }
    }
}

multiversion! {
    /// `Σ a[i]·b[i]`.
    pub fn dot(a: &[f32], b: &[f32]) -> f32 {
        let mut acc = [0f32; LANES];
        let n = a.len().min(b.len());
        let full = n / LANES * LANES;
        for c0 in (0..full).step_by(LANES) {
            for l in 0..LANES {
                acc[l] += a[c0 + l] * b[c0 + l];
            }
        }
        let mut s = 0f32;
        for i in full..n {
            s += a[i] * b[i];
        }
        acc.iter().sum::<f32>() + s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_matches_std() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let want = (x as f64).exp();
            let got = exp_f32(x) as f64;
            worst = worst.max(((got - want) / want).abs());
            x += 0.0137;
        }
        assert!(worst < 3e-7, "exp worst relative error {worst}");
        assert_eq!(exp_f32(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_f32(-200.0), 0.0);
    }

    #[test]
    fn gelu_matches_erf() {
        let mut worst = 0f64;
        let mut x = -9.0f32;
        while x < 9.0 {
            let xd = x as f64;
            // erfc, not 1 + erf: the latter cancels to 0 in f64 below x ≈ -8.
            let want = 0.5 * xd * libm::erfc(-xd / std::f64::consts::SQRT_2);
            let got = gelu(x) as f64;
            if want.abs() > 1e-30 {
                worst = worst.max(((got - want) / want).abs());
            }
            x += 0.00731;
        }
        // In the far tail e^{-z²} amplifies the f32 rounding of z² (≈ z²·6e-8).
        assert!(worst < 1e-5, "gelu worst relative error {worst}");
    }
}
