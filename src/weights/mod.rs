//! Frozen weights: memory-mapped safetensors (single file or sharded),
//! read in place.

pub mod gguf;
mod store;
mod tensor;

pub use store::*;
pub use tensor::{Bytes, DType, TensorView};
