//! # quantlab-solvers: layer-wise quantization solvers
//!
//! Solvers take a weight matrix `W [out, in]`, a Hessian `H = 2/n X^T X [in, in]` (or the
//! inputs) and a number format from `quantlab-grids`, and return a
//! [`quantlab_grids::QuantizedLinear`] with a report. They know nothing of models.

mod error;
pub use error::{Result, SolverError};
