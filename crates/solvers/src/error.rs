//! The error type of this crate.

/// What can go wrong in the layer solvers.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SolverError {
    /// An error from the number formats (non-finite values, group size, bits).
    #[error(transparent)]
    Grid(#[from] quantlab_grids::GridError),
    /// Any other invalid argument, named.
    #[error("invalid {option}: {detail}")]
    InvalidOption { option: String, detail: String },
    /// Shapes that do not fit together (e.g. a Hessian that is not `[in, in]`).
    #[error("shape mismatch in {what}: {detail}")]
    Shape { what: String, detail: String },
    /// The (damped) Hessian is not positive definite: the Cholesky factorization met a
    /// non-positive pivot at `column` (in quantization order) with absolute damping `damp`,
    /// after `retries` automatic retries with ten times more damping each.
    #[error("the Hessian is not positive definite (non-positive pivot at column {column}) even with damping {damp:e} after {retries} retries: raise --damp, or check the calibration inputs")]
    HessianNotPositiveDefinite {
        column: usize,
        damp: f64,
        retries: usize,
    },
    /// Every diagonal entry of the Hessian is zero: the inputs carried no signal, every
    /// column would be "dead" and the layer would be quantized to zero.
    #[error("the Hessian of `{what}` is all zero on its diagonal (no calibration signal: every input column is dead)")]
    ZeroHessian { what: String },
}

/// Result alias of this crate.
pub type Result<T, E = SolverError> = std::result::Result<T, E>;

/// Shorthand for a [`SolverError::Shape`].
pub(crate) fn shape_err(what: &str, detail: impl Into<String>) -> SolverError {
    SolverError::Shape {
        what: what.into(),
        detail: detail.into(),
    }
}

/// Check that an ndarray view holds only finite values; the error names `tensor`.
pub(crate) fn check_finite_view<'a, D: ndarray::Dimension>(
    tensor: &str,
    a: ndarray::ArrayView<'a, f32, D>,
) -> Result<()> {
    if let Some((index, &value)) = a.iter().enumerate().find(|(_, v)| !v.is_finite()) {
        return Err(quantlab_grids::GridError::NonFinite {
            tensor: tensor.into(),
            index,
            value,
        }
        .into());
    }
    Ok(())
}
