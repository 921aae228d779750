//! ggml's super-blocks as number formats: the K-quants Q2_K, Q3_K, Q4_K, Q5_K and Q6_K, and
//! IQ4_XS ([`GgmlGrid::Q4_K`], ..., [`GgmlGrid::IQ4_XS`]; together [`GgmlGrid::K`]).
//!
//! A K block holds 256 weights of a row: sub-blocks of 32 (Q4_K, Q5_K, IQ4_XS) or 16 (Q2_K,
//! Q3_K, Q6_K) weights, each with a small integer scale (and, for the affine types, a min),
//! and one f16 `d` (and `dmin`) that scales those integers. Each sub-block is one parameter
//! group (`Granularity::Group(16 or 32)`); its [`GroupParams`] hold the values ggml computes
//! in f32 when it decodes:
//!
//! | type | codes | `scale` | `zero` | decode |
//! |------|-------|---------|--------|--------|
//! | Q2_K | 0..=3 | `d * sc` (sc 4-bit) | `dmin * m` (m 4-bit) | `scale * q - zero` |
//! | Q4_K | 0..=15 | `d * sc` (6-bit) | `dmin * m` (6-bit) | `scale * q - zero` |
//! | Q5_K | 0..=31 | `d * sc` (6-bit) | `dmin * m` (6-bit) | `scale * q - zero` |
//! | Q3_K | 0..=7 | `d * sc` (sc in -32..=31) | 4 | `scale * (q - 4)` |
//! | Q6_K | 0..=63 | `d * sc` (sc an i8) | 32 | `scale * (q - 32)` |
//! | IQ4_XS | 0..=15 | `d * sc` (sc in -32..=31) | 0 | `scale * IQ4_NL_LEVELS[q]` |
//!
//! IQ4_XS (ggml type 23, 136 bytes per 256 weights, 4.25 bits per weight) is symmetric with
//! a non-uniform codebook: the 16 int8 levels of IQ4_NL ([`crate::ggml::IQ4_NL_LEVELS`],
//! ggml's `kvalues_iq4nl`) under a signed 6-bit scale per sub-block of 32 (the file stores
//! `ls = sc + 32` in 0..=63) and one f16 `d`; ggml decodes `dl = d * (ls - 32)`, then
//! `dl * kvalues_iq4nl[q]`.
//!
//! The products are exact in f32 (an f16 times an integer of at most 8 bits), so the values
//! decode bit for bit as ggml's dequantizers (and the `gguf` package) decode the block. The
//! integers are not stored separately: [`KSuperParams::factor`] recovers an `(d, sc)`
//! (and `(dmin, m)`) that reproduces every product of a super-block exactly, which is what
//! the GGUF writer stores.
//!
//! # Fit (one super-block at a time: [`crate::Format::fit_span`] is 256)
//! The parameters of a whole super-block are fitted together ([`fit_superblock`]): each
//! sub-block gets a real scale (and min) from [`fit_affine`] / [`fit_symmetric`] (21 candidate
//! steps around the full-range step, the weighted least-squares refit of each candidate's
//! codes, the least `sum_i w_i (x_i - y_i)^2` kept), then `d = max scale / top` (and
//! `dmin = max min / top`) is rounded to f16 (`top` = 63 for the 6-bit scales of Q4_K / Q5_K,
//! 15 for Q2_K, 31 for Q3_K, 127 for Q6_K) and each sub-block's scale (and min) is rounded to
//! the nearest integer multiple of it.
//!
//! IQ4_XS: each sub-block gets a real signed scale from IQ4_NL's level search (the
//! candidates of [`GgmlGrid::IQ4_NL`]'s fit, not rounded to f16: `max / -127` and
//! `max / 113` scaled within 12.5 %, and the weighted least-squares refit of each
//! candidate's levels); then, as ggml does, `d = -s / 32` with `s` the signed sub-block
//! scale of largest `|s|` (so that one sits at the integer -32, the end of the signed 6-bit
//! range with the most room), rounded to f16; and each sub-block's integer is the best of
//! `round(s / d)` (clamped to -32..=31) and its two neighbours under that sub-block's
//! weighted error, every weight at its nearest level (with a non-uniform codebook the
//! nearest multiple is not always the best one).
//!
//! With an importance vector the same searches are
//! weighted and the result is compared with the unweighted fit under the weighted error of
//! the block as encoded; the better one is kept (so the weighted fit is never worse under
//! that objective). This is the reference quantizer of the GGUF K blocks
//! (`quantlab_checkpoints::pack::gguf_blocks`); it is not ggml's own search, so the bytes
//! differ from llama.cpp's, but the layouts are exact.
//!
//! # Encode
//! The nearest level in f32 under the stored parameters (ties: half away from zero of
//! `(x + zero) / scale`, i.e. of `x / scale` for the symmetric types).
//!
//! ```
//! use quantlab_grids::{Format, GgmlGrid, GroupParams};
//! let x: Vec<f32> = (0..256).map(|i| ((i * 37) % 101) as f32 / 50.0 - 1.0).collect();
//! let mut p = vec![GroupParams::scale_only(0.0); 8];
//! GgmlGrid::Q4_K.fit_groups(&x, None, 32, &mut p);
//! // every sub-block scale is an integer multiple (<= 63) of one f16 d
//! let sp = quantlab_grids::ggml_k::KSuperParams::factor(GgmlGrid::Q4_K, &p).unwrap();
//! assert!(sp.sc.iter().all(|&s| (0..=63).contains(&s)));
//! assert!(x.chunks(32).zip(&p).all(|(c, &gp)| c.iter().all(|&v| (v - GgmlGrid::Q4_K.quantize(v, gp)).abs() < 0.08)));
//! ```

use crate::format::GroupParams;
use crate::ggml::GgmlGrid;
use half::f16;

/// Weights per K super-block.
pub const QK_K: usize = 256;

/// The layout facts of one super-block type.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct KLayout {
    /// Weights per sub-block (one parameter group).
    pub sub: usize,
    /// `scale * q - zero` with a stored min (Q2_K, Q4_K, Q5_K) or `scale * (q - offset)`.
    pub affine: bool,
    /// Largest code.
    pub nmax: i32,
    /// Symmetric types: code = signed value + offset (Q3_K 4, Q6_K 32); 0 for the affine.
    pub offset: i32,
    /// `d = max |sub-block scale| / top` (and `dmin` likewise); with a codebook,
    /// `d = -s / top` for the signed sub-block scale `s` of largest `|s|`.
    pub top: f32,
    /// Range of the stored sub-block scale integers (and mins for the affine types).
    pub sc_lo: i32,
    pub sc_hi: i32,
    /// Bits of a code.
    pub code_bits: u32,
    /// Bits per sub-block: its scale (and min) plus its share of the f16 `d` (and `dmin`).
    pub param_bits: f64,
    /// Non-uniform levels in code order: decode `scale * levels[q]` (IQ4_XS); `None` for the
    /// uniform K-quants.
    pub codebook: Option<&'static [i8; 16]>,
}

/// The layout of a K grid (`None` for the other grids).
pub(crate) fn layout(g: GgmlGrid) -> Option<KLayout> {
    Some(match g {
        GgmlGrid::Q2_K => KLayout {
            sub: 16,
            affine: true,
            nmax: 3,
            offset: 0,
            top: 15.0,
            sc_lo: 0,
            sc_hi: 15,
            code_bits: 2,
            param_bits: 8.0 + 32.0 / 16.0,
            codebook: None,
        },
        GgmlGrid::Q3_K => KLayout {
            sub: 16,
            affine: false,
            nmax: 7,
            offset: 4,
            top: 31.0,
            sc_lo: -32,
            sc_hi: 31,
            code_bits: 3,
            // 6-bit scale, plus the f16 d shared by 16 sub-blocks: 16 / 16 bits
            param_bits: 6.0 + 1.0,
            codebook: None,
        },
        GgmlGrid::Q4_K => KLayout {
            sub: 32,
            affine: true,
            nmax: 15,
            offset: 0,
            top: 63.0,
            sc_lo: 0,
            sc_hi: 63,
            code_bits: 4,
            param_bits: 12.0 + 32.0 / 8.0,
            codebook: None,
        },
        GgmlGrid::Q5_K => KLayout {
            sub: 32,
            affine: true,
            nmax: 31,
            offset: 0,
            top: 63.0,
            sc_lo: 0,
            sc_hi: 63,
            code_bits: 5,
            param_bits: 12.0 + 32.0 / 8.0,
            codebook: None,
        },
        GgmlGrid::Q6_K => KLayout {
            sub: 16,
            affine: false,
            nmax: 63,
            offset: 32,
            top: 127.0,
            sc_lo: -128,
            sc_hi: 127,
            code_bits: 6,
            // i8 scale, plus the f16 d shared by 16 sub-blocks: 16 / 16 bits
            param_bits: 8.0 + 1.0,
            codebook: None,
        },
        GgmlGrid::IQ4_XS => KLayout {
            sub: 32,
            affine: false,
            nmax: 15,
            offset: 0,
            top: 32.0,
            sc_lo: -32,
            sc_hi: 31,
            code_bits: 4,
            // 6-bit scale (4 bits in scales_l, 2 in scales_h), plus the f16 d shared by 8
            // sub-blocks: 16 / 8 bits; 4 + 8 / 32 = 4.25 bits per weight (136 bytes / 256)
            param_bits: 6.0 + 2.0,
            codebook: Some(&crate::ggml::IQ4_NL_LEVELS),
        },
        _ => return None,
    })
}

#[track_caller]
fn layout_of(g: GgmlGrid) -> KLayout {
    layout(g).unwrap_or_else(|| panic!("{g:?} is not a super-block (K) type"))
}

/// The stored parameters of one K super-block: f16 `d` and `dmin` (as f32) and the integer
/// scale (and min) of each sub-block.
#[derive(Clone, Debug, PartialEq)]
pub struct KSuperParams {
    /// The f16 super-block scale of the sub-block scales.
    pub d: f32,
    /// The f16 scale of the sub-block mins (0 for Q3_K / Q6_K).
    pub dmin: f32,
    /// Sub-block scales: unsigned (Q2_K 0..=15, Q4_K / Q5_K 0..=63) or signed (Q3_K and
    /// IQ4_XS -32..=31, Q6_K -128..=127).
    pub sc: Vec<i32>,
    /// Sub-block mins (affine types; zeros otherwise).
    pub m: Vec<i32>,
}

impl KSuperParams {
    /// The [`GroupParams`] of sub-block `s` (the f32 products ggml decodes with).
    pub fn group_params(&self, grid: GgmlGrid, s: usize) -> GroupParams {
        let l = layout_of(grid);
        if l.affine {
            GroupParams {
                scale: self.d * self.sc[s] as f32,
                zero: self.dmin * self.m[s] as f32,
            }
        } else {
            GroupParams {
                scale: self.d * self.sc[s] as f32,
                zero: l.offset as f32,
            }
        }
    }

    /// Recover stored parameters from the [`GroupParams`] of the sub-blocks of one
    /// super-block: an f16 `d` and integers `sc` in the type's range with `d * sc[s]` equal
    /// to every `scale` bit for bit (and likewise `dmin`, `m` for the zeros of the affine
    /// types; the symmetric types need `zero` = their offset, 0 for IQ4_XS). `d` is positive
    /// when a positive one exists, else negative (IQ4_XS's fit puts its largest sub-block
    /// scale at -32, with a negative `d` when that scale is positive). Every product a fit
    /// makes has such a factorization; when several exist they decode identically. `None`
    /// when there is none (parameters not fitted on this grid's super-blocks).
    pub fn factor(grid: GgmlGrid, p: &[GroupParams]) -> Option<Self> {
        let l = layout(grid)?;
        let scales: Vec<f32> = p.iter().map(|g| g.scale).collect();
        let (d, sc) = factor_ints(&scales, l.sc_lo, l.sc_hi)?;
        let (dmin, m) = if l.affine {
            factor_ints(&p.iter().map(|g| g.zero).collect::<Vec<_>>(), 0, l.sc_hi)?
        } else {
            if p.iter().any(|g| g.zero != l.offset as f32) {
                return None;
            }
            (0.0, vec![0; p.len()])
        };
        Some(Self { d, dmin, sc, m })
    }
}

/// Round to f16 and back (nearest even).
#[inline]
fn f16r(x: f32) -> f32 {
    f16::from_f32(x).to_f32()
}

/// `(d, k)` with `d` an f16 value and `d * k[i] == v[i]` exactly, `k[i]` in `lo..=hi`: the
/// largest `|k|` that works for the entry of largest `|v|`, a positive `d` tried first, then
/// a negative one.
fn factor_ints(v: &[f32], lo: i32, hi: i32) -> Option<(f32, Vec<i32>)> {
    if v.iter().any(|x| !x.is_finite()) {
        return None;
    }
    let (mut amax, mut at) = (0.0f32, 0);
    for (i, &x) in v.iter().enumerate() {
        if x.abs() > amax {
            amax = x.abs();
            at = i;
        }
    }
    if amax == 0.0 {
        return Some((0.0, vec![0; v.len()]));
    }
    let kmax = lo.unsigned_abs().max(hi.unsigned_abs()) as i32;
    for negative in [false, true] {
        for s in (1..=kmax).rev() {
            let d = amax / s as f32;
            if f16r(d) != d || d == 0.0 {
                continue;
            }
            let d = if negative { -d } else { d };
            // the integer of the largest |v| has v's sign times d's
            let sign = if (v[at] < 0.0) != negative { -1 } else { 1 };
            if !(lo..=hi).contains(&(sign * s)) {
                continue;
            }
            let mut k = Vec::with_capacity(v.len());
            let ok = v.iter().all(|&x| {
                let q = (x / d).round();
                let qi = q as i32;
                let fits = (lo..=hi).contains(&qi) && d * qi as f32 == x;
                k.push(qi);
                fits
            });
            if ok {
                return Some((d, k));
            }
        }
    }
    None
}

/// Weight `i` (1 when there are no importance weights).
#[inline]
fn wt(w: Option<&[f32]>, i: usize) -> f64 {
    w.map_or(1.0, |w| w[i] as f64)
}

/// Round to nearest (half away from zero) and clamp; `lo.max(0).min(hi)` when `d == 0`.
#[inline]
pub(crate) fn nearest(v: f32, d: f32, lo: f32, hi: f32) -> i32 {
    if d == 0.0 {
        0.0f32.clamp(lo, hi) as i32
    } else {
        (v / d).round().clamp(lo, hi) as i32
    }
}

/// Symmetric scale search for codes in `nlo..=nhi` (`nlo < 0`): returns a signed scale `d`
/// for `y = d * q`.
///
/// Candidates: `d_t = max / -(|nlo| + t / 10)` for `t` in `-10..=10` (`max` the signed value
/// of largest `|x|`, so `t = 0` maps it to `nlo` as ggml's Q4_0 does), codes
/// `q = clamp(round(x / d_t))`, and for those codes also the weighted least-squares scale
/// `sum w x q / sum w q^2`; the candidate of least `sum w (x - d q)^2` wins (first on ties).
pub fn fit_symmetric(x: &[f32], w: Option<&[f32]>, nlo: i32, nhi: i32) -> f32 {
    let (mut amax, mut max) = (0.0f32, 0.0f32);
    for &v in x {
        if amax < v.abs() {
            amax = v.abs();
            max = v;
        }
    }
    if amax == 0.0 {
        return 0.0;
    }
    let err_of = |d: f32| -> f64 {
        x.iter()
            .enumerate()
            .map(|(i, &v)| {
                let q = (v / d).round().clamp(nlo as f32, nhi as f32);
                wt(w, i) * ((v - d * q) as f64).powi(2)
            })
            .sum()
    };
    let base = max / -(nlo as f32);
    let mut best = (err_of(base), base);
    for t in -10..=10 {
        let d = max / -(-(nlo as f32) + t as f32 * 0.1);
        if !d.is_finite() || d == 0.0 {
            continue;
        }
        let (mut sxq, mut sqq) = (0.0f64, 0.0f64);
        for (i, &v) in x.iter().enumerate() {
            let q = (v / d).round().clamp(nlo as f32, nhi as f32) as f64;
            sxq += wt(w, i) * v as f64 * q;
            sqq += wt(w, i) * q * q;
        }
        let mut cands = [d, d];
        if sqq > 0.0 {
            cands[1] = (sxq / sqq) as f32;
        }
        for c in cands {
            if c.is_finite() && c != 0.0 {
                let e = err_of(c);
                if e < best.0 {
                    best = (e, c);
                }
            }
        }
    }
    best.1
}

/// Affine scale search for codes in `0..=nmax`: returns `(a, b)` for `y = a * q + b`, with
/// `a >= 0`, and `b <= 0` when `offset_le_zero` (the K-quants store `-dmin * m`, `m >= 0`).
///
/// The range is `[lo, hi]` with `lo = min x` (and `min(lo, 0)` when `offset_le_zero`),
/// `hi = max x`; candidates: the full-range step `(hi - lo) / nmax` with `b = lo`, and for
/// steps `(hi - lo) / (nmax + t / 10)`, `t` in `-10..=10`, the codes
/// `q = clamp(round((x - lo) / step))` with the weighted least-squares `(a, b)` for those
/// codes (`b` clamped to 0 with the matching `a` when `offset_le_zero`). Least
/// `sum w (x - a q - b)^2` wins (first on ties).
pub fn fit_affine(x: &[f32], w: Option<&[f32]>, nmax: u32, offset_le_zero: bool) -> (f32, f32) {
    let mut lo = x.iter().copied().fold(f32::INFINITY, f32::min);
    let hi = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if offset_le_zero {
        lo = lo.min(0.0);
    }
    if hi <= lo || !(hi - lo).is_finite() {
        return (0.0, lo);
    }
    let nm = nmax as f32;
    let err_of = |a: f32, b: f32| -> f64 {
        x.iter()
            .enumerate()
            .map(|(i, &v)| {
                let q = if a > 0.0 {
                    ((v - b) / a).round().clamp(0.0, nm)
                } else {
                    0.0
                };
                wt(w, i) * ((v - (a * q + b)) as f64).powi(2)
            })
            .sum()
    };
    let a0 = (hi - lo) / nm;
    let mut best = (err_of(a0, lo), a0, lo);
    for t in -10..=10 {
        let step = (hi - lo) / (nm + t as f32 * 0.1);
        if !(step > 0.0 && step.is_finite()) {
            continue;
        }
        let (mut sw, mut sq, mut sqq, mut sx, mut sxq) = (0.0f64, 0.0, 0.0, 0.0, 0.0);
        for (i, &v) in x.iter().enumerate() {
            let q = ((v - lo) / step).round().clamp(0.0, nm) as f64;
            let wi = wt(w, i);
            sw += wi;
            sq += wi * q;
            sqq += wi * q * q;
            sx += wi * v as f64;
            sxq += wi * v as f64 * q;
        }
        let det = sw * sqq - sq * sq;
        if det <= 0.0 {
            continue;
        }
        let mut a = (sw * sxq - sq * sx) / det;
        let mut b = (sqq * sx - sq * sxq) / det;
        if offset_le_zero && b > 0.0 {
            b = 0.0;
            a = sxq / sqq;
        }
        let (a, b) = (a as f32, b as f32);
        if !(a > 0.0 && a.is_finite() && b.is_finite()) {
            continue;
        }
        let e = err_of(a, b);
        if e < best.0 {
            best = (e, a, b);
        }
    }
    (best.1, best.2)
}

/// The searches of the module docs for one super-block (any whole number of sub-blocks),
/// without the weighted-vs-unweighted comparison.
fn fit_superblock_once(l: KLayout, x: &[f32], w: Option<&[f32]>) -> KSuperParams {
    let ns = x.len() / l.sub;
    let sub = |s: usize| s * l.sub..(s + 1) * l.sub;
    if let Some(levels) = l.codebook {
        return fit_codebook_superblock(l, levels, x, w);
    }
    if l.affine {
        let mut scale = vec![0.0f32; ns];
        let mut min = vec![0.0f32; ns];
        for s in 0..ns {
            let (a, b) = fit_affine(&x[sub(s)], w.map(|w| &w[sub(s)]), l.nmax as u32, true);
            scale[s] = a;
            min[s] = -b;
        }
        let d = f16r(scale.iter().copied().fold(0.0, f32::max) / l.top);
        let dmin = f16r(min.iter().copied().fold(0.0, f32::max) / l.top);
        KSuperParams {
            d,
            dmin,
            sc: scale.iter().map(|&v| nearest(v, d, 0.0, l.top)).collect(),
            m: min.iter().map(|&v| nearest(v, dmin, 0.0, l.top)).collect(),
        }
    } else {
        let (nlo, nhi) = (-l.offset, l.nmax - l.offset);
        let scale: Vec<f32> = (0..ns)
            .map(|s| fit_symmetric(&x[sub(s)], w.map(|w| &w[sub(s)]), nlo, nhi))
            .collect();
        let d = f16r(scale.iter().fold(0.0f32, |a, v| a.max(v.abs())) / l.top);
        KSuperParams {
            d,
            dmin: 0.0,
            sc: scale
                .iter()
                .map(|&v| nearest(v, d, l.sc_lo as f32, l.sc_hi as f32))
                .collect(),
            m: vec![0; ns],
        }
    }
}

/// [`fit_superblock_once`] for a codebook type (IQ4_XS; see the module docs): real signed
/// sub-block scales from IQ4_NL's level search, `d = -s / top` for the one of largest `|s|`
/// (rounded to f16), and per sub-block the best integer of `round(s / d)` and its
/// neighbours.
fn fit_codebook_superblock(
    l: KLayout,
    levels: &[i8; 16],
    x: &[f32],
    w: Option<&[f32]>,
) -> KSuperParams {
    debug_assert_eq!(levels, &crate::ggml::IQ4_NL_LEVELS, "IQ4_NL's levels");
    let ns = x.len() / l.sub;
    let sub = |s: usize| s * l.sub..(s + 1) * l.sub;
    // the real (unrounded) scale of each sub-block: x ~ scale * levels[q]
    let scale: Vec<f32> = (0..ns)
        .map(|s| crate::ggml::iq4nl_scale(&x[sub(s)], w.map(|w| &w[sub(s)]), |v| v))
        .collect();
    let (mut smax, mut amax) = (0.0f32, 0.0f32);
    for &v in &scale {
        if v.abs() > amax {
            amax = v.abs();
            smax = v;
        }
    }
    let d = f16r(smax / -l.top);
    let (lo, hi) = (l.sc_lo as f32, l.sc_hi as f32);
    let sc = (0..ns)
        .map(|s| {
            if d == 0.0 || !d.is_finite() {
                return 0;
            }
            let (xs, ws) = (&x[sub(s)], w.map(|w| &w[sub(s)]));
            let k0 = nearest(scale[s], d, lo, hi);
            // the sub-block's weighted error with integer k (every weight its nearest level)
            let err = |k: i32| crate::ggml::iq4nl_score(xs, ws, d * k as f32).0;
            let mut best = (err(k0), k0);
            for k in [k0 - 1, k0 + 1] {
                if (l.sc_lo..=l.sc_hi).contains(&k) {
                    let e = err(k);
                    if e < best.0 {
                        best = (e, k);
                    }
                }
            }
            best.1
        })
        .collect();
    KSuperParams {
        d: if d.is_finite() { d } else { 0.0 },
        dmin: 0.0,
        sc,
        m: vec![0; ns],
    }
}

/// `sum_i w_i (x_i - quantize(x_i))^2` of a super-block under `sp`.
fn superblock_error(
    g: GgmlGrid,
    l: KLayout,
    x: &[f32],
    w: Option<&[f32]>,
    sp: &KSuperParams,
) -> f64 {
    use crate::format::Format;
    x.iter()
        .enumerate()
        .map(|(i, &v)| {
            let e = (v - g.quantize(v, sp.group_params(g, i / l.sub))) as f64;
            wt(w, i) * e * e
        })
        .sum()
}

/// The stored parameters of one super-block of `grid` fitted to `x` (a whole number of
/// sub-blocks; 256 weights in a file), with optional importance `w` (see the module docs).
///
/// Panics (a caller bug) when `x` is not whole sub-blocks or `w` has another length.
#[track_caller]
pub fn fit_superblock(grid: GgmlGrid, x: &[f32], w: Option<&[f32]>) -> KSuperParams {
    let l = layout_of(grid);
    assert!(
        !x.is_empty() && x.len() % l.sub == 0,
        "{} values are not whole {grid:?} sub-blocks of {}",
        x.len(),
        l.sub
    );
    if let Some(w) = w {
        assert_eq!(w.len(), x.len(), "importance and weights differ in length");
    }
    let w = w.filter(|w| w.iter().map(|&v| v as f64).sum::<f64>() > 0.0);
    let plain = fit_superblock_once(l, x, None);
    match w {
        None => plain,
        Some(w) => {
            let weighted = fit_superblock_once(l, x, Some(w));
            // The unweighted search may still win under the weighted objective.
            if superblock_error(grid, l, x, Some(w), &plain)
                < superblock_error(grid, l, x, Some(w), &weighted)
            {
                plain
            } else {
                weighted
            }
        }
    }
}

/// Bits of a code of K grid `g`.
pub(crate) fn code_bits(g: GgmlGrid) -> u32 {
    layout_of(g).code_bits
}

/// Bits per sub-block of K grid `g` (see [`KLayout::param_bits`]).
pub(crate) fn param_bits(g: GgmlGrid) -> f64 {
    layout_of(g).param_bits
}

/// Weights per sub-block (parameter group) of K grid `g`.
pub(crate) fn sub_len(g: GgmlGrid) -> usize {
    layout_of(g).sub
}

/// [`crate::Format::fit_groups`] of a K grid.
#[track_caller]
pub(crate) fn fit_groups(
    g: GgmlGrid,
    x: &[f32],
    w: Option<&[f32]>,
    group_len: usize,
    out: &mut [GroupParams],
) {
    let l = layout_of(g);
    assert_eq!(
        group_len, l.sub,
        "{g:?} groups are its sub-blocks of {} weights",
        l.sub
    );
    assert_eq!(
        out.len(),
        x.len() / l.sub,
        "one parameter set per sub-block"
    );
    let sp = fit_superblock(g, x, w);
    for (s, o) in out.iter_mut().enumerate() {
        *o = sp.group_params(g, s);
    }
}

/// [`crate::Format::fit_weighted`] of a K grid on a lone group: the group is its own
/// super-block (`d = scale / top`, ...).
pub(crate) fn fit_alone(g: GgmlGrid, x: &[f32], w: Option<&[f32]>) -> GroupParams {
    let l = layout_of(g);
    if x.is_empty() {
        return KSuperParams {
            d: 0.0,
            dmin: 0.0,
            sc: vec![0],
            m: vec![0],
        }
        .group_params(g, 0);
    }
    // a group that is not one sub-block long is fitted as one "sub-block" of its own length
    let lone = KLayout { sub: x.len(), ..l };
    let w = w.filter(|w| w.iter().map(|&v| v as f64).sum::<f64>() > 0.0);
    let sp = fit_superblock_once(lone, x, w);
    sp.group_params(g, 0)
}

/// Encode under the stored products: nearest level in f32 (codebook types: IQ4_NL's encode,
/// ties to the lower code, code 8 for a zero scale).
#[inline]
pub(crate) fn encode(g: GgmlGrid, x: f32, p: GroupParams) -> u8 {
    let l = layout_of(g);
    if l.codebook.is_some() {
        return crate::ggml::iq4nl_encode(x, p.scale);
    }
    let a = p.scale;
    let (lo, hi) = if l.affine {
        (0, l.nmax)
    } else {
        (-l.offset, l.nmax - l.offset)
    };
    let code = |q: i32| (q + if l.affine { 0 } else { l.offset }) as u8;
    if a == 0.0 || !a.is_finite() {
        return code(if l.affine { 0 } else { 0.clamp(lo, hi) });
    }
    let t = if l.affine { (x + p.zero) / a } else { x / a };
    let q0 = if t.is_nan() {
        lo
    } else {
        t.round().clamp(lo as f32, hi as f32) as i32
    };
    let err = |q: i32| (x - decode(g, code(q), p)).abs();
    let mut best = (err(q0), q0);
    for q in [q0 - 1, q0 + 1] {
        if (lo..=hi).contains(&q) {
            let e = err(q);
            if e < best.0 {
                best = (e, q);
            }
        }
    }
    code(best.1)
}

/// ggml's f32 decode expression.
#[inline]
pub(crate) fn decode(g: GgmlGrid, code: u8, p: GroupParams) -> f32 {
    let l = layout_of(g);
    if let Some(levels) = l.codebook {
        p.scale * levels[code as usize & 15] as f32
    } else if l.affine {
        p.scale * code as f32 - p.zero
    } else {
        p.scale * (code as i32 - l.offset) as f32
    }
}
