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

use super::attn::QB;
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

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

/// `len` values of `v` from a 64-byte boundary (grown as needed): a
/// vector load that straddles two cache lines costs two, and the score
/// tiles are 26 % faster on aligned keys.
fn lines(v: &mut Vec<f32>, len: usize) -> &mut [f32] {
    if v.len() < len + 16 {
        v.resize(len + 16, 0.0);
    }
    let off = v.as_ptr().align_offset(64).min(16);
    &mut v[off..off + len]
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

#[derive(Clone, Copy)]
struct P(*mut f32);
unsafe impl Send for P {}
unsafe impl Sync for P {}

#[derive(Clone, Copy)]
struct C(*const f32);
unsafe impl Send for C {}
unsafe impl Sync for C {}

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
            let (kt, vc, s) = (lines(kt, dh * tp), lines(vc, tk * dh), lines(s, QB * tp));
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
                let vbase = vp.0.add(b * tk * ks + kh * dh);
                for (j, row) in vc.chunks_exact_mut(dh).enumerate() {
                    std::ptr::copy_nonoverlapping(vbase.add(j * ks), row.as_mut_ptr(), dh);
                }
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
                            bias,
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
/// the mask as an additive row, and the scores' scale.
#[derive(Clone, Copy)]
struct Keys<'a> {
    kt: &'a [f32],
    tp: usize,
    dh: usize,
    bias: &'a [f32],
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

    /// Against the GEMM path on fresh random inputs, outputs poisoned:
    /// ragged blocks (seq not a multiple of 3, 12 or `QB`), every head dim
    /// of whole vectors, grouped-query heads, padding masks, a sequence
    /// with no visible key, causal masks with and without a KV-cache
    /// offset, and dropout.
    #[test]
    fn matches_the_gemm_path() {
        let here = AttnDims::self_attn(1, 16, 1, 1, 32, false);
        if !handles(&here) {
            println!("skipped: this CPU has no AVX-512 (or BEFT_NO_AVX512 is set)");
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
            // Padding at the end of each sequence; the last of three sees
            // nothing at all.
            let mut mask = vec![1f32; nb * tk];
            for b in 0..nb {
                let pad = if nb == 3 && b == 2 { tk } else { b * 3 };
                for j in tk - pad..tk {
                    mask[b * tk + j] = 0.0;
                }
            }
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
}
