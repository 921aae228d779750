//! What every solver returns: the quantized parts and a report.

use ndarray::Array2;
use quantlab_grids::{FormatSpec, Granularity, QuantizedLinear};
use serde::Serialize;

/// One automatic damping retry after a non-positive pivot.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct DampRetry {
    /// The damping fraction (of `mean(diag H)`) that failed.
    pub damp_percent: f64,
    /// The absolute damping `lambda` that failed.
    pub damp: f64,
    /// The column (in quantization order) where the factorization met a non-positive pivot.
    pub column: usize,
}

/// The report of one layer solve (same type for RTN, GPTQ, OBQ).
#[derive(Clone, Debug, Serialize)]
pub struct SolveReport {
    /// `rtn`, `gptq`, `gptq-ref`, `obq`.
    pub method: String,
    /// The format's name (e.g. `int4-sym`).
    pub format: String,
    /// `(out, in)`.
    pub shape: (usize, usize),
    /// The method's own loss: for GPTQ/OBQ `sum (w - q)^2 / (2 [U]_pp^2)` over every weight,
    /// which equals `1/2 tr(D H_damped D^T)` exactly (D = W - Q, `H_damped` = the Hessian the
    /// solver factorized, dead columns fixed). For RTN with a Hessian, `1/2 tr(D H D^T)`;
    /// `None` without one.
    pub loss: Option<f64>,
    /// The damping fraction finally used (after retries).
    pub damp_percent: f64,
    /// The absolute damping `lambda = damp_percent * mean(diag H)` finally used.
    pub damp: f64,
    /// Every retry with more damping, in order.
    pub damp_retries: Vec<DampRetry>,
    /// Number of dead input columns (`diag H == 0`), quantized to 0.
    pub dead_columns: usize,
    /// Wall-clock seconds of the solve.
    pub seconds: f64,
    /// The quantization order (position -> original column), when not the natural one.
    pub order: Option<Vec<usize>>,
    /// Seconds per phase (`factor`, `sweep`, `lazy_gemm`, ...), where the solver measures them.
    pub phases: Vec<(String, f64)>,
}

impl SolveReport {
    pub(crate) fn new(method: &str, format: String, shape: (usize, usize)) -> Self {
        Self {
            method: method.into(),
            format,
            shape,
            loss: None,
            damp_percent: 0.0,
            damp: 0.0,
            damp_retries: Vec::new(),
            dead_columns: 0,
            seconds: 0.0,
            order: None,
            phases: Vec::new(),
        }
    }
}

/// The parts of a quantized layer as a solver produced them against a `&dyn Format`, with
/// the dequantized weight and the report.
///
/// `codes[[r, k]]` is in the ORIGINAL column order; its group is `g_idx[k]`, with parameters
/// `scales[[r, g_idx[k]]]`, `zeros[[r, g_idx[k]]]` (the [`QuantizedLinear`] convention).
#[derive(Clone, Debug)]
pub struct SolverOutput {
    /// Codes `[out, in]`, original column order.
    pub codes: Array2<u8>,
    /// Scales `[out, groups]`.
    pub scales: Array2<f32>,
    /// Zero points `[out, groups]`.
    pub zeros: Array2<f32>,
    /// Group of each input column.
    pub g_idx: Vec<u32>,
    /// The dequantized weight `[out, in]` (what the solver's loss refers to).
    pub q: Array2<f32>,
    /// The report.
    pub report: SolveReport,
}

impl SolverOutput {
    /// Package as the workspace hand-off type; `spec` must describe the format the solver
    /// ran with.
    pub fn into_linear(
        self,
        spec: FormatSpec,
        granularity: Granularity,
    ) -> crate::Result<(QuantizedLinear, SolveReport)> {
        let lin = QuantizedLinear::from_parts(
            spec,
            granularity,
            self.codes,
            self.scales,
            self.zeros,
            self.g_idx,
        )?;
        Ok((lin, self.report))
    }
}
