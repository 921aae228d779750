//! 8-bit floating point: E4M3 and E5M2 (the OCP "FP8 formats for deep learning",
//! NVIDIA `__nv_fp8_e4m3` / `__nv_fp8_e5m2`, torch `float8_e4m3fn` / `float8_e5m2`).
//!
//! | | E4M3 | E5M2 |
//! |---|---|---|
//! | bits | 1 sign, 4 exponent, 3 mantissa | 1 sign, 5 exponent, 2 mantissa |
//! | bias | 7 | 15 |
//! | subnormal (exponent field 0) | `m / 8 * 2^-6` | `m / 4 * 2^-14` |
//! | normal | `(1 + m / 8) * 2^(e - 7)` | `(1 + m / 4) * 2^(e - 15)` |
//! | largest finite | `S.1111.110` = 448 | `S.11110.11` = 57344 |
//! | infinity | none | `S.11111.00` |
//! | NaN | `S.1111.111` only | `S.11111.{01,10,11}` |
//!
//! Encoding rounds to nearest, ties to even (on the last mantissa bit).
//! * E4M3 **saturates**: any finite value (and ±inf) beyond 448 gives ±448 (`0x7E`/`0xFE`).
//! * E5M2 **overflows as IEEE 754 does**: round to nearest even with an unbounded exponent,
//!   and a result above 57344 becomes ±inf; so `|x| < 61440` gives at most 57344, and
//!   `|x| >= 61440` (the midpoint to 2^16, a tie that goes to the even 2^16) gives ±inf.
//!   ±inf stays ±inf. This is what torch's `.to(torch.float8_e5m2)` does.
//! * NaN gives the canonical NaN `0x7F` (sign kept: `0xFF` for a negative NaN).
//!
//! [`Fp8Format`] uses one scale per tensor or per output channel,
//! `scale = absmax / max_finite`, and saturates `x / scale` to `±max_finite` before
//! encoding (so it never stores inf or NaN).

use crate::format::{Format, GroupParams};
use serde::{Deserialize, Serialize};

/// Which FP8 layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Fp8Kind {
    /// 4 exponent bits, 3 mantissa bits, finite only (max 448).
    E4M3,
    /// 5 exponent bits, 2 mantissa bits, IEEE-like with inf and NaN (max 57344).
    E5M2,
}

impl Fp8Kind {
    /// Largest finite value: 448 (E4M3) or 57344 (E5M2).
    pub fn max_finite(self) -> f32 {
        match self {
            Fp8Kind::E4M3 => 448.0,
            Fp8Kind::E5M2 => 57344.0,
        }
    }

    /// Encode `x` (round to nearest even, overflow rule of the kind).
    pub fn encode(self, x: f32) -> u8 {
        match self {
            Fp8Kind::E4M3 => encode_e4m3(x),
            Fp8Kind::E5M2 => encode_e5m2(x),
        }
    }

    /// Decode a code.
    pub fn decode(self, code: u8) -> f32 {
        match self {
            Fp8Kind::E4M3 => decode_e4m3(code),
            Fp8Kind::E5M2 => decode_e5m2(code),
        }
    }
}

/// Round a finite, non-negative `a` to the grid of a minifloat with `m_bits` mantissa bits
/// and exponent bias `bias`, unbounded above: returns `(exponent field, mantissa field)`,
/// the exponent field possibly beyond the format's range (the caller handles overflow).
fn round_minifloat(a: f32, bias: i32, m_bits: u32) -> (i32, u32) {
    debug_assert!(a.is_finite() && a >= 0.0);
    let e_min = 1 - bias; // exponent of the smallest normal
                          // floor(log2 a) from the f32 exponent; f32 subnormals are far below every FP8 normal.
    let exp_field_f32 = ((a.to_bits() >> 23) & 0xff) as i32;
    let e = if exp_field_f32 == 0 {
        e_min
    } else {
        (exp_field_f32 - 127).max(e_min)
    };
    // Quantum 2^(e - m_bits); a / quantum is exact in f64 (a power-of-two rescaling).
    let quantum = 2f64.powi(e - m_bits as i32);
    let n = (a as f64 / quantum).round_ties_even() as u32;
    let one = 1u32 << m_bits;
    if n >= 2 * one {
        // rounded up to the next binade: n == 2 * one exactly
        (e + 1 + bias, 0)
    } else if n < one {
        // subnormal (only possible when e == e_min), or zero
        (0, n)
    } else {
        (e + bias, n - one)
    }
}

/// Encode an f32 as FP8 E4M3: nearest even, saturating to ±448 (±inf too), NaN -> `0x7F`
/// with the sign bit of the input.
///
/// ```
/// use quantlab_grids::fp8::{decode_e4m3, encode_e4m3};
/// assert_eq!(encode_e4m3(1.0), 0x38);
/// assert_eq!(decode_e4m3(encode_e4m3(0.3)), 0.3125); // neighbours 0.28125, 0.3125
/// assert_eq!(encode_e4m3(1e6), 0x7E); // saturates: 448
/// ```
pub fn encode_e4m3(x: f32) -> u8 {
    let sign = ((x.to_bits() >> 31) as u8) << 7;
    if x.is_nan() {
        return sign | 0x7F;
    }
    if x.is_infinite() {
        return sign | 0x7E;
    }
    let (e, m) = round_minifloat(x.abs(), 7, 3);
    if e > 15 || (e == 15 && m == 7) {
        return sign | 0x7E;
    }
    sign | ((e as u8) << 3) | m as u8
}

/// Decode an FP8 E4M3 code (`S.1111.111` is NaN; there is no infinity).
///
/// ```
/// use quantlab_grids::fp8::decode_e4m3;
/// assert_eq!(decode_e4m3(0x7E), 448.0);
/// assert_eq!(decode_e4m3(0x01), 2f32.powi(-9)); // smallest subnormal
/// assert!(decode_e4m3(0xFF).is_nan());
/// ```
pub fn decode_e4m3(code: u8) -> f32 {
    let sign = if code & 0x80 != 0 { -1.0 } else { 1.0 };
    let e = ((code >> 3) & 0x0F) as i32;
    let m = (code & 0x07) as f32;
    if e == 15 && m == 7.0 {
        return f32::NAN;
    }
    let mag = if e == 0 {
        m / 8.0 * 2f32.powi(-6)
    } else {
        (1.0 + m / 8.0) * 2f32.powi(e - 7)
    };
    sign * mag
}

/// Encode an f32 as FP8 E5M2: nearest even; IEEE overflow (`|x| >= 61440` -> ±inf); ±inf
/// kept; NaN -> `0x7F` with the sign bit of the input.
///
/// ```
/// use quantlab_grids::fp8::{decode_e5m2, encode_e5m2};
/// assert_eq!(encode_e5m2(1.0), 0x3C);
/// assert_eq!(decode_e5m2(encode_e5m2(60000.0)), 57344.0);
/// assert_eq!(decode_e5m2(encode_e5m2(61440.0)), f32::INFINITY);
/// ```
pub fn encode_e5m2(x: f32) -> u8 {
    let sign = ((x.to_bits() >> 31) as u8) << 7;
    if x.is_nan() {
        return sign | 0x7F;
    }
    if x.is_infinite() {
        return sign | 0x7C;
    }
    let (e, m) = round_minifloat(x.abs(), 15, 2);
    if e >= 31 {
        return sign | 0x7C;
    }
    sign | ((e as u8) << 2) | m as u8
}

/// Decode an FP8 E5M2 code (`S.11111.00` is ±inf, `S.11111.mm` with `mm != 0` is NaN).
///
/// ```
/// use quantlab_grids::fp8::decode_e5m2;
/// assert_eq!(decode_e5m2(0x7B), 57344.0);
/// assert_eq!(decode_e5m2(0x01), 2f32.powi(-16)); // smallest subnormal
/// assert_eq!(decode_e5m2(0xFC), f32::NEG_INFINITY);
/// ```
pub fn decode_e5m2(code: u8) -> f32 {
    let sign = if code & 0x80 != 0 { -1.0 } else { 1.0 };
    let e = ((code >> 2) & 0x1F) as i32;
    let m = (code & 0x03) as f32;
    if e == 31 {
        return if m == 0.0 {
            sign * f32::INFINITY
        } else {
            f32::NAN
        };
    }
    let mag = if e == 0 {
        m / 4.0 * 2f32.powi(-14)
    } else {
        (1.0 + m / 4.0) * 2f32.powi(e - 15)
    };
    sign * mag
}

/// FP8 with a scale: `x -> code(clamp(x / scale, ±max_finite))`, `code -> fp8(code) * scale`,
/// `scale = absmax / max_finite` of the group (per tensor with
/// [`Granularity::PerTensor`](crate::Granularity::PerTensor), per output row with
/// [`Granularity::PerChannel`](crate::Granularity::PerChannel)); an all-zero group gets
/// scale 1. The scale is stored as f32.
///
/// ```
/// use quantlab_grids::{fp8::{Fp8Format, Fp8Kind}, Format};
/// let f = Fp8Format { kind: Fp8Kind::E4M3 };
/// let p = f.fit(&[0.51, -4.48]); // scale 0.01: -4.48 -> -448
/// assert!((p.scale - 0.01).abs() < 1e-9);
/// assert!((f.quantize(-4.48, p) + 4.48).abs() < 1e-6);
/// assert!((f.quantize(0.51, p) - 0.52).abs() < 1e-6); // 51 -> 52 (spacing 4 in [32, 64))
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fp8Format {
    /// E4M3 or E5M2.
    pub kind: Fp8Kind,
}

impl Fp8Format {
    /// The format of `kind`.
    pub fn new(kind: Fp8Kind) -> Self {
        Self { kind }
    }
}

impl Format for Fp8Format {
    fn name(&self) -> String {
        match self.kind {
            Fp8Kind::E4M3 => "fp8-e4m3".into(),
            Fp8Kind::E5M2 => "fp8-e5m2".into(),
        }
    }

    fn code_bits(&self) -> u32 {
        8
    }

    /// An f32 scale.
    fn param_bits(&self) -> f64 {
        32.0
    }

    fn fit(&self, w: &[f32]) -> GroupParams {
        let amax = crate::codebook::absmax(w);
        let scale = if amax > 0.0 {
            amax / self.kind.max_finite()
        } else {
            1.0
        };
        GroupParams::scale_only(scale)
    }

    #[inline]
    fn encode(&self, x: f32, p: GroupParams) -> u8 {
        let max = self.kind.max_finite();
        // NaN stays NaN through clamp and encodes as NaN; callers refuse NaN beforehand.
        self.kind.encode((x / p.scale).clamp(-max, max))
    }

    #[inline]
    fn decode(&self, code: u8, p: GroupParams) -> f32 {
        self.kind.decode(code) * p.scale
    }
}
