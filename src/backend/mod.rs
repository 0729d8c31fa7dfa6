//! The op vocabulary: one small, fixed list of ops that every backend
//! implements (CPU here; CUDA in `kernels/*.cu` and wgpu in `shaders/*.wgsl`
//! use the same op names). Model code is written once, over this trait.
//!
//! Conventions, shared by all backends:
//! - every matrix is row-major; activations of a batch are `rows = B·T`
//!   tokens by `cols` features, with the heads of q/k/v interleaved as
//!   `[B, T, H, Dh]` (no transposes are ever materialised);
//! - an op writes its outputs (first arguments) and never its inputs; ops
//!   whose name or doc says "accumulate" add into the output instead;
//! - a bias that may be trainable is passed as `(buffer, offset)`, so that the
//!   same op reads either a frozen weight or a slot of the trainable slab;
//! - randomness (dropout) comes from a counter-based hash ([`dropout_keep`]),
//!   so that every backend draws the same mask for the same seed.

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod fast;
pub mod fault;
pub mod sim;
#[cfg(feature = "wgpu")]
pub mod wgpu;

use std::fmt;

use crate::error::{Error, Result};
use crate::float::Float;
use crate::weights::TensorView;

/// A compute device named on the command line (`--device`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Device {
    /// The CPU backend (default).
    Cpu,
    /// The plain CPU reference ops (the oracle), for checking a fast path.
    CpuRef,
    /// An NVIDIA GPU by ordinal (`cuda`, `cuda:1`).
    Cuda(usize),
    /// A wgpu adapter (`wgpu` picks the best one; `wgpu:N` picks one).
    Wgpu(Option<usize>),
}

impl Device {
    /// Parse `cpu`, `cpu-ref`, `cuda[:N]`, `wgpu[:N]`.
    pub fn parse(spec: &str) -> Result<Device> {
        let s = spec.trim().to_ascii_lowercase();
        let (name, idx) = match s.split_once(':') {
            Some((n, i)) => {
                let i = i.parse::<usize>().map_err(|_| {
                    crate::Error::msg(format!("--device: bad device index in '{spec}'"))
                })?;
                (n.to_string(), Some(i))
            }
            None => (s.clone(), None),
        };
        match (name.as_str(), idx) {
            ("cpu", None) => Ok(Device::Cpu),
            ("cpu-ref", None) => Ok(Device::CpuRef),
            ("cuda", i) => Ok(Device::Cuda(i.unwrap_or(0))),
            ("wgpu", i) => Ok(Device::Wgpu(i)),
            _ => Err(crate::Error::msg(format!(
                "--device: unknown device '{spec}' (cpu, cpu-ref, cuda[:N], wgpu[:N])"
            ))),
        }
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::CpuRef => f.write_str("cpu-ref"),
            Device::Cuda(i) => write!(f, "cuda:{i}"),
            Device::Wgpu(Some(i)) => write!(f, "wgpu:{i}"),
            Device::Wgpu(None) => f.write_str("wgpu"),
        }
    }
}

/// An element-wise activation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Act {
    /// Exact (erf) GELU, as BERT's `hidden_act = "gelu"`.
    Gelu,
    /// The tanh approximation, `"gelu_new"` / `"gelu_pytorch_tanh"`.
    GeluTanh,
    Relu,
    Tanh,
    /// SiLU / swish.
    Silu,
}

/// Shape of an attention call: `q` is `[batch, seq, heads, head_dim]`; `k`
/// and `v` are `[batch, kv_seq, kv_heads, head_dim]` (grouped-query attention
/// when `kv_heads < heads`; query head `h` reads key head
/// `h / (heads / kv_heads)`). The mask is `[batch, kv_seq]`.
///
/// Training calls have `kv_seq == seq` and `q_start == 0`. Incremental
/// decoding with a KV cache passes the new queries only (`seq` of them, the
/// first at absolute position `q_start`) against all cached keys.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AttnDims {
    pub batch: usize,
    /// Number of queries per sequence.
    pub seq: usize,
    /// Number of keys/values per sequence.
    pub kv_seq: usize,
    /// Absolute position of the first query (causal masking: query `i` sees
    /// keys `j <= q_start + i`).
    pub q_start: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Multiplies q·kᵀ before the softmax (normally `1/sqrt(head_dim)`).
    pub scale: f64,
    /// Decoder-style: query i sees keys j ≤ q_start + i only.
    pub causal: bool,
}

impl AttnDims {
    /// Self-attention over `seq` tokens (training and full-sequence
    /// evaluation).
    pub fn self_attn(
        batch: usize,
        seq: usize,
        heads: usize,
        kv_heads: usize,
        head_dim: usize,
        causal: bool,
    ) -> Self {
        AttnDims {
            batch,
            seq,
            kv_seq: seq,
            q_start: 0,
            heads,
            kv_heads,
            head_dim,
            scale: 1.0 / (head_dim as f64).sqrt(),
            causal,
        }
    }
}

/// One candidate-scoring batch (decoder classification / multiple choice):
/// `rows` answer tokens, each belonging to a candidate continuation; every
/// candidate belongs to one example; each example has one gold candidate.
/// Index buffers live on the device.
pub struct CandidateIndex<'a, I> {
    /// For each answer-token row: its candidate (0..cands).
    pub tok_cand: &'a I,
    /// For each candidate: its example (0..examples).
    pub cand_ex: &'a I,
    /// For each example: the index of its gold candidate.
    pub gold: &'a I,
    pub rows: usize,
    pub cands: usize,
    pub examples: usize,
}

/// Dropout (of attention probabilities, or of a sublayer's output before its
/// residual add): drop with probability `p`, with the mask drawn from `seed`
/// (the same mask is redrawn in the backward pass).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Dropout {
    pub p: f32,
    pub seed: u64,
}

/// Pooling of a sequence of hidden states into one vector per example.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PoolKind {
    /// The first token (`[CLS]` / `<s>`).
    Cls,
    /// Mean over the non-padding tokens (sentence-transformers).
    Mean,
}

/// One linear layer of [`Backend::linears`] and [`Backend::mlp_fwd`]:
/// `y[m×n] = x·op(w) (+ bias)`, where `op(w) = wᵀ` (`w` stored `[n, k]`)
/// if `tb`, else `w` (stored `[k, n]`); `bias` is a buffer and the offset
/// of the `n` values in it.
pub struct Proj<'a, B> {
    pub w: &'a B,
    pub bias: Option<(&'a B, usize)>,
    pub n: usize,
    pub tb: bool,
}

impl<B> Clone for Proj<'_, B> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<B> Copy for Proj<'_, B> {}

/// [`Backend::linears`] as [`Backend::linear`] for each layer in turn.
pub fn linears_in_turn<B: Backend + ?Sized>(
    be: &B,
    outs: &mut [&mut B::Buf],
    a: &B::Buf,
    layers: &[Proj<'_, B::Buf>],
    m: usize,
    k: usize,
) {
    assert_eq!(outs.len(), layers.len(), "linears: one output per layer");
    for (c, p) in outs.iter_mut().zip(layers) {
        be.linear(c, a, p.w, p.bias, m, p.n, k, p.tb);
    }
}

/// [`Backend::mlp_fwd`] as [`Backend::linear_act`] into a temporary, then
/// [`Backend::linear`].
#[allow(clippy::too_many_arguments)]
pub fn mlp_in_turn<B: Backend + ?Sized>(
    be: &B,
    pre: &mut B::Buf,
    out: &mut B::Buf,
    act: Act,
    a: &B::Buf,
    (first, second): (Proj<'_, B::Buf>, Proj<'_, B::Buf>),
    m: usize,
    k: usize,
) {
    let (w1, w2) = (first, second);
    let mut g = be.output(m * w1.n);
    be.linear_act(pre, &mut g, act, a, w1.w, w1.bias, m, w1.n, k, w1.tb);
    be.linear(out, &g, w2.w, w2.bias, m, w2.n, w1.n, w2.tb);
}

/// AdamW hyper-parameters for one step (`step` counts from 1).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamW {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    pub step: u64,
}

impl AdamW {
    /// Step `step` (from 1) at learning rate `lr` with PyTorch's `AdamW`
    /// defaults otherwise (β = 0.9, 0.999; ε = 1e-8), without weight decay.
    pub fn with_defaults(lr: f64, step: u64) -> Self {
        AdamW {
            lr,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            step,
        }
    }
}

/// One compute device with its buffers and the op vocabulary.
///
/// Buffer lengths are in elements. Shapes are passed explicitly; a backend
/// may check them (the CPU backend asserts every length).
#[allow(clippy::too_many_arguments)]
pub trait Backend {
    /// Element type of activations, gradients and the trainable slab.
    type T: Float;
    /// A float buffer on the device (activations, frozen weights, slab).
    type Buf;
    /// An integer buffer on the device (token ids, labels).
    type Ids;

    /// Human-readable device name, e.g. `"cpu (f32, 8 threads)"`.
    fn name(&self) -> String;

    /// Wait until every op queued so far has finished (for timing). A
    /// synchronous backend (the CPU) has nothing to wait for.
    fn sync(&self) {}

    /// Device memory held by this backend's buffers, if it keeps count
    /// (GPU backends and the simulated device do; the CPU backend does not).
    fn memory(&self) -> Option<MemoryStats> {
        None
    }

    /// Give cached free buffers back to the device (a pooling backend keeps
    /// them, and counts them as held), e.g. before a memory measurement.
    fn release_cached(&self) {}

    /// Start a new peak-memory measurement ([`MemoryStats::peak`] becomes
    /// the bytes live now).
    fn reset_peak(&self) {}

    // ---- memory -----------------------------------------------------------
    /// A new buffer of `n` zeros.
    fn zeros(&self, n: usize) -> Self::Buf;
    /// A new buffer of `n` elements for an op that writes every one of
    /// them (its values before that are unspecified: a backend may hand
    /// back a recycled buffer without clearing it). Zeros unless the
    /// backend says otherwise.
    fn output(&self, n: usize) -> Self::Buf {
        self.zeros(n)
    }
    /// Copy host data to a new device buffer.
    fn upload(&self, data: &[Self::T]) -> Self::Buf;
    /// Copy a device buffer back to the host.
    fn download(&self, buf: &Self::Buf) -> Vec<Self::T>;
    /// Copy host integers to a new device buffer.
    fn upload_ids(&self, ids: &[u32]) -> Self::Ids;
    /// A frozen weight from a (memory-mapped) checkpoint tensor. The backend
    /// decides how it is held (the CPU backend reads f32 tensors in place and
    /// converts f16/bf16 on use).
    fn weight(&self, t: &TensorView) -> Result<Self::Buf>;
    /// A frozen weight uploaded for one use by a streamed layer
    /// (`--offload stream`). A backend may copy it on a side stream so that
    /// the upload overlaps the compute queued before it.
    fn weight_streamed(&self, t: &TensorView) -> Result<Self::Buf> {
        self.weight(t)
    }
    /// Bytes of device memory that [`Backend::weight`] takes for `t`.
    fn weight_bytes(&self, t: &TensorView) -> u64 {
        (t.numel() * std::mem::size_of::<Self::T>()) as u64
    }
    /// Length of a buffer in elements.
    fn len(&self, buf: &Self::Buf) -> usize;
    /// `dst[dst_off..dst_off+n] = src[src_off..src_off+n]`.
    fn copy(&self, dst: &mut Self::Buf, dst_off: usize, src: &Self::Buf, src_off: usize, n: usize);
    /// Set every element of `buf` to `value`.
    fn fill(&self, buf: &mut Self::Buf, value: f64);

    // ---- dense algebra ----------------------------------------------------
    /// `c[m×n] (+)= op(a)·op(b)`, where `op(a)` is `m×k` (`a` stored `m×k`,
    /// or `k×m` when `ta`) and `op(b)` is `k×n` (`b` stored `k×n`, or `n×k`
    /// when `tb`). Accumulates into `c` when `accumulate`, else overwrites.
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
    );
    /// A linear layer's output: `c[m×n] = op(a)·op(b) + bias[bias_off..][..n]`
    /// on every row (the bias added to the product in f32, as
    /// [`Backend::matmul`] then [`Backend::bias_add`] compute it, which is
    /// the default). A backend may fuse the bias into the product's
    /// epilogue (CUDA does): one pass over `c` instead of two.
    #[allow(clippy::too_many_arguments)]
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
        self.matmul(c, a, b, m, n, k, ta, tb, false);
        self.bias_add(c, bias.0, bias.1, m, n);
    }
    /// A linear layer, `c[m×n] = a·op(b) (+ bias)`: [`Backend::matmul_bias`]
    /// with a bias, else [`Backend::matmul`].
    #[allow(clippy::too_many_arguments)]
    fn linear(
        &self,
        c: &mut Self::Buf,
        a: &Self::Buf,
        b: &Self::Buf,
        bias: Option<(&Self::Buf, usize)>,
        m: usize,
        n: usize,
        k: usize,
        tb: bool,
    ) {
        match bias {
            Some(bias) => self.matmul_bias(c, a, b, bias, m, n, k, false, tb),
            None => self.matmul(c, a, b, m, n, k, false, tb, false),
        }
    }
    /// Linear layers of one input, `outs[i][m×nᵢ] = a·op(wᵢ) (+ bᵢ)`, each
    /// as [`Backend::linear`] (`layers[i]`; `k` columns of `a`): a layer's
    /// q, k and v projections. The default runs them in turn; a backend may
    /// prepare `a` once for all of them (the fast CPU backend's bf16
    /// products convert it to bf16 once).
    fn linears(
        &self,
        outs: &mut [&mut Self::Buf],
        a: &Self::Buf,
        layers: &[Proj<'_, Self::Buf>],
        m: usize,
        k: usize,
    ) {
        linears_in_turn(self, outs, a, layers, m, k)
    }
    /// A transformer's MLP without its residual: `pre[m×n₁] = a·op(w₁)
    /// (+ b₁)` (what the backward pass keeps; `k` columns of `a`) and
    /// `out[m×n₂] = act(pre)·op(w₂) (+ b₂)`, for `layers = (first,
    /// second)`. The default is [`Backend::linear_act`] into a temporary,
    /// then [`Backend::linear`]; a backend may keep `act(pre)` in a form of
    /// its own (the fast CPU backend's bf16 products write it as the second
    /// product's packed bf16 operand, never as f32).
    fn mlp_fwd(
        &self,
        pre: &mut Self::Buf,
        out: &mut Self::Buf,
        act: Act,
        a: &Self::Buf,
        (first, second): (Proj<'_, Self::Buf>, Proj<'_, Self::Buf>),
        m: usize,
        k: usize,
    ) {
        mlp_in_turn(self, pre, out, act, a, (first, second), m, k)
    }
    /// A linear layer and its activation: `pre[m×n] = a·op(b) (+ bias)` (as
    /// [`Backend::matmul`] and [`Backend::bias_add`]) and `out = act(pre)`
    /// (as [`Backend::act_fwd`]); `pre` is what the backward pass keeps.
    /// The default is those ops in turn; a backend may write `out` in the
    /// product's epilogue (CUDA does): no pass of its own over `pre`.
    #[allow(clippy::too_many_arguments)]
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
        self.linear(pre, a, b, bias, m, n, k, tb);
        self.act_fwd(act, out, pre, m * n);
    }
    /// The gradient at an activation's input from the product that gives
    /// the gradient at its output: `dx[m×n] = act'(pre) ⊙ (a·op(b))`, `pre`
    /// the activation's saved input; with `db = Some((grads, off))` also
    /// that layer's bias gradient, `grads[off + j] += Σ_i dx[i, j]`. The
    /// default is [`Backend::matmul`] into a temporary, [`Backend::act_bwd`]
    /// and [`Backend::bias_grad`]; a backend may do it all in the product's
    /// epilogue (CUDA does): no temporary and no pass of its own.
    #[allow(clippy::too_many_arguments)]
    fn matmul_act_grad(
        &self,
        dx: &mut Self::Buf,
        act: Act,
        pre: &Self::Buf,
        a: &Self::Buf,
        b: &Self::Buf,
        db: Option<(&mut Self::Buf, usize)>,
        m: usize,
        n: usize,
        k: usize,
        tb: bool,
    ) {
        let mut t = self.output(m * n);
        self.matmul(&mut t, a, b, m, n, k, false, tb, false);
        self.act_bwd(act, dx, pre, &t, m * n);
        if let Some((grads, off)) = db {
            self.bias_grad(grads, off, dx, m, n);
        }
    }
    /// A SwiGLU's second product and the gate: `up[m×n] = a·op(b) (+ bias)`
    /// (what the backward keeps) and `h = silu(gate) ⊙ up` (as
    /// [`Backend::swiglu_fwd`]), `gate` the first product's output. The
    /// default is those ops in turn; a backend may form `h` in the product's
    /// epilogue (CUDA does): no pass of its own over `gate` and `up`.
    #[allow(clippy::too_many_arguments)]
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
        self.linear(up, a, b, bias, m, n, k, tb);
        self.swiglu_fwd(h, gate, up, m * n);
    }
    /// A SwiGLU's input gradients from the product that gives the gradient
    /// at its output, `dh[m×n] = a·op(b)`: `dgate`, `dup` as
    /// [`Backend::swiglu_bwd`] of the saved `gate` and `up`. The default is
    /// [`Backend::matmul`] into a temporary, then `swiglu_bwd`; a backend may
    /// do it in the product's epilogue (CUDA does): no temporary.
    #[allow(clippy::too_many_arguments)]
    fn matmul_swiglu_grad(
        &self,
        dgate: &mut Self::Buf,
        dup: &mut Self::Buf,
        gate: &Self::Buf,
        up: &Self::Buf,
        a: &Self::Buf,
        b: &Self::Buf,
        m: usize,
        n: usize,
        k: usize,
        tb: bool,
    ) {
        let mut t = self.output(m * n);
        self.matmul(&mut t, a, b, m, n, k, false, tb, false);
        self.swiglu_bwd(dgate, dup, &t, gate, up, m * n);
    }
    /// `y[r, c] += bias[bias_off + c]` for a `rows × cols` matrix.
    fn bias_add(
        &self,
        y: &mut Self::Buf,
        bias: &Self::Buf,
        bias_off: usize,
        rows: usize,
        cols: usize,
    );
    /// Bias gradient, accumulated: `db[db_off + c] += Σ_r dy[r, c]`.
    fn bias_grad(
        &self,
        db: &mut Self::Buf,
        db_off: usize,
        dy: &Self::Buf,
        rows: usize,
        cols: usize,
    );
    /// `y[i] += x[i]` for the first `n` elements (residual connections).
    fn add(&self, y: &mut Self::Buf, x: &Self::Buf, n: usize);
    /// `y[i] *= s` for the first `n` elements.
    fn scale(&self, y: &mut Self::Buf, s: f64, n: usize);
    /// `Σ y[i]²` over the first `n` elements (read back to the host; used for
    /// global-norm gradient clipping).
    fn sum_sq(&self, y: &Self::Buf, n: usize) -> f64;

    // ---- element-wise -----------------------------------------------------
    /// `y = act(x)` on the first `n` elements.
    fn act_fwd(&self, act: Act, y: &mut Self::Buf, x: &Self::Buf, n: usize);
    /// `dx = dy · act'(x)`, given the activation's input `x`.
    fn act_bwd(&self, act: Act, dx: &mut Self::Buf, x: &Self::Buf, dy: &Self::Buf, n: usize);
    /// In-place inverted dropout: `y[i] = keep(i) ? y[i] / (1-p) : 0`, with
    /// `keep` from [`dropout_keep`]. The backward pass is the same call on the
    /// gradient with the same seed.
    fn dropout(&self, y: &mut Self::Buf, n: usize, p: f32, seed: u64);
    /// `y = dropout(y) + x` on the first `n` elements (a residual connection
    /// after a dropped-out sublayer; the same mask as [`Backend::dropout`]).
    /// Default: the two passes; a backend may fuse them.
    fn dropout_add(&self, y: &mut Self::Buf, x: &Self::Buf, n: usize, p: f32, seed: u64) {
        self.dropout(y, n, p, seed);
        self.add(y, x, n);
    }
    /// `y = dropout(x)` on the first `n` elements, out of place (the same
    /// mask as [`Backend::dropout`]). Default: copy, then the mask.
    fn dropout_from(&self, y: &mut Self::Buf, x: &Self::Buf, n: usize, p: f32, seed: u64) {
        self.copy(y, 0, x, 0, n);
        self.dropout(y, n, p, seed);
    }

    // ---- normalisation ----------------------------------------------------
    /// LayerNorm over rows: `y = xhat·gamma + beta`, saving `xhat` (rows×cols)
    /// and `rstd` (rows) for the backward pass.
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
    );
    /// LayerNorm of a residual sum, `y = LN(drop(s) + res)` (a post-LN block:
    /// a sublayer's output `s`, dropped out when `drop` is given, plus the
    /// sublayer's input `res`), saving `xhat` and `rstd` as
    /// [`Backend::layernorm_fwd`] does. `s` is scratch afterwards: the
    /// default leaves the sum in it ([`Backend::dropout_add`] or
    /// [`Backend::add`], then [`Backend::layernorm_fwd`]); a backend may form
    /// the sum as it reads each row instead (CUDA and the fast CPU backend
    /// do: one pass over `s` and `res`, no sum written).
    #[allow(clippy::too_many_arguments)]
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
        let n = rows * cols;
        match drop {
            Some(d) => self.dropout_add(s, res, n, d.p, d.seed),
            None => self.add(s, res, n),
        }
        self.layernorm_fwd(y, xhat, rstd, s, gamma, beta, beta_off, rows, cols, eps);
    }
    /// LayerNorm input gradient (overwrites `dx`); `beta`'s gradient is the
    /// column sum of `dy` ([`Backend::bias_grad`]).
    fn layernorm_bwd(
        &self,
        dx: &mut Self::Buf,
        dy: &Self::Buf,
        xhat: &Self::Buf,
        rstd: &Self::Buf,
        gamma: &Self::Buf,
        rows: usize,
        cols: usize,
    );

    // ---- attention --------------------------------------------------------
    /// Softmax attention with a key padding mask (`mask[b·kv_seq]`, 1 = real
    /// token, 0 = padding). Writes `out` (`[b, seq, heads, head_dim]`) and the
    /// log-sum-exp of each query's scores `lse` (`[b, heads, seq]`), which is
    /// all the backward pass needs besides q, k, v and out. A query that sees
    /// no key (fully padded, causal) gets zero output and `lse = -inf`.
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
    );
    /// Gradients of q, k and v (overwritten) from `dout`. Training shape only
    /// (`kv_seq == seq`, `q_start == 0`).
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
    );

    /// RMSNorm over rows: `y = xhat·gamma` with `xhat = x / sqrt(mean(x²) + eps)`,
    /// saving `xhat` and `rstd` (LLaMA family; no bias).
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
    );
    /// RMSNorm input gradient (overwrites `dx`).
    fn rmsnorm_bwd(
        &self,
        dx: &mut Self::Buf,
        dy: &Self::Buf,
        xhat: &Self::Buf,
        rstd: &Self::Buf,
        gamma: &Self::Buf,
        rows: usize,
        cols: usize,
    );

    /// Rotary position embedding, in place, on `x` = `[rows, heads, head_dim]`
    /// with one position per row: the pair `(i, i + head_dim/2)` of every head
    /// is rotated by `pos · theta^(-2i/head_dim)` (Hugging Face's
    /// `rotate_half` convention). `inverse` rotates by the negative angle,
    /// which is the backward pass.
    fn rope(
        &self,
        x: &mut Self::Buf,
        positions: &Self::Ids,
        rows: usize,
        heads: usize,
        head_dim: usize,
        theta: f64,
        inverse: bool,
    );

    /// SwiGLU: `h = silu(gate) · up` on the first `n` elements.
    fn swiglu_fwd(&self, h: &mut Self::Buf, gate: &Self::Buf, up: &Self::Buf, n: usize);
    /// SwiGLU backward: `dgate = dh·up·silu'(gate)`, `dup = dh·silu(gate)`.
    fn swiglu_bwd(
        &self,
        dgate: &mut Self::Buf,
        dup: &mut Self::Buf,
        dh: &Self::Buf,
        gate: &Self::Buf,
        up: &Self::Buf,
        n: usize,
    );

    // ---- embeddings, pooling, loss, optimiser -----------------------------
    /// `out[r, :] (+)= table[ids[r], :]` for `rows` ids of width `dim`.
    /// Ids out of range are a caller bug (checked before upload).
    fn embedding_fwd(
        &self,
        out: &mut Self::Buf,
        table: &Self::Buf,
        ids: &Self::Ids,
        rows: usize,
        dim: usize,
        accumulate: bool,
    );
    /// Scatter-add rows (the backward of a row gather through
    /// [`Backend::embedding_fwd`]): `dx[idx[r], :] += dy[r, :]`. Indices may
    /// repeat.
    fn scatter_add_rows(
        &self,
        dx: &mut Self::Buf,
        dy: &Self::Buf,
        idx: &Self::Ids,
        rows: usize,
        cols: usize,
    );
    /// `y[r, :] *= w[r]` for a `rows × cols` matrix.
    fn scale_rows(&self, y: &mut Self::Buf, w: &Self::Buf, rows: usize, cols: usize);
    /// Pool `h` (`[b, t, d]`) into `out` (`[b, d]`).
    fn pool_fwd(
        &self,
        kind: PoolKind,
        out: &mut Self::Buf,
        h: &Self::Buf,
        mask: &Self::Buf,
        b: usize,
        t: usize,
        d: usize,
    );
    /// Gradient of pooling (overwrites `dh`, zero where nothing flows).
    fn pool_bwd(
        &self,
        kind: PoolKind,
        dh: &mut Self::Buf,
        dout: &Self::Buf,
        mask: &Self::Buf,
        b: usize,
        t: usize,
        d: usize,
    );
    /// Softmax cross-entropy over `classes` per row: writes each row's loss to
    /// `losses[r]` and `dlogits = (softmax - onehot) · grad_scale`.
    fn cross_entropy(
        &self,
        losses: &mut Self::Buf,
        dlogits: &mut Self::Buf,
        logits: &Self::Buf,
        labels: &Self::Ids,
        rows: usize,
        classes: usize,
        grad_scale: f64,
    );
    /// Candidate-scoring loss (decoder classification and multiple choice).
    /// `tok_loss[r]` is the answer token's `−log p` (from
    /// [`Backend::cross_entropy`] with `grad_scale = 1`). A candidate's score
    /// is its length-normalised log-likelihood `s_c = −mean_{r∈c} tok_loss[r]`;
    /// each example's loss is the cross-entropy of `softmax(s)` against its
    /// gold candidate. Writes `ex_loss[e]`, `scores[c]` and `row_w[r]`, the
    /// factor by which row `r` of the token-level `dlogits` must be scaled
    /// ([`Backend::scale_rows`]) to give the gradient of
    /// `grad_scale · Σ_e ex_loss[e]`.
    fn candidate_loss(
        &self,
        ex_loss: &mut Self::Buf,
        scores: &mut Self::Buf,
        row_w: &mut Self::Buf,
        tok_loss: &Self::Buf,
        idx: &CandidateIndex<'_, Self::Ids>,
        grad_scale: f64,
    );
    /// Squared error for regression heads: `losses[r] = (x[r]-y[r])²`,
    /// `dx = 2(x - y)·grad_scale`.
    fn mse(
        &self,
        losses: &mut Self::Buf,
        dx: &mut Self::Buf,
        x: &Self::Buf,
        target: &Self::Buf,
        rows: usize,
        grad_scale: f64,
    );
    /// One AdamW step over the first `n` elements of a parameter group.
    fn adamw(
        &self,
        params: &mut Self::Buf,
        grads: &Self::Buf,
        m: &mut Self::Buf,
        v: &mut Self::Buf,
        n: usize,
        h: AdamW,
    );
}

/// Bytes of device memory held by a backend's buffers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemoryStats {
    /// Bytes held now.
    pub live: u64,
    /// Most bytes held at once since the backend was made (or since
    /// [`Backend::reset_peak`]).
    pub peak: u64,
}

/// The counter-based dropout draw shared by every backend: element `idx` of
/// the tensor seeded by `seed` is kept when this returns true. Uses only
/// 32-bit integer operations so that WGSL can reproduce it.
#[inline]
pub fn dropout_keep(seed: u64, idx: u32, p: f32) -> bool {
    if p <= 0.0 {
        return true;
    }
    let h = hash32(hash32(idx ^ (seed as u32)) ^ ((seed >> 32) as u32));
    // 24 uniform bits in [0, 1).
    ((h >> 8) as f32) * (1.0 / 16_777_216.0) >= p
}

/// A 32-bit integer mixer (the "lowbias32" finaliser).
#[inline]
pub fn hash32(mut x: u32) -> u32 {
    x ^= x >> 16;
    x = x.wrapping_mul(0x7feb_352d);
    x ^= x >> 15;
    x = x.wrapping_mul(0x846c_a68b);
    x ^= x >> 16;
    x
}

/// Whether the environment variable `var` picks bf16 over the default f32
/// (`f32` or unset/empty: false; `bf16`: true; anything else an error
/// naming the variable). The CPU and CUDA kernel switches read theirs so.
pub fn env_bf16(var: &str) -> Result<bool> {
    match std::env::var(var).as_deref() {
        Err(_) | Ok("") | Ok("f32") => Ok(false),
        Ok("bf16") => Ok(true),
        Ok(v) => Err(Error::msg(format!("{var}={v}: expected f32 or bf16"))),
    }
}

/// Derive a sub-seed (per step, per layer, per dropout site) from a seed.
#[inline]
pub fn sub_seed(seed: u64, a: u64) -> u64 {
    let mut z = seed ^ a.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}
