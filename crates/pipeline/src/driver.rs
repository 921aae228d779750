//! The sequential layer-wise driver (GPTQ paper, section 4 "Implementation" / the reference
//! `llama_sequential`): calibration windows are embedded once; then, block after block, the
//! inputs of the block's linears are captured with a [`CaptureHook`], accumulated into one
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
//! One float forward captures the statistics of the four inputs (mean `|x|`, `H`, and 512
//! stride-sampled rows for the clip search). The scales are searched on the float block:
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
#![allow(non_snake_case)]

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use candle_core::Tensor;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use ndarray::{Array1, Array2, ArrayView2, Axis};
use quantlab_grids::QuantizedLinear;
use quantlab_models::{CaptureHook, CodesLinear, LlamaModel, BLOCK_LINEARS};
use quantlab_solvers::awq::{self, AwqParams, AwqStats};
use quantlab_solvers::gptq::{gptq, GptqParams, GroupFit};
use quantlab_solvers::hessian::{Counting, Hessian};
use quantlab_solvers::rtn::{rtn, rtn_imatrix};
use quantlab_solvers::{rel_output_error, SolveReport};

use crate::config::{LayerPlan, Method, Plan, QuantizeConfig};
use crate::error::TensorContext;
pub use crate::report::{LayerReport, QuantizedLayer, Timings};
pub use crate::tensors::{to_array, to_tensor, with_view};
use crate::{PipelineError, Result};

/// Indices into [`BLOCK_LINEARS`].
const Q: usize = 0;
const K: usize = 1;
const V: usize = 2;
const O: usize = 3;
const GATE: usize = 4;
const UP: usize = 5;
const DOWN: usize = 6;

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

/// How the driver talks to the outside: progress bars and cancellation.
#[derive(Clone, Copy, Debug, Default)]
pub struct Control<'a> {
    /// Draw progress bars on stderr.
    pub progress: bool,
    /// Set (e.g. by a Ctrl-C handler) to stop at the next layer boundary with
    /// [`PipelineError::Interrupted`].
    pub cancel: Option<&'a AtomicBool>,
}

impl Control<'_> {
    fn check(&self) -> Result<()> {
        match self.cancel {
            Some(c) if c.load(Ordering::Relaxed) => Err(PipelineError::Interrupted),
            _ => Ok(()),
        }
    }
}

fn block_name(block: usize, kind: usize) -> String {
    format!("model.layers.{block}.{}", BLOCK_LINEARS[kind])
}

/// Block `i` on every mini-batch.
fn forward_all(
    model: &LlamaModel,
    i: usize,
    inps: &[Tensor],
    mut hook: Option<&mut CaptureHook<'_>>,
) -> Result<Vec<Tensor>> {
    inps.iter()
        .map(|h| Ok(model.block_forward(i, h, 0, None, hook.as_deref_mut())?))
        .collect()
}

/// Mean squared difference of two lists of equally shaped tensors.
fn mse(a: &[Tensor], b: &[Tensor]) -> Result<f64> {
    let mut s = 0.0;
    let mut n = 0usize;
    for (x, y) in a.iter().zip(b) {
        let d = (x - y)
            .and_then(|d| d.sqr())
            .and_then(|d| d.sum_all())
            .and_then(|d| d.to_scalar::<f32>())
            .ctx("awq loss")?;
        s += d as f64;
        n += x.elem_count();
    }
    Ok(s / n.max(1) as f64)
}

/// The statistics captured for one input of a block.
struct Capture {
    H: Hessian,
    abs_sum: Vec<f64>,
    clip_rows: Vec<f32>,
    rows_seen: usize,
}

impl Capture {
    fn new(dim: usize) -> Self {
        Self {
            H: Hessian::new(dim).with_counting(Counting::Tokens),
            abs_sum: Vec::new(),
            clip_rows: Vec::new(),
            rows_seen: 0,
        }
    }

    /// AWQ's statistics of a batch: `sum |x|` per column (in f64, each column summed row by
    /// row; column blocks in parallel) and every `stride`-th row for the clip search.
    fn add_awq_rows(&mut self, X: ArrayView2<f32>, stride: usize) {
        use rayon::prelude::*;
        let d = X.ncols();
        if self.abs_sum.is_empty() {
            self.abs_sum = vec![0.0; d];
        }
        let xs = X.as_slice().expect("captured inputs are row-major");
        const COLS: usize = 64;
        self.abs_sum
            .par_chunks_mut(COLS)
            .enumerate()
            .for_each(|(b, acc)| {
                let (j0, n) = (b * COLS, acc.len());
                for row in xs.chunks(d) {
                    for (a, &v) in acc.iter_mut().zip(&row[j0..j0 + n]) {
                        *a += v.abs() as f64;
                    }
                }
            });
        for row in X.rows() {
            if self.rows_seen % stride == 0 {
                self.clip_rows.extend(row.iter());
            }
            self.rows_seen += 1;
        }
    }

    fn awq_stats(&self) -> Result<AwqStats> {
        let d = self.H.dim();
        let t = self.H.tokens().max(1) as f64;
        let x_mean = Array1::from_shape_fn(d, |j| (self.abs_sum[j] / t) as f32);
        let rows = self.clip_rows.len() / d;
        let X = ArrayView2::from_shape((rows, d), &self.clip_rows).expect("whole rows");
        let mut hc = Hessian::new(d).with_counting(Counting::Tokens);
        hc.add_batch(X, 1)
            .map_err(|e| PipelineError::solver("awq clip sample", e))?;
        Ok(AwqStats {
            x_mean,
            H: self.H.finish(),
            H_clip: hc.finish(),
        })
    }
}

/// Captures the inputs of the `targets` linears of block `i` over every mini-batch. With `awq`, also mean `|x|` and every `clip_stride`-th
/// row for the clip search.
fn capture(
    model: &mut LlamaModel,
    i: usize,
    inps: &[Tensor],
    targets: &[usize],
    awq: Option<usize>,
    t: &mut Timings,
) -> Result<BTreeMap<usize, Capture>> {
    let t0 = Instant::now();
    let names: Vec<String> = targets.iter().map(|&k| block_name(i, k)).collect();
    let mut caps: BTreeMap<usize, Capture> = BTreeMap::new();
    for &k in targets {
        let l = model.linear(&block_name(i, k))?;
        caps.insert(k, Capture::new(l.in_features()));
    }
    let caps = RefCell::new(caps);
    let err: RefCell<Option<PipelineError>> = RefCell::new(None);
    let hess_s = Cell::new(0.0f64);
    let seqs = inps.first().map_or(1, |h| h.dims()[0]);
    {
        let mut hook = CaptureHook::new(names.clone(), |name: &str, x: &Tensor| {
            if err.borrow().is_some() {
                return;
            }
            let th = Instant::now();
            let k = names
                .iter()
                .position(|n| n == name)
                .map(|p| targets[p])
                .expect("hooked name");
            let r = with_view(x, |X| {
                let mut caps = caps.borrow_mut();
                let c = caps.get_mut(&k).expect("capture");
                c.H.add_batch(X, seqs)
                    .map_err(|e| PipelineError::solver(name, e))?;
                if let Some(stride) = awq {
                    c.add_awq_rows(X, stride);
                }
                Ok(())
            });
            if let Err(e) = r {
                *err.borrow_mut() = Some(e);
            }
            hess_s.set(hess_s.get() + th.elapsed().as_secs_f64());
        });
        forward_all(model, i, inps, Some(&mut hook))?;
    }
    if let Some(e) = err.into_inner() {
        return Err(e);
    }
    let total = t0.elapsed().as_secs_f64();
    t.hessian += hess_s.get();
    t.forward += total - hess_s.get();
    Ok(caps.into_inner())
}

fn weight_of(model: &LlamaModel, name: &str) -> Result<Array2<f32>> {
    to_array(&model.linear(name)?.weight()?)
}

/// Puts a quantized linear into the model: its dequantized weight `mem` (f32), or with
/// `cfg.lazy` its codes (`col_div` as in [`CodesLinear`]).
fn install(
    model: &mut LlamaModel,
    cfg: &QuantizeConfig,
    name: &str,
    lin: Option<&QuantizedLinear>,
    col_div: Option<&Array1<f32>>,
    mem: ArrayView2<f32>,
) -> Result<()> {
    match lin {
        Some(q) if cfg.lazy => {
            let bias = model.linear(name)?.bias();
            let new = CodesLinear::new(q.clone(), col_div.map(|s| s.to_vec()), bias);
            model.replace_linear(name, Box::new(new))?;
            Ok(())
        }
        _ => set(model, name, mem),
    }
}

fn set(model: &mut LlamaModel, name: &str, w: ArrayView2<f32>) -> Result<()> {
    model.set_weight(name, to_tensor(w)?)?;
    Ok(())
}

/// Quantize one weight with the plan's solver: GPTQ for the GPTQ methods (which need `H`),
/// RTN otherwise; on a ggml block grid RTN is importance-weighted by `diag(H)` when `H` is
/// given (llama.cpp's imatrix), plain without it.
pub(crate) fn solve(
    lp: &LayerPlan,
    method: Method,
    cfg: &QuantizeConfig,
    W: ArrayView2<f32>,
    H: Option<ArrayView2<f32>>,
) -> Result<(QuantizedLinear, SolveReport)> {
    let (lin, rep) = if method.uses_gptq() {
        let ggml = matches!(lp.spec, quantlab_grids::FormatSpec::Ggml(_));
        let p = GptqParams {
            block_size: cfg.block_size.unwrap_or(128),
            damp_percent: lp.damp,
            act_order: lp.act_order,
            static_groups: cfg.static_groups,
            granularity: lp.granularity,
            // ggml's block grids: each block's scale by the importance-weighted search (as
            // weighted RTN), and the Hessian shrunk toward its diagonal (issue 18)
            group_fit: if ggml {
                GroupFit::HessianDiag
            } else {
                GroupFit::Plain
            },
            hessian_shrink: cfg.hessian_shrink_for(&lp.spec),
            ..Default::default()
        };
        let H = H.ok_or_else(|| {
            PipelineError::option("calibration", format!("{}: GPTQ needs a Hessian", lp.name))
        })?;
        gptq(W, H, &lp.spec, &p)
    } else if let quantlab_grids::FormatSpec::Ggml(grid) = lp.spec {
        rtn_imatrix(W, grid, H)
    } else {
        rtn(W, None, &lp.spec, lp.granularity)
    }
    .map_err(|e| PipelineError::solver(&lp.name, e))?;
    let lin = match cfg.double_quant() {
        Some(dq) => lin.with_double_quant(dq)?,
        None => lin,
    };
    Ok((lin, rep))
}

pub(crate) fn report(
    lp: &LayerPlan,
    lin: Option<&QuantizedLinear>,
    rep: Option<&SolveReport>,
    rel: f64,
    seconds: f64,
) -> LayerReport {
    LayerReport {
        name: lp.name.clone(),
        shape: lp.shape,
        skipped: lp.skip,
        format: if lp.skip {
            "f32".into()
        } else {
            lp.spec.build().name()
        },
        bits: if lp.skip {
            16
        } else {
            lp.spec.build().code_bits()
        },
        group_size: lp.group_size,
        rel_output_error: rel,
        damp: rep.map_or(0.0, |r| r.damp),
        damp_percent: rep.map_or(0.0, |r| r.damp_percent),
        damp_retries: rep.map_or(0, |r| r.damp_retries.len()),
        seconds,
        bits_per_weight: lin.map_or(16.0, |l| l.bits_per_weight()),
        awq_alpha: None,
        error_basis: "calibration",
    }
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
    let total_rows = windows.len() * seqlen;
    let clip_stride = (total_rows / 512).max(1);

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
                clip_stride,
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
/// `error_basis: "weights"`.
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
        let (lin, rep) = solve(lp, cfg.method, cfg, W.view(), None)?;
        let Qw = lin.dequantize();
        let (mut num, mut den) = (0f64, 0f64);
        for (&w, &q) in W.iter().zip(Qw.iter()) {
            num += ((w - q) as f64).powi(2);
            den += (w as f64).powi(2);
        }
        install(model, cfg, &lp.name, Some(&lin), None, Qw.view())?;
        let secs = ts.elapsed().as_secs_f64();
        t.solver += secs;
        let mut r = report(
            lp,
            Some(&lin),
            Some(&rep),
            num / den.max(f64::MIN_POSITIVE),
            secs,
        );
        r.error_basis = "weights";
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

/// Per block: the seven linears' results as the driver collects them.
type BlockOut = [Option<(QuantizedLayer, LayerReport)>];

/// GPTQ or RTN on the linears of block `i`, group by group: the true-sequential groups for
/// GPTQ methods (each group's inputs computed with the groups before it already quantized),
/// one capture of all inputs otherwise.
///
/// The true-sequential path runs the block once, stage by stage
/// ([`LlamaModel::block_attn_input`] ... [`LlamaModel::block_output`]): each stage's output
/// is the input of the next group of linears, whose Hessian is accumulated from it before
/// they are quantized; the last stage gives the block's output with every linear quantized,
/// which is returned as the next block's inputs (`Some`). The one-capture path returns
/// `None` (the caller runs the quantized block).
///
/// `scaled` (AWQ+GPTQ): the scaled weights `W'` of the seven linears and, for the linears fed
/// by a norm, the scale `s` that their in-memory weight `W' diag(1/s)` is divided by. Their
/// captured inputs are then the unscaled `x`, whose scaled-domain Hessian is
/// `diag(1/s) H diag(1/s)`; the other linears (`o` after `v`, `down` after `up`) see inputs
/// already divided by their scale, because the preceding linear's rows were.
fn solve_block(
    model: &mut LlamaModel,
    i: usize,
    inps: &[Tensor],
    lps: &[LayerPlan],
    cfg: &QuantizeConfig,
    scaled: Option<(&[Array2<f32>], &[Option<Array1<f32>>])>,
    out: &mut BlockOut,
    t: &mut Timings,
    bar_layers: &ProgressBar,
    ctl: &Control<'_>,
) -> Result<Option<Vec<Tensor>>> {
    let mut q = GroupSolver {
        i,
        lps,
        cfg,
        scaled,
        bar: bar_layers,
        ctl,
    };
    let sequential = cfg.true_sequential && cfg.method.needs_calibration();
    if !sequential {
        let all: Vec<usize> = (0..7).collect();
        let active: Vec<usize> = all.iter().copied().filter(|&k| !lps[k].skip).collect();
        if active.is_empty() {
            return Ok(None);
        }
        // one capture per distinct input: q/k/v and gate/up share theirs
        let mut targets: Vec<usize> = Vec::new();
        for &k in &active {
            if !targets.iter().any(|&x| input_of(x) == input_of(k)) {
                targets.push(k);
            }
        }
        bar_layers.set_message(format!("block {i}: capturing {}", group_label(&active)));
        let caps = capture(model, i, inps, &targets, None, t)?;
        for &k in &active {
            let src = targets
                .iter()
                .copied()
                .find(|&x| input_of(x) == input_of(k))
                .expect("target");
            q.solve_one(model, k, &caps[&src].H, out, t)?;
        }
        return Ok(None);
    }
    let seqs: Vec<usize> = inps.iter().map(|h| h.dims()[0]).collect();
    let timed = |t: &mut Timings, f: &mut dyn FnMut() -> Result<Vec<Tensor>>| {
        let tf = Instant::now();
        let r = f();
        t.forward += tf.elapsed().as_secs_f64();
        r
    };
    // q, k, v: the normed block input
    ctl.check()?;
    let m: &LlamaModel = model;
    let xs = timed(t, &mut || {
        inps.iter().map(|h| Ok(m.block_attn_input(i, h)?)).collect()
    })?;
    q.solve_group(model, &[Q, K, V], &xs, &seqs, out, t)?;
    // o: attention with the quantized q, k, v
    ctl.check()?;
    let m: &LlamaModel = model;
    let attn = timed(t, &mut || {
        xs.iter()
            .zip(&seqs)
            .map(|(x, &b)| Ok(m.block_attention(i, x, b)?))
            .collect()
    })?;
    drop(xs);
    q.solve_group(model, &[O], &attn, &seqs, out, t)?;
    // gate, up: the post-attention norm of the residual with the quantized o
    ctl.check()?;
    let m: &LlamaModel = model;
    let mut resid = Vec::with_capacity(inps.len());
    let x2 = timed(t, &mut || {
        resid.clear();
        inps.iter()
            .zip(&attn)
            .map(|(h, a)| {
                let (r, x) = m.block_mlp_input(i, h, a)?;
                resid.push(r);
                Ok(x)
            })
            .collect()
    })?;
    drop(attn);
    q.solve_group(model, &[GATE, UP], &x2, &seqs, out, t)?;
    // down: silu(gate) * up with the quantized gate and up
    ctl.check()?;
    let m: &LlamaModel = model;
    let act = timed(t, &mut || {
        x2.iter().map(|x| Ok(m.block_mlp_act(i, x)?)).collect()
    })?;
    drop(x2);
    q.solve_group(model, &[DOWN], &act, &seqs, out, t)?;
    // the block's output with every linear quantized
    ctl.check()?;
    bar_layers.set_message(format!("block {i}: output"));
    let m: &LlamaModel = model;
    let outs = timed(t, &mut || {
        resid
            .iter()
            .zip(&act)
            .map(|(r, a)| Ok(m.block_output(i, r, a)?))
            .collect()
    })?;
    Ok(Some(outs))
}

/// Quantizes the linears of one block given their Hessians (shared by both paths of
/// [`solve_block`]).
struct GroupSolver<'a> {
    i: usize,
    lps: &'a [LayerPlan],
    cfg: &'a QuantizeConfig,
    scaled: Option<(&'a [Array2<f32>], &'a [Option<Array1<f32>>])>,
    bar: &'a ProgressBar,
    ctl: &'a Control<'a>,
}

impl GroupSolver<'_> {
    /// The non-skipped linears of `group` (which share one input), with the Hessian of
    /// `inputs` (`[rows, in]` per mini-batch of `seqs[b]` sequences).
    fn solve_group(
        &mut self,
        model: &mut LlamaModel,
        group: &[usize],
        inputs: &[Tensor],
        seqs: &[usize],
        out: &mut BlockOut,
        t: &mut Timings,
    ) -> Result<()> {
        let active: Vec<usize> = group
            .iter()
            .copied()
            .filter(|&k| !self.lps[k].skip)
            .collect();
        if active.is_empty() {
            return Ok(());
        }
        self.bar.set_message(format!(
            "block {}: Hessian of {}",
            self.i,
            group_label(&active)
        ));
        let th = Instant::now();
        let dim = inputs.first().map_or(0, |x| x.dims()[x.rank() - 1]);
        let mut H = Hessian::new(dim).with_counting(Counting::Tokens);
        for (x, &b) in inputs.iter().zip(seqs) {
            with_view(x, |X| {
                H.add_batch(X, b)
                    .map_err(|e| PipelineError::solver(&self.lps[active[0]].name, e))
            })?;
        }
        t.hessian += th.elapsed().as_secs_f64();
        for &k in &active {
            self.solve_one(model, k, &H, out, t)?;
        }
        Ok(())
    }

    /// Linear `k` of the block with the Hessian of its input.
    fn solve_one(
        &mut self,
        model: &mut LlamaModel,
        k: usize,
        Hacc: &Hessian,
        out: &mut BlockOut,
        t: &mut Timings,
    ) -> Result<()> {
        self.ctl.check()?;
        let lp = &self.lps[k];
        self.bar
            .set_message(format!("block {}: {}", self.i, BLOCK_LINEARS[k]));
        let ts = Instant::now();
        let norm_s = self.scaled.and_then(|(_, ns)| ns[k].as_ref());
        let H = match norm_s {
            Some(s) => scale_hessian(&Hacc.finish(), s),
            None => Hacc.finish(),
        };
        let W = match self.scaled {
            Some((ws, _)) => ws[k].clone(),
            None => weight_of(model, &lp.name)?,
        };
        let (lin, rep) = solve(lp, self.cfg.method, self.cfg, W.view(), Some(H.view()))?;
        let mut Qw = lin.dequantize();
        let rel = rel_output_error(W.view(), Qw.view(), H.view())
            .map_err(|e| PipelineError::solver(&lp.name, e))?;
        if let Some(s) = norm_s {
            Qw /= &s.view().insert_axis(Axis(0));
        }
        install(model, self.cfg, &lp.name, Some(&lin), norm_s, Qw.view())?;
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
        self.bar.inc(1);
        Ok(())
    }
}

/// Which linears share an input: q/k/v -> 0, o -> 3, gate/up -> 4, down -> 6.
fn input_of(k: usize) -> usize {
    match k {
        Q | K | V => Q,
        GATE | UP => GATE,
        other => other,
    }
}

fn group_label(kinds: &[usize]) -> String {
    kinds
        .iter()
        .map(|&k| BLOCK_LINEARS[k].rsplit('.').next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join(",")
}

/// `diag(1/s) H diag(1/s)`: the Hessian of inputs divided by `s`.
fn scale_hessian(H: &Array2<f32>, s: &Array1<f32>) -> Array2<f32> {
    let n = s.len();
    Array2::from_shape_fn((n, n), |(i, j)| H[[i, j]] / (s[i] * s[j]))
}

fn first_windows(inps: &[Tensor], n: usize) -> Result<Vec<Tensor>> {
    let mut left = n;
    let mut out = Vec::new();
    for h in inps {
        if left == 0 {
            break;
        }
        let b = h.dims()[0];
        let take = b.min(left);
        out.push(if take == b {
            h.clone()
        } else {
            h.narrow(0, 0, take).ctx("awq subset")?
        });
        left -= take;
    }
    Ok(out)
}

/// One block of AWQ / AWQ+GPTQ (see the module documentation).
fn awq_block(
    model: &mut LlamaModel,
    i: usize,
    inps: &[Tensor],
    lps: &[LayerPlan],
    cfg: &QuantizeConfig,
    clip_stride: usize,
    out: &mut [Option<(QuantizedLayer, LayerReport)>],
    norm_scales: &mut BTreeMap<String, Array1<f32>>,
    t: &mut Timings,
    bar: &ProgressBar,
    ctl: &Control<'_>,
) -> Result<Option<Vec<Tensor>>> {
    let cfgm = model.config().clone();
    let gqa = cfgm.num_key_value_heads != cfgm.num_attention_heads;
    bar.set_message(format!("block {i}: capturing (float block)"));
    let caps = capture(model, i, inps, &[Q, O, GATE, DOWN], Some(clip_stride), t)?;
    let stats: BTreeMap<usize, AwqStats> = caps
        .iter()
        .map(|(&k, c)| Ok((k, c.awq_stats()?)))
        .collect::<Result<_>>()?;
    let W0: Vec<Array2<f32>> = (0..7)
        .map(|k| weight_of(model, &lps[k].name))
        .collect::<Result<_>>()?;
    let ts = Instant::now();
    let subset = first_windows(inps, cfg.awq_samples)?;
    let sub_b: Vec<usize> = subset.iter().map(|h| h.dims()[0]).collect();
    // The float block's stages on the subset, once: a scale candidate changes the linears of
    // one stage only, so each search re-runs from that stage on. The q/k/v search scores the
    // block with its MLP removed (the residual after attention), the gate/up search the whole
    // block; both equal running the whole block with the MLP's linears stubbed to zero, or
    // not, for every candidate (the same operations in the same order), at a fraction of
    // the cost.
    let tf = Instant::now();
    let (sub_x, sub_resid, sub_x2, ref_full) = {
        let m: &LlamaModel = model;
        let mut xs = Vec::new();
        let mut resid = Vec::new();
        let mut x2s = Vec::new();
        let mut full = Vec::new();
        for (h, &b) in subset.iter().zip(&sub_b) {
            let x = m.block_attn_input(i, h)?;
            let a = m.block_attention(i, &x, b)?;
            let (r, x2) = m.block_mlp_input(i, h, &a)?;
            full.push(m.block_output(i, &r, &m.block_mlp_act(i, &x2)?)?);
            xs.push(x);
            resid.push(r);
            x2s.push(x2);
        }
        (xs, resid, x2s, full)
    };
    let ref_attn = &sub_resid;
    t.forward += tf.elapsed().as_secs_f64();
    let attn_out = |m: &LlamaModel| -> Result<Vec<Tensor>> {
        subset
            .iter()
            .zip(&sub_x)
            .zip(&sub_b)
            .map(|((h, x), &b)| Ok(m.block_mlp_input(i, h, &m.block_attention(i, x, b)?)?.0))
            .collect()
    };
    let block_out = |m: &LlamaModel| -> Result<Vec<Tensor>> {
        sub_resid
            .iter()
            .zip(&sub_x2)
            .map(|(r, x2)| Ok(m.block_output(i, r, &m.block_mlp_act(i, x2)?)?))
            .collect()
    };
    let params_for = |k: usize| AwqParams {
        granularity: lps[k].granularity,
        ..Default::default()
    };
    let ones = |n: usize| Array1::<f32>::ones(n);
    let any_skipped = |ks: &[usize]| ks.iter().any(|&k| lps[k].skip);

    // scale search with a block-level loss: set the candidate effective weights, run the
    // subset through the block from their stage on (`run`), compare with `reference`
    let block_search = |model: &mut LlamaModel,
                        kinds: &[usize],
                        run: &dyn Fn(&LlamaModel) -> Result<Vec<Tensor>>,
                        reference: &[Tensor],
                        input: usize|
     -> Result<(f64, Array1<f32>)> {
        let views: Vec<ArrayView2<f32>> = kinds.iter().map(|&k| W0[k].view()).collect();
        let format = lps[kinds[0]].spec.build();
        let err: RefCell<Option<PipelineError>> = RefCell::new(None);
        let names: Vec<String> = kinds.iter().map(|&k| lps[k].name.clone()).collect();
        let r = {
            let mut loss = |_a: f64, _s: &Array1<f32>, qs: &[Array2<f32>]| -> f64 {
                let r = (|| -> Result<f64> {
                    for (n, q) in names.iter().zip(qs) {
                        set(model, n, q.view())?;
                    }
                    mse(&run(model)?, reference)
                })();
                r.unwrap_or_else(|e| {
                    err.borrow_mut().get_or_insert(e);
                    f64::INFINITY
                })
            };
            awq::search_scales(
                &views,
                &stats[&input],
                format.as_ref(),
                &params_for(kinds[0]),
                Some(&mut loss),
            )
        };
        for (n, &k) in names.iter().zip(kinds) {
            set(model, n, W0[k].view())?;
        }
        if let Some(e) = err.into_inner() {
            return Err(e);
        }
        let (a, s, _) = r.map_err(|e| PipelineError::solver(&names[0], e))?;
        Ok((a, s))
    };
    let d = cfgm.hidden_size;
    let (mut a_qkv, mut a_vo, mut a_gu, mut a_down) = (None, None, None, None);
    bar.set_message(format!("block {i}: AWQ scales q,k,v"));
    let s_qkv = if any_skipped(&[Q, K, V]) {
        ones(d)
    } else {
        let (a, s) = block_search(model, &[Q, K, V], &attn_out, ref_attn, Q)?;
        a_qkv = Some(a);
        s
    };
    ctl.check()?;
    let default_search = |kinds: &[usize], input: usize| -> Result<(f64, Array1<f32>)> {
        let views: Vec<ArrayView2<f32>> = kinds.iter().map(|&k| W0[k].view()).collect();
        let format = lps[kinds[0]].spec.build();
        let (a, s, _) = awq::search_scales(
            &views,
            &stats[&input],
            format.as_ref(),
            &params_for(kinds[0]),
            None,
        )
        .map_err(|e| PipelineError::solver(&lps[kinds[0]].name, e))?;
        Ok((a, s))
    };
    // v -> o needs v's output rows to be o's input columns: no grouped-query attention
    let s_vo = if gqa || any_skipped(&[V, O]) {
        ones(W0[O].ncols())
    } else {
        bar.set_message(format!("block {i}: AWQ scales v->o"));
        let (a, s) = default_search(&[O], O)?;
        a_vo = Some(a);
        s
    };
    bar.set_message(format!("block {i}: AWQ scales gate,up"));
    let s_gu = if any_skipped(&[GATE, UP]) {
        ones(d)
    } else {
        let (a, s) = block_search(model, &[GATE, UP], &block_out, &ref_full, GATE)?;
        a_gu = Some(a);
        s
    };
    ctl.check()?;
    bar.set_message(format!("block {i}: AWQ scales up->down"));
    let s_down = if any_skipped(&[UP, DOWN]) {
        ones(W0[DOWN].ncols())
    } else {
        let (a, s) = default_search(&[DOWN], DOWN)?;
        a_down = Some(a);
        s
    };
    // apply: W' = diag(row scale) W diag(column scale)
    let col = |k: usize| -> &Array1<f32> {
        match k {
            Q | K | V => &s_qkv,
            O => &s_vo,
            GATE | UP => &s_gu,
            _ => &s_down,
        }
    };
    let row_inv = |k: usize| -> Option<&Array1<f32>> {
        match k {
            V if a_vo.is_some() => Some(&s_vo),
            UP if a_down.is_some() => Some(&s_down),
            _ => None,
        }
    };
    let alpha = |k: usize| match k {
        Q | K | V => a_qkv,
        O => a_vo,
        GATE | UP => a_gu,
        _ => a_down,
    };
    let Ws: Vec<Array2<f32>> = (0..7)
        .map(|k| {
            let mut w = &W0[k] * &col(k).view().insert_axis(Axis(0));
            if let Some(r) = row_inv(k) {
                w /= &r.view().insert_axis(Axis(1));
            }
            w
        })
        .collect();
    let next;
    if cfg.method == Method::AwqGptq && !cfg.awq_fold_only {
        // AWQ+GPTQ: put the scaled (still float, same function) block in memory, then GPTQ
        // true-sequentially on the scaled weights with Hessians captured as it goes
        let norm_s: Vec<Option<Array1<f32>>> = (0..7)
            .map(|k| matches!(k, Q | K | V | GATE | UP).then(|| col(k).clone()))
            .collect();
        for k in 0..7 {
            let mut mem = Ws[k].clone();
            if let Some(s) = &norm_s[k] {
                mem /= &s.view().insert_axis(Axis(0));
            }
            set(model, &lps[k].name, mem.view())?;
        }
        t.awq_search += ts.elapsed().as_secs_f64();
        next = solve_block(
            model,
            i,
            inps,
            lps,
            cfg,
            Some((&Ws, &norm_s)),
            out,
            t,
            bar,
            ctl,
        )?;
        for (k, o) in out.iter_mut().enumerate() {
            if let Some((ql, r)) = o.as_mut() {
                ql.input_scale = Some(col(k).clone());
                ql.norm_scale = norm_s[k].clone();
                r.awq_alpha = alpha(k);
            }
        }
    } else {
        let cols: Vec<Array1<f32>> = (0..7).map(|k| col(k).clone()).collect();
        let alphas: Vec<Option<f64>> = (0..7).map(alpha).collect();
        awq_quantize(
            model, i, lps, cfg, &stats, &Ws, &cols, &alphas, out, t, bar, ctl, ts,
        )?;
        // the next block's inputs come from the quantized block (the caller runs it). AutoAWQ
        // and llm-awq take the float block's outputs instead, which saves that forward (75 s
        // of 367 s at 128 x 512 on SmolLM2) but measured worse here: perplexity 48.19
        // against 47.58 (32 x 512 calibration, 16 eval windows), 50.05 against 49.03
        // (notebook 03's protocol)
        next = None;
    }
    if a_qkv.is_some() {
        norm_scales.insert(
            format!("model.layers.{i}.input_layernorm.weight"),
            s_qkv.clone(),
        );
    }
    if a_gu.is_some() {
        norm_scales.insert(
            format!("model.layers.{i}.post_attention_layernorm.weight"),
            s_gu.clone(),
        );
    }
    Ok(next)
}

/// AWQ's own quantization of a scaled block: the clip search (not for q and k), then RTN, with
/// the float block's statistics.
fn awq_quantize(
    model: &mut LlamaModel,
    i: usize,
    lps: &[LayerPlan],
    cfg: &QuantizeConfig,
    stats: &BTreeMap<usize, AwqStats>,
    Ws: &[Array2<f32>],
    cols: &[Array1<f32>],
    alphas: &[Option<f64>],
    out: &mut BlockOut,
    t: &mut Timings,
    bar: &ProgressBar,
    ctl: &Control<'_>,
    ts: Instant,
) -> Result<()> {
    let ones = |n: usize| Array1::<f32>::ones(n);
    let params_for = |k: usize| AwqParams {
        granularity: lps[k].granularity,
        ..Default::default()
    };
    let Hs: BTreeMap<usize, (Array2<f32>, Array2<f32>)> = [Q, O, GATE, DOWN]
        .into_iter()
        .map(|k| {
            let st = &stats[&k];
            (
                k,
                (
                    scale_hessian(&st.H, &cols[k]),
                    scale_hessian(&st.H_clip, &cols[k]),
                ),
            )
        })
        .collect();
    t.awq_search += ts.elapsed().as_secs_f64();
    for k in 0..7 {
        ctl.check()?;
        let lp = &lps[k];
        let norm_fed = matches!(k, Q | K | V | GATE | UP);
        let (H, Hc) = &Hs[&input_of(k)];
        let mut mem = Ws[k].clone();
        let mut lin = None;
        let mut rep = None;
        let mut rel = 0.0;
        let secs;
        if lp.skip {
            secs = 0.0;
        } else if cfg.awq_fold_only {
            secs = 0.0;
            bar.inc(1);
        } else {
            bar.set_message(format!("block {i}: {}", BLOCK_LINEARS[k]));
            let tc = Instant::now();
            let mut Wq = Ws[k].clone();
            if cfg.method == Method::Awq && !matches!(k, Q | K) {
                let format = lp.spec.build();
                let c = awq::search_clip(Wq.view(), Hc.view(), format.as_ref(), &params_for(k))
                    .map_err(|e| PipelineError::solver(&lp.name, e))?;
                Wq = awq::apply(Wq.view(), &ones(Wq.ncols()), Some(&c), lp.granularity);
            }
            t.awq_search += tc.elapsed().as_secs_f64();
            let tq = Instant::now();
            let (l, r) = solve(lp, cfg.method, cfg, Wq.view(), Some(H.view()))?;
            mem = l.dequantize();
            rel = rel_output_error(Ws[k].view(), mem.view(), H.view())
                .map_err(|e| PipelineError::solver(&lp.name, e))?;
            secs = tq.elapsed().as_secs_f64();
            t.solver += secs;
            lin = Some(l);
            rep = Some(r);
            bar.inc(1);
        }
        // in memory, the norm keeps its weight: undo its share of the scale
        if norm_fed {
            mem /= &cols[k].view().insert_axis(Axis(0));
        }
        install(
            model,
            cfg,
            &lp.name,
            lin.as_ref(),
            norm_fed.then_some(&cols[k]),
            mem.view(),
        )?;
        let mut r = report(lp, lin.as_ref(), rep.as_ref(), rel, secs);
        r.awq_alpha = alphas[k];
        let scaled = !lp.skip;
        out[k] = Some((
            QuantizedLayer {
                name: lp.name.clone(),
                linear: lin,
                input_scale: scaled.then(|| cols[k].clone()),
                norm_scale: (scaled && norm_fed).then(|| cols[k].clone()),
            },
            r,
        ));
    }
    Ok(())
}
