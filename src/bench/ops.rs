//! The op table of `beft bench`: each hot-path op of the
//! [`Backend`] vocabulary at a model shape's sizes, timed on the device.

use std::cell::RefCell;
use std::time::Instant;

use super::{BenchArgs, Ceilings, OpRow, Shape};
use crate::backend::{Act, AdamW, AttnDims, Backend};
use crate::error::Result;
use crate::float::Float;
use crate::rng::Rng;
use crate::train::run::median;
use crate::weights::TensorView;

/// Host values recycled into every random buffer (4 Mi values).
const POOL: usize = 1 << 22;
/// The vocabulary of the cross-entropy and embedding rows (OPT's).
const VOCAB: usize = 50272;
/// Ops timed per shape (for the progress bar).
const OPS_PER_SHAPE: u64 = 24;

/// Median seconds per launch, launches per timed repetition, input sets.
#[derive(Clone, Copy, Debug)]
pub(super) struct Timing {
    pub median: f64,
    pub inner: usize,
    pub sets: usize,
}

/// The device, the timing settings and a source of random inputs.
pub(super) struct Env<'a, B: Backend> {
    be: &'a B,
    reps: usize,
    warmup: usize,
    quick: bool,
    gpu: bool,
    progress: bool,
    /// Input sets are rotated until their total reaches this many bytes.
    rotate_bytes: usize,
    /// Bytes per element of a frozen weight matrix on this backend.
    weight_bytes: usize,
    /// A repetition lasts at least this long (short ops are repeated).
    min_rep_s: f64,
    /// The op families to time (`None`: all).
    families: Option<Vec<String>>,
    pool: Vec<f32>,
    rng: RefCell<Rng>,
}

impl<'a, B: Backend> Env<'a, B> {
    pub(super) fn new(be: &'a B, args: &BenchArgs, gpu: bool) -> Self {
        // The width the backend stores a frozen weight matrix at (bf16 on
        // CUDA), as it reports it.
        let probe = TensorView::from_f32("bench.probe", vec![2, 2], &[0.0; 4]);
        let weight_bytes = be.weight_bytes(&probe) as usize / 4;
        let mut rng = Rng::new(0xbe9c);
        let pool = (0..POOL)
            .map(|_| ((rng.next_u64() >> 40) as f32 / (1u64 << 23) as f32) - 1.0)
            .collect();
        Env {
            be,
            reps: args.reps,
            warmup: args.warmup,
            quick: args.quick,
            gpu,
            progress: args.progress,
            // More than an H100's 50 MB L2; on the CPU more than a typical L3
            // slice, while keeping memory modest.
            rotate_bytes: if args.quick {
                1 << 20
            } else if gpu {
                256 << 20
            } else {
                64 << 20
            },
            weight_bytes,
            min_rep_s: if args.quick { 1e-4 } else { 1e-3 },
            families: args.op_families.clone(),
            pool,
            rng: RefCell::new(rng),
        }
    }

    /// Whether the op family `f` (one of [`super::OP_FAMILIES`]) is timed.
    fn wants(&self, f: &str) -> bool {
        self.families
            .as_ref()
            .is_none_or(|fs| fs.iter().any(|x| x == f))
    }

    /// Values `pool[start..]` cycled to length `n`, scaled.
    fn host(&self, n: usize, scale: f32) -> Vec<f32> {
        let start = self.rng.borrow_mut().below(POOL);
        self.pool
            .iter()
            .cycle()
            .skip(start)
            .take(n)
            .map(|x| x * scale)
            .collect()
    }

    /// A device buffer of `n` random values in [-1, 1).
    fn rand(&self, n: usize) -> B::Buf {
        let v: Vec<B::T> = self.host(n, 1.0).into_iter().map(B::T::from_f32).collect();
        self.be.upload(&v)
    }

    /// A frozen `rows × cols` weight, held as the backend holds checkpoint
    /// weights (bf16 on CUDA).
    fn weight(&self, rows: usize, cols: usize) -> Result<B::Buf> {
        let v = self.host(rows * cols, 0.05);
        self.be
            .weight(&TensorView::from_f32("bench.weight", vec![rows, cols], &v))
    }

    fn ids(&self, n: usize, below: usize) -> B::Ids {
        let mut rng = self.rng.borrow_mut();
        let v: Vec<u32> = (0..n).map(|_| rng.below(below) as u32).collect();
        self.be.upload_ids(&v)
    }

    /// How many input sets of `set_bytes` to rotate through.
    fn sets(&self, set_bytes: usize) -> usize {
        if self.quick {
            return 2;
        }
        self.rotate_bytes.div_ceil(set_bytes.max(1)).clamp(1, 16)
    }

    /// Time `f(i)` (launch number `i`, to pick the input set): `warmup`
    /// launches, one to estimate the launch time, then `reps` repetitions of
    /// enough launches to last `min_rep_s`, the device waited for before
    /// each clock read. Returns the median seconds per launch.
    fn time(&self, sets: usize, f: &mut dyn FnMut(usize)) -> Timing {
        let be = self.be;
        let mut i = 0usize;
        for _ in 0..self.warmup {
            f(i);
            i += 1;
        }
        be.sync();
        let t0 = Instant::now();
        f(i);
        i += 1;
        be.sync();
        let one = t0.elapsed().as_secs_f64();
        let inner = if one >= self.min_rep_s {
            1
        } else {
            ((self.min_rep_s / one.max(1e-8)).ceil() as usize).clamp(1, 10_000)
        };
        let mut ts = Vec::with_capacity(self.reps);
        for _ in 0..self.reps {
            let t0 = Instant::now();
            for _ in 0..inner {
                f(i);
                i += 1;
            }
            be.sync();
            ts.push(t0.elapsed().as_secs_f64() / inner as f64);
        }
        Timing {
            median: median(&mut ts),
            inner,
            sets,
        }
    }

    /// Copy bandwidth: a large device-to-device `copy`, bytes read + written
    /// per second. Returns (GB/s, elements).
    pub(super) fn copy_ceiling(&self) -> Result<(f64, usize)> {
        let n = if self.quick {
            1 << 18
        } else if self.gpu {
            // 128 MiB a buffer: over any L2, and within wgpu's default
            // 128 MiB storage-binding limit.
            1 << 25
        } else {
            1 << 24
        };
        let be = self.be;
        let mut src = be.zeros(n);
        be.fill(&mut src, 1.0);
        let mut dst = be.zeros(n);
        let t = self.time(1, &mut |_| be.copy(&mut dst, 0, &src, 0, n));
        Ok((8.0 * n as f64 / t.median / 1e9, n))
    }

    fn row(
        &self,
        shape: &Shape,
        op: &str,
        desc: String,
        t: Timing,
        flops: Option<f64>,
        bytes: Option<f64>,
        c: &Ceilings,
    ) -> OpRow {
        let tflops = flops.map(|f| f / t.median / 1e12);
        let gbs = bytes.map(|b| b / t.median / 1e9);
        let (pct, ceiling) = match (tflops, gbs) {
            (Some(tf), _) => (
                c.gemm.as_ref().map(|g| 100.0 * tf / g.tflops),
                "gemm".to_string(),
            ),
            (None, Some(g)) => (Some(100.0 * g / c.copy_gbs), "copy".to_string()),
            _ => (None, String::new()),
        };
        OpRow {
            model_shape: shape.name().into(),
            op: op.into(),
            shape: desc,
            median_s: t.median,
            launches_per_rep: t.inner,
            sets: t.sets,
            flops,
            bytes,
            tflops,
            gbs,
            pct_of_ceiling: pct,
            ceiling,
        }
    }

    /// Every op at every shape.
    pub(super) fn all_ops(
        &self,
        shapes: &[Shape],
        tokens: usize,
        c: &Ceilings,
    ) -> Result<Vec<OpRow>> {
        // The whole table's length is known; a filtered one (--ops) counts up.
        let (pb, template) = match (self.progress, &self.families) {
            (false, _) => (indicatif::ProgressBar::hidden(), ""),
            (true, None) => (
                indicatif::ProgressBar::new(OPS_PER_SHAPE * shapes.len() as u64),
                "{spinner} ops [{bar:30}] {pos}/{len} {msg}",
            ),
            (true, Some(_)) => (
                indicatif::ProgressBar::new_spinner(),
                "{spinner} ops {pos} {msg}",
            ),
        };
        pb.set_style(
            indicatif::ProgressStyle::with_template(template)
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        let mut rows = Vec::new();
        for s in shapes {
            self.shape_ops(s, tokens, c, &mut rows, &pb)?;
        }
        pb.finish_and_clear();
        Ok(rows)
    }

    fn shape_ops(
        &self,
        shape: &Shape,
        n: usize,
        c: &Ceilings,
        rows: &mut Vec<OpRow>,
        pb: &indicatif::ProgressBar,
    ) -> Result<()> {
        let be = self.be;
        let (d, f, h, hd) = (shape.hidden(), shape.ffn(), shape.heads(), shape.head_dim());
        let wb = self.weight_bytes;
        let mut push = |r: OpRow| {
            pb.set_message(format!("{} {}", r.model_shape, r.op));
            pb.inc(1);
            rows.push(r);
        };

        // Products: forward y = x·Wᵀ (W stored [out, in]) and the input
        // gradient dx = dy·W, at the q/k/v/o, fc1 and fc2 sizes.
        if self.wants("matmul") {
            for (label, n_out, n_in) in [("qkvo", d, d), ("ffn_up", f, d), ("ffn_down", d, f)] {
                let flops = Some(2.0 * n as f64 * n_out as f64 * n_in as f64);
                {
                    let k = self.sets((n * n_in + n * n_out) * 4 + n_out * n_in * wb);
                    let mut s = Vec::with_capacity(k);
                    for _ in 0..k {
                        s.push((
                            self.rand(n * n_in),
                            self.weight(n_out, n_in)?,
                            be.zeros(n * n_out),
                        ));
                    }
                    let t = self.time(k, &mut |i| {
                        let (x, w, y) = &mut s[i % k];
                        be.matmul(y, x, w, n, n_out, n_in, false, true, false)
                    });
                    push(self.row(
                        shape,
                        "matmul_fwd x·Wᵀ",
                        format!("{label} {n}x{n_out}x{n_in} (m x n x k)"),
                        t,
                        flops,
                        None,
                        c,
                    ));
                    // What a linear layer runs: the same product with its bias
                    // (fused into the epilogue where the backend can).
                    let bias = self.rand(n_out);
                    let t = self.time(k, &mut |i| {
                        let (x, w, y) = &mut s[i % k];
                        be.matmul_bias(y, x, w, (&bias, 0), n, n_out, n_in, false, true)
                    });
                    push(self.row(
                        shape,
                        "linear_fwd x·Wᵀ + b",
                        format!("{label} {n}x{n_out}x{n_in} (m x n x k)"),
                        t,
                        flops,
                        None,
                        c,
                    ));
                    // The FFN's first layer: the same with its GELU (fused
                    // into the epilogue where the backend can).
                    if label == "ffn_up" {
                        let mut outs: Vec<_> = (0..k).map(|_| be.zeros(n * n_out)).collect();
                        let t = self.time(k, &mut |i| {
                            let (x, w, y) = &mut s[i % k];
                            let (b, g) = (Some((&bias, 0)), &mut outs[i % k]);
                            be.linear_act(y, g, Act::Gelu, x, w, b, n, n_out, n_in, true)
                        });
                        push(self.row(
                            shape,
                            "linear_act_fwd gelu(x·Wᵀ + b)",
                            format!("{label} {n}x{n_out}x{n_in} (m x n x k)"),
                            t,
                            flops,
                            None,
                            c,
                        ));
                        // LLaMA's: the up product with silu(gate)·up.
                        let gates: Vec<_> = (0..k).map(|_| self.rand(n * n_out)).collect();
                        let t = self.time(k, &mut |i| {
                            let (x, w, y) = &mut s[i % k];
                            let (gate, h) = (&gates[i % k], &mut outs[i % k]);
                            be.linear_swiglu(y, h, gate, x, w, None, n, n_out, n_in, true)
                        });
                        push(self.row(
                            shape,
                            "linear_swiglu silu(g)·(x·Wᵀ)",
                            format!("{label} {n}x{n_out}x{n_in} (m x n x k)"),
                            t,
                            flops,
                            None,
                            c,
                        ));
                    }
                }
                {
                    let k = self.sets((n * n_in + n * n_out) * 4 + n_out * n_in * wb);
                    let mut s = Vec::with_capacity(k);
                    for _ in 0..k {
                        s.push((
                            self.rand(n * n_out),
                            self.weight(n_out, n_in)?,
                            be.zeros(n * n_in),
                        ));
                    }
                    let t = self.time(k, &mut |i| {
                        let (dy, w, dx) = &mut s[i % k];
                        be.matmul(dx, dy, w, n, n_in, n_out, false, false, false)
                    });
                    push(self.row(
                        shape,
                        "matmul_bwd dy·W",
                        format!("{label} {n}x{n_in}x{n_out} (m x n x k)"),
                        t,
                        flops,
                        None,
                        c,
                    ));
                    // The gradient at the FFN's GELU input: the same product
                    // times gelu' of the saved pre-activation.
                    if label == "ffn_down" {
                        let pres: Vec<_> = (0..k).map(|_| self.rand(n * n_in)).collect();
                        let t = self.time(k, &mut |i| {
                            let (dy, w, dx) = &mut s[i % k];
                            let pre = &pres[i % k];
                            let act = Act::Gelu;
                            be.matmul_act_grad(dx, act, pre, dy, w, None, n, n_in, n_out, false)
                        });
                        push(self.row(
                            shape,
                            "matmul_act_grad gelu'(f)·(dy·W)",
                            format!("{label} {n}x{n_in}x{n_out} (m x n x k)"),
                            t,
                            flops,
                            None,
                            c,
                        ));
                        // LLaMA's: dgate and dup from the same product.
                        let ups: Vec<_> = (0..k).map(|_| self.rand(n * n_in)).collect();
                        let mut dups: Vec<_> = (0..k).map(|_| be.zeros(n * n_in)).collect();
                        let t = self.time(k, &mut |i| {
                            let (dy, w, dg) = &mut s[i % k];
                            let (gate, up, du) = (&pres[i % k], &ups[i % k], &mut dups[i % k]);
                            be.matmul_swiglu_grad(dg, du, gate, up, dy, w, n, n_in, n_out, false)
                        });
                        push(self.row(
                            shape,
                            "matmul_swiglu_grad swiglu'(g, u)·(dy·W)",
                            format!("{label} {n}x{n_in}x{n_out} (m x n x k)"),
                            t,
                            flops,
                            None,
                            c,
                        ));
                    }
                }
            }
        }

        // Bias add and bias gradient at the MLP width; the residual add.
        if self.wants("bias") {
            {
                let k = self.sets(n * f * 4);
                let mut s: Vec<_> = (0..k).map(|_| (self.rand(n * f), self.rand(f))).collect();
                let t = self.time(k, &mut |i| {
                    let (y, b) = &mut s[i % k];
                    be.bias_add(y, b, 0, n, f)
                });
                let bytes = (8 * n * f + 4 * f) as f64;
                push(self.row(
                    shape,
                    "bias_add",
                    format!("{n}x{f}"),
                    t,
                    None,
                    Some(bytes),
                    c,
                ));
            }
            {
                let k = self.sets(n * f * 4);
                let mut s: Vec<_> = (0..k).map(|_| (be.zeros(f), self.rand(n * f))).collect();
                let t = self.time(k, &mut |i| {
                    let (db, dy) = &mut s[i % k];
                    be.bias_grad(db, 0, dy, n, f)
                });
                let bytes = (4 * n * f + 8 * f) as f64;
                push(self.row(
                    shape,
                    "bias_grad",
                    format!("{n}x{f}"),
                    t,
                    None,
                    Some(bytes),
                    c,
                ));
            }
            {
                let k = self.sets(n * d * 8);
                let mut s: Vec<_> = (0..k)
                    .map(|_| (self.rand(n * d), self.rand(n * d)))
                    .collect();
                let t = self.time(k, &mut |i| {
                    let (y, x) = &mut s[i % k];
                    be.add(y, x, n * d)
                });
                let bytes = (12 * n * d) as f64;
                push(self.row(
                    shape,
                    "add (residual)",
                    format!("{n}x{d}"),
                    t,
                    None,
                    Some(bytes),
                    c,
                ));
            }
        }

        // Activations at the MLP width.
        if self.wants("activation") {
            for (act, name) in [(Act::Gelu, "gelu"), (Act::Relu, "relu")] {
                {
                    let k = self.sets(n * f * 8);
                    let mut s: Vec<_> = (0..k)
                        .map(|_| (be.zeros(n * f), self.rand(n * f)))
                        .collect();
                    let t = self.time(k, &mut |i| {
                        let (y, x) = &mut s[i % k];
                        be.act_fwd(act, y, x, n * f)
                    });
                    let bytes = (8 * n * f) as f64;
                    push(self.row(
                        shape,
                        &format!("act_fwd {name}"),
                        format!("{n}x{f}"),
                        t,
                        None,
                        Some(bytes),
                        c,
                    ));
                }
                {
                    let k = self.sets(n * f * 12);
                    let mut s: Vec<_> = (0..k)
                        .map(|_| (be.zeros(n * f), self.rand(n * f), self.rand(n * f)))
                        .collect();
                    let t = self.time(k, &mut |i| {
                        let (dx, x, dy) = &mut s[i % k];
                        be.act_bwd(act, dx, x, dy, n * f)
                    });
                    let bytes = (12 * n * f) as f64;
                    push(self.row(
                        shape,
                        &format!("act_bwd {name}"),
                        format!("{n}x{f}"),
                        t,
                        None,
                        Some(bytes),
                        c,
                    ));
                }
            }
        }

        // Normalisation over rows of the hidden width.
        if self.wants("norm") {
            let norm_bytes = (12 * n * d + 4 * n + 8 * d) as f64;
            for rms in [false, true] {
                let name = if rms { "rmsnorm" } else { "layernorm" };
                {
                    let k = self.sets(n * d * 12);
                    let mut s: Vec<_> = (0..k)
                        .map(|_| {
                            (
                                be.zeros(n * d),
                                be.zeros(n * d),
                                be.zeros(n),
                                self.rand(n * d),
                                self.rand(d),
                                self.rand(d),
                            )
                        })
                        .collect();
                    let t = self.time(k, &mut |i| {
                        let (y, xhat, rstd, x, g, b) = &mut s[i % k];
                        if rms {
                            be.rmsnorm_fwd(y, xhat, rstd, x, g, n, d, 1e-5)
                        } else {
                            be.layernorm_fwd(y, xhat, rstd, x, g, b, 0, n, d, 1e-5)
                        }
                    });
                    push(self.row(
                        shape,
                        &format!("{name}_fwd"),
                        format!("{n}x{d}"),
                        t,
                        None,
                        Some(norm_bytes),
                        c,
                    ));
                    // A post-LN block's: the LayerNorm of a residual sum.
                    if !rms {
                        let res: Vec<_> = (0..k).map(|_| self.rand(n * d)).collect();
                        let t = self.time(k, &mut |i| {
                            let (y, xhat, rstd, x, g, b) = &mut s[i % k];
                            let r = &res[i % k];
                            be.residual_layernorm_fwd(
                                y, xhat, rstd, x, r, None, g, b, 0, n, d, 1e-5,
                            )
                        });
                        push(self.row(
                            shape,
                            "residual_layernorm_fwd LN(s + res)",
                            format!("{n}x{d}"),
                            t,
                            None,
                            Some(norm_bytes + (4 * n * d) as f64),
                            c,
                        ));
                    }
                }
                {
                    let k = self.sets(n * d * 12);
                    let mut s: Vec<_> = (0..k)
                        .map(|_| {
                            (
                                be.zeros(n * d),
                                self.rand(n * d),
                                self.rand(n * d),
                                self.rand(n),
                                self.rand(d),
                            )
                        })
                        .collect();
                    let t = self.time(k, &mut |i| {
                        let (dx, dy, xhat, rstd, g) = &mut s[i % k];
                        if rms {
                            be.rmsnorm_bwd(dx, dy, xhat, rstd, g, n, d)
                        } else {
                            be.layernorm_bwd(dx, dy, xhat, rstd, g, n, d)
                        }
                    });
                    push(self.row(
                        shape,
                        &format!("{name}_bwd"),
                        format!("{n}x{d}"),
                        t,
                        None,
                        Some(norm_bytes),
                        c,
                    ));
                }
            }
        }

        // Attention: a causal batch, and an encoder batch with 25 % padding.
        if self.wants("attention") {
            let t_len = n.min(2048);
            let b = (n / t_len).max(1);
            let qn = b * t_len * h * hd;
            for causal in [true, false] {
                let real = if causal {
                    t_len
                } else {
                    (t_len - t_len / 4).max(1)
                };
                let mask_host: Vec<B::T> = (0..b * t_len)
                    .map(|i| B::T::from_f32(if i % t_len < real { 1.0 } else { 0.0 }))
                    .collect();
                let mask = be.upload(&mask_host);
                let dims = AttnDims::self_attn(b, t_len, h, h, hd, causal);
                let mut fwd = 4.0 * (b * h) as f64 * t_len as f64 * real as f64 * hd as f64;
                if causal {
                    fwd *= 0.5;
                }
                let kind = if causal { "causal" } else { "padded 25%" };
                let desc = format!("{kind}, {b}x{t_len} tokens, {h} heads x {hd}");
                {
                    let k = self.sets(qn * 16);
                    let mut s: Vec<_> = (0..k)
                        .map(|_| {
                            (
                                be.zeros(qn),
                                be.zeros(b * h * t_len),
                                self.rand(qn),
                                self.rand(qn),
                                self.rand(qn),
                            )
                        })
                        .collect();
                    let t = self.time(k, &mut |i| {
                        let (out, lse, q, kk, v) = &mut s[i % k];
                        be.attention_fwd(out, lse, q, kk, v, &mask, dims, None)
                    });
                    push(self.row(shape, "attention_fwd", desc.clone(), t, Some(fwd), None, c));
                }
                {
                    let k = self.sets(qn * 36);
                    let mut s = Vec::with_capacity(k);
                    for _ in 0..k {
                        let (q, kk, v) = (self.rand(qn), self.rand(qn), self.rand(qn));
                        let (mut out, mut lse) = (be.zeros(qn), be.zeros(b * h * t_len));
                        be.attention_fwd(&mut out, &mut lse, &q, &kk, &v, &mask, dims, None);
                        s.push((
                            be.zeros(qn),
                            be.zeros(qn),
                            be.zeros(qn),
                            self.rand(qn),
                            q,
                            kk,
                            v,
                            out,
                            lse,
                        ));
                    }
                    let t = self.time(k, &mut |i| {
                        let (dq, dk, dv, dout, q, kk, v, out, lse) = &mut s[i % k];
                        be.attention_bwd(dq, dk, dv, dout, q, kk, v, out, lse, &mask, dims, None)
                    });
                    push(self.row(shape, "attention_bwd", desc, t, Some(2.5 * fwd), None, c));
                }
            }
        }

        // Embedding gather from a vocabulary-sized table (smaller on the CPU,
        // to keep memory modest: a gather's traffic does not depend on it).
        let tiny = shape.name().ends_with("-tiny");
        let vocab = if tiny { 1000 } else { VOCAB };
        if self.wants("embedding") {
            let rows_t = if self.gpu || tiny {
                vocab
            } else {
                vocab.min(8192)
            };
            let table = self.weight(rows_t, d)?;
            let k = self.sets(n * d * 4);
            let mut s: Vec<_> = (0..k)
                .map(|_| (be.zeros(n * d), self.ids(n, rows_t)))
                .collect();
            let t = self.time(k, &mut |i| {
                let (out, ids) = &mut s[i % k];
                be.embedding_fwd(out, &table, ids, n, d, false)
            });
            let bytes = (n * d * wb + 4 * n * d + 4 * n) as f64;
            push(self.row(
                shape,
                "embedding_fwd",
                format!("{n} rows of a {rows_t}x{d} table"),
                t,
                None,
                Some(bytes),
                c,
            ));
        }

        // Softmax cross-entropy over the vocabulary.
        if self.wants("cross_entropy") {
            let r = n.min(if self.gpu { 4096 } else { 256 });
            let k = self.sets(r * vocab * 8);
            let mut s: Vec<_> = (0..k)
                .map(|_| {
                    (
                        be.zeros(r),
                        be.zeros(r * vocab),
                        self.rand(r * vocab),
                        self.ids(r, vocab),
                    )
                })
                .collect();
            let t = self.time(k, &mut |i| {
                let (losses, dl, logits, labels) = &mut s[i % k];
                be.cross_entropy(losses, dl, logits, labels, r, vocab, 1.0 / r as f64)
            });
            let bytes = (8 * r * vocab + 8 * r) as f64;
            push(self.row(
                shape,
                "cross_entropy",
                format!("{r}x{vocab}"),
                t,
                None,
                Some(bytes),
                c,
            ));
        }

        // AdamW over a slab of rows × hidden values.
        if self.wants("adamw") {
            let m = n * d;
            let k = self.sets(m * 16);
            let mut s: Vec<_> = (0..k)
                .map(|_| (self.rand(m), self.rand(m), be.zeros(m), be.zeros(m)))
                .collect();
            let h = AdamW::with_defaults(1e-4, 1);
            let t = self.time(k, &mut |i| {
                let (p, g, mm, v) = &mut s[i % k];
                be.adamw(p, g, mm, v, m, h)
            });
            let bytes = (28 * m) as f64;
            push(self.row(
                shape,
                "adamw",
                format!("{m} values"),
                t,
                None,
                Some(bytes),
                c,
            ));
        }
        Ok(())
    }
}
