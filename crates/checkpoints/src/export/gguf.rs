//! A GGUF v3 writer, and the bridge from quantized linears to ggml block bytes.
//!
//! * [`write_gguf`] writes a complete file: the metadata of a source GGUF (architecture,
//!   hyper-parameters, `tokenizer.ggml.*`, chat template, ...) with `general.file_type` and
//!   `general.quantization_version` set, the given tensors under GGUF names
//!   (`blk.N.attn_q.weight`, `token_embd.weight`, ... mapped from Hugging Face names by
//!   [`hf_to_gguf_name`]), and every source tensor not given copied byte for byte.
//!   [`write_gguf_metadata`] is the same without a source file.
//! * Layout: little-endian; magic `GGUF`, version 3, tensor count, metadata count, the
//!   metadata pairs, the tensor infos (`ne[0]` = the innermost dimension first, so an HF
//!   `[out, in]` weight has dims `[in, out]`), padding to 32 bytes, the tensor data, each
//!   tensor starting at a multiple of 32 (`general.alignment` is not written: 32 is the
//!   default). The file is written to a temporary sibling and renamed.
//! * llama's q/k permutation: the `models` crate undoes llama.cpp's converter permutation
//!   when it loads a GGUF of architecture `llama` (GGUF row `2i + j` of a head is HF row
//!   `j * hd / 2 + i`, `hd` the head dimension). Tensors given here in HF order under HF names
//!   (`...self_attn.q_proj.weight` / `k_proj`, weights or biases) get the forward permutation
//!   [`permute_qk_rows`] with `{arch}.attention.head_count` (`head_count_kv` for k) heads:
//!   HF row `h hd + j hd / 2 + i` goes to GGUF row `h hd + 2 i + j`. Whole rows move, so it
//!   works for quantized bytes too (blocks run along rows). Tensors given under GGUF names
//!   are written as they are.
//! * [`blocks_from_quantized`]: a [`QuantizedLinear`] on [`quantlab_grids::GgmlGrid`] with
//!   groups of 32 maps one to one onto ggml blocks (codes, f16 `d` and `m`; on a K grid or
//!   IQ4_XS each 256-column super-block onto one block, its `d` and sub-block integers
//!   recovered from the groups' parameters): the bytes decode to exactly
//!   [`QuantizedLinear::dequantize`].
//!
//! ```
//! use ndarray::Array2;
//! use quantlab_checkpoints::export::gguf::{blocks_from_quantized, quantize_tensor};
//! use quantlab_checkpoints::gguf::GgmlType;
//! use quantlab_checkpoints::pack::gguf_blocks;
//! use quantlab_grids::{quantize_rtn, FormatSpec, GgmlGrid, Granularity};
//! let w = Array2::from_shape_fn((2, 64), |(r, k)| ((r * 64 + k) as f32 * 0.37).sin());
//! let q = quantize_rtn("w", w.view(), &FormatSpec::Ggml(GgmlGrid::Q4_0), Granularity::Group(32)).unwrap();
//! let bytes = blocks_from_quantized("w", &q, GgmlType::Q4_0).unwrap();
//! assert_eq!(bytes.len(), 4 * 18); // 4 blocks of 18 bytes
//! let back = gguf_blocks::dequantize("w", GgmlType::Q4_0, &bytes).unwrap();
//! assert_eq!(back, q.dequantize().iter().copied().collect::<Vec<_>>());
//! // RTN of the dense tensor is ggml's reference quantizer: within half a step
//! let t = quantize_tensor("w", w.view(), GgmlType::Q8_0).unwrap();
//! let y = gguf_blocks::dequantize("w", GgmlType::Q8_0, &t.bytes).unwrap();
//! assert!(w.iter().zip(&y).all(|(a, b)| (a - b).abs() < 0.005));
//! ```

use super::{invalid, io_at, write_atomic};
use crate::gguf::{GgmlType, GgufArray, GgufFile, GgufValue};
use crate::pack::gguf_blocks::{
    self, to_bytes, BlockIQ4_NL, BlockQ4_0, BlockQ4_1, BlockQ5_0, BlockQ5_1, BlockQ8_0,
};
use crate::pack::pack_err;
use crate::{CheckpointError, Result};
use half::{bf16, f16};
use ndarray::ArrayView2;
use quantlab_grids::ggml_k::{KSuperParams, QK_K};
use quantlab_grids::{FormatSpec, GgmlGrid, Granularity, GroupParams, QuantizedLinear};
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

/// Alignment of the data section and of every tensor.
pub const ALIGNMENT: usize = 32;

/// One tensor to write: its ggml type, its shape in Hugging Face (row-major) order, e.g.
/// `[out, in]`, and its data bytes in that order (rows of whole blocks for block types).
#[derive(Clone, Debug, PartialEq)]
pub struct GgufTensor {
    /// Storage type.
    pub ty: GgmlType,
    /// Row-major shape, outermost first (`[out, in]` for a linear weight, `[n]` for a norm).
    pub shape: Vec<usize>,
    /// The data: `n / block_size * type_size` bytes.
    pub bytes: Vec<u8>,
}

impl GgufTensor {
    /// An F32 tensor.
    #[track_caller]
    pub fn f32(shape: &[usize], data: &[f32]) -> Self {
        assert_eq!(
            shape.iter().product::<usize>(),
            data.len(),
            "shape and data"
        );
        Self {
            ty: GgmlType::F32,
            shape: shape.to_vec(),
            bytes: data.iter().flat_map(|v| v.to_le_bytes()).collect(),
        }
    }

    /// An F16 tensor (values rounded to nearest even).
    #[track_caller]
    pub fn f16(shape: &[usize], data: &[f32]) -> Self {
        assert_eq!(
            shape.iter().product::<usize>(),
            data.len(),
            "shape and data"
        );
        Self {
            ty: GgmlType::F16,
            shape: shape.to_vec(),
            bytes: data
                .iter()
                .flat_map(|&v| f16::from_f32(v).to_le_bytes())
                .collect(),
        }
    }

    /// The ggml block bytes of a [`QuantizedLinear`] on a [`GgmlGrid`] with its groups (32,
    /// or the sub-blocks of a super-block grid such as IQ4_XS: see
    /// [`blocks_from_quantized`]); shape `[out, in]`.
    pub fn from_quantized(name: &str, q: &QuantizedLinear) -> Result<Self> {
        let ty = match q.spec {
            FormatSpec::Ggml(g) => grid_type(g),
            ref other => {
                return Err(pack_err(
                    "GGUF",
                    name,
                    format!("format {other:?} is not a ggml block grid (use FormatSpec::Ggml)"),
                ))
            }
        };
        let (out, inp) = q.shape();
        Ok(Self {
            ty,
            shape: vec![out, inp],
            bytes: blocks_from_quantized(name, q, ty)?,
        })
    }

    /// Number of elements.
    pub fn n_elements(&self) -> usize {
        self.shape.iter().product()
    }
}

/// The ggml type of a grid.
pub fn grid_type(g: GgmlGrid) -> GgmlType {
    match g {
        GgmlGrid::Q4_0 => GgmlType::Q4_0,
        GgmlGrid::Q4_1 => GgmlType::Q4_1,
        GgmlGrid::Q5_0 => GgmlType::Q5_0,
        GgmlGrid::Q5_1 => GgmlType::Q5_1,
        GgmlGrid::Q8_0 => GgmlType::Q8_0,
        GgmlGrid::Q2_K => GgmlType::Q2_K,
        GgmlGrid::Q3_K => GgmlType::Q3_K,
        GgmlGrid::Q4_K => GgmlType::Q4_K,
        GgmlGrid::Q5_K => GgmlType::Q5_K,
        GgmlGrid::Q6_K => GgmlType::Q6_K,
        GgmlGrid::IQ4_NL => GgmlType::IQ4_NL,
        GgmlGrid::IQ4_XS => GgmlType::IQ4_XS,
    }
}

fn exact_f16(name: &str, label: &str, what: &str, v: f32) -> Result<f16> {
    let h = f16::from_f32(v);
    if h.to_f32().to_bits() != v.to_bits() && !(v == 0.0 && h.to_f32() == 0.0) {
        return Err(pack_err(
            label,
            name,
            format!("{what} {v} is not exactly representable in f16 (fit with GgmlGrid)"),
        ));
    }
    Ok(h)
}

/// The exact ggml block bytes of `q` (a [`QuantizedLinear`] on [`GgmlGrid`] `ty`, groups of
/// 32 along each row, trivial `g_idx`): block `(r, b)` holds the codes of row `r`, columns
/// `32 b .. 32 b + 32`, with `d = scales[[r, b]]` (and `m = zeros[[r, b]]` for Q4_1 / Q5_1)
/// stored as f16. The bytes dequantize (ggml, the `gguf` package, [`gguf_blocks`]) to
/// exactly `q.dequantize()`.
///
/// On the super-block grids ([`GgmlGrid::K`]: the K-quants and IQ4_XS) each 256-column
/// super-block of a row is one block whose f16 `d` (and `dmin`) and sub-block integers
/// reproduce the groups' parameters exactly ([`KSuperParams::factor`]).
///
/// Errors name `name`: another format or type, a granularity other than `Group(32)` (the
/// sub-block length on the super-block grids), an act-order `g_idx`, a scale or minimum that
/// is not an exact f16 value (not one f16 times integers per super-block).
pub fn blocks_from_quantized(name: &str, q: &QuantizedLinear, ty: GgmlType) -> Result<Vec<u8>> {
    let label = format!("GGUF {}", ty.name());
    let grid = match q.spec {
        FormatSpec::Ggml(g) if grid_type(g) == ty => g,
        ref other => {
            return Err(pack_err(
                &label,
                name,
                format!("format {other:?} does not match the type {ty} (use FormatSpec::Ggml)"),
            ))
        }
    };
    let (out, inp) = q.shape();
    if grid.is_k() {
        return k_blocks_from_quantized(name, &label, q, grid);
    }
    if q.granularity != Granularity::Group(32) || inp % 32 != 0 {
        return Err(pack_err(
            &label,
            name,
            format!(
                "granularity {:?} with {inp} columns: ggml blocks need Group(32) and a multiple of 32 columns",
                q.granularity
            ),
        ));
    }
    if q.g_idx
        .iter()
        .enumerate()
        .any(|(k, &g)| g as usize != k / 32)
    {
        return Err(pack_err(
            &label,
            name,
            "act-order g_idx: ggml blocks are consecutive runs of 32 columns (use static groups)",
        ));
    }
    let nb = inp / 32;
    let mut out_bytes = Vec::with_capacity(out * nb * ty.type_size() as usize);
    for r in 0..out {
        for b in 0..nb {
            let d = exact_f16(name, &label, "scale", q.scales[[r, b]])?;
            let codes: [u8; 32] = std::array::from_fn(|j| q.codes[[r, 32 * b + j]]);
            let qs: [u8; 16] = std::array::from_fn(|j| (codes[j] & 0xF) | (codes[j + 16] << 4));
            let qh = codes
                .iter()
                .enumerate()
                .fold(0u32, |h, (j, &c)| h | ((((c >> 4) & 1) as u32) << j))
                .to_le_bytes();
            let bytes = match grid {
                GgmlGrid::Q4_0 => to_bytes(&[BlockQ4_0 { d, qs }]),
                GgmlGrid::IQ4_NL => to_bytes(&[BlockIQ4_NL { d, qs }]),
                GgmlGrid::Q5_0 => to_bytes(&[BlockQ5_0 { d, qh, qs }]),
                GgmlGrid::Q8_0 => to_bytes(&[BlockQ8_0 {
                    d,
                    qs: std::array::from_fn(|j| codes[j] as i8),
                }]),
                _ => {
                    let m = exact_f16(name, &label, "minimum", q.zeros[[r, b]])?;
                    if grid == GgmlGrid::Q4_1 {
                        to_bytes(&[BlockQ4_1 { d, m, qs }])
                    } else {
                        to_bytes(&[BlockQ5_1 { d, m, qh, qs }])
                    }
                }
            };
            out_bytes.extend_from_slice(&bytes);
        }
    }
    Ok(out_bytes)
}

/// [`blocks_from_quantized`] for a K grid: each 256-column super-block of a row becomes one
/// K block; its f16 `d` (and `dmin`) and integer sub-block scales (and mins) are recovered
/// exactly from the sub-blocks' parameters ([`KSuperParams::factor`]).
fn k_blocks_from_quantized(
    name: &str,
    label: &str,
    q: &QuantizedLinear,
    grid: GgmlGrid,
) -> Result<Vec<u8>> {
    let (out, inp) = q.shape();
    let g = grid.group_len();
    if q.granularity != Granularity::Group(g) || inp % QK_K != 0 {
        return Err(pack_err(
            label,
            name,
            format!(
                "granularity {:?} with {inp} columns: {} blocks need Group({g}) and a multiple of {QK_K} columns",
                q.granularity,
                grid.ggml_name()
            ),
        ));
    }
    if q.g_idx
        .iter()
        .enumerate()
        .any(|(k, &gi)| gi as usize != k / g)
    {
        return Err(pack_err(
            label,
            name,
            "act-order g_idx: K super-blocks are consecutive runs of 256 columns (use static groups)",
        ));
    }
    let per = QK_K / g;
    let mut bytes = Vec::with_capacity(out * inp / QK_K * grid_type(grid).type_size() as usize);
    let mut params = vec![GroupParams::scale_only(0.0); per];
    for r in 0..out {
        for b in 0..inp / QK_K {
            for (j, p) in params.iter_mut().enumerate() {
                *p = GroupParams {
                    scale: q.scales[[r, b * per + j]],
                    zero: q.zeros[[r, b * per + j]],
                };
            }
            let sp = KSuperParams::factor(grid, &params).ok_or_else(|| {
                pack_err(
                    label,
                    name,
                    format!(
                        "row {r}, super-block {b}: the sub-block parameters are not one f16 scale times {} integers (fit them with GgmlGrid::{} over whole super-blocks)",
                        grid.ggml_name(),
                        grid.ggml_name()
                    ),
                )
            })?;
            let codes: [u8; QK_K] = std::array::from_fn(|e| q.codes[[r, b * QK_K + e]]);
            bytes.extend_from_slice(&gguf_blocks::k_block_bytes(grid, &sp, &codes));
        }
    }
    Ok(bytes)
}

/// Round-to-nearest of a dense `[rows, cols]` tensor into `ty` with ggml's reference
/// quantizers (`F32`, `F16`, `BF16` and the block types Q4_0 .. Q6_K, IQ4_NL, IQ4_XS);
/// `name` appears in errors (a row length that is not a multiple of the block size,
/// non-finite values, an unsupported type).
pub fn quantize_tensor(name: &str, x: ArrayView2<f32>, ty: GgmlType) -> Result<GgufTensor> {
    quantize_tensor_weighted(name, x, ty, None)
}

/// [`quantize_tensor`] with llama.cpp-style importance: `importance[k]` (one per input
/// column, e.g. `Hessian::imatrix()`, `sum_t x_{t,k}^2 / T`) weighs column `k` of every row,
/// and each block minimises `sum_i importance_i (x_i - y_i)^2` (see
/// [`gguf_blocks`]' importance search). `None` is plain RTN. Float types ignore it.
///
/// ```
/// use ndarray::Array2;
/// use quantlab_checkpoints::export::gguf::quantize_tensor_weighted;
/// use quantlab_checkpoints::gguf::GgmlType;
/// use quantlab_checkpoints::pack::gguf_blocks;
/// let w = Array2::from_shape_fn((4, 32), |(r, k)| ((r * 32 + k) as f32 * 0.71).cos());
/// let imp: Vec<f32> = (0..32).map(|k| if k == 5 { 100.0 } else { 1.0 }).collect();
/// let err = |imp_w: Option<&[f32]>| {
///     let t = quantize_tensor_weighted("w", w.view(), GgmlType::Q4_0, imp_w).unwrap();
///     let y = gguf_blocks::dequantize("w", GgmlType::Q4_0, &t.bytes).unwrap();
///     w.iter().zip(&y).enumerate().map(|(i, (a, b))| imp[i % 32] * (a - b).powi(2)).sum::<f32>()
/// };
/// assert!(err(Some(&imp)) <= err(None));
/// ```
pub fn quantize_tensor_weighted(
    name: &str,
    x: ArrayView2<f32>,
    ty: GgmlType,
    importance: Option<&[f32]>,
) -> Result<GgufTensor> {
    let (rows, cols) = x.dim();
    let flat: Vec<f32> = x.iter().copied().collect();
    let shape = vec![rows, cols];
    if let Some(i) = flat.iter().position(|v| !v.is_finite()) {
        return Err(pack_err(
            format!("GGUF {ty}"),
            name,
            format!("non-finite value {} at flat index {i}", flat[i]),
        ));
    }
    let bytes = match ty {
        GgmlType::F32 => GgufTensor::f32(&shape, &flat).bytes,
        GgmlType::F16 => GgufTensor::f16(&shape, &flat).bytes,
        GgmlType::BF16 => flat
            .iter()
            .flat_map(|&v| bf16::from_f32(v).to_le_bytes())
            .collect(),
        _ => {
            if !gguf_blocks::has_blocks(ty) {
                return Err(pack_err(
                    format!("GGUF {ty}"),
                    name,
                    "no quantizer for this type (use F32, F16, BF16, Q4_0..Q8_0, Q2_K..Q6_K, IQ4_NL or IQ4_XS)",
                ));
            }
            let qk = ty.block_size() as usize;
            if cols % qk != 0 {
                return Err(pack_err(
                    format!("GGUF {ty}"),
                    name,
                    format!("rows of {cols} values are not a whole number of {qk}-weight blocks"),
                ));
            }
            let imp: Option<Vec<f32>> = match importance {
                None => None,
                Some(w) if w.len() == cols => {
                    Some((0..rows).flat_map(|_| w.iter().copied()).collect())
                }
                Some(w) => {
                    return Err(pack_err(
                        format!("GGUF {ty}"),
                        name,
                        format!("{} importance values for {cols} input columns", w.len()),
                    ))
                }
            };
            gguf_blocks::quantize(name, ty, &flat, imp.as_deref())?
        }
    };
    Ok(GgufTensor { ty, shape, bytes })
}

/// The GGUF name of a Hugging Face tensor name (llama-family naming), or `None`.
///
/// ```
/// use quantlab_checkpoints::export::gguf::hf_to_gguf_name;
/// assert_eq!(hf_to_gguf_name("model.layers.3.self_attn.q_proj.weight").unwrap(), "blk.3.attn_q.weight");
/// assert_eq!(hf_to_gguf_name("lm_head.weight").unwrap(), "output.weight");
/// assert_eq!(hf_to_gguf_name("model.layers.0.mlp.gate_proj.bias").unwrap(), "blk.0.ffn_gate.bias");
/// assert!(hf_to_gguf_name("model.layers.0.rotary_emb.inv_freq").is_none());
/// ```
pub fn hf_to_gguf_name(name: &str) -> Option<String> {
    let fixed = match name {
        "model.embed_tokens.weight" => Some("token_embd.weight"),
        "model.norm.weight" => Some("output_norm.weight"),
        "lm_head.weight" => Some("output.weight"),
        "rope_freqs.weight" => Some("rope_freqs.weight"),
        _ => None,
    };
    if let Some(f) = fixed {
        return Some(f.to_string());
    }
    let rest = name.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, suffix) = rest.rsplit_once('.')?;
    let g = match module {
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" => "ffn_norm",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        _ => return None,
    };
    Some(format!("blk.{layer}.{g}.{suffix}"))
}

/// Whether `name` already is a GGUF tensor name.
fn is_gguf_name(name: &str) -> bool {
    name.starts_with("blk.")
        || matches!(
            name,
            "token_embd.weight" | "output_norm.weight" | "output.weight" | "rope_freqs.weight"
        )
}

/// llama.cpp's q/k permutation of whole rows: for each of `n_head` heads of `hd = rows /
/// n_head` rows, HF row `h hd + j hd / 2 + i` goes to GGUF row `h hd + 2 i + j`
/// (`row_bytes` bytes per row; the inverse of the `models` crate's `unpermute_qk`).
///
/// ```
/// use quantlab_checkpoints::export::gguf::permute_qk_rows;
/// // one head of 4 rows, one byte each: HF (a0, a1, b0, b1) -> GGUF (a0, b0, a1, b1)
/// assert_eq!(permute_qk_rows(&[0, 1, 2, 3], 4, 1, 1), vec![0, 2, 1, 3]);
/// ```
#[track_caller]
pub fn permute_qk_rows(bytes: &[u8], rows: usize, row_bytes: usize, n_head: usize) -> Vec<u8> {
    assert!(
        n_head > 0 && rows % (2 * n_head) == 0 && bytes.len() == rows * row_bytes,
        "permute_qk_rows: {rows} rows, {n_head} heads, {} bytes",
        bytes.len()
    );
    let hd = rows / n_head;
    let mut out = vec![0u8; bytes.len()];
    for h in 0..n_head {
        for j in 0..2 {
            for i in 0..hd / 2 {
                let src = h * hd + j * hd / 2 + i;
                let dst = h * hd + 2 * i + j;
                out[dst * row_bytes..(dst + 1) * row_bytes]
                    .copy_from_slice(&bytes[src * row_bytes..(src + 1) * row_bytes]);
            }
        }
    }
    out
}

/// llama.cpp's `general.file_type` (`enum llama_ftype`) for files whose linear weights are
/// mostly of type `ty`: F32 0, F16 1, Q4_0 2, Q4_1 3, Q8_0 7, Q5_0 8, Q5_1 9, Q2_K 10,
/// Q3_K 11 (`_S`), Q4_K 14 (`_S`), Q5_K 16 (`_S`), Q6_K 18, IQ4_NL 25, IQ4_XS 30, BF16 32.
pub fn file_type_of(ty: GgmlType) -> Option<u32> {
    Some(match ty {
        GgmlType::F32 => 0,
        GgmlType::F16 => 1,
        GgmlType::Q4_0 => 2,
        GgmlType::Q4_1 => 3,
        GgmlType::Q8_0 => 7,
        GgmlType::Q5_0 => 8,
        GgmlType::Q5_1 => 9,
        GgmlType::IQ4_NL => 25,
        GgmlType::IQ4_XS => 30,
        GgmlType::Q2_K => 10,
        GgmlType::Q3_K => 11,
        GgmlType::Q4_K => 14,
        GgmlType::Q5_K => 16,
        GgmlType::Q6_K => 18,
        GgmlType::BF16 => 32,
        _ => return None,
    })
}

/// Metadata keys never copied from the source: rewritten (`general.file_type`,
/// `general.quantization_version`, `general.alignment`) or describing the source's own
/// quantization or split.
fn dropped_key(k: &str) -> bool {
    matches!(
        k,
        "general.file_type" | "general.quantization_version" | "general.alignment"
    ) || k.starts_with("split.")
        || k.starts_with("quantize.")
}

/// A tensor as it goes into the file: GGUF name, GGUF dims, type, bytes.
struct Entry {
    name: String,
    dims: Vec<u64>,
    ty: GgmlType,
    data: EntryData,
}

enum EntryData {
    Owned(Vec<u8>),
    /// Bytes `range` of the source file.
    Source(std::ops::Range<u64>),
}

impl Entry {
    fn len(&self) -> u64 {
        match &self.data {
            EntryData::Owned(b) => b.len() as u64,
            EntryData::Source(r) => r.end - r.start,
        }
    }
}

/// Writes a GGUF v3 file at `path`: the metadata of `source_gguf` (see the module docs for
/// the keys rewritten), the `tensors` (HF or GGUF names, HF order and shapes; q/k permuted
/// for llama), and every tensor of the source not named in `tensors` copied unchanged.
/// Atomic: a temporary sibling renamed over `path`.
///
/// Errors name the tensor or file: an unknown name, a duplicate, a shape whose rows are not
/// whole blocks, a byte length that does not match the shape, q/k rows that are not a
/// multiple of twice the heads, I/O.
pub fn write_gguf(path: &Path, source_gguf: &Path, tensors: &[(String, GgufTensor)]) -> Result<()> {
    write_gguf_typed(path, source_gguf, tensors, None)
}

/// [`write_gguf`] with `general.file_type` (`enum llama_ftype`) given as the file type asked
/// for (`file_type_of(ty)`, e.g. Q4_K -> 14, Q4_K_S; 15 for a Q4_K_M mix) rather than the
/// most common type of the
/// block weights (a Q4_K file of a model whose rows are mostly not multiples of 256 holds
/// mostly the fallback type). `None`: the most common type.
pub fn write_gguf_typed(
    path: &Path,
    source_gguf: &Path,
    tensors: &[(String, GgufTensor)],
    file_type: Option<u32>,
) -> Result<()> {
    let src = GgufFile::open(source_gguf)?;
    write_impl(
        path,
        &src.metadata,
        tensors,
        Some((source_gguf, &src)),
        file_type,
        false,
    )
}

/// Like [`write_gguf`] with the metadata given directly (no source file, nothing copied):
/// `general.architecture` should be among it, the llama q/k permutation uses
/// `{arch}.attention.head_count(_kv)`.
pub fn write_gguf_metadata(
    path: &Path,
    metadata: &[(String, GgufValue)],
    tensors: &[(String, GgufTensor)],
) -> Result<()> {
    write_impl(path, metadata, tensors, None, None, false)
}

/// A GGUF v3 file holding exactly `metadata` and `tensors`, names as given (no HF name
/// mapping, no q/k permutation, no `general.file_type`): for files that are not models, such
/// as llama.cpp's importance matrices ([`crate::imatrix`]). Atomic, and checked as
/// [`write_gguf`] checks shapes and byte lengths.
pub fn write_gguf_raw(
    path: &Path,
    metadata: &[(String, GgufValue)],
    tensors: &[(String, GgufTensor)],
) -> Result<()> {
    write_impl(path, metadata, tensors, None, None, true)
}

/// [`write_gguf_metadata`] with `general.file_type` from `file_type` (see
/// [`write_gguf_typed`]).
pub fn write_gguf_metadata_typed(
    path: &Path,
    metadata: &[(String, GgufValue)],
    tensors: &[(String, GgufTensor)],
    file_type: Option<u32>,
) -> Result<()> {
    write_impl(path, metadata, tensors, None, file_type, false)
}

fn meta_uint(meta: &[(String, GgufValue)], key: &str) -> Option<usize> {
    meta.iter()
        .find(|(k, _)| k == key)
        .and_then(|(_, v)| v.as_integer())
        .and_then(|v| usize::try_from(v).ok())
}

fn write_impl(
    path: &Path,
    metadata: &[(String, GgufValue)],
    tensors: &[(String, GgufTensor)],
    source: Option<(&Path, &GgufFile)>,
    file_type: Option<u32>,
    raw: bool,
) -> Result<()> {
    let arch = metadata
        .iter()
        .find(|(k, _)| k == "general.architecture")
        .and_then(|(_, v)| v.as_str())
        .unwrap_or("")
        .to_string();
    let n_head = meta_uint(metadata, &format!("{arch}.attention.head_count"));
    let n_kv = meta_uint(metadata, &format!("{arch}.attention.head_count_kv")).or(n_head);
    let mut entries: Vec<Entry> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for (name, t) in tensors {
        let gname = if raw || is_gguf_name(name) {
            name.clone()
        } else {
            hf_to_gguf_name(name).ok_or_else(|| {
                invalid(
                    format!("tensor `{name}`"),
                    "no GGUF name for it (expected model.embed_tokens.weight, model.layers.N.<module>.weight, model.norm.weight, lm_head.weight or a GGUF name)",
                )
            })?
        };
        if !seen.insert(gname.clone()) {
            return Err(invalid(
                format!("tensor `{name}`"),
                format!("given twice (GGUF name {gname})"),
            ));
        }
        let label = format!("GGUF {}", t.ty);
        let (bs, ts) = (t.ty.block_size() as usize, t.ty.type_size() as usize);
        let inner = *t.shape.last().unwrap_or(&1);
        if t.shape.is_empty() || t.shape.len() > 4 || t.shape.contains(&0) || inner % bs != 0 {
            return Err(pack_err(
                &label,
                name,
                format!(
                    "shape {:?}: needs 1..4 non-zero dims with rows a multiple of {bs}",
                    t.shape
                ),
            ));
        }
        let want = t.n_elements() / bs * ts;
        if t.bytes.len() != want {
            return Err(pack_err(
                &label,
                name,
                format!(
                    "{} bytes for shape {:?} (expected {want})",
                    t.bytes.len(),
                    t.shape
                ),
            ));
        }
        let is_q = name.contains(".self_attn.q_proj.");
        let is_k = name.contains(".self_attn.k_proj.");
        let bytes = if !raw && arch == "llama" && (is_q || is_k) {
            let heads = if is_q { n_head } else { n_kv }.unwrap_or(0);
            let rows = t.shape[0];
            if heads == 0 || rows % (2 * heads) != 0 || t.shape.len() > 2 {
                return Err(pack_err(
                    &label,
                    name,
                    format!("{rows} rows cannot take llama's q/k permutation with {heads} heads (metadata {arch}.attention.head_count*)"),
                ));
            }
            permute_qk_rows(&t.bytes, rows, t.bytes.len() / rows, heads)
        } else {
            t.bytes.clone()
        };
        entries.push(Entry {
            name: gname,
            dims: t.shape.iter().rev().map(|&d| d as u64).collect(),
            ty: t.ty,
            data: EntryData::Owned(bytes),
        });
    }
    if let Some((_, src)) = source {
        for info in &src.tensors {
            if !seen.contains(&info.name) {
                entries.push(Entry {
                    name: info.name.clone(),
                    dims: info.dims.clone(),
                    ty: info.ggml_type,
                    data: EntryData::Source(src.tensor_range(info)),
                });
            }
        }
    }
    // general.file_type: the most common type among the 2-D weights of the blocks (not the
    // embeddings or the output), the first in file order on ties.
    let mut counts: Vec<(GgmlType, usize)> = Vec::new();
    for e in &entries {
        if e.dims.len() == 2 && e.name.starts_with("blk.") {
            match counts.iter_mut().find(|(t, _)| *t == e.ty) {
                Some(c) => c.1 += 1,
                None => counts.push((e.ty, 1)),
            }
        }
    }
    // Ties go to the type seen first.
    let main_ty = counts
        .iter()
        .fold(None::<(GgmlType, usize)>, |best, &c| match best {
            Some(b) if b.1 >= c.1 => Some(b),
            _ => Some(c),
        })
        .map(|c| c.0);
    let any_quantized = entries.iter().any(|e| e.ty.is_quantized());
    let mut meta: Vec<(String, GgufValue)> = metadata
        .iter()
        .filter(|(k, _)| raw || !dropped_key(k))
        .cloned()
        .collect();
    // F32 0, F16 1, BF16 32 are the float file types
    let quantized = file_type.is_some_and(|f| !matches!(f, 0 | 1 | 32))
        || main_ty.is_some_and(|t| t.is_quantized())
        || any_quantized;
    if quantized && !raw {
        meta.push(("general.quantization_version".into(), GgufValue::U32(2)));
    }
    if let Some(ft) = file_type
        .or(main_ty.and_then(file_type_of))
        .filter(|_| !raw)
    {
        meta.push(("general.file_type".into(), GgufValue::U32(ft)));
    }

    let mut source_file = match source {
        Some((p, _)) => Some((p, std::fs::File::open(p).map_err(|e| io_at(p, e))?)),
        None => None,
    };
    write_atomic(path, |w| {
        let io = |e: std::io::Error| io_at(path, e);
        let mut head = Vec::new();
        head.extend_from_slice(b"GGUF");
        head.extend_from_slice(&3u32.to_le_bytes());
        head.extend_from_slice(&(entries.len() as u64).to_le_bytes());
        head.extend_from_slice(&(meta.len() as u64).to_le_bytes());
        for (k, v) in &meta {
            put_str(&mut head, k);
            head.extend_from_slice(&v.value_type().id().to_le_bytes());
            put_value(&mut head, v);
        }
        let mut offset = 0u64;
        let mut offsets = Vec::with_capacity(entries.len());
        for e in &entries {
            put_str(&mut head, &e.name);
            head.extend_from_slice(&(e.dims.len() as u32).to_le_bytes());
            for d in &e.dims {
                head.extend_from_slice(&d.to_le_bytes());
            }
            head.extend_from_slice(&e.ty.id().to_le_bytes());
            head.extend_from_slice(&offset.to_le_bytes());
            offsets.push(offset);
            offset = (offset + e.len()).next_multiple_of(ALIGNMENT as u64);
        }
        head.resize(head.len().next_multiple_of(ALIGNMENT), 0);
        w.write_all(&head).map_err(io)?;
        let mut written = 0u64;
        for (e, &off) in entries.iter().zip(&offsets) {
            w.write_all(&vec![0u8; (off - written) as usize])
                .map_err(io)?;
            match &e.data {
                EntryData::Owned(b) => w.write_all(b).map_err(io)?,
                EntryData::Source(r) => {
                    let (sp, f) = source_file.as_mut().expect("a source file");
                    f.seek(SeekFrom::Start(r.start)).map_err(|e| io_at(sp, e))?;
                    let mut take = Read::by_ref(f).take(r.end - r.start);
                    let n = std::io::copy(&mut take, w).map_err(|e| io_at(sp, e))?;
                    if n != r.end - r.start {
                        return Err(CheckpointError::malformed(
                            &sp.display().to_string(),
                            format!("tensor \"{}\"", e.name),
                            "file ended inside the tensor data",
                        ));
                    }
                }
            }
            written = off + e.len();
        }
        let end = written.next_multiple_of(ALIGNMENT as u64);
        w.write_all(&vec![0u8; (end - written) as usize])
            .map_err(io)?;
        Ok(())
    })
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn put_value(out: &mut Vec<u8>, v: &GgufValue) {
    match v {
        GgufValue::U8(x) => out.push(*x),
        GgufValue::I8(x) => out.push(*x as u8),
        GgufValue::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::Bool(x) => out.push(*x as u8),
        GgufValue::String(s) => put_str(out, s),
        GgufValue::Array(a) => put_array(out, a),
        GgufValue::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
        // GgufValue is non_exhaustive only across crates: every variant is listed above.
    }
}

fn put_array(out: &mut Vec<u8>, a: &GgufArray) {
    out.extend_from_slice(&a.element_type().id().to_le_bytes());
    out.extend_from_slice(&(a.len() as u64).to_le_bytes());
    macro_rules! each {
        ($v:expr, $f:expr) => {
            for x in $v {
                #[allow(clippy::redundant_closure_call)]
                $f(out, x);
            }
        };
    }
    match a {
        GgufArray::U8(v) => out.extend_from_slice(v),
        GgufArray::I8(v) => out.extend(v.iter().map(|&x| x as u8)),
        GgufArray::U16(v) => each!(v, |o: &mut Vec<u8>, x: &u16| o
            .extend_from_slice(&x.to_le_bytes())),
        GgufArray::I16(v) => each!(v, |o: &mut Vec<u8>, x: &i16| o
            .extend_from_slice(&x.to_le_bytes())),
        GgufArray::U32(v) => each!(v, |o: &mut Vec<u8>, x: &u32| o
            .extend_from_slice(&x.to_le_bytes())),
        GgufArray::I32(v) => each!(v, |o: &mut Vec<u8>, x: &i32| o
            .extend_from_slice(&x.to_le_bytes())),
        GgufArray::F32(v) => each!(v, |o: &mut Vec<u8>, x: &f32| o
            .extend_from_slice(&x.to_le_bytes())),
        GgufArray::Bool(v) => out.extend(v.iter().map(|&x| x as u8)),
        GgufArray::String(v) => each!(v, |o: &mut Vec<u8>, x: &String| put_str(o, x)),
        GgufArray::Array(v) => each!(v, |o: &mut Vec<u8>, x: &GgufArray| put_array(o, x)),
        GgufArray::U64(v) => each!(v, |o: &mut Vec<u8>, x: &u64| o
            .extend_from_slice(&x.to_le_bytes())),
        GgufArray::I64(v) => each!(v, |o: &mut Vec<u8>, x: &i64| o
            .extend_from_slice(&x.to_le_bytes())),
        GgufArray::F64(v) => each!(v, |o: &mut Vec<u8>, x: &f64| o
            .extend_from_slice(&x.to_le_bytes())),
    }
}
