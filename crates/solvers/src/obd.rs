//! Optimal Brain Damage (LeCun, Denker, Solla 1990): the Hessian taken as diagonal.
//!
//! Saliency of moving `w_q` to `t_q` (0 for pruning): `1/2 H_qq (w_q - t_q)^2` (LeCun et al.
//! eq. (5) with the gradient term zero at a converged model). No other weight is updated, so
//! one-at-a-time OBD is "sort by saliency"; its quantization result is plain RTN. The traces
//! report the diagonal prediction per step and the true loss under the full `H`, to show the
//! gap that OBS closes.
#![allow(non_snake_case)]

use crate::obs::{check_row, quad_loss, Step, Trace};
use crate::Result;
use ndarray::{Array1, ArrayView1, ArrayView2};
use quantlab_grids::{Format, GroupParams};

/// `1/2 H_qq (w_q - t_q)^2` for every weight.
///
/// ```
/// use ndarray::array;
/// let s = quantlab_solvers::obd::saliency(array![1.0, -2.0].view(), array![0.0, 0.0].view(), array![4.0, 1.0].view());
/// assert!((s[0] - 2.0).abs() < 1e-12 && (s[1] - 2.0).abs() < 1e-12);
/// ```
pub fn saliency(
    w: ArrayView1<f64>,
    target: ArrayView1<f64>,
    H_diag: ArrayView1<f64>,
) -> Array1<f64> {
    Array1::from_shape_fn(w.len(), |q| {
        let e = w[q] - target[q];
        0.5 * H_diag[q] * e * e
    })
}

/// Pruning saliency `1/2 H_qq w_q^2`.
pub fn pruning_saliency(w: ArrayView1<f64>, H_diag: ArrayView1<f64>) -> Array1<f64> {
    saliency(w, Array1::zeros(w.len()).view(), H_diag)
}

fn run(w0: ArrayView1<f64>, H: ArrayView2<f64>, count: usize, t: Array1<f64>) -> Result<Trace> {
    check_row(w0, H)?;
    let s = saliency(w0, t.view(), H.diag());
    let mut order: Vec<usize> = (0..w0.len()).collect();
    order.sort_by(|&a, &b| s[a].total_cmp(&s[b]));
    let mut w = w0.to_owned();
    let steps = order
        .into_iter()
        .take(count)
        .map(|q| {
            w[q] = t[q];
            Step {
                index: q,
                target: t[q],
                saliency: s[q],
            }
        })
        .collect();
    let loss = quad_loss((&w - &w0).view(), H);
    Ok(Trace { w, steps, loss })
}

/// Prune the `count` least salient weights of `w` (no compensation).
///
/// ```
/// use ndarray::array;
/// let H = array![[4.0, 1.0], [1.0, 1.0]];
/// let t = quantlab_solvers::obd::prune(array![1.0, -1.5].view(), H.view(), 1).unwrap();
/// assert_eq!(t.steps[0].index, 1); // 1/2*1*2.25 < 1/2*4*1
/// assert!((t.loss - 1.125).abs() < 1e-12);
/// ```
pub fn prune(w: ArrayView1<f64>, H: ArrayView2<f64>, count: usize) -> Result<Trace> {
    run(w, H, count, Array1::zeros(w.len()))
}

/// Quantize every weight in OBD order (ascending saliency); the result equals RTN.
pub fn quantize(
    w: ArrayView1<f64>,
    H: ArrayView2<f64>,
    format: &dyn Format,
    params: &[GroupParams],
) -> Result<Trace> {
    assert_eq!(params.len(), w.len(), "one GroupParams per weight");
    let t = Array1::from_shape_fn(w.len(), |q| format.quantize(w[q] as f32, params[q]) as f64);
    run(w, H, w.len(), t)
}
