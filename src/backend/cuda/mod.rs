//! The CUDA backend: the op vocabulary as CUDA kernels (`kernels/*.cu`, one
//! file per op family, kernels named after the ops), launched through
//! `cudarc`'s driver API.
//!
//! - Activations, gradients, the trainable slab and optimizer state are f32
//!   (`type T = f32`). Frozen weight matrices (rank ≥ 2) are held on the GPU
//!   in bf16, converted from f32/f16 checkpoints on upload (round to nearest
//!   even); rank-1 weights (LayerNorm gains, frozen biases) stay f32. A
//!   `CudaBackend::with_weight_dtype(WeightDtype::F32)` backend keeps every
//!   weight in f32, for exact comparisons with the CPU.
//! - Products of f32 activations and bf16 weights run on the tensor cores
//!   (`mma.sync`), with the activation split into two bf16 halves so that
//!   only the weight's own rounding remains (see kernels/matmul.cu).
//! - The driver and NVRTC are loaded at run time (cudarc's
//!   `dynamic-loading`): the crate builds anywhere, and a machine without a
//!   driver gets "no CUDA driver found" from [`CudaBackend::new`] instead of
//!   a panic. Kernels are compiled by NVRTC for the device's architecture and
//!   cached on disk ([`ptx`]).
//! - Everything runs on the context's default stream, in order; a host read
//!   (`download`, `sum_sq`) waits for the work before it. The one exception,
//!   streamed layer weights, is copied on a side stream with explicit events
//!   (`stream.rs`). Launch and driver
//!   failures inside an op panic with the kernel's name (the `Backend`
//!   methods return no `Result`, as on the CPU, where a bad shape asserts).

pub mod blas;
pub mod ptx;
mod stream;

use std::collections::HashMap;
use std::sync::Arc;

use cudarc::driver::sys::{CUdevice_attribute, CUfunction_attribute};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, DeviceRepr, LaunchArgs, LaunchConfig,
    PushKernelArg,
};

use super::fault::{device_fault, max_device_memory, mib, oom_message};
use super::{Act, AdamW, AttnDims, Backend, CandidateIndex, Dropout, PoolKind};
use crate::error::{Error, Result};
use crate::weights::TensorView;

/// The message of a machine without the CUDA driver (`libcuda.so`).
pub const NO_DRIVER: &str = "no CUDA driver found: use --device cpu or --device wgpu";

/// Whether the CUDA driver library can be loaded on this machine (no
/// context is created). With `BEFT_CUDA_EMU` set, whether the emulator
/// loaded (see [`load_emulator`]).
pub fn driver_present() -> bool {
    if load_emulator().is_err() {
        return false;
    }
    // SAFETY: tries to dlopen libcuda by its usual names; nothing is called.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// The environment variable naming the CPU emulator of the kernels
/// (`kernels/emu/build.py` builds it: `target/cuda-emu/libcuda.so`).
pub const EMU_VAR: &str = "BEFT_CUDA_EMU";

/// Whether the CUDA "device" is the CPU emulator (`BEFT_CUDA_EMU` set).
pub fn emulated() -> bool {
    std::env::var_os(EMU_VAR).is_some_and(|v| !v.is_empty())
}

/// Loads the CPU emulator named by `BEFT_CUDA_EMU`, once, before cudarc
/// first looks for the driver: the emulator's soname is `libcuda.so`, so
/// cudarc's look-up by that name finds the loaded emulator instead of a
/// real driver. Nothing happens when the variable is unset or empty.
pub fn load_emulator() -> Result<()> {
    use std::ffi::{c_char, c_int, c_void, CStr, CString};
    use std::os::unix::ffi::OsStrExt;
    extern "C" {
        fn dlopen(filename: *const c_char, flag: c_int) -> *mut c_void;
        fn dlerror() -> *const c_char;
    }
    const RTLD_NOW: c_int = 2;
    const RTLD_GLOBAL: c_int = 0x100;
    static LOADED: std::sync::OnceLock<std::result::Result<(), String>> =
        std::sync::OnceLock::new();
    if !emulated() {
        return Ok(());
    }
    LOADED
        .get_or_init(|| {
            let path = std::env::var_os(EMU_VAR).unwrap_or_default();
            let shown = std::path::Path::new(&path).display().to_string();
            if !std::path::Path::new(&path).is_file() {
                return Err(format!(
                    "{EMU_VAR}={shown}: no such file (build it with python3 kernels/emu/build.py)"
                ));
            }
            let c = CString::new(path.as_bytes())
                .map_err(|_| format!("{EMU_VAR}={shown}: the path contains a NUL byte"))?;
            // SAFETY: dlopen of a path; the handle is kept for the life of
            // the process (never closed); dlerror returns a C string or null.
            let h = unsafe { dlopen(c.as_ptr(), RTLD_NOW | RTLD_GLOBAL) };
            if h.is_null() {
                let why = unsafe {
                    let e = dlerror();
                    if e.is_null() {
                        "unknown error".to_string()
                    } else {
                        CStr::from_ptr(e).to_string_lossy().into_owned()
                    }
                };
                return Err(format!(
                    "{EMU_VAR}={shown}: cannot load the emulator: {why}"
                ));
            }
            Ok(())
        })
        .clone()
        .map_err(Error::msg)
}

/// The CUDA devices, one line each ("name, sm_XY, N GiB"), or why there
/// are none. Creates a context on each device; compiles nothing.
pub fn list_devices() -> std::result::Result<Vec<String>, String> {
    load_emulator().map_err(|e| e.message().to_string())?;
    if !driver_present() {
        return Err(NO_DRIVER.to_string());
    }
    let n = CudaContext::device_count().map_err(|e| format!("CUDA: {e}"))?;
    (0..n.max(0) as usize)
        .map(|i| {
            let ctx = CudaContext::new(i).map_err(|e| format!("CUDA device {i}: {e}"))?;
            let name = ctx.name().unwrap_or_else(|_| "unknown GPU".into());
            let cc = ctx
                .compute_capability()
                .map_err(|e| format!("CUDA device {i}: {e}"))?;
            let total = ctx.total_mem().unwrap_or(0) as f64 / (1u64 << 30) as f64;
            Ok(format!("{name}, sm_{}{}, {total:.1} GiB", cc.0, cc.1))
        })
        .collect()
}

/// How frozen weight matrices are held on the GPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightDtype {
    /// bf16 (the default): half the memory and tensor-core products.
    Bf16,
    /// f32, as read (checks against the CPU with no weight rounding).
    F32,
}

/// A device buffer: f32, or a frozen weight in bf16 (raw bits). The logical
/// length is kept beside the allocation (an empty buffer owns one element:
/// CUDA allocates nothing of size zero).
pub enum CudaBuf {
    F32(CudaSlice<f32>, usize),
    Bf16(CudaSlice<u16>, usize),
}

/// Device integers (token ids, labels, indices).
pub struct CudaIds {
    data: CudaSlice<u32>,
    len: usize,
    /// Strictly increasing, so no index repeats (`scatter_add_rows` may
    /// then take every row in parallel).
    ascending: bool,
}

impl CudaIds {
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl CudaBuf {
    pub fn len(&self) -> usize {
        match self {
            CudaBuf::F32(_, n) | CudaBuf::Bf16(_, n) => *n,
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Whether the buffer holds bf16 values.
    pub fn is_bf16(&self) -> bool {
        matches!(self, CudaBuf::Bf16(..))
    }
    /// An f32 input the caller knows is f32 (the fused epilogues' buffers,
    /// checked by [`Epi::all_f32`]).
    fn f32(&self) -> &CudaSlice<f32> {
        match self {
            CudaBuf::F32(s, _) => s,
            CudaBuf::Bf16(..) => panic!("internal error: a bf16 buffer where f32 is needed"),
        }
    }

    fn f32_mut(&mut self) -> &mut CudaSlice<f32> {
        match self {
            CudaBuf::F32(s, _) => s,
            CudaBuf::Bf16(..) => panic!("internal error: a bf16 frozen weight used as an output"),
        }
    }
}

/// An f32 view of an input: the buffer itself, or a converted copy of a
/// bf16 weight (for ops that have no bf16 kernel; rare by construction,
/// since rank-1 weights are held in f32).
enum F32In<'a> {
    Borrowed(&'a CudaSlice<f32>),
    Owned(CudaSlice<f32>),
}

impl std::ops::Deref for F32In<'_> {
    type Target = CudaSlice<f32>;
    fn deref(&self) -> &CudaSlice<f32> {
        match self {
            F32In::Borrowed(s) => s,
            F32In::Owned(s) => s,
        }
    }
}

/// `AttnArgs` of kernels/attention.cu (same field order, all 4 bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct AttnArgs {
    batch: i32,
    seq: i32,
    kv_seq: i32,
    q_start: i32,
    heads: i32,
    kv_heads: i32,
    head_dim: i32,
    causal: i32,
    scale: f32,
    drop_p: f32,
    drop_scale: f32,
    seed_lo: u32,
    seed_hi: u32,
}

// SAFETY: plain old data with the C layout of the kernels' struct.
unsafe impl DeviceRepr for AttnArgs {}

/// The kernel for products of f32 activations and bf16 weights
/// (`BEFT_CUDA_GEMM`). `Tiled` and `Bf16` run `kernels/gemm.cu` (128×128
/// tiles, a three-stage `cp.async` pipeline, `ldmatrix`, `mma.sync`), `Wgmma`
/// and `WgmmaBf16` run `kernels/gemm_sm90.cu` (128×256 tiles, Hopper's
/// `wgmma`; compute capability 9.0 only), on the shapes they take —
/// activations k-contiguous, k and n multiples of 8: the forward `x·Wᵀ` and
/// input-gradient `dy·W` products of every supported model — and
/// `kernels/matmul.cu` on the rest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Gemm {
    /// `matmul_f32_bf16` everywhere (64×64 tiles, no pipeline).
    Simple,
    /// The tiled kernel with each activation split into two bf16 halves
    /// (only the weight's rounding remains, as in `matmul_f32_bf16`). Default.
    Tiled,
    /// The tiled kernel with activations rounded to bf16 once (as PyTorch's
    /// bf16 autocast does): half the tensor-core work, about 3 significant
    /// digits per product.
    Bf16,
    /// `Tiled`'s numerics (activations split in two bf16 halves) on the
    /// Hopper kernel. Elsewhere it falls back to `Tiled`.
    Wgmma,
    /// `Bf16`'s numerics on the Hopper kernel. Elsewhere: `Bf16`.
    WgmmaBf16,
}

impl Gemm {
    /// From `BEFT_CUDA_GEMM` (`tiled`, `bf16`, `wgmma`, `wgmma-bf16` or
    /// `simple`; default `tiled`).
    pub fn from_env() -> Result<Self> {
        match std::env::var("BEFT_CUDA_GEMM").as_deref() {
            Err(_) | Ok("") | Ok("tiled") => Ok(Gemm::Tiled),
            Ok("bf16") => Ok(Gemm::Bf16),
            Ok("wgmma") => Ok(Gemm::Wgmma),
            Ok("wgmma-bf16") => Ok(Gemm::WgmmaBf16),
            Ok("simple") => Ok(Gemm::Simple),
            Ok(v) => Err(Error::msg(format!(
                "BEFT_CUDA_GEMM={v}: expected tiled, bf16, wgmma, wgmma-bf16 or simple"
            ))),
        }
    }

    /// `self`, or the nearest kernel the device runs: the Hopper kernels
    /// need compute capability 9.0 (`sm90`) and `W_SMEM` bytes of shared
    /// memory per block (`smem_optin`), the tiled ones `GEMM_SMEM`.
    fn fitting(self, smem_optin: usize, sm90: bool) -> Self {
        let g = match self {
            Gemm::Wgmma if !sm90 || smem_optin < W_SMEM => Gemm::Tiled,
            Gemm::WgmmaBf16 if !sm90 || smem_optin < W_SMEM => Gemm::Bf16,
            g => g,
        };
        match g {
            Gemm::Tiled | Gemm::Bf16 if smem_optin < GEMM_SMEM => Gemm::Simple,
            g => g,
        }
    }

    /// Whether activations are split into two bf16 halves (else rounded once).
    fn split(self) -> bool {
        matches!(self, Gemm::Simple | Gemm::Tiled | Gemm::Wgmma)
    }
}

/// The attention kernels (`BEFT_CUDA_ATTN`), both in `kernels/attention.cu`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attn {
    /// f32 kernels on the CUDA cores, any head dimension up to
    /// [`MAX_HEAD_DIM`]. Default.
    F32,
    /// FlashAttention-2-style kernels on the tensor cores (`mma.sync`): q, k,
    /// v, dO, the probabilities and dS rounded to bf16, every sum in f32 (the
    /// numerics of PyTorch's SDPA under bf16 autocast). Head dimensions 32,
    /// 64 and 128; others run `F32`.
    Bf16,
}

impl Attn {
    /// From `BEFT_CUDA_ATTN` (`f32` or `bf16`; default `f32`).
    pub fn from_env() -> Result<Self> {
        Ok(if super::env_bf16("BEFT_CUDA_ATTN")? {
            Attn::Bf16
        } else {
            Attn::F32
        })
    }
}

/// Head dimensions of the tensor-core attention kernels, with the query
/// tile of their dk/dv kernel (`attention_*_bf16_d<DH>`).
const ATTN_MMA_DIMS: [(usize, usize); 3] = [(32, 64), (64, 64), (128, 32)];
/// Queries per block of the dq kernel and keys per tile or block of the
/// tensor-core attention kernels.
const ATTN_MMA_ROWS: usize = 64;
/// Queries per block (8 warps) of the tensor-core forward.
const ATTN_MMA_FWD_ROWS: usize = 128;

/// Dynamic shared memory of the tensor-core attention kernels at head
/// dimension `dh` (dk/dv query tile `bq`): (forward, dq, dk/dv) bytes.
/// Tiles are bf16 rows of `dh + 8`; the flags, lse and dsum rows f32.
fn attn_mma_smem(dh: usize, bq: usize) -> (usize, usize, usize) {
    let (row, t) = ((dh + 8) * 2, ATTN_MMA_ROWS);
    (
        (4 * t + ATTN_MMA_FWD_ROWS) * row + 2 * t * 4,
        (4 * t + 2 * t) * row + 2 * t * 4,
        (2 * t + 4 * bq) * row + 4 * bq * 4,
    )
}

/// Dynamic shared memory of the tiled GEMM: 3 stages × (128×32 f32 + 128×32 bf16).
const GEMM_SMEM: usize = 3 * (128 * 32 * 4 + 128 * 32 * 2);
/// Dynamic shared memory of the Hopper GEMM: 3 stages × (128×64 f32 +
/// 256×64 bf16), plus 1 KiB to align the stages to 1024 bytes.
const W_SMEM: usize = 3 * (128 * 64 * 4 + 256 * 64 * 2) + 1024;

/// The tiled GEMMs' fused epilogue codes (`epi` in kernels/common.cuh):
/// plus the activation's code, `EPI_FWD` also writes `act(c)`, `EPI_GRAD`
/// multiplies the product by `act'` of a saved input.
const EPI_FWD: i32 = 16;
const EPI_GRAD: i32 = 32;
/// Also the column sums of the stored values, per 128-row tile (a fused
/// bias gradient; `bias_grad_sum_f32` adds the tiles' sums).
const EPI_PART: i32 = 64;
/// A gated unit's epilogue (with EPI_FWD or EPI_GRAD; kernels/common.cuh).
const EPI_GLU: i32 = 128;

/// What the tiled GEMMs' epilogue does besides storing the product.
#[derive(Default)]
struct Epi<'a> {
    /// Add this bias (the slab or a frozen bias, and its offset).
    bias: Option<(&'a CudaBuf, usize)>,
    /// Fuse an activation (forward or gradient).
    act: Option<(Act, EpiAct<'a>)>,
    /// Write the column sums of each 128-row tile here (`ceil(m / 128) × n`).
    part: Option<&'a mut CudaSlice<f64>>,
}

/// The activation part of an [`Epi`].
enum EpiAct<'a> {
    /// Also write `act(c)` here (a linear layer's activation).
    Out(&'a mut CudaBuf),
    /// Multiply the product by `act'` of this (the activation's input).
    Grad(&'a CudaBuf),
    /// A gated unit's second product (`c` = up): also write `act(gate) ⊙ c`
    /// to `out`.
    GluOut {
        gate: &'a CudaBuf,
        out: &'a mut CudaBuf,
    },
    /// A gated unit's gradients from the product `dh`: `c` = dgate = dh ⊙
    /// up ⊙ act'(gate), and `dup` = dh ⊙ act(gate).
    GluGrad {
        gate: &'a CudaBuf,
        up: &'a CudaBuf,
        dup: &'a mut CudaBuf,
    },
}

impl EpiAct<'_> {
    /// The buffers the kernels take as aux, aux2 and out2 (see
    /// kernels/common.cuh), with what each must hold at least.
    fn bufs(&self) -> [Option<&CudaBuf>; 3] {
        match self {
            EpiAct::Out(o) => [Some(o), None, None],
            EpiAct::Grad(p) => [Some(p), None, None],
            EpiAct::GluOut { gate, out } => [Some(gate), Some(out), None],
            EpiAct::GluGrad { gate, up, dup } => [Some(gate), Some(up), Some(dup)],
        }
    }
}

impl Epi<'_> {
    /// Whether every buffer is f32, as the kernels take them (activations
    /// and biases always are; anything else goes the unfused way).
    fn all_f32(&self) -> bool {
        let f32 = |b: &CudaBuf| matches!(b, CudaBuf::F32(..));
        self.bias.is_none_or(|(b, _)| f32(b))
            && self
                .act
                .as_ref()
                .is_none_or(|(_, e)| e.bufs().into_iter().flatten().all(f32))
    }
}

/// Largest head dimension the attention kernels take (8 registers per lane).
pub const MAX_HEAD_DIM: usize = 256;
const ATTN_QPB: usize = 16; // queries per block (forward, dq)
const ATTN_KPB: usize = 8; // keys per block (dk/dv)

/// The backend's name: `label`, then its numerics and kernels.
fn describe(label: &str, weights: WeightDtype, gemm: Gemm, attn: Attn) -> String {
    format!(
        "{label}, f32 activations, {} weights{}{})",
        match weights {
            WeightDtype::Bf16 => "bf16",
            WeightDtype::F32 => "f32",
        },
        match (weights, gemm) {
            (WeightDtype::F32, _) => "",
            (_, Gemm::Tiled) => ", tiled GEMM",
            (_, Gemm::Bf16) => ", tiled GEMM on bf16-rounded activations",
            (_, Gemm::Wgmma) => ", wgmma GEMM",
            (_, Gemm::WgmmaBf16) => ", wgmma GEMM on bf16-rounded activations",
            (_, Gemm::Simple) => ", simple GEMM",
        },
        match attn {
            Attn::F32 => "",
            Attn::Bf16 => ", tensor-core attention",
        }
    )
}

/// The CUDA backend on one device.
pub struct CudaBackend {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    funcs: HashMap<&'static str, CudaFunction>,
    weights: WeightDtype,
    name: String,
    /// `cuda:N (GPU name, sm_XY`: the start of `name`.
    label: String,
    smem_optin: usize,
    /// Whether the Hopper kernels (`kernels/*_sm90.cu`) are loaded.
    sm90: bool,
    /// `BEFT_MAX_DEVICE_MEMORY`, and the free device memory when the
    /// backend was created (what the cap is measured from).
    cap: Option<u64>,
    free_at_start: u64,
    /// Most device bytes in use at once, sampled after each allocation.
    peak: std::sync::atomic::AtomicU64,
    /// Which kernel multiplies f32 activations by bf16 weights (`BEFT_CUDA_GEMM`).
    gemm: Gemm,
    /// Which attention kernels run (`BEFT_CUDA_ATTN`).
    attn: Attn,
    /// Side stream and pinned staging for streamed layer uploads
    /// ([`stream`]), made on first use.
    streamer: std::sync::OnceLock<stream::Streamer>,
}

/// A frozen weight converted for the device, still on the host.
enum HostWeight {
    Bf16(Vec<u16>),
    F32(Vec<f32>),
}

/// Every kernel the backend launches, by file.
pub const KERNELS: &[(&str, &[&str])] = &[
    (
        "activation.cu",
        &[
            "act_fwd_f32",
            "act_bwd_f32",
            "swiglu_fwd_f32",
            "swiglu_bwd_f32",
            "dropout_f32",
            "dropout_add_f32",
            "dropout_from_f32",
        ],
    ),
    ("adamw.cu", &["adamw_f32"]),
    (
        "attention.cu",
        &[
            "attention_fwd_f32",
            "attention_bwd_prep_f32",
            "attention_bwd_dq_f32",
            "attention_bwd_dkv_f32",
            "attention_cast_bf16",
            "attention_fwd_bf16_d32",
            "attention_bwd_dq_bf16_d32",
            "attention_bwd_dkv_bf16_d32",
            "attention_fwd_bf16_d64",
            "attention_bwd_dq_bf16_d64",
            "attention_bwd_dkv_bf16_d64",
            "attention_fwd_bf16_d128",
            "attention_bwd_dq_bf16_d128",
            "attention_bwd_dkv_bf16_d128",
        ],
    ),
    (
        "bias.cu",
        &[
            "bias_add_f32",
            "bias_grad_f32",
            "bias_grad_part_f32",
            "bias_grad_sum_f32",
        ],
    ),
    (
        "elementwise.cu",
        &[
            "add_f32",
            "scale_f32",
            "fill_f32",
            "copy_f32",
            "copy_bf16",
            "scale_rows_f32",
            "sum_sq_f32",
        ],
    ),
    (
        "embedding.cu",
        &[
            "embedding_fwd_f32",
            "embedding_fwd_bf16",
            "scatter_add_rows_f32",
            "scatter_add_rows_distinct_f32",
        ],
    ),
    (
        "gemm.cu",
        &[
            "gemm_nt_f32_bf16_split",
            "gemm_nn_f32_bf16_split",
            "gemm_nt_f32_bf16",
            "gemm_nn_f32_bf16",
        ],
    ),
    (
        "gemm_sm90.cu",
        &[
            "gemm_sm90_nt_f32_bf16_split",
            "gemm_sm90_nn_f32_bf16_split",
            "gemm_sm90_nt_f32_bf16",
            "gemm_sm90_nn_f32_bf16",
        ],
    ),
    (
        "loss.cu",
        &[
            "cross_entropy_f32",
            "mse_f32",
            "candidate_scores_f32",
            "candidate_examples_f32",
            "candidate_rows_f32",
        ],
    ),
    (
        "matmul.cu",
        &["matmul_f32", "matmul_f32_bf16", "matmul_bf16_bf16"],
    ),
    (
        "norm.cu",
        &[
            "layernorm_fwd_f32",
            "layernorm_bwd_f32",
            "rmsnorm_fwd_f32",
            "rmsnorm_bwd_f32",
            "layernorm_fwd_f32_w1024",
            "layernorm_bwd_f32_w1024",
            "rmsnorm_fwd_f32_w1024",
            "rmsnorm_bwd_f32_w1024",
            "layernorm_fwd_f32_w4096",
            "layernorm_bwd_f32_w4096",
            "rmsnorm_fwd_f32_w4096",
            "rmsnorm_bwd_f32_w4096",
            "layernorm_res_fwd_f32_w1024",
            "layernorm_res_fwd_f32_w4096",
        ],
    ),
    ("pool.cu", &["pool_fwd_f32", "pool_bwd_f32"]),
    ("rope.cu", &["rope_f32"]),
];

const THREADS: u32 = 256;

/// Rows per chunk of the two-pass bias gradient (`bias_grad_part_f32`);
/// fewer rows take the one-pass kernel.
const BIAS_GRAD_ROWS: usize = 256;

/// A 1-D launch over `n` elements (grid-stride kernels), `None` when empty.
fn cfg_1d(n: usize) -> Option<LaunchConfig> {
    if n == 0 {
        return None;
    }
    let blocks = n.div_ceil(THREADS as usize).min(1 << 16) as u32;
    Some(LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    })
}

/// A size as the kernels' `int` (sizes are checked, never truncated).
fn i32_of(what: &str, n: usize) -> i32 {
    i32::try_from(n).unwrap_or_else(|_| panic!("CUDA backend: {what} = {n} exceeds 2^31 - 1"))
}

fn seed_halves(seed: u64) -> (u32, u32) {
    (seed as u32, (seed >> 32) as u32)
}

fn act_code(act: Act) -> i32 {
    match act {
        Act::Gelu => 0,
        Act::GeluTanh => 1,
        Act::Relu => 2,
        Act::Tanh => 3,
        Act::Silu => 4,
    }
}

fn pool_code(kind: PoolKind) -> i32 {
    match kind {
        PoolKind::Cls => 0,
        PoolKind::Mean => 1,
    }
}

impl CudaBackend {
    /// The backend on device `ordinal`, weights in bf16. Fails with
    /// [`NO_DRIVER`] on a machine without the CUDA driver.
    pub fn new(ordinal: usize) -> Result<Self> {
        Self::with_weight_dtype(ordinal, WeightDtype::Bf16)
    }

    /// The backend with a chosen weight precision.
    pub fn with_weight_dtype(ordinal: usize, weights: WeightDtype) -> Result<Self> {
        load_emulator()?;
        if !driver_present() {
            return Err(Error::msg(NO_DRIVER));
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| {
            Error::msg(format!(
                "CUDA device {ordinal}: cannot create a context: {e}"
            ))
        })?;
        // One stream, in-order: cudarc's per-buffer events (for multi-stream
        // synchronisation) would only add work to every launch.
        // SAFETY: every buffer of this backend lives on `stream`.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.default_stream();
        let dev_err =
            |e: cudarc::driver::DriverError| Error::msg(format!("CUDA device {ordinal}: {e}"));
        let cc = ctx.compute_capability().map_err(dev_err)?;
        if cc.0 < 8 {
            return Err(Error::msg(format!(
                "CUDA device {ordinal}: compute capability {}.{}; the kernels need 8.0 or newer (bf16 tensor cores)",
                cc.0, cc.1
            )));
        }
        let smem_optin = ctx
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
            .map_err(dev_err)? as usize;
        let mut funcs = HashMap::new();
        for (file, ptx) in ptx::load_all(cc)? {
            let names = KERNELS
                .iter()
                .find(|(f, _)| *f == file)
                .map(|(_, n)| *n)
                .unwrap_or(&[]);
            let loaded = ctx
                .load_module(ptx)
                .map_err(|e| {
                    Error::msg(format!(
                        "CUDA device {ordinal}: loading the PTX of kernels/{file} failed: {e} \
                         (CUDA_ERROR_UNSUPPORTED_PTX_VERSION means NVRTC is newer than the \
                         driver: update the driver or use an older NVRTC)"
                    ))
                })
                .and_then(|module| {
                    names
                        .iter()
                        .map(|name| {
                            module.load_function(name).map(|f| (*name, f)).map_err(|e| {
                                Error::msg(format!("kernels/{file}: kernel {name} not found: {e}"))
                            })
                        })
                        .collect::<Result<Vec<_>>>()
                });
            match loaded {
                Ok(fs) => funcs.extend(fs),
                // The Hopper kernels have portable twins: without them the
                // backend still runs (BEFT_CUDA_GEMM=wgmma falls back).
                Err(e) if ptx::optional(file) => eprintln!("warning: {e}; not loaded"),
                Err(e) => return Err(e),
            }
        }
        // The attention kernels size their shared memory by head dimension;
        // allow them the device's opt-in maximum.
        for name in KERNELS
            .iter()
            .find(|(f, _)| *f == "attention.cu")
            .map(|(_, n)| *n)
            .unwrap_or(&[])
            .iter()
            .filter(|n| n.contains("_fwd_") || n.contains("_dq_") || n.contains("_dkv_"))
        {
            funcs[name]
                .set_attribute(
                    CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    smem_optin as i32,
                )
                .map_err(dev_err)?;
        }
        // The tiled GEMM's three-stage pipeline takes 72 KiB of shared
        // memory: allowed whenever the GPU has it, whichever kernel the
        // environment picks (`set_gemm` may switch to the tiled one later).
        // The Hopper GEMM (compute capability 9.0 alone) takes 193 KiB.
        let sm90 = funcs.contains_key("gemm_sm90_nt_f32_bf16");
        let gemm = Gemm::from_env()?.fitting(smem_optin, sm90);
        for (file, bytes, probe) in [
            ("gemm.cu", GEMM_SMEM, Gemm::Tiled),
            ("gemm_sm90.cu", W_SMEM, Gemm::Wgmma),
        ] {
            if probe.fitting(smem_optin, sm90) != probe {
                continue;
            }
            for name in KERNELS
                .iter()
                .find(|(f, _)| *f == file)
                .map(|(_, n)| *n)
                .unwrap_or(&[])
            {
                funcs[name]
                    .set_attribute(
                        CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                        bytes as i32,
                    )
                    .map_err(dev_err)?;
            }
        }
        let attn = Attn::from_env()?;
        let dev_name = ctx.name().unwrap_or_else(|_| "unknown GPU".into());
        let label = format!("cuda:{ordinal} ({dev_name}, sm_{}{}", cc.0, cc.1);
        let name = describe(&label, weights, gemm, attn);
        let cap = max_device_memory()?;
        let free_at_start = ctx.mem_get_info().map(|(f, _)| f as u64).unwrap_or(0);
        Ok(CudaBackend {
            ctx,
            stream,
            funcs,
            weights,
            name,
            label,
            smem_optin,
            sm90,
            cap,
            free_at_start,
            peak: std::sync::atomic::AtomicU64::new(0),
            gemm,
            attn,
            streamer: std::sync::OnceLock::new(),
        })
    }

    /// The kernel for f32 × bf16 products (tests compare them).
    pub fn set_gemm(&mut self, gemm: Gemm) {
        self.gemm = gemm.fitting(self.smem_optin, self.sm90);
        self.name = describe(&self.label, self.weights, self.gemm, self.attn);
    }

    /// The backend of a run on device `ordinal`: [`CudaBackend::new`], with
    /// activations rounded to bf16 in the products where `bf16` (`--bf16`).
    /// Errors name the device.
    pub fn for_run(ordinal: usize, bf16: bool) -> Result<Self> {
        let mut be = Self::new(ordinal).map_err(|e| {
            e.context(format!(
                "--device {}",
                crate::backend::Device::Cuda(ordinal)
            ))
        })?;
        if bf16 {
            be.round_activations_to_bf16();
        }
        Ok(be)
    }

    /// bf16 products (`--bf16`): the kernel in use, or the one
    /// `BEFT_CUDA_GEMM` asked for, with activations rounded to bf16 as
    /// PyTorch's bf16 autocast does (the tiled or the Hopper kernel).
    pub fn round_activations_to_bf16(&mut self) {
        let g = match self.gemm {
            Gemm::Wgmma | Gemm::WgmmaBf16 => Gemm::WgmmaBf16,
            _ => Gemm::Bf16,
        };
        self.set_gemm(g);
    }

    /// The kernel in use for f32 × bf16 products.
    pub fn gemm(&self) -> Gemm {
        self.gemm
    }

    /// The attention kernels (tests compare them).
    pub fn set_attn(&mut self, attn: Attn) {
        self.attn = attn;
        self.name = describe(&self.label, self.weights, self.gemm, self.attn);
    }

    /// The attention kernels in use.
    pub fn attn(&self) -> Attn {
        self.attn
    }

    /// The dk/dv query tile of the tensor-core attention kernels, when they
    /// run at head dimension `dh` (`Attn::Bf16`, a dimension they were
    /// written for, enough shared memory).
    fn attn_mma(&self, dh: usize) -> Option<usize> {
        if self.attn != Attn::Bf16 {
            return None;
        }
        let &(_, bq) = ATTN_MMA_DIMS.iter().find(|(d, _)| *d == dh)?;
        let (f, q, kv) = attn_mma_smem(dh, bq);
        (f.max(q).max(kv) <= self.smem_optin).then_some(bq)
    }

    /// A bf16 copy (round to nearest even) of the first `n` (even) values
    /// of `x`, for the tensor-core attention kernels.
    fn bf16_copy(&self, x: &CudaSlice<f32>, n: usize) -> CudaSlice<u16> {
        // SAFETY: device memory that the cast kernel writes in full before
        // anything reads it.
        let mut out = self.alloc_by(n, |s, n| unsafe { s.alloc::<u16>(n) });
        if let Some(cfg) = cfg_1d(n / 2) {
            let n2 = (n / 2) as i64;
            self.launch("attention_cast_bf16", cfg, |b| {
                b.arg(&mut out).arg(x).arg(&n2);
            });
        }
        out
    }

    /// The CUDA context (for tests and tools).
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// Wait for all queued work (surfacing any asynchronous kernel error).
    pub fn synchronize(&self) -> Result<()> {
        self.stream
            .synchronize()
            .map_err(|e| Error::msg(format!("CUDA: {e}")))
    }

    fn f(&self, name: &str) -> &CudaFunction {
        self.funcs
            .get(name)
            .unwrap_or_else(|| panic!("internal error: CUDA kernel {name} not loaded"))
    }

    fn alloc_f32(&self, n: usize) -> CudaSlice<f32> {
        self.alloc_zeroed::<f32>(n)
    }

    /// Launch a matmul kernel on c'[m' x n'] (+)= a'·b' with 64 x 64 output
    /// tiles: `dims` = (m', n', k), `strides` = (a' row, a' col, b' row,
    /// b' col, c' row, c' col).
    #[allow(clippy::too_many_arguments)]
    fn matmul_launch<TA, TB>(
        &self,
        kernel: &str,
        threads: u32,
        c: &mut CudaSlice<f32>,
        (a, b): (&CudaSlice<TA>, &CudaSlice<TB>),
        dims: [i32; 3],
        strides: [i32; 6],
        acc: i32,
    ) {
        let (rows, cols) = (dims[0] as usize, dims[1] as usize);
        let gy = rows.div_ceil(64);
        assert!(gy <= 65_535, "CUDA matmul: {rows} rows exceed the grid");
        let cfg = LaunchConfig {
            grid_dim: (cols.div_ceil(64) as u32, gy as u32, 1),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: 0,
        };
        self.launch(kernel, cfg, |l| {
            l.arg(c).arg(a).arg(b);
            for d in &dims {
                l.arg(d);
            }
            for st in &strides {
                l.arg(st);
            }
            l.arg(&acc);
        });
    }

    /// Whether the tiled tensor-core GEMMs (gemm.cu / gemm_sm90.cu) take
    /// `op(a)·op(b)` of f32 activations and bf16 weights at this shape.
    fn tiled_fits(&self, m: usize, n: usize, k: usize, ta: bool) -> bool {
        self.gemm != Gemm::Simple
            && !ta
            && k.is_multiple_of(8)
            && n.is_multiple_of(8)
            && m.div_ceil(128) <= 65_535
    }

    /// Whether [`Self::product`] of `a` (m × k) and `b` (k × n, `op(b)`
    /// not transposed in `a`) runs the tiled GEMMs with a fused epilogue
    /// whose buffers are `bufs`: f32 activations times bf16 weights at
    /// shapes the tiled kernels take, nothing empty, every buffer f32 (when
    /// so, `product` returns true and the epilogue has done its work).
    fn fuses(
        &self,
        a: &CudaBuf,
        b: &CudaBuf,
        (m, n, k): (usize, usize, usize),
        bufs: &[&CudaBuf],
    ) -> bool {
        let f32 = |x: &CudaBuf| matches!(x, CudaBuf::F32(..));
        f32(a)
            && matches!(b, CudaBuf::Bf16(..))
            && self.tiled_fits(m, n, k, false)
            && m > 0
            && n > 0
            && k > 0
            && bufs.iter().all(|x| f32(x))
    }

    /// `c (+)= a·op(b)` on the tiled GEMMs (the caller checked
    /// [`Self::tiled_fits`]) through the epilogue `epi` (f32 buffers, see
    /// [`Epi::all_f32`]): `dims` = (m, n, k).
    fn tiled_gemm(
        &self,
        c: &mut CudaSlice<f32>,
        (a, b): (&CudaSlice<f32>, &CudaSlice<u16>),
        [mi, ni, ki]: [i32; 3],
        tb: bool,
        acc: i32,
        epi: Epi<'_>,
    ) {
        // lda = k, ldb = k (NT: b is [n][k]) or n (NN: b is [k][n]), ldc = n.
        let hopper = matches!(self.gemm, Gemm::Wgmma | Gemm::WgmmaBf16);
        let kernel = match (hopper, tb, self.gemm.split()) {
            (false, true, true) => "gemm_nt_f32_bf16_split",
            (false, false, true) => "gemm_nn_f32_bf16_split",
            (false, true, false) => "gemm_nt_f32_bf16",
            (false, false, false) => "gemm_nn_f32_bf16",
            (true, true, true) => "gemm_sm90_nt_f32_bf16_split",
            (true, false, true) => "gemm_sm90_nn_f32_bf16_split",
            (true, true, false) => "gemm_sm90_nt_f32_bf16",
            (true, false, false) => "gemm_sm90_nn_f32_bf16",
        };
        let ldb = if tb { ki } else { ni };
        let (tile_n, smem) = if hopper {
            (256, W_SMEM)
        } else {
            (128, GEMM_SMEM)
        };
        let cfg = LaunchConfig {
            grid_dim: ((ni as u32).div_ceil(tile_n), (mi as u32).div_ceil(128), 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: smem as u32,
        };
        // No bias: offset -1 and any valid pointer (the kernel reads none);
        // the same for the activation's buffer with EPI_NONE.
        let (bias, bias_off) = match epi.bias {
            Some((CudaBuf::F32(s, _), off)) => (s, i32_of("bias_off", off)),
            _ => (a, -1),
        };
        let code = match &epi.act {
            Some((act, EpiAct::Out(_))) => EPI_FWD + act_code(*act),
            Some((act, EpiAct::Grad(_))) => EPI_GRAD + act_code(*act),
            Some((act, EpiAct::GluOut { .. })) => EPI_FWD + EPI_GLU + act_code(*act),
            Some((act, EpiAct::GluGrad { .. })) => EPI_GRAD + EPI_GLU + act_code(*act),
            None => 0,
        } | if epi.part.is_some() { EPI_PART } else { 0 };

        // aux, part, aux2, out2: any valid pointer where the epilogue reads
        // none (kernels/common.cuh).
        enum Arg<'a> {
            In(&'a CudaSlice<f32>),
            Out(&'a mut CudaSlice<f32>),
            Unused,
        }
        impl<'a> Arg<'a> {
            fn push(self, l: &mut LaunchArgs<'a>, any: &'a CudaSlice<f32>) {
                match self {
                    Arg::In(s) => l.arg(s),
                    Arg::Out(s) => l.arg(s),
                    Arg::Unused => l.arg(any),
                };
            }
        }
        let mut act = epi.act;
        let (aux, aux2, out2) = match &mut act {
            Some((_, EpiAct::Out(o))) => (Arg::Out(o.f32_mut()), Arg::Unused, Arg::Unused),
            Some((_, EpiAct::Grad(p))) => (Arg::In(p.f32()), Arg::Unused, Arg::Unused),
            Some((_, EpiAct::GluOut { gate, out })) => {
                (Arg::In(gate.f32()), Arg::Out(out.f32_mut()), Arg::Unused)
            }
            Some((_, EpiAct::GluGrad { gate, up, dup })) => (
                Arg::In(gate.f32()),
                Arg::In(up.f32()),
                Arg::Out(dup.f32_mut()),
            ),
            None => (Arg::Unused, Arg::Unused, Arg::Unused),
        };
        self.launch(kernel, cfg, |l| {
            l.arg(c)
                .arg(a)
                .arg(b)
                .arg(&mi)
                .arg(&ni)
                .arg(&ki)
                .arg(&ki)
                .arg(&ldb)
                .arg(&ni)
                .arg(&acc)
                .arg(bias)
                .arg(&bias_off)
                .arg(&code);
            aux.push(l, a);
            match epi.part {
                Some(p) => l.arg(p),
                None => l.arg(a),
            };
            aux2.push(l, a);
            out2.push(l, a);
        });
    }

    /// `c (+)= op(a)·op(b)` (see [`Backend::matmul`]), through the
    /// epilogue `epi` where the tiled GEMMs run: returns whether it was
    /// (else the caller does its work: `c` then holds the bare product).
    #[allow(clippy::too_many_arguments)]
    fn product(
        &self,
        c: &mut CudaBuf,
        a: &CudaBuf,
        b: &CudaBuf,
        m: usize,
        n: usize,
        k: usize,
        ta: bool,
        tb: bool,
        accumulate: bool,
        epi: Epi<'_>,
    ) -> bool {
        self.need("matmul a", a.len(), m * k);
        self.need("matmul b", b.len(), k * n);
        self.need("matmul c", c.len(), m * n);
        if let Some((bias, off)) = epi.bias {
            self.need("matmul bias", bias.len(), off + n);
        }
        if let Some((_, e)) = &epi.act {
            for x in e.bufs().into_iter().flatten() {
                self.need("fused epilogue buffer", x.len(), m * n);
            }
        }
        if m == 0 || n == 0 {
            return false;
        }
        if k == 0 {
            if !accumulate {
                self.fill_prefix(c, m * n);
            }
            return false;
        }
        let (mi, ni, ki) = (i32_of("m", m), i32_of("n", n), i32_of("k", k));
        // Strides of op(a) (m x k), op(b) (k x n) and c.
        let (sam, sak) = if ta { (1, mi) } else { (ki, 1) };
        let (sbk, sbn) = if tb { (1, ki) } else { (ni, 1) };
        let (scm, scn) = (ni, 1);
        let acc = accumulate as i32;
        // The (bf16, f32) case computes cᵀ = op(b)ᵀ·op(a)ᵀ so that the bf16
        // operand is the kernel's b.
        let c = c.f32_mut();
        match (a, b) {
            (CudaBuf::F32(a, _), CudaBuf::F32(b, _)) => self.matmul_launch(
                "matmul_f32",
                256,
                c,
                (a, b),
                [mi, ni, ki],
                [sam, sak, sbk, sbn, scm, scn],
                acc,
            ),
            (CudaBuf::F32(a, _), CudaBuf::Bf16(b, _)) if self.tiled_fits(m, n, k, ta) => {
                // The bias and activation in the epilogue (their buffers are
                // f32: rank-1 tensors stay f32, activations are f32).
                let fused = epi.all_f32();
                let epi = if fused { epi } else { Epi::default() };
                self.tiled_gemm(c, (a, b), [mi, ni, ki], tb, acc, epi);
                return fused;
            }
            (CudaBuf::F32(a, _), CudaBuf::Bf16(b, _)) => self.matmul_launch(
                "matmul_f32_bf16",
                128,
                c,
                (a, b),
                [mi, ni, ki],
                [sam, sak, sbk, sbn, scm, scn],
                acc,
            ),
            (CudaBuf::Bf16(a, _), CudaBuf::Bf16(b, _)) => self.matmul_launch(
                "matmul_bf16_bf16",
                128,
                c,
                (a, b),
                [mi, ni, ki],
                [sam, sak, sbk, sbn, scm, scn],
                acc,
            ),
            // cᵀ (n x m) = op(b)ᵀ (n x k) · op(a)ᵀ (k x m), stored into c:
            // a'(i, p) = op(b)(p, i); b'(p, j) = op(a)(j, p); c'(i, j) = c(j, i).
            (CudaBuf::Bf16(a, _), CudaBuf::F32(b, _)) => self.matmul_launch(
                "matmul_f32_bf16",
                128,
                c,
                (b, a),
                [ni, mi, ki],
                [sbn, sbk, sak, sam, scn, scm],
                acc,
            ),
        }
        false
    }

    /// The fused dropouts (`dropout_add_f32`, `dropout_from_f32`): y and x
    /// f32, the mask of `dropout_f32`; p = 0 is the plain add or copy.
    fn dropout_pair(
        &self,
        kernel: &str,
        y: &mut CudaBuf,
        x: &CudaBuf,
        n: usize,
        p: f32,
        seed: u64,
    ) {
        self.need("dropout y", y.len(), n);
        self.need("dropout x", x.len(), n);
        let Some(cfg) = cfg_1d(n) else { return };
        let x = self.f32_in(x);
        let scale = (1.0 / (1.0 - p as f64)) as f32;
        let (lo, hi) = seed_halves(seed);
        let nn = i32_of("n", n);
        let y = y.f32_mut();
        self.launch(kernel, cfg, |b| {
            b.arg(y)
                .arg(&*x)
                .arg(&nn)
                .arg(&p)
                .arg(&scale)
                .arg(&lo)
                .arg(&hi);
        });
    }

    /// Device bytes in use since the backend was made (free memory at
    /// creation minus free memory now: other processes' use shows too).
    fn used_bytes(&self) -> u64 {
        let (free, _) = self.ctx.mem_get_info().unwrap_or((0, 0));
        self.free_at_start.saturating_sub(free as u64)
    }

    /// Whether the device holds `t` as bf16: matrices, when weights are
    /// bf16 (vectors stay f32).
    fn bf16_weight(&self, t: &TensorView) -> bool {
        self.weights == WeightDtype::Bf16 && t.shape.len() >= 2
    }

    /// A frozen weight as the device holds it, on the host: bf16 bits for
    /// matrices (when weights are bf16), else f32.
    fn host_weight(&self, t: &TensorView) -> HostWeight {
        let n = t.numel();
        if self.bf16_weight(t) {
            let mut bits = vec![0u16; n];
            stream::par_fill(t, &mut bits, stream::fill_bf16);
            HostWeight::Bf16(bits)
        } else {
            HostWeight::F32(t.to_f32_vec())
        }
    }

    /// The copy stream and staging of streamed layer weights (see [`stream`]).
    fn streamer(&self) -> &stream::Streamer {
        self.streamer.get_or_init(|| {
            stream::Streamer::new(&self.ctx, &self.stream)
                .unwrap_or_else(|e| self.lost("creating the copy stream", e))
        })
    }

    /// Whether streamed layer weights go through pinned staging buffers
    /// (`None` before the first streamed upload).
    pub fn pinned_staging(&self) -> Option<bool> {
        self.streamer.get().map(|s| s.pinned())
    }

    /// An out-of-memory [`device_fault`] when `bytes` more would exceed the
    /// `BEFT_MAX_DEVICE_MEMORY` cap.
    fn check_cap(&self, bytes: u64) {
        if let Some(cap) = self.cap {
            let used = self.used_bytes();
            if used + bytes > cap {
                device_fault(oom_message(
                    &self.name,
                    bytes,
                    cap.saturating_sub(used),
                    cap,
                    true,
                ));
            }
        }
    }

    /// `n` zeroed elements. Out of device memory (or over the
    /// `BEFT_MAX_DEVICE_MEMORY` cap) is a [`device_fault`] that says how much
    /// was asked and what was free.
    fn alloc_zeroed<T: DeviceRepr + cudarc::driver::ValidAsZeroBits>(
        &self,
        n: usize,
    ) -> CudaSlice<T> {
        self.alloc_by(n, |s, n| s.alloc_zeros::<T>(n))
    }

    /// `n` f32 elements left as the allocator hands them over (for an op
    /// that writes every one: [`Backend::output`]).
    fn alloc_f32_unset(&self, n: usize) -> CudaSlice<f32> {
        // SAFETY: device memory, never read by the host before a kernel
        // writes it (the contract of `output`); any bits are a valid f32.
        self.alloc_by(n, |s, n| unsafe { s.alloc::<f32>(n) })
    }

    /// At least one element through `alloc`, after the cap check; failures
    /// as [`CudaBackend::alloc_failed`].
    fn alloc_by<T: DeviceRepr>(
        &self,
        n: usize,
        alloc: impl FnOnce(
            &Arc<CudaStream>,
            usize,
        ) -> std::result::Result<CudaSlice<T>, cudarc::driver::DriverError>,
    ) -> CudaSlice<T> {
        let n = n.max(1);
        let bytes = (n * std::mem::size_of::<T>()) as u64;
        self.check_cap(bytes);
        let buf = alloc(&self.stream, n)
            .unwrap_or_else(|e| self.alloc_failed(bytes, &format!("allocating {}", mib(bytes)), e));
        self.note_peak();
        buf
    }

    /// A failed operation that needed `bytes` of new device memory: out of
    /// memory (a [`device_fault`] saying how much was asked and what was
    /// free) when less than that is free, else the context is lost.
    fn alloc_failed(&self, bytes: u64, during: &str, e: impl std::fmt::Display) -> ! {
        let (free, total) = self.ctx.mem_get_info().unwrap_or((0, 0));
        if (free as u64) < bytes {
            device_fault(format!(
                "{} ({e})",
                oom_message(&self.name, bytes, free as u64, total as u64, false)
            ))
        }
        self.lost(during, e)
    }

    fn note_peak(&self) {
        self.peak
            .fetch_max(self.used_bytes(), std::sync::atomic::Ordering::Relaxed);
    }

    /// A CUDA error outside an allocation: the context is unusable (an
    /// illegal address, a launch failure, an ECC error, a lost or reset GPU).
    fn lost(&self, during: &str, e: impl std::fmt::Display) -> ! {
        device_fault(format!(
            "{}: CUDA error {during}: {e}; the GPU context is unusable (device lost or reset, or a kernel fault); the run cannot go on on this device",
            self.name
        ))
    }

    /// Launch kernel `name`; `push` adds its arguments in order. `'a` is
    /// the call's own span: the arguments need only outlive the launch.
    fn launch<'a>(&'a self, name: &str, cfg: LaunchConfig, push: impl FnOnce(&mut LaunchArgs<'a>)) {
        let f = self.f(name);
        let mut b = self.stream.launch_builder(f);
        push(&mut b);
        // SAFETY: argument lists match the kernels' signatures (one call site
        // per kernel, next to its op); every size was checked against the
        // buffers' lengths by the caller.
        unsafe { b.launch(cfg) }.unwrap_or_else(|e| self.lost(&format!("launching {name}"), e));
    }

    /// An f32 view of an input buffer (converting a bf16 weight).
    fn f32_in<'a>(&self, buf: &'a CudaBuf) -> F32In<'a> {
        match buf {
            CudaBuf::F32(s, _) => F32In::Borrowed(s),
            CudaBuf::Bf16(s, n) => {
                let mut out = self.alloc_f32(*n);
                if let Some(cfg) = cfg_1d(*n) {
                    let (zero, nn) = (0i32, i32_of("n", *n));
                    self.launch("copy_bf16", cfg, |b| {
                        b.arg(&mut out).arg(&zero).arg(s).arg(&zero).arg(&nn);
                    });
                }
                F32In::Owned(out)
            }
        }
    }

    fn need(&self, what: &str, buf_len: usize, n: usize) {
        assert!(
            buf_len >= n,
            "CUDA backend: {what} holds {buf_len} elements, {n} needed"
        );
    }

    fn upload_bf16(&self, bits: &[u16]) -> CudaBuf {
        let n = bits.len();
        let s = if n == 0 {
            self.alloc_zeroed::<u16>(1)
        } else {
            self.stream
                .clone_htod(bits)
                .unwrap_or_else(|e| self.lost(&format!("uploading {n} bf16 values"), e))
        };
        self.note_peak();
        CudaBuf::Bf16(s, n)
    }

    /// Tile size of the attention kernels: the largest of 32/16/8 rows whose
    /// shared memory fits the device.
    fn attn_tile(&self, what: &str, bytes: impl Fn(usize) -> usize) -> (u32, usize) {
        for t in [32usize, 16, 8] {
            let b = bytes(t);
            if b <= self.smem_optin {
                return (b as u32, t);
            }
        }
        panic!("CUDA: {what}: head dimension too large for shared memory")
    }

    fn attn_args(&self, dims: &AttnDims, dropout: Option<Dropout>) -> AttnArgs {
        assert!(
            dims.head_dim >= 1 && dims.head_dim <= MAX_HEAD_DIM,
            "CUDA attention: head_dim {} outside 1..={MAX_HEAD_DIM}",
            dims.head_dim
        );
        assert!(
            dims.kv_heads >= 1 && dims.heads.is_multiple_of(dims.kv_heads),
            "CUDA attention: {} heads not a multiple of {} kv heads",
            dims.heads,
            dims.kv_heads
        );
        // Heads and batch are the grids' y and z dimensions (at most 65535).
        assert!(
            dims.heads <= 65_535 && dims.batch <= 65_535,
            "CUDA attention: {} heads x batch {} exceed the grid",
            dims.heads,
            dims.batch
        );
        let (p, seed) = match dropout {
            Some(d) if d.p > 0.0 => (d.p, d.seed),
            _ => (0.0, 0),
        };
        let (seed_lo, seed_hi) = seed_halves(seed);
        AttnArgs {
            batch: i32_of("batch", dims.batch),
            seq: i32_of("seq", dims.seq),
            kv_seq: i32_of("kv_seq", dims.kv_seq),
            q_start: i32_of("q_start", dims.q_start),
            heads: i32_of("heads", dims.heads),
            kv_heads: i32_of("kv_heads", dims.kv_heads),
            head_dim: i32_of("head_dim", dims.head_dim),
            causal: dims.causal as i32,
            scale: dims.scale as f32,
            drop_p: p,
            drop_scale: if p > 0.0 {
                (1.0 / (1.0 - p as f64)) as f32
            } else {
                1.0
            },
            seed_lo,
            seed_hi,
        }
    }
}

/// Row stride of the attention kernels' shared-memory tiles (odd: no bank conflicts).
fn attn_ds(head_dim: usize) -> usize {
    head_dim | 1
}

impl Backend for CudaBackend {
    type T = f32;
    type Buf = CudaBuf;
    type Ids = CudaIds;

    fn name(&self) -> String {
        self.name.clone()
    }

    fn sync(&self) {
        if let Err(e) = self.stream.synchronize() {
            self.lost("while waiting for the stream", e)
        }
    }

    fn memory(&self) -> Option<super::MemoryStats> {
        let live = self.used_bytes();
        let peak = self
            .peak
            .fetch_max(live, std::sync::atomic::Ordering::Relaxed)
            .max(live);
        Some(super::MemoryStats { live, peak })
    }

    fn reset_peak(&self) {
        self.peak
            .store(self.used_bytes(), std::sync::atomic::Ordering::Relaxed);
    }

    fn zeros(&self, n: usize) -> CudaBuf {
        CudaBuf::F32(self.alloc_f32(n), n)
    }

    fn output(&self, n: usize) -> CudaBuf {
        CudaBuf::F32(self.alloc_f32_unset(n), n)
    }

    fn upload(&self, data: &[f32]) -> CudaBuf {
        let n = data.len();
        if n == 0 {
            return self.zeros(0);
        }
        let s = self
            .stream
            .clone_htod(data)
            .unwrap_or_else(|e| self.lost(&format!("uploading {n} floats"), e));
        self.note_peak();
        CudaBuf::F32(s, n)
    }

    fn download(&self, buf: &CudaBuf) -> Vec<f32> {
        match buf {
            CudaBuf::F32(s, n) => {
                let mut v = self
                    .stream
                    .clone_dtoh(s)
                    .unwrap_or_else(|e| self.lost("reading back a result", e));
                v.truncate(*n);
                v
            }
            CudaBuf::Bf16(s, n) => {
                let v = self
                    .stream
                    .clone_dtoh(s)
                    .unwrap_or_else(|e| self.lost("reading back a result", e));
                v[..*n]
                    .iter()
                    .map(|b| half::bf16::from_bits(*b).to_f32())
                    .collect()
            }
        }
    }

    fn upload_ids(&self, ids: &[u32]) -> CudaIds {
        let len = ids.len();
        let data = if len == 0 {
            self.alloc_zeroed::<u32>(1)
        } else {
            self.stream
                .clone_htod(ids)
                .unwrap_or_else(|e| self.lost(&format!("uploading {len} token ids"), e))
        };
        CudaIds {
            data,
            len,
            ascending: ids.windows(2).all(|w| w[0] < w[1]),
        }
    }

    fn weight_bytes(&self, t: &TensorView) -> u64 {
        let per = if self.bf16_weight(t) { 2 } else { 4 };
        (t.numel() * per) as u64
    }

    fn weight(&self, t: &TensorView) -> Result<CudaBuf> {
        Ok(match self.host_weight(t) {
            HostWeight::Bf16(bits) => self.upload_bf16(&bits),
            HostWeight::F32(v) => self.upload(&v),
        })
    }

    fn weight_streamed(&self, t: &TensorView) -> Result<CudaBuf> {
        let n = t.numel();
        if n == 0 {
            return self.weight(t);
        }
        let bytes = self.weight_bytes(t);
        self.check_cap(bytes);
        let (s, compute) = (self.streamer(), &self.stream);
        let buf = if self.bf16_weight(t) {
            s.upload(&self.ctx, compute, t, n, stream::fill_bf16)
                .map(|b| CudaBuf::Bf16(b, n))
        } else {
            s.upload(&self.ctx, compute, t, n, TensorView::read_f32_into)
                .map(|b| CudaBuf::F32(b, n))
        };
        let buf = buf.unwrap_or_else(|e| {
            self.alloc_failed(bytes, &format!("streaming {} to the device", t.name), e)
        });
        self.note_peak();
        Ok(buf)
    }

    fn len(&self, buf: &CudaBuf) -> usize {
        buf.len()
    }

    fn copy(&self, dst: &mut CudaBuf, dst_off: usize, src: &CudaBuf, src_off: usize, n: usize) {
        self.need("copy destination", dst.len(), dst_off + n);
        self.need("copy source", src.len(), src_off + n);
        let Some(cfg) = cfg_1d(n) else { return };
        let (d_off, s_off, nn) = (
            i32_of("dst_off", dst_off),
            i32_of("src_off", src_off),
            i32_of("n", n),
        );
        let d = dst.f32_mut();
        match src {
            CudaBuf::F32(s, _) => self.launch("copy_f32", cfg, |b| {
                b.arg(d).arg(&d_off).arg(s).arg(&s_off).arg(&nn);
            }),
            CudaBuf::Bf16(s, _) => self.launch("copy_bf16", cfg, |b| {
                b.arg(d).arg(&d_off).arg(s).arg(&s_off).arg(&nn);
            }),
        }
    }

    fn fill(&self, buf: &mut CudaBuf, value: f64) {
        let n = buf.len();
        let Some(cfg) = cfg_1d(n) else { return };
        let (v, nn) = (value as f32, i32_of("n", n));
        let y = buf.f32_mut();
        self.launch("fill_f32", cfg, |b| {
            b.arg(y).arg(&v).arg(&nn);
        });
    }

    fn matmul(
        &self,
        c: &mut CudaBuf,
        a: &CudaBuf,
        b: &CudaBuf,
        m: usize,
        n: usize,
        k: usize,
        ta: bool,
        tb: bool,
        accumulate: bool,
    ) {
        self.product(c, a, b, m, n, k, ta, tb, accumulate, Epi::default());
    }

    fn matmul_bias(
        &self,
        c: &mut CudaBuf,
        a: &CudaBuf,
        b: &CudaBuf,
        bias: (&CudaBuf, usize),
        m: usize,
        n: usize,
        k: usize,
        ta: bool,
        tb: bool,
    ) {
        // The tiled GEMMs add the bias in their epilogue (every real
        // model's linear layers: f32 activations, bf16 weights); any other
        // case is the product, then the bias pass.
        let epi = Epi {
            bias: Some(bias),
            ..Epi::default()
        };
        if !self.product(c, a, b, m, n, k, ta, tb, false, epi) {
            self.bias_add(c, bias.0, bias.1, m, n);
        }
    }

    fn linear_act(
        &self,
        pre: &mut CudaBuf,
        out: &mut CudaBuf,
        act: Act,
        a: &CudaBuf,
        b: &CudaBuf,
        bias: Option<(&CudaBuf, usize)>,
        m: usize,
        n: usize,
        k: usize,
        tb: bool,
    ) {
        // The tiled GEMMs write pre and act(pre) in their epilogue; any
        // other case is the product, then the bias and activation passes.
        let epi = Epi {
            bias,
            act: Some((act, EpiAct::Out(out))),
            part: None,
        };
        if !self.product(pre, a, b, m, n, k, false, tb, false, epi) {
            if let Some((bias, off)) = bias {
                self.bias_add(pre, bias, off, m, n);
            }
            self.act_fwd(act, out, pre, m * n);
        }
    }

    fn linear_swiglu(
        &self,
        up: &mut CudaBuf,
        h: &mut CudaBuf,
        gate: &CudaBuf,
        a: &CudaBuf,
        b: &CudaBuf,
        bias: Option<(&CudaBuf, usize)>,
        m: usize,
        n: usize,
        k: usize,
        tb: bool,
    ) {
        // The tiled GEMMs write up and silu(gate)·up in their epilogue; any
        // other case is the product, then the bias and SwiGLU passes.
        let epi = Epi {
            bias,
            act: Some((Act::Silu, EpiAct::GluOut { gate, out: h })),
            part: None,
        };
        if !self.product(up, a, b, m, n, k, false, tb, false, epi) {
            if let Some((bias, off)) = bias {
                self.bias_add(up, bias, off, m, n);
            }
            self.swiglu_fwd(h, gate, up, m * n);
        }
    }

    fn matmul_swiglu_grad(
        &self,
        dgate: &mut CudaBuf,
        dup: &mut CudaBuf,
        gate: &CudaBuf,
        up: &CudaBuf,
        a: &CudaBuf,
        b: &CudaBuf,
        m: usize,
        n: usize,
        k: usize,
        tb: bool,
    ) {
        // The tiled GEMMs form both gradients in their epilogue (no
        // temporary for the product); elsewhere the product goes to a
        // temporary and swiglu_bwd follows.
        if !self.fuses(a, b, (m, n, k), &[&*dgate, &*dup, gate, up]) {
            let mut t = self.output(m * n);
            self.product(&mut t, a, b, m, n, k, false, tb, false, Epi::default());
            self.swiglu_bwd(dgate, dup, &t, gate, up, m * n);
            return;
        }
        let epi = Epi {
            bias: None,
            act: Some((Act::Silu, EpiAct::GluGrad { gate, up, dup })),
            part: None,
        };
        let fused = self.product(dgate, a, b, m, n, k, false, tb, false, epi);
        debug_assert!(fused, "the tiled GEMM takes every f32 epilogue");
    }

    fn matmul_act_grad(
        &self,
        dx: &mut CudaBuf,
        act: Act,
        pre: &CudaBuf,
        a: &CudaBuf,
        b: &CudaBuf,
        db: Option<(&mut CudaBuf, usize)>,
        m: usize,
        n: usize,
        k: usize,
        tb: bool,
    ) {
        // The tiled GEMMs apply act' in their epilogue (no temporary) and
        // sum the columns of each 128-row tile (bias_grad_sum_f32 adds the
        // tiles' sums); elsewhere the product goes to a temporary and
        // act_bwd and bias_grad follow.
        if !self.fuses(a, b, (m, n, k), &[&*dx, pre]) {
            let mut t = self.output(m * n);
            self.product(&mut t, a, b, m, n, k, false, tb, false, Epi::default());
            self.act_bwd(act, dx, pre, &t, m * n);
            if let Some((grads, off)) = db {
                self.bias_grad(grads, off, dx, m, n);
            }
            return;
        }
        let tiles = m.div_ceil(128);
        // SAFETY: device memory; the GEMM writes every tile row's sum of
        // every column (EPI_PART) before bias_grad_sum_f32 reads them.
        let mut part = db
            .as_ref()
            .map(|_| self.alloc_by(tiles * n, |s, len| unsafe { s.alloc::<f64>(len) }));
        let epi = Epi {
            bias: None,
            act: Some((act, EpiAct::Grad(pre))),
            part: part.as_mut(),
        };
        let fused = self.product(dx, a, b, m, n, k, false, tb, false, epi);
        debug_assert!(fused, "the tiled GEMM takes every f32 epilogue");
        if let (Some((grads, off)), Some(part)) = (db, part) {
            self.need("matmul_act_grad db", grads.len(), off + n);
            self.add_bias_parts(grads, off, &part, tiles, n);
        }
    }

    fn bias_add(&self, y: &mut CudaBuf, bias: &CudaBuf, bias_off: usize, rows: usize, cols: usize) {
        self.need("bias_add y", y.len(), rows * cols);
        self.need("bias_add bias", bias.len(), bias_off + cols);
        let Some(cfg) = cfg_1d(rows * cols) else {
            return;
        };
        let bias = self.f32_in(bias);
        let (off, r, c) = (
            i32_of("bias_off", bias_off),
            i32_of("rows", rows),
            i32_of("cols", cols),
        );
        let y = y.f32_mut();
        self.launch("bias_add_f32", cfg, |b| {
            b.arg(y).arg(&*bias).arg(&off).arg(&r).arg(&c);
        });
    }

    fn bias_grad(&self, db: &mut CudaBuf, db_off: usize, dy: &CudaBuf, rows: usize, cols: usize) {
        self.need("bias_grad db", db.len(), db_off + cols);
        self.need("bias_grad dy", dy.len(), rows * cols);
        if cols == 0 {
            return;
        }
        let dy = self.f32_in(dy);
        let (off, r, c) = (
            i32_of("db_off", db_off),
            i32_of("rows", rows),
            i32_of("cols", cols),
        );
        // Up to BIAS_GRAD_ROWS rows: one block per 32 columns. More: chunks
        // of rows in parallel, their sums added in a second pass (a few
        // dozen column blocks alone would leave most of the GPU idle).
        let chunk = rows.div_ceil(65_535).max(BIAS_GRAD_ROWS);
        let chunks = rows.div_ceil(chunk);
        let mut cfg = LaunchConfig {
            grid_dim: (cols.div_ceil(32) as u32, 1, 1),
            block_dim: (32, 8, 1),
            shared_mem_bytes: 0,
        };
        if chunks <= 1 {
            let db = db.f32_mut();
            self.launch("bias_grad_f32", cfg, |b| {
                b.arg(db).arg(&off).arg(&*dy).arg(&r).arg(&c);
            });
            return;
        }
        cfg.grid_dim.1 = chunks as u32;
        // SAFETY: device memory; bias_grad_part_f32 writes every one of the
        // chunks × cols partial sums before bias_grad_sum_f32 reads them.
        let mut part = self.alloc_by(chunks * cols, |s, n| unsafe { s.alloc::<f64>(n) });
        let ch = i32_of("chunk", chunk);
        self.launch("bias_grad_part_f32", cfg, |b| {
            b.arg(&mut part).arg(&*dy).arg(&r).arg(&c).arg(&ch);
        });
        self.add_bias_parts(db, db_off, &part, chunks, cols);
    }

    fn add(&self, y: &mut CudaBuf, x: &CudaBuf, n: usize) {
        self.need("add y", y.len(), n);
        self.need("add x", x.len(), n);
        let Some(cfg) = cfg_1d(n) else { return };
        let x = self.f32_in(x);
        let nn = i32_of("n", n);
        let y = y.f32_mut();
        self.launch("add_f32", cfg, |b| {
            b.arg(y).arg(&*x).arg(&nn);
        });
    }

    fn scale(&self, y: &mut CudaBuf, s: f64, n: usize) {
        self.need("scale y", y.len(), n);
        let Some(cfg) = cfg_1d(n) else { return };
        let (s, nn) = (s as f32, i32_of("n", n));
        let y = y.f32_mut();
        self.launch("scale_f32", cfg, |b| {
            b.arg(y).arg(&s).arg(&nn);
        });
    }

    fn sum_sq(&self, y: &CudaBuf, n: usize) -> f64 {
        self.need("sum_sq y", y.len(), n);
        let Some(mut cfg) = cfg_1d(n) else { return 0.0 };
        cfg.grid_dim.0 = cfg.grid_dim.0.min(1024);
        let blocks = cfg.grid_dim.0 as usize;
        let y = self.f32_in(y);
        let mut partial = self.alloc_zeroed::<f64>(blocks);
        let nn = i32_of("n", n);
        self.launch("sum_sq_f32", cfg, |b| {
            b.arg(&mut partial).arg(&*y).arg(&nn);
        });
        let host = self
            .stream
            .clone_dtoh(&partial)
            .unwrap_or_else(|e| self.lost("reading back a gradient norm", e));
        host[..blocks].iter().sum()
    }

    fn act_fwd(&self, act: Act, y: &mut CudaBuf, x: &CudaBuf, n: usize) {
        self.need("act_fwd y", y.len(), n);
        self.need("act_fwd x", x.len(), n);
        let Some(cfg) = cfg_1d(n) else { return };
        let x = self.f32_in(x);
        let (code, nn) = (act_code(act), i32_of("n", n));
        let y = y.f32_mut();
        self.launch("act_fwd_f32", cfg, |b| {
            b.arg(&code).arg(y).arg(&*x).arg(&nn);
        });
    }

    fn act_bwd(&self, act: Act, dx: &mut CudaBuf, x: &CudaBuf, dy: &CudaBuf, n: usize) {
        self.need("act_bwd dx", dx.len(), n);
        self.need("act_bwd x", x.len(), n);
        self.need("act_bwd dy", dy.len(), n);
        let Some(cfg) = cfg_1d(n) else { return };
        let (x, dy) = (self.f32_in(x), self.f32_in(dy));
        let (code, nn) = (act_code(act), i32_of("n", n));
        let dx = dx.f32_mut();
        self.launch("act_bwd_f32", cfg, |b| {
            b.arg(&code).arg(dx).arg(&*x).arg(&*dy).arg(&nn);
        });
    }

    fn dropout(&self, y: &mut CudaBuf, n: usize, p: f32, seed: u64) {
        self.need("dropout y", y.len(), n);
        if p <= 0.0 {
            return;
        }
        let Some(cfg) = cfg_1d(n) else { return };
        let scale = (1.0 / (1.0 - p as f64)) as f32;
        let (lo, hi) = seed_halves(seed);
        let nn = i32_of("n", n);
        let y = y.f32_mut();
        self.launch("dropout_f32", cfg, |b| {
            b.arg(y).arg(&nn).arg(&p).arg(&scale).arg(&lo).arg(&hi);
        });
    }

    fn dropout_add(&self, y: &mut CudaBuf, x: &CudaBuf, n: usize, p: f32, seed: u64) {
        self.dropout_pair("dropout_add_f32", y, x, n, p, seed);
    }

    fn dropout_from(&self, y: &mut CudaBuf, x: &CudaBuf, n: usize, p: f32, seed: u64) {
        self.dropout_pair("dropout_from_f32", y, x, n, p, seed);
    }

    fn layernorm_fwd(
        &self,
        y: &mut CudaBuf,
        xhat: &mut CudaBuf,
        rstd: &mut CudaBuf,
        x: &CudaBuf,
        gamma: &CudaBuf,
        beta: &CudaBuf,
        beta_off: usize,
        rows: usize,
        cols: usize,
        eps: f64,
    ) {
        let io = (y, xhat, rstd);
        self.layernorm_launch(io, x, None, gamma, (beta, beta_off), rows, cols, eps);
    }

    fn residual_layernorm_fwd(
        &self,
        y: &mut CudaBuf,
        xhat: &mut CudaBuf,
        rstd: &mut CudaBuf,
        s: &mut CudaBuf,
        res: &CudaBuf,
        drop: Option<Dropout>,
        gamma: &CudaBuf,
        beta: &CudaBuf,
        beta_off: usize,
        rows: usize,
        cols: usize,
        eps: f64,
    ) {
        let drop = drop.unwrap_or(Dropout { p: 0.0, seed: 0 });
        let io = (y, xhat, rstd);
        if cols > 4096 {
            // The row kernels that re-read it: the sum written first.
            self.dropout_add(s, res, rows * cols, drop.p.max(0.0), drop.seed);
            self.layernorm_launch(io, s, None, gamma, (beta, beta_off), rows, cols, eps);
        } else {
            let r = Some((res, drop));
            self.layernorm_launch(io, s, r, gamma, (beta, beta_off), rows, cols, eps);
        }
    }

    fn layernorm_bwd(
        &self,
        dx: &mut CudaBuf,
        dy: &CudaBuf,
        xhat: &CudaBuf,
        rstd: &CudaBuf,
        gamma: &CudaBuf,
        rows: usize,
        cols: usize,
    ) {
        self.norm_bwd("layernorm_bwd_f32", dx, dy, xhat, rstd, gamma, rows, cols);
    }

    fn attention_fwd(
        &self,
        out: &mut CudaBuf,
        lse: &mut CudaBuf,
        q: &CudaBuf,
        k: &CudaBuf,
        v: &CudaBuf,
        mask: &CudaBuf,
        dims: AttnDims,
        dropout: Option<Dropout>,
    ) {
        let a = self.attn_args(&dims, dropout);
        let (qn, kn) = (
            dims.batch * dims.seq * dims.heads * dims.head_dim,
            dims.batch * dims.kv_seq * dims.kv_heads * dims.head_dim,
        );
        self.need("attention_fwd out", out.len(), qn);
        self.need(
            "attention_fwd lse",
            lse.len(),
            dims.batch * dims.heads * dims.seq,
        );
        self.need("attention_fwd q", q.len(), qn);
        self.need("attention_fwd k", k.len(), kn);
        self.need("attention_fwd v", v.len(), kn);
        self.need("attention_fwd mask", mask.len(), dims.batch * dims.kv_seq);
        if qn == 0 {
            return;
        }
        let (q, k, v, mask) = (
            self.f32_in(q),
            self.f32_in(k),
            self.f32_in(v),
            self.f32_in(mask),
        );
        if let Some(bq) = self.attn_mma(dims.head_dim) {
            // q is read once per block: the kernel converts it itself.
            let (k16, v16) = (self.bf16_copy(&k, kn), self.bf16_copy(&v, kn));
            let cfg = LaunchConfig {
                grid_dim: (
                    dims.seq.div_ceil(ATTN_MMA_FWD_ROWS) as u32,
                    dims.heads as u32,
                    dims.batch as u32,
                ),
                block_dim: (256, 1, 1),
                shared_mem_bytes: attn_mma_smem(dims.head_dim, bq).0 as u32,
            };
            let (out, lse) = (out.f32_mut(), lse.f32_mut());
            let name = format!("attention_fwd_bf16_d{}", dims.head_dim);
            self.launch(&name, cfg, |b| {
                b.arg(out).arg(lse).arg(&*q).arg(&k16).arg(&v16);
                b.arg(&*mask).arg(&a);
            });
            return;
        }
        let ds = attn_ds(dims.head_dim);
        let (smem, kt) = self.attn_tile("attention_fwd", |kt| (2 * kt + ATTN_QPB) * ds * 4);
        let cfg = LaunchConfig {
            grid_dim: (
                dims.seq.div_ceil(ATTN_QPB) as u32,
                dims.heads as u32,
                dims.batch as u32,
            ),
            block_dim: (128, 1, 1),
            shared_mem_bytes: smem,
        };
        let kt = kt as i32;
        let (out, lse) = (out.f32_mut(), lse.f32_mut());
        self.launch("attention_fwd_f32", cfg, |b| {
            b.arg(out)
                .arg(lse)
                .arg(&*q)
                .arg(&*k)
                .arg(&*v)
                .arg(&*mask)
                .arg(&a)
                .arg(&kt);
        });
    }

    fn attention_bwd(
        &self,
        dq: &mut CudaBuf,
        dk: &mut CudaBuf,
        dv: &mut CudaBuf,
        dout: &CudaBuf,
        q: &CudaBuf,
        k: &CudaBuf,
        v: &CudaBuf,
        out: &CudaBuf,
        lse: &CudaBuf,
        mask: &CudaBuf,
        dims: AttnDims,
        dropout: Option<Dropout>,
    ) {
        assert!(
            dims.kv_seq == dims.seq && dims.q_start == 0,
            "attention_bwd: training shape only"
        );
        let a = self.attn_args(&dims, dropout);
        let qn = dims.batch * dims.seq * dims.heads * dims.head_dim;
        let kn = dims.batch * dims.kv_seq * dims.kv_heads * dims.head_dim;
        let ln = dims.batch * dims.heads * dims.seq;
        for (what, len, need) in [
            ("dq", dq.len(), qn),
            ("dk", dk.len(), kn),
            ("dv", dv.len(), kn),
            ("dout", dout.len(), qn),
            ("q", q.len(), qn),
            ("k", k.len(), kn),
            ("v", v.len(), kn),
            ("out", out.len(), qn),
            ("lse", lse.len(), ln),
            ("mask", mask.len(), dims.batch * dims.kv_seq),
        ] {
            self.need(&format!("attention_bwd {what}"), len, need);
        }
        if qn == 0 {
            return;
        }
        let (dout, q, k, v, out, lse, mask) = (
            self.f32_in(dout),
            self.f32_in(q),
            self.f32_in(k),
            self.f32_in(v),
            self.f32_in(out),
            self.f32_in(lse),
            self.f32_in(mask),
        );
        // D_i = dO_i · O_i, one warp per query row.
        let mut dsum = self.alloc_f32(ln);
        let rows = dims.batch * dims.seq * dims.heads;
        let cfg = LaunchConfig {
            grid_dim: (rows.div_ceil(4) as u32, 1, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        self.launch("attention_bwd_prep_f32", cfg, |b| {
            b.arg(&mut dsum).arg(&*dout).arg(&*out).arg(&a);
        });
        if let Some(bq) = self.attn_mma(dims.head_dim) {
            let (do16, q16, k16, v16) = (
                self.bf16_copy(&dout, qn),
                self.bf16_copy(&q, qn),
                self.bf16_copy(&k, kn),
                self.bf16_copy(&v, kn),
            );
            let (_, smem_dq, smem_kv) = attn_mma_smem(dims.head_dim, bq);
            let cfg = LaunchConfig {
                grid_dim: (
                    dims.seq.div_ceil(ATTN_MMA_ROWS) as u32,
                    dims.heads as u32,
                    dims.batch as u32,
                ),
                block_dim: (128, 1, 1),
                shared_mem_bytes: smem_dq as u32,
            };
            let dq = dq.f32_mut();
            let name = format!("attention_bwd_dq_bf16_d{}", dims.head_dim);
            self.launch(&name, cfg, |b| {
                b.arg(dq).arg(&do16).arg(&q16).arg(&k16).arg(&v16);
                b.arg(&*lse).arg(&dsum).arg(&*mask).arg(&a);
            });
            let cfg = LaunchConfig {
                grid_dim: (
                    dims.kv_seq.div_ceil(ATTN_MMA_ROWS) as u32,
                    dims.kv_heads as u32,
                    dims.batch as u32,
                ),
                block_dim: (128, 1, 1),
                shared_mem_bytes: smem_kv as u32,
            };
            let (dk, dv) = (dk.f32_mut(), dv.f32_mut());
            let name = format!("attention_bwd_dkv_bf16_d{}", dims.head_dim);
            self.launch(&name, cfg, |b| {
                b.arg(dk).arg(dv).arg(&do16).arg(&q16).arg(&k16).arg(&v16);
                b.arg(&*lse).arg(&dsum).arg(&*mask).arg(&a);
            });
            return;
        }
        let ds = attn_ds(dims.head_dim);
        let (smem, kt) =
            self.attn_tile("attention_bwd (dq)", |kt| (2 * kt + 2 * ATTN_QPB) * ds * 4);
        let cfg = LaunchConfig {
            grid_dim: (
                dims.seq.div_ceil(ATTN_QPB) as u32,
                dims.heads as u32,
                dims.batch as u32,
            ),
            block_dim: (128, 1, 1),
            shared_mem_bytes: smem,
        };
        let kt = kt as i32;
        let dq = dq.f32_mut();
        self.launch("attention_bwd_dq_f32", cfg, |b| {
            b.arg(dq).arg(&*dout).arg(&*q).arg(&*k).arg(&*v);
            b.arg(&*lse).arg(&dsum).arg(&*mask).arg(&a).arg(&kt);
        });
        let (smem, qt) = self.attn_tile("attention_bwd (dk, dv)", |qt| {
            (2 * ATTN_KPB + 2 * qt) * ds * 4 + 2 * qt * 4
        });
        let cfg = LaunchConfig {
            grid_dim: (
                dims.kv_seq.div_ceil(ATTN_KPB) as u32,
                dims.kv_heads as u32,
                dims.batch as u32,
            ),
            block_dim: (128, 1, 1),
            shared_mem_bytes: smem,
        };
        let qt = qt as i32;
        let (dk, dv) = (dk.f32_mut(), dv.f32_mut());
        self.launch("attention_bwd_dkv_f32", cfg, |b| {
            b.arg(dk).arg(dv).arg(&*dout).arg(&*q).arg(&*k).arg(&*v);
            b.arg(&*lse).arg(&dsum).arg(&*mask).arg(&a).arg(&qt);
        });
    }

    fn rmsnorm_fwd(
        &self,
        y: &mut CudaBuf,
        xhat: &mut CudaBuf,
        rstd: &mut CudaBuf,
        x: &CudaBuf,
        gamma: &CudaBuf,
        rows: usize,
        cols: usize,
        eps: f64,
    ) {
        for (what, len, need) in [
            ("y", y.len(), rows * cols),
            ("xhat", xhat.len(), rows * cols),
            ("rstd", rstd.len(), rows),
            ("x", x.len(), rows * cols),
            ("gamma", gamma.len(), cols),
        ] {
            self.need(&format!("rmsnorm_fwd {what}"), len, need);
        }
        if rows == 0 {
            return;
        }
        let (x, g) = (self.f32_in(x), self.f32_in(gamma));
        let (r, c, e) = (i32_of("rows", rows), i32_of("cols", cols), eps as f32);
        let (name, cfg) = norm_kernel("rmsnorm_fwd_f32", rows, cols);
        let (y, xh, rs) = (y.f32_mut(), xhat.f32_mut(), rstd.f32_mut());
        self.launch(&name, cfg, |b| {
            b.arg(y)
                .arg(xh)
                .arg(rs)
                .arg(&*x)
                .arg(&*g)
                .arg(&r)
                .arg(&c)
                .arg(&e);
        });
    }

    fn rmsnorm_bwd(
        &self,
        dx: &mut CudaBuf,
        dy: &CudaBuf,
        xhat: &CudaBuf,
        rstd: &CudaBuf,
        gamma: &CudaBuf,
        rows: usize,
        cols: usize,
    ) {
        self.norm_bwd("rmsnorm_bwd_f32", dx, dy, xhat, rstd, gamma, rows, cols);
    }

    fn rope(
        &self,
        x: &mut CudaBuf,
        positions: &CudaIds,
        rows: usize,
        heads: usize,
        head_dim: usize,
        theta: f64,
        inverse: bool,
    ) {
        self.need("rope x", x.len(), rows * heads * head_dim);
        self.need("rope positions", positions.len(), rows);
        let Some(cfg) = cfg_1d(rows * heads * (head_dim / 2)) else {
            return;
        };
        let (r, h, d, inv) = (
            i32_of("rows", rows),
            i32_of("heads", heads),
            i32_of("head_dim", head_dim),
            inverse as i32,
        );
        let x = x.f32_mut();
        self.launch("rope_f32", cfg, |b| {
            b.arg(x)
                .arg(&positions.data)
                .arg(&r)
                .arg(&h)
                .arg(&d)
                .arg(&theta)
                .arg(&inv);
        });
    }

    fn swiglu_fwd(&self, h: &mut CudaBuf, gate: &CudaBuf, up: &CudaBuf, n: usize) {
        self.need("swiglu_fwd h", h.len(), n);
        self.need("swiglu_fwd gate", gate.len(), n);
        self.need("swiglu_fwd up", up.len(), n);
        let Some(cfg) = cfg_1d(n) else { return };
        let (g, u) = (self.f32_in(gate), self.f32_in(up));
        let nn = i32_of("n", n);
        let h = h.f32_mut();
        self.launch("swiglu_fwd_f32", cfg, |b| {
            b.arg(h).arg(&*g).arg(&*u).arg(&nn);
        });
    }

    fn swiglu_bwd(
        &self,
        dgate: &mut CudaBuf,
        dup: &mut CudaBuf,
        dh: &CudaBuf,
        gate: &CudaBuf,
        up: &CudaBuf,
        n: usize,
    ) {
        for (what, len) in [
            ("dgate", dgate.len()),
            ("dup", dup.len()),
            ("dh", dh.len()),
            ("gate", gate.len()),
            ("up", up.len()),
        ] {
            self.need(&format!("swiglu_bwd {what}"), len, n);
        }
        let Some(cfg) = cfg_1d(n) else { return };
        let (d, g, u) = (self.f32_in(dh), self.f32_in(gate), self.f32_in(up));
        let nn = i32_of("n", n);
        let (dg, du) = (dgate.f32_mut(), dup.f32_mut());
        self.launch("swiglu_bwd_f32", cfg, |b| {
            b.arg(dg).arg(du).arg(&*d).arg(&*g).arg(&*u).arg(&nn);
        });
    }

    fn embedding_fwd(
        &self,
        out: &mut CudaBuf,
        table: &CudaBuf,
        ids: &CudaIds,
        rows: usize,
        dim: usize,
        accumulate: bool,
    ) {
        self.need("embedding_fwd out", out.len(), rows * dim);
        self.need("embedding_fwd ids", ids.len(), rows);
        let Some(cfg) = cfg_1d(rows * dim) else {
            return;
        };
        let (r, d, acc) = (i32_of("rows", rows), i32_of("dim", dim), accumulate as i32);
        let out = out.f32_mut();
        match table {
            CudaBuf::F32(t, _) => self.launch("embedding_fwd_f32", cfg, |b| {
                b.arg(out).arg(t).arg(&ids.data).arg(&r).arg(&d).arg(&acc);
            }),
            CudaBuf::Bf16(t, _) => self.launch("embedding_fwd_bf16", cfg, |b| {
                b.arg(out).arg(t).arg(&ids.data).arg(&r).arg(&d).arg(&acc);
            }),
        }
    }

    fn scatter_add_rows(
        &self,
        dx: &mut CudaBuf,
        dy: &CudaBuf,
        idx: &CudaIds,
        rows: usize,
        cols: usize,
    ) {
        self.need("scatter_add_rows dy", dy.len(), rows * cols);
        self.need("scatter_add_rows idx", idx.len(), rows);
        if rows == 0 || cols == 0 {
            return;
        }
        let dy = self.f32_in(dy);
        let (r, c) = (i32_of("rows", rows), i32_of("cols", cols));
        // Distinct rows: one thread per element. Else one thread per column
        // walking the rows in order (repeats add up in the CPU's order).
        let (kernel, cfg) = if idx.ascending {
            let cfg = cfg_1d(rows * cols).expect("rows, cols > 0");
            ("scatter_add_rows_distinct_f32", cfg)
        } else {
            let cfg = LaunchConfig {
                grid_dim: (cols.div_ceil(128) as u32, 1, 1),
                block_dim: (128, 1, 1),
                shared_mem_bytes: 0,
            };
            ("scatter_add_rows_f32", cfg)
        };
        let dx = dx.f32_mut();
        self.launch(kernel, cfg, |b| {
            b.arg(dx).arg(&*dy).arg(&idx.data).arg(&r).arg(&c);
        });
    }

    fn scale_rows(&self, y: &mut CudaBuf, w: &CudaBuf, rows: usize, cols: usize) {
        self.need("scale_rows y", y.len(), rows * cols);
        self.need("scale_rows w", w.len(), rows);
        let Some(cfg) = cfg_1d(rows * cols) else {
            return;
        };
        let w = self.f32_in(w);
        let (r, c) = (i32_of("rows", rows), i32_of("cols", cols));
        let y = y.f32_mut();
        self.launch("scale_rows_f32", cfg, |b| {
            b.arg(y).arg(&*w).arg(&r).arg(&c);
        });
    }

    fn pool_fwd(
        &self,
        kind: PoolKind,
        out: &mut CudaBuf,
        h: &CudaBuf,
        mask: &CudaBuf,
        b: usize,
        t: usize,
        d: usize,
    ) {
        self.need("pool_fwd out", out.len(), b * d);
        self.need("pool_fwd h", h.len(), b * t * d);
        self.need("pool_fwd mask", mask.len(), b * t);
        let Some(cfg) = cfg_1d(b * d) else { return };
        let (h, mask) = (self.f32_in(h), self.f32_in(mask));
        let (code, bi, ti, di) = (
            pool_code(kind),
            i32_of("b", b),
            i32_of("t", t),
            i32_of("d", d),
        );
        let out = out.f32_mut();
        self.launch("pool_fwd_f32", cfg, |l| {
            l.arg(&code)
                .arg(out)
                .arg(&*h)
                .arg(&*mask)
                .arg(&bi)
                .arg(&ti)
                .arg(&di);
        });
    }

    fn pool_bwd(
        &self,
        kind: PoolKind,
        dh: &mut CudaBuf,
        dout: &CudaBuf,
        mask: &CudaBuf,
        b: usize,
        t: usize,
        d: usize,
    ) {
        self.need("pool_bwd dh", dh.len(), b * t * d);
        self.need("pool_bwd dout", dout.len(), b * d);
        self.need("pool_bwd mask", mask.len(), b * t);
        let Some(cfg) = cfg_1d(b * t * d) else { return };
        let (dout, mask) = (self.f32_in(dout), self.f32_in(mask));
        let (code, bi, ti, di) = (
            pool_code(kind),
            i32_of("b", b),
            i32_of("t", t),
            i32_of("d", d),
        );
        let dh = dh.f32_mut();
        self.launch("pool_bwd_f32", cfg, |l| {
            l.arg(&code)
                .arg(dh)
                .arg(&*dout)
                .arg(&*mask)
                .arg(&bi)
                .arg(&ti)
                .arg(&di);
        });
    }

    fn cross_entropy(
        &self,
        losses: &mut CudaBuf,
        dlogits: &mut CudaBuf,
        logits: &CudaBuf,
        labels: &CudaIds,
        rows: usize,
        classes: usize,
        grad_scale: f64,
    ) {
        self.need("cross_entropy losses", losses.len(), rows);
        self.need("cross_entropy dlogits", dlogits.len(), rows * classes);
        self.need("cross_entropy logits", logits.len(), rows * classes);
        self.need("cross_entropy labels", labels.len(), rows);
        if rows == 0 || classes == 0 {
            return;
        }
        let x = self.f32_in(logits);
        let (r, c, gs) = (
            i32_of("rows", rows),
            i32_of("classes", classes),
            grad_scale as f32,
        );
        let cfg = LaunchConfig {
            grid_dim: (r as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let (l, d) = (losses.f32_mut(), dlogits.f32_mut());
        self.launch("cross_entropy_f32", cfg, |b| {
            b.arg(l)
                .arg(d)
                .arg(&*x)
                .arg(&labels.data)
                .arg(&r)
                .arg(&c)
                .arg(&gs);
        });
    }

    fn candidate_loss(
        &self,
        ex_loss: &mut CudaBuf,
        scores: &mut CudaBuf,
        row_w: &mut CudaBuf,
        tok_loss: &CudaBuf,
        idx: &CandidateIndex<'_, CudaIds>,
        grad_scale: f64,
    ) {
        let (nr, nc, ne) = (idx.rows, idx.cands, idx.examples);
        self.need("candidate_loss ex_loss", ex_loss.len(), ne);
        self.need("candidate_loss scores", scores.len(), nc);
        self.need("candidate_loss row_w", row_w.len(), nr);
        self.need("candidate_loss tok_loss", tok_loss.len(), nr);
        self.need("candidate_loss tok_cand", idx.tok_cand.len(), nr);
        self.need("candidate_loss cand_ex", idx.cand_ex.len(), nc);
        self.need("candidate_loss gold", idx.gold.len(), ne);
        let tl = self.f32_in(tok_loss);
        let mut s = self.alloc_zeroed::<f64>(nc);
        let mut dsc = self.alloc_zeroed::<f64>(nc);
        let mut len = self.alloc_zeroed::<i32>(nc);
        let (r, c, e) = (
            i32_of("rows", nr),
            i32_of("cands", nc),
            i32_of("examples", ne),
        );
        if let Some(cfg) = cfg_1d(nc) {
            let sc = scores.f32_mut();
            self.launch("candidate_scores_f32", cfg, |b| {
                b.arg(sc)
                    .arg(&mut s)
                    .arg(&mut len)
                    .arg(&*tl)
                    .arg(&idx.tok_cand.data);
                b.arg(&r).arg(&c);
            });
        }
        if let Some(cfg) = cfg_1d(ne) {
            let el = ex_loss.f32_mut();
            self.launch("candidate_examples_f32", cfg, |b| {
                b.arg(el)
                    .arg(&mut dsc)
                    .arg(&s)
                    .arg(&idx.cand_ex.data)
                    .arg(&idx.gold.data);
                b.arg(&c).arg(&e);
            });
        }
        if let Some(cfg) = cfg_1d(nr) {
            let w = row_w.f32_mut();
            self.launch("candidate_rows_f32", cfg, |b| {
                b.arg(w)
                    .arg(&dsc)
                    .arg(&len)
                    .arg(&idx.tok_cand.data)
                    .arg(&r)
                    .arg(&grad_scale);
            });
        }
    }

    fn mse(
        &self,
        losses: &mut CudaBuf,
        dx: &mut CudaBuf,
        x: &CudaBuf,
        target: &CudaBuf,
        rows: usize,
        grad_scale: f64,
    ) {
        self.need("mse losses", losses.len(), rows);
        self.need("mse dx", dx.len(), rows);
        self.need("mse x", x.len(), rows);
        self.need("mse target", target.len(), rows);
        let Some(cfg) = cfg_1d(rows) else { return };
        let (x, t) = (self.f32_in(x), self.f32_in(target));
        let (r, g2) = (i32_of("rows", rows), (2.0 * grad_scale) as f32);
        let (l, d) = (losses.f32_mut(), dx.f32_mut());
        self.launch("mse_f32", cfg, |b| {
            b.arg(l).arg(d).arg(&*x).arg(&*t).arg(&r).arg(&g2);
        });
    }

    fn adamw(
        &self,
        params: &mut CudaBuf,
        grads: &CudaBuf,
        m: &mut CudaBuf,
        v: &mut CudaBuf,
        n: usize,
        h: AdamW,
    ) {
        self.need("adamw params", params.len(), n);
        self.need("adamw grads", grads.len(), n);
        self.need("adamw m", m.len(), n);
        self.need("adamw v", v.len(), n);
        let Some(cfg) = cfg_1d(n) else { return };
        let g = self.f32_in(grads);
        let bc1 = 1.0 - h.beta1.powi(h.step as i32);
        let bc2 = 1.0 - h.beta2.powi(h.step as i32);
        let nn = i32_of("n", n);
        let (p, m, v) = (params.f32_mut(), m.f32_mut(), v.f32_mut());
        self.launch("adamw_f32", cfg, |b| {
            b.arg(p).arg(&*g).arg(m).arg(v).arg(&nn);
            b.arg(&h.lr)
                .arg(&h.beta1)
                .arg(&h.beta2)
                .arg(&h.eps)
                .arg(&h.weight_decay);
            b.arg(&bc1).arg(&bc2);
        });
    }
}

/// The norm kernel `base` (`kernels/norm.cu`) for rows of `cols` values,
/// with its launch shape: the register-resident variants where a row fits
/// (`_w1024`: a warp a row, four rows a block; `_w4096`: a 128-thread block
/// a row), which read each row once; else `base`, which re-reads it.
fn norm_kernel(base: &str, rows: usize, cols: usize) -> (String, LaunchConfig) {
    let (name, per_block) = match cols {
        0..=1024 => (format!("{base}_w1024"), 4),
        1025..=4096 => (format!("{base}_w4096"), 1),
        _ => (base.to_string(), 4),
    };
    let cfg = LaunchConfig {
        grid_dim: (rows.div_ceil(per_block) as u32, 1, 1),
        block_dim: (128, 1, 1),
        shared_mem_bytes: 0,
    };
    (name, cfg)
}

impl CudaBackend {
    /// LayerNorm forward of the rows of `x` (`layernorm_fwd_f32*`), or with
    /// `res = Some((res, drop))` of `drop(x) + res`, formed as each row is
    /// read (`layernorm_res_fwd_f32_*`: rows of at most 4096 columns).
    #[allow(clippy::too_many_arguments)]
    fn layernorm_launch(
        &self,
        (y, xhat, rstd): (&mut CudaBuf, &mut CudaBuf, &mut CudaBuf),
        x: &CudaBuf,
        res: Option<(&CudaBuf, Dropout)>,
        gamma: &CudaBuf,
        (beta, beta_off): (&CudaBuf, usize),
        rows: usize,
        cols: usize,
        eps: f64,
    ) {
        let n = rows * cols;
        for (what, len, need) in [
            ("y", y.len(), n),
            ("xhat", xhat.len(), n),
            ("rstd", rstd.len(), rows),
            ("x", x.len(), n),
            ("res", res.map_or(n, |r| r.0.len()), n),
            ("gamma", gamma.len(), cols),
            ("beta", beta.len(), beta_off + cols),
        ] {
            self.need(&format!("layernorm_fwd {what}"), len, need);
        }
        if rows == 0 {
            return;
        }
        let (x, g, bt) = (self.f32_in(x), self.f32_in(gamma), self.f32_in(beta));
        let (off, r, c, e) = (
            i32_of("beta_off", beta_off),
            i32_of("rows", rows),
            i32_of("cols", cols),
            eps as f32,
        );
        let (y, xh, rs) = (y.f32_mut(), xhat.f32_mut(), rstd.f32_mut());
        let Some((res, drop)) = res else {
            let (name, cfg) = norm_kernel("layernorm_fwd_f32", rows, cols);
            self.launch(&name, cfg, |b| {
                b.arg(y).arg(xh).arg(rs).arg(&*x).arg(&*g).arg(&*bt);
                b.arg(&off).arg(&r).arg(&c).arg(&e);
            });
            return;
        };
        assert!(cols <= 4096, "layernorm_res_fwd_f32: {cols} columns");
        let res = self.f32_in(res);
        let p = drop.p.max(0.0);
        let scale = (1.0 / (1.0 - p as f64)) as f32;
        let (lo, hi) = seed_halves(drop.seed);
        let (name, cfg) = norm_kernel("layernorm_res_fwd_f32", rows, cols);
        self.launch(&name, cfg, |b| {
            b.arg(y)
                .arg(xh)
                .arg(rs)
                .arg(&*x)
                .arg(&*res)
                .arg(&*g)
                .arg(&*bt);
            b.arg(&off).arg(&r).arg(&c).arg(&e);
            b.arg(&p).arg(&scale).arg(&lo).arg(&hi);
        });
    }

    /// `grads[off + j] += Σ_t part[t·cols + j]` over `parts` rows of f64
    /// partial column sums (`bias_grad_sum_f32`, a fixed order): the second
    /// pass of a bias gradient summed in row tiles.
    fn add_bias_parts(
        &self,
        grads: &mut CudaBuf,
        off: usize,
        part: &CudaSlice<f64>,
        parts: usize,
        cols: usize,
    ) {
        let Some(cfg) = cfg_1d(cols) else { return };
        let (off, parts, cols) = (
            i32_of("db_off", off),
            i32_of("parts", parts),
            i32_of("cols", cols),
        );
        let grads = grads.f32_mut();
        self.launch("bias_grad_sum_f32", cfg, |b| {
            b.arg(grads).arg(&off).arg(part).arg(&parts).arg(&cols);
        });
    }

    /// Set the first `n` elements of `c` to zero (a matmul with k = 0).
    fn fill_prefix(&self, c: &mut CudaBuf, n: usize) {
        let Some(cfg) = cfg_1d(n) else { return };
        let (v, nn) = (0f32, i32_of("n", n));
        let y = c.f32_mut();
        self.launch("fill_f32", cfg, |b| {
            b.arg(y).arg(&v).arg(&nn);
        });
    }

    fn norm_bwd(
        &self,
        kernel: &str,
        dx: &mut CudaBuf,
        dy: &CudaBuf,
        xhat: &CudaBuf,
        rstd: &CudaBuf,
        gamma: &CudaBuf,
        rows: usize,
        cols: usize,
    ) {
        for (what, len, need) in [
            ("dx", dx.len(), rows * cols),
            ("dy", dy.len(), rows * cols),
            ("xhat", xhat.len(), rows * cols),
            ("rstd", rstd.len(), rows),
            ("gamma", gamma.len(), cols),
        ] {
            self.need(&format!("{kernel} {what}"), len, need);
        }
        if rows == 0 {
            return;
        }
        let (dy, xh, rs, g) = (
            self.f32_in(dy),
            self.f32_in(xhat),
            self.f32_in(rstd),
            self.f32_in(gamma),
        );
        let (r, c) = (i32_of("rows", rows), i32_of("cols", cols));
        let dx = dx.f32_mut();
        let (name, cfg) = norm_kernel(kernel, rows, cols);
        self.launch(&name, cfg, |b| {
            b.arg(dx)
                .arg(&*dy)
                .arg(&*xh)
                .arg(&*rs)
                .arg(&*g)
                .arg(&r)
                .arg(&c);
        });
    }
}
