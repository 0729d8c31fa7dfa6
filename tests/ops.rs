//! The CPU op vocabulary in f64: every backward op against central finite
//! differences, and every forward op against a naive composed reference.

use beft::backend::cpu::{act_value, CpuBackend, CpuBuf};
use beft::backend::{
    dropout_keep, Act, AdamW, AttnDims, Backend, CandidateIndex, Dropout, PoolKind,
};
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
        assert!(
            (a - b).abs() <= tol * scale,
            "{name}[{i}]: got {a}, want {b} (tolerance {} )",
            tol * scale
        );
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
                    let w: Vec<f64> = if acc {
                        want.iter().zip(&c0).map(|(x, y)| x + y).collect()
                    } else {
                        want.clone()
                    };
                    assert_close(
                        &format!("matmul {m}x{n}x{k} ta={ta} tb={tb} acc={acc}"),
                        &v(&c),
                        &w,
                        1e-12,
                    );
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
    assert_eq!(
        &got[..3],
        &[0.5, 0.5, 0.5],
        "bias_grad must not touch other slots"
    );
    let want: Vec<f64> = num[3..].iter().map(|g| g + 0.5).collect();
    assert_close("bias_grad", &got[3..], &want, 1e-7);
}

#[test]
fn activations_backward_match_finite_differences() {
    let be = Be::new();
    let mut rng = Rng::new(3);
    let n = 41;
    let x: Vec<f64> = rand_vec(&mut rng, n, 2.0)
        .into_iter()
        .map(|a| if a.abs() < 1e-3 { 0.3 } else { a })
        .collect();
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
    for (x, want) in [
        (0.0f64, 0.0f64),
        (1.0, 0.841_344_746_068_542_9),
        (-1.0, -0.158_655_253_931_457_05),
    ] {
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
        let (mut y, mut xh, mut rs) =
            (be.zeros(rows * cols), be.zeros(rows * cols), be.zeros(rows));
        be.layernorm_fwd(
            &mut y,
            &mut xh,
            &mut rs,
            &be.upload(xx),
            &be.upload(&gamma),
            &be.upload(bb),
            0,
            rows,
            cols,
            1e-5,
        );
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
    be.layernorm_bwd(
        &mut dx,
        &be.upload(&w),
        &xh,
        &rs,
        &be.upload(&gamma),
        rows,
        cols,
    );
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
                        s[j] = (0..dh)
                            .map(|e| {
                                q[((b * t + i) * h + hh) * dh + e]
                                    * k[((b * t + j) * kvh + kh) * dh + e]
                            })
                            .sum::<f64>()
                            * scale;
                    }
                }
                let mx = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = s.iter().map(|x| (x - mx).exp()).sum();
                for j in 0..t {
                    let mut p = (s[j] - mx).exp() / z;
                    if let Some(dr) = c.dropout {
                        let idx = (((b * h + hh) * t + i) * t + j) as u32;
                        p = if dropout_keep(dr.seed, idx, dr.p) {
                            p / (1.0 - dr.p as f64)
                        } else {
                            0.0
                        };
                    }
                    for e in 0..dh {
                        out[((b * t + i) * h + hh) * dh + e] +=
                            p * vv[((b * t + j) * kvh + kh) * dh + e];
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
    let cases = [
        AttnCase {
            b: 2,
            t: 5,
            h: 2,
            kvh: 2,
            dh: 3,
            causal: false,
            dropout: None,
            lens: vec![5, 3],
        },
        AttnCase {
            b: 1,
            t: 7,
            h: 3,
            kvh: 3,
            dh: 4,
            causal: false,
            dropout: None,
            lens: vec![7],
        },
        AttnCase {
            b: 2,
            t: 6,
            h: 4,
            kvh: 2,
            dh: 2,
            causal: true,
            dropout: None,
            lens: vec![6, 4],
        },
        AttnCase {
            b: 2,
            t: 4,
            h: 2,
            kvh: 1,
            dh: 3,
            causal: true,
            dropout: None,
            lens: vec![4, 4],
        },
        AttnCase {
            b: 2,
            t: 5,
            h: 2,
            kvh: 2,
            dh: 3,
            causal: false,
            dropout: Some(Dropout { p: 0.3, seed: 99 }),
            lens: vec![5, 2],
        },
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
        let dims = AttnDims::self_attn(c.b, c.t, c.h, c.kvh, c.dh, c.causal);
        let fwd = |q: &[f64], k: &[f64], vv: &[f64]| {
            let (mut out, mut lse) = (be.zeros(nq), be.zeros(c.b * c.h * c.t));
            be.attention_fwd(
                &mut out,
                &mut lse,
                &be.upload(q),
                &be.upload(k),
                &be.upload(vv),
                &be.upload(&mask),
                dims,
                c.dropout,
            );
            (out, lse)
        };
        let (out, lse) = fwd(&q, &k, &vv);
        assert_close(
            &format!("case {ci} attention fwd"),
            &v(&out),
            &naive_attention(&q, &k, &vv, &mask, c),
            1e-12,
        );
        let (mut dq, mut dk, mut dv) = (be.zeros(nq), be.zeros(nk), be.zeros(nk));
        be.attention_bwd(
            &mut dq,
            &mut dk,
            &mut dv,
            &be.upload(&w),
            &be.upload(&q),
            &be.upload(&k),
            &be.upload(&vv),
            &out,
            &lse,
            &be.upload(&mask),
            dims,
            c.dropout,
        );
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
    be.embedding_fwd(
        &mut out,
        &be.upload(&table),
        &be.upload_ids(&ids),
        ids.len(),
        dim,
        true,
    );
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
        be.cross_entropy(
            &mut l,
            &mut d,
            &be.upload(xx),
            &labels,
            rows,
            classes,
            1.0 / rows as f64,
        );
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
    be.cross_entropy(
        &mut l,
        &mut d,
        &be.upload(&x),
        &labels,
        rows,
        classes,
        1.0 / rows as f64,
    );
    assert_close("cross_entropy", &v(&d), &numgrad(&x, &loss), 1e-7);

    let y = rand_vec(&mut rng, rows, 1.0);
    let xr = rand_vec(&mut rng, rows, 1.0);
    let mse = |xx: &[f64]| {
        let (mut l, mut d) = (be.zeros(rows), be.zeros(rows));
        be.mse(
            &mut l,
            &mut d,
            &be.upload(xx),
            &be.upload(&y),
            rows,
            1.0 / rows as f64,
        );
        v(&l).iter().sum::<f64>() / rows as f64
    };
    let (mut l, mut d) = (be.zeros(rows), be.zeros(rows));
    be.mse(
        &mut l,
        &mut d,
        &be.upload(&xr),
        &be.upload(&y),
        rows,
        1.0 / rows as f64,
    );
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
    assert!(av
        .iter()
        .all(|x| *x == 0.0 || (*x - 1.0 / 0.75).abs() < 1e-12));
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
    let h = AdamW {
        lr: 0.01,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.1,
        step: 1,
    };
    be.adamw(&mut p, &be.upload(&g), &mut m, &mut vv, 3, h);
    for i in 0..3 {
        // Step 1: m̂ = g, v̂ = g², update = g/(|g|+eps).
        let decayed = p0[i] * (1.0 - 0.01 * 0.1);
        let want = decayed - 0.01 * g[i] / (g[i].abs() + 1e-8);
        assert!(
            (v(&p)[i] - want).abs() < 1e-12,
            "adamw[{i}]: {} vs {want}",
            v(&p)[i]
        );
    }
}

#[test]
fn kv_cache_attention_matches_the_tail_of_full_causal_attention() {
    let be = Be::new();
    let mut rng = Rng::new(8);
    let (b, t, h, kvh, dh) = (2, 7, 4, 2, 3);
    let q = rand_vec(&mut rng, b * t * h * dh, 1.0);
    let k = rand_vec(&mut rng, b * t * kvh * dh, 1.0);
    let vv = rand_vec(&mut rng, b * t * kvh * dh, 1.0);
    // Left padding on the second sequence.
    let mut mask = vec![1.0; b * t];
    mask[t] = 0.0;
    mask[t + 1] = 0.0;
    let full = AttnDims::self_attn(b, t, h, kvh, dh, true);
    let (mut out, mut lse) = (be.zeros(b * t * h * dh), be.zeros(b * h * t));
    be.attention_fwd(
        &mut out,
        &mut lse,
        &be.upload(&q),
        &be.upload(&k),
        &be.upload(&vv),
        &be.upload(&mask),
        full,
        None,
    );
    // The last 2 queries of each sequence against all 7 cached keys.
    let nq = 2;
    let mut q_tail = Vec::new();
    for bi in 0..b {
        q_tail.extend_from_slice(&q[(bi * t + t - nq) * h * dh..(bi * t + t) * h * dh]);
    }
    let dims = AttnDims {
        seq: nq,
        q_start: t - nq,
        ..full
    };
    let (mut o2, mut l2) = (be.zeros(b * nq * h * dh), be.zeros(b * h * nq));
    be.attention_fwd(
        &mut o2,
        &mut l2,
        &be.upload(&q_tail),
        &be.upload(&k),
        &be.upload(&vv),
        &be.upload(&mask),
        dims,
        None,
    );
    let out = v(&out);
    let o2 = v(&o2);
    for bi in 0..b {
        let want = &out[(bi * t + t - nq) * h * dh..(bi * t + t) * h * dh];
        let got = &o2[bi * nq * h * dh..(bi + 1) * nq * h * dh];
        assert_close("kv-cache attention", got, want, 1e-12);
    }
}

#[test]
fn rmsnorm_backward_matches_finite_differences() {
    let be = Be::new();
    let mut rng = Rng::new(9);
    let (rows, cols) = (3, 10);
    let x = rand_vec(&mut rng, rows * cols, 1.5);
    let gamma = rand_vec(&mut rng, cols, 1.0);
    let w = rand_vec(&mut rng, rows * cols, 1.0);
    let run = |xx: &[f64]| {
        let (mut y, mut xh, mut rs) =
            (be.zeros(rows * cols), be.zeros(rows * cols), be.zeros(rows));
        be.rmsnorm_fwd(
            &mut y,
            &mut xh,
            &mut rs,
            &be.upload(xx),
            &be.upload(&gamma),
            rows,
            cols,
            1e-6,
        );
        (y, xh, rs)
    };
    let (y, xh, rs) = run(&x);
    for r in 0..rows {
        let row = &x[r * cols..(r + 1) * cols];
        let ms = row.iter().map(|a| a * a).sum::<f64>() / cols as f64;
        for c in 0..cols {
            assert!((v(&y)[r * cols + c] - row[c] / (ms + 1e-6).sqrt() * gamma[c]).abs() < 1e-12);
        }
    }
    let num = numgrad(&x, &|xx| dot(&v(&run(xx).0), &w));
    let mut dx = be.zeros(rows * cols);
    be.rmsnorm_bwd(
        &mut dx,
        &be.upload(&w),
        &xh,
        &rs,
        &be.upload(&gamma),
        rows,
        cols,
    );
    assert_close("rmsnorm dx", &v(&dx), &num, 1e-6);
}

#[test]
fn rope_is_a_rotation_and_its_inverse_is_the_backward() {
    let be = Be::new();
    let mut rng = Rng::new(10);
    let (rows, heads, dh) = (5, 3, 8);
    let x = rand_vec(&mut rng, rows * heads * dh, 1.0);
    let pos = be.upload_ids(&[0, 1, 2, 7, 100]);
    let w = rand_vec(&mut rng, rows * heads * dh, 1.0);
    let fwd = |xx: &[f64]| {
        let mut y = be.upload(xx);
        be.rope(&mut y, &pos, rows, heads, dh, 10000.0, false);
        v(&y)
    };
    let y = fwd(&x);
    // Position 0 is the identity; every rotation keeps pair norms.
    assert_close(
        "rope at position 0",
        &y[..heads * dh],
        &x[..heads * dh],
        1e-12,
    );
    let norm = |a: &[f64]| a.iter().map(|z| z * z).sum::<f64>();
    assert!((norm(&y) - norm(&x)).abs() < 1e-9);
    // Hugging Face's rotate_half at one element: pair (i, i+dh/2), angle pos·θ^(-2i/dh).
    let (r, hh, i) = (3usize, 1usize, 2usize);
    let ang = 7.0 * 10000f64.powf(-2.0 * i as f64 / dh as f64);
    let base = (r * heads + hh) * dh;
    let want = x[base + i] * ang.cos() - x[base + i + dh / 2] * ang.sin();
    assert!((y[base + i] - want).abs() < 1e-12);
    // The inverse undoes it, and it is the adjoint (the backward pass).
    let mut back = be.upload(&y);
    be.rope(&mut back, &pos, rows, heads, dh, 10000.0, true);
    assert_close("rope inverse", &v(&back), &x, 1e-12);
    let num = numgrad(&x, &|xx| dot(&fwd(xx), &w));
    let mut dx = be.upload(&w);
    be.rope(&mut dx, &pos, rows, heads, dh, 10000.0, true);
    assert_close("rope backward", &v(&dx), &num, 1e-7);
}

#[test]
fn swiglu_backward_matches_finite_differences() {
    let be = Be::new();
    let mut rng = Rng::new(11);
    let n = 17;
    let g = rand_vec(&mut rng, n, 2.0);
    let u = rand_vec(&mut rng, n, 1.0);
    let w = rand_vec(&mut rng, n, 1.0);
    let f = |gg: &[f64], uu: &[f64]| {
        let mut h = be.zeros(n);
        be.swiglu_fwd(&mut h, &be.upload(gg), &be.upload(uu), n);
        dot(&v(&h), &w)
    };
    let (mut dg, mut du) = (be.zeros(n), be.zeros(n));
    be.swiglu_bwd(
        &mut dg,
        &mut du,
        &be.upload(&w),
        &be.upload(&g),
        &be.upload(&u),
        n,
    );
    assert_close("swiglu dgate", &v(&dg), &numgrad(&g, &|x| f(x, &u)), 1e-7);
    assert_close("swiglu dup", &v(&du), &numgrad(&u, &|x| f(&g, x)), 1e-7);
}

#[test]
fn gather_scatter_and_scale_rows() {
    let be = Be::new();
    let mut rng = Rng::new(12);
    let (n, cols) = (6, 4);
    let x = rand_vec(&mut rng, n * cols, 1.0);
    let idx = vec![5u32, 0, 5, 2];
    let w = rand_vec(&mut rng, idx.len() * cols, 1.0);
    let f = |xx: &[f64]| {
        let mut o = be.zeros(idx.len() * cols);
        be.embedding_fwd(&mut o, &be.upload(xx), &idx, idx.len(), cols, false);
        dot(&v(&o), &w)
    };
    let mut dx = be.zeros(n * cols);
    be.scatter_add_rows(&mut dx, &be.upload(&w), &idx, idx.len(), cols);
    assert_close("scatter_add_rows", &v(&dx), &numgrad(&x, &f), 1e-7);
    let mut y = be.upload(&x);
    let rw: Vec<f64> = (0..n).map(|r| r as f64 - 2.0).collect();
    be.scale_rows(&mut y, &be.upload(&rw), n, cols);
    for r in 0..n {
        for c in 0..cols {
            assert_eq!(v(&y)[r * cols + c], x[r * cols + c] * rw[r]);
        }
    }
}

#[test]
fn candidate_loss_matches_finite_differences() {
    let be = Be::new();
    let mut rng = Rng::new(13);
    // 2 examples: the first with 3 candidates (lengths 2, 1, 3), the second
    // with 2 (lengths 1, 2); vocab 5.
    let tok_cand = vec![0u32, 0, 1, 2, 2, 2, 3, 4, 4];
    let cand_ex = vec![0u32, 0, 0, 1, 1];
    let gold = vec![2u32, 3];
    let targets = vec![1u32, 4, 0, 2, 2, 3, 1, 0, 4];
    let (rows, vocab, ne) = (tok_cand.len(), 5usize, 2usize);
    let logits = rand_vec(&mut rng, rows * vocab, 1.5);
    let (tc, ce, gd) = (
        be.upload_ids(&tok_cand),
        be.upload_ids(&cand_ex),
        be.upload_ids(&gold),
    );
    let idx = CandidateIndex {
        tok_cand: &tc,
        cand_ex: &ce,
        gold: &gd,
        rows,
        cands: cand_ex.len(),
        examples: ne,
    };
    let run = |lg: &[f64]| {
        let (mut tl, mut dl) = (be.zeros(rows), be.zeros(rows * vocab));
        be.cross_entropy(&mut tl, &mut dl, &be.upload(lg), &targets, rows, vocab, 1.0);
        let (mut el, mut sc, mut rw) = (be.zeros(ne), be.zeros(cand_ex.len()), be.zeros(rows));
        be.candidate_loss(&mut el, &mut sc, &mut rw, &tl, &idx, 1.0 / ne as f64);
        be.scale_rows(&mut dl, &rw, rows, vocab);
        (v(&el).iter().sum::<f64>() / ne as f64, v(&dl), v(&sc))
    };
    let (loss, dl, sc) = run(&logits);
    // Scores are mean token log-probabilities.
    let logp = |r: usize| {
        let row = &logits[r * vocab..(r + 1) * vocab];
        let z: f64 = row.iter().map(|a| a.exp()).sum();
        (row[targets[r] as usize].exp() / z).ln()
    };
    assert!((sc[0] - (logp(0) + logp(1)) / 2.0).abs() < 1e-12);
    assert!((sc[2] - (logp(3) + logp(4) + logp(5)) / 3.0).abs() < 1e-12);
    assert!(loss > 0.0);
    assert_close(
        "candidate loss gradient",
        &dl,
        &numgrad(&logits, &|x| run(x).0),
        1e-6,
    );
}
