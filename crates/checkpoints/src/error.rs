//! The error type of this crate.

/// What can go wrong in reading and writing checkpoints.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CheckpointError {
    /// An error from the number formats.
    #[error(transparent)]
    Grid(#[from] quantlab_grids::GridError),
    /// Any other invalid argument, named.
    #[error("invalid {option}: {detail}")]
    InvalidOption { option: String, detail: String },
    /// A tensor cannot be packed into (or unpacked from) a checkpoint format's layout.
    #[error("tensor `{tensor}` does not fit the {format} layout: {detail}")]
    Pack {
        /// The checkpoint format, e.g. `GPTQ v1` or `GGUF Q4_K`.
        format: String,
        /// The tensor at fault.
        tensor: String,
        /// What does not fit, and what would.
        detail: String,
    },
    /// The file could not be opened or read.
    #[error("{path}: I/O error: {source}")]
    Io {
        /// The file (or a label for an in-memory buffer).
        path: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The file's first bytes match none of the formats this crate reads.
    #[error("{path}: not a GGUF or safetensors file (first bytes: {magic})")]
    UnknownFormat {
        /// The file.
        path: String,
        /// The first bytes, in hex.
        magic: String,
    },
    /// The file is of a known format but one of its fields is invalid or truncated.
    #[error("{path}: {field}: {detail}")]
    Malformed {
        /// The file (or a label for an in-memory buffer).
        path: String,
        /// The field or tensor at fault, e.g. `metadata key "general.alignment"` or
        /// `tensor "blk.0.attn_q.weight"`.
        field: String,
        /// What is wrong with it.
        detail: String,
    },
}

impl CheckpointError {
    /// Shorthand for [`CheckpointError::Malformed`].
    pub(crate) fn malformed(
        path: &str,
        field: impl Into<String>,
        detail: impl Into<String>,
    ) -> Self {
        CheckpointError::Malformed {
            path: path.to_string(),
            field: field.into(),
            detail: detail.into(),
        }
    }

    /// Shorthand for [`CheckpointError::Io`].
    pub(crate) fn io(path: &str, source: std::io::Error) -> Self {
        CheckpointError::Io {
            path: path.to_string(),
            source,
        }
    }
}

/// Result alias of this crate.
pub type Result<T, E = CheckpointError> = std::result::Result<T, E>;
