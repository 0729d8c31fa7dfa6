//! The wgpu backend against the CPU oracle (`CpuBackend<f32>`): every op on
//! random inputs at ragged shapes (sizes off the tile and workgroup sizes,
//! odd head counts, grouped-query attention, the KV-cache shape), outputs
//! poisoned with NaN before each call so that an element left unwritten
//! fails, tolerance `atol + rtol·|ref|`; weights split across several
//! buffers; and whole training steps on tiny random models.
//!
//! Without a wgpu adapter every test prints "skipped: no wgpu adapter" and
//! passes — unless `BEFT_REQUIRE_WGPU=1` (CI, where lavapipe is installed),
//! which turns a missing adapter into a failure. Run with `--nocapture` to
//! see each check's maximum error.
#![cfg(feature = "wgpu")]

mod common;

use std::sync::OnceLock;

use beft::backend::cpu::CpuBackend;
use beft::backend::wgpu::WgpuBackend;
use beft::backend::{
    dropout_keep, Act, AdamW, AttnDims, Backend, CandidateIndex, Dropout, PoolKind,
};
use beft::data::Batch;
use beft::model::config::ModelDir;
use beft::model::{BiasTerm, Encoder, EncoderOptions};
use beft::rng::Rng;
use beft::weights::TensorView;
use common::{write_tiny_model, TinyArch, TINY_VOCAB};
use tempfile::TempDir;

type Cpu = CpuBackend<f32>;

/// The shared device (None, after printing why, when there is no adapter).
fn gpu() -> Option<&'static WgpuBackend> {
    static GPU: OnceLock<Option<WgpuBackend>> = OnceLock::new();
    GPU.get_or_init(|| open(None)).as_ref()
}

/// A second device that splits every weight above 128 bytes into several
/// buffers (exercises the split path on small tensors).
fn gpu_split() -> Option<&'static WgpuBackend> {
    static GPU: OnceLock<Option<WgpuBackend>> = OnceLock::new();
    GPU.get_or_init(|| open(Some(128))).as_ref()
}

fn open(split: Option<u64>) -> Option<WgpuBackend> {
    match WgpuBackend::with_split(None, split) {
        Ok(b) => {
            eprintln!("wgpu device: {}", b.name());
            Some(b)
        }
        Err(e) => {
            if std::env::var("BEFT_REQUIRE_WGPU").as_deref() == Ok("1") {
                panic!("BEFT_REQUIRE_WGPU=1 but the wgpu backend cannot open: {e}");
            }
            eprintln!("skipped: no wgpu adapter ({e})");
            None
        }
    }
}

macro_rules! need_gpu {
    () => {
        match gpu() {
            Some(g) => g,
            None => return,
        }
    };
}

fn rand_vec(rng: &mut Rng, n: usize, scale: f64) -> Vec<f32> {
    (0..n).map(|_| (rng.normal() * scale) as f32).collect()
}

fn nan(n: usize) -> Vec<f32> {
    vec![f32::NAN; n]
}

/// `|got − want| ≤ atol + rtol·|want|` everywhere (equal infinities pass,
/// NaN fails); prints and returns the largest absolute error.
fn check(name: &str, got: &[f32], want: &[f32], atol: f32, rtol: f32) -> f32 {
    assert_eq!(got.len(), want.len(), "{name}: length");
    let mut worst = 0f32;
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        if g == w {
            continue;
        }
        let err = (g - w).abs();
        assert!(
            err <= atol + rtol * w.abs(),
            "{name}[{i}]: wgpu {g}, cpu {w} (|err| {err:e} > {atol:e} + {rtol:e}·|ref|)"
        );
        worst = worst.max(err);
    }
    eprintln!("max-err {name:<44} {worst:.2e}");
    worst
}

/// Upload the same values to both backends.
fn both(g: &WgpuBackend, x: &[f32]) -> (<Cpu as Backend>::Buf, <WgpuBackend as Backend>::Buf) {
    (Cpu::new().upload(x), g.upload(x))
}

const ATOL: f32 = 1e-5;
const RTOL: f32 = 1e-4;

#[test]
fn matmul_all_transposes_and_ragged_shapes() {
    let g = need_gpu!();
    let c = Cpu::new();
    let mut rng = Rng::new(1);
    for &(m, n, k) in &[
        (1, 1, 1),
        (3, 5, 7),
        (17, 9, 33),
        (65, 70, 19),
        (130, 67, 100),
        (2, 200, 3),
        (4, 3, 0),
    ] {
        for ta in [false, true] {
            for tb in [false, true] {
                for acc in [false, true] {
                    let a = rand_vec(&mut rng, m * k, 1.0);
                    let b = rand_vec(&mut rng, k * n, 1.0);
                    let c0 = if acc {
                        rand_vec(&mut rng, m * n, 1.0)
                    } else {
                        nan(m * n)
                    };
                    let mut want = c.upload(&if acc { c0.clone() } else { vec![0.0; m * n] });
                    c.matmul(
                        &mut want,
                        &c.upload(&a),
                        &c.upload(&b),
                        m,
                        n,
                        k,
                        ta,
                        tb,
                        acc,
                    );
                    let mut got = g.upload(&c0);
                    g.matmul(&mut got, &g.upload(&a), &g.upload(&b), m, n, k, ta, tb, acc);
                    let tol = 1e-5 * (k as f32).sqrt().max(1.0);
                    check(
                        &format!("matmul {m}x{n}x{k} ta={ta} tb={tb} acc={acc}"),
                        &g.download(&got),
                        &c.download(&want),
                        tol,
                        RTOL,
                    );
                }
            }
        }
    }
}

#[test]
fn matmul_with_split_weight() {
    let (Some(_), Some(g)) = (gpu(), gpu_split()) else {
        return;
    };
    let c = Cpu::new();
    let mut rng = Rng::new(2);
    // 128-byte pieces: one row each.
    for &(m, n, k) in &[(19, 70, 33), (5, 33, 70)] {
        for tb in [true, false] {
            for ta in [false, true] {
                for acc in [false, true] {
                    let a = rand_vec(&mut rng, m * k, 1.0);
                    let w = rand_vec(&mut rng, k * n, 1.0);
                    let rows = if tb { n } else { k };
                    let cols = if tb { k } else { n };
                    let wt = TensorView::from_f32("w", vec![rows, cols], &w);
                    let gw = g.weight(&wt).unwrap();
                    assert!(gw.pieces() > 1, "the weight is split");
                    let c0 = rand_vec(&mut rng, m * n, 1.0);
                    let mut want = c.upload(&c0);
                    c.matmul(
                        &mut want,
                        &c.upload(&a),
                        &c.weight(&wt).unwrap(),
                        m,
                        n,
                        k,
                        ta,
                        tb,
                        acc,
                    );
                    let mut got = g.upload(&if acc { c0.clone() } else { nan(m * n) });
                    g.matmul(&mut got, &g.upload(&a), &gw, m, n, k, ta, tb, acc);
                    check(
                        &format!("matmul split-b {m}x{n}x{k} ta={ta} tb={tb} acc={acc}"),
                        &g.download(&got),
                        &c.download(&want),
                        1e-4,
                        RTOL,
                    );
                    // Split weights read back and copy out whole.
                    check("download split weight", &g.download(&gw), &w, 0.0, 0.0);
                    let mut part = g.upload(&nan(50));
                    g.copy(&mut part, 0, &gw, 200, 50);
                    check(
                        "copy from split weight",
                        &g.download(&part),
                        &w[200..250],
                        0.0,
                        0.0,
                    );
                }
            }
        }
    }
}

#[test]
fn bias_add_and_bias_grad() {
    let g = need_gpu!();
    let c = Cpu::new();
    let mut rng = Rng::new(3);
    for &(rows, cols, off) in &[
        (1, 1, 0),
        (37, 5, 3),
        (300, 67, 11),
        (2, 130, 0),
        (2049, 770, 5),
    ] {
        let y0 = rand_vec(&mut rng, rows * cols, 1.0);
        let bias = rand_vec(&mut rng, off + cols + 2, 1.0);
        let (mut cy, mut gy) = both(g, &y0);
        let (cb, gb) = both(g, &bias);
        c.bias_add(&mut cy, &cb, off, rows, cols);
        g.bias_add(&mut gy, &gb, off, rows, cols);
        check(
            &format!("bias_add {rows}x{cols}"),
            &g.download(&gy),
            &c.download(&cy),
            0.0,
            0.0,
        );

        let db0 = rand_vec(&mut rng, off + cols + 2, 1.0);
        let (mut cdb, mut gdb) = both(g, &db0);
        c.bias_grad(&mut cdb, off, &cy, rows, cols);
        g.bias_grad(&mut gdb, off, &gy, rows, cols);
        check(
            &format!("bias_grad {rows}x{cols}"),
            &g.download(&gdb),
            &c.download(&cdb),
            1e-5 * (rows as f32).sqrt(),
            RTOL,
        );
    }
}

#[test]
fn elementwise_ops() {
    let g = need_gpu!();
    let c = Cpu::new();
    let mut rng = Rng::new(4);
    for &n in &[1usize, 255, 1000, 70_001] {
        let y0 = rand_vec(&mut rng, n + 3, 1.0);
        let x = rand_vec(&mut rng, n + 3, 1.0);
        let (mut cy, mut gy) = both(g, &y0);
        let (cx, gx) = both(g, &x);
        c.add(&mut cy, &cx, n);
        g.add(&mut gy, &gx, n);
        check(
            &format!("add n={n}"),
            &g.download(&gy),
            &c.download(&cy),
            0.0,
            0.0,
        );
        c.scale(&mut cy, -0.37, n);
        g.scale(&mut gy, -0.37, n);
        check(
            &format!("scale n={n}"),
            &g.download(&gy),
            &c.download(&cy),
            0.0,
            0.0,
        );
        let (want, got) = (c.sum_sq(&cy, n), g.sum_sq(&gy, n));
        assert!(
            (want - got).abs() <= 1e-5 * want.abs() + 1e-6,
            "sum_sq n={n}: wgpu {got}, cpu {want}"
        );
        eprintln!(
            "max-err {:<44} {:.2e}",
            format!("sum_sq n={n}"),
            (want - got).abs()
        );
        let mut gf = g.upload(&nan(n));
        let mut cf = c.upload(&nan(n));
        g.fill(&mut gf, 0.25);
        c.fill(&mut cf, 0.25);
        check(
            &format!("fill n={n}"),
            &g.download(&gf),
            &c.download(&cf),
            0.0,
            0.0,
        );
        g.fill(&mut gf, 0.0);
        check(
            &format!("fill 0 n={n}"),
            &g.download(&gf),
            &vec![0.0; n],
            0.0,
            0.0,
        );
        let mut gz = g.upload(&nan(n));
        gz = {
            drop(gz);
            g.zeros(n)
        };
        check(
            &format!("zeros n={n}"),
            &g.download(&gz),
            &vec![0.0; n],
            0.0,
            0.0,
        );
        // copy with offsets
        let m = n / 2;
        let (mut cd, mut gd) = both(g, &nan(n + 3));
        c.copy(&mut cd, 3, &cx, n - m, m);
        g.copy(&mut gd, 3, &gx, n - m, m);
        let (a, b) = (g.download(&gd), c.download(&cd));
        check(&format!("copy n={m}"), &a[3..3 + m], &b[3..3 + m], 0.0, 0.0);
        assert!(
            a[0].is_nan() && (m + 3 >= n + 3 || a[m + 3].is_nan()),
            "copy wrote outside its range"
        );
    }
    // scale_rows
    for &(rows, cols) in &[(1, 1), (13, 7), (300, 33)] {
        let y0 = rand_vec(&mut rng, rows * cols, 1.0);
        let w = rand_vec(&mut rng, rows, 1.0);
        let (mut cy, mut gy) = both(g, &y0);
        let (cw, gw) = both(g, &w);
        c.scale_rows(&mut cy, &cw, rows, cols);
        g.scale_rows(&mut gy, &gw, rows, cols);
        check(
            &format!("scale_rows {rows}x{cols}"),
            &g.download(&gy),
            &c.download(&cy),
            0.0,
            0.0,
        );
    }
}

#[test]
fn activations_forward_and_backward() {
    let g = need_gpu!();
    let c = Cpu::new();
    let mut rng = Rng::new(5);
    let n = 3001;
    let mut x = rand_vec(&mut rng, n, 2.0);
    x[..8].copy_from_slice(&[0.0, -30.0, 30.0, 9.0, -9.0, 1e-6, -1e-6, 100.0]);
    let dy = rand_vec(&mut rng, n, 1.0);
    let (cx, gx) = both(g, &x);
    let (cdy, gdy) = both(g, &dy);
    // The reference is the CPU in f64: near the tails, 1 ± tanh and 1 − tanh²
    // in f32 cancel, and the shaders avoid that where the f32 CPU does not.
    let c64 = CpuBackend::<f64>::new();
    let x64 = c64.upload(&x.iter().map(|&v| v as f64).collect::<Vec<_>>());
    let dy64 = c64.upload(&dy.iter().map(|&v| v as f64).collect::<Vec<_>>());
    let f32s = |v: Vec<f64>| v.into_iter().map(|a| a as f32).collect::<Vec<f32>>();
    for act in [Act::Gelu, Act::GeluTanh, Act::Relu, Act::Tanh, Act::Silu] {
        let mut cy = c64.zeros(n);
        let mut gy = g.upload(&nan(n));
        c64.act_fwd(act, &mut cy, &x64, n);
        g.act_fwd(act, &mut gy, &gx, n);
        check(
            &format!("act_fwd {act:?}"),
            &g.download(&gy),
            &f32s(c64.download(&cy)),
            1e-6,
            1e-5,
        );
        let mut cd = c64.zeros(n);
        let mut gd = g.upload(&nan(n));
        c64.act_bwd(act, &mut cd, &x64, &dy64, n);
        g.act_bwd(act, &mut gd, &gx, &gdy, n);
        check(
            &format!("act_bwd {act:?}"),
            &g.download(&gd),
            &f32s(c64.download(&cd)),
            1e-6,
            1e-5,
        );
    }
    // SwiGLU
    let up = rand_vec(&mut rng, n, 1.0);
    let (cu, gu) = both(g, &up);
    let mut ch = c.zeros(n);
    let mut gh = g.upload(&nan(n));
    c.swiglu_fwd(&mut ch, &cx, &cu, n);
    g.swiglu_fwd(&mut gh, &gx, &gu, n);
    check("swiglu_fwd", &g.download(&gh), &c.download(&ch), 2e-6, 1e-5);
    let (mut cg, mut cup) = (c.zeros(n), c.zeros(n));
    let (mut gg, mut gup) = (g.upload(&nan(n)), g.upload(&nan(n)));
    c.swiglu_bwd(&mut cg, &mut cup, &cdy, &cx, &cu, n);
    g.swiglu_bwd(&mut gg, &mut gup, &gdy, &gx, &gu, n);
    check(
        "swiglu_bwd dgate",
        &g.download(&gg),
        &c.download(&cg),
        2e-6,
        1e-5,
    );
    check(
        "swiglu_bwd dup",
        &g.download(&gup),
        &c.download(&cup),
        2e-6,
        1e-5,
    );
}

#[test]
fn dropout_mask_matches_cpu_bit_for_bit() {
    let g = need_gpu!();
    let c = Cpu::new();
    let mut rng = Rng::new(6);
    for &(n, p, seed) in &[
        (1000usize, 0.1f32, 0u64),
        (4097, 0.5, 0xdead_beef_1234_5678),
        (70_000, 0.9, u64::MAX),
        (10, 0.0, 3),
    ] {
        let y = rand_vec(&mut rng, n, 1.0);
        let (mut cy, mut gy) = both(g, &y);
        c.dropout(&mut cy, n, p, seed);
        g.dropout(&mut gy, n, p, seed);
        let (a, b) = (g.download(&gy), c.download(&cy));
        for i in 0..n {
            assert_eq!(a[i] == 0.0, b[i] == 0.0, "dropout mask differs at {i}");
            assert_eq!(a[i] == 0.0, !dropout_keep(seed, i as u32, p) || y[i] == 0.0);
        }
        check(&format!("dropout n={n} p={p}"), &a, &b, 0.0, 0.0);
    }
}

#[test]
fn layernorm_and_rmsnorm() {
    let g = need_gpu!();
    let c = Cpu::new();
    let mut rng = Rng::new(7);
    for &(rows, cols) in &[(1, 1), (7, 8), (33, 300), (3, 513)] {
        let x = rand_vec(&mut rng, rows * cols, 2.0)
            .iter()
            .map(|v| v + 0.5)
            .collect::<Vec<_>>();
        let gamma = rand_vec(&mut rng, cols, 1.0);
        let beta = rand_vec(&mut rng, cols + 4, 1.0);
        let dy = rand_vec(&mut rng, rows * cols, 1.0);
        let (cx, gx) = both(g, &x);
        let (cg, gg) = both(g, &gamma);
        let (cb, gb) = both(g, &beta);
        let (cdy, gdy) = both(g, &dy);
        let n = rows * cols;
        for rms in [false, true] {
            let what = if rms { "rmsnorm" } else { "layernorm" };
            let (mut cy, mut cxh, mut crs) = (c.zeros(n), c.zeros(n), c.zeros(rows));
            let (mut gy, mut gxh, mut grs) =
                (g.upload(&nan(n)), g.upload(&nan(n)), g.upload(&nan(rows)));
            if rms {
                c.rmsnorm_fwd(&mut cy, &mut cxh, &mut crs, &cx, &cg, rows, cols, 1e-6);
                g.rmsnorm_fwd(&mut gy, &mut gxh, &mut grs, &gx, &gg, rows, cols, 1e-6);
            } else {
                c.layernorm_fwd(
                    &mut cy, &mut cxh, &mut crs, &cx, &cg, &cb, 4, rows, cols, 1e-5,
                );
                g.layernorm_fwd(
                    &mut gy, &mut gxh, &mut grs, &gx, &gg, &gb, 4, rows, cols, 1e-5,
                );
            }
            let shape = format!("{rows}x{cols}");
            check(
                &format!("{what}_fwd y {shape}"),
                &g.download(&gy),
                &c.download(&cy),
                ATOL,
                RTOL,
            );
            check(
                &format!("{what}_fwd xhat {shape}"),
                &g.download(&gxh),
                &c.download(&cxh),
                ATOL,
                RTOL,
            );
            check(
                &format!("{what}_fwd rstd {shape}"),
                &g.download(&grs),
                &c.download(&crs),
                ATOL,
                RTOL,
            );
            let mut cdx = c.zeros(n);
            let mut gdx = g.upload(&nan(n));
            if rms {
                c.rmsnorm_bwd(&mut cdx, &cdy, &cxh, &crs, &cg, rows, cols);
                g.rmsnorm_bwd(&mut gdx, &gdy, &gxh, &grs, &gg, rows, cols);
            } else {
                c.layernorm_bwd(&mut cdx, &cdy, &cxh, &crs, &cg, rows, cols);
                g.layernorm_bwd(&mut gdx, &gdy, &gxh, &grs, &gg, rows, cols);
            }
            check(
                &format!("{what}_bwd {shape}"),
                &g.download(&gdx),
                &c.download(&cdx),
                1e-4,
                1e-3,
            );
        }
    }
}

/// One attention configuration: forward (and, for the training shape,
/// backward) against the CPU.
#[allow(clippy::too_many_arguments)]
fn attention_case(
    g: &WgpuBackend,
    rng: &mut Rng,
    dims: AttnDims,
    lens: &[usize],
    dropout: Option<Dropout>,
) {
    let c = Cpu::new();
    let AttnDims {
        batch: b,
        seq: t,
        kv_seq: tk,
        heads: nh,
        kv_heads: nkv,
        head_dim: dh,
        ..
    } = dims;
    let q = rand_vec(rng, b * t * nh * dh, 1.0);
    let k = rand_vec(rng, b * tk * nkv * dh, 1.0);
    let v = rand_vec(rng, b * tk * nkv * dh, 1.0);
    let mut mask = vec![0f32; b * tk];
    for bi in 0..b {
        for j in 0..lens[bi] {
            mask[bi * tk + j] = 1.0;
        }
    }
    let (cq, gq) = both(g, &q);
    let (ck, gk) = both(g, &k);
    let (cv, gv) = both(g, &v);
    let (cm, gm) = both(g, &mask);
    let no = b * t * nh * dh;
    let nl = b * nh * t;
    let (mut co, mut cl) = (c.zeros(no), c.zeros(nl));
    let (mut go, mut gl) = (g.upload(&nan(no)), g.upload(&nan(nl)));
    c.attention_fwd(&mut co, &mut cl, &cq, &ck, &cv, &cm, dims, dropout);
    g.attention_fwd(&mut go, &mut gl, &gq, &gk, &gv, &gm, dims, dropout);
    let what = format!(
        "b{b} t{t} tk{tk} q0{} h{nh}/{nkv} dh{dh}{}{}",
        dims.q_start,
        if dims.causal { " causal" } else { "" },
        if dropout.is_some() { " drop" } else { "" }
    );
    check(
        &format!("attention_fwd out {what}"),
        &g.download(&go),
        &c.download(&co),
        2e-5,
        1e-4,
    );
    check(
        &format!("attention_fwd lse {what}"),
        &g.download(&gl),
        &c.download(&cl),
        2e-5,
        1e-4,
    );
    if tk != t || dims.q_start != 0 {
        return;
    }
    let dout = rand_vec(rng, no, 1.0);
    let (cdo, gdo) = both(g, &dout);
    let nk = b * tk * nkv * dh;
    let (mut cdq, mut cdk, mut cdv) = (c.zeros(no), c.zeros(nk), c.zeros(nk));
    let (mut gdq, mut gdk, mut gdv) = (g.upload(&nan(no)), g.upload(&nan(nk)), g.upload(&nan(nk)));
    c.attention_bwd(
        &mut cdq, &mut cdk, &mut cdv, &cdo, &cq, &ck, &cv, &co, &cl, &cm, dims, dropout,
    );
    // The backward reads the CPU's forward outputs so that only the
    // backward's own error is measured.
    let (gco, gcl) = (g.upload(&c.download(&co)), g.upload(&c.download(&cl)));
    g.attention_bwd(
        &mut gdq, &mut gdk, &mut gdv, &gdo, &gq, &gk, &gv, &gco, &gcl, &gm, dims, dropout,
    );
    let tol = 5e-5 * (t as f32).sqrt();
    check(
        &format!("attention_bwd dq {what}"),
        &g.download(&gdq),
        &c.download(&cdq),
        tol,
        1e-3,
    );
    check(
        &format!("attention_bwd dk {what}"),
        &g.download(&gdk),
        &c.download(&cdk),
        tol,
        1e-3,
    );
    check(
        &format!("attention_bwd dv {what}"),
        &g.download(&gdv),
        &c.download(&cdv),
        tol,
        1e-3,
    );
}

#[test]
fn attention_encoder_padding_mask() {
    let g = need_gpu!();
    let mut rng = Rng::new(8);
    let drop = Some(Dropout {
        p: 0.1,
        seed: 0x1234_5678_9abc_def0,
    });
    for dr in [None, drop] {
        attention_case(
            g,
            &mut rng,
            AttnDims::self_attn(2, 5, 3, 3, 8, false),
            &[5, 3],
            dr,
        );
        attention_case(
            g,
            &mut rng,
            AttnDims::self_attn(3, 70, 3, 3, 16, false),
            &[70, 1, 66],
            dr,
        );
        attention_case(
            g,
            &mut rng,
            AttnDims::self_attn(1, 1, 1, 1, 4, false),
            &[1],
            dr,
        );
        attention_case(
            g,
            &mut rng,
            AttnDims::self_attn(2, 9, 2, 2, 80, false),
            &[9, 4],
            dr,
        );
    }
}

#[test]
fn attention_causal_gqa() {
    let g = need_gpu!();
    let mut rng = Rng::new(9);
    let drop = Some(Dropout { p: 0.3, seed: 77 });
    for dr in [None, drop] {
        attention_case(
            g,
            &mut rng,
            AttnDims::self_attn(2, 7, 6, 2, 8, true),
            &[7, 5],
            dr,
        );
        attention_case(
            g,
            &mut rng,
            AttnDims::self_attn(1, 67, 3, 1, 32, true),
            &[67],
            dr,
        );
        attention_case(
            g,
            &mut rng,
            AttnDims::self_attn(2, 13, 4, 4, 12, true),
            &[13, 9],
            dr,
        );
    }
    // A causal query that sees no key (its only visible key is padding):
    // zero output, lse = -inf, zero gradients.
    let dims = AttnDims::self_attn(1, 4, 2, 1, 8, true);
    let c = Cpu::new();
    let mask = [0.0f32, 1.0, 1.0, 0.0];
    let q = rand_vec(&mut rng, 4 * 2 * 8, 1.0);
    let kv = rand_vec(&mut rng, 4 * 8, 1.0);
    let (cm, gm) = both(g, &mask);
    let (cq, gq) = both(g, &q);
    let (ck, gk) = both(g, &kv);
    let (mut co, mut cl) = (c.zeros(64), c.zeros(8));
    let (mut go, mut gl) = (g.upload(&nan(64)), g.upload(&nan(8)));
    c.attention_fwd(&mut co, &mut cl, &cq, &ck, &ck, &cm, dims, None);
    g.attention_fwd(&mut go, &mut gl, &gq, &gk, &gk, &gm, dims, None);
    let lse = g.download(&gl);
    assert_eq!(lse[0], f32::NEG_INFINITY);
    check(
        "attention_fwd fully masked query",
        &g.download(&go),
        &c.download(&co),
        2e-5,
        1e-4,
    );
    check(
        "attention_fwd fully masked lse",
        &lse,
        &c.download(&cl),
        2e-5,
        1e-4,
    );
}

#[test]
fn attention_kv_cache_shape() {
    let g = need_gpu!();
    let mut rng = Rng::new(10);
    for &(seq, kv_seq, q_start, nh, nkv) in &[
        (1usize, 10usize, 9usize, 4usize, 2usize),
        (3, 70, 67, 3, 1),
        (5, 5, 0, 2, 2),
    ] {
        let dims = AttnDims {
            batch: 2,
            seq,
            kv_seq,
            q_start,
            heads: nh,
            kv_heads: nkv,
            head_dim: 16,
            scale: 0.25,
            causal: true,
        };
        attention_case(g, &mut rng, dims, &[kv_seq, kv_seq - 1], None);
    }
}

#[test]
fn embedding_gather_and_scatter() {
    let (Some(g), Some(gs)) = (gpu(), gpu_split()) else {
        return;
    };
    let c = Cpu::new();
    let mut rng = Rng::new(11);
    let (vocab, dim, rows) = (50usize, 33usize, 37usize);
    let table = rand_vec(&mut rng, vocab * dim, 1.0);
    let ids: Vec<u32> = (0..rows).map(|_| rng.below(vocab) as u32).collect();
    let tv = TensorView::from_f32("table", vec![vocab, dim], &table);
    for (name, be) in [("embedding_fwd", g), ("embedding_fwd split table", gs)] {
        let gt = be.weight(&tv).unwrap();
        if name.contains("split") {
            assert!(gt.pieces() > 1);
        }
        for acc in [false, true] {
            let o0 = rand_vec(&mut rng, rows * dim, 1.0);
            let mut co = c.upload(&o0);
            let mut go = be.upload(&if acc { o0.clone() } else { nan(rows * dim) });
            c.embedding_fwd(&mut co, &c.weight(&tv).unwrap(), &ids, rows, dim, acc);
            be.embedding_fwd(&mut go, &gt, &be.upload_ids(&ids), rows, dim, acc);
            check(
                &format!("{name} acc={acc}"),
                &be.download(&go),
                &c.download(&co),
                0.0,
                0.0,
            );
        }
    }
    // Scatter-add with repeated indices.
    let idx: Vec<u32> = (0..rows).map(|r| (r % 7) as u32 * 3).collect();
    let dy = rand_vec(&mut rng, rows * dim, 1.0);
    let dx0 = rand_vec(&mut rng, vocab * dim, 1.0);
    let (mut cdx, mut gdx) = both(g, &dx0);
    let (cdy, gdy) = both(g, &dy);
    c.scatter_add_rows(&mut cdx, &cdy, &idx, rows, dim);
    g.scatter_add_rows(&mut gdx, &gdy, &g.upload_ids(&idx), rows, dim);
    check(
        "scatter_add_rows",
        &g.download(&gdx),
        &c.download(&cdx),
        0.0,
        0.0,
    );
}

#[test]
fn pooling_forward_and_backward() {
    let g = need_gpu!();
    let c = Cpu::new();
    let mut rng = Rng::new(12);
    let (b, t, d) = (3usize, 7usize, 19usize);
    let h = rand_vec(&mut rng, b * t * d, 1.0);
    let lens = [7usize, 2, 5];
    let mut mask = vec![0f32; b * t];
    for bi in 0..b {
        for ti in 0..lens[bi] {
            mask[bi * t + ti] = 1.0;
        }
    }
    let dout = rand_vec(&mut rng, b * d, 1.0);
    let (ch, gh) = both(g, &h);
    let (cm, gm) = both(g, &mask);
    let (cdo, gdo) = both(g, &dout);
    for kind in [PoolKind::Cls, PoolKind::Mean] {
        let mut co = c.zeros(b * d);
        let mut go = g.upload(&nan(b * d));
        c.pool_fwd(kind, &mut co, &ch, &cm, b, t, d);
        g.pool_fwd(kind, &mut go, &gh, &gm, b, t, d);
        check(
            &format!("pool_fwd {kind:?}"),
            &g.download(&go),
            &c.download(&co),
            1e-6,
            1e-6,
        );
        let mut cdh = c.zeros(b * t * d);
        let mut gdh = g.upload(&nan(b * t * d));
        c.pool_bwd(kind, &mut cdh, &cdo, &cm, b, t, d);
        g.pool_bwd(kind, &mut gdh, &gdo, &gm, b, t, d);
        check(
            &format!("pool_bwd {kind:?}"),
            &g.download(&gdh),
            &c.download(&cdh),
            1e-6,
            1e-6,
        );
    }
}

#[test]
fn losses() {
    let g = need_gpu!();
    let c = Cpu::new();
    let mut rng = Rng::new(13);
    for &(rows, classes) in &[(1usize, 2usize), (5, 3), (7, 1000)] {
        let logits = rand_vec(&mut rng, rows * classes, 3.0);
        let labels: Vec<u32> = (0..rows).map(|_| rng.below(classes) as u32).collect();
        let (cx, gx) = both(g, &logits);
        let (mut cl, mut cd) = (c.zeros(rows), c.zeros(rows * classes));
        let (mut gl, mut gd) = (g.upload(&nan(rows)), g.upload(&nan(rows * classes)));
        c.cross_entropy(&mut cl, &mut cd, &cx, &labels, rows, classes, 0.25);
        g.cross_entropy(
            &mut gl,
            &mut gd,
            &gx,
            &g.upload_ids(&labels),
            rows,
            classes,
            0.25,
        );
        check(
            &format!("cross_entropy loss {rows}x{classes}"),
            &g.download(&gl),
            &c.download(&cl),
            ATOL,
            RTOL,
        );
        check(
            &format!("cross_entropy grad {rows}x{classes}"),
            &g.download(&gd),
            &c.download(&cd),
            1e-6,
            RTOL,
        );
    }
    let rows = 9;
    let x = rand_vec(&mut rng, rows, 1.0);
    let y = rand_vec(&mut rng, rows, 1.0);
    let (cx, gx) = both(g, &x);
    let (cy, gy) = both(g, &y);
    let (mut cl, mut cd) = (c.zeros(rows), c.zeros(rows));
    let (mut gl, mut gd) = (g.upload(&nan(rows)), g.upload(&nan(rows)));
    c.mse(&mut cl, &mut cd, &cx, &cy, rows, 0.5);
    g.mse(&mut gl, &mut gd, &gx, &gy, rows, 0.5);
    check("mse loss", &g.download(&gl), &c.download(&cl), 0.0, 0.0);
    check("mse grad", &g.download(&gd), &c.download(&cd), 0.0, 0.0);

    // Candidate scoring: 3 examples with 2, 3 and 1 candidates of ragged
    // answer lengths.
    let cand_ex: Vec<u32> = vec![0, 0, 1, 1, 1, 2];
    let lens = [2usize, 1, 3, 1, 2, 4];
    let tok_cand: Vec<u32> = lens
        .iter()
        .enumerate()
        .flat_map(|(ci, &l)| std::iter::repeat_n(ci as u32, l))
        .collect();
    let gold: Vec<u32> = vec![1, 2, 5];
    let nrows = tok_cand.len();
    let tok_loss: Vec<f32> = rand_vec(&mut rng, nrows, 1.0)
        .iter()
        .map(|v| v.abs() * 2.0)
        .collect();
    let (ctl, gtl) = (c.upload(&tok_loss), g.upload(&tok_loss));
    let (mut cel, mut csc, mut crw) = (c.zeros(3), c.zeros(6), c.zeros(nrows));
    let (mut gel, mut gsc, mut grw) = (g.upload(&nan(3)), g.upload(&nan(6)), g.upload(&nan(nrows)));
    let ci = CandidateIndex {
        tok_cand: &tok_cand,
        cand_ex: &cand_ex,
        gold: &gold,
        rows: nrows,
        cands: 6,
        examples: 3,
    };
    c.candidate_loss(&mut cel, &mut csc, &mut crw, &ctl, &ci, 0.5);
    let (gtc, gce, ggo) = (
        g.upload_ids(&tok_cand),
        g.upload_ids(&cand_ex),
        g.upload_ids(&gold),
    );
    let gi = CandidateIndex {
        tok_cand: &gtc,
        cand_ex: &gce,
        gold: &ggo,
        rows: nrows,
        cands: 6,
        examples: 3,
    };
    g.candidate_loss(&mut gel, &mut gsc, &mut grw, &gtl, &gi, 0.5);
    check(
        "candidate_loss ex_loss",
        &g.download(&gel),
        &c.download(&cel),
        ATOL,
        RTOL,
    );
    check(
        "candidate_loss scores",
        &g.download(&gsc),
        &c.download(&csc),
        ATOL,
        RTOL,
    );
    check(
        "candidate_loss row_w",
        &g.download(&grw),
        &c.download(&crw),
        ATOL,
        RTOL,
    );
}

#[test]
fn adamw_steps() {
    let g = need_gpu!();
    let c = Cpu::new();
    let mut rng = Rng::new(14);
    let n = 1001;
    let p0 = rand_vec(&mut rng, n + 2, 1.0);
    let (mut cp, mut gp) = both(g, &p0);
    let (mut cm, mut gm) = (c.zeros(n + 2), g.zeros(n + 2));
    let (mut cv, mut gv) = (c.zeros(n + 2), g.zeros(n + 2));
    for step in 1..=5u64 {
        let grads = rand_vec(&mut rng, n + 2, 0.1);
        let (cg, gg) = both(g, &grads);
        let h = AdamW {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
            step,
        };
        c.adamw(&mut cp, &cg, &mut cm, &mut cv, n, h);
        g.adamw(&mut gp, &gg, &mut gm, &mut gv, n, h);
    }
    check(
        "adamw params (5 steps)",
        &g.download(&gp),
        &c.download(&cp),
        1e-6,
        1e-6,
    );
    check("adamw m", &g.download(&gm), &c.download(&cm), 1e-7, 1e-5);
    check("adamw v", &g.download(&gv), &c.download(&cv), 1e-9, 1e-5);
}

#[test]
fn rope_forward_and_inverse() {
    let g = need_gpu!();
    let c = Cpu::new();
    let mut rng = Rng::new(15);
    for &(rows, heads, hd, maxpos) in &[(5usize, 3usize, 8usize, 10usize), (37, 2, 64, 3000)] {
        let x = rand_vec(&mut rng, rows * heads * hd, 1.0);
        let pos: Vec<u32> = (0..rows).map(|_| rng.below(maxpos) as u32).collect();
        for inverse in [false, true] {
            let (mut cx, mut gx) = both(g, &x);
            c.rope(&mut cx, &pos, rows, heads, hd, 10000.0, inverse);
            g.rope(
                &mut gx,
                &g.upload_ids(&pos),
                rows,
                heads,
                hd,
                10000.0,
                inverse,
            );
            check(
                &format!("rope {rows}x{heads}x{hd} inverse={inverse}"),
                &g.download(&gx),
                &c.download(&cx),
                1e-6,
                1e-5,
            );
        }
    }
}

// ---- whole training steps -------------------------------------------------

fn tiny_batch(pad: u32, labels: Vec<f32>) -> Batch {
    let (b, t) = (3usize, 6usize);
    let lens = [6usize, 4, 2];
    let mut ids = vec![pad; b * t];
    let mut type_ids = vec![0u32; b * t];
    let mut mask = vec![0f32; b * t];
    for bi in 0..b {
        for ti in 0..lens[bi] {
            ids[bi * t + ti] = 2 + ((bi * 7 + ti * 3) % (TINY_VOCAB - 2)) as u32;
            type_ids[bi * t + ti] = (ti >= 3) as u32;
            mask[bi * t + ti] = 1.0;
        }
    }
    Batch {
        batch: b,
        seq: t,
        ids,
        type_ids,
        mask,
        labels,
        tokens: lens.iter().sum(),
    }
}

/// Loss, logits and every trainable gradient of one `loss_and_grad` call.
fn step<B: Backend>(
    be: &B,
    dir: &std::path::Path,
    pooling: PoolKind,
    num_labels: usize,
    dropout: Option<u64>,
) -> (f64, Vec<f32>, Vec<f32>) {
    let md = ModelDir::open(dir).unwrap();
    let enc = Encoder::load(
        be,
        &md,
        EncoderOptions {
            pooling,
            num_labels,
            terms: BiasTerm::parse_set("all").unwrap(),
            seed: 5,
        },
    )
    .unwrap();
    let labels = if num_labels == 1 {
        vec![0.3, -1.2, 2.0]
    } else {
        vec![0.0, 1.0, (num_labels - 1) as f32]
    };
    let db = enc
        .upload_batch(be, &tiny_batch(md.config.pad_token_id, labels))
        .unwrap();
    let init: Vec<B::T> = enc
        .init
        .iter()
        .map(|v| beft::float::Float::from_f64(*v))
        .collect();
    let params = be.upload(&init);
    let mut grads = be.zeros(enc.layout.len);
    let (loss, logits) = enc.loss_and_grad(be, &params, &mut grads, &db, dropout);
    let f = |v: Vec<B::T>| -> Vec<f32> { v.into_iter().map(beft::float::Float::to_f32).collect() };
    (loss, f(logits), f(be.download(&grads)))
}

fn compare_step(arch: TinyArch, pooling: PoolKind, num_labels: usize, dropout: Option<u64>) {
    let (Some(g), Some(gs)) = (gpu(), gpu_split()) else {
        return;
    };
    let dir = TempDir::new().unwrap();
    write_tiny_model(dir.path(), arch, 11, None);
    let c = Cpu::new();
    let (cl, clog, cgr) = step(&c, dir.path(), pooling, num_labels, dropout);
    let scale = cgr.iter().fold(0f32, |a, b| a.max(b.abs()));
    assert!(scale > 1e-6, "gradients are not all zero");
    for (which, be) in [("", g), (" split weights", gs)] {
        let what =
            format!("step {arch:?}/{pooling:?}/{num_labels} labels/dropout {dropout:?}{which}");
        let got = step(be, dir.path(), pooling, num_labels, dropout);
        compare_with_cpu(&what, got, (cl, &clog, &cgr), scale);
    }
}

/// A training step on wgpu against the CPU's: the loss, the logits and the
/// bias gradients (`scale`: the largest CPU gradient).
fn compare_with_cpu(
    what: &str,
    (gl, glog, ggr): (f64, Vec<f32>, Vec<f32>),
    (cl, clog, cgr): (f64, &[f32], &[f32]),
    scale: f32,
) {
    assert!(
        (gl - cl).abs() <= 1e-5 + 1e-4 * cl.abs(),
        "{what}: loss wgpu {gl}, cpu {cl}"
    );
    eprintln!(
        "max-err {:<44} {:.2e}",
        format!("{what} loss"),
        (gl - cl).abs()
    );
    check(&format!("{what} logits"), &glog, clog, 1e-5, 1e-4);
    check(&format!("{what} grads"), &ggr, cgr, 1e-4 * scale, 1e-3);
}

#[test]
fn training_step_tiny_bert_matches_cpu() {
    compare_step(TinyArch::Bert, PoolKind::Cls, 3, None);
    compare_step(TinyArch::Bert, PoolKind::Mean, 2, Some(42));
    compare_step(TinyArch::Bert, PoolKind::Cls, 1, Some(7));
}

#[test]
fn training_step_tiny_roberta_matches_cpu() {
    compare_step(TinyArch::Roberta, PoolKind::Cls, 2, Some(3));
}

// ---- decoders (GPT-2, OPT pre-/post-LN, LLaMA with GQA, Qwen2) ------------

fn decoder_step<B: Backend>(be: &B, case: &str) -> (f64, Vec<f32>, Vec<f32>) {
    common::fixtures::decoder_fixture_step(be, case, None, Default::default(), false)
}

#[test]
fn training_step_tiny_decoders_match_cpu() {
    let (Some(g), Some(gs)) = (gpu(), gpu_split()) else {
        return;
    };
    for case in common::fixtures::DECODER_CASES {
        let (cl, clog, cgr) = decoder_step(&Cpu::new(), case);
        let scale = cgr.iter().fold(0f32, |a, b| a.max(b.abs()));
        for (which, be) in [("", g), (" split weights", gs)] {
            let what = format!("decoder step {case}{which}");
            compare_with_cpu(&what, decoder_step(be, case), (cl, &clog, &cgr), scale);
        }
    }
}

// ---------------------------------------------------------------------------
// Device faults
// ---------------------------------------------------------------------------

/// A lost device (here destroyed on purpose, as a driver reset would) turns
/// the next op that waits on it into a device fault that says so, which
/// `catch_device_fault` makes an ordinary error.
#[test]
fn device_lost_is_an_error_not_a_panic() {
    use beft::backend::fault::catch_device_fault;
    // A device of its own: this one is destroyed.
    let Some(be) = open(None) else { return };
    let x = be.upload(&[1.0f32, 2.0, 3.0]);
    assert_eq!(be.download(&x), vec![1.0, 2.0, 3.0]);
    be.destroy_device();
    let r = catch_device_fault(|| {
        let mut y = be.zeros(3);
        be.add(&mut y, &x, 3);
        be.download(&y)
    });
    let e = r.expect_err("an op on a lost device must fail").to_string();
    assert!(e.contains("device lost"), "{e}");
    assert!(e.contains("wgpu ("), "names the device: {e}");
}

/// Running out of device memory (here the BEFT_MAX_DEVICE_MEMORY cap, which
/// takes the same path as a real out-of-memory) during training: a clear
/// message with what was asked and what was free, a non-zero exit, no panic,
/// the last checkpoint kept; resuming with room ends like an uninterrupted
/// run.
#[test]
fn out_of_device_memory_keeps_the_last_checkpoint_and_resumes() {
    if gpu().is_none() {
        return;
    }
    let tmp = TempDir::new().unwrap();
    let (model, data) = (tmp.path().join("model"), tmp.path().join("data"));
    write_tiny_model(&model, TinyArch::Bert, 3, None);
    common::write_tiny_sst2(&data, 32, 8);
    let run = |out: &std::path::Path, cap: Option<&str>, extra: &[&str]| {
        let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_beft"));
        c.args(["--threads", "1", "train", "--device", "wgpu", "--model"])
            .arg(&model)
            .args(["--task", "sst2", "--data"])
            .arg(&data)
            .arg("--out")
            .arg(out)
            .args([
                "--epochs",
                "2",
                "--batch",
                "32",
                "--eval-batch",
                "1",
                "--bias",
                "all",
            ])
            .args(["--pooling", "mean", "--quiet", "--no-dropout"])
            .args(extra);
        match cap {
            Some(cap) => c.env("BEFT_MAX_DEVICE_MEMORY", cap),
            None => c.env_remove("BEFT_MAX_DEVICE_MEMORY"),
        };
        c.output().unwrap()
    };
    // Too small for the model itself: refused at load, nothing written.
    let out = tmp.path().join("tiny-cap");
    let o = run(&out, Some("1KiB"), &[]);
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(!o.status.success());
    assert!(
        err.contains("out of device memory")
            && err.contains("asked for")
            && err.contains("free of"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    assert!(!out.exists() && !beft::train::checkpoint::staging_dir(&out).exists());

    // Room for the weights and a one-example evaluation but not for a
    // 32-example training step: find such a cap by halving.
    let full = tmp.path().join("full");
    let o = run(&full, None, &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let mut found = None;
    for kib in [4096u64, 2048, 1024, 512, 384, 256, 192, 128, 96, 64, 48, 32] {
        let out = tmp.path().join(format!("cap{kib}"));
        let o = run(&out, Some(&format!("{kib}KiB")), &[]);
        let err = String::from_utf8_lossy(&o.stderr).to_string();
        assert!(!err.contains("panicked"), "{err}");
        if !o.status.success() && err.contains("at step 1, epoch 1") {
            found = Some((out, err));
            break;
        }
    }
    let (out, err) = found.expect("no cap between evaluation and training needs");
    assert!(err.contains("out of device memory"), "{err}");
    assert!(
        err.contains("The last good state (step 0) is kept in"),
        "{err}"
    );
    assert!(err.contains("--batch"), "suggests a smaller batch: {err}");
    assert!(beft::train::checkpoint::staging_dir(&out)
        .join("checkpoint.safetensors")
        .is_file());
    // With room again, --resume finishes the run exactly as the uninterrupted one.
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_beft"));
    let o = c
        .args(["--threads", "1", "train", "--quiet", "--resume"])
        .arg(&out)
        .env_remove("BEFT_MAX_DEVICE_MEMORY")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(
        std::fs::read(full.join("biases.safetensors")).unwrap(),
        std::fs::read(out.join("biases.safetensors")).unwrap()
    );
}
