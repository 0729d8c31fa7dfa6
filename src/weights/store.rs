//! Safetensors loading: a model directory (single file or sharded with an
//! index) or one file, memory-mapped read-only and read in place.
//!
//! The header is parsed here, by hand, so that every malformed input becomes
//! an error that names the file and the problem — never a panic and never an
//! allocation sized by untrusted numbers. Pickle checkpoints
//! (`pytorch_model.bin`, `*.pt`, `*.pth`) are never loaded: unpickling can run
//! arbitrary code.
//!
//! Layout of a safetensors file: an 8-byte little-endian header length `N`,
//! `N` bytes of JSON (`{"__metadata__": {str: str}, name: {"dtype", "shape",
//! "data_offsets": [begin, end]}}`, offsets relative to the byte after the
//! header), then the tensor data.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

use serde_json::Value;

use super::tensor::{Bytes, DType, TensorView};
use crate::error::{Error, Result};

/// Largest header accepted (the safetensors crate uses the same bound).
const MAX_HEADER: u64 = 100_000_000;

/// Bytes hashed at each end of every tensor by [`WeightStore::fingerprint`].
const FINGERPRINT_EDGE: usize = 64;

/// The index of a sharded checkpoint.
const INDEX_FILE: &str = "model.safetensors.index.json";

/// The frozen weights of one model (or one trained-bias file): every tensor
/// of every file, viewed in place in read-only memory maps.
#[derive(Clone)]
pub struct WeightStore {
    /// The file or directory, for messages.
    source: PathBuf,
    /// Loadable tensors (F32/F16/BF16), by name.
    tensors: BTreeMap<String, TensorView>,
    /// Well-formed tensors of a dtype that weights may not have (e.g. BERT's
    /// I64 `position_ids` buffer): name → (file, dtype). They are skipped at
    /// open and only an error if asked for.
    unsupported: BTreeMap<String, (Arc<PathBuf>, String)>,
    /// `__metadata__` of the (first) file.
    metadata: BTreeMap<String, String>,
    /// Size and modification time of every mapped file when it was opened.
    files: Vec<FileStamp>,
}

/// A memory-mapped file's size and modification time when it was opened.
/// The map reads the file in place, so a file rewritten while it is in use
/// changes the weights under a running job; [`FileStamp::check`] notices
/// (cheaply: one `stat`).
#[derive(Clone, Debug, PartialEq)]
pub struct FileStamp {
    pub path: PathBuf,
    pub len: u64,
    pub modified: Option<SystemTime>,
}

impl FileStamp {
    /// The stamp of `path` from the metadata of its open handle.
    pub fn new(path: &Path, meta: &fs::Metadata) -> Self {
        FileStamp {
            path: path.to_path_buf(),
            len: meta.len(),
            modified: meta.modified().ok(),
        }
    }

    /// An error naming the file if it is gone or its size or modification
    /// time differ from the stamp.
    pub fn check(&self) -> Result<()> {
        let p = &self.path;
        let m = fs::metadata(p).map_err(|e| {
            Error::file(
                p,
                format!("cannot be checked any more ({e}); was it removed while in use?"),
            )
        })?;
        let modified = m.modified().ok();
        if m.len() == self.len && modified == self.modified {
            return Ok(());
        }
        let what = if m.len() != self.len {
            format!("its size went from {} to {} bytes", self.len, m.len())
        } else {
            let secs = |t: Option<SystemTime>| {
                t.and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
                    .map_or("?".to_string(), |d| format!("{:.3}", d.as_secs_f64()))
            };
            format!(
                "its modification time went from {} to {} (seconds since 1970)",
                secs(self.modified),
                secs(modified)
            )
        };
        Err(Error::file(
            p,
            format!(
                "changed while it was in use ({what}); the weights are memory-mapped, so reading on would mix old and new values"
            ),
        ))
    }
}

impl fmt::Debug for WeightStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "WeightStore({}, {} tensors)",
            self.source.display(),
            self.tensors.len()
        )
    }
}

impl WeightStore {
    /// Open a Hugging Face model directory: `model.safetensors`, or sharded
    /// `model-0000i-of-0000n.safetensors` files listed by
    /// `model.safetensors.index.json` (its `weight_map`: tensor → file). Each
    /// file is memory-mapped read-only and its tensors are read in place.
    ///
    /// A directory with only pickle checkpoints (`*.bin`, `*.pt`, `*.pth`) is
    /// refused: they are never loaded, because unpickling can run arbitrary
    /// code.
    pub fn open_dir(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            let what = if dir.exists() {
                "not a directory"
            } else {
                "no such directory"
            };
            return Err(Error::file(
                dir,
                format!("{what} (expected a model directory with model.safetensors)"),
            ));
        }
        let single = dir.join("model.safetensors");
        if single.is_file() {
            let mut store = Self::open_file(&single)?;
            store.source = dir.to_path_buf();
            return Ok(store);
        }
        let index = dir.join(INDEX_FILE);
        if index.is_file() {
            return Self::open_sharded(dir, &index);
        }

        // No safetensors weights: explain why pickle files are not an option.
        let mut pickles: Vec<String> = Vec::new();
        let entries = fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let lower = name.to_ascii_lowercase();
            if lower.ends_with(".bin") || lower.ends_with(".pt") || lower.ends_with(".pth") {
                pickles.push(name);
            }
        }
        pickles.sort();
        if !pickles.is_empty() {
            return Err(Error::file(
                dir,
                format!(
                    "found only PyTorch pickle checkpoint(s) ({}); pickle checkpoints are never loaded \
                     because unpickling can run arbitrary code. beft requires safetensors weights \
                     (model.safetensors): convert them with the `safetensors` project's convert script, \
                     or in Python with `model.save_pretrained(out_dir, safe_serialization=True)`",
                    pickles.join(", ")
                ),
            ));
        }
        Err(Error::file(
            dir,
            format!("no model weights found (expected model.safetensors or {INDEX_FILE} with its shards)"),
        ))
    }

    /// Open one safetensors file (a model file or a trained-bias file).
    pub fn open_file(path: &Path) -> Result<Self> {
        let file = Arc::new(path.to_path_buf());
        let parsed = parse_file(&file)?;
        let mut store = WeightStore {
            source: path.to_path_buf(),
            tensors: BTreeMap::new(),
            unsupported: BTreeMap::new(),
            metadata: parsed.metadata,
            files: vec![parsed.stamp],
        };
        for t in parsed.tensors {
            store.tensors.insert(t.name.clone(), t);
        }
        for (name, dtype) in parsed.unsupported {
            store.unsupported.insert(name, (file.clone(), dtype));
        }
        Ok(store)
    }

    /// A store of tensors that are already in memory or in a map held by the
    /// views themselves (e.g. weights decoded from a GGUF file). `source`
    /// names the store in messages; [`WeightStore::fingerprint`] hashes the
    /// given tensors as for a file. Two tensors with one name are an error.
    pub fn from_tensors(
        source: &Path,
        tensors: Vec<TensorView>,
        metadata: BTreeMap<String, String>,
    ) -> Result<Self> {
        let mut store = WeightStore {
            source: source.to_path_buf(),
            tensors: BTreeMap::new(),
            unsupported: BTreeMap::new(),
            metadata,
            files: Vec::new(),
        };
        for t in tensors {
            let expected = t
                .shape
                .iter()
                .try_fold(t.dtype.size(), |a, &d| a.checked_mul(d));
            if expected != Some(t.bytes().len()) {
                return Err(Error::file(
                    source,
                    format!(
                        "tensor '{}': {} bytes do not hold dtype {} × shape {:?}",
                        t.name,
                        t.bytes().len(),
                        t.dtype,
                        t.shape
                    ),
                ));
            }
            if store.tensors.contains_key(&t.name) {
                return Err(Error::file(
                    source,
                    format!("tensor '{}' appears twice", t.name),
                ));
            }
            store.tensors.insert(t.name.clone(), t);
        }
        Ok(store)
    }

    fn open_sharded(dir: &Path, index: &Path) -> Result<Self> {
        let text = fs::read_to_string(index).map_err(|e| Error::io(index, e))?;
        let v: Value = serde_json::from_str(&text)
            .map_err(|e| Error::file(index, format!("not valid JSON: {e}")))?;
        let map = v
            .get("weight_map")
            .and_then(Value::as_object)
            .ok_or_else(|| {
                Error::file(index, "no \"weight_map\" object (tensor name → shard file)")
            })?;
        if map.is_empty() {
            return Err(Error::file(index, "\"weight_map\" is empty"));
        }
        // Shard → the tensors the index puts there.
        let mut shards: BTreeMap<String, Vec<&str>> = BTreeMap::new();
        for (tensor, shard) in map {
            let shard = shard.as_str().ok_or_else(|| {
                Error::file(
                    index,
                    format!("weight_map entry for '{tensor}' is not a file name"),
                )
            })?;
            let plain = Path::new(shard)
                .file_name()
                .map(|f| f == std::ffi::OsStr::new(shard))
                .unwrap_or(false);
            if !plain || shard == ".." {
                return Err(Error::file(
                    index,
                    format!("shard '{shard}' (for tensor '{tensor}') is not a plain file name in the model directory"),
                ));
            }
            shards
                .entry(shard.to_string())
                .or_default()
                .push(tensor.as_str());
        }
        let mut store = WeightStore {
            source: dir.to_path_buf(),
            tensors: BTreeMap::new(),
            unsupported: BTreeMap::new(),
            metadata: BTreeMap::new(),
            files: Vec::new(),
        };
        for (i, (shard, expected)) in shards.iter().enumerate() {
            let path = dir.join(shard);
            if !path.is_file() {
                return Err(Error::file(
                    index,
                    format!(
                        "shard '{shard}' is listed in the index but missing from {}",
                        dir.display()
                    ),
                ));
            }
            let file = Arc::new(path);
            let parsed = parse_file(&file)?;
            if i == 0 {
                store.metadata = parsed.metadata;
            }
            store.files.push(parsed.stamp);
            for t in parsed.tensors {
                if store.tensors.contains_key(&t.name) || store.unsupported.contains_key(&t.name) {
                    return Err(Error::file(
                        &file,
                        format!("tensor '{}' appears in more than one shard", t.name),
                    ));
                }
                store.tensors.insert(t.name.clone(), t);
            }
            for (name, dtype) in parsed.unsupported {
                if store.tensors.contains_key(&name) || store.unsupported.contains_key(&name) {
                    return Err(Error::file(
                        &file,
                        format!("tensor '{name}' appears in more than one shard"),
                    ));
                }
                store.unsupported.insert(name, (file.clone(), dtype));
            }
            for name in expected {
                let here = store
                    .tensors
                    .get(*name)
                    .map(|t| Arc::ptr_eq(&t.file, &file))
                    .unwrap_or(false)
                    || store
                        .unsupported
                        .get(*name)
                        .map(|(f, _)| Arc::ptr_eq(f, &file))
                        .unwrap_or(false);
                if !here {
                    return Err(Error::file(
                        index,
                        format!("the index puts tensor '{name}' in shard '{shard}', but that shard does not contain it"),
                    ));
                }
            }
        }
        Ok(store)
    }

    /// The tensor `name`. Old BERT checkpoints' `LayerNorm.gamma` /
    /// `LayerNorm.beta` answer for `LayerNorm.weight` / `LayerNorm.bias`
    /// (and the other way round).
    pub fn get(&self, name: &str) -> Result<&TensorView> {
        if let Some(t) = self.try_get(name) {
            return Ok(t);
        }
        if let Some((file, dtype)) = self.lookup_unsupported(name) {
            return Err(Error::file(
                file,
                format!("tensor '{name}' has dtype {dtype}, which weights may not have (supported: F32, F16, BF16)"),
            ));
        }
        let close = self.close_names(name);
        let hint = if close.is_empty() {
            String::new()
        } else {
            format!(
                " (close names: {})",
                close
                    .iter()
                    .map(|n| format!("'{n}'"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        };
        Err(Error::file(
            &self.source,
            format!("tensor '{name}' not found{hint}"),
        ))
    }

    /// The tensor `name` if present (with the LayerNorm aliases of [`get`](Self::get)).
    pub fn try_get(&self, name: &str) -> Option<&TensorView> {
        if let Some(t) = self.tensors.get(name) {
            return Some(t);
        }
        alias(name).and_then(|a| self.tensors.get(&a))
    }

    fn lookup_unsupported(&self, name: &str) -> Option<&(Arc<PathBuf>, String)> {
        self.unsupported
            .get(name)
            .or_else(|| alias(name).and_then(|a| self.unsupported.get(&a)))
    }

    /// The tensor `name`, checked to have `shape` (the shape that config.json
    /// implies).
    pub fn get_shaped(&self, name: &str, shape: &[usize]) -> Result<&TensorView> {
        let t = self.get(name)?;
        if t.shape != shape {
            return Err(Error::file(
                &t.file,
                format!(
                    "tensor '{}' has shape {:?}, but config.json implies {:?}",
                    t.name, t.shape, shape
                ),
            ));
        }
        Ok(t)
    }

    /// Names of all loadable tensors, sorted (tensors of unsupported dtypes,
    /// such as an I64 `position_ids` buffer, are not listed).
    pub fn names(&self) -> Vec<&str> {
        self.tensors.keys().map(String::as_str).collect()
    }

    /// The `__metadata__` of the file (of the first shard, by file name, for
    /// a sharded checkpoint).
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }

    /// The file or directory the weights were opened from.
    pub fn source(&self) -> &Path {
        &self.source
    }

    /// The files the tensors are mapped from, as they were when opened.
    pub fn files(&self) -> &[FileStamp] {
        &self.files
    }

    /// Record one more file the tensors are read from (e.g. the GGUF file
    /// whose map backs a store built by [`WeightStore::from_tensors`]).
    pub fn add_file(&mut self, stamp: FileStamp) {
        self.files.push(stamp);
    }

    /// Check that no mapped file changed (size or modification time) since
    /// it was opened: an error naming the first that did. One `stat` per
    /// file, so cheap enough for every checkpoint.
    pub fn check_files_unchanged(&self) -> Result<()> {
        self.files.iter().try_for_each(FileStamp::check)
    }

    /// A cheap identity of the weights: a 16-hex-digit FNV-1a 64 hash over
    /// the tensors in name order — for each, its name, dtype, shape and its
    /// first and last 64 bytes of data. It reads at most 128 bytes per
    /// tensor, does not depend on how the checkpoint is sharded, and tells
    /// base models apart (a trained-bias file records it to check that it is
    /// applied to the model it was trained on). Tensors of unsupported dtypes
    /// are left out.
    pub fn fingerprint(&self) -> String {
        let mut h = Fnv::new();
        for (name, t) in &self.tensors {
            h.write(name.as_bytes());
            h.write(&[0]);
            h.write(t.dtype.to_string().as_bytes());
            h.write(&(t.shape.len() as u64).to_le_bytes());
            for &d in &t.shape {
                h.write(&(d as u64).to_le_bytes());
            }
            let b = t.bytes();
            h.write(&(b.len() as u64).to_le_bytes());
            if b.len() <= 2 * FINGERPRINT_EDGE {
                h.write(b);
            } else {
                h.write(&b[..FINGERPRINT_EDGE]);
                h.write(&b[b.len() - FINGERPRINT_EDGE..]);
            }
        }
        format!("{:016x}", h.0)
    }

    /// The first prefix `p` among `candidates` (e.g. `["", "bert.",
    /// "roberta.", "model."]`) for which the tensor `{p}{suffix}` exists.
    pub fn find_prefix(&self, suffix: &str, candidates: &[&str]) -> Option<String> {
        candidates
            .iter()
            .find(|p| self.try_get(&format!("{p}{suffix}")).is_some())
            .map(|p| p.to_string())
    }

    /// Up to 3 names close to `name` (by edit distance), for messages.
    fn close_names(&self, name: &str) -> Vec<&str> {
        const MAX_SCAN: usize = 20_000;
        if name.len() > 512 {
            return Vec::new();
        }
        let limit = name.len() / 3 + 2;
        let mut scored: Vec<(usize, &str)> = self
            .tensors
            .keys()
            .chain(self.unsupported.keys())
            .take(MAX_SCAN)
            .filter(|n| n.len() <= 512)
            .map(|n| (edit_distance(name, n), n.as_str()))
            .filter(|&(d, _)| d <= limit)
            .collect();
        scored.sort();
        scored.into_iter().take(3).map(|(_, n)| n).collect()
    }
}

/// The other spelling of a LayerNorm parameter: `LayerNorm.weight` ↔
/// `LayerNorm.gamma`, `LayerNorm.bias` ↔ `LayerNorm.beta`.
fn alias(name: &str) -> Option<String> {
    const PAIRS: [(&str, &str); 2] = [
        ("LayerNorm.weight", "LayerNorm.gamma"),
        ("LayerNorm.bias", "LayerNorm.beta"),
    ];
    for (a, b) in PAIRS {
        if let Some(stem) = name.strip_suffix(a) {
            return Some(format!("{stem}{b}"));
        }
        if let Some(stem) = name.strip_suffix(b) {
            return Some(format!("{stem}{a}"));
        }
    }
    None
}

/// Levenshtein distance over bytes.
fn edit_distance(a: &str, b: &str) -> usize {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    let mut cur = vec![0; b.len() + 1];
    for (i, &ca) in a.iter().enumerate() {
        cur[0] = i + 1;
        for (j, &cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != cb);
            cur[j + 1] = sub.min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    prev[b.len()]
}

/// FNV-1a, 64 bit.
struct Fnv(u64);

impl Fnv {
    fn new() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 ^= b as u64;
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
}

/// What one file holds.
struct Parsed {
    tensors: Vec<TensorView>,
    /// Well-formed tensors of a non-float dtype: (name, dtype).
    unsupported: Vec<(String, String)>,
    metadata: BTreeMap<String, String>,
    stamp: FileStamp,
}

/// Bytes per element of a safetensors dtype name, and the weight dtype if it
/// is one that weights may have. `None`: not a safetensors dtype at all.
fn dtype_info(s: &str) -> Option<(usize, Option<DType>)> {
    Some(match s {
        "F32" => (4, Some(DType::F32)),
        "F16" => (2, Some(DType::F16)),
        "BF16" => (2, Some(DType::BF16)),
        "BOOL" | "U8" | "I8" | "F8_E5M2" | "F8_E4M3" | "F8_E8M0" => (1, None),
        "I16" | "U16" => (2, None),
        "I32" | "U32" => (4, None),
        "F64" | "I64" | "U64" | "C64" => (8, None),
        _ => return None,
    })
}

/// One header entry, checked against the file.
struct Entry {
    /// Byte range in the data section.
    begin: usize,
    end: usize,
    name: String,
    shape: Vec<usize>,
    /// `None`: a well-formed dtype that weights may not have.
    dtype: Option<DType>,
    dtype_name: String,
}

/// Memory-map `path` and parse and validate its header.
fn parse_file(path: &Arc<PathBuf>) -> Result<Parsed> {
    let p: &Path = path;
    let f = fs::File::open(p).map_err(|e| Error::io(p, e))?;
    let meta = f.metadata().map_err(|e| Error::io(p, e))?;
    let stamp = FileStamp::new(p, &meta);
    let len = meta.len();
    if len < 8 {
        return Err(Error::file(
            p,
            format!("not a safetensors file: {len} bytes, shorter than the 8-byte header length"),
        ));
    }
    // SAFETY: the map is read-only; like every loader of memory-mapped
    // checkpoints we rely on the file not being truncated or rewritten
    // while it is open (writers here replace files by rename, which leaves
    // an open map intact).
    let mmap = unsafe { memmap2::Mmap::map(&f) }
        .map_err(|e| Error::file(p, format!("cannot memory-map: {e}")))?;
    let bytes: &[u8] = &mmap;
    let n = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes"));
    if n > MAX_HEADER {
        return Err(Error::file(
            p,
            format!("header length {n} is larger than the {MAX_HEADER}-byte limit (not a safetensors file?)"),
        ));
    }
    if n > len - 8 {
        return Err(Error::file(
            p,
            format!("header length {n} is larger than the file ({len} bytes): truncated or not a safetensors file"),
        ));
    }
    let data_start = 8 + n as usize;
    let header = &bytes[8..data_start];
    let v: Value = serde_json::from_slice(header)
        .map_err(|e| Error::file(p, format!("header is not valid JSON: {e}")))?;
    let obj = v
        .as_object()
        .ok_or_else(|| Error::file(p, "header is not a JSON object"))?;
    let data_len = (len - 8 - n) as usize;

    let mut metadata = BTreeMap::new();
    let mut entries: Vec<Entry> = Vec::with_capacity(obj.len());
    for (name, info) in obj {
        if name == "__metadata__" {
            let m = info
                .as_object()
                .ok_or_else(|| Error::file(p, "__metadata__ is not a JSON object"))?;
            for (k, val) in m {
                let s = val.as_str().ok_or_else(|| {
                    Error::file(p, format!("__metadata__ value for '{k}' is not a string"))
                })?;
                metadata.insert(k.clone(), s.to_string());
            }
            continue;
        }
        let bad = |what: &str| Error::file(p, format!("tensor '{name}': {what}"));
        let info = info
            .as_object()
            .ok_or_else(|| bad("header entry is not a JSON object"))?;
        let dtype_s = info
            .get("dtype")
            .and_then(Value::as_str)
            .ok_or_else(|| bad("no \"dtype\" string"))?;
        let (esize, dtype) = dtype_info(dtype_s).ok_or_else(|| {
            bad(&format!(
                "unknown dtype '{dtype_s}' (supported: F32, F16, BF16)"
            ))
        })?;
        let shape_v = info
            .get("shape")
            .and_then(Value::as_array)
            .ok_or_else(|| bad("no \"shape\" array"))?;
        let mut shape = Vec::with_capacity(shape_v.len());
        let mut numel: usize = 1;
        for d in shape_v {
            let d = d
                .as_u64()
                .and_then(|d| usize::try_from(d).ok())
                .ok_or_else(|| {
                    bad(&format!(
                        "shape {shape_v:?} has an entry that is not a non-negative integer"
                    ))
                })?;
            numel = numel
                .checked_mul(d)
                .ok_or_else(|| bad(&format!("shape {:?}: element count overflows", shape_v)))?;
            shape.push(d);
        }
        let nbytes = numel
            .checked_mul(esize)
            .ok_or_else(|| bad(&format!("shape {shape:?}: byte size overflows")))?;
        let offs = info
            .get("data_offsets")
            .and_then(Value::as_array)
            .filter(|a| a.len() == 2)
            .ok_or_else(|| bad("no \"data_offsets\" [begin, end] pair"))?;
        let off = |i: usize| offs[i].as_u64().and_then(|x| usize::try_from(x).ok());
        let (begin, end) = match (off(0), off(1)) {
            (Some(b), Some(e)) => (b, e),
            _ => return Err(bad("data_offsets are not non-negative integers")),
        };
        if begin > end {
            return Err(bad(&format!(
                "data_offsets [{begin}, {end}] are out of order (begin after end)"
            )));
        }
        if end > data_len {
            return Err(bad(&format!(
                "data_offsets [{begin}, {end}] point beyond the end of the file ({data_len} data bytes): truncated file?"
            )));
        }
        if end - begin != nbytes {
            return Err(bad(&format!(
                "data_offsets [{begin}, {end}] hold {} bytes, but dtype {dtype_s} × shape {shape:?} needs {nbytes}",
                end - begin
            )));
        }
        entries.push(Entry {
            begin,
            end,
            name: name.clone(),
            shape,
            dtype,
            dtype_name: dtype_s.to_string(),
        });
    }
    // No two tensors may share bytes.
    entries.sort_by_key(|e| (e.begin, e.end));
    for w in entries.windows(2) {
        let (a, b) = (&w[0], &w[1]);
        if b.begin < a.end {
            return Err(Error::file(
                p,
                format!(
                    "tensors '{}' [{}, {}] and '{}' [{}, {}] overlap (data_offsets out of order or overlapping)",
                    a.name, a.begin, a.end, b.name, b.begin, b.end
                ),
            ));
        }
    }

    let data: Bytes = Arc::new(mmap);
    let mut tensors = Vec::new();
    let mut unsupported = Vec::new();
    for e in entries {
        match e.dtype {
            Some(dt) => tensors.push(TensorView::new(
                e.name,
                path.clone(),
                dt,
                e.shape,
                data.clone(),
                data_start + e.begin,
                data_start + e.end,
            )),
            None => unsupported.push((e.name, e.dtype_name)),
        }
    }
    Ok(Parsed {
        tensors,
        unsupported,
        metadata,
        stamp,
    })
}

/// Atomically write a safetensors file of F32 tensors `(name, shape,
/// values)` and string `metadata` (see [`write_safetensors_with`]). A
/// failure never leaves a partial file at `path`.
pub fn write_safetensors(
    path: &Path,
    tensors: &[(String, Vec<usize>, Vec<f32>)],
    metadata: &BTreeMap<String, String>,
) -> Result<()> {
    let mut entries = Vec::with_capacity(tensors.len());
    for (name, shape, values) in tensors {
        let numel = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
        if numel != Some(values.len()) {
            return Err(Error::file(
                path,
                format!(
                    "cannot write tensor '{name}': shape {shape:?} does not match its {} values",
                    values.len()
                ),
            ));
        }
        entries.push((name.clone(), DType::F32, shape.clone()));
    }
    write_safetensors_with(path, &entries, metadata, &mut |w| {
        for (_, _, values) in tensors {
            for v in values {
                w.write_all(&v.to_le_bytes())?;
            }
        }
        Ok(())
    })?;
    Ok(())
}

/// Atomically write a safetensors file whose tensors `(name, dtype, shape)`
/// have their data written, in the same order, by `data` (so that a large
/// file can be streamed): the header (8-byte aligned, `metadata` as
/// `__metadata__`) and data go to a temporary file in the same directory,
/// which is fsynced and then renamed over `path`. A failure never leaves a
/// partial file at `path`. Returns the file's size.
pub fn write_safetensors_with(
    path: &Path,
    entries: &[(String, DType, Vec<usize>)],
    metadata: &BTreeMap<String, String>,
    data: &mut dyn FnMut(&mut dyn Write) -> std::io::Result<()>,
) -> Result<u64> {
    let mut header = serde_json::Map::new();
    if !metadata.is_empty() {
        let m: serde_json::Map<String, Value> = metadata
            .iter()
            .map(|(k, v)| (k.clone(), Value::String(v.clone())))
            .collect();
        header.insert("__metadata__".to_string(), Value::Object(m));
    }
    let mut seen = HashSet::new();
    let mut offset = 0usize;
    for (name, dtype, shape) in entries {
        if name == "__metadata__" || !seen.insert(name.as_str()) {
            return Err(Error::file(
                path,
                format!("cannot write tensor '{name}': duplicate or reserved name"),
            ));
        }
        let end = offset + shape.iter().product::<usize>() * dtype.size();
        header.insert(
            name.clone(),
            serde_json::json!({ "dtype": dtype.to_string(), "shape": shape, "data_offsets": [offset, end] }),
        );
        offset = end;
    }
    let mut hbytes =
        serde_json::to_vec(&Value::Object(header)).map_err(|e| Error::file(path, e))?;
    // Pad with spaces so that the data starts 8-byte aligned (zero-copy f32).
    while hbytes.len() % 8 != 0 {
        hbytes.push(b' ');
    }

    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let fname = path
        .file_name()
        .ok_or_else(|| Error::file(path, "not a file path"))?
        .to_string_lossy()
        .into_owned();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let tmp = dir.join(format!(
        ".{fname}.tmp.{}.{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));

    let mut write = || -> std::io::Result<()> {
        let f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)?;
        let mut w = std::io::BufWriter::with_capacity(1 << 22, f);
        w.write_all(&(hbytes.len() as u64).to_le_bytes())?;
        w.write_all(&hbytes)?;
        data(&mut w)?;
        let f = w.into_inner().map_err(|e| e.into_error())?;
        f.sync_all()?;
        drop(f);
        fs::rename(&tmp, path)?;
        Ok(())
    };
    if let Err(e) = write() {
        let _ = fs::remove_file(&tmp);
        return Err(Error::io(path, e));
    }
    // Make the rename itself durable (best effort; not possible everywhere).
    #[cfg(unix)]
    if let Ok(d) = fs::File::open(&dir) {
        let _ = d.sync_all();
    }
    Ok(8 + hbytes.len() as u64 + offset as u64)
}
