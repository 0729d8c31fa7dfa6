//! The CPU backend: the reference oracle that every other backend is tested
//! against. Each op is a plain loop that mirrors its mathematical
//! definition; only the matrix product goes through an optimised GEMM
//! (`matrixmultiply`), split over row blocks on the rayon pool.
//!
//! The backend is generic over the element type: `CpuBackend<f32>` trains,
//! `CpuBackend<f64>` exists for finite-difference gradient checks.

use std::any::TypeId;
use std::borrow::Cow;
use std::marker::PhantomData;

use rayon::prelude::*;

use super::{dropout_keep, Act, AdamW, AttnDims, Backend, CandidateIndex, Dropout, PoolKind};
use crate::error::Result;
use crate::float::Float;
use crate::weights::{DType, TensorView};

/// A CPU buffer: owned values, or a frozen weight read in place from its
/// memory map (converted to `T` on use when its dtype differs).
#[derive(Clone, Debug)]
pub enum CpuBuf<T> {
    Owned(Vec<T>),
    Mapped(TensorView),
}

impl<T: Float> CpuBuf<T> {
    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            CpuBuf::Owned(v) => v.len(),
            CpuBuf::Mapped(t) => t.numel(),
        }
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The values as a slice: borrowed when possible (owned, or an aligned
    /// f32 tensor read as f32), converted otherwise.
    pub fn values(&self) -> Cow<'_, [T]> {
        match self {
            CpuBuf::Owned(v) => Cow::Borrowed(v),
            CpuBuf::Mapped(t) => {
                if TypeId::of::<T>() == TypeId::of::<f32>() {
                    if let Some(s) = t.as_f32_slice() {
                        // SAFETY: T is f32 (checked through TypeId above).
                        let s =
                            unsafe { std::slice::from_raw_parts(s.as_ptr() as *const T, s.len()) };
                        return Cow::Borrowed(s);
                    }
                }
                let mut tmp = vec![0f32; t.numel()];
                t.read_f32_into(0, &mut tmp);
                Cow::Owned(tmp.into_iter().map(T::from_f32).collect())
            }
        }
    }

    /// Elements `start..start+out.len()` into `out` (converting a mapped
    /// weight only where it is read: used for embedding-row gathers).
    pub fn read_into(&self, start: usize, out: &mut [T]) {
        match self {
            CpuBuf::Owned(v) => out.copy_from_slice(&v[start..start + out.len()]),
            CpuBuf::Mapped(t) => {
                if t.dtype == DType::F32 && TypeId::of::<T>() == TypeId::of::<f32>() {
                    if let Some(s) = t.as_f32_slice() {
                        let n = out.len();
                        for (o, x) in out.iter_mut().zip(&s[start..start + n]) {
                            *o = T::from_f32(*x);
                        }
                        return;
                    }
                }
                let mut tmp = vec![0f32; out.len()];
                t.read_f32_into(start, &mut tmp);
                for (o, x) in out.iter_mut().zip(tmp) {
                    *o = T::from_f32(x);
                }
            }
        }
    }

    /// Mutable access; frozen weights are never written (a bug if asked).
    pub fn slice_mut(&mut self) -> &mut [T] {
        match self {
            CpuBuf::Owned(v) => v,
            CpuBuf::Mapped(t) => {
                panic!("internal error: frozen weight {} used as an output", t.name)
            }
        }
    }

    /// Owned values (for tests and read-back).
    pub fn to_vec(&self) -> Vec<T> {
        self.values().into_owned()
    }
}

/// The CPU backend over element type `T`.
#[derive(Clone, Debug, Default)]
pub struct CpuBackend<T> {
    _t: PhantomData<T>,
}

impl<T: Float> CpuBackend<T> {
    pub fn new() -> Self {
        CpuBackend { _t: PhantomData }
    }
}

fn gelu_exact<T: Float>(x: T) -> T {
    let h = T::from_f64(0.5);
    h * x * (T::one() + (x * T::from_f64(std::f64::consts::FRAC_1_SQRT_2)).erf())
}

fn gelu_exact_grad<T: Float>(x: T) -> T {
    let h = T::from_f64(0.5);
    let cdf = h * (T::one() + (x * T::from_f64(std::f64::consts::FRAC_1_SQRT_2)).erf());
    let pdf = (-(x * x) * h).exp() * T::from_f64(1.0 / (2.0 * std::f64::consts::PI).sqrt());
    cdf + x * pdf
}

const GELU_C: f64 = 0.797_884_560_802_865_4; // sqrt(2/pi)

fn gelu_tanh<T: Float>(x: T) -> T {
    let inner = T::from_f64(GELU_C) * (x + T::from_f64(0.044715) * x * x * x);
    T::from_f64(0.5) * x * (T::one() + inner.tanh())
}

fn gelu_tanh_grad<T: Float>(x: T) -> T {
    let inner = T::from_f64(GELU_C) * (x + T::from_f64(0.044715) * x * x * x);
    let t = inner.tanh();
    let dinner = T::from_f64(GELU_C) * (T::one() + T::from_f64(3.0 * 0.044715) * x * x);
    T::from_f64(0.5) * (T::one() + t) + T::from_f64(0.5) * x * (T::one() - t * t) * dinner
}

fn sigmoid<T: Float>(x: T) -> T {
    T::one() / (T::one() + (-x).exp())
}

/// `act(x)`, shared with the tests' composed references.
pub fn act_value<T: Float>(act: Act, x: T) -> T {
    match act {
        Act::Gelu => gelu_exact(x),
        Act::GeluTanh => gelu_tanh(x),
        Act::Relu => {
            if x > T::zero() {
                x
            } else {
                T::zero()
            }
        }
        Act::Tanh => x.tanh(),
        Act::Silu => x * sigmoid(x),
    }
}

/// `act'(x)`.
pub fn act_grad<T: Float>(act: Act, x: T) -> T {
    match act {
        Act::Gelu => gelu_exact_grad(x),
        Act::GeluTanh => gelu_tanh_grad(x),
        Act::Relu => {
            if x > T::zero() {
                T::one()
            } else {
                T::zero()
            }
        }
        Act::Tanh => {
            let t = x.tanh();
            T::one() - t * t
        }
        Act::Silu => {
            let s = sigmoid(x);
            s * (T::one() + x * (T::one() - s))
        }
    }
}

/// Whether query `i` may attend to key `j` of sequence `b`.
#[inline]
fn visible<T: Float>(mask: &[T], dims: &AttnDims, b: usize, i: usize, j: usize) -> bool {
    mask[b * dims.kv_seq + j] > T::zero() && (!dims.causal || j <= dims.q_start + i)
}

/// Dropout index of score (b, h, i, j), shared by every backend.
#[inline]
pub fn attn_dropout_index(dims: &AttnDims, b: usize, h: usize, i: usize, j: usize) -> u32 {
    ((((b * dims.heads + h) * dims.seq + i) * dims.kv_seq) + j) as u32
}

impl<T: Float> Backend for CpuBackend<T> {
    type T = T;
    type Buf = CpuBuf<T>;
    type Ids = Vec<u32>;

    fn name(&self) -> String {
        format!(
            "cpu ({}-bit, {} threads)",
            T::BYTES * 8,
            rayon::current_num_threads()
        )
    }

    fn zeros(&self, n: usize) -> CpuBuf<T> {
        CpuBuf::Owned(vec![T::zero(); n])
    }

    fn upload(&self, data: &[T]) -> CpuBuf<T> {
        CpuBuf::Owned(data.to_vec())
    }

    fn download(&self, buf: &CpuBuf<T>) -> Vec<T> {
        buf.to_vec()
    }

    fn upload_ids(&self, ids: &[u32]) -> Vec<u32> {
        ids.to_vec()
    }

    fn weight(&self, t: &TensorView) -> Result<CpuBuf<T>> {
        if TypeId::of::<T>() == TypeId::of::<f32>() {
            // Read in place from the memory map; f16/bf16 convert on use.
            Ok(CpuBuf::Mapped(t.clone()))
        } else {
            Ok(CpuBuf::Owned(
                t.to_f64_vec().into_iter().map(T::from_f64).collect(),
            ))
        }
    }

    fn len(&self, buf: &CpuBuf<T>) -> usize {
        buf.len()
    }

    fn copy(&self, dst: &mut CpuBuf<T>, dst_off: usize, src: &CpuBuf<T>, src_off: usize, n: usize) {
        let d = dst.slice_mut();
        src.read_into(src_off, &mut d[dst_off..dst_off + n]);
    }

    fn fill(&self, buf: &mut CpuBuf<T>, value: f64) {
        buf.slice_mut().fill(T::from_f64(value));
    }

    fn matmul(
        &self,
        c: &mut CpuBuf<T>,
        a: &CpuBuf<T>,
        b: &CpuBuf<T>,
        m: usize,
        n: usize,
        k: usize,
        ta: bool,
        tb: bool,
        accumulate: bool,
    ) {
        let a = a.values();
        let b = b.values();
        let c = c.slice_mut();
        assert!(
            a.len() >= m * k && b.len() >= k * n && c.len() >= m * n,
            "matmul shapes"
        );
        let c = &mut c[..m * n];
        if k == 0 {
            if !accumulate {
                c.fill(T::zero());
            }
            return;
        }
        // Strides of op(a) (m×k) and op(b) (k×n) in row-major storage.
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
        let beta = if accumulate { T::one() } else { T::zero() };
        // Split the rows of c into blocks, one GEMM per block (deterministic:
        // each element's k-sum is the same whatever the split).
        let threads = rayon::current_num_threads().max(1);
        let rows_per = m.div_ceil(threads).max(32);
        let a_ptr = a.as_ptr() as usize;
        let b_ptr = b.as_ptr() as usize;
        c.par_chunks_mut(rows_per * n)
            .enumerate()
            .for_each(|(blk, cb)| {
                let r0 = blk * rows_per;
                let rows = cb.len() / n;
                // SAFETY: the slices outlive the call; each block writes only its
                // own rows of c, and a/b are read-only.
                unsafe {
                    let ap = (a_ptr as *const T).offset(r0 as isize * rsa);
                    T::gemm(
                        rows,
                        k,
                        n,
                        T::one(),
                        ap,
                        rsa,
                        csa,
                        b_ptr as *const T,
                        rsb,
                        csb,
                        beta,
                        cb.as_mut_ptr(),
                        n as isize,
                        1,
                    );
                }
            });
    }

    fn bias_add(
        &self,
        y: &mut CpuBuf<T>,
        bias: &CpuBuf<T>,
        bias_off: usize,
        rows: usize,
        cols: usize,
    ) {
        let mut b = vec![T::zero(); cols];
        bias.read_into(bias_off, &mut b);
        let y = y.slice_mut();
        for r in 0..rows {
            for (v, bb) in y[r * cols..(r + 1) * cols].iter_mut().zip(&b) {
                *v += *bb;
            }
        }
    }

    fn bias_grad(
        &self,
        db: &mut CpuBuf<T>,
        db_off: usize,
        dy: &CpuBuf<T>,
        rows: usize,
        cols: usize,
    ) {
        let dy = dy.values();
        let db = &mut db.slice_mut()[db_off..db_off + cols];
        // Accumulate in f64 for an accurate oracle regardless of T.
        let mut acc = vec![0f64; cols];
        for r in 0..rows {
            for (a, g) in acc.iter_mut().zip(&dy[r * cols..(r + 1) * cols]) {
                *a += g.to_f64();
            }
        }
        for (d, a) in db.iter_mut().zip(acc) {
            *d += T::from_f64(a);
        }
    }

    fn add(&self, y: &mut CpuBuf<T>, x: &CpuBuf<T>, n: usize) {
        let x = x.values();
        for (a, b) in y.slice_mut()[..n].iter_mut().zip(&x[..n]) {
            *a += *b;
        }
    }

    fn scale(&self, y: &mut CpuBuf<T>, s: f64, n: usize) {
        let s = T::from_f64(s);
        for a in &mut y.slice_mut()[..n] {
            *a *= s;
        }
    }

    fn sum_sq(&self, y: &CpuBuf<T>, n: usize) -> f64 {
        y.values()[..n]
            .iter()
            .map(|v| v.to_f64() * v.to_f64())
            .sum()
    }

    fn act_fwd(&self, act: Act, y: &mut CpuBuf<T>, x: &CpuBuf<T>, n: usize) {
        let x = x.values();
        y.slice_mut()[..n]
            .par_iter_mut()
            .zip(&x[..n])
            .for_each(|(o, v)| *o = act_value(act, *v));
    }

    fn act_bwd(&self, act: Act, dx: &mut CpuBuf<T>, x: &CpuBuf<T>, dy: &CpuBuf<T>, n: usize) {
        let x = x.values();
        let dy = dy.values();
        dx.slice_mut()[..n]
            .par_iter_mut()
            .zip(x[..n].par_iter().zip(&dy[..n]))
            .for_each(|(o, (v, g))| *o = *g * act_grad(act, *v));
    }

    fn dropout(&self, y: &mut CpuBuf<T>, n: usize, p: f32, seed: u64) {
        if p <= 0.0 {
            return;
        }
        let s = T::from_f64(1.0 / (1.0 - p as f64));
        for (i, v) in y.slice_mut()[..n].iter_mut().enumerate() {
            *v = if dropout_keep(seed, i as u32, p) {
                *v * s
            } else {
                T::zero()
            };
        }
    }

    fn layernorm_fwd(
        &self,
        y: &mut CpuBuf<T>,
        xhat: &mut CpuBuf<T>,
        rstd: &mut CpuBuf<T>,
        x: &CpuBuf<T>,
        gamma: &CpuBuf<T>,
        beta: &CpuBuf<T>,
        beta_off: usize,
        rows: usize,
        cols: usize,
        eps: f64,
    ) {
        let x = x.values();
        let g = gamma.values();
        let mut b = vec![T::zero(); cols];
        beta.read_into(beta_off, &mut b);
        let (y, xh, rs) = (y.slice_mut(), xhat.slice_mut(), rstd.slice_mut());
        let nf = cols as f64;
        for r in 0..rows {
            let xr = &x[r * cols..(r + 1) * cols];
            let mean = xr.iter().map(|v| v.to_f64()).sum::<f64>() / nf;
            let var = xr.iter().map(|v| (v.to_f64() - mean).powi(2)).sum::<f64>() / nf;
            let s = 1.0 / (var + eps).sqrt();
            rs[r] = T::from_f64(s);
            for c in 0..cols {
                let h = T::from_f64((xr[c].to_f64() - mean) * s);
                xh[r * cols + c] = h;
                y[r * cols + c] = h * g[c] + b[c];
            }
        }
    }

    fn layernorm_bwd(
        &self,
        dx: &mut CpuBuf<T>,
        dy: &CpuBuf<T>,
        xhat: &CpuBuf<T>,
        rstd: &CpuBuf<T>,
        gamma: &CpuBuf<T>,
        rows: usize,
        cols: usize,
    ) {
        let (dy, xh, rs, g) = (dy.values(), xhat.values(), rstd.values(), gamma.values());
        let dx = dx.slice_mut();
        let nf = cols as f64;
        for r in 0..rows {
            let o = r * cols;
            let mut mean_g = 0f64;
            let mut mean_gx = 0f64;
            for c in 0..cols {
                let gg = dy[o + c].to_f64() * g[c].to_f64();
                mean_g += gg;
                mean_gx += gg * xh[o + c].to_f64();
            }
            mean_g /= nf;
            mean_gx /= nf;
            let s = rs[r].to_f64();
            for c in 0..cols {
                let gg = dy[o + c].to_f64() * g[c].to_f64();
                dx[o + c] = T::from_f64(s * (gg - mean_g - xh[o + c].to_f64() * mean_gx));
            }
        }
    }

    fn attention_fwd(
        &self,
        out: &mut CpuBuf<T>,
        lse: &mut CpuBuf<T>,
        q: &CpuBuf<T>,
        k: &CpuBuf<T>,
        v: &CpuBuf<T>,
        mask: &CpuBuf<T>,
        dims: AttnDims,
        dropout: Option<Dropout>,
    ) {
        let (q, k, v, mask) = (q.values(), k.values(), v.values(), mask.values());
        let AttnDims {
            seq: t,
            kv_seq: tk,
            heads: nh,
            kv_heads: nkv,
            head_dim: dh,
            ..
        } = dims;
        let group = nh / nkv;
        let scale = T::from_f64(dims.scale);
        let (qs, ks) = (nh * dh, nkv * dh); // row strides of q/out and k/v
        let out = out.slice_mut();
        let lse = lse.slice_mut();
        out[..dims.batch * t * qs]
            .par_chunks_mut(t * qs)
            .zip(lse[..dims.batch * nh * t].par_chunks_mut(nh * t))
            .enumerate()
            .for_each(|(b, (ob, lb))| {
                let mut s = vec![T::zero(); tk];
                for h in 0..nh {
                    let kh = h / group;
                    for i in 0..t {
                        let qi = &q[(b * t + i) * qs + h * dh..][..dh];
                        let mut mx = T::neg_infinity();
                        for j in 0..tk {
                            if visible(&mask, &dims, b, i, j) {
                                let kj = &k[(b * tk + j) * ks + kh * dh..][..dh];
                                let d: T = qi.iter().zip(kj).map(|(a, c)| *a * *c).sum();
                                s[j] = d * scale;
                                mx = mx.max(s[j]);
                            }
                        }
                        let o = &mut ob[i * qs + h * dh..][..dh];
                        o.fill(T::zero());
                        if mx == T::neg_infinity() {
                            // No visible key (a fully padded query row of a
                            // causal batch): output zero, lse = -inf.
                            lb[h * t + i] = T::neg_infinity();
                            continue;
                        }
                        let mut sum = T::zero();
                        for j in 0..tk {
                            if visible(&mask, &dims, b, i, j) {
                                sum += (s[j] - mx).exp();
                            }
                        }
                        let l = mx + sum.ln();
                        lb[h * t + i] = l;
                        for j in 0..tk {
                            if !visible(&mask, &dims, b, i, j) {
                                continue;
                            }
                            let mut p = (s[j] - l).exp();
                            if let Some(dr) = dropout {
                                p = if dropout_keep(
                                    dr.seed,
                                    attn_dropout_index(&dims, b, h, i, j),
                                    dr.p,
                                ) {
                                    p / T::from_f64(1.0 - dr.p as f64)
                                } else {
                                    T::zero()
                                };
                            }
                            let vj = &v[(b * tk + j) * ks + kh * dh..][..dh];
                            for (oo, vv) in o.iter_mut().zip(vj) {
                                *oo += p * *vv;
                            }
                        }
                    }
                }
            });
    }

    fn attention_bwd(
        &self,
        dq: &mut CpuBuf<T>,
        dk: &mut CpuBuf<T>,
        dv: &mut CpuBuf<T>,
        dout: &CpuBuf<T>,
        q: &CpuBuf<T>,
        k: &CpuBuf<T>,
        v: &CpuBuf<T>,
        out: &CpuBuf<T>,
        lse: &CpuBuf<T>,
        mask: &CpuBuf<T>,
        dims: AttnDims,
        dropout: Option<Dropout>,
    ) {
        let (dout, q, k, v, out, lse, mask) = (
            dout.values(),
            q.values(),
            k.values(),
            v.values(),
            out.values(),
            lse.values(),
            mask.values(),
        );
        let AttnDims {
            seq: t,
            heads: nh,
            kv_heads: nkv,
            head_dim: dh,
            ..
        } = dims;
        assert!(
            dims.kv_seq == t && dims.q_start == 0,
            "attention_bwd: training shape only"
        );
        let group = nh / nkv;
        let scale = T::from_f64(dims.scale);
        let (qs, ks) = (nh * dh, nkv * dh);
        let nb = dims.batch;
        let (dq, dk, dv) = (dq.slice_mut(), dk.slice_mut(), dv.slice_mut());
        dq[..nb * t * qs]
            .par_chunks_mut(t * qs)
            .zip(dk[..nb * t * ks].par_chunks_mut(t * ks))
            .zip(dv[..nb * t * ks].par_chunks_mut(t * ks))
            .enumerate()
            .for_each(|(b, ((dqb, dkb), dvb))| {
                dqb.fill(T::zero());
                dkb.fill(T::zero());
                dvb.fill(T::zero());
                for h in 0..nh {
                    let kh = h / group;
                    for i in 0..t {
                        let l = lse[(b * nh + h) * t + i];
                        if l == T::neg_infinity() {
                            continue;
                        }
                        let row = (b * t + i) * qs + h * dh;
                        let qi = &q[row..row + dh];
                        let doi = &dout[row..row + dh];
                        // D_i = dO_i · O_i  (= Σ_j P_ij dP_ij, also with dropout)
                        let di: T = doi
                            .iter()
                            .zip(&out[row..row + dh])
                            .map(|(a, c)| *a * *c)
                            .sum();
                        for j in 0..t {
                            if !visible(&mask, &dims, b, i, j) {
                                continue;
                            }
                            let kj = &k[(b * t + j) * ks + kh * dh..][..dh];
                            let vj = &v[(b * t + j) * ks + kh * dh..][..dh];
                            let s: T = qi.iter().zip(kj).map(|(a, c)| *a * *c).sum::<T>() * scale;
                            let p = (s - l).exp();
                            let w = match dropout {
                                Some(dr) => {
                                    if dropout_keep(
                                        dr.seed,
                                        attn_dropout_index(&dims, b, h, i, j),
                                        dr.p,
                                    ) {
                                        T::one() / T::from_f64(1.0 - dr.p as f64)
                                    } else {
                                        T::zero()
                                    }
                                }
                                None => T::one(),
                            };
                            // dV_j += P̃_ij dO_i
                            let pw = p * w;
                            let dvj = &mut dvb[j * ks + kh * dh..][..dh];
                            for (a, g) in dvj.iter_mut().zip(doi) {
                                *a += pw * *g;
                            }
                            // dP_ij = w · dO_i·V_j ; dS_ij = P_ij (dP_ij − D_i)
                            let dp: T = doi.iter().zip(vj).map(|(a, c)| *a * *c).sum::<T>() * w;
                            let ds = p * (dp - di) * scale;
                            let dqi = &mut dqb[i * qs + h * dh..][..dh];
                            for (a, c) in dqi.iter_mut().zip(kj) {
                                *a += ds * *c;
                            }
                            let dkj = &mut dkb[j * ks + kh * dh..][..dh];
                            for (a, c) in dkj.iter_mut().zip(qi) {
                                *a += ds * *c;
                            }
                        }
                    }
                }
            });
    }

    fn rmsnorm_fwd(
        &self,
        y: &mut CpuBuf<T>,
        xhat: &mut CpuBuf<T>,
        rstd: &mut CpuBuf<T>,
        x: &CpuBuf<T>,
        gamma: &CpuBuf<T>,
        rows: usize,
        cols: usize,
        eps: f64,
    ) {
        let (x, g) = (x.values(), gamma.values());
        let (y, xh, rs) = (y.slice_mut(), xhat.slice_mut(), rstd.slice_mut());
        for r in 0..rows {
            let xr = &x[r * cols..(r + 1) * cols];
            let ms = xr.iter().map(|v| v.to_f64() * v.to_f64()).sum::<f64>() / cols as f64;
            let s = 1.0 / (ms + eps).sqrt();
            rs[r] = T::from_f64(s);
            for c in 0..cols {
                let h = T::from_f64(xr[c].to_f64() * s);
                xh[r * cols + c] = h;
                y[r * cols + c] = h * g[c];
            }
        }
    }

    fn rmsnorm_bwd(
        &self,
        dx: &mut CpuBuf<T>,
        dy: &CpuBuf<T>,
        xhat: &CpuBuf<T>,
        rstd: &CpuBuf<T>,
        gamma: &CpuBuf<T>,
        rows: usize,
        cols: usize,
    ) {
        let (dy, xh, rs, g) = (dy.values(), xhat.values(), rstd.values(), gamma.values());
        let dx = dx.slice_mut();
        for r in 0..rows {
            let o = r * cols;
            // dx = rstd · (g − x̂ · mean(g ⊙ x̂)), g = dy ⊙ γ
            let mean_gx = (0..cols)
                .map(|c| dy[o + c].to_f64() * g[c].to_f64() * xh[o + c].to_f64())
                .sum::<f64>()
                / cols as f64;
            let s = rs[r].to_f64();
            for c in 0..cols {
                let gg = dy[o + c].to_f64() * g[c].to_f64();
                dx[o + c] = T::from_f64(s * (gg - xh[o + c].to_f64() * mean_gx));
            }
        }
    }

    fn rope(
        &self,
        x: &mut CpuBuf<T>,
        positions: &Vec<u32>,
        rows: usize,
        heads: usize,
        head_dim: usize,
        theta: f64,
        inverse: bool,
    ) {
        let x = x.slice_mut();
        let half = head_dim / 2;
        let sign = if inverse { -1.0 } else { 1.0 };
        for r in 0..rows {
            let pos = positions[r] as f64;
            for i in 0..half {
                let inv_freq = theta.powf(-2.0 * i as f64 / head_dim as f64);
                let ang = pos * inv_freq;
                let (sn, cs) = (sign * ang.sin(), ang.cos());
                for h in 0..heads {
                    let base = (r * heads + h) * head_dim;
                    let (x1, x2) = (x[base + i].to_f64(), x[base + i + half].to_f64());
                    x[base + i] = T::from_f64(x1 * cs - x2 * sn);
                    x[base + i + half] = T::from_f64(x2 * cs + x1 * sn);
                }
            }
        }
    }

    fn swiglu_fwd(&self, h: &mut CpuBuf<T>, gate: &CpuBuf<T>, up: &CpuBuf<T>, n: usize) {
        let (g, u) = (gate.values(), up.values());
        for (o, (a, b)) in h.slice_mut()[..n].iter_mut().zip(g.iter().zip(u.iter())) {
            *o = act_value(Act::Silu, *a) * *b;
        }
    }

    fn swiglu_bwd(
        &self,
        dgate: &mut CpuBuf<T>,
        dup: &mut CpuBuf<T>,
        dh: &CpuBuf<T>,
        gate: &CpuBuf<T>,
        up: &CpuBuf<T>,
        n: usize,
    ) {
        let (dh, g, u) = (dh.values(), gate.values(), up.values());
        let (dg, du) = (dgate.slice_mut(), dup.slice_mut());
        for i in 0..n {
            dg[i] = dh[i] * u[i] * act_grad(Act::Silu, g[i]);
            du[i] = dh[i] * act_value(Act::Silu, g[i]);
        }
    }

    fn scatter_add_rows(
        &self,
        dx: &mut CpuBuf<T>,
        dy: &CpuBuf<T>,
        idx: &Vec<u32>,
        rows: usize,
        cols: usize,
    ) {
        let dy = dy.values();
        let dx = dx.slice_mut();
        for r in 0..rows {
            let dst = idx[r] as usize * cols;
            for c in 0..cols {
                dx[dst + c] += dy[r * cols + c];
            }
        }
    }

    fn scale_rows(&self, y: &mut CpuBuf<T>, w: &CpuBuf<T>, rows: usize, cols: usize) {
        let w = w.values();
        let y = y.slice_mut();
        for r in 0..rows {
            for v in &mut y[r * cols..(r + 1) * cols] {
                *v *= w[r];
            }
        }
    }

    fn candidate_loss(
        &self,
        ex_loss: &mut CpuBuf<T>,
        scores: &mut CpuBuf<T>,
        row_w: &mut CpuBuf<T>,
        tok_loss: &CpuBuf<T>,
        idx: &CandidateIndex<'_, Vec<u32>>,
        grad_scale: f64,
    ) {
        let tl = tok_loss.values();
        let (nc, ne) = (idx.cands, idx.examples);
        let mut sum = vec![0f64; nc];
        let mut len = vec![0usize; nc];
        for r in 0..idx.rows {
            let c = idx.tok_cand[r] as usize;
            sum[c] += tl[r].to_f64();
            len[c] += 1;
        }
        // s_c = −mean token loss (the length-normalised log-likelihood).
        let s: Vec<f64> = (0..nc).map(|c| -sum[c] / len[c].max(1) as f64).collect();
        let mut mx = vec![f64::NEG_INFINITY; ne];
        for c in 0..nc {
            let e = idx.cand_ex[c] as usize;
            mx[e] = mx[e].max(s[c]);
        }
        let mut z = vec![0f64; ne];
        for c in 0..nc {
            z[idx.cand_ex[c] as usize] += (s[c] - mx[idx.cand_ex[c] as usize]).exp();
        }
        let el = ex_loss.slice_mut();
        for e in 0..ne {
            let g = idx.gold[e] as usize;
            el[e] = T::from_f64(mx[e] + z[e].ln() - s[g]);
        }
        // dL/ds_c = softmax_c − [c = gold];  ds_c/d tok_loss_r = −1/len_c.
        let mut dsc = vec![0f64; nc];
        for c in 0..nc {
            let e = idx.cand_ex[c] as usize;
            let p = (s[c] - mx[e]).exp() / z[e];
            dsc[c] = p - if idx.gold[e] as usize == c { 1.0 } else { 0.0 };
        }
        let sc = scores.slice_mut();
        for c in 0..nc {
            sc[c] = T::from_f64(s[c]);
        }
        let w = row_w.slice_mut();
        for r in 0..idx.rows {
            let c = idx.tok_cand[r] as usize;
            w[r] = T::from_f64(-grad_scale * dsc[c] / len[c].max(1) as f64);
        }
    }

    fn embedding_fwd(
        &self,
        out: &mut CpuBuf<T>,
        table: &CpuBuf<T>,
        ids: &Vec<u32>,
        rows: usize,
        dim: usize,
        accumulate: bool,
    ) {
        let o = out.slice_mut();
        let mut row = vec![T::zero(); dim];
        for r in 0..rows {
            table.read_into(ids[r] as usize * dim, &mut row);
            let dst = &mut o[r * dim..(r + 1) * dim];
            if accumulate {
                for (a, b) in dst.iter_mut().zip(&row) {
                    *a += *b;
                }
            } else {
                dst.copy_from_slice(&row);
            }
        }
    }

    fn pool_fwd(
        &self,
        kind: PoolKind,
        out: &mut CpuBuf<T>,
        h: &CpuBuf<T>,
        mask: &CpuBuf<T>,
        b: usize,
        t: usize,
        d: usize,
    ) {
        let (h, mask) = (h.values(), mask.values());
        let o = out.slice_mut();
        for bi in 0..b {
            let dst = &mut o[bi * d..(bi + 1) * d];
            match kind {
                PoolKind::Cls => dst.copy_from_slice(&h[bi * t * d..bi * t * d + d]),
                PoolKind::Mean => {
                    dst.fill(T::zero());
                    let mut cnt = T::zero();
                    for ti in 0..t {
                        let m = mask[bi * t + ti];
                        cnt += m;
                        for (a, x) in dst.iter_mut().zip(&h[(bi * t + ti) * d..][..d]) {
                            *a += *x * m;
                        }
                    }
                    let cnt = cnt.max(T::from_f64(1e-9));
                    for a in dst.iter_mut() {
                        *a /= cnt;
                    }
                }
            }
        }
    }

    fn pool_bwd(
        &self,
        kind: PoolKind,
        dh: &mut CpuBuf<T>,
        dout: &CpuBuf<T>,
        mask: &CpuBuf<T>,
        b: usize,
        t: usize,
        d: usize,
    ) {
        let (dout, mask) = (dout.values(), mask.values());
        let g = dh.slice_mut();
        g[..b * t * d].fill(T::zero());
        for bi in 0..b {
            let src = &dout[bi * d..(bi + 1) * d];
            match kind {
                PoolKind::Cls => g[bi * t * d..bi * t * d + d].copy_from_slice(src),
                PoolKind::Mean => {
                    let cnt: T = mask[bi * t..(bi + 1) * t]
                        .iter()
                        .copied()
                        .sum::<T>()
                        .max(T::from_f64(1e-9));
                    for ti in 0..t {
                        let w = mask[bi * t + ti] / cnt;
                        for (a, x) in g[(bi * t + ti) * d..][..d].iter_mut().zip(src) {
                            *a = *x * w;
                        }
                    }
                }
            }
        }
    }

    fn cross_entropy(
        &self,
        losses: &mut CpuBuf<T>,
        dlogits: &mut CpuBuf<T>,
        logits: &CpuBuf<T>,
        labels: &Vec<u32>,
        rows: usize,
        classes: usize,
        grad_scale: f64,
    ) {
        let x = logits.values();
        let (l, d) = (losses.slice_mut(), dlogits.slice_mut());
        for r in 0..rows {
            let xr = &x[r * classes..(r + 1) * classes];
            let mx = xr.iter().fold(T::neg_infinity(), |a, b| a.max(*b));
            let sum: T = xr.iter().map(|v| (*v - mx).exp()).sum();
            let lse = mx + sum.ln();
            let y = labels[r] as usize;
            l[r] = lse - xr[y];
            for c in 0..classes {
                let p = (xr[c] - lse).exp();
                let oh = if c == y { T::one() } else { T::zero() };
                d[r * classes + c] = (p - oh) * T::from_f64(grad_scale);
            }
        }
    }

    fn mse(
        &self,
        losses: &mut CpuBuf<T>,
        dx: &mut CpuBuf<T>,
        x: &CpuBuf<T>,
        target: &CpuBuf<T>,
        rows: usize,
        grad_scale: f64,
    ) {
        let (x, y) = (x.values(), target.values());
        let (l, d) = (losses.slice_mut(), dx.slice_mut());
        for r in 0..rows {
            let e = x[r] - y[r];
            l[r] = e * e;
            d[r] = T::from_f64(2.0 * grad_scale) * e;
        }
    }

    fn adamw(
        &self,
        params: &mut CpuBuf<T>,
        grads: &CpuBuf<T>,
        m: &mut CpuBuf<T>,
        v: &mut CpuBuf<T>,
        n: usize,
        h: AdamW,
    ) {
        let g = grads.values();
        let (p, m, v) = (params.slice_mut(), m.slice_mut(), v.slice_mut());
        // PyTorch's AdamW: decoupled decay, bias-corrected moments.
        let bc1 = 1.0 - h.beta1.powi(h.step as i32);
        let bc2 = 1.0 - h.beta2.powi(h.step as i32);
        for i in 0..n {
            let gi = g[i].to_f64();
            let mi = h.beta1 * m[i].to_f64() + (1.0 - h.beta1) * gi;
            let vi = h.beta2 * v[i].to_f64() + (1.0 - h.beta2) * gi * gi;
            m[i] = T::from_f64(mi);
            v[i] = T::from_f64(vi);
            let mut pi = p[i].to_f64() * (1.0 - h.lr * h.weight_decay);
            pi -= (h.lr / bc1) * mi / (vi.sqrt() / bc2.sqrt() + h.eps);
            p[i] = T::from_f64(pi);
        }
    }
}
