//! `quantlab eval`: measure a model (perplexity).

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use quantlab::models::{perplexity_of_file, LlamaTokenizer, PplParams};

/// Evaluate a model.
#[derive(Args, Debug)]
pub struct EvalArgs {
    /// What to measure.
    #[command(subcommand)]
    pub what: EvalWhat,
}

/// The measurements.
#[derive(Subcommand, Debug)]
pub enum EvalWhat {
    /// Perplexity on a text file over non-overlapping windows (docs/perplexity.md): the file
    /// is tokenized once without BOS, cut into windows of --ctx tokens (tail dropped), and
    /// every token but each window's first is scored.
    Ppl(PplArgs),
    /// Sentence-embedding throughput and, against a reference model, the mean cosine
    /// similarity of the embeddings. The text is split into paragraphs at blank lines and
    /// into sentences after `.`, `!` or `?` followed by white space and a non-lower-case
    /// character (common abbreviations such as `Mr.` excepted).
    Embed(EmbedArgs),
}

/// Arguments of `eval ppl`.
#[derive(Args, Debug)]
pub struct PplArgs {
    /// Model: a .gguf file, a Hugging Face directory, or `smollm2` for the cached SmolLM2.
    #[arg(long, value_name = "PATH")]
    pub model: PathBuf,
    /// Text file: .txt, .jsonl or .parquet.
    #[arg(long, value_name = "FILE")]
    pub text: PathBuf,
    /// Field (jsonl) or column (parquet) holding the text.
    #[arg(long)]
    pub field: Option<String>,
    /// Tokens per window.
    #[arg(long, default_value_t = 512)]
    pub ctx: usize,
    /// Evaluate only the first N windows.
    #[arg(long, value_name = "N")]
    pub max_windows: Option<usize>,
    /// Print one JSON object (ppl, nll, tokens_scored, windows, seconds, tokens_per_second,
    /// peak_rss_mb, ...).
    #[arg(long)]
    pub json: bool,
}

/// Runs the verb.
pub fn run_eval(a: EvalArgs) -> Result<()> {
    match a.what {
        EvalWhat::Ppl(p) => run_ppl(p),
        EvalWhat::Embed(e) => run_embed(e),
    }
}

fn run_ppl(a: PplArgs) -> Result<()> {
    let path = crate::generate::resolve_model(&a.model)?;
    let model = quantlab::pipeline::export::load_model(&path)
        .with_context(|| format!("loading {}", path.display()))?;
    let tok = LlamaTokenizer::load(&path)?;
    let params = PplParams {
        ctx: a.ctx,
        max_windows: a.max_windows,
    };
    let r = perplexity_of_file(&model, &tok, &a.text, a.field.as_deref(), &params)?;
    if a.json {
        let mut v = serde_json::to_value(&r)?;
        if let Some(o) = v.as_object_mut() {
            o.remove("window_nll");
            o.insert("model".into(), path.display().to_string().into());
            o.insert("text".into(), a.text.display().to_string().into());
        }
        println!("{}", serde_json::to_string(&v)?);
    } else {
        println!(
            "ppl {:.4}  (nll {:.5}, {} windows of {} tokens, {} scored, {:.1} s, {:.0} tokens/s, peak RSS {} MiB)",
            r.ppl,
            r.nll,
            r.windows,
            r.ctx,
            r.tokens_scored,
            r.seconds,
            r.tokens_per_second,
            r.peak_rss_mb.map_or("?".into(), |m| format!("{m:.0}"))
        );
    }
    Ok(())
}

/// Arguments of `eval embed`.
#[derive(Args, Debug)]
pub struct EmbedArgs {
    /// Model: a sentence-transformers BERT directory, or `minilm` for the cached MiniLM.
    #[arg(long, value_name = "PATH")]
    pub model: PathBuf,
    /// Text file: .txt, .jsonl or .parquet.
    #[arg(long, value_name = "FILE")]
    pub text: PathBuf,
    /// Reference model directory (e.g. the unquantized one) for the cosine similarity.
    #[arg(long, value_name = "PATH")]
    pub reference: Option<PathBuf>,
    /// Field (jsonl) or column (parquet) holding the text.
    #[arg(long)]
    pub field: Option<String>,
    /// Sentences per batch.
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
    /// Truncate sentences to this many tokens (default: the model's max_seq_length, 256).
    #[arg(long)]
    pub max_len: Option<usize>,
    /// Embed only the first N sentences.
    #[arg(long, value_name = "N")]
    pub limit: Option<usize>,
    /// Print one JSON object (sentences, tokens, seconds, sentences_per_s, mean_cosine, ...).
    #[arg(long)]
    pub json: bool,
}

fn resolve_encoder(p: &std::path::Path) -> Result<PathBuf> {
    if p.as_os_str() == "minilm" && !p.exists() {
        let cache = quantlab::models::fetch::cache_dir()?;
        return Ok(quantlab::models::fetch::model_path(
            quantlab::models::fetch::KnownModel::MiniLM,
            &cache,
        ));
    }
    Ok(p.to_path_buf())
}

fn run_embed(a: EmbedArgs) -> Result<()> {
    let model = resolve_encoder(&a.model)?;
    let reference = a.reference.as_deref().map(resolve_encoder).transpose()?;
    let opts = quantlab::models::embed::EmbedOptions {
        batch_size: a.batch_size,
        max_len: a.max_len,
        limit: a.limit,
        field: a.field,
    };
    let r = quantlab::models::embed::eval_embed(&model, &a.text, reference.as_deref(), &opts)?;
    if a.json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        println!("{r}");
    }
    Ok(())
}
