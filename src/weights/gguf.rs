//! GGUF import: llama.cpp's single-file model format (versions 2 and 3).
//!
//! A GGUF file holds, in order: the magic `GGUF`, a `u32` version, the
//! tensor count and the metadata key/value count (`u64` each), the metadata
//! (key: string; value: a `u32` type tag and the value), one *tensor info*
//! per tensor (name, `u32` number of dimensions, that many `u64` dimensions
//! listed fastest-varying first, a `u32` ggml type id and a `u64` offset into
//! the data section), padding up to `general.alignment` (default 32) and the
//! data section. Strings are a `u64` byte length and UTF-8 bytes; arrays are
//! a `u32` element type, a `u64` count and the elements. Everything is
//! little-endian.
//!
//! The whole file is memory-mapped and parsed by hand. Every length read from
//! the file is checked against the bytes that remain *before* anything is
//! allocated, so a header that claims 2^60 array elements or a 2^60-byte
//! string is refused, not allocated; every tensor must lie inside the file,
//! aligned, without overlapping another; an unknown tensor type is an error
//! that names the file, the tensor and the type id.
//!
//! Tensor data is decoded to f32 by [`dequantize_into`]: F32, F16, BF16, and
//! the block formats Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 (32 values per block) and
//! the 256-value "K-quants" Q4_K, Q5_K, Q6_K, implemented from the GGML block
//! layouts (documented at each decoder below).
//!
//! [`open_model_dir`] turns a LLaMA-family GGUF (`general.architecture` =
//! `llama`, `mistral` or `qwen2`) into a [`ModelDir`]: a Hugging Face
//! `config.json` built from the metadata ([`hf_config`]), the tensors renamed
//! to Hugging Face names ([`hf_tensor_name`]) with the rotary permutation of
//! llama.cpp's converter undone ([`unpermute_rows`]), and a tokenizer built
//! from the metadata ([`build_tokenizer`]).
//!
//! **Memory.** Quantized tensors are dequantized to f32 when the model is
//! opened (eagerly, in parallel) and held in RAM: about 4 bytes per parameter
//! (SmolLM2-135M: ~0.54 GB; Qwen2.5-0.5B: ~2 GB). Unquantized F32/F16/BF16
//! tensors that need no permutation stay in place in the memory map.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rayon::prelude::*;
use serde_json::{json, Value};

use super::store::{FileStamp, WeightStore};
use super::tensor::{Bytes, DType, TensorView};
use crate::error::{Error, Result};
use crate::model::config::{ModelConfig, ModelDir};

/// The file magic.
pub const GGUF_MAGIC: &[u8; 4] = b"GGUF";
/// Alignment of the data section and of every tensor when the file does not
/// say (`general.alignment`).
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// ggml tensors have at most 4 dimensions.
pub const MAX_DIMS: usize = 4;
/// Nesting limit for array values (arrays of arrays of ...).
const MAX_DEPTH: usize = 8;
/// Longest tensor name accepted (ggml's own limit is 64 bytes).
const MAX_NAME: u64 = 4096;

// ---------------------------------------------------------------------------
// ggml tensor types
// ---------------------------------------------------------------------------

/// The ggml tensor types this loader decodes.
#[allow(non_camel_case_types)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q4_K,
    Q5_K,
    Q6_K,
    BF16,
}

/// Values per K-quant super-block.
const QK_K: usize = 256;

impl GgmlType {
    /// All supported types.
    pub const ALL: [GgmlType; 11] = [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q8_0,
        GgmlType::Q4_K,
        GgmlType::Q5_K,
        GgmlType::Q6_K,
        GgmlType::BF16,
    ];

    /// The type with ggml type id `id`, if supported.
    pub fn from_id(id: u32) -> Option<Self> {
        GgmlType::ALL.iter().copied().find(|t| t.id() == id)
    }

    /// ggml's type id (the `u32` stored in a tensor info).
    pub fn id(self) -> u32 {
        match self {
            GgmlType::F32 => 0,
            GgmlType::F16 => 1,
            GgmlType::Q4_0 => 2,
            GgmlType::Q4_1 => 3,
            GgmlType::Q5_0 => 6,
            GgmlType::Q5_1 => 7,
            GgmlType::Q8_0 => 8,
            GgmlType::Q4_K => 12,
            GgmlType::Q5_K => 13,
            GgmlType::Q6_K => 14,
            GgmlType::BF16 => 30,
        }
    }

    /// ggml's name of the type.
    pub fn name(self) -> &'static str {
        match self {
            GgmlType::F32 => "F32",
            GgmlType::F16 => "F16",
            GgmlType::Q4_0 => "Q4_0",
            GgmlType::Q4_1 => "Q4_1",
            GgmlType::Q5_0 => "Q5_0",
            GgmlType::Q5_1 => "Q5_1",
            GgmlType::Q8_0 => "Q8_0",
            GgmlType::Q4_K => "Q4_K",
            GgmlType::Q5_K => "Q5_K",
            GgmlType::Q6_K => "Q6_K",
            GgmlType::BF16 => "BF16",
        }
    }

    /// Values per block (1 for the plain float types).
    pub fn block_size(self) -> usize {
        match self {
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => 1,
            GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q5_0 | GgmlType::Q5_1 | GgmlType::Q8_0 => {
                32
            }
            GgmlType::Q4_K | GgmlType::Q5_K | GgmlType::Q6_K => QK_K,
        }
    }

    /// Bytes per block.
    pub fn type_size(self) -> usize {
        match self {
            GgmlType::F32 => 4,
            GgmlType::F16 | GgmlType::BF16 => 2,
            GgmlType::Q4_0 => 2 + 16,
            GgmlType::Q4_1 => 2 + 2 + 16,
            GgmlType::Q5_0 => 2 + 4 + 16,
            GgmlType::Q5_1 => 2 + 2 + 4 + 16,
            GgmlType::Q8_0 => 2 + 32,
            GgmlType::Q4_K => 2 + 2 + 12 + QK_K / 2,
            GgmlType::Q5_K => 2 + 2 + 12 + QK_K / 8 + QK_K / 2,
            GgmlType::Q6_K => QK_K / 2 + QK_K / 4 + QK_K / 16 + 2,
        }
    }

    /// Bytes taken by `n` values (`None` when `n` is not a whole number of
    /// blocks or the size overflows).
    pub fn bytes_for(self, n: u64) -> Option<u64> {
        let bs = self.block_size() as u64;
        if !n.is_multiple_of(bs) {
            return None;
        }
        (n / bs).checked_mul(self.type_size() as u64)
    }
}

impl fmt::Display for GgmlType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The ggml name of a type id this loader does not decode, for messages.
fn unsupported_type_name(id: u32) -> Option<&'static str> {
    Some(match id {
        4 => "Q4_2 (removed from ggml)",
        5 => "Q4_3 (removed from ggml)",
        9 => "Q8_1",
        10 => "Q2_K",
        11 => "Q3_K",
        15 => "Q8_K",
        16 => "IQ2_XXS",
        17 => "IQ2_XS",
        18 => "IQ3_XXS",
        19 => "IQ1_S",
        20 => "IQ4_NL",
        21 => "IQ3_S",
        22 => "IQ2_S",
        23 => "IQ4_XS",
        24 => "I8",
        25 => "I16",
        26 => "I32",
        27 => "I64",
        28 => "F64",
        29 => "IQ1_M",
        34 => "TQ1_0",
        35 => "TQ2_0",
        39 => "MXFP4",
        _ => return None,
    })
}

fn supported_list() -> String {
    GgmlType::ALL
        .iter()
        .map(|t| t.name())
        .collect::<Vec<_>>()
        .join(", ")
}

// ---------------------------------------------------------------------------
// Metadata values
// ---------------------------------------------------------------------------

/// One metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum GgufValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    Str(String),
    Array(Vec<GgufValue>),
    U64(u64),
    I64(i64),
    F64(f64),
}

/// GGUF value type tags.
mod tag {
    pub const U8: u32 = 0;
    pub const I8: u32 = 1;
    pub const U16: u32 = 2;
    pub const I16: u32 = 3;
    pub const U32: u32 = 4;
    pub const I32: u32 = 5;
    pub const F32: u32 = 6;
    pub const BOOL: u32 = 7;
    pub const STRING: u32 = 8;
    pub const ARRAY: u32 = 9;
    pub const U64: u32 = 10;
    pub const I64: u32 = 11;
    pub const F64: u32 = 12;
}

/// The least number of bytes a value of type `t` occupies (`None`: not a
/// value type). Bounds array lengths before anything is allocated.
fn min_value_size(t: u32) -> Option<u64> {
    Some(match t {
        tag::U8 | tag::I8 | tag::BOOL => 1,
        tag::U16 | tag::I16 => 2,
        tag::U32 | tag::I32 | tag::F32 => 4,
        tag::U64 | tag::I64 | tag::F64 => 8,
        tag::STRING => 8,
        tag::ARRAY => 12,
        _ => return None,
    })
}

impl GgufValue {
    /// The GGUF name of the value's type.
    pub fn type_name(&self) -> &'static str {
        match self {
            GgufValue::U8(_) => "uint8",
            GgufValue::I8(_) => "int8",
            GgufValue::U16(_) => "uint16",
            GgufValue::I16(_) => "int16",
            GgufValue::U32(_) => "uint32",
            GgufValue::I32(_) => "int32",
            GgufValue::F32(_) => "float32",
            GgufValue::Bool(_) => "bool",
            GgufValue::Str(_) => "string",
            GgufValue::Array(_) => "array",
            GgufValue::U64(_) => "uint64",
            GgufValue::I64(_) => "int64",
            GgufValue::F64(_) => "float64",
        }
    }

    /// A non-negative integer of any integer type.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            GgufValue::U8(x) => Some(x as u64),
            GgufValue::U16(x) => Some(x as u64),
            GgufValue::U32(x) => Some(x as u64),
            GgufValue::U64(x) => Some(x),
            GgufValue::I8(x) => u64::try_from(x).ok(),
            GgufValue::I16(x) => u64::try_from(x).ok(),
            GgufValue::I32(x) => u64::try_from(x).ok(),
            GgufValue::I64(x) => u64::try_from(x).ok(),
            _ => None,
        }
    }

    /// An integer of any integer type.
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            GgufValue::I8(x) => Some(x as i64),
            GgufValue::I16(x) => Some(x as i64),
            GgufValue::I32(x) => Some(x as i64),
            GgufValue::I64(x) => Some(x),
            _ => self.as_u64().and_then(|x| i64::try_from(x).ok()),
        }
    }

    /// Any number.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            GgufValue::F32(x) => Some(x as f64),
            GgufValue::F64(x) => Some(x),
            _ => self.as_i64().map(|x| x as f64),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            GgufValue::Str(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            GgufValue::Bool(b) => Some(b),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[GgufValue]> {
        match self {
            GgufValue::Array(a) => Some(a),
            _ => None,
        }
    }

    /// A short text form: scalars as themselves, arrays summarised (for the
    /// string metadata of a [`WeightStore`]).
    pub fn summary(&self) -> String {
        match self {
            GgufValue::Str(s) => s.clone(),
            GgufValue::Bool(b) => b.to_string(),
            GgufValue::F32(x) => x.to_string(),
            GgufValue::F64(x) => x.to_string(),
            GgufValue::Array(a) => format!(
                "[{} x {}]",
                a.len(),
                a.first().map_or("?", |v| v.type_name())
            ),
            v => v.as_i64().map_or_else(
                || v.as_u64().map_or_else(String::new, |x| x.to_string()),
                |x| x.to_string(),
            ),
        }
    }
}

// ---------------------------------------------------------------------------
// Parsing
// ---------------------------------------------------------------------------

/// A cursor over the file's bytes whose every read is bounds-checked.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl<'a> Reader<'a> {
    fn remaining(&self) -> u64 {
        (self.buf.len() - self.pos) as u64
    }

    fn err(&self, msg: impl fmt::Display) -> Error {
        Error::file(self.path, msg)
    }

    /// `n` more bytes, or a "truncated" error naming `what`.
    fn take(&mut self, n: u64, what: &dyn Fn() -> String) -> Result<&'a [u8]> {
        if n > self.remaining() {
            return Err(self.err(format!(
                "truncated file: {} needs {n} bytes at offset {}, but only {} remain",
                what(),
                self.pos,
                self.remaining()
            )));
        }
        let n = n as usize;
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn arr<const N: usize>(&mut self, what: &dyn Fn() -> String) -> Result<[u8; N]> {
        Ok(self.take(N as u64, what)?.try_into().expect("N bytes"))
    }

    fn u32(&mut self, what: &dyn Fn() -> String) -> Result<u32> {
        Ok(u32::from_le_bytes(self.arr(what)?))
    }

    fn u64(&mut self, what: &dyn Fn() -> String) -> Result<u64> {
        Ok(u64::from_le_bytes(self.arr(what)?))
    }

    /// A length-prefixed UTF-8 string. The length is checked against the
    /// remaining bytes before anything is copied.
    fn string(&mut self, what: &dyn Fn() -> String) -> Result<String> {
        let n = self.u64(&|| format!("the length of {}", what()))?;
        if n > self.remaining() {
            return Err(self.err(format!(
                "{} claims a length of {n} bytes, but only {} bytes remain in the file",
                what(),
                self.remaining()
            )));
        }
        let b = self.take(n, what)?;
        String::from_utf8(b.to_vec())
            .map_err(|e| self.err(format!("{} is not valid UTF-8: {e}", what())))
    }

    /// One value of type `t` (metadata key `key`, for messages).
    fn value(&mut self, t: u32, key: &str, depth: usize) -> Result<GgufValue> {
        let what = || format!("the value of metadata key '{key}'");
        Ok(match t {
            tag::U8 => GgufValue::U8(self.arr::<1>(&what)?[0]),
            tag::I8 => GgufValue::I8(self.arr::<1>(&what)?[0] as i8),
            tag::U16 => GgufValue::U16(u16::from_le_bytes(self.arr(&what)?)),
            tag::I16 => GgufValue::I16(i16::from_le_bytes(self.arr(&what)?)),
            tag::U32 => GgufValue::U32(u32::from_le_bytes(self.arr(&what)?)),
            tag::I32 => GgufValue::I32(i32::from_le_bytes(self.arr(&what)?)),
            tag::F32 => GgufValue::F32(f32::from_le_bytes(self.arr(&what)?)),
            tag::U64 => GgufValue::U64(u64::from_le_bytes(self.arr(&what)?)),
            tag::I64 => GgufValue::I64(i64::from_le_bytes(self.arr(&what)?)),
            tag::F64 => GgufValue::F64(f64::from_le_bytes(self.arr(&what)?)),
            tag::BOOL => match self.arr::<1>(&what)?[0] {
                0 => GgufValue::Bool(false),
                1 => GgufValue::Bool(true),
                b => {
                    return Err(self.err(format!(
                        "metadata key '{key}': bool value {b} is neither 0 nor 1"
                    )))
                }
            },
            tag::STRING => GgufValue::Str(self.string(&what)?),
            tag::ARRAY => {
                if depth >= MAX_DEPTH {
                    return Err(self.err(format!(
                        "metadata key '{key}': arrays nested more than {MAX_DEPTH} deep"
                    )));
                }
                let et = self.u32(&|| format!("the element type of metadata key '{key}'"))?;
                let min = min_value_size(et).ok_or_else(|| {
                    self.err(format!(
                        "metadata key '{key}': unknown array element type {et}"
                    ))
                })?;
                let n = self.u64(&|| format!("the array length of metadata key '{key}'"))?;
                // Bound the count by the bytes left before allocating.
                if n.checked_mul(min)
                    .is_none_or(|need| need > self.remaining())
                {
                    return Err(self.err(format!(
                        "metadata key '{key}': array claims {n} elements, more than the {} bytes left in the file can hold",
                        self.remaining()
                    )));
                }
                let mut v = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    v.push(self.value(et, key, depth + 1)?);
                }
                GgufValue::Array(v)
            }
            other => {
                return Err(self.err(format!("metadata key '{key}': unknown value type {other}")))
            }
        })
    }
}

/// One tensor of a GGUF file.
#[derive(Clone, Debug)]
pub struct GgufTensor {
    pub name: String,
    /// Dimensions as stored: fastest-varying first (`ne[0]` = columns).
    pub ne: Vec<u64>,
    pub ggml_type: GgmlType,
    /// Offset in the data section, as stored.
    pub offset: u64,
    /// Absolute byte range in the file.
    start: usize,
    end: usize,
}

impl GgufTensor {
    /// Number of values.
    pub fn numel(&self) -> usize {
        self.ne.iter().product::<u64>() as usize
    }

    /// The shape in row-major (Hugging Face / PyTorch) order: `ne` reversed.
    /// A weight with `ne = [in, out]` is an `[out, in]` matrix.
    pub fn shape(&self) -> Vec<usize> {
        self.ne.iter().rev().map(|&d| d as usize).collect()
    }

    /// Bytes of data.
    pub fn nbytes(&self) -> usize {
        self.end - self.start
    }
}

/// A parsed, validated GGUF file, memory-mapped read-only.
pub struct GgufFile {
    path: Arc<PathBuf>,
    version: u32,
    alignment: u64,
    data_start: usize,
    metadata: BTreeMap<String, GgufValue>,
    tensors: Vec<GgufTensor>,
    index: HashMap<String, usize>,
    data: Bytes,
    /// Size and modification time when opened (`None` for bytes in memory).
    stamp: Option<FileStamp>,
}

impl fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "GgufFile({}, v{}, {} metadata keys, {} tensors)",
            self.path.display(),
            self.version,
            self.metadata.len(),
            self.tensors.len()
        )
    }
}

impl GgufFile {
    /// Memory-map and parse `path`. Every malformed input is an error that
    /// names the file.
    pub fn open(path: &Path) -> Result<Self> {
        let f = fs::File::open(path).map_err(|e| Error::io(path, e))?;
        let meta = f.metadata().map_err(|e| Error::io(path, e))?;
        let len = meta.len();
        if len < 24 {
            return Err(Error::file(
                path,
                format!("not a GGUF file: {len} bytes, shorter than the 24-byte header"),
            ));
        }
        // SAFETY: a read-only map; as for safetensors, we rely on the file
        // not being truncated or rewritten while it is open.
        let mmap = unsafe { memmap2::Mmap::map(&f) }
            .map_err(|e| Error::file(path, format!("cannot memory-map: {e}")))?;
        let mut g = Self::from_bytes(path, Arc::new(mmap))?;
        g.stamp = Some(FileStamp::new(path, &meta));
        Ok(g)
    }

    /// Parse GGUF bytes already in memory (`path` names them in messages).
    pub fn from_bytes(path: &Path, data: Bytes) -> Result<Self> {
        let buf: &[u8] = (*data).as_ref();
        let mut r = Reader { buf, pos: 0, path };
        let magic = r.arr::<4>(&|| "the magic".to_string())?;
        if &magic != GGUF_MAGIC {
            return Err(r.err(format!(
                "not a GGUF file: starts with {:?}, not \"GGUF\"",
                String::from_utf8_lossy(&magic)
            )));
        }
        let version = r.u32(&|| "the version".to_string())?;
        if version != 2 && version != 3 {
            return Err(r.err(format!(
                "GGUF version {version} is not supported (supported: 2, 3)"
            )));
        }
        let n_tensors = r.u64(&|| "the tensor count".to_string())?;
        let n_kv = r.u64(&|| "the metadata count".to_string())?;
        // A key/value pair takes at least 8 + 1 + 4 + 1 bytes, a tensor info
        // at least 8 + 1 + 4 + 4 + 8.
        if n_kv.checked_mul(14).is_none_or(|b| b > r.remaining()) {
            return Err(r.err(format!(
                "header claims {n_kv} metadata entries, more than the file ({} bytes) can hold",
                buf.len()
            )));
        }
        if n_tensors.checked_mul(25).is_none_or(|b| b > r.remaining()) {
            return Err(r.err(format!(
                "header claims {n_tensors} tensors, more than the file ({} bytes) can hold",
                buf.len()
            )));
        }

        let mut metadata = BTreeMap::new();
        for i in 0..n_kv {
            let key = r.string(&|| format!("metadata key #{i}"))?;
            let t = r.u32(&|| format!("the type of metadata key '{key}'"))?;
            let v = r.value(t, &key, 0)?;
            if metadata.insert(key.clone(), v).is_some() {
                return Err(r.err(format!("metadata key '{key}' appears twice")));
            }
        }

        let alignment = match metadata.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(GgufValue::U32(a)) if *a > 0 && a.is_power_of_two() => *a as u64,
            Some(v) => {
                return Err(r.err(format!(
                    "general.alignment must be a power-of-two uint32, got {} {}",
                    v.type_name(),
                    v.summary()
                )))
            }
        };

        struct Info {
            name: String,
            ne: Vec<u64>,
            ty: u32,
            offset: u64,
        }
        let mut infos = Vec::with_capacity(n_tensors as usize);
        for i in 0..n_tensors {
            let name_what = || format!("the name of tensor #{i}");
            let name = {
                let n = r.u64(&|| format!("the length of {}", name_what()))?;
                if n > MAX_NAME {
                    return Err(r.err(format!(
                        "{} claims a length of {n} bytes (limit {MAX_NAME})",
                        name_what()
                    )));
                }
                let b = r.take(n, &name_what)?;
                String::from_utf8(b.to_vec())
                    .map_err(|e| r.err(format!("{} is not valid UTF-8: {e}", name_what())))?
            };
            let n_dims = r.u32(&|| format!("the dimension count of tensor '{name}'"))?;
            if n_dims as usize > MAX_DIMS {
                return Err(r.err(format!(
                    "tensor '{name}' has {n_dims} dimensions (ggml allows at most {MAX_DIMS})"
                )));
            }
            let mut ne = Vec::with_capacity(n_dims as usize);
            for _ in 0..n_dims {
                ne.push(r.u64(&|| format!("the dimensions of tensor '{name}'"))?);
            }
            let ty = r.u32(&|| format!("the type of tensor '{name}'"))?;
            let offset = r.u64(&|| format!("the data offset of tensor '{name}'"))?;
            infos.push(Info {
                name,
                ne,
                ty,
                offset,
            });
        }

        // The data section starts at the next multiple of the alignment.
        let header_end = r.pos as u64;
        let data_start = header_end.div_ceil(alignment) * alignment;
        let file_len = buf.len() as u64;
        if data_start > file_len && !infos.is_empty() {
            return Err(r.err(format!(
                "truncated file: the data section would start at byte {data_start}, past the end of the file ({file_len} bytes)"
            )));
        }
        let data_len = file_len.saturating_sub(data_start);

        let mut tensors = Vec::with_capacity(infos.len());
        let mut index = HashMap::with_capacity(infos.len());
        for info in infos {
            let name = info.name;
            let bad = |msg: String| Error::file(path, format!("tensor '{name}': {msg}"));
            let ty = GgmlType::from_id(info.ty).ok_or_else(|| {
                let known = unsupported_type_name(info.ty)
                    .map(|n| format!(" ({n})"))
                    .unwrap_or_else(|| " (unknown to this loader)".to_string());
                bad(format!(
                    "ggml type id {}{known} is not supported (supported: {})",
                    info.ty,
                    supported_list()
                ))
            })?;
            let numel = info
                .ne
                .iter()
                .try_fold(1u64, |a, &d| a.checked_mul(d))
                .filter(|&n| n <= isize::MAX as u64)
                .ok_or_else(|| bad(format!("dimensions {:?}: element count overflows", info.ne)))?;
            if let Some(&cols) = info.ne.first() {
                if cols % ty.block_size() as u64 != 0 {
                    return Err(bad(format!(
                        "{ty} stores blocks of {} values, but the row length ne[0] = {cols} is not a multiple of it",
                        ty.block_size()
                    )));
                }
            }
            let nbytes = ty
                .bytes_for(numel)
                .ok_or_else(|| bad(format!("dimensions {:?}: byte size overflows", info.ne)))?;
            if info.offset % alignment != 0 {
                return Err(bad(format!(
                    "data offset {} is not a multiple of the alignment {alignment}",
                    info.offset
                )));
            }
            let end = info.offset.checked_add(nbytes);
            if end.is_none_or(|e| e > data_len) {
                return Err(bad(format!(
                    "data [{}, +{nbytes}) lies beyond the end of the file ({data_len} data bytes after offset {data_start}): truncated file or wrong size?",
                    info.offset
                )));
            }
            let start = (data_start + info.offset) as usize;
            if index.insert(name.clone(), tensors.len()).is_some() {
                return Err(bad("appears twice".to_string()));
            }
            tensors.push(GgufTensor {
                name,
                ne: info.ne,
                ggml_type: ty,
                offset: info.offset,
                start,
                end: start + nbytes as usize,
            });
        }
        // No two tensors may share bytes.
        let mut order: Vec<usize> = (0..tensors.len()).collect();
        order.sort_by_key(|&i| (tensors[i].start, tensors[i].end));
        for w in order.windows(2) {
            let (a, b) = (&tensors[w[0]], &tensors[w[1]]);
            if b.start < a.end {
                return Err(Error::file(
                    path,
                    format!(
                        "tensors '{}' (offset {}, {} bytes) and '{}' (offset {}) overlap",
                        a.name,
                        a.offset,
                        a.nbytes(),
                        b.name,
                        b.offset
                    ),
                ));
            }
        }
        Ok(GgufFile {
            path: Arc::new(path.to_path_buf()),
            version,
            alignment,
            data_start: data_start as usize,
            metadata,
            tensors,
            index,
            data,
            stamp: None,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn version(&self) -> u32 {
        self.version
    }

    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    /// Absolute file offset of the data section.
    pub fn data_start(&self) -> usize {
        self.data_start
    }

    pub fn metadata(&self) -> &BTreeMap<String, GgufValue> {
        &self.metadata
    }

    /// The metadata value of `key`.
    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.metadata.get(key)
    }

    /// Tensors in file order.
    pub fn tensors(&self) -> &[GgufTensor] {
        &self.tensors
    }

    pub fn tensor(&self, name: &str) -> Option<&GgufTensor> {
        self.index.get(name).map(|&i| &self.tensors[i])
    }

    /// The raw bytes of a tensor of this file.
    pub fn tensor_bytes(&self, t: &GgufTensor) -> &[u8] {
        &(*self.data).as_ref()[t.start..t.end]
    }

    /// A tensor's values as f32, in `ne` order (row-major over
    /// [`GgufTensor::shape`]).
    pub fn dequantize(&self, t: &GgufTensor) -> Result<Vec<f32>> {
        let mut out = vec![0f32; t.numel()];
        dequantize_into(t.ggml_type, self.tensor_bytes(t), &mut out)
            .map_err(|e| Error::file(&self.path, format!("tensor '{}': {e}", t.name)))?;
        Ok(out)
    }

    /// The tensor `name` as f32 (error if absent).
    pub fn dequantize_named(&self, name: &str) -> Result<Vec<f32>> {
        let t = self
            .tensor(name)
            .ok_or_else(|| Error::file(&self.path, format!("no tensor '{name}'")))?;
        self.dequantize(t)
    }

    fn err(&self, msg: impl fmt::Display) -> Error {
        Error::file(&self.path, msg)
    }

    /// A required string key.
    pub fn req_str(&self, key: &str) -> Result<&str> {
        match self.get(key) {
            None => Err(self.err(format!("required metadata key '{key}' is missing"))),
            Some(v) => v.as_str().ok_or_else(|| {
                self.err(format!(
                    "metadata key '{key}' must be a string, got {}",
                    v.type_name()
                ))
            }),
        }
    }

    /// An optional non-negative integer key.
    pub fn opt_u64(&self, key: &str) -> Result<Option<u64>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.as_u64().map(Some).ok_or_else(|| {
                self.err(format!(
                    "metadata key '{key}' must be a non-negative integer, got {} {}",
                    v.type_name(),
                    v.summary()
                ))
            }),
        }
    }

    /// A required non-negative integer key.
    pub fn req_u64(&self, key: &str) -> Result<u64> {
        self.opt_u64(key)?
            .ok_or_else(|| self.err(format!("required metadata key '{key}' is missing")))
    }

    /// An optional number key.
    pub fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.as_f64().map(Some).ok_or_else(|| {
                self.err(format!(
                    "metadata key '{key}' must be a number, got {}",
                    v.type_name()
                ))
            }),
        }
    }

    /// An optional bool key.
    pub fn opt_bool(&self, key: &str) -> Result<Option<bool>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.as_bool().map(Some).ok_or_else(|| {
                self.err(format!(
                    "metadata key '{key}' must be a bool, got {}",
                    v.type_name()
                ))
            }),
        }
    }

    /// `general.architecture`.
    pub fn architecture(&self) -> Result<&str> {
        self.req_str("general.architecture")
    }
}

// ---------------------------------------------------------------------------
// Dequantization
// ---------------------------------------------------------------------------

#[inline]
fn f16_at(b: &[u8], i: usize) -> f32 {
    half::f16::from_bits(u16::from_le_bytes([b[i], b[i + 1]])).to_f32()
}

/// Blocks decoded per parallel task.
const CHUNK_BLOCKS: usize = 256;

/// Decode `data` (whole blocks of type `ty`) into `out` (f32). `data` must
/// hold exactly `out.len() / block_size` blocks.
pub fn dequantize_into(ty: GgmlType, data: &[u8], out: &mut [f32]) -> Result<()> {
    let (bs, ts) = (ty.block_size(), ty.type_size());
    if !out.len().is_multiple_of(bs) || data.len() != out.len() / bs * ts {
        return Err(Error::msg(format!(
            "{ty}: {} bytes cannot hold {} values ({} values in {ts}-byte blocks)",
            data.len(),
            out.len(),
            bs
        )));
    }
    let decode: fn(&[u8], &mut [f32]) = match ty {
        GgmlType::F32 => |b, o| {
            for (o, c) in o.iter_mut().zip(b.chunks_exact(4)) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        },
        GgmlType::F16 => |b, o| {
            for (o, c) in o.iter_mut().zip(b.chunks_exact(2)) {
                *o = half::f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32();
            }
        },
        GgmlType::BF16 => |b, o| {
            for (o, c) in o.iter_mut().zip(b.chunks_exact(2)) {
                *o = half::bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32();
            }
        },
        GgmlType::Q4_0 => block_q4_0,
        GgmlType::Q4_1 => block_q4_1,
        GgmlType::Q5_0 => block_q5_0,
        GgmlType::Q5_1 => block_q5_1,
        GgmlType::Q8_0 => block_q8_0,
        GgmlType::Q4_K => block_q4_k,
        GgmlType::Q5_K => block_q5_k,
        GgmlType::Q6_K => block_q6_k,
    };
    let per_block = |b: &[u8], o: &mut [f32]| {
        if bs == 1 {
            decode(b, o)
        } else {
            for (bb, oo) in b.chunks_exact(ts).zip(o.chunks_exact_mut(bs)) {
                decode(bb, oo)
            }
        }
    };
    let step = CHUNK_BLOCKS * bs.max(32);
    let bstep = step / bs * ts;
    if out.len() <= step {
        per_block(data, out);
    } else {
        out.par_chunks_mut(step)
            .zip(data.par_chunks(bstep))
            .for_each(|(o, b)| per_block(b, o));
    }
    Ok(())
}

/// Q4_0 (18 bytes / 32 values): f16 scale `d`, then 16 bytes of 4-bit
/// quants; byte `j` holds value `j` in its low nibble and value `j + 16` in
/// its high nibble; `x = (q - 8) · d`.
fn block_q4_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let qs = &b[2..18];
    for j in 0..16 {
        y[j] = ((qs[j] & 0x0F) as i32 - 8) as f32 * d;
        y[j + 16] = ((qs[j] >> 4) as i32 - 8) as f32 * d;
    }
}

/// Q4_1 (20 bytes / 32 values): f16 scale `d`, f16 minimum `m`, 16 bytes of
/// nibbles laid out as in Q4_0; `x = q · d + m`.
fn block_q4_1(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let m = f16_at(b, 2);
    let qs = &b[4..20];
    for j in 0..16 {
        y[j] = (qs[j] & 0x0F) as f32 * d + m;
        y[j + 16] = (qs[j] >> 4) as f32 * d + m;
    }
}

/// The fifth bits of Q5_0/Q5_1: a little-endian u32 whose bit `i` belongs to
/// value `i`; returns (value j's bit, value j+16's bit) as 0 or 16.
#[inline]
fn q5_high(qh: u32, j: usize) -> (u8, u8) {
    (
        (((qh >> j) & 1) << 4) as u8,
        (((qh >> (j + 16)) & 1) << 4) as u8,
    )
}

/// Q5_0 (22 bytes / 32 values): f16 `d`, u32 of fifth bits, 16 bytes of low
/// nibbles (as Q4_0); `x = (q - 16) · d`.
fn block_q5_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
    let qs = &b[6..22];
    for j in 0..16 {
        let (h0, h1) = q5_high(qh, j);
        y[j] = (((qs[j] & 0x0F) | h0) as i32 - 16) as f32 * d;
        y[j + 16] = (((qs[j] >> 4) | h1) as i32 - 16) as f32 * d;
    }
}

/// Q5_1 (24 bytes / 32 values): f16 `d`, f16 `m`, u32 of fifth bits, 16
/// bytes of low nibbles; `x = q · d + m`.
fn block_q5_1(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let m = f16_at(b, 2);
    let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
    let qs = &b[8..24];
    for j in 0..16 {
        let (h0, h1) = q5_high(qh, j);
        y[j] = ((qs[j] & 0x0F) | h0) as f32 * d + m;
        y[j + 16] = ((qs[j] >> 4) | h1) as f32 * d + m;
    }
}

/// Q8_0 (34 bytes / 32 values): f16 `d`, 32 signed bytes; `x = q · d`.
fn block_q8_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    for (o, &q) in y.iter_mut().zip(&b[2..34]) {
        *o = (q as i8) as f32 * d;
    }
}

/// The 6-bit scale and minimum of sub-block `j` (0..8) of a Q4_K/Q5_K
/// super-block, packed in 12 bytes: sub-blocks 0..4 keep their scale and
/// minimum in the low 6 bits of bytes `j` and `j + 4`; sub-blocks 4..8 keep
/// their low 4 bits in the nibbles of byte `j + 4` and their top 2 bits in
/// the top bits of bytes `j - 4` (scale) and `j` (minimum).
#[inline]
fn k_scale_min(s: &[u8], j: usize) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        (
            (s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4),
            (s[j + 4] >> 4) | ((s[j] >> 6) << 4),
        )
    }
}

/// Q4_K (144 bytes / 256 values): f16 `d`, f16 `dmin`, 12 bytes of 6-bit
/// sub-block scales and minimums (8 sub-blocks of 32), 128 bytes of nibbles.
/// Each 64 values use 32 bytes: the low nibbles are sub-block `2i`, the high
/// nibbles sub-block `2i + 1`; `x = d·sc · q − dmin·m`.
fn block_q4_k(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let dmin = f16_at(b, 2);
    let scales = &b[4..16];
    let qs = &b[16..144];
    for i in 0..4 {
        let (sc0, m0) = k_scale_min(scales, 2 * i);
        let (sc1, m1) = k_scale_min(scales, 2 * i + 1);
        let (d0, mn0) = (d * sc0 as f32, dmin * m0 as f32);
        let (d1, mn1) = (d * sc1 as f32, dmin * m1 as f32);
        let q = &qs[32 * i..32 * i + 32];
        let out = &mut y[64 * i..64 * i + 64];
        for l in 0..32 {
            out[l] = d0 * (q[l] & 0x0F) as f32 - mn0;
            out[l + 32] = d1 * (q[l] >> 4) as f32 - mn1;
        }
    }
}

/// Q5_K (176 bytes / 256 values): as Q4_K plus 32 bytes `qh` of fifth bits
/// between the scales and the nibbles: for the `i`-th group of 64 values,
/// bit `2i` of `qh[l]` completes value `l` of the low-nibble sub-block and
/// bit `2i + 1` value `l` of the high-nibble one.
fn block_q5_k(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let dmin = f16_at(b, 2);
    let scales = &b[4..16];
    let qh = &b[16..48];
    let qs = &b[48..176];
    for i in 0..4 {
        let (sc0, m0) = k_scale_min(scales, 2 * i);
        let (sc1, m1) = k_scale_min(scales, 2 * i + 1);
        let (d0, mn0) = (d * sc0 as f32, dmin * m0 as f32);
        let (d1, mn1) = (d * sc1 as f32, dmin * m1 as f32);
        let q = &qs[32 * i..32 * i + 32];
        let out = &mut y[64 * i..64 * i + 64];
        for l in 0..32 {
            let h0 = ((qh[l] >> (2 * i)) & 1) << 4;
            let h1 = ((qh[l] >> (2 * i + 1)) & 1) << 4;
            out[l] = d0 * ((q[l] & 0x0F) | h0) as f32 - mn0;
            out[l + 32] = d1 * ((q[l] >> 4) | h1) as f32 - mn1;
        }
    }
}

/// Q6_K (210 bytes / 256 values): 128 bytes `ql` of low nibbles, 64 bytes
/// `qh` of 2-bit high parts, 16 signed 8-bit scales (one per 16 values), f16
/// `d` last. Each half (128 values) uses 64 bytes of `ql`, 32 of `qh` and 8
/// scales: for `l` in 0..32, values `l`, `l+32`, `l+64`, `l+96` take the low
/// nibble of `ql[l]`, of `ql[l+32]`, the high nibble of `ql[l]`, of
/// `ql[l+32]`, and bits 0-1, 2-3, 4-5, 6-7 of `qh[l]`;
/// `x = d · scale · (q − 32)`.
fn block_q6_k(b: &[u8], y: &mut [f32]) {
    let ql_all = &b[0..128];
    let qh_all = &b[128..192];
    let sc_all = &b[192..208];
    let d = f16_at(b, 208);
    for half in 0..2 {
        let ql = &ql_all[64 * half..64 * half + 64];
        let qh = &qh_all[32 * half..32 * half + 32];
        let sc = &sc_all[8 * half..8 * half + 8];
        let out = &mut y[128 * half..128 * half + 128];
        for l in 0..32 {
            let is = l / 16;
            let q1 = ((ql[l] & 0x0F) | ((qh[l] & 3) << 4)) as i32 - 32;
            let q2 = ((ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
            let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
            let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
            out[l] = d * (sc[is] as i8) as f32 * q1 as f32;
            out[l + 32] = d * (sc[is + 2] as i8) as f32 * q2 as f32;
            out[l + 64] = d * (sc[is + 4] as i8) as f32 * q3 as f32;
            out[l + 96] = d * (sc[is + 6] as i8) as f32 * q4 as f32;
        }
    }
}

// ---------------------------------------------------------------------------
// LLaMA-family model import
// ---------------------------------------------------------------------------

/// How a GGUF architecture maps onto the engine.
struct ArchInfo {
    /// Hugging Face `model_type`.
    model_type: &'static str,
    /// Whether llama.cpp's converter permuted the rows of Q and K (and their
    /// biases) to its interleaved rotary pairing; see [`unpermute_rows`].
    rope_permuted: bool,
}

/// The GGUF architectures this importer maps.
pub const SUPPORTED_ARCHS: &str = "llama, mistral, qwen2";

fn arch_info(arch: &str) -> Option<ArchInfo> {
    Some(match arch {
        // llama.cpp runs these with interleaved ("normal") RoPE and its HF
        // converter permutes q/k rows to match.
        "llama" | "mistral" => ArchInfo {
            model_type: "llama",
            rope_permuted: true,
        },
        // Qwen2 runs with NeoX-style (rotate_half) RoPE: no permutation.
        "qwen2" => ArchInfo {
            model_type: "qwen2",
            rope_permuted: false,
        },
        _ => return None,
    })
}

/// The Hugging Face name of a LLaMA-family GGUF tensor name, or `None` for a
/// name outside the mapping (such tensors keep their GGUF name).
///
/// `token_embd` → `model.embed_tokens`, `output_norm` → `model.norm`,
/// `output` → `lm_head`, and per block `blk.N.`: `attn_q/k/v` →
/// `model.layers.N.self_attn.{q,k,v}_proj`, `attn_output` → `o_proj`,
/// `attn_norm` → `input_layernorm`, `ffn_norm` → `post_attention_layernorm`,
/// `ffn_gate/up/down` → `mlp.{gate,up,down}_proj`; `.weight` and `.bias`
/// suffixes carry over.
pub fn hf_tensor_name(gguf_name: &str) -> Option<String> {
    let (stem, suffix) = gguf_name.rsplit_once('.')?;
    if suffix != "weight" && suffix != "bias" {
        return None;
    }
    let mapped = match stem {
        "token_embd" => "model.embed_tokens".to_string(),
        "output_norm" => "model.norm".to_string(),
        "output" => "lm_head".to_string(),
        _ => {
            let rest = stem.strip_prefix("blk.")?;
            let (n, part) = rest.split_once('.')?;
            let n: usize = n.parse().ok()?;
            let hf = match part {
                "attn_q" => "self_attn.q_proj",
                "attn_k" => "self_attn.k_proj",
                "attn_v" => "self_attn.v_proj",
                "attn_output" => "self_attn.o_proj",
                "attn_norm" => "input_layernorm",
                "ffn_norm" => "post_attention_layernorm",
                "ffn_gate" => "mlp.gate_proj",
                "ffn_up" => "mlp.up_proj",
                "ffn_down" => "mlp.down_proj",
                _ => return None,
            };
            format!("model.layers.{n}.{hf}")
        }
    };
    Some(format!("{mapped}.{suffix}"))
}

/// Undo llama.cpp's rotary permutation of the rows of a Q or K projection
/// (weight `[rows, cols]` row-major, or a bias with `cols = 1`).
///
/// Hugging Face LLaMA checkpoints rotate the pairs `(i, i + Dh/2)` of each
/// head (`rotate_half`); llama.cpp rotates adjacent pairs `(2j, 2j + 1)`, so
/// its converter (`convert_hf_to_gguf.py`, `LlamaModel.permute`) reorders
/// the rows of every head as `reshape(n_head, 2, Dh/2, cols).swapaxes(1, 2)`:
/// GGUF row `h·Dh + 2j + i` holds Hugging Face row `h·Dh + i·Dh/2 + j`. This
/// is the inverse: `hf[h·Dh + i·Dh/2 + j] = gguf[h·Dh + 2j + i]`. `n_head` is
/// the number of query heads for Q and of key/value heads for K.
pub fn unpermute_rows(gguf: &[f32], rows: usize, cols: usize, n_head: usize) -> Option<Vec<f32>> {
    if n_head == 0 || !rows.is_multiple_of(2 * n_head) || gguf.len() != rows * cols {
        return None;
    }
    let dh = rows / n_head;
    let half = dh / 2;
    let mut hf = vec![0f32; gguf.len()];
    for h in 0..n_head {
        for i in 0..2 {
            for j in 0..half {
                let dst = h * dh + i * half + j;
                let src = h * dh + 2 * j + i;
                hf[dst * cols..(dst + 1) * cols]
                    .copy_from_slice(&gguf[src * cols..(src + 1) * cols]);
            }
        }
    }
    Some(hf)
}

/// f32 values owned in memory, as tensor backing bytes (4-byte aligned, so
/// [`TensorView::as_f32_slice`] works in place).
struct F32Buf(Vec<f32>);

impl AsRef<[u8]> for F32Buf {
    fn as_ref(&self) -> &[u8] {
        bytemuck::cast_slice(&self.0)
    }
}

/// The `{arch}.` prefix of a metadata key.
fn akey(arch: &str, key: &str) -> String {
    format!("{arch}.{key}")
}

/// A Hugging Face `config.json` (as a JSON value) for a LLaMA-family GGUF:
/// `model_type` (`llama` for llama/mistral, `qwen2`), `hidden_size` =
/// `{arch}.embedding_length`, `intermediate_size` =
/// `{arch}.feed_forward_length`, `num_hidden_layers` = `{arch}.block_count`,
/// `num_attention_heads` / `num_key_value_heads` =
/// `{arch}.attention.head_count(_kv)`, `rms_norm_eps` =
/// `{arch}.attention.layer_norm_rms_epsilon`, `rope_theta` =
/// `{arch}.rope.freq_base` (default 10000), `max_position_embeddings` =
/// `{arch}.context_length`, `vocab_size` = rows of `token_embd.weight`,
/// `tie_word_embeddings` = no `output.weight`, `hidden_act` = `silu`, the
/// bos/eos/pad ids of `tokenizer.ggml.*`, `head_dim` when
/// `{arch}.attention.key_length` differs from hidden/heads, and
/// `rope_scaling` when the file declares one (so that the config check
/// refuses it rather than ignoring it).
pub fn hf_config(g: &GgufFile) -> Result<Value> {
    let arch = g.architecture()?;
    let info = arch_info(arch).ok_or_else(|| {
        g.err(format!(
            "GGUF architecture '{arch}' is not supported (supported: {SUPPORTED_ARCHS})"
        ))
    })?;
    let hidden = g.req_u64(&akey(arch, "embedding_length"))?;
    let heads = g.req_u64(&akey(arch, "attention.head_count"))?;
    let kv_heads = g
        .opt_u64(&akey(arch, "attention.head_count_kv"))?
        .unwrap_or(heads);
    let layers = g.req_u64(&akey(arch, "block_count"))?;
    let ffn = g.req_u64(&akey(arch, "feed_forward_length"))?;
    let eps = g
        .opt_f64(&akey(arch, "attention.layer_norm_rms_epsilon"))?
        .ok_or_else(|| {
            g.err(format!(
                "required metadata key '{}' is missing",
                akey(arch, "attention.layer_norm_rms_epsilon")
            ))
        })?;
    let theta = g
        .opt_f64(&akey(arch, "rope.freq_base"))?
        .unwrap_or(10_000.0);
    let ctx = g.opt_u64(&akey(arch, "context_length"))?;
    let emb = g
        .tensor("token_embd.weight")
        .ok_or_else(|| g.err("no tensor 'token_embd.weight' (the token embeddings)"))?;
    if emb.ne.len() != 2 {
        return Err(g.err(format!(
            "tensor 'token_embd.weight' has dimensions {:?}, expected [hidden, vocab]",
            emb.ne
        )));
    }
    let vocab = emb.ne[1];
    let mut cfg = json!({
        "model_type": info.model_type,
        "architectures": [if info.model_type == "qwen2" { "Qwen2ForCausalLM" } else { "LlamaForCausalLM" }],
        "hidden_size": hidden,
        "intermediate_size": ffn,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "rms_norm_eps": eps,
        "rope_theta": theta,
        "vocab_size": vocab,
        "hidden_act": "silu",
        "tie_word_embeddings": g.tensor("output.weight").is_none(),
    });
    let obj = cfg.as_object_mut().expect("object");
    if let Some(c) = ctx {
        obj.insert("max_position_embeddings".into(), json!(c));
    }
    if let Some(kl) = g.opt_u64(&akey(arch, "attention.key_length"))? {
        if heads > 0 && kl * heads != hidden {
            obj.insert("head_dim".into(), json!(kl));
        }
    }
    for (hf, gg) in [
        ("bos_token_id", "tokenizer.ggml.bos_token_id"),
        ("eos_token_id", "tokenizer.ggml.eos_token_id"),
        ("pad_token_id", "tokenizer.ggml.padding_token_id"),
    ] {
        if let Some(id) = g.opt_u64(gg)? {
            obj.insert(hf.into(), json!(id));
        }
    }
    if let Some(v) = g.get(&akey(arch, "rope.scaling.type")) {
        let ty = v.as_str().unwrap_or("?");
        if ty != "none" {
            obj.insert("rope_scaling".into(), json!({ "rope_type": ty }));
        }
    }
    if info.model_type == "llama" {
        // A llama-architecture GGUF with q/k/v biases (rare) keeps them.
        let has_bias = g.tensor("blk.0.attn_q.bias").is_some();
        obj.insert("attention_bias".into(), json!(has_bias));
    }
    Ok(cfg)
}

/// The frozen weights of a LLaMA-family GGUF under Hugging Face names:
/// tensors renamed by [`hf_tensor_name`] (others keep their GGUF name),
/// quantized ones dequantized to f32, Q/K rows un-permuted where the
/// converter permuted them. F32/F16/BF16 tensors that need no permutation
/// are read in place from the memory map. Metadata: every scalar GGUF key as
/// text (arrays summarised) plus `format = gguf`.
pub fn load_weights(g: &GgufFile) -> Result<WeightStore> {
    let arch = g.architecture()?;
    let info = arch_info(arch).ok_or_else(|| {
        g.err(format!(
            "GGUF architecture '{arch}' is not supported (supported: {SUPPORTED_ARCHS})"
        ))
    })?;
    let heads = g.req_u64(&akey(arch, "attention.head_count"))? as usize;
    let kv_heads = g
        .opt_u64(&akey(arch, "attention.head_count_kv"))?
        .map_or(heads, |x| x as usize);

    let mut seen = HashSet::new();
    for t in g.tensors() {
        let hf = hf_tensor_name(&t.name).unwrap_or_else(|| t.name.clone());
        if !seen.insert(hf.clone()) {
            return Err(g.err(format!(
                "tensor '{}' maps to '{hf}', which another tensor also maps to",
                t.name
            )));
        }
    }
    let views: Vec<TensorView> = g
        .tensors()
        .par_iter()
        .map(|t| -> Result<TensorView> {
            let hf = hf_tensor_name(&t.name).unwrap_or_else(|| t.name.clone());
            let shape = t.shape();
            let permute_heads = if info.rope_permuted {
                if hf.ends_with("self_attn.q_proj.weight") || hf.ends_with("self_attn.q_proj.bias") {
                    Some(heads)
                } else if hf.ends_with("self_attn.k_proj.weight")
                    || hf.ends_with("self_attn.k_proj.bias")
                {
                    Some(kv_heads)
                } else {
                    None
                }
            } else {
                None
            };
            let plain = match t.ggml_type {
                GgmlType::F32 => Some(DType::F32),
                GgmlType::F16 => Some(DType::F16),
                GgmlType::BF16 => Some(DType::BF16),
                _ => None,
            };
            if let (Some(dt), None) = (plain, permute_heads) {
                return Ok(TensorView::new(
                    hf,
                    g.path.clone(),
                    dt,
                    shape,
                    g.data.clone(),
                    t.start,
                    t.end,
                ));
            }
            let mut values = g.dequantize(t)?;
            if let Some(nh) = permute_heads {
                let rows = shape.first().copied().unwrap_or(1);
                let cols = if shape.len() >= 2 {
                    shape[1..].iter().product()
                } else {
                    1
                };
                values = unpermute_rows(&values, rows, cols, nh).ok_or_else(|| {
                    g.err(format!(
                        "tensor '{}' has {rows} rows, which do not split into {nh} heads of an even size",
                        t.name
                    ))
                })?;
            }
            let n = values.len() * 4;
            Ok(TensorView::new(
                hf,
                g.path.clone(),
                DType::F32,
                shape,
                Arc::new(F32Buf(values)),
                0,
                n,
            ))
        })
        .collect::<Result<_>>()?;

    let mut metadata = BTreeMap::new();
    metadata.insert("format".to_string(), "gguf".to_string());
    for (k, v) in g.metadata() {
        if v.as_array().is_none() && k != "tokenizer.chat_template" {
            metadata.insert(k.clone(), v.summary());
        }
    }
    let mut store = WeightStore::from_tensors(g.path(), views, metadata)?;
    if let Some(stamp) = &g.stamp {
        store.add_file(stamp.clone());
    }
    Ok(store)
}

// ---------------------------------------------------------------------------
// Tokenizer
// ---------------------------------------------------------------------------

/// GGUF token types (`tokenizer.ggml.token_type`).
const TOKEN_CONTROL: i64 = 3;
const TOKEN_USER_DEFINED: i64 = 4;

/// GPT-2's pre-tokenizer regex (also the default of Hugging Face's
/// `ByteLevel(use_regex = true)`).
const GPT2_REGEX: &str =
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";
/// LLaMA-3's pre-tokenizer regex (digits in groups of up to 3).
const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2's pre-tokenizer regex (single digits).
const QWEN2_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The Hugging Face pre-tokenizer (and normalizer) for a byte-level BPE
/// vocabulary with `tokenizer.ggml.pre = pre`:
///
/// - `smollm`: single digits (`Digits(individual_digits)`), then GPT-2's
///   ByteLevel regex — SmolLM2's own tokenizer.json, and llama.cpp's
///   `smollm` splitting (`\p{N}`, then the GPT-2 regex);
/// - `qwen2`: Qwen2's regex (single digits), ByteLevel without its own
///   regex, NFC normalization;
/// - `llama3`/`llama-bpe`: LLaMA-3's regex (digits in threes);
/// - `gpt2`, `default`, absent or any other value: GPT-2's regex (the
///   documented fallback; an unknown `pre` may split some text differently
///   from the model's original tokenizer).
fn pre_tokenizer_json(pre: &str) -> (Value, Value) {
    let byte_level = |use_regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex});
    let split = |re: &str| json!({"type": "Split", "pattern": {"Regex": re}, "behavior": "Isolated", "invert": false});
    match pre {
        "smollm" => (
            json!({"type": "Sequence", "pretokenizers": [
                {"type": "Digits", "individual_digits": true},
                byte_level(true),
            ]}),
            Value::Null,
        ),
        "qwen2" => (
            json!({"type": "Sequence", "pretokenizers": [split(QWEN2_REGEX), byte_level(false)]}),
            json!({"type": "NFC"}),
        ),
        "llama3" | "llama-bpe" => (
            json!({"type": "Sequence", "pretokenizers": [split(LLAMA3_REGEX), byte_level(false)]}),
            Value::Null,
        ),
        _ => (
            json!({"type": "Sequence", "pretokenizers": [split(GPT2_REGEX), byte_level(false)]}),
            Value::Null,
        ),
    }
}

/// A Hugging Face tokenizer from a GGUF's `tokenizer.ggml.*` metadata.
///
/// Only byte-level BPE vocabularies (`tokenizer.ggml.model = "gpt2"`: GPT-2,
/// SmolLM, LLaMA-3, Qwen2) are supported: a BPE model over
/// `tokenizer.ggml.tokens` (id = position) and `tokenizer.ggml.merges`
/// (`"a b"` pairs, in priority order), the pre-tokenizer named by
/// `tokenizer.ggml.pre` (see `pre_tokenizer_json`), a ByteLevel decoder,
/// control tokens (`token_type` 3) as special added tokens and user-defined
/// ones (4) as plain added tokens. When `tokenizer.ggml.add_bos_token` (or
/// `add_eos_token`) is true, a template post-processor adds BOS (EOS); the
/// padding id is `tokenizer.ggml.padding_token_id` when given.
pub fn build_tokenizer(g: &GgufFile) -> Result<tokenizers::Tokenizer> {
    use tokenizers::models::bpe::BPE;
    use tokenizers::{
        AddedToken, DecoderWrapper, NormalizerWrapper, PaddingParams, PostProcessorWrapper,
        PreTokenizerWrapper, Tokenizer,
    };
    let model = g.req_str("tokenizer.ggml.model")?;
    if model != "gpt2" {
        return Err(g.err(format!(
            "tokenizer.ggml.model '{model}' is not supported (only byte-level BPE, 'gpt2'); \
             use a tokenizer.json instead"
        )));
    }
    let arr = |key: &str| -> Result<&[GgufValue]> {
        g.get(key)
            .ok_or_else(|| g.err(format!("required metadata key '{key}' is missing")))?
            .as_array()
            .ok_or_else(|| g.err(format!("metadata key '{key}' must be an array")))
    };
    let tokens = arr("tokenizer.ggml.tokens")?;
    let mut vocab = tokenizers::models::bpe::Vocab::default();
    vocab.reserve(tokens.len());
    let mut names: Vec<&str> = Vec::with_capacity(tokens.len());
    for (i, t) in tokens.iter().enumerate() {
        let s = t
            .as_str()
            .ok_or_else(|| g.err(format!("tokenizer.ggml.tokens[{i}] is not a string")))?;
        if vocab.insert(s.to_string(), i as u32).is_some() {
            return Err(g.err(format!(
                "tokenizer.ggml.tokens: token {s:?} appears twice (second at id {i})"
            )));
        }
        names.push(s);
    }
    let merges_v = arr("tokenizer.ggml.merges")?;
    let mut merges = Vec::with_capacity(merges_v.len());
    for (i, m) in merges_v.iter().enumerate() {
        let s = m
            .as_str()
            .ok_or_else(|| g.err(format!("tokenizer.ggml.merges[{i}] is not a string")))?;
        let (a, b) = s.split_once(' ').ok_or_else(|| {
            g.err(format!(
                "tokenizer.ggml.merges[{i}] = {s:?} is not two tokens separated by a space"
            ))
        })?;
        merges.push((a.to_string(), b.to_string()));
    }
    let types: Vec<i64> = match g.get("tokenizer.ggml.token_type") {
        None => Vec::new(),
        Some(v) => {
            let a = v.as_array().ok_or_else(|| {
                g.err("metadata key 'tokenizer.ggml.token_type' must be an array")
            })?;
            a.iter().map(|x| x.as_i64().unwrap_or(1)).collect()
        }
    };
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(|e| g.err(format!("cannot build the BPE tokenizer: {e}")))?;
    let mut tk = Tokenizer::new(bpe);

    let pre = g
        .get("tokenizer.ggml.pre")
        .and_then(GgufValue::as_str)
        .unwrap_or("default");
    let (pre_json, norm_json) = pre_tokenizer_json(pre);
    let from_json = |what: &str, v: Value| {
        g.err(format!(
            "internal: cannot build the {what} for pre-tokenizer '{pre}': {v}"
        ))
    };
    let pt: PreTokenizerWrapper = serde_json::from_value(pre_json.clone())
        .map_err(|_| from_json("pre-tokenizer", pre_json))?;
    tk.with_pre_tokenizer(Some(pt));
    if !norm_json.is_null() {
        let n: NormalizerWrapper = serde_json::from_value(norm_json.clone())
            .map_err(|_| from_json("normalizer", norm_json))?;
        tk.with_normalizer(Some(n));
    }
    let dec: DecoderWrapper = serde_json::from_value(
        json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true}),
    )
    .map_err(|e| g.err(format!("internal: cannot build the ByteLevel decoder: {e}")))?;
    tk.with_decoder(Some(dec));

    // Control and user-defined tokens are matched before BPE.
    let added: Vec<AddedToken> = names
        .iter()
        .enumerate()
        .filter_map(|(i, s)| match types.get(i).copied() {
            Some(TOKEN_CONTROL) => Some(AddedToken::from(s.to_string(), true).normalized(false)),
            Some(TOKEN_USER_DEFINED) => {
                Some(AddedToken::from(s.to_string(), false).normalized(false))
            }
            _ => None,
        })
        .collect();
    if !added.is_empty() {
        tk.add_tokens(&added);
        let special: Vec<AddedToken> = added.into_iter().filter(|t| t.special).collect();
        tk.add_special_tokens(&special);
    }

    let token_name = |key: &str| -> Result<Option<(String, u32)>> {
        match g.opt_u64(key)? {
            None => Ok(None),
            Some(id) => names
                .get(id as usize)
                .map(|s| Some((s.to_string(), id as u32)))
                .ok_or_else(|| {
                    g.err(format!(
                        "{key} = {id} is outside the vocabulary of {} tokens",
                        names.len()
                    ))
                }),
        }
    };
    let bos = token_name("tokenizer.ggml.bos_token_id")?;
    let eos = token_name("tokenizer.ggml.eos_token_id")?;
    let pad = token_name("tokenizer.ggml.padding_token_id")?;
    let add_bos = g.opt_bool("tokenizer.ggml.add_bos_token")?.unwrap_or(false);
    let add_eos = g.opt_bool("tokenizer.ggml.add_eos_token")?.unwrap_or(false);
    let bos = if add_bos {
        Some(bos.ok_or_else(|| {
            g.err("tokenizer.ggml.add_bos_token is true but tokenizer.ggml.bos_token_id is missing")
        })?)
    } else {
        None
    };
    let eos = if add_eos {
        Some(eos.ok_or_else(|| {
            g.err("tokenizer.ggml.add_eos_token is true but tokenizer.ggml.eos_token_id is missing")
        })?)
    } else {
        None
    };
    let post = if bos.is_none() && eos.is_none() {
        json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true})
    } else {
        let mut single = Vec::new();
        let mut pair = Vec::new();
        let mut specials = serde_json::Map::new();
        let tok = |s: &str, seg: u32| json!({"SpecialToken": {"id": s, "type_id": seg}});
        let seq = |s: &str, seg: u32| json!({"Sequence": {"id": s, "type_id": seg}});
        for (seg, name) in [(0u32, "A"), (1u32, "B")] {
            if let Some((b, _)) = &bos {
                pair.push(tok(b, seg));
                if seg == 0 {
                    single.push(tok(b, 0));
                }
            }
            pair.push(seq(name, seg));
            if seg == 0 {
                single.push(seq(name, 0));
            }
            if let Some((e, _)) = &eos {
                pair.push(tok(e, seg));
                if seg == 0 {
                    single.push(tok(e, 0));
                }
            }
        }
        for (s, id) in bos.iter().chain(eos.iter()) {
            specials.insert(s.clone(), json!({"id": s, "ids": [id], "tokens": [s]}));
        }
        json!({"type": "TemplateProcessing", "single": single, "pair": pair, "special_tokens": specials})
    };
    let pp: PostProcessorWrapper = serde_json::from_value(post.clone()).map_err(|e| {
        g.err(format!(
            "internal: cannot build the post-processor {post}: {e}"
        ))
    })?;
    tk.with_post_processor(Some(pp));
    if let Some((s, id)) = pad {
        tk.with_padding(Some(PaddingParams {
            pad_id: id,
            pad_token: s,
            ..PaddingParams::default()
        }));
    }
    Ok(tk)
}

// ---------------------------------------------------------------------------
// Model directory
// ---------------------------------------------------------------------------

/// Open a LLaMA-family `.gguf` file as a [`ModelDir`]: `dir` is the file's
/// directory, `name` its stem, `config` from [`hf_config`] (checked by
/// [`ModelConfig::from_json`], messages naming the file), `weights` from
/// [`load_weights`], and `tokenizer` the `.gguf` path itself — which
/// [`crate::data::TextTokenizer::from_file`] recognises by its extension and
/// builds with [`build_tokenizer`]. Nothing is written next to the model.
pub fn open_model_dir(path: &Path) -> Result<ModelDir> {
    let g = GgufFile::open(path)?;
    let cfg = hf_config(&g)?;
    let config = ModelConfig::from_json(&cfg, path)?;
    let weights = load_weights(&g)?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string());
    Ok(ModelDir {
        dir,
        name,
        config,
        weights,
        tokenizer: Some(path.to_path_buf()),
        default_pooling: None,
    })
}

/// Whether `path` names a GGUF file (by extension, case-insensitively).
pub fn is_gguf_path(path: &Path) -> bool {
    path.extension()
        .map(|e| e.eq_ignore_ascii_case("gguf"))
        .unwrap_or(false)
}
