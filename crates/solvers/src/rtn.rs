//! Round-to-nearest on the same grids, with the solvers' report type (a thin wrapper over
//! [`quantlab_grids::quantize_rtn`]).
#![allow(non_snake_case)]

use crate::report::SolveReport;
use crate::Result;
use ndarray::ArrayView2;
use quantlab_grids::{quantize_rtn, FormatSpec, Granularity, QuantizedLinear};
use std::time::Instant;

/// RTN of `W [out, in]` onto `spec`. With a Hessian `H`, the report's `loss` is
/// `1/2 tr(D H D^T)` (D = W - Q), comparable with GPTQ's loss at zero damping.
///
/// ```
/// use ndarray::array;
/// use quantlab_grids::{FormatSpec, Granularity, UniformGrid};
/// let W = array![[0.1f32, -0.4, 0.35, 0.9]];
/// let spec = FormatSpec::Uniform(UniformGrid::new(4, false).unwrap());
/// let (lin, rep) = quantlab_solvers::rtn::rtn(W.view(), None, &spec, Granularity::PerChannel).unwrap();
/// // asymmetric 4-bit over [-0.4, 0.9]: step 1.3 / 15
/// let s = lin.scales[[0, 0]];
/// assert!((s - 1.3 / 15.0).abs() < 1e-6);
/// assert!((lin.dequantize()[[0, 1]] + 0.4).abs() <= s / 2.0 + 1e-6);
/// assert_eq!(rep.method, "rtn");
/// ```
pub fn rtn(
    W: ArrayView2<f32>,
    H: Option<ArrayView2<f32>>,
    spec: &FormatSpec,
    granularity: Granularity,
) -> Result<(QuantizedLinear, SolveReport)> {
    let t0 = Instant::now();
    let lin = quantize_rtn("weight", W, spec, granularity)?;
    let mut report = SolveReport::new("rtn", spec.build().name(), W.dim());
    if let Some(H) = H {
        let Q = lin.dequantize();
        report.loss = Some(0.5 * crate::metrics::output_error(W, Q.view(), H)?);
    }
    report.seconds = t0.elapsed().as_secs_f64();
    Ok((lin, report))
}

/// Importance-weighted RTN onto a ggml block grid (llama.cpp's `llama-quantize --imatrix`):
/// each block's scale is searched for the least `sum_k imp_k (w_k - q_k)^2` with `imp` the
/// importance of input column `k`, the diagonal of `H` when a Hessian is given (llama.cpp's
/// importance matrix is `diag(X^T X)` up to a constant). Without `H`, the plain llama.cpp
/// quantizer of the grid. The report's `loss` is `1/2 tr(D H D^T)` as in [`rtn`].
///
/// ```
/// use ndarray::Array2;
/// use quantlab_grids::GgmlGrid;
/// let W = Array2::from_shape_fn((2, 64), |(r, k)| ((r * 64 + k) as f32 * 0.37).sin());
/// let H = Array2::from_shape_fn((64, 64), |(i, j)| if i == j { 1.0 + (i % 5) as f32 } else { 0.0 });
/// let (plain, _) = quantlab_solvers::rtn::rtn_imatrix(W.view(), GgmlGrid::Q4_0, None).unwrap();
/// let (weighted, rep) = quantlab_solvers::rtn::rtn_imatrix(W.view(), GgmlGrid::Q4_0, Some(H.view())).unwrap();
/// let err = |q: &quantlab_grids::QuantizedLinear| {
///     let d = q.dequantize();
///     W.indexed_iter().map(|((r, k), x)| H[[k, k]] * (x - d[[r, k]]).powi(2)).sum::<f32>()
/// };
/// assert!(err(&weighted) <= err(&plain) * (1.0 + 1e-6));
/// assert_eq!(rep.method, "rtn-imatrix");
/// ```
pub fn rtn_imatrix(
    W: ArrayView2<f32>,
    grid: quantlab_grids::GgmlGrid,
    H: Option<ArrayView2<f32>>,
) -> Result<(QuantizedLinear, SolveReport)> {
    let t0 = Instant::now();
    let imp: Option<Vec<f32>> = H.map(|H| H.diag().iter().map(|v| v.max(0.0)).collect());
    let lin = quantlab_grids::ggml::quantize_ggml_weighted("weight", W, grid, imp.as_deref())?;
    let method = if H.is_some() { "rtn-imatrix" } else { "rtn" };
    let mut report = SolveReport::new(method, lin.spec.build().name(), W.dim());
    if let Some(H) = H {
        let Q = lin.dequantize();
        report.loss = Some(0.5 * crate::metrics::output_error(W, Q.view(), H)?);
    }
    report.seconds = t0.elapsed().as_secs_f64();
    Ok((lin, report))
}

/// [`rtn_imatrix`] with the importance given directly, one value per input column (an
/// importance matrix file's values, `mean(x_k^2)`, as `llama-quantize --imatrix` uses them);
/// the report's `loss` is then `1/2 sum_k imp_k (w_k - q_k)^2` summed over rows. Same codes as
/// [`rtn_imatrix`] with a Hessian whose diagonal is `imp` (a test checks it). Errors when
/// `imp` does not have one value per column.
pub fn rtn_imatrix_weights(
    W: ArrayView2<f32>,
    grid: quantlab_grids::GgmlGrid,
    imp: Option<&[f32]>,
) -> Result<(QuantizedLinear, SolveReport)> {
    let t0 = Instant::now();
    if let Some(imp) = imp {
        if imp.len() != W.ncols() {
            return Err(crate::error::shape_err(
                "rtn_imatrix_weights",
                format!(
                    "{} importance values for {} input columns",
                    imp.len(),
                    W.ncols()
                ),
            ));
        }
    }
    let clean: Option<Vec<f32>> = imp.map(|v| {
        v.iter()
            .map(|x| if x.is_finite() { x.max(0.0) } else { 0.0 })
            .collect()
    });
    let lin = quantlab_grids::ggml::quantize_ggml_weighted("weight", W, grid, clean.as_deref())?;
    let method = if imp.is_some() { "rtn-imatrix" } else { "rtn" };
    let mut report = SolveReport::new(method, lin.spec.build().name(), W.dim());
    if let Some(imp) = clean {
        let Q = lin.dequantize();
        let mut loss = 0f64;
        for (wr, qr) in W.rows().into_iter().zip(Q.rows()) {
            for ((w, q), c) in wr.iter().zip(qr.iter()).zip(&imp) {
                loss += *c as f64 * ((w - q) as f64).powi(2);
            }
        }
        report.loss = Some(0.5 * loss);
    }
    report.seconds = t0.elapsed().as_secs_f64();
    Ok((lin, report))
}
