//! The CPU op vocabulary in f64: every backward op against central finite
//! differences, and every forward op against a naive composed reference.

use beft::backend::cpu::{act_value, CpuBackend, CpuBuf};
use beft::backend::{dropout_keep, Act, AdamW, AttnDims, Backend, Dropout, PoolKind};
use beft::rng::Rng;

type Be = CpuBackend<f64>;

fn rand_vec(rng: &mut Rng, n: usize, scale: f64) -> Vec<f64> {
    (0..n).map(|_| rng.normal() * scale).collect()
}

fn v(b: &CpuBuf<f64>) -> Vec<f64> {
    b.to_vec()
}

/// Central-difference gradient of `f` at `x`.
fn numgrad(x: &[f64], f: &dyn Fn(&[f64]) -> f64) -> Vec<f64> {
    let eps = 1e-6;
    let mut g = vec![0.0; x.len()];
    let mut xp = x.to_vec();
    for i in 0..x.len() {
        let o = xp[i];
        xp[i] = o + eps;
        let a = f(&xp);
        xp[i] = o - eps;
        let b = f(&xp);
        xp[i] = o;
        g[i] = (a - b) / (2.0 * eps);
    }
    g
}

fn assert_close(name: &str, got: &[f64], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len(), "{name}: length");
    let scale = want.iter().fold(0.0f64, |a, b| a.max(b.abs())).max(1e-3);
    for (i, (a, b)) in got.iter().zip(want).enumerate() {
        assert!((a - b).abs() <= tol * scale, "{name}[{i}]: got {a}, want {b} (tolerance {} )", tol * scale);
    }
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

#[test]
fn matmul_all_transposes_match_naive() {
    let be = Be::new();
    let mut rng = Rng::new(1);
    for &(m, n, k) in &[(1, 1, 1), (3, 5, 7), (17, 9, 33), (70, 3, 5)] {
        for ta in [false, true] {
            for tb in [false, true] {
                let a = rand_vec(&mut rng, m * k, 1.0);
                let b = rand_vec(&mut rng, k * n, 1.0);
                let c0 = rand_vec(&mut rng, m * n, 1.0);
                let mut want = vec![0.0; m * n];
                for i in 0..m {
                    for j in 0..n {
                        let mut s = 0.0;
                        for p in 0..k {
                            let av = if ta { a[p * m + i] } else { a[i * k + p] };
                            let bv = if tb { b[j * k + p] } else { b[p * n + j] };
                            s += av * bv;
                        }
                        want[i * n + j] = s;
                    }
                }
                for acc in [false, true] {
                    let mut c = be.upload(&c0);
                    be.matmul(&mut c, &be.upload(&a), &be.upload(&b), m, n, k, ta, tb, acc);
                    let w: Vec<f64> = if acc { want.iter().zip(&c0).map(|(x, y)| x + y).collect() } else { want.clone() };
                    assert_close(&format!("matmul {m}x{n}x{k} ta={ta} tb={tb} acc={acc}"), &v(&c), &w, 1e-12);
                }
            }
        }
    }
}

#[test]
fn bias_add_and_bias_grad_are_adjoint() {
    let be = Be::new();
    let mut rng = Rng::new(2);
    let (rows, cols) = (7, 5);
    let bias = rand_vec(&mut rng, cols + 3, 1.0);
    let x = rand_vec(&mut rng, rows * cols, 1.0);
    let w = rand_vec(&mut rng, rows * cols, 1.0);
    // d/dbias Σ w ⊙ (x + bias) = column sums of w.
    let f = |b: &[f64]| {
        let mut y = be.upload(&x);
        be.bias_add(&mut y, &be.upload(b), 3, rows, cols);
        dot(&v(&y), &w)
    };
    let num = numgrad(&bias, &f);
    let mut db = be.upload(&vec![0.5; cols + 3]);
    be.bias_grad(&mut db, 3, &be.upload(&w), rows, cols);
    let got = v(&db);
    assert_eq!(&got[..3], &[0.5, 0.5, 0.5], "bias_grad must not touch other slots");
    let want: Vec<f64> = num[3..].iter().map(|g| g + 0.5).collect();
    assert_close("bias_grad", &got[3..], &want, 1e-7);
}

#[test]
fn activations_backward_match_finite_differences() {
    let be = Be::new();
    let mut rng = Rng::new(3);
    let n = 41;
    let x: Vec<f64> = rand_vec(&mut rng, n, 2.0).into_iter().map(|a| if a.abs() < 1e-3 { 0.3 } else { a }).collect();
    let w = rand_vec(&mut rng, n, 1.0);
    for act in [Act::Gelu, Act::GeluTanh, Act::Relu, Act::Tanh, Act::Silu] {
        let f = |xx: &[f64]| {
            let mut y = be.zeros(n);
            be.act_fwd(act, &mut y, &be.upload(xx), n);
            dot(&v(&y), &w)
        };
        let num = numgrad(&x, &f);
        let mut dx = be.zeros(n);
        be.act_bwd(act, &mut dx, &be.upload(&x), &be.upload(&w), n);
        assert_close(&format!("{act:?}"), &v(&dx), &num, 1e-7);
    }
    // Exact GELU against its definition at a few points.
    for (x, want) in [(0.0f64, 0.0f64), (1.0, 0.841_344_746_068_542_9), (-1.0, -0.158_655_253_931_457_05)] {
        assert!((act_value(Act::Gelu, x) - want).abs() < 1e-12, "gelu({x})");
    }
}

#[test]
fn layernorm_backward_matches_finite_differences() {
    let be = Be::new();
    let mut rng = Rng::new(4);
    let (rows, cols) = (4, 9);
    let x = rand_vec(&mut rng, rows * cols, 1.5);
    let gamma = rand_vec(&mut rng, cols, 1.0);
    let beta = rand_vec(&mut rng, cols, 1.0);
    let w = rand_vec(&mut rng, rows * cols, 1.0);
    let run = |xx: &[f64], bb: &[f64]| {
        let (mut y, mut xh, mut rs) = (be.zeros(rows * cols), be.zeros(rows * cols), be.zeros(rows));
        be.layernorm_fwd(&mut y, &mut xh, &mut rs, &be.upload(xx), &be.upload(&gamma), &be.upload(bb), 0, rows, cols, 1e-5);
        (y, xh, rs)
    };
    // Forward against the definition.
    let (y, xh, rs) = run(&x, &beta);
    for r in 0..rows {
        let row = &x[r * cols..(r + 1) * cols];
        let mean = row.iter().sum::<f64>() / cols as f64;
        let var = row.iter().map(|a| (a - mean).powi(2)).sum::<f64>() / cols as f64;
        for c in 0..cols {
            let want = (row[c] - mean) / (var + 1e-5).sqrt() * gamma[c] + beta[c];
            assert!((v(&y)[r * cols + c] - want).abs() < 1e-12);
        }
    }
    let num_x = numgrad(&x, &|xx| dot(&v(&run(xx, &beta).0), &w));
    let mut dx = be.zeros(rows * cols);
    be.layernorm_bwd(&mut dx, &be.upload(&w), &xh, &rs, &be.upload(&gamma), rows, cols);
    assert_close("layernorm dx", &v(&dx), &num_x, 1e-6);
    let num_b = numgrad(&beta, &|bb| dot(&v(&run(&x, bb).0), &w));
    let mut db = be.zeros(cols);
    be.bias_grad(&mut db, 0, &be.upload(&w), rows, cols);
    assert_close("layernorm dbeta", &v(&db), &num_b, 1e-7);
}

struct AttnCase {
    b: usize,
    t: usize,
    h: usize,
    kvh: usize,
    dh: usize,
    causal: bool,
    dropout: Option<Dropout>,
    lens: Vec<usize>,
}

fn naive_attention(q: &[f64], k: &[f64], vv: &[f64], mask: &[f64], c: &AttnCase) -> Vec<f64> {
    let (t, h, kvh, dh) = (c.t, c.h, c.kvh, c.dh);
    let mut out = vec![0.0; c.b * t * h * dh];
    let scale = 1.0 / (dh as f64).sqrt();
    for b in 0..c.b {
        for hh in 0..h {
            let kh = hh / (h / kvh);
            for i in 0..t {
                let mut s = vec![f64::NEG_INFINITY; t];
                for j in 0..t {
                    if mask[b * t + j] > 0.0 && (!c.causal || j <= i) {
                        s[j] = (0..dh).map(|e| q[((b * t + i) * h + hh) * dh + e] * k[((b * t + j) * kvh + kh) * dh + e]).sum::<f64>() * scale;
                    }
                }
                let mx = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = s.iter().map(|x| (x - mx).exp()).sum();
                for j in 0..t {
                    let mut p = (s[j] - mx).exp() / z;
                    if let Some(dr) = c.dropout {
                        let idx = (((b * h + hh) * t + i) * t + j) as u32;
                        p = if dropout_keep(dr.seed, idx, dr.p) { p / (1.0 - dr.p as f64) } else { 0.0 };
                    }
                    for e in 0..dh {
                        out[((b * t + i) * h + hh) * dh + e] += p * vv[((b * t + j) * kvh + kh) * dh + e];
                    }
                }
            }
        }
    }
    out
}

#[test]
fn attention_forward_and_backward_match_references() {
    let be = Be::new();
    let cases = vec![
        AttnCase { b: 2, t: 5, h: 2, kvh: 2, dh: 3, causal: false, dropout: None, lens: vec![5, 3] },
        AttnCase { b: 1, t: 7, h: 3, kvh: 3, dh: 4, causal: false, dropout: None, lens: vec![7] },
        AttnCase { b: 2, t: 6, h: 4, kvh: 2, dh: 2, causal: true, dropout: None, lens: vec![6, 4] },
        AttnCase { b: 2, t: 4, h: 2, kvh: 1, dh: 3, causal: true, dropout: None, lens: vec![4, 4] },
        AttnCase { b: 2, t: 5, h: 2, kvh: 2, dh: 3, causal: false, dropout: Some(Dropout { p: 0.3, seed: 99 }), lens: vec![5, 2] },
    ];
    let mut rng = Rng::new(5);
    for (ci, c) in cases.iter().enumerate() {
        let nq = c.b * c.t * c.h * c.dh;
        let nk = c.b * c.t * c.kvh * c.dh;
        let q = rand_vec(&mut rng, nq, 1.0);
        let k = rand_vec(&mut rng, nk, 1.0);
        let vv = rand_vec(&mut rng, nk, 1.0);
        let mut mask = vec![0.0; c.b * c.t];
        for b in 0..c.b {
            for j in 0..c.lens[b] {
                mask[b * c.t + j] = 1.0;
            }
        }
        let w = rand_vec(&mut rng, nq, 1.0);
        let dims = AttnDims { batch: c.b, seq: c.t, heads: c.h, kv_heads: c.kvh, head_dim: c.dh, scale: 1.0 / (c.dh as f64).sqrt(), causal: c.causal };
        let fwd = |q: &[f64], k: &[f64], vv: &[f64]| {
            let (mut out, mut lse) = (be.zeros(nq), be.zeros(c.b * c.h * c.t));
            be.attention_fwd(&mut out, &mut lse, &be.upload(q), &be.upload(k), &be.upload(vv), &be.upload(&mask), dims, c.dropout);
            (out, lse)
        };
        let (out, lse) = fwd(&q, &k, &vv);
        assert_close(&format!("case {ci} attention fwd"), &v(&out), &naive_attention(&q, &k, &vv, &mask, c), 1e-12);
        let (mut dq, mut dk, mut dv) = (be.zeros(nq), be.zeros(nk), be.zeros(nk));
        be.attention_bwd(&mut dq, &mut dk, &mut dv, &be.upload(&w), &be.upload(&q), &be.upload(&k), &be.upload(&vv), &out, &lse, &be.upload(&mask), dims, c.dropout);
        let nq_ = numgrad(&q, &|x| dot(&v(&fwd(x, &k, &vv).0), &w));
        let nk_ = numgrad(&k, &|x| dot(&v(&fwd(&q, x, &vv).0), &w));
        let nv_ = numgrad(&vv, &|x| dot(&v(&fwd(&q, &k, x).0), &w));
        assert_close(&format!("case {ci} dq"), &v(&dq), &nq_, 1e-6);
        assert_close(&format!("case {ci} dk"), &v(&dk), &nk_, 1e-6);
        assert_close(&format!("case {ci} dv"), &v(&dv), &nv_, 1e-6);
        // b_k's gradient (column sums of dk per sequence) is zero: a constant
        // added to every key of a query shifts its scores alike.
        let dkv = v(&dk);
        let kd = c.kvh * c.dh;
        for col in 0..kd {
            let s: f64 = (0..c.b * c.t).map(|r| dkv[r * kd + col]).sum();
            assert!(s.abs() < 1e-10, "case {ci}: Σ dk column {col} = {s}");
        }
    }
}

#[test]
fn embedding_gather_and_pooling() {
    let be = Be::new();
    let mut rng = Rng::new(6);
    let (vocab, dim) = (11, 4);
    let table = rand_vec(&mut rng, vocab * dim, 1.0);
    let ids = vec![3u32, 0, 10, 3];
    let mut out = be.upload(&vec![1.0; ids.len() * dim]);
    be.embedding_fwd(&mut out, &be.upload(&table), &be.upload_ids(&ids), ids.len(), dim, true);
    for (r, &id) in ids.iter().enumerate() {
        for c in 0..dim {
            assert_eq!(v(&out)[r * dim + c], 1.0 + table[id as usize * dim + c]);
        }
    }
    let (b, t, d) = (2, 4, 3);
    let h = rand_vec(&mut rng, b * t * d, 1.0);
    let mask = vec![1.0, 1.0, 1.0, 0.0, 1.0, 1.0, 0.0, 0.0];
    let w = rand_vec(&mut rng, b * d, 1.0);
    for kind in [PoolKind::Cls, PoolKind::Mean] {
        let f = |hh: &[f64]| {
            let mut o = be.zeros(b * d);
            be.pool_fwd(kind, &mut o, &be.upload(hh), &be.upload(&mask), b, t, d);
            dot(&v(&o), &w)
        };
        let num = numgrad(&h, &f);
        let mut dh = be.upload(&vec![7.0; b * t * d]);
        be.pool_bwd(kind, &mut dh, &be.upload(&w), &be.upload(&mask), b, t, d);
        assert_close(&format!("{kind:?} pool"), &v(&dh), &num, 1e-7);
    }
}

#[test]
fn losses_match_finite_differences() {
    let be = Be::new();
    let mut rng = Rng::new(7);
    let (rows, classes) = (5, 3);
    let x = rand_vec(&mut rng, rows * classes, 2.0);
    let labels = vec![0u32, 2, 1, 1, 0];
    let loss = |xx: &[f64]| {
        let (mut l, mut d) = (be.zeros(rows), be.zeros(rows * classes));
        be.cross_entropy(&mut l, &mut d, &be.upload(xx), &labels, rows, classes, 1.0 / rows as f64);
        v(&l).iter().sum::<f64>() / rows as f64
    };
    // Against the definition: -log softmax.
    let mut want = 0.0;
    for r in 0..rows {
        let row = &x[r * classes..(r + 1) * classes];
        let z: f64 = row.iter().map(|a| a.exp()).sum();
        want -= (row[labels[r] as usize].exp() / z).ln();
    }
    assert!((loss(&x) - want / rows as f64).abs() < 1e-12);
    let (mut l, mut d) = (be.zeros(rows), be.zeros(rows * classes));
    be.cross_entropy(&mut l, &mut d, &be.upload(&x), &labels, rows, classes, 1.0 / rows as f64);
    assert_close("cross_entropy", &v(&d), &numgrad(&x, &loss), 1e-7);

    let y = rand_vec(&mut rng, rows, 1.0);
    let xr = rand_vec(&mut rng, rows, 1.0);
    let mse = |xx: &[f64]| {
        let (mut l, mut d) = (be.zeros(rows), be.zeros(rows));
        be.mse(&mut l, &mut d, &be.upload(xx), &be.upload(&y), rows, 1.0 / rows as f64);
        v(&l).iter().sum::<f64>() / rows as f64
    };
    let (mut l, mut d) = (be.zeros(rows), be.zeros(rows));
    be.mse(&mut l, &mut d, &be.upload(&xr), &be.upload(&y), rows, 1.0 / rows as f64);
    assert_close("mse", &v(&d), &numgrad(&xr, &mse), 1e-7);
}

#[test]
fn dropout_is_inverted_and_reproducible() {
    let be = Be::new();
    let n = 20000;
    let mut a = be.upload(&vec![1.0; n]);
    be.dropout(&mut a, n, 0.25, 42);
    let av = v(&a);
    let kept = av.iter().filter(|x| **x != 0.0).count() as f64 / n as f64;
    assert!((kept - 0.75).abs() < 0.02, "kept fraction {kept}");
    assert!(av.iter().all(|x| *x == 0.0 || (*x - 1.0 / 0.75).abs() < 1e-12));
    let mut b = be.upload(&vec![1.0; n]);
    be.dropout(&mut b, n, 0.25, 42);
    assert_eq!(av, v(&b), "same seed, same mask");
    let mut c = be.upload(&vec![1.0; n]);
    be.dropout(&mut c, n, 0.25, 43);
    assert_ne!(av, v(&c), "another seed, another mask");
}

#[test]
fn adamw_matches_pytorch_formula() {
    let be = Be::new();
    let p0 = vec![0.5, -1.0, 2.0];
    let g = vec![0.1, -0.2, 0.0];
    let (mut p, mut m, mut vv) = (be.upload(&p0), be.zeros(3), be.zeros(3));
    let h = AdamW { lr: 0.01, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.1, step: 1 };
    be.adamw(&mut p, &be.upload(&g), &mut m, &mut vv, 3, h);
    for i in 0..3 {
        // Step 1: m̂ = g, v̂ = g², update = g/(|g|+eps).
        let decayed = p0[i] * (1.0 - 0.01 * 0.1);
        let want = decayed - 0.01 * g[i] / (g[i].abs() + 1e-8);
        assert!((v(&p)[i] - want).abs() < 1e-12, "adamw[{i}]: {} vs {want}", v(&p)[i]);
    }
}
