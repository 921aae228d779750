//! Perplexity over non-overlapping windows (protocol in `docs/perplexity.md`).
//!
//! The text is tokenized once, without BOS; it is cut into `floor(len / ctx)` windows of
//! `ctx` tokens (the tail is dropped; `max_windows` keeps the first N); each window is run
//! from position 0 and every token but the window's first is scored with
//! `-log p(token | previous tokens of the window)`. `ppl = exp(mean NLL)`.

use std::path::Path;
use std::time::Instant;

use candle_core::Tensor;
use serde::Serialize;

use crate::llama::LlamaModel;
use crate::ops;
use crate::tokenizer::LlamaTokenizer;
use crate::{ModelError, Result};

/// Knobs of [`perplexity`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PplParams {
    /// Tokens per window.
    pub ctx: usize,
    /// Keep only the first N windows.
    pub max_windows: Option<usize>,
}

impl Default for PplParams {
    fn default() -> Self {
        Self {
            ctx: 512,
            max_windows: None,
        }
    }
}

/// The result of a perplexity run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PplReport {
    /// `exp(nll)`.
    pub ppl: f64,
    /// Mean negative log-likelihood per scored token (nats).
    pub nll: f64,
    /// Number of scored tokens, `windows * (ctx - 1)`.
    pub tokens_scored: usize,
    /// Number of windows evaluated.
    pub windows: usize,
    /// Tokens per window.
    pub ctx: usize,
    /// Mean NLL of each window.
    pub window_nll: Vec<f64>,
    /// Wall-clock seconds of the forward passes and scoring.
    pub seconds: f64,
    /// Tokens processed per second, `windows * ctx / seconds`.
    pub tokens_per_second: f64,
    /// Peak resident set size of the process (VmHWM), MiB, where /proc is available.
    pub peak_rss_mb: Option<f64>,
}

/// The peak resident set size of this process in MiB (`VmHWM` of `/proc/self/status`).
pub fn peak_rss_mb() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// Perplexity of `model` on `tokens` (see the module docs for the protocol).
///
/// A model whose output head is zero predicts the uniform distribution, so its perplexity is
/// exactly the vocabulary size:
///
/// ```
/// use candle_core::{DType, Device, Tensor};
/// use quantlab_models::{perplexity, LlamaConfig, LlamaModel, MemoryWeights, PplParams};
/// let json = r#"{"architectures": ["LlamaForCausalLM"], "hidden_size": 8,
///   "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
///   "vocab_size": 10, "tie_word_embeddings": true}"#;
/// let cfg = LlamaConfig::from_hf_json(json, "config.json").unwrap();
/// let mut w = MemoryWeights::new("memory");
/// let z = |s: &[usize]| Tensor::zeros(s, DType::F32, &Device::Cpu).unwrap();
/// let one = |s: &[usize]| Tensor::ones(s, DType::F32, &Device::Cpu).unwrap();
/// w.insert("model.embed_tokens.weight", z(&[10, 8]));
/// w.insert("model.norm.weight", one(&[8]));
/// for n in ["input_layernorm", "post_attention_layernorm"] {
///     w.insert(&format!("model.layers.0.{n}.weight"), one(&[8]));
/// }
/// for (n, s) in [("self_attn.q_proj", [8, 8]), ("self_attn.k_proj", [8, 8]),
///     ("self_attn.v_proj", [8, 8]), ("self_attn.o_proj", [8, 8]), ("mlp.gate_proj", [16, 8]),
///     ("mlp.up_proj", [16, 8]), ("mlp.down_proj", [8, 16])] {
///     w.insert(&format!("model.layers.0.{n}.weight"), z(&s));
/// }
/// let model = LlamaModel::from_source(cfg, &w).unwrap();
/// let tokens: Vec<u32> = (0..40).map(|i| i % 10).collect();
/// let r = perplexity(&model, &tokens, &PplParams { ctx: 16, max_windows: None }).unwrap();
/// assert_eq!((r.windows, r.tokens_scored), (2, 30));
/// assert!((r.ppl - 10.0).abs() < 1e-4);
/// ```
///
/// Fails with [`ModelError::TextTooShort`] (naming "the token sequence") when there are
/// fewer than `ctx` tokens; [`perplexity_of_file`] names the file instead.
pub fn perplexity(model: &LlamaModel, tokens: &[u32], params: &PplParams) -> Result<PplReport> {
    let ctx = params.ctx;
    let windows = window_count(tokens, params)?;
    let start = Instant::now();
    let mut window_nll = Vec::with_capacity(windows);
    let mut total = 0f64;
    for w in 0..windows {
        let (_, nll) = window_logits(model, &tokens[w * ctx..(w + 1) * ctx])?;
        let s: f64 = nll.iter().sum();
        total += s;
        window_nll.push(s / (ctx - 1) as f64);
    }
    let seconds = start.elapsed().as_secs_f64();
    let tokens_scored = windows * (ctx - 1);
    let nll = total / tokens_scored as f64;
    Ok(PplReport {
        ppl: nll.exp(),
        nll,
        tokens_scored,
        windows,
        ctx,
        window_nll,
        seconds,
        tokens_per_second: (windows * ctx) as f64 / seconds.max(1e-9),
        peak_rss_mb: peak_rss_mb(),
    })
}

/// The number of windows of `params.ctx` tokens scored in `tokens` (the module's protocol):
/// an error for `ctx < 2` or a sequence shorter than one window.
pub(crate) fn window_count(tokens: &[u32], params: &PplParams) -> Result<usize> {
    let ctx = params.ctx;
    if ctx < 2 {
        return Err(ModelError::InvalidOption {
            option: "ctx".into(),
            detail: format!("{ctx} is below 2: a window must hold a context and a target"),
        });
    }
    let mut windows = tokens.len() / ctx;
    if let Some(m) = params.max_windows {
        windows = windows.min(m);
    }
    if windows == 0 {
        return Err(ModelError::TextTooShort {
            path: "the token sequence".into(),
            tokens: tokens.len(),
            ctx,
        });
    }
    Ok(windows)
}

/// One window run from position 0: the logits of positions `0 .. ctx - 1` (`[ctx - 1,
/// vocab]`; the last position predicts nothing) and the NLL of each next token.
pub(crate) fn window_logits(model: &LlamaModel, win: &[u32]) -> Result<(Tensor, Vec<f64>)> {
    let mut h = model.embed(&[win])?;
    for i in 0..model.n_blocks() {
        h = model.block_forward(i, &h, 0, None, None)?;
    }
    let logits = model.head(&h.narrow(1, 0, win.len() - 1)?, None)?;
    let nll = ops::row_nll(&logits, &win[1..])?;
    Ok((logits, nll))
}

/// Reads a text file (`.txt`, `.jsonl`, `.parquet`; see [`crate::text::read_text`]), tokenizes it without BOS and
/// runs [`perplexity`]; a text shorter than one window is an error naming the file.
pub fn perplexity_of_file(
    model: &LlamaModel,
    tokenizer: &LlamaTokenizer,
    path: &Path,
    field: Option<&str>,
    params: &PplParams,
) -> Result<PplReport> {
    let text = crate::text::read_text(path, field)?;
    let tokens = tokenizer.encode(&text)?;
    if tokens.len() < params.ctx {
        return Err(ModelError::TextTooShort {
            path: path.display().to_string(),
            tokens: tokens.len(),
            ctx: params.ctx,
        });
    }
    perplexity(model, &tokens, params)
}
