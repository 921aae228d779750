//! The error type of the number-format crate.

/// What can go wrong when choosing or applying a number format.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GridError {
    /// A tensor holds NaN or infinite values; `tensor` names it.
    #[error("tensor `{tensor}` holds a non-finite value ({value}) at flat index {index}")]
    NonFinite {
        tensor: String,
        index: usize,
        value: f32,
    },
    /// Bits outside what the format supports.
    #[error("bits = {bits} is not supported by {format}: choose {allowed}")]
    UnsupportedBits {
        bits: u32,
        format: String,
        allowed: String,
    },
    /// A group size that cannot group the input columns (0).
    #[error("group size {group_size} cannot group the {columns} input columns of `{tensor}` (use a positive number of columns, or -1 for one group per row)")]
    GroupSize {
        tensor: String,
        group_size: i64,
        columns: usize,
    },
    /// Shapes that do not fit together.
    #[error("shape mismatch in {what}: {detail}")]
    Shape { what: String, detail: String },
    /// Any other invalid argument, named.
    #[error("invalid {option}: {detail}")]
    InvalidOption { option: String, detail: String },
}

/// Result alias of this crate.
pub type Result<T, E = GridError> = std::result::Result<T, E>;

/// Check that every value of `data` is finite; the error names `tensor`.
///
/// ```
/// use quantlab_grids::{check_finite, GridError};
/// assert!(check_finite("w", &[1.0, 2.0]).is_ok());
/// let e = check_finite("layers.0.q_proj", &[1.0, f32::NAN]).unwrap_err();
/// assert!(matches!(e, GridError::NonFinite { index: 1, .. }));
/// assert!(e.to_string().contains("layers.0.q_proj"));
/// ```
pub fn check_finite(tensor: &str, data: &[f32]) -> Result<()> {
    check_finite_iter(tensor, data.iter().copied())
}

/// [`check_finite`] over any sequence (e.g. a non-contiguous ndarray view).
pub(crate) fn check_finite_iter(tensor: &str, data: impl Iterator<Item = f32>) -> Result<()> {
    for (index, value) in data.enumerate() {
        if !value.is_finite() {
            return Err(GridError::NonFinite {
                tensor: tensor.to_string(),
                index,
                value,
            });
        }
    }
    Ok(())
}
