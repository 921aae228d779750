//! bitsandbytes tensors as transformers serializes `Linear4bit` (NF4 / FP4, optionally with
//! double quantization) and `Linear8bitLt` (LLM.int8).
//!
//! 4-bit (`quant_type` `nf4` or `fp4`):
//! * the `[out, in]` weight is flattened row-major and cut into blocks of `blocksize`
//!   (bitsandbytes: 64) contiguous values, the last one possibly shorter; each block keeps
//!   its f32 absmax, each value the code nearest to `clamp(x / absmax, -1, 1)`
//!   ([`quantlab_grids::codebook`]);
//! * two codes per byte, the FIRST element in the HIGH nibble, stored as uint8
//!   `[ceil(n / 2), 1]`;
//! * keys under the module prefix `p`: `p.weight`, `p.weight.absmax` (f32 `[blocks]`, or u8
//!   codes with double quantization), `p.weight.quant_map` (f32 `[16]`), with double
//!   quantization `p.weight.nested_absmax` (f32) and `p.weight.nested_quant_map`
//!   (f32 `[256]`), and `p.weight.quant_state.bitsandbytes__<quant_type>`: the uint8 bytes
//!   of a JSON object with `quant_type`, `blocksize`, `dtype`, `shape` and, nested,
//!   `nested_blocksize`, `nested_dtype`, `nested_offset`;
//! * double quantization ([`quantlab_grids::double_quant`]): `offset = mean(absmax)`,
//!   `absmax - offset` quantized in blocks of 256 with the signed 8-bit dynamic map;
//!   `absmax_i = nested_quant_map[code_i] * nested_absmax[i / 256] + offset`.
//!
//! LLM.int8: `p.weight` int8 `[out, in]` and `p.SCB` f32 `[out]` (row absmax),
//! `q = round(x * 127 / SCB)`; dequantization `q * (SCB / 127)`.
//!
//! ```
//! use ndarray::array;
//! use quantlab_checkpoints::pack::bnb::{quantize_bnb4, Bnb4Type};
//! let w = array![[1.0f32, -1.0, 0.0, 0.5]];
//! let t = quantize_bnb4("lin", w.view(), Bnb4Type::Nf4, 64, None, "float16").unwrap();
//! // NF4 codes 15, 0, 7, 12; the first element goes to the high nibble
//! assert_eq!(t.weight, vec![0xF0, 0x7C]);
//! let back = t.dequantize();
//! assert!((back[[0, 3]] - 0.44070982933044434).abs() < 1e-7);
//! ```

use super::pack_err;
use crate::Result;
use ndarray::{Array2, ArrayView2};
use quantlab_grids::codebook::{dequantize_blockwise, quantize_blockwise, Codebook};
use quantlab_grids::double_quant::{dynamic_map_8bit, DoubleQuant, NestedScales};
use quantlab_grids::int8::int8_rowwise;
use quantlab_grids::{FormatSpec, Granularity, QuantizedLinear};
use serde::{Deserialize, Serialize};

/// The 4-bit code of bitsandbytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Bnb4Type {
    /// NormalFloat4.
    Nf4,
    /// bitsandbytes' FP4.
    Fp4,
}

impl Bnb4Type {
    /// `"nf4"` or `"fp4"`.
    pub fn name(self) -> &'static str {
        match self {
            Bnb4Type::Nf4 => "nf4",
            Bnb4Type::Fp4 => "fp4",
        }
    }
    /// The codebook.
    pub fn codebook(self) -> Codebook {
        match self {
            Bnb4Type::Nf4 => Codebook::nf4(),
            Bnb4Type::Fp4 => Codebook::fp4(),
        }
    }
}

/// The per-block absmax, plain or double-quantized.
#[derive(Clone, Debug, PartialEq)]
pub enum Bnb4Absmax {
    /// f32 per block (`weight.absmax` f32).
    Plain(Vec<f32>),
    /// Double quantization: `weight.absmax` holds the u8 codes.
    Nested(NestedScales),
}

/// The tensors of one bitsandbytes 4-bit linear weight.
#[derive(Clone, Debug, PartialEq)]
pub struct Bnb4Tensors {
    /// Packed codes, `ceil(n / 2)` bytes (stored as uint8 `[ceil(n / 2), 1]`), first element
    /// of each pair in the high nibble.
    pub weight: Vec<u8>,
    /// `[out, in]` of the original weight.
    pub shape: [usize; 2],
    /// NF4 or FP4.
    pub quant_type: Bnb4Type,
    /// Values per absmax block (bitsandbytes: 64).
    pub blocksize: usize,
    /// The absmax of every block.
    pub absmax: Bnb4Absmax,
    /// The 16 code values (`weight.quant_map`).
    pub quant_map: Vec<f32>,
    /// torch dtype name of the original weight for the JSON (`"float16"`, `"bfloat16"`,
    /// `"float32"`).
    pub dtype: String,
}

/// The JSON of `weight.quant_state.bitsandbytes__<quant_type>`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct QuantStateJson {
    /// `"nf4"` or `"fp4"`.
    pub quant_type: String,
    /// Values per absmax block.
    pub blocksize: usize,
    /// torch dtype of the original weight.
    pub dtype: String,
    /// `[out, in]`.
    pub shape: Vec<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    /// Absmax values per nested block (double quantization only).
    pub nested_blocksize: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    /// `"float32"` (double quantization only).
    pub nested_dtype: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    /// Mean absmax subtracted before nesting (double quantization only).
    pub nested_offset: Option<f64>,
}

/// Element type of a [`RawTensor`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RawDtype {
    /// uint8.
    U8,
    /// int8.
    I8,
    /// float32, little-endian.
    F32,
}

/// A named tensor as little-endian bytes, ready for a safetensors writer.
#[derive(Clone, Debug, PartialEq)]
pub struct RawTensor {
    /// Element type.
    pub dtype: RawDtype,
    /// Dimensions.
    pub shape: Vec<usize>,
    /// Little-endian bytes, row-major.
    pub data: Vec<u8>,
}

fn f32_tensor(v: &[f32]) -> RawTensor {
    RawTensor {
        dtype: RawDtype::F32,
        shape: vec![v.len()],
        data: v.iter().flat_map(|x| x.to_le_bytes()).collect(),
    }
}

/// Two 4-bit codes per byte, the first in the HIGH nibble; an odd count pads the last low
/// nibble with 0.
///
/// ```
/// use quantlab_checkpoints::pack::bnb::{pack_nibbles_high_first, unpack_nibbles_high_first};
/// assert_eq!(pack_nibbles_high_first(&[1, 2, 3]), vec![0x12, 0x30]);
/// assert_eq!(unpack_nibbles_high_first(&[0x12, 0x30], 3), vec![1, 2, 3]);
/// ```
pub fn pack_nibbles_high_first(codes: &[u8]) -> Vec<u8> {
    codes
        .chunks(2)
        .map(|p| (p[0] & 0xF) << 4 | p.get(1).map_or(0, |c| c & 0xF))
        .collect()
}

/// The first `n` codes of [`pack_nibbles_high_first`]'s bytes.
#[track_caller]
pub fn unpack_nibbles_high_first(bytes: &[u8], n: usize) -> Vec<u8> {
    assert!(
        bytes.len() * 2 >= n,
        "{} bytes hold fewer than {n} codes",
        bytes.len()
    );
    (0..n)
        .map(|i| {
            let b = bytes[i / 2];
            if i % 2 == 0 {
                b >> 4
            } else {
                b & 0xF
            }
        })
        .collect()
}

const DTYPES: [&str; 3] = ["float16", "bfloat16", "float32"];

/// Quantize an `[out, in]` weight to bitsandbytes 4-bit; `double_quant` adds the nested
/// quantization of the absmax; `dtype` is the torch dtype name recorded in the JSON.
pub fn quantize_bnb4(
    name: &str,
    w: ArrayView2<f32>,
    quant_type: Bnb4Type,
    blocksize: usize,
    double_quant: Option<DoubleQuant>,
    dtype: &str,
) -> Result<Bnb4Tensors> {
    let label = format!("bitsandbytes {}", quant_type.name());
    if blocksize == 0 {
        return Err(pack_err(
            &label,
            name,
            "block size 0 (bitsandbytes uses 64)",
        ));
    }
    if !DTYPES.contains(&dtype) {
        return Err(pack_err(
            &label,
            name,
            format!("dtype {dtype:?}: use one of {DTYPES:?}"),
        ));
    }
    let flat: Vec<f32> = w.iter().copied().collect();
    if flat.is_empty() {
        return Err(pack_err(&label, name, "empty weight"));
    }
    if let Some(i) = flat.iter().position(|v| !v.is_finite()) {
        return Err(pack_err(
            &label,
            name,
            format!("non-finite value {} at flat index {i}", flat[i]),
        ));
    }
    let code = quant_type.codebook();
    let (codes, absmax) = quantize_blockwise(&flat, &code, blocksize);
    let absmax = match double_quant {
        None => Bnb4Absmax::Plain(absmax),
        Some(dq) => Bnb4Absmax::Nested(dq.quantize_absmax(&absmax)?),
    };
    Ok(Bnb4Tensors {
        weight: pack_nibbles_high_first(&codes),
        shape: [w.nrows(), w.ncols()],
        quant_type,
        blocksize,
        absmax,
        quant_map: code.values().to_vec(),
        dtype: dtype.to_string(),
    })
}

/// Pack a [`QuantizedLinear`] of NF4 / FP4 codes whose groups are bitsandbytes' blocks:
/// `Granularity::Group(b)` with `b` dividing `in` (or per channel, `b = in`), trivial
/// `g_idx`, zero points 0. Its scales (row-major) are the blocks' absmax.
pub fn pack_bnb4(
    name: &str,
    q: &QuantizedLinear,
    double_quant: Option<DoubleQuant>,
    dtype: &str,
) -> Result<Bnb4Tensors> {
    let quant_type = match q.spec {
        FormatSpec::Nf4 => Bnb4Type::Nf4,
        FormatSpec::Fp4 => Bnb4Type::Fp4,
        ref other => {
            return Err(pack_err(
                "bitsandbytes 4-bit",
                name,
                format!("format {other:?} is neither NF4 nor FP4"),
            ))
        }
    };
    let label = format!("bitsandbytes {}", quant_type.name());
    let (out, inp) = q.codes.dim();
    let blocksize = match q.granularity {
        Granularity::Group(b) if b > 0 && inp % b == 0 => b,
        Granularity::PerChannel => inp,
        g => {
            return Err(pack_err(
                &label,
                name,
                format!("granularity {g:?}: bitsandbytes blocks are groups dividing in = {inp}"),
            ))
        }
    };
    if q.scales.dim() != (out, inp / blocksize)
        || q.g_idx
            .iter()
            .enumerate()
            .any(|(k, &g)| g as usize != k / blocksize)
        || q.zeros.iter().any(|&z| z != 0.0)
    {
        return Err(pack_err(
            &label,
            name,
            "needs one absmax per block, trivial g_idx and zero points 0",
        ));
    }
    if !DTYPES.contains(&dtype) {
        return Err(pack_err(
            &label,
            name,
            format!("dtype {dtype:?}: use one of {DTYPES:?}"),
        ));
    }
    if let Some(c) = q.codes.iter().find(|&&c| c > 15) {
        return Err(pack_err(
            &label,
            name,
            format!("code {c} does not fit in 4 bits"),
        ));
    }
    let codes: Vec<u8> = q.codes.iter().copied().collect();
    let absmax: Vec<f32> = q.scales.iter().copied().collect();
    let absmax = match double_quant {
        None => Bnb4Absmax::Plain(absmax),
        Some(dq) => Bnb4Absmax::Nested(dq.quantize_absmax(&absmax)?),
    };
    Ok(Bnb4Tensors {
        weight: pack_nibbles_high_first(&codes),
        shape: [out, inp],
        quant_type,
        blocksize,
        absmax,
        quant_map: quant_type.codebook().values().to_vec(),
        dtype: dtype.to_string(),
    })
}

impl Bnb4Tensors {
    /// Number of weights.
    pub fn numel(&self) -> usize {
        self.shape[0] * self.shape[1]
    }

    /// The unpacked codes, row-major.
    pub fn codes(&self) -> Vec<u8> {
        unpack_nibbles_high_first(&self.weight, self.numel())
    }

    /// The absmax of every block (reconstructed when double-quantized).
    pub fn absmax_f32(&self) -> Vec<f32> {
        match &self.absmax {
            Bnb4Absmax::Plain(a) => a.clone(),
            Bnb4Absmax::Nested(n) => n.dequantize(),
        }
    }

    /// The dequantized `[out, in]` weight: `quant_map[code] * absmax[i / blocksize]`.
    pub fn dequantize(&self) -> Array2<f32> {
        let code =
            Codebook::new("quant_map", &self.quant_map).expect("quant_map values lie in [-1, 1]");
        let y = dequantize_blockwise(&self.codes(), &self.absmax_f32(), &code, self.blocksize);
        Array2::from_shape_vec((self.shape[0], self.shape[1]), y).expect("shape")
    }

    /// The quant-state JSON.
    pub fn quant_state(&self) -> QuantStateJson {
        let nested = match &self.absmax {
            Bnb4Absmax::Nested(n) => Some(n),
            Bnb4Absmax::Plain(_) => None,
        };
        QuantStateJson {
            quant_type: self.quant_type.name().into(),
            blocksize: self.blocksize,
            dtype: self.dtype.clone(),
            shape: self.shape.to_vec(),
            nested_blocksize: nested.map(|n| n.blocksize),
            nested_dtype: nested.map(|_| "float32".to_string()),
            nested_offset: nested.map(|n| n.offset as f64),
        }
    }

    /// The uint8 bytes of `weight.quant_state.bitsandbytes__<quant_type>` (JSON, keys in
    /// bitsandbytes' order).
    pub fn quant_state_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(&self.quant_state()).expect("plain JSON")
    }

    /// Every tensor of the module, keyed as transformers saves them under `prefix` (e.g.
    /// `model.layers.0.mlp.up_proj`).
    pub fn tensors(&self, prefix: &str) -> Vec<(String, RawTensor)> {
        let mut v = vec![(
            format!("{prefix}.weight"),
            RawTensor {
                dtype: RawDtype::U8,
                shape: vec![self.weight.len(), 1],
                data: self.weight.clone(),
            },
        )];
        match &self.absmax {
            Bnb4Absmax::Plain(a) => v.push((format!("{prefix}.weight.absmax"), f32_tensor(a))),
            Bnb4Absmax::Nested(n) => {
                v.push((
                    format!("{prefix}.weight.absmax"),
                    RawTensor {
                        dtype: RawDtype::U8,
                        shape: vec![n.codes.len()],
                        data: n.codes.clone(),
                    },
                ));
                v.push((
                    format!("{prefix}.weight.nested_absmax"),
                    f32_tensor(&n.nested_absmax),
                ));
                v.push((
                    format!("{prefix}.weight.nested_quant_map"),
                    f32_tensor(&dynamic_map_8bit(true)),
                ));
            }
        }
        v.push((
            format!("{prefix}.weight.quant_map"),
            f32_tensor(&self.quant_map),
        ));
        let json = self.quant_state_bytes();
        v.push((
            format!(
                "{prefix}.weight.quant_state.bitsandbytes__{}",
                self.quant_type.name()
            ),
            RawTensor {
                dtype: RawDtype::U8,
                shape: vec![json.len()],
                data: json,
            },
        ));
        v
    }
}

/// Parse the bytes of a `quant_state.bitsandbytes__*` tensor; `name` appears in errors.
pub fn parse_quant_state(name: &str, bytes: &[u8]) -> Result<QuantStateJson> {
    serde_json::from_slice(bytes).map_err(|e| {
        pack_err(
            "bitsandbytes quant_state",
            name,
            format!("not the expected JSON: {e}"),
        )
    })
}

/// LLM.int8 tensors: `weight` int8 `[out, in]` and `SCB` f32 `[out]`.
#[derive(Clone, Debug, PartialEq)]
pub struct Int8Tensors {
    /// int8 codes `[out, in]`.
    pub weight: Array2<i8>,
    /// Row absmax.
    pub scb: Vec<f32>,
}

/// Row-wise absmax int8 of an `[out, in]` weight (non-finite values are an error).
pub fn quantize_int8(name: &str, w: ArrayView2<f32>) -> Result<Int8Tensors> {
    if let Some((i, v)) = w.iter().enumerate().find(|(_, v)| !v.is_finite()) {
        return Err(pack_err(
            "LLM.int8",
            name,
            format!("non-finite value {v} at flat index {i}"),
        ));
    }
    let (weight, scb) = int8_rowwise(w);
    Ok(Int8Tensors { weight, scb })
}

/// Pack a [`QuantizedLinear`] of LLM.int8 codes (`FormatSpec::Int8`, per channel): the codes
/// are the bit patterns of the i8 values, the scales the `SCB`.
pub fn pack_int8(name: &str, q: &QuantizedLinear) -> Result<Int8Tensors> {
    let (out, _) = q.codes.dim();
    if q.spec != FormatSpec::Int8 || q.granularity != Granularity::PerChannel {
        return Err(pack_err(
            "LLM.int8",
            name,
            format!(
                "format {:?} with {:?}: needs FormatSpec::Int8 per channel",
                q.spec, q.granularity
            ),
        ));
    }
    if q.scales.dim() != (out, 1) {
        return Err(pack_err(
            "LLM.int8",
            name,
            format!("scales {:?}: needs one SCB per row", q.scales.dim()),
        ));
    }
    Ok(Int8Tensors {
        weight: q.codes.mapv(|c| c as i8),
        scb: q.scales.column(0).to_vec(),
    })
}

impl Int8Tensors {
    /// `q * (SCB / 127)`, `[out, in]`.
    pub fn dequantize(&self) -> Array2<f32> {
        Array2::from_shape_fn(self.weight.dim(), |(r, k)| {
            self.weight[[r, k]] as f32 * (self.scb[r] / 127.0)
        })
    }

    /// `prefix.weight` and `prefix.SCB`.
    pub fn tensors(&self, prefix: &str) -> Vec<(String, RawTensor)> {
        vec![
            (
                format!("{prefix}.weight"),
                RawTensor {
                    dtype: RawDtype::I8,
                    shape: self.weight.shape().to_vec(),
                    data: self.weight.iter().map(|&q| q as u8).collect(),
                },
            ),
            (format!("{prefix}.SCB"), f32_tensor(&self.scb)),
        ]
    }
}
