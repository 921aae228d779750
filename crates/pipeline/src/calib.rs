//! Calibration data: token windows drawn from a text.
//!
//! The text (the shipped prose by default, a `.txt`/`.jsonl`/`.parquet` file, or a list of
//! strings from a notebook, joined with blank lines) is tokenized once without BOS; each of the
//! `nsamples` windows is `seqlen` consecutive tokens starting at a position drawn uniformly
//! from `0..=len - seqlen` with a seeded generator (the reference GPTQ's `get_wikitext2` draw),
//! so a seed gives the same windows on every run.

use std::path::PathBuf;

use ndarray::{Array2, ArrayView2};
use quantlab_models::{text, CaptureHook, LlamaModel, LlamaTokenizer, BLOCK_LINEARS};
use quantlab_solvers::hessian::Hessian;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};

use crate::{PipelineError, Result};

/// Where the calibration text comes from.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub enum Calibration {
    /// The prose shipped with quantlab-models ([`text::CALIBRATION_TEXT`]).
    #[default]
    Shipped,
    /// A `.txt`, `.jsonl` or `.parquet` file, with the jsonl field / parquet column.
    File {
        /// The file.
        path: PathBuf,
        /// Field or column (default `text`).
        field: Option<String>,
    },
    /// Strings given by the caller (like `GPTQConfig(dataset=[...])`), joined with blank
    /// lines before the windows are drawn.
    Texts(Vec<String>),
    /// No calibration: only for methods whose weights do not depend on the data (RTN, NF4,
    /// FP4, int8, FP8, and RTN on ggml grids without an importance matrix, as llama.cpp
    /// quantizes without `--imatrix`). No forward pass is run; per-layer errors are then
    /// measured on the weights. GPTQ and AWQ refuse it.
    None,
}

impl Calibration {
    /// A short description for reports.
    pub fn describe(&self) -> String {
        match self {
            Calibration::Shipped => {
                "shipped calibration prose (quantlab-models data/calib.txt)".into()
            }
            Calibration::File { path, .. } => path.display().to_string(),
            Calibration::Texts(t) => format!("{} strings given by the caller", t.len()),
            Calibration::None => "none (data-free)".into(),
        }
    }

    /// The whole text.
    pub fn text(&self) -> Result<String> {
        Ok(match self {
            Calibration::Shipped => text::CALIBRATION_TEXT.to_string(),
            Calibration::File { path, field } => text::read_text(path, field.as_deref())?,
            Calibration::Texts(t) => t.join("\n\n"),
            Calibration::None => {
                return Err(PipelineError::option(
                    "--calib",
                    "no calibration text was given",
                ))
            }
        })
    }
}

/// `nsamples` windows of `seqlen` tokens drawn from `tokens` with `seed` (see the module
/// documentation). Errors when the text is shorter than one window.
///
/// ```
/// let tokens: Vec<u32> = (0..100).collect();
/// let w = quantlab_pipeline::calib::draw_windows(&tokens, 4, 10, 0, "text").unwrap();
/// assert_eq!(w.len(), 4);
/// // each window is a run of consecutive tokens of the text
/// assert!(w.iter().all(|s| s.len() == 10 && s.windows(2).all(|p| p[1] == p[0] + 1)));
/// assert_eq!(w, quantlab_pipeline::calib::draw_windows(&tokens, 4, 10, 0, "text").unwrap());
/// ```
pub fn draw_windows(
    tokens: &[u32],
    nsamples: usize,
    seqlen: usize,
    seed: u64,
    what: &str,
) -> Result<Vec<Vec<u32>>> {
    if tokens.len() < seqlen {
        return Err(PipelineError::option(
            "--calib",
            format!(
                "{what} has {} tokens, fewer than one window of --seqlen {seqlen}: use a longer text or a smaller --seqlen",
                tokens.len()
            ),
        ));
    }
    let mut rng = StdRng::seed_from_u64(seed);
    let last = tokens.len() - seqlen;
    Ok((0..nsamples)
        .map(|_| {
            let i = rng.random_range(0..=last);
            tokens[i..i + seqlen].to_vec()
        })
        .collect())
}

/// Tokenizes the calibration text and draws the windows (none for [`Calibration::None`]).
pub fn calibration_windows(
    tokenizer: &LlamaTokenizer,
    calib: &Calibration,
    nsamples: usize,
    seqlen: usize,
    seed: u64,
) -> Result<Vec<Vec<u32>>> {
    if *calib == Calibration::None {
        return Ok(Vec::new());
    }
    let text = calib.text()?;
    let tokens = tokenizer.encode(&text)?;
    draw_windows(&tokens, nsamples, seqlen, seed, &calib.describe())
}

/// Full-precision Hessians (`2/n X^T X`, [`Hessian`]) of the inputs of the named block
/// linears (`model.layers.{i}.{BLOCK_LINEARS[k]}`) over `windows`, keyed by those names.
///
/// Nothing is quantized: the blocks run in full precision up to the last block named, so
/// several quantizers can be compared on the same inputs (studies, tests; the driver's own
/// sequential captures are in [`crate::quantize_model`]). Linears that share an input (q/k/v,
/// gate/up) share one accumulation. A name that is not a block linear of `model` is an error
/// naming it.
pub fn float_hessians(
    model: &LlamaModel,
    windows: &[Vec<u32>],
    names: &[String],
) -> Result<BTreeMap<String, Array2<f32>>> {
    // each name -> the name of the linear whose input it shares (q for k/v, gate for up)
    let mut input_of = BTreeMap::new();
    let mut last = 0;
    for name in names {
        let parsed = name
            .strip_prefix("model.layers.")
            .and_then(|r| r.split_once('.'))
            .and_then(|(b, s)| Some((b.parse::<usize>().ok()?, s)))
            .and_then(|(b, s)| Some((b, BLOCK_LINEARS.iter().position(|l| *l == s)?)))
            .filter(|&(b, _)| b < model.n_blocks());
        let Some((block, kind)) = parsed else {
            return Err(PipelineError::option(
                "linear",
                format!("`{name}` is not a block linear of this model (e.g. model.layers.0.mlp.down_proj)"),
            ));
        };
        let shared = shared_input(kind);
        input_of.insert(
            name.clone(),
            format!("model.layers.{block}.{}", BLOCK_LINEARS[shared]),
        );
        last = last.max(block);
    }
    let wanted: BTreeSet<String> = input_of.values().cloned().collect();
    let acc = accumulate_inputs(model, windows, &wanted, last, Hessian::new, |_| {})?;
    let finished: BTreeMap<String, Array2<f32>> =
        acc.into_iter().map(|(k, h)| (k, h.finish())).collect();
    Ok(input_of
        .into_iter()
        .filter_map(|(name, input)| Some((name, finished.get(&input)?.clone())))
        .collect())
}

/// The index in [`BLOCK_LINEARS`] of the linear whose input linear `kind` reads: q for q/k/v,
/// gate for gate/up, itself otherwise.
pub fn shared_input(kind: usize) -> usize {
    match kind {
        1 | 2 => 0,
        5 => 4,
        k => k,
    }
}

/// Runs every window through blocks `0..=last` in full precision and accumulates the inputs
/// of the linears named in `wanted` into one [`Hessian`] each (made by `new` from the input
/// width: full or diagonal); `on_window` is called after each window with the count so far.
pub fn accumulate_inputs(
    model: &LlamaModel,
    windows: &[Vec<u32>],
    wanted: &BTreeSet<String>,
    last: usize,
    new: fn(usize) -> Hessian,
    mut on_window: impl FnMut(usize),
) -> Result<BTreeMap<String, Hessian>> {
    let mut acc: BTreeMap<String, Hessian> = BTreeMap::new();
    for (i, w) in windows.iter().enumerate() {
        let mut err: Option<PipelineError> = None;
        {
            let mut hook = CaptureHook::new(wanted.iter().cloned(), |name: &str, x| {
                if err.is_some() {
                    return;
                }
                let cols = x.dims()[x.dims().len() - 1];
                let r = quantlab_models::with_f32(x, |v| {
                    let view = ArrayView2::from_shape((v.len() / cols, cols), v)
                        .expect("a contiguous [tokens, features] input");
                    acc.entry(name.to_string())
                        .or_insert_with(|| new(cols))
                        .add_batch(view, 1)
                        .map_err(|e| PipelineError::solver(name, e))
                });
                match r {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => err = Some(e),
                    Err(e) => err = Some(e.into()),
                }
            });
            let mut h = model.embed(&[w.as_slice()])?;
            for b in 0..=last {
                h = model.block_forward(b, &h, 0, None, Some(&mut hook))?;
            }
        }
        if let Some(e) = err {
            return Err(e);
        }
        on_window(i + 1);
    }
    Ok(acc)
}
