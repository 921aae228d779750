//! The report of a whole-model run: per layer, totals, timings, perplexity.

use serde::Serialize;

use crate::driver::{LayerReport, Timings};

/// Calibration facts.
#[derive(Clone, Debug, Serialize)]
pub struct CalibrationFacts {
    /// Where the text came from.
    pub source: String,
    /// Windows.
    pub nsamples: usize,
    /// Tokens per window.
    pub seqlen: usize,
    /// Seed of the draw.
    pub seed: u64,
    /// `nsamples * seqlen`.
    pub tokens: usize,
}

/// Perplexity evaluation facts.
#[derive(Clone, Debug, Serialize)]
pub struct EvalFacts {
    /// The text file.
    pub text: String,
    /// Window length.
    pub ctx: usize,
    /// Windows scored.
    pub windows: usize,
    /// Tokens scored.
    pub tokens_scored: usize,
    /// Seconds of the evaluation after quantization.
    pub seconds: f64,
}

/// Time outside the driver.
#[derive(Clone, Debug, Default, Serialize)]
pub struct JobTimings {
    /// Loading the model and tokenizer.
    pub load: f64,
    /// Tokenizing and drawing the calibration windows.
    pub calibration: f64,
    /// Perplexity before and after.
    pub eval: f64,
    /// Writing the checkpoint.
    pub save: f64,
}

/// Everything a run measured; `--json` prints it as one object.
#[derive(Clone, Debug, Serialize)]
pub struct QuantizeReport {
    /// The source model.
    pub model: String,
    /// The method.
    pub method: String,
    /// Bits (default of every layer; overrides may differ).
    pub bits: u32,
    /// Group size (`-1` = per row).
    pub group_size: i64,
    /// Symmetric grid.
    pub sym: bool,
    /// GPTQ act-order.
    pub act_order: bool,
    /// Average bits per weight over the block linears (codes + parameters + `g_idx`;
    /// skipped linears count 16).
    pub bits_per_weight: f64,
    /// Size of the model as deployed: block linears at their exact bits, every other tensor
    /// (embeddings, norms, untied lm_head, skipped linears) at 16 bits.
    pub size_bytes: u64,
    /// The same model with every tensor at 16 bits.
    pub size_bytes_f16: u64,
    /// Bytes of the written directory (f32 dequantized weights + codes), when saved.
    pub file_bytes: Option<u64>,
    /// Quantization seconds (the driver: forward + Hessian + solver + AWQ search).
    pub seconds: f64,
    /// Wall seconds of the whole job (load, calibration, eval, save included).
    pub wall_seconds: f64,
    /// The driver's split.
    pub timings: Timings,
    /// The rest of the job.
    pub job_timings: JobTimings,
    /// Mean of the quantized layers' relative output errors.
    pub mean_rel_output_error: f64,
    /// One entry per block linear.
    pub layers: Vec<LayerReport>,
    /// Perplexity of the source model on the eval text.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ppl_before: Option<f64>,
    /// Perplexity of the quantized model.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ppl_after: Option<f64>,
    /// Encoders (BERT): mean cosine similarity between the quantized and the float model's
    /// sentence embeddings of the eval text's sentences.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub embed_cosine: Option<f64>,
    /// Evaluation facts.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eval: Option<EvalFacts>,
    /// Calibration facts.
    pub calibration: CalibrationFacts,
    /// What the method did and did not do on this model.
    pub notes: Vec<String>,
    /// The output directory, when written.
    pub out: Option<String>,
    /// Peak resident memory (MB), when known.
    pub peak_rss_mb: Option<f64>,
}

impl QuantizeReport {
    /// The parts of the report every architecture fills the same way, from the job and its
    /// plan: bits per weight and sizes over the plan's linears (`linear(i, plan.layers[i])` is
    /// the quantized linear `i`, `None` when it was left in full precision, counted as 16
    /// bits a weight), with the `others` parameters outside them counted as f16; the mean relative output error over the linears that were
    /// quantized (neither skipped nor left unchanged). Perplexity, evaluation and
    /// `embed_cosine` start empty.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn assemble<'q>(
        job: &crate::QuantizeJob,
        plan: &crate::Plan,
        linear: &dyn Fn(usize, &crate::LayerPlan) -> Option<&'q quantlab_grids::QuantizedLinear>,
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
            act_order: c.act_order,
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
            embed_cosine: None,
            eval: None,
            calibration,
            notes: plan.notes.clone(),
            out: job.out.as_ref().map(|o| o.display().to_string()),
            peak_rss_mb: quantlab_models::peak_rss_mb(),
        }
    }

    /// One JSON object.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("the report serialises")
    }

    /// A readable table: one row per linear, then the totals.
    pub fn table(&self) -> String {
        let mut s = String::new();
        s.push_str(&format!(
            "{:<36} {:>11} {:<13} {:>6} {:>12} {:>10} {:>7} {:>7}\n",
            "layer", "shape", "format", "bpw", "rel.err", "damp", "retries", "sec"
        ));
        for l in &self.layers {
            let short = l.name.strip_prefix("model.").unwrap_or(&l.name);
            s.push_str(&format!(
                "{:<36} {:>11} {:<13} {:>6.3} {:>12} {:>10} {:>7} {:>7.2}\n",
                short,
                format!("{}x{}", l.shape.0, l.shape.1),
                l.format,
                l.bits_per_weight,
                if l.skipped {
                    "skipped".to_string()
                } else {
                    format!("{:.4e}", l.rel_output_error)
                },
                if l.damp > 0.0 {
                    format!("{:.2e}", l.damp)
                } else {
                    "-".into()
                },
                l.damp_retries,
                l.seconds
            ));
        }
        let t = &self.timings;
        s.push('\n');
        let mut kv = vec![
            (
                "method".to_string(),
                format!(
                    "{} {}-bit, group {}{}{}",
                    self.method,
                    self.bits,
                    self.group_size,
                    if self.sym { ", sym" } else { ", asym" },
                    if self.act_order { ", act-order" } else { "" }
                ),
            ),
            (
                "bits per weight".into(),
                format!("{:.4}", self.bits_per_weight),
            ),
            (
                "size".into(),
                format!(
                    "{:.1} MB (f16: {:.1} MB)",
                    self.size_bytes as f64 / 1e6,
                    self.size_bytes_f16 as f64 / 1e6
                ),
            ),
            (
                "mean rel. output error".into(),
                format!("{:.4e}", self.mean_rel_output_error),
            ),
            (
                "quantization time".into(),
                format!(
                    "{:.1} s (forward {:.1}, hessian {:.1}, solver {:.1}, awq search {:.1})",
                    self.seconds, t.forward, t.hessian, t.solver, t.awq_search
                ),
            ),
            (
                "wall time".into(),
                format!(
                    "{:.1} s (load {:.1}, calibration {:.1}, eval {:.1}, save {:.1})",
                    self.wall_seconds,
                    self.job_timings.load,
                    self.job_timings.calibration,
                    self.job_timings.eval,
                    self.job_timings.save
                ),
            ),
            (
                "calibration".into(),
                format!(
                    "{} windows x {} tokens, seed {} ({})",
                    self.calibration.nsamples,
                    self.calibration.seqlen,
                    self.calibration.seed,
                    self.calibration.source
                ),
            ),
        ];
        if let (Some(b), Some(a)) = (self.ppl_before, self.ppl_after) {
            let e = self.eval.as_ref();
            kv.push((
                "perplexity".into(),
                format!(
                    "{b:.3} -> {a:.3} ({} windows of {} tokens)",
                    e.map_or(0, |e| e.windows),
                    e.map_or(0, |e| e.ctx)
                ),
            ));
        }
        if let Some(c) = self.embed_cosine {
            kv.push((
                "embedding cosine".into(),
                format!(
                    "{c:.5} (quantized vs float, {} sentences)",
                    self.eval.as_ref().map_or(0, |e| e.windows)
                ),
            ));
        }
        if let Some(o) = &self.out {
            kv.push(("written to".into(), o.clone()));
        }
        for n in &self.notes {
            kv.push(("note".into(), n.clone()));
        }
        let w = kv.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
        for (k, v) in kv {
            s.push_str(&format!("{k:<w$}  {v}\n"));
        }
        s
    }
}
