//! Importance matrices in llama.cpp's two file formats (`llama-imatrix` writes them,
//! `llama-quantize --imatrix` reads them).
//!
//! An importance matrix holds, for each weight matrix (by its GGUF tensor name, e.g.
//! `blk.0.attn_q.weight`), the per-input-column statistics of the activations that multiplied
//! it over a calibration text: `sum_t x_{t,k}^2` and the number of tokens `t`. The importance
//! of column `k` is their ratio, the mean of `x_k^2` (up to a constant, the diagonal of the
//! Hessian `X^T X` that GPTQ uses in full). Two layouts exist:
//!
//! * **GGUF** (llama.cpp's default since 2025): `general.type = "imatrix"`, the string array
//!   `imatrix.datasets`, `imatrix.chunk_count` and `imatrix.chunk_size` (u32), and per weight
//!   two F32 tensors, `<name>.in_sum2` with `ne = [n_in, n_mat]` (the raw sums of squares) and
//!   `<name>.counts` with `ne = [1, n_mat]` (tokens). `n_mat` is 1 except for stacked expert
//!   weights.
//! * **legacy `.dat`**: little-endian `i32 n_entries`, then per entry `i32 len`, the name's
//!   `len` bytes, `i32 ncall`, `i32 nval`, `nval` f32 values equal to `mean(x^2) * ncall`;
//!   then, optionally, `i32 chunk_count`, `i32 len` and a dataset name of `len` bytes.
//!
//! [`Imatrix`] keeps both as `sums` and `counts` whose ratio is the importance: for a GGUF file
//! the raw sums and tokens, for a legacy file the stored values and `ncall`. Reading detects the
//! layout from the magic bytes (as llama.cpp tries GGUF first). Every length is checked against
//! the file, so a truncated or hostile file is refused with its name and the field at fault.
//!
//! ```
//! use quantlab_checkpoints::imatrix::{Imatrix, ImatrixFormat};
//! let mut m = Imatrix::new(vec!["calib.txt".into()], 512);
//! // 3 input columns seen over 4 tokens: sums of squares 4, 8, 0.4
//! m.insert("blk.0.attn_q.weight", vec![4.0, 8.0, 0.4], 4.0);
//! m.chunk_count = 1;
//! assert_eq!(m.importance("blk.0.attn_q.weight").unwrap(), vec![1.0, 2.0, 0.1]);
//! let dir = std::env::temp_dir().join(format!("imatrix-doc-{}", std::process::id()));
//! std::fs::create_dir_all(&dir).unwrap();
//! for fmt in [ImatrixFormat::Gguf, ImatrixFormat::Legacy] {
//!     let p = dir.join("m.imatrix");
//!     m.write(&p, fmt).unwrap();
//!     let back = Imatrix::read(&p).unwrap();
//!     assert_eq!(back.format, fmt);
//!     assert_eq!(back.datasets, vec!["calib.txt".to_string()]);
//!     let imp = back.importance("blk.0.attn_q.weight").unwrap();
//!     assert!((imp[1] - 2.0).abs() < 1e-6 && (imp[2] - 0.1).abs() < 1e-6);
//! }
//! std::fs::remove_dir_all(&dir).unwrap();
//! ```

use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use crate::export::gguf::{write_gguf_raw, GgufTensor};
use crate::export::{io_at, write_atomic};
use crate::gguf::{GgmlType, GgufArray, GgufFile, GgufValue};
use crate::{CheckpointError, Result};

/// The GGUF key of the calibration texts' names.
pub const KEY_DATASETS: &str = "imatrix.datasets";
/// The GGUF key of the number of chunks (context windows) the statistics cover.
pub const KEY_CHUNK_COUNT: &str = "imatrix.chunk_count";
/// The GGUF key of the tokens per chunk.
pub const KEY_CHUNK_SIZE: &str = "imatrix.chunk_size";

/// Which of llama.cpp's layouts a file is in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImatrixFormat {
    /// GGUF with `.in_sum2` / `.counts` tensors (llama.cpp's default).
    Gguf,
    /// The legacy `.dat` layout (`llama-imatrix --output-format dat`).
    Legacy,
}

/// One weight's statistics: `sums[j * n_in + k] / counts[j]` is the importance of input
/// column `k` of matrix `j` (`n_mat = counts.len()`, 1 for a plain linear).
#[derive(Clone, Debug, PartialEq)]
pub struct ImatrixEntry {
    /// Sums of squared activations per input column, matrix after matrix (legacy files:
    /// `mean * ncall`).
    pub sums: Vec<f32>,
    /// Tokens per matrix (legacy files: `ncall`).
    pub counts: Vec<f32>,
}

impl ImatrixEntry {
    /// Input columns per matrix.
    pub fn n_in(&self) -> usize {
        self.sums.len() / self.counts.len().max(1)
    }
}

/// An importance matrix: entries by GGUF weight name, with llama.cpp's metadata.
#[derive(Clone, Debug, PartialEq)]
pub struct Imatrix {
    /// Statistics by weight name (`blk.N.attn_q.weight`, ...).
    pub entries: BTreeMap<String, ImatrixEntry>,
    /// The calibration texts (file names as given to the tool).
    pub datasets: Vec<String>,
    /// Chunks (context windows) processed.
    pub chunk_count: u32,
    /// Tokens per chunk (0 when unknown, as in legacy files).
    pub chunk_size: u32,
    /// The layout it was read from ([`ImatrixFormat::Gguf`] for a new one).
    pub format: ImatrixFormat,
}

impl Imatrix {
    /// An empty matrix for `datasets`, chunks of `chunk_size` tokens.
    pub fn new(datasets: Vec<String>, chunk_size: u32) -> Self {
        Self {
            entries: BTreeMap::new(),
            datasets,
            chunk_count: 0,
            chunk_size,
            format: ImatrixFormat::Gguf,
        }
    }

    /// Adds (or replaces) the statistics of one weight with a single matrix: the raw sums of
    /// squares per input column and the tokens they cover.
    pub fn insert(&mut self, name: &str, sum_sq: Vec<f32>, tokens: f32) {
        self.entries.insert(
            name.to_string(),
            ImatrixEntry {
                sums: sum_sq,
                counts: vec![tokens],
            },
        );
    }

    /// The importance of each input column of `name` (matrix after matrix), as
    /// `llama-quantize` computes it: `sums / counts`; for a zero count 1 per column (GGUF
    /// files) or the stored values as they are (legacy files).
    pub fn importance(&self, name: &str) -> Option<Vec<f32>> {
        let e = self.entries.get(name)?;
        let n = e.n_in();
        let mut out = Vec::with_capacity(e.sums.len());
        for (j, &c) in e.counts.iter().enumerate() {
            let row = &e.sums[j * n..(j + 1) * n];
            if c > 0.0 {
                out.extend(row.iter().map(|s| s / c));
            } else if self.format == ImatrixFormat::Legacy {
                out.extend_from_slice(row);
            } else {
                out.extend(std::iter::repeat_n(1.0, n));
            }
        }
        Some(out)
    }

    /// Reads a file in either layout (GGUF if it starts with the GGUF magic, else legacy).
    ///
    /// Errors name the file and the field or entry at fault: a GGUF without `.in_sum2`
    /// tensors (a model rather than an importance matrix), a `.in_sum2` without its `.counts`
    /// or the reverse, a non-F32 tensor, sizes that do not divide, a truncated legacy file.
    pub fn read(path: &Path) -> Result<Imatrix> {
        let label = path.display().to_string();
        let mut f = std::fs::File::open(path).map_err(|e| io_at(path, e))?;
        let mut magic = [0u8; 4];
        let n = read_up_to(&mut f, &mut magic).map_err(|e| io_at(path, e))?;
        if n == 4 && &magic == b"GGUF" {
            let g = GgufFile::open(path)?;
            let mut data = BTreeMap::new();
            for t in &g.tensors {
                if t.name.ends_with(".in_sum2") || t.name.ends_with(".counts") {
                    if t.ggml_type != GgmlType::F32 {
                        return Err(CheckpointError::malformed(
                            &label,
                            format!("tensor \"{}\"", t.name),
                            format!("is {}; an importance matrix holds F32 only", t.ggml_type),
                        ));
                    }
                    let r = g.tensor_range(t);
                    let mut buf = vec![0u8; (r.end - r.start) as usize];
                    f.seek(SeekFrom::Start(r.start))
                        .and_then(|_| f.read_exact(&mut buf))
                        .map_err(|e| io_at(path, e))?;
                    let v: Vec<f32> = buf
                        .chunks_exact(4)
                        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                        .collect();
                    data.insert(t.name.clone(), v);
                }
            }
            Self::from_gguf(&g, data, &label)
        } else {
            let mut bytes = Vec::new();
            f.seek(SeekFrom::Start(0))
                .and_then(|_| f.read_to_end(&mut bytes))
                .map_err(|e| io_at(path, e))?;
            Self::parse_legacy(&bytes, &label)
        }
    }

    fn from_gguf(g: &GgufFile, mut data: BTreeMap<String, Vec<f32>>, label: &str) -> Result<Self> {
        let mut entries = BTreeMap::new();
        let names: Vec<String> = data
            .keys()
            .filter_map(|k| k.strip_suffix(".in_sum2").map(str::to_string))
            .collect();
        for name in &names {
            let sums = data.remove(&format!("{name}.in_sum2")).unwrap_or_default();
            let counts = data.remove(&format!("{name}.counts")).ok_or_else(|| {
                CheckpointError::malformed(
                    label,
                    format!("tensor \"{name}.in_sum2\""),
                    format!("has no matching \"{name}.counts\""),
                )
            })?;
            if counts.is_empty() || sums.is_empty() || sums.len() % counts.len() != 0 {
                return Err(CheckpointError::malformed(
                    label,
                    format!("tensor \"{name}.in_sum2\""),
                    format!(
                        "{} sums for {} counts: not whole matrices",
                        sums.len(),
                        counts.len()
                    ),
                ));
            }
            entries.insert(name.clone(), ImatrixEntry { sums, counts });
        }
        if let Some(orphan) = data.keys().next() {
            return Err(CheckpointError::malformed(
                label,
                format!("tensor \"{orphan}\""),
                "has no matching \".in_sum2\"",
            ));
        }
        if entries.is_empty() {
            return Err(CheckpointError::malformed(
                label,
                "tensors",
                "no \".in_sum2\" tensors: this GGUF is not an importance matrix (llama-imatrix writes one)",
            ));
        }
        let u32_of = |key: &str| -> Result<u32> {
            match g.get(key) {
                None => Ok(0),
                Some(v) => v
                    .as_integer()
                    .and_then(|i| u32::try_from(i).ok())
                    .ok_or_else(|| {
                        CheckpointError::malformed(
                            label,
                            format!("metadata key \"{key}\""),
                            "is not an unsigned 32-bit integer",
                        )
                    }),
            }
        };
        let datasets = match g.get(KEY_DATASETS) {
            None => Vec::new(),
            Some(GgufValue::Array(GgufArray::String(v))) => v.clone(),
            Some(_) => {
                return Err(CheckpointError::malformed(
                    label,
                    format!("metadata key \"{KEY_DATASETS}\""),
                    "is not an array of strings",
                ))
            }
        };
        Ok(Imatrix {
            entries,
            datasets,
            chunk_count: u32_of(KEY_CHUNK_COUNT)?,
            chunk_size: u32_of(KEY_CHUNK_SIZE)?,
            format: ImatrixFormat::Gguf,
        })
    }

    /// Parses a legacy `.dat` file held in `bytes`; `label` names it in errors.
    pub fn parse_legacy(bytes: &[u8], label: &str) -> Result<Self> {
        let mut r = Cursor {
            b: bytes,
            pos: 0,
            label,
        };
        let n = r.i32("entry count")?;
        if n < 1 {
            return Err(CheckpointError::malformed(
                label,
                "entry count",
                format!("{n}: no entries (not a llama.cpp importance matrix?)"),
            ));
        }
        let mut entries = BTreeMap::new();
        for i in 0..n {
            let what = format!("entry {}", i + 1);
            let len = r.len(&format!("{what}: name length"), 1)?;
            let name = String::from_utf8_lossy(r.take(len, &format!("{what}: name"))?).into_owned();
            let ncall = r.i32(&format!("entry \"{name}\": ncall"))?;
            let nval = r.len(&format!("entry \"{name}\": value count"), 4)?;
            if nval == 0 {
                return Err(CheckpointError::malformed(
                    label,
                    format!("entry \"{name}\""),
                    "has no values",
                ));
            }
            let raw = r.take(4 * nval, &format!("entry \"{name}\": values"))?;
            let sums = raw
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            if entries
                .insert(
                    name.clone(),
                    ImatrixEntry {
                        sums,
                        counts: vec![ncall as f32],
                    },
                )
                .is_some()
            {
                return Err(CheckpointError::malformed(
                    label,
                    format!("entry \"{name}\""),
                    "appears twice",
                ));
            }
        }
        let mut chunk_count = 0;
        let mut datasets = Vec::new();
        if r.pos < bytes.len() {
            chunk_count = r.i32("chunk count")?.max(0) as u32;
            if r.pos < bytes.len() {
                let len = r.len("dataset name length", 1)?;
                if len > 0 {
                    datasets
                        .push(String::from_utf8_lossy(r.take(len, "dataset name")?).into_owned());
                }
            }
        }
        Ok(Imatrix {
            entries,
            datasets,
            chunk_count,
            chunk_size: 0,
            format: ImatrixFormat::Legacy,
        })
    }

    /// Writes the matrix at `path` in `format`, atomically (a temporary sibling renamed over
    /// `path`). The legacy layout stores `mean * ncall` with `ncall` the chunks a weight was
    /// seen in (`ceil(tokens / chunk_size)`, as llama-imatrix writes it); matrices with several
    /// experts are refused there, as the layout has one count per entry.
    pub fn write(&self, path: &Path, format: ImatrixFormat) -> Result<()> {
        if self.entries.is_empty() {
            return Err(CheckpointError::InvalidOption {
                option: "importance matrix".into(),
                detail: format!("{}: nothing to write (no entries)", path.display()),
            });
        }
        match format {
            ImatrixFormat::Gguf => {
                let meta = vec![
                    (
                        "general.type".to_string(),
                        GgufValue::String("imatrix".into()),
                    ),
                    (
                        KEY_DATASETS.to_string(),
                        GgufValue::Array(GgufArray::String(self.datasets.clone())),
                    ),
                    (
                        KEY_CHUNK_COUNT.to_string(),
                        GgufValue::U32(self.chunk_count),
                    ),
                    (KEY_CHUNK_SIZE.to_string(), GgufValue::U32(self.chunk_size)),
                ];
                let mut tensors = Vec::with_capacity(2 * self.entries.len());
                for (name, e) in &self.entries {
                    let n_mat = e.counts.len();
                    tensors.push((
                        format!("{name}.in_sum2"),
                        GgufTensor::f32(&[n_mat, e.n_in()], &e.sums),
                    ));
                    tensors.push((
                        format!("{name}.counts"),
                        GgufTensor::f32(&[n_mat, 1], &e.counts),
                    ));
                }
                write_gguf_raw(path, &meta, &tensors)
            }
            ImatrixFormat::Legacy => {
                let mut out = Vec::new();
                out.extend_from_slice(&(self.entries.len() as i32).to_le_bytes());
                for (name, e) in &self.entries {
                    if e.counts.len() != 1 {
                        return Err(CheckpointError::InvalidOption {
                            option: "importance matrix".into(),
                            detail: format!(
                                "{}: entry \"{name}\" has {} matrices; the legacy layout holds one (write GGUF)",
                                path.display(),
                                e.counts.len()
                            ),
                        });
                    }
                    let c = e.counts[0];
                    let (ncall, scale) = match self.format {
                        // read from a legacy file: sums are already mean * ncall
                        ImatrixFormat::Legacy => (c.round() as i32, 1.0),
                        ImatrixFormat::Gguf => {
                            let per = self.chunk_size.max(1) as f32;
                            let ncall = (c / per).ceil().max(1.0);
                            (ncall as i32, if c > 0.0 { ncall / c } else { 0.0 })
                        }
                    };
                    out.extend_from_slice(&(name.len() as i32).to_le_bytes());
                    out.extend_from_slice(name.as_bytes());
                    out.extend_from_slice(&ncall.to_le_bytes());
                    out.extend_from_slice(&(e.sums.len() as i32).to_le_bytes());
                    for s in &e.sums {
                        out.extend_from_slice(&(s * scale).to_le_bytes());
                    }
                }
                out.extend_from_slice(&(self.chunk_count as i32).to_le_bytes());
                let ds = self.datasets.first().map(String::as_str).unwrap_or("");
                out.extend_from_slice(&(ds.len() as i32).to_le_bytes());
                out.extend_from_slice(ds.as_bytes());
                write_atomic(path, |w| w.write_all(&out).map_err(|e| io_at(path, e)))
            }
        }
    }
}

fn read_up_to(f: &mut std::fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// A bounds-checked little-endian reader over a legacy file.
struct Cursor<'a> {
    b: &'a [u8],
    pos: usize,
    label: &'a str,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        if self.b.len() - self.pos < n {
            return Err(CheckpointError::malformed(
                self.label,
                what,
                format!(
                    "needs {n} bytes at offset {} but the file has {} (truncated?)",
                    self.pos,
                    self.b.len()
                ),
            ));
        }
        let s = &self.b[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn i32(&mut self, what: &str) -> Result<i32> {
        let s = self.take(4, what)?;
        Ok(i32::from_le_bytes([s[0], s[1], s[2], s[3]]))
    }

    /// A non-negative count whose `unit`-byte items must fit in what is left of the file.
    fn len(&mut self, what: &str, unit: usize) -> Result<usize> {
        let v = self.i32(what)?;
        let left = self.b.len() - self.pos;
        if v < 0 || (v as usize).saturating_mul(unit) > left {
            return Err(CheckpointError::malformed(
                self.label,
                what,
                format!("{v} does not fit the {left} bytes left in the file"),
            ));
        }
        Ok(v as usize)
    }
}
