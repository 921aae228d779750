//! Quantized Hugging Face directories back to dequantized f32 weights.
//!
//! [`read_quantized_dir`] reads `config.json`, detects the layout from
//! `quantization_config.quant_method` (`gptq`, `awq`, `bitsandbytes` with `load_in_4bit` or
//! `load_in_8bit`; none = a plain checkpoint; a missing `quantization_config` falls back to
//! `quantize_config.json` (older AutoGPTQ) or `quant_config.json` (AutoAWQ)), loads the
//! safetensors files (`model.safetensors.index.json`'s files, or every `*.safetensors`) and
//! returns every weight under its Hugging Face name: each quantized linear `p` as
//! `p.weight` `[out, in]` dequantized with the peer loader's formula ([`crate::pack`]), every
//! other floating-point tensor (F32, F16, BF16, F64) as f32, one-dimensional tensors as
//! `[1, n]`. Integer tensors that belong to no quantized linear are skipped.
//!
//! GPTQ: `checkpoint_format` `gptq` (default; zeros + 1) or `gptq_v2`; bits inferred from
//! the shapes (2, 3, 4, 8); a missing `g_idx` means `k / group_size`. AWQ: `version` gemm.
//! bitsandbytes 4-bit: the `quant_state` JSON of each weight gives type, blocksize, shape and
//! double quantization.

use super::{invalid, io_at};
use crate::pack::bnb::{parse_quant_state, Bnb4Absmax, Bnb4Tensors, Bnb4Type, Int8Tensors};
use crate::pack::{pack_err, AwqTensors, GptqFormat, GptqTensors};
use crate::{CheckpointError, Result};
use half::{bf16, f16};
use ndarray::Array2;
use quantlab_grids::double_quant::NestedScales;
use safetensors::{Dtype, SafeTensors};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// `(Hugging Face name, f32 weight)` pairs, sorted by name.
pub type NamedWeights = Vec<(String, Array2<f32>)>;

/// The layout a directory was detected as.
#[derive(Clone, Debug, PartialEq)]
pub enum DetectedFormat {
    /// No quantization.
    Dense,
    /// GPTQ with the given zero convention.
    Gptq(GptqFormat),
    /// AWQ GEMM.
    Awq,
    /// bitsandbytes 4-bit.
    Bnb4,
    /// bitsandbytes LLM.int8.
    Int8,
}

/// A raw tensor read from a file.
struct Raw {
    dtype: Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
    file: PathBuf,
}

fn le<const N: usize, T>(data: &[u8], f: impl Fn([u8; N]) -> T) -> Vec<T> {
    data.chunks_exact(N)
        .map(|c| f(c.try_into().expect("chunk")))
        .collect()
}

impl Raw {
    fn err(&self, name: &str, detail: impl Into<String>) -> CheckpointError {
        CheckpointError::malformed(
            &self.file.display().to_string(),
            format!("tensor \"{name}\""),
            detail,
        )
    }

    fn floats(&self, name: &str) -> Result<Vec<f32>> {
        Ok(match self.dtype {
            Dtype::F32 => le(&self.data, f32::from_le_bytes),
            Dtype::F16 => le(&self.data, |b| f16::from_le_bytes(b).to_f32()),
            Dtype::BF16 => le(&self.data, |b| bf16::from_le_bytes(b).to_f32()),
            Dtype::F64 => le(&self.data, |b| f64::from_le_bytes(b) as f32),
            d => {
                return Err(self.err(
                    name,
                    format!("dtype {d:?} where a float tensor was expected"),
                ))
            }
        })
    }

    fn i32s(&self, name: &str) -> Result<Vec<i32>> {
        match self.dtype {
            Dtype::I32 | Dtype::U32 => Ok(le(&self.data, i32::from_le_bytes)),
            Dtype::I64 => Ok(le(&self.data, |b| i64::from_le_bytes(b) as i32)),
            d => Err(self.err(name, format!("dtype {d:?} where int32 was expected"))),
        }
    }

    fn bytes(&self, name: &str) -> Result<&[u8]> {
        match self.dtype {
            Dtype::U8 | Dtype::I8 => Ok(&self.data),
            d => Err(self.err(name, format!("dtype {d:?} where uint8/int8 was expected"))),
        }
    }

    fn array2<T: Clone>(&self, name: &str, v: Vec<T>) -> Result<Array2<T>> {
        let shape = match self.shape.as_slice() {
            [r, c] => (*r, *c),
            [n] => (1, *n),
            s => {
                return Err(self.err(
                    name,
                    format!("shape {s:?} where 2 dimensions were expected"),
                ))
            }
        };
        Array2::from_shape_vec(shape, v).map_err(|e| self.err(name, e.to_string()))
    }
}

fn read_json(p: &Path) -> Result<Value> {
    let s = std::fs::read(p).map_err(|e| io_at(p, e))?;
    serde_json::from_slice(&s)
        .map_err(|e| CheckpointError::malformed(&p.display().to_string(), "JSON", e.to_string()))
}

fn load_tensors(dir: &Path) -> Result<BTreeMap<String, Raw>> {
    let index = dir.join("model.safetensors.index.json");
    let mut files: Vec<PathBuf> = if index.is_file() {
        let v = read_json(&index)?;
        let map = v["weight_map"].as_object().ok_or_else(|| {
            CheckpointError::malformed(
                &index.display().to_string(),
                "weight_map",
                "missing or not an object",
            )
        })?;
        let mut f: Vec<PathBuf> = map
            .values()
            .filter_map(|v| v.as_str())
            .map(|s| dir.join(s))
            .collect();
        f.sort();
        f.dedup();
        f
    } else {
        let mut f = Vec::new();
        for e in std::fs::read_dir(dir).map_err(|e| io_at(dir, e))? {
            let p = e.map_err(|e| io_at(dir, e))?.path();
            if p.extension().is_some_and(|x| x == "safetensors") {
                f.push(p);
            }
        }
        f
    };
    files.sort();
    if files.is_empty() {
        return Err(invalid(
            format!("directory {}", dir.display()),
            "no safetensors files (model.safetensors or an index)",
        ));
    }
    let mut out = BTreeMap::new();
    for f in files {
        let bytes = std::fs::read(&f).map_err(|e| io_at(&f, e))?;
        let st = SafeTensors::deserialize(&bytes).map_err(|e| {
            CheckpointError::malformed(
                &f.display().to_string(),
                "safetensors header",
                e.to_string(),
            )
        })?;
        for (name, view) in st.tensors() {
            out.insert(
                name,
                Raw {
                    dtype: view.dtype(),
                    shape: view.shape().to_vec(),
                    data: view.data().to_vec(),
                    file: f.clone(),
                },
            );
        }
    }
    Ok(out)
}

/// The quantization config: `config.json`'s `quantization_config`, else the side files.
fn quant_config(dir: &Path, config: &Value) -> Result<Option<Value>> {
    if let Some(q) = config.get("quantization_config") {
        return Ok(Some(q.clone()));
    }
    for (f, method) in [
        ("quantize_config.json", "gptq"),
        ("quant_config.json", "awq"),
    ] {
        let p = dir.join(f);
        if p.is_file() {
            let mut v = read_json(&p)?;
            if !v.is_object() {
                return Err(CheckpointError::malformed(
                    &p.display().to_string(),
                    "JSON",
                    "expected an object of quantization settings".to_string(),
                ));
            }
            if v.get("quant_method").is_none() {
                v["quant_method"] = Value::String(method.into());
            }
            return Ok(Some(v));
        }
    }
    Ok(None)
}

/// Detects the layout of a directory from its config (see the module docs).
pub fn detect_format(dir: &Path) -> Result<DetectedFormat> {
    let config = read_json(&dir.join("config.json"))?;
    detect(dir, &config)
}

fn detect(dir: &Path, config: &Value) -> Result<DetectedFormat> {
    let Some(q) = quant_config(dir, config)? else {
        return Ok(DetectedFormat::Dense);
    };
    let method = q["quant_method"]
        .as_str()
        .unwrap_or("")
        .to_ascii_lowercase();
    Ok(match method.as_str() {
        "gptq" => match q["checkpoint_format"].as_str().unwrap_or("gptq") {
            "gptq" => DetectedFormat::Gptq(GptqFormat::V1),
            "gptq_v2" => DetectedFormat::Gptq(GptqFormat::V2),
            other => {
                return Err(invalid(
                    "quantization_config.checkpoint_format",
                    format!("{other:?} (this reader knows gptq and gptq_v2)"),
                ))
            }
        },
        "awq" => {
            let v = q["version"].as_str().unwrap_or("gemm").to_ascii_lowercase();
            if v != "gemm" {
                return Err(invalid(
                    "quantization_config.version",
                    format!("AWQ {v:?}: only the GEMM layout is read"),
                ));
            }
            DetectedFormat::Awq
        }
        "bitsandbytes" => {
            if q["load_in_4bit"].as_bool() == Some(true) {
                DetectedFormat::Bnb4
            } else if q["load_in_8bit"].as_bool() == Some(true) {
                DetectedFormat::Int8
            } else {
                return Err(invalid(
                    "quantization_config",
                    "bitsandbytes with neither load_in_4bit nor load_in_8bit",
                ));
            }
        }
        other => {
            return Err(invalid(
                "quantization_config.quant_method",
                format!("{other:?} (this reader knows gptq, awq, bitsandbytes)"),
            ))
        }
    })
}

/// Reads a quantized (or plain) Hugging Face directory: the config and every weight,
/// dequantized to f32, sorted by name (see the module docs).
///
/// Errors name the file and tensor: a missing or malformed config, a missing companion
/// tensor (`qzeros` without `scales`, ...), shapes that do not fit the layout.
pub fn read_quantized_dir(dir: &Path) -> Result<(Value, NamedWeights)> {
    let config = read_json(&dir.join("config.json"))?;
    let format = detect(dir, &config)?;
    let qc = quant_config(dir, &config)?.unwrap_or(Value::Null);
    let mut raw = load_tensors(dir)?;
    let mut out: Vec<(String, Array2<f32>)> = Vec::new();
    let take = |raw: &mut BTreeMap<String, Raw>, name: &str| -> Result<Raw> {
        raw.remove(name).ok_or_else(|| {
            invalid(
                format!("tensor `{name}`"),
                format!("missing from {}", dir.display()),
            )
        })
    };
    let prefixes = |raw: &BTreeMap<String, Raw>, suffix: &str| -> Vec<String> {
        raw.keys()
            .filter_map(|k| k.strip_suffix(suffix).map(str::to_string))
            .collect()
    };
    match format {
        DetectedFormat::Dense => {}
        DetectedFormat::Gptq(f) => {
            let group_size = qc["group_size"].as_i64().unwrap_or(-1);
            for p in prefixes(&raw, ".qweight") {
                let (qn, zn, sn, gn) = (
                    format!("{p}.qweight"),
                    format!("{p}.qzeros"),
                    format!("{p}.scales"),
                    format!("{p}.g_idx"),
                );
                let qw = take(&mut raw, &qn)?;
                let qz = take(&mut raw, &zn)?;
                let sc = take(&mut raw, &sn)?;
                let qweight = qw.array2(&qn, qw.i32s(&qn)?)?;
                let qzeros = qz.array2(&zn, qz.i32s(&zn)?)?;
                let scales = sc.array2(
                    &sn,
                    sc.floats(&sn)?.into_iter().map(f16::from_f32).collect(),
                )?;
                let inp =
                    qweight.nrows() * 32 / (32 * qzeros.ncols() / scales.ncols().max(1)).max(1);
                let g_idx = match raw.remove(&gn) {
                    Some(g) => g.i32s(&gn)?,
                    None => {
                        let g = if group_size > 0 {
                            group_size as usize
                        } else {
                            inp
                        };
                        (0..inp).map(|k| (k / g.max(1)) as i32).collect()
                    }
                };
                let t = GptqTensors {
                    qweight,
                    qzeros,
                    scales,
                    g_idx,
                };
                out.push((format!("{p}.weight"), t.dequantize(&p, f)?));
            }
        }
        DetectedFormat::Awq => {
            for p in prefixes(&raw, ".qweight") {
                let (qn, zn, sn) = (
                    format!("{p}.qweight"),
                    format!("{p}.qzeros"),
                    format!("{p}.scales"),
                );
                let qw = take(&mut raw, &qn)?;
                let qz = take(&mut raw, &zn)?;
                let sc = take(&mut raw, &sn)?;
                let t = AwqTensors {
                    qweight: qw.array2(&qn, qw.i32s(&qn)?)?,
                    qzeros: qz.array2(&zn, qz.i32s(&zn)?)?,
                    scales: sc.array2(
                        &sn,
                        sc.floats(&sn)?.into_iter().map(f16::from_f32).collect(),
                    )?,
                };
                out.push((format!("{p}.weight"), t.dequantize(&p)?));
            }
        }
        DetectedFormat::Bnb4 => {
            let states: Vec<String> = raw
                .keys()
                .filter(|k| k.contains(".weight.quant_state.bitsandbytes__"))
                .cloned()
                .collect();
            for sname in states {
                let p = sname
                    .split(".weight.quant_state.")
                    .next()
                    .expect("contains the marker")
                    .to_string();
                let st = take(&mut raw, &sname)?;
                let qs = parse_quant_state(&sname, st.bytes(&sname)?)?;
                let quant_type = match qs.quant_type.as_str() {
                    "nf4" => Bnb4Type::Nf4,
                    "fp4" => Bnb4Type::Fp4,
                    other => {
                        return Err(pack_err(
                            "bitsandbytes 4-bit",
                            &sname,
                            format!("quant_type {other:?}"),
                        ))
                    }
                };
                let shape: [usize; 2] = match qs.shape.as_slice() {
                    [o, i] => [*o, *i],
                    s => {
                        return Err(pack_err(
                            "bitsandbytes 4-bit",
                            &sname,
                            format!("shape {s:?}: only 2-D weights are read"),
                        ))
                    }
                };
                let wn = format!("{p}.weight");
                let w = take(&mut raw, &wn)?;
                let an = format!("{p}.weight.absmax");
                let a = take(&mut raw, &an)?;
                let mn = format!("{p}.weight.quant_map");
                let quant_map = match raw.remove(&mn) {
                    Some(m) => m.floats(&mn)?,
                    None => quant_type.codebook().values().to_vec(),
                };
                let absmax = if let Some(nb) = qs.nested_blocksize {
                    let nn = format!("{p}.weight.nested_absmax");
                    let na = take(&mut raw, &nn)?;
                    raw.remove(&format!("{p}.weight.nested_quant_map"));
                    Bnb4Absmax::Nested(NestedScales {
                        codes: a.bytes(&an)?.to_vec(),
                        nested_absmax: na.floats(&nn)?,
                        offset: qs.nested_offset.unwrap_or(0.0) as f32,
                        blocksize: nb,
                    })
                } else {
                    Bnb4Absmax::Plain(a.floats(&an)?)
                };
                let Some(n) = shape[0].checked_mul(shape[1]) else {
                    return Err(pack_err(
                        "bitsandbytes 4-bit",
                        &wn,
                        format!("quant_state shape {shape:?} overflows"),
                    ));
                };
                let bytes = w.bytes(&wn)?.to_vec();
                let blocks = n.div_ceil(qs.blocksize.max(1));
                let n_absmax = match &absmax {
                    Bnb4Absmax::Plain(v) => v.len(),
                    Bnb4Absmax::Nested(s) => s.codes.len(),
                };
                if qs.blocksize == 0
                    || bytes.len() != n.div_ceil(2)
                    || n_absmax != blocks
                    || quant_map.len() != 16
                {
                    return Err(pack_err(
                        "bitsandbytes 4-bit",
                        &wn,
                        format!(
                            "{} bytes, {n_absmax} absmax, {} map values for shape {shape:?} in blocks of {}",
                            bytes.len(),
                            quant_map.len(),
                            qs.blocksize
                        ),
                    ));
                }
                if quant_map.iter().any(|v| !(-1.0..=1.0).contains(v)) {
                    return Err(pack_err(
                        "bitsandbytes 4-bit",
                        &mn,
                        "quant_map values outside [-1, 1]",
                    ));
                }
                let t = Bnb4Tensors {
                    weight: bytes,
                    shape,
                    quant_type,
                    blocksize: qs.blocksize,
                    absmax,
                    quant_map,
                    dtype: qs.dtype.clone(),
                };
                out.push((wn, t.dequantize()));
            }
        }
        DetectedFormat::Int8 => {
            for p in prefixes(&raw, ".SCB") {
                let (wn, sn) = (format!("{p}.weight"), format!("{p}.SCB"));
                let w = take(&mut raw, &wn)?;
                let s = take(&mut raw, &sn)?;
                let codes: Vec<i8> = w.bytes(&wn)?.iter().map(|&b| b as i8).collect();
                let weight = w.array2(&wn, codes)?;
                let scb = s.floats(&sn)?;
                if scb.len() != weight.nrows() {
                    return Err(pack_err(
                        "LLM.int8",
                        &sn,
                        format!("{} SCB values for {} rows", scb.len(), weight.nrows()),
                    ));
                }
                out.push((wn, Int8Tensors { weight, scb }.dequantize()));
            }
        }
    }
    for (name, t) in raw {
        if matches!(t.dtype, Dtype::F32 | Dtype::F16 | Dtype::BF16 | Dtype::F64) {
            let v = t.floats(&name)?;
            let a = match t.shape.as_slice() {
                [] => Array2::from_shape_vec((1, 1), v),
                [n] => Array2::from_shape_vec((1, *n), v),
                [r, c] => Array2::from_shape_vec((*r, *c), v),
                s => {
                    let c = *s.last().expect("dims");
                    Array2::from_shape_vec((v.len() / c.max(1), c), v)
                }
            }
            .map_err(|e| t.err(&name, e.to_string()))?;
            out.push((name, a));
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok((config, out))
}
