//! The sequential layer-wise driver (GPTQ paper, section 4 "Implementation" / the reference
//! `llama_sequential`): calibration windows are embedded once; then, block after block, the
//! inputs of the block's linears are captured with a [`quantlab_models::CaptureHook`], accumulated into one
//! Hessian per distinct input (q/k/v share one, gate/up share one, o, down), the linears are
//! quantized and replaced, and the block is run again with its quantized weights to give the
//! next block's inputs. Only the hidden states at the current block boundary are kept (one
//! `[windows, seqlen, hidden]` set); the calibration windows go through the block in
//! mini-batches.
//!
//! # True-sequential order (GPTQ methods)
//! Groups `[q, k, v]`, `[o]`, `[gate, up]`, `[down]`: each group's inputs are computed with the
//! groups before it already quantized. The block is run once, stage by stage: the normed
//! input (q, k, v's Hessian, then they are quantized), the attention with the quantized
//! q, k, v (o's), the post-attention norm of the residual with the quantized o (gate and
//! up's), `silu(gate) * up` (down's), and the block output with every linear quantized, which
//! is the next block's input. One block forward per block, as the captures of a forward with
//! hooks would give, without re-running the earlier stages.
//!
//! # RTN-like methods (rtn, nf4, fp4, int8, fp8)
//! Their weights do not depend on the data: one capture per block (all four inputs, the
//! block's float weights) measures each layer's output error.
//!
//! # AWQ (AutoAWQ's order inside a block)
//! A float forward of the first `awq_samples` windows (the search subset) captures the
//! statistics of the four inputs (mean `|x|`, `H`, and 512 stride-sampled rows for the clip
//! search). The scales are searched on the float block:
//! `input_layernorm -> [q, k, v]` scored on the attention output (the residual after
//! attention, i.e. the block output without its MLP), `v -> o` (only without grouped-query attention; otherwise skipped) scored on
//! `o`'s output, `post_attention_layernorm -> [gate, up]` scored on the block output, and
//! `up -> down` scored on `down`'s output; the block-level scores use the first
//! `awq_samples` windows, and each candidate re-runs the block only from the stage whose
//! linears it changes. Then all scales are applied. `awq`: the clip search runs on every
//! linear but q and k (scaled weights, scaled inputs), then RTN; the quantized block is run
//! again for the next block's inputs. `awq+gptq`: the scaled block
//! (still the same function) is put in memory and GPTQ runs on the scaled weights in the
//! true-sequential order above, each group's Hessians captured with the groups before it
//! quantized and taken to the scaled domain (`diag(1/s) H diag(1/s)` for the linears fed by a
//! norm); it skips the clipping, since GPTQ fits each group's range as it sweeps.
//! In memory the norms stay as they are and the linears fed by a norm hold
//! `Q(W diag(s)) diag(1/s)`; the saved checkpoint folds `1/s` into the norm instead.
//!
//! # One solver, two architectures
//! The block solver (`sequential::solve_block`) runs on a per-architecture description
//! (`sequential::BlockArch`: the block's linears, their true-sequential groups, which input
//! each reads, how a group's inputs are captured, how a quantized linear is put back). The
//! LLaMA family's description runs the staged forward above; BERT's ([`crate::bert`])
//! captures each group with a forward over hooks.
#![allow(non_snake_case)]

mod awq_search;
pub(crate) mod sequential;
mod stages;

use awq_search::*;
pub use stages::Control;
use stages::*;
pub(crate) use stages::{report, solve};

use std::collections::BTreeMap;
use std::time::Instant;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use ndarray::Array1;
use quantlab_models::{LlamaModel, BLOCK_LINEARS};

use crate::config::{Plan, QuantizeConfig};
pub use crate::report::{LayerReport, QuantizedLayer, Timings};
pub use crate::tensors::{to_array, to_tensor, with_view};
use crate::{PipelineError, Result};

/// What the driver returns besides the modified model.
#[derive(Clone, Debug)]
pub struct DriverOutput {
    /// One entry per block linear, forward order.
    pub layers: Vec<QuantizedLayer>,
    /// One report per block linear.
    pub reports: Vec<LayerReport>,
    /// AWQ: norm tensor name -> scale to divide the norm weight by in the checkpoint.
    pub norm_scales: BTreeMap<String, Array1<f32>>,
    /// Where the time went.
    pub timings: Timings,
}

fn bars(plan: &Plan, n_blocks: usize, show: bool) -> (MultiProgress, ProgressBar, ProgressBar) {
    let mp = MultiProgress::with_draw_target(if show {
        ProgressDrawTarget::stderr()
    } else {
        ProgressDrawTarget::hidden()
    });
    let style = |t: &str| {
        ProgressStyle::with_template(t)
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ")
    };
    let blocks = mp.add(ProgressBar::new(n_blocks as u64));
    blocks.set_style(style(
        "blocks  [{bar:30}] {pos}/{len}  {elapsed_precise} ETA {eta_precise}  {msg}",
    ));
    let n_lin = plan.layers.iter().filter(|l| !l.skip).count();
    let layers = mp.add(ProgressBar::new(n_lin as u64));
    layers.set_style(style("linears [{bar:30}] {pos}/{len}  ETA {eta}  {msg}"));
    (mp, blocks, layers)
}

/// Quantizes every block linear of `model` in place (see the module documentation), with
/// `windows` as calibration (equally long token sequences).
pub fn quantize_model(
    model: &mut LlamaModel,
    windows: &[Vec<u32>],
    plan: &Plan,
    cfg: &QuantizeConfig,
    ctl: Control<'_>,
) -> Result<DriverOutput> {
    let t_all = Instant::now();
    let n_blocks = model.n_blocks();
    if plan.layers.len() != n_blocks * BLOCK_LINEARS.len() {
        return Err(PipelineError::option(
            "plan",
            format!(
                "the plan has {} linears, the model {}",
                plan.layers.len(),
                n_blocks * BLOCK_LINEARS.len()
            ),
        ));
    }
    if windows.is_empty() {
        if cfg.method.needs_calibration() {
            return Err(PipelineError::option(
                "calibration",
                format!(
                    "{} needs calibration windows (its weights depend on the data)",
                    cfg.method.name()
                ),
            ));
        }
        return quantize_data_free(model, plan, cfg, ctl, t_all);
    }
    let seqlen = windows[0].len();
    if windows.iter().any(|w| w.len() != seqlen) {
        return Err(PipelineError::option(
            "calibration",
            "windows must be equally long",
        ));
    }
    let mut t = Timings::default();
    let (_mp, bar_blocks, bar_layers) = bars(plan, n_blocks, ctl.progress);

    // embed in mini-batches
    let t0 = Instant::now();
    let mut inps = Vec::new();
    for chunk in windows.chunks(cfg.batch_size.max(1)) {
        let refs: Vec<&[u32]> = chunk.iter().map(|w| w.as_slice()).collect();
        inps.push(model.embed(&refs)?);
    }
    t.forward += t0.elapsed().as_secs_f64();

    let mut layers: Vec<QuantizedLayer> = Vec::new();
    let mut reports: Vec<LayerReport> = Vec::new();
    let mut norm_scales = BTreeMap::new();
    for i in 0..n_blocks {
        ctl.check()?;
        bar_blocks.set_message(format!("block {i}"));
        let lps = &plan.layers[i * 7..(i + 1) * 7];
        let mut out: Vec<Option<(QuantizedLayer, LayerReport)>> = vec![None; 7];
        let next = if cfg.method.uses_awq() {
            awq_block(
                model,
                i,
                &inps,
                lps,
                cfg,
                &mut out,
                &mut norm_scales,
                &mut t,
                &bar_layers,
                &ctl,
            )?
        } else {
            solve_block(
                model,
                i,
                &inps,
                lps,
                cfg,
                None,
                &mut out,
                &mut t,
                &bar_layers,
                &ctl,
            )?
        };
        for (k, o) in out.into_iter().enumerate() {
            let (ql, r) = o.unwrap_or_else(|| {
                let lp = &lps[k];
                (
                    QuantizedLayer {
                        name: lp.name.clone(),
                        linear: None,
                        input_scale: None,
                        norm_scale: None,
                    },
                    report(lp, None, None, 0.0, 0.0),
                )
            });
            layers.push(ql);
            reports.push(r);
        }
        // the quantized block's output is the next block's input
        if let (Some(next), true) = (next, i + 1 < n_blocks) {
            inps = next;
        } else if i + 1 < n_blocks {
            ctl.check()?;
            bar_layers.set_message(format!("block {i}: output"));
            let tf = Instant::now();
            inps = forward_all(model, i, &inps, None)?;
            t.forward += tf.elapsed().as_secs_f64();
        }
        bar_blocks.inc(1);
    }
    bar_layers.finish_and_clear();
    bar_blocks.finish_and_clear();
    t.total = t_all.elapsed().as_secs_f64();
    Ok(DriverOutput {
        layers,
        reports,
        norm_scales,
        timings: t,
    })
}

/// RTN-like methods without calibration (as llama.cpp quantizes without an imatrix, and
/// bitsandbytes always): every linear is rounded from its weights alone, no forward pass is
/// run, and each report's `rel_output_error` is the relative error of the weights,
/// `||W - Q||^2 / ||W||^2` (the output error for white inputs, `H = I`), marked by
/// `error_basis: "weights"`. With an importance matrix file (`cfg.imatrix`) RTN on the ggml
/// grids weighs each block by it and the error is weighted per input column by the same
/// importance (`error_basis: "imatrix"`).
fn quantize_data_free(
    model: &mut LlamaModel,
    plan: &Plan,
    cfg: &QuantizeConfig,
    ctl: Control<'_>,
    t_all: Instant,
) -> Result<DriverOutput> {
    let mut t = Timings::default();
    let (_mp, bar_blocks, bar_layers) = bars(plan, model.n_blocks(), ctl.progress);
    let mut layers = Vec::with_capacity(plan.layers.len());
    let mut reports = Vec::with_capacity(plan.layers.len());
    let imatrix = match &cfg.imatrix {
        Some(f) => Some((f, crate::imatrix::read_imatrix(f)?)),
        None => None,
    };
    for lp in &plan.layers {
        ctl.check()?;
        if lp.skip {
            layers.push(QuantizedLayer {
                name: lp.name.clone(),
                linear: None,
                input_scale: None,
                norm_scale: None,
            });
            reports.push(report(lp, None, None, 0.0, 0.0));
            continue;
        }
        bar_layers.set_message(lp.name.clone());
        let ts = Instant::now();
        let W = weight_of(model, &lp.name)?;
        let imp = match &imatrix {
            Some((f, m)) => Some(crate::imatrix::importance_for(m, f, &lp.name, W.ncols())?),
            None => None,
        };
        let (lin, rep) = solve(lp, cfg.method, cfg, W.view(), None, imp.as_deref())?;
        let Qw = lin.dequantize();
        // the error of the weights, weighted per input column by the importance when given
        let (mut num, mut den) = (0f64, 0f64);
        for (wr, qr) in W.rows().into_iter().zip(Qw.rows()) {
            for (k, (&w, &q)) in wr.iter().zip(qr.iter()).enumerate() {
                let c = imp.as_ref().map_or(1.0, |v| v[k].max(0.0) as f64);
                num += c * ((w - q) as f64).powi(2);
                den += c * (w as f64).powi(2);
            }
        }
        install(model, cfg.lazy, &lp.name, Some(&lin), None, Qw.view())?;
        let secs = ts.elapsed().as_secs_f64();
        t.solver += secs;
        let mut r = report(
            lp,
            Some(&lin),
            Some(&rep),
            num / den.max(f64::MIN_POSITIVE),
            secs,
        );
        r.error_basis = if imp.is_some() { "imatrix" } else { "weights" };
        layers.push(QuantizedLayer {
            name: lp.name.clone(),
            linear: Some(lin),
            input_scale: None,
            norm_scale: None,
        });
        reports.push(r);
        bar_layers.inc(1);
        if lp.name.ends_with(BLOCK_LINEARS[DOWN]) {
            bar_blocks.inc(1);
        }
    }
    bar_layers.finish_and_clear();
    bar_blocks.finish_and_clear();
    t.total = t_all.elapsed().as_secs_f64();
    Ok(DriverOutput {
        layers,
        reports,
        norm_scales: BTreeMap::new(),
        timings: t,
    })
}
