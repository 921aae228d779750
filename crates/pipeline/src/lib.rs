//! # quantlab-pipeline: whole-model quantization
//!
//! The sequential layer-wise driver (calibration -> capture -> solve -> replace -> re-run)
//! joining models, solvers and checkpoint formats.
//!
//! * [`method`]: the methods (`rtn`, `gptq`, `awq`, `awq+gptq`, `nf4`, `fp4`, `int8`, `fp8`);
//!   [`format`]: the `--format` layouts and their ggml type rules;
//! * [`config`]: the options, skips and per-module overrides, resolved against a model and a
//!   format into a [`Plan`] before any work;
//! * [`calib`]: calibration windows drawn from a text with a seed;
//! * [`driver`]: the block-by-block driver ([`quantize_model`]) on a loaded
//!   [`quantlab_models::LlamaModel`];
//! * [`save`]: the project's checkpoint (a Hugging Face directory + the codes), written
//!   atomically, and its reader;
//! * [`export`]: `--format` (GPTQ, AWQ, bitsandbytes, GGUF checkpoints) and a loader for all
//!   of them ([`export::load_model`]);
//! * [`job`]: `quantlab quantize` on a LLaMA-family model; [`run`] and [`dry_run`] (here)
//!   dispatch a job to it or to [`bert`];
//! * [`tensors`]: tensor <-> ndarray conversions; [`bench`]: `quantlab bench quantize`;
//! * [`method`]: the methods, each with its own parameters ([`Method`], [`GptqOptions`], ...);
//! * [`report`]: per-layer and total figures;
//! * [`bert`]: the same recipe on BERT encoders (sentence-transformers directories).
//!
//! From a notebook, with the model already loaded:
//!
//! ```no_run
//! use quantlab_pipeline::{calib, driver, source::SourceModel, GptqOptions, Method, QuantizeConfig};
//! # fn main() -> quantlab_pipeline::Result<()> {
//! let mut src = SourceModel::load("SmolLM2-135M-Instruct.Q4_1.gguf".as_ref())?;
//! // the method carries its own parameters
//! let gptq = GptqOptions { act_order: true, ..Default::default() };
//! let cfg = QuantizeConfig { method: Method::Gptq(gptq), bits: Some(4), nsamples: 32, ..Default::default() };
//! let plan = cfg.plan(src.model.config())?;
//! let texts = calib::Calibration::Texts(vec!["Some prose to calibrate on ...".into()]);
//! let windows = calib::calibration_windows(&src.tokenizer, &texts, cfg.nsamples, cfg.seqlen, cfg.seed)?;
//! let out = driver::quantize_model(&mut src.model, &windows, &plan, &cfg, Default::default())?;
//! println!("{:.3e}", out.reports[0].rel_output_error);
//! # Ok(()) }
//! ```

pub mod bench;
pub mod bert;
pub mod calib;
pub mod config;
pub mod driver;
mod error;
pub mod export;
pub mod format;
pub mod imatrix;
pub mod job;
pub mod layer;
pub mod method;
pub mod report;
pub mod save;
pub mod source;
pub mod tensors;

pub use calib::Calibration;
pub use config::{LayerPlan, Override, Plan, QuantizeConfig, Rotation};
pub use driver::{quantize_model, Control, DriverOutput, LayerReport, QuantizedLayer, Timings};
pub use error::{PipelineError, Result};
pub use export::ExportFormat;
pub use job::{prepare, DryRun, EvalSpec, QuantizeJob};
pub use method::{AwqOptions, CodebookOptions, GptqOptions, Int8Options, Method, MethodKind};
pub use report::QuantizeReport;
pub use save::{load_quantized, save_quantized, QuantizedCheckpoint};

/// Runs a whole-model job ([`QuantizeJob`]): a BERT encoder directory through
/// [`bert::run_bert`], anything else through [`job::run_llama`] (check everything, load,
/// calibrate, evaluate before, quantize, evaluate after, save atomically). `cancel` (set by a
/// Ctrl-C handler) stops the run at the next layer boundary; nothing is written then.
pub fn run(
    job: &QuantizeJob,
    cancel: Option<&std::sync::atomic::AtomicBool>,
) -> Result<QuantizeReport> {
    if source::is_bert_dir(&job.model) {
        bert::run_bert(job, cancel)
    } else {
        job::run_llama(job, cancel)
    }
}

/// Checks a job and estimates its cost without loading the weights (`--dry-run`), for BERT
/// encoders ([`bert::dry_run_bert`]) and LLaMA-family models ([`job::dry_run_llama`]).
pub fn dry_run(job: &QuantizeJob) -> Result<DryRun> {
    if source::is_bert_dir(&job.model) {
        bert::dry_run_bert(job)
    } else {
        job::dry_run_llama(job)
    }
}
