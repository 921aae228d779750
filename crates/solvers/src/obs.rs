//! Optimal Brain Surgeon (Hassibi & Stork 1993), one weight at a time, for one row `w` of a
//! layer with Hessian `H` (layer-wise objective of OBC/OBQ, Frantar & Alistarh 2022).
//!
//! Moving weight `q` to a target `t_q` (0 for pruning, the grid point for quantization) with
//! the other weights free: minimise `1/2 dw^T H dw` s.t. `e_q^T dw = t_q - w_q`. The
//! Lagrangian gives (Hassibi & Stork eq. (5) and (6); OBQ eq. (2)):
//!
//! ```text
//! dw  = -((w_q - t_q) / [H^-1]_qq) H^-1 e_q          (update)
//! L_q = (w_q - t_q)^2 / (2 [H^-1]_qq)                (saliency = the loss increase)
//! ```
//!
//! [`saliency`] and [`update`] are the single-step pieces. [`prune`] and [`quantize`] repeat
//! them greedily (least salient first) and, after each step, keep the fixed weight out of the
//! later updates by recomputing the inverse of `H` restricted to the still-free weights
//! explicitly (O(d^3) per step: the plain version; [`crate::obq`] gets the same inverse by an
//! O(d^2) downdate).
#![allow(non_snake_case)]

use crate::{Result, SolverError};
use ndarray::{Array1, Array2, ArrayView1, ArrayView2};
use quantlab_grids::{Format, GroupParams};

/// One greedy step: which weight, moved to what, at which predicted loss increase.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Step {
    /// Index of the weight fixed at this step.
    pub index: usize,
    /// The value it was fixed to (0 when pruning).
    pub target: f64,
    /// The saliency (predicted loss increase) when it was chosen.
    pub saliency: f64,
}

/// The result of a one-weight-at-a-time run on one row.
#[derive(Clone, Debug)]
pub struct Trace {
    /// The final row.
    pub w: Array1<f64>,
    /// The steps in order.
    pub steps: Vec<Step>,
    /// The true loss `1/2 (w - w0)^T H (w - w0)` of the final row.
    pub loss: f64,
}

/// Saliency of moving each `w_q` to `target_q` with the other weights free:
/// `(w_q - t_q)^2 / (2 [H^-1]_qq)`.
///
/// ```
/// use ndarray::array;
/// let w = array![1.0, -2.0];
/// let Hinv = array![[0.5, 0.1], [0.1, 0.25]];
/// let s = quantlab_solvers::obs::saliency(w.view(), array![0.0, 0.0].view(), Hinv.view());
/// assert!((s[0] - 1.0).abs() < 1e-12 && (s[1] - 8.0).abs() < 1e-12);
/// ```
pub fn saliency(w: ArrayView1<f64>, target: ArrayView1<f64>, Hinv: ArrayView2<f64>) -> Array1<f64> {
    Array1::from_shape_fn(w.len(), |q| {
        let e = w[q] - target[q];
        e * e / (2.0 * Hinv[[q, q]])
    })
}

/// Pruning saliency `w_q^2 / (2 [H^-1]_qq)`.
pub fn pruning_saliency(w: ArrayView1<f64>, Hinv: ArrayView2<f64>) -> Array1<f64> {
    saliency(w, Array1::zeros(w.len()).view(), Hinv)
}

/// The OBS update moving `w_q` to `target` optimally:
/// `dw = -((w_q - target) / [H^-1]_qq) H^-1 e_q`. `(w + dw)[q] == target`.
///
/// ```
/// use ndarray::array;
/// let w = array![1.0, -2.0];
/// let Hinv = array![[0.5, 0.1], [0.1, 0.25]];
/// let dw = quantlab_solvers::obs::update(w.view(), 0, 0.0, Hinv.view());
/// assert!((w[0] + dw[0]).abs() < 1e-12 && (dw[1] + 0.2).abs() < 1e-12);
/// ```
pub fn update(w: ArrayView1<f64>, q: usize, target: f64, Hinv: ArrayView2<f64>) -> Array1<f64> {
    let c = (w[q] - target) / Hinv[[q, q]];
    Hinv.column(q).mapv(|h| -c * h)
}

/// `1/2 dw^T H dw`.
pub(crate) fn quad_loss(dw: ArrayView1<f64>, H: ArrayView2<f64>) -> f64 {
    0.5 * dw.dot(&H.dot(&dw))
}

pub(crate) fn check_row(w: ArrayView1<f64>, H: ArrayView2<f64>) -> Result<()> {
    if H.dim() != (w.len(), w.len()) {
        return Err(crate::error::shape_err(
            "obs/obq row",
            format!("H is {:?} for a row of {}", H.dim(), w.len()),
        ));
    }
    Ok(())
}

/// The greedy choice shared by OBS and OBQ quantization: a free weight that has been pushed
/// outside its grid's range by more than half a step (`range[q]`) is taken
/// first, the farthest outside first (the OBC paper's outlier rule: such a weight would
/// otherwise keep absorbing updates it can never represent); otherwise the least salient.
/// `range = None` (pruning) is plain least-saliency. Returns the index into `cands`.
pub(crate) fn greedy_pick(
    cands: &[usize],
    w: impl Fn(usize) -> f64,
    s: impl Fn(usize) -> f64,
    range: Option<&[(f64, f64)]>,
) -> usize {
    if let Some(r) = range {
        let mut best: Option<(usize, f64)> = None;
        for (ci, &q) in cands.iter().enumerate() {
            let (lo, hi) = r[q];
            let out = (lo - w(q)).max(w(q) - hi);
            if out > 1e-9 * (hi - lo).abs() && best.is_none_or(|b| out > b.1) {
                best = Some((ci, out));
            }
        }
        if let Some((ci, _)) = best {
            return ci;
        }
    }
    let mut best = (0, f64::INFINITY);
    for (ci, &q) in cands.iter().enumerate() {
        if s(q) < best.1 {
            best = (ci, s(q));
        }
    }
    best.0
}

/// Per weight, the interval outside which its rounding error exceeds half a (mean) grid step:
/// `(lowest level - step/2, highest level + step/2)`.
pub(crate) fn level_ranges(format: &dyn Format, params: &[GroupParams]) -> Vec<(f64, f64)> {
    params
        .iter()
        .map(|&p| {
            let l = format.levels(p);
            let lo = l.iter().copied().fold(f32::INFINITY, f32::min) as f64;
            let hi = l.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
            // "outside" = rounding error above half a (mean) step, |w - q(w)| > step / 2
            let half = (hi - lo) / (2.0 * (l.len().max(2) - 1) as f64);
            (lo - half, hi + half)
        })
        .collect()
}

/// Greedy explicit-inverse loop: `steps` weights, target of weight q given its current value.
fn greedy_explicit(
    w0: ArrayView1<f64>,
    H: ArrayView2<f64>,
    steps: usize,
    target: impl Fn(usize, f64) -> f64,
    range: Option<&[(f64, f64)]>,
) -> Result<Trace> {
    check_row(w0, H)?;
    let d = w0.len();
    let mut w = w0.to_owned();
    let mut free: Vec<usize> = (0..d).collect();
    let mut out = Vec::new();
    for _ in 0..steps.min(d) {
        let m = free.len();
        let HF = Array2::from_shape_fn((m, m), |(i, j)| H[[free[i], free[j]]]);
        let HinvF = crate::linalg::spd_inverse_ref(HF.view()).map_err(|c| {
            SolverError::HessianNotPositiveDefinite {
                column: free[c],
                damp: 0.0,
                retries: 0,
            }
        })?;
        let wF = Array1::from_shape_fn(m, |i| w[free[i]]);
        let rangeF: Vec<(f64, f64)> =
            range.map_or(Vec::new(), |r| free.iter().map(|&q| r[q]).collect());
        let tF = Array1::from_shape_fn(m, |i| target(free[i], wF[i]));
        let s = saliency(wF.view(), tF.view(), HinvF.view());
        let local: Vec<usize> = (0..m).collect();
        let qi = greedy_pick(&local, |i| wF[i], |i| s[i], range.map(|_| &rangeF[..]));
        let dw = update(wF.view(), qi, tF[qi], HinvF.view());
        for i in 0..m {
            w[free[i]] += dw[i];
        }
        let q = free[qi];
        w[q] = tF[qi];
        out.push(Step {
            index: q,
            target: tF[qi],
            saliency: s[qi],
        });
        free.remove(qi);
    }
    let dw = &w - &w0;
    let loss = quad_loss(dw.view(), H);
    Ok(Trace {
        w,
        steps: out,
        loss,
    })
}

/// Prune `count` weights of the row `w` one at a time with OBS: least salient first, the
/// other free weights updated, the inverse of `H` over the free weights recomputed each step.
///
/// ```
/// use ndarray::array;
/// let w = array![1.0, 0.1, -0.5];
/// let H = array![[2.0, 0.5, 0.0], [0.5, 1.0, 0.3], [0.0, 0.3, 1.5]];
/// let t = quantlab_solvers::obs::prune(w.view(), H.view(), 1).unwrap();
/// assert_eq!(t.steps[0].index, 1);
/// assert_eq!(t.w[1], 0.0);
/// assert!((t.loss - t.steps[0].saliency).abs() < 1e-12);
/// ```
pub fn prune(w: ArrayView1<f64>, H: ArrayView2<f64>, count: usize) -> Result<Trace> {
    greedy_explicit(w, H, count, |_, _| 0.0, None)
}

/// Quantize every weight of the row `w` one at a time with OBS (greedy order, explicit
/// inverse each step): weight `q` goes to `format.quantize(w_q, params[q])` of its current
/// value; a weight pushed outside its grid's range goes first (OBC's outlier rule). The plain
/// version of [`crate::obq::quantize_row`].
pub fn quantize(
    w: ArrayView1<f64>,
    H: ArrayView2<f64>,
    format: &dyn Format,
    params: &[GroupParams],
) -> Result<Trace> {
    assert_eq!(params.len(), w.len(), "one GroupParams per weight");
    let range = level_ranges(format, params);
    greedy_explicit(
        w,
        H,
        w.len(),
        |q, v| format.quantize(v as f32, params[q]) as f64,
        Some(&range),
    )
}
