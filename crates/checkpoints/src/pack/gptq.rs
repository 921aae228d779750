//! GPTQ tensors (`qweight`, `qzeros`, `scales`, `g_idx`) as the transformers / optimum /
//! AutoGPTQ / GPTQModel / vLLM loaders read them.
//!
//! With `in`, `out` the layer sizes, `b` the bits and `G` the number of groups:
//!
//! * `qweight`: int32 `[in * b / 32, out]`, packed along the INPUT dimension: column `n` of
//!   `qweight` is the LSB-first bit stream of `q[0, n], q[1, n], ...` (value `k` at bit
//!   `b * k`), see [`super::pack_lsb`]. For 3 bits, 32 values fill 3 words and values 10 and
//!   21 straddle word boundaries. Words are built as u32 and stored as i32.
//! * `qzeros`: int32 `[G, out * b / 32]`, the same stream along the OUTPUT dimension. In
//!   checkpoint format v1 (`"gptq"`, what every loader assumes) the stored value is
//!   `zero - 1` and the loader adds 1 back; v2 (`"gptq_v2"`) stores raw zeros.
//! * `scales`: f16 `[G, out]` (the transpose of [`QuantizedLinear::scales`]); `g_idx`: int32
//!   `[in]`, the group of each input column in the original column order.
//!
//! Dequantization (v1): `W[k, n] = scales[g_idx[k], n] * (q[k, n] - (qzeros[g_idx[k], n] + 1))`.
//!
//! Shapes: `in` and `out` must be multiples of 32 (the packing itself needs `in` to be a
//! multiple of `32 / b`, or of 32 for 3 bits; the loaders' kernels need 32 for both).
//!
//! ```
//! use ndarray::Array2;
//! use quantlab_checkpoints::pack::{pack_gptq, GptqFormat};
//! use quantlab_grids::{quantize_rtn, FormatSpec, Granularity, UniformGrid};
//! let w = Array2::from_shape_fn((32, 64), |(r, k)| ((r * 7 + k * 3) % 11) as f32 - 5.0);
//! let spec = FormatSpec::Uniform(UniformGrid::new(4, true).unwrap());
//! let q = quantize_rtn("w", w.view(), &spec, Granularity::Group(32)).unwrap();
//! let t = pack_gptq("layer.q_proj", &q, GptqFormat::V1).unwrap();
//! assert_eq!(t.qweight.dim(), (8, 32));
//! assert_eq!(t.qzeros[[0, 0]], 0x7777_7777); // symmetric zero 8 stored as 7
//! let back = t.dequantize("layer.q_proj", GptqFormat::V1).unwrap();
//! let reference = q.dequantize();
//! // equal up to the f16 rounding of the scales
//! assert!(back.iter().zip(reference.iter()).all(|(a, b)| (a - b).abs() <= 1e-3 * b.abs().max(1.0)));
//! ```

use super::{integer_in, pack_err, pack_lsb, pack_unit, unpack_lsb};
use crate::Result;
use half::f16;
use ndarray::Array2;
use quantlab_grids::{FormatSpec, Granularity, QuantizedLinear, UniformGrid};

/// Which zero-point convention the checkpoint uses (`checkpoint_format` in the config).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GptqFormat {
    /// `"gptq"`: zeros stored minus one (a real zero of 0 cannot be stored).
    V1,
    /// `"gptq_v2"`: raw zeros.
    V2,
}

impl GptqFormat {
    /// The `checkpoint_format` string of the config.
    pub fn checkpoint_format(self) -> &'static str {
        match self {
            GptqFormat::V1 => "gptq",
            GptqFormat::V2 => "gptq_v2",
        }
    }

    fn label(self) -> &'static str {
        match self {
            GptqFormat::V1 => "GPTQ v1",
            GptqFormat::V2 => "GPTQ v2",
        }
    }

    /// Offset added to the real zero before storing.
    fn stored_offset(self) -> i64 {
        match self {
            GptqFormat::V1 => -1,
            GptqFormat::V2 => 0,
        }
    }
}

/// The packed tensors of one GPTQ linear layer (see the module docs for the layout).
#[derive(Clone, Debug, PartialEq)]
pub struct GptqTensors {
    /// int32 `[in * b / 32, out]`.
    pub qweight: Array2<i32>,
    /// int32 `[G, out * b / 32]`.
    pub qzeros: Array2<i32>,
    /// f16 `[G, out]`.
    pub scales: Array2<f16>,
    /// int32 `[in]`.
    pub g_idx: Vec<i32>,
}

/// The sizes of a [`GptqTensors`], as inferred and checked by [`GptqTensors::layout`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GptqLayout {
    /// Input features.
    pub inp: usize,
    /// Output features.
    pub out: usize,
    /// Number of groups `G`.
    pub groups: usize,
    /// Bits per code.
    pub bits: u32,
}

const GPTQ_BITS: [u32; 4] = [2, 3, 4, 8];

/// Pack `q` (a uniform grid of 2, 3, 4 or 8 bits) into GPTQ tensors; `name` (the module or
/// tensor name) appears in errors.
///
/// Errors: a non-uniform format or other bits, `in` or `out` not a multiple of 32, a code
/// that does not fit, a zero point that is not an integer of the stored range (in v1 a real
/// zero of 0 underflows: use [`GptqFormat::V2`]), a scale that overflows f16, a bad `g_idx`.
pub fn pack_gptq(name: &str, q: &QuantizedLinear, format: GptqFormat) -> Result<GptqTensors> {
    let label = format.label();
    let grid = uniform_grid(name, &q.spec, label)?;
    let bits = grid.bits;
    if !GPTQ_BITS.contains(&bits) {
        return Err(pack_err(
            label,
            name,
            format!("{bits}-bit codes: GPTQ packs 2, 3, 4 or 8 bits"),
        ));
    }
    let (out, inp) = q.codes.dim();
    let groups = q.scales.ncols();
    if inp == 0 || out == 0 || inp % 32 != 0 || out % 32 != 0 {
        return Err(pack_err(
            label,
            name,
            format!("[out, in] = [{out}, {inp}]: both must be non-zero multiples of 32"),
        ));
    }
    if q.scales.dim() != (out, groups) || q.zeros.dim() != (out, groups) || groups == 0 {
        return Err(pack_err(
            label,
            name,
            format!(
                "scales {:?} and zeros {:?} must both be [out = {out}, G]",
                q.scales.dim(),
                q.zeros.dim()
            ),
        ));
    }
    check_g_idx(name, label, q.g_idx.iter().map(|&g| g as i64), inp, groups)?;
    let maxq = (1u32 << bits) - 1;
    if let Some(((r, k), &c)) = q.codes.indexed_iter().find(|(_, &c)| c as u32 > maxq) {
        return Err(pack_err(
            label,
            name,
            format!("code {c} at [{r}, {k}] does not fit in {bits} bits"),
        ));
    }
    // Zeros, as stored.
    let off = format.stored_offset();
    let (zlo, zhi) = (-off, maxq as i64 - off);
    let mut zstored = Array2::<u8>::zeros((groups, out));
    for ((n, g), &z) in q.zeros.indexed_iter() {
        let Some(zi) = integer_in(z, zlo, zhi) else {
            let hint = if format == GptqFormat::V1 && z == 0.0 {
                " (a real zero of 0 underflows v1's `zero - 1`: write checkpoint_format \"gptq_v2\")"
            } else {
                ""
            };
            return Err(pack_err(
                label,
                name,
                format!(
                    "zero point {z} of row {n}, group {g} is not an integer in {zlo}..={zhi}{hint}"
                ),
            ));
        };
        zstored[[g, n]] = (zi + off) as u8;
    }
    let scales = to_f16_transposed(name, label, &q.scales)?;

    let rows = inp * bits as usize / 32;
    let mut qweight = Array2::<i32>::zeros((rows, out));
    let mut column = vec![0u8; inp];
    for n in 0..out {
        for (k, c) in column.iter_mut().enumerate() {
            *c = q.codes[[n, k]];
        }
        for (r, w) in pack_lsb(&column, bits).into_iter().enumerate() {
            qweight[[r, n]] = w as i32;
        }
    }
    let zcols = out * bits as usize / 32;
    let mut qzeros = Array2::<i32>::zeros((groups, zcols));
    for g in 0..groups {
        let row: Vec<u8> = zstored.row(g).to_vec();
        for (c, w) in pack_lsb(&row, bits).into_iter().enumerate() {
            qzeros[[g, c]] = w as i32;
        }
    }
    Ok(GptqTensors {
        qweight,
        qzeros,
        scales,
        g_idx: q.g_idx.iter().map(|&g| g as i32).collect(),
    })
}

impl GptqTensors {
    /// Infer and check the sizes: `in = g_idx.len()`, `out = qweight.ncols()`,
    /// `b = 32 * qweight.nrows() / in`, `G = scales.nrows()`; every other shape must agree.
    pub fn layout(&self, name: &str) -> Result<GptqLayout> {
        let label = "GPTQ";
        let inp = self.g_idx.len();
        let (rows, out) = self.qweight.dim();
        let groups = self.scales.nrows();
        if inp == 0 || out == 0 || groups == 0 {
            return Err(pack_err(
                label,
                name,
                format!(
                    "empty tensors: g_idx has {inp} entries, qweight is {:?}, scales {:?}",
                    self.qweight.dim(),
                    self.scales.dim()
                ),
            ));
        }
        let bits = GPTQ_BITS
            .iter()
            .copied()
            .find(|&b| rows * 32 == inp * b as usize);
        let Some(bits) = bits else {
            return Err(pack_err(
                label,
                name,
                format!("qweight has {rows} rows for {inp} input features: not 2, 3, 4 or 8 bits"),
            ));
        };
        if inp % pack_unit(bits) != 0 || out % pack_unit(bits) != 0 {
            return Err(pack_err(
                label,
                name,
                format!(
                    "{bits}-bit packing needs in ({inp}) and out ({out}) to be multiples of {}",
                    pack_unit(bits)
                ),
            ));
        }
        let zcols = out * bits as usize / 32;
        if self.qzeros.dim() != (groups, zcols) || self.scales.dim() != (groups, out) {
            return Err(pack_err(
                label,
                name,
                format!(
                    "qzeros {:?} and scales {:?}: expected [{groups}, {zcols}] and [{groups}, {out}]",
                    self.qzeros.dim(),
                    self.scales.dim()
                ),
            ));
        }
        check_g_idx(
            name,
            label,
            self.g_idx.iter().map(|&g| g as i64),
            inp,
            groups,
        )?;
        Ok(GptqLayout {
            inp,
            out,
            groups,
            bits,
        })
    }

    /// The codes, `[out, in]` in the original column order.
    pub fn unpack_codes(&self, name: &str) -> Result<Array2<u8>> {
        let l = self.layout(name)?;
        let mut codes = Array2::<u8>::zeros((l.out, l.inp));
        let mut column = vec![0u32; self.qweight.nrows()];
        for n in 0..l.out {
            for (r, w) in column.iter_mut().enumerate() {
                *w = self.qweight[[r, n]] as u32;
            }
            for (k, c) in unpack_lsb(&column, l.bits, l.inp).into_iter().enumerate() {
                codes[[n, k]] = c;
            }
        }
        Ok(codes)
    }

    /// The real zero points, `[out, G]` (v1: stored value plus one; v2: as stored).
    pub fn unpack_zeros(&self, name: &str, format: GptqFormat) -> Result<Array2<f32>> {
        let l = self.layout(name)?;
        let mut zeros = Array2::<f32>::zeros((l.out, l.groups));
        let off = format.stored_offset();
        for g in 0..l.groups {
            let words: Vec<u32> = self.qzeros.row(g).iter().map(|&w| w as u32).collect();
            for (n, z) in unpack_lsb(&words, l.bits, l.out).into_iter().enumerate() {
                zeros[[n, g]] = (z as i64 - off) as f32;
            }
        }
        Ok(zeros)
    }

    /// The scales as f32, `[out, G]`.
    pub fn scales_f32(&self) -> Array2<f32> {
        self.scales.t().mapv(f32::from)
    }

    /// Back to a [`QuantizedLinear`] (scales are the f16 values widened to f32). The grid is
    /// uniform with the inferred bits and the given `sym`; the granularity is per channel
    /// for one group, else `Group(in / G)`.
    pub fn to_quantized(
        &self,
        name: &str,
        format: GptqFormat,
        sym: bool,
    ) -> Result<QuantizedLinear> {
        let l = self.layout(name)?;
        let granularity = if l.groups == 1 {
            Granularity::PerChannel
        } else if l.inp % l.groups == 0 {
            Granularity::Group(l.inp / l.groups)
        } else {
            return Err(pack_err(
                "GPTQ",
                name,
                format!("{} groups do not divide {} input features", l.groups, l.inp),
            ));
        };
        let grid = UniformGrid::new(l.bits, sym)?;
        Ok(QuantizedLinear::from_parts(
            FormatSpec::Uniform(grid),
            granularity,
            self.unpack_codes(name)?,
            self.scales_f32(),
            self.unpack_zeros(name, format)?,
            self.g_idx.iter().map(|&g| g as u32).collect(),
        )?)
    }

    /// The dequantized weight `[out, in]` (the transpose of the loaders' `W[k, n]`):
    /// `scales[g_idx[k], n] * (q[k, n] - zero[g_idx[k], n])` in f32, with
    /// `zero = qzeros + 1` in v1 and `qzeros` in v2.
    pub fn dequantize(&self, name: &str, format: GptqFormat) -> Result<Array2<f32>> {
        let l = self.layout(name)?;
        let codes = self.unpack_codes(name)?;
        let zeros = self.unpack_zeros(name, format)?;
        Ok(Array2::from_shape_fn((l.out, l.inp), |(n, k)| {
            let g = self.g_idx[k] as usize;
            f32::from(self.scales[[g, n]]) * (codes[[n, k]] as f32 - zeros[[n, g]])
        }))
    }
}

/// The uniform grid of a spec, or an error naming the tensor.
pub(crate) fn uniform_grid(name: &str, spec: &FormatSpec, label: &str) -> Result<UniformGrid> {
    #[allow(unreachable_patterns)]
    match spec {
        FormatSpec::Uniform(g) => Ok(*g),
        other => Err(pack_err(
            label,
            name,
            format!("format {other:?} is not a uniform integer grid"),
        )),
    }
}

/// `g_idx` must have `inp` entries, each in `0..groups`.
pub(crate) fn check_g_idx(
    name: &str,
    label: &str,
    g_idx: impl ExactSizeIterator<Item = i64>,
    inp: usize,
    groups: usize,
) -> Result<()> {
    if g_idx.len() != inp {
        return Err(pack_err(
            label,
            name,
            format!("g_idx has {} entries for {inp} input features", g_idx.len()),
        ));
    }
    for (k, g) in g_idx.enumerate() {
        if g < 0 || g as usize >= groups {
            return Err(pack_err(
                label,
                name,
                format!("g_idx[{k}] = {g} is not a group in 0..{groups}"),
            ));
        }
    }
    Ok(())
}

/// `[out, G]` f32 scales to `[G, out]` f16; finite values beyond f16's range are an error.
pub(crate) fn to_f16_transposed(
    name: &str,
    label: &str,
    scales: &Array2<f32>,
) -> Result<Array2<f16>> {
    let (out, groups) = scales.dim();
    let mut s16 = Array2::<f16>::from_elem((groups, out), f16::ZERO);
    for ((n, g), &s) in scales.indexed_iter() {
        let h = f16::from_f32(s);
        if !h.is_finite() {
            return Err(pack_err(
                label,
                name,
                format!("scale {s} of row {n}, group {g} is not representable in f16"),
            ));
        }
        s16[[g, n]] = h;
    }
    Ok(s16)
}
