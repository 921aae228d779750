//! What is in a checkpoint file: tensors (name, dtype, shape, bytes), GGUF metadata, totals.
//!
//! The format is detected from the first bytes, never from the file name: `GGUF` for GGUF;
//! an 8-byte length followed by `{` for safetensors.

use crate::error::{CheckpointError, Result};
use crate::gguf::{hex, GgufArray, GgufFile, GgufValue};
use crate::safetensors_header::SafetensorsHeader;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;

/// A checkpoint file format this crate reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum FileFormat {
    /// ggml's GGUF (versions 2 and 3).
    Gguf,
    /// Hugging Face safetensors.
    Safetensors,
}

impl std::fmt::Display for FileFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            FileFormat::Gguf => "GGUF",
            FileFormat::Safetensors => "safetensors",
        })
    }
}

/// Detects the format from the first bytes of a file (at least 9 are needed for safetensors).
///
/// ```
/// use quantlab_checkpoints::inspect::{detect_format, FileFormat};
/// assert_eq!(detect_format(b"GGUF\x03\0\0\0"), Some(FileFormat::Gguf));
/// assert_eq!(detect_format(b"\x02\0\0\0\0\0\0\0{}"), Some(FileFormat::Safetensors));
/// assert_eq!(detect_format(b"PK\x03\x04"), None);
/// ```
pub fn detect_format(first_bytes: &[u8]) -> Option<FileFormat> {
    if first_bytes.starts_with(&crate::gguf::GGUF_MAGIC) {
        return Some(FileFormat::Gguf);
    }
    if first_bytes.len() >= 9 && first_bytes[8] == b'{' {
        return Some(FileFormat::Safetensors);
    }
    None
}

/// One tensor of an inspected file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorEntry {
    /// The tensor's name.
    pub name: String,
    /// Storage type: a ggml type name (`Q4_1`, `F32`, ...) or a safetensors dtype (`F16`, ...).
    pub dtype: String,
    /// Shape as the file stores it: GGUF `ne[0..]` (innermost first), safetensors row-major
    /// (outermost first).
    pub shape: Vec<u64>,
    /// Number of elements.
    pub n_elements: u64,
    /// Bytes of data.
    pub bytes: u64,
    /// Absolute file offset of the data.
    pub offset: u64,
}

/// One GGUF metadata pair, summarised: scalars in full, arrays as element type and length.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MetadataEntry {
    /// The key.
    pub key: String,
    /// The value type (`u32`, `string`, `array`, ...).
    pub value_type: String,
    /// For arrays, the element type.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub element_type: Option<String>,
    /// For arrays, the number of elements.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub len: Option<u64>,
    /// For scalars, the value (floats that are not finite become the strings `NaN`, `inf`,
    /// `-inf`; `f32` values are written with their shortest decimal form).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<serde_json::Value>,
}

/// GGUF-specific facts of an inspected file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GgufDetails {
    /// Format version.
    pub version: u32,
    /// Alignment of the tensor data.
    pub alignment: u64,
    /// Absolute offset of the tensor data section.
    pub data_offset: u64,
    /// Metadata pairs in file order.
    pub metadata: Vec<MetadataEntry>,
}

/// safetensors-specific facts of an inspected file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SafetensorsDetails {
    /// Length of the JSON header.
    pub header_size: u64,
    /// Absolute offset of the data section.
    pub data_offset: u64,
    /// The `__metadata__` strings.
    pub metadata: BTreeMap<String, String>,
}

/// The result of [`inspect`]: everything listed about a checkpoint file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Inspection {
    /// The file as given.
    pub path: String,
    /// The detected format.
    pub format: FileFormat,
    /// File size in bytes.
    pub file_size: u64,
    /// Number of tensors.
    pub tensor_count: u64,
    /// Sum of the tensors' data bytes.
    pub total_bytes: u64,
    /// Sum of the tensors' element counts.
    pub parameter_count: u64,
    /// Tensors: in file order for GGUF, in data-offset order for safetensors.
    pub tensors: Vec<TensorEntry>,
    /// GGUF facts (for GGUF files).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gguf: Option<GgufDetails>,
    /// safetensors facts (for safetensors files).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub safetensors: Option<SafetensorsDetails>,
}

/// Lists the tensors (and, for GGUF, the metadata) of a GGUF or safetensors file.
///
/// The format comes from the magic bytes; only the header is read. Errors name the file
/// and the field or tensor at fault.
///
/// ```
/// use quantlab_checkpoints::inspect::{inspect, FileFormat};
/// let json = br#"{"w":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]}}"#;
/// let mut b = (json.len() as u64).to_le_bytes().to_vec();
/// b.extend_from_slice(json);
/// b.extend_from_slice(&[0u8; 16]);
/// let dir = tempfile::tempdir().unwrap();
/// let path = dir.path().join("weights.bin"); // the extension does not matter
/// std::fs::write(&path, &b).unwrap();
/// let ins = inspect(&path).unwrap();
/// assert_eq!(ins.format, FileFormat::Safetensors);
/// assert_eq!((ins.tensor_count, ins.total_bytes, ins.parameter_count), (1, 16, 4));
/// assert!((ins.total_bytes as f64 / ins.parameter_count as f64 - 4.0).abs() < 1e-12);
/// ```
pub fn inspect(path: &Path) -> Result<Inspection> {
    let label = path.display().to_string();
    let mut first = Vec::with_capacity(9);
    std::fs::File::open(path)
        .and_then(|f| f.take(9).read_to_end(&mut first))
        .map_err(|e| CheckpointError::io(&label, e))?;
    match detect_format(&first) {
        Some(FileFormat::Gguf) => Ok(from_gguf(label, &GgufFile::open(path)?)),
        Some(FileFormat::Safetensors) => {
            Ok(from_safetensors(label, &SafetensorsHeader::open(path)?))
        }
        None => Err(CheckpointError::UnknownFormat {
            path: label,
            magic: if first.is_empty() {
                "empty file".into()
            } else {
                hex(&first)
            },
        }),
    }
}

fn totals(tensors: &[TensorEntry]) -> (u64, u64) {
    // Each extent lies inside the file and tensors do not overlap, so neither sum overflows
    // for bytes; element counts are summed saturating (zero-byte tensors have none).
    let bytes = tensors.iter().map(|t| t.bytes).sum();
    let params = tensors
        .iter()
        .fold(0u64, |a, t| a.saturating_add(t.n_elements));
    (bytes, params)
}

/// Summarises a parsed GGUF header.
pub fn from_gguf(path: String, f: &GgufFile) -> Inspection {
    let tensors: Vec<TensorEntry> = f
        .tensors
        .iter()
        .map(|t| TensorEntry {
            name: t.name.clone(),
            dtype: t.ggml_type.name().to_string(),
            shape: t.dims.clone(),
            n_elements: t.n_elements,
            bytes: t.n_bytes,
            offset: f.data_offset + t.offset,
        })
        .collect();
    let (total_bytes, parameter_count) = totals(&tensors);
    let metadata = f.metadata.iter().map(|(k, v)| summarise(k, v)).collect();
    Inspection {
        path,
        format: FileFormat::Gguf,
        file_size: f.file_size,
        tensor_count: tensors.len() as u64,
        total_bytes,
        parameter_count,
        tensors,
        gguf: Some(GgufDetails {
            version: f.version,
            alignment: f.alignment,
            data_offset: f.data_offset,
            metadata,
        }),
        safetensors: None,
    }
}

/// Summarises a parsed safetensors header.
pub fn from_safetensors(path: String, h: &SafetensorsHeader) -> Inspection {
    let tensors: Vec<TensorEntry> = h
        .tensors
        .iter()
        .map(|t| TensorEntry {
            name: t.name.clone(),
            dtype: t.dtype.to_string(),
            shape: t.shape.clone(),
            n_elements: t.n_elements,
            bytes: t.n_bytes(),
            offset: h.data_offset + t.data_offsets.0,
        })
        .collect();
    let (total_bytes, parameter_count) = totals(&tensors);
    Inspection {
        path,
        format: FileFormat::Safetensors,
        file_size: h.file_size,
        tensor_count: tensors.len() as u64,
        total_bytes,
        parameter_count,
        tensors,
        gguf: None,
        safetensors: Some(SafetensorsDetails {
            header_size: h.header_size,
            data_offset: h.data_offset,
            metadata: h.metadata.clone(),
        }),
    }
}

fn float_json(v: f64, shortest: String) -> serde_json::Value {
    if v.is_finite() {
        let parsed: f64 = shortest.parse().unwrap_or(v);
        serde_json::Number::from_f64(parsed)
            .map(serde_json::Value::Number)
            .unwrap_or(serde_json::Value::Null)
    } else if v.is_nan() {
        "NaN".into()
    } else if v > 0.0 {
        "inf".into()
    } else {
        "-inf".into()
    }
}

fn summarise(key: &str, v: &GgufValue) -> MetadataEntry {
    use serde_json::Value as J;
    let (element_type, len, value) = match v {
        GgufValue::Array(a) => (Some(array_type_name(a)), Some(a.len() as u64), None),
        GgufValue::U8(x) => (None, None, Some(J::from(*x))),
        GgufValue::I8(x) => (None, None, Some(J::from(*x))),
        GgufValue::U16(x) => (None, None, Some(J::from(*x))),
        GgufValue::I16(x) => (None, None, Some(J::from(*x))),
        GgufValue::U32(x) => (None, None, Some(J::from(*x))),
        GgufValue::I32(x) => (None, None, Some(J::from(*x))),
        GgufValue::U64(x) => (None, None, Some(J::from(*x))),
        GgufValue::I64(x) => (None, None, Some(J::from(*x))),
        GgufValue::F32(x) => (None, None, Some(float_json(f64::from(*x), x.to_string()))),
        GgufValue::F64(x) => (None, None, Some(float_json(*x, x.to_string()))),
        GgufValue::Bool(x) => (None, None, Some(J::from(*x))),
        GgufValue::String(s) => (None, None, Some(J::from(s.as_str()))),
    };
    MetadataEntry {
        key: key.to_string(),
        value_type: v.value_type().name().to_string(),
        element_type,
        len,
        value,
    }
}

/// `u32`, `string`, or for nested arrays `array<u32>` (the first inner array's element type).
fn array_type_name(a: &GgufArray) -> String {
    match a {
        GgufArray::Array(inner) => match inner.first() {
            Some(first) => format!("array<{}>", array_type_name(first)),
            None => "array".to_string(),
        },
        _ => a.element_type().name().to_string(),
    }
}

/// What a checkpoint holds as a quantized model: its layout, bits, group size and the
/// bits per weight of its quantized linears, with the size on disk.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QuantSummary {
    /// The file or directory.
    pub path: String,
    /// `gguf <FILE TYPE>`, `gptq`, `gptq_v2`, `awq`, `bitsandbytes nf4`, `bitsandbytes fp4`,
    /// `bitsandbytes int8`, `quantlab`, or `dense`.
    pub format: String,
    /// Bits of the codes (GGUF: of the file type), when one value holds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bits: Option<u32>,
    /// Group size (`-1` = per row; GGUF: the block size of the file type).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group_size: Option<i64>,
    /// Number of quantized linear weights (matrices).
    pub quantized_tensors: usize,
    /// Their bits per weight: every byte stored for them (codes, scales, zeros, `g_idx`,
    /// absmax, ...) over their number of weights.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bits_per_weight: Option<f64>,
    /// Tensors per storage type (GGUF types, or safetensors dtypes).
    pub types: BTreeMap<String, usize>,
    /// Bytes on disk (every file of a directory).
    pub size_bytes: u64,
}

/// [`QuantSummary`] of a GGUF file: the file type from `general.file_type`, the types of its
/// tensors, and the bits per weight of the 2-D `blk.*` weights.
pub fn summarize_gguf(path: &Path) -> Result<QuantSummary> {
    let f = GgufFile::open(path)?;
    let ftype = f
        .get("general.file_type")
        .and_then(|v| v.as_integer())
        .map(|v| v as u32);
    let name = ftype.map(llama_ftype_name).unwrap_or("unknown");
    let mut types = BTreeMap::new();
    let (mut bytes, mut n, mut count) = (0u64, 0u64, 0usize);
    for t in &f.tensors {
        *types.entry(t.ggml_type.name().to_string()).or_insert(0) += 1;
        if t.name.starts_with("blk.") && t.dims.len() == 2 && t.ggml_type.is_quantized() {
            bytes += t.n_bytes;
            n += t.n_elements;
            count += 1;
        }
    }
    let main = ftype.and_then(ftype_main_type);
    Ok(QuantSummary {
        path: path.display().to_string(),
        format: format!("gguf {name}"),
        bits: main.map(|t| t.bits_per_weight().floor() as u32),
        group_size: main.map(|t| t.block_size() as i64),
        quantized_tensors: count,
        bits_per_weight: (n > 0).then(|| 8.0 * bytes as f64 / n as f64),
        types,
        size_bytes: f.file_size,
    })
}

/// llama.cpp's name of `general.file_type` (`enum llama_ftype`).
pub fn llama_ftype_name(ft: u32) -> &'static str {
    match ft {
        0 => "F32",
        1 => "F16",
        2 => "Q4_0",
        3 => "Q4_1",
        7 => "Q8_0",
        8 => "Q5_0",
        9 => "Q5_1",
        10 => "Q2_K",
        11 => "Q3_K_S",
        12 => "Q3_K_M",
        13 => "Q3_K_L",
        14 => "Q4_K_S",
        15 => "Q4_K_M",
        16 => "Q5_K_S",
        17 => "Q5_K_M",
        18 => "Q6_K",
        32 => "BF16",
        _ => "other",
    }
}

fn ftype_main_type(ft: u32) -> Option<crate::gguf::GgmlType> {
    use crate::gguf::GgmlType as T;
    Some(match ft {
        0 => T::F32,
        1 => T::F16,
        2 => T::Q4_0,
        3 => T::Q4_1,
        7 => T::Q8_0,
        8 => T::Q5_0,
        9 => T::Q5_1,
        10 => T::Q2_K,
        11..=13 => T::Q3_K,
        14 | 15 => T::Q4_K,
        16 | 17 => T::Q5_K,
        18 => T::Q6_K,
        32 => T::BF16,
        _ => return None,
    })
}

/// [`QuantSummary`] of a Hugging Face directory: the layout from its config
/// ([`crate::export::read::detect_format`]; a `quantization_config.json` with
/// `quant_method: "quantlab"` is the project's own), bits and group size from the config,
/// and bits per weight from the stored bytes of each quantized linear's tensors over its
/// weights (shapes from the dequantized read-back).
pub fn summarize_dir(dir: &Path) -> Result<QuantSummary> {
    use crate::export::read::{
        detect_format as detect_dir_format, read_quantized_dir, DetectedFormat,
    };
    let mut size = 0u64;
    let mut shards = Vec::new();
    for e in
        std::fs::read_dir(dir).map_err(|e| CheckpointError::io(&dir.display().to_string(), e))?
    {
        let e = e.map_err(|e| CheckpointError::io(&dir.display().to_string(), e))?;
        let p = e.path();
        if p.is_file() {
            size += e.metadata().map(|m| m.len()).unwrap_or(0);
            if p.extension().is_some_and(|x| x == "safetensors") {
                shards.push(p);
            }
        }
    }
    shards.sort();
    let read_json = |p: &Path| -> Option<serde_json::Value> {
        serde_json::from_slice(&std::fs::read(p).ok()?).ok()
    };
    let mut types = BTreeMap::new();
    let mut tensor_bytes: BTreeMap<String, u64> = BTreeMap::new();
    for s in &shards {
        let ins = inspect(s)?;
        for t in ins.tensors {
            *types.entry(t.dtype.clone()).or_insert(0) += 1;
            tensor_bytes.insert(t.name, t.bytes);
        }
    }
    let own = read_json(&dir.join("quantization_config.json"));
    if let Some(q) = own.filter(|q| q["quant_method"] == "quantlab") {
        let layers = q["layers"].as_object().cloned().unwrap_or_default();
        let bpw: Vec<f64> = layers
            .values()
            .filter_map(|l| l["bits_per_weight"].as_f64())
            .collect();
        return Ok(QuantSummary {
            path: dir.display().to_string(),
            format: "quantlab".into(),
            bits: q["bits"].as_u64().map(|b| b as u32),
            group_size: q["group_size"].as_i64(),
            quantized_tensors: bpw.len(),
            bits_per_weight: (!bpw.is_empty()).then(|| bpw.iter().sum::<f64>() / bpw.len() as f64),
            types,
            size_bytes: size,
        });
    }
    let fmt = detect_dir_format(dir)?;
    let config = read_json(&dir.join("config.json")).unwrap_or_default();
    let qc = &config["quantization_config"];
    let (name, bits, gs) = match fmt {
        DetectedFormat::Dense => ("dense".to_string(), None, None),
        DetectedFormat::Gptq(f) => (
            f.checkpoint_format().to_string(),
            qc["bits"].as_u64().map(|b| b as u32),
            qc["group_size"].as_i64(),
        ),
        DetectedFormat::Awq => (
            "awq".into(),
            qc["bits"]
                .as_u64()
                .or(qc["w_bit"].as_u64())
                .map(|b| b as u32),
            qc["group_size"].as_i64().or(qc["q_group_size"].as_i64()),
        ),
        DetectedFormat::Bnb4 => (
            format!(
                "bitsandbytes {}",
                qc["bnb_4bit_quant_type"].as_str().unwrap_or("nf4")
            ),
            Some(4),
            None,
        ),
        DetectedFormat::Int8 => ("bitsandbytes int8".into(), Some(8), Some(-1)),
    };
    let quantized_suffix = match fmt {
        DetectedFormat::Gptq(_) | DetectedFormat::Awq => Some(".qweight"),
        DetectedFormat::Bnb4 => Some(".weight.absmax"),
        DetectedFormat::Int8 => Some(".SCB"),
        DetectedFormat::Dense => None,
    };
    let prefixes: Vec<String> = match quantized_suffix {
        Some(sfx) => tensor_bytes
            .keys()
            .filter_map(|k| k.strip_suffix(sfx).map(str::to_string))
            .collect(),
        None => Vec::new(),
    };
    let mut bpw = None;
    let mut gs = gs;
    if !prefixes.is_empty() {
        let (_, weights) = read_quantized_dir(dir)?;
        let (mut bytes, mut n) = (0u64, 0u64);
        for p in &prefixes {
            let w = format!("{p}.weight");
            if let Some((_, a)) = weights.iter().find(|(name, _)| *name == w) {
                n += a.len() as u64;
                bytes += tensor_bytes
                    .iter()
                    .filter(|(k, _)| k.starts_with(&format!("{p}.")))
                    .map(|(_, b)| *b)
                    .sum::<u64>();
            }
        }
        bpw = (n > 0).then(|| 8.0 * bytes as f64 / n as f64);
        if matches!(fmt, DetectedFormat::Bnb4) {
            // blocksize from the first quant state
            let key = tensor_bytes
                .keys()
                .find(|k| k.contains(".weight.quant_state.bitsandbytes__"))
                .cloned();
            if let Some(k) = key {
                for s in &shards {
                    if let Ok(st) = read_u8_tensor(s, &k) {
                        let v: Option<serde_json::Value> = serde_json::from_slice(&st).ok();
                        gs = v.and_then(|v| v["blocksize"].as_i64());
                        break;
                    }
                }
            }
        }
    }
    Ok(QuantSummary {
        path: dir.display().to_string(),
        format: name,
        bits,
        group_size: gs,
        quantized_tensors: prefixes.len(),
        bits_per_weight: bpw,
        types,
        size_bytes: size,
    })
}

fn read_u8_tensor(file: &Path, name: &str) -> Result<Vec<u8>> {
    let h = SafetensorsHeader::open(file)?;
    let t =
        h.tensors.iter().find(|t| t.name == name).ok_or_else(|| {
            CheckpointError::malformed(&file.display().to_string(), name, "missing")
        })?;
    let mut f = std::fs::File::open(file)
        .map_err(|e| CheckpointError::io(&file.display().to_string(), e))?;
    use std::io::{Seek, SeekFrom};
    let (a, b) = t.data_offsets;
    f.seek(SeekFrom::Start(h.data_offset + a))
        .map_err(|e| CheckpointError::io(&file.display().to_string(), e))?;
    let mut buf = vec![0u8; b.saturating_sub(a).min(1 << 20) as usize];
    f.read_exact(&mut buf)
        .map_err(|e| CheckpointError::io(&file.display().to_string(), e))?;
    Ok(buf)
}

/// [`summarize_gguf`] for a GGUF file, [`summarize_dir`] for a directory.
pub fn summarize(path: &Path) -> Result<QuantSummary> {
    if path.is_dir() {
        summarize_dir(path)
    } else {
        summarize_gguf(path)
    }
}
