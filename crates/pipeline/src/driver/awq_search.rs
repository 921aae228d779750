//! AWQ's block search (AutoAWQ's order inside a block; the module documentation of the
//! driver): the scale search on the float block, the clip search, the quantization of the
//! scaled linears (RTN, or GPTQ through the true-sequential block solver).

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::time::Instant;

use candle_core::Tensor;
use indicatif::ProgressBar;
use ndarray::{Array1, Array2, ArrayView2, Axis};
use quantlab_models::{LlamaModel, BLOCK_LINEARS};
use quantlab_solvers::awq::{self, AwqParams, AwqStats};
use quantlab_solvers::rel_output_error;

use super::stages::*;
use crate::config::{LayerPlan, Method, QuantizeConfig};
use crate::error::TensorContext;
use crate::method::AwqOptions;
use crate::report::{LayerReport, QuantizedLayer, Timings};
use crate::{PipelineError, Result};

pub(super) fn first_windows(inps: &[Tensor], n: usize) -> Result<Vec<Tensor>> {
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
pub(super) fn awq_block(
    model: &mut LlamaModel,
    i: usize,
    inps: &[Tensor],
    lps: &[LayerPlan],
    cfg: &QuantizeConfig,
    out: &mut [Option<(QuantizedLayer, LayerReport)>],
    norm_scales: &mut BTreeMap<String, Array1<f32>>,
    t: &mut Timings,
    bar: &ProgressBar,
    ctl: &Control<'_>,
) -> Result<Option<Vec<Tensor>>> {
    let cfgm = model.config().clone();
    let gqa = cfgm.num_key_value_heads != cfgm.num_attention_heads;
    let awq = awq_options(cfg);
    let subset = first_windows(inps, awq.samples)?;
    let sub_b: Vec<usize> = subset.iter().map(|h| h.dims()[0]).collect();
    // the clip search sees about 512 rows of the subset (AutoAWQ's n_sample_token)
    let sub_rows: usize = subset.iter().map(|h| h.dims()[0] * h.dims()[1]).sum();
    let clip_stride = (sub_rows / 512).max(1);
    // One float pass of the block over the search subset gives AutoAWQ's statistics of
    // the four inputs (mean |x|, H for the per-layer error, the clip search's rows: from the
    // inputs it searches on) and the stages each scale candidate re-runs from: a candidate
    // changes the linears of one stage only. The q/k/v search scores the block with its MLP
    // removed (the residual after attention), the gate/up search the whole block; both
    // equal running the whole block with the MLP's linears stubbed to zero, or not, for
    // every candidate (the same operations in the same order), at a fraction of the cost.
    // The whole calibration set goes through the block once, quantized, for the next
    // block's inputs (the caller's forward).
    bar.set_message(format!("block {i}: float block on the search subset"));
    let tf = Instant::now();
    let mut caps: BTreeMap<usize, Capture> = BTreeMap::new();
    for k in [Q, O, GATE, DOWN] {
        caps.insert(k, Capture::new(model.linear(&lps[k].name)?.in_features()));
    }
    let mut hess_s = 0.0;
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
            let act = m.block_mlp_act(i, &x2)?;
            full.push(m.block_output(i, &r, &act)?);
            let th = Instant::now();
            for (k, inp) in [(Q, &x), (O, &a), (GATE, &x2), (DOWN, &act)] {
                let c = caps.get_mut(&k).expect("captured input");
                c.add(&lps[k].name, inp, b, Some(clip_stride))?;
            }
            hess_s += th.elapsed().as_secs_f64();
            xs.push(x);
            resid.push(r);
            x2s.push(x2);
        }
        (xs, resid, x2s, full)
    };
    t.hessian += hess_s;
    t.forward += tf.elapsed().as_secs_f64() - hess_s;
    let stats: BTreeMap<usize, AwqStats> = caps
        .iter()
        .map(|(&k, c)| Ok((k, c.awq_stats()?)))
        .collect::<Result<_>>()?;
    let W0: Vec<Array2<f32>> = (0..7)
        .map(|k| weight_of(model, &lps[k].name))
        .collect::<Result<_>>()?;
    let ts = Instant::now();
    let ref_attn = &sub_resid;
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
    if matches!(cfg.method, Method::AwqGptq(..)) && !awq_options(cfg).fold_only {
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
pub(super) fn awq_quantize(
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
        } else if awq_options(cfg).fold_only {
            secs = 0.0;
            bar.inc(1);
        } else {
            bar.set_message(format!("block {i}: {}", BLOCK_LINEARS[k]));
            let tc = Instant::now();
            let mut Wq = Ws[k].clone();
            if matches!(cfg.method, Method::Awq(_)) && !matches!(k, Q | K) {
                let format = lp.spec.build();
                let c = awq::search_clip(Wq.view(), Hc.view(), format.as_ref(), &params_for(k))
                    .map_err(|e| PipelineError::solver(&lp.name, e))?;
                Wq = awq::apply(Wq.view(), &ones(Wq.ncols()), Some(&c), lp.granularity);
            }
            t.awq_search += tc.elapsed().as_secs_f64();
            let tq = Instant::now();
            let (l, r) = solve(lp, cfg.method, cfg, Wq.view(), Some(H.view()), None)?;
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
            cfg.lazy,
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

/// AWQ's parameters of the run (the driver calls this module only for the AWQ methods).
fn awq_options(cfg: &QuantizeConfig) -> AwqOptions {
    cfg.method.awq_options().copied().unwrap_or_default()
}
