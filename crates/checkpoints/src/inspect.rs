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
