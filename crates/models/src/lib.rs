//! # quantlab-models: real models on candle-core
//!
//! Weight loading, tokenizers, the LLaMA-family decoder and the BERT encoder with
//! replaceable linears and capture hooks, perplexity and generation. Models know nothing of
//! Hessians or checkpoint formats beyond loading weights.

pub mod bert;
pub mod embed;
mod error;
pub mod fetch;
pub mod text;
pub use error::{ModelError, Result};

pub mod config;
pub mod generate;
pub mod kld;
pub mod linear;
pub mod llama;
mod ops;
pub mod ppl;
pub mod rotate;
pub mod tokenizer;
pub mod weights;

/// The candle version this crate's API uses (`Tensor`, `Device`).
pub use candle_core;
pub use config::{Architecture, LlamaConfig, RopeScaling};
pub use generate::{generate, generate_chat, GenerateParams, Generation};
pub use kld::{kl_divergence, save_base, KldBase, KldReport, SavedBase, SavedBaseFacts};
pub use linear::{CodesLinear, DenseLinear, LazyLinear, Linear};
pub use llama::{CaptureHook, KvCache, LlamaBlock, LlamaModel, BLOCK_LINEARS};
pub use ops::{gemm_gflops, with_f32};
pub use ppl::{peak_rss_mb, perplexity, perplexity_of_file, PplParams, PplReport};
pub use tokenizer::{render_chat_template, ChatMessage, LlamaTokenizer};
pub use weights::{GgufWeights, MemoryWeights, SafetensorsWeights, WeightSource};
