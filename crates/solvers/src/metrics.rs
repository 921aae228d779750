//! Error metrics of a quantized layer.
//!
//! With `H = 2/n X^T X` (rows of `X` = inputs), `tr(D H D^T) = 2/n ||D X^T||_F^2` for
//! `D = W - Q`: the relative output error `||(W - Q) X^T||^2 / ||W X^T||^2` needs only `H`.
#![allow(non_snake_case)]

use crate::error::{check_finite_view, shape_err};
use crate::{Result, SolverError};
use faer::{Accum, MatMut, MatRef, Par};
use ndarray::ArrayView2;

/// `tr(D H D^T)` in f64 for row-major `D [rows, n]` and `H [n, n]`: one `[rows, n] x [n, n]`
/// product (faer reads the row-major operands in place), then the sum of `D .* (D H)`.
fn quad_trace(d: &[f64], h: &[f64], rows: usize, n: usize, par: Par) -> f64 {
    let mut dh = vec![0f64; rows * n];
    faer::linalg::matmul::matmul(
        MatMut::from_row_major_slice_mut(&mut dh, rows, n),
        Accum::Replace,
        MatRef::from_row_major_slice(d, rows, n),
        MatRef::from_row_major_slice(h, n, n),
        1.0,
        par,
    );
    d.iter().zip(&dh).map(|(a, b)| a * b).sum()
}

/// The values of `a` in f64, row-major.
pub(crate) fn f64_row_major(a: ArrayView2<f32>) -> Vec<f64> {
    a.iter().map(|&v| v as f64).collect()
}

/// `W - Q` in f64, row-major.
fn diff_row_major(W: ArrayView2<f32>, Q: ArrayView2<f32>) -> Vec<f64> {
    W.iter()
        .zip(Q.iter())
        .map(|(&w, &q)| w as f64 - q as f64)
        .collect()
}

/// [`output_error`] with `H` already in f64 (row-major, from [`f64_row_major`]) and the
/// shapes and values already checked: for callers that score many `Q` against one `H`.
pub(crate) fn output_error_f64(W: ArrayView2<f32>, Q: ArrayView2<f32>, h: &[f64]) -> f64 {
    quad_trace(
        &diff_row_major(W, Q),
        h,
        W.nrows(),
        W.ncols(),
        Par::rayon(0),
    )
}

fn check(W: ArrayView2<f32>, Q: ArrayView2<f32>, H: ArrayView2<f32>) -> Result<()> {
    if W.dim() != Q.dim() {
        return Err(shape_err(
            "rel_output_error",
            format!("W is {:?} but Q is {:?}", W.dim(), Q.dim()),
        ));
    }
    if H.dim() != (W.ncols(), W.ncols()) {
        return Err(shape_err(
            "rel_output_error",
            format!("H is {:?}, expected [{1}, {1}]", H.dim(), W.ncols()),
        ));
    }
    check_finite_view("weight", W)?;
    check_finite_view("quantized weight", Q)?;
    check_finite_view("hessian", H)?;
    Ok(())
}

/// `tr(D H D^T)` with `D = W - Q`, in f64 (`= 2/n ||(W - Q) X^T||^2`).
pub fn output_error(W: ArrayView2<f32>, Q: ArrayView2<f32>, H: ArrayView2<f32>) -> Result<f64> {
    check(W, Q, H)?;
    Ok(output_error_f64(W, Q, &f64_row_major(H)))
}

/// The relative output error `tr(D H D^T) / tr(W H W^T)`, `D = W - Q`
/// (`= ||(W - Q) X^T||^2 / ||W X^T||^2`). Computed in f64; errors when `tr(W H W^T)` is 0
/// (all-zero Hessian or weight) or on shape mismatch / non-finite values.
///
/// ```
/// use ndarray::array;
/// let W = array![[1.0f32, 2.0]];
/// let Q = array![[1.0f32, 1.0]];
/// let H = array![[2.0f32, 0.0], [0.0, 1.0]];
/// // D = [0, 1]: tr(D H D^T) = 1; tr(W H W^T) = 2 + 4 = 6
/// let e = quantlab_solvers::rel_output_error(W.view(), Q.view(), H.view()).unwrap();
/// assert!((e - 1.0 / 6.0).abs() < 1e-12);
/// ```
pub fn rel_output_error(W: ArrayView2<f32>, Q: ArrayView2<f32>, H: ArrayView2<f32>) -> Result<f64> {
    check(W, Q, H)?;
    let h = f64_row_major(H);
    let (rows, n) = W.dim();
    let num = quad_trace(&diff_row_major(W, Q), &h, rows, n, Par::rayon(0));
    let den = quad_trace(&f64_row_major(W), &h, rows, n, Par::rayon(0));
    if den.is_nan() || den <= 0.0 {
        return Err(SolverError::ZeroHessian {
            what: format!("rel_output_error (tr(W H W^T) = {den})"),
        });
    }
    Ok(num / den)
}
