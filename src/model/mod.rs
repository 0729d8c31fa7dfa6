//! Model configurations and the hand-written forward and bias-only backward
//! passes, over the op vocabulary of [`crate::backend::Backend`].

pub mod config;
