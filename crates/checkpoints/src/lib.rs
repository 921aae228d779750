//! # quantlab-checkpoints: on-disk formats
//!
//! Reading safetensors and GGUF files, bit packers, and the GPTQ / AWQ / bitsandbytes /
//! GGUF writers and readers.

mod error;
pub use error::{CheckpointError, Result};
