//! Importance matrices of a model over a text, as `llama-imatrix` computes them, and their
//! use by RTN on ggml's grids (`quantize --imatrix FILE`, `llama-quantize --imatrix`).
//!
//! The text is cut into consecutive chunks of `ctx` tokens (llama-imatrix's `-c`), up to
//! `chunks` of them (`--chunks`); each chunk runs through the full-precision model and, for
//! every block linear, the squared inputs are summed per input column, with the token count.
//! Linears that read the same input (q/k/v, gate/up) get the same statistics, as in
//! llama.cpp's files. The output head is not included (llama-imatrix leaves it out unless
//! `--process-output`). The file itself is [`quantlab_checkpoints::imatrix`].

use std::collections::BTreeSet;
use std::path::Path;

use quantlab_checkpoints::export::gguf::hf_to_gguf_name;
use quantlab_checkpoints::imatrix::Imatrix;
use quantlab_models::{LlamaModel, BLOCK_LINEARS};
use quantlab_solvers::hessian::Hessian;

use crate::calib::{accumulate_inputs, shared_input};
use crate::{PipelineError, Result};

/// The GGUF tensor name under which a linear's statistics are stored
/// (`model.layers.3.mlp.down_proj` -> `blk.3.ffn_down.weight`).
pub fn gguf_weight_name(linear: &str) -> Option<String> {
    hf_to_gguf_name(&format!("{linear}.weight"))
}

/// Reads an importance matrix (either llama.cpp layout); errors name the file.
pub fn read_imatrix(path: &Path) -> Result<Imatrix> {
    Imatrix::read(path).map_err(|e| PipelineError::option("--imatrix", e.to_string()))
}

/// The importance of each input column of `linear` (`model.layers.N.<module>`) from `m`,
/// checked against the linear's `in_features`: an error naming the file and the tensor when
/// the entry is missing or has another width (an importance matrix of another model).
pub fn importance_for(
    m: &Imatrix,
    file: &Path,
    linear: &str,
    in_features: usize,
) -> Result<Vec<f32>> {
    let name = gguf_weight_name(linear).ok_or_else(|| {
        PipelineError::option("--imatrix", format!("`{linear}` has no GGUF name"))
    })?;
    let imp = m.importance(&name).ok_or_else(|| {
        PipelineError::option(
            "--imatrix",
            format!(
                "{}: no entry \"{name}\" (for {linear}); the file holds {} entries, e.g. {:?}: an importance matrix of another model?",
                file.display(),
                m.entries.len(),
                m.entries.keys().next().map(String::as_str).unwrap_or("")
            ),
        )
    })?;
    if imp.len() != in_features {
        return Err(PipelineError::option(
            "--imatrix",
            format!(
                "{}: entry \"{name}\" has {} values but {linear} has {in_features} inputs: an importance matrix of another model?",
                file.display(),
                imp.len()
            ),
        ));
    }
    Ok(imp)
}

/// Consecutive chunks of `ctx` tokens of `tokens`, at most `chunks` of them (all whole
/// chunks when `None`); an error naming `what` when there is not one whole chunk.
pub fn chunk_windows(
    tokens: &[u32],
    ctx: usize,
    chunks: Option<usize>,
    what: &str,
) -> Result<Vec<Vec<u32>>> {
    if ctx < 2 {
        return Err(PipelineError::option(
            "--ctx",
            format!("{ctx}: needs at least 2 tokens per chunk"),
        ));
    }
    if tokens.len() < ctx {
        return Err(PipelineError::option(
            "--calib",
            format!(
                "{what} has {} tokens, fewer than one chunk of --ctx {ctx}",
                tokens.len()
            ),
        ));
    }
    let n = (tokens.len() / ctx).min(chunks.unwrap_or(usize::MAX));
    Ok(tokens
        .chunks_exact(ctx)
        .take(n)
        .map(<[u32]>::to_vec)
        .collect())
}

/// The importance matrix of every block linear of `model` over `windows` (full precision),
/// named by GGUF weight names, with `dataset` recorded as the text's name and the chunk size
/// taken from the windows. `on_chunk` is called after each window (progress).
pub fn compute_imatrix(
    model: &LlamaModel,
    windows: &[Vec<u32>],
    dataset: &str,
    on_chunk: impl FnMut(usize),
) -> Result<Imatrix> {
    let n_blocks = model.n_blocks();
    // the linears that read distinct inputs: q (for q/k/v), o, gate (for gate/up), down
    let readers = [0usize, 3, 4, 6];
    let wanted: BTreeSet<String> = (0..n_blocks)
        .flat_map(|b| {
            readers
                .iter()
                .map(move |&k| format!("model.layers.{b}.{}", BLOCK_LINEARS[k]))
        })
        .collect();
    let acc = accumulate_inputs(
        model,
        windows,
        &wanted,
        n_blocks.saturating_sub(1),
        Hessian::diagonal,
        on_chunk,
    )?;
    let chunk_size = windows.first().map_or(0, Vec::len) as u32;
    let mut m = Imatrix::new(vec![dataset.to_string()], chunk_size);
    m.chunk_count = windows.len() as u32;
    for b in 0..n_blocks {
        for (k, module) in BLOCK_LINEARS.iter().enumerate() {
            let src = format!("model.layers.{b}.{}", BLOCK_LINEARS[shared_input(k)]);
            let Some(h) = acc.get(&src) else { continue };
            let linear = format!("model.layers.{b}.{module}");
            let name = gguf_weight_name(&linear).expect("a block linear has a GGUF name");
            let sums: Vec<f32> = h.sum_sq().iter().map(|&v| v as f32).collect();
            m.insert(&name, sums, h.tokens() as f32);
        }
    }
    Ok(m)
}
