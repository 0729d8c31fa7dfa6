//! A read-only view of one checkpoint tensor, held in place in a memory map
//! (or, for formats that need decoding such as GGUF blocks, in an owned
//! buffer). Nothing here copies the file into RAM.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

/// Element types of frozen weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DType {
    F32,
    F16,
    BF16,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DType::F32 => "F32",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
        })
    }
}

/// Bytes backing tensors: a memory map, or an owned decoded buffer.
pub type Bytes = Arc<dyn AsRef<[u8]> + Send + Sync>;

/// One tensor: its name, the file it lives in, dtype, shape and a byte range
/// of the shared backing bytes. Cloning is cheap (an `Arc`).
#[derive(Clone)]
pub struct TensorView {
    pub name: String,
    pub file: Arc<PathBuf>,
    pub dtype: DType,
    pub shape: Vec<usize>,
    data: Bytes,
    start: usize,
    end: usize,
}

impl fmt::Debug for TensorView {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {}{:?} in {}",
            self.name,
            self.dtype,
            self.shape,
            self.file.display()
        )
    }
}

impl TensorView {
    /// A view of `data[start..end]`. The caller has checked that the range
    /// lies inside `data` and that its length is `numel(shape) · dtype.size()`.
    pub fn new(
        name: String,
        file: Arc<PathBuf>,
        dtype: DType,
        shape: Vec<usize>,
        data: Bytes,
        start: usize,
        end: usize,
    ) -> Self {
        debug_assert!(end <= (*data).as_ref().len() && start <= end);
        TensorView {
            name,
            file,
            dtype,
            shape,
            data,
            start,
            end,
        }
    }

    /// A tensor held in an owned buffer of f32 values (for decoded formats
    /// and for tests).
    pub fn from_f32(name: &str, shape: Vec<usize>, values: &[f32]) -> Self {
        Self::from_bytes(
            name,
            DType::F32,
            shape,
            bytemuck::cast_slice(values).to_vec(),
        )
    }

    /// A tensor held in an owned buffer of little-endian `dtype` values.
    pub fn from_bytes(name: &str, dtype: DType, shape: Vec<usize>, bytes: Vec<u8>) -> Self {
        let n = bytes.len();
        debug_assert_eq!(n, shape.iter().product::<usize>() * dtype.size());
        TensorView::new(
            name.to_string(),
            Arc::new(PathBuf::from("<memory>")),
            dtype,
            shape,
            Arc::new(bytes),
            0,
            n,
        )
    }

    /// The raw little-endian bytes.
    pub fn bytes(&self) -> &[u8] {
        &(*self.data).as_ref()[self.start..self.end]
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Zero-copy f32 view when the tensor is f32 and suitably aligned.
    pub fn as_f32_slice(&self) -> Option<&[f32]> {
        match self.dtype {
            DType::F32 => bytemuck::try_cast_slice(self.bytes()).ok(),
            _ => None,
        }
    }

    /// Convert element `i..i+out.len()` to f32 into `out` (conversion on use).
    pub fn read_f32_into(&self, first: usize, out: &mut [f32]) {
        let es = self.dtype.size();
        let b = &self.bytes()[first * es..(first + out.len()) * es];
        match self.dtype {
            DType::F32 => {
                for (o, c) in out.iter_mut().zip(b.chunks_exact(4)) {
                    *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                }
            }
            DType::F16 => {
                for (o, c) in out.iter_mut().zip(b.chunks_exact(2)) {
                    *o = half::f16::from_le_bytes([c[0], c[1]]).to_f32();
                }
            }
            DType::BF16 => {
                for (o, c) in out.iter_mut().zip(b.chunks_exact(2)) {
                    *o = half::bf16::from_le_bytes([c[0], c[1]]).to_f32();
                }
            }
        }
    }

    /// All elements as f32 (an owned copy of this one tensor).
    pub fn to_f32_vec(&self) -> Vec<f32> {
        let mut v = vec![0f32; self.numel()];
        self.read_f32_into(0, &mut v);
        v
    }

    /// All elements as f64 (for f64 gradient checks).
    pub fn to_f64_vec(&self) -> Vec<f64> {
        self.to_f32_vec().into_iter().map(|x| x as f64).collect()
    }
}
