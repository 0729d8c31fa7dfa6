//! The attention forward pass on AVX-512 register tiles, for the fast CPU
//! backend ([`super::attn`] has the same pass on small GEMMs).
//!
//! One task per (sequence, key/value head): the head's keys are transposed
//! once (`Kᵀ`, `head_dim × kv_seq`, zero-padded to whole vectors), then for
//! each of its query heads and blocks of [`QB`] queries:
//!
//! 1. scores `scale·q·kᵀ` plus the mask (0 or −∞), three query rows by up
//!    to 128 keys at a time in 24 accumulators, each row's running maximum
//!    kept in registers;
//! 2. `p = e^(s − max)` and its sum, in place (the log-sum-exp is `max +
//!    ln Σ`), and the dropout's weights when training;
//! 3. `out = (p·v) / Σ`, up to twelve query rows by the whole head at a
//!    time: the probabilities are normalised on the head's `head_dim`
//!    outputs instead of the `kv_seq` scores.
//!
//! Against the GEMM path this skips packing for every small product, the
//! separate mask and maximum passes of the softmax, and its normalising
//! pass. Head dims that are whole vectors up to 128 only (32, 64, 128:
//! every model here); others take the GEMM path.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;
use std::cell::RefCell;
use std::sync::OnceLock;

use rayon::prelude::*;

use super::attn::{keys_seen, lim, C, P, QB};
// Scratch on 64-byte boundaries: the score tiles are 26 % faster on
// aligned keys.
use super::gemm16::aligned;
use super::kernels;
use crate::backend::cpu::attn_dropout_index;
use crate::backend::{AttnDims, Dropout};

/// A task's working set, kept between calls on each thread.
#[derive(Default)]
struct Scratch {
    /// Kᵀ: `head_dim` rows of the padded key count.
    kt: Vec<f32>,
    /// The values, `[kv_seq][head_dim]` (contiguous rows).
    v: Vec<f32>,
    /// The block's scores, then probabilities.
    s: Vec<f32>,
    /// The mask as an additive row.
    bias: Vec<f32>,
}

/// The backward's working set, kept between calls on each thread.
#[derive(Default)]
struct BwdScratch {
    /// Kᵀ and Vᵀ: `head_dim` rows of the padded key count.
    kt: Vec<f32>,
    vt: Vec<f32>,
    /// The keys, `[seq][head_dim]`.
    k: Vec<f32>,
    /// The block's scores (then probabilities) and `dO·Vᵀ` (then `dS`).
    s: Vec<f32>,
    dp: Vec<f32>,
    /// The task's sums of dK and dV, `[seq][head_dim]`.
    dk: Vec<f32>,
    dv: Vec<f32>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
    static BWD: RefCell<BwdScratch> = RefCell::new(BwdScratch::default());
}

/// Whether [`forward`] takes these dims: AVX-512 (and `BEFT_NO_AVX512`
/// unset), a head dim of whole vectors up to 128, and at least 16 queries
/// (fewer, as in generation's one query a step, would not pay for the
/// transpose of the keys); and `BEFT_CPU_ATTN` is not `gemm` (which keeps
/// attention on the GEMM path, for comparisons).
pub fn handles(dims: &AttnDims) -> bool {
    static GEMM: OnceLock<bool> = OnceLock::new();
    let gemm =
        *GEMM.get_or_init(|| std::env::var("BEFT_CPU_ATTN").is_ok_and(|v| v.trim() == "gemm"));
    cfg!(target_arch = "x86_64")
        && !gemm
        && kernels::simd_level() == 2
        && dims.head_dim > 0
        && dims.head_dim.is_multiple_of(16)
        && dims.head_dim <= 128
        && dims.seq >= 16
}

/// Forward: `out` `[b, seq, heads, dh]`, `lse` `[b, heads, seq]`, as
/// [`super::attn::forward`].
///
/// # Panics
/// When [`handles`] is false for `dims`.
#[allow(clippy::too_many_arguments)]
pub fn forward(
    out: &mut [f32],
    lse: &mut [f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    mask: &[f32],
    dims: AttnDims,
    dropout: Option<Dropout>,
) {
    assert!(
        handles(&dims),
        "attention on AVX-512 tiles: unsupported dims"
    );
    let (nb, t, tk, nh, nkv, dh) = super::attn::fwd_dims(out, lse, q, k, v, mask, &dims);
    let group = nh / nkv;
    let (qs, ks) = (nh * dh, nkv * dh);
    // Keys padded to whole vectors: the row stride of Kᵀ and of the scores.
    let tp = tk.next_multiple_of(16);
    let (op, lp) = (P(out.as_mut_ptr()), P(lse.as_mut_ptr()));
    let (qp, kp, vp) = (C(q.as_ptr()), C(k.as_ptr()), C(v.as_ptr()));
    (0..nb * nkv).into_par_iter().for_each(|task| {
        let (op, lp, qp, kp, vp) = (op, lp, qp, kp, vp);
        let (b, kh) = (task / nkv, task % nkv);
        SCRATCH.with(|sc| {
            let mut sc = sc.borrow_mut();
            let Scratch { kt, v: vc, s, bias } = &mut *sc;
            let (kt, vc, s) = (
                aligned(kt, dh * tp),
                aligned(vc, tk * dh),
                aligned(s, QB * tp),
            );
            // The mask as an additive row: 0 (visible) or −∞, −∞ past tk.
            bias.clear();
            bias.extend(mask[b * tk..(b + 1) * tk].iter().map(|&m| {
                if m > 0.0 {
                    0.0
                } else {
                    f32::NEG_INFINITY
                }
            }));
            bias.resize(tp, f32::NEG_INFINITY);
            // SAFETY: the shapes are asserted above: key and value rows of
            // sequence b (tk of them, stride ks) hold this head's dh values
            // from kh·dh; AVX-512 (handles).
            #[cfg(target_arch = "x86_64")]
            unsafe {
                transpose_keys(kt, kp.0.add(b * tk * ks + kh * dh), ks, tk, dh, tp);
                gather_rows(vc, vp.0.add(b * tk * ks + kh * dh), ks, dh);
            }
            for h in kh * group..(kh + 1) * group {
                for i0 in (0..t).step_by(QB) {
                    let mq = QB.min(t - i0);
                    // Keys this block can see: causal queries stop at their
                    // own position.
                    let te = if dims.causal {
                        tk.min(dims.q_start + i0 + mq)
                    } else {
                        tk
                    };
                    let block = Block {
                        q: unsafe { qp.0.add((b * t + i0) * qs + h * dh) },
                        qs,
                        mq,
                        // The first query's position among the keys.
                        first: dims.causal.then_some(dims.q_start + i0),
                        te,
                    };
                    // SAFETY: x86-64 with AVX-512 (handles); this task alone
                    // writes rows i0..i0+mq, columns h·dh.. of `out` and its
                    // lse entries; every pointer is in bounds (asserted).
                    #[cfg(target_arch = "x86_64")]
                    unsafe {
                        let mut mx = [f32::NEG_INFINITY; QB];
                        let keys = Keys {
                            kt,
                            tp,
                            dh,
                            bias: Some(bias),
                            scale: dims.scale as f32,
                        };
                        scores(&block, &keys, s, &mut mx);
                        let mut inv = [0f32; QB];
                        for r in 0..mq {
                            let i = i0 + r;
                            let row = &mut s[r * tp..r * tp + te];
                            let l = if mx[r] == f32::NEG_INFINITY {
                                // No visible key: probabilities and output 0.
                                row.fill(0.0);
                                f32::NEG_INFINITY
                            } else {
                                let sum = kernels::exp_sum_row(row, mx[r]);
                                inv[r] = 1.0 / sum;
                                if let Some(dr) = dropout {
                                    let first = attn_dropout_index(&dims, b, h, i, 0);
                                    kernels::attn_drop_row(row, dr.seed, first, dr.p);
                                }
                                mx[r] + sum.ln()
                            };
                            *lp.0.add((b * nh + h) * t + i) = l;
                        }
                        let o = op.0.add((b * t + i0) * qs + h * dh);
                        weighted_values(o, qs, s, tp, te, mq, vc.as_ptr(), dh, dh, &inv);
                    }
                    #[cfg(not(target_arch = "x86_64"))]
                    let _ = block;
                }
            }
        });
    });
}

/// Backward, as [`super::attn::backward`] (training shape: `kv_seq ==
/// seq`, `q_start == 0`), overwriting dq, dk, dv. Per (sequence, kv head):
/// `Kᵀ`, `Vᵀ` and K packed once; per query head and block, the scores
/// `S` and `dP = dO·Vᵀ` on the register tiles of the forward, the
/// probabilities and `dS` row by row (as the GEMM path), then `dV += P̃ᵀ·dO`
/// and `dK += dSᵀ·Q` into the task's sums, and `dQ = dS·K`.
///
/// # Panics
/// When [`handles`] is false for `dims`, or as the GEMM path.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
    dout: &[f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &[f32],
    lse: &[f32],
    mask: &[f32],
    dims: AttnDims,
    dropout: Option<Dropout>,
) {
    assert!(
        handles(&dims),
        "attention on AVX-512 tiles: unsupported dims"
    );
    let (nb, t, nh, nkv, dh) =
        super::attn::bwd_dims((dq, dk, dv), dout, q, k, v, out, lse, mask, &dims);
    let group = nh / nkv;
    let (qs, ks) = (nh * dh, nkv * dh);
    let tp = t.next_multiple_of(16);
    let scale = dims.scale as f32;
    let (dqp, dkp, dvp) = (P(dq.as_mut_ptr()), P(dk.as_mut_ptr()), P(dv.as_mut_ptr()));
    let (qp, kp, vp, dop) = (
        C(q.as_ptr()),
        C(k.as_ptr()),
        C(v.as_ptr()),
        C(dout.as_ptr()),
    );
    (0..nb * nkv).into_par_iter().for_each(|task| {
        let (dqp, dkp, dvp, qp, kp, vp, dop) = (dqp, dkp, dvp, qp, kp, vp, dop);
        let (b, kh) = (task / nkv, task % nkv);
        let mrow = &mask[b * t..(b + 1) * t];
        BWD.with(|sc| {
            let mut sc = sc.borrow_mut();
            let BwdScratch {
                kt,
                vt,
                k: kr,
                s,
                dp,
                dk: dks,
                dv: dvs,
            } = &mut *sc;
            let (kt, vt, kr) = (
                aligned(kt, dh * tp),
                aligned(vt, dh * tp),
                aligned(kr, t * dh),
            );
            let (s, dp) = (aligned(s, QB * tp), aligned(dp, QB * tp));
            let (dks, dvs) = (aligned(dks, t * dh), aligned(dvs, t * dh));
            dks.fill(0.0);
            dvs.fill(0.0);
            let kvb = b * t * ks + kh * dh;
            // SAFETY (whole task): x86-64 with AVX-512 (handles); every
            // pointer is in bounds (bwd_dims). This task alone writes dk and
            // dv rows of sequence b at columns kh·dh.., and the dq rows of
            // sequence b at its query heads' columns.
            #[cfg(target_arch = "x86_64")]
            unsafe {
                transpose_keys(kt, kp.0.add(kvb), ks, t, dh, tp);
                transpose_keys(vt, vp.0.add(kvb), ks, t, dh, tp);
                gather_rows(kr, kp.0.add(kvb), ks, dh);
                let mut mx = [0f32; QB];
                let ones = [1f32; QB];
                for h in kh * group..(kh + 1) * group {
                    for i0 in (0..t).step_by(QB) {
                        let mq = QB.min(t - i0);
                        let te = keys_seen(&dims, i0 + mq, t);
                        let qrow = (b * t + i0) * qs + h * dh;
                        let rows = |p: C, te| Block {
                            q: p.0.add(qrow),
                            qs,
                            mq,
                            first: None,
                            te,
                        };
                        let plain = |kt| Keys {
                            kt,
                            tp,
                            dh,
                            bias: None,
                            scale,
                        };
                        // S = scale·Q·Kᵀ, dP = dO·Vᵀ.
                        scores(&rows(qp, te), &plain(kt), s, &mut mx);
                        let vkeys = Keys {
                            scale: 1.0,
                            ..plain(vt)
                        };
                        scores(&rows(dop, te), &vkeys, dp, &mut mx);
                        for r in 0..mq {
                            let i = i0 + r;
                            let l = lse[(b * nh + h) * t + i];
                            let srow = &mut s[r * tp..r * tp + te];
                            let dprow = &mut dp[r * tp..r * tp + te];
                            if l == f32::NEG_INFINITY {
                                srow.fill(0.0);
                                dprow.fill(0.0);
                                continue;
                            }
                            let o = (b * t + i) * qs + h * dh;
                            let d = head_dot(dout[o..].as_ptr(), out[o..].as_ptr(), dh);
                            let drop = dropout
                                .map(|dr| (dr.seed, attn_dropout_index(&dims, b, h, i, 0), dr.p));
                            let lm = lim(&dims, i);
                            kernels::attn_bwd_row(srow, dprow, mrow, lm, l, d, scale, drop);
                        }
                        // dV += P̃ᵀ·dO, dK += dSᵀ·Q, dQ = dS·K.
                        let tn = |a: &[f32], x: C, acc: &mut [f32]| {
                            transposed_sum(acc, dh, a, tp, te, x.0.add(qrow), qs, mq)
                        };
                        tn(s, dop, dvs);
                        tn(dp, qp, dks);
                        let dqo = dqp.0.add(qrow);
                        weighted_values(dqo, qs, dp, tp, te, mq, kr.as_ptr(), dh, dh, &ones);
                    }
                }
                for j in 0..t {
                    let o = (b * t + j) * ks + kh * dh;
                    let src = j * dh;
                    std::ptr::copy_nonoverlapping(dks[src..].as_ptr(), dkp.0.add(o), dh);
                    std::ptr::copy_nonoverlapping(dvs[src..].as_ptr(), dvp.0.add(o), dh);
                }
            }
        });
    });
}

/// `Σ a[c]·b[c]` over a head's `dh` values (whole vectors).
///
/// # Safety
/// AVX-512; `a` and `b` hold `dh` values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn head_dot(a: *const f32, b: *const f32, dh: usize) -> f32 {
    let mut acc = _mm512_setzero_ps();
    for c in (0..dh).step_by(16) {
        acc = _mm512_fmadd_ps(_mm512_loadu_ps(a.add(c)), _mm512_loadu_ps(b.add(c)), acc);
    }
    _mm512_reduce_add_ps(acc)
}

/// `acc[j] += Σ_r a[r][j]·x[r]` for keys `j < te` (`acc` rows of `dh`,
/// `a` rows of stride `tp`, `x` the block's `mq` rows at stride `ldx`).
///
/// # Safety
/// AVX-512; `x` holds `mq` rows of `dh` values at stride `ldx`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn transposed_sum(
    acc: &mut [f32],
    dh: usize,
    a: &[f32],
    tp: usize,
    te: usize,
    x: *const f32,
    ldx: usize,
    mq: usize,
) {
    debug_assert!(acc.len() >= te * dh && a.len() >= mq * tp && te <= tp);
    let args = Tn {
        acc: acc.as_mut_ptr(),
        dh,
        a: a.as_ptr(),
        tp,
        te,
        x,
        ldx,
        mq,
    };
    match dh / 16 {
        1 => tn_rows::<1, 12>(&args),
        2 => tn_rows::<2, 12>(&args),
        3 => tn_rows::<3, 8>(&args),
        4 => tn_rows::<4, 6>(&args),
        5 => tn_rows::<5, 4>(&args),
        6 => tn_rows::<6, 4>(&args),
        7 => tn_rows::<7, 3>(&args),
        _ => tn_rows::<8, 3>(&args),
    }
}

/// What [`tn_rows`] sums.
struct Tn {
    acc: *mut f32,
    dh: usize,
    a: *const f32,
    tp: usize,
    te: usize,
    x: *const f32,
    ldx: usize,
    mq: usize,
}

/// [`transposed_sum`] for a head of `ND` vectors, `R` keys at a time.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn tn_rows<const ND: usize, const R: usize>(t: &Tn) {
    for j0 in (0..t.te).step_by(R) {
        let rows = R.min(t.te - j0);
        let mut acc = [[_mm512_setzero_ps(); ND]; R];
        for r in 0..t.mq {
            let xr = t.x.add(r * t.ldx);
            let mut xv = [_mm512_setzero_ps(); ND];
            for (c, v) in xv.iter_mut().enumerate() {
                *v = _mm512_loadu_ps(xr.add(c * 16));
            }
            // Keys past te repeat the first (computed, never stored).
            let ar = t.a.add(r * t.tp + j0);
            for (jj, row) in acc.iter_mut().enumerate() {
                let w = _mm512_set1_ps(*ar.add(if jj < rows { jj } else { 0 }));
                for c in 0..ND {
                    row[c] = _mm512_fmadd_ps(w, xv[c], row[c]);
                }
            }
        }
        for (jj, row) in acc.iter().enumerate().take(rows) {
            let o = t.acc.add((j0 + jj) * t.dh);
            for (c, v) in row.iter().enumerate() {
                let p = o.add(c * 16);
                _mm512_storeu_ps(p, _mm512_add_ps(_mm512_loadu_ps(p), *v));
            }
        }
    }
}

/// `dst`'s rows of `dh` values from rows of `src` at stride `ks` (one
/// head's columns of an interleaved `[seq, heads, dh]` buffer).
///
/// # Safety
/// `src` holds `dst.len() / dh` rows at stride `ks`, each `dh` long.
#[cfg(target_arch = "x86_64")]
unsafe fn gather_rows(dst: &mut [f32], src: *const f32, ks: usize, dh: usize) {
    for (j, row) in dst.chunks_exact_mut(dh).enumerate() {
        std::ptr::copy_nonoverlapping(src.add(j * ks), row.as_mut_ptr(), dh);
    }
}

/// `kt[p·tp + j] = k[j·ks + p]` for `tk` keys of `dh` values (`dh` a
/// multiple of 16), zero for keys `tk..tp`: 16 × 16 blocks through
/// registers.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn transpose_keys(
    kt: &mut [f32],
    k: *const f32,
    ks: usize,
    tk: usize,
    dh: usize,
    tp: usize,
) {
    debug_assert!(kt.len() >= dh * tp && tp >= tk.next_multiple_of(16));
    for j0 in (0..tp).step_by(16) {
        for p0 in (0..dh).step_by(16) {
            let mut r = [_mm512_setzero_si512(); 16];
            for (i, x) in r.iter_mut().enumerate() {
                if j0 + i < tk {
                    *x = _mm512_loadu_si512(k.add((j0 + i) * ks + p0) as *const _);
                }
            }
            super::gemm16::transpose16(&mut r);
            for (i, x) in r.iter().enumerate() {
                _mm512_storeu_si512(kt.as_mut_ptr().add((p0 + i) * tp + j0) as *mut _, *x);
            }
        }
    }
}

/// A block of queries: `mq` rows of q from `q` (row stride `qs`), seeing
/// keys `0..te`; `first`: under a causal mask, the first query's position.
struct Block {
    q: *const f32,
    qs: usize,
    mq: usize,
    first: Option<usize>,
    te: usize,
}

/// The block's masked, scaled scores into `s` (row stride `tp`, whole
/// vectors up to `te`), each row's maximum into `mx`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn scores(blk: &Block, keys: &Keys, s: &mut [f32], mx: &mut [f32; QB]) {
    let nv = blk.te.div_ceil(16);
    for r0 in (0..blk.mq).step_by(3) {
        let rows = 3.min(blk.mq - r0);
        for c0 in (0..nv).step_by(8) {
            let tile = Tile {
                r0,
                rows,
                j0: c0 * 16,
            };
            match nv - c0 {
                1 => score_tile::<1>(blk, &tile, keys, s, mx),
                2 => score_tile::<2>(blk, &tile, keys, s, mx),
                3 => score_tile::<3>(blk, &tile, keys, s, mx),
                4 => score_tile::<4>(blk, &tile, keys, s, mx),
                5 => score_tile::<5>(blk, &tile, keys, s, mx),
                6 => score_tile::<6>(blk, &tile, keys, s, mx),
                7 => score_tile::<7>(blk, &tile, keys, s, mx),
                _ => score_tile::<8>(blk, &tile, keys, s, mx),
            }
        }
    }
}

/// The keys of a (sequence, kv head): `Kᵀ` (`dh` rows of stride `tp`),
/// the mask as an additive row (`None`: plain products, no mask and no
/// row maximum), and the scores' scale.
#[derive(Clone, Copy)]
struct Keys<'a> {
    kt: &'a [f32],
    tp: usize,
    dh: usize,
    bias: Option<&'a [f32]>,
    scale: f32,
}

/// Query rows `r0..r0+rows` (≤ 3) of a block by keys `j0..` (NV vectors).
struct Tile {
    r0: usize,
    rows: usize,
    j0: usize,
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn score_tile<const NV: usize>(
    blk: &Block,
    t: &Tile,
    keys: &Keys,
    s: &mut [f32],
    mx: &mut [f32; QB],
) {
    let Keys {
        kt,
        tp,
        dh,
        bias,
        scale,
    } = *keys;
    debug_assert!(kt.len() >= dh * tp && t.j0 + NV * 16 <= tp && s.len() >= (t.r0 + t.rows) * tp);
    // Rows past the block's repeat its first (computed, never stored).
    let qrow = |r: usize| blk.q.add((t.r0 + if r < t.rows { r } else { 0 }) * blk.qs);
    let q = [qrow(0), qrow(1), qrow(2)];
    let mut acc = [[_mm512_setzero_ps(); NV]; 3];
    let k0 = kt.as_ptr().add(t.j0);
    // 24 accumulators, 3 broadcasts and one vector of keys at a time: 28
    // of the 32 registers (holding all NV key vectors would spill).
    for p in 0..dh {
        let kr = k0.add(p * tp);
        let qb = [
            _mm512_set1_ps(*q[0].add(p)),
            _mm512_set1_ps(*q[1].add(p)),
            _mm512_set1_ps(*q[2].add(p)),
        ];
        for c in 0..NV {
            let kv = _mm512_loadu_ps(kr.add(c * 16));
            for r in 0..3 {
                acc[r][c] = _mm512_fmadd_ps(qb[r], kv, acc[r][c]);
            }
        }
    }
    let vs = _mm512_set1_ps(scale);
    let ninf = _mm512_set1_ps(f32::NEG_INFINITY);
    let lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    for r in 0..t.rows {
        let i = t.r0 + r;
        let out = s.as_mut_ptr().add(i * tp + t.j0);
        let Some(bias) = bias else {
            for c in 0..NV {
                _mm512_storeu_ps(out.add(c * 16), _mm512_mul_ps(acc[r][c], vs));
            }
            continue;
        };
        let mut m = _mm512_set1_ps(mx[i]);
        for c in 0..NV {
            let j = t.j0 + c * 16;
            let mut x = _mm512_fmadd_ps(acc[r][c], vs, _mm512_loadu_ps(bias.as_ptr().add(j)));
            if let Some(first) = blk.first {
                // Keys after the query's own position are hidden.
                let idx = _mm512_add_epi32(_mm512_set1_epi32(j as i32), lanes);
                let lim = _mm512_set1_epi32((first + i) as i32);
                let seen = _mm512_cmple_epi32_mask(idx, lim);
                x = _mm512_mask_blend_ps(seen, ninf, x);
            }
            _mm512_storeu_ps(out.add(c * 16), x);
            m = _mm512_max_ps(m, x);
        }
        mx[i] = _mm512_reduce_max_ps(m);
    }
}

/// `out[r] = (Σ_j s[r][j]·v[j]) · inv[r]` for the block's `mq` rows (row
/// stride `ldo`), keys `0..te` (value rows at stride `ldv`), `dh` columns.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn weighted_values(
    out: *mut f32,
    ldo: usize,
    s: &[f32],
    tp: usize,
    te: usize,
    mq: usize,
    v: *const f32,
    ldv: usize,
    dh: usize,
    inv: &[f32; QB],
) {
    let args = Pv {
        out,
        ldo,
        s: s.as_ptr(),
        tp,
        te,
        v,
        ldv,
    };
    match dh / 16 {
        1 => pv_rows::<1, 12>(&args, mq, inv),
        2 => pv_rows::<2, 12>(&args, mq, inv),
        3 => pv_rows::<3, 8>(&args, mq, inv),
        4 => pv_rows::<4, 6>(&args, mq, inv),
        5 => pv_rows::<5, 4>(&args, mq, inv),
        6 => pv_rows::<6, 4>(&args, mq, inv),
        7 => pv_rows::<7, 3>(&args, mq, inv),
        _ => pv_rows::<8, 3>(&args, mq, inv),
    }
}

/// What [`pv_rows`] multiplies.
struct Pv {
    out: *mut f32,
    ldo: usize,
    s: *const f32,
    tp: usize,
    te: usize,
    v: *const f32,
    ldv: usize,
}

/// [`weighted_values`] for a head of `ND` vectors, `R` rows at a time.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn pv_rows<const ND: usize, const R: usize>(a: &Pv, mq: usize, inv: &[f32; QB]) {
    for r0 in (0..mq).step_by(R) {
        let rows = R.min(mq - r0);
        // Rows past the block's repeat its first (computed, never stored).
        let mut sr = [a.s; R];
        for (r, p) in sr.iter_mut().enumerate() {
            *p = a.s.add((r0 + if r < rows { r } else { 0 }) * a.tp);
        }
        let mut acc = [[_mm512_setzero_ps(); ND]; R];
        for j in 0..a.te {
            let vr = a.v.add(j * a.ldv);
            let mut vv = [_mm512_setzero_ps(); ND];
            for (c, x) in vv.iter_mut().enumerate() {
                *x = _mm512_loadu_ps(vr.add(c * 16));
            }
            for r in 0..R {
                let pb = _mm512_set1_ps(*sr[r].add(j));
                for c in 0..ND {
                    acc[r][c] = _mm512_fmadd_ps(pb, vv[c], acc[r][c]);
                }
            }
        }
        for r in 0..rows {
            let o = a.out.add((r0 + r) * a.ldo);
            let w = _mm512_set1_ps(inv[r0 + r]);
            for c in 0..ND {
                _mm512_storeu_ps(o.add(c * 16), _mm512_mul_ps(acc[r][c], w));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    /// Whether the tiles run here (saying why not).
    fn here() -> bool {
        let ok = handles(&AttnDims::self_attn(1, 16, 1, 1, 32, false));
        if !ok {
            println!("skipped: this CPU has no AVX-512 (or BEFT_NO_AVX512 is set)");
        }
        ok
    }

    /// Padding at the end of each of `nb` sequences of `tk` keys (3 more
    /// per sequence); with three sequences the last sees nothing at all.
    fn padded(nb: usize, tk: usize) -> Vec<f32> {
        let mut mask = vec![1f32; nb * tk];
        for b in 0..nb {
            let pad = if nb == 3 && b == 2 { tk } else { b * 3 };
            for j in tk - pad..tk {
                mask[b * tk + j] = 0.0;
            }
        }
        mask
    }

    /// Against the GEMM path on fresh random inputs, outputs poisoned:
    /// ragged blocks (seq not a multiple of 3, 12 or `QB`), every head dim
    /// of whole vectors, grouped-query heads, padding masks, a sequence
    /// with no visible key, causal masks with and without a KV-cache
    /// offset, and dropout.
    #[test]
    fn matches_the_gemm_path() {
        if !here() {
            return;
        }
        let mut rng = Rng::new(3);
        // (batch, seq, kv_seq, heads, kv_heads, head_dim, causal, q_start, dropout)
        let cases = [
            (2, 37, 37, 3, 3, 32, false, 0, None),
            (2, 70, 70, 4, 2, 64, true, 0, Some(0.1)),
            (1, 20, 50, 2, 1, 128, true, 30, None),
            (3, 16, 130, 2, 2, 48, false, 0, None),
            (1, 129, 129, 1, 1, 16, false, 0, Some(0.3)),
            (2, 65, 65, 6, 3, 96, true, 0, None),
        ];
        for (nb, t, tk, nh, nkv, dh, causal, q_start, p) in cases {
            let dims = AttnDims {
                batch: nb,
                seq: t,
                kv_seq: tk,
                q_start,
                heads: nh,
                kv_heads: nkv,
                head_dim: dh,
                scale: 1.0 / (dh as f64).sqrt(),
                causal,
            };
            assert!(handles(&dims));
            let mut r = |n: usize| {
                (0..n)
                    .map(|_| 2.0 * rng.normal() as f32)
                    .collect::<Vec<_>>()
            };
            let (q, k, v) = (
                r(nb * t * nh * dh),
                r(nb * tk * nkv * dh),
                r(nb * tk * nkv * dh),
            );
            let mask = padded(nb, tk);
            let drop = p.map(|p| Dropout { p, seed: 9 });
            let run = |f: fn(
                &mut [f32],
                &mut [f32],
                &[f32],
                &[f32],
                &[f32],
                &[f32],
                AttnDims,
                Option<Dropout>,
            )| {
                let (mut o, mut l) = (vec![f32::NAN; q.len()], vec![f32::NAN; nb * nh * t]);
                f(&mut o, &mut l, &q, &k, &v, &mask, dims, drop);
                (o, l)
            };
            let (o, l) = run(forward);
            let (wo, wl) = run(super::super::attn::forward_gemm);
            let what = format!(
                "{nb}x{t}x{tk} heads {nh}/{nkv} dh {dh} causal {causal} from {q_start} drop {p:?}"
            );
            for (i, (a, b)) in o.iter().zip(&wo).enumerate() {
                assert!(
                    (a - b).abs() <= 1e-5 * (1.0 + b.abs()),
                    "{what}: out[{i}] {a} vs {b}"
                );
            }
            for (i, (a, b)) in l.iter().zip(&wl).enumerate() {
                let ok = if b.is_finite() {
                    (a - b).abs() <= 1e-5 * (1.0 + b.abs())
                } else {
                    a == b
                };
                assert!(ok, "{what}: lse[{i}] {a} vs {b}");
            }
            if nb == 3 {
                assert!(
                    l[2 * nh * t..].iter().all(|x| *x == f32::NEG_INFINITY),
                    "{what}: lse of a sequence with no visible key"
                );
            }
        }
    }

    /// The backward against the GEMM path on training shapes, outputs
    /// poisoned: ragged blocks, every head dim of whole vectors, grouped-
    /// query heads, padding, a sequence with no visible key, causal masks
    /// and dropout.
    #[test]
    fn backward_matches_the_gemm_path() {
        if !here() {
            return;
        }
        let mut rng = Rng::new(8);
        // (batch, seq, heads, kv_heads, head_dim, causal, dropout)
        let cases = [
            (2, 37, 3, 3, 32, false, None),
            (2, 70, 4, 2, 64, true, Some(0.1)),
            (3, 16, 2, 2, 48, false, None),
            (1, 129, 1, 1, 16, false, Some(0.3)),
            (2, 65, 6, 3, 128, true, None),
        ];
        for (nb, t, nh, nkv, dh, causal, p) in cases {
            let dims = AttnDims::self_attn(nb, t, nh, nkv, dh, causal);
            assert!(handles(&dims));
            let mut r = |n: usize| (0..n).map(|_| rng.normal() as f32).collect::<Vec<_>>();
            let (nq, nk) = (nb * t * nh * dh, nb * t * nkv * dh);
            let (q, k, v, dout) = (r(nq), r(nk), r(nk), r(nq));
            let mask = padded(nb, t);
            let drop = p.map(|p| Dropout { p, seed: 4 });
            let (mut out, mut lse) = (vec![0f32; nq], vec![0f32; nb * nh * t]);
            super::super::attn::forward_gemm(&mut out, &mut lse, &q, &k, &v, &mask, dims, drop);
            type Bwd = fn(
                &mut [f32],
                &mut [f32],
                &mut [f32],
                &[f32],
                &[f32],
                &[f32],
                &[f32],
                &[f32],
                &[f32],
                &[f32],
                AttnDims,
                Option<Dropout>,
            );
            let run = |f: Bwd| {
                let (mut dq, mut dk, mut dv) =
                    (vec![f32::NAN; nq], vec![f32::NAN; nk], vec![f32::NAN; nk]);
                f(
                    &mut dq, &mut dk, &mut dv, &dout, &q, &k, &v, &out, &lse, &mask, dims, drop,
                );
                (dq, dk, dv)
            };
            let got = run(backward);
            let want = run(super::super::attn::backward_gemm);
            let what = format!("{nb}x{t} heads {nh}/{nkv} dh {dh} causal {causal} drop {p:?}");
            for (name, a, b) in [
                ("dq", &got.0, &want.0),
                ("dk", &got.1, &want.1),
                ("dv", &got.2, &want.2),
            ] {
                let big = b.iter().fold(0f32, |m, x| m.max(x.abs()));
                assert!(big > 0.0, "{what}: {name} all zero");
                for (i, (x, y)) in a.iter().zip(b.iter()).enumerate() {
                    assert!(
                        (x - y).abs() <= 1e-5 * (big + y.abs()),
                        "{what}: {name}[{i}] {x} vs {y}"
                    );
                }
            }
        }
    }
}
