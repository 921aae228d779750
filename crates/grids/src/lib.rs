//! # quantlab-grids: number formats
//!
//! Scalar reference implementations of the number formats of post-training quantization,
//! behind one trait, [`Format`], so a notebook or a solver can swap one for another:
//!
//! * [`UniformGrid`]: uniform affine grids, 2..8 bits, symmetric or asymmetric, with the
//!   reference GPTQ conventions and its optional MSE clipping search;
//!
//! and the hand-off type [`QuantizedLinear`] that solvers produce, models run and checkpoint
//! formats pack. This crate knows nothing of models or files.
//!
//! ```
//! use quantlab_grids::{Format, UniformGrid};
//! let g = UniformGrid::new(4, false).unwrap();
//! let p = g.fit(&[-1.0, 0.5, 2.0]);
//! // range [-1, 2] over 15 steps: scale 0.2, zero 5
//! assert!((p.scale - 0.2).abs() < 1e-7 && p.zero == 5.0);
//! assert!((g.quantize(0.61, p) - 0.6).abs() < 1e-6);
//! ```

mod error;
pub mod format;
pub mod quantized;
pub mod uniform;

pub use error::{check_finite, GridError, Result};
pub use format::{Format, Granularity, GroupParams};
pub use quantized::{quantize_rtn, BitsAccounting, FormatSpec, QuantizedLinear};
pub use uniform::{MseClip, UniformGrid};
