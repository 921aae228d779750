//! A GGUF reader (versions 2 and 3), robust against hostile files.
//!
//! Layout (little-endian): magic `GGUF`, `u32` version, `u64` tensor count, `u64` metadata
//! count; then the metadata key/value pairs (`string` key, `u32` value type, value); then per
//! tensor its name, `u32` number of dimensions, `u64` dims `ne[0..n]` (innermost first),
//! `u32` ggml type and `u64` offset relative to the tensor data section. The data section
//! starts at the end of the tensor infos rounded up to `general.alignment` (default 32).
//! Strings are a `u64` byte length followed by UTF-8 bytes; arrays are a `u32` element type, a
//! `u64` count and the elements.
//!
//! Every length is checked against the bytes left in the file before anything is allocated,
//! so a tiny file that claims a huge array fails at once; tensor extents are checked against
//! the file size, offsets against the alignment, and tensors against each other (no overlap).
//! The reader goes through a bounded [`Read`] (a buffered file, or a byte slice): no `unsafe`,
//! no memory map.
//!
//! ```
//! use quantlab_checkpoints::gguf::{GgufFile, GgufValue};
//! // A minimal GGUF v3 file: no tensors, one u32 key.
//! let mut b = Vec::new();
//! b.extend_from_slice(b"GGUF");
//! b.extend_from_slice(&3u32.to_le_bytes());
//! b.extend_from_slice(&0u64.to_le_bytes()); // tensors
//! b.extend_from_slice(&1u64.to_le_bytes()); // metadata pairs
//! b.extend_from_slice(&6u64.to_le_bytes()); // key length
//! b.extend_from_slice(b"answer");
//! b.extend_from_slice(&4u32.to_le_bytes()); // u32
//! b.extend_from_slice(&42u32.to_le_bytes());
//! let f = GgufFile::parse(&b, "<memory>").unwrap();
//! assert_eq!(f.version, 3);
//! assert_eq!(f.get("answer"), Some(&GgufValue::U32(42)));
//! assert_eq!(f.alignment, 32);
//! assert_eq!(f.data_offset, 64); // 46 header bytes, rounded up to 32
//!
//! // Truncate the same bytes anywhere: an error naming the field, never a panic.
//! let err = GgufFile::parse(&b[..30], "<memory>").unwrap_err().to_string();
//! assert!(err.contains("metadata"), "{err}");
//! ```

mod types;

pub use types::GgmlType;

use crate::error::{CheckpointError, Result};
use std::collections::HashSet;
use std::io::{BufReader, Read};
use std::path::Path;

/// The four bytes every GGUF file starts with.
pub const GGUF_MAGIC: [u8; 4] = *b"GGUF";
/// Alignment of the tensor data when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// The metadata key that sets the alignment (a `u32`, a power of two).
pub const ALIGNMENT_KEY: &str = "general.alignment";
/// Most dimensions a ggml tensor has (`GGML_MAX_DIMS`).
pub const MAX_DIMS: u32 = 4;
/// Deepest nesting of arrays accepted (an array of arrays is depth 2).
pub const MAX_ARRAY_NESTING: usize = 8;

/// The type tag of a metadata value (`enum gguf_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[non_exhaustive]
pub enum GgufValueType {
    /// `u8` (id 0).
    U8,
    /// `i8` (id 1).
    I8,
    /// `u16` (id 2).
    U16,
    /// `i16` (id 3).
    I16,
    /// `u32` (id 4).
    U32,
    /// `i32` (id 5).
    I32,
    /// `f32` (id 6).
    F32,
    /// `bool`, one byte 0 or 1 (id 7).
    Bool,
    /// UTF-8 string with a `u64` length (id 8).
    String,
    /// Array: `u32` element type, `u64` count, elements (id 9).
    Array,
    /// `u64` (id 10).
    U64,
    /// `i64` (id 11).
    I64,
    /// `f64` (id 12).
    F64,
}

impl GgufValueType {
    /// The type with GGUF id `id`, if any.
    pub fn from_id(id: u32) -> Option<Self> {
        use GgufValueType::*;
        Some(match id {
            0 => U8,
            1 => I8,
            2 => U16,
            3 => I16,
            4 => U32,
            5 => I32,
            6 => F32,
            7 => Bool,
            8 => String,
            9 => Array,
            10 => U64,
            11 => I64,
            12 => F64,
            _ => return None,
        })
    }

    /// The GGUF id of the type.
    pub fn id(self) -> u32 {
        use GgufValueType::*;
        match self {
            U8 => 0,
            I8 => 1,
            U16 => 2,
            I16 => 3,
            U32 => 4,
            I32 => 5,
            F32 => 6,
            Bool => 7,
            String => 8,
            Array => 9,
            U64 => 10,
            I64 => 11,
            F64 => 12,
        }
    }

    /// A short lower-case name: `u8`, ..., `f64`, `bool`, `string`, `array`.
    pub fn name(self) -> &'static str {
        use GgufValueType::*;
        match self {
            U8 => "u8",
            I8 => "i8",
            U16 => "u16",
            I16 => "i16",
            U32 => "u32",
            I32 => "i32",
            F32 => "f32",
            Bool => "bool",
            String => "string",
            Array => "array",
            U64 => "u64",
            I64 => "i64",
            F64 => "f64",
        }
    }

    /// The fewest bytes one value of this type takes in a file (the whole value for
    /// scalars, the length prefix for strings, type and count for arrays).
    pub fn min_encoded_size(self) -> u64 {
        use GgufValueType::*;
        match self {
            U8 | I8 | Bool => 1,
            U16 | I16 => 2,
            U32 | I32 | F32 => 4,
            U64 | I64 | F64 | String => 8,
            Array => 12,
        }
    }
}

impl std::fmt::Display for GgufValueType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One metadata value.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum GgufValue {
    /// `u8`.
    U8(u8),
    /// `i8`.
    I8(i8),
    /// `u16`.
    U16(u16),
    /// `i16`.
    I16(i16),
    /// `u32`.
    U32(u32),
    /// `i32`.
    I32(i32),
    /// `f32`.
    F32(f32),
    /// `bool`.
    Bool(bool),
    /// A string (invalid UTF-8 replaced by U+FFFD).
    String(String),
    /// An array, stored compactly by element type.
    Array(GgufArray),
    /// `u64`.
    U64(u64),
    /// `i64`.
    I64(i64),
    /// `f64`.
    F64(f64),
}

/// A metadata array: one vector per element type (arrays of arrays nest).
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum GgufArray {
    /// `u8` elements.
    U8(Vec<u8>),
    /// `i8` elements.
    I8(Vec<i8>),
    /// `u16` elements.
    U16(Vec<u16>),
    /// `i16` elements.
    I16(Vec<i16>),
    /// `u32` elements.
    U32(Vec<u32>),
    /// `i32` elements.
    I32(Vec<i32>),
    /// `f32` elements.
    F32(Vec<f32>),
    /// `bool` elements.
    Bool(Vec<bool>),
    /// String elements.
    String(Vec<String>),
    /// Nested arrays.
    Array(Vec<GgufArray>),
    /// `u64` elements.
    U64(Vec<u64>),
    /// `i64` elements.
    I64(Vec<i64>),
    /// `f64` elements.
    F64(Vec<f64>),
}

impl GgufValue {
    /// The value's type tag.
    pub fn value_type(&self) -> GgufValueType {
        match self {
            GgufValue::U8(_) => GgufValueType::U8,
            GgufValue::I8(_) => GgufValueType::I8,
            GgufValue::U16(_) => GgufValueType::U16,
            GgufValue::I16(_) => GgufValueType::I16,
            GgufValue::U32(_) => GgufValueType::U32,
            GgufValue::I32(_) => GgufValueType::I32,
            GgufValue::F32(_) => GgufValueType::F32,
            GgufValue::Bool(_) => GgufValueType::Bool,
            GgufValue::String(_) => GgufValueType::String,
            GgufValue::Array(_) => GgufValueType::Array,
            GgufValue::U64(_) => GgufValueType::U64,
            GgufValue::I64(_) => GgufValueType::I64,
            GgufValue::F64(_) => GgufValueType::F64,
        }
    }

    /// The value as an `i128` if it is an integer of any width (not bool).
    pub fn as_integer(&self) -> Option<i128> {
        Some(match *self {
            GgufValue::U8(v) => v.into(),
            GgufValue::I8(v) => v.into(),
            GgufValue::U16(v) => v.into(),
            GgufValue::I16(v) => v.into(),
            GgufValue::U32(v) => v.into(),
            GgufValue::I32(v) => v.into(),
            GgufValue::U64(v) => v.into(),
            GgufValue::I64(v) => v.into(),
            _ => return None,
        })
    }

    /// The value as a string slice, if it is a string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            GgufValue::String(s) => Some(s),
            _ => None,
        }
    }

    /// The value as an array, if it is one.
    pub fn as_array(&self) -> Option<&GgufArray> {
        match self {
            GgufValue::Array(a) => Some(a),
            _ => None,
        }
    }
}

impl GgufArray {
    /// The element type.
    pub fn element_type(&self) -> GgufValueType {
        match self {
            GgufArray::U8(_) => GgufValueType::U8,
            GgufArray::I8(_) => GgufValueType::I8,
            GgufArray::U16(_) => GgufValueType::U16,
            GgufArray::I16(_) => GgufValueType::I16,
            GgufArray::U32(_) => GgufValueType::U32,
            GgufArray::I32(_) => GgufValueType::I32,
            GgufArray::F32(_) => GgufValueType::F32,
            GgufArray::Bool(_) => GgufValueType::Bool,
            GgufArray::String(_) => GgufValueType::String,
            GgufArray::Array(_) => GgufValueType::Array,
            GgufArray::U64(_) => GgufValueType::U64,
            GgufArray::I64(_) => GgufValueType::I64,
            GgufArray::F64(_) => GgufValueType::F64,
        }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            GgufArray::U8(v) => v.len(),
            GgufArray::I8(v) => v.len(),
            GgufArray::U16(v) => v.len(),
            GgufArray::I16(v) => v.len(),
            GgufArray::U32(v) => v.len(),
            GgufArray::I32(v) => v.len(),
            GgufArray::F32(v) => v.len(),
            GgufArray::Bool(v) => v.len(),
            GgufArray::String(v) => v.len(),
            GgufArray::Array(v) => v.len(),
            GgufArray::U64(v) => v.len(),
            GgufArray::I64(v) => v.len(),
            GgufArray::F64(v) => v.len(),
        }
    }

    /// Whether the array has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One tensor's entry in the GGUF header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GgufTensorInfo {
    /// The tensor's name.
    pub name: String,
    /// `ne[0..n_dims]`, innermost (contiguous) dimension first: a linear layer with
    /// `in_features` inputs and `out_features` outputs has `dims == [in, out]`.
    pub dims: Vec<u64>,
    /// The storage type.
    pub ggml_type: GgmlType,
    /// Offset of the data from the start of the data section (a multiple of the alignment).
    pub offset: u64,
    /// Number of weights (product of `dims`; 1 for zero dimensions).
    pub n_elements: u64,
    /// Bytes of data: `n_elements / block_size * type_size`.
    pub n_bytes: u64,
}

/// The parsed header of a GGUF file: metadata and tensor infos (not the tensor data).
#[derive(Debug, Clone, PartialEq)]
pub struct GgufFile {
    /// Format version (2 or 3).
    pub version: u32,
    /// Metadata pairs in file order (keys are unique).
    pub metadata: Vec<(String, GgufValue)>,
    /// Tensor infos in file order (names are unique, extents inside the file, no overlap).
    pub tensors: Vec<GgufTensorInfo>,
    /// Alignment of the data section and of every tensor offset.
    pub alignment: u64,
    /// Absolute file offset where the tensor data section starts.
    pub data_offset: u64,
    /// Size of the file (or buffer) in bytes.
    pub file_size: u64,
}

impl GgufFile {
    /// Reads the header of the GGUF file at `path` through a buffered bounded reader.
    ///
    /// Errors name the file and the field or tensor at fault.
    pub fn open(path: &Path) -> Result<GgufFile> {
        let label = path.display().to_string();
        let file = std::fs::File::open(path).map_err(|e| CheckpointError::io(&label, e))?;
        let size = file
            .metadata()
            .map_err(|e| CheckpointError::io(&label, e))?
            .len();
        Self::read(BufReader::with_capacity(1 << 16, file), size, &label)
    }

    /// Parses a GGUF header from bytes holding the whole file; `label` names it in errors.
    pub fn parse(bytes: &[u8], label: &str) -> Result<GgufFile> {
        Self::read(bytes, bytes.len() as u64, label)
    }

    /// Reads a GGUF header from `reader`, positioned at the file start, of a file of
    /// `file_size` bytes; `label` names the file in errors. No length read from the file is
    /// trusted beyond `file_size`.
    pub fn read<R: Read>(reader: R, file_size: u64, label: &str) -> Result<GgufFile> {
        let mut r = Bounded {
            inner: reader,
            pos: 0,
            len: file_size,
            path: label,
        };
        let magic: [u8; 4] = r.array(&|| "magic".into())?;
        if magic != GGUF_MAGIC {
            return Err(CheckpointError::malformed(
                label,
                "magic",
                format!("expected \"GGUF\", found {}", hex(&magic)),
            ));
        }
        let version = r.u32(&|| "version".into())?;
        match version {
            2 | 3 => {}
            1 => {
                return Err(CheckpointError::malformed(
                    label,
                    "version",
                    "GGUF version 1 (32-bit lengths) is not supported",
                ))
            }
            v if v.swap_bytes() == 2 || v.swap_bytes() == 3 => {
                return Err(CheckpointError::malformed(
                    label,
                    "version",
                    "big-endian GGUF files are not supported",
                ))
            }
            v => {
                return Err(CheckpointError::malformed(
                    label,
                    "version",
                    format!("unsupported GGUF version {v} (expected 2 or 3)"),
                ))
            }
        }
        let n_tensors = r.u64(&|| "tensor count".into())?;
        let n_kv = r.u64(&|| "metadata count".into())?;
        // Each pair takes at least 13 bytes, each tensor info at least 24.
        let least = n_kv.checked_mul(8 + 4 + 1).and_then(|a| {
            n_tensors
                .checked_mul(8 + 4 + 4 + 8)
                .and_then(|b| a.checked_add(b))
        });
        if least.is_none_or(|n| n > r.left()) {
            let detail = format!(
                "{n_kv} metadata pairs and {n_tensors} tensors cannot fit in the {} bytes left",
                r.left()
            );
            return Err(CheckpointError::malformed(label, "header counts", detail));
        }

        let mut metadata: Vec<(String, GgufValue)> = Vec::new();
        let mut keys = HashSet::new();
        for i in 0..n_kv {
            let key = r.string(&|| format!("metadata pair {i} key"))?;
            let field = |what: &str| format!("metadata key {key:?}{what}");
            let ty_id = r.u32(&|| field(" value type"))?;
            let ty = GgufValueType::from_id(ty_id).ok_or_else(|| {
                CheckpointError::malformed(label, field(""), format!("unknown value type {ty_id}"))
            })?;
            let value = r.value(ty, 0, &|| field(""))?;
            if !keys.insert(key.clone()) {
                return Err(CheckpointError::malformed(
                    label,
                    field(""),
                    "duplicate key",
                ));
            }
            metadata.push((key, value));
        }

        let alignment = match metadata.iter().find(|(k, _)| k == ALIGNMENT_KEY) {
            None => DEFAULT_ALIGNMENT,
            Some((_, GgufValue::U32(a))) if *a != 0 && a.is_power_of_two() => u64::from(*a),
            Some((_, v)) => {
                return Err(CheckpointError::malformed(
                    label,
                    format!("metadata key {ALIGNMENT_KEY:?}"),
                    format!("must be a u32 power of two, found {v:?}"),
                ))
            }
        };

        let mut tensors: Vec<GgufTensorInfo> = Vec::new();
        let mut names = HashSet::new();
        for i in 0..n_tensors {
            let name = r.string(&|| format!("tensor {i} name"))?;
            let field = || format!("tensor {name:?}");
            let n_dims = r.u32(&|| format!("tensor {name:?} n_dims"))?;
            if n_dims > MAX_DIMS {
                return Err(CheckpointError::malformed(
                    label,
                    field(),
                    format!("{n_dims} dimensions (at most {MAX_DIMS})"),
                ));
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for d in 0..n_dims {
                let ne = r.u64(&|| format!("tensor {name:?} ne[{d}]"))?;
                if ne > i64::MAX as u64 {
                    return Err(CheckpointError::malformed(
                        label,
                        format!("tensor {name:?} ne[{d}]"),
                        format!("dimension {ne} exceeds i64::MAX"),
                    ));
                }
                dims.push(ne);
            }
            let type_id = r.u32(&|| format!("tensor {name:?} type"))?;
            let offset = r.u64(&|| format!("tensor {name:?} offset"))?;
            let ggml_type = GgmlType::from_id(type_id).ok_or_else(|| {
                CheckpointError::malformed(
                    label,
                    field(),
                    format!("unknown or removed ggml type id {type_id}"),
                )
            })?;
            let n_elements = dims
                .iter()
                .try_fold(1u64, |a, &d| a.checked_mul(d))
                .filter(|&n| n <= i64::MAX as u64)
                .ok_or_else(|| {
                    CheckpointError::malformed(
                        label,
                        field(),
                        format!("element count of shape {dims:?} overflows"),
                    )
                })?;
            let ne0 = dims.first().copied().unwrap_or(1);
            if ne0 % ggml_type.block_size() != 0 {
                return Err(CheckpointError::malformed(
                    label,
                    field(),
                    format!(
                        "ne[0] = {ne0} is not a multiple of the {} block size {}",
                        ggml_type.name(),
                        ggml_type.block_size()
                    ),
                ));
            }
            let n_bytes = (n_elements / ggml_type.block_size())
                .checked_mul(ggml_type.type_size())
                .ok_or_else(|| CheckpointError::malformed(label, field(), "byte size overflows"))?;
            if offset % alignment != 0 {
                return Err(CheckpointError::malformed(
                    label,
                    field(),
                    format!("offset {offset} is not a multiple of the alignment {alignment}"),
                ));
            }
            if !names.insert(name.clone()) {
                return Err(CheckpointError::malformed(
                    label,
                    field(),
                    "duplicate tensor name",
                ));
            }
            tensors.push(GgufTensorInfo {
                name,
                dims,
                ggml_type,
                offset,
                n_elements,
                n_bytes,
            });
        }

        let header_end = r.pos;
        let data_offset = header_end
            .checked_next_multiple_of(alignment)
            .ok_or_else(|| CheckpointError::malformed(label, "data offset", "overflows"))?;
        for t in &tensors {
            let end = data_offset
                .checked_add(t.offset)
                .and_then(|s| s.checked_add(t.n_bytes));
            match end {
                Some(end) if end <= file_size => {}
                _ => {
                    return Err(CheckpointError::malformed(
                        label,
                        format!("tensor {:?}", t.name),
                        format!(
                            "data at {} + {} ({} bytes) runs past the end of the file ({file_size} bytes)",
                            data_offset, t.offset, t.n_bytes
                        ),
                    ))
                }
            }
        }
        let mut order: Vec<&GgufTensorInfo> = tensors.iter().filter(|t| t.n_bytes > 0).collect();
        order.sort_by_key(|t| t.offset);
        for w in order.windows(2) {
            if w[0].offset + w[0].n_bytes > w[1].offset {
                return Err(CheckpointError::malformed(
                    label,
                    format!("tensor {:?}", w[1].name),
                    format!(
                        "data at offset {} overlaps tensor {:?} ({} bytes at offset {})",
                        w[1].offset, w[0].name, w[0].n_bytes, w[0].offset
                    ),
                ));
            }
        }

        Ok(GgufFile {
            version,
            metadata,
            tensors,
            alignment,
            data_offset,
            file_size,
        })
    }

    /// The metadata value under `key`, if present.
    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.metadata.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// The tensor info named `name`, if present.
    pub fn tensor(&self, name: &str) -> Option<&GgufTensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// The absolute byte range of a tensor's data in the file.
    pub fn tensor_range(&self, t: &GgufTensorInfo) -> std::ops::Range<u64> {
        let start = self.data_offset + t.offset;
        start..start + t.n_bytes
    }
}

/// Lower-case hex of a few bytes, for error messages.
pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A reader that knows how many bytes are left and refuses any length beyond them.
struct Bounded<'p, R> {
    inner: R,
    pos: u64,
    len: u64,
    path: &'p str,
}

/// Describes the field being read, only called to build an error.
type Field<'a> = &'a dyn Fn() -> String;

impl<R: Read> Bounded<'_, R> {
    fn left(&self) -> u64 {
        self.len.saturating_sub(self.pos)
    }

    /// Fails unless `n` more bytes are in the file.
    fn need(&self, n: u64, field: Field) -> Result<()> {
        if n > self.left() {
            return Err(CheckpointError::malformed(
                self.path,
                field(),
                format!(
                    "needs {n} bytes at offset {}, only {} left in the file",
                    self.pos,
                    self.left()
                ),
            ));
        }
        Ok(())
    }

    fn fill(&mut self, buf: &mut [u8], field: Field) -> Result<()> {
        self.need(buf.len() as u64, field)?;
        self.inner.read_exact(buf).map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                CheckpointError::malformed(
                    self.path,
                    field(),
                    format!("file ended early at offset {}", self.pos),
                )
            } else {
                CheckpointError::io(self.path, e)
            }
        })?;
        self.pos += buf.len() as u64;
        Ok(())
    }

    fn array<const N: usize>(&mut self, field: Field) -> Result<[u8; N]> {
        let mut b = [0u8; N];
        self.fill(&mut b, field)?;
        Ok(b)
    }

    /// Reads `n` bytes into a new vector, allocated only once `n` is known to fit.
    fn bytes(&mut self, n: u64, field: Field) -> Result<Vec<u8>> {
        self.need(n, field)?;
        let n = usize::try_from(n).map_err(|_| {
            CheckpointError::malformed(self.path, field(), "length exceeds the address space")
        })?;
        let mut v = vec![0u8; n];
        self.fill(&mut v, field)?;
        Ok(v)
    }

    fn u32(&mut self, field: Field) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(field)?))
    }

    fn u64(&mut self, field: Field) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(field)?))
    }

    fn string(&mut self, field: Field) -> Result<String> {
        let n = self.u64(&|| format!("{} length", field()))?;
        let b = self.bytes(n, field)?;
        Ok(match String::from_utf8(b) {
            Ok(s) => s,
            Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
        })
    }

    fn bool(&mut self, field: Field) -> Result<bool> {
        match self.array::<1>(field)?[0] {
            0 => Ok(false),
            1 => Ok(true),
            b => Err(CheckpointError::malformed(
                self.path,
                field(),
                format!("bool byte is {b}, not 0 or 1"),
            )),
        }
    }

    fn value(&mut self, ty: GgufValueType, depth: usize, field: Field) -> Result<GgufValue> {
        use GgufValueType as T;
        Ok(match ty {
            T::U8 => GgufValue::U8(u8::from_le_bytes(self.array(field)?)),
            T::I8 => GgufValue::I8(i8::from_le_bytes(self.array(field)?)),
            T::U16 => GgufValue::U16(u16::from_le_bytes(self.array(field)?)),
            T::I16 => GgufValue::I16(i16::from_le_bytes(self.array(field)?)),
            T::U32 => GgufValue::U32(u32::from_le_bytes(self.array(field)?)),
            T::I32 => GgufValue::I32(i32::from_le_bytes(self.array(field)?)),
            T::F32 => GgufValue::F32(f32::from_le_bytes(self.array(field)?)),
            T::U64 => GgufValue::U64(u64::from_le_bytes(self.array(field)?)),
            T::I64 => GgufValue::I64(i64::from_le_bytes(self.array(field)?)),
            T::F64 => GgufValue::F64(f64::from_le_bytes(self.array(field)?)),
            T::Bool => GgufValue::Bool(self.bool(field)?),
            T::String => GgufValue::String(self.string(field)?),
            T::Array => GgufValue::Array(self.array_value(depth + 1, field)?),
        })
    }

    /// Reads an array's element type, count and elements; `depth` counts this array.
    fn array_value(&mut self, depth: usize, field: Field) -> Result<GgufArray> {
        if depth > MAX_ARRAY_NESTING {
            return Err(CheckpointError::malformed(
                self.path,
                field(),
                format!("arrays nested deeper than {MAX_ARRAY_NESTING}"),
            ));
        }
        let ty_id = self.u32(&|| format!("{} array element type", field()))?;
        let ty = GgufValueType::from_id(ty_id).ok_or_else(|| {
            CheckpointError::malformed(
                self.path,
                field(),
                format!("unknown array element type {ty_id}"),
            )
        })?;
        let count = self.u64(&|| format!("{} array length", field()))?;
        let least = count.checked_mul(ty.min_encoded_size());
        if least.is_none_or(|n| n > self.left()) {
            return Err(CheckpointError::malformed(
                self.path,
                field(),
                format!(
                    "array of {count} {} elements cannot fit in the {} bytes left at offset {}",
                    ty.name(),
                    self.left(),
                    self.pos
                ),
            ));
        }
        // From here `count * min_encoded_size <= left`, so vectors are bounded by the file.
        macro_rules! numeric {
            ($variant:ident, $t:ty) => {{
                const W: usize = std::mem::size_of::<$t>();
                let raw = self.bytes(count * W as u64, field)?;
                GgufArray::$variant(
                    raw.chunks_exact(W)
                        .map(|c| <$t>::from_le_bytes(c.try_into().expect("chunk of W bytes")))
                        .collect(),
                )
            }};
        }
        use GgufValueType as T;
        Ok(match ty {
            T::U8 => GgufArray::U8(self.bytes(count, field)?),
            T::I8 => numeric!(I8, i8),
            T::U16 => numeric!(U16, u16),
            T::I16 => numeric!(I16, i16),
            T::U32 => numeric!(U32, u32),
            T::I32 => numeric!(I32, i32),
            T::F32 => numeric!(F32, f32),
            T::U64 => numeric!(U64, u64),
            T::I64 => numeric!(I64, i64),
            T::F64 => numeric!(F64, f64),
            T::Bool => {
                let raw = self.bytes(count, field)?;
                let mut v = Vec::with_capacity(raw.len());
                for (j, &b) in raw.iter().enumerate() {
                    match b {
                        0 => v.push(false),
                        1 => v.push(true),
                        _ => {
                            return Err(CheckpointError::malformed(
                                self.path,
                                format!("{}[{j}]", field()),
                                format!("bool byte is {b}, not 0 or 1"),
                            ))
                        }
                    }
                }
                GgufArray::Bool(v)
            }
            T::String => {
                let mut v = Vec::new();
                for j in 0..count {
                    v.push(self.string(&|| format!("{}[{j}]", field()))?);
                }
                GgufArray::String(v)
            }
            T::Array => {
                let mut v = Vec::new();
                for j in 0..count {
                    v.push(self.array_value(depth + 1, &|| format!("{}[{j}]", field()))?);
                }
                GgufArray::Array(v)
            }
        })
    }
}
