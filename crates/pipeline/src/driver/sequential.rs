//! The one sequential block solver, over a per-architecture description ([`BlockArch`]):
//! for each true-sequential group of a block (or all its linears at once for the methods that
//! do not depend on the order), the architecture captures the inputs of the group's linears
//! with the groups before it already quantized, into one Hessian per distinct input; each
//! linear is then solved ([`solve`]), reported and put back into the model. The LLaMA family
//! ([`super::stages::LlamaRun`]: one staged forward per block) and BERT encoders
//! ([`crate::bert`]: a forward with hooks per group) are the two descriptions.

use std::time::Instant;

use indicatif::ProgressBar;
use ndarray::{Array1, Array2, ArrayView2, Axis};
use quantlab_grids::QuantizedLinear;
use quantlab_solvers::hessian::Hessian;
use quantlab_solvers::rel_output_error;

use super::stages::{report, solve, Control};
use crate::config::{LayerPlan, QuantizeConfig};
use crate::report::{LayerReport, QuantizedLayer, Timings};
use crate::{PipelineError, Result};

/// Per block: each linear's result as the driver collects it (`None`: skipped).
pub(crate) type BlockOut = [Option<(QuantizedLayer, LayerReport)>];

/// What the sequential solver needs of an architecture.
pub(crate) trait BlockArch {
    /// The linears of a block, in forward order (their names inside the block).
    fn linears(&self) -> &'static [&'static str];
    /// The true-sequential groups, in forward order (indices into [`BlockArch::linears`]);
    /// the linears of a group read one input.
    fn groups(&self) -> &'static [&'static [usize]];
    /// The linear whose input linear `k` reads (q, k and v read q's).
    fn input_of(&self, k: usize) -> usize;
    /// One Hessian per entry of `targets` (linears of block `i`, one per distinct input) over
    /// the calibration batches. `group: Some(g)`: the inputs of true-sequential group `g`,
    /// called for every group in order, with the linears of the groups before it already
    /// installed (`targets` empty when all of the group is skipped: the architecture still
    /// advances); `None`: every input in one pass with the block's current weights.
    fn capture(
        &mut self,
        i: usize,
        group: Option<usize>,
        targets: &[usize],
        t: &mut Timings,
    ) -> Result<Vec<Hessian>>;
    /// The weight `[out, in]` of the linear `name`.
    fn weight(&self, name: &str) -> Result<Array2<f32>>;
    /// Puts a quantized linear into the model: `mem` is its dequantized weight as the model
    /// holds it (divided by `col_div` per input column when given).
    fn install(
        &mut self,
        name: &str,
        lin: &QuantizedLinear,
        col_div: Option<&Array1<f32>>,
        mem: ArrayView2<f32>,
    ) -> Result<()>;
}

/// One block's job for [`solve_block`].
pub(crate) struct BlockJob<'a> {
    /// Block index.
    pub i: usize,
    /// The plans of the block's linears.
    pub lps: &'a [LayerPlan],
    pub cfg: &'a QuantizeConfig,
    /// AWQ+GPTQ: the scaled weights `W'` of the block's linears and, for the linears fed by a
    /// norm, the scale `s` their in-memory weight is divided by; their captured inputs are
    /// then the unscaled `x`, whose scaled-domain Hessian is `diag(1/s) H diag(1/s)`.
    pub scaled: Option<(&'a [Array2<f32>], &'a [Option<Array1<f32>>])>,
    pub bar: &'a ProgressBar,
    pub ctl: &'a Control<'a>,
}

/// The distinct inputs of `active`, one linear each, in order.
fn distinct_inputs(arch: &dyn BlockArch, active: &[usize]) -> Vec<usize> {
    let mut targets: Vec<usize> = Vec::new();
    for &k in active {
        if !targets
            .iter()
            .any(|&x| arch.input_of(x) == arch.input_of(k))
        {
            targets.push(k);
        }
    }
    targets
}

fn label(arch: &dyn BlockArch, kinds: &[usize]) -> String {
    kinds
        .iter()
        .map(|&k| arch.linears()[k].rsplit('.').next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join(",")
}

/// GPTQ or RTN on the linears of block `j.i`: group by group in the true-sequential order
/// for the GPTQ methods, one capture of every input otherwise.
pub(crate) fn solve_block(
    arch: &mut dyn BlockArch,
    j: &BlockJob<'_>,
    out: &mut BlockOut,
    t: &mut Timings,
) -> Result<()> {
    let n = arch.linears().len();
    if !j.cfg.method.true_sequential() {
        let active: Vec<usize> = (0..n).filter(|&k| !j.lps[k].skip).collect();
        if active.is_empty() {
            return Ok(());
        }
        let targets = distinct_inputs(arch, &active);
        j.bar
            .set_message(format!("block {}: capturing {}", j.i, label(arch, &active)));
        let hs = arch.capture(j.i, None, &targets, t)?;
        return solve_group(arch, j, &active, &targets, &hs, out, t);
    }
    for (g, group) in arch.groups().iter().enumerate() {
        j.ctl.check()?;
        let active: Vec<usize> = group.iter().copied().filter(|&k| !j.lps[k].skip).collect();
        if !active.is_empty() {
            j.bar.set_message(format!(
                "block {}: Hessian of {}",
                j.i,
                label(arch, &active)
            ));
        }
        let targets = distinct_inputs(arch, &active);
        let hs = arch.capture(j.i, Some(g), &targets, t)?;
        solve_group(arch, j, &active, &targets, &hs, out, t)?;
    }
    Ok(())
}

/// Every linear of `active`, each with the Hessian of its input (`hs[p]` for `targets[p]`).
fn solve_group(
    arch: &mut dyn BlockArch,
    j: &BlockJob<'_>,
    active: &[usize],
    targets: &[usize],
    hs: &[Hessian],
    out: &mut BlockOut,
    t: &mut Timings,
) -> Result<()> {
    for &k in active {
        let p = targets
            .iter()
            .position(|&x| arch.input_of(x) == arch.input_of(k))
            .expect("every active linear's input is captured");
        solve_one(arch, j, k, &hs[p], out, t)?;
    }
    Ok(())
}

/// Linear `k` of the block with the Hessian of its input.
fn solve_one(
    arch: &mut dyn BlockArch,
    j: &BlockJob<'_>,
    k: usize,
    Hacc: &Hessian,
    out: &mut BlockOut,
    t: &mut Timings,
) -> Result<()> {
    j.ctl.check()?;
    let lp = &j.lps[k];
    j.bar
        .set_message(format!("block {}: {}", j.i, arch.linears()[k]));
    let ts = Instant::now();
    let norm_s = j.scaled.and_then(|(_, ns)| ns[k].as_ref());
    let H = match norm_s {
        Some(s) => scale_hessian(&Hacc.finish(), s),
        None => Hacc.finish(),
    };
    let W = match j.scaled {
        Some((ws, _)) => ws[k].clone(),
        None => arch.weight(&lp.name)?,
    };
    let (lin, rep) = solve(lp, j.cfg.method, j.cfg, W.view(), Some(H.view()), None)?;
    let mut Qw = lin.dequantize();
    let rel = rel_output_error(W.view(), Qw.view(), H.view())
        .map_err(|e| PipelineError::solver(&lp.name, e))?;
    if let Some(s) = norm_s {
        Qw /= &s.view().insert_axis(Axis(0));
    }
    arch.install(&lp.name, &lin, norm_s, Qw.view())?;
    let secs = ts.elapsed().as_secs_f64();
    t.solver += secs;
    let r = report(lp, Some(&lin), Some(&rep), rel, secs);
    out[k] = Some((
        QuantizedLayer {
            name: lp.name.clone(),
            linear: Some(lin),
            input_scale: None,
            norm_scale: None,
        },
        r,
    ));
    j.bar.inc(1);
    Ok(())
}

/// `diag(1/s) H diag(1/s)`: the Hessian of inputs divided by `s`.
pub(crate) fn scale_hessian(H: &Array2<f32>, s: &Array1<f32>) -> Array2<f32> {
    let n = s.len();
    Array2::from_shape_fn((n, n), |(i, j)| H[[i, j]] / (s[i] * s[j]))
}
