//! The project's own checkpoint: a Hugging Face directory that the ordinary loaders read
//! unchanged, plus the codes.
//!
//! ```text
//! DIR/config.json                 Hugging Face LlamaForCausalLM config
//! DIR/model.safetensors           every tensor, f32, Hugging Face names; block linears hold
//!                                 their dequantized codes (AWQ: the scaled weight Q(W diag s),
//!                                 with 1/s folded into the preceding RMSNorm weight)
//! DIR/quantized.safetensors       per quantized linear NAME (e.g. model.layers.0.mlp.down_proj):
//!                                 NAME.codes u8 [out, in] (original column order),
//!                                 NAME.scales f32 [out, groups], NAME.zeros f32 [out, groups]
//!                                 (zero points in code units), NAME.g_idx u32 [in],
//!                                 NAME.awq_scale f32 [in] (AWQ: the input scale s),
//!                                 NAME.dq_codes u8 / NAME.dq_absmax f32 / NAME.dq_offset f32 [1]
//!                                 (double-quantized absmax)
//! DIR/quantization_config.json    method, bits, group size, sym, act order, calibration facts,
//!                                 quantlab version, the format and granularity of each linear
//! DIR/tokenizer.json (+ tokenizer_config.json)
//! DIR/report.json                 the run's report
//! ```
//!
//! `model.safetensors` dequantizes `quantized.safetensors` exactly (same f32 values), so
//! `quantlab eval ppl --model DIR`, `generate` and every Hugging Face directory reader load the
//! quantized model as it was in memory. The directory is written as `DIR.tmp-<pid>` and renamed
//! at the end: a failure or an interruption leaves no `DIR`.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::{DType, Device, Tensor};
use ndarray::{Array1, Array2, Axis};
use quantlab_grids::{FormatSpec, Granularity, NestedScales, QuantizedLinear};
use quantlab_models::{LlamaConfig, LlamaModel, LlamaTokenizer, RopeScaling};
use serde_json::{json, Value};

use crate::driver::{to_array, to_tensor, QuantizedLayer};
use crate::error::TensorContext;
use crate::{PipelineError, Result};

/// A Hugging Face `config.json` for `cfg`.
pub fn hf_config_json(cfg: &LlamaConfig) -> Value {
    use quantlab_models::Architecture;
    let (arch, model_type) = match cfg.architecture {
        Architecture::Mistral => ("MistralForCausalLM", "mistral"),
        Architecture::Qwen2 => ("Qwen2ForCausalLM", "qwen2"),
        _ => ("LlamaForCausalLM", "llama"),
    };
    let mut v = json!({
        "architectures": [arch],
        "model_type": model_type,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "vocab_size": cfg.vocab_size,
        "rope_theta": cfg.rope_theta,
        "rms_norm_eps": cfg.rms_norm_eps,
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "hidden_act": "silu",
        "attention_bias": cfg.qkv_bias && cfg.o_bias,
        "mlp_bias": cfg.mlp_bias,
        "torch_dtype": "float32",
    });
    let o = v.as_object_mut().expect("object");
    if let Some(b) = cfg.bos_token_id {
        o.insert("bos_token_id".into(), b.into());
    }
    match cfg.eos_token_ids.as_slice() {
        [] => {}
        [e] => {
            o.insert("eos_token_id".into(), (*e).into());
        }
        many => {
            o.insert("eos_token_id".into(), many.to_vec().into());
        }
    }
    if let Some(w) = cfg.sliding_window {
        o.insert("sliding_window".into(), w.into());
        o.insert("use_sliding_window".into(), true.into());
    }
    match &cfg.rope_scaling {
        Some(RopeScaling::Linear { factor }) => {
            o.insert(
                "rope_scaling".into(),
                json!({"rope_type": "linear", "factor": factor}),
            );
        }
        Some(RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        }) => {
            o.insert(
                "rope_scaling".into(),
                json!({"rope_type": "llama3", "factor": factor, "low_freq_factor": low_freq_factor,
                       "high_freq_factor": high_freq_factor,
                       "original_max_position_embeddings": original_max_position_embeddings}),
            );
        }
        _ => {}
    }
    v
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    std::fs::write(path, bytes).map_err(|e| PipelineError::io(path, e))
}

fn write_json(path: &Path, v: &Value) -> Result<()> {
    let s = serde_json::to_string_pretty(v).expect("JSON values serialise");
    write_file(path, s.as_bytes())
}

/// Writes the tokenizer: the source's `tokenizer.json` and companions when it is a directory,
/// otherwise the tokenizer built from GGUF metadata (`tokenizer.json` +
/// `tokenizer_config.json` with bos/eos, `add_bos_token` and the chat template).
pub fn write_tokenizer(dir: &Path, source: &Path, tok: &LlamaTokenizer) -> Result<()> {
    if source.is_dir() && source.join("tokenizer.json").is_file() {
        for f in [
            "tokenizer.json",
            "tokenizer_config.json",
            "special_tokens_map.json",
            "generation_config.json",
            "chat_template.jinja",
        ] {
            let p = source.join(f);
            if p.is_file() {
                std::fs::copy(&p, dir.join(f)).map_err(|e| PipelineError::io(&p, e))?;
            }
        }
        return Ok(());
    }
    let tj = dir.join("tokenizer.json");
    tok.inner()
        .save(&tj, false)
        .map_err(|e| PipelineError::Format {
            path: tj.display().to_string(),
            detail: format!("cannot save the tokenizer: {e}"),
        })?;
    let name = |id: u32| tok.inner().id_to_token(id);
    let mut tc = json!({
        "add_bos_token": tok.add_bos(),
        "add_eos_token": false,
        "tokenizer_class": "PreTrainedTokenizerFast",
    });
    let o = tc.as_object_mut().expect("object");
    if let Some(b) = tok.bos_token_id().and_then(name) {
        o.insert("bos_token".into(), b.into());
    }
    if let Some(e) = tok.eos_token_ids().first().and_then(|&e| name(e)) {
        o.insert("eos_token".into(), e.into());
    }
    if let Some(t) = tok.chat_template() {
        o.insert("chat_template".into(), t.into());
    }
    write_json(&dir.join("tokenizer_config.json"), &tc)
}

/// Everything [`save_quantized`] writes.
pub struct SaveInputs<'a> {
    /// The quantized model (in memory; AWQ norms not folded).
    pub model: &'a LlamaModel,
    /// The tensors that are not block linears (embeddings, norms, lm_head, ...).
    pub others: &'a BTreeMap<String, Tensor>,
    /// The driver's layers.
    pub layers: &'a [QuantizedLayer],
    /// AWQ: norm name -> scale to divide it by.
    pub norm_scales: &'a BTreeMap<String, Array1<f32>>,
    /// The source model path (for the tokenizer files).
    pub source: &'a Path,
    /// The tokenizer.
    pub tokenizer: &'a LlamaTokenizer,
    /// `quantization_config.json`.
    pub quant_config: Value,
    /// `report.json`.
    pub report: Value,
}

/// The temporary directory name used while writing `out`.
pub fn temp_dir_for(out: &Path) -> PathBuf {
    let mut s = out.as_os_str().to_owned();
    s.push(format!(".tmp-{}", std::process::id()));
    PathBuf::from(s)
}

/// Writes the checkpoint atomically (see the module documentation). `overwrite` replaces an
/// existing `out`; otherwise an existing `out` is an error.
pub fn save_quantized(
    out: &Path,
    inputs: &SaveInputs<'_>,
    overwrite: bool,
    cancel: Option<&AtomicBool>,
) -> Result<()> {
    if out.exists() && !overwrite {
        return Err(PipelineError::option(
            "--out",
            format!(
                "{} already exists: remove it or choose another directory",
                out.display()
            ),
        ));
    }
    write_dir_atomically(out, cancel, |tmp| write_all(tmp, inputs))
}

/// Writes a directory as `OUT.tmp-<pid>` with `write`, then renames it to `out` (replacing
/// an existing `out`); on an error or a set `cancel` the temporary directory is removed and
/// `out` is left as it was.
pub(crate) fn write_dir_atomically(
    out: &Path,
    cancel: Option<&AtomicBool>,
    write: impl FnOnce(&Path) -> Result<()>,
) -> Result<()> {
    let tmp = temp_dir_for(out);
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| PipelineError::io(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| PipelineError::io(&tmp, e))?;
    let r = write(&tmp).and_then(|_| match cancel {
        Some(c) if c.load(Ordering::Relaxed) => Err(PipelineError::Interrupted),
        _ => Ok(()),
    });
    if let Err(e) = r {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    if out.exists() {
        std::fs::remove_dir_all(out).map_err(|e| PipelineError::io(out, e))?;
    }
    std::fs::rename(&tmp, out).map_err(|e| {
        let _ = std::fs::remove_dir_all(&tmp);
        PipelineError::io(out, e)
    })
}

fn write_all(dir: &Path, inp: &SaveInputs<'_>) -> Result<()> {
    let cfg = inp.model.config();
    write_json(&dir.join("config.json"), &hf_config_json(cfg))?;
    let mut dense: HashMap<String, Tensor> = HashMap::new();
    for (name, t) in inp.others {
        if name == "lm_head.weight" && cfg.tie_word_embeddings {
            continue;
        }
        let t = match inp.norm_scales.get(name) {
            Some(s) => {
                let s =
                    Tensor::from_slice(s.as_slice().expect("contiguous"), s.len(), &Device::Cpu)
                        .ctx("norm scale")?;
                t.div(&s).ctx("folding AWQ scales into a norm")?
            }
            None => t.clone(),
        };
        dense.insert(name.clone(), t);
    }
    let mut quant: HashMap<String, Tensor> = HashMap::new();
    for l in inp.layers {
        let stored: Array2<f32> = match (&l.linear, &l.norm_scale) {
            (Some(q), _) => q.dequantize(),
            (None, Some(s)) => {
                to_array(&inp.model.linear(&l.name)?.weight()?)? * s.view().insert_axis(Axis(0))
            }
            (None, None) => to_array(&inp.model.linear(&l.name)?.weight()?)?,
        };
        dense.insert(format!("{}.weight", l.name), to_tensor(stored.view())?);
        if let Some(q) = &l.linear {
            for (k, t) in linear_tensors(q)? {
                quant.insert(format!("{}.{k}", l.name), t);
            }
        }
        if let (Some(s), Some(_)) = (&l.input_scale, &l.linear) {
            quant.insert(
                format!("{}.awq_scale", l.name),
                Tensor::from_slice(s.as_slice().expect("contiguous"), s.len(), &Device::Cpu)
                    .ctx("awq scale")?,
            );
        }
    }
    let p = dir.join("model.safetensors");
    candle_core::safetensors::save(&dense, &p).map_err(|e| PipelineError::Format {
        path: p.display().to_string(),
        detail: e.to_string(),
    })?;
    drop(dense);
    let p = dir.join("quantized.safetensors");
    candle_core::safetensors::save(&quant, &p).map_err(|e| PipelineError::Format {
        path: p.display().to_string(),
        detail: e.to_string(),
    })?;
    write_json(&dir.join("quantization_config.json"), &inp.quant_config)?;
    write_tokenizer(dir, inp.source, inp.tokenizer)?;
    write_json(&dir.join("report.json"), &inp.report)?;
    Ok(())
}

pub(crate) fn linear_tensors(q: &QuantizedLinear) -> Result<Vec<(&'static str, Tensor)>> {
    let (out, inp) = q.shape();
    let mut v = vec![
        (
            "codes",
            Tensor::from_vec(
                q.codes.iter().copied().collect::<Vec<u8>>(),
                (out, inp),
                &Device::Cpu,
            )
            .ctx("codes")?,
        ),
        ("scales", to_tensor(q.scales.view())?),
        ("zeros", to_tensor(q.zeros.view())?),
        (
            "g_idx",
            Tensor::from_vec(q.g_idx.clone(), inp, &Device::Cpu).ctx("g_idx")?,
        ),
    ];
    if let Some(n) = &q.nested {
        v.push((
            "dq_codes",
            Tensor::from_vec(n.codes.clone(), n.codes.len(), &Device::Cpu).ctx("dq")?,
        ));
        v.push((
            "dq_absmax",
            Tensor::from_vec(n.nested_absmax.clone(), n.nested_absmax.len(), &Device::Cpu)
                .ctx("dq")?,
        ));
        v.push((
            "dq_offset",
            Tensor::from_vec(vec![n.offset], 1, &Device::Cpu).ctx("dq")?,
        ));
    }
    Ok(v)
}

/// A checkpoint read back: the model (from `model.safetensors`), its tokenizer, the codes of
/// every quantized linear and `quantization_config.json`.
pub struct QuantizedCheckpoint {
    /// The model, as any Hugging Face directory loader gives it.
    pub model: LlamaModel,
    /// Quantized linears by name.
    pub linears: BTreeMap<String, QuantizedLinear>,
    /// AWQ input scales by linear name.
    pub awq_scales: BTreeMap<String, Array1<f32>>,
    /// `quantization_config.json`.
    pub config: Value,
}

/// Whether `dir` is a checkpoint written by [`save_quantized`].
pub fn is_quantlab_dir(dir: &Path) -> bool {
    dir.join("quantization_config.json").is_file() && dir.join("quantized.safetensors").is_file()
}

/// Reads a checkpoint written by [`save_quantized`]; errors name the file and tensor.
pub fn load_quantized(dir: &Path) -> Result<QuantizedCheckpoint> {
    let qc = dir.join("quantization_config.json");
    let text = std::fs::read_to_string(&qc).map_err(|e| PipelineError::io(&qc, e))?;
    let config: Value = serde_json::from_str(&text).map_err(|e| PipelineError::Format {
        path: qc.display().to_string(),
        detail: format!("not JSON: {e}"),
    })?;
    let model = LlamaModel::load(dir)?;
    let qs = dir.join("quantized.safetensors");
    let tensors =
        candle_core::safetensors::load(&qs, &Device::Cpu).map_err(|e| PipelineError::Format {
            path: qs.display().to_string(),
            detail: e.to_string(),
        })?;
    let bad = |d: String| PipelineError::Format {
        path: qs.display().to_string(),
        detail: d,
    };
    let layers = config
        .get("layers")
        .and_then(Value::as_object)
        .ok_or_else(|| PipelineError::Format {
            path: qc.display().to_string(),
            detail: "no `layers` object".into(),
        })?;
    let mut linears = BTreeMap::new();
    let mut awq_scales = BTreeMap::new();
    for (name, lv) in layers {
        if lv.get("quantized").and_then(Value::as_bool) != Some(true) {
            continue;
        }
        let spec: FormatSpec =
            serde_json::from_value(lv.get("format_spec").cloned().unwrap_or(Value::Null))
                .map_err(|e| bad(format!("layer `{name}`: format_spec: {e}")))?;
        let gran: Granularity =
            serde_json::from_value(lv.get("granularity").cloned().unwrap_or(Value::Null))
                .map_err(|e| bad(format!("layer `{name}`: granularity: {e}")))?;
        let get = |k: &str| {
            tensors
                .get(&format!("{name}.{k}"))
                .ok_or_else(|| bad(format!("missing tensor `{name}.{k}`")))
        };
        let codes_t = get("codes")?;
        let (out, inp) = codes_t.dims2().ctx("codes")?;
        let codes = codes_t
            .to_dtype(DType::U8)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1::<u8>())
            .ctx("codes")?;
        let codes = Array2::from_shape_vec((out, inp), codes).expect("dims");
        let scales = to_array(get("scales")?)?;
        let zeros = to_array(get("zeros")?)?;
        let g_idx = get("g_idx")?.to_vec1::<u32>().ctx("g_idx")?;
        let mut q = QuantizedLinear::from_parts(spec, gran, codes, scales, zeros, g_idx)?;
        if let Ok(c) = get("dq_codes") {
            let bs = lv
                .get("double_quant_blocksize")
                .and_then(Value::as_u64)
                .unwrap_or(256) as usize;
            q.nested = Some(NestedScales {
                codes: c.to_vec1::<u8>().ctx("dq_codes")?,
                nested_absmax: get("dq_absmax")?.to_vec1::<f32>().ctx("dq_absmax")?,
                offset: *get("dq_offset")?
                    .to_vec1::<f32>()
                    .ctx("dq_offset")?
                    .first()
                    .ok_or_else(|| bad(format!("tensor `{name}.dq_offset` is empty")))?,
                blocksize: bs,
            });
        }
        if let Ok(s) = get("awq_scale") {
            awq_scales.insert(
                name.clone(),
                Array1::from(s.to_vec1::<f32>().ctx("awq_scale")?),
            );
        }
        linears.insert(name.clone(), q);
    }
    Ok(QuantizedCheckpoint {
        model,
        linears,
        awq_scales,
        config,
    })
}
