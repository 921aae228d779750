//! `quantlab imatrix`: an importance matrix of a model over a text, in llama.cpp's formats.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, ValueEnum};
use quantlab::checkpoints::imatrix::ImatrixFormat;
use quantlab::models::{text, LlamaTokenizer};
use quantlab::pipeline::imatrix::{chunk_windows, compute_imatrix};

/// The file layout written.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum OutputFormat {
    /// GGUF (`.in_sum2` / `.counts` tensors), llama.cpp's default.
    Gguf,
    /// The legacy `.dat` layout.
    Dat,
}

/// Arguments of `imatrix`.
#[derive(Args, Debug)]
pub struct ImatrixArgs {
    /// Model: a .gguf file, a Hugging Face directory, or `smollm2` for the cached SmolLM2.
    #[arg(long, short = 'm', value_name = "PATH")]
    pub model: PathBuf,
    /// Calibration text (.txt, .jsonl, .parquet), or `shipped` for the shipped prose
    /// (llama-imatrix's `-f`).
    #[arg(long, short = 'f', value_name = "FILE")]
    pub calib: PathBuf,
    /// Field (jsonl) or column (parquet) of the text.
    #[arg(long)]
    pub calib_field: Option<String>,
    /// Tokens per chunk (llama-imatrix's `-c`).
    #[arg(long, short = 'c', default_value_t = 512)]
    pub ctx: usize,
    /// At most N consecutive chunks of the text (default: all whole chunks).
    #[arg(long, value_name = "N")]
    pub chunks: Option<usize>,
    /// Output file (written atomically).
    #[arg(long, short = 'o', value_name = "FILE")]
    pub out: PathBuf,
    /// Layout: gguf (default, as llama-imatrix writes) or dat (legacy).
    #[arg(long, value_enum, default_value_t = OutputFormat::Gguf)]
    pub output_format: OutputFormat,
    /// Print one JSON object (out, entries, chunks, chunk_size, tokens, seconds).
    #[arg(long)]
    pub json: bool,
}

/// Runs the verb.
pub fn run_imatrix(a: ImatrixArgs) -> Result<()> {
    let (path, model) = crate::eval::load_llama(&a.model)?;
    let tok = LlamaTokenizer::load(&path)?;
    let (body, dataset) = if a.calib.as_os_str() == "shipped" {
        (
            text::CALIBRATION_TEXT.to_string(),
            "shipped calib.txt".to_string(),
        )
    } else {
        let t = text::read_text(&a.calib, a.calib_field.as_deref())
            .with_context(|| format!("--calib {}", a.calib.display()))?;
        (t, a.calib.display().to_string())
    };
    let tokens = tok.encode(&body)?;
    let windows = chunk_windows(&tokens, a.ctx, a.chunks, &dataset)?;
    let t0 = std::time::Instant::now();
    let n = windows.len();
    let quiet = a.json;
    let m = compute_imatrix(&model, &windows, &dataset, |i| {
        if !quiet && (i % 16 == 0 || i == n) {
            eprintln!(
                "imatrix: {i}/{n} chunks ({:.0} s)",
                t0.elapsed().as_secs_f64()
            );
        }
    })?;
    let fmt = match a.output_format {
        OutputFormat::Gguf => ImatrixFormat::Gguf,
        OutputFormat::Dat => ImatrixFormat::Legacy,
    };
    m.write(&a.out, fmt)?;
    let secs = t0.elapsed().as_secs_f64();
    if a.json {
        println!(
            "{}",
            serde_json::json!({
                "out": a.out.display().to_string(),
                "format": format!("{:?}", a.output_format).to_lowercase(),
                "entries": m.entries.len(),
                "chunks": n,
                "chunk_size": a.ctx,
                "tokens": n * a.ctx,
                "seconds": secs,
            })
        );
    } else {
        println!(
            "wrote {} ({} entries, {n} chunks of {} tokens, {:.1} s)",
            a.out.display(),
            m.entries.len(),
            a.ctx,
            secs
        );
    }
    Ok(())
}
