//! `quantlab quantize` as one library call: check everything, load, calibrate, quantize,
//! evaluate, save.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use quantlab_models::{kl_divergence, text, KldBase, LlamaConfig, LlamaTokenizer, PplParams};
use serde::Serialize;
use serde_json::{json, Value};

use crate::calib::{calibration_windows, Calibration};
use crate::config::{Plan, QuantizeConfig};
use crate::driver::{quantize_model, Control, DriverOutput};
use crate::export::{write_export, ExportFormat, ExportInputs};
use crate::report::{
    CalibrationFacts, EvalFacts, JobTimings, LayerReport, QuantizeReport, Timings,
};
use crate::save::{save_quantized, SaveInputs};
use crate::source::{read_config, SourceModel};
use crate::{PipelineError, Result};

/// Perplexity evaluation before and after.
#[derive(Clone, Debug, Serialize)]
pub struct EvalSpec {
    /// The text file (`.txt`, `.jsonl`, `.parquet`).
    pub text: PathBuf,
    /// Field / column.
    pub field: Option<String>,
    /// Window length (512).
    pub ctx: usize,
    /// At most this many windows (the first ones).
    pub max_windows: Option<usize>,
}

/// A whole-model job.
#[derive(Clone, Debug)]
pub struct QuantizeJob {
    /// A `.gguf` file or a Hugging Face directory.
    pub model: PathBuf,
    /// What to do.
    pub config: QuantizeConfig,
    /// Calibration text.
    pub calibration: Calibration,
    /// Where to write the checkpoint (`None`: do not write).
    pub out: Option<PathBuf>,
    /// Replace an existing output directory.
    pub overwrite: bool,
    /// Perplexity before and after.
    pub eval: Option<EvalSpec>,
    /// Progress bars on stderr.
    pub progress: bool,
}

impl QuantizeJob {
    /// A job with the default configuration.
    pub fn new(model: impl Into<PathBuf>, config: QuantizeConfig) -> Self {
        Self {
            model: model.into(),
            config,
            calibration: Calibration::Shipped,
            out: None,
            overwrite: false,
            eval: None,
            progress: false,
        }
    }
}

/// Every check that can fail before any work: the model path, the options against the
/// model's shapes, the calibration and eval files, the output directory. Returns the plan.
pub fn prepare(job: &QuantizeJob) -> Result<(LlamaConfig, Plan)> {
    job.config.validate()?;
    if crate::source::is_bert_dir(&job.model) {
        return Err(PipelineError::option(
            "--model",
            format!(
                "{} is a BERT encoder: plan it with quantlab_pipeline::bert::plan_bert (run() and dry_run() do)",
                job.model.display()
            ),
        ));
    }
    let mc = read_config(&job.model)?;
    let plan = job.config.plan(&mc)?;
    check_files(job)?;
    Ok((mc, plan))
}

/// The checks of [`prepare`] that do not depend on the model: the calibration and eval
/// files and the output directory.
pub fn check_files(job: &QuantizeJob) -> Result<()> {
    if let Calibration::File { path, .. } = &job.calibration {
        if !path.is_file() {
            return Err(PipelineError::option(
                "--calib",
                format!("{}: no such file", path.display()),
            ));
        }
    }
    if let Some(f) = &job.config.imatrix {
        if job.calibration != Calibration::None {
            return Err(PipelineError::option(
                "--imatrix",
                "the importance matrix replaces the calibration capture: drop --calib (or drop --imatrix to weigh by --calib)",
            ));
        }
        crate::imatrix::read_imatrix(f)?;
    }
    if job.calibration == Calibration::None && job.config.method.needs_calibration() {
        return Err(PipelineError::option(
            "--calib",
            format!(
                "--method {} needs calibration text: pass --calib FILE (or `shipped` for the shipped prose)",
                job.config.method.name()
            ),
        ));
    }
    if let Calibration::Texts(t) = &job.calibration {
        if t.iter().all(|s| s.trim().is_empty()) {
            return Err(PipelineError::option(
                "calibration",
                "the list of calibration texts is empty",
            ));
        }
    }
    if let Some(e) = &job.eval {
        if !e.text.is_file() {
            return Err(PipelineError::option(
                "--eval",
                format!("{}: no such file", e.text.display()),
            ));
        }
        if e.ctx < 2 {
            return Err(PipelineError::option(
                "--eval-ctx",
                format!("{}: use at least 2 tokens", e.ctx),
            ));
        }
        if e.max_windows == Some(0) {
            return Err(PipelineError::option(
                "--max-windows",
                "0: use at least 1 window",
            ));
        }
    }
    if let Some(out) = &job.out {
        if out.exists() && !job.overwrite {
            return Err(PipelineError::option(
                "--out",
                format!(
                    "{} already exists: remove it, choose another directory, or pass --overwrite",
                    out.display()
                ),
            ));
        }
        if out.exists() && !out.is_dir() && !job.config.format.writes_file() {
            return Err(PipelineError::option(
                "--out",
                format!("{} exists and is not a directory", out.display()),
            ));
        }
        if same_path(out, &job.model) {
            return Err(PipelineError::option(
                "--out",
                "the output directory is the model being quantized",
            ));
        }
        let parent = out
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        if !parent.is_dir() {
            return Err(PipelineError::option(
                "--out",
                format!("the parent directory {} does not exist", parent.display()),
            ));
        }
    }
    Ok(())
}

fn same_path(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(x), Ok(y)) => x == y,
        _ => false,
    }
}

/// What `--dry-run` prints.
#[derive(Clone, Debug, Serialize)]
pub struct DryRun {
    /// The resolved plan.
    pub plan: Plan,
    /// Estimated average bits per weight of the block linears.
    pub bits_per_weight: f64,
    /// Estimated peak memory in bytes.
    pub memory_bytes: u64,
    /// Estimated quantization seconds on a 2-core machine (rough: 100 GFLOP/s).
    pub seconds: f64,
    /// Calibration tokens.
    pub calibration_tokens: usize,
}

impl DryRun {
    /// A readable plan.
    pub fn table(&self) -> String {
        let mut s = format!(
            "{:<36} {:>11} {:<13} {:>5} {:>6} {:>7}\n",
            "layer", "shape", "format", "group", "act", "bpw~"
        );
        for l in &self.plan.layers {
            s.push_str(&format!(
                "{:<36} {:>11} {:<13} {:>5} {:>6} {:>7.3}\n",
                l.name.strip_prefix("model.").unwrap_or(&l.name),
                format!("{}x{}", l.shape.0, l.shape.1),
                if l.skip {
                    "skip (f32)".into()
                } else {
                    l.spec.build().name()
                },
                l.group_size,
                if l.act_order { "yes" } else { "" },
                l.estimated_bits_per_weight()
            ));
        }
        s.push_str(&format!(
            "\nmethod {}: {} linears ({} skipped), ~{:.3} bits per weight\ncalibration: {} tokens\nestimated peak memory: {:.2} GB\nestimated time: {:.0} s (rough, 2 cores)\n",
            self.plan.method,
            self.plan.layers.len(),
            self.plan.layers.iter().filter(|l| l.skip).count(),
            self.bits_per_weight,
            self.calibration_tokens,
            self.memory_bytes as f64 / 1e9,
            self.seconds
        ));
        for n in &self.plan.notes {
            s.push_str(&format!("note: {n}\n"));
        }
        s.push_str("dry run: nothing was loaded or written\n");
        s
    }
}

/// [`crate::dry_run`] for a LLaMA-family model: checks the job and estimates its cost
/// without loading the weights.
pub fn dry_run_llama(job: &QuantizeJob) -> Result<DryRun> {
    let (mc, plan) = prepare(job)?;
    let c = &job.config;
    let tokens = if job.calibration == Calibration::None {
        0
    } else {
        c.nsamples * c.seqlen
    };
    let (d, inter) = (mc.hidden_size as u64, mc.intermediate_size as u64);
    let params_linear: u64 = plan
        .layers
        .iter()
        .map(|l| (l.shape.0 * l.shape.1) as u64)
        .sum();
    let params_total =
        params_linear + mc.vocab_size as u64 * d * if mc.tie_word_embeddings { 1 } else { 2 };
    let bs = c.batch_size.min(c.nsamples) as u64;
    let seq = c.seqlen as u64;
    // f32 weights; with --lazy only the embeddings in f32 and the linears as 1-byte codes
    // (held by the report and by the model)
    let weights = if c.lazy {
        (params_total - params_linear) * 4 + params_linear * 2
    } else {
        params_total * 4
    };
    let memory = weights
        + params_linear * 4 / mc.num_hidden_layers as u64 // one block's copies
        + 2 * tokens as u64 * d * 4                      // hidden states in and out
        + bs * seq * (3 * inter + 6 * d) * 4             // one mini-batch's activations
        + bs * mc.num_attention_heads as u64 * seq * seq * 4 / 2 // attention scores
        + 3 * inter * inter * 8; // Hessians (f64)
    let per_token_block: f64 = plan
        .layers
        .iter()
        .take(7)
        .map(|l| 2.0 * (l.shape.0 * l.shape.1) as f64)
        .sum::<f64>()
        + 4.0 * seq as f64 * mc.num_attention_heads as f64 * mc.head_dim as f64;
    // AWQ: the quantized re-run of every window, plus on the search subset one float pass
    // and 20 scale candidates, each about 1.5 passes' worth of the subset (the attention
    // and the MLP re-run from their stage; 2026-12-04 on SmolLM2)
    let awq_samples = c.method.awq_options().map_or(0, |a| a.samples);
    let awq_frac = awq_samples.min(c.nsamples) as f64 / c.nsamples as f64;
    let passes = if c.method.uses_awq() {
        1.0 + awq_frac * (1.0 + 20.0 * 1.5)
    } else if c.method.true_sequential() {
        1.0 // one staged forward per block
    } else {
        2.0
    };
    // AWQ's statistics come from the search subset only
    let hess_tokens = if c.method.uses_awq() && !c.method.uses_gptq() {
        tokens as f64 * awq_frac
    } else {
        tokens as f64
    };
    let hess: f64 = [d, d, d, inter]
        .iter()
        .map(|&x| 2.0 * (x * x) as f64)
        .sum::<f64>()
        * hess_tokens
        / 2.0;
    let solver: f64 = if c.method.uses_gptq() {
        plan.layers
            .iter()
            .map(|l| {
                let (o, i) = (l.shape.0 as f64, l.shape.1 as f64);
                i * i * i + 2.0 * o * i * i
            })
            .sum()
    } else {
        0.0
    };
    let flops = passes * per_token_block * tokens as f64 * mc.num_hidden_layers as f64
        + hess * mc.num_hidden_layers as f64
        + solver;
    let bpw = plan
        .layers
        .iter()
        .map(|l| l.estimated_bits_per_weight() * (l.shape.0 * l.shape.1) as f64)
        .sum::<f64>()
        / params_linear.max(1) as f64;
    Ok(DryRun {
        plan,
        bits_per_weight: bpw,
        memory_bytes: memory,
        seconds: flops / 100e9,
        calibration_tokens: tokens,
    })
}

fn eval_tokens(tok: &LlamaTokenizer, e: &EvalSpec) -> Result<Vec<u32>> {
    let t = text::read_text(&e.text, e.field.as_deref())?;
    let ids = tok.encode(&t)?;
    if ids.len() < e.ctx {
        return Err(PipelineError::option(
            "--eval",
            format!(
                "{} has {} tokens, fewer than one window of {}",
                e.text.display(),
                ids.len(),
                e.ctx
            ),
        ));
    }
    Ok(ids)
}

/// The `quantization_config.json` of a run.
pub fn quantization_config_json(
    job: &QuantizeJob,
    plan: &Plan,
    out: &DriverOutput,
    calib: &CalibrationFacts,
    kind: &str,
) -> Value {
    let c = &job.config;
    // the file keeps every key for every method; GPTQ's are its defaults where it does not run
    let gptq = c.method.gptq_options().copied().unwrap_or_default();
    let mut layers = serde_json::Map::new();
    for (lp, ql) in plan.layers.iter().zip(&out.layers) {
        let mut v = json!({
            "quantized": ql.linear.is_some(),
            "skipped": lp.skip,
            "bits": lp.bits,
            "group_size": lp.group_size,
            "sym": lp.sym,
            "act_order": lp.act_order && c.method.uses_gptq(),
            "static_groups": lp.static_groups && c.method.uses_gptq(),
            "format": if lp.skip { "f32".to_string() } else { lp.spec.build().name() },
            "format_spec": serde_json::to_value(&lp.spec).expect("spec serialises"),
            "granularity": serde_json::to_value(lp.granularity).expect("granularity serialises"),
            "awq_scaled": ql.input_scale.is_some(),
            "hessian_shrink": if c.method.uses_gptq() && !lp.skip { json!(c.hessian_shrink_for(&lp.spec)) } else { Value::Null },
        });
        if let Some(q) = &ql.linear {
            let o = v.as_object_mut().expect("object");
            o.insert("bits_per_weight".into(), q.bits_per_weight().into());
            o.insert("g_idx_trivial".into(), q.g_idx_is_trivial().into());
            // what the reader of the codes needs (quantlab_checkpoints::quantlab)
            o.extend(quantlab_checkpoints::quantlab::layer_layout(q));
        }
        layers.insert(lp.name.clone(), v);
    }
    json!({
        "quant_method": "quantlab",
        "quantlab_version": env!("CARGO_PKG_VERSION"),
        "method": c.method.name(),
        "format": c.format.name(),
        "bits": plan.bits,
        "group_size": plan.group_size,
        "sym": c.sym,
        "act_order": gptq.act_order,
        "static_groups": gptq.static_groups,
        "damp_percent": gptq.damp,
        "block_size": gptq.block_size,
        "hessian_shrink": gptq.hessian_shrink,
        "mse": c.mse,
        "true_sequential": gptq.true_sequential,
        "double_quant": c.method.double_quant(),
        "int8_threshold": c.method.int8_threshold(),
        "awq_samples": c.method.awq_options().map(|a| a.samples),
        "awq_fold_only": c.method.awq_options().is_some_and(|a| a.fold_only),
        "skip": c.skip,
        "overrides": c.overrides,
        "calibration": calib,
        "source_model": job.model.display().to_string(),
        "source_kind": kind,
        "notes": plan.notes,
        "storage": "model.safetensors: dequantized f32 weights under Hugging Face names (AWQ scales folded into the RMSNorm weights); quantized.safetensors: NAME.codes u8 [out,in], NAME.scales / NAME.zeros f32 [out,groups], NAME.g_idx u32 [in], NAME.awq_scale f32 [in], NAME.dq_* (double quantization)",
        "layers": layers,
    })
}

fn dir_bytes(dir: &Path) -> Option<u64> {
    let mut n = 0;
    for e in std::fs::read_dir(dir).ok()? {
        let e = e.ok()?;
        n += e.metadata().ok()?.len();
    }
    Some(n)
}

/// [`crate::run`] for a LLaMA-family model: [`prepare`], load, calibration windows, the
/// driver, then (with `eval`) the perplexities before and after and the KL divergence from the
/// source model in one pass, then the atomic save. `cancel` (set by a Ctrl-C handler) stops
/// the run at the next layer boundary; nothing is written then.
pub fn run_llama(job: &QuantizeJob, cancel: Option<&AtomicBool>) -> Result<QuantizeReport> {
    let t_job = Instant::now();
    let (_mc, plan) = prepare(job)?;
    let mut jt = JobTimings::default();
    let c = &job.config;

    let t0 = Instant::now();
    let mut src = SourceModel::load_with(&job.model, c.lazy)?;
    if let Some(r) = &c.rotate {
        src.rotate(r.kind, r.seed)?;
    }
    jt.load = t0.elapsed().as_secs_f64();

    let t0 = Instant::now();
    let windows = calibration_windows(
        &src.tokenizer,
        &job.calibration,
        c.nsamples,
        c.seqlen,
        c.seed,
    )?;
    let eval_ids = match &job.eval {
        Some(e) => Some(eval_tokens(&src.tokenizer, e)?),
        None => None,
    };
    jt.calibration = t0.elapsed().as_secs_f64();
    let calib = CalibrationFacts {
        source: job.calibration.describe(),
        nsamples: windows.len(),
        seqlen: if windows.is_empty() { 0 } else { c.seqlen },
        seed: c.seed,
        tokens: windows.iter().map(Vec::len).sum(),
    };

    let ctl = Control {
        progress: job.progress,
        cancel,
    };
    let out = quantize_model(&mut src.model, &windows, &plan, c, ctl)?;

    // The evaluation runs after the quantization, the source model loaded again beside the
    // quantized one: one pass over the windows gives both perplexities (equal to
    // `perplexity`'s) and the KL divergence of the quantized model from the source.
    let t0 = Instant::now();
    let mut eval_facts = None;
    let mut kld = None;
    if let (Some(e), Some(ids)) = (&job.eval, &eval_ids) {
        let base = SourceModel::load_with(&job.model, c.lazy)?;
        let params = PplParams {
            ctx: e.ctx,
            max_windows: e.max_windows,
        };
        let r = kl_divergence(KldBase::Model(&base.model), &src.model, ids, &params)?;
        eval_facts = Some(EvalFacts {
            text: e.text.display().to_string(),
            ctx: e.ctx,
            windows: r.windows,
            tokens_scored: r.tokens_scored,
            seconds: r.seconds,
        });
        kld = Some(r);
    }
    let ppl_before = kld.as_ref().map(|k| k.ppl_base);
    let ppl_after = kld.as_ref().map(|k| k.ppl);
    jt.eval = t0.elapsed().as_secs_f64();

    // sizes
    let mc = src.model.config();
    let others: u64 = src
        .others
        .iter()
        .filter(|(n, _)| !(n.as_str() == "lm_head.weight" && mc.tie_word_embeddings))
        .map(|(_, t)| t.elem_count() as u64)
        .sum();
    let mut report = QuantizeReport::assemble(
        job,
        &plan,
        &|i, _| out.layers[i].linear.as_ref(),
        others,
        out.timings.clone(),
        jt,
        out.reports.clone(),
        calib.clone(),
    );
    report.ppl_before = ppl_before;
    report.ppl_after = ppl_after;
    report.kld = kld;
    report.eval = eval_facts;
    if let Some(dir) = &job.out {
        let t0 = Instant::now();
        let kind = format!("{:?}", src.kind);
        let qc = quantization_config_json(job, &plan, &out, &calib, &kind);
        report.wall_seconds = t_job.elapsed().as_secs_f64();
        if c.format == ExportFormat::Quantlab {
            let inputs = SaveInputs {
                model: &src.model,
                others: &src.others,
                layers: &out.layers,
                norm_scales: &out.norm_scales,
                source: &job.model,
                tokenizer: &src.tokenizer,
                quant_config: qc,
                report: serde_json::to_value(&report).expect("report serialises"),
            };
            save_quantized(dir, &inputs, job.overwrite, cancel)?;
        } else {
            if let Some(c) = cancel {
                if c.load(std::sync::atomic::Ordering::Relaxed) {
                    return Err(PipelineError::Interrupted);
                }
            }
            if dir.exists() && !job.overwrite {
                return Err(PipelineError::option(
                    "--out",
                    format!("{} already exists", dir.display()),
                ));
            }
            let inputs = ExportInputs {
                model: &src.model,
                others: &src.others,
                layers: &out.layers,
                norm_scales: &out.norm_scales,
                source: &job.model,
                source_kind: src.kind,
                tokenizer: &src.tokenizer,
                config: c,
                plan: &plan,
                quant_config: qc,
            };
            write_export(dir, &inputs)?;
        }
        report.job_timings.save = t0.elapsed().as_secs_f64();
        report.file_bytes = if dir.is_file() {
            std::fs::metadata(dir).ok().map(|m| m.len())
        } else {
            dir_bytes(dir)
        };
    }
    report.wall_seconds = t_job.elapsed().as_secs_f64();
    Ok(report)
}

/// The report's constructor lives with the job it describes (the report module knows no job).
impl QuantizeReport {
    /// The parts of the report every architecture fills the same way, from the job and its
    /// plan: bits per weight and sizes over the plan's linears (`linear(i, plan.layers[i])` is
    /// the quantized linear `i`, `None` when it was left in full precision, counted as 16
    /// bits a weight), with the `others` parameters outside them counted as f16; the mean relative output error over the linears that were
    /// quantized (neither skipped nor left unchanged). Perplexity, evaluation and
    /// `embed_cosine` start empty.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn assemble<'q>(
        job: &QuantizeJob,
        plan: &Plan,
        linear: &dyn Fn(
            usize,
            &crate::config::LayerPlan,
        ) -> Option<&'q quantlab_grids::QuantizedLinear>,
        others: u64,
        timings: Timings,
        job_timings: JobTimings,
        layers: Vec<LayerReport>,
        calibration: CalibrationFacts,
    ) -> Self {
        let c = &job.config;
        let mut bits_linear = 0.0;
        let mut n_linear = 0u64;
        for (i, lp) in plan.layers.iter().enumerate() {
            let n = (lp.shape.0 * lp.shape.1) as u64;
            n_linear += n;
            bits_linear += match linear(i, lp) {
                Some(q) => q.bits().total_bits(),
                None => 16.0 * n as f64,
            };
        }
        let quantized: Vec<f64> = layers
            .iter()
            .filter(|r| !r.skipped && r.rel_output_error > 0.0)
            .map(|r| r.rel_output_error)
            .collect();
        Self {
            model: job.model.display().to_string(),
            method: c.method.name().into(),
            bits: plan.bits,
            group_size: plan.group_size,
            sym: c.sym,
            act_order: c.method.gptq_options().is_some_and(|g| g.act_order),
            bits_per_weight: bits_linear / n_linear.max(1) as f64,
            size_bytes: (bits_linear / 8.0).ceil() as u64 + 2 * others,
            size_bytes_f16: 2 * (n_linear + others),
            file_bytes: None,
            seconds: timings.total,
            wall_seconds: 0.0,
            timings,
            job_timings,
            mean_rel_output_error: quantized.iter().sum::<f64>() / quantized.len().max(1) as f64,
            layers,
            ppl_before: None,
            ppl_after: None,
            kld: None,
            embed_cosine: None,
            eval: None,
            calibration,
            notes: plan.notes.clone(),
            out: job.out.as_ref().map(|o| o.display().to_string()),
            peak_rss_mb: quantlab_models::peak_rss_mb(),
        }
    }
}
