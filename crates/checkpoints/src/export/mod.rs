//! Whole-checkpoint writers and readers built on the packers of [`crate::pack`].
//!
//! * [`gguf`]: a GGUF v3 writer (metadata copied from a source GGUF, tensors in F32, F16,
//!   BF16 or any ggml block type, llama's q/k row permutation re-applied, atomic write),
//!   the bridge [`gguf::blocks_from_quantized`] from a [`quantlab_grids::QuantizedLinear`] on
//!   a [`quantlab_grids::GgmlGrid`] to the exact block bytes, and RTN / importance-weighted
//!   quantizers of dense tensors;
//! * [`hf`]: Hugging Face directories in the GPTQ (v1 / v2), AWQ GEMM, bitsandbytes 4-bit
//!   (NF4 / FP4, optionally double-quantized) and LLM.int8 layouts, sharded safetensors,
//!   written atomically;
//! * [`read`]: the inverse of [`hf`]: any such directory (ours or a peer's) back to
//!   dequantized f32 weights.

pub mod gguf;
pub mod hf;
pub mod read;

use crate::{CheckpointError, Result};
use std::path::{Path, PathBuf};

/// `path` with `suffix` appended to its file name (`model.gguf` -> `model.gguf.tmp`).
pub(crate) fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(suffix);
    path.with_file_name(name)
}

/// Shorthand for an I/O error naming `path`.
pub(crate) fn io_at(path: &Path, e: std::io::Error) -> CheckpointError {
    CheckpointError::Io {
        path: path.display().to_string(),
        source: e,
    }
}

/// Shorthand for [`CheckpointError::InvalidOption`].
pub(crate) fn invalid(option: impl Into<String>, detail: impl Into<String>) -> CheckpointError {
    CheckpointError::InvalidOption {
        option: option.into(),
        detail: detail.into(),
    }
}

/// Writes `bytes` to `path` atomically: a temporary file beside it, flushed, then renamed.
pub(crate) fn write_atomic(
    path: &Path,
    write: impl FnOnce(&mut dyn std::io::Write) -> Result<()>,
) -> Result<()> {
    use std::io::Write;
    let tmp = sibling(path, &format!(".tmp{}", std::process::id()));
    let result = (|| {
        let f = std::fs::File::create(&tmp).map_err(|e| io_at(&tmp, e))?;
        let mut w = std::io::BufWriter::with_capacity(1 << 20, f);
        write(&mut w)?;
        w.flush().map_err(|e| io_at(&tmp, e))?;
        let f = w.into_inner().map_err(|e| io_at(&tmp, e.into_error()))?;
        f.sync_all().map_err(|e| io_at(&tmp, e))?;
        std::fs::rename(&tmp, path).map_err(|e| io_at(path, e))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}
