//! Model configurations and the hand-written forward and bias-only backward
//! passes, over the op vocabulary of [`crate::backend::Backend`].

pub mod config;
pub mod bias;
pub mod encoder;

pub use bias::{BiasTerm, SlabLayout, Slot, SlotKind};
pub use encoder::{DeviceBatch, Encoder, EncoderOptions};
