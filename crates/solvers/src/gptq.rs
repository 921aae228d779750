//! GPTQ (Frantar, Ashkboos, Hoefler, Alistarh 2022, "GPTQ: Accurate Post-Training
//! Quantization for Generative Pre-trained Transformers", Algorithm 1).
//!
//! Both versions quantize the columns of `W [out, in]` in one order shared by all rows. For
//! column `p` (in quantization order) with `U` the upper Cholesky factor of `H^-1`
//! (`H^-1 = U^T U`, eq. (5) of the paper: the rows of the OBS inverse needed at each step),
//! `d = U[p, p]`:
//!
//! ```text
//! q       = quant(W[:, p])
//! Err[:,p]= (W[:, p] - q) / d                 (Algorithm 1, line "E")
//! W[:, p:]-= Err[:, p] U[p, p:]               (the OBS update, eq. (3) in Cholesky form)
//! loss   += Err[:, p]^2 / 2
//! ```
//!
//! * [`gptq_reference`] does exactly this, one column at a time, in f64 with plain loops and
//!   the factor computed literally as the reference code does (Cholesky of `H`, inverse,
//!   Cholesky of the inverse). Group parameters are fitted from the fully updated `W` when
//!   the sweep reaches a group.
//! * [`gptq`] / [`gptq_with_format`] are the fast blocked version: lazy batch updates
//!   (Algorithm 1: inside a block of `B` columns the updates stay in the block, `W1`; at the
//!   block end one GEMM `W[:, i2:] -= Err1 U[i1:i2, i2:]`), the factor by one Cholesky of the
//!   reversed `H` and one triangular inverse ([`crate::linalg::upper_cholesky_of_inverse`]),
//!   faer GEMMs, rows split over threads for the in-block sweep (rows are independent), and a
//!   second level of lazy batching inside each block (rank-1 updates within sub-blocks of 16
//!   columns, one small GEMM per sub-block). The sweep runs in f32, the factorization in f64.
//!   On an ill-conditioned `H` the f32 sweep can round a weight lying on a grid boundary
//!   differently from the f64 reference (and that row then diverges slightly); so does any
//!   f32 implementation, the reference `gptq.py` included.
//!
//! Conventions shared with the reference GPTQ (`gptq.py`): dead columns (`diag H == 0`) get
//! `H_ii = 1` and `W[:, i] = 0`; damping `lambda = damp_percent * mean(diag H)` added to the
//! diagonal (here retried with 10x more damping on a non-PD Hessian, every retry reported);
//! act-order = columns by descending `diag H` (stable sort); group parameters found when the
//! sweep reaches a group's first column, from the outer `W` which has received the lazy
//! updates of earlier blocks but not the in-block updates of the current one
//! ([`GptqParams::group_params_from_outer_w`], on by default; off = from the fully updated
//! `W`, which equals [`gptq_reference`] for every block size); static groups = parameters of
//! every group fitted from the original `W` (after zeroing dead columns) before any update.
//!
//! Formats whose groups are fitted together ([`Format::fit_span`]: ggml's K super-blocks of
//! 256 columns, whose sub-block scales share one f16 `d`) are fitted one span at a time: when
//! the sweep reaches a span's first column, the parameters of all its groups are fitted
//! together ([`Format::fit_groups`]) from the same `W` a group would be fitted from (with
//! static groups: from the original `W`, before the sweep); then each column is rounded to
//! its group's levels as usual. Such formats need groups of their sub-block length and rows
//! of whole spans (an error otherwise).
//!
//! Groups of `g` columns need not divide `in`: as in the reference and every GPTQ checkpoint
//! there are `ceil(in / g)` groups, the last one `in - (G - 1) g` columns wide; group `gi`
//! holds the quantization positions `p` with `p / g == gi`, so with act-order
//! `g_idx[k] = (position of column k) / g` (the short group holds the last positions).
#![allow(non_snake_case)]

use crate::error::{check_finite_view, shape_err};
use crate::report::{DampRetry, SolveReport, SolverOutput};
use crate::{Result, SolverError};
use faer::{Accum, Mat, MatMut, MatRef, Par};
use ndarray::linalg::general_mat_mul;
use ndarray::{s, Array2, ArrayView2, ArrayViewMut2, Axis, ShapeBuilder};
use quantlab_grids::{Format, FormatSpec, Granularity, GroupParams, QuantizedLinear};
use rayon::prelude::*;
use std::time::Instant;

/// The knobs of GPTQ, with the reference defaults.
#[derive(Clone, Debug, PartialEq)]
pub struct GptqParams {
    /// Columns per lazy batch (reference `blocksize`, 128).
    pub block_size: usize,
    /// Damping as a fraction of `mean(diag H)` (reference `percdamp` / `damp_percent`, 0.01).
    pub damp_percent: f64,
    /// Retries after a non-positive pivot, each with 10x the damping (0 -> 0.01); 4 by
    /// default (0.01 -> 0.1 -> 1 -> 10 -> 100).
    pub max_damp_retries: usize,
    /// Quantize columns by descending `diag H` (`desc_act`).
    pub act_order: bool,
    /// Fit every group's parameters from the original `W` before any update.
    pub static_groups: bool,
    /// Per tensor, per row (`group_size = -1`) or groups of `g` input columns.
    pub granularity: Granularity,
    /// An explicit quantization order (position -> column), overriding `act_order`; `g_idx`
    /// then follows the act-order convention. For tests and teaching (e.g. OBQ's order).
    pub order: Option<Vec<usize>>,
    /// The reference quirk: a group's parameters come from the outer `W`, without the
    /// in-block updates of the current block (default `true`, as `gptq.py`). Only matters
    /// when a group starts inside a block. Ignored by [`gptq_reference`].
    pub group_params_from_outer_w: bool,
    /// Parallelism of the factorization, the GEMMs and the in-block sweep (rows are split
    /// into as many chunks as threads).
    pub par: Par,
    /// Factorize `H` in f64 (default; fewer spurious non-PD failures) or in f32 like the
    /// reference `gptq.py` (about twice as fast for that step). Fast version only.
    pub factor_in_f64: bool,
    /// How a group's parameters are chosen from its weights ([`GroupFit`]; `Plain`, the
    /// format's own fit as in `gptq.py`, by default).
    pub group_fit: GroupFit,
    /// Shrinkage of `H` toward its diagonal, `s` in `[0, 1]`: GPTQ solves with
    /// `diag(H) + (1 - s) offdiag(H)` (0, the default, is plain GPTQ; 1 leaves no error
    /// feedback, i.e. importance-weighted RTN with [`GroupFit::HessianDiag`]). The
    /// off-diagonal of a Hessian from one kind of text describes that text's correlations;
    /// compensating along them overfits it (issue 18: on ggml's Q4_0 grid and prose
    /// calibration, plain GPTQ halves the output error on other prose but is 48% worse than
    /// weighted RTN on technical documentation; with `s = 0.5` it is 14% better there).
    pub hessian_shrink: f64,
}

/// How GPTQ chooses a group's parameters (scale, zero) when it fits the group.
///
/// Formats with an importance-weighted search ([`Format::fit_weighted`]: ggml's block
/// grids, whose reference fit maps the largest `|w|` onto the extreme level and wastes
/// levels) fit much better under weights; formats without one (the uniform grids) give the
/// same parameters in every mode.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum GroupFit {
    /// The format's own fit of the group's weights ([`Format::fit`]), as `gptq.py`.
    #[default]
    Plain,
    /// The importance-weighted search with `diag(H)` as each column's importance: the
    /// objective of llama.cpp's imatrix quantization (and of our `rtn_imatrix`), applied to
    /// the weights GPTQ has updated so far.
    HessianDiag,
    /// The importance-weighted search with `1 / U[p, p]^2` as the importance of the column at
    /// position `p` (`U` the Cholesky factor of `H^-1` in quantization order): GPTQ's own cost
    /// of a rounding error `e` in that column, `e^2 / U[p, p]^2`, once the later columns have
    /// compensated it (the loss of Algorithm 1). Static groups are fitted after the
    /// factorization, so they use these weights too.
    Gptq,
}

impl Default for GptqParams {
    fn default() -> Self {
        Self {
            block_size: 128,
            damp_percent: 0.01,
            max_damp_retries: 4,
            act_order: false,
            static_groups: false,
            granularity: Granularity::Group(128),
            order: None,
            group_params_from_outer_w: true,
            par: Par::rayon(0),
            factor_in_f64: true,
            group_fit: GroupFit::Plain,
            hessian_shrink: 0.0,
        }
    }
}

/// Everything both versions need before the sweep.
pub(crate) struct Prep {
    pub out: usize,
    pub n: usize,
    /// `W` with dead columns zeroed, original order.
    pub W0: Array2<f32>,
    /// `H` with dead columns fixed (`H_ii = 1`), permuted to quantization order; stored in
    /// f32 (the input's precision), widened to f64 wherever a solver computes with it.
    pub Hp: Array2<f32>,
    pub dead: usize,
    /// position -> original column.
    pub perm: Vec<usize>,
    pub natural: bool,
    /// group length in columns, number of groups per row.
    pub g: usize,
    /// Columns whose groups are fitted together ([`Format::fit_span`]; `g` for formats that
    /// fit each group alone, 256 for ggml's K super-blocks).
    pub span: usize,
    #[allow(dead_code)]
    pub n_groups: usize,
    /// Group index (column of `scales`) used by each position.
    pub group_of_pos: Vec<usize>,
    /// `g_idx[k]` for original column `k`.
    pub g_idx: Vec<u32>,
    /// Whether parameters are fitted during the sweep (non-static groups).
    pub dynamic_groups: bool,
    /// `[out, n_groups]` parameters when static (filled before the sweep).
    pub scales: Array2<f32>,
    pub zeros: Array2<f32>,
}

/// Validate the inputs and build [`Prep`]. `what` names the method in errors.
pub(crate) fn prepare(
    W: ArrayView2<f32>,
    H: ArrayView2<f32>,
    format: &dyn Format,
    granularity: Granularity,
    static_groups: bool,
    act_order: bool,
    order: Option<&[usize]>,
    damp_percent: f64,
) -> Result<Prep> {
    let (out, n) = W.dim();
    if H.dim() != (n, n) {
        return Err(shape_err(
            "hessian",
            format!(
                "the Hessian is {:?} but the weight has {n} input columns (expected [{n}, {n}])",
                H.dim()
            ),
        ));
    }
    if out == 0 || n == 0 {
        return Err(shape_err("weight", format!("empty weight {:?}", W.dim())));
    }
    check_finite_view("weight", W)?;
    check_finite_view("hessian", H)?;
    granularity.check("weight", n)?;
    let span = quantlab_grids::format::fit_span_len(format, granularity, "weight", n)?;
    if !(damp_percent >= 0.0 && damp_percent.is_finite()) {
        return Err(SolverError::InvalidOption {
            option: "damp_percent".into(),
            detail: format!("{damp_percent}: use a finite value >= 0 (e.g. 0.01)"),
        });
    }
    let diag: Vec<f32> = (0..n).map(|i| H[[i, i]]).collect();
    let is_dead: Vec<bool> = diag.iter().map(|&d| d == 0.0).collect();
    let dead = is_dead.iter().filter(|&&d| d).count();
    if dead == n {
        return Err(SolverError::ZeroHessian {
            what: "weight".into(),
        });
    }
    let mut W0 = W.as_standard_layout().into_owned();
    for (k, &d) in is_dead.iter().enumerate() {
        if d {
            W0.column_mut(k).fill(0.0);
        }
    }
    // quantization order
    let perm: Vec<usize> = if let Some(o) = order {
        let mut seen = vec![false; n];
        if o.len() != n
            || o.iter()
                .any(|&k| k >= n || std::mem::replace(&mut seen[k], true))
        {
            return Err(SolverError::InvalidOption {
                option: "order".into(),
                detail: format!("not a permutation of 0..{n}"),
            });
        }
        o.to_vec()
    } else if act_order {
        let hd: Vec<f32> = (0..n)
            .map(|i| if is_dead[i] { 1.0 } else { diag[i] })
            .collect();
        let mut p: Vec<usize> = (0..n).collect();
        p.sort_by(|&a, &b| hd[b].total_cmp(&hd[a]));
        p
    } else {
        (0..n).collect()
    };
    let natural = perm.iter().enumerate().all(|(p, &k)| p == k);
    let Hp = Array2::from_shape_fn((n, n), |(i, j)| {
        let (a, b) = (perm[i], perm[j]);
        if a == b && is_dead[a] {
            1.0
        } else {
            H[[a, b]]
        }
    });

    let g = granularity.group_len(n);
    let n_groups = granularity.n_groups(n);
    let mut scales = Array2::<f32>::zeros((out, n_groups));
    let mut zeros = Array2::<f32>::zeros((out, n_groups));
    let dynamic_groups = matches!(granularity, Granularity::Group(_)) && !static_groups;
    let (group_of_pos, g_idx): (Vec<usize>, Vec<u32>) = if dynamic_groups {
        let gop: Vec<usize> = (0..n).map(|p| p / g).collect();
        let mut gi = vec![0u32; n];
        for (p, &k) in perm.iter().enumerate() {
            gi[k] = (p / g) as u32;
        }
        (gop, gi)
    } else {
        (
            perm.iter().map(|&k| k / g).collect(),
            (0..n).map(|k| (k / g) as u32).collect(),
        )
    };
    if !dynamic_groups {
        let mut put = |r: usize, gi: usize, p: GroupParams| {
            scales[[r, gi]] = p.scale;
            zeros[[r, gi]] = p.zero;
        };
        match granularity {
            Granularity::PerTensor => {
                let p = format.fit(&W0.iter().copied().collect::<Vec<_>>());
                for r in 0..out {
                    put(r, 0, p);
                }
            }
            _ if span != g => {
                // groups fitted together (ggml K super-blocks): one fit per span of columns
                let mut ps = vec![GroupParams::scale_only(0.0); span / g];
                for r in 0..out {
                    for s0 in (0..n).step_by(span) {
                        let slab: Vec<f32> = (s0..s0 + span).map(|k| W0[[r, k]]).collect();
                        format.fit_groups(&slab, None, g, &mut ps);
                        for (j, &p) in ps.iter().enumerate() {
                            put(r, s0 / g + j, p);
                        }
                    }
                }
            }
            _ => {
                for r in 0..out {
                    for gi in 0..n_groups {
                        let slab: Vec<f32> =
                            granularity.group_range(gi, n).map(|k| W0[[r, k]]).collect();
                        put(r, gi, format.fit(&slab));
                    }
                }
            }
        }
    }
    Ok(Prep {
        out,
        n,
        W0,
        Hp,
        dead,
        perm,
        natural,
        g,
        span,
        n_groups,
        group_of_pos,
        g_idx,
        dynamic_groups,
        scales,
        zeros,
    })
}

/// `Hp`'s off-diagonal scaled by `1 - shrink` ([`GptqParams::hessian_shrink`]); an error
/// naming the option outside `[0, 1]`.
pub(crate) fn shrink_offdiag(Hp: &mut Array2<f32>, shrink: f64) -> Result<()> {
    if !(0.0..=1.0).contains(&shrink) {
        return Err(SolverError::InvalidOption {
            option: "hessian_shrink".into(),
            detail: format!("{shrink}: use a value in [0, 1] (0 = plain GPTQ)"),
        });
    }
    if shrink == 0.0 {
        return Ok(());
    }
    let keep = (1.0 - shrink) as f32;
    for ((i, j), v) in Hp.indexed_iter_mut() {
        if i != j {
            *v *= keep;
        }
    }
    Ok(())
}

/// The importance of each quantization position for the group fit of `mode` (`None` for
/// [`GroupFit::Plain`]); `u_diag(p)` is `U[p, p]`.
pub(crate) fn fit_importance(
    mode: GroupFit,
    prep: &Prep,
    u_diag: impl Fn(usize) -> f64,
) -> Option<Vec<f32>> {
    match mode {
        GroupFit::Plain => None,
        GroupFit::HessianDiag => Some((0..prep.n).map(|p| prep.Hp[[p, p]].max(0.0)).collect()),
        GroupFit::Gptq => Some(
            (0..prep.n)
                .map(|p| {
                    let d = u_diag(p);
                    let v = 1.0 / (d * d);
                    if v.is_finite() {
                        v as f32
                    } else {
                        0.0
                    }
                })
                .collect(),
        ),
    }
}

/// Static groups under an importance (`imp[p]` per quantization position): refit every
/// group's parameters from the original `W` with [`Format::fit_weighted`] /
/// [`Format::fit_groups`] (what [`prepare`] did with the plain fit).
pub(crate) fn refit_static(
    prep: &mut Prep,
    format: &dyn Format,
    granularity: Granularity,
    imp: &[f32],
) {
    if prep.dynamic_groups {
        return;
    }
    let n = prep.n;
    let mut imp_col = vec![0f32; n];
    for (p, &k) in prep.perm.iter().enumerate() {
        imp_col[k] = imp[p];
    }
    let (g, span) = (prep.g, prep.span);
    let W0 = &prep.W0;
    match granularity {
        Granularity::PerTensor => {
            let all: Vec<f32> = W0.iter().copied().collect();
            let imp_all: Vec<f32> = (0..prep.out)
                .flat_map(|_| imp_col.iter().copied())
                .collect();
            let p = format.fit_weighted(&all, Some(&imp_all));
            prep.scales.fill(p.scale);
            prep.zeros.fill(p.zero);
        }
        _ if span != g => {
            let mut ps = vec![GroupParams::scale_only(0.0); span / g];
            for r in 0..prep.out {
                for s0 in (0..n).step_by(span) {
                    let slab: Vec<f32> = (s0..s0 + span).map(|k| W0[[r, k]]).collect();
                    format.fit_groups(&slab, Some(&imp_col[s0..s0 + span]), g, &mut ps);
                    for (j, &p) in ps.iter().enumerate() {
                        prep.scales[[r, s0 / g + j]] = p.scale;
                        prep.zeros[[r, s0 / g + j]] = p.zero;
                    }
                }
            }
        }
        _ => {
            let n_groups = granularity.n_groups(n);
            for r in 0..prep.out {
                for gi in 0..n_groups {
                    let range = granularity.group_range(gi, n);
                    let slab: Vec<f32> = range.clone().map(|k| W0[[r, k]]).collect();
                    let p = format.fit_weighted(&slab, Some(&imp_col[range]));
                    prep.scales[[r, gi]] = p.scale;
                    prep.zeros[[r, gi]] = p.zero;
                }
            }
        }
    }
}

/// Add `lambda = damp_percent * mean(diag Hp)` to the diagonal and factorize with
/// `factor`; on a non-positive pivot retry with 10x the damping (0 -> 0.01), up to
/// `max_retries` times, recording each failure.
pub(crate) fn factor_with_retries<T>(
    Hp: &Array2<f32>,
    damp_percent: f64,
    max_retries: usize,
    mut factor: impl FnMut(f64) -> std::result::Result<T, usize>,
    report: &mut SolveReport,
) -> Result<T> {
    let n = Hp.nrows();
    let mean_diag = (0..n).map(|i| Hp[[i, i]] as f64).sum::<f64>() / n as f64;
    let mut dp = damp_percent;
    loop {
        let damp = dp * mean_diag;
        match factor(damp) {
            Ok(t) => {
                report.damp_percent = dp;
                report.damp = damp;
                return Ok(t);
            }
            Err(column) => {
                if report.damp_retries.len() >= max_retries {
                    return Err(SolverError::HessianNotPositiveDefinite {
                        column,
                        damp,
                        retries: report.damp_retries.len(),
                    });
                }
                report.damp_retries.push(DampRetry {
                    damp_percent: dp,
                    damp,
                    column,
                });
                dp = if dp == 0.0 { 0.01 } else { dp * 10.0 };
            }
        }
    }
}

/// Scatter the sweep's results (position-major `[n, out]`) back to original column order.
fn finish_output(
    prep: Prep,
    codesT: &[u8],
    qT: &[f32],
    scales: Array2<f32>,
    zeros: Array2<f32>,
    mut report: SolveReport,
    t0: Instant,
) -> SolverOutput {
    let (out, n) = (prep.out, prep.n);
    let mut codes = Array2::<u8>::zeros((out, n));
    let mut q = Array2::<f32>::zeros((out, n));
    scatter_transpose(codesT, out, &prep.perm, &mut codes);
    scatter_transpose(qT, out, &prep.perm, &mut q);
    report.dead_columns = prep.dead;
    if !prep.natural {
        report.order = Some(prep.perm.clone());
    }
    report.seconds = t0.elapsed().as_secs_f64();
    SolverOutput {
        codes,
        scales,
        zeros,
        g_idx: prep.g_idx,
        q,
        report,
    }
}

/// The reference GPTQ: unblocked, one column at a time, f64, plain loops (see the module
/// documentation). `params.block_size`, `group_params_from_outer_w` and `par` are ignored.
/// Meant for small layers and as the oracle of [`gptq_with_format`].
///
/// ```
/// use ndarray::array;
/// use quantlab_grids::{Granularity, UniformGrid};
/// use quantlab_solvers::gptq::{gptq_reference, GptqParams};
/// let W = array![[0.3f32, -0.8, 0.5, 0.1]];
/// let H = array![[2.0f32, 1.0, 0.0, 0.0], [1.0, 2.0, 0.5, 0.0], [0.0, 0.5, 2.0, 0.2], [0.0, 0.0, 0.2, 1.0]];
/// let grid = UniformGrid::new(2, false).unwrap();
/// let p = GptqParams { granularity: Granularity::PerChannel, ..Default::default() };
/// let out = gptq_reference(W.view(), H.view(), &grid, &p).unwrap();
/// // the reported loss is 1/2 tr(D H_damped D^T)
/// let lam = out.report.damp;
/// let D = &W - &out.q;
/// let Hd = H.mapv(|v| v as f64) + ndarray::Array2::<f64>::eye(4) * lam;
/// let Dd = D.mapv(|v| v as f64);
/// let direct = 0.5 * Dd.dot(&Hd).dot(&Dd.t())[[0, 0]];
/// assert!((out.report.loss.unwrap() - direct).abs() < 1e-6 * direct.max(1e-12));
/// ```
pub fn gptq_reference(
    W: ArrayView2<f32>,
    H: ArrayView2<f32>,
    format: &dyn Format,
    params: &GptqParams,
) -> Result<SolverOutput> {
    let t0 = Instant::now();
    let mut prep = prepare(
        W,
        H,
        format,
        params.granularity,
        params.static_groups,
        params.act_order,
        params.order.as_deref(),
        params.damp_percent,
    )?;
    let (out, n) = (prep.out, prep.n);
    shrink_offdiag(&mut prep.Hp, params.hessian_shrink)?;
    let mut report = SolveReport::new("gptq-ref", format.name(), (out, n));
    // U: upper Cholesky factor of (H + lambda I)^-1, computed literally
    let U = factor_with_retries(
        &prep.Hp,
        params.damp_percent,
        params.max_damp_retries,
        |damp| {
            let mut Hd = prep.Hp.mapv(f64::from);
            for i in 0..n {
                Hd[[i, i]] += damp;
            }
            crate::linalg::upper_cholesky_of_inverse_ref(Hd.view())
        },
        &mut report,
    )?;
    let imp = fit_importance(params.group_fit, &prep, |p| U[[p, p]]);
    if let Some(imp) = &imp {
        refit_static(&mut prep, format, params.granularity, imp);
    }
    let imp_of = |a: usize, b: usize| imp.as_ref().map(|v| &v[a..b]);
    // W in quantization order, f64
    let mut Wp = Array2::from_shape_fn((out, n), |(r, p)| prep.W0[[r, prep.perm[p]]] as f64);
    let mut scales = prep.scales.clone();
    let mut zeros = prep.zeros.clone();
    let mut codesT = vec![0u8; n * out];
    let mut qT = vec![0f32; n * out];
    let mut loss = 0.0f64;
    let mut ps = vec![GroupParams::scale_only(0.0); prep.span / prep.g];
    for p in 0..n {
        if prep.dynamic_groups && prep.span != prep.g && p % prep.span == 0 {
            // fit the groups of the span [p, p + span) together (ggml K super-blocks) on the
            // current (fully updated) W
            for r in 0..out {
                let slab: Vec<f32> = (p..p + prep.span).map(|c| Wp[[r, c]] as f32).collect();
                format.fit_groups(&slab, imp_of(p, p + prep.span), prep.g, &mut ps);
                for (j, gp) in ps.iter().enumerate() {
                    scales[[r, p / prep.g + j]] = gp.scale;
                    zeros[[r, p / prep.g + j]] = gp.zero;
                }
            }
        } else if prep.dynamic_groups && prep.span == prep.g && p % prep.g == 0 {
            // fit the group [p, min(p + g, n)) on the current (fully updated) W; the last
            // group is short when g does not divide n
            let end = (p + prep.g).min(n);
            for r in 0..out {
                let slab: Vec<f32> = (p..end).map(|c| Wp[[r, c]] as f32).collect();
                let gp = format.fit_weighted(&slab, imp_of(p, end));
                scales[[r, p / prep.g]] = gp.scale;
                zeros[[r, p / prep.g]] = gp.zero;
            }
        }
        let gi = prep.group_of_pos[p];
        let d = U[[p, p]];
        for r in 0..out {
            let gp = GroupParams {
                scale: scales[[r, gi]],
                zero: zeros[[r, gi]],
            };
            let w = Wp[[r, p]];
            let code = format.encode(w as f32, gp);
            let q = format.decode(code, gp) as f64;
            codesT[p * out + r] = code;
            qT[p * out + r] = q as f32;
            let err = (w - q) / d;
            loss += err * err / 2.0;
            for c in p..n {
                Wp[[r, c]] -= err * U[[p, c]];
            }
        }
    }
    report.loss = Some(loss);
    Ok(finish_output(prep, &codesT, &qT, scales, zeros, report, t0))
}

/// Columns per sub-block of the in-block sweep: rank-1 updates stay inside a sub-block of
/// `INNER` columns, and one small GEMM per sub-block updates the rest of the block (a second
/// level of GPTQ's lazy batching; the same arithmetic in another order).
const INNER: usize = 16;

/// Rows per tile when gathering group slabs and transposing (cache blocking only).
const TILE: usize = 64;

/// `dst[r, perm[p]] = src[p * out + r]` for a position-major `src` (`[n, out]`) into a
/// standard-layout `dst` (`[out, n]`), in `TILE x TILE` tiles so both sides stay in cache.
fn scatter_transpose<T: Copy>(src: &[T], out: usize, perm: &[usize], dst: &mut Array2<T>) {
    let n = perm.len();
    let d = dst.as_slice_mut().expect("standard layout");
    for p0 in (0..n).step_by(TILE) {
        let p1 = (p0 + TILE).min(n);
        for r0 in (0..out).step_by(TILE) {
            let r1 = (r0 + TILE).min(out);
            for r in r0..r1 {
                for p in p0..p1 {
                    d[r * n + perm[p]] = src[p * out + r];
                }
            }
        }
    }
}

/// `U` (upper Cholesky factor of `(Hp + damp I)^-1`), column-major f32, computed in `T`:
/// `A = J (Hp + damp I) J`, `L = chol(A)`, `U = J L^-1 J`.
fn factor_u<T: faer::traits::RealField + Copy>(
    Hp: &Array2<f32>,
    damp: f64,
    par: Par,
    to_t: impl Fn(f64) -> T,
    to_f32: impl Fn(T) -> f32,
) -> std::result::Result<Vec<f32>, usize> {
    let n = Hp.nrows();
    // A[i, j] = Hp[n-1-i, n-1-j] = Hp[n-1-j, n-1-i] (symmetric): read along Hp's rows while
    // filling A's columns (column-major)
    let A = Mat::<T>::from_fn(n, n, |i, j| {
        let v = Hp[[n - 1 - j, n - 1 - i]] as f64;
        to_t(if i == j { v + damp } else { v })
    });
    let Linv = crate::linalg::inverse_factor_reversed(A, par)?;
    let mut U = vec![0f32; n * n];
    for j in 0..n {
        let src = Linv.col(n - 1 - j);
        let dst = &mut U[j * n..j * n + j + 1];
        for (i, d) in dst.iter_mut().enumerate() {
            *d = to_f32(src[n - 1 - i]);
        }
    }
    Ok(U)
}

/// The rows `r0..r0 + w1.ncols()` of one block, for one thread.
struct Task<'a> {
    r0: usize,
    w1: ArrayViewMut2<'a, f32>,
    e1: ArrayViewMut2<'a, f32>,
    cb: ArrayViewMut2<'a, u8>,
    qb: ArrayViewMut2<'a, f32>,
    sc: ArrayViewMut2<'a, f32>,
    ze: ArrayViewMut2<'a, f32>,
}

/// Number of row chunks for a parallelism setting.
fn n_chunks(par: Par, out: usize) -> usize {
    let k = match par {
        Par::Seq => 1,
        Par::Rayon(k) => k.get(),
    };
    k.clamp(1, out.max(1))
}

/// Blocked GPTQ against any [`Format`] (see the module documentation). The fast path.
///
/// ```
/// use ndarray::Array2;
/// use quantlab_grids::{Granularity, UniformGrid};
/// use quantlab_solvers::gptq::{gptq_reference, gptq_with_format, GptqParams};
/// let W = Array2::from_shape_fn((3, 8), |(r, c)| ((r * 8 + c) as f32 * 0.37).sin());
/// let H = Array2::from_shape_fn((8, 8), |(i, j)| if i == j { 2.0 } else { 0.5 / (1.0 + (i as f32 - j as f32).abs()) });
/// let grid = UniformGrid::new(3, true).unwrap();
/// let p = GptqParams { block_size: 3, granularity: Granularity::Group(4), ..Default::default() };
/// let fast = gptq_with_format(W.view(), H.view(), &grid, &GptqParams { group_params_from_outer_w: false, ..p.clone() }).unwrap();
/// let reference = gptq_reference(W.view(), H.view(), &grid, &p).unwrap();
/// assert_eq!(fast.codes, reference.codes);
/// assert!((fast.report.loss.unwrap() - reference.report.loss.unwrap()).abs() < 1e-5);
/// ```
pub fn gptq_with_format(
    W: ArrayView2<f32>,
    H: ArrayView2<f32>,
    format: &dyn Format,
    params: &GptqParams,
) -> Result<SolverOutput> {
    let t0 = Instant::now();
    if params.block_size == 0 {
        return Err(SolverError::InvalidOption {
            option: "block_size".into(),
            detail: "0: use a positive number of columns (e.g. 128)".into(),
        });
    }
    let mut prep = prepare(
        W,
        H,
        format,
        params.granularity,
        params.static_groups,
        params.act_order,
        params.order.as_deref(),
        params.damp_percent,
    )?;
    let (out, n) = (prep.out, prep.n);
    let par = params.par;
    shrink_offdiag(&mut prep.Hp, params.hessian_shrink)?;
    let mut report = SolveReport::new("gptq", format.name(), (out, n));

    // U (upper Cholesky factor of (H + lambda I)^-1), column-major f32.
    let Ucm: Vec<f32> = factor_with_retries(
        &prep.Hp,
        params.damp_percent,
        params.max_damp_retries,
        |damp| {
            if params.factor_in_f64 {
                factor_u(&prep.Hp, damp, par, |v| v, |v| v as f32)
            } else {
                factor_u(&prep.Hp, damp, par, |v| v as f32, |v| v)
            }
        },
        &mut report,
    )?;
    let U = MatRef::from_column_major_slice(&Ucm, n, n);
    let Und = ndarray::ArrayView2::from_shape((n, n).f(), &Ucm).expect("U shape");
    let imp = fit_importance(params.group_fit, &prep, |p| U[(p, p)] as f64);
    if let Some(imp) = &imp {
        refit_static(&mut prep, format, params.granularity, imp);
    }
    let prep = prep;
    let t_factor = t0.elapsed().as_secs_f64();
    let (mut t_sweep, mut t_gemm) = (0.0f64, 0.0f64);

    // W^T in quantization order: WT[p, r] = W0[r, perm[p]]
    let mut WT = vec![0f32; n * out];
    {
        let w0 = prep.W0.as_slice().expect("standard layout");
        for p0 in (0..n).step_by(TILE) {
            let p1 = (p0 + TILE).min(n);
            for r0 in (0..out).step_by(TILE) {
                let r1 = (r0 + TILE).min(out);
                for p in p0..p1 {
                    let k = prep.perm[p];
                    for r in r0..r1 {
                        WT[p * out + r] = w0[r * n + k];
                    }
                }
            }
        }
    }
    let mut scales = prep.scales.clone();
    let mut zeros = prep.zeros.clone();
    let mut codesT = vec![0u8; n * out];
    let mut qT = vec![0f32; n * out];
    let mut loss = 0.0f64;
    let chunk = out.div_ceil(n_chunks(par, out));
    let bs = params.block_size;
    let g = prep.g;
    let span = prep.span;
    let quirk = params.group_params_from_outer_w;

    let mut i1 = 0;
    while i1 < n {
        let i2 = (i1 + bs).min(n);
        let B = i2 - i1;
        let ts = Instant::now();
        let mut W1 =
            Array2::from_shape_vec((B, out), WT[i1 * out..i2 * out].to_vec()).expect("block shape");
        let mut Err1 = Array2::<f32>::zeros((B, out));
        {
            let WT_ref: &[f32] = &WT;
            let mut codes_blk =
                ArrayViewMut2::from_shape((B, out), &mut codesT[i1 * out..i2 * out]).unwrap();
            let mut q_blk =
                ArrayViewMut2::from_shape((B, out), &mut qT[i1 * out..i2 * out]).unwrap();
            let tasks: Vec<Task> = W1
                .axis_chunks_iter_mut(Axis(1), chunk)
                .zip(Err1.axis_chunks_iter_mut(Axis(1), chunk))
                .zip(codes_blk.axis_chunks_iter_mut(Axis(1), chunk))
                .zip(q_blk.axis_chunks_iter_mut(Axis(1), chunk))
                .zip(scales.axis_chunks_iter_mut(Axis(0), chunk))
                .zip(zeros.axis_chunks_iter_mut(Axis(0), chunk))
                .enumerate()
                .map(|(ci, (((((w1, e1), cb), qb), sc), ze))| Task {
                    r0: ci * chunk,
                    w1,
                    e1,
                    cb,
                    qb,
                    sc,
                    ze,
                })
                .collect();
            let sweep = |t: Task| -> f64 {
                let Task {
                    r0,
                    mut w1,
                    mut e1,
                    mut cb,
                    mut qb,
                    mut sc,
                    mut ze,
                } = t;
                let cs = w1.ncols();
                let mut part = 0.0f64;
                // the rows' group slabs, TILE rows at a time (row-major, g per row): read
                // column by column (contiguous over rows) instead of row by row (a cache
                // miss per weight)
                let mut tile = vec![0f32; if prep.dynamic_groups { TILE * span } else { 0 }];
                let mut ps = vec![GroupParams::scale_only(0.0); span / g];
                for i in 0..B {
                    let p = i1 + i;
                    // sub-block [s1, s2) of the block holding column i
                    let s1 = i - i % INNER;
                    let s2 = (s1 + INNER).min(B);
                    if prep.dynamic_groups && p % span == 0 {
                        let gi = p / g;
                        // the last group is short when g does not divide n; a span of
                        // groups fitted together (K super-blocks) is whole
                        let end = (p + span).min(n);
                        let len = end - p;
                        // the value of column c, local row lr, that the group is fitted on
                        let value = |c: usize, lr: usize| -> f32 {
                            let r = r0 + lr;
                            if quirk {
                                WT_ref[c * out + r]
                            } else if c < i1 + s2 {
                                // inside the current sub-block: fully updated
                                w1[[c - i1, lr]]
                            } else if c < i2 {
                                // later in the block: lacks the sub-block's pending update
                                let mut v = w1[[c - i1, lr]];
                                for j in s1..i {
                                    v -= e1[[j, lr]] * U[(i1 + j, c)];
                                }
                                v
                            } else {
                                // outer W lacks this block's pending lazy updates
                                let mut v = WT_ref[c * out + r];
                                for j in 0..i {
                                    v -= e1[[j, lr]] * U[(i1 + j, c)];
                                }
                                v
                            }
                        };
                        for t0 in (0..cs).step_by(TILE) {
                            let t1 = (t0 + TILE).min(cs);
                            for (t, c) in (p..end).enumerate() {
                                for lr in t0..t1 {
                                    tile[(lr - t0) * len + t] = value(c, lr);
                                }
                            }
                            let imp = imp.as_ref().map(|v| &v[p..end]);
                            for lr in t0..t1 {
                                let slab = &tile[(lr - t0) * len..(lr - t0 + 1) * len];
                                if span == g {
                                    let gp = format.fit_weighted(slab, imp);
                                    sc[[lr, gi]] = gp.scale;
                                    ze[[lr, gi]] = gp.zero;
                                } else {
                                    format.fit_groups(slab, imp, g, &mut ps);
                                    for (j, gp) in ps.iter().enumerate() {
                                        sc[[lr, gi + j]] = gp.scale;
                                        ze[[lr, gi + j]] = gp.zero;
                                    }
                                }
                            }
                        }
                    }
                    let gi = prep.group_of_pos[p];
                    let d = U[(p, p)];
                    {
                        let w = w1.row(i);
                        let w = w.as_slice().expect("contiguous row");
                        let mut e = e1.row_mut(i);
                        let e = e.as_slice_mut().expect("contiguous row");
                        let mut c = cb.row_mut(i);
                        let c = c.as_slice_mut().expect("contiguous row");
                        let mut qv = qb.row_mut(i);
                        let qv = qv.as_slice_mut().expect("contiguous row");
                        for lr in 0..cs {
                            let gp = GroupParams {
                                scale: sc[[lr, gi]],
                                zero: ze[[lr, gi]],
                            };
                            let code = format.encode(w[lr], gp);
                            let q = format.decode(code, gp);
                            c[lr] = code;
                            qv[lr] = q;
                            let err = (w[lr] - q) / d;
                            e[lr] = err;
                            part += (err as f64) * (err as f64);
                        }
                    }
                    // in-block update inside the sub-block: W1[j] -= U[p, i1 + j] Err1[i]
                    let e = e1.row(i);
                    let e = e.as_slice().expect("contiguous row");
                    for j in i + 1..s2 {
                        let u = U[(p, i1 + j)];
                        if u == 0.0 {
                            continue;
                        }
                        let mut wj = w1.row_mut(j);
                        let wj = wj.as_slice_mut().expect("contiguous row");
                        for (x, &ev) in wj.iter_mut().zip(e) {
                            *x -= u * ev;
                        }
                    }
                    // end of a sub-block: W1[s2:] -= U[s1:s2, s2:]^T Err1[s1:s2] (small GEMM)
                    if i + 1 == s2 && s2 < B {
                        let lhs = Und.slice(s![i1 + s1..i1 + s2, i1 + s2..i2]);
                        let rhs = e1.slice(s![s1..s2, ..]);
                        let mut dst = w1.slice_mut(s![s2..B, ..]);
                        general_mat_mul(-1.0, &lhs.t(), &rhs, 1.0, &mut dst);
                    }
                }
                part
            };
            let parts: Vec<f64> = if tasks.len() > 1 {
                tasks.into_par_iter().map(sweep).collect()
            } else {
                tasks.into_iter().map(sweep).collect()
            };
            loss += parts.iter().sum::<f64>() / 2.0;
        }
        t_sweep += ts.elapsed().as_secs_f64();
        let tg = Instant::now();
        // lazy batch update: W[:, i2:] -= Err1 U[i1:i2, i2:]   (in W^T form)
        if i2 < n {
            let dst = MatMut::from_row_major_slice_mut(&mut WT[i2 * out..], n - i2, out);
            let lhs = U.submatrix(i1, i2, B, n - i2).transpose();
            let rhs =
                MatRef::from_row_major_slice(Err1.as_slice().expect("contiguous Err1"), B, out);
            faer::linalg::matmul::matmul(dst, Accum::Add, lhs, rhs, -1.0f32, par);
        }
        t_gemm += tg.elapsed().as_secs_f64();
        i1 = i2;
    }
    report.loss = Some(loss);
    report.phases = vec![
        ("prepare+factor".into(), t_factor),
        ("sweep".into(), t_sweep),
        ("lazy_gemm".into(), t_gemm),
    ];
    Ok(finish_output(prep, &codesT, &qT, scales, zeros, report, t0))
}

/// Blocked GPTQ onto a [`FormatSpec`], returning the workspace hand-off type and the report.
///
/// ```
/// use ndarray::Array2;
/// use quantlab_grids::{FormatSpec, Granularity, UniformGrid};
/// use quantlab_solvers::gptq::{gptq, GptqParams};
/// let W = Array2::from_shape_fn((4, 16), |(r, c)| ((r * 16 + c) as f32 * 0.71).cos());
/// let H = Array2::from_shape_fn((16, 16), |(i, j)| if i == j { 1.0 } else { 0.3 });
/// let spec = FormatSpec::Uniform(UniformGrid::new(4, true).unwrap());
/// let p = GptqParams { granularity: Granularity::Group(8), ..Default::default() };
/// let (lin, report) = gptq(W.view(), H.view(), &spec, &p).unwrap();
/// assert_eq!(lin.shape(), (4, 16));
/// assert_eq!(lin.g_idx, (0..16).map(|k| k / 8).collect::<Vec<u32>>());
/// let rel = quantlab_solvers::rel_output_error(W.view(), lin.dequantize().view(), H.view()).unwrap();
/// assert!(rel < 0.01 && report.damp > 0.0);
/// ```
pub fn gptq(
    W: ArrayView2<f32>,
    H: ArrayView2<f32>,
    spec: &FormatSpec,
    params: &GptqParams,
) -> Result<(QuantizedLinear, SolveReport)> {
    let f = spec.build();
    gptq_with_format(W, H, f.as_ref(), params)?.into_linear(spec.clone(), params.granularity)
}
