//! The `beft` command line: parses flags, calls the library, prints.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};

use beft::train::run::{self, EvalArgs, TrainArgs};
use beft::train::Schedule;

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
    /// Write trained biases as a Hugging Face PEFT adapter or a merged model.
    Export(ExportCli),
    /// Read a PEFT BEFT adapter back into a beft biases file.
    ImportPeft(ImportPeftCli),
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
}

#[derive(Args)]
struct TrainCli {
    /// Hugging Face model directory (config.json, model.safetensors, tokenizer.json).
    #[arg(long)]
    model: PathBuf,
    /// Task: sst2, cola, rte, mrpc, stsb, qnli, qqp, mnli, or jsonl.
    #[arg(long)]
    task: String,
    /// Directory holding train.tsv and dev.tsv (or train.jsonl / dev.jsonl).
    #[arg(long)]
    data: PathBuf,
    /// Output run directory (written only when the run is complete).
    #[arg(long, default_value = "runs/run")]
    out: PathBuf,
    /// Seeded random subset of N training examples (the low-data regime).
    #[arg(long)]
    train_size: Option<usize>,
    /// Seeded random subset of N dev examples (default: all).
    #[arg(long)]
    dev_size: Option<usize>,
    /// Trainable biases: v, q, k, o, mlp-in, mlp-out, ln1, ln2, emb-ln, all, or a comma list.
    #[arg(long, default_value = "v")]
    bias: String,
    #[arg(long, default_value_t = 4)]
    epochs: usize,
    #[arg(long, default_value_t = 4e-4)]
    lr: f64,
    #[arg(long, default_value_t = 16)]
    batch: usize,
    #[arg(long, default_value_t = 64)]
    eval_batch: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Truncate inputs to this many tokens.
    #[arg(long, default_value_t = 128)]
    max_len: usize,
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
    /// cpu, cuda[:N] or wgpu[:N].
    #[arg(long, default_value = "cpu")]
    device: String,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
    /// Replace an existing run directory.
    #[arg(long)]
    overwrite: bool,
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
    /// Print one JSON object on stdout.
    #[arg(long)]
    json: bool,
    /// Also write the inputs and logits of the first dev batch to this JSON
    /// file (for comparisons with other frameworks).
    #[arg(long)]
    dump_logits: Option<PathBuf>,
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
    let res = match cli.cmd {
        Cmd::Train(t) => run_train(t),
        Cmd::Eval(e) => run_eval(e),
        Cmd::Export(x) => beft::method::adapter::ExportFormat::parse(&x.format)
            .and_then(|f| beft::method::adapter::export(&x.model, &x.biases, f, &x.out))
            .map(|p| println!("wrote {}", p.display())),
        Cmd::ImportPeft(x) => beft::method::adapter::import_peft(&x.adapter, &x.model, &x.out).map(|p| println!("wrote {}", p.display())),
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run_train(t: TrainCli) -> beft::Result<()> {
    let args = TrainArgs {
        model: t.model,
        task: t.task,
        data: t.data,
        out: t.out.clone(),
        train_size: t.train_size,
        bias: t.bias,
        epochs: t.epochs,
        lr: t.lr,
        batch: t.batch,
        eval_batch: t.eval_batch,
        seed: t.seed,
        max_len: t.max_len,
        pooling: t.pooling,
        schedule: match t.schedule {
            ScheduleCli::Constant => Schedule::Constant,
            ScheduleCli::Linear => Schedule::Linear,
        },
        warmup_ratio: t.warmup_ratio,
        clip: t.clip,
        weight_decay: t.weight_decay,
        dropout: !t.no_dropout,
        eval_before: !t.no_eval_before,
        max_steps: t.max_steps,
        dev_size: t.dev_size,
        device: t.device,
        progress: !t.quiet,
        overwrite: t.overwrite,
    };
    let s = run::train(&args)?;
    let init = s
        .initial_dev_metric
        .map(|v| format!("{v:.4}"))
        .unwrap_or_else(|| "-".into());
    println!(
        "task {} | bias {} | dev {}: before {} -> after {:.4} (best {:.4} at epoch {})",
        s.task, s.bias, s.metric_name, init, s.final_dev_metric, s.best_dev_metric, s.best_epoch
    );
    println!(
        "trainable values: {} ({} in biases) | biases file: {} bytes | {:.0} train tokens/s | median step {:.3}s | peak RSS {:.0} MiB",
        s.trainable_params,
        s.trainable_bias_params,
        s.biases_file_bytes,
        s.train_tokens_per_s,
        s.step_seconds_median,
        s.peak_rss_bytes as f64 / (1024.0 * 1024.0)
    );
    println!("run written to {}", t.out.display());
    Ok(())
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
        dump_logits: e.dump_logits,
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
