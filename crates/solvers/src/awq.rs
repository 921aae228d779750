//! AWQ: activation-aware weight quantization (Lin et al. 2023), the scale search and the
//! clipping search, for a group of linears sharing one input `X` (e.g. q, k, v after a norm).
//!
//! # Scale search (AutoAWQ "duo scaling")
//! * `x_mean[j]` = mean over tokens of `|x_j|` (AutoAWQ `inp.abs().mean(0)`).
//! * `w_mean[j]`: the linears' weights stacked to `[sum out, in]`, each row cut into groups of
//!   `g` input columns, `|w|` divided by its group's max `|w|` (+1e-6), then the mean over all
//!   stacked rows, per input column (what AutoAWQ's `_search_best_scale` computes).
//! * For `a` in `{0, 1/n, ..., (n-1)/n}` (n = 20): `s = x_mean^a / (w_mean^(1-a) + 1e-4)`,
//!   clamped to >= 1e-4, divided by `sqrt(max s * min s)`; each linear becomes
//!   `Q(W diag(s)) diag(s)^-1` and the candidate is scored by the output error
//!   `sum_l tr(D_l H D_l^T) / (2 sum out)` (= mean over tokens and outputs of the squared
//!   output error, for `H = 2/T X^T X`), or by a caller's loss (the pipeline scores a whole
//!   block). Without duo scaling (`llm-awq`), `s = x_mean^a`. The `a` with the least loss
//!   wins (the first on ties).
//!
//! # Clip search (AutoAWQ `_compute_best_clip`)
//! On the scaled weight `W diag(s)` with the scaled inputs `X diag(s)^-1`: per row and group,
//! `max_val = (1 - i/20) * max|w_group|` for `i = 0..9`; the weights are clamped to
//! `[-max_val, max_val]`, quantized, and scored by the group's partial output error
//! `mean_t (x_{t,g} . (w_g - q_g))^2 = 1/2 d^T H_gg d`, on up to 512 token rows taken with a
//! stride (AutoAWQ `input_feat[:, 0::T // 512]`), or on the full `H` when only a Hessian is
//! known. The result is one max value per `[row, group]`, in the scaled domain.
//!
//! Everything is computed from [`AwqStats`] (`x_mean`, `H`, `H_clip`), so AWQ runs from the
//! inputs or from a Hessian alone (then `x_mean` is approximated by the RMS `sqrt(diag H / 2)`).
#![allow(non_snake_case)]

use crate::error::{check_finite_view, shape_err};
use crate::{Result, SolverError};
use ndarray::{Array1, Array2, ArrayView2, Axis};
use quantlab_grids::{Format, Granularity};

/// The statistics AWQ needs about the shared input.
#[derive(Clone, Debug)]
pub struct AwqStats {
    /// Mean `|x|` per input channel.
    pub x_mean: Array1<f32>,
    /// `H = 2/T X^T X` over every token (scale-search scoring).
    pub H: Array2<f32>,
    /// `H` over the clip-search sample of tokens.
    pub H_clip: Array2<f32>,
}

impl AwqStats {
    /// From the inputs `X [tokens, in]`; the clip Hessian uses at most `clip_samples` rows
    /// (stride sampling).
    pub fn from_inputs(X: ArrayView2<f32>, clip_samples: usize) -> Result<Self> {
        let (t, d) = X.dim();
        if t == 0 || d == 0 {
            return Err(shape_err(
                "awq inputs",
                format!("empty inputs {:?}", X.dim()),
            ));
        }
        check_finite_view("inputs", X)?;
        let x_mean = X.mapv(|v| v.abs()).mean_axis(Axis(0)).expect("non-empty");
        let mut h = crate::hessian::Hessian::new(d).with_counting(crate::hessian::Counting::Tokens);
        h.add_batch(X, 1)?;
        let H = h.finish();
        let stride = (t / clip_samples.max(1)).max(1);
        let Xs = X.slice(ndarray::s![..;stride, ..]);
        let mut hc =
            crate::hessian::Hessian::new(d).with_counting(crate::hessian::Counting::Tokens);
        hc.add_batch(Xs, 1)?;
        Ok(Self {
            x_mean,
            H,
            H_clip: hc.finish(),
        })
    }

    /// From a Hessian alone: `x_mean ~ sqrt(diag H / 2)` (the RMS, an upper bound of mean
    /// `|x|`), and the clip search on the full `H`.
    pub fn from_hessian(H: ArrayView2<f32>) -> Result<Self> {
        let d = H.nrows();
        if H.dim() != (d, d) || d == 0 {
            return Err(shape_err(
                "awq hessian",
                format!("{:?} is not square", H.dim()),
            ));
        }
        check_finite_view("hessian", H)?;
        Ok(Self {
            x_mean: Array1::from_shape_fn(d, |j| (H[[j, j]].max(0.0) / 2.0).sqrt()),
            H: H.to_owned(),
            H_clip: H.to_owned(),
        })
    }
}

/// A caller's score of one scale candidate: `(a, scales, effective weights
/// Q(W diag(s)) diag(s)^-1 of every linear) -> loss` (lower is better).
pub type CandidateLoss<'a> = dyn FnMut(f64, &Array1<f32>, &[Array2<f32>]) -> f64 + 'a;

/// `(chosen a, its scales, (a, loss) per candidate)`.
pub type ScaleSearch = (f64, Array1<f32>, Vec<(f64, f64)>);

/// The knobs of the AWQ searches (AutoAWQ defaults).
#[derive(Clone, Debug, PartialEq)]
pub struct AwqParams {
    /// Candidates `a = i / n_grid`, `i < n_grid` (20).
    pub n_grid: usize,
    /// `s = x^a / w^(1-a)` (AutoAWQ) instead of `s = x^a` (llm-awq).
    pub duo_scaling: bool,
    /// Group granularity of the quantizer (and of `w_mean`'s normalisation).
    pub granularity: Granularity,
    /// Run the clip search.
    pub clip: bool,
    /// Clip candidates `1 - i / clip_n_grid` (20) ...
    pub clip_n_grid: usize,
    /// ... for `i < clip_max_shrink * clip_n_grid` (0.5: ten candidates).
    pub clip_max_shrink: f64,
    /// Token rows sampled for the clip search (512).
    pub clip_samples: usize,
}

impl Default for AwqParams {
    fn default() -> Self {
        Self {
            n_grid: 20,
            duo_scaling: true,
            granularity: Granularity::Group(128),
            clip: true,
            clip_n_grid: 20,
            clip_max_shrink: 0.5,
            clip_samples: 512,
        }
    }
}

/// What the AWQ search found.
#[derive(Clone, Debug)]
pub struct AwqResult {
    /// The chosen exponent `a`.
    pub alpha: f64,
    /// The per-input-channel scales `s` (fold `1/s` into the preceding op, multiply the
    /// linears' columns by `s`).
    pub scales: Array1<f32>,
    /// `(a, loss)` for every candidate, in order (for a plot).
    pub loss_per_alpha: Vec<(f64, f64)>,
    /// Per linear, the clip max value per `[row, group]` of the SCALED weight `W diag(s)`
    /// (empty when the clip search is off).
    pub clip: Vec<Array2<f32>>,
    /// Mean `|x|` per input channel.
    pub x_mean: Array1<f32>,
    /// Normalised mean `|w|` per input channel.
    pub w_mean: Array1<f32>,
}

/// AutoAWQ's weight statistic (see the module documentation).
///
/// ```
/// use ndarray::array;
/// use quantlab_grids::Granularity;
/// let w = array![[1.0f32, -2.0, 0.5, 0.5]];
/// let m = quantlab_solvers::awq::weight_mean(&[w.view()], Granularity::Group(2)).unwrap();
/// assert!((m[0] - 0.5).abs() < 1e-5 && (m[1] - 1.0).abs() < 1e-5 && (m[2] - 1.0).abs() < 1e-5);
/// ```
pub fn weight_mean(linears: &[ArrayView2<f32>], granularity: Granularity) -> Result<Array1<f32>> {
    let n = check_linears(linears, granularity)?;
    let mut acc = vec![0.0f64; n];
    let mut rows = 0usize;
    for W in linears {
        for row in W.rows() {
            rows += 1;
            let rowv = row.to_vec();
            // row-wise groups (the last one short when g does not divide n)
            for gi in 0..granularity.n_groups(n) {
                let cols = granularity.group_range(gi, n);
                let c0 = cols.start;
                let gr = &rowv[cols];
                let mx = gr.iter().fold(0.0f32, |m, v| m.max(v.abs())) + 1e-6;
                for (t, v) in gr.iter().enumerate() {
                    acc[c0 + t] += (v.abs() / mx) as f64;
                }
            }
        }
    }
    Ok(Array1::from_shape_fn(n, |j| (acc[j] / rows as f64) as f32))
}

fn check_linears(linears: &[ArrayView2<f32>], granularity: Granularity) -> Result<usize> {
    let Some(first) = linears.first() else {
        return Err(SolverError::InvalidOption {
            option: "linears".into(),
            detail: "AWQ needs at least one linear".into(),
        });
    };
    let n = first.ncols();
    for (i, W) in linears.iter().enumerate() {
        if W.ncols() != n {
            return Err(shape_err(
                "awq linears",
                format!(
                    "linear {i} has {} input columns, linear 0 has {n}",
                    W.ncols()
                ),
            ));
        }
        check_finite_view("weight", *W)?;
    }
    granularity.check("weight", n)?;
    Ok(n)
}

/// The candidate scales for exponent `a`.
pub fn candidate_scales(
    x_mean: &Array1<f32>,
    w_mean: &Array1<f32>,
    a: f64,
    duo_scaling: bool,
) -> Array1<f32> {
    let s = Array1::from_shape_fn(x_mean.len(), |j| {
        let x = (x_mean[j] as f64).powf(a);
        let v = if duo_scaling {
            x / ((w_mean[j] as f64).powf(1.0 - a) + 1e-4)
        } else {
            x
        };
        v.max(1e-4)
    });
    let mx = s.iter().cloned().fold(f64::MIN, f64::max);
    let mn = s.iter().cloned().fold(f64::MAX, f64::min);
    let norm = (mx * mn).sqrt();
    s.mapv(|v| (v / norm) as f32)
}

/// RTN of `W` with `format` by groups (pseudo-quantization, the dequantized values).
fn pseudo_quant(W: ArrayView2<f32>, format: &dyn Format, granularity: Granularity) -> Array2<f32> {
    let (out, n) = W.dim();
    let mut Q = Array2::<f32>::zeros((out, n));
    match granularity {
        Granularity::PerTensor => {
            let p = format.fit(&W.iter().copied().collect::<Vec<_>>());
            Q.zip_mut_with(&W, |q, &w| *q = format.quantize(w, p));
        }
        _ => {
            // rows in parallel; the last group is short when g does not divide n
            use rayon::prelude::*;
            let W = W.as_standard_layout();
            let w = W.as_slice().expect("standard layout");
            let q = Q.as_slice_mut().expect("fresh array");
            q.par_chunks_mut(n.max(1))
                .zip(w.par_chunks(n.max(1)))
                .for_each(|(qrow, wrow)| {
                    for gi in 0..granularity.n_groups(n) {
                        let cols = granularity.group_range(gi, n);
                        let p = format.fit(&wrow[cols.clone()]);
                        for k in cols {
                            qrow[k] = format.quantize(wrow[k], p);
                        }
                    }
                });
        }
    }
    Q
}

/// `Q(W diag(s)) diag(s)^-1` (the effective weight of a scaled, quantized linear).
pub fn scaled_pseudo_quant(
    W: ArrayView2<f32>,
    scales: &Array1<f32>,
    format: &dyn Format,
    granularity: Granularity,
) -> Array2<f32> {
    let Ws = &W * &scales.view().insert_axis(Axis(0));
    let mut Q = pseudo_quant(Ws.view(), format, granularity);
    Q /= &scales.view().insert_axis(Axis(0));
    Q
}

/// The default score of a candidate: `sum_l tr(D_l H D_l^T) / (2 sum out)`.
/// (`h`: `H` in f64, row-major, checked.)
fn output_mse(linears: &[ArrayView2<f32>], Qs: &[Array2<f32>], h: &[f64]) -> f64 {
    let mut num = 0.0;
    let mut rows = 0;
    for (W, Q) in linears.iter().zip(Qs) {
        num += crate::metrics::output_error_f64(*W, Q.view(), h);
        rows += W.nrows();
    }
    num / (2.0 * rows as f64)
}

/// The scale search alone: returns `(a, scales, loss per a)`. `loss`, when given, scores a
/// candidate from `(a, scales, effective weights of every linear)`; by default the output
/// error of the linears on `stats.H`.
pub fn search_scales(
    linears: &[ArrayView2<f32>],
    stats: &AwqStats,
    format: &dyn Format,
    params: &AwqParams,
    mut loss: Option<&mut CandidateLoss<'_>>,
) -> Result<ScaleSearch> {
    let n = check_linears(linears, params.granularity)?;
    if stats.x_mean.len() != n || stats.H.dim() != (n, n) {
        return Err(shape_err(
            "awq",
            format!(
                "the input statistics have dimension {} but the linears have {n} input columns",
                stats.x_mean.len()
            ),
        ));
    }
    if params.n_grid == 0 {
        return Err(SolverError::InvalidOption {
            option: "n_grid".into(),
            detail: "0: use a positive number of candidates (20)".into(),
        });
    }
    let w_mean = weight_mean(linears, params.granularity)?;
    // the default score's H, converted once for all candidates
    let h64 = match loss {
        Some(_) => Vec::new(),
        None => {
            crate::error::check_finite_view("hessian", stats.H.view())?;
            crate::metrics::f64_row_major(stats.H.view())
        }
    };
    let mut best: Option<(f64, Array1<f32>, f64)> = None;
    let mut curve = Vec::with_capacity(params.n_grid);
    for i in 0..params.n_grid {
        let a = i as f64 / params.n_grid as f64;
        let s = candidate_scales(&stats.x_mean, &w_mean, a, params.duo_scaling);
        let Qs: Vec<Array2<f32>> = linears
            .iter()
            .map(|W| scaled_pseudo_quant(*W, &s, format, params.granularity))
            .collect();
        let l = match loss.as_mut() {
            Some(f) => f(a, &s, &Qs),
            None => output_mse(linears, &Qs, &h64),
        };
        curve.push((a, l));
        if best.as_ref().is_none_or(|b| l < b.2) {
            best = Some((a, s, l));
        }
    }
    let (a, s, _) = best.expect("n_grid > 0");
    Ok((a, s, curve))
}

/// The clip searches' shared checks: `(out, in, groups per row, shrink candidates)`.
fn clip_setup(
    W: ArrayView2<f32>,
    H_clip: ArrayView2<f32>,
    params: &AwqParams,
) -> Result<(usize, usize, usize, usize)> {
    let (out, n) = W.dim();
    if H_clip.dim() != (n, n) {
        return Err(shape_err(
            "awq clip",
            format!("H is {:?} for {n} columns", H_clip.dim()),
        ));
    }
    params.granularity.check("weight", n)?;
    // AutoAWQ: range(int(max_shrink * n_grid))
    let steps = ((params.clip_max_shrink * params.clip_n_grid as f64) as usize).max(1);
    Ok((out, n, params.granularity.n_groups(n), steps))
}

/// The clip search on one (already scaled) weight `W [out, in]` with the (scaled) clip
/// Hessian: the best max value per `[row, group]` (see the module documentation).
///
/// The fast version of [`search_clip_reference`], with the same candidates and the same
/// choice: for each group and candidate, the errors `D` of every row at once, then
/// `1/2 diag(D H_gg D^T)` through one matrix product per candidate, the groups in parallel.
/// Only the summation order of the quadratic forms differs from the reference.
pub fn search_clip(
    W: ArrayView2<f32>,
    H_clip: ArrayView2<f32>,
    format: &dyn Format,
    params: &AwqParams,
) -> Result<Array2<f32>> {
    use rayon::prelude::*;
    let (out, n, n_groups, steps) = clip_setup(W, H_clip, params)?;
    let gran = params.granularity;
    let per_group: Vec<Vec<f32>> = (0..n_groups)
        .into_par_iter()
        .map(|gi| {
            let cols = gran.group_range(gi, n);
            let (c0, g) = (cols.start, cols.len());
            let h = faer::Mat::<f64>::from_fn(g, g, |a, b| H_clip[[c0 + a, c0 + b]] as f64);
            let org_max: Vec<f32> = (0..out)
                .map(|r| (0..g).fold(0.0f32, |m, t| m.max(W[[r, c0 + t]].abs())))
                .collect();
            let mut best_err = vec![f64::INFINITY; out];
            let mut best_max = org_max.clone();
            let mut d = faer::Mat::<f64>::zeros(out, g);
            let mut dh = faer::Mat::<f64>::zeros(out, g);
            let mut buf = vec![0f32; g];
            for i in 0..steps {
                for r in 0..out {
                    let mx = org_max[r] * (1.0 - i as f32 / params.clip_n_grid as f32);
                    for t in 0..g {
                        buf[t] = W[[r, c0 + t]].clamp(-mx, mx);
                    }
                    let p = format.fit(&buf);
                    for t in 0..g {
                        d[(r, t)] = (W[[r, c0 + t]] - format.quantize(buf[t], p)) as f64;
                    }
                }
                faer::linalg::matmul::matmul(
                    dh.as_mut(),
                    faer::Accum::Replace,
                    d.as_ref(),
                    h.as_ref(),
                    1.0,
                    faer::Par::Seq,
                );
                for r in 0..out {
                    let e = 0.5 * (0..g).map(|t| d[(r, t)] * dh[(r, t)]).sum::<f64>();
                    if e < best_err[r] {
                        best_err[r] = e;
                        best_max[r] = org_max[r] * (1.0 - i as f32 / params.clip_n_grid as f32);
                    }
                }
            }
            best_max
        })
        .collect();
    Ok(Array2::from_shape_fn((out, n_groups), |(r, gi)| {
        per_group[gi][r]
    }))
}

/// The clip search written as plainly as possible, one `[row, group]` at a time (the
/// reference of [`search_clip`], which must choose the same values).
pub fn search_clip_reference(
    W: ArrayView2<f32>,
    H_clip: ArrayView2<f32>,
    format: &dyn Format,
    params: &AwqParams,
) -> Result<Array2<f32>> {
    let (out, n, n_groups, steps) = clip_setup(W, H_clip, params)?;
    let gran = params.granularity;
    let mut best = Array2::<f32>::zeros((out, n_groups));
    let mut buf_full = vec![0f32; gran.group_len(n)];
    let mut d_full = vec![0f64; gran.group_len(n)];
    for r in 0..out {
        for gi in 0..n_groups {
            // the last group is short when g does not divide n
            let cols = gran.group_range(gi, n);
            let (c0, g) = (cols.start, cols.len());
            let (buf, d) = (&mut buf_full[..g], &mut d_full[..g]);
            let org_max = (0..g).fold(0.0f32, |m, t| m.max(W[[r, c0 + t]].abs()));
            let mut best_err = f64::INFINITY;
            let mut best_max = org_max;
            for i in 0..steps {
                let mx = org_max * (1.0 - i as f32 / params.clip_n_grid as f32);
                for t in 0..g {
                    buf[t] = W[[r, c0 + t]].clamp(-mx, mx);
                }
                let p = format.fit(buf);
                for t in 0..g {
                    d[t] = (W[[r, c0 + t]] - format.quantize(buf[t], p)) as f64;
                }
                // 1/2 d^T H_gg d = mean over tokens of the partial output error
                let mut e = 0.0;
                for a in 0..g {
                    let mut s = 0.0;
                    for b in 0..g {
                        s += H_clip[[c0 + a, c0 + b]] as f64 * d[b];
                    }
                    e += d[a] * s;
                }
                e *= 0.5;
                if e < best_err {
                    best_err = e;
                    best_max = mx;
                }
            }
            best[[r, gi]] = best_max;
        }
    }
    Ok(best)
}

/// `W diag(s)` clamped per `[row, group]` to `[-clip, clip]`: the weight to quantize after
/// AWQ (`clip` from [`AwqResult::clip`], or `None`).
pub fn apply(
    W: ArrayView2<f32>,
    scales: &Array1<f32>,
    clip: Option<&Array2<f32>>,
    granularity: Granularity,
) -> Array2<f32> {
    let mut Ws = &W * &scales.view().insert_axis(Axis(0));
    if let Some(c) = clip {
        let g = granularity.group_len(W.ncols());
        for ((r, k), v) in Ws.indexed_iter_mut() {
            let m = c[[r, k / g]];
            *v = v.clamp(-m, m);
        }
    }
    Ws
}

/// Both searches with the default scoring. See [`awq_with_loss`].
///
/// ```
/// use quantlab_grids::{Granularity, UniformGrid};
/// use quantlab_solvers::awq::{awq, AwqParams, AwqStats};
/// use quantlab_solvers::synth;
/// let X = synth::correlated_inputs(128, 32, 3, 2);
/// let W = synth::random_weight(8, 32, 4);
/// let stats = AwqStats::from_inputs(X.view(), 512).unwrap();
/// let grid = UniformGrid::new(3, false).unwrap();
/// let p = AwqParams { granularity: Granularity::Group(16), ..Default::default() };
/// let r = awq(&[W.view()], &stats, &grid, &p).unwrap();
/// assert_eq!(r.loss_per_alpha.len(), 20);
/// // the chosen a is the best of the curve, never worse than a = 0 (plain RTN when duo scaling is off)
/// let best = r.loss_per_alpha.iter().map(|p| p.1).fold(f64::INFINITY, f64::min);
/// assert!(best <= r.loss_per_alpha[0].1);
/// assert_eq!(r.clip[0].dim(), (8, 2));
/// ```
pub fn awq(
    linears: &[ArrayView2<f32>],
    stats: &AwqStats,
    format: &dyn Format,
    params: &AwqParams,
) -> Result<AwqResult> {
    awq_with_loss(linears, stats, format, params, None)
}

/// Scale search (scored by `loss` when given), then the clip search of every linear on the
/// scaled weights and scaled clip Hessian `diag(s)^-1 H_clip diag(s)^-1`.
pub fn awq_with_loss(
    linears: &[ArrayView2<f32>],
    stats: &AwqStats,
    format: &dyn Format,
    params: &AwqParams,
    loss: Option<&mut CandidateLoss<'_>>,
) -> Result<AwqResult> {
    let (alpha, scales, loss_per_alpha) = search_scales(linears, stats, format, params, loss)?;
    let mut clip = Vec::new();
    if params.clip {
        let n = scales.len();
        let Hs = Array2::from_shape_fn((n, n), |(i, j)| {
            stats.H_clip[[i, j]] / (scales[i] * scales[j])
        });
        for W in linears {
            let Ws = apply(*W, &scales, None, params.granularity);
            clip.push(search_clip(Ws.view(), Hs.view(), format, params)?);
        }
    }
    Ok(AwqResult {
        alpha,
        scales,
        loss_per_alpha,
        clip,
        x_mean: stats.x_mean.clone(),
        w_mean: weight_mean(linears, params.granularity)?,
    })
}
