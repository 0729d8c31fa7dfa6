//! # beft — bias-efficient fine-tuning
//!
//! A from-scratch transformer engine that fine-tunes only the bias vectors of
//! a pre-trained model (chiefly the value-projection bias `b_v`, after
//! Huang, Balashankar & Aminifar, *BEFT*, ACL 2026). Forward and backward
//! passes are written by hand over a small op vocabulary
//! ([`backend::Backend`]); the backward pass computes gradients only for the
//! trainable biases (and the task head), never for a weight matrix.
//!
//! Data flows one way: CLI → [`train`] → [`model`] → [`backend`].

// The op vocabulary passes shapes explicitly, and the reference loops index
// by position to mirror the maths they implement.
#![allow(clippy::too_many_arguments, clippy::needless_range_loop,
    // Polynomial coefficients are quoted as published; tuples of buffers are
    // the natural return of a forward pass that keeps what backward needs.
    clippy::excessive_precision,
    clippy::type_complexity)]

pub mod alloc;
pub mod backend;
pub mod bench;
pub mod data;
pub mod error;
pub mod float;
pub mod infer;
pub mod method;
pub mod model;
pub mod rng;
pub mod train;
pub mod weights;

pub use error::{Error, Result};
