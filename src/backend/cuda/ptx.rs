//! PTX production: the kernel sources are compiled into the binary
//! (`include_str!` of `kernels/*.cu`) and turned into PTX at run time by
//! NVRTC for the device's own architecture, with an on-disk cache keyed by a
//! hash of the source, the options, the architecture and the NVRTC version
//! (`$BEFT_CACHE/ptx/` or `~/.cache/beft/ptx/`). A plain `cargo build` needs
//! no CUDA toolkit, and the kernels never depend on the build machine's GPU.
//! `scripts/compile_kernels.py` compiles the same text, the same way, in CI.

use std::fs;
use std::path::PathBuf;

use cudarc::nvrtc::Ptx;

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
    ("gemm.cu", include_str!("../../../kernels/gemm.cu")),
    (
        "gemm_sm90.cu",
        include_str!("../../../kernels/gemm_sm90.cu"),
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

/// NVRTC, loaded here rather than through cudarc's loader: cudarc (built
/// for the CUDA 12 API) looks for `libnvrtc.so` and `libnvrtc.so.12` by
/// name only, so a CUDA 13 toolkit (`libnvrtc.so.13`), or one outside the
/// dynamic linker's path, would not be found, and a library loaded here by
/// its full path does not answer cudarc's later look-up by name. The few
/// entry points the compiler needs are resolved from our own handle.
mod nvrtc_lib {
    use std::ffi::{c_char, c_int, c_void, CStr, CString};
    use std::os::unix::ffi::OsStrExt;
    use std::path::{Path, PathBuf};
    use std::sync::OnceLock;

    type Prog = *mut c_void;

    extern "C" {
        fn dlopen(filename: *const c_char, flag: c_int) -> *mut c_void;
        fn dlsym(handle: *mut c_void, symbol: *const c_char) -> *mut c_void;
        fn dladdr(addr: *const c_void, info: *mut DlInfo) -> c_int;
    }

    #[repr(C)]
    struct DlInfo {
        dli_fname: *const c_char,
        dli_fbase: *mut c_void,
        dli_sname: *const c_char,
        dli_saddr: *mut c_void,
    }

    const RTLD_NOW: c_int = 2;
    const RTLD_GLOBAL: c_int = 0x100;

    // The NVRTC entry points used here, by their C signatures.
    type VersionFn = unsafe extern "C" fn(*mut c_int, *mut c_int) -> c_int;
    type ErrorStringFn = unsafe extern "C" fn(c_int) -> *const c_char;
    type CreateFn = unsafe extern "C" fn(
        *mut Prog,
        *const c_char,
        *const c_char,
        c_int,
        *const *const c_char,
        *const *const c_char,
    ) -> c_int;
    type CompileFn = unsafe extern "C" fn(Prog, c_int, *const *const c_char) -> c_int;
    type SizeFn = unsafe extern "C" fn(Prog, *mut usize) -> c_int;
    type ReadFn = unsafe extern "C" fn(Prog, *mut c_char) -> c_int;
    type DestroyFn = unsafe extern "C" fn(*mut Prog) -> c_int;

    pub struct Nvrtc {
        version: VersionFn,
        error_string: ErrorStringFn,
        create: CreateFn,
        compile: CompileFn,
        log_size: SizeFn,
        log: ReadFn,
        ptx_size: SizeFn,
        ptx: ReadFn,
        destroy: DestroyFn,
    }

    fn open(name: &[u8]) -> *mut c_void {
        let Ok(c) = CString::new(name) else {
            return std::ptr::null_mut();
        };
        // SAFETY: dlopen by name or path; the handle is kept for the life of
        // the process (never closed).
        unsafe { dlopen(c.as_ptr(), RTLD_NOW | RTLD_GLOBAL) }
    }

    fn open_path(p: &Path) -> *mut c_void {
        if !p.exists() {
            return std::ptr::null_mut();
        }
        open(p.as_os_str().as_bytes())
    }

    /// The first library that loads: `$BEFT_NVRTC` alone when set; else by
    /// name through the dynamic linker's path, then in the toolkit folders.
    fn find() -> *mut c_void {
        const NAMES: [&str; 3] = ["libnvrtc.so", "libnvrtc.so.13", "libnvrtc.so.12"];
        if let Some(p) = std::env::var_os("BEFT_NVRTC") {
            return open_path(Path::new(&p));
        }
        for n in NAMES {
            let h = open(n.as_bytes());
            if !h.is_null() {
                return h;
            }
        }
        let mut dirs: Vec<PathBuf> = Vec::new();
        for var in ["CUDA_HOME", "CUDA_PATH"] {
            if let Some(p) = std::env::var_os(var) {
                dirs.push(PathBuf::from(p).join("lib64"));
            }
        }
        dirs.push(PathBuf::from("/usr/local/cuda/lib64"));
        for d in dirs {
            for n in NAMES {
                let h = open_path(&d.join(n));
                if !h.is_null() {
                    return h;
                }
            }
        }
        std::ptr::null_mut()
    }

    /// NVRTC opens `libnvrtc-builtins.so.X.Y` by name when it compiles; a
    /// library found outside the linker's path (a toolkit folder, a pip
    /// wheel without an `$ORIGIN` run path) would not find it. Loading the
    /// builtins beside the library first makes that look-up succeed (it
    /// matches the loaded library's soname).
    fn preload_builtins(sym: *const c_void) {
        let mut info = DlInfo {
            dli_fname: std::ptr::null(),
            dli_fbase: std::ptr::null_mut(),
            dli_sname: std::ptr::null(),
            dli_saddr: std::ptr::null_mut(),
        };
        // SAFETY: dladdr fills `info` for an address inside a loaded library.
        if unsafe { dladdr(sym, &mut info) } == 0 || info.dli_fname.is_null() {
            return;
        }
        // SAFETY: a NUL-terminated path owned by the dynamic linker.
        let file = unsafe { CStr::from_ptr(info.dli_fname) };
        let Some(dir) = Path::new(std::ffi::OsStr::from_bytes(file.to_bytes())).parent() else {
            return;
        };
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let name = e.file_name();
            let n = name.to_string_lossy();
            if n.starts_with("libnvrtc-builtins.so.") {
                open_path(&e.path());
            }
        }
    }

    fn load() -> Option<Nvrtc> {
        let h = find();
        if h.is_null() {
            return None;
        }
        macro_rules! sym {
            ($name:literal, $ty:ty) => {{
                // SAFETY: a NUL-terminated symbol name looked up in `h`.
                let p = unsafe { dlsym(h, concat!($name, "\0").as_ptr() as *const c_char) };
                if p.is_null() {
                    return None;
                }
                // SAFETY: the symbol is the NVRTC function of that name, whose
                // C signature `$ty` spells.
                unsafe { std::mem::transmute::<*mut c_void, $ty>(p) }
            }};
        }
        let lib = Nvrtc {
            version: sym!("nvrtcVersion", VersionFn),
            error_string: sym!("nvrtcGetErrorString", ErrorStringFn),
            create: sym!("nvrtcCreateProgram", CreateFn),
            compile: sym!("nvrtcCompileProgram", CompileFn),
            log_size: sym!("nvrtcGetProgramLogSize", SizeFn),
            log: sym!("nvrtcGetProgramLog", ReadFn),
            ptx_size: sym!("nvrtcGetPTXSize", SizeFn),
            ptx: sym!("nvrtcGetPTX", ReadFn),
            destroy: sym!("nvrtcDestroyProgram", DestroyFn),
        };
        preload_builtins(lib.version as *const c_void);
        Some(lib)
    }

    /// NVRTC, loaded on first use (`None` when no library can be found).
    pub fn get() -> Option<&'static Nvrtc> {
        static LIB: OnceLock<Option<Nvrtc>> = OnceLock::new();
        LIB.get_or_init(load).as_ref()
    }

    impl Nvrtc {
        fn err(&self, what: &str, r: c_int) -> String {
            // SAFETY: nvrtcGetErrorString returns a static string.
            let s = unsafe { (self.error_string)(r) };
            let msg = if s.is_null() {
                format!("error {r}")
            } else {
                // SAFETY: NUL-terminated, static.
                unsafe { CStr::from_ptr(s) }.to_string_lossy().into_owned()
            };
            format!("{what}: {msg}")
        }

        /// (major, minor).
        pub fn version(&self) -> Result<(i32, i32), String> {
            let (mut major, mut minor) = (0, 0);
            // SAFETY: plain out-parameters.
            let r = unsafe { (self.version)(&mut major, &mut minor) };
            if r != 0 {
                return Err(self.err("nvrtcVersion", r));
            }
            Ok((major, minor))
        }

        /// One of a program's outputs (its log, its PTX) through the NVRTC
        /// call `what` (`size` = `{what}Size` gives the length with the
        /// closing NUL, `read` fills a buffer that long): the bytes before
        /// the NUL, or the failing call's message.
        ///
        /// # Safety
        /// `prog` is a live program; `size` and `read` are a matching pair.
        unsafe fn read_out(
            &self,
            prog: Prog,
            what: &str,
            size: SizeFn,
            read: ReadFn,
        ) -> Result<Vec<u8>, String> {
            let mut n = 0usize;
            let r = size(prog, &mut n);
            if r != 0 {
                return Err(self.err(&format!("{what}Size"), r));
            }
            let mut buf = vec![0u8; n.max(1)];
            let r = read(prog, buf.as_mut_ptr() as *mut c_char);
            if r != 0 {
                return Err(self.err(what, r));
            }
            let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
            buf.truncate(end);
            Ok(buf)
        }

        /// The PTX of `src` (named `name` in messages) compiled with `opts`;
        /// on failure, NVRTC's message and log.
        pub fn compile_ptx(
            &self,
            src: &str,
            name: &str,
            opts: &[String],
        ) -> Result<String, String> {
            let src = CString::new(src).map_err(|_| "source holds a NUL byte".to_string())?;
            let cname = CString::new(name).map_err(|_| "name holds a NUL byte".to_string())?;
            let copts: Vec<CString> = opts
                .iter()
                .map(|o| {
                    CString::new(o.as_str()).map_err(|_| format!("option {o:?} holds a NUL byte"))
                })
                .collect::<Result<_, _>>()?;
            let ptrs: Vec<*const c_char> = copts.iter().map(|c| c.as_ptr()).collect();
            let mut prog: Prog = std::ptr::null_mut();
            // SAFETY: valid NUL-terminated strings that outlive the program;
            // no headers.
            let r = unsafe {
                (self.create)(
                    &mut prog,
                    src.as_ptr(),
                    cname.as_ptr(),
                    0,
                    std::ptr::null(),
                    std::ptr::null(),
                )
            };
            if r != 0 {
                return Err(self.err("nvrtcCreateProgram", r));
            }
            // SAFETY: `prog` was created above and is destroyed below, once.
            let out = unsafe {
                let r = (self.compile)(prog, ptrs.len() as c_int, ptrs.as_ptr());
                if r != 0 {
                    let log = self
                        .read_out(prog, "nvrtcGetProgramLog", self.log_size, self.log)
                        .map(|b| String::from_utf8_lossy(&b).into_owned())
                        .unwrap_or_default();
                    Err(format!("{}\n{log}", self.err("nvrtcCompileProgram", r)))
                } else {
                    self.read_out(prog, "nvrtcGetPTX", self.ptx_size, self.ptx)
                        .and_then(|b| String::from_utf8(b).map_err(|_| "PTX is not UTF-8".into()))
                }
            };
            // SAFETY: destroys the program created above.
            unsafe { (self.destroy)(&mut prog) };
            out
        }
    }
}

/// The virtual architecture kernel file `file` is compiled for on a device
/// of compute capability `cc`, or `None` when the file does not run there:
/// files named `*_sm90.cu` use Hopper's arch-specific instructions (wgmma)
/// and exist for compute capability 9.0 alone, as `compute_90a` (the same
/// rule as `scripts/compile_kernels.py`).
pub fn arch_for(file: &str, cc: (i32, i32)) -> Option<String> {
    if file.ends_with("_sm90.cu") {
        (cc == (9, 0)).then(|| "compute_90a".to_string())
    } else {
        Some(format!("compute_{}{}", cc.0, cc.1))
    }
}

/// Whether the backend can do without kernel file `file` (the Hopper-only
/// ones, each with a portable twin): it is skipped with a warning when it
/// fails to compile or load, instead of failing the backend.
pub fn optional(file: &str) -> bool {
    file.ends_with("_sm90.cu")
}

/// NVRTC's options for virtual architecture `arch` (`compute_90`, …).
fn options(arch: &str) -> Vec<String> {
    let mut opts: Vec<String> = NVRTC_OPTS.iter().map(|s| s.to_string()).collect();
    opts.push(format!("--gpu-architecture={arch}"));
    opts
}

/// The PTX of every kernel file that runs on compute capability `cc` (e.g.
/// (9, 0); see [`arch_for`]), from the cache or compiled now. Returns
/// `(file, ptx)` pairs.
pub fn load_all(cc: (i32, i32)) -> Result<Vec<(&'static str, Ptx)>> {
    let nvrtc = nvrtc_lib::get();
    let version = match nvrtc {
        Some(l) => Some(l.version().map_err(|e| Error::msg(format!("NVRTC: {e}")))?),
        None => None,
    };
    let dir = cache_dir();
    let mut out = Vec::with_capacity(SOURCES.len());
    for (file, src) in SOURCES {
        let Some(arch) = arch_for(file, cc) else {
            continue;
        };
        let unit = unit_source(file, src);
        let opts = options(&arch);
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
        let Some(nvrtc) = nvrtc else {
            return Err(Error::msg(
                "NVRTC (libnvrtc.so, .so.13 or .so.12) not found: the CUDA backend compiles its \
                 kernels at run time; install the CUDA toolkit (its lib64 on LD_LIBRARY_PATH, or \
                 in /usr/local/cuda), or `pip install nvidia-cuda-nvrtc-cu12` and set BEFT_NVRTC \
                 to the path of its libnvrtc.so.12",
            ));
        };
        let text = match nvrtc.compile_ptx(&unit, file, &opts) {
            Ok(t) => t,
            // An optional kernel file that does not compile costs its kernels
            // only (the backend falls back to the portable ones).
            Err(e) if optional(file) => {
                eprintln!("warning: kernels/{file}: NVRTC failed for {arch}, not loaded: {e}");
                continue;
            }
            Err(e) => {
                return Err(Error::msg(format!(
                    "kernels/{file}: NVRTC failed for {arch}: {e}"
                )))
            }
        };
        if let Some(p) = &path {
            // Best effort: a read-only cache only costs a recompile. Write to
            // a temporary name unique to this process and call (threads of
            // one process may compile the same file at once) and rename, so
            // that no reader ever sees a half-written file.
            static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
            if let Some(d) = p.parent() {
                let _ = fs::create_dir_all(d);
            }
            let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let tmp = p.with_extension(format!("tmp{}-{seq}", std::process::id()));
            if fs::write(&tmp, &text).is_ok() && fs::rename(&tmp, p).is_err() {
                let _ = fs::remove_file(&tmp);
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

    /// The run-time compiler path — beft's own NVRTC loader and
    /// `compile_ptx` — on every kernel file: it needs NVRTC, not a GPU (CI
    /// points `BEFT_NVRTC` at the pip wheel's library). Each kernel the
    /// backend loads must be an entry of its file's PTX; a broken source
    /// comes back as an error with NVRTC's log.
    #[test]
    fn nvrtc_compiles_every_kernel() {
        let Some(lib) = nvrtc_lib::get() else {
            println!("skipped: no NVRTC library found (set BEFT_NVRTC to a libnvrtc.so)");
            return;
        };
        let (major, _) = lib.version().unwrap();
        assert!(major >= 11, "NVRTC {major}");
        let opts = options("compute_80");
        for (file, src) in SOURCES {
            // sm_80 for the portable files, sm_90a for the Hopper-only ones.
            let arch = arch_for(file, (8, 0))
                .or_else(|| arch_for(file, (9, 0)))
                .unwrap();
            let ptx = lib
                .compile_ptx(&unit_source(file, src), file, &options(&arch))
                .unwrap_or_else(|e| panic!("{file}: {e}"));
            let names = super::super::KERNELS
                .iter()
                .find(|(f, _)| f == file)
                .map(|(_, n)| *n)
                .unwrap_or_else(|| panic!("{file} is not in cuda::KERNELS"));
            for name in names {
                assert!(
                    ptx.contains(&format!(".entry {name}(")),
                    "{file}: no entry {name} in its PTX"
                );
            }
        }
        let err = lib
            .compile_ptx("__global__ void f() { undeclared(); }", "broken.cu", &opts)
            .unwrap_err();
        assert!(
            err.contains("nvrtcCompileProgram") && err.contains("undeclared"),
            "{err}"
        );
    }

    #[test]
    fn hopper_only_files_load_on_sm90_alone() {
        assert_eq!(arch_for("gemm.cu", (8, 6)).as_deref(), Some("compute_86"));
        assert_eq!(arch_for("gemm.cu", (9, 0)).as_deref(), Some("compute_90"));
        assert_eq!(
            arch_for("gemm_sm90.cu", (9, 0)).as_deref(),
            Some("compute_90a")
        );
        assert_eq!(arch_for("gemm_sm90.cu", (8, 0)), None);
        assert_eq!(arch_for("gemm_sm90.cu", (10, 0)), None);
    }

    #[test]
    fn cache_key_hash_is_stable() {
        assert_eq!(fnv1a(&[b""]), fnv1a(&[b""]));
        assert_ne!(fnv1a(&[b"a", b"b"]), fnv1a(&[b"ab"]));
    }
}
