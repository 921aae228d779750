//! # quantlab-solvers: layer-wise quantization solvers
//!
//! Solvers take a weight matrix `W [out, in]`, a Hessian `H = 2/n X^T X [in, in]` (built by
//! [`hessian::Hessian`] from the inputs `X [tokens, in]`) and a number format from
//! `quantlab-grids`, and return a [`quantlab_grids::QuantizedLinear`] with a
//! [`SolveReport`]. They know nothing of models.
//!
//! * [`hessian`]: streaming `H` (full or diagonal = llama.cpp imatrix);
//! * [`obd`], [`obs`]: one weight at a time, for pruning and quantization (teaching);
//! * [`obq`]: greedy order per row with inverse-Hessian downdates;
//! * [`gptq`]: reference (unblocked) and fast (blocked, Cholesky) GPTQ;
//! * [`rtn`]: round-to-nearest with the same report;
//! * [`awq`]: activation-aware scale and clip search;
//! * [`metrics`]: `rel_output_error = tr(D H D^T) / tr(W H W^T)`;
//! * [`synth`]: seeded correlated inputs with outlier channels (tests, benchmarks);
//! * [`bench`]: the GPTQ benchmark behind `quantlab bench gptq`.
//!
//! ```
//! use ndarray::Array2;
//! use quantlab_grids::{FormatSpec, Granularity, UniformGrid};
//! use quantlab_solvers::{gptq::{gptq, GptqParams}, hessian::Hessian, rel_output_error, synth};
//! let X = synth::correlated_inputs(256, 32, 7, 2);
//! let mut h = Hessian::new(32);
//! h.add_batch(X.view(), 1).unwrap();
//! let H = h.finish();
//! let W = synth::random_weight(16, 32, 8);
//! let spec = FormatSpec::Uniform(UniformGrid::new(4, true).unwrap());
//! let p = GptqParams { granularity: Granularity::Group(16), ..Default::default() };
//! let (q_gptq, _) = gptq(W.view(), H.view(), &spec, &p).unwrap();
//! let (q_rtn, _) = quantlab_solvers::rtn::rtn(W.view(), None, &spec, p.granularity).unwrap();
//! let e_gptq = rel_output_error(W.view(), q_gptq.dequantize().view(), H.view()).unwrap();
//! let e_rtn = rel_output_error(W.view(), q_rtn.dequantize().view(), H.view()).unwrap();
//! assert!(e_gptq < e_rtn);
//! ```

pub mod awq;
pub mod bench;
mod error;
pub mod gptq;
pub mod hessian;
pub mod linalg;
pub mod metrics;
pub mod obd;
pub mod obq;
pub mod obs;
pub mod report;
pub mod rtn;
pub mod synth;

pub use error::{Result, SolverError};
pub use faer::Par;
pub use metrics::{output_error, rel_output_error};
pub use report::{DampRetry, SolveReport, SolverOutput};
