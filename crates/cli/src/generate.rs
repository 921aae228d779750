//! `quantlab generate`: chat-templated text generation with a LLaMA-style decoder.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use quantlab::models::{generate_chat, GenerateParams, LlamaTokenizer};

/// Generate a reply to a prompt: the prompt is wrapped in the model's chat template (GGUF
/// `tokenizer.chat_template` or `tokenizer_config.json`) as one user message, then decoded
/// greedily at temperature 0 (sampled otherwise) until an end-of-sequence token or
/// --max-tokens.
#[derive(Args, Debug)]
pub struct GenerateArgs {
    /// Model: a .gguf file, a Hugging Face directory, or `smollm2` for the cached SmolLM2.
    #[arg(long, value_name = "PATH")]
    pub model: PathBuf,
    /// The user message.
    #[arg(long)]
    pub prompt: String,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 128)]
    pub max_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    /// Seed of the sampler.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Send the prompt as is (no chat template, special tokens recognised).
    #[arg(long)]
    pub raw: bool,
    /// Print one JSON object (text, tokens, timing) instead of the text.
    #[arg(long)]
    pub json: bool,
}

/// Resolves a known model's name (`smollm2`, `minilm`: `quantlab fetch` puts them in the cache)
/// to its cached path when no file of that name exists; any other value is a path.
pub fn resolve_model(model: &std::path::Path) -> Result<PathBuf> {
    use quantlab::models::fetch::{cache_dir, model_path, KnownModel};
    if !model.exists() {
        if let Some(k) = KnownModel::ALL
            .into_iter()
            .find(|k| model.as_os_str() == k.name())
        {
            return Ok(model_path(k, &cache_dir()?));
        }
    }
    Ok(model.to_path_buf())
}

/// Runs the verb.
pub fn run_generate(a: GenerateArgs) -> Result<()> {
    let path = resolve_model(&a.model)?;
    let model = quantlab::pipeline::export::load_model(&path)
        .with_context(|| format!("loading {}", path.display()))?;
    let tok = LlamaTokenizer::load(&path)?;
    let params = GenerateParams {
        max_tokens: a.max_tokens,
        temperature: a.temperature,
        seed: a.seed,
        stop_at_eos: true,
    };
    let out = if a.raw {
        let ids = tok.encode_special(&a.prompt)?;
        quantlab::models::generate(&model, &tok, &ids, &params)?
    } else {
        generate_chat(&model, &tok, &a.prompt, &params)?
    };
    if a.json {
        println!("{}", serde_json::to_string(&out)?);
    } else {
        println!("{}", out.text);
    }
    Ok(())
}
