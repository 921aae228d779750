//! ggml's block formats as number formats: the legacy 32-weight blocks Q4_0, Q4_1, Q5_0,
//! Q5_1, Q8_0 and IQ4_NL (this module), and the super-blocks of 256 weights, the K-quants
//! Q2_K .. Q6_K and IQ4_XS ([`crate::ggml_k`]: each sub-block is a group, a super-block of
//! 256 is fitted at once, [`Format::fit_span`]).
//!
//! Each 32-weight block of a row is one group (`Granularity::Group(32)`); its parameters are
//! the block's f16 scale `d` (and, for the `_1` types, the f16 minimum `m`), so the codes and
//! [`GroupParams`] of a [`crate::QuantizedLinear`] map one to one onto ggml blocks and a
//! solver such as GPTQ places every weight on a value the file can hold exactly.
//!
//! | type | codes | [`GroupParams`] | decode (ggml's f32 expression) |
//! |------|-------|-----------------|--------------------------------|
//! | Q4_0 | 0..=15 | `scale = d`, `zero = 8` | `(q - 8) * d` |
//! | Q5_0 | 0..=31 | `scale = d`, `zero = 16` | `(q - 16) * d` |
//! | Q8_0 | i8 as u8 (two's complement) | `scale = d`, `zero = 0` | `q * d` |
//! | Q4_1 | 0..=15 | `scale = d`, `zero = m` (a VALUE, not code units) | `q * d + m` |
//! | Q5_1 | 0..=31 | `scale = d`, `zero = m` (a value) | `q * d + m` |
//! | IQ4_NL | 0..=15 | `scale = d`, `zero = 0` | `d * IQ4_NL_LEVELS[q]` (16 fixed int8 levels) |
//!
//! For the `_1` types the zero field holds the block minimum itself, because ggml adds it
//! after the product: storing `-m / d` in code units would not reproduce ggml's values bit
//! for bit.
//!
//! # Fit (reference)
//! As ggml's `quantize_row_*_ref`: Q4_0 / Q5_0 `d = max / -8` (`/ -16`) with `max` the signed
//! value of largest `|x|` (the first on ties); Q4_1 / Q5_1 `d = (max - min) / 15` (`/ 31`),
//! `m = min`; Q8_0 `d = amax / 127`. Then `d` and `m` are rounded to f16 (nearest even):
//! the returned parameters are exactly what the file stores.
//!
//! # Encode
//! ggml's rounding rule on the stored parameters: `q = floor(x / d + 8.5)` (Q4_0; `16.5`
//! for Q5_0), `floor((x - m) / d + 0.5)` (`_1`), `round(x / d)` half away from zero (Q8_0),
//! clamped to the codes; then the neighbouring codes are checked so the result is always the
//! nearest level in f32 (ties keep ggml's choice). ggml's reference multiplies by `1 / d`
//! computed from the unrounded `d`, so its codes can differ from ours by one step for a
//! weight within an f16 rounding of a midpoint; ours are the nearest under what is stored.
//! `d == 0` gives the code of value 0 (`_0`) or of `m` (`_1`).
//!
//! IQ4_NL (ggml type 20, llama.cpp's fallback for Q2_K / Q3_K rows that are not whole
//! super-blocks) has its own scale search (`iq4nl_fit`, documented there): our own, not
//! llama.cpp's; the layout and levels are exact. IQ4_XS (type 23) uses the same 16 levels
//! in super-blocks of 256 with a 6-bit signed scale per sub-block of 32
//! ([`crate::ggml_k`]); its sub-block scales come from the same search.
//!
//! # Weighted fit (imatrix)
//! [`Format::fit_weighted`] with importance `w_i >= 0` minimises
//! `E(d, m) = sum_i w_i (x_i - decode(encode(x_i)))^2` over candidates, each rounded to f16
//! before it is scored: the reference parameters; for `t` in `-10..=10` the scaled steps
//! `d_t = max / -(n (1 + t / 80))` (symmetric, `n` = 8, 16; Q8_0 `amax / (127 (1 + t / 80))`)
//! or `(max - min) / (qmax (1 + t / 150))` with `m = min` (affine), i.e. steps within about
//! 12 % (7 %) of the reference; and for the codes of each `d_t` the weighted least-squares
//! solution (`d = sum w x c / sum w c^2` with `c = q - zero`, or the 2x2 normal equations of
//! `x ~ d q + m`). The least `E` wins, the reference on ties, so the result is never worse
//! than the reference under the objective. Without importance (or importance summing to 0)
//! it is the reference fit: llama.cpp's RTN.
//!
//! ```
//! use quantlab_grids::{Format, GgmlGrid};
//! let x: Vec<f32> = (0..32).map(|i| (i as f32 - 12.0) * 0.25).collect();
//! let p = GgmlGrid::Q4_0.fit(&x);
//! // largest |x| is 4.75 (i = 31): d = 4.75 / -8 = -0.59375 (exact in f16)
//! assert_eq!((p.scale, p.zero), (-0.59375, 8.0));
//! // -3.0 / d + 8.5 = 13.55: code 13, value (13 - 8) * d
//! assert_eq!(GgmlGrid::Q4_0.encode(-3.0, p), 13);
//! assert!((GgmlGrid::Q4_0.quantize(-3.0, p) - -2.96875).abs() < 1e-7);
//! ```

use crate::format::{Format, GroupParams};
use half::f16;
use serde::{Deserialize, Serialize};

/// Weights per ggml legacy block.
pub const GGML_BLOCK: usize = 32;

/// One of ggml's block formats: a legacy 32-weight block, or a sub-block of a K super-block.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[allow(non_camel_case_types)]
pub enum GgmlGrid {
    /// 4-bit symmetric, `(q - 8) * d`.
    Q4_0,
    /// 4-bit affine, `q * d + m`.
    Q4_1,
    /// 5-bit symmetric, `(q - 16) * d`.
    Q5_0,
    /// 5-bit affine, `q * d + m`.
    Q5_1,
    /// 8-bit symmetric, `q * d` with `q` an i8.
    Q8_0,
    /// K super-block, 2-bit affine sub-blocks of 16 ([`crate::ggml_k`]).
    Q2_K,
    /// K super-block, 3-bit symmetric sub-blocks of 16.
    Q3_K,
    /// K super-block, 4-bit affine sub-blocks of 32.
    Q4_K,
    /// K super-block, 5-bit affine sub-blocks of 32.
    Q5_K,
    /// K super-block, 6-bit symmetric sub-blocks of 16.
    Q6_K,
    /// 32-weight block, f16 `d` times one of 16 fixed non-uniform int8 levels
    /// ([`IQ4_NL_LEVELS`]): `d * levels[q]`.
    IQ4_NL,
    /// Super-block of 256 with the IQ4_NL levels in sub-blocks of 32, each scaled by a signed
    /// 6-bit integer times one f16 `d`: `d * sc * levels[q]` ([`crate::ggml_k`]).
    IQ4_XS,
}

/// The 16 levels of ggml's IQ4_NL (`kvalues_iq4nl`, as the `gguf` package's dequantizer
/// lists them), in code order.
pub const IQ4_NL_LEVELS: [i8; 16] = [
    -127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113,
];

/// Round to f16 and back (nearest even).
#[inline]
fn f16r(x: f32) -> f32 {
    f16::from_f32(x).to_f32()
}

impl GgmlGrid {
    /// The legacy 32-weight grids.
    pub const ALL: [GgmlGrid; 5] = [
        GgmlGrid::Q4_0,
        GgmlGrid::Q4_1,
        GgmlGrid::Q5_0,
        GgmlGrid::Q5_1,
        GgmlGrid::Q8_0,
    ];

    /// The super-block grids: the K-quants and IQ4_XS, whose 256-weight super-blocks hold
    /// sub-block scales as integer multiples of one f16 `d` ([`crate::ggml_k`]). They are
    /// fitted a super-block at a time ([`Format::fit_span`]) and the solvers and the
    /// pipeline treat them alike (GPTQ in natural column order with each super-block fitted
    /// as the sweep reaches it, Hessian shrink 0.9).
    pub const K: [GgmlGrid; 6] = [
        GgmlGrid::Q2_K,
        GgmlGrid::Q3_K,
        GgmlGrid::Q4_K,
        GgmlGrid::Q5_K,
        GgmlGrid::Q6_K,
        GgmlGrid::IQ4_XS,
    ];

    /// Whether this is a super-block grid (one of [`GgmlGrid::K`]: a K-quant or IQ4_XS).
    pub fn is_k(self) -> bool {
        crate::ggml_k::layout(self).is_some()
    }

    /// Weights per parameter group: 32 for the legacy blocks, the sub-block (16 or 32) for
    /// the K types. `Granularity::Group(group_len())` is the granularity of this grid.
    pub fn group_len(self) -> usize {
        if self.is_k() {
            crate::ggml_k::sub_len(self)
        } else {
            GGML_BLOCK
        }
    }

    /// Columns fitted together: 256 for the K types, 32 otherwise.
    pub fn span_len(self) -> usize {
        if self.is_k() {
            crate::ggml_k::QK_K
        } else {
            GGML_BLOCK
        }
    }

    /// ggml's name (`"Q4_0"`, ...).
    pub fn ggml_name(self) -> &'static str {
        match self {
            GgmlGrid::Q4_0 => "Q4_0",
            GgmlGrid::Q4_1 => "Q4_1",
            GgmlGrid::Q5_0 => "Q5_0",
            GgmlGrid::Q5_1 => "Q5_1",
            GgmlGrid::Q8_0 => "Q8_0",
            GgmlGrid::Q2_K => "Q2_K",
            GgmlGrid::Q3_K => "Q3_K",
            GgmlGrid::Q4_K => "Q4_K",
            GgmlGrid::Q5_K => "Q5_K",
            GgmlGrid::Q6_K => "Q6_K",
            GgmlGrid::IQ4_NL => "IQ4_NL",
            GgmlGrid::IQ4_XS => "IQ4_XS",
        }
    }

    /// Whether the block stores a minimum `m` as a value (the legacy `_1` types).
    pub fn is_affine(self) -> bool {
        matches!(self, GgmlGrid::Q4_1 | GgmlGrid::Q5_1)
    }

    /// Bits of a code.
    pub fn bits(self) -> u32 {
        match self {
            GgmlGrid::Q4_0 | GgmlGrid::Q4_1 => 4,
            GgmlGrid::Q5_0 | GgmlGrid::Q5_1 => 5,
            GgmlGrid::Q8_0 => 8,
            GgmlGrid::IQ4_NL => 4,
            k => crate::ggml_k::code_bits(k),
        }
    }

    /// Largest code of the unsigned types (15 or 31); 127 for Q8_0.
    fn qmax(self) -> i32 {
        match self {
            GgmlGrid::Q8_0 => 127,
            g => (1 << g.bits()) - 1,
        }
    }

    /// Smallest signed integer value the codes take (Q4_0 -8, Q5_0 -16, Q8_0 -128; 0 for
    /// the affine types).
    fn qlo(self) -> i32 {
        match self {
            GgmlGrid::Q4_0 => -8,
            GgmlGrid::Q5_0 => -16,
            GgmlGrid::Q8_0 => -128,
            _ => 0,
        }
    }

    /// The constant offset of the symmetric types in code units (8, 16, 0).
    fn offset(self) -> f32 {
        match self {
            GgmlGrid::Q4_0 => 8.0,
            GgmlGrid::Q5_0 => 16.0,
            _ => 0.0,
        }
    }

    /// Signed integer value of a code (`q - offset` for `_0`, the i8 for Q8_0, `q` for `_1`).
    #[inline]
    fn int_of(self, code: u8) -> i32 {
        match self {
            GgmlGrid::Q8_0 => code as i8 as i32,
            GgmlGrid::Q4_0 | GgmlGrid::Q5_0 => code as i32 - self.offset() as i32,
            _ => code as i32,
        }
    }

    #[inline]
    fn code_of(self, q: i32) -> u8 {
        match self {
            GgmlGrid::Q8_0 => q as i8 as u8,
            GgmlGrid::Q4_0 | GgmlGrid::Q5_0 => (q + self.offset() as i32) as u8,
            _ => q as u8,
        }
    }

    /// Highest integer value (`qmax - offset` for `_0`).
    fn qhi(self) -> i32 {
        match self {
            GgmlGrid::Q4_0 => 7,
            GgmlGrid::Q5_0 => 15,
            g => g.qmax(),
        }
    }

    /// Parameters from an unrounded `d` (and `m`): f16-rounded, with the type's zero.
    fn params(self, d: f32, m: f32) -> GroupParams {
        GroupParams {
            scale: f16r(d),
            zero: if self.is_affine() {
                f16r(m)
            } else {
                self.offset()
            },
        }
    }

    /// `sum_i w_i (x_i - quantize(x_i))^2` in f64 (uniform weights when `w` is `None`).
    fn weighted_error(self, x: &[f32], w: Option<&[f32]>, p: GroupParams) -> f64 {
        x.iter()
            .enumerate()
            .map(|(i, &v)| {
                let e = (v - self.quantize(v, p)) as f64;
                w.map_or(1.0, |w| w[i] as f64) * e * e
            })
            .sum()
    }

    fn fit_search(self, x: &[f32], w: &[f32]) -> GroupParams {
        let reference = self.fit(x);
        let mut best = (self.weighted_error(x, Some(w), reference), reference);
        let consider = |p: GroupParams, best: &mut (f64, GroupParams)| {
            if p.scale.is_finite() && p.zero.is_finite() {
                let e = self.weighted_error(x, Some(w), p);
                if e < best.0 {
                    *best = (e, p);
                }
            }
        };
        if self.is_affine() {
            let (min, max) = min_max(x);
            if max <= min || !(max - min).is_finite() {
                return best.1;
            }
            let nm = self.qmax() as f32;
            for t in -10..=10 {
                let step = (max - min) / (nm + t as f32 * nm / 150.0);
                if !(step > 0.0 && step.is_finite()) {
                    continue;
                }
                let cand = self.params(step, min);
                consider(cand, &mut best);
                // Weighted least squares of x ~ d q + m for the codes of this candidate.
                let (mut sw, mut sq, mut sqq, mut sx, mut sxq) = (0.0f64, 0.0, 0.0, 0.0, 0.0);
                for (i, &v) in x.iter().enumerate() {
                    let q = self.encode(v, cand) as f64;
                    let wi = w[i] as f64;
                    sw += wi;
                    sq += wi * q;
                    sqq += wi * q * q;
                    sx += wi * v as f64;
                    sxq += wi * v as f64 * q;
                }
                let det = sw * sqq - sq * sq;
                if det > 0.0 {
                    let d = (sw * sxq - sq * sx) / det;
                    let m = (sqq * sx - sq * sxq) / det;
                    if d > 0.0 {
                        consider(self.params(d as f32, m as f32), &mut best);
                    }
                }
            }
        } else {
            let (max, amax) = signed_absmax(x);
            if amax == 0.0 {
                return best.1;
            }
            // Q4_0 / Q5_0 map `max` to the lowest code (negative `d`); Q8_0 uses `amax / 127`.
            let (num, n) = match self {
                GgmlGrid::Q8_0 => (amax, 127.0f32),
                _ => (max, -(self.qlo() as f32)),
            };
            let sign = if self == GgmlGrid::Q8_0 { 1.0 } else { -1.0 };
            for t in -10..=10 {
                let d = num / (sign * (n + t as f32 * n / 80.0));
                if !(d != 0.0 && d.is_finite()) {
                    continue;
                }
                let cand = self.params(d, 0.0);
                consider(cand, &mut best);
                let (mut sxc, mut scc) = (0.0f64, 0.0f64);
                for (i, &v) in x.iter().enumerate() {
                    let c = self.int_of(self.encode(v, cand)) as f64;
                    sxc += w[i] as f64 * v as f64 * c;
                    scc += w[i] as f64 * c * c;
                }
                if scc > 0.0 {
                    let d = (sxc / scc) as f32;
                    if d != 0.0 {
                        consider(self.params(d, 0.0), &mut best);
                    }
                }
            }
        }
        best.1
    }
}

/// Signed value of largest `|x|` (the first on ties), and that `|x|`.
fn signed_absmax(x: &[f32]) -> (f32, f32) {
    let (mut amax, mut max) = (0.0f32, 0.0f32);
    for &v in x {
        if amax < v.abs() {
            amax = v.abs();
            max = v;
        }
    }
    (max, amax)
}

fn min_max(x: &[f32]) -> (f32, f32) {
    let (mut min, mut max) = (f32::MAX, -f32::MAX);
    for &v in x {
        min = min.min(v);
        max = max.max(v);
    }
    (min, max)
}

/// Midpoints between neighbouring IQ4_NL levels (in level units).
const IQ4_NL_MID: [f32; 15] = {
    let mut m = [0.0f32; 15];
    let mut i = 0;
    while i < 15 {
        m[i] = (IQ4_NL_LEVELS[i] as f32 + IQ4_NL_LEVELS[i + 1] as f32) / 2.0;
        i += 1;
    }
    m
};

/// The code of the IQ4_NL level `d * level` nearest to `x` (exact in f32; ties: the lower
/// code); code 8 (level 1, the one nearest 0) when `d` is 0 or not finite.
#[inline]
pub(crate) fn iq4nl_encode(x: f32, d: f32) -> u8 {
    if d == 0.0 || !d.is_finite() {
        return 8;
    }
    let t = x / d;
    let c0 = if t.is_nan() {
        8
    } else {
        IQ4_NL_MID.iter().take_while(|&&m| t > m).count()
    };
    let err = |c: usize| (x - d * IQ4_NL_LEVELS[c] as f32).abs();
    let mut best = (err(c0), c0);
    for c in [c0.wrapping_sub(1), c0 + 1] {
        if c < 16 {
            let e = err(c);
            if e < best.0 || (e == best.0 && c < best.1) {
                best = (e, c);
            }
        }
    }
    best.1 as u8
}

/// `sum_i w_i (x_i - d levels[encode(x_i)])^2` in f64, and `sum w x l`, `sum w l^2` of the
/// chosen levels (for the least-squares refit).
pub(crate) fn iq4nl_score(x: &[f32], w: Option<&[f32]>, d: f32) -> (f64, f64, f64) {
    let (mut e, mut sxl, mut sll) = (0.0f64, 0.0f64, 0.0f64);
    for (i, &v) in x.iter().enumerate() {
        let l = IQ4_NL_LEVELS[iq4nl_encode(v, d) as usize] as f64;
        let wi = w.map_or(1.0, |w| w[i] as f64);
        let r = (v - d * l as f32) as f64;
        e += wi * r * r;
        sxl += wi * v as f64 * l;
        sll += wi * l * l;
    }
    (e, sxl, sll)
}

/// IQ4_NL's scale search (our own): `max` (the signed value of largest `|x|`) mapped onto the
/// level -127 or +113, each scaled by `1 + t / 40` for `t` in `-5..=5`, every candidate
/// rounded to f16 and scored by `sum_i w_i (x_i - y_i)^2`, plus the weighted least-squares
/// refit `sum w x l / sum w l^2` of each candidate's levels; the least error wins (the
/// first on ties, the plain `max / -127` first of all).
fn iq4nl_fit(x: &[f32], w: Option<&[f32]>) -> GroupParams {
    GroupParams::scale_only(iq4nl_scale(x, w, f16r))
}

/// The scale search of [`iq4nl_fit`] with each candidate passed through `round` before it
/// is scored (f16 rounding for IQ4_NL's stored `d`; the identity for the real sub-block
/// scales of IQ4_XS, which are rounded afterwards to integer multiples of the super-block
/// `d`, [`crate::ggml_k`]). Signed: the sign says whether `max` sits at the level -127 or
/// +113 end. 0 for an all-zero `x`.
pub(crate) fn iq4nl_scale(x: &[f32], w: Option<&[f32]>, round: impl Fn(f32) -> f32) -> f32 {
    let (max, amax) = signed_absmax(x);
    if amax == 0.0 {
        return 0.0;
    }
    let mut best: Option<(f64, f32)> = None;
    let consider = |d: f32, best: &mut Option<(f64, f32)>| -> (f64, f64) {
        let d = round(d);
        if d == 0.0 || !d.is_finite() {
            return (0.0, 0.0);
        }
        let (e, sxl, sll) = iq4nl_score(x, w, d);
        if best.is_none_or(|b| e < b.0) {
            *best = Some((e, d));
        }
        (sxl, sll)
    };
    for top in [-127.0f32, 113.0] {
        for t in -5..=5 {
            let d = max / (top * (1.0 + t as f32 / 40.0));
            let (sxl, sll) = consider(d, &mut best);
            if sll > 0.0 {
                consider((sxl / sll) as f32, &mut best);
            }
        }
    }
    best.map_or(0.0, |b| b.1)
}

impl Format for GgmlGrid {
    /// `ggml-q4_0`, `ggml-q4_1`, ...
    fn name(&self) -> String {
        format!("ggml-{}", self.ggml_name().to_lowercase())
    }

    fn code_bits(&self) -> u32 {
        self.bits()
    }

    /// An f16 `d`, plus an f16 `m` for the `_1` types.
    fn param_bits(&self) -> f64 {
        if *self == GgmlGrid::IQ4_NL {
            16.0
        } else if self.is_k() {
            crate::ggml_k::param_bits(*self)
        } else if self.is_affine() {
            32.0
        } else {
            16.0
        }
    }

    /// The f16 `d` (K types: all of a sub-block's parameters).
    fn scale_bits(&self) -> f64 {
        if self.is_k() {
            self.param_bits()
        } else {
            16.0
        }
    }

    /// K types: a super-block of 256 columns made of the sub-blocks.
    fn fit_span(&self) -> Option<crate::format::FitSpan> {
        self.is_k().then(|| crate::format::FitSpan {
            span: crate::ggml_k::QK_K,
            group: self.group_len(),
        })
    }

    /// K types: the super-block fit of [`crate::ggml_k`]; the legacy types fit each block
    /// alone ([`Format::fit_weighted`]).
    #[track_caller]
    fn fit_groups(
        &self,
        w: &[f32],
        importance: Option<&[f32]>,
        group_len: usize,
        out: &mut [GroupParams],
    ) {
        if self.is_k() {
            crate::ggml_k::fit_groups(*self, w, importance, group_len, out);
        } else {
            assert_eq!(
                out.len(),
                w.len().div_ceil(group_len.max(1)),
                "one parameter set per group"
            );
            for (i, (chunk, o)) in w.chunks(group_len.max(1)).zip(out.iter_mut()).enumerate() {
                let s = i * group_len;
                *o = self.fit_weighted(chunk, importance.map(|imp| &imp[s..s + chunk.len()]));
            }
        }
    }

    /// ggml's reference `d` (and `m`), rounded to f16 (see the module docs).
    fn fit(&self, w: &[f32]) -> GroupParams {
        match self {
            GgmlGrid::Q4_0 | GgmlGrid::Q5_0 => {
                let (max, _) = signed_absmax(w);
                self.params(max / self.qlo() as f32, 0.0)
            }
            GgmlGrid::Q8_0 => {
                let (_, amax) = signed_absmax(w);
                self.params(amax / 127.0, 0.0)
            }
            GgmlGrid::IQ4_NL => iq4nl_fit(w, None),
            k => {
                if k.is_k() {
                    return crate::ggml_k::fit_alone(*k, w, None);
                }
                let (min, max) = min_max(w);
                if w.is_empty() {
                    return self.params(0.0, 0.0);
                }
                self.params((max - min) / self.qmax() as f32, min)
            }
        }
    }

    /// The importance-weighted scale search of the module docs.
    #[track_caller]
    fn fit_weighted(&self, w: &[f32], importance: Option<&[f32]>) -> GroupParams {
        if *self == GgmlGrid::IQ4_NL {
            if let Some(imp) = importance {
                assert_eq!(
                    imp.len(),
                    w.len(),
                    "importance and weights differ in length"
                );
            }
            let plain = iq4nl_fit(w, None);
            let Some(imp) = importance.filter(|i| i.iter().map(|&v| v as f64).sum::<f64>() > 0.0)
            else {
                return plain;
            };
            // the weighted search, kept only when better than the plain fit under the weights
            let weighted = iq4nl_fit(w, Some(imp));
            let e = |p: GroupParams| iq4nl_score(w, Some(imp), p.scale).0;
            return if e(weighted) < e(plain) {
                weighted
            } else {
                plain
            };
        }
        if self.is_k() {
            if let Some(imp) = importance {
                assert_eq!(
                    imp.len(),
                    w.len(),
                    "importance and weights differ in length"
                );
            }
            return crate::ggml_k::fit_alone(*self, w, importance);
        }
        match importance {
            None => self.fit(w),
            Some(imp) => {
                assert_eq!(
                    imp.len(),
                    w.len(),
                    "importance and weights differ in length"
                );
                if imp.iter().map(|&v| v as f64).sum::<f64>() > 0.0 {
                    self.fit_search(w, imp)
                } else {
                    self.fit(w)
                }
            }
        }
    }

    #[inline]
    fn encode(&self, x: f32, p: GroupParams) -> u8 {
        if self.is_k() {
            return crate::ggml_k::encode(*self, x, p);
        }
        if *self == GgmlGrid::IQ4_NL {
            return iq4nl_encode(x, p.scale);
        }
        let d = p.scale;
        let (lo, hi) = (self.qlo(), self.qhi());
        if d == 0.0 || !d.is_finite() {
            return self.code_of(0);
        }
        let t = if self.is_affine() {
            (x - p.zero) / d
        } else {
            x / d
        };
        let q0 = if *self == GgmlGrid::Q8_0 {
            t.round()
        } else {
            (t + 0.5).floor()
        };
        let q0 = if q0.is_nan() {
            0
        } else {
            q0.clamp(lo as f32, hi as f32) as i32
        };
        // Exact nearest level in f32: the rounding above can be off by one near a midpoint.
        let err = |q: i32| (x - self.decode(self.code_of(q), p)).abs();
        let mut best = (err(q0), q0);
        for q in [q0 - 1, q0 + 1] {
            if (lo..=hi).contains(&q) {
                let e = err(q);
                if e < best.0 {
                    best = (e, q);
                }
            }
        }
        self.code_of(best.1)
    }

    #[inline]
    fn decode(&self, code: u8, p: GroupParams) -> f32 {
        if self.is_k() {
            crate::ggml_k::decode(*self, code, p)
        } else if *self == GgmlGrid::IQ4_NL {
            p.scale * IQ4_NL_LEVELS[code as usize & 15] as f32
        } else if self.is_affine() {
            code as f32 * p.scale + p.zero
        } else {
            self.int_of(code) as f32 * p.scale
        }
    }
}

/// Round-to-nearest of a dense `[out, in]` matrix onto a ggml grid with an importance per
/// input column (llama.cpp's imatrix: `importance[k]` = mean of `x_k^2` over the calibration
/// tokens, i.e. the diagonal of `X^T X` up to a constant): each 32-column block of each row
/// (each 256-column super-block for the K types, [`Format::fit_groups`]) gets the parameters
/// of the importance-weighted fit (the weighted search of the module docs; the reference fit
/// when `importance` is `None` or sums to 0 over the block), then every weight its nearest
/// level. The result has `Granularity::Group(grid.group_len())` and maps one to one onto
/// ggml blocks.
///
/// Errors: `in` not a multiple of 32 (256 for the K types), `importance` of the wrong length
/// or with a negative or non-finite entry, non-finite weights (each naming `name`).
///
/// ```
/// use ndarray::Array2;
/// use quantlab_grids::ggml::quantize_ggml_weighted;
/// use quantlab_grids::{quantize_rtn, FormatSpec, GgmlGrid, Granularity};
/// let w = Array2::from_shape_fn((3, 64), |(r, k)| ((r * 64 + k) as f32 * 0.61).sin());
/// // without importance it is the reference RTN
/// let a = quantize_ggml_weighted("w", w.view(), GgmlGrid::Q4_0, None).unwrap();
/// let b = quantize_rtn("w", w.view(), &FormatSpec::Ggml(GgmlGrid::Q4_0), Granularity::Group(32)).unwrap();
/// assert_eq!(a.dequantize(), b.dequantize());
/// // with importance the weighted error is never worse
/// let imp: Vec<f32> = (0..64).map(|k| 1.0 + (k % 7) as f32 * 10.0).collect();
/// let c = quantize_ggml_weighted("w", w.view(), GgmlGrid::Q4_0, Some(&imp)).unwrap();
/// let err = |q: &quantlab_grids::QuantizedLinear| {
///     let d = q.dequantize();
///     w.indexed_iter().map(|((r, k), x)| imp[k] * (x - d[[r, k]]).powi(2)).sum::<f32>()
/// };
/// assert!(err(&c) <= err(&a) * (1.0 + 1e-6));
/// ```
pub fn quantize_ggml_weighted(
    name: &str,
    w: ndarray::ArrayView2<f32>,
    grid: GgmlGrid,
    importance: Option<&[f32]>,
) -> crate::Result<crate::QuantizedLinear> {
    use crate::{FormatSpec, Granularity, GridError};
    let (out, inp) = w.dim();
    let span = grid.span_len();
    let g = grid.group_len();
    if out == 0 || inp == 0 || inp % span != 0 {
        return Err(GridError::Shape {
            what: format!("tensor `{name}`"),
            detail: format!(
                "[{out}, {inp}]: ggml {} blocks need a non-empty matrix with a multiple of {span} columns",
                grid.ggml_name()
            ),
        });
    }
    crate::error::check_finite_iter(name, w.iter().copied())?;
    if let Some(imp) = importance {
        if imp.len() != inp {
            return Err(GridError::Shape {
                what: format!("importance of `{name}`"),
                detail: format!("{} values for {inp} input columns", imp.len()),
            });
        }
        if let Some(k) = imp.iter().position(|v| !(v.is_finite() && *v >= 0.0)) {
            return Err(GridError::Shape {
                what: format!("importance of `{name}`"),
                detail: format!("column {k} has {} (use finite values >= 0)", imp[k]),
            });
        }
    }
    let nb = inp / g;
    let per_span = span / g;
    // rows are independent: fitted in parallel (the weighted searches dominate)
    use rayon::prelude::*;
    let rows: Vec<(Vec<u8>, Vec<f32>, Vec<f32>)> = (0..out)
        .into_par_iter()
        .map(|r| {
            let row: Vec<f32> = w.row(r).to_vec();
            let mut ps = vec![GroupParams::scale_only(0.0); per_span];
            let (mut c, mut sc, mut z) = (vec![0u8; inp], vec![0f32; nb], vec![0f32; nb]);
            for sp in 0..inp / span {
                let x = &row[sp * span..(sp + 1) * span];
                let imp = importance.map(|i| &i[sp * span..(sp + 1) * span]);
                grid.fit_groups(x, imp, g, &mut ps);
                for (j, &v) in x.iter().enumerate() {
                    let b = sp * per_span + j / g;
                    let p = ps[j / g];
                    sc[b] = p.scale;
                    z[b] = p.zero;
                    c[sp * span + j] = grid.encode(v, p);
                }
            }
            (c, sc, z)
        })
        .collect();
    let mut codes = ndarray::Array2::<u8>::zeros((out, inp));
    let mut scales = ndarray::Array2::<f32>::zeros((out, nb));
    let mut zeros = ndarray::Array2::<f32>::zeros((out, nb));
    for (r, (c, sc, z)) in rows.into_iter().enumerate() {
        codes.row_mut(r).assign(&ndarray::ArrayView1::from(&c));
        scales.row_mut(r).assign(&ndarray::ArrayView1::from(&sc));
        zeros.row_mut(r).assign(&ndarray::ArrayView1::from(&z));
    }
    let g_idx = (0..inp).map(|k| (k / g) as u32).collect();
    crate::QuantizedLinear::from_parts(
        FormatSpec::Ggml(grid),
        Granularity::Group(g),
        codes,
        scales,
        zeros,
        g_idx,
    )
}
