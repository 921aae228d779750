//! The ggml block types Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_NL
//! and IQ4_XS.
//!
//! A format is a type: each block is a `#[repr(C)]` struct whose size is checked at compile
//! time against ggml's type size, and [`GgufBlock`] carries the constants (weights per block
//! `QK`, GGUF type id, bytes per block) and slice-to-slice functions that allocate nothing:
//! [`GgufBlock::quantize_ref`], [`GgufBlock::quantize_weighted`], [`GgufBlock::dequantize`],
//! [`GgufBlock::write_blocks`] / [`GgufBlock::read_blocks`] (exact little-endian on-disk
//! bytes). [`GgmlType`] selects a type at run time; [`quantize`] and [`dequantize`] are the
//! checked, allocating entry points for whole rows.
//!
//! # Dequantization (exact ggml layouts)
//!
//! Every dequantizer evaluates the same f32 expression, in the same order, as ggml's scalar
//! reference (no fused multiply-add), so its values are bit-identical to the `gguf` Python
//! package's `gguf.quants.dequantize` (the tests check this for every type).
//!
//! # Quantization
//!
//! * Legacy types, `quantize_ref`: ggml's round-to-nearest reference formulas, byte for byte.
//!   Q4_0 / Q5_0: `d = max / -8` (`/ -16`) with `max` the signed value of largest `|x|` (the
//!   first one on ties), `q = min(15, trunc(x / d + 8.5))` (`min(31, trunc(x / d + 16.5))`);
//!   Q4_1 / Q5_1: `d = (max - min) / 15` (`/ 31`), `m = min`,
//!   `q = min(15, trunc((x - min) / d + 0.5))`; Q8_0: `d = amax / 127`, `q = round(x / d)`
//!   (half away from zero). All products use `1 / d` computed in f32 from the unrounded `d`;
//!   `d` and `m` are then stored as f16 (round to nearest even).
//! * K-quants (our own search; ggml's exact search is not reproduced, the bytes differ from
//!   llama.cpp's but decode with the exact layout): the reference fit of the K grids,
//!   [`quantlab_grids::ggml_k::fit_superblock`] (one function for this quantizer, the RTN of
//!   the grid and GPTQ on it): each sub-block (32 weights for Q4_K / Q5_K, 16 for Q2_K /
//!   Q3_K / Q6_K) gets a scale (and for the affine types a min) from [`fit_affine`] or
//!   [`fit_symmetric`]: 21 candidate steps around the full-range step, codes rounded to
//!   nearest, then the weighted least-squares scale (and offset) for those codes, keeping the
//!   candidate of least `sum_i w_i (x_i - y_i)^2`. The sub-block scales (and mins) are then
//!   quantized to 6 bits (4 bits for Q2_K, signed 8 bits for Q6_K, signed 6 bits for Q3_K)
//!   against an f16 super-block scale `d = max / 63` (`/ 15`, `/ 127`, `/ 31`), and finally
//!   every code is the nearest level under the stored (quantized) parameters. The `from_parts`
//!   constructors ([`BlockQ4_K::from_parts`], ..., [`k_block_bytes`]) pack given parameters
//!   and codes (how GPTQ-placed K grids are written).
//! * IQ4_NL and IQ4_XS (our own scale searches, the layouts and levels exact): the fits of
//!   [`GgmlGrid::IQ4_NL`] and of the super-block grid [`GgmlGrid::IQ4_XS`] (IQ4_NL's level
//!   search per sub-block of 32, the sub-block scales as signed 6-bit multiples of one f16
//!   `d`; [`quantlab_grids::ggml_k`]), every code the nearest level.
//! * Importance (imatrix) hook, `quantize_weighted(x, w)`: with per-weight importance
//!   `w_i >= 0`, minimising `sum_i w_i (x_i - y_i)^2` with `y` the dequantized block, by the
//!   grid's own fitter, the one each type has: [`GgmlGrid`]'s `fit_weighted` for the legacy
//!   types (the search the grid's RTN and GPTQ on it use), the K / IQ fits above with the
//!   importance. The searched block is kept only when its weighted error is below that of
//!   ggml's reference block, so it is never worse under the objective. A block whose
//!   importance sums to 0 is quantized as with uniform weights. The reference rule above stays
//!   as llama.cpp's own quantizer, byte for byte, for quantizing without importance.
//!
//! ```
//! use quantlab_checkpoints::pack::gguf_blocks::{BlockQ4_0, GgufBlock};
//! let x: Vec<f32> = (0..32).map(|i| (i as f32 - 12.0) * 0.25).collect();
//! let mut b = [BlockQ4_0::ZERO; 1];
//! BlockQ4_0::quantize_ref(&x, &mut b);
//! let mut y = [0.0f32; 32];
//! BlockQ4_0::dequantize(&b, &mut y);
//! // largest |x| is 4.75 (i = 31): d = -4.75 / 8, so every error is at most |d| / 2
//! assert!(x.iter().zip(&y).all(|(a, b)| (a - b).abs() <= 4.75 / 16.0 + 1e-3));
//! ```

#![allow(non_camel_case_types)]

use super::pack_err;
use crate::Result;
use half::f16;
use quantlab_grids::ggml_k::{fit_superblock, KSuperParams};
use quantlab_grids::{Format, GgmlGrid};

/// Weights per K-quant super-block.
pub const QK_K: usize = 256;

/// A ggml quantization block: constants and slice-to-slice reference functions.
pub trait GgufBlock: Copy + Send + Sync + std::fmt::Debug + PartialEq + 'static {
    /// Weights per block.
    const QK: usize;
    /// The GGUF (`ggml_type`) id.
    const TYPE_ID: u32;
    /// Bytes per block on disk (= `size_of::<Self>()`).
    const TYPE_SIZE: usize;
    /// The ggml name, e.g. `Q4_K`.
    const NAME: &'static str;
    /// An all-zero block.
    const ZERO: Self;

    /// Quantize one block of `QK` weights; `w` (same length) are importance weights, `None`
    /// for the reference quantizer.
    fn quantize_block(x: &[f32], w: Option<&[f32]>) -> Self;
    /// Dequantize one block into `y` (`QK` values).
    fn dequantize_block(&self, y: &mut [f32]);
    /// The block's `TYPE_SIZE` little-endian bytes.
    fn write_le(&self, out: &mut [u8]);
    /// A block from its `TYPE_SIZE` little-endian bytes.
    fn read_le(bytes: &[u8]) -> Self;

    /// Reference quantization of `x` (`blocks.len() * QK` values) into `blocks`.
    #[track_caller]
    fn quantize_ref(x: &[f32], blocks: &mut [Self]) {
        check_len::<Self>(x.len(), blocks.len());
        for (xb, b) in x.chunks_exact(Self::QK).zip(blocks.iter_mut()) {
            *b = Self::quantize_block(xb, None);
        }
    }

    /// Importance-weighted quantization (imatrix): minimises
    /// `sum_i importance_i (x_i - y_i)^2` per block (see the module docs).
    #[track_caller]
    fn quantize_weighted(x: &[f32], importance: &[f32], blocks: &mut [Self]) {
        check_len::<Self>(x.len(), blocks.len());
        assert_eq!(
            importance.len(),
            x.len(),
            "importance and weights differ in length"
        );
        for ((xb, wb), b) in x
            .chunks_exact(Self::QK)
            .zip(importance.chunks_exact(Self::QK))
            .zip(blocks.iter_mut())
        {
            let usable = wb.iter().map(|&w| w as f64).sum::<f64>() > 0.0;
            *b = Self::quantize_block(xb, usable.then_some(wb));
        }
    }

    /// Dequantize `blocks` into `y` (`blocks.len() * QK` values).
    #[track_caller]
    fn dequantize(blocks: &[Self], y: &mut [f32]) {
        check_len::<Self>(y.len(), blocks.len());
        for (b, yb) in blocks.iter().zip(y.chunks_exact_mut(Self::QK)) {
            b.dequantize_block(yb);
        }
    }

    /// Write `blocks` as their on-disk bytes (`blocks.len() * TYPE_SIZE`).
    #[track_caller]
    fn write_blocks(blocks: &[Self], out: &mut [u8]) {
        assert_eq!(
            out.len(),
            blocks.len() * Self::TYPE_SIZE,
            "byte buffer length"
        );
        for (b, o) in blocks.iter().zip(out.chunks_exact_mut(Self::TYPE_SIZE)) {
            b.write_le(o);
        }
    }

    /// Read `blocks` from their on-disk bytes.
    #[track_caller]
    fn read_blocks(bytes: &[u8], blocks: &mut [Self]) {
        assert_eq!(
            bytes.len(),
            blocks.len() * Self::TYPE_SIZE,
            "byte buffer length"
        );
        for (b, i) in blocks.iter_mut().zip(bytes.chunks_exact(Self::TYPE_SIZE)) {
            *b = Self::read_le(i);
        }
    }
}

#[track_caller]
fn check_len<B: GgufBlock>(values: usize, blocks: usize) {
    assert_eq!(
        values,
        blocks * B::QK,
        "{values} values for {blocks} {} blocks of {}",
        B::NAME,
        B::QK
    );
}

/// The on-disk bytes of `blocks`.
pub fn to_bytes<B: GgufBlock>(blocks: &[B]) -> Vec<u8> {
    let mut out = vec![0u8; blocks.len() * B::TYPE_SIZE];
    B::write_blocks(blocks, &mut out);
    out
}

/// Blocks from on-disk bytes; `name` (the tensor) appears in the error when the length is
/// not a whole number of blocks.
pub fn from_bytes<B: GgufBlock>(name: &str, bytes: &[u8]) -> Result<Vec<B>> {
    if bytes.len() % B::TYPE_SIZE != 0 {
        return Err(pack_err(
            format!("GGUF {}", B::NAME),
            name,
            format!(
                "{} bytes are not a whole number of {}-byte blocks",
                bytes.len(),
                B::TYPE_SIZE
            ),
        ));
    }
    let mut blocks = vec![B::ZERO; bytes.len() / B::TYPE_SIZE];
    B::read_blocks(bytes, &mut blocks);
    Ok(blocks)
}

// ---------------------------------------------------------------------------------------
// Block structs

/// Q4_0: 32 weights, `y = d * (q - 8)`; `qs[j]` holds `q[j]` (low nibble) and `q[j + 16]`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BlockQ4_0 {
    /// f16 scale (of the block; of the sub-block scales for K-quants).
    pub d: f16,
    /// Packed (low) bits of the codes.
    pub qs: [u8; 16],
}

/// Q4_1: 32 weights, `y = d * q + m`; nibbles as Q4_0.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BlockQ4_1 {
    /// f16 scale (of the block; of the sub-block scales for K-quants).
    pub d: f16,
    /// f16 minimum (offset added to every weight).
    pub m: f16,
    /// Packed (low) bits of the codes.
    pub qs: [u8; 16],
}

/// Q5_0: 32 weights, `y = d * (q - 16)`; low nibbles as Q4_0, bit 4 of `q[j]` at bit `j` of
/// the little-endian u32 `qh`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BlockQ5_0 {
    /// f16 scale (of the block; of the sub-block scales for K-quants).
    pub d: f16,
    /// High bits of the codes.
    pub qh: [u8; 4],
    /// Packed (low) bits of the codes.
    pub qs: [u8; 16],
}

/// Q5_1: 32 weights, `y = d * q + m`; bits as Q5_0.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BlockQ5_1 {
    /// f16 scale (of the block; of the sub-block scales for K-quants).
    pub d: f16,
    /// f16 minimum (offset added to every weight).
    pub m: f16,
    /// High bits of the codes.
    pub qh: [u8; 4],
    /// Packed (low) bits of the codes.
    pub qs: [u8; 16],
}

/// Q8_0: 32 weights, `y = d * q`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BlockQ8_0 {
    /// f16 scale (of the block; of the sub-block scales for K-quants).
    pub d: f16,
    /// Packed (low) bits of the codes.
    pub qs: [i8; 32],
}

/// Q2_K: 256 weights in 16 sub-blocks of 16; `scales[s]` = 4-bit scale | 4-bit min << 4;
/// `y = d * sc * q - dmin * m`, `q` in 0..=3: weight `128h + 32j + l` is bits `2j..2j+1` of
/// `qs[32h + l]`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BlockQ2_K {
    /// Sub-block scales (and mins), packed as described above.
    pub scales: [u8; 16],
    /// Packed (low) bits of the codes.
    pub qs: [u8; 64],
    /// f16 scale (of the block; of the sub-block scales for K-quants).
    pub d: f16,
    /// f16 scale of the sub-block mins.
    pub dmin: f16,
}

/// Q3_K: 256 weights in 16 sub-blocks of 16 with signed 6-bit scales (stored `+ 32`);
/// `y = d * (sc - 32) * q`, `q = low2 - (hbit ? 0 : 4)`: weight `e = 128h + 32j + l` has its
/// low bits at bits `2j..` of `qs[32h + l]` and its high bit at bit `e / 32` of
/// `hmask[e % 32]`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BlockQ3_K {
    /// The high bit of every 3-bit code.
    pub hmask: [u8; 32],
    /// Packed (low) bits of the codes.
    pub qs: [u8; 64],
    /// Sub-block scales (and mins), packed as described above.
    pub scales: [u8; 12],
    /// f16 scale (of the block; of the sub-block scales for K-quants).
    pub d: f16,
}

/// Q4_K: 256 weights in 8 sub-blocks of 32 with 6-bit scales and mins packed in 12 bytes;
/// `y = d * sc * q - dmin * m`; sub-block `2c` is the low nibbles of `qs[32c..32c + 32]`,
/// sub-block `2c + 1` the high nibbles.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BlockQ4_K {
    /// f16 scale (of the block; of the sub-block scales for K-quants).
    pub d: f16,
    /// f16 scale of the sub-block mins.
    pub dmin: f16,
    /// Sub-block scales (and mins), packed as described above.
    pub scales: [u8; 12],
    /// Packed (low) bits of the codes.
    pub qs: [u8; 128],
}

/// Q5_K: Q4_K plus a fifth bit: bit `s` of `qh[l]` for weight `32s + l`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BlockQ5_K {
    /// f16 scale (of the block; of the sub-block scales for K-quants).
    pub d: f16,
    /// f16 scale of the sub-block mins.
    pub dmin: f16,
    /// Sub-block scales (and mins), packed as described above.
    pub scales: [u8; 12],
    /// High bits of the codes.
    pub qh: [u8; 32],
    /// Packed (low) bits of the codes.
    pub qs: [u8; 128],
}

/// Q6_K: 256 weights in 16 sub-blocks of 16 with i8 scales; `y = d * sc * (q - 32)`;
/// weight `128h + r`: low nibble from `ql[64h + r % 64]` (high nibble when `r >= 64`), top
/// two bits at bits `2(r / 32)..` of `qh[32h + r % 32]`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BlockQ6_K {
    /// Low 4 bits of every 6-bit code.
    pub ql: [u8; 128],
    /// High bits of the codes.
    pub qh: [u8; 64],
    /// Sub-block scales (and mins), packed as described above.
    pub scales: [i8; 16],
    /// f16 scale (of the block; of the sub-block scales for K-quants).
    pub d: f16,
}

const _: () = assert!(std::mem::size_of::<BlockQ4_0>() == 18);
const _: () = assert!(std::mem::size_of::<BlockQ4_1>() == 20);
const _: () = assert!(std::mem::size_of::<BlockQ5_0>() == 22);
const _: () = assert!(std::mem::size_of::<BlockQ5_1>() == 24);
const _: () = assert!(std::mem::size_of::<BlockQ8_0>() == 34);
const _: () = assert!(std::mem::size_of::<BlockQ2_K>() == 84);
const _: () = assert!(std::mem::size_of::<BlockQ3_K>() == 110);
const _: () = assert!(std::mem::size_of::<BlockQ4_K>() == 144);
const _: () = assert!(std::mem::size_of::<BlockQ5_K>() == 176);
const _: () = assert!(std::mem::size_of::<BlockQ6_K>() == 210);
const _: () = assert!(std::mem::size_of::<BlockIQ4_NL>() == 18);
const _: () = assert!(std::mem::size_of::<BlockIQ4_XS>() == 136);

/// IQ4_NL: 32 weights, `y = d * IQ4_NL_LEVELS[q]` (16 fixed non-uniform int8 levels); nibbles
/// as Q4_0 (`qs[j]` holds `q[j]` in the low nibble and `q[j + 16]` in the high one).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BlockIQ4_NL {
    /// f16 scale of the levels.
    pub d: f16,
    /// Packed level indices.
    pub qs: [u8; 16],
}

/// IQ4_XS: 256 weights in 8 sub-blocks of 32 with the IQ4_NL levels and a signed 6-bit scale
/// each, `y = d * (ls - 32) * IQ4_NL_LEVELS[q]`. Sub-block `ib` (0..8): `ls` has its low 4
/// bits at bit `4 (ib % 2)` of `scales_l[ib / 2]` and its high 2 bits at bit `2 ib` of
/// `scales_h` ([`scale_iq4_xs`]); its codes are the nibbles of `qs[16 ib..16 ib + 16]` as
/// IQ4_NL's (weight `j` low, weight `j + 16` high).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BlockIQ4_XS {
    /// f16 scale of the sub-block scales.
    pub d: f16,
    /// High 2 bits of the 8 stored sub-block scales `ls` (a little-endian u16 on disk).
    pub scales_h: u16,
    /// Low 4 bits of the stored sub-block scales, two per byte.
    pub scales_l: [u8; 4],
    /// Packed level indices, 16 bytes per sub-block.
    pub qs: [u8; 128],
}

// ---------------------------------------------------------------------------------------
// Little-endian byte helpers

/// A field of a block as the file stores it: an f16 scalar, or an array of bytes or signed bytes.
trait LeField: Sized {
    fn put(&self, o: &mut Writer<'_>);
    fn take(r: &mut Reader<'_>) -> Self;
}

impl LeField for u16 {
    fn put(&self, o: &mut Writer<'_>) {
        o.bytes(&self.to_le_bytes());
    }
    fn take(r: &mut Reader<'_>) -> Self {
        u16::from_le_bytes(r.array())
    }
}

impl LeField for f16 {
    fn put(&self, o: &mut Writer<'_>) {
        o.f16(*self);
    }
    fn take(r: &mut Reader<'_>) -> Self {
        r.f16()
    }
}

impl<const N: usize> LeField for [u8; N] {
    fn put(&self, o: &mut Writer<'_>) {
        o.bytes(self);
    }
    fn take(r: &mut Reader<'_>) -> Self {
        r.array()
    }
}

impl<const N: usize> LeField for [i8; N] {
    fn put(&self, o: &mut Writer<'_>) {
        o.i8s(self);
    }
    fn take(r: &mut Reader<'_>) -> Self {
        r.i8_array()
    }
}

/// `GgufBlock::write_le` and `read_le` for a block whose fields the file stores in the listed
/// order, each little-endian, with no padding.
macro_rules! le_fields {
    ($($f:ident),+) => {
        fn write_le(&self, out: &mut [u8]) {
            let mut o = Writer::new(out, Self::TYPE_SIZE);
            $( LeField::put(&self.$f, &mut o); )+
        }

        fn read_le(bytes: &[u8]) -> Self {
            let mut r = Reader::new(bytes, Self::TYPE_SIZE);
            Self { $( $f: LeField::take(&mut r), )+ }
        }
    };
}

struct Writer<'a> {
    out: &'a mut [u8],
    at: usize,
}

impl<'a> Writer<'a> {
    #[track_caller]
    fn new(out: &'a mut [u8], size: usize) -> Self {
        assert_eq!(out.len(), size, "block byte length");
        Self { out, at: 0 }
    }
    fn f16(&mut self, v: f16) {
        self.bytes(&v.to_le_bytes());
    }
    fn bytes(&mut self, b: &[u8]) {
        self.out[self.at..self.at + b.len()].copy_from_slice(b);
        self.at += b.len();
    }
    fn i8s(&mut self, b: &[i8]) {
        for (o, &v) in self.out[self.at..self.at + b.len()].iter_mut().zip(b) {
            *o = v as u8;
        }
        self.at += b.len();
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    #[track_caller]
    fn new(bytes: &'a [u8], size: usize) -> Self {
        assert_eq!(bytes.len(), size, "block byte length");
        Self { bytes, at: 0 }
    }
    fn f16(&mut self) -> f16 {
        let v = f16::from_le_bytes([self.bytes[self.at], self.bytes[self.at + 1]]);
        self.at += 2;
        v
    }
    fn array<const N: usize>(&mut self) -> [u8; N] {
        let a: [u8; N] = self.bytes[self.at..self.at + N].try_into().unwrap();
        self.at += N;
        a
    }
    fn i8_array<const N: usize>(&mut self) -> [i8; N] {
        self.array::<N>().map(|b| b as i8)
    }
}

// ---------------------------------------------------------------------------------------
// Scale searches (shared by every quantizer)

/// Weight `i` (1 when there are no importance weights).
#[inline]
fn wt(w: Option<&[f32]>, i: usize) -> f64 {
    w.map_or(1.0, |w| w[i] as f64)
}

/// `sum_i w_i (x_i - y_i)^2`.
fn weighted_error(x: &[f32], y: &[f32], w: Option<&[f32]>) -> f64 {
    x.iter()
        .zip(y)
        .enumerate()
        .map(|(i, (&a, &b))| wt(w, i) * ((a - b) as f64).powi(2))
        .sum()
}

pub use quantlab_grids::ggml_k::{fit_affine, fit_symmetric};

/// The better of two blocks under `sum w (x - y)^2` (the first on ties).
fn better_of<B: GgufBlock>(x: &[f32], w: Option<&[f32]>, a: B, b: B) -> B {
    let mut ya = [0.0f32; QK_K];
    let mut yb = [0.0f32; QK_K];
    a.dequantize_block(&mut ya[..B::QK]);
    b.dequantize_block(&mut yb[..B::QK]);
    if weighted_error(x, &yb[..B::QK], w) < weighted_error(x, &ya[..B::QK], w) {
        b
    } else {
        a
    }
}

/// Signed value of largest `|x|` (first on ties), and that `|x|`.
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
    let mut min = f32::MAX;
    let mut max = -f32::MAX;
    for &v in x {
        min = min.min(v);
        max = max.max(v);
    }
    (min, max)
}

// ---------------------------------------------------------------------------------------
// Legacy types

/// Pack 32 codes (each < 16) as ggml's legacy nibbles: `q[j] | q[j + 16] << 4`.
fn nibbles(q: &[u8; 32]) -> [u8; 16] {
    std::array::from_fn(|j| (q[j] & 0xF) | ((q[j + 16] & 0xF) << 4))
}

fn unnibble(qs: &[u8; 16], j: usize) -> u8 {
    if j < 16 {
        qs[j] & 0xF
    } else {
        qs[j - 16] >> 4
    }
}

fn fifth_bits(q: &[u8; 32]) -> [u8; 4] {
    let h = q
        .iter()
        .enumerate()
        .fold(0u32, |h, (j, &v)| h | (((v as u32 >> 4) & 1) << j));
    h.to_le_bytes()
}

fn q4_0_ref(x: &[f32], nhalf: f32, qmax: u8) -> (f16, [u8; 32]) {
    let (max, _) = signed_absmax(x);
    let d = max / -nhalf;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let q = std::array::from_fn(|j| ((x[j] * id + (nhalf + 0.5)) as i8).clamp(0, qmax as i8) as u8);
    (f16::from_f32(d), q)
}

fn q4_1_ref(x: &[f32], qmax: u8) -> (f16, f16, [u8; 32]) {
    let (min, max) = min_max(x);
    let d = (max - min) / qmax as f32;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let q = std::array::from_fn(|j| (((x[j] - min) * id + 0.5) as i8).clamp(0, qmax as i8) as u8);
    (f16::from_f32(d), f16::from_f32(min), q)
}

/// The importance-weighted fit of one legacy block: the grid's own search
/// ([`GgmlGrid::fit_weighted`], the one fitter of the type, which the grid's RTN and GPTQ on
/// it use too), its codes the nearest levels under the stored parameters
/// ([`Format::encode`]). Returns the stored `d`, `m` (the `_1` types' minimum; 0 otherwise)
/// and the codes (offset by the grid's zero for `_0` types, two's complement for Q8_0).
fn grid_weighted(grid: GgmlGrid, x: &[f32], w: &[f32]) -> (f16, f16, [u8; 32]) {
    let p = grid.fit_weighted(x, Some(w));
    let q = std::array::from_fn(|j| grid.encode(x[j], p));
    (f16::from_f32(p.scale), f16::from_f32(p.zero), q)
}

impl GgufBlock for BlockQ4_0 {
    const QK: usize = 32;
    const TYPE_ID: u32 = 2;
    const TYPE_SIZE: usize = 18;
    const NAME: &'static str = "Q4_0";
    const ZERO: Self = Self {
        d: f16::ZERO,
        qs: [0; 16],
    };

    fn quantize_block(x: &[f32], w: Option<&[f32]>) -> Self {
        let (d, q) = q4_0_ref(x, 8.0, 15);
        let r = Self { d, qs: nibbles(&q) };
        match w {
            None => r,
            Some(w) => {
                let (d, _, q) = grid_weighted(GgmlGrid::Q4_0, x, w);
                better_of(x, Some(w), r, Self { d, qs: nibbles(&q) })
            }
        }
    }

    fn dequantize_block(&self, y: &mut [f32]) {
        let d = self.d.to_f32();
        for (j, v) in y.iter_mut().enumerate() {
            *v = (unnibble(&self.qs, j) as i32 - 8) as f32 * d;
        }
    }

    le_fields!(d, qs);
}

impl GgufBlock for BlockQ4_1 {
    const QK: usize = 32;
    const TYPE_ID: u32 = 3;
    const TYPE_SIZE: usize = 20;
    const NAME: &'static str = "Q4_1";
    const ZERO: Self = Self {
        d: f16::ZERO,
        m: f16::ZERO,
        qs: [0; 16],
    };

    fn quantize_block(x: &[f32], w: Option<&[f32]>) -> Self {
        let (d, m, q) = q4_1_ref(x, 15);
        let r = Self {
            d,
            m,
            qs: nibbles(&q),
        };
        match w {
            None => r,
            Some(w) => {
                let (d, m, q) = grid_weighted(GgmlGrid::Q4_1, x, w);
                let c = Self {
                    d,
                    m,
                    qs: nibbles(&q),
                };
                better_of(x, Some(w), r, c)
            }
        }
    }

    fn dequantize_block(&self, y: &mut [f32]) {
        let (d, m) = (self.d.to_f32(), self.m.to_f32());
        for (j, v) in y.iter_mut().enumerate() {
            *v = unnibble(&self.qs, j) as f32 * d + m;
        }
    }

    le_fields!(d, m, qs);
}

fn q5_code(qh: &[u8; 4], qs: &[u8; 16], j: usize) -> u8 {
    let h = u32::from_le_bytes(*qh);
    unnibble(qs, j) | ((((h >> j) & 1) as u8) << 4)
}

impl GgufBlock for BlockQ5_0 {
    const QK: usize = 32;
    const TYPE_ID: u32 = 6;
    const TYPE_SIZE: usize = 22;
    const NAME: &'static str = "Q5_0";
    const ZERO: Self = Self {
        d: f16::ZERO,
        qh: [0; 4],
        qs: [0; 16],
    };

    fn quantize_block(x: &[f32], w: Option<&[f32]>) -> Self {
        let make = |(d, q): (f16, [u8; 32])| Self {
            d,
            qh: fifth_bits(&q),
            qs: nibbles(&q),
        };
        let r = make(q4_0_ref(x, 16.0, 31));
        match w {
            None => r,
            Some(w) => {
                let (d, _, q) = grid_weighted(GgmlGrid::Q5_0, x, w);
                better_of(x, Some(w), r, make((d, q)))
            }
        }
    }

    fn dequantize_block(&self, y: &mut [f32]) {
        let d = self.d.to_f32();
        for (j, v) in y.iter_mut().enumerate() {
            *v = (q5_code(&self.qh, &self.qs, j) as i32 - 16) as f32 * d;
        }
    }

    le_fields!(d, qh, qs);
}

impl GgufBlock for BlockQ5_1 {
    const QK: usize = 32;
    const TYPE_ID: u32 = 7;
    const TYPE_SIZE: usize = 24;
    const NAME: &'static str = "Q5_1";
    const ZERO: Self = Self {
        d: f16::ZERO,
        m: f16::ZERO,
        qh: [0; 4],
        qs: [0; 16],
    };

    fn quantize_block(x: &[f32], w: Option<&[f32]>) -> Self {
        let make = |(d, m, q): (f16, f16, [u8; 32])| Self {
            d,
            m,
            qh: fifth_bits(&q),
            qs: nibbles(&q),
        };
        let r = make(q4_1_ref(x, 31));
        match w {
            None => r,
            Some(w) => better_of(x, Some(w), r, make(grid_weighted(GgmlGrid::Q5_1, x, w))),
        }
    }

    fn dequantize_block(&self, y: &mut [f32]) {
        let (d, m) = (self.d.to_f32(), self.m.to_f32());
        for (j, v) in y.iter_mut().enumerate() {
            *v = q5_code(&self.qh, &self.qs, j) as f32 * d + m;
        }
    }

    le_fields!(d, m, qh, qs);
}

impl GgufBlock for BlockQ8_0 {
    const QK: usize = 32;
    const TYPE_ID: u32 = 8;
    const TYPE_SIZE: usize = 34;
    const NAME: &'static str = "Q8_0";
    const ZERO: Self = Self {
        d: f16::ZERO,
        qs: [0; 32],
    };

    fn quantize_block(x: &[f32], w: Option<&[f32]>) -> Self {
        let (_, amax) = signed_absmax(x);
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let r = Self {
            d: f16::from_f32(d),
            qs: std::array::from_fn(|j| (x[j] * id).round() as i8),
        };
        match w {
            None => r,
            Some(w) => {
                let (d, _, q) = grid_weighted(GgmlGrid::Q8_0, x, w);
                let c = Self {
                    d,
                    qs: q.map(|c| c as i8),
                };
                better_of(x, Some(w), r, c)
            }
        }
    }

    fn dequantize_block(&self, y: &mut [f32]) {
        let d = self.d.to_f32();
        for (v, &q) in y.iter_mut().zip(&self.qs) {
            *v = q as f32 * d;
        }
    }

    le_fields!(d, qs);
}

impl GgufBlock for BlockIQ4_NL {
    const QK: usize = 32;
    const TYPE_ID: u32 = 20;
    const TYPE_SIZE: usize = 18;
    const NAME: &'static str = "IQ4_NL";
    const ZERO: Self = Self {
        d: f16::ZERO,
        qs: [0; 16],
    };

    /// The scale search of [`quantlab_grids::GgmlGrid::IQ4_NL`] (weighted with `w`), then the
    /// nearest level of every weight.
    fn quantize_block(x: &[f32], w: Option<&[f32]>) -> Self {
        let g = GgmlGrid::IQ4_NL;
        let p = g.fit_weighted(x, w);
        let q: [u8; 32] = std::array::from_fn(|j| g.encode(x[j], p));
        Self {
            d: f16::from_f32(p.scale),
            qs: nibbles(&q),
        }
    }

    fn dequantize_block(&self, y: &mut [f32]) {
        let d = self.d.to_f32();
        for (j, v) in y.iter_mut().enumerate() {
            *v = d * quantlab_grids::ggml::IQ4_NL_LEVELS[unnibble(&self.qs, j) as usize] as f32;
        }
    }

    le_fields!(d, qs);
}

impl GgufBlock for BlockIQ4_XS {
    const QK: usize = QK_K;
    const TYPE_ID: u32 = 23;
    const TYPE_SIZE: usize = 136;
    const NAME: &'static str = "IQ4_XS";
    const ZERO: Self = Self {
        d: f16::ZERO,
        scales_h: 0,
        scales_l: [0; 4],
        qs: [0; 128],
    };

    /// The super-block fit of [`quantlab_grids::GgmlGrid::IQ4_XS`] (weighted with `w`),
    /// then the nearest level of every weight.
    fn quantize_block(x: &[f32], w: Option<&[f32]>) -> Self {
        let (sp, q) = k_fit(GgmlGrid::IQ4_XS, x, w);
        Self::from_parts(&sp, &q)
    }

    fn dequantize_block(&self, y: &mut [f32]) {
        let d = self.d.to_f32();
        for (ib, yb) in y.chunks_exact_mut(32).enumerate() {
            let dl = d * scale_iq4_xs(self.scales_h, &self.scales_l, ib) as f32;
            let qs = &self.qs[16 * ib..16 * ib + 16];
            for (j, v) in yb.iter_mut().enumerate() {
                let q = (qs[j % 16] >> (4 * (j / 16))) & 0xF;
                *v = dl * quantlab_grids::ggml::IQ4_NL_LEVELS[q as usize] as f32;
            }
        }
    }

    le_fields!(d, scales_h, scales_l, qs);
}

/// The signed 6-bit scale `ls - 32` of sub-block `ib` (0..8) of IQ4_XS: `ls` is the low
/// nibble `(scales_l[ib / 2] >> 4 (ib % 2)) & 0xF` with the two bits `(scales_h >> 2 ib) & 3`
/// above it.
pub fn scale_iq4_xs(scales_h: u16, scales_l: &[u8; 4], ib: usize) -> i32 {
    let lo = (scales_l[ib / 2] >> (4 * (ib % 2))) & 0xF;
    let hi = ((scales_h >> (2 * ib)) & 3) as u8;
    (lo | (hi << 4)) as i32 - 32
}

// ---------------------------------------------------------------------------------------
// K-quants

/// The stored parameters and codes of one K super-block of `grid` fitted to `x` by the
/// grid's reference fit ([`quantlab_grids::ggml_k::fit_superblock`], optional importance
/// `w`), each code the nearest level under the stored parameters.
fn k_fit(grid: GgmlGrid, x: &[f32], w: Option<&[f32]>) -> (KSuperParams, [u8; QK_K]) {
    let sp = fit_superblock(grid, x, w);
    let sub = grid.group_len();
    let q = std::array::from_fn(|e| grid.encode(x[e], sp.group_params(grid, e / sub)));
    (sp, q)
}

/// Pack 8 six-bit scales and mins into ggml's 12-byte `scales` of Q4_K / Q5_K.
fn pack_scale_min_k4(sc: &[u8; 8], m: &[u8; 8]) -> [u8; 12] {
    let mut out = [0u8; 12];
    for j in 0..4 {
        out[j] = sc[j] & 63;
        out[j + 4] = m[j] & 63;
    }
    for j in 4..8 {
        out[j + 4] = (sc[j] & 0xF) | ((m[j] & 0xF) << 4);
        out[j - 4] |= (sc[j] >> 4) << 6;
        out[j] |= (m[j] >> 4) << 6;
    }
    out
}

/// The 6-bit scale and min of sub-block `j` of Q4_K / Q5_K.
pub fn scale_min_k4(scales: &[u8; 12], j: usize) -> (u8, u8) {
    if j < 4 {
        (scales[j] & 63, scales[j + 4] & 63)
    } else {
        (
            (scales[j + 4] & 0xF) | ((scales[j - 4] >> 6) << 4),
            (scales[j + 4] >> 4) | ((scales[j] >> 6) << 4),
        )
    }
}

impl GgufBlock for BlockQ2_K {
    const QK: usize = QK_K;
    const TYPE_ID: u32 = 10;
    const TYPE_SIZE: usize = 84;
    const NAME: &'static str = "Q2_K";
    const ZERO: Self = Self {
        scales: [0; 16],
        qs: [0; 64],
        d: f16::ZERO,
        dmin: f16::ZERO,
    };

    fn quantize_block(x: &[f32], w: Option<&[f32]>) -> Self {
        let (sp, q) = k_fit(GgmlGrid::Q2_K, x, w);
        Self::from_parts(&sp, &q)
    }

    fn dequantize_block(&self, y: &mut [f32]) {
        let (d, dmin) = (self.d.to_f32(), self.dmin.to_f32());
        for (e, v) in y.iter_mut().enumerate() {
            let (h, j, l) = (e / 128, (e % 128) / 32, e % 32);
            let q = (self.qs[32 * h + l] >> (2 * j)) & 3;
            let s = self.scales[e / 16];
            let dl = d * (s & 0xF) as f32;
            let ml = dmin * (s >> 4) as f32;
            *v = dl * q as f32 - ml;
        }
    }

    le_fields!(scales, qs, d, dmin);
}

/// The signed 6-bit scale (stored value minus 32) of sub-block `s` of Q3_K.
pub fn scale_q3_k(scales: &[u8; 12], s: usize) -> i8 {
    let lo = if s < 8 {
        scales[s] & 0xF
    } else {
        scales[s - 8] >> 4
    };
    let hi = (scales[8 + s % 4] >> (2 * (s / 4))) & 3;
    (lo | (hi << 4)) as i8 - 32
}

impl GgufBlock for BlockQ3_K {
    const QK: usize = QK_K;
    const TYPE_ID: u32 = 11;
    const TYPE_SIZE: usize = 110;
    const NAME: &'static str = "Q3_K";
    const ZERO: Self = Self {
        hmask: [0; 32],
        qs: [0; 64],
        scales: [0; 12],
        d: f16::ZERO,
    };

    fn quantize_block(x: &[f32], w: Option<&[f32]>) -> Self {
        let (sp, q) = k_fit(GgmlGrid::Q3_K, x, w);
        Self::from_parts(&sp, &q)
    }

    fn dequantize_block(&self, y: &mut [f32]) {
        let d = self.d.to_f32();
        for (e, v) in y.iter_mut().enumerate() {
            let (h, j, l) = (e / 128, (e % 128) / 32, e % 32);
            let low = ((self.qs[32 * h + l] >> (2 * j)) & 3) as i32;
            let high = (self.hmask[e % 32] >> (e / 32)) & 1;
            let q = low - if high == 1 { 0 } else { 4 };
            let dl = d * scale_q3_k(&self.scales, e / 16) as f32;
            *v = dl * q as f32;
        }
    }

    le_fields!(hmask, qs, scales, d);
}

impl GgufBlock for BlockQ4_K {
    const QK: usize = QK_K;
    const TYPE_ID: u32 = 12;
    const TYPE_SIZE: usize = 144;
    const NAME: &'static str = "Q4_K";
    const ZERO: Self = Self {
        d: f16::ZERO,
        dmin: f16::ZERO,
        scales: [0; 12],
        qs: [0; 128],
    };

    fn quantize_block(x: &[f32], w: Option<&[f32]>) -> Self {
        let (sp, q) = k_fit(GgmlGrid::Q4_K, x, w);
        Self::from_parts(&sp, &q)
    }

    fn dequantize_block(&self, y: &mut [f32]) {
        let (d, dmin) = (self.d.to_f32(), self.dmin.to_f32());
        for (e, v) in y.iter_mut().enumerate() {
            let s = e / 32;
            let q = (self.qs[32 * (s / 2) + e % 32] >> (4 * (s % 2))) & 0xF;
            let (sc, m) = scale_min_k4(&self.scales, s);
            let (d1, m1) = (d * sc as f32, dmin * m as f32);
            *v = d1 * q as f32 - m1;
        }
    }

    le_fields!(d, dmin, scales, qs);
}

impl GgufBlock for BlockQ5_K {
    const QK: usize = QK_K;
    const TYPE_ID: u32 = 13;
    const TYPE_SIZE: usize = 176;
    const NAME: &'static str = "Q5_K";
    const ZERO: Self = Self {
        d: f16::ZERO,
        dmin: f16::ZERO,
        scales: [0; 12],
        qh: [0; 32],
        qs: [0; 128],
    };

    fn quantize_block(x: &[f32], w: Option<&[f32]>) -> Self {
        let (sp, q) = k_fit(GgmlGrid::Q5_K, x, w);
        Self::from_parts(&sp, &q)
    }

    fn dequantize_block(&self, y: &mut [f32]) {
        let (d, dmin) = (self.d.to_f32(), self.dmin.to_f32());
        for (e, v) in y.iter_mut().enumerate() {
            let s = e / 32;
            let low = (self.qs[32 * (s / 2) + e % 32] >> (4 * (s % 2))) & 0xF;
            let q = low | (((self.qh[e % 32] >> s) & 1) << 4);
            let (sc, m) = scale_min_k4(&self.scales, s);
            let (d1, m1) = (d * sc as f32, dmin * m as f32);
            *v = d1 * q as f32 - m1;
        }
    }

    le_fields!(d, dmin, scales, qh, qs);
}

impl GgufBlock for BlockQ6_K {
    const QK: usize = QK_K;
    const TYPE_ID: u32 = 14;
    const TYPE_SIZE: usize = 210;
    const NAME: &'static str = "Q6_K";
    const ZERO: Self = Self {
        ql: [0; 128],
        qh: [0; 64],
        scales: [0; 16],
        d: f16::ZERO,
    };

    fn quantize_block(x: &[f32], w: Option<&[f32]>) -> Self {
        let (sp, q) = k_fit(GgmlGrid::Q6_K, x, w);
        Self::from_parts(&sp, &q)
    }

    fn dequantize_block(&self, y: &mut [f32]) {
        let d = self.d.to_f32();
        for (e, v) in y.iter_mut().enumerate() {
            let (h, r) = (e / 128, e % 128);
            let low = (self.ql[64 * h + r % 64] >> (4 * (r / 64))) & 0xF;
            let high = (self.qh[32 * h + r % 32] >> (2 * (r / 32))) & 3;
            let q = (low | (high << 4)) as i32 - 32;
            let dl = d * self.scales[e / 16] as f32;
            *v = dl * q as f32;
        }
    }

    le_fields!(ql, qh, scales, d);
}

// ---------------------------------------------------------------------------------------
// K blocks from stored parameters and codes

/// The f16 of a value the K fit made exactly representable.
fn exact_h(v: f32) -> f16 {
    f16::from_f32(v)
}

impl BlockQ2_K {
    /// The block of stored parameters `sp` (16 sub-blocks, `sc` and `m` in 0..=15) and codes
    /// `q` (256, each 0..=3), as [`quantlab_grids::GgmlGrid::Q2_K`] defines them.
    pub fn from_parts(sp: &KSuperParams, q: &[u8; QK_K]) -> Self {
        let mut qs = [0u8; 64];
        for (e, &v) in q.iter().enumerate() {
            let (h, j, l) = (e / 128, (e % 128) / 32, e % 32);
            qs[32 * h + l] |= (v & 3) << (2 * j);
        }
        Self {
            scales: std::array::from_fn(|s| (sp.sc[s] as u8 & 0xF) | ((sp.m[s] as u8 & 0xF) << 4)),
            qs,
            d: exact_h(sp.d),
            dmin: exact_h(sp.dmin),
        }
    }
}

impl BlockQ3_K {
    /// The block of stored parameters `sp` (16 sub-blocks, `sc` in -32..=31) and codes `q`
    /// (256, each 0..=7 = signed value + 4).
    pub fn from_parts(sp: &KSuperParams, q: &[u8; QK_K]) -> Self {
        let mut scales = [0u8; 12];
        for (s, &v) in sp.sc.iter().enumerate() {
            let u = (v + 32) as u8;
            if s < 8 {
                scales[s] |= u & 0xF;
            } else {
                scales[s - 8] |= (u & 0xF) << 4;
            }
            scales[8 + s % 4] |= ((u >> 4) & 3) << (2 * (s / 4));
        }
        let (mut hmask, mut qs) = ([0u8; 32], [0u8; 64]);
        for (e, &u) in q.iter().enumerate() {
            let (h, j, l) = (e / 128, (e % 128) / 32, e % 32);
            qs[32 * h + l] |= (u & 3) << (2 * j);
            hmask[e % 32] |= ((u >> 2) & 1) << (e / 32);
        }
        Self {
            hmask,
            qs,
            scales,
            d: exact_h(sp.d),
        }
    }
}

impl BlockQ4_K {
    /// The block of stored parameters `sp` (8 sub-blocks, `sc` and `m` in 0..=63) and codes
    /// `q` (256, each 0..=15).
    pub fn from_parts(sp: &KSuperParams, q: &[u8; QK_K]) -> Self {
        let mut qs = [0u8; 128];
        for (e, &v) in q.iter().enumerate() {
            let s = e / 32;
            qs[32 * (s / 2) + e % 32] |= (v & 0xF) << (4 * (s % 2));
        }
        let sc: [u8; 8] = std::array::from_fn(|s| sp.sc[s] as u8);
        let m: [u8; 8] = std::array::from_fn(|s| sp.m[s] as u8);
        Self {
            d: exact_h(sp.d),
            dmin: exact_h(sp.dmin),
            scales: pack_scale_min_k4(&sc, &m),
            qs,
        }
    }
}

impl BlockQ5_K {
    /// The block of stored parameters `sp` (8 sub-blocks, `sc` and `m` in 0..=63) and codes
    /// `q` (256, each 0..=31).
    pub fn from_parts(sp: &KSuperParams, q: &[u8; QK_K]) -> Self {
        let (mut qh, mut qs) = ([0u8; 32], [0u8; 128]);
        for (e, &v) in q.iter().enumerate() {
            let s = e / 32;
            qs[32 * (s / 2) + e % 32] |= (v & 0xF) << (4 * (s % 2));
            qh[e % 32] |= ((v >> 4) & 1) << s;
        }
        let sc: [u8; 8] = std::array::from_fn(|s| sp.sc[s] as u8);
        let m: [u8; 8] = std::array::from_fn(|s| sp.m[s] as u8);
        Self {
            d: exact_h(sp.d),
            dmin: exact_h(sp.dmin),
            scales: pack_scale_min_k4(&sc, &m),
            qh,
            qs,
        }
    }
}

impl BlockIQ4_XS {
    /// The block of stored parameters `sp` (8 sub-blocks, `sc` in -32..=31, stored as
    /// `sc + 32`) and codes `q` (256 level indices, each 0..=15), as
    /// [`quantlab_grids::GgmlGrid::IQ4_XS`] defines them.
    pub fn from_parts(sp: &KSuperParams, q: &[u8; QK_K]) -> Self {
        let (mut scales_h, mut scales_l) = (0u16, [0u8; 4]);
        for (ib, &v) in sp.sc.iter().enumerate() {
            let ls = (v + 32) as u8 & 63;
            scales_l[ib / 2] |= (ls & 0xF) << (4 * (ib % 2));
            scales_h |= ((ls >> 4) as u16) << (2 * ib);
        }
        let mut qs = [0u8; 128];
        for (e, &c) in q.iter().enumerate() {
            let (ib, j) = (e / 32, e % 32);
            qs[16 * ib + j % 16] |= (c & 0xF) << (4 * (j / 16));
        }
        Self {
            d: exact_h(sp.d),
            scales_h,
            scales_l,
            qs,
        }
    }
}

impl BlockQ6_K {
    /// The block of stored parameters `sp` (16 sub-blocks, `sc` an i8) and codes `q` (256,
    /// each 0..=63 = signed value + 32).
    pub fn from_parts(sp: &KSuperParams, q: &[u8; QK_K]) -> Self {
        let (mut ql, mut qh) = ([0u8; 128], [0u8; 64]);
        for (e, &u) in q.iter().enumerate() {
            let (h, r) = (e / 128, e % 128);
            ql[64 * h + r % 64] |= (u & 0xF) << (4 * (r / 64));
            qh[32 * h + r % 32] |= ((u >> 4) & 3) << (2 * (r / 32));
        }
        Self {
            ql,
            qh,
            scales: std::array::from_fn(|s| sp.sc[s] as i8),
            d: exact_h(sp.d),
        }
    }
}

/// The on-disk bytes of one K block of `grid` (a K-quant or IQ4_XS, [`GgmlGrid::K`]) from
/// its stored parameters and codes.
///
/// Panics (a caller bug) when `grid` is not a super-block type or `sp` has the wrong number
/// of sub-blocks.
#[track_caller]
pub fn k_block_bytes(grid: GgmlGrid, sp: &KSuperParams, q: &[u8; QK_K]) -> Vec<u8> {
    assert_eq!(
        sp.sc.len(),
        QK_K / grid.group_len(),
        "sub-blocks of {grid:?}"
    );
    match grid {
        GgmlGrid::Q2_K => to_bytes(&[BlockQ2_K::from_parts(sp, q)]),
        GgmlGrid::Q3_K => to_bytes(&[BlockQ3_K::from_parts(sp, q)]),
        GgmlGrid::Q4_K => to_bytes(&[BlockQ4_K::from_parts(sp, q)]),
        GgmlGrid::Q5_K => to_bytes(&[BlockQ5_K::from_parts(sp, q)]),
        GgmlGrid::Q6_K => to_bytes(&[BlockQ6_K::from_parts(sp, q)]),
        GgmlGrid::IQ4_XS => to_bytes(&[BlockIQ4_XS::from_parts(sp, q)]),
        g => panic!("{g:?} is not a K type"),
    }
}

// ---------------------------------------------------------------------------------------
// Run-time selection

/// The ggml type of a tensor: the one type list of the workspace's GGUF code
/// ([`crate::gguf::GgmlType`], every id a GGUF file can name). The types with a block struct
/// here, and so a quantizer and a dequantizer, are [`BLOCK_TYPES`]; [`quantize`] and
/// [`dequantize`] refuse the others by name.
pub use crate::gguf::GgmlType;

/// The types with a block struct in this module, in type-id order.
pub const BLOCK_TYPES: [GgmlType; 12] = [
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q8_0,
    GgmlType::Q2_K,
    GgmlType::Q3_K,
    GgmlType::Q4_K,
    GgmlType::Q5_K,
    GgmlType::Q6_K,
    GgmlType::IQ4_NL,
    GgmlType::IQ4_XS,
];

/// Whether `ty` has a block struct here (a quantizer and a dequantizer).
pub fn has_blocks(ty: GgmlType) -> bool {
    BLOCK_TYPES.contains(&ty)
}

/// The number format ([`GgmlGrid`], `quantlab-grids`) a block type stores: the one map from
/// a file's type to the grid the solvers quantize onto. `None` for the types without
/// blocks here (floats, the IQ types but IQ4_NL and IQ4_XS, the activation types).
///
/// ```
/// use quantlab_checkpoints::pack::gguf_blocks::{grid_of, BLOCK_TYPES, GgmlType};
/// use quantlab_grids::GgmlGrid;
/// assert_eq!(grid_of(GgmlType::Q4_K), Some(GgmlGrid::Q4_K));
/// assert_eq!(grid_of(GgmlType::F16), None);
/// // exactly the types with a block struct have a grid
/// assert!(GgmlType::ALL.iter().all(|&t| grid_of(t).is_some() == BLOCK_TYPES.contains(&t)));
/// ```
pub fn grid_of(ty: GgmlType) -> Option<GgmlGrid> {
    Some(match ty {
        GgmlType::Q4_0 => GgmlGrid::Q4_0,
        GgmlType::Q4_1 => GgmlGrid::Q4_1,
        GgmlType::Q5_0 => GgmlGrid::Q5_0,
        GgmlType::Q5_1 => GgmlGrid::Q5_1,
        GgmlType::Q8_0 => GgmlGrid::Q8_0,
        GgmlType::Q2_K => GgmlGrid::Q2_K,
        GgmlType::Q3_K => GgmlGrid::Q3_K,
        GgmlType::Q4_K => GgmlGrid::Q4_K,
        GgmlType::Q5_K => GgmlGrid::Q5_K,
        GgmlType::Q6_K => GgmlGrid::Q6_K,
        GgmlType::IQ4_NL => GgmlGrid::IQ4_NL,
        GgmlType::IQ4_XS => GgmlGrid::IQ4_XS,
        _ => return None,
    })
}

/// Whether `ty` is one of ggml's super-block types (256 weights with integer sub-block
/// scales of one f16 `d`): the K-quants and IQ4_XS, the grids of [`GgmlGrid::K`].
pub fn is_k_type(ty: GgmlType) -> bool {
    grid_of(ty).is_some_and(|g| g.is_k())
}

macro_rules! dispatch {
    ($ty:expr, $B:ident => $body:expr, $other:ident => $fallback:expr) => {
        match $ty {
            GgmlType::Q4_0 => {
                type $B = BlockQ4_0;
                $body
            }
            GgmlType::Q4_1 => {
                type $B = BlockQ4_1;
                $body
            }
            GgmlType::Q5_0 => {
                type $B = BlockQ5_0;
                $body
            }
            GgmlType::Q5_1 => {
                type $B = BlockQ5_1;
                $body
            }
            GgmlType::Q8_0 => {
                type $B = BlockQ8_0;
                $body
            }
            GgmlType::Q2_K => {
                type $B = BlockQ2_K;
                $body
            }
            GgmlType::Q3_K => {
                type $B = BlockQ3_K;
                $body
            }
            GgmlType::Q4_K => {
                type $B = BlockQ4_K;
                $body
            }
            GgmlType::Q5_K => {
                type $B = BlockQ5_K;
                $body
            }
            GgmlType::Q6_K => {
                type $B = BlockQ6_K;
                $body
            }
            GgmlType::IQ4_NL => {
                type $B = BlockIQ4_NL;
                $body
            }
            GgmlType::IQ4_XS => {
                type $B = BlockIQ4_XS;
                $body
            }
            $other => $fallback,
        }
    };
}

/// Quantize `x` (a whole number of blocks, e.g. rows of a tensor named `name`) to `ty`'s
/// on-disk bytes; with `importance`, the importance-weighted search.
///
/// Errors name the tensor: a length that is not a multiple of the block size, a non-finite
/// value, importance of the wrong length or with a negative or non-finite entry.
///
/// ```
/// use quantlab_checkpoints::pack::gguf_blocks::{dequantize, quantize, GgmlType};
/// let x: Vec<f32> = (0..256).map(|i| ((i * 37) % 101) as f32 / 50.0 - 1.0).collect();
/// let bytes = quantize("blk.0.ffn_up.weight", GgmlType::Q6_K, &x, None).unwrap();
/// assert_eq!(bytes.len(), 210);
/// let y = dequantize("blk.0.ffn_up.weight", GgmlType::Q6_K, &bytes).unwrap();
/// assert!(x.iter().zip(&y).all(|(a, b)| (a - b).abs() < 0.03));
/// ```
pub fn quantize(
    name: &str,
    ty: GgmlType,
    x: &[f32],
    importance: Option<&[f32]>,
) -> Result<Vec<u8>> {
    let label = format!("GGUF {}", ty.name());
    if !has_blocks(ty) {
        return Err(no_blocks(&label, name, ty));
    }
    let qk = ty.block_size() as usize;
    if x.len() % qk != 0 {
        return Err(pack_err(
            &label,
            name,
            format!(
                "{} values are not a whole number of {qk}-weight blocks (rows must be multiples of {qk})",
                x.len(),
            ),
        ));
    }
    if let Some(i) = x.iter().position(|v| !v.is_finite()) {
        return Err(pack_err(
            &label,
            name,
            format!("non-finite value {} at flat index {i}", x[i]),
        ));
    }
    if let Some(w) = importance {
        if w.len() != x.len() {
            return Err(pack_err(
                &label,
                name,
                format!("{} importance weights for {} values", w.len(), x.len()),
            ));
        }
        if let Some(i) = w.iter().position(|v| !(v.is_finite() && *v >= 0.0)) {
            return Err(pack_err(
                &label,
                name,
                format!(
                    "importance weight {} at flat index {i} is not finite and >= 0",
                    w[i]
                ),
            ));
        }
    }
    Ok(dispatch!(ty, B => {
        let mut blocks = vec![B::ZERO; x.len() / B::QK];
        match importance {
            None => B::quantize_ref(x, &mut blocks),
            Some(w) => B::quantize_weighted(x, w, &mut blocks),
        }
        to_bytes(&blocks)
    }, other => return Err(no_blocks(&label, name, other))))
}

fn no_blocks(label: &str, name: &str, ty: GgmlType) -> crate::CheckpointError {
    pack_err(
        label,
        name,
        format!(
            "no block quantizer for ggml type {} (these have one: {})",
            ty.name(),
            BLOCK_TYPES.map(|t| t.name()).join(", ")
        ),
    )
}

/// Dequantize `ty`'s on-disk bytes; `name` (the tensor) appears in the error when the
/// length is not a whole number of blocks.
pub fn dequantize(name: &str, ty: GgmlType, bytes: &[u8]) -> Result<Vec<f32>> {
    dispatch!(ty, B => {
        let blocks = from_bytes::<B>(name, bytes)?;
        let mut y = vec![0.0f32; blocks.len() * B::QK];
        B::dequantize(&blocks, &mut y);
        Ok(y)
    }, other => Err(no_blocks(&format!("GGUF {}", other.name()), name, other)))
}
