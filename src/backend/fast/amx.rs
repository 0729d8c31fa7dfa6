//! Intel AMX tiles for the bf16 product ([`super::gemm16`]): `tdpbf16ps`
//! multiplies a 16×32 bf16 tile of A by a 32×16 tile of B into a 16×16 f32
//! tile in one instruction, 16 times the work of an AVX-512 `vdpbf16ps`.
//!
//! The packed operands of `gemm16` are what the tiles want: A as bf16
//! pairs (a tile row is 16 pairs, 64 bytes; here packed tile by tile,
//! [`tile_index`]) and B panels of `[pair][NR]` (a tile row is one pair of
//! 16 columns), so a strip of [`MR`] = 32 rows and a panel of 32 columns
//! make a 2 × 2 block of C tiles (tiles 0–3) fed by two A tiles (4, 5) and
//! two B tiles (6, 7) per 16 pairs of `k`. The packing pads `k` to whole
//! tiles ([`KT`] pairs) with zeros.
//!
//! Linux only: the kernel hands out the tile state only after
//! `arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`, which
//! [`available`] asks for once. `BEFT_CPU_AMX=0` turns the tiles off (the
//! AVX-512 BF16 kernel then runs), for comparisons.

/// Rows of A per strip (two tiles of 16).
pub const MR: usize = 32;
/// k pairs per tile (64 bytes of bf16 pairs per tile row).
pub const KT: usize = 16;

/// Whether this CPU and OS let us use AMX-BF16 (checked once): CPUID leaf 7
/// (AMX-TILE and AMX-BF16), the kernel's permission for the tile data, and
/// `BEFT_CPU_AMX` not `0`.
pub fn available() -> bool {
    use std::sync::OnceLock;
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| {
        std::env::var("BEFT_CPU_AMX").map_or(true, |v| v.trim() != "0") && supported()
    })
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn supported() -> bool {
    let l7 = std::arch::x86_64::__cpuid_count(7, 0);
    let (amx_bf16, amx_tile) = (l7.edx >> 22 & 1 == 1, l7.edx >> 24 & 1 == 1);
    if !(amx_bf16 && amx_tile && super::gemm16::available()) {
        return false;
    }
    const SYS_ARCH_PRCTL: i64 = 158;
    const ARCH_REQ_XCOMP_PERM: i64 = 0x1023;
    const XFEATURE_XTILEDATA: i64 = 18;
    let ret: i64;
    // SAFETY: the arch_prctl system call only changes this process's
    // permission for the AMX state; rcx and r11 are clobbered by `syscall`.
    unsafe {
        std::arch::asm!(
            "syscall",
            inlateout("rax") SYS_ARCH_PRCTL => ret,
            in("rdi") ARCH_REQ_XCOMP_PERM,
            in("rsi") XFEATURE_XTILEDATA,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        );
    }
    ret == 0
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
fn supported() -> bool {
    false
}

/// Where pair `q` of row `r` of a strip of A goes: the strip is packed in
/// tile order, 16 pairs of all 32 rows (2 KiB, both A tiles of one step)
/// after another, so that the tiles stream from contiguous memory.
#[inline]
pub fn tile_index(r: usize, q: usize) -> usize {
    (q / KT) * (MR * KT) + r * KT + q % KT
}

/// The tile configuration: palette 1, all eight tiles 16 rows × 64 bytes.
#[cfg(target_arch = "x86_64")]
#[repr(C, align(64))]
struct TileConfig {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    colsb: [u16; 16],
    rows: [u8; 16],
}

/// Load the tile configuration on this thread (before any [`tile`] call);
/// [`release`] when done.
///
/// # Safety
/// [`available`] returned true.
#[cfg(target_arch = "x86_64")]
pub unsafe fn configure() {
    let mut cfg = TileConfig {
        palette: 1,
        start_row: 0,
        reserved: [0; 14],
        colsb: [0; 16],
        rows: [0; 16],
    };
    for t in 0..8 {
        cfg.colsb[t] = 64;
        cfg.rows[t] = 16;
    }
    std::arch::asm!("ldtilecfg [{0}]", in(reg) &cfg as *const TileConfig, options(nostack, readonly));
}

/// Give the tile state back (the OS then need not save it on a switch).
///
/// # Safety
/// [`configure`] ran on this thread.
#[cfg(target_arch = "x86_64")]
pub unsafe fn release() {
    std::arch::asm!("tilerelease", options(nostack, nomem));
}

/// One `rows × cols` (≤ 32 × 32) block of C from `kc` pairs (a multiple
/// of [`KT`]) of a strip of A packed in tile order ([`tile_index`]) and of
/// a packed B panel (`kc` pairs of [`super::gemm16::NR`] = 32 columns):
/// `C = (load ? C : 0) + A·B`, then `epi`.
///
/// # Safety
/// [`configure`] ran on this thread; `a` holds 32·`kc` pairs, `b`
/// `kc`·32; `c` (and `epi`'s f32 `out`) are valid for `rows` rows of
/// `cols` values at row stride `ldc`, a packed `out` for [`MR`] rows of
/// [`KT`] pairs, `epi.bias` (when not null) for `cols`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
#[allow(clippy::too_many_arguments)]
pub unsafe fn tile(
    kc: usize,
    a: *const u32,
    b: *const u32,
    c: *mut f32,
    ldc: usize,
    rows: usize,
    cols: usize,
    load: bool,
    epi: TileEpilogue,
) {
    use std::arch::asm;
    use std::arch::x86_64::*;
    const NR: usize = super::gemm16::NR;
    debug_assert!(kc.is_multiple_of(KT) && rows <= MR && cols <= NR);
    // The tiles go through a 32 × 32 buffer in L1 and vector loads and
    // stores: a tile store straight into a large C waits for every line it
    // writes (measured: 2.4× slower), where vector stores retire into the
    // store buffer.
    #[repr(align(64))]
    #[allow(dead_code)] // only its storage is used, through a pointer
    struct Buf([f32; MR * NR]);
    // Every element is written by the tile stores before it is read.
    let mut buf = std::mem::MaybeUninit::<Buf>::uninit();
    let bp = buf.as_mut_ptr() as *mut f32;
    asm!(
        "tilezero tmm0",
        "tilezero tmm1",
        "tilezero tmm2",
        "tilezero tmm3",
        options(nostack, nomem)
    );
    let (sa, sb) = (KT * 4, NR * 4);
    let a2 = a.add(16 * KT);
    for q in (0..kc).step_by(KT) {
        asm!(
            "tileloadd tmm4, [{a} + {sa}*1]",
            "tileloadd tmm6, [{b} + {sb}*1]",
            "tileloadd tmm7, [{b} + {sb}*1 + 64]",
            "tdpbf16ps tmm0, tmm4, tmm6",
            "tileloadd tmm5, [{a2} + {sa}*1]",
            "tdpbf16ps tmm1, tmm4, tmm7",
            "tdpbf16ps tmm2, tmm5, tmm6",
            "tdpbf16ps tmm3, tmm5, tmm7",
            a = in(reg) a.add(q * MR),
            a2 = in(reg) a2.add(q * MR),
            b = in(reg) b.add(q * NR),
            sa = in(reg) sa,
            sb = in(reg) sb,
            options(nostack, readonly),
        );
    }
    asm!(
        "tilestored [{c} + {s}*1], tmm0",
        "tilestored [{c} + {s}*1 + 64], tmm1",
        "tilestored [{c2} + {s}*1], tmm2",
        "tilestored [{c2} + {s}*1 + 64], tmm3",
        c = in(reg) bp,
        c2 = in(reg) bp.add(16 * NR),
        s = in(reg) NR * 4,
        options(nostack),
    );
    let (m0, m1) = super::gemm16::col_masks(cols);
    // Streaming stores write whole lines: full-width blocks only, rows
    // on 64-byte boundaries (checked per row).
    let stream = epi.stream && cols == NR;
    // C (+ C) (+ bias) from the buffer, kept there (full-width stores, so
    // that the activation reads it back from L1; reading C back instead
    // waits for its stores to reach memory).
    for r in 0..rows {
        let p = c.add(r * ldc);
        let src = bp.add(r * NR);
        let (mut x0, mut x1) = (_mm512_loadu_ps(src), _mm512_loadu_ps(src.add(16)));
        if load {
            x0 = _mm512_add_ps(x0, _mm512_maskz_loadu_ps(m0, p));
            x1 = _mm512_add_ps(x1, _mm512_maskz_loadu_ps(m1, p.add(16)));
        }
        if !epi.bias.is_null() {
            x0 = _mm512_add_ps(x0, _mm512_maskz_loadu_ps(m0, epi.bias));
            x1 = _mm512_add_ps(x1, _mm512_maskz_loadu_ps(m1, epi.bias.add(16)));
        }
        store_row(p, x0, x1, (m0, m1), stream);
        if epi.act.is_some() {
            _mm512_storeu_ps(src, x0);
            _mm512_storeu_ps(src.add(16), x1);
        }
    }
    if let Some((act, dst)) = epi.act {
        let mut abuf = std::mem::MaybeUninit::<Buf>::uninit();
        let ap = abuf.as_mut_ptr() as *mut f32;
        let len = rows * NR;
        super::kernels::act_fwd(
            act,
            std::slice::from_raw_parts_mut(ap, len),
            std::slice::from_raw_parts(bp, len),
        );
        match dst {
            ActDst::F32(out) => {
                for r in 0..rows {
                    let (o, src) = (out.add(r * ldc), ap.add(r * NR));
                    let (y0, y1) = (_mm512_loadu_ps(src), _mm512_loadu_ps(src.add(16)));
                    store_row(o, y0, y1, (m0, m1), stream);
                }
            }
            ActDst::Packed(out) => {
                // Row r's 16 pairs are one line; columns past `cols` and
                // rows past `rows` (the last strip's) are zeros.
                let stream = epi.stream && (out as usize).is_multiple_of(64);
                for r in 0..MR {
                    let v = if r < rows {
                        let src = ap.add(r * NR);
                        let (y0, y1) = (
                            _mm512_maskz_loadu_ps(m0, src),
                            _mm512_maskz_loadu_ps(m1, src.add(16)),
                        );
                        std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(y1, y0))
                    } else {
                        _mm512_setzero_si512()
                    };
                    let o = out.add(r * KT) as *mut __m512i;
                    if stream {
                        _mm512_stream_si512(o, v);
                    } else {
                        _mm512_storeu_si512(o as *mut _, v);
                    }
                }
            }
        }
    }
}

/// One row of a block (`NR` = 32 values in two vectors) to `p`: streaming
/// stores where `stream` (a full-width block) and the row is whole 64-byte
/// lines, else masked stores of the block's columns.
///
/// # Safety
/// `p` is valid for the columns the masks select.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn store_row(
    p: *mut f32,
    x0: std::arch::x86_64::__m512,
    x1: std::arch::x86_64::__m512,
    (m0, m1): (u16, u16),
    stream: bool,
) {
    use std::arch::x86_64::*;
    if stream && (p as usize).is_multiple_of(64) {
        _mm512_stream_ps(p, x0);
        _mm512_stream_ps(p.add(16), x1);
    } else {
        _mm512_mask_storeu_ps(p, m0, x0);
        _mm512_mask_storeu_ps(p.add(16), m1, x1);
    }
}

/// Where [`tile`] writes `act(C)`.
#[derive(Clone, Copy)]
pub enum ActDst {
    /// f32: the block's first element (row stride `ldc`, as C).
    F32(*mut f32),
    /// bf16 pairs packed as the left-hand operand of the next product
    /// ([`super::gemm16::PackedA`], whose `k` is this product's `n`): the
    /// block is one tile group of one strip there, `MR` rows of [`KT`]
    /// pairs from this pointer.
    Packed(*mut u32),
}

/// What [`tile`] does to its block of C besides storing it: add a bias
/// (`bias`: the block's first column of it, null for none), then write
/// `act(C)` to `act`'s destination.
#[derive(Clone, Copy)]
pub struct TileEpilogue {
    pub bias: *const f32,
    pub act: Option<(crate::backend::Act, ActDst)>,
    /// Write C (and `out`) with non-temporal stores where a row of the
    /// block is whole cache lines ([`super::gemm16::streams`]).
    pub stream: bool,
}

impl TileEpilogue {
    /// Nothing but the store.
    pub const NONE: TileEpilogue = TileEpilogue {
        bias: std::ptr::null(),
        act: None,
        stream: false,
    };
}
