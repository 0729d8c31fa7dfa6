//! A simulated device: any backend, with every buffer it hands out counted
//! as device memory and an optional cap that behaves like running out of
//! device memory (a [`device_fault`]). It lets the memory behaviour of a
//! run — resident vs streamed layers, kept vs recomputed activations — be
//! measured and tested on a machine without a GPU.
//!
//! Frozen weights count at their size in the checkpoint (a bf16 checkpoint
//! counts 2 bytes per value, as the CUDA backend holds it); activations,
//! the slab and index buffers at their element size.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::fault::{device_fault, oom_message};
use super::{Act, AdamW, AttnDims, Backend, CandidateIndex, Dropout, MemoryStats, PoolKind};
use crate::error::Result;
use crate::weights::TensorView;

/// Live and peak bytes, shared by a simulated device and its buffers.
#[derive(Debug, Default)]
struct Meter {
    live: AtomicU64,
    peak: AtomicU64,
}

/// A buffer of the simulated device.
pub struct SimBuf<T> {
    inner: T,
    bytes: u64,
    meter: Arc<Meter>,
}

impl<T> Drop for SimBuf<T> {
    fn drop(&mut self) {
        self.meter.live.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

/// `inner`, metered (see the module docs).
pub struct SimDevice<B: Backend> {
    inner: B,
    cap: Option<u64>,
    meter: Arc<Meter>,
}

impl<B: Backend> SimDevice<B> {
    /// Meter `inner`; with `cap`, an allocation that would take the live
    /// bytes over it is an out-of-memory fault.
    pub fn new(inner: B, cap: Option<u64>) -> Self {
        SimDevice {
            inner,
            cap,
            meter: Arc::default(),
        }
    }

    /// The wrapped backend.
    pub fn inner(&self) -> &B {
        &self.inner
    }

    /// Count a buffer the inner backend made (after [`Self::admit`]).
    fn wrap<T>(&self, inner: T, bytes: u64) -> SimBuf<T> {
        let live = self.meter.live.fetch_add(bytes, Ordering::Relaxed) + bytes;
        self.meter.peak.fetch_max(live, Ordering::Relaxed);
        SimBuf {
            inner,
            bytes,
            meter: self.meter.clone(),
        }
    }

    /// Check an allocation against the cap before the inner backend makes it.
    fn admit(&self, bytes: u64) {
        if let Some(cap) = self.cap {
            let live = self.meter.live.load(Ordering::Relaxed);
            if live + bytes > cap {
                device_fault(oom_message(
                    &self.name(),
                    bytes,
                    cap.saturating_sub(live),
                    cap,
                    true,
                ));
            }
        }
    }

    fn elem(&self) -> u64 {
        std::mem::size_of::<B::T>() as u64
    }
}

#[allow(clippy::too_many_arguments)]
impl<B: Backend> Backend for SimDevice<B> {
    type T = B::T;
    type Buf = SimBuf<B::Buf>;
    type Ids = SimBuf<B::Ids>;

    fn name(&self) -> String {
        format!("simulated device over {}", self.inner.name())
    }

    fn sync(&self) {
        self.inner.sync()
    }

    fn memory(&self) -> Option<MemoryStats> {
        Some(MemoryStats {
            live: self.meter.live.load(Ordering::Relaxed),
            peak: self.meter.peak.load(Ordering::Relaxed),
        })
    }

    fn release_cached(&self) {
        self.inner.release_cached()
    }

    fn reset_peak(&self) {
        let live = self.meter.live.load(Ordering::Relaxed);
        self.meter.peak.store(live, Ordering::Relaxed);
    }

    fn zeros(&self, n: usize) -> Self::Buf {
        let bytes = n as u64 * self.elem();
        self.admit(bytes);
        self.wrap(self.inner.zeros(n), bytes)
    }

    fn output(&self, n: usize) -> Self::Buf {
        let bytes = n as u64 * self.elem();
        self.admit(bytes);
        self.wrap(self.inner.output(n), bytes)
    }

    fn upload(&self, data: &[Self::T]) -> Self::Buf {
        let bytes = data.len() as u64 * self.elem();
        self.admit(bytes);
        self.wrap(self.inner.upload(data), bytes)
    }

    fn download(&self, buf: &Self::Buf) -> Vec<Self::T> {
        self.inner.download(&buf.inner)
    }

    fn upload_ids(&self, ids: &[u32]) -> Self::Ids {
        let bytes = ids.len() as u64 * 4;
        self.admit(bytes);
        self.wrap(self.inner.upload_ids(ids), bytes)
    }

    fn weight(&self, t: &TensorView) -> Result<Self::Buf> {
        let bytes = self.weight_bytes(t);
        self.admit(bytes);
        Ok(self.wrap(self.inner.weight(t)?, bytes))
    }

    fn weight_streamed(&self, t: &TensorView) -> Result<Self::Buf> {
        let bytes = self.weight_bytes(t);
        self.admit(bytes);
        Ok(self.wrap(self.inner.weight_streamed(t)?, bytes))
    }

    fn weight_bytes(&self, t: &TensorView) -> u64 {
        (t.numel() * t.dtype.size()) as u64
    }

    fn len(&self, buf: &Self::Buf) -> usize {
        self.inner.len(&buf.inner)
    }

    fn copy(&self, dst: &mut Self::Buf, dst_off: usize, src: &Self::Buf, src_off: usize, n: usize) {
        self.inner
            .copy(&mut dst.inner, dst_off, &src.inner, src_off, n)
    }

    fn fill(&self, buf: &mut Self::Buf, value: f64) {
        self.inner.fill(&mut buf.inner, value)
    }

    fn matmul(
        &self,
        c: &mut Self::Buf,
        a: &Self::Buf,
        b: &Self::Buf,
        m: usize,
        n: usize,
        k: usize,
        ta: bool,
        tb: bool,
        accumulate: bool,
    ) {
        self.inner.matmul(
            &mut c.inner,
            &a.inner,
            &b.inner,
            m,
            n,
            k,
            ta,
            tb,
            accumulate,
        )
    }

    fn matmul_bias(
        &self,
        c: &mut Self::Buf,
        a: &Self::Buf,
        b: &Self::Buf,
        bias: (&Self::Buf, usize),
        m: usize,
        n: usize,
        k: usize,
        ta: bool,
        tb: bool,
    ) {
        self.inner.matmul_bias(
            &mut c.inner,
            &a.inner,
            &b.inner,
            (&bias.0.inner, bias.1),
            m,
            n,
            k,
            ta,
            tb,
        )
    }

    // `matmul_act_grad` keeps the trait's default (product into a metered
    // temporary, then act_bwd): a conservative count of the peak.
    fn linear_act(
        &self,
        pre: &mut Self::Buf,
        out: &mut Self::Buf,
        act: Act,
        a: &Self::Buf,
        b: &Self::Buf,
        bias: Option<(&Self::Buf, usize)>,
        m: usize,
        n: usize,
        k: usize,
        tb: bool,
    ) {
        self.inner.linear_act(
            &mut pre.inner,
            &mut out.inner,
            act,
            &a.inner,
            &b.inner,
            bias.map(|(buf, off)| (&buf.inner, off)),
            m,
            n,
            k,
            tb,
        )
    }

    fn bias_add(&self, y: &mut Self::Buf, bias: &Self::Buf, off: usize, rows: usize, cols: usize) {
        self.inner
            .bias_add(&mut y.inner, &bias.inner, off, rows, cols)
    }

    fn bias_grad(&self, db: &mut Self::Buf, off: usize, dy: &Self::Buf, rows: usize, cols: usize) {
        self.inner
            .bias_grad(&mut db.inner, off, &dy.inner, rows, cols)
    }

    fn add(&self, y: &mut Self::Buf, x: &Self::Buf, n: usize) {
        self.inner.add(&mut y.inner, &x.inner, n)
    }

    fn scale(&self, y: &mut Self::Buf, s: f64, n: usize) {
        self.inner.scale(&mut y.inner, s, n)
    }

    fn sum_sq(&self, y: &Self::Buf, n: usize) -> f64 {
        self.inner.sum_sq(&y.inner, n)
    }

    fn act_fwd(&self, act: Act, y: &mut Self::Buf, x: &Self::Buf, n: usize) {
        self.inner.act_fwd(act, &mut y.inner, &x.inner, n)
    }

    fn act_bwd(&self, act: Act, dx: &mut Self::Buf, x: &Self::Buf, dy: &Self::Buf, n: usize) {
        self.inner
            .act_bwd(act, &mut dx.inner, &x.inner, &dy.inner, n)
    }

    fn dropout(&self, y: &mut Self::Buf, n: usize, p: f32, seed: u64) {
        self.inner.dropout(&mut y.inner, n, p, seed)
    }

    fn linear_swiglu(
        &self,
        up: &mut Self::Buf,
        h: &mut Self::Buf,
        gate: &Self::Buf,
        a: &Self::Buf,
        b: &Self::Buf,
        bias: Option<(&Self::Buf, usize)>,
        m: usize,
        n: usize,
        k: usize,
        tb: bool,
    ) {
        self.inner.linear_swiglu(
            &mut up.inner,
            &mut h.inner,
            &gate.inner,
            &a.inner,
            &b.inner,
            bias.map(|(buf, off)| (&buf.inner, off)),
            m,
            n,
            k,
            tb,
        )
    }

    fn dropout_add(&self, y: &mut Self::Buf, x: &Self::Buf, n: usize, p: f32, seed: u64) {
        self.inner.dropout_add(&mut y.inner, &x.inner, n, p, seed)
    }

    fn dropout_from(&self, y: &mut Self::Buf, x: &Self::Buf, n: usize, p: f32, seed: u64) {
        self.inner.dropout_from(&mut y.inner, &x.inner, n, p, seed)
    }

    fn residual_layernorm_fwd(
        &self,
        y: &mut Self::Buf,
        xhat: &mut Self::Buf,
        rstd: &mut Self::Buf,
        s: &mut Self::Buf,
        res: &Self::Buf,
        drop: Option<Dropout>,
        gamma: &Self::Buf,
        beta: &Self::Buf,
        beta_off: usize,
        rows: usize,
        cols: usize,
        eps: f64,
    ) {
        self.inner.residual_layernorm_fwd(
            &mut y.inner,
            &mut xhat.inner,
            &mut rstd.inner,
            &mut s.inner,
            &res.inner,
            drop,
            &gamma.inner,
            &beta.inner,
            beta_off,
            rows,
            cols,
            eps,
        )
    }

    fn layernorm_fwd(
        &self,
        y: &mut Self::Buf,
        xhat: &mut Self::Buf,
        rstd: &mut Self::Buf,
        x: &Self::Buf,
        gamma: &Self::Buf,
        beta: &Self::Buf,
        beta_off: usize,
        rows: usize,
        cols: usize,
        eps: f64,
    ) {
        self.inner.layernorm_fwd(
            &mut y.inner,
            &mut xhat.inner,
            &mut rstd.inner,
            &x.inner,
            &gamma.inner,
            &beta.inner,
            beta_off,
            rows,
            cols,
            eps,
        )
    }

    fn layernorm_bwd(
        &self,
        dx: &mut Self::Buf,
        dy: &Self::Buf,
        xhat: &Self::Buf,
        rstd: &Self::Buf,
        gamma: &Self::Buf,
        rows: usize,
        cols: usize,
    ) {
        self.inner.layernorm_bwd(
            &mut dx.inner,
            &dy.inner,
            &xhat.inner,
            &rstd.inner,
            &gamma.inner,
            rows,
            cols,
        )
    }

    fn attention_fwd(
        &self,
        out: &mut Self::Buf,
        lse: &mut Self::Buf,
        q: &Self::Buf,
        k: &Self::Buf,
        v: &Self::Buf,
        mask: &Self::Buf,
        dims: AttnDims,
        dropout: Option<Dropout>,
    ) {
        self.inner.attention_fwd(
            &mut out.inner,
            &mut lse.inner,
            &q.inner,
            &k.inner,
            &v.inner,
            &mask.inner,
            dims,
            dropout,
        )
    }

    fn attention_bwd(
        &self,
        dq: &mut Self::Buf,
        dk: &mut Self::Buf,
        dv: &mut Self::Buf,
        dout: &Self::Buf,
        q: &Self::Buf,
        k: &Self::Buf,
        v: &Self::Buf,
        out: &Self::Buf,
        lse: &Self::Buf,
        mask: &Self::Buf,
        dims: AttnDims,
        dropout: Option<Dropout>,
    ) {
        self.inner.attention_bwd(
            &mut dq.inner,
            &mut dk.inner,
            &mut dv.inner,
            &dout.inner,
            &q.inner,
            &k.inner,
            &v.inner,
            &out.inner,
            &lse.inner,
            &mask.inner,
            dims,
            dropout,
        )
    }

    fn rmsnorm_fwd(
        &self,
        y: &mut Self::Buf,
        xhat: &mut Self::Buf,
        rstd: &mut Self::Buf,
        x: &Self::Buf,
        gamma: &Self::Buf,
        rows: usize,
        cols: usize,
        eps: f64,
    ) {
        self.inner.rmsnorm_fwd(
            &mut y.inner,
            &mut xhat.inner,
            &mut rstd.inner,
            &x.inner,
            &gamma.inner,
            rows,
            cols,
            eps,
        )
    }

    fn rmsnorm_bwd(
        &self,
        dx: &mut Self::Buf,
        dy: &Self::Buf,
        xhat: &Self::Buf,
        rstd: &Self::Buf,
        gamma: &Self::Buf,
        rows: usize,
        cols: usize,
    ) {
        self.inner.rmsnorm_bwd(
            &mut dx.inner,
            &dy.inner,
            &xhat.inner,
            &rstd.inner,
            &gamma.inner,
            rows,
            cols,
        )
    }

    fn rope(
        &self,
        x: &mut Self::Buf,
        positions: &Self::Ids,
        rows: usize,
        heads: usize,
        head_dim: usize,
        theta: f64,
        inverse: bool,
    ) {
        self.inner.rope(
            &mut x.inner,
            &positions.inner,
            rows,
            heads,
            head_dim,
            theta,
            inverse,
        )
    }

    fn swiglu_fwd(&self, h: &mut Self::Buf, gate: &Self::Buf, up: &Self::Buf, n: usize) {
        self.inner
            .swiglu_fwd(&mut h.inner, &gate.inner, &up.inner, n)
    }

    fn swiglu_bwd(
        &self,
        dgate: &mut Self::Buf,
        dup: &mut Self::Buf,
        dh: &Self::Buf,
        gate: &Self::Buf,
        up: &Self::Buf,
        n: usize,
    ) {
        self.inner.swiglu_bwd(
            &mut dgate.inner,
            &mut dup.inner,
            &dh.inner,
            &gate.inner,
            &up.inner,
            n,
        )
    }

    fn embedding_fwd(
        &self,
        out: &mut Self::Buf,
        table: &Self::Buf,
        ids: &Self::Ids,
        rows: usize,
        dim: usize,
        accumulate: bool,
    ) {
        self.inner.embedding_fwd(
            &mut out.inner,
            &table.inner,
            &ids.inner,
            rows,
            dim,
            accumulate,
        )
    }

    fn scatter_add_rows(
        &self,
        dx: &mut Self::Buf,
        dy: &Self::Buf,
        idx: &Self::Ids,
        rows: usize,
        cols: usize,
    ) {
        self.inner
            .scatter_add_rows(&mut dx.inner, &dy.inner, &idx.inner, rows, cols)
    }

    fn scale_rows(&self, y: &mut Self::Buf, w: &Self::Buf, rows: usize, cols: usize) {
        self.inner.scale_rows(&mut y.inner, &w.inner, rows, cols)
    }

    fn pool_fwd(
        &self,
        kind: PoolKind,
        out: &mut Self::Buf,
        h: &Self::Buf,
        mask: &Self::Buf,
        b: usize,
        t: usize,
        d: usize,
    ) {
        self.inner
            .pool_fwd(kind, &mut out.inner, &h.inner, &mask.inner, b, t, d)
    }

    fn pool_bwd(
        &self,
        kind: PoolKind,
        dh: &mut Self::Buf,
        dout: &Self::Buf,
        mask: &Self::Buf,
        b: usize,
        t: usize,
        d: usize,
    ) {
        self.inner
            .pool_bwd(kind, &mut dh.inner, &dout.inner, &mask.inner, b, t, d)
    }

    fn cross_entropy(
        &self,
        losses: &mut Self::Buf,
        dlogits: &mut Self::Buf,
        logits: &Self::Buf,
        labels: &Self::Ids,
        rows: usize,
        classes: usize,
        grad_scale: f64,
    ) {
        self.inner.cross_entropy(
            &mut losses.inner,
            &mut dlogits.inner,
            &logits.inner,
            &labels.inner,
            rows,
            classes,
            grad_scale,
        )
    }

    fn candidate_loss(
        &self,
        ex_loss: &mut Self::Buf,
        scores: &mut Self::Buf,
        row_w: &mut Self::Buf,
        tok_loss: &Self::Buf,
        idx: &CandidateIndex<'_, Self::Ids>,
        grad_scale: f64,
    ) {
        let inner = CandidateIndex {
            tok_cand: &idx.tok_cand.inner,
            cand_ex: &idx.cand_ex.inner,
            gold: &idx.gold.inner,
            rows: idx.rows,
            cands: idx.cands,
            examples: idx.examples,
        };
        self.inner.candidate_loss(
            &mut ex_loss.inner,
            &mut scores.inner,
            &mut row_w.inner,
            &tok_loss.inner,
            &inner,
            grad_scale,
        )
    }

    fn mse(
        &self,
        losses: &mut Self::Buf,
        dx: &mut Self::Buf,
        x: &Self::Buf,
        target: &Self::Buf,
        rows: usize,
        grad_scale: f64,
    ) {
        self.inner.mse(
            &mut losses.inner,
            &mut dx.inner,
            &x.inner,
            &target.inner,
            rows,
            grad_scale,
        )
    }

    fn adamw(
        &self,
        params: &mut Self::Buf,
        grads: &Self::Buf,
        m: &mut Self::Buf,
        v: &mut Self::Buf,
        n: usize,
        h: AdamW,
    ) {
        self.inner.adamw(
            &mut params.inner,
            &grads.inner,
            &mut m.inner,
            &mut v.inner,
            n,
            h,
        )
    }
}
