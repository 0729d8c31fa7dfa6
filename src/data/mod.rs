//! Data: task definitions, GLUE/JSONL readers, tokenizer glue, batching and
//! metrics.
//!
//! * [`tasks`]: [`TaskSpec`] for the GLUE tasks and a generic JSONL task,
//!   [`load_split`] (strict readers: every malformed row is an error naming
//!   `file:line`), [`sample_subset`].
//! * [`tokenize`]: [`TextTokenizer`], a thin wrapper over a Hugging Face
//!   `tokenizer.json` (no padding, truncation to a fixed maximum length).
//! * [`batch`]: dynamic-padding [`Batch`]es and seeded epoch orders.
//! * [`metrics`]: accuracy, binary F1, Matthews correlation, Pearson and
//!   Spearman, and [`evaluate`] which picks the task's primary metric.

pub mod batch;
pub mod bigbench;
pub mod generation;
pub mod metrics;
pub mod prompts;
mod read;
pub mod tasks;
pub mod tokenize;

pub use batch::*;
pub use metrics::*;
pub use tasks::*;
pub use tokenize::*;
