//! The error type of this crate.

/// What can go wrong in the whole-model pipeline. Every variant names the file, tensor,
/// layer or option at fault.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PipelineError {
    /// An error from the number formats.
    #[error(transparent)]
    Grid(#[from] quantlab_grids::GridError),
    /// An error from a layer solver, with the layer it happened in.
    #[error("layer `{layer}`: {source}")]
    Solver {
        /// The linear being quantized.
        layer: String,
        /// The solver's error.
        source: quantlab_solvers::SolverError,
    },
    /// An error from the model code (loading, forward, tokenizer).
    #[error(transparent)]
    Model(#[from] quantlab_models::ModelError),
    /// An error from the checkpoint formats (reading or writing one), naming the file.
    #[error(transparent)]
    Checkpoint(#[from] quantlab_checkpoints::CheckpointError),
    /// A tensor operation failed.
    #[error("tensor operation failed in {context}: {detail}")]
    Tensor {
        /// What was being computed.
        context: String,
        /// candle's message.
        detail: String,
    },
    /// Any other invalid argument, named.
    #[error("invalid {option}: {detail}")]
    InvalidOption {
        /// The option (`--bits`, `--group-size`, ...).
        option: String,
        /// What is wrong and what to do.
        detail: String,
    },
    /// The model path is not a model this pipeline can load.
    #[error("{path} is not a model: {detail}")]
    NotAModel {
        /// The path given.
        path: String,
        /// Why.
        detail: String,
    },
    /// Reading or writing a file.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// A quantized model directory is malformed.
    #[error("{path}: {detail}")]
    Format {
        /// The file.
        path: String,
        /// What is wrong.
        detail: String,
    },
    /// The run was interrupted (Ctrl-C); nothing was written.
    #[error("interrupted: no output was written")]
    Interrupted,
}

impl PipelineError {
    /// Shorthand for [`PipelineError::InvalidOption`].
    pub fn option(option: impl Into<String>, detail: impl Into<String>) -> Self {
        Self::InvalidOption {
            option: option.into(),
            detail: detail.into(),
        }
    }

    pub(crate) fn io(path: &std::path::Path, source: std::io::Error) -> Self {
        Self::Io {
            path: path.display().to_string(),
            source,
        }
    }

    pub(crate) fn solver(layer: &str, source: quantlab_solvers::SolverError) -> Self {
        Self::Solver {
            layer: layer.to_string(),
            source,
        }
    }
}

/// Maps a candle error into [`PipelineError::Tensor`] with a context.
pub(crate) trait TensorContext<T> {
    fn ctx(self, context: &str) -> Result<T>;
}

impl<T> TensorContext<T> for std::result::Result<T, candle_core::Error> {
    fn ctx(self, context: &str) -> Result<T> {
        self.map_err(|e| PipelineError::Tensor {
            context: context.to_string(),
            detail: e.to_string(),
        })
    }
}

/// Result alias of this crate.
pub type Result<T, E = PipelineError> = std::result::Result<T, E>;
