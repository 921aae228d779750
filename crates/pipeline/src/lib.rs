//! # quantlab-pipeline: whole-model quantization
//!
//! The sequential layer-wise driver (calibration -> capture -> solve -> replace -> re-run)
//! joining models, solvers and checkpoint formats.

mod error;
pub use error::{PipelineError, Result};
