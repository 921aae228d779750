//! Whole-model quantization of a BERT encoder (a sentence-transformers directory such as
//! all-MiniLM-L6-v2): `quantlab quantize --model DIR` where `DIR/config.json` describes a BERT
//! model.
//!
//! The same sequential recipe as the decoder driver ([`crate::driver`]), on the encoder's six
//! linears per layer (`attention.self.{query,key,value}`, `attention.output.dense`,
//! `intermediate.dense`, `output.dense`):
//!
//! * calibration: the text is tokenized sentence by sentence, the ids (without `[CLS]` /
//!   `[SEP]`) are joined into one stream, and `nsamples` windows of `seqlen - 2` tokens are
//!   drawn with the seed, each wrapped as `[CLS] window [SEP]` (`seqlen` is capped by the
//!   model's positions);
//! * layer by layer, group by group (GPTQ true-sequential: `[query, key, value]`,
//!   `[attention.output]`, `[intermediate]`, `[output]`), the one sequential solver of the
//!   decoder driver (`crate::driver::sequential`) runs on this architecture's description
//!   (`BertRun`): the inputs of the group's linears are captured with the model's hook over a
//!   whole forward pass (the earlier linears already quantized), accumulated into one Hessian
//!   per distinct input, and each linear is solved and replaced. The encoder is small (MiniLM:
//!   6 layers), so the capture re-runs the whole encoder instead of keeping block-boundary
//!   states: `4 x layers` forwards;
//! * RTN-like methods (`rtn`, `nf4`, `fp4`, `int8`, `fp8`) capture once per layer, for the
//!   error report only;
//! * AWQ is refused: its scales would have to fold into BERT's post-LayerNorms (weight and
//!   bias), which is not implemented.
//!
//! The checkpoint is the source directory (tokenizer, sentence-transformers head) with
//! `model.safetensors` holding the dequantized weights, plus `quantized.safetensors`
//! (codes, scales, zeros, `g_idx` per linear, [`quantlab_checkpoints::quantlab`]),
//! `quantization_config.json` and `report.json`; `quantlab eval embed --model DIR` loads it.
//! With an eval text, the report gives the mean cosine similarity between the quantized and
//! the float model's sentence embeddings.
#![allow(non_snake_case)]

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use candle_core::{Device, Tensor};
use indicatif::ProgressBar;
use ndarray::{Array1, Array2, ArrayView2};
use quantlab_grids::QuantizedLinear;
use quantlab_models::bert::{BertConfig, LAYER_LINEARS};
use quantlab_models::embed::{cosine, SentenceEncoder};
use quantlab_models::text::{read_text, split_sentences};
use quantlab_solvers::hessian::{Counting, Hessian};
use serde_json::{json, Value};

use crate::calib::{draw_windows, Calibration};
use crate::config::Plan;
use crate::driver::sequential::{solve_block, BlockArch, BlockJob};
use crate::driver::{report, to_array, to_tensor, with_view, Control, LayerReport, Timings};
use crate::error::TensorContext;
use crate::job::QuantizeJob;
use crate::report::QuantizedLayer;
use crate::report::{CalibrationFacts, EvalFacts, JobTimings, QuantizeReport};
use crate::{PipelineError, Result};

const Q: usize = 0;
const K: usize = 1;
const V: usize = 2;
const ATTN_OUT: usize = 3;
const INTER: usize = 4;
const OUT: usize = 5;

/// True-sequential groups of a BERT layer.
const GROUPS: [&[usize]; 4] = [&[Q, K, V], &[ATTN_OUT], &[INTER], &[OUT]];

pub use crate::source::is_bert_dir;

/// The plan of a BERT model: its `6 x layers` linears in forward order.
pub fn plan_bert(job: &QuantizeJob, bc: &BertConfig) -> Result<Plan> {
    let c = &job.config;
    if c.rotate.is_some() {
        return Err(PipelineError::option(
            "--rotate",
            "rotations are implemented for the LLaMA family, not for BERT encoders (their post-LayerNorms do not commute with a rotation)",
        ));
    }
    if c.method.uses_awq() {
        return Err(PipelineError::option(
            "--method",
            format!(
                "{} is not implemented for BERT encoders (its scales would fold into the post-LayerNorms); use rtn, gptq, nf4, fp4, int8 or fp8",
                c.method
            ),
        ));
    }
    if c.format != crate::export::ExportFormat::Quantlab {
        return Err(PipelineError::option(
            "--format",
            format!(
                "{}: BERT encoders are written in quantlab's own format only (drop --format); GPTQ, AWQ, bitsandbytes and GGUF exports are for LLaMA-family models",
                c.format
            ),
        ));
    }
    let h = bc.hidden_size;
    let f = bc.intermediate_size;
    let shapes = [(h, h), (h, h), (h, h), (h, h), (f, h), (h, f)];
    let linears: Vec<(String, usize, usize, (usize, usize))> = (0..bc.num_hidden_layers)
        .flat_map(|l| {
            LAYER_LINEARS
                .iter()
                .enumerate()
                .map(move |(j, n)| (format!("encoder.layer.{l}.{n}"), l, j, shapes[j]))
        })
        .collect();
    c.plan_linears(&linears, "encoder.layer.0.output.dense")
}

/// Calibration sequences `[CLS] window [SEP]` (see the module documentation).
pub fn calibration_sequences(
    enc: &SentenceEncoder,
    calib: &Calibration,
    nsamples: usize,
    seqlen: usize,
    seed: u64,
) -> Result<Vec<Vec<u32>>> {
    let text = calib.text()?;
    let sentences = split_sentences(&text);
    let refs: Vec<&str> = sentences.iter().map(|s| s.as_str()).collect();
    let ids = enc.tokenize(&refs)?;
    let (mut cls, mut sep) = (None, None);
    let mut stream = Vec::new();
    for s in &ids {
        if s.len() < 2 {
            continue;
        }
        cls.get_or_insert(s[0]);
        sep.get_or_insert(s[s.len() - 1]);
        stream.extend_from_slice(&s[1..s.len() - 1]);
    }
    let (Some(cls), Some(sep)) = (cls, sep) else {
        return Err(PipelineError::option(
            "--calib",
            format!("{} has no text to calibrate on", calib.describe()),
        ));
    };
    let body = seqlen.saturating_sub(2).max(1);
    Ok(
        draw_windows(&stream, nsamples, body, seed, &calib.describe())?
            .into_iter()
            .map(|w| {
                let mut s = Vec::with_capacity(w.len() + 2);
                s.push(cls);
                s.extend(w);
                s.push(sep);
                s
            })
            .collect(),
    )
}

/// Padded `(ids, mask)` tensors of each mini-batch of `batch` sequences.
pub fn batches(seqs: &[Vec<u32>], batch: usize, pad: u32) -> Result<Vec<(Tensor, Tensor)>> {
    seqs.chunks(batch.max(1))
        .map(|chunk| {
            let b = chunk.len();
            let t = chunk.iter().map(Vec::len).max().unwrap_or(1);
            let mut ids = vec![pad; b * t];
            let mut mask = vec![0u32; b * t];
            for (i, s) in chunk.iter().enumerate() {
                ids[i * t..i * t + s.len()].copy_from_slice(s);
                mask[i * t..i * t + s.len()].fill(1);
            }
            Ok((
                Tensor::from_vec(ids, (b, t), &Device::Cpu).ctx("calibration ids")?,
                Tensor::from_vec(mask, (b, t), &Device::Cpu).ctx("calibration mask")?,
            ))
        })
        .collect()
}

/// Which linears share an input: query/key/value -> query.
fn input_of(k: usize) -> usize {
    if matches!(k, Q | K | V) {
        Q
    } else {
        k
    }
}

/// A BERT layer as the sequential solver sees it ([`BlockArch`]): each group's inputs are
/// captured by a whole forward with hooks, the earlier layers and groups already quantized
/// (the encoder is small; MiniLM has 6 layers).
struct BertRun<'a> {
    enc: &'a mut SentenceEncoder,
    data: &'a [(Tensor, Tensor)],
}

impl BlockArch for BertRun<'_> {
    fn linears(&self) -> &'static [&'static str] {
        &LAYER_LINEARS
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
        _group: Option<usize>,
        targets: &[usize],
        t: &mut Timings,
    ) -> Result<Vec<Hessian>> {
        if targets.is_empty() {
            return Ok(Vec::new());
        }
        let names: Vec<String> = targets
            .iter()
            .map(|&k| format!("encoder.layer.{i}.{}", LAYER_LINEARS[k]))
            .collect();
        let dims = names
            .iter()
            .map(|n| Ok(self.enc.model().linear(n)?.in_features()))
            .collect::<Result<Vec<usize>>>()?;
        let tc = Instant::now();
        let hs = capture(self.enc, self.data, &names, &dims)?;
        t.forward += tc.elapsed().as_secs_f64();
        Ok(hs)
    }

    fn weight(&self, name: &str) -> Result<Array2<f32>> {
        to_array(&self.enc.model().weight(name)?)
    }

    fn install(
        &mut self,
        name: &str,
        _lin: &QuantizedLinear,
        _col_div: Option<&Array1<f32>>,
        mem: ArrayView2<f32>,
    ) -> Result<()> {
        self.enc.model_mut().set_weight(name, to_tensor(mem)?)?;
        Ok(())
    }
}

/// Hessians of the inputs of `targets` (full names) over every batch.
fn capture(
    enc: &SentenceEncoder,
    data: &[(Tensor, Tensor)],
    targets: &[String],
    dims: &[usize],
) -> Result<Vec<Hessian>> {
    let hs: RefCell<Vec<Hessian>> = RefCell::new(
        dims.iter()
            .map(|&d| Hessian::new(d).with_counting(Counting::Tokens))
            .collect(),
    );
    let err: RefCell<Option<PipelineError>> = RefCell::new(None);
    let mut hook = |name: &str, x: &Tensor| {
        let Some(p) = targets.iter().position(|t| t == name) else {
            return;
        };
        if err.borrow().is_some() {
            return;
        }
        let r = with_view(x, |X| {
            hs.borrow_mut()[p]
                .add_batch(X, 1)
                .map_err(|e| PipelineError::solver(name, e))
        });
        if let Err(e) = r {
            *err.borrow_mut() = Some(e);
        }
    };
    for (ids, mask) in data {
        enc.model().forward_with_hook(ids, mask, &mut hook)?;
    }
    if let Some(e) = err.into_inner() {
        return Err(e);
    }
    Ok(hs.into_inner())
}

/// Sentence embeddings of the first sentences of the eval text (at most 256).
fn eval_sentences(job: &QuantizeJob) -> Result<Option<Vec<String>>> {
    let Some(e) = &job.eval else {
        return Ok(None);
    };
    let text = read_text(&e.text, e.field.as_deref())?;
    let mut s = split_sentences(&text);
    s.truncate(e.max_windows.unwrap_or(256).max(1));
    if s.is_empty() {
        return Err(PipelineError::option(
            "--eval",
            format!("{}: no sentence to embed", e.text.display()),
        ));
    }
    Ok(Some(s))
}

/// `quantlab quantize` on a BERT directory (see the module documentation).
pub fn run_bert(job: &QuantizeJob, cancel: Option<&AtomicBool>) -> Result<QuantizeReport> {
    let t_job = Instant::now();
    let c = &job.config;
    crate::job::check_files(job)?;
    let mut jt = JobTimings::default();
    let t0 = Instant::now();
    let mut enc = SentenceEncoder::load(&job.model)?;
    jt.load = t0.elapsed().as_secs_f64();
    let bc = enc.model().config().clone();
    let plan = plan_bert(job, &bc)?;

    let t0 = Instant::now();
    let seqlen = c.seqlen.min(bc.max_position_embeddings).max(3);
    enc.set_max_len(seqlen)?;
    // BERT jobs always calibrate (the encoder is small): no calibration means the shipped prose
    let calibration = match &job.calibration {
        Calibration::None => Calibration::Shipped,
        other => other.clone(),
    };
    let seqs = calibration_sequences(&enc, &calibration, c.nsamples, seqlen, c.seed)?;
    let data = batches(&seqs, c.batch_size, bc.pad_token_id)?;
    let sentences = eval_sentences(job)?;
    jt.calibration = t0.elapsed().as_secs_f64();
    let t0 = Instant::now();
    let before = match &sentences {
        Some(s) => Some(enc.encode(&s.iter().map(String::as_str).collect::<Vec<_>>(), 32)?),
        None => None,
    };
    jt.eval = t0.elapsed().as_secs_f64();

    let mut t = Timings::default();
    let t_drv = Instant::now();
    let mut reports: Vec<Option<LayerReport>> = vec![None; plan.layers.len()];
    let mut quantized = BTreeMap::new();
    let bar = ProgressBar::hidden();
    let ctl = Control {
        progress: false,
        cancel,
    };
    for l in 0..bc.num_hidden_layers {
        let lps = &plan.layers[l * 6..(l + 1) * 6];
        let mut out: Vec<Option<(QuantizedLayer, LayerReport)>> = vec![None; 6];
        let mut run = BertRun {
            enc: &mut enc,
            data: &data,
        };
        let job = BlockJob {
            i: l,
            lps,
            cfg: c,
            scaled: None,
            bar: &bar,
            ctl: &ctl,
        };
        solve_block(&mut run, &job, &mut out, &mut t)?;
        for (k, o) in out.into_iter().enumerate() {
            if let Some((ql, r)) = o {
                reports[l * 6 + k] = Some(r);
                if let Some(lin) = ql.linear {
                    quantized.insert(ql.name, lin);
                }
            }
        }
    }
    t.total = t_drv.elapsed().as_secs_f64();
    let layers: Vec<LayerReport> = reports
        .into_iter()
        .zip(&plan.layers)
        .map(|(r, lp)| r.unwrap_or_else(|| report(lp, None, None, 0.0, 0.0)))
        .collect();

    let t0 = Instant::now();
    let mut eval_facts = None;
    let mut embed_cosine = None;
    if let (Some(s), Some(b), Some(e)) = (&sentences, &before, &job.eval) {
        let te = Instant::now();
        let after = enc.encode(&s.iter().map(String::as_str).collect::<Vec<_>>(), 32)?;
        let cos: Vec<f64> = after.iter().zip(b).map(|(x, y)| cosine(x, y)).collect();
        embed_cosine = Some(cos.iter().sum::<f64>() / cos.len() as f64);
        eval_facts = Some(EvalFacts {
            text: e.text.display().to_string(),
            ctx: enc.max_len(),
            windows: s.len(),
            tokens_scored: 0,
            seconds: te.elapsed().as_secs_f64(),
        });
    }
    jt.eval += t0.elapsed().as_secs_f64();

    let total_params = bert_param_count(&bc);
    let n_linear: u64 = plan
        .layers
        .iter()
        .map(|lp| (lp.shape.0 * lp.shape.1) as u64)
        .sum();
    let others = total_params.saturating_sub(n_linear);
    let mut rep = QuantizeReport::assemble(
        job,
        &plan,
        &|_, lp| quantized.get(&lp.name),
        others,
        t,
        jt,
        layers,
        CalibrationFacts {
            source: calibration.describe(),
            nsamples: seqs.len(),
            seqlen,
            seed: c.seed,
            tokens: seqs.iter().map(Vec::len).sum(),
        },
    );
    rep.embed_cosine = embed_cosine;
    rep.eval = eval_facts;
    if let Some(out) = &job.out {
        let t0 = Instant::now();
        rep.wall_seconds = t_job.elapsed().as_secs_f64();
        save_bert(out, job, &enc, &plan, &quantized, &rep, cancel)?;
        rep.job_timings.save = t0.elapsed().as_secs_f64();
    }
    rep.wall_seconds = t_job.elapsed().as_secs_f64();
    Ok(rep)
}

/// `--dry-run` on a BERT directory: the plan and rough estimates, without loading weights.
pub fn dry_run_bert(job: &QuantizeJob) -> Result<crate::job::DryRun> {
    let bc = BertConfig::from_file(&job.model.join("config.json"))?;
    let plan = plan_bert(job, &bc)?;
    crate::job::check_files(job)?;
    let c = &job.config;
    let seqlen = c.seqlen.min(bc.max_position_embeddings);
    let tokens = c.nsamples * seqlen;
    let n_linear: u64 = plan
        .layers
        .iter()
        .map(|l| (l.shape.0 * l.shape.1) as u64)
        .sum();
    let bpw = plan
        .layers
        .iter()
        .map(|l| l.estimated_bits_per_weight() * (l.shape.0 * l.shape.1) as f64)
        .sum::<f64>()
        / n_linear.max(1) as f64;
    let forwards = if c.method.true_sequential() { 4.0 } else { 1.0 } * bc.num_hidden_layers as f64;
    let h = bc.hidden_size as u64;
    Ok(crate::job::DryRun {
        bits_per_weight: bpw,
        memory_bytes: bert_param_count(&bc) * 8
            + (c.batch_size.min(c.nsamples) * seqlen) as u64
                * (bc.intermediate_size as u64 + 6 * h)
                * 4,
        seconds: forwards * 2.0 * n_linear as f64 * tokens as f64 / 100e9,
        calibration_tokens: tokens,
        plan,
    })
}

/// Parameters of a BERT encoder (embeddings, layers, pooler not included).
fn bert_param_count(bc: &BertConfig) -> u64 {
    let (h, f) = (bc.hidden_size as u64, bc.intermediate_size as u64);
    let emb = (bc.vocab_size + bc.max_position_embeddings + bc.type_vocab_size) as u64 * h + 2 * h;
    let layer = 4 * (h * h + h) + (f * h + f) + (h * f + h) + 4 * h;
    emb + bc.num_hidden_layers as u64 * layer
}

/// Writes the BERT checkpoint atomically (see the module documentation).
fn save_bert(
    out: &Path,
    job: &QuantizeJob,
    enc: &SentenceEncoder,
    plan: &Plan,
    quantized: &BTreeMap<String, quantlab_grids::QuantizedLinear>,
    rep: &QuantizeReport,
    cancel: Option<&AtomicBool>,
) -> Result<()> {
    crate::save::write_dir_atomically(out, cancel, |tmp| {
        copy_dir(&job.model, tmp)?;
        // every source tensor, f32, with the block linears replaced by their dequantized codes
        let src = job.model.join("model.safetensors");
        let tensors = candle_core::safetensors::load(&src, &Device::Cpu).map_err(|e| {
            PipelineError::Format {
                path: src.display().to_string(),
                detail: e.to_string(),
            }
        })?;
        let mut dense: HashMap<String, Tensor> = HashMap::new();
        for (name, t) in tensors {
            let bare = name.strip_prefix("bert.").unwrap_or(&name);
            let lin = bare.strip_suffix(".weight").unwrap_or(bare);
            let t = if bare.ends_with(".weight") && quantized.contains_key(lin) {
                enc.model().weight(lin)?
            } else {
                t.to_dtype(candle_core::DType::F32).ctx(&name)?
            };
            dense.insert(name, t);
        }
        let dst = tmp.join("model.safetensors");
        candle_core::safetensors::save(&dense, &dst).ctx("writing model.safetensors")?;
        let q: Vec<_> = quantized
            .iter()
            .flat_map(|(name, lin)| quantlab_checkpoints::quantlab::linear_tensors(name, lin, None))
            .collect();
        let dst = tmp.join("quantized.safetensors");
        safetensors::serialize_to_file(q.iter().map(|(n, t)| (n, t)), None, &dst).map_err(|e| {
            PipelineError::Format {
                path: dst.display().to_string(),
                detail: e.to_string(),
            }
        })?;
        let layers: Vec<Value> = plan
            .layers
            .iter()
            .map(|lp| {
                json!({"name": lp.name, "skip": lp.skip, "bits": lp.bits,
                       "group_size": lp.group_size, "sym": lp.sym, "format": lp.spec})
            })
            .collect();
        let c = &job.config;
        let qc = json!({
            "quant_method": "quantlab",
            "architecture": "bert",
            "method": c.method.name(),
            "bits": plan.bits,
            "group_size": plan.group_size,
            "sym": c.sym,
            "desc_act": c.method.gptq_options().is_some_and(|g| g.act_order),
            "true_sequential": c.method.gptq_options().is_none_or(|g| g.true_sequential),
            "calibration": rep.calibration,
            "quantlab_version": env!("CARGO_PKG_VERSION"),
            "layers": layers,
        });
        write_json(&tmp.join("quantization_config.json"), &qc)?;
        write_json(
            &tmp.join("report.json"),
            &serde_json::to_value(rep).expect("report serialises"),
        )?;
        Ok(())
    })
}

fn write_json(path: &Path, v: &Value) -> Result<()> {
    let s = serde_json::to_string_pretty(v).expect("json");
    std::fs::write(path, s).map_err(|e| PipelineError::io(path, e))
}

/// Copies the source directory (tokenizer, sentence-transformers files) except its weights
/// and the files a checkpoint of ours replaces.
fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to).map_err(|e| PipelineError::io(to, e))?;
    for e in std::fs::read_dir(from).map_err(|e| PipelineError::io(from, e))? {
        let e = e.map_err(|e| PipelineError::io(from, e))?;
        let name = e.file_name();
        let n = name.to_string_lossy();
        let src = e.path();
        let dst = to.join(&name);
        if src.is_dir() {
            copy_dir(&src, &dst)?;
        } else if !(n.ends_with(".safetensors")
            || n.ends_with(".bin")
            || n.ends_with(".onnx")
            || n.ends_with(".h5")
            || n.ends_with(".msgpack")
            || n.ends_with(".ot")
            || n == "quantization_config.json"
            || n == "report.json")
        {
            std::fs::copy(&src, &dst).map_err(|e| PipelineError::io(&src, e))?;
        }
    }
    Ok(())
}
