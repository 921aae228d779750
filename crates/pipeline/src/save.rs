//! The project's own checkpoint: a Hugging Face directory that the ordinary loaders read
//! unchanged, plus the codes.
//!
//! ```text
//! DIR/config.json                 Hugging Face LlamaForCausalLM config
//! DIR/model.safetensors           every tensor, f32, Hugging Face names; block linears hold
//!                                 their dequantized codes (AWQ: the scaled weight Q(W diag s),
//!                                 with 1/s folded into the preceding RMSNorm weight)
//! DIR/quantized.safetensors       the codes, scales, zeros, g_idx (and AWQ scale, double-
//!                                 quantized absmax) of every quantized linear, in the layout
//!                                 of quantlab_checkpoints::quantlab
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

use std::borrow::Cow;
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::{DType, Device, Tensor};
use ndarray::{Array1, Array2, Axis};
use quantlab_checkpoints::quantlab as stored_layout;
use quantlab_grids::QuantizedLinear;
use quantlab_models::{LlamaConfig, LlamaModel, LlamaTokenizer, RopeScaling};
use safetensors::tensor::View;
use safetensors::Dtype;
use serde_json::{json, Value};

use crate::driver::{to_array, QuantizedLayer};
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

/// A tensor of a checkpoint file whose bytes are made when the writer reaches it: the files
/// are written one tensor at a time, so that the dequantized weights of a whole model (four
/// bytes a weight, the largest thing the save writes) are never in memory at once. A failure
/// inside `make` is kept in `err` (the writer then gets zeros of the right length, and
/// [`write_streamed`] reports the error, so the temporary directory is discarded).
pub(crate) struct Streamed<'a> {
    pub(crate) dtype: Dtype,
    pub(crate) shape: Vec<usize>,
    pub(crate) make: Box<dyn Fn() -> Result<Vec<u8>> + 'a>,
    pub(crate) err: &'a RefCell<Option<PipelineError>>,
}

impl View for Streamed<'_> {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        let len = self.data_len();
        match (self.make)() {
            Ok(b) if b.len() == len => Cow::Owned(b),
            r => {
                let e = r.err().unwrap_or_else(|| {
                    PipelineError::option(
                        "save",
                        format!("a tensor of shape {:?} has the wrong size", self.shape),
                    )
                });
                self.err.borrow_mut().get_or_insert(e);
                Cow::Owned(vec![0; len])
            }
        }
    }
    fn data_len(&self) -> usize {
        self.shape.iter().product::<usize>() * self.dtype.bitsize() / 8
    }
}

/// The safetensors dtype of a checkpoint tensor; errors name the tensor.
fn st_dtype(name: &str, d: DType) -> Result<Dtype> {
    Ok(match d {
        DType::F32 => Dtype::F32,
        DType::F16 => Dtype::F16,
        DType::BF16 => Dtype::BF16,
        DType::F64 => Dtype::F64,
        DType::U8 => Dtype::U8,
        DType::U32 => Dtype::U32,
        DType::I16 => Dtype::I16,
        DType::I32 => Dtype::I32,
        DType::I64 => Dtype::I64,
        d => {
            return Err(PipelineError::option(
                "save",
                format!("tensor `{name}` has dtype {d:?}, which the checkpoint does not store"),
            ))
        }
    })
}

/// The little-endian bytes of a CPU tensor (of a dtype [`st_dtype`] accepts).
fn tensor_bytes(name: &str, t: &Tensor) -> Result<Vec<u8>> {
    fn le<T: candle_core::WithDType, const N: usize>(
        t: &Tensor,
        f: impl Fn(T) -> [u8; N],
    ) -> candle_core::Result<Vec<u8>> {
        Ok(t.flatten_all()?
            .to_vec1::<T>()?
            .into_iter()
            .flat_map(f)
            .collect())
    }
    let r = match st_dtype(name, t.dtype())? {
        Dtype::F16 => le(t, half::f16::to_le_bytes),
        Dtype::BF16 => le(t, half::bf16::to_le_bytes),
        Dtype::F64 => le(t, f64::to_le_bytes),
        Dtype::U8 => le(t, |v: u8| [v]),
        Dtype::U32 => le(t, u32::to_le_bytes),
        Dtype::I16 => le(t, i16::to_le_bytes),
        Dtype::I32 => le(t, i32::to_le_bytes),
        Dtype::I64 => le(t, i64::to_le_bytes),
        _ => le(t, f32::to_le_bytes),
    };
    r.ctx(name)
}

/// Writes `entries` as one safetensors file, one tensor in memory at a time.
pub(crate) fn write_streamed(
    path: &Path,
    entries: Vec<(String, Streamed<'_>)>,
    err: &RefCell<Option<PipelineError>>,
) -> Result<()> {
    safetensors::serialize_to_file(entries, None, path).map_err(|e| PipelineError::Format {
        path: path.display().to_string(),
        detail: e.to_string(),
    })?;
    match err.borrow_mut().take() {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// A tensor already in memory, converted when written.
fn ready<'a>(
    name: &str,
    t: Tensor,
    err: &'a RefCell<Option<PipelineError>>,
) -> Result<(String, Streamed<'a>)> {
    let dtype = st_dtype(name, t.dtype())?;
    let shape = t.dims().to_vec();
    let n = name.to_string();
    let make = Box::new(move || tensor_bytes(&n, &t));
    Ok((
        name.to_string(),
        Streamed {
            dtype,
            shape,
            make,
            err,
        },
    ))
}

/// An f32 `[rows, cols]` tensor computed when written.
fn computed<'a>(
    name: String,
    shape: (usize, usize),
    make: impl Fn() -> Result<Array2<f32>> + 'a,
    err: &'a RefCell<Option<PipelineError>>,
) -> (String, Streamed<'a>) {
    let make = Box::new(move || {
        let a = make()?;
        Ok(a.iter().flat_map(|v| v.to_le_bytes()).collect())
    });
    (
        name,
        Streamed {
            dtype: Dtype::F32,
            shape: vec![shape.0, shape.1],
            make,
            err,
        },
    )
}

fn write_all(dir: &Path, inp: &SaveInputs<'_>) -> Result<()> {
    let cfg = inp.model.config();
    write_json(&dir.join("config.json"), &hf_config_json(cfg))?;
    let err: RefCell<Option<PipelineError>> = RefCell::new(None);
    let mut dense = Vec::new();
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
        dense.push(ready(name, t, &err)?);
    }
    let mut quant = Vec::new();
    for l in inp.layers {
        let lin = inp.model.linear(&l.name)?;
        let shape = (lin.out_features(), lin.in_features());
        let stored = move || -> Result<Array2<f32>> {
            Ok(match (&l.linear, &l.norm_scale) {
                (Some(q), _) => q.dequantize(),
                (None, Some(s)) => {
                    to_array(&inp.model.linear(&l.name)?.weight()?)? * s.view().insert_axis(Axis(0))
                }
                (None, None) => to_array(&inp.model.linear(&l.name)?.weight()?)?,
            })
        };
        dense.push(computed(format!("{}.weight", l.name), shape, stored, &err));
        if let Some(q) = &l.linear {
            let awq = l.input_scale.as_ref().map(|s| s.to_vec());
            for (name, t) in stored_layout::linear_tensors(&l.name, q, awq.as_deref()) {
                quant.push((name, streamed(t, &err)));
            }
        }
    }
    write_streamed(&dir.join("model.safetensors"), dense, &err)?;
    write_streamed(&dir.join("quantized.safetensors"), quant, &err)?;
    write_json(&dir.join("quantization_config.json"), &inp.quant_config)?;
    write_tokenizer(dir, inp.source, inp.tokenizer)?;
    write_json(&dir.join("report.json"), &inp.report)?;
    Ok(())
}

/// A tensor of the quantized linears' layout ([`stored_layout::linear_tensors`]), written
/// when the writer reaches it.
fn streamed<'a>(
    t: stored_layout::StoredTensor<'a>,
    err: &'a RefCell<Option<PipelineError>>,
) -> Streamed<'a> {
    let (dtype, shape) = (t.dtype, t.shape.clone());
    Streamed {
        dtype,
        shape,
        make: Box::new(move || Ok(t.data.to_vec())),
        err,
    }
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
    let layers = config
        .get("layers")
        .and_then(Value::as_object)
        .ok_or_else(|| PipelineError::Format {
            path: qc.display().to_string(),
            detail: "no `layers` object".into(),
        })?;
    let stored = stored_layout::read_linears(&dir.join("quantized.safetensors"), layers)?;
    let linears = stored.linears;
    let awq_scales = stored
        .awq_scales
        .into_iter()
        .map(|(k, v)| (k, Array1::from(v)))
        .collect();
    Ok(QuantizedCheckpoint {
        model,
        linears,
        awq_scales,
        config,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::driver::to_tensor;

    /// The streamed writer's file, read back by candle's own safetensors reader, holds every
    /// tensor as it was (several dtypes, a computed one); a failure inside one tensor's
    /// `make` is reported with its message instead of leaving a file of zeros unnoticed.
    #[test]
    fn streamed_file_reads_back_and_reports_failures() {
        let dir = tempfile::tempdir().unwrap();
        let dev = Device::Cpu;
        let f32s = Tensor::new(&[[1.5f32, -2.0, 3.25], [0.0, 7.0, -0.5]], &dev).unwrap();
        let bf16s = f32s.to_dtype(DType::BF16).unwrap();
        let u8s = Tensor::new(&[3u8, 0, 255, 7], &dev).unwrap();
        let i64s = Tensor::new(&[-5i64, 1 << 40], &dev).unwrap();
        let err = RefCell::new(None);
        let a = Array2::from_shape_fn((3, 4), |(i, j)| (i * 4 + j) as f32 / 8.0);
        let entries = vec![
            ready("a.f32", f32s.clone(), &err).unwrap(),
            ready("b.bf16", bf16s.clone(), &err).unwrap(),
            ready("c.u8", u8s.clone(), &err).unwrap(),
            ready("d.i64", i64s.clone(), &err).unwrap(),
            computed("e.computed".into(), (3, 4), || Ok(a.clone()), &err),
        ];
        let p = dir.path().join("t.safetensors");
        write_streamed(&p, entries, &err).unwrap();
        let back = candle_core::safetensors::load(&p, &dev).unwrap();
        let same = |x: &Tensor, y: &Tensor| {
            assert_eq!(x.dtype(), y.dtype());
            assert_eq!(x.dims(), y.dims());
            let d = x
                .to_dtype(DType::F64)
                .unwrap()
                .sub(&y.to_dtype(DType::F64).unwrap())
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap();
            assert_eq!(d, 0.0);
        };
        same(&back["a.f32"], &f32s);
        same(&back["b.bf16"], &bf16s);
        same(&back["c.u8"], &u8s);
        same(&back["d.i64"], &i64s);
        same(&back["e.computed"], &to_tensor(a.view()).unwrap());

        let err = RefCell::new(None);
        let entries = vec![
            ready("ok", f32s, &err).unwrap(),
            computed(
                "bad".into(),
                (2, 2),
                || Err(PipelineError::option("test", "cannot dequantize `bad`")),
                &err,
            ),
        ];
        let e = write_streamed(&dir.path().join("u.safetensors"), entries, &err).unwrap_err();
        assert!(e.to_string().contains("cannot dequantize `bad`"), "{e}");
        let wrong = computed("short".into(), (2, 2), || Ok(Array2::zeros((1, 2))), &err);
        let e = write_streamed(&dir.path().join("v.safetensors"), vec![wrong], &err).unwrap_err();
        assert!(e.to_string().contains("wrong size"), "{e}");
    }
}
