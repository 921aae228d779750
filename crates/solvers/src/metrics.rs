//! Error metrics of a quantized layer.
//!
//! With `H = 2/n X^T X` (rows of `X` = inputs), `tr(D H D^T) = 2/n ||D X^T||_F^2` for
//! `D = W - Q`: the relative output error `||(W - Q) X^T||^2 / ||W X^T||^2` needs only `H`.
#![allow(non_snake_case)]

use crate::error::{check_finite_view, shape_err};
use crate::{Result, SolverError};
use faer::{Accum, Mat, Par};
use ndarray::ArrayView2;

/// `tr(A H A^T)` in f64 (one `[out, in] x [in, in]` product).
fn quad_trace(A: &Mat<f64>, H: &Mat<f64>, par: Par) -> f64 {
    let mut AH = Mat::<f64>::zeros(A.nrows(), A.ncols());
    faer::linalg::matmul::matmul(
        AH.as_mut(),
        Accum::Replace,
        A.as_ref(),
        H.as_ref(),
        1.0,
        par,
    );
    let mut s = 0.0;
    for j in 0..A.ncols() {
        let (a, ah) = (A.col(j), AH.col(j));
        for i in 0..A.nrows() {
            s += a[i] * ah[i];
        }
    }
    s
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
    let D = Mat::<f64>::from_fn(W.nrows(), W.ncols(), |i, j| {
        W[[i, j]] as f64 - Q[[i, j]] as f64
    });
    let Hm = crate::linalg::to_mat_f64(H);
    Ok(quad_trace(&D, &Hm, Par::rayon(0)))
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
    let Hm = crate::linalg::to_mat_f64(H);
    let D = Mat::<f64>::from_fn(W.nrows(), W.ncols(), |i, j| {
        W[[i, j]] as f64 - Q[[i, j]] as f64
    });
    let Wm = Mat::<f64>::from_fn(W.nrows(), W.ncols(), |i, j| W[[i, j]] as f64);
    let num = quad_trace(&D, &Hm, Par::rayon(0));
    let den = quad_trace(&Wm, &Hm, Par::rayon(0));
    if den.is_nan() || den <= 0.0 {
        return Err(SolverError::ZeroHessian {
            what: format!("rel_output_error (tr(W H W^T) = {den})"),
        });
    }
    Ok(num / den)
}
