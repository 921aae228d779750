//! AutoAWQ GEMM tensors (`WQLinear_GEMM`; transformers `quant_method: "awq"`, version
//! `"gemm"`), 4 bits.
//!
//! AWQ stores the weight TRANSPOSED relative to GPTQ and to [`QuantizedLinear`]: rows are
//! input features, and the packing runs along the OUTPUT dimension:
//!
//! * `qweight`: int32 `[in, out / 8]`; nibble `i` (bits `4i..4i+3`) of word `c` of row `k`
//!   holds the code of output column `8c + [0, 2, 4, 6, 1, 3, 5, 7][i]` (so the unpack order
//!   is `[0, 4, 1, 5, 2, 6, 3, 7]`).
//! * `qzeros`: int32 `[in / g, out / 8]`, the same interleave, RAW zeros (no minus one).
//! * `scales`: f16 `[in / g, out]`.
//!
//! Dequantization: `W[k, n] = (q[k, n] - z[k / g, n]) * s[k / g, n]`. There is no `g_idx`:
//! act-order layers (non-trivial `g_idx`) cannot be stored. Needs `in % g == 0` and
//! `out % 8 == 0`.
//!
//! ```
//! use ndarray::Array2;
//! use quantlab_checkpoints::pack::{pack_awq, AwqTensors};
//! use quantlab_grids::{quantize_rtn, FormatSpec, Granularity, UniformGrid};
//! let w = Array2::from_shape_fn((16, 64), |(r, k)| ((r * 5 + k) % 13) as f32 * 0.1 - 0.4);
//! let spec = FormatSpec::Uniform(UniformGrid::new(4, false).unwrap());
//! let q = quantize_rtn("w", w.view(), &spec, Granularity::Group(32)).unwrap();
//! let t = pack_awq("mlp.up_proj", &q).unwrap();
//! assert_eq!((t.qweight.dim(), t.scales.dim()), ((64, 2), (2, 16)));
//! let back = t.dequantize("mlp.up_proj").unwrap();
//! let reference = q.dequantize();
//! assert!(back.iter().zip(reference.iter()).all(|(a, b)| (a - b).abs() <= 1e-3));
//! ```

use super::gptq::{to_f16_transposed, uniform_grid};
use super::{integer_in, pack_err};
use crate::Result;
use half::f16;
use ndarray::Array2;
use quantlab_grids::{FormatSpec, Granularity, QuantizedLinear, UniformGrid};

/// Nibble `i` of a word holds column `8c + AWQ_ORDER[i]`.
pub const AWQ_ORDER: [usize; 8] = [0, 2, 4, 6, 1, 3, 5, 7];
/// Column `8c + j` sits in nibble `AWQ_REVERSE_ORDER[j]`.
pub const AWQ_REVERSE_ORDER: [usize; 8] = [0, 4, 1, 5, 2, 6, 3, 7];

const LABEL: &str = "AWQ GEMM";

/// The packed tensors of one AWQ GEMM linear layer (see the module docs).
#[derive(Clone, Debug, PartialEq)]
pub struct AwqTensors {
    /// int32 `[in, out / 8]`.
    pub qweight: Array2<i32>,
    /// int32 `[in / g, out / 8]`.
    pub qzeros: Array2<i32>,
    /// f16 `[in / g, out]`.
    pub scales: Array2<f16>,
}

/// Pack 8 codes of output columns `8c..8c+8` into one interleaved word.
pub fn awq_pack_word(codes: &[u8; 8]) -> u32 {
    AWQ_ORDER
        .iter()
        .enumerate()
        .fold(0u32, |w, (i, &j)| w | ((codes[j] as u32 & 0xF) << (4 * i)))
}

/// The 8 codes of one interleaved word, in column order.
pub fn awq_unpack_word(word: u32) -> [u8; 8] {
    let mut codes = [0u8; 8];
    for (i, &j) in AWQ_ORDER.iter().enumerate() {
        codes[j] = ((word >> (4 * i)) & 0xF) as u8;
    }
    codes
}

/// Pack `q` (a 4-bit uniform grid, trivial `g_idx`) into AWQ GEMM tensors; `name` appears in
/// errors.
pub fn pack_awq(name: &str, q: &QuantizedLinear) -> Result<AwqTensors> {
    let grid = uniform_grid(name, &q.spec, LABEL)?;
    if grid.bits != 4 {
        return Err(pack_err(
            LABEL,
            name,
            format!("{}-bit codes: AWQ GEMM stores 4 bits", grid.bits),
        ));
    }
    let (out, inp) = q.codes.dim();
    let groups = q.scales.ncols();
    if q.scales.dim() != (out, groups) || q.zeros.dim() != (out, groups) || groups == 0 {
        return Err(pack_err(
            LABEL,
            name,
            format!(
                "scales {:?} and zeros {:?} must both be [out = {out}, G]",
                q.scales.dim(),
                q.zeros.dim()
            ),
        ));
    }
    if inp == 0 || out == 0 || out % 8 != 0 || inp % groups != 0 {
        return Err(pack_err(
            LABEL,
            name,
            format!(
                "[out, in] = [{out}, {inp}] with {groups} groups: needs out % 8 == 0 and in % groups == 0"
            ),
        ));
    }
    let g = inp / groups;
    if q.g_idx.len() != inp
        || q.g_idx
            .iter()
            .enumerate()
            .any(|(k, &gi)| gi as usize != k / g)
    {
        return Err(pack_err(
            LABEL,
            name,
            format!("g_idx is not k / {g}: AWQ has no act-order (g_idx) tensor"),
        ));
    }
    if let Some(((r, k), &c)) = q.codes.indexed_iter().find(|(_, &c)| c > 15) {
        return Err(pack_err(
            LABEL,
            name,
            format!("code {c} at [{r}, {k}] does not fit in 4 bits"),
        ));
    }
    let mut zeros = Array2::<u8>::zeros((out, groups));
    for ((n, gi), &z) in q.zeros.indexed_iter() {
        let Some(zi) = integer_in(z, 0, 15) else {
            return Err(pack_err(
                LABEL,
                name,
                format!("zero point {z} of row {n}, group {gi} is not an integer in 0..=15"),
            ));
        };
        zeros[[n, gi]] = zi as u8;
    }
    let scales = to_f16_transposed(name, LABEL, &q.scales)?;
    let words = out / 8;
    let qweight = Array2::from_shape_fn((inp, words), |(k, c)| {
        let codes: [u8; 8] = std::array::from_fn(|j| q.codes[[8 * c + j, k]]);
        awq_pack_word(&codes) as i32
    });
    let qzeros = Array2::from_shape_fn((groups, words), |(gi, c)| {
        let z: [u8; 8] = std::array::from_fn(|j| zeros[[8 * c + j, gi]]);
        awq_pack_word(&z) as i32
    });
    Ok(AwqTensors {
        qweight,
        qzeros,
        scales,
    })
}

/// Sizes of an [`AwqTensors`]: `(in, out, groups)`, checked.
fn layout(t: &AwqTensors, name: &str) -> Result<(usize, usize, usize)> {
    let (inp, words) = t.qweight.dim();
    let (groups, out) = t.scales.dim();
    if inp == 0 || groups == 0 || out != 8 * words || inp % groups != 0 {
        return Err(pack_err(
            LABEL,
            name,
            format!(
                "qweight {:?} and scales {:?}: need scales [in / g, 8 * qweight columns] with g dividing in",
                t.qweight.dim(),
                t.scales.dim()
            ),
        ));
    }
    if t.qzeros.dim() != (groups, words) {
        return Err(pack_err(
            LABEL,
            name,
            format!("qzeros {:?}: expected [{groups}, {words}]", t.qzeros.dim()),
        ));
    }
    Ok((inp, out, groups))
}

impl AwqTensors {
    /// The group size `g = in / G`.
    pub fn group_size(&self) -> usize {
        self.qweight.nrows() / self.scales.nrows().max(1)
    }

    /// The codes, `[out, in]` (our orientation).
    pub fn unpack_codes(&self, name: &str) -> Result<Array2<u8>> {
        let (inp, out, _) = layout(self, name)?;
        let mut codes = Array2::<u8>::zeros((out, inp));
        for ((k, c), &w) in self.qweight.indexed_iter() {
            for (j, v) in awq_unpack_word(w as u32).into_iter().enumerate() {
                codes[[8 * c + j, k]] = v;
            }
        }
        Ok(codes)
    }

    /// The raw zeros, `[out, G]`.
    pub fn unpack_zeros(&self, name: &str) -> Result<Array2<f32>> {
        let (_, out, groups) = layout(self, name)?;
        let mut zeros = Array2::<f32>::zeros((out, groups));
        for ((g, c), &w) in self.qzeros.indexed_iter() {
            for (j, v) in awq_unpack_word(w as u32).into_iter().enumerate() {
                zeros[[8 * c + j, g]] = v as f32;
            }
        }
        Ok(zeros)
    }

    /// Back to a [`QuantizedLinear`] with a 4-bit grid (`sym` as given), f16 scales widened.
    pub fn to_quantized(&self, name: &str, sym: bool) -> Result<QuantizedLinear> {
        let (inp, _, groups) = layout(self, name)?;
        let granularity = if groups == 1 {
            Granularity::PerChannel
        } else {
            Granularity::Group(inp / groups)
        };
        let g = inp / groups;
        Ok(QuantizedLinear::from_parts(
            FormatSpec::Uniform(UniformGrid::new(4, sym)?),
            granularity,
            self.unpack_codes(name)?,
            self.scales.t().mapv(f32::from),
            self.unpack_zeros(name)?,
            (0..inp).map(|k| (k / g) as u32).collect(),
        )?)
    }

    /// The dequantized weight `[out, in]` (the transpose of AWQ's `[in, out]`):
    /// `(q - z) * s` in f32.
    pub fn dequantize(&self, name: &str) -> Result<Array2<f32>> {
        let (inp, out, groups) = layout(self, name)?;
        let g = inp / groups;
        let codes = self.unpack_codes(name)?;
        let zeros = self.unpack_zeros(name)?;
        Ok(Array2::from_shape_fn((out, inp), |(n, k)| {
            (codes[[n, k]] as f32 - zeros[[n, k / g]]) * f32::from(self.scales[[k / g, n]])
        }))
    }
}
