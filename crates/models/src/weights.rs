//! Where the weights come from: GGUF files (any ggml type candle dequantizes, plus IQ4_NL and
//! IQ4_XS, decoded here) and
//! safetensors files (single or sharded), both memory-mapped and read tensor by tensor,
//! always handed out as f32 tensors under Hugging Face names and in Hugging Face layout.
//!
//! GGUF files written by llama.cpp's converter for the `llama` architecture store the rows of
//! `attn_q` / `attn_k` permuted (within each head, the two rotary halves interleaved:
//! GGUF row `2i + j` of a head is Hugging Face row `j * head_dim / 2 + i`). [`GgufWeights`]
//! undoes that, so a model loaded from GGUF and one loaded from the equivalent safetensors
//! hold identical weights.

use std::collections::{BTreeMap, HashMap};
use std::io::Cursor;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::{ggml_file, GgmlDType};
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};

use crate::config::{Architecture, LlamaConfig};
use crate::{ModelError, Result};

/// A source of f32 weights addressed by Hugging Face names
/// (`model.layers.0.self_attn.q_proj.weight`, `lm_head.weight`, ...).
pub trait WeightSource {
    /// The file or directory, for error messages.
    fn path(&self) -> &Path;
    /// Whether a tensor of this (Hugging Face) name exists.
    fn contains(&self, name: &str) -> bool;
    /// Reads and dequantizes one tensor to f32 on the CPU, in Hugging Face layout.
    fn load(&self, name: &str) -> Result<Tensor>;
    /// All tensor names, in Hugging Face naming, sorted.
    fn names(&self) -> Vec<String>;
}

fn io_err(path: &Path, source: std::io::Error) -> ModelError {
    ModelError::Io {
        path: path.display().to_string(),
        source,
    }
}

fn map_file(path: &Path) -> Result<memmap2::Mmap> {
    let file = std::fs::File::open(path).map_err(|e| io_err(path, e))?;
    // SAFETY: the map is read-only; like every mmap reader we rely on the file not being
    // truncated by another process while it is mapped.
    unsafe { memmap2::Mmap::map(&file) }.map_err(|e| io_err(path, e))
}

/// A GGUF file, memory-mapped; tensors are dequantized on demand.
pub struct GgufWeights {
    path: PathBuf,
    mmap: memmap2::Mmap,
    content: Content,
    /// HF name -> GGUF name.
    names: BTreeMap<String, String>,
    /// Undo llama.cpp's q/k row permutation (architecture `llama`).
    unpermute: bool,
    n_head: usize,
    n_kv_head: usize,
    /// Tensors of a type candle 0.11 does not know (IQ4_NL, IQ4_XS), by GGUF name: candle
    /// reads the header with a stand-in type of the same block length ([`OwnType`]) and the
    /// bytes are dequantized here.
    own: HashMap<String, OwnType>,
}

/// The 16 levels of ggml's IQ4_NL (`kvalues_iq4nl`, as the `gguf` package lists them).
const IQ4_NL_LEVELS: [i8; 16] = [
    -127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113,
];

/// A ggml type candle 0.11 cannot read, dequantized by this module instead.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum OwnType {
    /// IQ4_NL (type 20): `{f16 d; u8 qs[16]}` per 32 weights, `d * kvalues[q]`, nibbles as
    /// Q4_0 (`qs[j]` holds weight `j` low and `j + 16` high).
    Iq4Nl,
    /// IQ4_XS (type 23): `{f16 d; u16 scales_h; u8 scales_l[4]; u8 qs[128]}` per 256
    /// weights in 8 sub-blocks of 32. Sub-block `ib` has the 6-bit
    /// `ls = (scales_l[ib / 2] >> 4 (ib % 2)) & 0xF | ((scales_h >> 2 ib) & 3) << 4`,
    /// `dl = d * (ls - 32)`, and its weights `j`, `j + 16` are `dl * kvalues[q]` for the low
    /// and high nibbles of `qs[16 ib + j]`, `j` in 0..16.
    Iq4Xs,
}

impl OwnType {
    fn from_id(id: u32) -> Option<Self> {
        match id {
            20 => Some(Self::Iq4Nl),
            23 => Some(Self::Iq4Xs),
            _ => None,
        }
    }

    /// The type id candle is given instead: Q4_0 (blocks of 32) for IQ4_NL, Q4_K (blocks of
    /// 256) for IQ4_XS, so that its shape checks see the same block length.
    fn stand_in(self) -> u32 {
        match self {
            Self::Iq4Nl => 2,
            Self::Iq4Xs => 12,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Iq4Nl => "IQ4_NL",
            Self::Iq4Xs => "IQ4_XS",
        }
    }

    /// Weights per block.
    fn block_size(self) -> usize {
        match self {
            Self::Iq4Nl => 32,
            Self::Iq4Xs => 256,
        }
    }

    /// Bytes per block.
    fn type_size(self) -> usize {
        match self {
            Self::Iq4Nl => 18,
            Self::Iq4Xs => 136,
        }
    }

    /// ggml's f32 expressions, in ggml's order, for whole blocks of `raw`.
    fn dequantize(self, raw: &[u8], out: &mut Vec<f32>) {
        let f16_at = |b: &[u8], i: usize| half::f16::from_le_bytes([b[i], b[i + 1]]).to_f32();
        // 32 weights of 16 bytes of nibbles: weight j low, weight j + 16 high
        let nibbles = |qs: &[u8], dl: f32, out: &mut Vec<f32>| {
            out.extend((0..32).map(|j| {
                let q = if j < 16 { qs[j] & 0xF } else { qs[j - 16] >> 4 };
                dl * IQ4_NL_LEVELS[q as usize] as f32
            }));
        };
        for blk in raw.chunks_exact(self.type_size()) {
            match self {
                Self::Iq4Nl => nibbles(&blk[2..], f16_at(blk, 0), out),
                Self::Iq4Xs => {
                    let d = f16_at(blk, 0);
                    let scales_h = u16::from_le_bytes([blk[2], blk[3]]);
                    let (scales_l, qs) = (&blk[4..8], &blk[8..]);
                    for ib in 0..8 {
                        let lo = (scales_l[ib / 2] >> (4 * (ib % 2))) & 0xF;
                        let hi = ((scales_h >> (2 * ib)) & 3) as u8;
                        let ls = (lo | (hi << 4)) as i32;
                        let dl = d * (ls - 32) as f32;
                        nibbles(&qs[16 * ib..16 * ib + 16], dl, out);
                    }
                }
            }
        }
    }
}

/// A bounds-checked little-endian reader over a GGUF header (every read `None` past the end).
struct R<'a> {
    b: &'a [u8],
    at: usize,
}
impl R<'_> {
    fn take(&mut self, n: usize) -> Option<&[u8]> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.b.len())?;
        let s = &self.b[self.at..end];
        self.at = end;
        Some(s)
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
    fn string(&mut self) -> Option<String> {
        let n = usize::try_from(self.u64()?).ok()?;
        Some(String::from_utf8_lossy(self.take(n)?).into_owned())
    }
    fn value(&mut self, ty: u32, depth: usize) -> Option<()> {
        let size = match ty {
            0 | 1 | 7 => 1,
            2 | 3 => 2,
            4..=6 => 4,
            10..=12 => 8,
            8 => return self.string().map(|_| ()),
            9 if depth < 4 => {
                let et = self.u32()?;
                let n = self.u64()?;
                if n > self.b.len() as u64 {
                    return None;
                }
                for _ in 0..n {
                    self.value(et, depth + 1)?;
                }
                return Some(());
            }
            _ => return None,
        };
        self.take(size).map(|_| ())
    }
}

/// The `general.alignment` a GGUF header declares (`None`: absent, or a header this walk
/// cannot read, which candle's reader then reports).
fn header_alignment(b: &[u8]) -> Option<u64> {
    let mut r = R { b, at: 0 };
    if r.take(4)? != b"GGUF" || !matches!(r.u32()?, 2 | 3) {
        return None;
    }
    let (_nt, nkv) = (r.u64()?, r.u64()?);
    for _ in 0..nkv {
        let key = r.string()?;
        let ty = r.u32()?;
        if key == "general.alignment" {
            return match ty {
                0 | 1 => r.take(1).map(|v| v[0] as u64),
                2 | 3 => r.take(2).map(|v| u16::from_le_bytes([v[0], v[1]]) as u64),
                4 | 5 => r.u32().map(u64::from),
                10 | 11 => r.u64(),
                _ => None,
            };
        }
        r.value(ty, 0)?;
    }
    None
}

/// The GGUF header (up to the end of the tensor infos) with the type of every tensor candle
/// cannot read ([`OwnType`]: IQ4_NL, IQ4_XS) rewritten as its stand-in, and those tensors'
/// names and real types; `None` when the file has no such tensor or the header does not
/// parse (candle then reports the problem).
fn header_with_stand_ins(b: &[u8]) -> Option<(Vec<u8>, HashMap<String, OwnType>)> {
    let mut r = R { b, at: 0 };
    if r.take(4)? != b"GGUF" || !matches!(r.u32()?, 2 | 3) {
        return None;
    }
    let (nt, nkv) = (r.u64()?, r.u64()?);
    for _ in 0..nkv {
        r.string()?;
        let ty = r.u32()?;
        r.value(ty, 0)?;
    }
    let mut patches = Vec::new();
    let mut names = HashMap::new();
    for _ in 0..nt {
        let name = r.string()?;
        let nd = r.u32()? as usize;
        r.take(nd.checked_mul(8)?)?;
        let at = r.at;
        if let Some(own) = OwnType::from_id(r.u32()?) {
            patches.push((at, own));
            names.insert(name, own);
        }
        r.u64()?;
    }
    if patches.is_empty() {
        return None;
    }
    let mut h = b[..r.at].to_vec();
    for (at, own) in patches {
        h[at..at + 4].copy_from_slice(&own.stand_in().to_le_bytes());
    }
    Some((h, names))
}

impl std::fmt::Debug for GgufWeights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufWeights")
            .field("path", &self.path)
            .field("tensors", &self.content.tensor_infos.len())
            .finish()
    }
}

/// Maps a GGUF tensor name (llama.cpp naming) to the Hugging Face name, or `None` for
/// tensors this crate does not use.
pub fn gguf_to_hf_name(name: &str) -> Option<String> {
    let fixed = match name {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        "rope_freqs.weight" => Some("rope_freqs.weight"),
        _ => None,
    };
    if let Some(f) = fixed {
        return Some(f.to_string());
    }
    let rest = name.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, suffix) = rest.rsplit_once('.')?;
    let hf = match module {
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}.{suffix}"))
}

impl GgufWeights {
    /// Opens and memory-maps a GGUF file and reads its header (metadata and tensor table).
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let mmap = map_file(&path)?;
        let gguf_err = |detail: String| ModelError::Gguf {
            path: path.display().to_string(),
            detail,
        };
        // candle 0.11's reader divides by `general.alignment`: refuse a 0 before it reads
        if header_alignment(&mmap) == Some(0) {
            return Err(gguf_err(
                "`general.alignment` is 0: tensor data offsets need a positive alignment (ggml writes 32)"
                    .into(),
            ));
        }
        // other hostile headers may still make candle's reader panic (docs/fuzzing.md):
        // contain that as an error.
        let (patched, own) = match header_with_stand_ins(&mmap) {
            Some((h, names)) => (Some(h), names),
            None => (None, Default::default()),
        };
        let content = std::panic::catch_unwind(|| match &patched {
            Some(h) => Content::read(&mut Cursor::new(&h[..])),
            None => Content::read(&mut Cursor::new(&mmap[..])),
        })
        .map_err(|p| {
            let what = p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            gguf_err(format!(
                "malformed header (candle's GGUF reader panicked: {what})"
            ))
        })?
        .map_err(|e| gguf_err(e.to_string()))?;
        let mut names = BTreeMap::new();
        for gguf in content.tensor_infos.keys() {
            if let Some(hf) = gguf_to_hf_name(gguf) {
                names.insert(hf, gguf.clone());
            }
        }
        let arch = match content.metadata.get("general.architecture") {
            Some(Value::String(s)) => s.clone(),
            _ => String::new(),
        };
        let head = |key: &str| {
            content
                .metadata
                .get(&format!("{arch}.{key}"))
                .and_then(crate::config::gguf_uint)
        };
        let n_head = head("attention.head_count").unwrap_or(0);
        let n_kv_head = head("attention.head_count_kv").unwrap_or(n_head);
        Ok(Self {
            unpermute: arch == "llama",
            path,
            mmap,
            content,
            names,
            n_head,
            n_kv_head,
            own,
        })
    }

    /// The GGUF metadata (tokenizer, chat template, hyper-parameters).
    pub fn metadata(&self) -> &HashMap<String, Value> {
        &self.content.metadata
    }

    /// The model config from the metadata; `tie_word_embeddings` is true when the file has no
    /// `output.weight`.
    pub fn config(&self) -> Result<LlamaConfig> {
        let mut cfg = LlamaConfig::from_gguf_metadata(
            &self.content.metadata,
            &self.path.display().to_string(),
        )?;
        cfg.tie_word_embeddings = !self.content.tensor_infos.contains_key("output.weight");
        if cfg.architecture == Architecture::Qwen2 {
            cfg.qkv_bias = self.content.tensor_infos.contains_key("blk.0.attn_q.bias");
        }
        Ok(cfg)
    }

    /// The ggml type a tensor is stored in (by Hugging Face name); the types candle does not
    /// know report their stand-in of the same block length: IQ4_NL `Q4_0`, IQ4_XS `Q4K`.
    pub fn ggml_dtype(&self, name: &str) -> Option<GgmlDType> {
        let g = self.names.get(name)?;
        self.content.tensor_infos.get(g).map(|t| t.ggml_dtype)
    }

    fn gguf_err(&self, detail: String) -> ModelError {
        ModelError::Gguf {
            path: self.path.display().to_string(),
            detail,
        }
    }

    /// Reads one tensor by its GGUF name, dequantized to f32, without any permutation.
    pub fn load_raw(&self, gguf_name: &str) -> Result<Tensor> {
        let info =
            self.content
                .tensor_infos
                .get(gguf_name)
                .ok_or_else(|| ModelError::MissingTensor {
                    path: self.path.display().to_string(),
                    tensor: gguf_name.to_string(),
                })?;
        let dims = info.shape.dims().to_vec();
        let elems = dims
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .ok_or_else(|| {
                self.gguf_err(format!("tensor `{gguf_name}` has absurd dims {dims:?}"))
            })?;
        let own = self.own.get(gguf_name).copied();
        let (block, type_size, type_name) = match own {
            Some(t) => (t.block_size(), t.type_size(), t.name().to_string()),
            None => (
                info.ggml_dtype.block_size(),
                info.ggml_dtype.type_size(),
                format!("{:?}", info.ggml_dtype),
            ),
        };
        if elems % block != 0 {
            return Err(self.gguf_err(format!(
                "tensor `{gguf_name}` has {elems} elements, not a multiple of the {type_name} block of {block}"
            )));
        }
        let bytes = (elems / block)
            .checked_mul(type_size)
            .ok_or_else(|| self.gguf_err(format!("tensor `{gguf_name}` is too large")))?;
        let start = self
            .content
            .tensor_data_offset
            .checked_add(info.offset)
            .and_then(|s| usize::try_from(s).ok())
            .ok_or_else(|| self.gguf_err(format!("tensor `{gguf_name}` has a bad offset")))?;
        let end = start
            .checked_add(bytes)
            .filter(|&e| e <= self.mmap.len())
            .ok_or_else(|| {
                self.gguf_err(format!(
                    "tensor `{gguf_name}` needs bytes {start}..{} but the file has {} (truncated?)",
                    start.saturating_add(bytes),
                    self.mmap.len()
                ))
            })?;
        let raw = &self.mmap[start..end];
        if let Some(t) = own {
            let mut v = Vec::with_capacity(elems);
            t.dequantize(raw, &mut v);
            return Ok(Tensor::from_vec(v, dims, &Device::Cpu)?);
        }
        // The block structs need at most 4-byte alignment; a well-formed file aligns data
        // to 32 bytes, a malformed one gets copied to an aligned buffer.
        let q = if (raw.as_ptr() as usize) % 8 == 0 {
            ggml_file::qtensor_from_ggml(info.ggml_dtype, raw, dims.clone(), &Device::Cpu)
        } else {
            let mut words = vec![0u64; bytes.div_ceil(8)];
            // SAFETY: `words` holds at least `bytes` bytes; u64 has no invalid bit patterns.
            let buf =
                unsafe { std::slice::from_raw_parts_mut(words.as_mut_ptr() as *mut u8, bytes) };
            buf.copy_from_slice(raw);
            ggml_file::qtensor_from_ggml(info.ggml_dtype, buf, dims.clone(), &Device::Cpu)
        }
        .map_err(|e| self.gguf_err(format!("tensor `{gguf_name}`: {e}")))?;
        let t = q
            .dequantize(&Device::Cpu)
            .map_err(|e| self.gguf_err(format!("tensor `{gguf_name}`: {e}")))?;
        Ok(t.to_dtype(DType::F32)?)
    }
}

/// Undoes llama.cpp's q/k permutation: within each of `n_head` heads of `rows / n_head`
/// rows, GGUF row `2i + j` goes to Hugging Face row `j * (rows / n_head / 2) + i`.
/// Works on weights `[rows, cols]` and biases `[rows]`.
///
/// ```
/// use candle_core::{Device, Tensor};
/// // one head of 4 rows: GGUF order (a0, b0, a1, b1) -> HF order (a0, a1, b0, b1)
/// let g = Tensor::new(&[[0f32], [2.0], [1.0], [3.0]], &Device::Cpu).unwrap();
/// let hf = quantlab_models::weights::unpermute_qk(&g, 1).unwrap();
/// let v: Vec<f32> = hf.flatten_all().unwrap().to_vec1().unwrap();
/// assert_eq!(v, vec![0.0, 1.0, 2.0, 3.0]);
/// ```
pub fn unpermute_qk(t: &Tensor, n_head: usize) -> Result<Tensor> {
    let dims = t.dims().to_vec();
    let rows = dims[0];
    let half = rows / n_head / 2;
    let out = match dims.len() {
        1 => t
            .reshape((n_head, half, 2))?
            .transpose(1, 2)?
            .contiguous()?
            .reshape(rows)?,
        2 => t
            .reshape((n_head, half, 2, dims[1]))?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((rows, dims[1]))?,
        _ => t.clone(),
    };
    Ok(out)
}

impl WeightSource for GgufWeights {
    fn path(&self) -> &Path {
        &self.path
    }

    fn contains(&self, name: &str) -> bool {
        self.names.contains_key(name)
    }

    fn load(&self, name: &str) -> Result<Tensor> {
        let gguf = self
            .names
            .get(name)
            .ok_or_else(|| ModelError::MissingTensor {
                path: self.path.display().to_string(),
                tensor: name.to_string(),
            })?;
        let t = self.load_raw(gguf)?;
        let is_q = name.contains(".self_attn.q_proj.");
        let is_k = name.contains(".self_attn.k_proj.");
        if self.unpermute && (is_q || is_k) {
            let heads = if is_q { self.n_head } else { self.n_kv_head };
            let rows = t.dims()[0];
            // `heads` comes from the metadata: `2 * heads` may overflow.
            if heads == 0 || heads.checked_mul(2).is_none_or(|h2| rows % h2 != 0) {
                return Err(self.gguf_err(format!(
                    "tensor `{gguf}` has {rows} rows, not a multiple of 2 x {heads} heads"
                )));
            }
            return unpermute_qk(&t, heads);
        }
        Ok(t)
    }

    fn names(&self) -> Vec<String> {
        self.names.keys().cloned().collect()
    }
}

/// One or several safetensors files (a Hugging Face checkpoint), memory-mapped.
pub struct SafetensorsWeights {
    path: PathBuf,
    files: Vec<(PathBuf, MmapedSafetensors)>,
    /// tensor name -> index into `files`.
    routing: BTreeMap<String, usize>,
}

impl std::fmt::Debug for SafetensorsWeights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SafetensorsWeights")
            .field("path", &self.path)
            .field("files", &self.files.len())
            .field("tensors", &self.routing.len())
            .finish()
    }
}

impl SafetensorsWeights {
    /// Opens one `.safetensors` file.
    pub fn open_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        Self::open_files(path.clone(), &[path])
    }

    /// Opens the weights of a Hugging Face directory: `model.safetensors`, or the shards
    /// listed in `model.safetensors.index.json`.
    pub fn open_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let index = dir.join("model.safetensors.index.json");
        let single = dir.join("model.safetensors");
        if index.exists() {
            let text = std::fs::read_to_string(&index).map_err(|e| io_err(&index, e))?;
            let bad = |detail: String| ModelError::Safetensors {
                path: index.display().to_string(),
                detail,
            };
            let v: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| bad(format!("not JSON: {e}")))?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| bad("no `weight_map` object".into()))?;
            let mut shards: Vec<String> = Vec::new();
            for (tensor, file) in map {
                let file = file
                    .as_str()
                    .ok_or_else(|| bad(format!("weight_map[{tensor}] is not a file name")))?;
                if file.contains('/') || file.contains("..") {
                    return Err(bad(format!("shard name `{file}` leaves the directory")));
                }
                if !shards.iter().any(|s| s == file) {
                    shards.push(file.to_string());
                }
            }
            shards.sort();
            let paths: Vec<PathBuf> = shards.iter().map(|s| dir.join(s)).collect();
            Self::open_files(dir.to_path_buf(), &paths)
        } else if single.exists() {
            Self::open_files(dir.to_path_buf(), &[single])
        } else {
            Err(ModelError::MissingTensor {
                path: dir.display().to_string(),
                tensor: "model.safetensors (or model.safetensors.index.json)".into(),
            })
        }
    }

    fn open_files(path: PathBuf, files: &[PathBuf]) -> Result<Self> {
        let mut opened = Vec::new();
        let mut routing = BTreeMap::new();
        for (i, f) in files.iter().enumerate() {
            if !f.exists() {
                return Err(io_err(
                    f,
                    std::io::Error::new(std::io::ErrorKind::NotFound, "file not found"),
                ));
            }
            // SAFETY: read-only map, see `map_file`.
            let st = unsafe { MmapedSafetensors::new(f) }.map_err(|e| ModelError::Safetensors {
                path: f.display().to_string(),
                detail: e.to_string(),
            })?;
            for (name, _) in st.tensors() {
                routing.insert(name, i);
            }
            opened.push((f.clone(), st));
        }
        Ok(Self {
            path,
            files: opened,
            routing,
        })
    }

    fn resolve<'a>(&self, name: &'a str) -> Option<(usize, std::borrow::Cow<'a, str>)> {
        if let Some(&i) = self.routing.get(name) {
            return Some((i, name.into()));
        }
        // Checkpoints of a bare `LlamaModel` lack the `model.` prefix.
        let bare = name.strip_prefix("model.")?;
        self.routing.get(bare).map(|&i| (i, bare.into()))
    }
}

impl WeightSource for SafetensorsWeights {
    fn path(&self) -> &Path {
        &self.path
    }

    fn contains(&self, name: &str) -> bool {
        self.resolve(name).is_some()
    }

    fn load(&self, name: &str) -> Result<Tensor> {
        let (i, key) = self
            .resolve(name)
            .ok_or_else(|| ModelError::MissingTensor {
                path: self.path.display().to_string(),
                tensor: name.to_string(),
            })?;
        let (file, st) = &self.files[i];
        let t = st
            .load(&key, &Device::Cpu)
            .and_then(|t| t.to_dtype(DType::F32))
            .map_err(|e| ModelError::Safetensors {
                path: file.display().to_string(),
                detail: format!("tensor `{key}`: {e}"),
            })?;
        Ok(t)
    }

    fn names(&self) -> Vec<String> {
        self.routing.keys().cloned().collect()
    }
}

/// Weights held in memory under Hugging Face names (for tests, notebooks and models built
/// programmatically).
///
/// ```
/// use candle_core::{DType, Device, Tensor};
/// use quantlab_models::{LlamaConfig, LlamaModel, MemoryWeights};
/// let json = r#"{"architectures": ["LlamaForCausalLM"], "hidden_size": 8,
///   "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
///   "vocab_size": 10, "tie_word_embeddings": true}"#;
/// let cfg = LlamaConfig::from_hf_json(json, "config.json").unwrap();
/// let mut w = MemoryWeights::new("memory");
/// let z = |s: &[usize]| Tensor::zeros(s, DType::F32, &Device::Cpu).unwrap();
/// w.insert("model.embed_tokens.weight", z(&[10, 8]));
/// w.insert("model.norm.weight", z(&[8]));
/// for n in ["input_layernorm", "post_attention_layernorm"] {
///     w.insert(&format!("model.layers.0.{n}.weight"), z(&[8]));
/// }
/// for (n, s) in [("self_attn.q_proj", [8, 8]), ("self_attn.k_proj", [8, 8]),
///     ("self_attn.v_proj", [8, 8]), ("self_attn.o_proj", [8, 8]), ("mlp.gate_proj", [16, 8]),
///     ("mlp.up_proj", [16, 8]), ("mlp.down_proj", [8, 16])] {
///     w.insert(&format!("model.layers.0.{n}.weight"), z(&s));
/// }
/// let model = LlamaModel::from_source(cfg, &w).unwrap();
/// let logits = model.forward(&[1, 2, 3]).unwrap();
/// assert_eq!(logits.dims(), &[3, 10]);
/// ```
#[derive(Debug, Clone, Default)]
pub struct MemoryWeights {
    path: PathBuf,
    tensors: BTreeMap<String, Tensor>,
}

impl MemoryWeights {
    /// An empty set; `label` stands for the path in error messages.
    pub fn new(label: impl Into<PathBuf>) -> Self {
        Self {
            path: label.into(),
            tensors: BTreeMap::new(),
        }
    }

    /// Adds or replaces a tensor (Hugging Face name and layout).
    pub fn insert(&mut self, name: &str, t: Tensor) {
        self.tensors.insert(name.to_string(), t);
    }
}

impl WeightSource for MemoryWeights {
    fn path(&self) -> &Path {
        &self.path
    }

    fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    fn load(&self, name: &str) -> Result<Tensor> {
        let t = self
            .tensors
            .get(name)
            .ok_or_else(|| ModelError::MissingTensor {
                path: self.path.display().to_string(),
                tensor: name.to_string(),
            })?;
        Ok(t.to_device(&Device::Cpu)?.to_dtype(DType::F32)?)
    }

    fn names(&self) -> Vec<String> {
        self.tensors.keys().cloned().collect()
    }
}
