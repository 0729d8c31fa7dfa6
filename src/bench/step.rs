//! Whole bias-only training steps (`beft bench --step`): forward, the
//! bias-only backward, global-norm clipping and AdamW — exactly what
//! `beft train` does per step, through the same library calls
//! ([`Decoder::lm_loss_and_grad`] / [`Encoder::loss_and_grad`],
//! [`Slab::clip`], [`Slab::step`]) — on a random batch.

use std::path::PathBuf;
use std::time::Instant;

use serde::Serialize;

use super::{GemmCeiling, Shape, TempDir};
use crate::backend::{AdamW, Backend, PoolKind};
use crate::data::Batch;
use crate::error::{Error, Result};
use crate::model::config::{Arch, ModelConfig, ModelDir};
use crate::model::{BiasTerm, Decoder, DecoderOptions, Encoder, EncoderOptions, Offload};
use crate::rng::Rng;
use crate::train::Slab;
use crate::weights::{DType, TensorView};

/// How the model FLOPs of a step are counted.
pub const FLOPS_FORMULA: &str = "step model FLOPs (useful work of bias-only training) = 2*P*tokens (forward) + 2*P*tokens (input-gradient backward; no weight gradients) + attention 4*B*T^2*d*L forward + 8*B*T^2*d*L backward (both halved when causal), where P = the matmul parameters a token passes through (L*(4*d^2 + 2*d*ffn), plus the tied LM head vocab*d for decoders, the pooler d^2 for encoders) and tokens = B*T; model_tflops = model FLOPs / median step time; mfu = model_tflops / the GEMM ceiling";

/// What to time.
#[derive(Clone, Debug)]
pub struct StepSpec {
    /// A model directory; without it a random model of `shape` is written to
    /// a temporary directory (and removed afterwards).
    pub model: Option<PathBuf>,
    pub shape: Option<Shape>,
    /// dtype of a random model written here (OPT shapes).
    pub dtype: DType,
    pub batch: usize,
    pub seq: usize,
    /// `--bias` terms.
    pub bias: String,
    /// Timed steps (the median is reported).
    pub steps: usize,
    pub warmup: usize,
    /// Decoders: resident or streamed layer weights (`--offload`).
    pub offload: Offload,
    /// Decoders: recompute layer activations in the backward (`--recompute`).
    pub recompute: bool,
}

/// One timed training-step configuration.
#[derive(Clone, Debug, Serialize)]
pub struct StepRow {
    pub engine: String,
    /// The model directory's name, or the random shape's name.
    pub model: String,
    pub weights: String,
    /// `decoder` (causal LM loss on every next token) or `encoder`
    /// (sequence classification, CLS pooler head).
    pub kind: String,
    pub device: String,
    pub batch: usize,
    pub seq: usize,
    pub tokens_per_step: usize,
    pub bias: String,
    pub trainable_params: usize,
    pub warmup: usize,
    pub step_s: Vec<f64>,
    pub step_s_median: f64,
    pub tokens_per_s: f64,
    pub first_loss: f64,
    pub last_loss: f64,
    pub model_flops_per_step: f64,
    pub model_tflops: f64,
    /// Model FLOP utilisation against the GEMM ceiling (`None` without one).
    pub mfu: Option<f64>,
    pub gemm_ceiling_source: Option<String>,
    /// Device bytes held after loading (weights, slab, batch).
    pub loaded_device_bytes: Option<u64>,
    /// Most device bytes held at once while loading and stepping.
    pub peak_device_bytes: Option<u64>,
    /// Decoders: most device bytes held during the training steps, and
    /// during a forward-only pass (logits at the same rows) of the same
    /// batch — the training/inference memory ratio.
    pub train_peak_device_bytes: Option<u64>,
    pub infer_peak_device_bytes: Option<u64>,
    /// Decoders: `resident` or `stream`, and whether activations were
    /// recomputed.
    pub offload: String,
    pub recompute: bool,
    /// Streamed decoders: layer-weight bytes uploaded per step, the rate of
    /// the backend's streamed-upload path (host tensor to device buffer,
    /// [`upload_rate`]), the step time that rate bounds (bytes / rate), and
    /// that bound as a fraction of the measured median step.
    pub streamed_bytes_per_step: Option<u64>,
    pub upload_bytes_per_s: Option<f64>,
    pub upload_bound_s: Option<f64>,
    pub upload_bound_fraction: Option<f64>,
    pub peak_rss_bytes: u64,
    pub flops_formula: String,
}

/// Model FLOPs of one step (see [`FLOPS_FORMULA`]).
pub fn model_flops(cfg: &ModelConfig, batch: usize, seq: usize) -> f64 {
    let (d, f, l) = (
        cfg.hidden_size as f64,
        cfg.intermediate_size as f64,
        cfg.num_layers as f64,
    );
    let kv = (cfg.num_kv_heads * cfg.head_dim()) as f64;
    let q = (cfg.num_heads * cfg.head_dim()) as f64;
    let mlp_mats = if cfg.arch.is_llama_like() { 3.0 } else { 2.0 };
    let per_layer = d * q + 2.0 * d * kv + q * d + mlp_mats * d * f;
    let mut p = l * per_layer;
    if cfg.arch.is_decoder() {
        p += cfg.vocab_size as f64 * cfg.word_embed_proj_dim as f64;
    } else {
        p += d * d;
    }
    let tokens = (batch * seq) as f64;
    let mut attn = 12.0 * batch as f64 * (seq as f64).powi(2) * q * l;
    if cfg.arch.is_decoder() {
        attn *= 0.5;
    }
    4.0 * p * tokens + attn
}

/// Time training steps of `spec` on `be`.
pub fn run_step<B: Backend>(
    be: &B,
    spec: &StepSpec,
    gemm: Option<&GemmCeiling>,
    progress: bool,
) -> Result<StepRow> {
    if spec.batch == 0 || spec.seq < 2 {
        return Err(Error::msg(
            "--batch must be at least 1 and --seq at least 2",
        ));
    }
    if spec.steps == 0 {
        return Err(Error::msg("--reps (timed steps) must be at least 1"));
    }
    let terms = BiasTerm::parse_set(&spec.bias)?;
    let _tmp;
    let (dir, name, weights) = match (&spec.model, spec.shape) {
        (Some(m), _) => (m.clone(), None, "given".to_string()),
        (None, Some(shape)) => {
            let tmp = TempDir::new(shape.name())?;
            super::write_model(&tmp.0, shape, spec_dtype(spec, shape), 0, progress)?;
            let p = tmp.0.clone();
            _tmp = tmp;
            (p, Some(shape.name().to_string()), "random".to_string())
        }
        (None, None) => {
            return Err(Error::msg(
                "--step needs --model DIR or --shape NAME (a random model of that shape is written to a temporary directory)",
            ))
        }
    };
    let md = ModelDir::open(&dir)?;
    let cfg = md.config.clone();
    let model = name.unwrap_or_else(|| md.name.clone());
    let (b, t) = (spec.batch, spec.seq);
    let mut rng = Rng::new(7);
    let lo = 4.min(cfg.vocab_size - 1);
    let ids: Vec<u32> = (0..b * t)
        .map(|_| (lo + rng.below(cfg.vocab_size - lo)) as u32)
        .collect();
    let (times, losses): (Vec<f64>, Vec<f64>);
    // Memory counts start here: buffers cached by earlier measurements (the
    // copy ceiling's) are given back first.
    be.release_cached();
    be.reset_peak();
    let (mut train_peak, mut infer_peak, mut streamed) = (None, None, None);
    let (kind, trainable, loaded) = if cfg.arch.is_decoder() {
        let dec = Decoder::load(
            be,
            &md,
            DecoderOptions {
                terms: terms.clone(),
                offload: spec.offload,
                recompute: spec.recompute,
            },
        )?;
        let mask = vec![1f32; b * t];
        let x = dec.upload(be, b, t, &ids, &mask)?;
        let (rows, targets) = next_token_rows(b, t, &ids);
        let rt = dec.row_targets(be, &x, &rows, &targets)?;
        let mut slab = Slab::new(be, &dec.init);
        be.sync();
        let loaded = be.memory().map(|m| m.live);
        be.reset_peak();
        let before = dec.streamed_bytes();
        (times, losses) = timed_steps(be, &mut slab, spec, &mut |p, g, _| {
            dec.lm_loss_and_grad(be, p, g, &x, &rt)
        });
        be.sync();
        train_peak = be.memory().map(|m| m.peak);
        let per_step = (dec.streamed_bytes() - before) / (spec.warmup + spec.steps).max(1) as u64;
        streamed = (per_step > 0).then_some(per_step);
        be.release_cached();
        be.reset_peak();
        let _ = dec.logits_at(be, &slab.params, &x, &rt);
        be.sync();
        infer_peak = be.memory().map(|m| m.peak);
        ("decoder", dec.trainable_params(), loaded)
    } else if matches!(cfg.arch, Arch::Bert | Arch::Roberta) {
        let enc = Encoder::load(
            be,
            &md,
            EncoderOptions {
                pooling: PoolKind::Cls,
                num_labels: 2,
                terms: terms.clone(),
                seed: 0,
            },
        )?;
        let batch = Batch {
            batch: b,
            seq: t,
            ids,
            type_ids: vec![0; b * t],
            mask: vec![1.0; b * t],
            labels: (0..b).map(|i| (i % 2) as f32).collect(),
            tokens: b * t,
        };
        let db = enc.upload_batch(be, &batch)?;
        let mut slab = Slab::new(be, &enc.init);
        be.sync();
        let loaded = be.memory().map(|m| m.live);
        (times, losses) = timed_steps(be, &mut slab, spec, &mut |p, g, step| {
            enc.loss_and_grad(be, p, g, &db, Some(step)).0
        });
        ("encoder", enc.trainable_params(), loaded)
    } else {
        return Err(Error::file(
            &dir,
            format!("model_type '{}' cannot be benchmarked", cfg.model_type),
        ));
    };
    let median = crate::train::run::median(&mut times.clone());
    let peak = be.memory().map(|m| m.peak).max(train_peak);
    // Only where uploads go to device memory (the CPU backends read weights
    // in place).
    let rate = match streamed {
        Some(_) if be.memory().is_some() => Some(upload_rate(be)?),
        _ => None,
    };
    let bound = streamed.zip(rate).map(|(s, r)| s as f64 / r);
    let flops = model_flops(&cfg, b, t);
    let tflops = flops / median / 1e12;
    Ok(StepRow {
        engine: "beft".into(),
        model,
        weights,
        kind: kind.into(),
        device: be.name(),
        batch: b,
        seq: t,
        tokens_per_step: b * t,
        bias: BiasTerm::format_set(&terms),
        trainable_params: trainable,
        warmup: spec.warmup,
        step_s: times,
        step_s_median: median,
        tokens_per_s: (b * t) as f64 / median,
        first_loss: losses.first().copied().unwrap_or(f64::NAN),
        last_loss: losses.last().copied().unwrap_or(f64::NAN),
        model_flops_per_step: flops,
        model_tflops: tflops,
        mfu: gemm.map(|g| tflops / g.tflops),
        gemm_ceiling_source: gemm.map(|g| g.source.clone()),
        loaded_device_bytes: loaded,
        peak_device_bytes: peak,
        train_peak_device_bytes: train_peak,
        infer_peak_device_bytes: infer_peak,
        offload: spec.offload.name().into(),
        recompute: spec.recompute,
        streamed_bytes_per_step: streamed,
        upload_bytes_per_s: rate,
        upload_bound_s: bound,
        upload_bound_fraction: bound.map(|b| b / median),
        peak_rss_bytes: crate::train::run::peak_rss_bytes(),
        flops_formula: FLOPS_FORMULA.into(),
    })
}

/// Teacher forcing on every next token of `b` unpadded rows of `t` tokens
/// (a causal-LM loss): the loss rows and their targets.
pub fn next_token_rows(b: usize, t: usize, ids: &[u32]) -> (Vec<u32>, Vec<u32>) {
    let rows: Vec<u32> = (0..b)
        .flat_map(|bi| (0..t - 1).map(move |ti| (bi * t + ti) as u32))
        .collect();
    let targets = rows.iter().map(|&r| ids[r as usize + 1]).collect();
    (rows, targets)
}

/// Bytes per second of the backend's streamed-upload path
/// ([`Backend::weight_streamed`]: host tensor to a device buffer, waited for),
/// on a 128 MiB bf16 matrix held in memory (a streamed layer's tensors come
/// from the page cache, which the prefetch thread fills ahead): the median
/// of 5 uploads after one untimed.
pub fn upload_rate<B: Backend>(be: &B) -> Result<f64> {
    const ROWS: usize = 8192;
    const COLS: usize = 8192;
    let bits: Vec<u8> = (0..ROWS * COLS)
        .flat_map(|i| half::bf16::from_f32(((i % 1021) as f32 - 510.0) / 512.0).to_le_bytes())
        .collect();
    let t = TensorView::from_bytes("upload-rate", DType::BF16, vec![ROWS, COLS], bits);
    let bytes = be.weight_bytes(&t) as f64;
    let mut times = Vec::new();
    for rep in 0..6 {
        let t0 = Instant::now();
        let buf = be.weight_streamed(&t)?;
        be.sync();
        if rep > 0 {
            times.push(t0.elapsed().as_secs_f64());
        }
        drop(buf);
    }
    Ok(bytes / crate::train::run::median(&mut times))
}

/// `spec.warmup + spec.steps` training steps (zeroed gradients, `loss`
/// accumulating the bias gradient, clipping at 1.0, AdamW), each waited
/// for: the seconds of those after the warm-up, and every step's loss.
/// `loss(params, grads, step)`.
fn timed_steps<B: Backend>(
    be: &B,
    slab: &mut Slab<B>,
    spec: &StepSpec,
    loss: &mut dyn FnMut(&B::Buf, &mut B::Buf, u64) -> f64,
) -> (Vec<f64>, Vec<f64>) {
    let (mut times, mut losses) = (Vec::new(), Vec::new());
    for step in 1..=(spec.warmup + spec.steps) as u64 {
        let t0 = Instant::now();
        be.fill(&mut slab.grads, 0.0);
        losses.push(loss(&slab.params, &mut slab.grads, step));
        slab.clip(be, 1.0);
        slab.step(be, AdamW::with_defaults(1e-4, step));
        be.sync();
        if step as usize > spec.warmup {
            times.push(t0.elapsed().as_secs_f64());
        }
    }
    (times, losses)
}

/// BERT shapes are written in f32 whatever `--dtype` says.
fn spec_dtype(spec: &StepSpec, shape: Shape) -> DType {
    match shape {
        Shape::Bert(..) => DType::F32,
        Shape::Opt(..) => spec.dtype,
    }
}
