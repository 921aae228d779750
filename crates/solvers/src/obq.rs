//! Optimal Brain Quantization (Frantar & Alistarh 2022, "Optimal Brain Compression",
//! Algorithm 1 applied to quantization): every row of `W` independently, greedy order (the
//! weight with the least `(w_q - quant(w_q))^2 / [H^-1]_qq` first), OBS update of the free
//! weights, then remove `q` from the inverse Hessian by one Gaussian elimination step
//! (OBC eq. (3)):
//!
//! ```text
//! H^-1_{-q} = H^-1 - H^-1[:, q] H^-1[q, :] / [H^-1]_qq
//! ```
//!
//! A weight that earlier updates pushed outside its grid's range is quantized first (the OBC
//! paper's outlier rule), otherwise it keeps absorbing updates it cannot represent.
//!
//! O(d_col^2) per step, O(d_row d_col^3) for the layer: for small layers and teaching. Group
//! parameters are static (fitted on the original row before any step), since the order is
//! per row and greedy.
//!
//! Quality: without outlier channels the greedy order beats GPTQ's fixed order (as in the OBC
//! paper); on inputs with strong outlier channels it trails GPTQ and, far more, act-order,
//! because the greedy choice quantizes the outlier channels (largest `H_qq`, hence largest
//! saliency) LAST, when few free weights remain to absorb their errors, while act-order
//! quantizes them first. Pinned by `tests/obq_order.rs`; figures in `docs/solvers.md`.
#![allow(non_snake_case)]

use crate::gptq::{factor_with_retries, prepare};
use crate::obs::{check_row, greedy_pick, level_ranges, quad_loss, saliency, update, Step, Trace};
use crate::report::{SolveReport, SolverOutput};
use crate::Result;
use faer::Par;
use ndarray::{Array1, Array2, ArrayView1, ArrayView2};
use quantlab_grids::{Format, FormatSpec, Granularity, GroupParams, QuantizedLinear};
use rayon::prelude::*;
use std::time::Instant;

/// Remove weight `q` from the inverse Hessian of the free weights, in place (one Gaussian
/// elimination step): afterwards row and column `q` are zero, and the rest equals the
/// inverse of `H` with row and column `q` deleted.
///
/// ```
/// use ndarray::array;
/// let H = array![[2.0, 0.5, 0.1], [0.5, 1.0, 0.2], [0.1, 0.2, 3.0]];
/// let mut Hinv = quantlab_solvers::linalg::spd_inverse_ref(H.view()).unwrap();
/// quantlab_solvers::obq::downdate(&mut Hinv, 1);
/// let sub = array![[2.0, 0.1], [0.1, 3.0]];
/// let direct = quantlab_solvers::linalg::spd_inverse_ref(sub.view()).unwrap();
/// assert!((Hinv[[0, 0]] - direct[[0, 0]]).abs() < 1e-12 && (Hinv[[2, 0]] - direct[[1, 0]]).abs() < 1e-12);
/// assert!(Hinv[[1, 1]].abs() < 1e-12);
/// ```
pub fn downdate(Hinv: &mut Array2<f64>, q: usize) {
    let d = Hinv[[q, q]];
    let col = Hinv.column(q).to_owned();
    let n = Hinv.nrows();
    for i in 0..n {
        let ci = col[i] / d;
        if ci == 0.0 {
            continue;
        }
        for j in 0..n {
            Hinv[[i, j]] -= ci * col[j];
        }
    }
    Hinv.row_mut(q).fill(0.0);
    Hinv.column_mut(q).fill(0.0);
}

/// OBQ on one row, given the inverse Hessian `Hinv` (consumed) and `H` (for the loss).
pub fn quantize_row_with_inverse(
    w0: ArrayView1<f64>,
    H: ArrayView2<f64>,
    mut Hinv: Array2<f64>,
    format: &dyn Format,
    params: &[GroupParams],
) -> Result<Trace> {
    check_row(w0, H)?;
    assert_eq!(params.len(), w0.len(), "one GroupParams per weight");
    let d = w0.len();
    let mut w = w0.to_owned();
    let mut free = vec![true; d];
    let mut steps = Vec::with_capacity(d);
    let range = level_ranges(format, params);
    for _ in 0..d {
        let t = Array1::from_shape_fn(d, |q| format.quantize(w[q] as f32, params[q]) as f64);
        let s = saliency(w.view(), t.view(), Hinv.view());
        let cands: Vec<usize> = (0..d).filter(|&q| free[q]).collect();
        let q = cands[greedy_pick(&cands, |q| w[q], |q| s[q], Some(&range))];
        let sq = s[q];
        let dw = update(w.view(), q, t[q], Hinv.view());
        for i in 0..d {
            if free[i] {
                w[i] += dw[i];
            }
        }
        w[q] = t[q];
        free[q] = false;
        steps.push(Step {
            index: q,
            target: t[q],
            saliency: sq,
        });
        downdate(&mut Hinv, q);
    }
    let loss = quad_loss((&w - &w0).view(), H);
    Ok(Trace { w, steps, loss })
}

/// OBQ on one row with Hessian `H` (must be positive definite; no damping here).
///
/// ```
/// use ndarray::array;
/// use quantlab_grids::{Format, UniformGrid};
/// let g = UniformGrid::new(2, false).unwrap();
/// let w = array![0.3, -0.7, 0.55];
/// let p = g.fit(&[0.3, -0.7, 0.55]);
/// let H = array![[2.0, 0.8, 0.0], [0.8, 2.0, 0.8], [0.0, 0.8, 2.0]];
/// let t = quantlab_solvers::obq::quantize_row(w.view(), H.view(), &g, &[p; 3]).unwrap();
/// // every weight ends on the grid, and the steps' saliencies add up to the loss
/// for &v in t.w.iter() { assert!((g.quantize(v as f32, p) as f64 - v).abs() < 1e-6); }
/// let s: f64 = t.steps.iter().map(|s| s.saliency).sum();
/// assert!((s - t.loss).abs() < 1e-9);
/// ```
pub fn quantize_row(
    w: ArrayView1<f64>,
    H: ArrayView2<f64>,
    format: &dyn Format,
    params: &[GroupParams],
) -> Result<Trace> {
    check_row(w, H)?;
    let Hinv = crate::linalg::spd_inverse_ref(H).map_err(|c| {
        crate::SolverError::HessianNotPositiveDefinite {
            column: c,
            damp: 0.0,
            retries: 0,
        }
    })?;
    quantize_row_with_inverse(w, H, Hinv, format, params)
}

/// The knobs of layer-wise OBQ.
#[derive(Clone, Debug, PartialEq)]
pub struct ObqParams {
    /// Damping as a fraction of `mean(diag H)` (as GPTQ, 0.01).
    pub damp_percent: f64,
    /// Retries with 10x damping on a non-PD Hessian.
    pub max_damp_retries: usize,
    /// Parameter granularity (parameters are always static).
    pub granularity: Granularity,
    /// Rows in parallel on the rayon pool unless `Par::Seq`.
    pub par: Par,
}

impl Default for ObqParams {
    fn default() -> Self {
        Self {
            damp_percent: 0.01,
            max_damp_retries: 4,
            granularity: Granularity::Group(128),
            par: Par::rayon(0),
        }
    }
}

/// OBQ of a whole layer against any [`Format`]: dead columns, damping and retries as GPTQ;
/// each row solved by [`quantize_row_with_inverse`] with the damped Hessian. The report's
/// loss is `1/2 tr(D H_damped D^T)`.
pub fn obq_with_format(
    W: ArrayView2<f32>,
    H: ArrayView2<f32>,
    format: &dyn Format,
    params: &ObqParams,
) -> Result<SolverOutput> {
    let t0 = Instant::now();
    let prep = prepare(
        W,
        H,
        format,
        params.granularity,
        true,
        false,
        None,
        params.damp_percent,
    )?;
    let (out, n) = (prep.out, prep.n);
    let mut report = SolveReport::new("obq", format.name(), (out, n));
    let (Hd, Hinv) = factor_with_retries(
        &prep.Hp,
        params.damp_percent,
        params.max_damp_retries,
        |damp| {
            let mut Hd = prep.Hp.mapv(f64::from);
            for i in 0..n {
                Hd[[i, i]] += damp;
            }
            let Hinv = crate::linalg::spd_inverse_ref(Hd.view())?;
            Ok((Hd, Hinv))
        },
        &mut report,
    )?;
    let solve_row = |r: usize| -> Result<(Array1<f64>, f64)> {
        let w: Array1<f64> = prep.W0.row(r).mapv(|v| v as f64);
        let ps: Vec<GroupParams> = (0..n)
            .map(|k| {
                let g = prep.g_idx[k] as usize;
                GroupParams {
                    scale: prep.scales[[r, g]],
                    zero: prep.zeros[[r, g]],
                }
            })
            .collect();
        let t = quantize_row_with_inverse(w.view(), Hd.view(), Hinv.clone(), format, &ps)?;
        Ok((t.w, t.loss))
    };
    let rows: Vec<Result<(Array1<f64>, f64)>> = match params.par {
        Par::Seq => (0..out).map(solve_row).collect(),
        _ => (0..out).into_par_iter().map(solve_row).collect(),
    };
    let mut codes = Array2::<u8>::zeros((out, n));
    let mut q = Array2::<f32>::zeros((out, n));
    let mut loss = 0.0;
    for (r, row) in rows.into_iter().enumerate() {
        let (wq, l) = row?;
        loss += l;
        for k in 0..n {
            let p = GroupParams {
                scale: prep.scales[[r, prep.g_idx[k] as usize]],
                zero: prep.zeros[[r, prep.g_idx[k] as usize]],
            };
            let c = format.encode(wq[k] as f32, p);
            codes[[r, k]] = c;
            q[[r, k]] = format.decode(c, p);
        }
    }
    report.loss = Some(loss);
    report.dead_columns = prep.dead;
    report.seconds = t0.elapsed().as_secs_f64();
    Ok(SolverOutput {
        codes,
        scales: prep.scales,
        zeros: prep.zeros,
        g_idx: prep.g_idx,
        q,
        report,
    })
}

/// OBQ onto a [`FormatSpec`], returning the hand-off type and the report.
pub fn obq(
    W: ArrayView2<f32>,
    H: ArrayView2<f32>,
    spec: &FormatSpec,
    params: &ObqParams,
) -> Result<(QuantizedLinear, SolveReport)> {
    let f = spec.build();
    obq_with_format(W, H, f.as_ref(), params)?.into_linear(spec.clone(), params.granularity)
}
