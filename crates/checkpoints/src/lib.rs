//! # quantlab-checkpoints: on-disk formats
//!
//! Reading safetensors and GGUF files, bit packers, and the GPTQ / AWQ / bitsandbytes /
//! GGUF writers and readers.
//!
//! - [`gguf`]: a GGUF header reader (metadata of every value type, tensor infos, the ggml
//!   type table), robust against hostile files.
//! - [`safetensors_header`]: a bounded safetensors header reader.
//! - [`inspect()`]: what a file holds, with the format detected from its magic bytes.
//! - [`export`]: whole-checkpoint writers (GGUF v3; GPTQ / AWQ / bitsandbytes Hugging Face
//!   directories) and the reader of quantized Hugging Face directories.

mod error;
pub mod export;
pub mod gguf;
pub mod imatrix;
pub mod inspect;
pub mod pack;
pub mod quantlab;
pub mod safetensors_header;

pub use error::{CheckpointError, Result};
pub use inspect::{inspect, Inspection};
