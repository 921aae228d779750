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
