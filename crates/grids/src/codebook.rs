//! Codebook formats: NF4 and FP4 of QLoRA / bitsandbytes, and any table of up to 256 values.
//!
//! A group (bitsandbytes: a *block*) is scaled by its absolute maximum, the **absmax**; each
//! value becomes the index of the code nearest to `clamp(x / absmax, -1, 1)`, and decodes to
//! `code[index] * absmax`. The absmax is stored as f32 (32 bits per block, before double
//! quantization, see [`crate::double_quant`]).
//!
//! ## Nearest code and ties
//! Like bitsandbytes' decision trees (`x > pivot` at each node, the pivots being the
//! midpoints between neighbouring sorted codes), a value goes to the upper of two
//! neighbouring codes only when it is **strictly** above their midpoint. The midpoints are
//! computed exactly (the half-sum of two f32 in f64) and rounded once to f32; the comparison
//! is made in f32.
//!
//! * NF4 (and any table built with [`Codebook::new`]): an exact tie goes to the lower
//!   (more negative) code, as in bitsandbytes' NF4 tree.
//! * FP4 is sign-magnitude, as bitsandbytes' FP4 tree: the sign is `x < 0`, then the
//!   magnitude `|x|` is matched against the 8 non-negative codes, a tie going to the smaller
//!   magnitude (toward zero). So `0.0` and `-0.0` give code 0 (+0), a small negative value
//!   gives code 8 (-0). bitsandbytes' FP4 pivots are rounded decimals (e.g. `0.583333f`
//!   for 7/12); ours are the exact midpoints, so a value within about 1e-6 of a pivot may
//!   pick the other neighbour.
//! * The scaled value is `x * (1 / absmax)`, as bitsandbytes' kernels compute it (a
//!   reciprocal, then a product), clamped to `[-1, 1]`. A block whose absmax is 0 stores the
//!   code of 0.0 (bitsandbytes gets a NaN-driven code there); either way it decodes to 0.
//!
//! ## Blocks
//! [`quantize_blockwise`] and [`dequantize_blockwise`] work on a flat slice in blocks of
//! `block` contiguous values, the last block possibly shorter: bitsandbytes' layout for a
//! weight `[out, in]` flattened row-major. When `in % block == 0` these blocks are exactly the
//! groups of [`Granularity::Group(block)`](crate::Granularity::Group), so
//! `quantize_rtn(.., &FormatSpec::Nf4, Granularity::Group(64))` stores the same codes and
//! absmax (row-major) as bitsandbytes' `quantize_4bit(.., blocksize=64)`.

use crate::format::{Format, GroupParams};
use crate::{GridError, Result};

/// The NF4 code of QLoRA (bitsandbytes `get_4bit_type("nf4")`), exact f32 values, code order.
///
/// Written with the published decimals (the shortest decimal of each f32 widened to f64),
/// which name exactly these f32 values.
#[allow(clippy::excessive_precision)]
pub const NF4_CODE: [f32; 16] = [
    -1.0,
    -0.696_192_800_998_687_7,
    -0.525_073_051_452_636_7,
    -0.394_917_488_098_144_53,
    -0.284_441_381_692_886_35,
    -0.184_773_430_228_233_34,
    -0.091_050_036_251_544_95,
    0.0,
    0.079_580_299_556_255_34,
    0.160_930_201_411_247_25,
    0.246_112_301_945_686_34,
    0.337_915_241_718_292_24,
    0.440_709_829_330_444_34,
    0.562_617_003_917_694_1,
    0.722_956_836_223_602_3,
    1.0,
];

/// The FP4 code of bitsandbytes (1 sign, 2 exponent, 1 mantissa bit; `get_4bit_type("fp4")`):
/// `[0, 0.0625, 8, 12, 4, 6, 2, 3, -0, -0.0625, -8, -12, -4, -6, -2, -3] / 12`, code order.
#[allow(clippy::eq_op)] // 12.0 / 12.0 spells the table as published
pub const FP4_CODE: [f32; 16] = [
    0.0 / 12.0,
    0.0625 / 12.0,
    8.0 / 12.0,
    12.0 / 12.0,
    4.0 / 12.0,
    6.0 / 12.0,
    2.0 / 12.0,
    3.0 / 12.0,
    -0.0 / 12.0,
    -0.0625 / 12.0,
    -8.0 / 12.0,
    -12.0 / 12.0,
    -4.0 / 12.0,
    -6.0 / 12.0,
    -2.0 / 12.0,
    -3.0 / 12.0,
];

/// A codebook format: absmax scaling and the nearest of a table of values in `[-1, 1]`.
#[derive(Clone, Debug, PartialEq)]
pub struct Codebook {
    name: String,
    values: Vec<f32>,
    sign_magnitude: bool,
    /// Codes sorted by value (for sign-magnitude: the codes of the non-negative half).
    sorted: Vec<u8>,
    /// `mids[j]` = f32 midpoint of `values[sorted[j]]` and `values[sorted[j + 1]]`.
    mids: Vec<f32>,
}

impl Codebook {
    /// A codebook from a table of 2..=256 finite values in `[-1, 1]` (index = code),
    /// matched with "nearest, exact ties to the lower value".
    ///
    /// ```
    /// use quantlab_grids::{codebook::Codebook, Format, GroupParams};
    /// let c = Codebook::new("ternary", &[-1.0, 0.0, 1.0]).unwrap();
    /// let p = GroupParams::scale_only(2.0);
    /// assert_eq!(c.encode(0.9, p), 1); // 0.45 -> 0
    /// assert!((c.quantize(1.2, p) - 2.0).abs() < 1e-7); // 0.6 -> 1
    /// ```
    pub fn new(name: &str, values: &[f32]) -> Result<Self> {
        let bad = |detail: String| GridError::InvalidOption {
            option: format!("codebook `{name}`"),
            detail,
        };
        if !(2..=256).contains(&values.len()) {
            return Err(bad(format!(
                "{} values: a codebook holds 2..=256",
                values.len()
            )));
        }
        if let Some(v) = values.iter().find(|v| !v.is_finite() || v.abs() > 1.0) {
            return Err(bad(format!("value {v} is not a finite number in [-1, 1]")));
        }
        let mut sorted: Vec<u8> = (0..values.len()).map(|i| i as u8).collect();
        sorted.sort_by(|&a, &b| values[a as usize].total_cmp(&values[b as usize]));
        Ok(Self::assemble(name, values, false, sorted))
    }

    /// A sign-magnitude codebook of 2^k values: codes `0..n/2` are the non-negative
    /// magnitudes, code `c + n/2` is the negative of code `c`. Ties go toward zero.
    fn sign_magnitude(name: &str, values: &[f32]) -> Self {
        let half = values.len() / 2;
        for c in 0..half {
            debug_assert!(values[c] >= 0.0 && values[c + half] == -values[c]);
        }
        let mut sorted: Vec<u8> = (0..half).map(|i| i as u8).collect();
        sorted.sort_by(|&a, &b| values[a as usize].total_cmp(&values[b as usize]));
        Self::assemble(name, values, true, sorted)
    }

    fn assemble(name: &str, values: &[f32], sign_magnitude: bool, sorted: Vec<u8>) -> Self {
        let mids = sorted
            .windows(2)
            .map(|w| {
                let (a, b) = (values[w[0] as usize] as f64, values[w[1] as usize] as f64);
                ((a + b) / 2.0) as f32
            })
            .collect();
        Self {
            name: name.to_string(),
            values: values.to_vec(),
            sign_magnitude,
            sorted,
            mids,
        }
    }

    /// NF4 (QLoRA's 4-bit NormalFloat), [`NF4_CODE`].
    ///
    /// ```
    /// use quantlab_grids::{codebook::{Codebook, NF4_CODE}, Format};
    /// let nf4 = Codebook::nf4();
    /// let p = nf4.fit(&[0.5, -2.0, 1.0]); // absmax 2
    /// assert_eq!(p.scale, 2.0);
    /// // 0.5 / 2 = 0.25 is nearest to NF4_CODE[10] = 0.2461...
    /// assert_eq!(nf4.encode(0.5, p), 10);
    /// assert!((nf4.quantize(0.5, p) - 2.0 * NF4_CODE[10]).abs() < 1e-7);
    /// ```
    pub fn nf4() -> Self {
        Self::new("nf4", &NF4_CODE).expect("the NF4 table is valid")
    }

    /// FP4 of bitsandbytes, [`FP4_CODE`], sign-magnitude matching (ties toward zero).
    ///
    /// ```
    /// use quantlab_grids::{codebook::Codebook, Format, GroupParams};
    /// let fp4 = Codebook::fp4();
    /// let p = GroupParams::scale_only(12.0); // codes become 0, 0.0625, 2, 3, 4, 6, 8, 12
    /// assert_eq!(fp4.quantize(5.2, p), 6.0);
    /// assert_eq!(fp4.quantize(-2.4, p), -2.0);
    /// ```
    pub fn fp4() -> Self {
        Self::sign_magnitude("fp4", &FP4_CODE)
    }

    /// The table, index = code.
    pub fn values(&self) -> &[f32] {
        &self.values
    }

    /// Number of codes.
    pub fn len(&self) -> usize {
        self.values.len()
    }

    /// Always false (a codebook holds at least 2 values); for clippy's `len` convention.
    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    /// The code nearest to `y`, a value already divided by the absmax (not clamped yet).
    /// NaN gives the code of the smallest value.
    #[inline]
    pub fn nearest(&self, y: f32) -> u8 {
        let y = y.clamp(-1.0, 1.0);
        if self.sign_magnitude {
            let m = y.abs();
            let c = self.sorted[self.mids.partition_point(|&mid| m > mid)];
            if y < 0.0 {
                c + (self.values.len() / 2) as u8
            } else {
                c
            }
        } else {
            self.sorted[self.mids.partition_point(|&mid| y > mid)]
        }
    }
}

impl Format for Codebook {
    fn name(&self) -> String {
        self.name.clone()
    }

    /// `ceil(log2(len))`: 4 for NF4 and FP4.
    fn code_bits(&self) -> u32 {
        usize::BITS - (self.values.len() - 1).leading_zeros()
    }

    /// An f32 absmax per block.
    fn param_bits(&self) -> f64 {
        32.0
    }

    /// The absmax of the group (0 for an empty or all-zero group).
    fn fit(&self, w: &[f32]) -> GroupParams {
        GroupParams::scale_only(absmax(w))
    }

    #[inline]
    fn encode(&self, x: f32, p: GroupParams) -> u8 {
        if p.scale == 0.0 {
            return self.nearest(0.0);
        }
        self.nearest(x * (1.0 / p.scale))
    }

    #[inline]
    fn decode(&self, code: u8, p: GroupParams) -> f32 {
        self.values[code as usize] * p.scale
    }
}

/// `max |x|` (NaN values are skipped; 0 for an empty slice).
pub(crate) fn absmax(w: &[f32]) -> f32 {
    w.iter().fold(0.0f32, |m, &x| m.max(x.abs()))
}

/// Blockwise absmax quantization of a flat slice, bitsandbytes' layout: blocks of `block`
/// contiguous values (the last one may be shorter), one f32 absmax per block, one code per
/// value (unpacked; packing two 4-bit codes per byte belongs to the checkpoint writers).
///
/// Non-finite inputs are the caller's to refuse first (see [`crate::check_finite`]); they do
/// not panic here. Panics if `block == 0` (a caller bug).
///
/// ```
/// use quantlab_grids::codebook::{quantize_blockwise, dequantize_blockwise, Codebook};
/// let x = [0.1f32, -0.4, 0.2, 2.0, -1.0];
/// let nf4 = Codebook::nf4();
/// let (codes, absmax) = quantize_blockwise(&x, &nf4, 2);
/// assert_eq!(absmax, vec![0.4, 2.0, 1.0]); // the tail block holds one value
/// let y = dequantize_blockwise(&codes, &absmax, &nf4, 2);
/// assert!(x.iter().zip(&y).all(|(a, b)| (a - b).abs() <= 0.2 * 2.0));
/// assert_eq!(y[1], -0.4); // the absmax itself is exact
/// ```
#[track_caller]
pub fn quantize_blockwise(values: &[f32], code: &Codebook, block: usize) -> (Vec<u8>, Vec<f32>) {
    assert!(block > 0, "block size must be positive");
    let mut codes = Vec::with_capacity(values.len());
    let mut scales = Vec::with_capacity(values.len().div_ceil(block));
    for chunk in values.chunks(block) {
        let p = code.fit(chunk);
        scales.push(p.scale);
        codes.extend(chunk.iter().map(|&x| code.encode(x, p)));
    }
    (codes, scales)
}

/// The inverse of [`quantize_blockwise`]: `code[codes[i]] * absmax[i / block]`.
///
/// Panics if `absmax.len() != ceil(codes.len() / block)` or a code is out of the table
/// (caller bugs).
#[track_caller]
pub fn dequantize_blockwise(
    codes: &[u8],
    absmax: &[f32],
    code: &Codebook,
    block: usize,
) -> Vec<f32> {
    assert!(block > 0, "block size must be positive");
    assert_eq!(
        absmax.len(),
        codes.len().div_ceil(block),
        "{} codes in blocks of {block} need {} absmax values",
        codes.len(),
        codes.len().div_ceil(block)
    );
    codes
        .iter()
        .enumerate()
        .map(|(i, &c)| code.decode(c, GroupParams::scale_only(absmax[i / block])))
        .collect()
}
