//! Hugging Face directories in the GPTQ, AWQ GEMM, bitsandbytes 4-bit and LLM.int8 layouts.
//!
//! [`write_hf_dir`] packs every linear with [`crate::pack`] first (so a tensor a format
//! cannot hold fails before anything is written, and no directory is left behind), then
//! writes into `DIR.tmp` and renames it to `DIR`:
//!
//! * `config.json`: the base config with `quantization_config` (and `torch_dtype` kept);
//! * the tensors in safetensors shards of at most `max_shard_bytes` (default 2 GB; a single
//!   tensor larger than that gets a shard of its own): `model.safetensors`, or
//!   `model-0000i-of-0000n.safetensors` plus `model.safetensors.index.json`
//!   (`{"metadata": {"total_size": ..}, "weight_map": {name: file}}`); header metadata
//!   `{"format": "pt"}`;
//! * `quantize_config.json` (GPTQ) or `quant_config.json` (AWQ) as the peers write them;
//! * extra files as given (`tokenizer.json`, `generation_config.json`, ...).
//!
//! Per linear `p` (the module name, e.g. `model.layers.0.mlp.up_proj`; a trailing `.weight`
//! is accepted and dropped):
//!
//! | format | tensors | `quantization_config` |
//! |--------|---------|-----------------------|
//! | GPTQ v1 / v2 | `p.qweight` i32, `p.qzeros` i32, `p.scales` f16, `p.g_idx` i32 | `{"quant_method":"gptq","bits","group_size","desc_act","sym","static_groups","true_sequential","damp_percent","checkpoint_format","lm_head":false}` |
//! | AWQ GEMM | `p.qweight`, `p.qzeros` i32, `p.scales` f16 | `{"quant_method":"awq","zero_point":true,"group_size","bits":4,"version":"gemm"}` |
//! | bnb 4-bit | `p.weight` u8, `p.weight.absmax`, `p.weight.quant_map`, (`nested_absmax`, `nested_quant_map`), `p.weight.quant_state.bitsandbytes__nf4` | `{"quant_method":"bitsandbytes","load_in_4bit":true,"bnb_4bit_quant_type","bnb_4bit_use_double_quant",...}` |
//! | LLM.int8 | `p.weight` i8, `p.SCB` f32 | `{"quant_method":"bitsandbytes","load_in_8bit":true,"llm_int8_threshold":6.0,...}` |
//!
//! Biases and every other tensor (embeddings, norms, `lm_head`) go in [`HfExport::dense`]
//! with the dtype chosen there (GPTQ / AWQ loaders expect f16 biases).
//!
//! ```
//! use ndarray::Array2;
//! use quantlab_checkpoints::export::hf::{write_hf_dir, HfExport, HfQuantFormat};
//! use quantlab_checkpoints::export::read::read_quantized_dir;
//! use quantlab_checkpoints::pack::GptqFormat;
//! use quantlab_grids::{quantize_rtn, FormatSpec, Granularity, UniformGrid};
//! let w = Array2::from_shape_fn((32, 64), |(r, k)| ((r * 64 + k) as f32 * 0.13).sin());
//! let spec = FormatSpec::Uniform(UniformGrid::new(4, true).unwrap());
//! let q = quantize_rtn("w", w.view(), &spec, Granularity::Group(32)).unwrap();
//! let mut ex = HfExport::new(serde_json::json!({"model_type": "llama"}));
//! ex.linears.push(("model.layers.0.mlp.up_proj".into(), q.clone()));
//! let dir = tempfile::tempdir().unwrap();
//! let out = dir.path().join("gptq");
//! write_hf_dir(&out, &ex, HfQuantFormat::Gptq(GptqFormat::V1)).unwrap();
//! let (config, weights) = read_quantized_dir(&out).unwrap();
//! assert_eq!(config["quantization_config"]["bits"], 4);
//! let (name, back) = &weights[0];
//! assert_eq!(name, "model.layers.0.mlp.up_proj.weight");
//! let want = q.dequantize();
//! // scales are stored as f16
//! assert!(back.iter().zip(want.iter()).all(|(a, b)| (a - b).abs() < 1e-3));
//! ```

use super::{invalid, io_at, sibling};
use crate::pack::bnb::{pack_bnb4, pack_int8, Bnb4Absmax, RawDtype, RawTensor};
use crate::pack::{pack_awq, pack_err, pack_gptq, GptqFormat};
use crate::Result;
use half::{bf16, f16};
use quantlab_grids::{FormatSpec, Granularity, QuantizedLinear};
use safetensors::Dtype;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::Path;

/// The checkpoint layout to write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HfQuantFormat {
    /// GPTQ, `checkpoint_format` `"gptq"` (v1, zeros minus one) or `"gptq_v2"`.
    Gptq(GptqFormat),
    /// AutoAWQ GEMM (4 bits).
    Awq,
    /// bitsandbytes 4-bit; NF4 or FP4 from the linears' format; double quantization when the
    /// linears carry nested scales ([`QuantizedLinear::with_double_quant`]).
    Bnb4,
    /// bitsandbytes LLM.int8 (`FormatSpec::Int8`, per channel).
    Int8,
}

/// Storage dtype of a dense tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DenseDtype {
    /// float32.
    F32,
    /// float16 (round to nearest even).
    F16,
    /// bfloat16 (round to nearest even).
    BF16,
}

/// An unquantized tensor (embedding, norm, bias, `lm_head`).
#[derive(Clone, Debug, PartialEq)]
pub struct DenseTensor {
    /// Row-major shape.
    pub shape: Vec<usize>,
    /// Values.
    pub data: Vec<f32>,
    /// How to store them.
    pub dtype: DenseDtype,
}

/// GPTQ settings recorded in the config (they describe how the codes were found).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GptqMeta {
    /// `damp_percent`.
    pub damp_percent: f64,
    /// `true_sequential`.
    pub true_sequential: bool,
    /// `static_groups`.
    pub static_groups: bool,
}

impl Default for GptqMeta {
    fn default() -> Self {
        Self {
            damp_percent: 0.01,
            true_sequential: true,
            static_groups: false,
        }
    }
}

/// Everything that goes into an exported directory.
#[derive(Clone, Debug)]
pub struct HfExport {
    /// The base `config.json` (its `quantization_config` is replaced).
    pub config: Value,
    /// `(module name, quantized linear)`.
    pub linears: Vec<(String, QuantizedLinear)>,
    /// `(tensor name, tensor)`: everything else, biases included.
    pub dense: Vec<(String, DenseTensor)>,
    /// `(file name, bytes)` copied into the directory (`tokenizer.json`,
    /// `generation_config.json`, `tokenizer_config.json`, ...).
    pub files: Vec<(String, Vec<u8>)>,
    /// GPTQ config fields.
    pub gptq: GptqMeta,
    /// torch dtype of the original weights for bitsandbytes' quant state (`"float16"`).
    pub bnb_dtype: String,
    /// Largest shard, in bytes of tensor data (default 2 GB).
    pub max_shard_bytes: u64,
}

impl HfExport {
    /// An export with a base config and nothing else; defaults for the rest.
    pub fn new(config: Value) -> Self {
        Self {
            config,
            linears: Vec::new(),
            dense: Vec::new(),
            files: Vec::new(),
            gptq: GptqMeta::default(),
            bnb_dtype: "float16".into(),
            max_shard_bytes: 2_000_000_000,
        }
    }

    /// Adds the files among `tokenizer.json`, `tokenizer_config.json`,
    /// `special_tokens_map.json`, `generation_config.json` that exist in `dir`.
    pub fn with_files_from(mut self, dir: &Path) -> Result<Self> {
        for f in [
            "tokenizer.json",
            "tokenizer_config.json",
            "special_tokens_map.json",
            "generation_config.json",
        ] {
            let p = dir.join(f);
            if p.is_file() {
                let bytes = std::fs::read(&p).map_err(|e| io_at(&p, e))?;
                self.files.push((f.to_string(), bytes));
            }
        }
        Ok(self)
    }
}

/// A tensor ready for safetensors (owned bytes).
type Out = crate::quantlab::StoredTensor<'static>;

fn i32_out(a: &ndarray::Array2<i32>) -> Out {
    Out {
        dtype: Dtype::I32,
        shape: a.shape().to_vec(),
        data: a
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect::<Vec<u8>>()
            .into(),
    }
}

fn raw_out(t: RawTensor) -> Out {
    Out {
        dtype: match t.dtype {
            RawDtype::U8 => Dtype::U8,
            RawDtype::I8 => Dtype::I8,
            RawDtype::F32 => Dtype::F32,
        },
        shape: t.shape,
        data: t.data.into(),
    }
}

fn dense_out(name: &str, t: &DenseTensor) -> Result<Out> {
    if t.shape.iter().product::<usize>() != t.data.len() {
        return Err(invalid(
            format!("tensor `{name}`"),
            format!("shape {:?} for {} values", t.shape, t.data.len()),
        ));
    }
    let (dtype, data): (Dtype, Vec<u8>) = match t.dtype {
        DenseDtype::F32 => (
            Dtype::F32,
            t.data.iter().flat_map(|v| v.to_le_bytes()).collect(),
        ),
        DenseDtype::F16 => (
            Dtype::F16,
            t.data
                .iter()
                .flat_map(|&v| f16::from_f32(v).to_le_bytes())
                .collect(),
        ),
        DenseDtype::BF16 => (
            Dtype::BF16,
            t.data
                .iter()
                .flat_map(|&v| bf16::from_f32(v).to_le_bytes())
                .collect(),
        ),
    };
    Ok(Out {
        dtype,
        shape: t.shape.clone(),
        data: data.into(),
    })
}

/// The shared (bits, group size, sym) of the uniform-grid linears; errors name the first
/// linear that differs or is not uniform.
fn uniform_settings(ex: &HfExport, label: &str) -> Result<(u32, i64, bool, bool)> {
    let mut first: Option<(u32, i64, bool)> = None;
    let mut desc_act = false;
    for (name, q) in &ex.linears {
        let FormatSpec::Uniform(g) = q.spec else {
            return Err(pack_err(
                label,
                name,
                format!("format {:?} is not a uniform integer grid", q.spec),
            ));
        };
        let gs = match q.granularity {
            Granularity::PerChannel => -1,
            Granularity::Group(g) => g as i64,
            Granularity::PerTensor => {
                return Err(pack_err(
                    label,
                    name,
                    "one scale per tensor: use per-channel or groups",
                ))
            }
        };
        let s = (g.bits, gs, g.sym);
        match first {
            None => first = Some(s),
            Some(f) if f != s => {
                return Err(pack_err(
                    label,
                    name,
                    format!("bits/group/sym {s:?} differ from the first linear's {f:?}: one config per checkpoint"),
                ))
            }
            _ => {}
        }
        desc_act |= !q.g_idx_is_trivial();
    }
    let (bits, gs, sym) = first.unwrap_or((4, 128, true));
    Ok((bits, gs, sym, desc_act))
}

fn module_name(name: &str) -> &str {
    name.strip_suffix(".weight").unwrap_or(name)
}

/// Writes the directory `dir` for `ex` in `format` (see the module docs). Atomic: built in
/// `DIR.tmp`, then renamed; an existing `dir` is replaced.
///
/// Errors name the tensor: a linear the format cannot hold (wrong format, bits, shape,
/// group, zero), settings that differ between linears (GPTQ / AWQ / bnb keep one config), a
/// dense tensor whose data does not match its shape, a duplicate name; and the path on I/O.
pub fn write_hf_dir(dir: &Path, ex: &HfExport, format: HfQuantFormat) -> Result<()> {
    let mut tensors: BTreeMap<String, Out> = BTreeMap::new();
    let mut put = |name: String, t: Out| -> Result<()> {
        if tensors.insert(name.clone(), t).is_some() {
            return Err(invalid(format!("tensor `{name}`"), "written twice"));
        }
        Ok(())
    };
    let mut config = ex.config.clone();
    if !config.is_object() {
        return Err(invalid(
            "config.json",
            "the base config must be a JSON object",
        ));
    }
    let mut side_file: Option<(&str, Value)> = None;
    let qc = match format {
        HfQuantFormat::Gptq(f) => {
            let (bits, gs, sym, desc_act) = uniform_settings(ex, f_label(f))?;
            for (name, q) in &ex.linears {
                let p = module_name(name);
                let t = pack_gptq(p, q, f)?;
                put(format!("{p}.qweight"), i32_out(&t.qweight))?;
                put(format!("{p}.qzeros"), i32_out(&t.qzeros))?;
                put(
                    format!("{p}.scales"),
                    Out {
                        dtype: Dtype::F16,
                        shape: t.scales.shape().to_vec(),
                        data: t
                            .scales
                            .iter()
                            .flat_map(|v| v.to_le_bytes())
                            .collect::<Vec<u8>>()
                            .into(),
                    },
                )?;
                put(
                    format!("{p}.g_idx"),
                    Out {
                        dtype: Dtype::I32,
                        shape: vec![t.g_idx.len()],
                        data: t
                            .g_idx
                            .iter()
                            .flat_map(|v| v.to_le_bytes())
                            .collect::<Vec<u8>>()
                            .into(),
                    },
                )?;
            }
            let c = json!({
                "quant_method": "gptq",
                "bits": bits,
                "group_size": gs,
                "desc_act": desc_act,
                "sym": sym,
                "static_groups": ex.gptq.static_groups,
                "true_sequential": ex.gptq.true_sequential,
                "damp_percent": ex.gptq.damp_percent,
                "checkpoint_format": f.checkpoint_format(),
                "lm_head": false,
            });
            side_file = Some(("quantize_config.json", c.clone()));
            c
        }
        HfQuantFormat::Awq => {
            let (bits, gs, _, _) = uniform_settings(ex, "AWQ GEMM")?;
            for (name, q) in &ex.linears {
                let p = module_name(name);
                let t = pack_awq(p, q)?;
                put(format!("{p}.qweight"), i32_out(&t.qweight))?;
                put(format!("{p}.qzeros"), i32_out(&t.qzeros))?;
                put(
                    format!("{p}.scales"),
                    Out {
                        dtype: Dtype::F16,
                        shape: t.scales.shape().to_vec(),
                        data: t
                            .scales
                            .iter()
                            .flat_map(|v| v.to_le_bytes())
                            .collect::<Vec<u8>>()
                            .into(),
                    },
                )?;
            }
            let gs = if gs < 0 {
                ex.linears.first().map_or(128, |(_, q)| q.shape().1 as i64)
            } else {
                gs
            };
            side_file = Some((
                "quant_config.json",
                json!({"zero_point": true, "q_group_size": gs, "w_bit": bits, "version": "GEMM"}),
            ));
            json!({"quant_method": "awq", "zero_point": true, "group_size": gs, "bits": bits, "version": "gemm"})
        }
        HfQuantFormat::Bnb4 => {
            let mut kind: Option<(String, bool)> = None;
            for (name, q) in &ex.linears {
                let p = module_name(name);
                let mut t = pack_bnb4(p, q, None, &ex.bnb_dtype)?;
                if let Some(n) = &q.nested {
                    t.absmax = Bnb4Absmax::Nested(n.clone());
                }
                let k = (t.quant_type.name().to_string(), q.nested.is_some());
                match &kind {
                    None => kind = Some(k),
                    Some(f) if *f != k => {
                        return Err(pack_err(
                            "bitsandbytes 4-bit",
                            name,
                            format!(
                            "(quant type, double quant) {k:?} differ from the first linear's {f:?}"
                        ),
                        ))
                    }
                    _ => {}
                }
                for (n, raw) in t.tensors(p) {
                    put(n, raw_out(raw))?;
                }
            }
            let (qt, dq) = kind.unwrap_or(("nf4".into(), false));
            json!({
                "quant_method": "bitsandbytes",
                "load_in_4bit": true,
                "load_in_8bit": false,
                "bnb_4bit_quant_type": qt,
                "bnb_4bit_use_double_quant": dq,
                "bnb_4bit_compute_dtype": ex.bnb_dtype,
                "bnb_4bit_quant_storage": "uint8",
                "llm_int8_threshold": 6.0,
                "llm_int8_skip_modules": null,
                "llm_int8_has_fp16_weight": false,
                "llm_int8_enable_fp32_cpu_offload": false,
                "_load_in_4bit": true,
                "_load_in_8bit": false,
            })
        }
        HfQuantFormat::Int8 => {
            for (name, q) in &ex.linears {
                let p = module_name(name);
                for (n, raw) in pack_int8(p, q)?.tensors(p) {
                    put(n, raw_out(raw))?;
                }
            }
            json!({
                "quant_method": "bitsandbytes",
                "load_in_4bit": false,
                "load_in_8bit": true,
                "llm_int8_threshold": 6.0,
                "llm_int8_skip_modules": null,
                "llm_int8_has_fp16_weight": false,
                "llm_int8_enable_fp32_cpu_offload": false,
                "_load_in_4bit": false,
                "_load_in_8bit": true,
            })
        }
    };
    for (name, t) in &ex.dense {
        put(name.clone(), dense_out(name, t)?)?;
    }
    config["quantization_config"] = qc;

    // Shards, in name order.
    let mut shards: Vec<Vec<&str>> = vec![Vec::new()];
    let mut size = 0u64;
    for (name, t) in &tensors {
        let n = t.data.len() as u64;
        if size > 0 && size + n > ex.max_shard_bytes {
            shards.push(Vec::new());
            size = 0;
        }
        shards.last_mut().expect("a shard").push(name);
        size += n;
    }
    let n_shards = shards.len();
    let file_name = |i: usize| {
        if n_shards == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{:05}.safetensors", i + 1, n_shards)
        }
    };

    let tmp = sibling(dir, ".tmp");
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| io_at(&tmp, e))?;
    }
    let result = (|| -> Result<()> {
        std::fs::create_dir_all(&tmp).map_err(|e| io_at(&tmp, e))?;
        let write_json = |name: &str, v: &Value| -> Result<()> {
            let p = tmp.join(name);
            let s = serde_json::to_string_pretty(v).expect("plain JSON");
            std::fs::write(&p, s + "\n").map_err(|e| io_at(&p, e))
        };
        write_json("config.json", &config)?;
        if let Some((name, v)) = &side_file {
            write_json(name, v)?;
        }
        let meta: std::collections::HashMap<String, String> =
            [("format".to_string(), "pt".to_string())].into();
        let mut weight_map = serde_json::Map::new();
        let mut total = 0u64;
        for (i, names) in shards.iter().enumerate() {
            let f = file_name(i);
            let views: Vec<(&str, &Out)> = names.iter().map(|&n| (n, &tensors[n])).collect();
            for (n, t) in &views {
                weight_map.insert(n.to_string(), Value::String(f.clone()));
                total += t.data.len() as u64;
            }
            let p = tmp.join(&f);
            safetensors::serialize_to_file(views, Some(meta.clone()), &p)
                .map_err(|e| invalid(format!("safetensors file {}", p.display()), e.to_string()))?;
        }
        if n_shards > 1 {
            write_json(
                "model.safetensors.index.json",
                &json!({"metadata": {"total_size": total}, "weight_map": weight_map}),
            )?;
        }
        for (name, bytes) in &ex.files {
            if name.contains('/') || name.contains('\\') || name.starts_with('.') {
                return Err(invalid(
                    format!("extra file `{name}`"),
                    "use a plain file name",
                ));
            }
            let p = tmp.join(name);
            std::fs::write(&p, bytes).map_err(|e| io_at(&p, e))?;
        }
        if dir.exists() {
            let old = sibling(dir, ".old");
            if old.exists() {
                std::fs::remove_dir_all(&old).map_err(|e| io_at(&old, e))?;
            }
            std::fs::rename(dir, &old).map_err(|e| io_at(dir, e))?;
            std::fs::rename(&tmp, dir).map_err(|e| io_at(dir, e))?;
            std::fs::remove_dir_all(&old).map_err(|e| io_at(&old, e))?;
        } else {
            std::fs::rename(&tmp, dir).map_err(|e| io_at(dir, e))?;
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result
}

fn f_label(f: GptqFormat) -> &'static str {
    match f {
        GptqFormat::V1 => "GPTQ v1",
        GptqFormat::V2 => "GPTQ v2",
    }
}
