//! The fast CPU backend against the reference oracle (`CpuBackend<f32>`):
//! every op on random inputs at several (ragged) shapes, with the outputs
//! poisoned (NaN) first so that an element the fast op forgets to write
//! shows up; the whole model's loss, logits and bias gradients on tiny
//! random models (with dropout) and on tiny random decoders of every
//! family (next-token and candidate-scoring losses), with the fast
//! backend's recycled outputs poisoned too; and the Hugging Face parity
//! fixtures of `tests/parity.rs` run on the fast backend.

mod common;
mod decoder_common;

use std::path::Path;

use beft::backend::cpu::{act_value, CpuBackend, CpuBuf};
use beft::backend::fast::{gemm16, CpuGemm, FastBuf, FastCpu};
use beft::backend::{Act, AdamW, AttnDims, Backend, CandidateIndex, Dropout, PoolKind};
use beft::data::Batch;
use beft::model::config::ModelDir;
use beft::model::{BiasTerm, Decoder, DecoderOptions, Encoder, EncoderOptions, Offload};
use beft::rng::Rng;
use beft::train::Slab;
use beft::weights::{DType, TensorView};

/// As the `beft` binary: large buffers on cache-line boundaries, so that
/// the bf16 products below write them with streaming stores.
#[global_allocator]
static ALLOC: beft::alloc::LineAligned = beft::alloc::LineAligned;
use common::bf16_round;
use common::fixtures::{fixture, max_abs, read_expected, rel_err, rel_err_f32, Expected};

type Ref = CpuBackend<f32>;

fn rv(rng: &mut Rng, n: usize, scale: f64) -> Vec<f32> {
    (0..n).map(|_| (rng.normal() * scale) as f32).collect()
}

/// Both backends and a buffer pair holding the same values.
struct Pair {
    r: CpuBuf<f32>,
    f: FastBuf,
}

struct Env {
    r: Ref,
    f: FastCpu,
}

impl Env {
    fn new() -> Self {
        Env {
            r: Ref::new(),
            f: FastCpu::new(),
        }
    }
    fn buf(&self, v: &[f32]) -> Pair {
        Pair {
            r: self.r.upload(v),
            f: self.f.upload(v),
        }
    }
    /// An output buffer full of NaN.
    fn poisoned(&self, n: usize) -> Pair {
        self.buf(&vec![f32::NAN; n])
    }
    /// A frozen weight (read in place, as from a memory map).
    fn weight(&self, v: &[f32], shape: Vec<usize>) -> Pair {
        let t = TensorView::from_f32("w", shape, v);
        Pair {
            r: self.r.weight(&t).unwrap(),
            f: self.f.weight(&t).unwrap(),
        }
    }
}

/// Largest |got − want| over the largest |want| (or `floor`).
fn check(name: &str, p: &Pair, tol: f32) {
    let (a, b) = (p.f.to_vec(), p.r.to_vec());
    check_vec(name, &a, &b, tol);
}

fn check_vec(name: &str, got: &[f32], want: &[f32], tol: f32) {
    assert_eq!(got.len(), want.len(), "{name}: length");
    let scale = want
        .iter()
        .filter(|x| x.is_finite())
        .fold(0f32, |a, b| a.max(b.abs()))
        // Outputs that vanish in exact arithmetic are compared at the scale
        // of the (O(1)) inputs.
        .max(1e-2);
    for (i, (a, b)) in got.iter().zip(want).enumerate() {
        if b.is_infinite() {
            assert_eq!(a, b, "{name}[{i}]");
            continue;
        }
        assert!(
            a.is_finite() && (a - b).abs() <= tol * scale,
            "{name}[{i}]: fast {a}, reference {b} (tolerance {})",
            tol * scale
        );
    }
}

#[test]
fn matmul_matches_reference() {
    let e = Env::new();
    let mut rng = Rng::new(1);
    for &(m, n, k) in &[
        (1, 1, 1),
        (3, 5, 7),
        (17, 33, 9),
        (64, 48, 130),
        (130, 70, 65),
        (257, 96, 384),
        (4, 6, 0),
    ] {
        for ta in [false, true] {
            for tb in [false, true] {
                for acc in [false, true] {
                    for mapped in [false, true] {
                        let a = e.buf(&rv(&mut rng, m * k, 1.0));
                        let bv = rv(&mut rng, k * n, 1.0);
                        let b = if mapped {
                            e.weight(&bv, vec![k * n])
                        } else {
                            e.buf(&bv)
                        };
                        let mut c = if acc {
                            e.buf(&rv(&mut rng, m * n, 1.0))
                        } else {
                            e.poisoned(m * n)
                        };
                        e.r.matmul(&mut c.r, &a.r, &b.r, m, n, k, ta, tb, acc);
                        e.f.matmul(&mut c.f, &a.f, &b.f, m, n, k, ta, tb, acc);
                        check(
                            &format!(
                                "matmul {m}x{n}x{k} ta={ta} tb={tb} acc={acc} mapped={mapped}"
                            ),
                            &c,
                            2e-5,
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn bf16_matmul_matches_the_reference_on_bf16_inputs() {
    if !gemm16::available() {
        println!("skipped: this CPU has no AVX-512 BF16 (BEFT_CPU_GEMM=bf16 is refused here)");
        assert!(FastCpu::with_gemm(CpuGemm::Bf16).is_err());
        return;
    }
    let e = Env {
        r: Ref::new(),
        f: FastCpu::with_gemm(CpuGemm::Bf16).unwrap(),
    };
    assert!(e.f.name().contains("bf16"), "{}", e.f.name());
    let mut rng = Rng::new(2);
    // Rows below BF16_MIN_ROWS take the f32 product; the rest the bf16 one.
    for &(m, n, k) in &[
        (5, 7, 9),
        (32, 32, 32),
        (45, 70, 131),
        (300, 64, 100),
        (40, 6, 0),
    ] {
        for tb in [false, true] {
            for acc in [false, true] {
                for weight in ["owned", "f32", "bf16"] {
                    let a = e.buf(&bf16_round(&rv(&mut rng, m * k, 1.0)));
                    let bv = bf16_round(&rv(&mut rng, k * n, 1.0));
                    let b = match weight {
                        "owned" => e.buf(&bv),
                        "f32" => e.weight(&bv, vec![k * n]),
                        _ => {
                            let bytes: Vec<u8> = bv
                                .iter()
                                .flat_map(|&x| half::bf16::from_f32(x).to_le_bytes())
                                .collect();
                            let t = TensorView::from_bytes("w", DType::BF16, vec![k * n], bytes);
                            Pair {
                                r: e.r.weight(&t).unwrap(),
                                f: e.f.weight(&t).unwrap(),
                            }
                        }
                    };
                    let mut c = if acc {
                        e.buf(&rv(&mut rng, m * n, 1.0))
                    } else {
                        e.poisoned(m * n)
                    };
                    e.r.matmul(&mut c.r, &a.r, &b.r, m, n, k, false, tb, acc);
                    e.f.matmul(&mut c.f, &a.f, &b.f, m, n, k, false, tb, acc);
                    check(
                        &format!("bf16 matmul {m}x{n}x{k} tb={tb} acc={acc} weight={weight}"),
                        &c,
                        2e-5,
                    );
                }
            }
        }
    }
}

/// A frozen weight's bf16 panels are packed on first use and kept: the
/// products that reuse them (both orientations of a square weight, so that
/// only the orientation tells their panels apart; several row counts; the
/// linear layer with its epilogue) are bit-identical to products from an
/// owned copy of the same values, which is packed afresh every time.
#[test]
fn kept_weight_panels_give_the_same_products() {
    if !gemm16::available() {
        println!("skipped: this CPU has no AVX-512 BF16 (BEFT_CPU_GEMM=bf16 is refused here)");
        return;
    }
    let f = FastCpu::with_gemm(CpuGemm::Bf16).unwrap();
    let mut rng = Rng::new(5);
    let (n, k) = (48, 48);
    let wv = rv(&mut rng, k * n, 1.0);
    let bytes: Vec<u8> = wv
        .iter()
        .flat_map(|&x| half::bf16::from_f32(x).to_le_bytes())
        .collect();
    for t in [
        TensorView::from_f32("w", vec![k * n], &wv),
        TensorView::from_bytes("w", DType::BF16, vec![k * n], bytes),
    ] {
        let w = f.weight(&t).unwrap();
        let owned = f.upload(&f.download(&f.weight(&t).unwrap()));
        let bias = f.upload(&rv(&mut rng, n, 1.0));
        for round in 0..2 {
            for tb in [false, true] {
                for m in [32, 100] {
                    let a = f.upload(&rv(&mut rng, m * k, 1.0));
                    let (mut kept, mut fresh) = (f.zeros(m * n), f.zeros(m * n));
                    f.matmul(&mut kept, &a, &w, m, n, k, false, tb, false);
                    f.matmul(&mut fresh, &a, &owned, m, n, k, false, tb, false);
                    let bits =
                        |b: &FastBuf| b.to_vec().iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                    let what = format!("{:?} round {round} tb={tb} m={m}", t.dtype);
                    assert!(
                        bits(&kept) == bits(&fresh),
                        "matmul, {what}: kept panels differ"
                    );
                    let (mut pre, mut out) = (f.zeros(m * n), f.zeros(m * n));
                    let (mut pre2, mut out2) = (f.zeros(m * n), f.zeros(m * n));
                    f.linear_act(
                        &mut pre,
                        &mut out,
                        Act::Gelu,
                        &a,
                        &w,
                        Some((&bias, 0)),
                        m,
                        n,
                        k,
                        tb,
                    );
                    f.linear_act(
                        &mut pre2,
                        &mut out2,
                        Act::Gelu,
                        &a,
                        &owned,
                        Some((&bias, 0)),
                        m,
                        n,
                        k,
                        tb,
                    );
                    assert!(
                        bits(&out) == bits(&out2),
                        "linear_act, {what}: kept panels differ"
                    );
                }
            }
        }
    }
}

#[test]
fn elementwise_ops_match_reference() {
    let e = Env::new();
    let mut rng = Rng::new(2);
    for &(rows, cols) in &[(1, 1), (3, 7), (17, 33), (130, 384), (9, 1000)] {
        let n = rows * cols;
        let x = rv(&mut rng, n, 2.0);
        let bias = rv(&mut rng, cols + 3, 1.0);
        // bias_add from the slab (offset 3) and from a frozen weight.
        for (bb, off) in [
            (e.buf(&bias), 3usize),
            (e.weight(&bias[..cols], vec![cols]), 0),
        ] {
            let mut y = e.buf(&x);
            e.r.bias_add(&mut y.r, &bb.r, off, rows, cols);
            e.f.bias_add(&mut y.f, &bb.f, off, rows, cols);
            check("bias_add", &y, 1e-7);
        }
        let mut db = e.buf(&rv(&mut rng, cols + 5, 1.0));
        let dy = e.buf(&x);
        e.r.bias_grad(&mut db.r, 5, &dy.r, rows, cols);
        e.f.bias_grad(&mut db.f, 5, &dy.f, rows, cols);
        check("bias_grad", &db, 1e-6);

        let mut y = e.buf(&rv(&mut rng, n, 1.0));
        e.r.add(&mut y.r, &dy.r, n);
        e.f.add(&mut y.f, &dy.f, n);
        check("add", &y, 1e-7);
        e.r.scale(&mut y.r, 0.37, n);
        e.f.scale(&mut y.f, 0.37, n);
        check("scale", &y, 1e-7);
        let (a, b) = (e.r.sum_sq(&y.r, n), e.f.sum_sq(&y.f, n));
        assert!(
            (a - b).abs() <= 1e-6 * a.abs().max(1e-6),
            "sum_sq {a} vs {b}"
        );

        for act in [Act::Gelu, Act::GeluTanh, Act::Relu, Act::Tanh, Act::Silu] {
            let xx = e.buf(&rv(&mut rng, n, 3.0));
            let mut y = e.poisoned(n);
            e.r.act_fwd(act, &mut y.r, &xx.r, n);
            e.f.act_fwd(act, &mut y.f, &xx.f, n);
            check(&format!("act_fwd {act:?}"), &y, 1e-4);
            check_truth(
                &format!("act_fwd {act:?} vs f64"),
                act,
                &xx.r.to_vec(),
                &y.f.to_vec(),
            );
            let g = e.buf(&rv(&mut rng, n, 1.0));
            let mut dx = e.poisoned(n);
            e.r.act_bwd(act, &mut dx.r, &xx.r, &g.r, n);
            e.f.act_bwd(act, &mut dx.f, &xx.f, &g.f, n);
            check(&format!("act_bwd {act:?}"), &dx, 3e-6);
        }

        for p in [0.1f32, 0.5] {
            let mut y = e.buf(&x);
            e.r.dropout(&mut y.r, n, p, 77 + n as u64);
            e.f.dropout(&mut y.f, n, p, 77 + n as u64);
            assert_eq!(
                y.r.to_vec().iter().map(|v| *v == 0.0).collect::<Vec<_>>(),
                y.f.to_vec().iter().map(|v| *v == 0.0).collect::<Vec<_>>(),
                "dropout mask"
            );
            check("dropout", &y, 1e-7);
        }

        let gate = e.buf(&rv(&mut rng, n, 2.0));
        let up = e.buf(&rv(&mut rng, n, 1.0));
        let mut h = e.poisoned(n);
        e.r.swiglu_fwd(&mut h.r, &gate.r, &up.r, n);
        e.f.swiglu_fwd(&mut h.f, &gate.f, &up.f, n);
        check("swiglu_fwd", &h, 2e-6);
        let dh = e.buf(&rv(&mut rng, n, 1.0));
        let (mut dg, mut du) = (e.poisoned(n), e.poisoned(n));
        e.r.swiglu_bwd(&mut dg.r, &mut du.r, &dh.r, &gate.r, &up.r, n);
        e.f.swiglu_bwd(&mut dg.f, &mut du.f, &dh.f, &gate.f, &up.f, n);
        check("swiglu_bwd dgate", &dg, 2e-6);
        check("swiglu_bwd dup", &du, 2e-6);
    }
}

/// Element-wise relative check against the activation in f64 (the
/// reference's f32 erf loses relative accuracy on the negative tail, where
/// `1 + erf` cancels; the fast GELU does not).
fn check_truth(name: &str, act: Act, x: &[f32], got: &[f32]) {
    for (i, (xv, g)) in x.iter().zip(got).enumerate() {
        let xd = *xv as f64;
        let want = match act {
            // Φ(x) through erfc: exact on the negative tail.
            Act::Gelu => 0.5 * xd * libm::erfc(-xd / std::f64::consts::SQRT_2),
            // x·σ(2u), not ½x(1 + tanh u): the latter cancels in f64 below x ≈ -6.
            Act::GeluTanh => {
                let u = (2.0 / std::f64::consts::PI).sqrt() * (xd + 0.044715 * xd * xd * xd);
                xd / (1.0 + (-2.0 * u).exp())
            }
            _ => act_value::<f64>(act, xd),
        };
        // On the tails the value is e^{-A} with A ≈ x²/2 (GELU) or ≈ 1.6·|x|
        // + 0.07·|x|³ (tanh-GELU); A rounded to f32 carries a relative error
        // of about A·6e-8, so the allowed relative error grows with x².
        let tol = 3e-6 * want.abs() * (1.0 + xd * xd / 8.0) + 1e-30;
        assert!(
            (*g as f64 - want).abs() <= tol,
            "{name}[{i}]: x = {xv}: fast {g}, f64 {want}"
        );
    }
}

#[test]
fn norms_match_reference() {
    let e = Env::new();
    let mut rng = Rng::new(3);
    for &(rows, cols) in &[(1, 1), (3, 7), (17, 33), (130, 384), (5, 1000)] {
        let n = rows * cols;
        let x = e.buf(&rv(&mut rng, n, 3.0));
        let gv: Vec<f32> = (0..cols).map(|_| 1.0 + 0.3 * rng.normal() as f32).collect();
        let g = e.weight(&gv, vec![cols]);
        let beta = e.buf(&rv(&mut rng, cols + 2, 1.0));
        let (mut y, mut xh, mut rs) = (e.poisoned(n), e.poisoned(n), e.poisoned(rows));
        e.r.layernorm_fwd(
            &mut y.r, &mut xh.r, &mut rs.r, &x.r, &g.r, &beta.r, 2, rows, cols, 1e-12,
        );
        e.f.layernorm_fwd(
            &mut y.f, &mut xh.f, &mut rs.f, &x.f, &g.f, &beta.f, 2, rows, cols, 1e-12,
        );
        check("layernorm y", &y, 2e-6);
        check("layernorm xhat", &xh, 2e-6);
        check("layernorm rstd", &rs, 2e-6);
        let dy = e.buf(&rv(&mut rng, n, 1.0));
        let mut dx = e.poisoned(n);
        e.r.layernorm_bwd(&mut dx.r, &dy.r, &xh.r, &rs.r, &g.r, rows, cols);
        e.f.layernorm_bwd(&mut dx.f, &dy.f, &xh.f, &rs.f, &g.f, rows, cols);
        check("layernorm_bwd", &dx, 1e-5);

        // LN(drop(s) + res) in one pass (fast) against dropout_add, then
        // layernorm_fwd (reference); 130 × 384 spans two row chunks, so the
        // dropout mask's element indices carry across them.
        let res = e.buf(&rv(&mut rng, n, 1.0));
        for drop in [None, Some(Dropout { p: 0.3, seed: 91 })] {
            let mut s = e.buf(&x.r.to_vec());
            let (mut y, mut xh, mut rs) = (e.poisoned(n), e.poisoned(n), e.poisoned(rows));
            e.r.residual_layernorm_fwd(
                &mut y.r, &mut xh.r, &mut rs.r, &mut s.r, &res.r, drop, &g.r, &beta.r, 2, rows,
                cols, 1e-12,
            );
            e.f.residual_layernorm_fwd(
                &mut y.f, &mut xh.f, &mut rs.f, &mut s.f, &res.f, drop, &g.f, &beta.f, 2, rows,
                cols, 1e-12,
            );
            let tag = format!("residual_layernorm drop={}", drop.is_some());
            check(&format!("{tag} y"), &y, 2e-6);
            check(&format!("{tag} xhat"), &xh, 2e-6);
            check(&format!("{tag} rstd"), &rs, 2e-6);
        }

        let (mut y, mut xh, mut rs) = (e.poisoned(n), e.poisoned(n), e.poisoned(rows));
        e.r.rmsnorm_fwd(&mut y.r, &mut xh.r, &mut rs.r, &x.r, &g.r, rows, cols, 1e-6);
        e.f.rmsnorm_fwd(&mut y.f, &mut xh.f, &mut rs.f, &x.f, &g.f, rows, cols, 1e-6);
        check("rmsnorm y", &y, 2e-6);
        check("rmsnorm rstd", &rs, 2e-6);
        let mut dx = e.poisoned(n);
        e.r.rmsnorm_bwd(&mut dx.r, &dy.r, &xh.r, &rs.r, &g.r, rows, cols);
        e.f.rmsnorm_bwd(&mut dx.f, &dy.f, &xh.f, &rs.f, &g.f, rows, cols);
        check("rmsnorm_bwd", &dx, 1e-5);
    }
}

fn attn_case(e: &Env, rng: &mut Rng, dims: AttnDims, pad: &[usize], dropout: Option<Dropout>) {
    let AttnDims {
        batch: nb,
        seq: t,
        kv_seq: tk,
        heads: nh,
        kv_heads: nkv,
        head_dim: dh,
        ..
    } = dims;
    let q = e.buf(&rv(rng, nb * t * nh * dh, 1.0));
    let k = e.buf(&rv(rng, nb * tk * nkv * dh, 1.0));
    let v = e.buf(&rv(rng, nb * tk * nkv * dh, 1.0));
    // pad[b] = number of padded keys at the end of sequence b.
    let mut mv = vec![1f32; nb * tk];
    for b in 0..nb {
        for j in tk - pad[b].min(tk)..tk {
            mv[b * tk + j] = 0.0;
        }
    }
    let mask = e.buf(&mv);
    let name = format!("attention {dims:?} pad={pad:?} dropout={dropout:?}");
    let (mut out, mut lse) = (e.poisoned(nb * t * nh * dh), e.poisoned(nb * nh * t));
    e.r.attention_fwd(
        &mut out.r, &mut lse.r, &q.r, &k.r, &v.r, &mask.r, dims, dropout,
    );
    e.f.attention_fwd(
        &mut out.f, &mut lse.f, &q.f, &k.f, &v.f, &mask.f, dims, dropout,
    );
    check(&format!("{name}: out"), &out, 2e-5);
    check(&format!("{name}: lse"), &lse, 2e-6);
    if tk != t || dims.q_start != 0 {
        return;
    }
    let dout = e.buf(&rv(rng, nb * t * nh * dh, 1.0));
    let (mut dq, mut dk, mut dv) = (
        e.poisoned(nb * t * nh * dh),
        e.poisoned(nb * t * nkv * dh),
        e.poisoned(nb * t * nkv * dh),
    );
    e.r.attention_bwd(
        &mut dq.r, &mut dk.r, &mut dv.r, &dout.r, &q.r, &k.r, &v.r, &out.r, &lse.r, &mask.r, dims,
        dropout,
    );
    e.f.attention_bwd(
        &mut dq.f, &mut dk.f, &mut dv.f, &dout.f, &q.f, &k.f, &v.f, &out.f, &lse.f, &mask.f, dims,
        dropout,
    );
    check(&format!("{name}: dq"), &dq, 5e-5);
    check(&format!("{name}: dk"), &dk, 5e-5);
    check(&format!("{name}: dv"), &dv, 5e-5);
}

#[test]
fn attention_matches_reference() {
    let e = Env::new();
    let mut rng = Rng::new(4);
    for &(nb, t, nh, nkv, dh) in &[
        (1, 1, 1, 1, 4),
        (2, 5, 2, 2, 8),
        (2, 37, 4, 2, 13),
        (3, 70, 2, 1, 16),
        (2, 130, 3, 3, 32),
    ] {
        for causal in [false, true] {
            for drop in [None, Some(0.25f32)] {
                let dims = AttnDims::self_attn(nb, t, nh, nkv, dh, causal);
                let mut pad: Vec<usize> = (0..nb).map(|b| (b * 3) % t.max(1)).collect();
                if nb > 1 {
                    // A fully padded sequence: every query sees no key.
                    pad[nb - 1] = t;
                }
                let dropout = drop.map(|p| Dropout {
                    p,
                    seed: 99 + t as u64,
                });
                attn_case(&e, &mut rng, dims, &pad, dropout);
            }
        }
    }
    // Incremental decoding: new queries against a longer KV cache.
    for &(t, tk, q_start) in &[(1, 9, 8), (3, 40, 37), (70, 100, 30)] {
        let dims = AttnDims {
            batch: 2,
            seq: t,
            kv_seq: tk,
            q_start,
            heads: 4,
            kv_heads: 2,
            head_dim: 8,
            scale: 0.3,
            causal: true,
        };
        attn_case(&e, &mut rng, dims, &[0, 2], None);
    }
}

#[test]
fn gathers_pools_losses_and_optimiser_match_reference() {
    let e = Env::new();
    let mut rng = Rng::new(5);
    let (vocab, dim, rows) = (50, 24, 67);
    let table_v = rv(&mut rng, vocab * dim, 1.0);
    let table = e.weight(&table_v, vec![vocab, dim]);
    let ids: Vec<u32> = (0..rows).map(|_| rng.below(vocab) as u32).collect();
    for acc in [false, true] {
        let mut out = if acc {
            e.buf(&rv(&mut rng, rows * dim, 1.0))
        } else {
            e.poisoned(rows * dim)
        };
        e.r.embedding_fwd(&mut out.r, &table.r, &ids, rows, dim, acc);
        e.f.embedding_fwd(&mut out.f, &table.f, &ids, rows, dim, acc);
        check("embedding_fwd", &out, 1e-7);
    }
    let mut dx = e.buf(&rv(&mut rng, vocab * dim, 1.0));
    let dy = e.buf(&rv(&mut rng, rows * dim, 1.0));
    e.r.scatter_add_rows(&mut dx.r, &dy.r, &ids, rows, dim);
    e.f.scatter_add_rows(&mut dx.f, &dy.f, &ids, rows, dim);
    check("scatter_add_rows", &dx, 1e-6);
    let w = e.buf(&rv(&mut rng, rows, 1.0));
    let mut y = e.buf(&rv(&mut rng, rows * dim, 1.0));
    e.r.scale_rows(&mut y.r, &w.r, rows, dim);
    e.f.scale_rows(&mut y.f, &w.f, rows, dim);
    check("scale_rows", &y, 1e-7);

    let positions: Vec<u32> = (0..rows as u32).map(|i| i * 3 % 40).collect();
    for inverse in [false, true] {
        let mut x = e.buf(&rv(&mut rng, rows * 2 * 12, 1.0));
        e.r.rope(&mut x.r, &positions, rows, 2, 12, 10000.0, inverse);
        e.f.rope(&mut x.f, &positions, rows, 2, 12, 10000.0, inverse);
        check("rope", &x, 1e-6);
    }

    let (b, t, d) = (3, 11, 20);
    let h = e.buf(&rv(&mut rng, b * t * d, 1.0));
    let mask = e.buf(
        &(0..b * t)
            .map(|i| if i % t < 7 + i / t { 1.0 } else { 0.0 })
            .collect::<Vec<f32>>(),
    );
    for kind in [PoolKind::Cls, PoolKind::Mean] {
        let mut out = e.poisoned(b * d);
        e.r.pool_fwd(kind, &mut out.r, &h.r, &mask.r, b, t, d);
        e.f.pool_fwd(kind, &mut out.f, &h.f, &mask.f, b, t, d);
        check("pool_fwd", &out, 1e-6);
        let dout = e.buf(&rv(&mut rng, b * d, 1.0));
        let mut dh = e.poisoned(b * t * d);
        e.r.pool_bwd(kind, &mut dh.r, &dout.r, &mask.r, b, t, d);
        e.f.pool_bwd(kind, &mut dh.f, &dout.f, &mask.f, b, t, d);
        check("pool_bwd", &dh, 1e-6);
    }

    // Fewer classes than a SIMD vector, a ragged count, and a vocabulary.
    for (r, c, tol) in [(4, 5, 1e-6), (6, 37, 1e-6), (3, 50_272, 1e-5)] {
        let logits = e.buf(&rv(&mut rng, r * c, 2.0));
        let labels: Vec<u32> = (0..r as u32).map(|i| (i * 7919) % c as u32).collect();
        let (mut l, mut dl) = (e.poisoned(r), e.poisoned(r * c));
        e.r.cross_entropy(&mut l.r, &mut dl.r, &logits.r, &labels, r, c, 0.5);
        e.f.cross_entropy(&mut l.f, &mut dl.f, &logits.f, &labels, r, c, 0.5);
        check("cross_entropy loss", &l, tol);
        check("cross_entropy grad", &dl, tol);
    }
    let (r, c) = (7, 5);
    let logits = e.buf(&rv(&mut rng, r * c, 2.0));
    let target = e.buf(&rv(&mut rng, r, 1.0));
    let (mut l, mut dl) = (e.poisoned(r), e.poisoned(r));
    e.r.mse(&mut l.r, &mut dl.r, &logits.r, &target.r, r, 0.5);
    e.f.mse(&mut l.f, &mut dl.f, &logits.f, &target.f, r, 0.5);
    check("mse loss", &l, 1e-6);
    check("mse grad", &dl, 1e-6);

    let tok_cand = vec![0u32, 0, 1, 2, 2, 2, 3];
    let cand_ex = vec![0u32, 0, 1, 1];
    let gold = vec![1u32, 0];
    let tl = e.buf(
        &rv(&mut rng, 7, 1.0)
            .iter()
            .map(|x| x.abs())
            .collect::<Vec<_>>(),
    );
    let idx = CandidateIndex {
        tok_cand: &tok_cand,
        cand_ex: &cand_ex,
        gold: &gold,
        rows: 7,
        cands: 4,
        examples: 2,
    };
    let (mut el, mut sc, mut rw) = (e.poisoned(2), e.poisoned(4), e.poisoned(7));
    e.r.candidate_loss(&mut el.r, &mut sc.r, &mut rw.r, &tl.r, &idx, 0.5);
    e.f.candidate_loss(&mut el.f, &mut sc.f, &mut rw.f, &tl.f, &idx, 0.5);
    check("candidate ex_loss", &el, 1e-6);
    check("candidate scores", &sc, 1e-6);
    check("candidate row_w", &rw, 1e-6);

    let n = 37;
    let mut p = e.buf(&rv(&mut rng, n, 1.0));
    let g = e.buf(&rv(&mut rng, n, 1.0));
    let (mut m, mut v) = (e.buf(&vec![0.0; n]), e.buf(&vec![0.0; n]));
    for step in 1..4 {
        let h = AdamW {
            lr: 1e-2,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
            step,
        };
        e.r.adamw(&mut p.r, &g.r, &mut m.r, &mut v.r, n, h);
        e.f.adamw(&mut p.f, &g.f, &mut m.f, &mut v.f, n, h);
    }
    check("adamw params", &p, 1e-6);

    let mut c = e.poisoned(10);
    let src = e.buf(&rv(&mut rng, 20, 1.0));
    e.r.fill(&mut c.r, 1.5);
    e.f.fill(&mut c.f, 1.5);
    e.r.copy(&mut c.r, 2, &src.r, 5, 6);
    e.f.copy(&mut c.f, 2, &src.f, 5, 6);
    check("fill+copy", &c, 0.0);
    // zeros() after pooled reuse still gives zeros.
    drop(c);
    let z = e.f.zeros(4096);
    assert!(e.f.download(&z).iter().all(|v| *v == 0.0));
}

// ---- the whole model ---------------------------------------------------

fn random_batch(rng: &mut Rng, b: usize, t: usize, vocab: usize, classes: usize) -> Batch {
    let mut mask = vec![1f32; b * t];
    for bi in 1..b {
        for ti in t - (bi * 2).min(t - 1)..t {
            mask[bi * t + ti] = 0.0;
        }
    }
    Batch {
        batch: b,
        seq: t,
        ids: (0..b * t)
            .map(|i| {
                if mask[i] > 0.0 {
                    rng.below(vocab) as u32
                } else {
                    0
                }
            })
            .collect(),
        type_ids: (0..b * t).map(|i| ((i % t) >= t / 2) as u32).collect(),
        tokens: mask.iter().filter(|m| **m > 0.0).count(),
        mask,
        labels: (0..b).map(|i| (i % classes.max(2)) as f32).collect(),
    }
}

fn whole_model_case(
    dir: &Path,
    pooling: PoolKind,
    bias: &str,
    classes: usize,
    dropout: Option<u64>,
) {
    let md = ModelDir::open(dir).unwrap();
    let opts = EncoderOptions {
        pooling,
        num_labels: classes,
        terms: BiasTerm::parse_set(bias).unwrap(),
        seed: 3,
    };
    // Poisoned: every output buffer starts as NaN, so an element that an
    // op leaves unwritten fails the comparison.
    let (r, f) = (Ref::new(), FastCpu::new().poisoned());
    let er = Encoder::load(&r, &md, opts.clone()).unwrap();
    let ef = Encoder::load(&f, &md, opts).unwrap();
    let mut rng = Rng::new(11);
    let batch = random_batch(&mut rng, 4, 19, common::TINY_VOCAB, classes);
    let (dr, df) = (
        er.upload_batch(&r, &batch).unwrap(),
        ef.upload_batch(&f, &batch).unwrap(),
    );
    let (mut sr, mut sf) = (Slab::new(&r, &er.init), Slab::new(&f, &ef.init));
    let (lr, logr) = er.loss_and_grad(&r, &sr.params, &mut sr.grads, &dr, dropout);
    let (lf, logf) = ef.loss_and_grad(&f, &sf.params, &mut sf.grads, &df, dropout);
    let name = format!(
        "{} {pooling:?} bias={bias} classes={classes} dropout={dropout:?}",
        dir.display()
    );
    assert!(
        (lr - lf).abs() <= 1e-5 * lr.abs().max(1e-3),
        "{name}: loss {lf} vs {lr}"
    );
    check_vec(&format!("{name}: logits"), &logf, &logr, 1e-5);
    let (gr, gf) = (r.download(&sr.grads), f.download(&sf.grads));
    let all = gr.iter().fold(0f32, |a, b| a.max(b.abs()));
    for slot in &er.layout.slots {
        let (a, b) = (
            &gf[slot.offset..slot.offset + slot.len()],
            &gr[slot.offset..slot.offset + slot.len()],
        );
        let scale = if slot.name.contains("attention.self.key") {
            all
        } else {
            b.iter().fold(0f32, |x, y| x.max(y.abs())).max(1e-6 * all)
        };
        let e = rel_err_f32(a, b, scale);
        assert!(
            e <= 1e-4,
            "{name}: gradient of {} differs (rel err {e:.2e})",
            slot.name
        );
    }
    let ev_r = er.logits(&r, &sr.params, &dr);
    let ev_f = ef.logits(&f, &sf.params, &df);
    check_vec(&format!("{name}: eval logits"), &ev_f, &ev_r, 1e-5);
}

#[test]
fn whole_model_matches_reference_on_tiny_random_models() {
    for arch in [common::TinyArch::Bert, common::TinyArch::Roberta] {
        for classes in [1usize, 3] {
            let tmp = tempfile::TempDir::new().unwrap();
            common::write_tiny_model(tmp.path(), arch, 7, None);
            for pooling in [PoolKind::Cls, PoolKind::Mean] {
                for bias in ["v", "all"] {
                    for dropout in [None, Some(5u64)] {
                        whole_model_case(tmp.path(), pooling, bias, classes, dropout);
                    }
                }
            }
        }
    }
}

/// What [`decoder_step`] computes.
struct DecoderStep {
    lm: f64,
    lm_grads: Vec<f32>,
    cand: f64,
    scores: Vec<f64>,
    cand_grads: Vec<f32>,
    generated: Vec<Vec<u32>>,
}

/// `f(arch, model)` for a tiny random decoder of every family.
fn each_tiny_decoder(mut f: impl FnMut(decoder_common::Tiny, &ModelDir)) {
    use decoder_common::{write_tiny_decoder, Tiny};
    for arch in [
        Tiny::Gpt2,
        Tiny::Opt,
        Tiny::OptPost,
        Tiny::Llama,
        Tiny::Qwen2,
    ] {
        let tmp = tempfile::TempDir::new().unwrap();
        write_tiny_decoder(tmp.path(), arch, 7);
        f(arch, &ModelDir::open(tmp.path()).unwrap());
    }
}

/// A decoder with every bias trainable, resident.
fn all_biases<B: Backend<T = f32>>(be: &B, md: &ModelDir) -> Decoder<B> {
    let opts = DecoderOptions {
        terms: BiasTerm::parse_set("all").unwrap(),
        offload: Offload::Resident,
        recompute: false,
    };
    Decoder::load(be, md, opts).unwrap()
}

/// The next-token loss and every bias gradient of `dec` on a right-padded
/// batch of sequences of `lens` tokens (drawn from `seed`).
fn lm_step<B: Backend<T = f32>>(
    be: &B,
    dec: &Decoder<B>,
    lens: &[usize],
    seed: u64,
) -> (f64, Vec<f32>) {
    use decoder_common::{next_token_rows, tiny_batch};
    let (b, t, ids, mask) = tiny_batch(lens, false, seed);
    let (rows, targets) = next_token_rows(b, t, &ids, &mask);
    let x = dec.upload(be, b, t, &ids, &mask).unwrap();
    let rt = dec.row_targets(be, &x, &rows, &targets).unwrap();
    let mut slab = Slab::new(be, &dec.init);
    let lm = dec.lm_loss_and_grad(be, &slab.params, &mut slab.grads, &x, &rt);
    (lm, be.download(&slab.grads))
}

/// One decoder step on a backend: the next-token loss and bias gradients
/// on a right-padded batch, the candidate-scoring loss and gradients on a
/// left-padded one (two examples, 2 and 3 candidates), and greedy
/// generation through the KV cache.
fn decoder_step<B: Backend<T = f32>>(be: &B, md: &ModelDir) -> DecoderStep {
    use decoder_common::{answer_rows, tiny_batch};
    let dec = all_biases(be, md);
    let (lm, lm_grads) = lm_step(be, &dec, &[9, 5, 7], 3);

    let lens = [6, 5, 4, 6, 3];
    let ans = [2usize, 1, 2, 1, 2];
    let (b, t, ids, mask) = tiny_batch(&lens, true, 9);
    let (rows, targets, tok_cand) = answer_rows(&lens, &ans, true, t, &ids);
    let x = dec.upload(be, b, t, &ids, &mask).unwrap();
    let cb = dec
        .cand_batch(be, x, &rows, &targets, &tok_cand, &[0, 0, 1, 1, 1], &[1, 2])
        .unwrap();
    let mut slab = Slab::new(be, &dec.init);
    let (cand, scores) = dec.candidate_loss_and_grad(be, &slab.params, &mut slab.grads, &cb);
    let cand_grads = be.download(&slab.grads);
    let prompts = [vec![5u32, 9, 12], vec![7u32, 3]];
    let generated = dec
        .generate_greedy(be, &slab.params, &prompts, 6, &|_| false)
        .unwrap();
    DecoderStep {
        lm,
        lm_grads,
        cand,
        scores,
        cand_grads,
        generated,
    }
}

/// Every decoder family on the fast backend, outputs poisoned, against the
/// reference: losses, candidate scores, every bias gradient and greedy
/// generation.
#[test]
fn decoder_steps_match_reference_on_tiny_random_models() {
    each_tiny_decoder(|arch, md| {
        let want = decoder_step(&Ref::new(), md);
        let got = decoder_step(&FastCpu::new().poisoned(), md);
        for (what, a, b) in [
            ("lm loss", got.lm, want.lm),
            ("candidate loss", got.cand, want.cand),
        ] {
            assert!(
                (a - b).abs() <= 1e-5 * b.abs().max(1e-3),
                "{arch:?}: {what} {a} vs {b}"
            );
        }
        for (a, b) in got.scores.iter().zip(&want.scores) {
            assert!(
                (a - b).abs() <= 1e-5 * b.abs().max(1.0),
                "{arch:?}: scores {:?} vs {:?}",
                got.scores,
                want.scores
            );
        }
        for (what, a, b) in [
            ("lm", &got.lm_grads, &want.lm_grads),
            ("candidate", &got.cand_grads, &want.cand_grads),
        ] {
            assert!(
                b.iter().any(|g| *g != 0.0),
                "{arch:?}: {what} gradients all zero"
            );
            let e = rel_err_f32(a, b, b.iter().fold(0f32, |x, y| x.max(y.abs())));
            assert!(
                e <= 1e-4,
                "{arch:?}: {what} bias gradients differ (rel err {e:.2e})"
            );
        }
        assert_eq!(got.generated, want.generated, "{arch:?}: greedy generation");
        assert!(want.generated.iter().all(|g| g.len() == 6));
    });
}

/// Decoders with 32-wide heads and 16 or more positions, where the fast
/// backend's attention runs on AVX-512 register tiles (`attn512`, causal,
/// grouped-query heads, padding) where the CPU has them: the next-token
/// loss, every bias gradient and greedy generation from a 17-token prompt
/// (its prefill through the KV cache) match the reference.
#[test]
fn decoders_with_wide_heads_match_reference() {
    use beft::backend::fast::attn512;
    use decoder_common::{write_decoder, Size, Tiny};
    let dims = AttnDims::self_attn(3, 24, 2, 2, 32, true);
    if !attn512::handles(&dims) {
        println!("note: attention takes the GEMM path here (no AVX-512), checked all the same");
    }
    fn run<B: Backend<T = f32>>(be: &B, md: &ModelDir) -> (f64, Vec<f32>, Vec<Vec<u32>>) {
        let dec = all_biases(be, md);
        let (lm, grads) = lm_step(be, &dec, &[20, 17, 24], 4);
        let prompts = [(0..17u32).map(|i| 3 + (i * 7) % 10).collect::<Vec<_>>()];
        let slab = Slab::new(be, &dec.init);
        let generated = dec
            .generate_greedy(be, &slab.params, &prompts, 5, &|_| false)
            .unwrap();
        (lm, grads, generated)
    }
    let size = Size {
        layers: 2,
        hidden: 64,
        ff: 96,
    };
    for arch in [Tiny::Gpt2, Tiny::Opt, Tiny::Llama, Tiny::Qwen2] {
        let tmp = tempfile::TempDir::new().unwrap();
        write_decoder(tmp.path(), arch, 5, size);
        let md = ModelDir::open(tmp.path()).unwrap();
        let (lr, gr, wr) = run(&Ref::new(), &md);
        let (lf, gf, wf) = run(&FastCpu::new().poisoned(), &md);
        assert!(
            (lf - lr).abs() <= 1e-5 * lr.abs(),
            "{arch:?}: loss {lf} vs {lr}"
        );
        assert!(gr.iter().any(|g| *g != 0.0), "{arch:?}: gradients all zero");
        let e = rel_err_f32(&gf, &gr, gr.iter().fold(0f32, |a, b| a.max(b.abs())));
        assert!(
            e <= 1e-4,
            "{arch:?}: bias gradients differ (rel err {e:.2e})"
        );
        assert_eq!(wf, wr, "{arch:?}: greedy generation");
    }
}

/// `BEFT_CPU_GEMM=bf16` on a whole bias-only step: the fused ops (q, k, v
/// on one packed input; the MLP's activation written packed) give bit for
/// bit what the separate ops give; the loss and every bias
/// gradient stay within bf16-autocast distance of the f32 reference, and
/// the products really were bf16 (the result is not the f32 one).
#[test]
fn bf16_products_track_the_reference_on_a_tiny_model() {
    if !gemm16::available() {
        println!("skipped: this CPU has no AVX-512 BF16");
        return;
    }
    let tmp = tempfile::TempDir::new().unwrap();
    common::write_tiny_model(tmp.path(), common::TinyArch::Bert, 7, None);
    let md = ModelDir::open(tmp.path()).unwrap();
    let opts = EncoderOptions {
        pooling: PoolKind::Mean,
        num_labels: 3,
        terms: BiasTerm::parse_set("all").unwrap(),
        seed: 3,
    };
    let r = Ref::new();
    let f32s = FastCpu::new();
    let b16 = FastCpu::with_gemm(CpuGemm::Bf16).unwrap().poisoned();
    let er = Encoder::load(&r, &md, opts.clone()).unwrap();
    let e32 = Encoder::load(&f32s, &md, opts.clone()).unwrap();
    let e16 = Encoder::load(&b16, &md, opts.clone()).unwrap();
    // The trait's unfused defaults (q, k, v and the MLP as separate ops).
    let sep = beft::backend::sim::SimDevice::new(FastCpu::with_gemm(CpuGemm::Bf16).unwrap(), None);
    let es = Encoder::load(&sep, &md, opts).unwrap();
    let mut rng = Rng::new(11);
    // 4 × 19 = 76 rows: above BF16_MIN_ROWS, so every product is bf16.
    let batch = random_batch(&mut rng, 4, 19, common::TINY_VOCAB, 3);
    let dr = er.upload_batch(&r, &batch).unwrap();
    let d32 = e32.upload_batch(&f32s, &batch).unwrap();
    let d16 = e16.upload_batch(&b16, &batch).unwrap();
    let ds = es.upload_batch(&sep, &batch).unwrap();
    let mut sr = Slab::new(&r, &er.init);
    let mut s32 = Slab::new(&f32s, &e32.init);
    let mut s16 = Slab::new(&b16, &e16.init);
    let (lr, _) = er.loss_and_grad(&r, &sr.params, &mut sr.grads, &dr, None);
    let (_, log32) = e32.loss_and_grad(&f32s, &s32.params, &mut s32.grads, &d32, None);
    let (l16, log16) = e16.loss_and_grad(&b16, &s16.params, &mut s16.grads, &d16, None);
    let mut ss = Slab::new(&sep, &es.init);
    let (ls, logs) = es.loss_and_grad(&sep, &ss.params, &mut ss.grads, &ds, None);
    assert_eq!(l16.to_bits(), ls.to_bits(), "fused vs separate ops: loss");
    assert_eq!(log16, logs, "fused vs separate ops: logits");
    let (g16, gs) = (b16.download(&s16.grads), sep.download(&ss.grads));
    let same = g16.iter().zip(&gs).all(|(x, y)| x.to_bits() == y.to_bits());
    assert!(same, "fused vs separate ops: bias gradients");
    assert!(
        (l16 - lr).abs() <= 1e-3 * lr.abs(),
        "bf16 loss {l16} vs reference {lr}"
    );
    assert_ne!(log16, log32, "the bf16 products were not used");
    let (gr, g16) = (r.download(&sr.grads), b16.download(&s16.grads));
    let all = gr.iter().fold(0f32, |a, b| a.max(b.abs()));
    let mut worst = 0f32;
    for slot in &er.layout.slots {
        let (a, b) = (
            &g16[slot.offset..slot.offset + slot.len()],
            &gr[slot.offset..slot.offset + slot.len()],
        );
        let e = rel_err_f32(a, b, all);
        worst = worst.max(e);
        assert!(
            e <= 2e-2,
            "bf16: gradient of {} differs (err {e:.2e} of the largest gradient)",
            slot.name
        );
    }
    println!("bf16 step: loss {l16} vs {lr}; worst gradient error {worst:.2e} of the largest");
}

/// `BEFT_CPU_GEMM=bf16` on a next-token step of every decoder family
/// (Conv1D and Linear layouts, grouped-query attention, GELU, ReLU and
/// SwiGLU MLPs), outputs poisoned. The fused ops (the q, k, v projections
/// on one packed input; the MLP's activation written packed by its first
/// product) give bit for bit what the separate ops give (run through
/// `SimDevice`, which keeps the trait's unfused defaults); the loss and
/// every bias gradient stay near the f32 reference; and the bf16 products
/// ran.
#[test]
fn bf16_products_track_the_reference_on_tiny_decoders() {
    use beft::backend::sim::SimDevice;
    if !gemm16::available() {
        println!("skipped: this CPU has no AVX-512 BF16");
        return;
    }
    // 5 × 9 = 45 rows: above BF16_MIN_ROWS, so every product is bf16.
    fn run<B: Backend<T = f32>>(be: &B, md: &ModelDir) -> (f64, Vec<f32>) {
        lm_step(be, &all_biases(be, md), &[9, 7, 9, 8, 9], 5)
    }
    let b16 = || FastCpu::with_gemm(CpuGemm::Bf16).unwrap().poisoned();
    each_tiny_decoder(|arch, md| {
        let (lr, gr) = run(&Ref::new(), md);
        let (_, g32) = run(&FastCpu::new(), md);
        let (l16, g16) = run(&b16(), md);
        let (lu, gu) = run(&SimDevice::new(b16(), None), md);
        assert_eq!(
            l16.to_bits(),
            lu.to_bits(),
            "{arch:?}: fused vs separate ops, loss"
        );
        let same = g16.iter().zip(&gu).all(|(x, y)| x.to_bits() == y.to_bits());
        assert!(same, "{arch:?}: fused vs separate ops, bias gradients");
        assert_ne!(g16, g32, "{arch:?}: the bf16 products were not used");
        assert!(gr.iter().any(|g| *g != 0.0), "{arch:?}: gradients all zero");
        let e = rel_err_f32(&g16, &gr, gr.iter().fold(0f32, |a, b| a.max(b.abs())));
        println!("{arch:?}: bf16 loss {l16} vs {lr}; gradient error {e:.2e} of the largest");
        assert!(
            (l16 - lr).abs() <= 1e-3 * lr.abs(),
            "{arch:?}: bf16 loss {l16} vs reference {lr}"
        );
        // Inputs rounded to 3 significant digits on a tiny random model:
        // a few per cent of the largest gradient.
        assert!(
            e <= 0.1,
            "{arch:?}: bf16 bias gradients differ (err {e:.2e} of the largest)"
        );
    });
}

// ---- Hugging Face parity fixtures on the fast backend -----------------

fn hf_case(case: &str) {
    let Expected { tensors, meta } = read_expected(case);
    let md = ModelDir::open(&fixture(case).join("model")).expect("fixture model opens");
    let (lshape, logits_want) = tensors["logits"].clone();
    let pooling = match meta.get("pooling").map(|s| s.as_str()) {
        Some("mean") => PoolKind::Mean,
        _ => PoolKind::Cls,
    };
    let be = FastCpu::new();
    let enc = Encoder::load(
        &be,
        &md,
        EncoderOptions {
            pooling,
            num_labels: lshape[1],
            terms: BiasTerm::parse_set("all").unwrap(),
            seed: 0,
        },
    )
    .expect("encoder loads");
    let (ishape, ids) = &tensors["input_ids"];
    let (b, t) = (ishape[0], ishape[1]);
    let mask: Vec<f32> = tensors["attention_mask"]
        .1
        .iter()
        .map(|x| *x as f32)
        .collect();
    let batch = Batch {
        batch: b,
        seq: t,
        ids: ids.iter().map(|x| *x as u32).collect(),
        type_ids: tensors["token_type_ids"]
            .1
            .iter()
            .map(|x| *x as u32)
            .collect(),
        tokens: mask.iter().filter(|m| **m > 0.0).count(),
        mask,
        labels: tensors["labels"].1.iter().map(|x| *x as f32).collect(),
    };
    let db = enc.upload_batch(&be, &batch).expect("batch uploads");
    let mut slab = Slab::new(&be, &enc.init);
    let (loss, logits) = enc.loss_and_grad(&be, &slab.params, &mut slab.grads, &db, None);
    let logits: Vec<f64> = logits.iter().map(|x| *x as f64).collect();
    let e = rel_err(&logits, &logits_want, max_abs(&logits_want));
    assert!(e <= 1e-4, "{case}: logits differ (rel err {e:.2e})");
    let loss_want = tensors["loss"].1[0];
    assert!(
        (loss - loss_want).abs() / loss_want.abs() <= 1e-4,
        "{case}: loss {loss} vs {loss_want}"
    );
    let grads: Vec<f64> = be.download(&slab.grads).iter().map(|x| *x as f64).collect();
    let all_scale = tensors
        .iter()
        .filter(|(k, _)| k.starts_with("grad."))
        .map(|(_, (_, v))| max_abs(v))
        .fold(0.0, f64::max);
    let mut checked = 0;
    for slot in &enc.layout.slots {
        let (_, want) = &tensors[&format!("grad.{}", slot.name)];
        let got = &grads[slot.offset..slot.offset + slot.len()];
        let is_key = slot.name.contains("attention.self.key");
        let scale = if is_key { all_scale } else { max_abs(want) };
        let e = rel_err(got, want, scale);
        assert!(
            e <= 1e-4,
            "{case}: gradient of {} differs (rel err {e:.2e})",
            slot.name
        );
        checked += 1;
    }
    assert!(checked > 0);
}

#[test]
fn hf_parity_fixtures_on_fast_backend() {
    for case in [
        "bert_cls",
        "bert_pair_regression",
        "roberta_cls",
        "bert_mean",
        "bert_cls_bf16",
        "bert_cls_sharded",
    ] {
        hf_case(case);
    }
}
