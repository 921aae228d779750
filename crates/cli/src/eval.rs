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
    /// KL divergence of a model's next-token distributions from a base model's (the
    /// quantized model against its source, as `llama-perplexity --kl-divergence`), on the
    /// windows `eval ppl` scores: mean KLD with its standard error, median, 90th and 99th
    /// percentile, top-1 token agreement, both perplexities and their ratio.
    Kld(KldArgs),
    /// Sentence-embedding throughput and, against a reference model, the mean cosine
    /// similarity of the embeddings. The text is split into paragraphs at blank lines and
    /// into sentences after `.`, `!` or `?` followed by white space and a non-lower-case
    /// character (common abbreviations such as `Mr.` excepted).
    Embed(EmbedArgs),
}

/// The text the decoder verbs score, and how it is cut into windows (docs/perplexity.md).
#[derive(Args, Debug)]
pub struct TextWindows {
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
}

impl TextWindows {
    fn params(&self) -> PplParams {
        PplParams {
            ctx: self.ctx,
            max_windows: self.max_windows,
        }
    }
}

/// A LLaMA-family model from `--model`-style paths (`smollm2` included).
pub(crate) fn load_llama(p: &std::path::Path) -> Result<(PathBuf, quantlab::models::LlamaModel)> {
    let path = crate::generate::resolve_model(p)?;
    let m = quantlab::pipeline::export::load_model(&path)
        .with_context(|| format!("loading {}", path.display()))?;
    Ok((path, m))
}

/// Arguments of `eval ppl`.
#[derive(Args, Debug)]
pub struct PplArgs {
    /// Model: a .gguf file, a Hugging Face directory, or `smollm2` for the cached SmolLM2.
    #[arg(long, value_name = "PATH")]
    pub model: PathBuf,
    /// The text and its windows.
    #[command(flatten)]
    pub windows: TextWindows,
    /// Print one JSON object (ppl, nll, tokens_scored, windows, seconds, tokens_per_second,
    /// peak_rss_mb, ...).
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `eval kld`.
#[derive(Args, Debug)]
pub struct KldArgs {
    /// The base: a model (.gguf file, Hugging Face directory, `smollm2`), or a file of base
    /// log-probabilities written by `--save-base`.
    #[arg(long, value_name = "PATH")]
    pub base: PathBuf,
    /// The model compared with the base (e.g. the quantized one). May be left out with
    /// `--save-base`, which then only stores the base.
    #[arg(long, value_name = "PATH")]
    pub model: Option<PathBuf>,
    /// The text and its windows.
    #[command(flatten)]
    pub windows: TextWindows,
    /// Store the base model's log-probabilities on these windows (f16, `windows x (ctx - 1)
    /// x vocab x 2` bytes) for later runs with `--base FILE`, as llama.cpp's
    /// `--kl-divergence-base`.
    #[arg(long, value_name = "FILE")]
    pub save_base: Option<PathBuf>,
    /// Print one JSON object (kld_mean, kld_err, kld_median, kld_p90, kld_p99, kld_max,
    /// top1_agreement, top1_err, ppl, ppl_base, ppl_ratio, ln_ppl_ratio, ...).
    #[arg(long)]
    pub json: bool,
}

/// Whether `--base` names a stored base rather than a model: a file that is not a GGUF.
fn is_saved_base(p: &std::path::Path) -> bool {
    p.is_file()
        && !p
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
}

fn run_kld(a: KldArgs) -> Result<()> {
    use quantlab::models::{kl_divergence, save_base, text, KldBase, SavedBase};
    let params = a.windows.params();
    if a.model.is_none() && a.save_base.is_none() {
        anyhow::bail!("--model: give the model to compare with the base (or --save-base FILE to only store the base)");
    }
    let saved = is_saved_base(&a.base);
    if saved && a.save_base.is_some() {
        anyhow::bail!(
            "--save-base: {} is already a stored base; give the base model to --base",
            a.base.display()
        );
    }
    // the tokenizer of the model compared (or of the base when only storing)
    let tok_src = crate::generate::resolve_model(a.model.as_deref().unwrap_or(&a.base))?;
    let tok = LlamaTokenizer::load(&tok_src)?;
    let w = &a.windows;
    let body = text::read_text(&w.text, w.field.as_deref())?;
    let tokens = tok.encode(&body)?;
    let mut out = serde_json::Map::new();
    out.insert("base".into(), a.base.display().to_string().into());
    out.insert("text".into(), w.text.display().to_string().into());
    let base_model = if saved {
        None
    } else {
        Some(load_llama(&a.base)?.1)
    };
    if let (Some(file), Some(b)) = (&a.save_base, &base_model) {
        let facts = save_base(b, &tokens, &params, file)?;
        if !a.json {
            println!(
                "stored the base's log-probabilities: {} ({} windows of {} tokens, {:.1} MB; base ppl {:.4})",
                facts.path,
                facts.windows,
                facts.ctx,
                facts.bytes as f64 / 1e6,
                facts.ppl
            );
        }
        out.insert("saved_base".into(), serde_json::to_value(&facts)?);
    }
    if let Some(mp) = &a.model {
        let (path, model) = load_llama(mp)?;
        let stored;
        let base = match &base_model {
            Some(b) => KldBase::Model(b),
            None => {
                stored = SavedBase::open(&a.base)?;
                KldBase::Saved(&stored)
            }
        };
        let r = kl_divergence(base, &model, &tokens, &params)?;
        out.insert("model".into(), path.display().to_string().into());
        if let serde_json::Value::Object(o) = serde_json::to_value(&r)? {
            out.extend(o);
        }
        if !a.json {
            println!(
                "KLD mean {:.6} ± {:.6}, median {:.6}, p90 {:.6}, p99 {:.6}, max {:.4}\n\
                 top-1 agreement {:.2}% ± {:.2}%\n\
                 ppl {:.4} against the base's {:.4}: ratio {:.4} (ln {:.5} ± {:.5})\n\
                 {} tokens scored ({} windows of {}), {:.1} s",
                r.kld_mean,
                r.kld_err,
                r.kld_median,
                r.kld_p90,
                r.kld_p99,
                r.kld_max,
                100.0 * r.top1_agreement,
                100.0 * r.top1_err,
                r.ppl,
                r.ppl_base,
                r.ppl_ratio,
                r.ln_ppl_ratio,
                r.ln_ppl_ratio_err,
                r.tokens_scored,
                r.windows,
                r.ctx,
                r.seconds
            );
        }
    }
    if a.json {
        println!(
            "{}",
            serde_json::to_string(&serde_json::Value::Object(out))?
        );
    }
    Ok(())
}

/// Runs the verb.
pub fn run_eval(a: EvalArgs) -> Result<()> {
    match a.what {
        EvalWhat::Ppl(p) => run_ppl(p),
        EvalWhat::Kld(k) => run_kld(k),
        EvalWhat::Embed(e) => run_embed(e),
    }
}

fn run_ppl(a: PplArgs) -> Result<()> {
    let (path, model) = load_llama(&a.model)?;
    let tok = LlamaTokenizer::load(&path)?;
    let w = &a.windows;
    let r = perplexity_of_file(&model, &tok, &w.text, w.field.as_deref(), &w.params())?;
    if a.json {
        let mut v = serde_json::to_value(&r)?;
        if let Some(o) = v.as_object_mut() {
            o.remove("window_nll");
            o.insert("model".into(), path.display().to_string().into());
            o.insert("text".into(), w.text.display().to_string().into());
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
