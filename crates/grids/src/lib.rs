//! # quantlab-grids: number formats
//!
//! Scalar reference implementations of the number formats of post-training quantization,
//! behind one trait, [`Format`], so a notebook or a solver can swap one for another:
//!
//! * [`UniformGrid`]: uniform affine grids, 2..8 bits, symmetric or asymmetric, with the
//!   reference GPTQ conventions and its optional MSE clipping search;
//! * [`codebook::Codebook`]: NF4 and FP4 (QLoRA / bitsandbytes) with blockwise absmax, and
//!   the flat bitsandbytes block layout ([`codebook::quantize_blockwise`]);
//! * [`double_quant`]: QLoRA's double quantization of the block absmax with the 8-bit
//!   dynamic map;
//! * [`fp8`]: FP8 E4M3 and E5M2 with a per-tensor or per-channel scale;
//! * [`int8`]: absmax int8 (LLM.int8's `SCB`) and the LLM.int8() mixed-precision product;
//! * [`ggml`]: ggml's legacy 32-weight blocks Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 ([`GgmlGrid`]);
//! * [`ggml_k`]: ggml's K super-blocks Q2_K .. Q6_K (a 256-column fit span of sub-block groups);
//!
//! and the hand-off type [`QuantizedLinear`] that solvers produce, models run and checkpoint
//! formats pack, with exact bits-per-weight accounting ([`BitsAccounting`]). A format is
//! chosen at run time with [`FormatSpec`]. This crate knows nothing of models or files.
//!
//! ```
//! use quantlab_grids::{Format, UniformGrid};
//! let g = UniformGrid::new(4, false).unwrap();
//! let p = g.fit(&[-1.0, 0.5, 2.0]);
//! // range [-1, 2] over 15 steps: scale 0.2, zero 5
//! assert!((p.scale - 0.2).abs() < 1e-7 && p.zero == 5.0);
//! assert!((g.quantize(0.61, p) - 0.6).abs() < 1e-6);
//! ```

pub mod codebook;
pub mod double_quant;
mod error;
pub mod format;
pub mod fp8;
pub mod ggml;
pub mod ggml_k;
pub mod int8;
pub mod quantized;
pub mod uniform;

pub use codebook::{Codebook, FP4_CODE, NF4_CODE};
pub use double_quant::{DoubleQuant, NestedScales};
pub use error::{check_finite, GridError, Result};
pub use format::{FitSpan, Format, Granularity, GroupParams};
pub use fp8::{Fp8Format, Fp8Kind};
pub use ggml::GgmlGrid;
pub use int8::Int8Absmax;
pub use quantized::{quantize_rtn, BitsAccounting, FormatSpec, QuantizedLinear};
pub use uniform::{MseClip, UniformGrid};
