//! Fine-tuning runs: the training loop (AdamW over the trainable slab,
//! global-norm clipping, constant or linear schedule), evaluation, and the
//! files of a run directory.

pub mod checkpoint;
pub mod lm;
pub mod run;

use crate::backend::{AdamW, Backend, PoolKind};
use crate::data::{self, Encoding, Example, Metrics, TaskSpec};
use crate::error::Result;
use crate::float::Float;
use crate::model::{Encoder, SlabLayout};

/// Learning-rate schedule.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    /// Constant after the warm-up (BEFT's protocol, with no warm-up).
    Constant,
    /// Linear warm-up, then linear decay to zero (Hugging Face's default).
    Linear,
    /// Linear warm-up, then half a cosine down to zero (Hugging Face's
    /// `cosine`).
    Cosine,
}

/// The learning rate at optimiser step `step` (1-based) of `total`.
pub fn lr_at(schedule: Schedule, base: f64, step: u64, total: u64, warmup: u64) -> f64 {
    if warmup > 0 && step <= warmup {
        return base * step as f64 / warmup as f64;
    }
    match schedule {
        Schedule::Constant => base,
        Schedule::Linear => {
            let rest = total.saturating_sub(warmup).max(1);
            base * (total.saturating_sub(step) as f64 / rest as f64).max(0.0)
        }
        Schedule::Cosine => {
            let rest = total.saturating_sub(warmup).max(1);
            let done = (step.saturating_sub(warmup) as f64 / rest as f64).min(1.0);
            base * 0.5 * (1.0 + (std::f64::consts::PI * done).cos())
        }
    }
}

/// Trainable values with their gradients and AdamW moments, all in the
/// slab layout.
pub struct Slab<B: Backend> {
    pub params: B::Buf,
    pub grads: B::Buf,
    pub m: B::Buf,
    pub v: B::Buf,
    pub len: usize,
}

impl<B: Backend> Slab<B> {
    /// Upload initial values.
    pub fn new(be: &B, init: &[f64]) -> Self {
        let vals: Vec<B::T> = init.iter().map(|x| B::T::from_f64(*x)).collect();
        let n = vals.len();
        Slab {
            params: be.upload(&vals),
            grads: be.zeros(n),
            m: be.zeros(n),
            v: be.zeros(n),
            len: n,
        }
    }

    /// Clip the gradient to global norm `max_norm` (if > 0); returns the norm
    /// before clipping.
    pub fn clip(&mut self, be: &B, max_norm: f64) -> f64 {
        let norm = be.sum_sq(&self.grads, self.len).sqrt();
        if max_norm > 0.0 && norm > max_norm {
            be.scale(&mut self.grads, max_norm / (norm + 1e-6), self.len);
        }
        norm
    }

    /// One AdamW step.
    pub fn step(&mut self, be: &B, h: AdamW) {
        be.adamw(
            &mut self.params,
            &self.grads,
            &mut self.m,
            &mut self.v,
            self.len,
            h,
        );
    }

    /// The parameters as f64 (for saving).
    pub fn params_f64(&self, be: &B) -> Vec<f64> {
        be.download(&self.params)
            .into_iter()
            .map(|x| x.to_f64())
            .collect()
    }
}

/// The head outputs of an encoder for `encs`, one row of
/// `num_labels` values per encoding, in their order. Batches of up to
/// `batch` encodings sorted by length pad little; each row goes back to its
/// index.
pub fn logits_by_length<B: Backend>(
    be: &B,
    enc: &Encoder<B>,
    params: &B::Buf,
    encs: &[Encoding],
    pad_id: u32,
    batch: usize,
) -> Result<Vec<Vec<B::T>>> {
    let c = enc.opts.num_labels;
    let lengths: Vec<usize> = encs.iter().map(Encoding::len).collect();
    data::map_by_length(&lengths, batch, |idx| {
        let refs: Vec<&Encoding> = idx.iter().map(|&i| &encs[i]).collect();
        let hb = data::make_batch(&refs, &vec![0.0; refs.len()], pad_id);
        let db = enc.upload_batch(be, &hb)?;
        let logits = enc.logits(be, params, &db);
        Ok(logits.chunks(c).map(<[B::T]>::to_vec).collect())
    })
}

/// Predictions of an encoder over a dataset: class index (as f32) or the
/// regression value per example.
pub fn predict<B: Backend>(
    be: &B,
    enc: &Encoder<B>,
    params: &B::Buf,
    encs: &[Encoding],
    pad_id: u32,
    batch: usize,
) -> Result<Vec<f32>> {
    Ok(logits_by_length(be, enc, params, encs, pad_id, batch)?
        .iter()
        .map(|row| {
            if row.len() == 1 {
                row[0].to_f32()
            } else {
                crate::float::argmax(row) as f32
            }
        })
        .collect())
}

/// Evaluate on a dataset and compute the task's metrics.
pub fn evaluate<B: Backend>(
    be: &B,
    enc: &Encoder<B>,
    params: &B::Buf,
    task: &TaskSpec,
    encs: &[Encoding],
    examples: &[Example],
    pad_id: u32,
    batch: usize,
) -> Result<Metrics> {
    let preds = predict(be, enc, params, encs, pad_id, batch)?;
    let labels: Vec<f32> = examples.iter().map(|e| e.label).collect();
    Ok(data::evaluate(task, &preds, &labels))
}

/// Parse `--pooling`.
pub fn parse_pooling(s: &str) -> Result<PoolKind> {
    match s.to_ascii_lowercase().as_str() {
        "cls" | "pooler" => Ok(PoolKind::Cls),
        "mean" => Ok(PoolKind::Mean),
        other => Err(crate::Error::msg(format!(
            "--pooling: unknown pooling '{other}' (cls or mean)"
        ))),
    }
}

/// Name of a pooling mode in files.
pub fn pooling_name(p: PoolKind) -> &'static str {
    match p {
        PoolKind::Cls => "cls",
        PoolKind::Mean => "mean",
    }
}

/// The trained tensors of a slab, named by their Hugging Face names.
pub fn slab_tensors(layout: &SlabLayout, values: &[f64]) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    layout
        .slots
        .iter()
        .map(|s| {
            (
                s.name.clone(),
                s.shape.clone(),
                values[s.offset..s.offset + s.len()]
                    .iter()
                    .map(|v| *v as f32)
                    .collect(),
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Warm-up ramps every schedule up to the base rate; linear and cosine
    /// then fall to zero at the last step, cosine through half the base
    /// rate halfway and above linear before that, below it after.
    #[test]
    fn schedules() {
        let (base, total, warmup) = (1e-3, 110, 10);
        for s in [Schedule::Constant, Schedule::Linear, Schedule::Cosine] {
            assert_eq!(lr_at(s, base, 5, total, warmup), base * 0.5, "{s:?}");
            assert_eq!(lr_at(s, base, 10, total, warmup), base, "{s:?}");
        }
        assert_eq!(lr_at(Schedule::Constant, base, 110, total, warmup), base);
        for s in [Schedule::Linear, Schedule::Cosine] {
            assert_eq!(lr_at(s, base, 110, total, warmup), 0.0, "{s:?}");
            assert!(
                (lr_at(s, base, 60, total, warmup) - base * 0.5).abs() < 1e-12,
                "{s:?}"
            );
        }
        let (lin, cos) = (Schedule::Linear, Schedule::Cosine);
        assert!(lr_at(cos, base, 30, total, warmup) > lr_at(lin, base, 30, total, warmup));
        assert!(lr_at(cos, base, 90, total, warmup) < lr_at(lin, base, 90, total, warmup));
        let c: Vec<f64> = (10..=110)
            .map(|t| lr_at(cos, base, t, total, warmup))
            .collect();
        assert!(
            c.windows(2).all(|w| w[1] <= w[0]),
            "cosine decays monotonically"
        );
    }
}
