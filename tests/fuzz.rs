//! Mutation fuzzing, on stable Rust, of every reader of untrusted files: the
//! safetensors header (single files, checkpoints, sharded directories and
//! their index), GGUF (header, dequantization, config, weights and
//! tokenizer), config.json / modules.json / pooling configs, the TSV and
//! JSONL readers, BIG-bench task.json, SQuAD JSON, prompt template files and
//! tokenizer.json.
//!
//! Seeds are the committed fixtures (`tests/fixtures/*`, with small extra
//! seeds in `tests/fixtures/fuzz/seeds/`). Each iteration applies 1–4 stacked
//! mutations (bit flips, interesting bytes, lying 32/64-bit lengths,
//! truncation, range duplication / deletion, random insertions, dictionary
//! tokens, numbers rewritten to extreme values, splicing with another seed),
//! writes the result to a file and opens it through the public API. Every
//! call must return (Ok or an error that names the file) without panicking,
//! and no single allocation may exceed [`MAX_ALLOC`] — a global allocator
//! records the largest request, so a header that lies about a size cannot
//! make a reader reserve gigabytes even lazily.
//!
//! A panic is caught (`catch_unwind`), reported with the target, seed and
//! iteration, and the input is written to `target/fuzz-crashes/TARGET/`;
//! copy it to `tests/fixtures/fuzz/TARGET/` to keep it as a regression seed
//! (every file there is replayed first, on every run). An abort (which
//! `catch_unwind` cannot catch) leaves the last input in
//! `target/fuzz-work/TARGET/`.
//!
//! Default: a smoke run of [`SMOKE_ITERS`] iterations per target, with a
//! fixed seed. `BEFT_FUZZ_ITERS=N` runs N iterations per target,
//! `BEFT_FUZZ_SECS=S` runs each target for S seconds (seeded from the clock
//! unless `BEFT_FUZZ_SEED` is set); `BEFT_FUZZ_SEED` fixes the seed.

use std::alloc::{GlobalAlloc, Layout, System};
use std::fs;
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use beft::rng::Rng;

#[path = "../fuzz/harness.rs"]
mod harness;
use harness::{root, write_setup, Seed, Target};

// ---------------------------------------------------------------------------
// Allocation tracking
// ---------------------------------------------------------------------------

/// The largest single allocation any reader may request for these inputs
/// (all under 100 KB).
const MAX_ALLOC: usize = 64 << 20;

/// Largest allocation request since the last reset.
static LARGEST: AtomicUsize = AtomicUsize::new(0);

struct Tracking;

// SAFETY: forwards every call to the system allocator unchanged; only
// records the requested sizes.
unsafe impl GlobalAlloc for Tracking {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LARGEST.fetch_max(l.size(), Ordering::Relaxed);
        System.alloc(l)
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        LARGEST.fetch_max(l.size(), Ordering::Relaxed);
        System.alloc_zeroed(l)
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        LARGEST.fetch_max(new, Ordering::Relaxed);
        System.realloc(p, l, new)
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        System.dealloc(p, l)
    }
}

#[global_allocator]
static ALLOC: Tracking = Tracking;

/// Targets run one at a time: the allocation record is global, and the
/// machine running the tests may be small.
static SERIAL: Mutex<()> = Mutex::new(());

// ---------------------------------------------------------------------------
// Settings
// ---------------------------------------------------------------------------

const SMOKE_ITERS: u64 = 300;
const DEFAULT_SEED: u64 = 0xBEF7_F022;

struct Budget {
    iters: Option<u64>,
    secs: Option<f64>,
    seed: u64,
}

fn budget() -> Budget {
    let var = |k: &str| std::env::var(k).ok().filter(|s| !s.trim().is_empty());
    let iters = var("BEFT_FUZZ_ITERS").map(|s| s.trim().parse().expect("BEFT_FUZZ_ITERS"));
    let secs = var("BEFT_FUZZ_SECS").map(|s| s.trim().parse().expect("BEFT_FUZZ_SECS"));
    let seed = match var("BEFT_FUZZ_SEED") {
        Some(s) => s.trim().parse().expect("BEFT_FUZZ_SEED"),
        None if secs.is_some() => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64,
        None => DEFAULT_SEED,
    };
    Budget {
        iters: if iters.is_none() && secs.is_none() {
            Some(SMOKE_ITERS)
        } else {
            iters
        },
        secs,
        seed,
    }
}

// (targets: fuzz/harness.rs)
// ---------------------------------------------------------------------------
// Mutation
// ---------------------------------------------------------------------------

const GENERIC_DICT: &[&str] = &[
    "{",
    "}",
    "[",
    "]",
    "\"",
    ",",
    ":",
    "\\",
    "\\u0000",
    "0",
    "-1",
    "1e308",
    "null",
    "true",
    "18446744073709551615",
    "9223372036854775808",
    "4294967296",
];

const INTERESTING_NUMBERS: &[&str] = &[
    "0",
    "1",
    "-1",
    "255",
    "65536",
    "2147483647",
    "4294967295",
    "4294967296",
    "9007199254740993",
    "18446744073709551615",
    "18446744073709551616",
    "99999999999999999999999",
    "1e38",
    "1e39",
    "1e308",
    "1e400",
    "-0.0",
    "0.5",
    "NaN",
];

fn interesting_u64(len: usize, rng: &mut Rng) -> u64 {
    let l = len as u64;
    let v = [
        0,
        1,
        u64::MAX,
        u64::MAX / 2,
        1 << 63,
        1 << 40,
        1 << 32,
        u32::MAX as u64,
        i32::MAX as u64,
        100_000_000,
        100_000_001,
        l,
        l + 1,
        l.saturating_sub(8),
        l * 2,
        32,
    ];
    v[rng.below(v.len())]
}

/// A position, most often inside the hot prefix.
fn pos(rng: &mut Rng, len: usize, hot: usize) -> usize {
    if len == 0 {
        return 0;
    }
    if hot > 0 && hot < len && rng.below(10) < 8 {
        rng.below(hot)
    } else {
        rng.below(len)
    }
}

fn mutate(
    b: &mut Vec<u8>,
    hot: usize,
    dict: &[&str],
    others: &[&Seed],
    rng: &mut Rng,
) -> &'static str {
    let len = b.len();
    match rng.below(11) {
        0 if len > 0 => {
            let i = pos(rng, len, hot);
            b[i] ^= 1 << rng.below(8);
            "bit flip"
        }
        1 if len > 0 => {
            let i = pos(rng, len, hot);
            let v = [
                0u8, 0xff, 0x7f, 0x80, 1, b'"', b'{', b'9', b'\t', b'\n', b'-', b'.',
            ];
            b[i] = v[rng.below(v.len())];
            "interesting byte"
        }
        2 if len >= 8 => {
            let i = pos(rng, len - 7, hot);
            let v = interesting_u64(len, rng);
            if rng.below(2) == 0 {
                b[i..i + 8].copy_from_slice(&v.to_le_bytes());
                "u64 overwrite"
            } else {
                b[i..i + 4].copy_from_slice(&(v as u32).to_le_bytes());
                "u32 overwrite"
            }
        }
        3 => {
            let at = pos(rng, len + 1, hot);
            b.truncate(at);
            "truncate"
        }
        4 if len > 0 => {
            let s = pos(rng, len, hot);
            let n = 1 + rng.below((len - s).min(256));
            let chunk = b[s..s + n].to_vec();
            let at = pos(rng, len + 1, hot);
            b.splice(at..at, chunk);
            "duplicate range"
        }
        5 if len > 0 => {
            let s = pos(rng, len, hot);
            let n = 1 + rng.below((len - s).min(64));
            b.drain(s..s + n);
            "delete range"
        }
        6 => {
            let at = pos(rng, len + 1, hot);
            let n = 1 + rng.below(16);
            let ins: Vec<u8> = (0..n).map(|_| rng.next_u64() as u8).collect();
            b.splice(at..at, ins);
            "insert random"
        }
        7 | 8 => {
            let d = if rng.below(3) == 0 {
                GENERIC_DICT
            } else {
                dict
            };
            let d = if d.is_empty() { GENERIC_DICT } else { d };
            let tok = d[rng.below(d.len())].as_bytes();
            let at = pos(rng, len + 1, hot);
            if rng.below(2) == 0 || at + tok.len() > len {
                b.splice(at..at, tok.iter().copied());
                "insert token"
            } else {
                b[at..at + tok.len()].copy_from_slice(tok);
                "overwrite token"
            }
        }
        9 => {
            // Rewrite a run of ASCII digits as an extreme number.
            let start = pos(rng, len + 1, hot);
            let Some(i) = (start..len).find(|&i| b[i].is_ascii_digit()) else {
                return "no digits";
            };
            let mut j = i;
            while j < len && (b[j].is_ascii_digit() || b[j] == b'.') {
                j += 1;
            }
            let n = INTERESTING_NUMBERS[rng.below(INTERESTING_NUMBERS.len())];
            b.splice(i..j, n.bytes());
            "number"
        }
        _ => {
            if let Some(o) = others.get(rng.below(others.len().max(1))) {
                let cut = pos(rng, len + 1, hot);
                let from = rng.below(o.bytes.len() + 1);
                b.truncate(cut);
                b.extend_from_slice(&o.bytes[from..]);
                "splice"
            } else {
                "no splice"
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Driver
// ---------------------------------------------------------------------------

fn hash(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    })
}

/// Per-target results.
#[derive(Default)]
struct Stats {
    iters: u64,
    ok: u64,
    err: u64,
    largest_alloc: usize,
    slowest: Duration,
    failures: Vec<String>,
    /// Failing mutated inputs (only the first [`MAX_REPORTED`] are listed and saved).
    failed: u64,
}

const MAX_REPORTED: u64 = 20;

/// Run `p` through the target, checking for panics, absurd allocations and
/// errors that do not name the file. `None`: fine.
fn check_one(t: &Target, p: &Path, dir: &Path, tag: &str, st: &mut Stats) -> Option<String> {
    LARGEST.store(0, Ordering::SeqCst);
    let t0 = Instant::now();
    let r = panic::catch_unwind(AssertUnwindSafe(|| (t.run)(p, tag)));
    st.slowest = st.slowest.max(t0.elapsed());
    let largest = LARGEST.load(Ordering::SeqCst);
    st.largest_alloc = st.largest_alloc.max(largest);
    st.iters += 1;
    let problem = match r {
        Err(payload) => {
            let m = payload
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "non-string panic".into());
            Some(format!("panicked: {m}"))
        }
        Ok(outcome) => {
            if outcome.is_ok() {
                st.ok += 1;
            } else {
                st.err += 1;
            }
            harness::problem(dir, &outcome)
        }
    };
    problem.or_else(|| {
        (largest > MAX_ALLOC)
            .then(|| format!("allocated {largest} bytes in one request (limit {MAX_ALLOC})"))
    })
}

fn save_crash(t: &Target, name: &str, bytes: &[u8]) -> PathBuf {
    let d = root().join("target/fuzz-crashes").join(t.name);
    fs::create_dir_all(&d).unwrap();
    let p = d.join(name);
    fs::write(&p, bytes).unwrap();
    p
}

fn fuzz(make: fn() -> Target) {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let t = make();
    let _ = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build_global();
    let b = budget();
    let work = root().join("target/fuzz-work").join(t.name);
    let _ = fs::remove_dir_all(&work);
    let mut st = Stats::default();
    // Quiet panics: they are caught and reported below.
    let hook = panic::take_hook();
    panic::set_hook(Box::new(|_| {}));

    // Every seed, unmutated, and every kept regression input first.
    let mut replay: Vec<(usize, String, Vec<u8>)> = Vec::new();
    for (i, s) in t.seeds.iter().enumerate() {
        replay.push((i, format!("seed {}", s.name), s.bytes.clone()));
    }
    let reg = root().join("tests/fixtures/fuzz").join(t.name);
    if let Ok(entries) = fs::read_dir(&reg) {
        let mut files: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
        files.sort();
        for f in files {
            let fname = f.file_name().unwrap().to_string_lossy().into_owned();
            let seed_name = fname.split("__").next().unwrap_or("");
            let i = t
                .seeds
                .iter()
                .position(|s| s.name == seed_name)
                .unwrap_or_else(|| panic!("{}: no seed named '{seed_name}'", f.display()));
            replay.push((
                i,
                format!("regression {}", f.display()),
                fs::read(&f).unwrap(),
            ));
        }
    }
    // The corpus kept from the long cargo-fuzz runs (`fuzz/corpus/TARGET/`):
    // each entry's first byte picks the seed, the rest is the file.
    let corpus = root().join("fuzz/corpus").join(t.name);
    if let Ok(entries) = fs::read_dir(&corpus) {
        let mut files: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
        files.sort();
        for f in files {
            let data = fs::read(&f).unwrap();
            if let Some((&first, bytes)) = data.split_first() {
                let i = first as usize % t.seeds.len();
                replay.push((i, format!("corpus {}", f.display()), bytes.to_vec()));
            }
        }
    }
    for (i, what, bytes) in &replay {
        let s = &t.seeds[*i];
        let dir = work.join(format!("replay{i}"));
        write_setup(&dir, s);
        let p = dir.join(s.dest);
        fs::write(&p, bytes).unwrap();
        if let Some(problem) = check_one(&t, &p, &dir, s.tag, &mut st) {
            st.failures.push(format!("{}: {what}: {problem}", t.name));
        }
    }

    // Mutated inputs.
    for (i, s) in t.seeds.iter().enumerate() {
        write_setup(&work.join(format!("seed{i}")), s);
    }
    let start = Instant::now();
    let mut iter = 0u64;
    loop {
        if b.iters.is_some_and(|n| iter >= n) {
            break;
        }
        if b.secs.is_some_and(|s| start.elapsed().as_secs_f64() >= s) {
            break;
        }
        let mut rng = Rng::new(b.seed ^ hash(t.name) ^ iter.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let i = rng.below(t.seeds.len());
        let s = &t.seeds[i];
        let others: Vec<&Seed> = t.seeds.iter().collect();
        let mut bytes = s.bytes.clone();
        let mut applied = Vec::new();
        for _ in 0..[1, 1, 1, 1, 2, 2, 3, 4][rng.below(8)] {
            let hot = s.hot.min(bytes.len());
            applied.push(mutate(&mut bytes, hot, t.dict, &others, &mut rng));
        }
        let dir = work.join(format!("seed{i}"));
        let p = dir.join(s.dest);
        fs::write(&p, &bytes).unwrap();
        if let Some(problem) = check_one(&t, &p, &dir, s.tag, &mut st) {
            st.failed += 1;
            if st.failed > MAX_REPORTED {
                iter += 1;
                continue;
            }
            let saved = save_crash(&t, &format!("{}__s{}_i{iter}", s.name, b.seed), &bytes);
            st.failures.push(format!(
                "{}: seed {} iteration {iter} (mutations {applied:?}, BEFT_FUZZ_SEED={}): {problem}; input saved to {}",
                t.name,
                s.name,
                b.seed,
                saved.display()
            ));
        }
        iter += 1;
    }
    panic::set_hook(hook);
    let failed = st.failures.len() as u64 + st.failed.saturating_sub(MAX_REPORTED);
    println!(
        "fuzz {}: {} inputs ({} mutated, seed {}) in {:.1}s: {} ok, {} errors, {} failures; largest allocation {} bytes, slowest input {:?}",
        t.name,
        st.iters,
        iter,
        b.seed,
        start.elapsed().as_secs_f64(),
        st.ok,
        st.err,
        failed,
        st.largest_alloc,
        st.slowest
    );
    assert!(
        st.failures.is_empty(),
        "{failed} failing inputs (the first {} listed):\n{}",
        st.failures.len(),
        st.failures.join("\n")
    );
    let _ = fs::remove_dir_all(&work);
}

#[test]
fn fuzz_safetensors() {
    fuzz(harness::safetensors_target);
}

#[test]
fn fuzz_sharded_safetensors() {
    fuzz(harness::sharded_target);
}

#[test]
fn fuzz_config() {
    fuzz(harness::config_target);
}

#[test]
fn fuzz_gguf() {
    fuzz(harness::gguf_target);
}

#[test]
fn fuzz_tsv() {
    fuzz(harness::tsv_target);
}

#[test]
fn fuzz_jsonl() {
    fuzz(harness::jsonl_target);
}

#[test]
fn fuzz_bigbench_and_squad() {
    fuzz(harness::bigbench_target);
}

#[test]
fn fuzz_templates() {
    fuzz(harness::templates_target);
}

#[test]
fn fuzz_tokenizer() {
    fuzz(harness::tokenizer_target);
}

/// The allocation check itself: a large request is seen even when its
/// memory is never touched.
#[test]
fn allocation_tracking_sees_untouched_large_requests() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    LARGEST.store(0, Ordering::SeqCst);
    let v: Vec<u8> = Vec::with_capacity(2 * MAX_ALLOC);
    assert!(LARGEST.load(Ordering::SeqCst) >= 2 * MAX_ALLOC);
    drop(v);
}
