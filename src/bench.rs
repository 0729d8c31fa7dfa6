//! `beft bench`: how fast each op of the training step's hot path runs on a
//! device, against ceilings the command measures itself, and how fast a
//! whole bias-only training step runs.
//!
//! - **Ops** ([`ops`]): every op of the [`crate::backend::Backend`]
//!   vocabulary that a training step spends its time in, at the sizes of
//!   real model shapes ([`Shape`]): matmul forward (x·Wᵀ, and with the bias
//!   as a linear layer runs it) and input gradient (dy·W) at the q/k/v/o,
//!   ffn-up and ffn-down sizes; bias_add, bias_grad,
//!   the residual add; GELU/ReLU forward and backward; LayerNorm and RMSNorm
//!   forward and backward; attention forward and backward (causal, and a
//!   padded encoder batch); embedding gather; cross-entropy over a 50,272-word
//!   vocabulary; AdamW over a slab. Each is timed as the median of `reps`
//!   timed repetitions after `warmup` launches, waiting for the device
//!   ([`crate::backend::Backend::sync`]) before the clock is
//!   read, rotating among several input sets so that caches do not flatter
//!   memory-bound ops.
//! - **Ceilings**: copy bandwidth (a large device-to-device `copy`: bytes
//!   read and written per second) and a GEMM rate (cuBLAS bf16 and f32 on
//!   CUDA, the measured FMA peak on the CPU; none on wgpu).
//! - **Steps** ([`step`]): whole bias-only training steps (forward, backward,
//!   clipping, AdamW) of a decoder or encoder, with tokens/s, model FLOP
//!   utilisation and peak device memory.
//! - **Random models**: [`write_model`] writes a random OPT or BERT of a named
//!   shape (OPT streamed to disk; bf16 by default), for the step timings at
//!   real shapes without downloads.

pub mod ops;
pub mod peak;
pub mod step;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::backend::{Backend, Device};
use crate::error::{Error, Result};
use crate::model::random::{write_random_bert, write_random_opt, BertShape, OptShape};
use crate::weights::DType;

/// A model shape the benchmark knows by name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shape {
    Bert(&'static str, BertShape),
    Opt(&'static str, OptShape),
}

/// A BERT small enough for tests.
pub const BERT_TINY: BertShape = BertShape {
    vocab: 1000,
    hidden: 64,
    layers: 2,
    heads: 4,
    intermediate: 256,
    max_positions: 256,
};

/// Every named shape: (name, shape).
pub const SHAPES: [Shape; 6] = [
    Shape::Bert("bert-tiny", BERT_TINY),
    Shape::Bert("bert-base", BertShape::BERT_BASE),
    Shape::Opt("opt-tiny", OptShape::TINY),
    Shape::Opt("opt-125m", OptShape::OPT_125M),
    Shape::Opt("opt-1.3b", OptShape::OPT_1_3B),
    Shape::Opt("opt-6.7b", OptShape::OPT_6_7B),
];

impl Shape {
    pub fn name(&self) -> &'static str {
        match self {
            Shape::Bert(n, _) | Shape::Opt(n, _) => n,
        }
    }
    pub fn hidden(&self) -> usize {
        match self {
            Shape::Bert(_, s) => s.hidden,
            Shape::Opt(_, s) => s.hidden,
        }
    }
    pub fn ffn(&self) -> usize {
        match self {
            Shape::Bert(_, s) => s.intermediate,
            Shape::Opt(_, s) => s.ffn,
        }
    }
    pub fn heads(&self) -> usize {
        match self {
            Shape::Bert(_, s) => s.heads,
            Shape::Opt(_, s) => s.heads,
        }
    }
    pub fn head_dim(&self) -> usize {
        self.hidden() / self.heads()
    }
    pub fn is_decoder(&self) -> bool {
        matches!(self, Shape::Opt(..))
    }

    /// The shape called `name` (`bert-base`, `opt-1.3b`, ...).
    pub fn parse(name: &str) -> Result<Shape> {
        let key = name.trim().to_ascii_lowercase();
        SHAPES
            .iter()
            .find(|s| s.name() == key)
            .copied()
            .ok_or_else(|| {
                Error::msg(format!(
                    "unknown shape '{}' (known: {})",
                    name.trim(),
                    SHAPES.map(|s| s.name()).join(", ")
                ))
            })
    }

    /// A comma list of shapes (`--shapes`); the error names the bad value.
    pub fn parse_list(spec: &str) -> Result<Vec<Shape>> {
        let mut out = Vec::new();
        for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let s = Shape::parse(part).map_err(|e| e.context("--shapes"))?;
            if !out.contains(&s) {
                out.push(s);
            }
        }
        if out.is_empty() {
            return Err(Error::msg(format!(
                "--shapes: no shape given in '{spec}' (e.g. --shapes bert-base,opt-1.3b)"
            )));
        }
        Ok(out)
    }
}

/// A measured GEMM ceiling.
#[derive(Clone, Debug, Serialize)]
pub struct GemmCeiling {
    /// Where it comes from: `cublas_bf16`, `cpu_fma_f32`.
    pub source: String,
    pub tflops: f64,
    /// How it was measured.
    pub detail: String,
}

/// The ceilings the command measured on this device.
#[derive(Clone, Debug, Serialize)]
pub struct Ceilings {
    /// Bytes read + written per second by a large device-to-device `copy`.
    pub copy_gbs: f64,
    /// Elements copied (f32).
    pub copy_elems: usize,
    /// The GEMM ceiling the matmul and attention rows are compared with
    /// (`None`: unavailable on this device, see `gemm_note`).
    pub gemm: Option<GemmCeiling>,
    /// Every GEMM rate measured (cuBLAS bf16 and f32; the CPU FMA peak).
    pub gemm_all: Vec<GemmCeiling>,
    /// Why there is no GEMM ceiling, or what it means.
    pub gemm_note: String,
}

/// One timed op.
#[derive(Clone, Debug, Serialize)]
pub struct OpRow {
    pub model_shape: String,
    pub op: String,
    /// The op's sizes, e.g. `ffn_up 4096x8192x2048 (m x n x k)`.
    pub shape: String,
    /// Median seconds per launch.
    pub median_s: f64,
    /// Launches per timed repetition (short ops are repeated so that one
    /// repetition lasts about a millisecond).
    pub launches_per_rep: usize,
    /// Input sets rotated through.
    pub sets: usize,
    /// Floating-point operations per launch (compute-bound ops).
    pub flops: Option<f64>,
    /// Bytes read + written per launch (memory-bound ops).
    pub bytes: Option<f64>,
    pub tflops: Option<f64>,
    pub gbs: Option<f64>,
    /// Percentage of the ceiling (`gemm` for flops, `copy` for bytes).
    pub pct_of_ceiling: Option<f64>,
    pub ceiling: String,
}

/// Everything one `beft bench` run measured (the `--json` file).
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub tool: String,
    pub beft_version: String,
    pub device: String,
    pub device_spec: String,
    pub date_utc: String,
    pub host_threads: usize,
    pub tokens: usize,
    pub reps: usize,
    pub warmup: usize,
    pub quick: bool,
    pub ceilings: Ceilings,
    pub ops: Vec<OpRow>,
    pub steps: Vec<step::StepRow>,
    /// How the derived figures are computed.
    pub notes: Vec<String>,
}

/// The op families of the op table, as `beft bench --ops` names them.
pub const OP_FAMILIES: &[&str] = &[
    "matmul",
    "bias",
    "activation",
    "norm",
    "attention",
    "embedding",
    "cross_entropy",
    "adamw",
];

/// `--ops`: a comma list of [`OP_FAMILIES`].
pub fn parse_op_families(list: &str) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for f in list.split(',').map(str::trim).filter(|f| !f.is_empty()) {
        if !OP_FAMILIES.contains(&f) {
            return Err(Error::msg(format!(
                "--ops: unknown op family '{f}' (expected a comma list of {})",
                OP_FAMILIES.join(", ")
            )));
        }
        out.push(f.to_string());
    }
    if out.is_empty() {
        return Err(Error::msg(format!(
            "--ops: no op family given (expected a comma list of {})",
            OP_FAMILIES.join(", ")
        )));
    }
    Ok(out)
}

/// What `beft bench` should do.
#[derive(Clone, Debug)]
pub struct BenchArgs {
    pub device: String,
    /// bf16 matrix products (`--bf16`; as [`crate::train::run::TrainArgs::bf16`]).
    pub bf16: bool,
    /// Rows per op (default: 512 on the CPU, 4096 on a GPU, 64 with `quick`).
    pub tokens: Option<usize>,
    /// Shapes of the op table.
    pub shapes: Vec<Shape>,
    /// Run the op table.
    pub ops: bool,
    /// Only these op families of the table ([`OP_FAMILIES`]; `None`: all).
    pub op_families: Option<Vec<String>>,
    pub reps: usize,
    pub warmup: usize,
    /// Tiny sizes everywhere (for tests).
    pub quick: bool,
    pub progress: bool,
    /// Whole training steps.
    pub step: Option<step::StepSpec>,
}

/// Run the benchmark on `args.device`.
pub fn run(args: &BenchArgs) -> Result<Report> {
    if args.reps == 0 {
        return Err(Error::msg("--reps must be at least 1"));
    }
    if args.tokens == Some(0) {
        return Err(Error::msg("--tokens must be at least 1"));
    }
    let dev = Device::parse(&args.device)?;
    match dev {
        Device::Cpu => {
            let be = crate::backend::fast::FastCpu::for_run(args.bf16)?;
            let bf16 = be.gemm() == crate::backend::fast::CpuGemm::Bf16;
            run_on(&be, dev, args, cpu_gemm(args.quick, bf16))
        }
        Device::CpuRef | Device::Wgpu(_) if args.bf16 => Err(crate::train::run::no_bf16(dev)),
        Device::CpuRef => {
            let be = crate::backend::cpu::CpuBackend::<f32>::new();
            run_on(&be, dev, args, cpu_gemm(args.quick, false))
        }
        #[cfg(feature = "cuda")]
        Device::Cuda(ordinal) => {
            let be = crate::backend::cuda::CudaBackend::for_run(ordinal, args.bf16)?;
            let size = if args.quick { 1024 } else { 8192 };
            let gemm = match crate::backend::cuda::blas::gemm_ceilings(
                be.context(),
                size,
                args.reps,
            ) {
                Ok(all) => {
                    let all: Vec<GemmCeiling> = all
                        .into_iter()
                        .map(|c| GemmCeiling {
                            source: c.name.clone(),
                            tflops: c.tflops,
                            detail: format!(
                                "cuBLAS {}x{}x{}, median of {} ({:.3} ms)",
                                c.m,
                                c.n,
                                c.k,
                                args.reps,
                                c.seconds * 1e3
                            ),
                        })
                        .collect();
                    let best = all.iter().find(|c| c.source == "cublas_bf16").cloned();
                    (best, all, "cuBLAS bf16 GEMM (bf16 in/out, f32 accumulation): beft's products are f32 activations x bf16 weights on the tensor cores".to_string())
                }
                Err(e) => (None, Vec::new(), format!("unavailable: {e}")),
            };
            run_on(&be, dev, args, gemm)
        }
        #[cfg(feature = "wgpu")]
        Device::Wgpu(index) => {
            let be = crate::backend::wgpu::WgpuBackend::new(index)?;
            let gemm = (
                None,
                Vec::new(),
                "unavailable: no vendor GEMM is reachable through wgpu".to_string(),
            );
            run_on(&be, dev, args, gemm)
        }
        #[allow(unreachable_patterns)]
        other => Err(crate::train::run::device_unavailable(other)),
    }
}

/// The CPU's GEMM ceiling: the measured f32 FMA peak of all threads, or
/// with `bf16` products (`BEFT_CPU_GEMM=bf16`) the bf16 dot-product peak;
/// the other is listed beside it where the CPU has it.
fn cpu_gemm(quick: bool, bf16: bool) -> (Option<GemmCeiling>, Vec<GemmCeiling>, String) {
    let iters = if quick { 200_000 } else { 20_000_000 };
    let tries = if quick { 2 } else { 5 };
    let ceiling = |source: &str, p: peak::FmaPeak| GemmCeiling {
        source: source.into(),
        tflops: p.gflops_all / 1e3,
        detail: format!(
            "measured {} peak: {:.1} GFLOP/s per core, {:.1} GFLOP/s on {} threads \
             (not a GEMM: an upper bound no GEMM reaches)",
            p.isa, p.gflops_per_core, p.gflops_all, p.threads
        ),
    };
    let f32_peak = peak::measure(iters, tries).map(|p| ceiling("cpu_fma_f32", p));
    let dot_peak = peak::measure_bf16(iters, tries).map(|p| ceiling("cpu_dot_bf16", p));
    let amx_peak = peak::measure_amx(iters, tries).map(|p| ceiling("cpu_amx_bf16", p));
    let all: Vec<GemmCeiling> = [&f32_peak, &dot_peak, &amx_peak]
        .into_iter()
        .flatten()
        .cloned()
        .collect();
    let (main, note) = if bf16 && amx_peak.is_some() {
        (
            amx_peak,
            "the CPU's measured AMX tile peak (tdpbf16ps) on all threads: BEFT_CPU_GEMM=bf16 on AMX",
        )
    } else if bf16 {
        (
            dot_peak,
            "the CPU's measured bf16 dot-product peak (vdpbf16ps) on all threads: BEFT_CPU_GEMM=bf16",
        )
    } else {
        (
            f32_peak,
            "the CPU's measured f32 FMA peak on all threads (no vendor GEMM is used)",
        )
    };
    match main {
        Some(c) => (Some(c), all, note.into()),
        None => (
            None,
            all,
            "unavailable: no AVX2/AVX-512 FMA to measure on this CPU".into(),
        ),
    }
}

fn run_on<B: Backend>(
    be: &B,
    dev: Device,
    args: &BenchArgs,
    gemm: (Option<GemmCeiling>, Vec<GemmCeiling>, String),
) -> Result<Report> {
    let gpu = matches!(dev, Device::Cuda(_) | Device::Wgpu(_));
    let tokens = args.tokens.unwrap_or(if args.quick {
        64
    } else if gpu {
        4096
    } else {
        512
    });
    let env = ops::Env::new(be, args, gpu);
    let copy = env.copy_ceiling()?;
    let (gemm, gemm_all, gemm_note) = gemm;
    let ceilings = Ceilings {
        copy_gbs: copy.0,
        copy_elems: copy.1,
        gemm,
        gemm_all,
        gemm_note,
    };
    let mut rows = Vec::new();
    if args.ops {
        rows = env.all_ops(&args.shapes, tokens, &ceilings)?;
    }
    let mut steps = Vec::new();
    if let Some(spec) = &args.step {
        steps.push(step::run_step(
            be,
            spec,
            ceilings.gemm.as_ref(),
            args.progress,
        )?);
    }
    Ok(Report {
        tool: "beft bench".into(),
        beft_version: env!("CARGO_PKG_VERSION").into(),
        device: be.name(),
        device_spec: dev.to_string(),
        date_utc: utc_now(),
        host_threads: rayon::current_num_threads(),
        tokens,
        reps: args.reps,
        warmup: args.warmup,
        quick: args.quick,
        ceilings,
        ops: rows,
        steps,
        notes: vec![
            "median_s: median over reps of (time of launches_per_rep launches, device waited for) / launches_per_rep, after warmup launches".into(),
            "matmul flops = 2*m*n*k; attention forward flops = 4*batch*heads*seq*keys*head_dim (keys = the real (unmasked) keys; halved when causal), backward = 2.5x forward (FlashAttention's convention, recomputation included)".into(),
            "bytes = bytes each op must read + write once (f32 activations; frozen weights at the backend's weight width: bf16 on CUDA, f32 elsewhere)".into(),
            "pct_of_ceiling: flops rows against ceilings.gemm, bytes rows against ceilings.copy_gbs".into(),
            step::FLOPS_FORMULA.into(),
        ],
    })
}

/// The report as a text table (what `beft bench` prints).
pub fn render(r: &Report) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "device: {} ({})", r.device, r.date_utc);
    let _ = writeln!(
        s,
        "ceilings: copy {:.1} GB/s (read + write, {} MiB copied); GEMM {}",
        r.ceilings.copy_gbs,
        r.ceilings.copy_elems * 4 / (1 << 20),
        match &r.ceilings.gemm {
            Some(g) => format!("{:.3} TFLOP/s ({}: {})", g.tflops, g.source, g.detail),
            None => r.ceilings.gemm_note.clone(),
        }
    );
    for g in &r.ceilings.gemm_all {
        if Some(&g.source) != r.ceilings.gemm.as_ref().map(|x| &x.source) {
            let _ = writeln!(
                s,
                "          also {}: {:.3} TFLOP/s ({})",
                g.source, g.tflops, g.detail
            );
        }
    }
    if !r.ops.is_empty() {
        let _ = writeln!(
            s,
            "{} rows per op, median of {} reps after {} warm-up launches",
            r.tokens, r.reps, r.warmup
        );
        let _ = writeln!(
            s,
            "{:<10} {:<18} {:<40} {:>11} {:>14} {:>7}",
            "model", "op", "shape", "median", "rate", "% ceil"
        );
        for o in &r.ops {
            let rate = match (o.tflops, o.gbs) {
                (Some(t), _) => format!("{t:.3} TFLOP/s"),
                (None, Some(g)) => format!("{g:.1} GB/s"),
                _ => "-".into(),
            };
            let pct = o
                .pct_of_ceiling
                .map(|p| format!("{p:.1}"))
                .unwrap_or_else(|| "-".into());
            let _ = writeln!(
                s,
                "{:<10} {:<18} {:<40} {:>11} {:>14} {:>7}",
                o.model_shape,
                o.op,
                o.shape,
                fmt_secs(o.median_s),
                rate,
                pct
            );
        }
    }
    for st in &r.steps {
        let _ = writeln!(
            s,
            "step: {} ({}) batch {} x {} tokens, --bias {}: median {} -> {:.0} tokens/s; {:.3} TFLOP/s of model FLOPs{}; {}",
            st.model,
            st.kind,
            st.batch,
            st.seq,
            st.bias,
            fmt_secs(st.step_s_median),
            st.tokens_per_s,
            st.model_tflops,
            st.mfu
                .map(|m| format!(" = {:.1} % of the GEMM ceiling", m * 100.0))
                .unwrap_or_default(),
            match st.peak_device_bytes {
                Some(p) => {
                    let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
                    let mut m = format!("peak device memory {:.0} MiB", mib(p));
                    if let (Some(t), Some(i)) = (st.train_peak_device_bytes, st.infer_peak_device_bytes) {
                        m += &format!(
                            " (layers {}{}: training {:.0} MiB, forward only {:.0} MiB, ratio {:.2})",
                            st.offload,
                            if st.recompute { ", recompute" } else { "" },
                            mib(t),
                            mib(i),
                            t as f64 / i.max(1) as f64
                        );
                    }
                    m
                }
                None => format!(
                    "peak RSS {:.0} MiB (no device memory count on this backend)",
                    st.peak_rss_bytes as f64 / (1u64 << 20) as f64
                ),
            }
        );
        if let (Some(b), Some(r), Some(bound), Some(f)) = (
            st.streamed_bytes_per_step,
            st.upload_bytes_per_s,
            st.upload_bound_s,
            st.upload_bound_fraction,
        ) {
            let _ = writeln!(
                s,
                "  streamed {:.1} MiB of layer weights per step; the upload path moves {:.1} GB/s, \
                 so uploads alone take {}: {:.0} % of the step (100 % = the step runs at the upload bound)",
                b as f64 / (1u64 << 20) as f64,
                r / 1e9,
                fmt_secs(bound),
                f * 100.0
            );
        }
    }
    s
}

/// `--plot`: achieved share of the ceiling per op, as a PNG (ops without a
/// measured ceiling are left out).
pub fn plot(r: &Report, path: &std::path::Path) -> Result<usize> {
    let rows: Vec<&OpRow> = r
        .ops
        .iter()
        .filter(|o| o.pct_of_ceiling.is_some())
        .collect();
    if rows.is_empty() {
        return Err(crate::Error::file(
            path,
            "no op has a measured ceiling to plot (run the op table; on wgpu only memory-bound ops have one)",
        ));
    }
    let labels: Vec<String> = rows
        .iter()
        .map(|o| format!("{} {} {}", o.model_shape, o.op, o.shape))
        .collect();
    let values: Vec<f64> = rows
        .iter()
        .map(|o| o.pct_of_ceiling.unwrap_or(0.0))
        .collect();
    let group: Vec<usize> = rows
        .iter()
        .map(|o| usize::from(o.ceiling != "gemm"))
        .collect();
    crate::method::plot::percent_bars(
        path,
        &format!("beft bench on {} ({})", r.device, r.date_utc),
        &labels,
        &values,
        &group,
        &[
            "compute-bound: % of GEMM ceiling",
            "memory-bound: % of copy bandwidth",
        ],
    )?;
    Ok(rows.len())
}

/// Seconds in a readable unit.
pub fn fmt_secs(s: f64) -> String {
    if s >= 1.0 {
        format!("{s:.3} s")
    } else if s >= 1e-3 {
        format!("{:.3} ms", s * 1e3)
    } else {
        format!("{:.1} us", s * 1e6)
    }
}

/// Write the report as pretty JSON.
pub fn write_json(r: &Report, path: &Path) -> Result<()> {
    let text = serde_json::to_string_pretty(r).map_err(|e| Error::file(path, e))?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    std::fs::write(path, text + "\n").map_err(|e| Error::io(path, e))
}

/// Write a random model of `shape` to `dir`: OPT shapes streamed in `dtype`
/// (bf16, f16 or f32), BERT shapes in f32 (built in memory; BERT-base is
/// 0.4 GB). Returns the size of `model.safetensors`.
pub fn write_model(
    dir: &Path,
    shape: Shape,
    dtype: DType,
    seed: u64,
    progress: bool,
) -> Result<u64> {
    match shape {
        Shape::Bert(_, s) => {
            if dtype != DType::F32 {
                return Err(Error::msg(format!(
                    "--dtype {}: random BERT models are written in f32 only (use --dtype f32)",
                    dtype_name(dtype)
                )));
            }
            write_random_bert(dir, s, seed)?;
            let p = dir.join("model.safetensors");
            std::fs::metadata(&p)
                .map(|m| m.len())
                .map_err(|e| Error::io(&p, e))
        }
        Shape::Opt(_, s) => {
            let pb = if progress {
                indicatif::ProgressBar::new(0)
            } else {
                indicatif::ProgressBar::hidden()
            };
            pb.set_style(
                indicatif::ProgressStyle::with_template(
                    "{spinner} writing [{bar:30}] {bytes}/{total_bytes} eta {eta}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            let r = write_random_opt(dir, s, dtype, seed, &mut |done, total| {
                pb.set_length(total);
                pb.set_position(done);
            });
            pb.finish_and_clear();
            r
        }
    }
}

/// Parse `--dtype` (bf16, f16, f32).
pub fn parse_dtype(s: &str) -> Result<DType> {
    match s.trim().to_ascii_lowercase().as_str() {
        "bf16" | "bfloat16" => Ok(DType::BF16),
        "f16" | "fp16" | "float16" => Ok(DType::F16),
        "f32" | "fp32" | "float32" => Ok(DType::F32),
        other => Err(Error::msg(format!(
            "--dtype: unknown dtype '{other}' (bf16, f16, f32)"
        ))),
    }
}

fn dtype_name(d: DType) -> &'static str {
    match d {
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        DType::F32 => "f32",
    }
}

/// A directory removed when dropped (random models written for one run).
pub(crate) struct TempDir(pub PathBuf);

impl TempDir {
    pub(crate) fn new(tag: &str) -> Result<TempDir> {
        let base = std::env::temp_dir();
        for i in 0..1000u32 {
            let p = base.join(format!("beft-bench-{tag}-{}-{i}", std::process::id()));
            match std::fs::create_dir(&p) {
                Ok(()) => return Ok(TempDir(p)),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(Error::io(&p, e)),
            }
        }
        Err(Error::file(&base, "cannot create a temporary directory"))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The current UTC time, ISO 8601 (`2026-11-23T10:04:05Z`).
pub fn utc_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + (m <= 2) as i64;
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60
    )
}
