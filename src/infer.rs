//! Embedding beft as a library: classify text with a base model and a
//! trained biases file, on the fast CPU backend, without any CLI code.
//!
//! ```no_run
//! use beft::infer::Classifier;
//! # fn main() -> beft::Result<()> {
//! let clf = Classifier::load(
//!     "models/all-MiniLM-L6-v2".as_ref(),
//!     "runs/sst2-v/biases.safetensors".as_ref(),
//! )?;
//! for (label, prob) in clf.classify(&["a gripping, beautiful film", "dull and far too long"])? {
//!     println!("label {label} (p = {prob:.3})");
//! }
//! # Ok(())
//! # }
//! ```

use std::path::Path;

use crate::backend::fast::{FastBuf, FastCpu};
use crate::backend::{Backend, PoolKind};
use crate::data::TextTokenizer;
use crate::error::{Error, Result};
use crate::model::config::ModelDir;
use crate::model::{BiasTerm, Encoder, EncoderOptions};
use crate::train::{logits_by_length, parse_pooling};
use crate::weights::WeightStore;

/// A sequence classifier: a frozen base model (memory-mapped) plus the
/// trained biases and head of a `beft train` run.
pub struct Classifier {
    be: FastCpu,
    enc: Encoder<FastCpu>,
    params: FastBuf,
    tok: TextTokenizer,
    pad_id: u32,
    task: Option<String>,
}

impl Classifier {
    /// Load the model directory (`config.json`, safetensors weights,
    /// `tokenizer.json`) and a `biases.safetensors` written by `beft train`.
    /// The biases file must have been trained on this model (its stored
    /// fingerprint is checked). Inputs are truncated to 128 tokens.
    pub fn load(model_dir: &Path, biases: &Path) -> Result<Self> {
        Self::load_with_max_len(model_dir, biases, 128)
    }

    /// [`Classifier::load`] with a chosen truncation length, on the backend
    /// `BEFT_CPU_GEMM` asks for.
    pub fn load_with_max_len(model_dir: &Path, biases: &Path, max_len: usize) -> Result<Self> {
        Self::load_on(FastCpu::from_env()?, model_dir, biases, max_len)
    }

    /// [`Classifier::load_with_max_len`] on the given backend (e.g.
    /// `FastCpu::for_run(true)` for bf16 products).
    pub fn load_on(be: FastCpu, model_dir: &Path, biases: &Path, max_len: usize) -> Result<Self> {
        let md = ModelDir::open(model_dir)?;
        if md.config.arch.is_decoder() {
            return Err(Error::file(
                model_dir,
                format!(
                    "is a {} decoder; the classifier runs encoders (BERT, RoBERTa, MiniLM): classify with a decoder through `beft predict` or beft::train::lm::DecoderPredictor",
                    md.config.arch.name()
                ),
            ));
        }
        let store = WeightStore::open_file(biases)?;
        let meta = |k: &str| store.metadata().get(k).cloned();
        md.check_biases_base(biases, &store)?;
        let terms = BiasTerm::trained_set(meta("bias_terms").as_deref())?;
        let num_labels = match meta("num_labels") {
            Some(n) => n
                .parse::<usize>()
                .map_err(|_| Error::file(biases, format!("bad num_labels '{n}'")))?,
            None => 2,
        };
        let pooling = match meta("pooling") {
            Some(p) => parse_pooling(&p)?,
            None => md.default_pooling.unwrap_or(PoolKind::Cls),
        };
        let tok_path = md
            .tokenizer
            .clone()
            .ok_or_else(|| Error::file(&md.dir, "no tokenizer.json in the model directory"))?;
        let tok = TextTokenizer::from_file(&tok_path, max_len)?;
        let pad_id = tok.pad_id().unwrap_or(md.config.pad_token_id);
        let enc = Encoder::load(
            &be,
            &md,
            EncoderOptions {
                pooling,
                num_labels,
                terms,
                seed: 0,
            },
        )?;
        let mut init = enc.init.clone();
        enc.layout.read_values(&store, biases, &mut init)?;
        let vals: Vec<f32> = init.iter().map(|v| *v as f32).collect();
        let params = be.upload(&vals);
        Ok(Classifier {
            be,
            enc,
            params,
            tok,
            pad_id,
            task: meta("task"),
        })
    }

    /// Number of labels of the head (1 = regression).
    pub fn num_labels(&self) -> usize {
        self.enc.opts.num_labels
    }

    /// Raw head outputs, one row of [`Classifier::num_labels`] values per text.
    pub fn logits(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>> {
        let inputs: Vec<(&str, Option<&str>)> = texts.iter().map(|t| (*t, None)).collect();
        self.logits_pairs(&inputs)
    }

    /// [`Classifier::logits`] for inputs that may be sentence pairs
    /// (`(text, Some(pair))`, encoded as the tokenizer's pair template, as
    /// in training on RTE, MRPC, …).
    pub fn logits_pairs(&self, inputs: &[(&str, Option<&str>)]) -> Result<Vec<Vec<f32>>> {
        let encs = inputs
            .iter()
            .map(|(t, p)| self.tok.encode(t, *p))
            .collect::<Result<Vec<_>>>()?;
        logits_by_length(&self.be, &self.enc, &self.params, &encs, self.pad_id, 32)
    }

    /// The most probable label of each text and its softmax probability
    /// (for a regression head: label 0 and the predicted value).
    pub fn classify(&self, texts: &[&str]) -> Result<Vec<(usize, f32)>> {
        Ok(self
            .logits(texts)?
            .iter()
            .map(|row| best_label(row))
            .collect())
    }

    /// The task the biases were trained on (`sst2`, `rte`, …), from their
    /// file's metadata.
    pub fn task(&self) -> Option<&str> {
        self.task.as_deref()
    }
}

/// The softmax of one row of logits (a regression head's single value is
/// returned as is).
pub fn probabilities(row: &[f32]) -> Vec<f32> {
    if row.len() == 1 {
        return row.to_vec();
    }
    let mx = row.iter().fold(f32::NEG_INFINITY, |a, b| a.max(*b));
    let e: Vec<f32> = row.iter().map(|v| (v - mx).exp()).collect();
    let z: f32 = e.iter().sum();
    e.iter().map(|v| v / z).collect()
}

/// The most probable label of one row of logits and its probability (for a
/// regression head: label 0 and the value).
pub fn best_label(row: &[f32]) -> (usize, f32) {
    let best = crate::float::argmax(row);
    (
        best,
        probabilities(row).get(best).copied().unwrap_or(f32::NAN),
    )
}
