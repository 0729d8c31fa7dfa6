//! The `beft` command line: parses flags, calls the library, prints.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};

use beft::method::sweep::{paper_lr, paper_train_size};
use beft::train::run::{self, EvalArgs, TrainArgs};
use beft::train::Schedule;

/// Large buffers on cache-line boundaries, so that the bf16 products can
/// write them with streaming stores (`beft::alloc`).
#[global_allocator]
static ALLOC: beft::alloc::LineAligned = beft::alloc::LineAligned;

/// `--bf16`, shared by the commands that run a model on a device.
#[derive(Args, Clone, Copy)]
struct Precision {
    /// bf16 matrix products with f32 sums, the numerics of PyTorch's bf16 autocast (as
    /// Hugging Face's --bf16): on the CPU (needs AVX-512 BF16; the same as
    /// BEFT_CPU_GEMM=bf16) and on CUDA (activations rounded to bf16 in the products).
    /// Norms, softmax, losses and the trained biases stay f32. Default: f32 products.
    #[arg(long)]
    bf16: bool,
}

#[derive(Parser)]
#[command(
    name = "beft",
    version,
    about = "Bias-efficient fine-tuning: train only the bias vectors of a pre-trained transformer"
)]
struct Cli {
    /// CPU threads (default: all cores).
    #[arg(long, global = true)]
    threads: Option<usize>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Fine-tune the chosen biases (and the task head) on a task.
    Train(TrainCli),
    /// Evaluate a base model plus trained biases on the dev split.
    Eval(EvalCli),
    /// Classify texts (or answer questions, decoders on SQuAD) with a model plus trained biases: one line out per text.
    Predict(PredictCli),
    /// List the compute devices this build can use (values of --device).
    Devices,
    /// Write trained biases as a Hugging Face PEFT adapter or a merged model.
    Export(ExportCli),
    /// Read a PEFT BEFT adapter back into a beft biases file.
    ImportPeft(ImportPeftCli),
    /// Rank bias terms: BEFT score, magnitude and empirical Fisher per term and layer.
    Rank(RankCli),
    /// Run a grid of bias terms × seeds (× learning rates), resumably, and tabulate it.
    Sweep(SweepCli),
    /// Draw a run's loss and dev-metric curves (loss.png, dev_metric.png).
    Plot(PlotCli),
    /// Time the hot-path ops against measured ceilings, or whole training steps
    /// (--step); write random models of real shapes (--write-model).
    Bench(BenchCli),
}

#[derive(Args)]
struct BenchCli {
    /// cpu, cpu-ref, cuda[:N] or wgpu[:N].
    #[arg(long, default_value = "cpu")]
    device: String,
    #[command(flatten)]
    precision: Precision,
    /// Rows (tokens) per op (default: 512 on the CPU, 4096 on a GPU; 2048-8192 suit a GPU).
    #[arg(long)]
    tokens: Option<usize>,
    /// Model shapes of the op table, a comma list of bert-base, opt-125m, opt-1.3b,
    /// opt-6.7b, bert-tiny, opt-tiny [default: bert-base,opt-1.3b,opt-6.7b; with --quick:
    /// opt-tiny; with --step the op table runs only when --shapes is given].
    #[arg(long)]
    shapes: Option<String>,
    /// Timed repetitions per op (and timed steps with --step) [default: 10; --quick: 3].
    #[arg(long)]
    reps: Option<usize>,
    /// Untimed launches (steps) before timing [default: 3; --quick: 1].
    #[arg(long)]
    warmup: Option<usize>,
    /// Write every result (device, date, ceilings, per-op rows, steps) to this JSON file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Also draw achieved vs ceiling per op as a PNG.
    #[arg(long, value_name = "PNG")]
    plot: Option<PathBuf>,
    /// Tiny sizes everywhere (seconds; for tests).
    #[arg(long)]
    quick: bool,
    /// Time whole bias-only training steps of --model (or a random model of --shape).
    #[arg(long)]
    step: bool,
    /// Skip the op table.
    #[arg(long)]
    no_ops: bool,
    /// Only these op families of the table, a comma list of matmul, bias, activation,
    /// norm, attention, embedding, cross_entropy, adamw [default: all].
    #[arg(long, value_name = "FAMILIES")]
    ops: Option<String>,
    /// The model shape of --step or --write-model (see --shapes).
    #[arg(long)]
    shape: Option<String>,
    /// --step: a model directory (its config decides the shape).
    #[arg(long)]
    model: Option<PathBuf>,
    /// --step: sequences per step.
    #[arg(long, default_value_t = 8)]
    batch: usize,
    /// --step: tokens per sequence.
    #[arg(long, default_value_t = 512)]
    seq: usize,
    /// --step: trainable biases (as in `beft train`).
    #[arg(long, default_value = "v")]
    bias: String,
    /// --step, decoders: resident or stream layer weights (as in `beft train`;
    /// auto means resident here).
    #[arg(long, default_value = "resident")]
    offload: String,
    /// --step, decoders: recompute layer activations in the backward pass.
    #[arg(long)]
    recompute: bool,
    /// Write a random model of --shape to DIR (config.json + model.safetensors) and exit.
    #[arg(long, value_name = "DIR")]
    write_model: Option<PathBuf>,
    /// dtype of a written OPT model: bf16, f16 or f32 (BERT shapes: f32).
    #[arg(long, default_value = "bf16")]
    dtype: String,
    /// Seed of a written model.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

#[derive(Args)]
struct ExportCli {
    /// The base model the biases were trained on.
    #[arg(long)]
    model: PathBuf,
    /// RUN_DIR/biases.safetensors.
    #[arg(long)]
    biases: PathBuf,
    /// peft (a PEFT BEFT adapter directory) or merged (a full model with the biases folded in).
    #[arg(long, default_value = "peft")]
    format: String,
    #[arg(long)]
    out: PathBuf,
}

#[derive(Args)]
struct ImportPeftCli {
    /// The adapter directory (adapter_config.json + adapter_model.safetensors).
    adapter: PathBuf,
    /// The base model.
    #[arg(long)]
    model: PathBuf,
    /// Where to write the biases file.
    #[arg(long, default_value = "biases.safetensors")]
    out: PathBuf,
}

#[derive(Clone, Copy, ValueEnum)]
enum ScheduleCli {
    Constant,
    Linear,
    Cosine,
}

/// Training settings shared by `train`, `rank` and `sweep`.
#[derive(Args)]
struct TrainOpts {
    /// Hugging Face model directory (config.json, model.safetensors, tokenizer.json), or a
    /// GGUF file (decoders: config, weights and tokenizer from its metadata). Required.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Task. Encoders: sst2, cola, rte, mrpc, stsb, qnli, qqp, mnli, jsonl. Decoders
    /// (candidate scoring / generation): sst2, cola, rte, mrpc, qnli, qqp, mnli, cb, boolq,
    /// copa, bigbench, squad. Required.
    #[arg(long)]
    task: Option<String>,
    /// Directory holding train.tsv and dev.tsv (or train.jsonl / dev.jsonl; SuperGLUE
    /// val.jsonl; SQuAD-format JSON), or a BIG-bench task.json. Required.
    #[arg(long)]
    data: Option<PathBuf>,
    /// Seeded random subset of N training examples (the low-data regime).
    #[arg(long)]
    train_size: Option<usize>,
    /// Seeded random subset of N dev examples (default: all).
    #[arg(long)]
    dev_size: Option<usize>,
    #[arg(long, default_value_t = 4)]
    epochs: usize,
    /// Learning rate (default: BEFT's per-task rate for GLUE tasks — CoLA 7e-4,
    /// MNLI 1e-4, MRPC 7e-4, QNLI 1e-4, QQP 4e-4, RTE 1e-3, SST-2 4e-4, STS-B 1e-4 —
    /// else 4e-4).
    #[arg(long)]
    lr: Option<f64>,
    #[arg(long, default_value_t = 16)]
    batch: usize,
    #[arg(long, default_value_t = 64)]
    eval_batch: usize,
    /// Truncate inputs to this many tokens.
    #[arg(long, default_value_t = 128)]
    max_len: usize,
    /// Put training examples of similar length in the same batch (seeded
    /// groups of 50 batches sorted by length; the batch order stays random):
    /// far less padding, so faster steps, with a slightly different batch
    /// mix than the default fully random batches.
    #[arg(long)]
    group_by_length: bool,
    /// Split each batch into N micro-batches, run one after another, whose
    /// gradients are summed before the optimiser step: the same update as
    /// the whole batch (without dropout) with a micro-batch's activation
    /// memory.
    #[arg(long, default_value_t = 1, value_name = "N")]
    grad_accum: usize,
    /// Save the biases (and head) of the epoch with the best dev metric
    /// (the first, on a tie) instead of the last epoch's, as Hugging Face's
    /// load_best_model_at_end does.
    #[arg(long)]
    save_best: bool,
    /// Stop when the dev metric has not improved for N epochs in a row
    /// (Hugging Face's early_stopping_patience); with --save-best, the best
    /// epoch's biases are kept.
    #[arg(long, value_name = "N")]
    early_stopping: Option<usize>,
    /// Head input: cls (pooler) or mean. Default: the model's own
    /// (sentence-transformers' 1_Pooling/config.json), else cls.
    #[arg(long)]
    pooling: Option<String>,
    #[arg(long, value_enum, default_value_t = ScheduleCli::Constant)]
    schedule: ScheduleCli,
    /// Fraction of the steps used for linear warm-up.
    #[arg(long, default_value_t = 0.0)]
    warmup_ratio: f64,
    /// Global gradient-norm clip (0 disables).
    #[arg(long, default_value_t = 1.0)]
    clip: f64,
    #[arg(long, default_value_t = 0.0)]
    weight_decay: f64,
    /// Disable dropout during training.
    #[arg(long)]
    no_dropout: bool,
    /// Skip the evaluation before training.
    #[arg(long)]
    no_eval_before: bool,
    /// Stop after this many optimiser steps.
    #[arg(long)]
    max_steps: Option<u64>,
    /// cpu, cpu-ref, cuda[:N] or wgpu[:N].
    #[arg(long, default_value = "cpu")]
    device: String,
    #[command(flatten)]
    precision: Precision,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
    /// Save a resumable checkpoint every N steps (and after every epoch; 0: epochs only).
    #[arg(long, default_value_t = 50)]
    checkpoint_every: u64,
    /// Decoder tasks: prompt templates (JSON) replacing/extending the built-in ones.
    #[arg(long)]
    templates: Option<PathBuf>,
    /// Decoder generation tasks: most tokens generated per answer.
    #[arg(long, default_value_t = 32)]
    max_new_tokens: usize,
    #[command(flatten)]
    memory: MemoryOpts,
    /// Decoders: keep only each layer's input and recompute the layer in the
    /// backward pass (less activation memory, one more forward per step).
    #[arg(long)]
    recompute: bool,
}

/// Device memory options of `train` and `eval`.
#[derive(Args, Clone)]
struct MemoryOpts {
    /// Decoder layer weights: resident (uploaded once), stream (uploaded
    /// layer by layer from the memory-mapped file, two layers on the device
    /// at a time), or auto (stream only if the --max-gpu-memory budget is
    /// too small for resident).
    #[arg(long, default_value = "auto")]
    offload: String,
    /// Device memory budget, e.g. 4GiB: a cap on what beft allocates on
    /// the GPU, and what --offload auto plans against.
    #[arg(long, value_name = "SIZE")]
    max_gpu_memory: Option<String>,
}

impl TrainOpts {
    fn to_args(
        &self,
        out: PathBuf,
        bias: String,
        seed: u64,
        overwrite: bool,
    ) -> beft::Result<TrainArgs> {
        let need = |name: &str| beft::Error::msg(format!("--{name} is required"));
        let task_name = self.task.clone().ok_or_else(|| need("task"))?;
        let task = task_name.to_ascii_lowercase().replace(['-', '_'], "");
        Ok(TrainArgs {
            model: self.model.clone().ok_or_else(|| need("model"))?,
            task: task_name,
            data: self.data.clone().ok_or_else(|| need("data"))?,
            out,
            train_size: self.train_size,
            bias,
            epochs: self.epochs,
            lr: self.lr.or_else(|| paper_lr(&task)).unwrap_or(4e-4),
            batch: self.batch,
            eval_batch: self.eval_batch,
            seed,
            max_len: self.max_len,
            pooling: self.pooling.clone(),
            schedule: match self.schedule {
                ScheduleCli::Constant => Schedule::Constant,
                ScheduleCli::Linear => Schedule::Linear,
                ScheduleCli::Cosine => Schedule::Cosine,
            },
            warmup_ratio: self.warmup_ratio,
            clip: self.clip,
            weight_decay: self.weight_decay,
            dropout: !self.no_dropout,
            eval_before: !self.no_eval_before,
            max_steps: self.max_steps,
            dev_size: self.dev_size,
            device: self.device.clone(),
            bf16: self.precision.bf16,
            progress: !self.quiet,
            overwrite,
            resume: false,
            checkpoint_every: self.checkpoint_every,
            templates: self.templates.clone(),
            max_new_tokens: self.max_new_tokens,
            offload: self.memory.offload.clone(),
            recompute: self.recompute,
            max_gpu_memory: self.memory.max_gpu_memory.clone(),
            group_by_length: self.group_by_length,
            grad_accum: self.grad_accum,
            save_best: self.save_best,
            early_stopping: self.early_stopping,
        })
    }
}

#[derive(Args)]
struct TrainCli {
    #[command(flatten)]
    opts: TrainOpts,
    /// Output run directory (written only when the run is complete).
    #[arg(long, default_value = "runs/run")]
    out: PathBuf,
    /// Trainable biases: v, q, k, o, mlp-in, mlp-out, ln1, ln2, emb-ln, all, or a comma list.
    #[arg(long, default_value = "v")]
    bias: String,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Replace an existing run directory (or an unfinished one's state).
    #[arg(long)]
    overwrite: bool,
    /// Continue the unfinished run RUN_DIR from its last checkpoint (no other flags needed).
    #[arg(long, value_name = "RUN_DIR")]
    resume: Option<PathBuf>,
}

#[derive(Args)]
struct RankCli {
    #[command(flatten)]
    opts: TrainOpts,
    /// Output directory: ranking.json, heat-maps, bar charts, and the all-bias run.
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

#[derive(Args)]
struct SweepCli {
    #[command(flatten)]
    opts: TrainOpts,
    /// Output directory (resumable: finished cells are not rerun).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Comma list of bias settings, one cell each (`all` = BitFit; `q+v` trains both).
    #[arg(long, default_value = "v,q,k,all")]
    terms: String,
    #[arg(long, default_value = "0,1,2")]
    seeds: String,
    /// Learning-rate grid (comma list); default: the single --lr.
    #[arg(long)]
    lrs: Option<String>,
}

#[derive(Args)]
struct PlotCli {
    /// A run directory (steps.jsonl, metrics.jsonl).
    run: PathBuf,
}

#[derive(Args)]
struct EvalCli {
    #[arg(long)]
    model: PathBuf,
    /// Trained biases (RUN_DIR/biases.safetensors); without it, the base
    /// model with its saved head.
    #[arg(long)]
    biases: Option<PathBuf>,
    #[arg(long)]
    task: String,
    #[arg(long)]
    data: PathBuf,
    #[arg(long, default_value_t = 128)]
    max_len: usize,
    #[arg(long)]
    pooling: Option<String>,
    #[arg(long, default_value_t = 64)]
    batch: usize,
    #[arg(long)]
    dev_size: Option<usize>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long, default_value = "cpu")]
    device: String,
    #[command(flatten)]
    precision: Precision,
    /// Print one JSON object on stdout.
    #[arg(long)]
    json: bool,
    /// Also write the inputs and logits of the first dev batch to this JSON
    /// file (for comparisons with other frameworks).
    #[arg(long)]
    dump_logits: Option<PathBuf>,
    /// Decoder tasks: prompt templates (JSON) replacing/extending the built-in ones.
    #[arg(long)]
    templates: Option<PathBuf>,
    /// Decoder generation tasks: most tokens generated per answer.
    #[arg(long, default_value_t = 32)]
    max_new_tokens: usize,
    #[command(flatten)]
    memory: MemoryOpts,
}

#[derive(Args)]
struct PredictCli {
    /// Hugging Face model directory (config.json, model.safetensors, tokenizer.json) of an
    /// encoder (BERT, RoBERTa, MiniLM) or a decoder, or a decoder's GGUF file.
    #[arg(long)]
    model: PathBuf,
    /// Trained biases and head (RUN_DIR/biases.safetensors from `beft train`).
    #[arg(long)]
    biases: PathBuf,
    /// A text to classify (repeatable). Without --text or --input, texts are read from
    /// stdin, one per line.
    #[arg(long)]
    text: Vec<String>,
    /// A file of texts, one per line; a tab separates the two sentences of a pair task
    /// (RTE, MRPC, QNLI, QQP, MNLI, STS-B).
    #[arg(long)]
    input: Option<PathBuf>,
    /// Truncate inputs to this many tokens.
    #[arg(long, default_value_t = 128)]
    max_len: usize,
    /// One JSON object per text (text, label, probability, probabilities) instead of
    /// tab-separated `label<TAB>probability<TAB>text`.
    #[arg(long)]
    json: bool,
    /// Decoders: the classification task whose prompt template and label verbalisers
    /// score the texts (default: the task the biases were trained on).
    #[arg(long)]
    task: Option<String>,
    /// Decoders: prompt templates (JSON) replacing/extending the built-in ones, as in
    /// training.
    #[arg(long)]
    templates: Option<PathBuf>,
    /// Decoders on a generation task (squad; each line: context, a tab, the question):
    /// most tokens generated per answer.
    #[arg(long, default_value_t = 32)]
    max_new_tokens: usize,
    /// bf16 matrix products with f32 sums (needs AVX-512 BF16; the same as
    /// BEFT_CPU_GEMM=bf16), as `eval --bf16`. Default: f32 products.
    #[arg(long)]
    bf16: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let threads = cli.threads.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    });
    if threads == 0 {
        eprintln!("error: --threads must be at least 1");
        return ExitCode::from(2);
    }
    // A second initialisation can only fail if something built the pool
    // already; the pool then keeps its size, which is harmless.
    let _ = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global();
    if matches!(cli.cmd, Cmd::Train(_) | Cmd::Sweep(_)) {
        install_ctrlc_handler();
    }
    // A device fault (out of device memory, device lost) outside a training
    // loop, which catches its own, is still an error, not a panic.
    let res = beft::backend::fault::catch_device_fault(|| match cli.cmd {
        Cmd::Train(t) => run_train(t),
        Cmd::Eval(e) => run_eval(e),
        Cmd::Predict(p) => run_predict(p),
        Cmd::Devices => run_devices(),
        Cmd::Export(x) => beft::method::adapter::ExportFormat::parse(&x.format)
            .and_then(|f| beft::method::adapter::export(&x.model, &x.biases, f, &x.out))
            .map(|p| println!("wrote {}", p.display())),
        Cmd::Rank(r) => run_rank(r),
        Cmd::Sweep(x) => run_sweep(x),
        Cmd::Plot(p) => beft::method::plot::plot_run(&p.run).map(|files| {
            for f in files {
                println!("wrote {}", f.display());
            }
        }),
        Cmd::Bench(b) => run_bench(b),
        Cmd::ImportPeft(x) => beft::method::adapter::import_peft(&x.adapter, &x.model, &x.out)
            .map(|p| println!("wrote {}", p.display())),
    })
    .and_then(|r| r);
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Ctrl-C during training: the first one asks the training loop to save a
/// checkpoint at the end of the current step and stop (it then exits
/// non-zero, naming `--resume`); a second one quits at once.
fn install_ctrlc_handler() {
    use std::sync::atomic::Ordering;
    let res = ctrlc::set_handler(|| {
        if beft::train::checkpoint::INTERRUPTED.swap(true, Ordering::SeqCst) {
            eprintln!("\ninterrupted again: quitting without saving");
            std::process::exit(130);
        }
        eprintln!("\ninterrupt: saving a checkpoint at the end of this step (Ctrl-C again to quit at once)");
    });
    if let Err(e) = res {
        eprintln!(
            "warning: cannot install the Ctrl-C handler ({e}); Ctrl-C will stop without saving"
        );
    }
}

fn run_train(t: TrainCli) -> beft::Result<()> {
    let (s, out) = match &t.resume {
        Some(dir) => (run::resume(dir)?, dir.clone()),
        None => {
            let args = t.opts.to_args(t.out.clone(), t.bias, t.seed, t.overwrite)?;
            (run::train(&args)?, t.out.clone())
        }
    };
    let init = s
        .initial_dev_metric
        .map(|v| format!("{v:.4}"))
        .unwrap_or_else(|| "-".into());
    println!(
        "task {} | bias {} | dev {}: before {} -> after {:.4} (best {:.4} at epoch {})",
        s.task, s.bias, s.metric_name, init, s.final_dev_metric, s.best_dev_metric, s.best_epoch
    );
    if s.saved_epoch != s.epochs {
        println!(
            "biases saved from epoch {} (--save-best; dev {} {:.4})",
            s.saved_epoch, s.metric_name, s.best_dev_metric
        );
    }
    println!(
        "trainable values: {} ({} in biases) | biases file: {} bytes | {:.0} train tokens/s | median step {:.3}s | peak RSS {:.0} MiB",
        s.trainable_params,
        s.trainable_bias_params,
        s.biases_file_bytes,
        s.train_tokens_per_s,
        s.step_seconds_median,
        s.peak_rss_bytes as f64 / (1024.0 * 1024.0)
    );
    if let Some(b) = s.peak_device_bytes {
        println!(
            "peak device memory {:.0} MiB | layer weights {}",
            b as f64 / (1024.0 * 1024.0),
            s.offload
        );
    }
    println!("run written to {}", out.display());
    Ok(())
}

fn run_predict(p: PredictCli) -> beft::Result<()> {
    use beft::infer::{best_label, probabilities, Classifier};
    use std::io::{BufRead, Write};
    // Read every input before loading the model: a bad file fails fast.
    let lines: Vec<String> = if !p.text.is_empty() {
        if p.input.is_some() {
            return Err(beft::Error::msg("give either --text or --input, not both"));
        }
        p.text
    } else if let Some(path) = &p.input {
        let raw = std::fs::read(path).map_err(|e| beft::Error::io(path, e))?;
        let text = String::from_utf8(raw)
            .map_err(|e| beft::Error::file(path, format!("not UTF-8 text ({e})")))?;
        text.lines()
            .map(|l| l.trim_end_matches('\r').to_string())
            .collect()
    } else {
        let mut v = Vec::new();
        for line in std::io::stdin().lock().lines() {
            v.push(line.map_err(|e| beft::Error::msg(format!("reading stdin: {e}")))?);
        }
        v
    };
    if lines.is_empty() {
        let from = match &p.input {
            Some(path) => path.display().to_string(),
            None => "stdin".into(),
        };
        return Err(beft::Error::msg(format!("{from}: no texts to classify")));
    }
    // Encoders run their classification head; decoders score the task's
    // label verbalisers after its prompt (probabilities: a softmax over
    // those scores).
    let decoder = beft::train::lm::is_decoder_model(&p.model);
    enum Scorer {
        Encoder(Box<Classifier>),
        Decoder(Box<beft::train::lm::DecoderPredictor>),
    }
    let be = beft::backend::fast::FastCpu::for_run(p.bf16)?;
    let (scorer, task_name) = if decoder {
        let d = beft::train::lm::DecoderPredictor::load_on(
            be,
            &p.model,
            &p.biases,
            p.task.as_deref(),
            p.templates.as_deref(),
            p.max_len,
        )?;
        let t = d.task().to_string();
        (Scorer::Decoder(Box::new(d)), Some(t))
    } else {
        if p.task.is_some() || p.templates.is_some() {
            return Err(beft::Error::msg(
                "--task and --templates apply to decoders; an encoder's biases file holds its task and head",
            ));
        }
        let clf = Classifier::load_on(be, &p.model, &p.biases, p.max_len)?;
        let t = clf.task().map(str::to_string);
        (Scorer::Encoder(Box::new(clf)), t)
    };
    let task = task_name.as_deref().and_then(|t| beft::data::task(t).ok());
    let pair_task = task.as_ref().is_none_or(|t| t.is_pair);
    let mut names = task.map(|t| t.label_names()).unwrap_or_default();
    if let Scorer::Decoder(d) = &scorer {
        // Unnamed labels (or labels named by their number, as SST-2's
        // "0"/"1") go by their verbalisers (" great" -> "great").
        if names.iter().enumerate().all(|(i, n)| *n == i.to_string()) {
            names = d.options().iter().map(|o| o.trim().to_string()).collect();
        }
    }
    let inputs: Vec<(&str, Option<&str>)> = lines
        .iter()
        .map(|l| match l.split_once('\t') {
            Some((a, b)) if pair_task => (a, Some(b)),
            _ => (l.as_str(), None),
        })
        .collect();
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let regression = matches!(&scorer, Scorer::Encoder(c) if c.num_labels() == 1);
    // Chunks keep memory flat on long files; results stream out in order.
    for (chunk, texts) in inputs.chunks(1024).zip(lines.chunks(1024)) {
        // A generation task: one answer per line.
        if let Scorer::Decoder(d) = &scorer {
            if d.generates() {
                let answers = d.answers(chunk, p.max_new_tokens)?;
                for (answer, text) in answers.iter().zip(texts) {
                    let res = if p.json {
                        writeln!(
                            out,
                            "{}",
                            serde_json::json!({"text": text, "answer": answer})
                        )
                    } else {
                        writeln!(out, "{answer}\t{text}")
                    };
                    if !written(res)? {
                        return Ok(());
                    }
                }
                continue;
            }
        }
        let logits = match &scorer {
            Scorer::Encoder(c) => c.logits_pairs(chunk)?,
            Scorer::Decoder(d) => d.scores(chunk)?,
        };
        for (row, text) in logits.iter().zip(texts) {
            let (label, prob) = best_label(row);
            let name = names
                .get(label)
                .cloned()
                .unwrap_or_else(|| label.to_string());
            let res = if p.json {
                let v = if regression {
                    serde_json::json!({"text": text, "value": row[0]})
                } else {
                    serde_json::json!({"text": text, "label": name, "label_id": label,
                        "probability": prob, "probabilities": probabilities(row)})
                };
                writeln!(out, "{v}")
            } else if regression {
                writeln!(out, "{:.4}\t{text}", row[0])
            } else {
                writeln!(out, "{name}\t{prob:.4}\t{text}")
            };
            if !written(res)? {
                return Ok(());
            }
        }
    }
    match out.flush() {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(beft::Error::msg(format!("writing stdout: {e}")))
        }
        _ => Ok(()),
    }
}

/// Whether a line of output went out: false when stdout's reader has gone
/// (`beft predict … | head`: stop quietly), an error otherwise.
fn written(res: std::io::Result<()>) -> beft::Result<bool> {
    match res {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(false),
        Err(e) => Err(beft::Error::msg(format!("writing stdout: {e}"))),
        Ok(()) => Ok(true),
    }
}

fn run_eval(e: EvalCli) -> beft::Result<()> {
    let args = EvalArgs {
        model: e.model,
        biases: e.biases,
        task: e.task,
        data: e.data,
        max_len: e.max_len,
        pooling: e.pooling,
        batch: e.batch,
        dev_size: e.dev_size,
        seed: e.seed,
        device: e.device,
        bf16: e.precision.bf16,
        dump_logits: e.dump_logits,
        templates: e.templates,
        max_new_tokens: e.max_new_tokens,
        offload: e.memory.offload,
        max_gpu_memory: e.memory.max_gpu_memory,
    };
    let r = run::eval(&args)?;
    if e.json {
        println!(
            "{}",
            serde_json::to_string(&r).map_err(|x| beft::Error::msg(x.to_string()))?
        );
    } else {
        println!(
            "{} on {} dev ({} examples): {} = {:.4}",
            r.model, r.task, r.examples, r.metric_name, r.metric
        );
    }
    Ok(())
}

fn run_bench(b: BenchCli) -> beft::Result<()> {
    use beft::bench::{self, Shape};
    let shape = b
        .shape
        .as_deref()
        .map(Shape::parse)
        .transpose()
        .map_err(|e| e.context("--shape"))?;
    let dtype = bench::parse_dtype(&b.dtype)?;
    if let Some(dir) = &b.write_model {
        let shape = shape.ok_or_else(|| {
            beft::Error::msg("--write-model needs --shape (e.g. --shape opt-6.7b)")
        })?;
        let bytes = bench::write_model(dir, shape, dtype, b.seed, !b.quiet)?;
        println!(
            "wrote {} ({}, model.safetensors {:.2} GB)",
            dir.display(),
            shape.name(),
            bytes as f64 / 1e9
        );
        return Ok(());
    }
    let shapes = match &b.shapes {
        Some(s) => Shape::parse_list(s)?,
        None if b.quick => vec![Shape::parse("opt-tiny")?],
        None => Shape::parse_list("bert-base,opt-1.3b,opt-6.7b")?,
    };
    let reps = b.reps.unwrap_or(if b.quick { 3 } else { 10 });
    let warmup = b.warmup.unwrap_or(if b.quick { 1 } else { 3 });
    let step = if b.step {
        Some(bench::step::StepSpec {
            model: b.model.clone(),
            shape,
            dtype,
            batch: b.batch,
            seq: b.seq,
            bias: b.bias.clone(),
            steps: reps,
            warmup,
            offload: beft::model::Offload::parse(&b.offload)?.unwrap_or_default(),
            recompute: b.recompute,
        })
    } else {
        None
    };
    let args = bench::BenchArgs {
        device: b.device.clone(),
        bf16: b.precision.bf16,
        tokens: b.tokens,
        shapes,
        ops: !b.no_ops && (!b.step || b.shapes.is_some()),
        op_families: b.ops.as_deref().map(bench::parse_op_families).transpose()?,
        reps,
        warmup,
        quick: b.quick,
        progress: !b.quiet,
        step,
    };
    let report = bench::run(&args)?;
    print!("{}", bench::render(&report));
    if let Some(p) = &b.json {
        bench::write_json(&report, p)?;
        println!("wrote {}", p.display());
    }
    if let Some(p) = &b.plot {
        let n = bench::plot(&report, p)?;
        println!("wrote {} ({n} ops against their ceilings)", p.display());
    }
    Ok(())
}

fn run_devices() -> beft::Result<()> {
    use beft::backend::fast::{amx, gemm16, FastCpu};
    use beft::backend::Backend;
    let bf16 = if !gemm16::available() {
        "no bf16 products (this CPU has no AVX-512 BF16)"
    } else if amx::available() {
        "--bf16 runs the products on AMX tiles"
    } else {
        "--bf16 runs the products on AVX-512 BF16"
    };
    println!("{}; {bf16}  [--device cpu]", FastCpu::new().name());
    println!(
        "cpu-ref: the plain f32 reference ops, the oracle of the tests (slow)  [--device cpu-ref]"
    );
    #[cfg(feature = "wgpu")]
    {
        let list = beft::backend::wgpu::adapters();
        if list.is_empty() {
            println!("wgpu: no adapter found (install a Vulkan driver, e.g. mesa-vulkan-drivers)");
        }
        let best = beft::backend::wgpu::best_index(&list);
        for (i, a) in list.iter().enumerate() {
            let tag = if Some(i) == best {
                "  [--device wgpu]"
            } else {
                ""
            };
            println!("wgpu:{i}: {}{tag}", beft::backend::wgpu::describe(a));
        }
    }
    #[cfg(not(feature = "wgpu"))]
    println!("wgpu: not compiled in (rebuild with --features wgpu)");
    #[cfg(feature = "cuda")]
    match beft::backend::cuda::list_devices() {
        Ok(list) if list.is_empty() => println!("cuda: the driver reports no device"),
        Ok(list) => {
            for (i, d) in list.iter().enumerate() {
                println!("cuda:{i}: {d}");
            }
        }
        Err(e) => println!("cuda: {e}"),
    }
    #[cfg(not(feature = "cuda"))]
    println!("cuda: not compiled in (rebuild with --features cuda)");
    Ok(())
}

fn run_rank(r: RankCli) -> beft::Result<()> {
    let args = r
        .opts
        .to_args(r.out.join("bitfit"), "all".into(), r.seed, true)?;
    let ranking = beft::method::rank::rank(&args, &r.out)?;
    println!(
        "layer-averaged scores ({} on {}, {} training examples):",
        ranking.model, ranking.task, ranking.train_examples
    );
    println!(
        "{:<8} {:>12} {:>12} {:>12}",
        "term", "beft_score", "magnitude", "fisher"
    );
    for (name, t) in &ranking.terms {
        println!(
            "{name:<8} {:>12.4e} {:>12.4e} {:>12.4e}",
            t.beft_score_mean, t.magnitude_mean, t.fisher_mean
        );
    }
    for (score, order) in &ranking.order {
        println!("by {score}: {}", order.join(" > "));
    }
    println!("wrote {}", r.out.join("ranking.json").display());
    Ok(())
}

fn run_sweep(x: SweepCli) -> beft::Result<()> {
    use beft::method::sweep::{default_out, parse_list, parse_terms, sweep, SweepArgs};
    let task = x
        .opts
        .task
        .clone()
        .unwrap_or_default()
        .to_ascii_lowercase()
        .replace(['-', '_'], "");
    let out = x.out.clone().unwrap_or_else(|| default_out(&task));
    let mut base = x.opts.to_args(out.clone(), "v".into(), 0, true)?;
    if base.train_size.is_none() {
        base.train_size = paper_train_size(&task);
    }
    let lrs = match &x.lrs {
        Some(s) => parse_list::<f64>("--lrs", s)?,
        None => vec![base.lr],
    };
    let args = SweepArgs {
        base,
        terms: parse_terms(&x.terms)?,
        seeds: parse_list::<u64>("--seeds", &x.seeds)?,
        lrs,
        out: out.clone(),
    };
    let cells = sweep(&args)?;
    println!(
        "{} cells; wrote {}, {} and {}",
        cells.len(),
        out.join("results.csv").display(),
        out.join("results.md").display(),
        out.join("dev_metric_by_epoch.png").display()
    );
    Ok(())
}
