//! Frozen weights: memory-mapped safetensors (single file or sharded),
//! read in place.

mod store;
mod tensor;

pub use store::*;
pub use tensor::{Bytes, DType, TensorView};
