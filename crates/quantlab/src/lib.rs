//! # quantlab
//!
//! The facade for notebooks and applications: one `:dep` brings the whole workspace.
//!
//! * re-exports: [`grids`] (number formats), and with the default features `solvers`,
//!   `models`, `pipeline`, `checkpoints`, `cuda`; plus [`ndarray`], [`plotters`], [`rand`]
//!   and [`rand_distr`] so a notebook needs no other `:dep`;
//! * [`report::Table`]: a table that renders as HTML in a notebook and as aligned text in a
//!   terminal;
//! * [`plots`]: histograms with grid levels and line plots, as inline SVG [`plots::Figure`]s.
//!
//! A notebook that only needs the number formats can skip the heavy crates (candle,
//! tokenizers, faer): `:dep quantlab = { path = "../crates/quantlab", default-features = false }`.
//!
//! ```
//! use quantlab::grids::{quantize_rtn, FormatSpec, Granularity, UniformGrid};
//! use quantlab::ndarray::Array2;
//! let w = Array2::from_shape_fn((4, 8), |(r, k)| (r as f32 - 1.5) * 0.1 + k as f32 * 0.01);
//! let spec = FormatSpec::Uniform(UniformGrid::new(8, false)?);
//! let q = quantize_rtn("w", w.view(), &spec, Granularity::PerChannel)?;
//! let wq = q.dequantize();
//! // round to nearest: every weight moves by at most half a step of its row
//! for r in 0..4 {
//!     let step = q.scales[[r, 0]];
//!     for k in 0..8 {
//!         assert!((wq[[r, k]] - w[[r, k]]).abs() <= 0.5 * step + 1e-6);
//!     }
//! }
//! # Ok::<(), quantlab::grids::GridError>(())
//! ```

pub mod error;
pub mod plots;
pub mod report;

pub use error::{Error, Result};

#[cfg(feature = "checkpoints")]
pub use quantlab_checkpoints as checkpoints;
#[cfg(feature = "cuda")]
pub use quantlab_cuda as cuda;
pub use quantlab_grids as grids;
#[cfg(feature = "models")]
pub use quantlab_models as models;
#[cfg(feature = "pipeline")]
pub use quantlab_pipeline as pipeline;
#[cfg(feature = "solvers")]
pub use quantlab_solvers as solvers;

pub use ndarray;
pub use plotters;
pub use rand;
pub use rand_distr;
