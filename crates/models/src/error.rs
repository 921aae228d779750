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
}

/// Result alias of this crate.
pub type Result<T, E = ModelError> = std::result::Result<T, E>;
