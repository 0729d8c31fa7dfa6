//! `beft train` / `beft eval` for decoders (GPT-2, OPT, LLaMA family):
//! MeZO-style prompted tasks.
//!
//! * Classification and multiple choice are **candidate scoring**: every
//!   option is a verbaliser continuation of the prompt; the loss is the
//!   cross-entropy over the candidates' length-normalised log-likelihoods and
//!   the prediction is their arg-max (metric: accuracy).
//! * Generation (SQuAD format) trains with teacher forcing on the answer
//!   tokens and evaluates by greedy decoding with a KV cache (stop at a
//!   newline or after `--max-new-tokens`), scored by SQuAD token F1 (the
//!   reported metric) and exact match.
//!
//! The run directory has the encoder path's files; `summary.json` has the
//! same keys plus `zero_shot_dev_metric` (the dev metric before training),
//! and `biases.safetensors` records in its metadata (`added_biases`) the
//! trained biases the base model has no slot for.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

use serde_json::{json, Value};

use super::run::{run_loop, write_json, EvalArgs, EvalResult, Step, Summary, TrainArgs, Trainee};
use super::{slab_tensors, Slab};
use crate::backend::fast::{FastBuf, FastCpu};
use crate::backend::fault::{max_device_memory, mib};
use crate::backend::Backend;
use crate::data::generation::{self, GenExample};
use crate::data::prompts::{self, McExample, Templates};
use crate::data::{self, Split, TextTokenizer};
use crate::error::{Error, Result};
use crate::float::Float;
use crate::model::config::{Arch, ModelDir};
use crate::model::{BiasTerm, Decoder, DecoderOptions, Offload};
use crate::rng::Rng;
use crate::weights::{write_safetensors, WeightStore};

/// Whether `model` (a directory with config.json, or a .gguf file) is a
/// decoder, judged from its config without loading weights.
pub fn is_decoder_model(model: &Path) -> bool {
    if crate::weights::gguf::is_gguf_path(model) {
        return true;
    }
    let cfg = model.join("config.json");
    let Ok(text) = fs::read_to_string(cfg) else {
        return false;
    };
    let Ok(v) = serde_json::from_str::<Value>(&text) else {
        return false;
    };
    v.get("model_type")
        .and_then(Value::as_str)
        .and_then(Arch::from_model_type)
        .is_some_and(|a| a.is_decoder())
}

/// A task's examples, tokenised.
enum Data {
    /// Candidate scoring: prompt ids, option ids, gold option.
    Mc(Vec<EncMc>),
    /// Generation: prompt ids, target ids (training), reference answers.
    Gen(Vec<EncGen>),
}

struct EncMc {
    prompt: Vec<u32>,
    options: Vec<Vec<u32>>,
    gold: usize,
}

impl EncMc {
    /// The longest candidate sequence: prompt and longest option.
    fn len(&self) -> usize {
        self.prompt.len() + self.options.iter().map(Vec::len).max().unwrap_or(0)
    }
}

struct EncGen {
    prompt: Vec<u32>,
    target: Vec<u32>,
    answers: Vec<String>,
}

impl Data {
    fn len(&self) -> usize {
        match self {
            Data::Mc(v) => v.len(),
            Data::Gen(v) => v.len(),
        }
    }

    /// The padded row length each example needs (prompt plus its longest
    /// option, or prompt plus target): what batching by length groups on.
    fn lengths(&self) -> Vec<usize> {
        match self {
            Data::Mc(v) => v.iter().map(EncMc::len).collect(),
            Data::Gen(v) => v.iter().map(|e| e.prompt.len() + e.target.len()).collect(),
        }
    }
}

fn is_generation(task: &str) -> bool {
    matches!(
        prompts::task_key(task).as_str(),
        "squad" | "squadv1" | "squadv2"
    )
}

/// The template name of a task (`--task` key).
fn template_name(task: &str) -> String {
    let k = prompts::task_key(task);
    if k.starts_with("squad") {
        "squad".into()
    } else {
        k
    }
}

struct Tok {
    tk: TextTokenizer,
    /// Token prepended to every prompt (OPT's `</s>`, LLaMA's `<s>`), if any.
    bos: Option<u32>,
    max_len: usize,
}

impl Tok {
    fn plain(&self, text: &str) -> Result<Vec<u32>> {
        let e = self
            .tk
            .inner()
            .encode(text, false)
            .map_err(|e| Error::file(self.tk.path(), format!("encoding failed: {e}")))?;
        Ok(e.get_ids().to_vec())
    }

    fn prompt(&self, text: &str) -> Result<Vec<u32>> {
        let mut ids: Vec<u32> = self.bos.into_iter().collect();
        ids.extend(self.plain(text)?);
        Ok(ids)
    }

    fn decode(&self, ids: &[u32]) -> String {
        self.tk.inner().decode(ids, true).unwrap_or_default()
    }

    /// Keep `prompt + answer` within `max_len`: drop prompt tokens from the
    /// left (after the BOS token).
    fn fit(&self, prompt: &mut Vec<u32>, answer_len: usize) {
        let keep_bos = self.bos.is_some() as usize;
        let room = self.max_len.saturating_sub(answer_len).max(keep_bos + 1);
        if prompt.len() > room {
            let cut = prompt.len() - room;
            prompt.drain(keep_bos..keep_bos + cut);
        }
    }
}

fn tokenizer(md: &ModelDir, max_len: usize) -> Result<Tok> {
    let path = md
        .tokenizer
        .clone()
        .ok_or_else(|| Error::file(&md.dir, "no tokenizer (tokenizer.json) for this model"))?;
    // The tokenizer's own truncation must not cut prompts: allow a long
    // input, then fit prompt + answer to max_len ourselves.
    let tk = TextTokenizer::from_file(&path, max_len.max(1 << 16))?;
    let bos = match md.config.arch {
        Arch::Opt | Arch::Llama => md.config.bos_token_id,
        _ => None,
    };
    if let Some(b) = bos {
        if b as usize >= md.config.vocab_size {
            return Err(Error::file(
                &path,
                format!("bos_token_id {b} is outside the vocabulary"),
            ));
        }
    }
    Ok(Tok { tk, bos, max_len })
}

fn load_data(
    task: &str,
    dir: &Path,
    split: Split,
    size: Option<usize>,
    seed: u64,
    templates: &Templates,
    tok: &Tok,
) -> Result<Data> {
    let tpl = templates.get(&template_name(task))?;
    let subset = |n: usize| -> Vec<usize> {
        let mut idx: Vec<usize> = (0..n).collect();
        if let Some(k) = size {
            if k < n {
                Rng::new(seed).shuffle(&mut idx);
                idx.truncate(k);
                idx.sort_unstable();
            }
        }
        idx
    };
    if is_generation(task) {
        let target = tpl.target.clone().ok_or_else(|| {
            Error::msg(format!(
                "template '{}' has no 'target': generation tasks need one",
                tpl.name
            ))
        })?;
        let all: Vec<GenExample> = generation::load_split(dir, split)?;
        let mut out = Vec::new();
        for i in subset(all.len()) {
            let g = &all[i];
            let mut prompt = tok.prompt(&prompts::render(&tpl.prompt, &g.fields)?)?;
            let target = tok.plain(&prompts::render(&target, &g.fields)?)?;
            tok.fit(&mut prompt, target.len());
            out.push(EncGen {
                prompt,
                target,
                answers: g.answers.clone(),
            });
        }
        return Ok(Data::Gen(out));
    }
    let recs = prompts::load_records(task, dir, split, seed)?;
    let idx = subset(recs.len());
    let recs: Vec<_> = idx.into_iter().map(|i| recs[i].clone()).collect();
    let mc: Vec<McExample> = prompts::to_mc(tpl, &recs)?;
    Ok(Data::Mc(encode_mc(&mc, tpl, tok)?))
}

/// Tokenize candidate-scoring examples: each prompt fitted to `max_len`
/// with room for its longest option.
fn encode_mc(mc: &[McExample], tpl: &prompts::Template, tok: &Tok) -> Result<Vec<EncMc>> {
    let mut out = Vec::with_capacity(mc.len());
    for (i, e) in mc.iter().enumerate() {
        let options: Vec<Vec<u32>> = e
            .options
            .iter()
            .map(|o| tok.plain(o))
            .collect::<Result<_>>()?;
        if let Some(j) = options.iter().position(|o| o.is_empty()) {
            return Err(Error::msg(format!(
                "example {i}: option {:?} of template '{}' encodes to no tokens",
                e.options[j], tpl.name
            )));
        }
        let longest = options.iter().map(|o| o.len()).max().unwrap_or(1);
        let mut prompt = tok.prompt(&e.prompt)?;
        tok.fit(&mut prompt, longest);
        if prompt.is_empty() {
            return Err(Error::msg(format!("example {i}: empty prompt")));
        }
        out.push(EncMc {
            prompt,
            options,
            gold: e.gold,
        });
    }
    Ok(out)
}

/// Classify free texts with a decoder and a biases file trained on a
/// candidate-scoring task (`beft predict` for decoders): each text goes
/// through the task's prompt template and every label's verbaliser is
/// scored, as in evaluation. For a generation task (SQuAD), answer
/// instead: greedy decoding up to the first newline, as in evaluation. On
/// the fast CPU backend.
pub struct DecoderPredictor {
    be: FastCpu,
    dec: Decoder<FastCpu>,
    params: FastBuf,
    tok: Tok,
    tpl: prompts::Template,
    task: String,
}

impl DecoderPredictor {
    /// Load the decoder (a Hugging Face directory or a GGUF file) and the
    /// biases file of a `beft train` run on it. The task is the run's
    /// (from the file's metadata) unless `task` names one; `templates`
    /// replaces or extends the built-in prompt templates, as in training.
    /// On the backend `BEFT_CPU_GEMM` asks for.
    pub fn load(
        model: &Path,
        biases: &Path,
        task: Option<&str>,
        templates: Option<&Path>,
        max_len: usize,
    ) -> Result<Self> {
        Self::load_on(
            FastCpu::from_env()?,
            model,
            biases,
            task,
            templates,
            max_len,
        )
    }

    /// [`DecoderPredictor::load`] on the given backend (e.g.
    /// `FastCpu::for_run(true)` for bf16 products).
    pub fn load_on(
        be: FastCpu,
        model: &Path,
        biases: &Path,
        task: Option<&str>,
        templates: Option<&Path>,
        max_len: usize,
    ) -> Result<Self> {
        let store = WeightStore::open_file(biases)?;
        let meta = |k: &str| store.metadata().get(k).cloned();
        if meta("objective").as_deref() != Some("decoder") {
            return Err(Error::file(
                biases,
                "is not a decoder's biases file (trained with `beft train` on a decoder)",
            ));
        }
        let task = match task.map(str::to_string).or_else(|| meta("task")) {
            Some(t) => t,
            None => return Err(Error::file(biases, "names no task: pass --task")),
        };
        let generation = is_generation(&task);
        if !generation && !prompts::MC_TASKS.contains(&prompts::task_key(&task).as_str()) {
            return Err(Error::msg(format!(
                "task '{task}': predict scores the label verbalisers of a classification task ({}) or answers a generation task (squad)",
                prompts::MC_TASKS.join(", ")
            )));
        }
        let templates = Templates::load(templates)?;
        let tpl = templates.get(&template_name(&task))?.clone();
        if generation {
            if tpl.target.is_none() {
                return Err(Error::msg(format!(
                    "template '{}' has no 'target': generation tasks need one",
                    tpl.name
                )));
            }
        } else if tpl.options.is_none() {
            return Err(Error::msg(format!(
                "task '{task}': its template '{}' scores each example's own choices; predict needs fixed label verbalisers ('options')",
                tpl.name
            )));
        }
        let md = ModelDir::open(model)?;
        md.check_biases_base(biases, &store)?;
        let tok = tokenizer(&md, max_len)?;
        let terms = BiasTerm::trained_set(meta("bias_terms").as_deref())?;
        let dec = Decoder::load(
            &be,
            &md,
            DecoderOptions {
                terms,
                offload: Offload::Resident,
                recompute: false,
            },
        )?;
        let mut init = dec.init.clone();
        dec.layout.read_values(&store, biases, &mut init)?;
        let vals: Vec<f32> = init.iter().map(|&x| x as f32).collect();
        let params = be.upload(&vals);
        Ok(DecoderPredictor {
            be,
            dec,
            params,
            tok,
            tpl,
            task,
        })
    }

    /// The task the texts are classified for.
    pub fn task(&self) -> &str {
        &self.task
    }

    /// Whether the task is answered by generation ([`Self::answers`])
    /// rather than classified ([`Self::scores`]).
    pub fn generates(&self) -> bool {
        is_generation(&self.task)
    }

    /// Greedy answers (at most `max_new` tokens, up to the first newline)
    /// to `(context, question)` pairs through the task's prompt template
    /// (its `title` is empty).
    pub fn answers(&self, inputs: &[(&str, Option<&str>)], max_new: usize) -> Result<Vec<String>> {
        let mut prompts_ = Vec::with_capacity(inputs.len());
        for (i, (ctx, q)) in inputs.iter().enumerate() {
            let Some(q) = q else {
                return Err(Error::msg(format!(
                    "text {}: task '{}' answers a question about a context: give the context, a tab, then the question",
                    i + 1,
                    self.task
                )));
            };
            let f = crate::data::generation::fields("", ctx, q);
            let mut p = self.tok.prompt(&prompts::render(&self.tpl.prompt, &f)?)?;
            self.tok.fit(&mut p, max_new);
            prompts_.push(p);
        }
        let (be, dec) = (&self.be, &self.dec);
        greedy_answers(
            be,
            dec,
            &self.params,
            &self.tok,
            &prompts_,
            PREDICT_BATCH,
            max_new.max(1),
        )
    }

    /// The label verbalisers, in label order, as the template writes them.
    pub fn options(&self) -> Vec<String> {
        self.tpl.options.clone().unwrap_or_default()
    }

    /// Each input's score per label: the length-normalised log-likelihood
    /// of the label's verbaliser after the prompt (the highest is the
    /// prediction, as in evaluation). `pair` is the second text of a pair
    /// task.
    pub fn scores(&self, inputs: &[(&str, Option<&str>)]) -> Result<Vec<Vec<f32>>> {
        let opts = self.tpl.options.iter().flatten();
        if prompts::uses_pair(&self.tpl.prompt) || opts.clone().any(|o| prompts::uses_pair(o)) {
            if let Some(i) = inputs.iter().position(|(_, p)| p.is_none()) {
                return Err(Error::msg(format!(
                    "text {}: task '{}' classifies pairs of texts: give both, separated by a tab",
                    i + 1,
                    self.task
                )));
            }
        }
        let recs: Vec<prompts::Record> = inputs
            .iter()
            .map(|(t, p)| prompts::free_text_record(t, *p))
            .collect();
        let enc = encode_mc(&prompts::to_mc(&self.tpl, &recs)?, &self.tpl, &self.tok)?;
        mc_scores(&self.be, &self.dec, &self.params, &enc, PREDICT_BATCH)
    }
}

/// Right-padded sequences, and the rows predicting each answer token.
struct Packed {
    batch: usize,
    seq: usize,
    ids: Vec<u32>,
    mask: Vec<f32>,
    rows: Vec<u32>,
    targets: Vec<u32>,
    /// Sequence of each row.
    row_seq: Vec<u32>,
    tokens: usize,
}

fn pack(seqs: &[(Vec<u32>, usize)], pad: u32) -> Packed {
    // (tokens, answer_start): answer tokens are tokens[answer_start..].
    let b = seqs.len();
    let t = seqs.iter().map(|s| s.0.len()).max().unwrap_or(1).max(1);
    let mut p = Packed {
        batch: b,
        seq: t,
        ids: vec![pad; b * t],
        mask: vec![0.0; b * t],
        rows: Vec::new(),
        targets: Vec::new(),
        row_seq: Vec::new(),
        tokens: 0,
    };
    for (i, (s, start)) in seqs.iter().enumerate() {
        p.ids[i * t..i * t + s.len()].copy_from_slice(s);
        p.mask[i * t..i * t + s.len()].fill(1.0);
        p.tokens += s.len();
        for pos in (*start).max(1)..s.len() {
            p.rows.push((i * t + pos - 1) as u32);
            p.targets.push(s[pos]);
            p.row_seq.push(i as u32);
        }
    }
    p
}

fn mc_batch<B: Backend>(
    be: &B,
    dec: &Decoder<B>,
    ex: &[&EncMc],
    pad: u32,
) -> Result<(crate::model::CandBatch<B>, usize, Vec<(usize, usize)>)> {
    let mut seqs = Vec::new();
    let mut cand_ex = Vec::new();
    let mut gold = Vec::new();
    let mut spans = Vec::new();
    for (e, x) in ex.iter().enumerate() {
        gold.push((seqs.len() + x.gold) as u32);
        spans.push((seqs.len(), x.options.len()));
        for o in &x.options {
            let mut s = x.prompt.clone();
            s.extend_from_slice(o);
            seqs.push((s, x.prompt.len()));
            cand_ex.push(e as u32);
        }
    }
    let p = pack(&seqs, pad);
    let x = dec.upload(be, p.batch, p.seq, &p.ids, &p.mask)?;
    let cb = dec.cand_batch(be, x, &p.rows, &p.targets, &p.row_seq, &cand_ex, &gold)?;
    Ok((cb, p.tokens, spans))
}

/// Inputs per forward pass of `beft predict`.
const PREDICT_BATCH: usize = 16;

/// Every candidate's score (length-normalised log-likelihood) per example,
/// in batches of `batch` examples of similar length.
fn mc_scores<B: Backend>(
    be: &B,
    dec: &Decoder<B>,
    params: &B::Buf,
    ex: &[EncMc],
    batch: usize,
) -> Result<Vec<Vec<f32>>> {
    let lengths: Vec<usize> = ex.iter().map(EncMc::len).collect();
    data::map_by_length(&lengths, batch, |idx| {
        let refs: Vec<&EncMc> = idx.iter().map(|&i| &ex[i]).collect();
        let (cb, _, spans) = mc_batch(be, dec, &refs, dec.cfg.pad_token_id)?;
        let (_, scores) = dec.candidate_scores(be, params, &cb);
        Ok(spans
            .iter()
            .map(|&(start, n)| {
                scores[start..start + n]
                    .iter()
                    .map(|s| s.to_f32())
                    .collect()
            })
            .collect())
    })
}

/// Greedy answers to `prompts` (at most `max_new` tokens, cut at the first
/// newline and trimmed), in batches of `batch` prompts of similar length.
fn greedy_answers<B: Backend>(
    be: &B,
    dec: &Decoder<B>,
    params: &B::Buf,
    tok: &Tok,
    prompts: &[Vec<u32>],
    batch: usize,
    max_new: usize,
) -> Result<Vec<String>> {
    let stop = |toks: &[u32]| tok.decode(toks).contains('\n');
    let lengths: Vec<usize> = prompts.iter().map(Vec::len).collect();
    data::map_by_length(&lengths, batch, |idx| {
        let group: Vec<Vec<u32>> = idx.iter().map(|&i| prompts[i].clone()).collect();
        let gen = dec.generate_greedy(be, params, &group, max_new, &stop)?;
        Ok(gen
            .iter()
            .map(|g| {
                let text = tok.decode(g);
                text.split('\n').next().unwrap_or("").trim().to_string()
            })
            .collect())
    })
}

/// Evaluate: accuracy (candidate scoring) or F1/EM (generation).
fn evaluate<B: Backend>(
    be: &B,
    dec: &Decoder<B>,
    params: &B::Buf,
    data: &Data,
    tok: &Tok,
    batch: usize,
    max_new: usize,
) -> Result<data::Metrics> {
    let mut all = BTreeMap::new();
    match data {
        Data::Mc(ex) => {
            let scores = mc_scores(be, dec, params, ex, batch)?;
            let correct = scores
                .iter()
                .zip(ex)
                .filter(|(s, e)| crate::float::argmax(s) == e.gold)
                .count();
            let acc = correct as f64 / ex.len().max(1) as f64;
            all.insert("accuracy".to_string(), acc);
            Ok(data::Metrics {
                name: "accuracy".into(),
                value: acc,
                all,
            })
        }
        Data::Gen(ex) => {
            let prompts_: Vec<Vec<u32>> = ex.iter().map(|e| e.prompt.clone()).collect();
            let answers = greedy_answers(be, dec, params, tok, &prompts_, batch, max_new)?;
            let (mut f1, mut em) = (0.0, 0.0);
            for (answer, e) in answers.iter().zip(ex) {
                let (a, b) = generation::best_f1_em(answer, &e.answers);
                f1 += a;
                em += b;
            }
            let n = ex.len().max(1) as f64;
            all.insert("f1".to_string(), f1 / n);
            all.insert("exact_match".to_string(), em / n);
            Ok(data::Metrics {
                name: "f1".into(),
                value: f1 / n,
                all,
            })
        }
    }
}

/// One optimiser step's loss and gradient (accumulated into `grads`) on
/// the examples `idx`; returns (loss, tokens).
fn step_grad<B: Backend>(
    be: &B,
    dec: &Decoder<B>,
    params: &B::Buf,
    grads: &mut B::Buf,
    data: &Data,
    idx: &[usize],
) -> Result<Step> {
    let pad = dec.cfg.pad_token_id;
    match data {
        Data::Mc(ex) => {
            let refs: Vec<&EncMc> = idx.iter().map(|&i| &ex[i]).collect();
            let (cb, tokens, _) = mc_batch(be, dec, &refs, pad)?;
            let (loss, _) = dec.candidate_loss_and_grad(be, params, grads, &cb);
            Ok(Step {
                loss,
                tokens,
                count: idx.len(),
            })
        }
        Data::Gen(ex) => {
            let seqs: Vec<(Vec<u32>, usize)> = idx
                .iter()
                .map(|&i| {
                    let mut s = ex[i].prompt.clone();
                    s.extend_from_slice(&ex[i].target);
                    (s, ex[i].prompt.len())
                })
                .collect();
            let p = pack(&seqs, pad);
            if p.rows.is_empty() {
                return Err(Error::msg("generation batch has no answer tokens"));
            }
            let x = dec.upload(be, p.batch, p.seq, &p.ids, &p.mask)?;
            let rt = dec.row_targets(be, &x, &p.rows, &p.targets)?;
            Ok(Step {
                loss: dec.lm_loss_and_grad(be, params, grads, &x, &rt),
                tokens: p.tokens,
                count: p.rows.len(),
            })
        }
    }
}

/// A decoder on its prompt-formatted data.
struct DecoderTrainee<'a, B: Backend> {
    be: std::marker::PhantomData<B>,
    dec: &'a Decoder<B>,
    md: &'a ModelDir,
    train: &'a Data,
    dev: &'a Data,
    tok: &'a Tok,
    eval_batch: usize,
    max_new: usize,
}

impl<B: Backend> Trainee<B> for DecoderTrainee<'_, B> {
    fn evaluate(&self, be: &B, params: &B::Buf) -> Result<data::Metrics> {
        evaluate(
            be,
            self.dec,
            params,
            self.dev,
            self.tok,
            self.eval_batch,
            self.max_new,
        )
    }

    fn loss_and_grad(
        &self,
        be: &B,
        params: &B::Buf,
        grads: &mut B::Buf,
        idx: &[usize],
        _key: u64,
    ) -> Result<Step> {
        step_grad(be, self.dec, params, grads, self.train, idx)
    }

    fn train_lengths(&self) -> Vec<usize> {
        self.train.lengths()
    }

    fn weights(&self) -> &WeightStore {
        &self.md.weights
    }
}

/// Metadata of a decoder's biases.safetensors.
fn bias_metadata<B: Backend>(
    md: &ModelDir,
    dec: &Decoder<B>,
    task: &str,
) -> BTreeMap<String, String> {
    let mut m = BTreeMap::new();
    m.insert("format".into(), "beft-biases".into());
    m.insert("beft_version".into(), env!("CARGO_PKG_VERSION").into());
    m.insert("base_model".into(), md.name.clone());
    m.insert("base_model_fingerprint".into(), md.weights.fingerprint());
    m.insert("model_type".into(), md.config.model_type.clone());
    m.insert("bias_terms".into(), BiasTerm::format_set(&dec.terms));
    m.insert("task".into(), task.to_string());
    m.insert("objective".into(), "decoder".into());
    // Trained biases the base model has no slot for (zero-initialised).
    m.insert("added_biases".into(), dec.added.join(","));
    m
}

/// `beft train` for a decoder; called by [`super::run::train_on`] once it
/// has checked the arguments every model kind shares.
pub(super) fn train_on<B: Backend>(be: &B, args: &TrainArgs) -> Result<Summary> {
    let terms = BiasTerm::parse_set(&args.bias)?;
    let templates = Templates::load(args.templates.as_deref())?;
    let md = ModelDir::open(&args.model)?;
    let tok = tokenizer(&md, args.max_len)?;
    let train = load_data(
        &args.task,
        &args.data,
        Split::Train,
        args.train_size,
        args.seed,
        &templates,
        &tok,
    )?;
    let dev = load_data(
        &args.task,
        &args.data,
        Split::Dev,
        args.dev_size,
        args.seed,
        &templates,
        &tok,
    )?;
    if train.len() == 0 || dev.len() == 0 {
        return Err(Error::file(&args.data, "empty dataset"));
    }
    let dec = load_decoder(
        be,
        &md,
        terms.clone(),
        &args.offload,
        args.recompute,
        // What one forward and backward pass holds: a micro-batch.
        args.batch.div_ceil(args.grad_accum.max(1)),
        args.max_len,
    )?;
    if terms == [BiasTerm::K] && !md.config.arch.is_llama_like() {
        eprintln!("note: b_k receives an exactly-zero gradient in softmax attention without rotary embeddings; nothing will learn");
    }
    let max_new = args.max_new_tokens.max(1);

    let header = format!(
        "beft: {} ({} layers, hidden {}) on {} | task {} ({}) | {} train / {} dev | bias {} | {} trainable values{}",
        md.name,
        md.config.num_layers,
        md.config.hidden_size,
        be.name(),
        args.task,
        if is_generation(&args.task) { "generation" } else { "candidate scoring" },
        train.len(),
        dev.len(),
        BiasTerm::format_set(&terms),
        dec.trainable_params(),
        if dec.added.is_empty() { String::new() } else { format!(" ({} added biases)", dec.added.len()) }
    );
    let trainee = DecoderTrainee {
        be: std::marker::PhantomData,
        dec: &dec,
        md: &md,
        train: &train,
        dev: &dev,
        tok: &tok,
        eval_batch: args.eval_batch,
        max_new,
    };
    let mut trained = run_loop(be, args, &trainee, &dec.init, &header, "zero-shot")?;

    let values = trained.slab.params_f64(be);
    // The weights are memory-mapped: refuse a result computed from files
    // that changed during the run.
    md.weights.check_files_unchanged()?;
    let bias_path = trained.staging.dir.join("biases.safetensors");
    write_safetensors(
        &bias_path,
        &slab_tensors(&dec.layout, &values),
        &bias_metadata(&md, &dec, &args.task),
    )?;
    let metric_name = if is_generation(&args.task) {
        "f1"
    } else {
        "accuracy"
    };
    let summary = trained.summary(
        be,
        args,
        Summary {
            task: args.task.clone(),
            model: md.name.clone(),
            bias: BiasTerm::format_set(&terms),
            pooling: "none".into(),
            trainable_params: dec.trainable_params(),
            trainable_bias_params: dec.layout.bias_params(),
            offload: dec.offload().name().into(),
            metric_name: metric_name.into(),
            train_examples: train.len(),
            dev_examples: dev.len(),
            biases_file_bytes: fs::metadata(&bias_path).map(|m| m.len()).unwrap_or(0),
            ..Default::default()
        },
    );
    let zero_shot = summary.initial_dev_metric;
    let staging = &mut trained.staging;
    let mut sv = serde_json::to_value(&summary).map_err(|e| Error::msg(e.to_string()))?;
    if let Value::Object(m) = &mut sv {
        m.insert("zero_shot_dev_metric".into(), json!(zero_shot));
        m.insert("added_biases".into(), json!(dec.added.len()));
    }
    write_json(&staging.dir.join("summary.json"), &sv)?;
    write_json(
        &staging.dir.join("config.json"),
        &json!({
            "model": args.model, "task": args.task, "data": args.data, "train_size": args.train_size, "bias": args.bias,
            "epochs": args.epochs, "lr": args.lr, "batch": args.batch, "seed": args.seed, "max_len": args.max_len,
            "schedule": args.schedule, "warmup_ratio": args.warmup_ratio, "clip": args.clip,
            "weight_decay": args.weight_decay, "max_steps": args.max_steps, "templates": args.templates,
            "group_by_length": args.group_by_length,
            "grad_accum": args.grad_accum,
            "save_best": args.save_best,
            "early_stopping": args.early_stopping,
            "max_new_tokens": max_new, "objective": if is_generation(&args.task) { "teacher-forcing" } else { "candidate-scoring" },
            "beft_version": env!("CARGO_PKG_VERSION"),
        }),
    )?;
    staging.finish(&args.out, args.overwrite)?;
    Ok(summary)
}

/// Load the decoder with resident or streamed layers (`--offload`). `auto`
/// streams only when a device budget (`--max-gpu-memory` or
/// `BEFT_MAX_DEVICE_MEMORY`) is set and the planned resident peak for
/// `batch × seq` tokens does not fit it; the plan is printed when a budget
/// is set.
fn load_decoder<B: Backend>(
    be: &B,
    md: &ModelDir,
    terms: Vec<BiasTerm>,
    offload: &str,
    recompute: bool,
    batch: usize,
    seq: usize,
) -> Result<Decoder<B>> {
    let asked = Offload::parse(offload)?;
    let budget = max_device_memory()?;
    let opts = |offload| DecoderOptions {
        terms: terms.clone(),
        offload,
        recompute,
    };
    // The CPU backend has no device memory: weights are read in place.
    let Some(budget) = budget.filter(|_| be.memory().is_some()) else {
        return Decoder::load(be, md, opts(asked.unwrap_or_default()));
    };
    // Plan from the streamed form (only the embeddings and head are on the
    // device), then upload the layers if resident was chosen.
    let mut dec = Decoder::load(be, md, opts(Offload::Stream))?;
    let plan = dec.memory_plan(batch, seq);
    let mode = asked.unwrap_or_else(|| plan.choose(budget));
    let need = match mode {
        Offload::Resident => plan.resident(),
        Offload::Stream => plan.streamed(),
    };
    eprintln!(
        "memory: device budget {}; planned peak {} resident, {} streamed ({} layer weights, {} activations at {batch}x{seq}{}) -> {}",
        mib(budget),
        mib(plan.resident()),
        mib(plan.streamed()),
        mib(plan.all_layers),
        mib(plan.activations),
        if recompute { ", recompute" } else { "" },
        mode.name()
    );
    if need > budget {
        eprintln!(
            "warning: the planned peak ({}) is over the budget ({}); the run may stop with out of device memory: lower --batch or --max-len, or raise --grad-accum{}",
            mib(need),
            mib(budget),
            match (mode, recompute) {
                (Offload::Resident, _) => ", or use --offload stream",
                (Offload::Stream, false) => ", or add --recompute",
                (Offload::Stream, true) => "",
            }
        );
    }
    if mode == Offload::Resident {
        dec.make_resident(be)?;
    }
    Ok(dec)
}

/// `beft eval` for a decoder: zero-shot, or with trained biases.
pub fn eval_on<B: Backend>(be: &B, args: &EvalArgs) -> Result<EvalResult> {
    let biases = match &args.biases {
        Some(p) => Some((p.clone(), WeightStore::open_file(p)?)),
        None => None,
    };
    let meta = |k: &str| {
        biases
            .as_ref()
            .and_then(|(_, s)| s.metadata().get(k).cloned())
    };
    let templates = Templates::load(args.templates.as_deref())?;
    let md = ModelDir::open(&args.model)?;
    if let Some((path, store)) = &biases {
        md.check_biases_base(path, store)?;
    }
    let tok = tokenizer(&md, args.max_len)?;
    let dev = load_data(
        &args.task,
        &args.data,
        Split::Dev,
        args.dev_size,
        args.seed,
        &templates,
        &tok,
    )?;
    let terms = BiasTerm::trained_set(meta("bias_terms").as_deref())?;
    let dec = load_decoder(
        be,
        &md,
        terms,
        &args.offload,
        false,
        args.batch,
        args.max_len,
    )?;
    let mut init = dec.init.clone();
    if let Some((path, store)) = &biases {
        dec.layout.read_values(store, path, &mut init)?;
    }
    let slab = Slab::new(be, &init);
    let m = evaluate(
        be,
        &dec,
        &slab.params,
        &dev,
        &tok,
        args.batch,
        args.max_new_tokens.max(1),
    )?;
    Ok(EvalResult {
        metric_name: m.name,
        metric: m.value,
        examples: dev.len(),
        metrics: m.all,
        task: args.task.clone(),
        model: md.name,
        biases: args.biases.as_ref().map(|b| b.display().to_string()),
    })
}
