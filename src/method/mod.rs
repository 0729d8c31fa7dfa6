//! The BEFT method around the engine: adapters that Hugging Face PEFT loads
//! (and back), bias-term ranking, and sweeps.

pub mod adapter;
pub mod plot;
pub mod rank;
pub mod sweep;
