//! Absmax int8 (LLM.int8(), Dettmers et al. 2022) and its mixed-precision matrix product.
//!
//! Vector-wise quantization: each output row of the weight (or each group) keeps its
//! absolute maximum, bitsandbytes' `SCB`; `q = round(x * (127 / absmax))` (ties to even, the
//! reciprocal first as bitsandbytes computes it), `x~ = q * (absmax / 127)`. Codes lie in
//! `-127..=127` and are stored as the bit pattern of an `i8` in a `u8`.
//!
//! [`llm_int8_matmul`] is the paper's decomposition (Section 3.2, Eq. 3):
//! `X W^T = sum_{h in O} X_h W_h^T (full precision) + S * sum_{h not in O} Xq_h Wq_h^T (int8)`,
//! where `O` is the set of input (feature) columns in which some activation has
//! `|x| > threshold` (6.0 in the paper and in `BitsAndBytesConfig`).

use crate::format::{Format, GroupParams};
use ndarray::{Array2, ArrayView2};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

/// Absmax int8: scale = `absmax` of the group (the `SCB` of a row), 8-bit codes.
///
/// ```
/// use quantlab_grids::{int8::Int8Absmax, Format};
/// let f = Int8Absmax;
/// let p = f.fit(&[0.5, -2.54]); // SCB 2.54: step 0.02
/// assert_eq!(f.encode(-2.54, p) as i8, -127);
/// assert_eq!(f.encode(0.5, p) as i8, 25);
/// assert!((f.quantize(0.5, p) - 0.5).abs() < 1e-6);
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Int8Absmax;

/// `round(x * (127 / absmax))` clamped to `-127..=127`; 0 when `absmax == 0`.
#[inline]
fn quantize_i8(x: f32, absmax: f32) -> i8 {
    if absmax == 0.0 {
        return 0;
    }
    (x * (127.0 / absmax))
        .round_ties_even()
        .clamp(-127.0, 127.0) as i8
}

impl Format for Int8Absmax {
    fn name(&self) -> String {
        "int8-absmax".into()
    }

    fn code_bits(&self) -> u32 {
        8
    }

    /// An f32 `SCB` per row (or group).
    fn param_bits(&self) -> f64 {
        32.0
    }

    fn fit(&self, w: &[f32]) -> GroupParams {
        GroupParams::scale_only(crate::codebook::absmax(w))
    }

    #[inline]
    fn encode(&self, x: f32, p: GroupParams) -> u8 {
        quantize_i8(x, p.scale) as u8
    }

    #[inline]
    fn decode(&self, code: u8, p: GroupParams) -> f32 {
        code as i8 as f32 * (p.scale / 127.0)
    }
}

/// Row-wise absmax int8 of an `[out, in]` weight: the int8 codes and the per-row absmax
/// (`SCB`), as LLM.int8() checkpoints store them. A zero row gets `SCB = 0` and codes 0.
///
/// ```
/// use ndarray::array;
/// use quantlab_grids::int8::int8_rowwise;
/// let (q, scb) = int8_rowwise(array![[1.0f32, -0.5], [0.0, 0.0]].view());
/// assert_eq!(scb, vec![1.0, 0.0]);
/// assert_eq!(q, array![[127i8, -64], [0, 0]]); // -63.5 rounds to even
/// ```
pub fn int8_rowwise(w: ArrayView2<f32>) -> (Array2<i8>, Vec<f32>) {
    let scb: Vec<f32> = w
        .rows()
        .into_iter()
        .map(|r| r.iter().fold(0.0f32, |m, &x| m.max(x.abs())))
        .collect();
    let q = Array2::from_shape_fn(w.dim(), |(r, k)| quantize_i8(w[[r, k]], scb[r]));
    (q, scb)
}

/// LLM.int8() matrix product `x w^T` of activations `x` `[n, in]` and a weight `w`
/// `[out, in]`, giving `[n, out]`.
///
/// * Outlier columns `O = {k : some |x[i, k]| > threshold}` are multiplied in f32 with the
///   **unquantized** weight columns (the paper keeps them in 16 bit).
/// * The other columns use vector-wise int8: each activation row is quantized with its own
///   absmax over the non-outlier columns, each weight row with its `SCB` over the whole
///   row (as stored, [`int8_rowwise`]); products accumulate in i32 and are rescaled by
///   `absmax_x * SCB / 127^2`.
///
/// `threshold = f32::INFINITY` gives plain vector-wise int8. Differences from
/// bitsandbytes' `MatMul8bitLt`: bitsandbytes marks outliers with `|x| >= threshold`, uses the
/// dequantized int8 weight for the outlier columns (only int8 is stored), and computes the
/// activation absmax skipping only the outlier elements. Panics if `x.ncols() != w.ncols()`
/// (a caller bug); i32 accumulation is exact for `in < 133_000`.
///
/// ```
/// use ndarray::array;
/// use quantlab_grids::int8::llm_int8_matmul;
/// let x = array![[1.0f32, 20.0, -1.0]];
/// let w = array![[1.0f32, 0.25, -1.0], [-1.0, 0.1, 0.0]];
/// let y = llm_int8_matmul(x.view(), w.view(), 6.0);
/// // column 1 (|20| > 6) is in f32: 20 * 0.25 = 5 and 20 * 0.1 = 2 exactly (no int8 error
/// // on 0.25 and 0.1); the other products are exact on the int8 grid
/// assert!((y[[0, 0]] - 7.0).abs() < 1e-5);
/// assert!((y[[0, 1]] - 1.0).abs() < 1e-5);
/// ```
#[track_caller]
pub fn llm_int8_matmul(x: ArrayView2<f32>, w: ArrayView2<f32>, threshold: f32) -> Array2<f32> {
    assert_eq!(
        x.ncols(),
        w.ncols(),
        "llm_int8_matmul: x is [n, {}] but w is [out, {}]",
        x.ncols(),
        w.ncols()
    );
    let (n, inp) = x.dim();
    let out = w.nrows();
    let outlier: Vec<bool> = (0..inp)
        .map(|k| x.column(k).iter().any(|v| v.abs() > threshold))
        .collect();
    let regular: Vec<usize> = (0..inp).filter(|&k| !outlier[k]).collect();
    let outliers: Vec<usize> = (0..inp).filter(|&k| outlier[k]).collect();
    let (wq, scb) = int8_rowwise(w);

    let rows: Vec<Vec<f32>> = (0..n)
        .into_par_iter()
        .map(|i| {
            let xi = x.row(i);
            let sx = regular.iter().fold(0.0f32, |m, &k| m.max(xi[k].abs()));
            let xq: Vec<i8> = regular.iter().map(|&k| quantize_i8(xi[k], sx)).collect();
            (0..out)
                .map(|o| {
                    let acc: i32 = regular
                        .iter()
                        .zip(&xq)
                        .map(|(&k, &q)| q as i32 * wq[[o, k]] as i32)
                        .sum();
                    let int8_part = acc as f32 * (sx * scb[o] / (127.0 * 127.0));
                    let fp_part: f32 = outliers.iter().map(|&k| xi[k] * w[[o, k]]).sum();
                    int8_part + fp_part
                })
                .collect()
        })
        .collect();
    Array2::from_shape_fn((n, out), |(i, o)| rows[i][o])
}
