//! Model configurations and the hand-written forward and bias-only backward
//! passes, over the op vocabulary of [`crate::backend::Backend`].

pub mod bias;
pub mod config;
pub mod decoder;
pub mod encoder;
pub mod random;

pub use bias::{BiasTerm, SlabLayout, Slot, SlotKind};
pub use decoder::{
    CandBatch, DecBatch, Decoder, DecoderOptions, MemoryPlan, Offload, RowTargets, HEAD_CHUNK,
};
pub use encoder::{DeviceBatch, Encoder, EncoderOptions};
