//! The report of a whole-model run: per layer, totals, timings, perplexity.

use serde::Serialize;

use ndarray::Array1;
use quantlab_grids::QuantizedLinear;

/// Where the seconds went.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Timings {
    /// Embedding and block forwards (captures and the re-runs that give the next inputs).
    pub forward: f64,
    /// Converting captured inputs and accumulating the Hessians / AWQ statistics.
    pub hessian: f64,
    /// The layer solvers (GPTQ, RTN, AWQ quantization) and the error measurement.
    pub solver: f64,
    /// AWQ scale and clip searches (their forwards included).
    pub awq_search: f64,
    /// Everything in the driver.
    pub total: f64,
}

/// The result of one linear.
#[derive(Clone, Debug, Serialize)]
pub struct LayerReport {
    /// Full name.
    pub name: String,
    /// `(out, in)`.
    pub shape: (usize, usize),
    /// Left in full precision.
    pub skipped: bool,
    /// The format's name (`int4-sym`, `nf4`, ...).
    pub format: String,
    /// Bit width of the codes.
    pub bits: u32,
    /// Group size (`-1` = per row).
    pub group_size: i64,
    /// `tr(D H D^T) / tr(W H W^T)` with the captured (undamped) `H`; for AWQ in the scaled
    /// domain (`W diag(s)` against inputs `x / s`), which is the same number for linears fed
    /// by a norm.
    pub rel_output_error: f64,
    /// Absolute damping used (GPTQ; 0 otherwise).
    pub damp: f64,
    /// Damping fraction used after retries.
    pub damp_percent: f64,
    /// Number of automatic damping retries.
    pub damp_retries: usize,
    /// Solver seconds.
    pub seconds: f64,
    /// Bits per weight, codes + parameters + non-trivial `g_idx` (16 for skipped linears,
    /// counted as f16).
    pub bits_per_weight: f64,
    /// AWQ: the chosen exponent of the scale search that scaled this linear's input.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub awq_alpha: Option<f64>,
    /// What `rel_output_error` was measured on: `"calibration"` (the Hessian of the inputs
    /// this linear received), `"weights"` (no calibration was run: `H = I`) or `"imatrix"`
    /// (no calibration; `H` = the diagonal of the `--imatrix` file's importance).
    pub error_basis: &'static str,
}

/// A quantized linear as the driver leaves it.
#[derive(Clone, Debug)]
pub struct QuantizedLayer {
    /// Full name.
    pub name: String,
    /// The codes and parameters (`None` when skipped, or for AWQ fold-only runs). For AWQ
    /// these are the codes of the scaled weight `W'`.
    pub linear: Option<QuantizedLinear>,
    /// AWQ: the scale `s` its input columns were multiplied by.
    pub input_scale: Option<Array1<f32>>,
    /// AWQ: the part of `input_scale` that lives in the preceding norm in the checkpoint
    /// (the model in memory holds `W' diag(1/s)` instead).
    pub norm_scale: Option<Array1<f32>>,
}

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
    /// Decoders: the KL divergence of the quantized model's next-token distributions from
    /// the source model's on the eval windows ([`quantlab_models::kl_divergence`]; its
    /// `ppl_base` and `ppl` are `ppl_before` and `ppl_after`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kld: Option<quantlab_models::KldReport>,
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
        if let Some(k) = &self.kld {
            kv.push((
                "KL divergence".into(),
                format!(
                    "mean {:.5} ± {:.5}, median {:.5}, p99 {:.4}; top-1 agreement {:.2}%",
                    k.kld_mean,
                    k.kld_err,
                    k.kld_median,
                    k.kld_p99,
                    100.0 * k.top1_agreement
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
