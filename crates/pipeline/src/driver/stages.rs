//! One block's machinery, shared by the sequential driver and AWQ: the inputs captured
//! (`Capture`), the solver of one linear (`solve`) and of one block in true-sequential
//! order (`solve_block`), the replacement of a linear (`install`) and the driver's control.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use candle_core::Tensor;
use indicatif::ProgressBar;
use ndarray::{Array1, Array2, ArrayView2};
use quantlab_grids::QuantizedLinear;
use quantlab_models::{CaptureHook, CodesLinear, LlamaModel, BLOCK_LINEARS};
use quantlab_solvers::awq::AwqStats;
use quantlab_solvers::gptq::{gptq, GptqParams, GroupFit};
use quantlab_solvers::hessian::{Counting, Hessian};
use quantlab_solvers::rtn::{rtn, rtn_imatrix, rtn_imatrix_weights};
use quantlab_solvers::SolveReport;

use crate::config::{LayerPlan, Method, QuantizeConfig};
use crate::error::TensorContext;
use crate::report::{LayerReport, Timings};
use crate::tensors::{to_array, to_tensor, with_view};
use crate::{PipelineError, Result};

/// Indices into [`BLOCK_LINEARS`].
pub(super) const Q: usize = 0;
pub(super) const K: usize = 1;
pub(super) const V: usize = 2;
pub(super) const O: usize = 3;
pub(super) const GATE: usize = 4;
pub(super) const UP: usize = 5;
pub(super) const DOWN: usize = 6;

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
    pub(super) fn check(&self) -> Result<()> {
        match self.cancel {
            Some(c) if c.load(Ordering::Relaxed) => Err(PipelineError::Interrupted),
            _ => Ok(()),
        }
    }
}

pub(super) fn block_name(block: usize, kind: usize) -> String {
    format!("model.layers.{block}.{}", BLOCK_LINEARS[kind])
}

/// Block `i` on every mini-batch.
pub(super) fn forward_all(
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
pub(super) fn mse(a: &[Tensor], b: &[Tensor]) -> Result<f64> {
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
pub(super) struct Capture {
    H: Hessian,
    abs_sum: Vec<f64>,
    clip_rows: Vec<f32>,
    rows_seen: usize,
}

impl Capture {
    pub(super) fn new(dim: usize) -> Self {
        Self {
            H: Hessian::new(dim).with_counting(Counting::Tokens),
            abs_sum: Vec::new(),
            clip_rows: Vec::new(),
            rows_seen: 0,
        }
    }

    /// One batch of the input (`[rows, in]`, from `seqs` sequences): into `H`, and with
    /// `awq = Some(stride)` into AWQ's statistics too.
    pub(super) fn add(
        &mut self,
        name: &str,
        x: &Tensor,
        seqs: usize,
        awq: Option<usize>,
    ) -> Result<()> {
        with_view(x, |X| {
            self.H
                .add_batch(X, seqs)
                .map_err(|e| PipelineError::solver(name, e))?;
            if let Some(stride) = awq {
                self.add_awq_rows(X, stride);
            }
            Ok(())
        })
    }

    /// AWQ's statistics of a batch: `sum |x|` per column (in f64, each column summed row by
    /// row; column blocks in parallel) and every `stride`-th row for the clip search.
    pub(super) fn add_awq_rows(&mut self, X: ArrayView2<f32>, stride: usize) {
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

    pub(super) fn awq_stats(&self) -> Result<AwqStats> {
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

/// Captures the inputs of the `targets` linears of block `i` over every mini-batch, into one
/// Hessian per input. (AWQ collects its statistics in its own staged pass over the search
/// subset, `awq_search::awq_block`, with [`Capture::add`].)
pub(super) fn capture(
    model: &mut LlamaModel,
    i: usize,
    inps: &[Tensor],
    targets: &[usize],
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
            let r = caps
                .borrow_mut()
                .get_mut(&k)
                .expect("capture")
                .add(name, x, seqs, None);
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

pub(super) fn weight_of(model: &LlamaModel, name: &str) -> Result<Array2<f32>> {
    to_array(&model.linear(name)?.weight()?)
}

/// Puts a quantized linear into the model: its dequantized weight `mem` (f32), or with
/// `lazy` its codes (`col_div` as in [`CodesLinear`]).
pub(super) fn install(
    model: &mut LlamaModel,
    lazy: bool,
    name: &str,
    lin: Option<&QuantizedLinear>,
    col_div: Option<&Array1<f32>>,
    mem: ArrayView2<f32>,
) -> Result<()> {
    match lin {
        Some(q) if lazy => {
            let bias = model.linear(name)?.bias();
            let new = CodesLinear::new(q.clone(), col_div.map(|s| s.to_vec()), bias);
            model.replace_linear(name, Box::new(new))?;
            Ok(())
        }
        _ => set(model, name, mem),
    }
}

pub(super) fn set(model: &mut LlamaModel, name: &str, w: ArrayView2<f32>) -> Result<()> {
    model.set_weight(name, to_tensor(w)?)?;
    Ok(())
}

/// Quantize one weight with the plan's solver: GPTQ for the GPTQ methods (which need `H`),
/// RTN otherwise; on a ggml block grid RTN is importance-weighted by `diag(H)` when `H` is
/// given (llama.cpp's imatrix), else by `imp` (an importance matrix file's values for this
/// linear) when given, plain without either.
pub(crate) fn solve(
    lp: &LayerPlan,
    method: Method,
    cfg: &QuantizeConfig,
    W: ArrayView2<f32>,
    H: Option<ArrayView2<f32>>,
    imp: Option<&[f32]>,
) -> Result<(QuantizedLinear, SolveReport)> {
    let (lin, rep) = if let Some(g) = method.gptq_options() {
        let ggml = matches!(lp.spec, quantlab_grids::FormatSpec::Ggml(_));
        let p = GptqParams {
            block_size: g.block_size,
            damp_percent: lp.damp,
            act_order: lp.act_order,
            static_groups: lp.static_groups,
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
        match (H, imp) {
            (None, Some(imp)) => rtn_imatrix_weights(W, grid, Some(imp)),
            _ => rtn_imatrix(W, grid, H),
        }
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

pub(super) use super::sequential::BlockOut;
use super::sequential::{BlockArch, BlockJob};

/// The true-sequential groups of a LLaMA block.
const GROUPS: [&[usize]; 4] = [&[Q, K, V], &[O], &[GATE, UP], &[DOWN]];

/// A LLaMA block as the sequential solver sees it ([`BlockArch`]). The true-sequential path
/// runs the block once, stage by stage ([`LlamaModel::block_attn_input`] ...
/// [`LlamaModel::block_output`]): each stage's output is the input of the next group of
/// linears, whose Hessian is accumulated from it before they are quantized; the last stage
/// ([`LlamaRun::output`]) is the block's output with every linear quantized. The one-capture
/// path runs the block with hooks on its inputs.
pub(super) struct LlamaRun<'a> {
    model: &'a mut LlamaModel,
    inps: &'a [Tensor],
    seqs: Vec<usize>,
    lazy: bool,
    /// The stage outputs of the current block (each dropped once the next one is made).
    xs: Vec<Tensor>,
    attn: Vec<Tensor>,
    resid: Vec<Tensor>,
    x2: Vec<Tensor>,
    act: Vec<Tensor>,
}

impl<'a> LlamaRun<'a> {
    pub(super) fn new(model: &'a mut LlamaModel, inps: &'a [Tensor], lazy: bool) -> Self {
        Self {
            model,
            inps,
            seqs: inps.iter().map(|h| h.dims()[0]).collect(),
            lazy,
            xs: Vec::new(),
            attn: Vec::new(),
            resid: Vec::new(),
            x2: Vec::new(),
            act: Vec::new(),
        }
    }

    /// The block's output with every linear quantized, after the true-sequential groups.
    pub(super) fn output(&mut self, i: usize, t: &mut Timings) -> Result<Vec<Tensor>> {
        let tf = Instant::now();
        let m: &LlamaModel = self.model;
        let outs = self
            .resid
            .iter()
            .zip(&self.act)
            .map(|(r, a)| Ok(m.block_output(i, r, a)?))
            .collect::<Result<Vec<_>>>();
        self.resid.clear();
        self.act.clear();
        t.forward += tf.elapsed().as_secs_f64();
        outs
    }

    /// Stage `g` of block `i` (the inputs of group `g`), from the stage before it.
    fn stage(&mut self, i: usize, g: usize) -> Result<&[Tensor]> {
        let m: &LlamaModel = self.model;
        match g {
            // q, k, v: the normed block input
            0 => {
                self.xs = self
                    .inps
                    .iter()
                    .map(|h| Ok(m.block_attn_input(i, h)?))
                    .collect::<Result<_>>()?;
                Ok(&self.xs)
            }
            // o: attention with the quantized q, k, v
            1 => {
                self.attn = self
                    .xs
                    .iter()
                    .zip(&self.seqs)
                    .map(|(x, &b)| Ok(m.block_attention(i, x, b)?))
                    .collect::<Result<_>>()?;
                self.xs.clear();
                Ok(&self.attn)
            }
            // gate, up: the post-attention norm of the residual with the quantized o
            2 => {
                let mut resid = Vec::with_capacity(self.inps.len());
                self.x2 = self
                    .inps
                    .iter()
                    .zip(&self.attn)
                    .map(|(h, a)| {
                        let (r, x) = m.block_mlp_input(i, h, a)?;
                        resid.push(r);
                        Ok(x)
                    })
                    .collect::<Result<_>>()?;
                self.resid = resid;
                self.attn.clear();
                Ok(&self.x2)
            }
            // down: silu(gate) * up with the quantized gate and up
            _ => {
                self.act = self
                    .x2
                    .iter()
                    .map(|x| Ok(m.block_mlp_act(i, x)?))
                    .collect::<Result<_>>()?;
                self.x2.clear();
                Ok(&self.act)
            }
        }
    }
}

impl BlockArch for LlamaRun<'_> {
    fn linears(&self) -> &'static [&'static str] {
        &BLOCK_LINEARS
    }

    fn groups(&self) -> &'static [&'static [usize]] {
        &GROUPS
    }

    fn input_of(&self, k: usize) -> usize {
        input_of(k)
    }

    fn capture(
        &mut self,
        i: usize,
        group: Option<usize>,
        targets: &[usize],
        t: &mut Timings,
    ) -> Result<Vec<Hessian>> {
        let Some(g) = group else {
            let mut caps = capture(self.model, i, self.inps, targets, t)?;
            return Ok(targets
                .iter()
                .map(|k| caps.remove(k).expect("captured").H)
                .collect());
        };
        let tf = Instant::now();
        self.stage(i, g)?;
        t.forward += tf.elapsed().as_secs_f64();
        let inputs = match g {
            0 => &self.xs,
            1 => &self.attn,
            2 => &self.x2,
            _ => &self.act,
        };
        let th = Instant::now();
        let mut hs = Vec::with_capacity(targets.len());
        for &k in targets {
            let dim = inputs.first().map_or(0, |x| x.dims()[x.rank() - 1]);
            let mut H = Hessian::new(dim).with_counting(Counting::Tokens);
            for (x, &b) in inputs.iter().zip(&self.seqs) {
                with_view(x, |X| {
                    H.add_batch(X, b)
                        .map_err(|e| PipelineError::solver(&block_name(i, k), e))
                })?;
            }
            hs.push(H);
        }
        t.hessian += th.elapsed().as_secs_f64();
        Ok(hs)
    }

    fn weight(&self, name: &str) -> Result<Array2<f32>> {
        weight_of(self.model, name)
    }

    fn install(
        &mut self,
        name: &str,
        lin: &QuantizedLinear,
        col_div: Option<&Array1<f32>>,
        mem: ArrayView2<f32>,
    ) -> Result<()> {
        install(self.model, self.lazy, name, Some(lin), col_div, mem)
    }
}

/// GPTQ or RTN on the linears of block `i` ([`super::sequential::solve_block`] on a
/// [`LlamaRun`]). Returns the block's output with every linear quantized (`Some`) on the
/// true-sequential path; `None` on the one-capture path (the caller runs the quantized
/// block). `scaled`: AWQ+GPTQ's scaled weights and norm scales ([`BlockJob::scaled`]).
pub(super) fn solve_block(
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
    let mut run = LlamaRun::new(model, inps, cfg.lazy);
    let job = BlockJob {
        i,
        lps,
        cfg,
        scaled,
        bar: bar_layers,
        ctl,
    };
    super::sequential::solve_block(&mut run, &job, out, t)?;
    if !cfg.method.true_sequential() {
        return Ok(None);
    }
    ctl.check()?;
    bar_layers.set_message(format!("block {i}: output"));
    Ok(Some(run.output(i, t)?))
}

/// Which linears share an input: q/k/v -> 0, o -> 3, gate/up -> 4, down -> 6.
pub(super) fn input_of(k: usize) -> usize {
    match k {
        Q | K | V => Q,
        GATE | UP => GATE,
        other => other,
    }
}

pub(super) use super::sequential::scale_hessian;
