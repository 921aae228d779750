//! A bounded reader of safetensors headers.
//!
//! Layout: a `u64` little-endian header length `N`, `N` bytes of UTF-8 JSON, then the data.
//! The JSON maps tensor names to `{"dtype", "shape", "data_offsets": [begin, end]}` (offsets
//! relative to the data section) plus an optional `"__metadata__"` map of strings.
//!
//! The same rules as the `safetensors` crate, with errors naming the file and the tensor:
//! `N` at most [`MAX_HEADER_SIZE`] and inside the file, tensors contiguous from offset 0 in
//! offset order, each extent equal to its element count times the dtype's size, the last
//! one ending exactly at the end of the file. Only the header is read (never the data).
//!
//! ```
//! use quantlab_checkpoints::safetensors_header::SafetensorsHeader;
//! let json = br#"{"w":{"dtype":"F16","shape":[2,3],"data_offsets":[0,12]}}"#;
//! let mut b = (json.len() as u64).to_le_bytes().to_vec();
//! b.extend_from_slice(json);
//! b.extend_from_slice(&[0u8; 12]);
//! let h = SafetensorsHeader::parse(&b, "<memory>").unwrap();
//! assert_eq!(h.tensors[0].shape, vec![2, 3]);
//! assert_eq!(h.tensors[0].dtype.to_string(), "F16");
//! // One data byte missing: the error names the file and the problem.
//! let err = SafetensorsHeader::parse(&b[..b.len() - 1], "<memory>").unwrap_err();
//! assert!(err.to_string().contains("<memory>"), "{err}");
//! ```

use crate::error::{CheckpointError, Result};
pub use ::safetensors::Dtype;
use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;

/// Largest JSON header accepted (the `safetensors` crate's limit).
pub const MAX_HEADER_SIZE: u64 = 100_000_000;

/// The key of the free-form string metadata in the JSON header.
pub const METADATA_KEY: &str = "__metadata__";

/// One tensor of a safetensors file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SafetensorsTensorInfo {
    /// The tensor's name.
    pub name: String,
    /// Element type.
    pub dtype: Dtype,
    /// Shape, outermost dimension first (row-major).
    pub shape: Vec<u64>,
    /// `[begin, end)` byte offsets relative to the data section.
    pub data_offsets: (u64, u64),
    /// Number of elements (product of `shape`).
    pub n_elements: u64,
}

impl SafetensorsTensorInfo {
    /// Bytes of data (`end - begin`).
    pub fn n_bytes(&self) -> u64 {
        self.data_offsets.1 - self.data_offsets.0
    }
}

/// The parsed header of a safetensors file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SafetensorsHeader {
    /// `N`, the length of the JSON header.
    pub header_size: u64,
    /// Absolute offset of the data section (`8 + N`).
    pub data_offset: u64,
    /// The `__metadata__` strings.
    pub metadata: BTreeMap<String, String>,
    /// Tensors sorted by data offset.
    pub tensors: Vec<SafetensorsTensorInfo>,
    /// Size of the file in bytes.
    pub file_size: u64,
}

impl SafetensorsHeader {
    /// Reads the header of the safetensors file at `path` (the data is not read).
    pub fn open(path: &Path) -> Result<SafetensorsHeader> {
        let label = path.display().to_string();
        let file = std::fs::File::open(path).map_err(|e| CheckpointError::io(&label, e))?;
        let size = file
            .metadata()
            .map_err(|e| CheckpointError::io(&label, e))?
            .len();
        Self::read(file, size, &label)
    }

    /// Parses the header from bytes holding the whole file; `label` names it in errors.
    pub fn parse(bytes: &[u8], label: &str) -> Result<SafetensorsHeader> {
        Self::read(bytes, bytes.len() as u64, label)
    }

    /// Reads the header from `reader` (at the file start) of a file of `file_size` bytes.
    pub fn read<R: Read>(mut reader: R, file_size: u64, label: &str) -> Result<SafetensorsHeader> {
        let bad = |field: &str, detail: String| CheckpointError::malformed(label, field, detail);
        let eof = |e: std::io::Error| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                bad("header", "file ended early".into())
            } else {
                CheckpointError::io(label, e)
            }
        };
        if file_size < 8 {
            return Err(bad(
                "header length",
                format!("file has {file_size} bytes, fewer than the 8-byte length prefix"),
            ));
        }
        let mut n8 = [0u8; 8];
        reader.read_exact(&mut n8).map_err(eof)?;
        let n = u64::from_le_bytes(n8);
        if n > MAX_HEADER_SIZE {
            return Err(bad(
                "header length",
                format!("{n} bytes exceeds the {MAX_HEADER_SIZE}-byte limit"),
            ));
        }
        if n > file_size - 8 {
            return Err(bad(
                "header length",
                format!("{n} bytes but only {} bytes follow", file_size - 8),
            ));
        }
        let mut json = vec![0u8; n as usize];
        reader.read_exact(&mut json).map_err(eof)?;
        let text = std::str::from_utf8(&json)
            .map_err(|e| bad("header", format!("JSON is not UTF-8: {e}")))?;
        let map: BTreeMap<String, serde_json::Value> = serde_json::from_str(text)
            .map_err(|e| bad("header", format!("not a JSON object of tensors: {e}")))?;
        // serde_json keeps the last of repeated keys; such a header means different things to
        // different readers (the `safetensors` crate rejects a repeated tensor field).
        serde_json::from_str::<NoDuplicateKeys>(text)
            .map_err(|e| bad("header", format!("ambiguous JSON: {e}")))?;
        drop(json);

        let mut metadata = BTreeMap::new();
        let mut tensors = Vec::with_capacity(map.len());
        for (name, v) in map {
            if name == METADATA_KEY {
                metadata = serde_json::from_value(v)
                    .map_err(|e| bad(METADATA_KEY, format!("must map strings to strings: {e}")))?;
                continue;
            }
            let field = format!("tensor {name:?}");
            let raw: RawInfo =
                serde_json::from_value(v).map_err(|e| bad(&field, format!("{e}")))?;
            let n_elements = raw
                .shape
                .iter()
                .try_fold(1u64, |a, &d| a.checked_mul(d))
                .ok_or_else(|| bad(&field, format!("shape {:?} overflows", raw.shape)))?;
            let bits = n_elements
                .checked_mul(raw.dtype.bitsize() as u64)
                .ok_or_else(|| bad(&field, "size overflows".into()))?;
            if bits % 8 != 0 {
                return Err(bad(
                    &field,
                    format!(
                        "{n_elements} {} elements do not fill whole bytes",
                        raw.dtype
                    ),
                ));
            }
            let (b, e) = (raw.data_offsets[0], raw.data_offsets[1]);
            if e < b || e - b != bits / 8 {
                return Err(bad(
                    &field,
                    format!(
                        "data_offsets [{b}, {e}] do not hold {n_elements} {} elements ({} bytes)",
                        raw.dtype,
                        bits / 8
                    ),
                ));
            }
            tensors.push(SafetensorsTensorInfo {
                name,
                dtype: raw.dtype,
                shape: raw.shape,
                data_offsets: (b, e),
                n_elements,
            });
        }
        tensors.sort_by_key(|t| t.data_offsets);
        let data_len = file_size - 8 - n;
        let mut at = 0u64;
        for t in &tensors {
            if t.data_offsets.0 != at {
                return Err(bad(
                    &format!("tensor {:?}", t.name),
                    format!(
                        "data starts at {} but the previous tensor ends at {at} (tensors must be contiguous)",
                        t.data_offsets.0
                    ),
                ));
            }
            at = t.data_offsets.1;
        }
        if at != data_len {
            return Err(bad(
                "data",
                format!("tensors cover {at} bytes but the data section has {data_len} bytes"),
            ));
        }
        Ok(SafetensorsHeader {
            header_size: n,
            data_offset: 8 + n,
            metadata,
            tensors,
            file_size,
        })
    }
}

#[derive(serde::Deserialize)]
struct RawInfo {
    dtype: Dtype,
    shape: Vec<u64>,
    data_offsets: [u64; 2],
}

/// Walks a JSON document and fails at the first object that repeats a key.
struct NoDuplicateKeys;

impl<'de> serde::Deserialize<'de> for NoDuplicateKeys {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        d.deserialize_any(NoDuplicateKeys)
    }
}

impl<'de> serde::de::Visitor<'de> for NoDuplicateKeys {
    type Value = NoDuplicateKeys;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, _: bool) -> std::result::Result<Self, E> {
        Ok(self)
    }

    fn visit_i64<E>(self, _: i64) -> std::result::Result<Self, E> {
        Ok(self)
    }

    fn visit_u64<E>(self, _: u64) -> std::result::Result<Self, E> {
        Ok(self)
    }

    fn visit_f64<E>(self, _: f64) -> std::result::Result<Self, E> {
        Ok(self)
    }

    fn visit_str<E>(self, _: &str) -> std::result::Result<Self, E> {
        Ok(self)
    }

    fn visit_unit<E>(self) -> std::result::Result<Self, E> {
        Ok(self)
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(
        self,
        mut seq: A,
    ) -> std::result::Result<Self, A::Error> {
        while seq.next_element::<NoDuplicateKeys>()?.is_some() {}
        Ok(self)
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(
        self,
        mut map: A,
    ) -> std::result::Result<Self, A::Error> {
        let mut seen = std::collections::HashSet::new();
        while let Some(key) = map.next_key::<String>()? {
            if seen.contains(&key) {
                return Err(serde::de::Error::custom(format!("repeated key {key:?}")));
            }
            map.next_value::<NoDuplicateKeys>()?;
            seen.insert(key);
        }
        Ok(self)
    }
}
