//! # quantlab-models: real models on candle-core
//!
//! Weight loading, tokenizers, the LLaMA-family decoder and the BERT encoder with
//! replaceable linears and capture hooks, perplexity and generation. Models know nothing of
//! Hessians or checkpoint formats beyond loading weights.

mod error;
pub use error::{ModelError, Result};
