//! The `train` and `eval` commands as library functions: everything is
//! validated before anything is written, and a run directory appears only
//! once it is complete (it is assembled in a staging directory and renamed).

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;

use super::{
    checkpoint, evaluate, lr_at, parse_pooling, pooling_name, slab_tensors, Schedule, Slab,
};
use crate::backend::fault::{catch_device_fault, set_device_budget};
use crate::backend::{sub_seed, AdamW, Backend, Device, PoolKind};
use crate::data::{self, Encoding, Example, Split, TaskSpec, TextTokenizer};
use crate::error::{Error, Result};
use crate::float::Float;
use crate::model::config::ModelDir;
use crate::model::{BiasTerm, Encoder, EncoderOptions, Offload};
use crate::weights::{write_safetensors, WeightStore};

/// Options of `beft train` (the CLI maps its flags onto this). Saved as
/// `run_args.json` in the staging directory so that `--resume` needs nothing
/// else.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct TrainArgs {
    pub model: PathBuf,
    pub task: String,
    pub data: PathBuf,
    pub out: PathBuf,
    pub train_size: Option<usize>,
    pub bias: String,
    pub epochs: usize,
    pub lr: f64,
    pub batch: usize,
    pub eval_batch: usize,
    pub seed: u64,
    pub max_len: usize,
    pub pooling: Option<String>,
    pub schedule: Schedule,
    pub warmup_ratio: f64,
    pub clip: f64,
    pub weight_decay: f64,
    pub dropout: bool,
    pub eval_before: bool,
    pub max_steps: Option<u64>,
    pub dev_size: Option<usize>,
    pub device: String,
    /// bf16 matrix products with f32 sums (`--bf16`, PyTorch's bf16
    /// autocast numerics) on the CPU or CUDA backend.
    pub bf16: bool,
    pub progress: bool,
    pub overwrite: bool,
    /// Continue the unfinished run in `out`'s staging directory.
    pub resume: bool,
    /// Save a checkpoint every N optimiser steps (and after every epoch); 0:
    /// only after every epoch.
    pub checkpoint_every: u64,
    /// Decoder tasks: a prompt-template file replacing/extending the built-in ones.
    pub templates: Option<PathBuf>,
    /// Decoder generation tasks: most tokens generated per answer.
    pub max_new_tokens: usize,
    /// Decoder layer weights: `resident`, `stream` (uploaded layer by layer
    /// from the memory map) or `auto` (stream only when the device budget
    /// is too small for resident).
    pub offload: String,
    /// Decoders: keep only each layer's input and recompute the layer in
    /// the backward pass.
    pub recompute: bool,
    /// Device budget (`4GiB`, …): the cap on device memory, and what
    /// `--offload auto` plans against. Default: `BEFT_MAX_DEVICE_MEMORY`.
    pub max_gpu_memory: Option<String>,
    /// Batch training examples of similar length (less padding; see
    /// [`data::grouped_epoch_batches`]).
    pub group_by_length: bool,
    /// Split each batch into this many micro-batches, run one after another
    /// with their gradients summed before the optimiser step: the update of
    /// the whole batch with the activation memory of a micro-batch.
    pub grad_accum: usize,
    /// Save the trainable values of the epoch with the best dev metric
    /// (the first, on a tie) instead of the last epoch's.
    pub save_best: bool,
    /// Stop once the dev metric has not improved for this many epochs
    /// (Hugging Face's `early_stopping_patience`).
    pub early_stopping: Option<usize>,
}

/// The training settings of an unfinished run, in its staging directory.
pub const RUN_ARGS: &str = "run_args.json";

impl Default for TrainArgs {
    fn default() -> Self {
        TrainArgs {
            model: PathBuf::new(),
            task: "sst2".into(),
            data: PathBuf::new(),
            out: PathBuf::from("runs/run"),
            train_size: None,
            bias: "v".into(),
            epochs: 4,
            lr: 4e-4,
            batch: 16,
            eval_batch: 64,
            seed: 0,
            max_len: 128,
            pooling: None,
            schedule: Schedule::Constant,
            warmup_ratio: 0.0,
            clip: 1.0,
            weight_decay: 0.0,
            dropout: true,
            eval_before: true,
            max_steps: None,
            dev_size: None,
            device: "cpu".into(),
            bf16: false,
            progress: true,
            overwrite: false,
            resume: false,
            checkpoint_every: 50,
            templates: None,
            max_new_tokens: 32,
            offload: "auto".into(),
            recompute: false,
            max_gpu_memory: None,
            group_by_length: false,
            grad_accum: 1,
            save_best: false,
            early_stopping: None,
        }
    }
}

/// `beft train --resume RUN_DIR`: continue an unfinished run (killed,
/// interrupted, or stopped by a fault) from its last checkpoint, with the
/// settings it was started with. The result is bit-identical to an
/// uninterrupted run on the same machine.
pub fn resume(out: &Path) -> Result<Summary> {
    let staging = checkpoint::staging_dir(out);
    let path = staging.join(RUN_ARGS);
    if !path.is_file() {
        if out.join("summary.json").is_file() {
            return Err(Error::file(
                out,
                "is a finished run; there is nothing to resume",
            ));
        }
        return Err(Error::file(
            out,
            format!("has no unfinished run to resume (no {})", path.display()),
        ));
    }
    let s = fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let mut args: TrainArgs = serde_json::from_str(&s).map_err(|e| Error::file(&path, e))?;
    args.resume = true;
    args.out = out.to_path_buf();
    train(&args)
}

/// What a finished run reports (also written as `summary.json`).
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Summary {
    pub task: String,
    pub model: String,
    pub bias: String,
    pub pooling: String,
    pub trainable_params: usize,
    pub trainable_bias_params: usize,
    pub initial_dev_metric: Option<f64>,
    pub final_dev_metric: f64,
    pub best_dev_metric: f64,
    pub best_epoch: usize,
    /// The epoch whose trainable values the biases file holds (the last
    /// one, or with `--save-best` the best one).
    pub saved_epoch: usize,
    /// Whether `--early-stopping` ended the run before its last epoch.
    pub stopped_early: bool,
    pub metric_name: String,
    pub train_examples: usize,
    pub dev_examples: usize,
    pub epochs: usize,
    pub steps: u64,
    pub train_tokens: u64,
    pub train_tokens_per_s: f64,
    /// The share of an epoch's batch positions that are padding (by
    /// example length; `--group-by-length` lowers it).
    pub train_padding: f64,
    pub step_seconds_median: f64,
    pub train_seconds: f64,
    pub peak_rss_bytes: u64,
    pub biases_file_bytes: u64,
    pub device: String,
    pub seed: u64,
    pub lr: f64,
    pub batch: usize,
    /// `resident` or `stream` (decoder layer weights).
    pub offload: String,
    /// Peak device memory of the run, where the backend counts it.
    pub peak_device_bytes: Option<u64>,
}

/// The error for a device this build was compiled without.
pub(crate) fn device_unavailable(dev: Device) -> Error {
    let (feature, what) = match dev {
        Device::Cuda(_) => ("cuda", "CUDA"),
        _ => ("wgpu", "wgpu"),
    };
    Error::msg(format!(
        "--device {dev}: this beft was built without {what} (rebuild with --features {feature}); use --device cpu"
    ))
}

/// The error for `--bf16` on a backend without bf16 products.
pub(crate) fn no_bf16(dev: Device) -> Error {
    let what = match dev {
        Device::CpuRef => "is the f32 reference",
        _ => "runs f32 products only",
    };
    Error::msg(format!(
        "--bf16: --device {dev} {what}; bf16 products run on --device cpu (AVX-512 BF16) or cuda"
    ))
}

/// Run `f` with the backend that `--device` names, with bf16 products
/// where `bf16` (an error on a backend without them).
macro_rules! with_backend {
    ($spec:expr, $bf16:expr, |$be:ident| $body:expr) => {{
        let dev = $crate::backend::Device::parse($spec)?;
        match dev {
            $crate::backend::Device::Cpu => {
                let $be = $crate::backend::fast::FastCpu::for_run($bf16)?;
                $body
            }
            $crate::backend::Device::CpuRef if $bf16 => Err($crate::train::run::no_bf16(dev)),
            $crate::backend::Device::CpuRef => {
                let $be = $crate::backend::cpu::CpuBackend::<f32>::new();
                $body
            }
            #[cfg(feature = "cuda")]
            $crate::backend::Device::Cuda(ordinal) => {
                let $be = $crate::backend::cuda::CudaBackend::for_run(ordinal, $bf16)?;
                $body
            }
            #[cfg(feature = "wgpu")]
            $crate::backend::Device::Wgpu(_) if $bf16 => Err($crate::train::run::no_bf16(dev)),
            #[cfg(feature = "wgpu")]
            $crate::backend::Device::Wgpu(index) => {
                let $be = $crate::backend::wgpu::WgpuBackend::new(index)?;
                $body
            }
            #[allow(unreachable_patterns)]
            other => Err($crate::train::run::device_unavailable(other)),
        }
    }};
}
pub(crate) use with_backend;

/// Peak resident set size of this process (Linux), in bytes.
pub fn peak_rss_bytes() -> u64 {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}

pub(crate) fn median(v: &mut [f64]) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        0.5 * (v[n / 2 - 1] + v[n / 2])
    }
}

/// Everything a run needs, loaded and checked before anything is written.
struct Prepared {
    md: ModelDir,
    task: TaskSpec,
    pad_id: u32,
    train: Vec<Example>,
    train_enc: Vec<Encoding>,
    dev: Vec<Example>,
    dev_enc: Vec<Encoding>,
    pooling: PoolKind,
    num_labels: usize,
}

fn prepare(
    model: &Path,
    task_name: &str,
    data_dir: &Path,
    train_size: Option<usize>,
    dev_size: Option<usize>,
    seed: u64,
    max_len: usize,
    pooling: Option<&str>,
    need_train: bool,
) -> Result<Prepared> {
    let md = ModelDir::open(model)?;
    let task = data::task(task_name)?;
    // RoBERTa's positions start after the padding index.
    let offset = if md.config.arch == crate::model::config::Arch::Roberta {
        md.config.pad_token_id as usize + 1
    } else {
        0
    };
    let max_pos = md.config.max_position_embeddings.saturating_sub(offset);
    // Deliberate: inputs are truncated to the model's positions at most.
    let max_len = if max_len > max_pos {
        eprintln!("note: --max-len {max_len} is longer than the model's {max_pos} positions ({}); truncating inputs to {max_pos} tokens", md.dir.join("config.json").display());
        max_pos
    } else {
        max_len
    };
    let tok_path = md
        .tokenizer
        .clone()
        .ok_or_else(|| Error::file(&md.dir, "no tokenizer.json in the model directory"))?;
    let tok = TextTokenizer::from_file(&tok_path, max_len)?;
    let pad_id = tok.pad_id().unwrap_or(md.config.pad_token_id);
    if tok.vocab_size() > md.config.vocab_size {
        return Err(Error::file(
            &tok_path,
            format!("tokenizer has {} tokens but the model's vocab_size is {} (tokenizer and model do not match)", tok.vocab_size(), md.config.vocab_size),
        ));
    }
    // The generic jsonl task learns its label set from the training data.
    let (task, train) = if need_train {
        let all = data::load_split(&task, data_dir, Split::Train)?;
        let task = task.resolve(&all)?;
        (task, data::sample_subset(&all, train_size, seed))
    } else {
        (task, Vec::new())
    };
    let dev_all = data::load_split(&task, data_dir, Split::Dev)?;
    let task = if need_train {
        task
    } else {
        task.resolve(&dev_all)?
    };
    let dev = data::sample_subset(&dev_all, dev_size, seed);
    let pooling = match pooling {
        Some(p) => parse_pooling(p)?,
        None => md.default_pooling.unwrap_or(PoolKind::Cls),
    };
    let num_labels = task.num_labels;
    let train_enc = tok.encode_all(&train)?;
    let dev_enc = tok.encode_all(&dev)?;
    Ok(Prepared {
        md,
        task,
        pad_id,
        train,
        train_enc,
        dev,
        dev_enc,
        pooling,
        num_labels,
    })
}

/// A staging directory beside the run directory, renamed into place when the
/// run is complete and removed if it fails.
pub(super) struct Staging {
    pub(super) dir: PathBuf,
    pub(super) done: bool,
    /// Holds a resumable state: never removed on failure.
    pub(super) keep: bool,
}

impl Staging {
    /// Move the finished run into place at `out`: an existing `out` is
    /// replaced only with `--overwrite` (or when it is an empty directory).
    pub(super) fn publish(&mut self, out: &Path, overwrite: bool) -> Result<()> {
        if out.exists() {
            if overwrite {
                fs::remove_dir_all(out).map_err(|e| Error::io(out, e))?;
            } else if fs::read_dir(out)
                .map(|mut d| d.next().is_some())
                .unwrap_or(true)
            {
                return Err(Error::file(
                    out,
                    "exists and is not empty; choose another --out or pass --overwrite",
                ));
            } else {
                fs::remove_dir(out).map_err(|e| Error::io(out, e))?;
            }
        }
        fs::rename(&self.dir, out).map_err(|e| Error::io(out, e))?;
        self.done = true;
        Ok(())
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.done && !self.keep {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

pub(super) fn write_json(path: &Path, v: &serde_json::Value) -> Result<()> {
    let s = serde_json::to_string_pretty(v).map_err(|e| Error::file(path, e))?;
    fs::write(path, s + "\n").map_err(|e| Error::io(path, e))
}

impl Staging {
    /// The run is complete: drop its checkpoint and move it into place.
    pub(super) fn finish(&mut self, out: &Path, overwrite: bool) -> Result<()> {
        let _ = fs::remove_file(self.dir.join(checkpoint::CHECKPOINT));
        self.publish(out, overwrite)
    }
}

/// What the shared training loop needs from a model kind (an encoder with a
/// task head, or a decoder scoring candidates / generating).
pub(super) trait Trainee<B: Backend> {
    /// Dev-set metrics with the trainable values `params`.
    fn evaluate(&self, be: &B, params: &B::Buf) -> Result<data::Metrics>;
    /// The loss of the training examples `idx` (`key`: the optimiser step,
    /// or another value per micro-batch, for dropout masks), its gradient
    /// accumulated into `grads`; returns (loss, tokens, the count the loss
    /// is a mean over: examples, or target tokens for a token-level loss).
    fn loss_and_grad(
        &self,
        be: &B,
        params: &B::Buf,
        grads: &mut B::Buf,
        idx: &[usize],
        key: u64,
    ) -> Result<Step>;
    /// The token count of each training example (what `--group-by-length`
    /// groups on; its length is the number of training examples).
    fn train_lengths(&self) -> Vec<usize>;
    /// The memory-mapped model files (re-checked before each checkpoint).
    fn weights(&self) -> &WeightStore;
}

/// What one forward and backward pass over some training examples gave.
pub(super) struct Step {
    /// The mean loss.
    pub(super) loss: f64,
    /// Tokens in the batch (padding excluded).
    pub(super) tokens: usize,
    /// What the loss is a mean over (examples, or target tokens).
    pub(super) count: usize,
}

/// The micro-batches of a batch: `parts` (at most one per example) runs of
/// consecutive examples, sizes as equal as can be.
pub(super) fn micro_batches(idx: &[usize], parts: usize) -> Vec<&[usize]> {
    let parts = parts.clamp(1, idx.len().max(1));
    let (base, extra) = (idx.len() / parts, idx.len() % parts);
    let mut out = Vec::with_capacity(parts);
    let mut at = 0;
    for i in 0..parts {
        let len = base + usize::from(i < extra);
        out.push(&idx[at..at + len]);
        at += len;
    }
    out
}

/// The dropout key of micro-batch `j` of optimiser step `step`: the step
/// itself for the first (so that `--grad-accum 1` is the plain step), a
/// distinct value for the others.
fn micro_key(step: u64, j: usize) -> u64 {
    step ^ ((j as u64) << 40)
}

/// Whether `--early-stopping` ends the run after the epochs run so far:
/// the best dev metric is that many epochs old.
fn stops_early(args: &TrainArgs, st: &checkpoint::LoopState) -> bool {
    match (args.early_stopping, st.best) {
        (Some(patience), Some((_, at))) => st.epochs_run >= at + patience,
        _ => false,
    }
}

/// A finished training loop: the trained slab, the loop's counters, and the
/// staging directory holding the logs (not yet published).
pub(super) struct Trained<B: Backend> {
    /// The trained slab (with `--save-best`, the best epoch's values).
    pub(super) slab: Slab<B>,
    pub(super) st: checkpoint::LoopState,
    pub(super) staging: Staging,
    /// The share of an epoch's batch positions that are padding.
    pub(super) train_padding: f64,
}

impl<B: Backend> Trained<B> {
    /// The run's summary: `what` (the model-specific fields: task, model,
    /// terms, sizes, metric name, biases file) completed from the loop's
    /// counters and the run's settings.
    pub(super) fn summary(&self, be: &B, args: &TrainArgs, what: Summary) -> Summary {
        let st = &self.st;
        let best = st.best.unwrap_or((f64::NAN, 0));
        Summary {
            initial_dev_metric: st.initial,
            final_dev_metric: st.last.unwrap_or(f64::NAN),
            best_dev_metric: best.0,
            best_epoch: best.1,
            stopped_early: stops_early(args, st) && st.epochs_run < args.epochs,
            saved_epoch: if args.save_best && st.best.is_some() {
                best.1
            } else {
                st.epochs_run
            },
            epochs: st.epochs_run,
            steps: st.step,
            train_tokens: st.train_tokens,
            train_tokens_per_s: st.train_tokens as f64 / st.train_time.max(1e-9),
            train_padding: self.train_padding,
            step_seconds_median: median(&mut st.step_secs.clone()),
            train_seconds: st.train_time,
            peak_rss_bytes: peak_rss_bytes(),
            peak_device_bytes: be.memory().map(|m| m.peak),
            device: be.name(),
            seed: args.seed,
            lr: args.lr,
            batch: args.batch,
            ..what
        }
    }
}

/// The resumable training loop every model kind shares: creates (or, with
/// `--resume`, reopens) the staging directory, evaluates before training,
/// runs the epochs with checkpoints every `--checkpoint-every` steps and
/// after every epoch, and stops cleanly — keeping the last good checkpoint
/// — on a non-finite loss, a full disk, changed model files or Ctrl-C.
/// `init` is the slab's initial values; `header` is printed once;
/// `before` names the evaluation before training ("before training",
/// "zero-shot").
pub(super) fn run_loop<B: Backend>(
    be: &B,
    args: &TrainArgs,
    t: &dyn Trainee<B>,
    init: &[f64],
    header: &str,
    before: &str,
) -> Result<Trained<B>> {
    // Everything is valid: create (or, resuming, reopen) the staging
    // directory beside the run directory.
    let out = &args.out;
    let parent = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    let mut staging = Staging {
        dir: checkpoint::staging_dir(out),
        done: false,
        keep: args.resume,
    };
    let ckpt_path = staging.dir.join(checkpoint::CHECKPOINT);
    if !args.resume {
        if staging.dir.exists() {
            if !args.overwrite {
                staging.keep = true;
                return Err(Error::file(
                    &staging.dir,
                    format!("holds an unfinished run of {}: resume it with `beft train --resume {}`, or pass --overwrite to start again", out.display(), out.display()),
                ));
            }
            fs::remove_dir_all(&staging.dir).map_err(|e| Error::io(&staging.dir, e))?;
        }
        fs::create_dir_all(&staging.dir).map_err(|e| Error::io(&staging.dir, e))?;
        let run_args = serde_json::to_value(args).map_err(|e| Error::msg(e.to_string()))?;
        write_json(&staging.dir.join(RUN_ARGS), &run_args)?;
    }
    let mut slab = Slab::new(be, init);
    // With --save-best: the values of the best epoch so far.
    let mut best_params: Option<Vec<f32>> = None;
    // Slab buffers to and from the host (checkpoints hold f32).
    let to_host =
        |b: &B::Buf| -> Vec<f32> { be.download(b).into_iter().map(|x| x.to_f32()).collect() };
    let to_device = |x: Vec<f32>| -> B::Buf {
        let v: Vec<B::T> = x.into_iter().map(B::T::from_f32).collect();
        be.upload(&v)
    };
    let mut st = checkpoint::LoopState {
        epoch: 1,
        ..Default::default()
    };
    if args.resume && ckpt_path.is_file() {
        let (params, m, v, state, best) = checkpoint::load(&ckpt_path, slab.len)?;
        best_params = best;
        slab.params = to_device(params);
        slab.m = to_device(m);
        slab.v = to_device(v);
        st = state;
        eprintln!(
            "resuming {} at step {} (epoch {}, batch {})",
            out.display(),
            st.step,
            st.epoch,
            st.batch
        );
    }
    let metrics_path = staging.dir.join("metrics.jsonl");
    let steps_path = staging.dir.join("steps.jsonl");
    // Logs are cut back to the checkpoint (a resumed run rewrites what came after it).
    let open_log = |path: &Path, keep: u64| -> Result<fs::File> {
        let f = fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(false)
            .open(path)
            .map_err(|e| Error::io(path, e))?;
        f.set_len(keep).map_err(|e| Error::io(path, e))?;
        let mut f = f;
        std::io::Seek::seek(&mut f, std::io::SeekFrom::End(0)).map_err(|e| Error::io(path, e))?;
        Ok(f)
    };
    let mut metrics_file = open_log(&metrics_path, st.metrics_bytes)?;
    let mut steps_file = std::io::BufWriter::new(open_log(&steps_path, st.steps_bytes)?);

    let train_lengths = t.train_lengths();
    let n_train = train_lengths.len();
    // Either way an epoch has ceil(n / batch) batches.
    let epoch_batches = |epoch: u64| {
        if args.group_by_length {
            data::grouped_epoch_batches(&train_lengths, args.batch, args.seed, epoch)
        } else {
            data::epoch_batches(n_train, args.batch, args.seed, epoch, true)
        }
    };
    let steps_per_epoch = n_train.div_ceil(args.batch) as u64;
    let total_steps = args
        .max_steps
        .map(|m| m.min(steps_per_epoch * args.epochs as u64))
        .unwrap_or(steps_per_epoch * args.epochs as u64);
    let warmup = (args.warmup_ratio * total_steps as f64).round() as u64;

    eprintln!("{header}");
    // Padding: the share of an epoch's batch positions that are not real
    // tokens (by example length), and a hint when grouping would cut it.
    let padding = |batches: &[Vec<usize>]| {
        let (padded, real) = data::padded_and_real(&train_lengths, batches);
        (padded - real) as f64 / padded.max(1) as f64
    };
    let train_padding = padding(&epoch_batches(1));
    if !args.group_by_length && !args.resume && train_padding > 0.25 {
        let grouped = padding(&data::grouped_epoch_batches(
            &train_lengths,
            args.batch,
            args.seed,
            1,
        ));
        if grouped < 0.5 * train_padding {
            eprintln!(
                "note: {:.0} % of the training batches' positions are padding; --group-by-length would cut that to {:.0} % (faster steps, other batches)",
                100.0 * train_padding,
                100.0 * grouped
            );
        }
    }

    let log_eval = |epoch: usize,
                    step: u64,
                    m: &data::Metrics,
                    train_loss: Option<f64>,
                    f: &mut fs::File|
     -> Result<()> {
        let line = json!({"epoch": epoch, "step": step, "metric_name": m.name, "metric": m.value, "metrics": m.all, "train_loss": train_loss, "split": "dev"});
        writeln!(f, "{line}").map_err(|e| Error::io(&metrics_path, e))
    };
    let resume_hint = format!("resume with `beft train --resume {}`", out.display());
    // A failed write (e.g. a full disk) once a checkpoint exists: say that
    // the last good state is kept and how to go on.
    let kept = |e: Error| -> Error {
        if ckpt_path.is_file() {
            Error::msg(format!("{e}; the last checkpoint is kept in {}: free space (or fix the problem), then {resume_hint}", staging.dir.display()))
        } else {
            e
        }
    };
    // A device fault (out of device memory, device lost): say where, and
    // what is kept.
    let fault = |e: Error, during: String, good: u64| -> Error {
        if ckpt_path.is_file() {
            Error::msg(format!(
                "{e} ({during}). The last good state (step {good}) is kept in {}: {resume_hint} once the device has room, or start again with other settings and --overwrite",
                staging.dir.display()
            ))
        } else {
            Error::msg(format!("{e} ({during})"))
        }
    };
    // Save the state atomically (the logs are flushed first so that their
    // recorded lengths are what is on disk). The model files are checked
    // first: a file rewritten under the memory map would have fed mixed
    // weights to the steps since the last checkpoint, so that state is not
    // saved.
    let save = |slab: &Slab<B>,
                best: &Option<Vec<f32>>,
                st: &mut checkpoint::LoopState,
                steps_file: &mut std::io::BufWriter<fs::File>,
                metrics_file: &mut fs::File|
     -> Result<()> {
        t.weights().check_files_unchanged().map_err(|e| {
            if !ckpt_path.is_file() {
                return e;
            }
            Error::msg(format!(
                "{e}. Stopped at step {} without saving it: the last checkpoint in {} predates the change; restore the model files, then {resume_hint} (or start again with --overwrite)",
                st.step,
                staging.dir.display()
            ))
        })?;
        steps_file
            .flush()
            .map_err(|e| kept(Error::io(&steps_path, e)))?;
        steps_file
            .get_ref()
            .sync_data()
            .map_err(|e| kept(Error::io(&steps_path, e)))?;
        metrics_file
            .sync_data()
            .map_err(|e| kept(Error::io(&metrics_path, e)))?;
        st.steps_bytes = fs::metadata(&steps_path)
            .map_err(|e| Error::io(&steps_path, e))?
            .len();
        st.metrics_bytes = fs::metadata(&metrics_path)
            .map_err(|e| Error::io(&metrics_path, e))?
            .len();
        let (p, m, v) = (to_host(&slab.params), to_host(&slab.m), to_host(&slab.v));
        checkpoint::save(&ckpt_path, &p, &m, &v, best.as_deref(), st).map_err(kept)
    };

    // A checkpoint of the state as it is now.
    macro_rules! save_now {
        () => {
            save(
                &slab,
                &best_params,
                &mut st,
                &mut steps_file,
                &mut metrics_file,
            )
        };
    }

    if args.eval_before && st.step == 0 && st.metrics_bytes == 0 {
        let m = catch_device_fault(|| t.evaluate(be, &slab.params))
            .map_err(|e| fault(e, "evaluating before training".into(), 0))??;
        eprintln!("epoch 0 ({before}): dev {} = {:.4}", m.name, m.value);
        log_eval(0, 0, &m, None, &mut metrics_file)?;
        st.initial = Some(m.value);
    }
    save_now!()?;
    // From here on the staging directory holds a resumable state: keep it
    // if anything fails.
    staging.keep = true;

    let pb = if args.progress {
        ProgressBar::new(total_steps)
    } else {
        ProgressBar::hidden()
    };
    pb.set_style(
        ProgressStyle::with_template(
            "{spinner} epoch {prefix} [{bar:30}] {pos}/{len} {msg} eta {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    pb.set_position(st.step);
    // A micro-batch's gradient, with --grad-accum.
    let mut scratch: Option<B::Buf> = None;
    'epochs: while st.epoch <= args.epochs {
        let epoch = st.epoch;
        pb.set_prefix(format!("{epoch}/{}", args.epochs));
        if !st.epoch_evaluated {
            for (bi, idx) in epoch_batches(epoch as u64).into_iter().enumerate() {
                if bi < st.batch {
                    continue;
                }
                if st.step >= total_steps {
                    break;
                }
                let step = st.step + 1;
                let t0 = Instant::now();
                let (loss, tokens, gnorm) = catch_device_fault(|| -> Result<_> {
                    be.fill(&mut slab.grads, 0.0);
                    let micro = micro_batches(&idx, args.grad_accum);
                    // One part is the plain step, without the rescaling
                    // (so that runs without --grad-accum are unchanged).
                    let (loss, tokens) = if micro.len() == 1 {
                        let r = t.loss_and_grad(be, &slab.params, &mut slab.grads, &idx, step)?;
                        (r.loss, r.tokens)
                    } else {
                        // Each micro-batch's mean gradient, weighted by
                        // what its mean is over, summed, then divided by
                        // the batch's total: the whole batch's mean.
                        let part = scratch.get_or_insert_with(|| be.zeros(slab.len));
                        let (mut loss, mut tokens, mut count) = (0.0, 0, 0);
                        for (j, ids) in micro.into_iter().enumerate() {
                            be.fill(part, 0.0);
                            let r =
                                t.loss_and_grad(be, &slab.params, part, ids, micro_key(step, j))?;
                            be.scale(part, r.count as f64, slab.len);
                            be.add(&mut slab.grads, part, slab.len);
                            loss += r.loss * r.count as f64;
                            tokens += r.tokens;
                            count += r.count;
                        }
                        let count = count.max(1) as f64;
                        be.scale(&mut slab.grads, 1.0 / count, slab.len);
                        (loss / count, tokens)
                    };
                    Ok((loss, tokens, slab.clip(be, args.clip)))
                })
                .map_err(|e| fault(e, format!("at step {step}, epoch {epoch}"), st.step))??;
                if !loss.is_finite() || !gnorm.is_finite() {
                    let what = if loss.is_finite() {
                        format!("non-finite gradient norm {gnorm}")
                    } else {
                        format!("non-finite loss {loss}")
                    };
                    return Err(Error::msg(format!(
                        "{what} at step {step} (epoch {epoch}, batch {} of the epoch, training examples {:?}); stopped before applying it. The last good state (step {}) is kept in {}: try a lower --lr, then {resume_hint} or start again with --overwrite",
                        bi + 1,
                        idx,
                        st.step,
                        staging.dir.display()
                    )));
                }
                let lr = lr_at(args.schedule, args.lr, step, total_steps, warmup);
                catch_device_fault(|| {
                    slab.step(
                        be,
                        AdamW {
                            weight_decay: args.weight_decay,
                            ..AdamW::with_defaults(lr, step)
                        },
                    )
                })
                .map_err(|e| fault(e, format!("in the optimiser step {step}"), st.step))?;
                let dt = t0.elapsed().as_secs_f64();
                st.step = step;
                st.batch = bi + 1;
                st.step_secs.push(dt);
                st.train_time += dt;
                st.train_tokens += tokens as u64;
                st.loss_sum += loss;
                st.loss_n += 1;
                let line = json!({"step": step, "epoch": epoch, "loss": loss, "lr": lr, "grad_norm": gnorm, "tokens": tokens, "seconds": dt});
                writeln!(steps_file, "{line}").map_err(|e| kept(Error::io(&steps_path, e)))?;
                pb.set_message(format!(
                    "loss {:.4} | {:.0} tok/s",
                    st.loss_sum / st.loss_n as f64,
                    st.train_tokens as f64 / st.train_time.max(1e-9)
                ));
                pb.inc(1);
                if args.checkpoint_every > 0 && step.is_multiple_of(args.checkpoint_every) {
                    save_now!()?;
                }
                if checkpoint::interrupted() {
                    save_now!()?;
                    pb.finish_and_clear();
                    return Err(Error::msg(format!(
                        "interrupted at step {step}: state saved in {}; {resume_hint}",
                        staging.dir.display()
                    )));
                }
            }
            st.epochs_run = epoch;
            let m = catch_device_fault(|| t.evaluate(be, &slab.params))
                .map_err(|e| fault(e, format!("evaluating after epoch {epoch}"), st.step))??;
            let tl = if st.loss_n > 0 {
                Some(st.loss_sum / st.loss_n as f64)
            } else {
                None
            };
            pb.suspend(|| {
                eprintln!(
                    "epoch {epoch}: train loss {:.4} | dev {} = {:.4}",
                    tl.unwrap_or(f64::NAN),
                    m.name,
                    m.value
                )
            });
            log_eval(epoch, st.step, &m, tl, &mut metrics_file).map_err(kept)?;
            if st.best.map(|b| m.value > b.0).unwrap_or(true) {
                st.best = Some((m.value, epoch));
                if args.save_best {
                    best_params = Some(to_host(&slab.params));
                }
            }
            st.last = Some(m.value);
        }
        // The next epoch starts afresh.
        st.epoch_evaluated = false;
        st.epoch = epoch + 1;
        st.batch = 0;
        st.loss_sum = 0.0;
        st.loss_n = 0;
        let early = stops_early(args, &st);
        let finished = st.step >= total_steps || early;
        if early && st.step < total_steps {
            let (b, at) = st.best.unwrap_or_default();
            pb.suspend(|| {
                eprintln!(
                    "early stopping: no better dev metric for {} epochs (best {b:.4} at epoch {at})",
                    epoch - at
                )
            });
        }
        if finished {
            st.epoch = epoch;
            st.epoch_evaluated = true;
        }
        save_now!()?;
        if finished {
            break 'epochs;
        }
    }
    pb.finish_and_clear();
    steps_file.flush().map_err(|e| Error::io(&steps_path, e))?;
    if let Some(best) = best_params.filter(|_| args.save_best) {
        slab.params = to_device(best);
    }
    Ok(Trained {
        slab,
        st,
        staging,
        train_padding,
    })
}

/// An encoder with its task head, on prepared data.
struct EncoderTrainee<'a, B: Backend> {
    enc: &'a Encoder<B>,
    p: &'a Prepared,
    args: &'a TrainArgs,
}

impl<B: Backend> Trainee<B> for EncoderTrainee<'_, B> {
    fn evaluate(&self, be: &B, params: &B::Buf) -> Result<data::Metrics> {
        let p = self.p;
        evaluate(
            be,
            self.enc,
            params,
            &p.task,
            &p.dev_enc,
            &p.dev,
            p.pad_id,
            self.args.eval_batch,
        )
    }

    fn loss_and_grad(
        &self,
        be: &B,
        params: &B::Buf,
        grads: &mut B::Buf,
        idx: &[usize],
        key: u64,
    ) -> Result<Step> {
        let p = self.p;
        let refs: Vec<&Encoding> = idx.iter().map(|&i| &p.train_enc[i]).collect();
        let labels: Vec<f32> = idx.iter().map(|&i| p.train[i].label).collect();
        let hb = data::make_batch(&refs, &labels, p.pad_id);
        let db = self.enc.upload_batch(be, &hb)?;
        let seed = self.args.dropout.then(|| sub_seed(self.args.seed, key));
        let (loss, _) = self.enc.loss_and_grad(be, params, grads, &db, seed);
        Ok(Step {
            loss,
            tokens: hb.tokens,
            count: idx.len(),
        })
    }

    fn train_lengths(&self) -> Vec<usize> {
        self.p.train_enc.iter().map(Encoding::len).collect()
    }

    fn weights(&self) -> &WeightStore {
        &self.p.md.weights
    }
}

/// `beft train`.
pub fn train(args: &TrainArgs) -> Result<Summary> {
    set_device_budget(args.max_gpu_memory.as_deref())?;
    with_backend!(&args.device, args.bf16, |be| train_on(&be, args))
}

/// `beft train` on a given backend.
pub fn train_on<B: Backend>(be: &B, args: &TrainArgs) -> Result<Summary> {
    if args.batch == 0 || args.epochs == 0 {
        return Err(Error::msg("--batch and --epochs must be at least 1"));
    }
    if args.early_stopping == Some(0) {
        return Err(Error::msg(
            "--early-stopping must be at least 1 (epochs without a better dev metric)",
        ));
    }
    if args.grad_accum == 0 || args.grad_accum > args.batch {
        return Err(Error::msg(format!(
            "--grad-accum must be between 1 and --batch ({}), got {}",
            args.batch, args.grad_accum
        )));
    }
    if !(args.lr > 0.0 && args.lr.is_finite()) {
        return Err(Error::msg(format!(
            "--lr must be a positive number, got {}",
            args.lr
        )));
    }
    let terms = BiasTerm::parse_set(&args.bias)?;
    // Refuse to overwrite a finished run, before doing any work.
    if args.out.join("summary.json").exists() && !args.overwrite {
        return Err(Error::file(
            &args.out,
            "already holds a finished run (summary.json); choose another --out or pass --overwrite",
        ));
    }
    if super::lm::is_decoder_model(&args.model) {
        return super::lm::train_on(be, args);
    }
    encoder_offload(&args.offload, args.recompute)?;
    let p = prepare(
        &args.model,
        &args.task,
        &args.data,
        args.train_size,
        args.dev_size,
        args.seed,
        args.max_len,
        args.pooling.as_deref(),
        true,
    )?;
    let enc = Encoder::load(
        be,
        &p.md,
        EncoderOptions {
            pooling: p.pooling,
            num_labels: p.num_labels,
            terms: terms.clone(),
            seed: args.seed,
        },
    )?;
    if terms == [BiasTerm::K] {
        eprintln!(
            "note: b_k receives an exactly-zero gradient in softmax attention (adding a constant to every key of a query shifts all its scores alike); \
             with --bias k only the task head and pooler bias will learn"
        );
    } else if terms.contains(&BiasTerm::K) {
        eprintln!(
            "note: b_k receives an exactly-zero gradient in softmax attention; it will not change"
        );
    }

    let header = format!(
        "beft: {} ({} layers, hidden {}) on {} | task {} | {} train / {} dev | bias {} | pooling {} | {} trainable values ({} in biases) | {}",
        p.md.name,
        p.md.config.num_layers,
        p.md.config.hidden_size,
        be.name(),
        p.task.name,
        p.train.len(),
        p.dev.len(),
        BiasTerm::format_set(&terms),
        pooling_name(p.pooling),
        enc.trainable_params(),
        enc.layout.bias_params(),
        if enc.head_from_checkpoint { "head from checkpoint" } else { "new head" }
    );
    let trainee = EncoderTrainee {
        enc: &enc,
        p: &p,
        args,
    };
    let mut trained = run_loop(be, args, &trainee, &enc.init, &header, "before training")?;

    // The trained biases (and head), with what they belong to.
    let values = trained.slab.params_f64(be);
    let bias_path = trained.staging.dir.join("biases.safetensors");
    let meta = bias_metadata(&p.md, &enc, &terms, &p.task, p.pooling);
    write_safetensors(&bias_path, &slab_tensors(&enc.layout, &values), &meta)?;
    let summary = trained.summary(
        be,
        args,
        Summary {
            task: p.task.name.clone(),
            model: p.md.name.clone(),
            bias: BiasTerm::format_set(&terms),
            pooling: pooling_name(p.pooling).into(),
            trainable_params: enc.trainable_params(),
            trainable_bias_params: enc.layout.bias_params(),
            offload: "resident".into(),
            metric_name: p.task.metric_name.clone(),
            train_examples: p.train.len(),
            dev_examples: p.dev.len(),
            biases_file_bytes: fs::metadata(&bias_path).map(|m| m.len()).unwrap_or(0),
            ..Default::default()
        },
    );
    let staging = &mut trained.staging;
    let sv = serde_json::to_value(&summary).map_err(|e| Error::msg(e.to_string()))?;
    write_json(&staging.dir.join("summary.json"), &sv)?;
    write_json(
        &staging.dir.join("config.json"),
        &json!({
            "model": args.model, "task": args.task, "data": args.data, "train_size": args.train_size, "bias": args.bias,
            "epochs": args.epochs, "lr": args.lr, "batch": args.batch, "seed": args.seed, "max_len": args.max_len,
            "pooling": pooling_name(p.pooling), "schedule": args.schedule, "warmup_ratio": args.warmup_ratio,
            "clip": args.clip, "weight_decay": args.weight_decay, "dropout": args.dropout, "max_steps": args.max_steps,
            "group_by_length": args.group_by_length,
            "grad_accum": args.grad_accum,
            "save_best": args.save_best,
            "early_stopping": args.early_stopping,
            "beft_version": env!("CARGO_PKG_VERSION"),
        }),
    )?;
    staging.finish(&args.out, args.overwrite)?;
    Ok(summary)
}

fn bias_metadata<B: Backend>(
    md: &ModelDir,
    enc: &Encoder<B>,
    terms: &[BiasTerm],
    task: &TaskSpec,
    pooling: PoolKind,
) -> BTreeMap<String, String> {
    let mut m = BTreeMap::new();
    m.insert("format".into(), "beft-biases".into());
    m.insert("beft_version".into(), env!("CARGO_PKG_VERSION").into());
    m.insert("base_model".into(), md.name.clone());
    m.insert("base_model_fingerprint".into(), md.weights.fingerprint());
    m.insert("model_type".into(), md.config.model_type.clone());
    m.insert("bias_terms".into(), BiasTerm::format_set(terms));
    m.insert("pooling".into(), pooling_name(pooling).into());
    m.insert("num_labels".into(), enc.opts.num_labels.to_string());
    m.insert("task".into(), task.name.clone());
    m
}

/// Write the first evaluation batch (ids, type ids, mask, logits) as JSON.
fn dump_first_batch<B: Backend>(
    be: &B,
    enc: &Encoder<B>,
    params: &B::Buf,
    encs: &[Encoding],
    examples: &[Example],
    pad_id: u32,
    batch: usize,
    path: &Path,
) -> Result<()> {
    let n = encs.len().min(batch.max(1));
    let refs: Vec<&Encoding> = encs[..n].iter().collect();
    let labels: Vec<f32> = examples[..n].iter().map(|e| e.label).collect();
    let hb = data::make_batch(&refs, &labels, pad_id);
    let db = enc.upload_batch(be, &hb)?;
    let logits: Vec<f64> = enc
        .logits(be, params, &db)
        .iter()
        .map(|x| crate::float::Float::to_f64(*x))
        .collect();
    let c = enc.opts.num_labels;
    let rows = |v: &[u32]| -> Vec<Vec<u32>> { v.chunks(hb.seq).map(|r| r.to_vec()).collect() };
    let v = json!({
        "input_ids": rows(&hb.ids),
        "token_type_ids": rows(&hb.type_ids),
        "attention_mask": hb.mask.chunks(hb.seq).map(|r| r.iter().map(|m| *m as u32).collect::<Vec<_>>()).collect::<Vec<_>>(),
        "logits": logits.chunks(c).map(|r| r.to_vec()).collect::<Vec<_>>(),
        "pooling": pooling_name(enc.opts.pooling),
    });
    write_json(path, &v)
}

/// Encoders keep every layer resident and every activation: refuse the
/// decoder-only memory options instead of ignoring them.
fn encoder_offload(offload: &str, recompute: bool) -> Result<()> {
    Offload::parse(offload)?;
    if offload == "stream" || recompute {
        return Err(Error::msg(format!(
            "--{}: implemented for decoders (the large models); encoders keep their layers and activations on the device",
            if recompute { "recompute" } else { "offload stream" }
        )));
    }
    Ok(())
}

/// Options of `beft eval`.
#[derive(Clone, Debug)]
pub struct EvalArgs {
    pub model: PathBuf,
    pub biases: Option<PathBuf>,
    pub task: String,
    pub data: PathBuf,
    pub max_len: usize,
    pub pooling: Option<String>,
    pub batch: usize,
    pub dev_size: Option<usize>,
    pub seed: u64,
    pub device: String,
    /// As [`TrainArgs::bf16`].
    pub bf16: bool,
    /// Write the first dev batch's inputs and logits here (JSON).
    pub dump_logits: Option<PathBuf>,
    /// Decoder tasks: a prompt-template file (see `train::lm`).
    pub templates: Option<PathBuf>,
    /// Decoder generation tasks: most tokens generated per answer.
    pub max_new_tokens: usize,
    /// As [`TrainArgs::offload`].
    pub offload: String,
    /// As [`TrainArgs::max_gpu_memory`].
    pub max_gpu_memory: Option<String>,
}

/// Result of `beft eval`.
#[derive(Clone, Debug, serde::Serialize)]
pub struct EvalResult {
    pub metric_name: String,
    pub metric: f64,
    pub examples: usize,
    pub metrics: BTreeMap<String, f64>,
    pub task: String,
    pub model: String,
    pub biases: Option<String>,
}

/// `beft eval`: the base model plus (optionally) trained biases, on the dev split.
pub fn eval(args: &EvalArgs) -> Result<EvalResult> {
    set_device_budget(args.max_gpu_memory.as_deref())?;
    with_backend!(&args.device, args.bf16, |be| eval_on(&be, args))
}

/// `beft eval` on a given backend.
pub fn eval_on<B: Backend>(be: &B, args: &EvalArgs) -> Result<EvalResult> {
    if super::lm::is_decoder_model(&args.model) {
        return super::lm::eval_on(be, args);
    }
    encoder_offload(&args.offload, false)?;
    let biases = match &args.biases {
        Some(p) => Some((p.clone(), WeightStore::open_file(p)?)),
        None => None,
    };
    let meta = |k: &str| {
        biases
            .as_ref()
            .and_then(|(_, s)| s.metadata().get(k).cloned())
    };
    let pooling = args.pooling.clone().or_else(|| meta("pooling"));
    let p = prepare(
        &args.model,
        &args.task,
        &args.data,
        None,
        args.dev_size,
        args.seed,
        args.max_len,
        pooling.as_deref(),
        false,
    )?;
    if let Some((path, store)) = &biases {
        p.md.check_biases_base(path, store)?;
    }
    let terms = BiasTerm::trained_set(meta("bias_terms").as_deref())?;
    let num_labels = match meta("num_labels") {
        Some(n) => n
            .parse::<usize>()
            .map_err(|_| Error::msg(format!("biases file: bad num_labels '{n}'")))?,
        None => p.md.config.num_labels.unwrap_or(p.num_labels),
    };
    if num_labels != p.num_labels {
        return Err(Error::msg(format!(
            "the model's head has {num_labels} labels but task {} has {}",
            p.task.name, p.num_labels
        )));
    }
    let enc = Encoder::load(
        be,
        &p.md,
        EncoderOptions {
            pooling: p.pooling,
            num_labels,
            terms,
            seed: args.seed,
        },
    )?;
    let mut init = enc.init.clone();
    match &biases {
        Some((path, store)) => enc.layout.read_values(store, path, &mut init)?,
        None => {
            if !enc.head_from_checkpoint {
                return Err(Error::file(
                    &p.md.dir,
                    "has no classification head for this task (no classifier weights of the right shape); pass --biases RUN_DIR/biases.safetensors from a beft train run",
                ));
            }
        }
    }
    let slab = Slab::new(be, &init);
    let m = evaluate(
        be,
        &enc,
        &slab.params,
        &p.task,
        &p.dev_enc,
        &p.dev,
        p.pad_id,
        args.batch,
    )?;
    if let Some(path) = &args.dump_logits {
        dump_first_batch(
            be,
            &enc,
            &slab.params,
            &p.dev_enc,
            &p.dev,
            p.pad_id,
            args.batch,
            path,
        )?;
    }
    Ok(EvalResult {
        metric_name: m.name,
        metric: m.value,
        examples: p.dev.len(),
        metrics: m.all,
        task: p.task.name,
        model: p.md.name,
        biases: args.biases.as_ref().map(|b| b.display().to_string()),
    })
}
