//! Fused softmax attention for the fast CPU backend.
//!
//! One task per (sequence, head) and block of at most [`QB`] queries: the
//! scores of that block (`QB × kv_seq`) are the only ones ever held, built
//! with one small GEMM (`Q_blk·Kᵀ`), turned into probabilities in place by
//! a vectorised softmax, and consumed by a second GEMM (`P·V`). The backward
//! pass recomputes them from the saved log-sum-exp (flash-style) and runs
//! four GEMMs per block: `dV += P̃ᵀ·dO`, `dP = dO·Vᵀ`, `dQ = dS·K`,
//! `dK += dSᵀ·Q`.

use std::cell::RefCell;

use rayon::prelude::*;

use super::kernels;
use super::sgemm;
use crate::backend::cpu::attn_dropout_index;
use crate::backend::{AttnDims, Dropout};

/// Queries per block.
pub const QB: usize = 64;

thread_local! {
    static SCRATCH: RefCell<(Vec<f32>, Vec<f32>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

/// An output's pointer, shared by the tasks (each writes its own part).
#[derive(Clone, Copy)]
pub(super) struct P(pub(super) *mut f32);
unsafe impl Send for P {}
unsafe impl Sync for P {}

/// An input's pointer, shared by the tasks.
#[derive(Clone, Copy)]
pub(super) struct C(pub(super) *const f32);
unsafe impl Send for C {}
unsafe impl Sync for C {}

pub(super) fn lim(dims: &AttnDims, i: usize) -> usize {
    if dims.causal {
        dims.q_start + i
    } else {
        usize::MAX
    }
}

/// Keys a block of queries ending (exclusive) at query `end` can see: all
/// `n`, or under a causal mask only those up to the last query's position.
pub(super) fn keys_seen(dims: &AttnDims, end: usize, n: usize) -> usize {
    if dims.causal {
        n.min(dims.q_start + end)
    } else {
        n
    }
}

/// Forward: `out` `[b, seq, heads, dh]`, `lse` `[b, heads, seq]`: on
/// AVX-512 register tiles where [`super::attn512::handles`] the dims,
/// else [`forward_gemm`].
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
    if super::attn512::handles(&dims) {
        super::attn512::forward(out, lse, q, k, v, mask, dims, dropout)
    } else {
        forward_gemm(out, lse, q, k, v, mask, dims, dropout)
    }
}

/// The forward's dims `(batch, seq, kv_seq, heads, kv_heads, head_dim)`
/// once every slice is checked against them.
///
/// # Panics
/// When a slice is too short.
#[allow(clippy::too_many_arguments)]
pub(super) fn fwd_dims(
    out: &[f32],
    lse: &[f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    mask: &[f32],
    dims: &AttnDims,
) -> (usize, usize, usize, usize, usize, usize) {
    let d = dims;
    let (nb, t, tk, nh, nkv, dh) = (d.batch, d.seq, d.kv_seq, d.heads, d.kv_heads, d.head_dim);
    let (qs, ks) = (nh * dh, nkv * dh);
    assert!(
        q.len() >= nb * t * qs
            && out.len() >= nb * t * qs
            && k.len() >= nb * tk * ks
            && v.len() >= nb * tk * ks
            && lse.len() >= nb * nh * t
            && mask.len() >= nb * tk,
        "attention_fwd shapes"
    );
    (nb, t, tk, nh, nkv, dh)
}

/// [`forward`] on small GEMMs, for any dims.
#[allow(clippy::too_many_arguments)]
pub fn forward_gemm(
    out: &mut [f32],
    lse: &mut [f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    mask: &[f32],
    dims: AttnDims,
    dropout: Option<Dropout>,
) {
    let (nb, t, tk, nh, nkv, dh) = fwd_dims(out, lse, q, k, v, mask, &dims);
    let group = nh / nkv;
    let (qs, ks) = (nh * dh, nkv * dh);
    let scale = dims.scale as f32;
    let nblk = t.div_ceil(QB);
    let (op, lp) = (P(out.as_mut_ptr()), P(lse.as_mut_ptr()));
    let (qp, kp, vp) = (C(q.as_ptr()), C(k.as_ptr()), C(v.as_ptr()));
    (0..nb * nh * nblk).into_par_iter().for_each(|task| {
        let (op, lp, qp, kp, vp) = (op, lp, qp, kp, vp);
        let blk = task % nblk;
        let h = (task / nblk) % nh;
        let b = task / (nblk * nh);
        let kh = h / group;
        let i0 = blk * QB;
        let mq = QB.min(t - i0);
        let mrow = &mask[b * tk..(b + 1) * tk];
        // Keys this block can see: causal queries stop at their own position.
        let te = keys_seen(&dims, i0 + mq, tk);
        SCRATCH.with(|sc| {
            let mut sc = sc.borrow_mut();
            let s = &mut sc.0;
            s.clear();
            s.resize(mq * te, 0.0);
            // SAFETY: all pointers are in bounds (asserted above); this task
            // writes only rows i0..i0+mq, columns h·dh..(h+1)·dh of out and
            // its own lse entries.
            unsafe {
                sgemm(
                    mq,
                    te,
                    dh,
                    s.as_mut_ptr(),
                    te as isize,
                    false,
                    qp.0.add((b * t + i0) * qs + h * dh),
                    qs as isize,
                    1,
                    kp.0.add(b * tk * ks + kh * dh),
                    1,
                    ks as isize,
                    scale,
                );
            }
            for r in 0..mq {
                let i = i0 + r;
                let row = &mut s[r * te..(r + 1) * te];
                let l = kernels::softmax_row(row, mrow, lim(&dims, i));
                if let Some(dr) = dropout {
                    if l != f32::NEG_INFINITY {
                        let first = attn_dropout_index(&dims, b, h, i, 0);
                        kernels::attn_drop_row(row, dr.seed, first, dr.p);
                    }
                }
                unsafe { *lp.0.add((b * nh + h) * t + i) = l };
            }
            unsafe {
                sgemm(
                    mq,
                    dh,
                    te,
                    op.0.add((b * t + i0) * qs + h * dh),
                    qs as isize,
                    false,
                    s.as_ptr(),
                    te as isize,
                    1,
                    vp.0.add(b * tk * ks + kh * dh),
                    ks as isize,
                    1,
                    1.0,
                );
            }
        });
    });
}

/// Backward (training shape: `kv_seq == seq`, `q_start == 0`); overwrites
/// dq, dk, dv: on AVX-512 register tiles where
/// [`super::attn512::handles`] the dims, else [`backward_gemm`].
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
    if super::attn512::handles(&dims) {
        super::attn512::backward(dq, dk, dv, dout, q, k, v, out, lse, mask, dims, dropout)
    } else {
        backward_gemm(dq, dk, dv, dout, q, k, v, out, lse, mask, dims, dropout)
    }
}

/// The backward's dims `(batch, seq, heads, kv_heads, head_dim)` once the
/// training shape and every slice are checked against them.
///
/// # Panics
/// When the dims are not a training shape or a slice is too short.
#[allow(clippy::too_many_arguments)]
pub(super) fn bwd_dims(
    (dq, dk, dv): (&[f32], &[f32], &[f32]),
    dout: &[f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &[f32],
    lse: &[f32],
    mask: &[f32],
    dims: &AttnDims,
) -> (usize, usize, usize, usize, usize) {
    let (nb, t, nh, nkv, dh) = (
        dims.batch,
        dims.seq,
        dims.heads,
        dims.kv_heads,
        dims.head_dim,
    );
    assert!(
        dims.kv_seq == t && dims.q_start == 0,
        "attention_bwd: training shape only"
    );
    let (qs, ks) = (nh * dh, nkv * dh);
    assert!(
        q.len() >= nb * t * qs
            && dq.len() >= nb * t * qs
            && dout.len() >= nb * t * qs
            && out.len() >= nb * t * qs
            && k.len() >= nb * t * ks
            && v.len() >= nb * t * ks
            && dk.len() >= nb * t * ks
            && dv.len() >= nb * t * ks
            && lse.len() >= nb * nh * t
            && mask.len() >= nb * t,
        "attention_bwd shapes"
    );
    (nb, t, nh, nkv, dh)
}

/// [`backward`] on small GEMMs, for any dims.
#[allow(clippy::too_many_arguments)]
pub fn backward_gemm(
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
    let (nb, t, nh, nkv, dh) = bwd_dims((dq, dk, dv), dout, q, k, v, out, lse, mask, &dims);
    let group = nh / nkv;
    let (qs, ks) = (nh * dh, nkv * dh);
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
        let b = task / nkv;
        let kh = task % nkv;
        let mrow = &mask[b * t..(b + 1) * t];
        // SAFETY (whole task): pointers are in bounds (asserted above). This
        // task owns columns kh·dh.. of dk/dv rows of sequence b, and the
        // columns of its query heads in dq rows of sequence b.
        unsafe {
            for j in 0..t {
                let o = (b * t + j) * ks + kh * dh;
                std::ptr::write_bytes(dkp.0.add(o), 0, dh);
                std::ptr::write_bytes(dvp.0.add(o), 0, dh);
            }
        }
        let kbase = b * t * ks + kh * dh;
        SCRATCH.with(|sc| {
            let mut sc = sc.borrow_mut();
            let (s, dp) = &mut *sc;
            for h in kh * group..(kh + 1) * group {
                for i0 in (0..t).step_by(QB) {
                    let mq = QB.min(t - i0);
                    let te = keys_seen(&dims, i0 + mq, t);
                    s.clear();
                    s.resize(mq * te, 0.0);
                    dp.clear();
                    dp.resize(mq * te, 0.0);
                    let qrow = (b * t + i0) * qs + h * dh;
                    unsafe {
                        // S = scale · Q_blk·Kᵀ
                        sgemm(
                            mq,
                            te,
                            dh,
                            s.as_mut_ptr(),
                            te as isize,
                            false,
                            qp.0.add(qrow),
                            qs as isize,
                            1,
                            kp.0.add(kbase),
                            1,
                            ks as isize,
                            scale,
                        );
                        // dP = dO_blk·Vᵀ
                        sgemm(
                            mq,
                            te,
                            dh,
                            dp.as_mut_ptr(),
                            te as isize,
                            false,
                            dop.0.add(qrow),
                            qs as isize,
                            1,
                            vp.0.add(kbase),
                            1,
                            ks as isize,
                            1.0,
                        );
                    }
                    for r in 0..mq {
                        let i = i0 + r;
                        let l = lse[(b * nh + h) * t + i];
                        let srow = &mut s[r * te..(r + 1) * te];
                        let dprow = &mut dp[r * te..(r + 1) * te];
                        if l == f32::NEG_INFINITY {
                            srow.fill(0.0);
                            dprow.fill(0.0);
                            continue;
                        }
                        let o = (b * t + i) * qs + h * dh;
                        let d = kernels::dot(&dout[o..o + dh], &out[o..o + dh]);
                        let drop = dropout
                            .map(|dr| (dr.seed, attn_dropout_index(&dims, b, h, i, 0), dr.p));
                        kernels::attn_bwd_row(srow, dprow, mrow, lim(&dims, i), l, d, scale, drop);
                    }
                    unsafe {
                        // dV += P̃ᵀ·dO_blk
                        sgemm(
                            te,
                            dh,
                            mq,
                            dvp.0.add(kbase),
                            ks as isize,
                            true,
                            s.as_ptr(),
                            1,
                            te as isize,
                            dop.0.add(qrow),
                            qs as isize,
                            1,
                            1.0,
                        );
                        // dQ_blk = dS·K
                        sgemm(
                            mq,
                            dh,
                            te,
                            dqp.0.add(qrow),
                            qs as isize,
                            false,
                            dp.as_ptr(),
                            te as isize,
                            1,
                            kp.0.add(kbase),
                            ks as isize,
                            1,
                            1.0,
                        );
                        // dK += dSᵀ·Q_blk
                        sgemm(
                            te,
                            dh,
                            mq,
                            dkp.0.add(kbase),
                            ks as isize,
                            true,
                            dp.as_ptr(),
                            1,
                            te as isize,
                            qp.0.add(qrow),
                            qs as isize,
                            1,
                            1.0,
                        );
                    }
                }
            }
        });
    });
}
