//! PTX production: the kernel sources are compiled into the binary
//! (`include_str!` of `kernels/*.cu`) and turned into PTX at run time by
//! NVRTC for the device's own architecture, with an on-disk cache keyed by a
//! hash of the source, the options, the architecture and the NVRTC version
//! (`$BEFT_CACHE/ptx/` or `~/.cache/beft/ptx/`). A plain `cargo build` needs
//! no CUDA toolkit, and the kernels never depend on the build machine's GPU.
//! `scripts/compile_kernels.py` compiles the same text, the same way, in CI.

use std::fs;
use std::path::PathBuf;

use cudarc::nvrtc::{self, CompileOptions, Ptx};

use crate::error::{Error, Result};

/// `kernels/common.cuh`, pasted in place of each file's include line.
const COMMON: &str = include_str!("../../../kernels/common.cuh");
const INCLUDE_LINE: &str = "#include \"common.cuh\"";

/// Every kernel file (one per op family), by name.
pub const SOURCES: &[(&str, &str)] = &[
    (
        "activation.cu",
        include_str!("../../../kernels/activation.cu"),
    ),
    ("adamw.cu", include_str!("../../../kernels/adamw.cu")),
    (
        "attention.cu",
        include_str!("../../../kernels/attention.cu"),
    ),
    ("bias.cu", include_str!("../../../kernels/bias.cu")),
    (
        "elementwise.cu",
        include_str!("../../../kernels/elementwise.cu"),
    ),
    (
        "embedding.cu",
        include_str!("../../../kernels/embedding.cu"),
    ),
    ("loss.cu", include_str!("../../../kernels/loss.cu")),
    ("matmul.cu", include_str!("../../../kernels/matmul.cu")),
    ("norm.cu", include_str!("../../../kernels/norm.cu")),
    ("pool.cu", include_str!("../../../kernels/pool.cu")),
    ("rope.cu", include_str!("../../../kernels/rope.cu")),
];

/// NVRTC options shared with `scripts/compile_kernels.py` (`NVRTC_OPTS`).
const NVRTC_OPTS: &[&str] = &["--std=c++17", "-default-device"];

/// The translation unit NVRTC compiles for one kernel file.
pub fn unit_source(file: &str, src: &str) -> String {
    assert!(
        src.contains(INCLUDE_LINE),
        "kernels/{file}: missing {INCLUDE_LINE}"
    );
    src.replacen(INCLUDE_LINE, COMMON, 1)
}

/// 64-bit FNV-1a: a stable hash for cache keys (std's hasher may change
/// between Rust releases).
fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for b in *p {
            h ^= *b as u64;
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        h ^= 0xff; // separator
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

fn cache_dir() -> Option<PathBuf> {
    let base = match std::env::var_os("BEFT_CACHE") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => PathBuf::from(std::env::var_os("HOME")?).join(".cache/beft"),
    };
    Some(base.join("ptx"))
}

/// Make NVRTC findable by cudarc: its loader tries library names only
/// (`libnvrtc.so`, `libnvrtc.so.12`, …) through the dynamic linker's path.
/// A CUDA toolkit outside that path is found here and loaded first, after
/// which the loader's look-up by name returns the same library.
fn preload_nvrtc() {
    // SAFETY: probing for a shared library by name.
    if unsafe { nvrtc::sys::is_culib_present() } {
        return;
    }
    let mut dirs: Vec<PathBuf> = Vec::new();
    if let Some(p) = std::env::var_os("BEFT_NVRTC") {
        // An explicit library path.
        try_dlopen(&PathBuf::from(p));
        return;
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(p) = std::env::var_os(var) {
            dirs.push(PathBuf::from(p).join("lib64"));
        }
    }
    dirs.push(PathBuf::from("/usr/local/cuda/lib64"));
    for d in dirs {
        for name in ["libnvrtc.so", "libnvrtc.so.13", "libnvrtc.so.12"] {
            if try_dlopen(&d.join(name)) {
                return;
            }
        }
    }
}

fn try_dlopen(path: &std::path::Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    extern "C" {
        fn dlopen(
            filename: *const std::ffi::c_char,
            flag: std::ffi::c_int,
        ) -> *mut std::ffi::c_void;
    }
    const RTLD_NOW: std::ffi::c_int = 2;
    const RTLD_GLOBAL: std::ffi::c_int = 0x100;
    if !path.exists() {
        return false;
    }
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: dlopen of an existing file; the handle is kept for the life
    // of the process (never closed).
    !unsafe { dlopen(c.as_ptr(), RTLD_NOW | RTLD_GLOBAL) }.is_null()
}

fn nvrtc_version() -> Result<(i32, i32)> {
    let (mut major, mut minor) = (0, 0);
    // SAFETY: plain out-parameters.
    let r = unsafe { nvrtc::sys::nvrtcVersion(&mut major, &mut minor) };
    if r != nvrtc::sys::nvrtcResult::NVRTC_SUCCESS {
        return Err(Error::msg(format!("NVRTC: nvrtcVersion failed ({r:?})")));
    }
    Ok((major, minor))
}

/// The PTX of every kernel file for compute capability `cc` (e.g. (9, 0)),
/// from the cache or compiled now. Returns `(file, ptx)` pairs.
pub fn load_all(cc: (i32, i32)) -> Result<Vec<(&'static str, Ptx)>> {
    preload_nvrtc();
    // SAFETY: probing for a shared library by name.
    let have_nvrtc = unsafe { nvrtc::sys::is_culib_present() };
    let version = if have_nvrtc {
        Some(nvrtc_version()?)
    } else {
        None
    };
    let arch = format!("compute_{}{}", cc.0, cc.1);
    let dir = cache_dir();
    let mut out = Vec::with_capacity(SOURCES.len());
    for (file, src) in SOURCES {
        let unit = unit_source(file, src);
        let mut opts: Vec<String> = NVRTC_OPTS.iter().map(|s| s.to_string()).collect();
        opts.push(format!("--gpu-architecture={arch}"));
        let stem = file.trim_end_matches(".cu");
        let ver = version.map(|(a, b)| format!("{a}.{b}")).unwrap_or_default();
        let key = fnv1a(&[unit.as_bytes(), opts.join(" ").as_bytes(), ver.as_bytes()]);
        let path = dir
            .as_ref()
            .map(|d| d.join(format!("{stem}-{arch}-nvrtc{ver}-{key:016x}.ptx")));
        if let Some(p) = &path {
            if let Ok(text) = fs::read_to_string(p) {
                out.push((*file, Ptx::from_src(text)));
                continue;
            }
        }
        if !have_nvrtc {
            return Err(Error::msg(
                "NVRTC (libnvrtc.so) not found: the CUDA backend compiles its kernels at run time; \
                 install the CUDA toolkit, or `pip install nvidia-cuda-nvrtc-cu12` and set \
                 BEFT_NVRTC to the path of its libnvrtc.so.12",
            ));
        }
        let ptx = nvrtc::compile_ptx_with_opts(
            &unit,
            CompileOptions {
                options: opts,
                name: Some(file.to_string()),
                ..Default::default()
            },
        )
        .map_err(|e| Error::msg(format!("kernels/{file}: NVRTC failed for {arch}: {e}")))?;
        let text = ptx.to_src();
        if let Some(p) = &path {
            // Best effort: a read-only cache only costs a recompile. Write to
            // a temporary name and rename, so that concurrent processes never
            // read a half-written file.
            if let Some(d) = p.parent() {
                let _ = fs::create_dir_all(d);
            }
            let tmp = p.with_extension(format!("tmp{}", std::process::id()));
            if fs::write(&tmp, &text).is_ok() {
                let _ = fs::rename(&tmp, p);
            }
        }
        out.push((*file, Ptx::from_src(text)));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kernel_file_is_listed_and_includes_common() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/kernels");
        let mut on_disk: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".cu"))
            .collect();
        on_disk.sort();
        let listed: Vec<String> = SOURCES.iter().map(|(f, _)| f.to_string()).collect();
        assert_eq!(on_disk, listed, "kernels/*.cu and ptx::SOURCES differ");
        for (f, s) in SOURCES {
            assert!(!unit_source(f, s).contains(INCLUDE_LINE));
        }
    }

    #[test]
    fn cache_key_hash_is_stable() {
        assert_eq!(fnv1a(&[b""]), fnv1a(&[b""]));
        assert_ne!(fnv1a(&[b"a", b"b"]), fnv1a(&[b"ab"]));
    }
}
