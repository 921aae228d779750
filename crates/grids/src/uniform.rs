//! Uniform affine grids with the conventions of the reference GPTQ `quant.py`.
//!
//! `q = clamp(round(x / s) + z, 0, maxq)`, `x~ = s (q - z)`, `maxq = 2^bits - 1`, rounding
//! half to even (as `torch.round`).
//!
//! * Asymmetric: the range `[min(x, 0), max(x, 0)]` is forced to include 0,
//!   `s = (xmax - xmin) / maxq`, `z = round(-xmin / s)`.
//! * Symmetric: `xmax = max(|xmin|, xmax)`, `xmin = -xmax` *only when some value is negative*
//!   (a group with no negative value keeps `xmin = 0`: a quirk of the reference, kept),
//!   `z = (maxq + 1) / 2`.
//! * An all-zero group gets the range `[-1, 1]`.
//! * Optional MSE clipping search (`mse=True` in the reference): shrink the range by
//!   `p = 1 - i / grid` for `i < maxshrink * grid`, keep the `p` with the least
//!   `sum |q(x) - x|^norm` (strictly less wins, so ties keep the wider range).

use crate::format::{Format, GroupParams};
use crate::{GridError, Result};
use serde::{Deserialize, Serialize};

/// Round half to even, as `f32::round_ties_even`, without its libm call on targets without
/// SSE4.1 (the x86-64 baseline): for `|x| < 2^22` the sum `x + 1.5 * 2^23` lies where the f32
/// spacing is 1, so the addition itself rounds `x` to an integer, ties to even (the constant
/// is even), and subtracting the constant is exact. Larger values (and NaN) take the library
/// call. The result differs from `round_ties_even` only in the sign of a zero.
///
/// ```
/// # use quantlab_grids::uniform::rne;
/// for x in [-2.5f32, -1.5, -0.5, 0.5, 1.5, 2.5, 3.49, -7.51, 1e7, -4194303.5] {
///     assert_eq!(rne(x), x.round_ties_even(), "{x}");
/// }
/// ```
#[inline(always)]
pub fn rne(x: f32) -> f32 {
    const SHIFT: f32 = 12_582_912.0;
    if x.abs() < 4_194_304.0 {
        (x + SHIFT) - SHIFT
    } else {
        x.round_ties_even()
    }
}

/// The reference GPTQ clipping search parameters.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct MseClip {
    /// Number of shrink steps per unit (reference: 100).
    pub grid: u32,
    /// Largest fraction of the range removed (reference: 0.8).
    pub max_shrink: f32,
    /// Exponent of the error norm (reference: 2.4).
    pub norm: f32,
}

impl Default for MseClip {
    fn default() -> Self {
        Self {
            grid: 100,
            max_shrink: 0.8,
            norm: 2.4,
        }
    }
}

/// A uniform affine grid of `bits` bits.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct UniformGrid {
    pub bits: u32,
    pub sym: bool,
    pub clip: Option<MseClip>,
}

impl UniformGrid {
    /// A grid of `bits` in 2..=8; `sym` picks the symmetric convention.
    pub fn new(bits: u32, sym: bool) -> Result<Self> {
        if !(2..=8).contains(&bits) {
            return Err(GridError::UnsupportedBits {
                bits,
                format: "the uniform grid".into(),
                allowed: "2..=8".into(),
            });
        }
        Ok(Self {
            bits,
            sym,
            clip: None,
        })
    }

    /// Check `bits` and the clipping parameters (for a grid built by hand or deserialized).
    pub fn validate(&self) -> Result<()> {
        if !(2..=8).contains(&self.bits) {
            return Err(GridError::UnsupportedBits {
                bits: self.bits,
                format: "the uniform grid".into(),
                allowed: "2..=8".into(),
            });
        }
        if let Some(c) = self.clip {
            if c.grid == 0
                || !(0.0..=1.0).contains(&c.max_shrink)
                || c.norm.is_nan()
                || c.norm <= 0.0
            {
                return Err(GridError::InvalidOption {
                    option: "MSE clip".into(),
                    detail: format!(
                        "grid {} (>= 1), max_shrink {} (in [0, 1]), norm {} (> 0)",
                        c.grid, c.max_shrink, c.norm
                    ),
                });
            }
        }
        Ok(())
    }

    /// The same grid with the MSE clipping search switched on.
    pub fn with_clip(mut self, clip: MseClip) -> Self {
        self.clip = Some(clip);
        self
    }

    /// `2^bits - 1`, the largest code.
    #[inline]
    pub fn maxq(&self) -> f32 {
        ((1u32 << self.bits) - 1) as f32
    }

    /// Scale and zero for the range `[xmin, xmax]` (already forced to include 0).
    #[inline]
    fn params_for_range(&self, xmin: f32, xmax: f32) -> GroupParams {
        let maxq = self.maxq();
        let scale = (xmax - xmin) / maxq;
        let zero = if self.sym {
            (maxq + 1.0) / 2.0
        } else {
            rne(-xmin / scale)
        };
        GroupParams { scale, zero }
    }

    /// The range the reference starts from: min/max forced to include 0, symmetric rule,
    /// all-zero fallback.
    pub fn initial_range(&self, w: &[f32]) -> (f32, f32) {
        let mut xmin = w.iter().copied().fold(0.0f32, f32::min);
        let mut xmax = w.iter().copied().fold(0.0f32, f32::max);
        if self.sym {
            xmax = xmax.max(xmin.abs());
            if xmin < 0.0 {
                xmin = -xmax;
            }
        }
        if xmin == 0.0 && xmax == 0.0 {
            xmin = -1.0;
            xmax = 1.0;
        }
        (xmin, xmax)
    }

    /// Quantize with explicit parameters (the reference `quantize(x, scale, zero, maxq)`).
    #[inline]
    pub fn quantize_with(&self, x: f32, p: GroupParams) -> f32 {
        let q = (rne(x / p.scale) + p.zero).clamp(0.0, self.maxq());
        p.scale * (q - p.zero)
    }

    fn fit_impl(&self, w: &[f32], importance: Option<&[f32]>) -> GroupParams {
        let (xmin, xmax) = self.initial_range(w);
        let base = self.params_for_range(xmin, xmax);
        let Some(clip) = self.clip else {
            return base;
        };
        let mut best = f32::INFINITY;
        let mut best_p = base;
        let steps = (clip.max_shrink * clip.grid as f32) as u32;
        for i in 0..steps {
            // Python computes `p = 1 - i / grid` in double and torch rounds it to f32.
            let p = (1.0 - i as f64 / clip.grid as f64) as f32;
            let (xmin1, xmax1) = (p * xmin, p * xmax);
            let mut cand = self.params_for_range(xmin1, xmax1);
            if self.sym {
                cand.zero = base.zero;
            }
            let err: f32 = w
                .iter()
                .enumerate()
                .map(|(k, &x)| {
                    let e = (self.quantize_with(x, cand) - x).abs().powf(clip.norm);
                    importance.map_or(e, |imp| imp[k] * e)
                })
                .sum();
            if err < best {
                best = err;
                best_p = cand;
            }
        }
        best_p
    }
}

impl Format for UniformGrid {
    fn name(&self) -> String {
        format!(
            "int{}-{}{}",
            self.bits,
            if self.sym { "sym" } else { "asym" },
            if self.clip.is_some() { "-mse" } else { "" }
        )
    }

    fn code_bits(&self) -> u32 {
        self.bits
    }

    /// An f16 scale, plus a `bits`-bit zero point when asymmetric (the symmetric zero is a
    /// constant of the format).
    fn param_bits(&self) -> f64 {
        16.0 + if self.sym { 0.0 } else { self.bits as f64 }
    }

    /// The f16 scale.
    fn scale_bits(&self) -> f64 {
        16.0
    }

    fn fit(&self, w: &[f32]) -> GroupParams {
        self.fit_impl(w, None)
    }

    fn fit_weighted(&self, w: &[f32], importance: Option<&[f32]>) -> GroupParams {
        if let Some(imp) = importance {
            assert_eq!(
                imp.len(),
                w.len(),
                "importance and weights differ in length"
            );
        }
        self.fit_impl(w, importance)
    }

    #[inline]
    fn encode(&self, x: f32, p: GroupParams) -> u8 {
        (rne(x / p.scale) + p.zero).clamp(0.0, self.maxq()) as u8
    }

    #[inline]
    fn decode(&self, code: u8, p: GroupParams) -> f32 {
        p.scale * (code as f32 - p.zero)
    }

    #[inline]
    fn quantize(&self, x: f32, p: GroupParams) -> f32 {
        self.quantize_with(x, p)
    }
}
