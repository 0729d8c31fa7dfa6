//! `beft rank`: which bias term to fine-tune. Three scores per term and
//! layer, after BEFT (Huang, Balashankar & Aminifar), averaged over layers:
//!
//! - **BEFT score** `1 − (b_ft · b_0) / max(‖b_0‖, ‖b_ft‖)²` after an all-bias
//!   (BitFit) fine-tune: angle and magnitude of the change together;
//! - **magnitude** `mean |b_ft − b_0|` after the same fine-tune;
//! - **empirical Fisher** `mean g²` of each bias's gradient on the
//!   pre-trained model over training batches (batch 8, each batch's gradient
//!   clipped to global norm 1.0), with no training first.
//!
//! `b_k`'s gradient is exactly zero in softmax attention, so its Fisher
//! score is zero up to rounding; the report says so.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use serde_json::json;

use crate::backend::Backend;
use crate::data::{self, Encoding, Split};
use crate::error::{Error, Result};
use crate::float::Float;
use crate::model::config::ModelDir;
use crate::model::{BiasTerm, Encoder, EncoderOptions, SlotKind};
use crate::train::run::{train_on, TrainArgs};
use crate::train::{parse_pooling, Slab};
use crate::weights::WeightStore;

/// The terms that are ranked (per layer).
pub const RANKED: [BiasTerm; 8] = [
    BiasTerm::Q,
    BiasTerm::K,
    BiasTerm::V,
    BiasTerm::O,
    BiasTerm::MlpIn,
    BiasTerm::MlpOut,
    BiasTerm::Ln1,
    BiasTerm::Ln2,
];

/// Scores of one term: per layer and their mean.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct TermScores {
    pub beft_score: Vec<f64>,
    pub magnitude: Vec<f64>,
    pub fisher: Vec<f64>,
    pub beft_score_mean: f64,
    pub magnitude_mean: f64,
    pub fisher_mean: f64,
}

/// The result of `beft rank`.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Ranking {
    pub model: String,
    pub task: String,
    pub train_examples: usize,
    pub layers: usize,
    pub terms: BTreeMap<String, TermScores>,
    /// Terms ordered by each score, highest first.
    pub order: BTreeMap<String, Vec<String>>,
    pub notes: Vec<String>,
    pub bitfit_run: PathBuf,
}

/// BEFT's angle-and-magnitude score of one bias vector.
pub fn beft_score(b0: &[f64], bft: &[f64]) -> f64 {
    let dot: f64 = b0.iter().zip(bft).map(|(a, b)| a * b).sum();
    let n0 = b0.iter().map(|x| x * x).sum::<f64>().sqrt();
    let n1 = bft.iter().map(|x| x * x).sum::<f64>().sqrt();
    let m = n0.max(n1);
    if m == 0.0 {
        return 0.0;
    }
    1.0 - dot / (m * m)
}

fn mean(v: &[f64]) -> f64 {
    if v.is_empty() {
        0.0
    } else {
        v.iter().sum::<f64>() / v.len() as f64
    }
}

/// `beft rank`. `train` configures the all-bias fine-tune (its `bias` and
/// `out` are overridden: the run goes to `out/bitfit`); its `device` runs
/// both the Fisher pass and the fine-tune.
pub fn rank(train: &TrainArgs, out: &Path) -> Result<Ranking> {
    crate::backend::fault::set_device_budget(train.max_gpu_memory.as_deref())?;
    crate::train::run::with_backend!(&train.device, train.bf16, |be| rank_on(&be, train, out))
}

/// [`rank`] on a given backend.
pub fn rank_on<B: Backend>(be: &B, train: &TrainArgs, out: &Path) -> Result<Ranking> {
    if out.join("ranking.json").exists() {
        return Err(Error::file(
            out,
            "already holds a ranking.json; choose another --out",
        ));
    }
    fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let md = ModelDir::open(&train.model)?;
    let task = data::task(&train.task)?;
    let all = data::load_split(&task, &train.data, Split::Train)?;
    let task = task.resolve(&all)?;
    let examples = data::sample_subset(&all, train.train_size, train.seed);
    let tok_path = md
        .tokenizer
        .clone()
        .ok_or_else(|| Error::file(&md.dir, "no tokenizer.json in the model directory"))?;
    let tok = data::TextTokenizer::from_file(&tok_path, train.max_len)?;
    let pad_id = tok.pad_id().unwrap_or(md.config.pad_token_id);
    let encs = tok.encode_all(&examples)?;
    let pooling = match &train.pooling {
        Some(p) => parse_pooling(p)?,
        None => md.default_pooling.unwrap_or(crate::backend::PoolKind::Cls),
    };
    let terms: Vec<BiasTerm> = BiasTerm::ALL.to_vec();
    let enc = Encoder::load(
        be,
        &md,
        EncoderOptions {
            pooling,
            num_labels: task.num_labels,
            terms,
            seed: train.seed,
        },
    )?;
    let layers = md.config.num_layers;

    // 1. Empirical Fisher on the pre-trained model.
    eprintln!(
        "rank: empirical Fisher over {} examples (batch 8)",
        examples.len()
    );
    let mut slab = Slab::new(be, &enc.init);
    let mut fisher = vec![0f64; enc.layout.len];
    let mut batches = 0usize;
    for idx in data::eval_batches(encs.len(), 8) {
        let refs: Vec<&Encoding> = idx.iter().map(|&i| &encs[i]).collect();
        let labels: Vec<f32> = idx.iter().map(|&i| examples[i].label).collect();
        let db = enc.upload_batch(be, &data::make_batch(&refs, &labels, pad_id))?;
        be.fill(&mut slab.grads, 0.0);
        enc.loss_and_grad(be, &slab.params, &mut slab.grads, &db, None);
        slab.clip(be, 1.0);
        for (f, g) in fisher.iter_mut().zip(be.download(&slab.grads)) {
            *f += g.to_f64() * g.to_f64();
        }
        batches += 1;
    }
    for f in &mut fisher {
        *f /= batches.max(1) as f64;
    }

    // 2. The all-bias fine-tune.
    let run_dir = out.join("bitfit");
    let mut args = train.clone();
    args.bias = "all".into();
    args.out = run_dir.clone();
    args.overwrite = true;
    eprintln!("rank: all-bias fine-tune into {}", run_dir.display());
    train_on(be, &args)?;
    let trained = WeightStore::open_file(&run_dir.join("biases.safetensors"))?;

    // 3. Scores per term and layer.
    let mut terms_out = BTreeMap::new();
    for term in RANKED {
        let (mut bs, mut mg, mut fs_) = (Vec::new(), Vec::new(), Vec::new());
        for l in 0..layers {
            let Some(slot) = enc.layout.find(SlotKind::Bias(term), Some(l)) else {
                continue;
            };
            let b0 = &enc.init[slot.offset..slot.offset + slot.len()];
            let bft = trained.get_shaped(&slot.name, &slot.shape)?.to_f64_vec();
            bs.push(beft_score(b0, &bft));
            mg.push(mean(
                &bft.iter()
                    .zip(b0)
                    .map(|(a, b)| (a - b).abs())
                    .collect::<Vec<_>>(),
            ));
            fs_.push(mean(&fisher[slot.offset..slot.offset + slot.len()]));
        }
        terms_out.insert(
            term.short().to_string(),
            TermScores {
                beft_score_mean: mean(&bs),
                magnitude_mean: mean(&mg),
                fisher_mean: mean(&fs_),
                beft_score: bs,
                magnitude: mg,
                fisher: fs_,
            },
        );
    }
    let mut order = BTreeMap::new();
    for (name, get) in [
        (
            "beft_score",
            (|t: &TermScores| t.beft_score_mean) as fn(&TermScores) -> f64,
        ),
        ("magnitude", |t: &TermScores| t.magnitude_mean),
        ("fisher", |t: &TermScores| t.fisher_mean),
    ] {
        let mut v: Vec<(&String, f64)> = terms_out.iter().map(|(k, t)| (k, get(t))).collect();
        v.sort_by(|a, b| b.1.partial_cmp(&a.1).unwrap_or(std::cmp::Ordering::Equal));
        order.insert(
            name.to_string(),
            v.into_iter().map(|(k, _)| k.clone()).collect(),
        );
    }
    let notes = vec![
        "b_k receives an exactly-zero gradient in softmax attention (a constant added to every key of a query shifts all its scores alike): its Fisher score is zero up to rounding, and any change AdamW makes to it (normalised rounding noise) has no effect on the model's outputs.".to_string(),
    ];
    let ranking = Ranking {
        model: md.name.clone(),
        task: task.name.clone(),
        train_examples: examples.len(),
        layers,
        terms: terms_out,
        order,
        notes,
        bitfit_run: run_dir,
    };
    let path = out.join("ranking.json");
    let s = serde_json::to_string_pretty(&json!(ranking)).map_err(|e| Error::msg(e.to_string()))?;
    fs::write(&path, s + "\n").map_err(|e| Error::io(&path, e))?;
    crate::method::plot::ranking_plots(&ranking, out)?;
    Ok(ranking)
}
