//! `quantlab quantize --format F`: the checkpoint layouts the ecosystem loads, written from the
//! driver's output, and a loader that reads every one of them back.
//!
//! | `--format` | written | methods |
//! |------------|---------|---------|
//! | `quantlab` (default) | the project's own directory ([`crate::save`]) | all |
//! | `gptq`, `gptq_v2` | Hugging Face directory, GPTQ tensors (v1: zeros minus one; v2: raw) | `rtn`, `gptq`, `awq`, `awq+gptq` with 2, 3, 4 or 8 bits |
//! | `awq` | Hugging Face directory, AutoAWQ GEMM tensors | `rtn`, `gptq`, `awq`, `awq+gptq` with 4 bits, no act-order |
//! | `bnb-nf4`, `bnb-fp4` | Hugging Face directory, bitsandbytes 4-bit (double quant with `--double-quant`) | `nf4` / `fp4` (RTN), or `gptq` (GPTQ on the codebook grid, blocks of 64) |
//! | `bnb-int8` | Hugging Face directory, LLM.int8 (`weight` i8 + `SCB`) | `int8` |
//! | `gguf:<type>` | one GGUF v3 file | `rtn` (imatrix-weighted with calibration), `gptq` (on the ggml grid) |
//!
//! GGUF types: `q4_0`, `q4_1`, `q5_0`, `q5_1`, `q8_0` (each block linear is quantized ON the
//! ggml grid, [`quantlab_grids::GgmlGrid`], groups of 32, so GPTQ's error feedback places the
//! weights on exactly the block values written; `rtn` fits each block's scale with the
//! importance matrix `diag(X^T X)` from the same capture, as llama.cpp's imatrix does);
//! `q2_k` .. `q6_k` (linears whose rows are a multiple of 256 are quantized ON the K grid,
//! [`quantlab_grids::ggml_k`]: each 256-column super-block's f16 `d`, `dmin` and sub-block
//! scales are fitted when GPTQ's sweep reaches it (or up front with static groups; `rtn`
//! with the imatrix), and the codes and parameters are written as they are; shorter rows
//! fall back as llama.cpp does, see [`k_fallback`]); llama-quantize's mixes `q2_k`,
//! `q3_k_s|m|l`, `q4_k_s|m`, `q5_k_s|m`, `q6_k`, `iq4_nl`, whose block linears get the
//! type llama.cpp's quantizer gives each ([`GgufFile::tensor_type`]: attn_v, ffn_down,
//! attn_output by layer) and are each quantized on their own grid (`--pure`: all of the
//! base type); `f32`, `f16` (nothing quantized).
//! Embeddings and `output.weight` follow llama.cpp's quantizer
//! ([`llama_cpp_embedding_type`]); norms and biases are F32.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use ndarray::{Array1, Array2, Axis};
use quantlab_checkpoints::export::gguf::{
    quantize_tensor, write_gguf_metadata_typed, write_gguf_typed, GgufTensor,
};
use quantlab_checkpoints::export::hf::{
    write_hf_dir, DenseDtype, DenseTensor, GptqMeta, HfExport, HfQuantFormat,
};
use quantlab_checkpoints::export::read::{detect_format, read_quantized_dir, DetectedFormat};
use quantlab_checkpoints::gguf::{GgmlType, GgufArray, GgufValue};
use quantlab_checkpoints::pack::GptqFormat;
use quantlab_checkpoints::CheckpointError;
use quantlab_models::{LlamaConfig, LlamaModel, LlamaTokenizer, MemoryWeights};
use serde_json::{json, Value};

use crate::config::{Plan, QuantizeConfig};
use crate::report::QuantizedLayer;
use crate::source::SourceKind;
use crate::tensors::to_array;
use crate::{PipelineError, Result};

pub use crate::format::{
    grid_of, is_k_type, k_fallback, llama_cpp_embedding_type, type_for_row, use_more_bits,
    ExportFormat, GgufFile, GgufMix, LinearRole, TensorSite, GGUF_FILES,
};

/// Everything [`write_export`] needs from a run.
pub struct ExportInputs<'a> {
    /// The quantized model in memory.
    pub model: &'a LlamaModel,
    /// Tensors that are not block linears (HF names, f32).
    pub others: &'a BTreeMap<String, Tensor>,
    /// The driver's layers.
    pub layers: &'a [QuantizedLayer],
    /// AWQ: norm name -> scale to divide it by.
    pub norm_scales: &'a BTreeMap<String, Array1<f32>>,
    /// The source model path.
    pub source: &'a Path,
    /// GGUF or HF directory.
    pub source_kind: SourceKind,
    /// The tokenizer.
    pub tokenizer: &'a LlamaTokenizer,
    /// The configuration of the run.
    pub config: &'a QuantizeConfig,
    /// The plan.
    pub plan: &'a Plan,
    /// The run's `quantization_config.json` (kept as `quantlab_config.json` in HF exports).
    pub quant_config: Value,
}

fn ck(e: CheckpointError) -> PipelineError {
    PipelineError::Format {
        path: "export".into(),
        detail: e.to_string(),
    }
}

fn tensor_2d(t: &Tensor, name: &str) -> Result<Array2<f32>> {
    let t = match t.dims().len() {
        1 => t
            .reshape((1, t.dims()[0]))
            .map_err(|e| PipelineError::Format {
                path: name.into(),
                detail: e.to_string(),
            })?,
        _ => t.clone(),
    };
    to_array(&t)
}

/// The value stored for a linear that is not quantized (skipped): the model's weight (AWQ:
/// times the norm's share of the scale).
fn float_weight(inp: &ExportInputs<'_>, l: &QuantizedLayer) -> Result<Array2<f32>> {
    let w = to_array(&inp.model.linear(&l.name)?.weight()?)?;
    Ok(match &l.norm_scale {
        Some(s) => w * s.view().insert_axis(Axis(0)),
        None => w,
    })
}

/// Dense tensors (embeddings, norms with AWQ scales folded, biases, `lm_head`) under HF names.
fn dense_tensors(inp: &ExportInputs<'_>) -> Result<Vec<(String, Tensor)>> {
    let tied = inp.model.config().tie_word_embeddings;
    let mut v = Vec::new();
    for (name, t) in inp.others {
        if name == "lm_head.weight" && tied {
            continue;
        }
        let t = match inp.norm_scales.get(name) {
            Some(s) => Tensor::from_slice(s.as_slice().expect("contiguous"), s.len(), &Device::Cpu)
                .and_then(|s| t.div(&s))
                .map_err(|e| PipelineError::Format {
                    path: name.clone(),
                    detail: e.to_string(),
                })?,
            None => t.clone(),
        };
        v.push((name.clone(), t));
    }
    Ok(v)
}

/// Writes the checkpoint of a run in `c.format` at `out` (a directory, or a file for GGUF),
/// atomically. The default `quantlab` format is [`crate::save::save_quantized`]'s.
pub fn write_export(out: &Path, inp: &ExportInputs<'_>) -> Result<()> {
    match inp.config.format {
        ExportFormat::Quantlab => Err(PipelineError::option(
            "--format",
            "quantlab: written by save_quantized",
        )),
        ExportFormat::Gguf(f) => write_gguf_export(out, inp, f),
        f => write_hf_export(out, inp, f),
    }
}

fn write_hf_export(out: &Path, inp: &ExportInputs<'_>, f: ExportFormat) -> Result<()> {
    let c = inp.config;
    let mut config = crate::save::hf_config_json(inp.model.config());
    config["torch_dtype"] = json!("float16");
    let mut ex = HfExport::new(config);
    let g = c.method.gptq_options().copied().unwrap_or_default();
    ex.gptq = GptqMeta {
        damp_percent: g.damp,
        true_sequential: g.true_sequential,
        static_groups: g.static_groups,
    };
    let mut unquantized = Vec::new();
    for l in inp.layers {
        match &l.linear {
            Some(q) => ex.linears.push((l.name.clone(), q.clone())),
            None => {
                let w = float_weight(inp, l)?;
                unquantized.push(l.name.clone());
                ex.dense.push((
                    format!("{}.weight", l.name),
                    DenseTensor {
                        shape: vec![w.nrows(), w.ncols()],
                        data: w.iter().copied().collect(),
                        dtype: DenseDtype::F16,
                    },
                ));
            }
        }
    }
    for (name, t) in dense_tensors(inp)? {
        let a = tensor_2d(&t, &name)?;
        ex.dense.push((
            name,
            DenseTensor {
                shape: t.dims().to_vec(),
                data: a.iter().copied().collect(),
                dtype: DenseDtype::F16,
            },
        ));
    }
    // tokenizer files (and a generation config), via a scratch directory
    let scratch = crate::save::temp_dir_for(&out.with_extension("tokenizer"));
    let _ = std::fs::remove_dir_all(&scratch);
    std::fs::create_dir_all(&scratch).map_err(|e| PipelineError::io(&scratch, e))?;
    let files = (|| -> Result<Vec<(String, Vec<u8>)>> {
        crate::save::write_tokenizer(&scratch, inp.source, inp.tokenizer)?;
        let mut files = Vec::new();
        for e in std::fs::read_dir(&scratch).map_err(|e| PipelineError::io(&scratch, e))? {
            let p = e.map_err(|e| PipelineError::io(&scratch, e))?.path();
            let name = p
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .to_string();
            files.push((
                name,
                std::fs::read(&p).map_err(|e| PipelineError::io(&p, e))?,
            ));
        }
        Ok(files)
    })();
    let _ = std::fs::remove_dir_all(&scratch);
    ex.files = files?;
    if !ex.files.iter().any(|(n, _)| n == "generation_config.json") {
        let mc = inp.model.config();
        let mut g = json!({"_from_model_config": true});
        if let Some(b) = mc.bos_token_id {
            g["bos_token_id"] = json!(b);
        }
        match mc.eos_token_ids.as_slice() {
            [] => {}
            [e] => g["eos_token_id"] = json!(e),
            many => g["eos_token_id"] = json!(many),
        }
        ex.files.push((
            "generation_config.json".into(),
            serde_json::to_vec_pretty(&g).expect("JSON"),
        ));
    }
    let mut qc = inp.quant_config.clone();
    if let Some(o) = qc.as_object_mut() {
        o.insert("export_format".into(), json!(f.name()));
    }
    ex.files.push((
        "quantlab_config.json".into(),
        serde_json::to_vec_pretty(&qc).expect("JSON"),
    ));
    let hf = match f {
        ExportFormat::Gptq => HfQuantFormat::Gptq(GptqFormat::V1),
        ExportFormat::GptqV2 => HfQuantFormat::Gptq(GptqFormat::V2),
        ExportFormat::Awq => HfQuantFormat::Awq,
        ExportFormat::BnbNf4 | ExportFormat::BnbFp4 => HfQuantFormat::Bnb4,
        _ => HfQuantFormat::Int8,
    };
    write_hf_dir(out, &ex, hf).map_err(ck)?;
    if !unquantized.is_empty() {
        // record the float linears the way transformers' quantizers name them
        let p = out.join("config.json");
        let mut v: Value =
            serde_json::from_slice(&std::fs::read(&p).map_err(|e| PipelineError::io(&p, e))?)
                .map_err(|e| PipelineError::Format {
                    path: p.display().to_string(),
                    detail: e.to_string(),
                })?;
        let key = if matches!(
            f,
            ExportFormat::BnbNf4 | ExportFormat::BnbFp4 | ExportFormat::BnbInt8
        ) {
            "llm_int8_skip_modules"
        } else {
            "modules_to_not_convert"
        };
        v["quantization_config"][key] = json!(unquantized);
        let tmp = p.with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_string_pretty(&v).expect("JSON") + "\n")
            .and_then(|_| std::fs::rename(&tmp, &p))
            .map_err(|e| PipelineError::io(&p, e))?;
    }
    Ok(())
}

fn write_gguf_export(out: &Path, inp: &ExportInputs<'_>, f: GgufFile) -> Result<()> {
    let mc = inp.model.config();
    let t = f.ty;
    let float_ty = if t == GgmlType::F16 {
        GgmlType::F16
    } else {
        GgmlType::F32
    };
    let mut tensors: Vec<(String, GgufTensor)> = Vec::new();
    for l in inp.layers {
        let wname = format!("{}.weight", l.name);
        let gt = match &l.linear {
            Some(q) => GgufTensor::from_quantized(&wname, q).map_err(ck)?,
            None => {
                let w = float_weight(inp, l)?;
                quantize_tensor(&wname, w.view(), float_ty).map_err(ck)?
            }
        };
        tensors.push((wname, gt));
    }
    let has_output = inp.others.contains_key("lm_head.weight") && !mc.tie_word_embeddings;
    for (name, tt) in dense_tensors(inp)? {
        if quantlab_checkpoints::export::gguf::hf_to_gguf_name(&name).is_none() {
            continue; // e.g. rotary inv_freq buffers: not part of a GGUF
        }
        let a = tensor_2d(&tt, &name)?;
        let ty = match name.as_str() {
            "model.embed_tokens.weight" => llama_cpp_embedding_type(t, a.ncols(), !has_output),
            "lm_head.weight" => llama_cpp_embedding_type(t, a.ncols(), true),
            _ => GgmlType::F32,
        };
        let mut g = quantize_tensor(&name, a.view(), ty).map_err(ck)?;
        g.shape = tt.dims().to_vec();
        tensors.push((name, g));
    }
    let main = f.file_type();
    match inp.source_kind {
        SourceKind::Gguf => write_gguf_typed(out, inp.source, &tensors, main).map_err(ck),
        SourceKind::HfDir => {
            let meta = gguf_metadata_from_hf(mc, inp.source, inp.tokenizer)?;
            write_gguf_metadata_typed(out, &meta, &tensors, main).map_err(ck)
        }
    }?;
    Ok(())
}

/// GGUF metadata for a LLaMA-family model read from a Hugging Face directory: architecture
/// `llama`, the hyper-parameters, and a `gpt2` (byte-level BPE) tokenizer from
/// `tokenizer.json` (tokens by id, padded to the vocabulary with `[PAD<i>]` of type unused,
/// merges, added special tokens as control tokens, bos / eos, `add_bos_token`, chat template).
/// Other tokenizer models are refused with an error naming the file.
pub fn gguf_metadata_from_hf(
    mc: &LlamaConfig,
    dir: &Path,
    tok: &LlamaTokenizer,
) -> Result<Vec<(String, GgufValue)>> {
    let tj = dir.join("tokenizer.json");
    let bad = |d: String| PipelineError::Format {
        path: tj.display().to_string(),
        detail: d,
    };
    let v: Value =
        serde_json::from_slice(&std::fs::read(&tj).map_err(|e| PipelineError::io(&tj, e))?)
            .map_err(|e| bad(format!("not JSON: {e}")))?;
    if v["model"]["type"].as_str() != Some("BPE") {
        return Err(bad(format!(
            "tokenizer model {:?}: only byte-level BPE tokenizers are converted to GGUF (tokenizer.ggml.model gpt2)",
            v["model"]["type"]
        )));
    }
    let n = mc.vocab_size;
    let mut tokens: Vec<Option<String>> = vec![None; n];
    let mut types = vec![1i32; n];
    let vocab = v["model"]["vocab"]
        .as_object()
        .ok_or_else(|| bad("model.vocab is not an object".into()))?;
    let mut put = |id: u64, s: &str, ty: i32| -> Result<()> {
        let id = id as usize;
        if id >= n {
            return Err(bad(format!(
                "token `{s}` has id {id}, outside the vocabulary of {n}"
            )));
        }
        tokens[id] = Some(s.to_string());
        types[id] = ty;
        Ok(())
    };
    for (s, id) in vocab {
        put(
            id.as_u64().ok_or_else(|| bad(format!("token `{s}`: id")))?,
            s,
            1,
        )?;
    }
    if let Some(added) = v["added_tokens"].as_array() {
        for a in added {
            let (Some(id), Some(s)) = (a["id"].as_u64(), a["content"].as_str()) else {
                continue;
            };
            let special = a["special"].as_bool().unwrap_or(false);
            put(id, s, if special { 3 } else { 4 })?;
        }
    }
    let tokens: Vec<String> = tokens
        .into_iter()
        .enumerate()
        .map(|(i, t)| {
            t.unwrap_or_else(|| {
                types[i] = 5;
                format!("[PAD{i}]")
            })
        })
        .collect();
    let merges: Vec<String> = match v["model"]["merges"].as_array() {
        None => Vec::new(),
        Some(m) => m
            .iter()
            .filter_map(|x| match x {
                Value::String(s) => Some(s.clone()),
                Value::Array(p) if p.len() == 2 => Some(format!(
                    "{} {}",
                    p[0].as_str().unwrap_or(""),
                    p[1].as_str().unwrap_or("")
                )),
                _ => None,
            })
            .collect(),
    };
    let a = |k: &str| format!("llama.{k}");
    let u = |x: usize| GgufValue::U32(x as u32);
    let mut meta = vec![
        (
            "general.architecture".to_string(),
            GgufValue::String("llama".into()),
        ),
        (
            "general.name".into(),
            GgufValue::String(
                dir.file_name()
                    .map(|s| s.to_string_lossy().to_string())
                    .unwrap_or_else(|| "model".into()),
            ),
        ),
        (a("block_count"), u(mc.num_hidden_layers)),
        (a("context_length"), u(mc.max_position_embeddings)),
        (a("embedding_length"), u(mc.hidden_size)),
        (a("feed_forward_length"), u(mc.intermediate_size)),
        (a("attention.head_count"), u(mc.num_attention_heads)),
        (a("attention.head_count_kv"), u(mc.num_key_value_heads)),
        (a("attention.key_length"), u(mc.head_dim)),
        (a("attention.value_length"), u(mc.head_dim)),
        (a("rope.freq_base"), GgufValue::F32(mc.rope_theta as f32)),
        (
            a("attention.layer_norm_rms_epsilon"),
            GgufValue::F32(mc.rms_norm_eps as f32),
        ),
        (a("rope.dimension_count"), u(mc.head_dim)),
        (a("vocab_size"), u(n)),
        (
            "tokenizer.ggml.model".into(),
            GgufValue::String("gpt2".into()),
        ),
        (
            "tokenizer.ggml.pre".into(),
            GgufValue::String("default".into()),
        ),
        (
            "tokenizer.ggml.tokens".into(),
            GgufValue::Array(GgufArray::String(tokens)),
        ),
        (
            "tokenizer.ggml.token_type".into(),
            GgufValue::Array(GgufArray::I32(types)),
        ),
        (
            "tokenizer.ggml.merges".into(),
            GgufValue::Array(GgufArray::String(merges)),
        ),
        (
            "tokenizer.ggml.add_bos_token".into(),
            GgufValue::Bool(tok.add_bos()),
        ),
    ];
    if let Some(b) = tok.bos_token_id().or(mc.bos_token_id) {
        meta.push(("tokenizer.ggml.bos_token_id".into(), GgufValue::U32(b)));
    }
    if let Some(&e) = tok.eos_token_ids().first().or(mc.eos_token_ids.first()) {
        meta.push(("tokenizer.ggml.eos_token_id".into(), GgufValue::U32(e)));
    }
    if let Some(t) = tok.chat_template() {
        meta.push((
            "tokenizer.chat_template".into(),
            GgufValue::String(t.into()),
        ));
    }
    Ok(meta)
}

/// Loads a model from any checkpoint `quantlab` writes or reads: a GGUF file, a plain or
/// `quantlab` Hugging Face directory ([`LlamaModel::load`]), or a GPTQ (v1 / v2), AWQ GEMM or
/// bitsandbytes (4-bit, int8) directory, dequantized with the peer loader's formula
/// ([`read_quantized_dir`]).
pub fn load_model(path: &Path) -> Result<LlamaModel> {
    let quantized_dir = path.is_dir()
        && path.join("config.json").is_file()
        && !matches!(detect_format(path).map_err(ck)?, DetectedFormat::Dense);
    if !quantized_dir {
        return Ok(LlamaModel::load(path)?);
    }
    let config = LlamaConfig::from_hf_file(&path.join("config.json"))?;
    let (_, weights) = read_quantized_dir(path).map_err(ck)?;
    let mut mem = MemoryWeights::new(PathBuf::from(path));
    for (name, a) in weights {
        let one_d = a.nrows() == 1
            && !(name.ends_with("_proj.weight")
                || name == "lm_head.weight"
                || name == "model.embed_tokens.weight");
        let (r, k) = a.dim();
        let data: Vec<f32> = a.into_iter().collect();
        let t = if one_d {
            Tensor::from_vec(data, k, &Device::Cpu)
        } else {
            Tensor::from_vec(data, (r, k), &Device::Cpu)
        }
        .map_err(|e| PipelineError::Format {
            path: format!("{}: tensor `{name}`", path.display()),
            detail: e.to_string(),
        })?;
        mem.insert(&name, t);
    }
    Ok(LlamaModel::from_source(config, &mem)?)
}
