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
}

/// Result alias of this crate.
pub type Result<T, E = CheckpointError> = std::result::Result<T, E>;
