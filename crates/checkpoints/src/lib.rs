//! # quantlab-checkpoints: on-disk formats
//!
//! Reading safetensors and GGUF files, bit packers, and the GPTQ / AWQ / bitsandbytes /
//! GGUF writers and readers.
//!
//! - [`gguf`]: a GGUF header reader (metadata of every value type, tensor infos, the ggml
//!   type table), robust against hostile files.
//! - [`safetensors_header`]: a bounded safetensors header reader.
//! - [`inspect()`]: what a file holds, with the format detected from its magic bytes.

mod error;
pub mod gguf;
pub mod inspect;
pub mod pack;
pub mod safetensors_header;

pub use error::{CheckpointError, Result};
pub use inspect::{inspect, Inspection};
