//! Double quantization of block scales (QLoRA, bitsandbytes `compress_statistics=True`).
//!
//! The f32 absmax of every block (32 bits per block of 64 = 0.5 bits per parameter) is
//! itself quantized: subtract `offset = mean(absmax)`, then quantize the centred values
//! blockwise (blocks of 256 scales, one f32 *nested absmax* each) with the signed 8-bit
//! dynamic map. Reconstruction: `absmax_i = map[code_i] * nested_absmax[i / 256] + offset`.
//! Cost: `8 / 64 + 32 / (64 * 256) = 0.126953125` bits per parameter (plus one f32 offset per
//! tensor), see [`bits_per_parameter`].
//!
//! ## The 8-bit dynamic map
//! The dynamic data type (Dettmers 2015, "8-Bit Approximations for Parallelism in Deep
//! Learning"; bitsandbytes `create_dynamic_map(signed, max_exponent_bits=7, total_bits=8)`):
//! after the sign bit, the number of leading zero bits `z` is a decimal exponent (the value
//! lies in the decade `[0.1, 1] * 10^-z`), the first 1 bit is an indicator, and the remaining
//! bits are a linear fraction: `2^f` values placed at the midpoints of `2^f` equal bins of
//! `[0.1, 1]`, times `10^-z`. Signed: 7 bits after the sign, so `z = 0..=6` with
//! `f = 6 - z`, giving 64 + 32 + ... + 1 = 127 magnitudes, each with both signs, plus 0 and
//! 1.0 = 256 values. Unsigned: the sign bit is spent on the fraction too, `f = 7 - z`,
//! 128 + 64 + ... + 2 = 254 positive values, plus 0 and 1.0. The table is sorted (index =
//! code). So the signed map runs from -0.99296875 through 0 (code 127) to 1.0 (code 255);
//! its smallest positive value is `0.55e-6`.
//!
//! bitsandbytes builds the bins with `torch.linspace` in f32 and then scales in double; we
//! compute every value exactly in f64 and round once to f32, so an entry may differ from
//! bitsandbytes' by an ulp. Exported checkpoints carry their own `nested_quant_map`, so the
//! values written are the values used.

use crate::codebook::Codebook;
use crate::format::Format;
use crate::{GridError, Result};
use serde::{Deserialize, Serialize};
use std::sync::OnceLock;

/// The 256 values of bitsandbytes' 8-bit dynamic map, sorted ascending (see the module
/// documentation for the construction).
///
/// ```
/// use quantlab_grids::double_quant::dynamic_map_8bit;
/// let m = dynamic_map_8bit(true);
/// assert_eq!((m[0], m[127], m[255]), (-0.99296875, 0.0, 1.0));
/// assert!((m[128] - 0.55e-6).abs() < 1e-12);
/// ```
pub fn dynamic_map_8bit(signed: bool) -> [f32; 256] {
    let mut v: Vec<f64> = Vec::with_capacity(256);
    // z = number of leading zeros after the sign = decimal exponent 10^-z
    for z in 0..=6i32 {
        let fraction_bits = if signed { 6 - z } else { 7 - z };
        let n = 1u32 << fraction_bits;
        let decade = 1.0 / 10f64.powi(z); // 10^-z, correctly rounded
        for j in 0..n {
            // midpoint of bin j of n equal bins of [0.1, 1]
            let mid = 0.1 + 0.9 * (j as f64 + 0.5) / n as f64;
            v.push(decade * mid);
            if signed {
                v.push(-decade * mid);
            }
        }
    }
    v.push(0.0);
    v.push(1.0);
    assert_eq!(v.len(), 256, "the dynamic map has 256 values");
    let mut out: Vec<f32> = v.into_iter().map(|x| x as f32).collect();
    out.sort_by(f32::total_cmp);
    out.try_into().expect("256 values")
}

fn signed_dynamic_codebook() -> &'static Codebook {
    static CODE: OnceLock<Codebook> = OnceLock::new();
    CODE.get_or_init(|| {
        Codebook::new("dynamic8", &dynamic_map_8bit(true)).expect("the dynamic map is valid")
    })
}

/// Bits per parameter spent on block constants with double quantization: an 8-bit code per
/// block of `block` parameters plus an f32 nested absmax per `nested_block` blocks
/// (the one f32 offset per tensor is not included).
///
/// ```
/// use quantlab_grids::double_quant::bits_per_parameter;
/// assert!((bits_per_parameter(64, 256) - 0.126953125).abs() < 1e-12);
/// ```
#[track_caller]
pub fn bits_per_parameter(block: usize, nested_block: usize) -> f64 {
    assert!(
        block > 0 && nested_block > 0,
        "block sizes must be positive"
    );
    8.0 / block as f64 + 32.0 / (block as f64 * nested_block as f64)
}

/// Double-quantized block scales.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NestedScales {
    /// One 8-bit code of the signed dynamic map per scale.
    pub codes: Vec<u8>,
    /// f32 absmax of each block of `blocksize` centred scales (the last may be short).
    pub nested_absmax: Vec<f32>,
    /// The mean of the original scales, subtracted before quantization.
    pub offset: f32,
    /// Scales per nested block (bitsandbytes: 256).
    pub blocksize: usize,
}

impl NestedScales {
    /// The reconstructed scales: `map[code_i] * nested_absmax[i / blocksize] + offset`.
    pub fn dequantize(&self) -> Vec<f32> {
        let code = signed_dynamic_codebook();
        self.codes
            .iter()
            .enumerate()
            .map(|(i, &c)| {
                code.decode(
                    c,
                    crate::GroupParams::scale_only(self.nested_absmax[i / self.blocksize]),
                ) + self.offset
            })
            .collect()
    }

    /// Number of scales.
    pub fn len(&self) -> usize {
        self.codes.len()
    }

    /// Whether there are no scales.
    pub fn is_empty(&self) -> bool {
        self.codes.is_empty()
    }
}

/// Double quantization settings: scales per nested block.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DoubleQuant {
    /// Scales per nested block (bitsandbytes: 256).
    pub blocksize: usize,
}

impl Default for DoubleQuant {
    fn default() -> Self {
        Self { blocksize: 256 }
    }
}

impl DoubleQuant {
    /// Quantize block scales: offset = mean, then blockwise signed dynamic 8-bit codes.
    ///
    /// Errors when `absmax` is empty, holds a non-finite value, or `blocksize` is 0.
    ///
    /// ```
    /// use quantlab_grids::double_quant::DoubleQuant;
    /// let absmax = [0.5f32, 1.0, 1.5];
    /// let n = DoubleQuant::default().quantize_absmax(&absmax).unwrap();
    /// assert_eq!(n.offset, 1.0);
    /// assert_eq!(n.nested_absmax, vec![0.5]); // max |absmax - offset|
    /// let back = n.dequantize();
    /// // -0.5 / 0.5 = -1 has no code: the most negative is -0.99296875
    /// assert!((back[0] - (1.0 - 0.99296875 * 0.5)).abs() < 1e-7);
    /// assert_eq!((back[1], back[2]), (1.0, 1.5));
    /// ```
    pub fn quantize_absmax(&self, absmax: &[f32]) -> Result<NestedScales> {
        if self.blocksize == 0 {
            return Err(GridError::InvalidOption {
                option: "double quantization block size".into(),
                detail: "0: use a positive number of scales (bitsandbytes: 256)".into(),
            });
        }
        if absmax.is_empty() {
            return Err(GridError::InvalidOption {
                option: "double quantization input".into(),
                detail: "no scales to quantize".into(),
            });
        }
        crate::check_finite("absmax", absmax)?;
        let offset = (absmax.iter().map(|&a| a as f64).sum::<f64>() / absmax.len() as f64) as f32;
        let centred: Vec<f32> = absmax.iter().map(|&a| a - offset).collect();
        let (codes, nested_absmax) = crate::codebook::quantize_blockwise(
            &centred,
            signed_dynamic_codebook(),
            self.blocksize,
        );
        Ok(NestedScales {
            codes,
            nested_absmax,
            offset,
            blocksize: self.blocksize,
        })
    }

    /// The reverse of [`DoubleQuant::quantize_absmax`] (same as [`NestedScales::dequantize`]).
    pub fn dequantize_absmax(&self, nested: &NestedScales) -> Vec<f32> {
        nested.dequantize()
    }
}
