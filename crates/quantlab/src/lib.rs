//! # quantlab
//!
//! The facade for notebooks and applications: one `:dep` brings the whole workspace.
//!
//! ```
//! use quantlab::grids::{Format, UniformGrid};
//! let g = UniformGrid::new(8, true).unwrap();
//! let p = g.fit(&[1.0, -2.0]);
//! assert!((g.quantize(-2.0, p) + 2.0).abs() < 1e-6);
//! ```

pub use quantlab_checkpoints as checkpoints;
pub use quantlab_cuda as cuda;
pub use quantlab_grids as grids;
pub use quantlab_models as models;
pub use quantlab_pipeline as pipeline;
pub use quantlab_solvers as solvers;

pub use ndarray;
pub use plotters;
