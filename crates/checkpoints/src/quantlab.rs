//! The project's own layout of quantized linears: `quantized.safetensors` beside the
//! `layers` object of `quantization_config.json`. The model around them (a Hugging Face
//! directory whose `model.safetensors` holds the dequantized weights) is written by the
//! pipeline; this module owns how one [`QuantizedLinear`] is stored and read back.
//!
//! ```text
//! quantized.safetensors, per quantized linear NAME (e.g. model.layers.0.mlp.down_proj):
//!   NAME.codes       u8  [out, in]      codes, original column order
//!   NAME.scales      f32 [out, groups]  group scales
//!   NAME.zeros       f32 [out, groups]  zero points (code units; a value for ggml's _1 types)
//!   NAME.g_idx       u32 [in]           group of each input column
//!   NAME.awq_scale   f32 [in]           AWQ's input scale s (AWQ methods only)
//!   NAME.dq_codes    u8  [n]            double-quantized absmax (NF4/FP4 with double quant)
//!   NAME.dq_absmax   f32 [m]
//!   NAME.dq_offset   f32 [1]
//! quantization_config.json, layers.NAME:
//!   "quantized": true, "format_spec": FormatSpec, "granularity": Granularity,
//!   "double_quant_blocksize": n (with dq_*)
//! ```
//!
//! [`linear_tensors`] gives one linear's tensors (borrowing the codes), [`layer_layout`] its
//! entry fields, and [`read_linears`] reads every quantized linear of a checkpoint back,
//! each error naming the file and the tensor or layer.
//!
//! ```
//! use ndarray::Array2;
//! use quantlab_checkpoints::quantlab::{layer_layout, linear_tensors, read_linears};
//! use quantlab_grids::{quantize_rtn, FormatSpec, Granularity, UniformGrid};
//! let w = Array2::from_shape_fn((4, 64), |(r, k)| ((r * 64 + k) as f32 * 0.37).sin());
//! let spec = FormatSpec::Uniform(UniformGrid::new(4, true).unwrap());
//! let q = quantize_rtn("l", w.view(), &spec, Granularity::Group(32)).unwrap();
//! let dir = tempfile::tempdir().unwrap();
//! let path = dir.path().join("quantized.safetensors");
//! let tensors = linear_tensors("l", &q, None);
//! safetensors::serialize_to_file(tensors.iter().map(|(n, t)| (n, t)), None, &path).unwrap();
//! let mut layers = serde_json::Map::new();
//! layers.insert("l".into(), serde_json::Value::Object(layer_layout(&q)));
//! let back = read_linears(&path, &layers).unwrap();
//! assert_eq!(back.linears["l"].dequantize(), q.dequantize());
//! ```

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::Path;

use ndarray::Array2;
use quantlab_grids::{FormatSpec, Granularity, NestedScales, QuantizedLinear};
use safetensors::tensor::View;
use safetensors::{Dtype, SafeTensors};
use serde_json::{Map, Value};

use crate::{CheckpointError, Result};

/// One tensor of a safetensors file, its bytes borrowed where they can be (written through
/// `&StoredTensor`, which is a [`View`]).
#[derive(Clone, Debug)]
pub struct StoredTensor<'a> {
    /// The safetensors dtype.
    pub dtype: Dtype,
    /// The shape.
    pub shape: Vec<usize>,
    /// Little-endian bytes.
    pub data: Cow<'a, [u8]>,
}

impl View for &StoredTensor<'_> {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

fn f32s(shape: Vec<usize>, v: impl IntoIterator<Item = f32>) -> StoredTensor<'static> {
    StoredTensor {
        dtype: Dtype::F32,
        shape,
        data: Cow::Owned(v.into_iter().flat_map(f32::to_le_bytes).collect()),
    }
}

/// The tensors `quantized.safetensors` stores for the linear `name` (see the module
/// documentation), in that order; `awq_scale` is AWQ's input scale of the linear.
pub fn linear_tensors<'a>(
    name: &str,
    q: &'a QuantizedLinear,
    awq_scale: Option<&[f32]>,
) -> Vec<(String, StoredTensor<'a>)> {
    let (out, inp) = q.shape();
    let codes = match q.codes.as_slice() {
        Some(s) => Cow::Borrowed(s),
        None => Cow::Owned(q.codes.iter().copied().collect()),
    };
    let mut v = vec![
        (
            format!("{name}.codes"),
            StoredTensor {
                dtype: Dtype::U8,
                shape: vec![out, inp],
                data: codes,
            },
        ),
        (
            format!("{name}.scales"),
            f32s(q.scales.shape().to_vec(), q.scales.iter().copied()),
        ),
        (
            format!("{name}.zeros"),
            f32s(q.zeros.shape().to_vec(), q.zeros.iter().copied()),
        ),
        (
            format!("{name}.g_idx"),
            StoredTensor {
                dtype: Dtype::U32,
                shape: vec![q.g_idx.len()],
                data: Cow::Owned(q.g_idx.iter().flat_map(|g| g.to_le_bytes()).collect()),
            },
        ),
    ];
    if let Some(n) = &q.nested {
        v.push((
            format!("{name}.dq_codes"),
            StoredTensor {
                dtype: Dtype::U8,
                shape: vec![n.codes.len()],
                data: Cow::Borrowed(&n.codes),
            },
        ));
        v.push((
            format!("{name}.dq_absmax"),
            f32s(vec![n.nested_absmax.len()], n.nested_absmax.iter().copied()),
        ));
        v.push((format!("{name}.dq_offset"), f32s(vec![1], [n.offset])));
    }
    if let Some(s) = awq_scale {
        v.push((
            format!("{name}.awq_scale"),
            f32s(vec![s.len()], s.iter().copied()),
        ));
    }
    v
}

/// The fields of a linear's `layers.NAME` entry that [`read_linears`] needs: `quantized`,
/// `format_spec`, `granularity` and, with double quantization, `double_quant_blocksize`.
pub fn layer_layout(q: &QuantizedLinear) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert("quantized".into(), true.into());
    m.insert(
        "format_spec".into(),
        serde_json::to_value(&q.spec).expect("a format spec serialises"),
    );
    m.insert(
        "granularity".into(),
        serde_json::to_value(q.granularity).expect("a granularity serialises"),
    );
    if let Some(n) = &q.nested {
        m.insert("double_quant_blocksize".into(), n.blocksize.into());
    }
    m
}

/// Quantized linears read back from a checkpoint.
#[derive(Debug, Default)]
pub struct StoredLinears {
    /// Every linear whose entry says `"quantized": true`, by name.
    pub linears: BTreeMap<String, QuantizedLinear>,
    /// AWQ input scales by linear name.
    pub awq_scales: BTreeMap<String, Vec<f32>>,
}

/// Reads every linear of `layers` (the `layers` object of `quantization_config.json`) marked
/// `"quantized": true` from the safetensors file at `path`. Errors name the file and the
/// tensor (a missing or mis-shaped one) or the layer (a bad `format_spec`).
pub fn read_linears(path: &Path, layers: &Map<String, Value>) -> Result<StoredLinears> {
    let p = path.display().to_string();
    let file = std::fs::File::open(path).map_err(|e| CheckpointError::Io {
        path: p.clone(),
        source: e,
    })?;
    // SAFETY: the map is read-only and lives for this function; a file changed underneath
    // gives wrong values or an error from the parser, never unsoundness in safe code here.
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| CheckpointError::Io {
        path: p.clone(),
        source: e,
    })?;
    let st = SafeTensors::deserialize(&map)
        .map_err(|e| CheckpointError::malformed(&p, "header", e.to_string()))?;
    let tensor = |name: &str, k: &str, dtype: Dtype, rank: usize| {
        let full = format!("{name}.{k}");
        let t = st
            .tensor(&full)
            .map_err(|_| CheckpointError::malformed(&p, format!("tensor `{full}`"), "missing"))?;
        if t.dtype() != dtype || t.shape().len() != rank {
            return Err(CheckpointError::malformed(
                &p,
                format!("tensor `{full}`"),
                format!(
                    "{:?} {:?}, expected {dtype:?} of rank {rank}",
                    t.dtype(),
                    t.shape()
                ),
            ));
        }
        Ok((t.shape().to_vec(), t.data().to_vec()))
    };
    let le_f32 = |b: &[u8]| -> Vec<f32> {
        b.chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
            .collect()
    };
    let f32_matrix = |name: &str, k: &str| -> Result<Array2<f32>> {
        let (s, b) = tensor(name, k, Dtype::F32, 2)?;
        Ok(Array2::from_shape_vec((s[0], s[1]), le_f32(&b)).expect("shape of the bytes"))
    };
    let mut out = StoredLinears::default();
    for (name, lv) in layers {
        if lv.get("quantized").and_then(Value::as_bool) != Some(true) {
            continue;
        }
        let field = |k: &str| lv.get(k).cloned().unwrap_or(Value::Null);
        let bad_layer = |k: &str, e: serde_json::Error| {
            CheckpointError::malformed(&p, format!("layer `{name}`"), format!("{k}: {e}"))
        };
        let spec: FormatSpec = serde_json::from_value(field("format_spec"))
            .map_err(|e| bad_layer("format_spec", e))?;
        let gran: Granularity = serde_json::from_value(field("granularity"))
            .map_err(|e| bad_layer("granularity", e))?;
        let (s, codes) = tensor(name, "codes", Dtype::U8, 2)?;
        let codes = Array2::from_shape_vec((s[0], s[1]), codes).expect("shape of the bytes");
        let scales = f32_matrix(name, "scales")?;
        let zeros = f32_matrix(name, "zeros")?;
        let (_, g) = tensor(name, "g_idx", Dtype::U32, 1)?;
        let g_idx = g
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes")))
            .collect();
        let mut q =
            QuantizedLinear::from_parts(spec, gran, codes, scales, zeros, g_idx).map_err(|e| {
                CheckpointError::malformed(&p, format!("linear `{name}`"), e.to_string())
            })?;
        if st.tensor(&format!("{name}.dq_codes")).is_ok() {
            let (_, c) = tensor(name, "dq_codes", Dtype::U8, 1)?;
            let (_, a) = tensor(name, "dq_absmax", Dtype::F32, 1)?;
            let (_, o) = tensor(name, "dq_offset", Dtype::F32, 1)?;
            let offset = *le_f32(&o).first().ok_or_else(|| {
                CheckpointError::malformed(&p, format!("tensor `{name}.dq_offset`"), "empty")
            })?;
            q.nested = Some(NestedScales {
                codes: c,
                nested_absmax: le_f32(&a),
                offset,
                blocksize: lv
                    .get("double_quant_blocksize")
                    .and_then(Value::as_u64)
                    .unwrap_or(256) as usize,
            });
        }
        if st.tensor(&format!("{name}.awq_scale")).is_ok() {
            let (_, s) = tensor(name, "awq_scale", Dtype::F32, 1)?;
            out.awq_scales.insert(name.clone(), le_f32(&s));
        }
        out.linears.insert(name.clone(), q);
    }
    Ok(out)
}
