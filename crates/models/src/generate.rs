//! Text generation with a KV cache: greedy at temperature 0, otherwise sampling from
//! `softmax(logits / T)` with a seeded generator; stops at an end-of-sequence token.

use std::time::Instant;

use serde::Serialize;

use crate::llama::{KvCache, LlamaModel};
use crate::tokenizer::{ChatMessage, LlamaTokenizer};
use crate::{ModelError, Result};

/// Knobs of [`generate`].
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateParams {
    /// Most tokens to produce.
    pub max_tokens: usize,
    /// 0 for greedy decoding; otherwise the softmax temperature.
    pub temperature: f64,
    /// Seed of the sampler (unused when greedy).
    pub seed: u64,
    /// Stop at the tokenizer's end-of-sequence tokens.
    pub stop_at_eos: bool,
}

impl Default for GenerateParams {
    fn default() -> Self {
        Self {
            max_tokens: 128,
            temperature: 0.0,
            seed: 0,
            stop_at_eos: true,
        }
    }
}

/// What [`generate`] produced.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Generation {
    /// Number of prompt tokens.
    pub prompt_tokens: usize,
    /// The generated tokens (the end-of-sequence token excluded).
    pub tokens: Vec<u32>,
    /// Their text.
    pub text: String,
    /// Whether generation stopped at an end-of-sequence token.
    pub stopped_at_eos: bool,
    /// Wall-clock seconds (prompt and generation).
    pub seconds: f64,
    /// Generated tokens per second.
    pub tokens_per_second: f64,
}

/// SplitMix64: a small seeded generator for sampling.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_f64(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Index of the largest logit (the first one on ties).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    best as u32
}

fn sample(logits: &[f32], temperature: f64, rng: &mut SplitMix64) -> u32 {
    let m = logits.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
    let w: Vec<f64> = logits
        .iter()
        .map(|&l| ((l as f64 - m) / temperature).exp())
        .collect();
    let total: f64 = w.iter().sum();
    let mut u = rng.next_f64() * total;
    for (i, &p) in w.iter().enumerate() {
        if u < p {
            return i as u32;
        }
        u -= p;
    }
    argmax(logits)
}

/// Continues `prompt` (token ids, used as given) for up to `params.max_tokens` tokens.
pub fn generate(
    model: &LlamaModel,
    tokenizer: &LlamaTokenizer,
    prompt: &[u32],
    params: &GenerateParams,
) -> Result<Generation> {
    if prompt.is_empty() {
        return Err(ModelError::InvalidOption {
            option: "prompt".into(),
            detail: "the prompt has no tokens".into(),
        });
    }
    if !(params.temperature.is_finite() && params.temperature >= 0.0) {
        return Err(ModelError::InvalidOption {
            option: "temperature".into(),
            detail: format!("{} is not a non-negative number", params.temperature),
        });
    }
    let start = Instant::now();
    let mut cache = KvCache::new(model.n_blocks());
    let mut rng = SplitMix64(params.seed);
    let mut logits = LlamaModel::last_logits(&model.forward_cached(prompt, &mut cache)?)?;
    let mut out = Vec::new();
    let mut stopped = false;
    for _ in 0..params.max_tokens {
        let next = if params.temperature == 0.0 {
            argmax(&logits)
        } else {
            sample(&logits, params.temperature, &mut rng)
        };
        if params.stop_at_eos && tokenizer.eos_token_ids().contains(&next) {
            stopped = true;
            break;
        }
        out.push(next);
        if out.len() == params.max_tokens {
            break;
        }
        logits = LlamaModel::last_logits(&model.forward_cached(&[next], &mut cache)?)?;
    }
    let seconds = start.elapsed().as_secs_f64();
    Ok(Generation {
        prompt_tokens: prompt.len(),
        text: tokenizer.decode(&out)?,
        tokens_per_second: out.len() as f64 / seconds.max(1e-9),
        tokens: out,
        stopped_at_eos: stopped,
        seconds,
    })
}

/// Wraps `user_prompt` as one user message in the model's chat template (with the
/// assistant turn opened), tokenizes it recognising special tokens, and generates.
pub fn generate_chat(
    model: &LlamaModel,
    tokenizer: &LlamaTokenizer,
    user_prompt: &str,
    params: &GenerateParams,
) -> Result<Generation> {
    let text = tokenizer.apply_chat_template(&[ChatMessage::new("user", user_prompt)], true)?;
    let mut ids = Vec::new();
    if tokenizer.add_bos() {
        ids.extend(tokenizer.bos_token_id());
    }
    ids.extend(tokenizer.encode_special(&text)?);
    generate(model, tokenizer, &ids, params)
}
