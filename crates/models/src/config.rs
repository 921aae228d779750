//! The configuration of a LLaMA-style decoder, read from a Hugging Face `config.json` or from
//! GGUF metadata.

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file::Value;
use serde_json::Value as Json;

use crate::{ModelError, Result};

/// The decoder families this crate runs. They share one block layout (pre-norm RMSNorm,
/// rotary attention with grouped KV heads, SwiGLU MLP) and differ in config details.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Architecture {
    /// `LlamaForCausalLM` (Llama 1/2/3, SmolLM, SmolLM2, TinyLlama, ...). GGUF `llama`.
    Llama,
    /// `MistralForCausalLM`: LLaMA with an optional sliding attention window.
    Mistral,
    /// `Qwen2ForCausalLM`: LLaMA with biases on the q/k/v projections. GGUF `qwen2`.
    Qwen2,
}

impl Architecture {
    /// The names accepted, for error messages.
    pub const SUPPORTED: &'static str = "LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM (model_type llama, mistral, qwen2; GGUF general.architecture llama, qwen2)";
}

/// RoPE frequency scaling as in Hugging Face's `rope_scaling` field.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum RopeScaling {
    /// `{"rope_type": "linear", "factor": f}`: positions divided by `factor`.
    Linear {
        /// The divisor of the positions.
        factor: f64,
    },
    /// `{"rope_type": "llama3", ...}`: Llama 3.1's wavelength-dependent frequency scaling.
    Llama3 {
        /// Divisor of the low frequencies.
        factor: f64,
        /// Wavelengths longer than `original_max_position_embeddings / low_freq_factor` are scaled.
        low_freq_factor: f64,
        /// Wavelengths shorter than `original_max_position_embeddings / high_freq_factor` are kept.
        high_freq_factor: f64,
        /// The context length the model was pre-trained with.
        original_max_position_embeddings: f64,
    },
}

/// Everything the forward pass needs to know about a LLaMA-style decoder.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    /// Which family (decides defaults such as the q/k/v biases of Qwen2).
    pub architecture: Architecture,
    /// Model width `d`.
    pub hidden_size: usize,
    /// Width of the SwiGLU MLP.
    pub intermediate_size: usize,
    /// Number of decoder blocks.
    pub num_hidden_layers: usize,
    /// Number of query heads.
    pub num_attention_heads: usize,
    /// Number of key/value heads (grouped-query attention when fewer than query heads).
    pub num_key_value_heads: usize,
    /// Width of one head (usually `hidden_size / num_attention_heads`).
    pub head_dim: usize,
    /// Vocabulary size (rows of the embedding).
    pub vocab_size: usize,
    /// RoPE base `theta`.
    pub rope_theta: f64,
    /// Optional RoPE frequency scaling.
    pub rope_scaling: Option<RopeScaling>,
    /// The epsilon of RMSNorm.
    pub rms_norm_eps: f64,
    /// Longest context the model was trained for.
    pub max_position_embeddings: usize,
    /// The output head reuses the token embedding.
    pub tie_word_embeddings: bool,
    /// q/k/v projections carry a bias (Qwen2, or Llama with `attention_bias`).
    pub qkv_bias: bool,
    /// The output projection carries a bias (Llama with `attention_bias`).
    pub o_bias: bool,
    /// The MLP projections carry biases (Llama with `mlp_bias`).
    pub mlp_bias: bool,
    /// Sliding attention window (Mistral); `None` for full causal attention.
    pub sliding_window: Option<usize>,
    /// Beginning-of-sequence token, when the config names one.
    pub bos_token_id: Option<u32>,
    /// End-of-sequence tokens (generation stops at any of them).
    pub eos_token_ids: Vec<u32>,
}

impl LlamaConfig {
    /// Queries per key/value head.
    pub fn group_size(&self) -> usize {
        self.num_attention_heads / self.num_key_value_heads
    }

    /// Checks the sizes fit together; `path` names the source in the error.
    pub fn validate(&self, path: &str) -> Result<()> {
        let bad = |detail: String| ModelError::Config {
            path: path.to_string(),
            detail,
        };
        for (name, v) in [
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("head_dim", self.head_dim),
            ("vocab_size", self.vocab_size),
        ] {
            if v == 0 {
                return Err(bad(format!("{name} is 0")));
            }
        }
        // The loader multiplies these sizes: a hostile config must not overflow them.
        for (what, a, b) in [
            (
                "num_attention_heads x head_dim",
                self.num_attention_heads,
                self.head_dim,
            ),
            (
                "num_key_value_heads x head_dim",
                self.num_key_value_heads,
                self.head_dim,
            ),
            (
                "vocab_size x hidden_size",
                self.vocab_size,
                self.hidden_size,
            ),
            (
                "intermediate_size x hidden_size",
                self.intermediate_size,
                self.hidden_size,
            ),
        ] {
            if a.checked_mul(b).is_none() {
                return Err(bad(format!("{what} ({a} x {b}) overflows")));
            }
        }
        if self.num_attention_heads % self.num_key_value_heads != 0 {
            return Err(bad(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                self.num_attention_heads, self.num_key_value_heads
            )));
        }
        if self.head_dim % 2 != 0 {
            return Err(bad(format!(
                "head_dim {} is odd (RoPE needs pairs)",
                self.head_dim
            )));
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            return Err(bad(format!(
                "rope_theta {} is not positive",
                self.rope_theta
            )));
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps >= 0.0) {
            return Err(bad(format!(
                "rms_norm_eps {} is negative",
                self.rms_norm_eps
            )));
        }
        Ok(())
    }

    /// Reads a Hugging Face `config.json`.
    ///
    /// ```
    /// # fn main() -> quantlab_models::Result<()> {
    /// let json = r#"{"architectures": ["LlamaForCausalLM"], "model_type": "llama",
    ///   "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    ///   "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 300,
    ///   "rope_theta": 10000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": true}"#;
    /// let cfg = quantlab_models::LlamaConfig::from_hf_json(json, "config.json")?;
    /// assert_eq!(cfg.head_dim, 16);
    /// assert!((cfg.rms_norm_eps - 1e-5).abs() < 1e-12);
    /// # Ok(()) }
    /// ```
    pub fn from_hf_json(json: &str, path: &str) -> Result<Self> {
        let bad = |detail: String| ModelError::Config {
            path: path.to_string(),
            detail,
        };
        let v: Json = serde_json::from_str(json).map_err(|e| bad(format!("not JSON: {e}")))?;
        let obj = v
            .as_object()
            .ok_or_else(|| bad("the top level is not an object".into()))?;
        let model_type = obj.get("model_type").and_then(Json::as_str).unwrap_or("");
        let arch_name = obj
            .get("architectures")
            .and_then(Json::as_array)
            .and_then(|a| a.first())
            .and_then(Json::as_str)
            .unwrap_or("");
        let architecture = match (arch_name, model_type) {
            ("LlamaForCausalLM", _) | ("", "llama") => Architecture::Llama,
            ("MistralForCausalLM", _) | ("", "mistral") => Architecture::Mistral,
            ("Qwen2ForCausalLM", _) | ("", "qwen2") => Architecture::Qwen2,
            _ => {
                return Err(ModelError::UnsupportedArchitecture {
                    path: path.to_string(),
                    arch: if arch_name.is_empty() {
                        format!("model_type={model_type}")
                    } else {
                        arch_name.to_string()
                    },
                    supported: Architecture::SUPPORTED.to_string(),
                })
            }
        };
        if let Some(act) = obj.get("hidden_act").and_then(Json::as_str) {
            if act != "silu" {
                return Err(bad(format!(
                    "hidden_act `{act}` is not supported (only silu)"
                )));
            }
        }
        let usize_field = |name: &str| -> Result<Option<usize>> {
            match obj.get(name) {
                None | Some(Json::Null) => Ok(None),
                Some(x) => x
                    .as_u64()
                    .map(|u| Some(u as usize))
                    .ok_or_else(|| bad(format!("`{name}` is not a non-negative integer: {x}"))),
            }
        };
        let required = |name: &str| -> Result<usize> {
            usize_field(name)?.ok_or_else(|| bad(format!("missing `{name}`")))
        };
        let f64_field = |name: &str, default: f64| -> Result<f64> {
            match obj.get(name) {
                None | Some(Json::Null) => Ok(default),
                Some(x) => x
                    .as_f64()
                    .ok_or_else(|| bad(format!("`{name}` is not a number: {x}"))),
            }
        };
        let bool_field = |name: &str, default: bool| -> Result<bool> {
            match obj.get(name) {
                None | Some(Json::Null) => Ok(default),
                Some(x) => x
                    .as_bool()
                    .ok_or_else(|| bad(format!("`{name}` is not a boolean: {x}"))),
            }
        };
        let hidden_size = required("hidden_size")?;
        let num_attention_heads = required("num_attention_heads")?;
        let num_key_value_heads =
            usize_field("num_key_value_heads")?.unwrap_or(num_attention_heads);
        if num_attention_heads == 0 {
            return Err(bad("num_attention_heads is 0".into()));
        }
        let head_dim = usize_field("head_dim")?.unwrap_or(hidden_size / num_attention_heads);
        let rope_scaling = match obj.get("rope_scaling") {
            None | Some(Json::Null) => None,
            Some(rs) => Some(parse_rope_scaling(rs).map_err(bad)?),
        };
        let attention_bias = bool_field("attention_bias", false)?;
        let (qkv_bias, o_bias) = match architecture {
            Architecture::Qwen2 => (true, false),
            _ => (attention_bias, attention_bias),
        };
        let sliding_window = match architecture {
            Architecture::Mistral => usize_field("sliding_window")?,
            Architecture::Qwen2 if bool_field("use_sliding_window", false)? => {
                usize_field("sliding_window")?
            }
            _ => None,
        };
        let ids = |name: &str| -> Vec<u32> {
            match obj.get(name) {
                Some(Json::Number(n)) => n.as_u64().map(|u| vec![u as u32]).unwrap_or_default(),
                Some(Json::Array(a)) => a
                    .iter()
                    .filter_map(|x| x.as_u64().map(|u| u as u32))
                    .collect(),
                _ => vec![],
            }
        };
        let cfg = LlamaConfig {
            architecture,
            hidden_size,
            intermediate_size: required("intermediate_size")?,
            num_hidden_layers: required("num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            vocab_size: required("vocab_size")?,
            rope_theta: f64_field("rope_theta", 10000.0)?,
            rope_scaling,
            rms_norm_eps: f64_field("rms_norm_eps", 1e-6)?,
            max_position_embeddings: usize_field("max_position_embeddings")?.unwrap_or(4096),
            tie_word_embeddings: bool_field("tie_word_embeddings", false)?,
            qkv_bias,
            o_bias,
            mlp_bias: bool_field("mlp_bias", false)?,
            sliding_window,
            bos_token_id: ids("bos_token_id").first().copied(),
            eos_token_ids: ids("eos_token_id"),
        };
        cfg.validate(path)?;
        Ok(cfg)
    }

    /// Reads the config from GGUF metadata (`general.architecture` = `llama` or `qwen2`, then
    /// `{arch}.block_count`, `{arch}.embedding_length`, ...). `tie_word_embeddings` is set by
    /// the weight loader from the presence of `output.weight`; here it defaults to `false`.
    pub fn from_gguf_metadata(metadata: &HashMap<String, Value>, path: &str) -> Result<Self> {
        let bad = |detail: String| ModelError::Config {
            path: path.to_string(),
            detail,
        };
        let arch = match metadata.get("general.architecture") {
            Some(Value::String(s)) => s.clone(),
            Some(other) => return Err(bad(format!("general.architecture is {other:?}"))),
            None => return Err(bad("missing general.architecture".into())),
        };
        let architecture = match arch.as_str() {
            "llama" => Architecture::Llama,
            "qwen2" => Architecture::Qwen2,
            _ => {
                return Err(ModelError::UnsupportedArchitecture {
                    path: path.to_string(),
                    arch,
                    supported: Architecture::SUPPORTED.to_string(),
                })
            }
        };
        let get_u = |key: &str| -> Result<Option<usize>> {
            let full = format!("{arch}.{key}");
            match metadata.get(&full) {
                None => Ok(None),
                Some(v) => gguf_uint(v)
                    .map(Some)
                    .ok_or_else(|| bad(format!("`{full}` is not an unsigned integer: {v:?}"))),
            }
        };
        let req_u = |key: &str| -> Result<usize> {
            get_u(key)?.ok_or_else(|| bad(format!("missing `{arch}.{key}`")))
        };
        let get_f = |key: &str| -> Result<Option<f64>> {
            let full = format!("{arch}.{key}");
            match metadata.get(&full) {
                None => Ok(None),
                Some(Value::F32(x)) => Ok(Some(*x as f64)),
                Some(Value::F64(x)) => Ok(Some(*x)),
                Some(v) => Err(bad(format!("`{full}` is not a float: {v:?}"))),
            }
        };
        let hidden_size = req_u("embedding_length")?;
        let num_attention_heads = req_u("attention.head_count")?;
        if num_attention_heads == 0 {
            return Err(bad("attention.head_count is 0".into()));
        }
        let num_key_value_heads = get_u("attention.head_count_kv")?.unwrap_or(num_attention_heads);
        let head_dim = match get_u("attention.key_length")? {
            Some(k) => k,
            None => hidden_size / num_attention_heads,
        };
        if let Some(rot) = get_u("rope.dimension_count")? {
            if rot != head_dim {
                return Err(bad(format!(
                    "partial rotary embeddings (rope.dimension_count {rot} != head dim {head_dim}) are not supported"
                )));
            }
        }
        let vocab_size = match get_u("vocab_size")? {
            Some(v) => v,
            None => match metadata.get("tokenizer.ggml.tokens") {
                Some(Value::Array(a)) => a.len(),
                _ => {
                    return Err(bad(format!(
                        "missing `{arch}.vocab_size` and tokenizer.ggml.tokens"
                    )))
                }
            },
        };
        let rope_scaling = match metadata.get(&format!("{arch}.rope.scaling.type")) {
            Some(Value::String(t)) if t == "linear" => Some(RopeScaling::Linear {
                factor: get_f("rope.scaling.factor")?.unwrap_or(1.0),
            }),
            Some(Value::String(t)) if t == "none" => None,
            Some(v) => return Err(bad(format!("rope.scaling.type {v:?} is not supported"))),
            None => None,
        };
        let id = |key: &str| metadata.get(key).and_then(gguf_uint).map(|u| u as u32);
        let cfg = LlamaConfig {
            architecture,
            hidden_size,
            intermediate_size: req_u("feed_forward_length")?,
            num_hidden_layers: req_u("block_count")?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            vocab_size,
            rope_theta: get_f("rope.freq_base")?.unwrap_or(10000.0),
            rope_scaling,
            rms_norm_eps: get_f("attention.layer_norm_rms_epsilon")?.unwrap_or(1e-5),
            max_position_embeddings: get_u("context_length")?.unwrap_or(4096),
            tie_word_embeddings: false,
            qkv_bias: architecture == Architecture::Qwen2,
            o_bias: false,
            mlp_bias: false,
            sliding_window: None,
            bos_token_id: id("tokenizer.ggml.bos_token_id"),
            eos_token_ids: id("tokenizer.ggml.eos_token_id").into_iter().collect(),
        };
        cfg.validate(path)?;
        Ok(cfg)
    }

    /// Reads `config.json` from a file.
    pub fn from_hf_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| ModelError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_hf_json(&text, &path.display().to_string())
    }

    /// Inverse RoPE frequencies `theta^(-2i/d)` for `i < head_dim / 2`, after scaling
    /// (`llama3` scaling adjusts them; `linear` is applied to positions instead).
    pub fn inv_freqs(&self) -> Vec<f64> {
        let d = self.head_dim as f64;
        (0..self.head_dim / 2)
            .map(|i| {
                let f = self.rope_theta.powf(-(2.0 * i as f64) / d);
                match &self.rope_scaling {
                    Some(RopeScaling::Llama3 {
                        factor,
                        low_freq_factor,
                        high_freq_factor,
                        original_max_position_embeddings: orig,
                    }) => {
                        let wavelen = 2.0 * std::f64::consts::PI / f;
                        let low_wavelen = orig / low_freq_factor;
                        let high_wavelen = orig / high_freq_factor;
                        if wavelen < high_wavelen {
                            f
                        } else if wavelen > low_wavelen {
                            f / factor
                        } else {
                            let smooth = (orig / wavelen - low_freq_factor)
                                / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    }
                    _ => f,
                }
            })
            .collect()
    }
}

fn parse_rope_scaling(rs: &Json) -> std::result::Result<RopeScaling, String> {
    let kind = rs
        .get("rope_type")
        .or_else(|| rs.get("type"))
        .and_then(Json::as_str)
        .unwrap_or("");
    let num = |k: &str| -> std::result::Result<f64, String> {
        rs.get(k)
            .and_then(Json::as_f64)
            .ok_or_else(|| format!("rope_scaling.{k} missing or not a number"))
    };
    match kind {
        "linear" => Ok(RopeScaling::Linear {
            factor: num("factor")?,
        }),
        "llama3" => Ok(RopeScaling::Llama3 {
            factor: num("factor")?,
            low_freq_factor: num("low_freq_factor")?,
            high_freq_factor: num("high_freq_factor")?,
            original_max_position_embeddings: num("original_max_position_embeddings")?,
        }),
        "default" => Ok(RopeScaling::Linear { factor: 1.0 }),
        other => Err(format!(
            "rope_scaling type `{other}` is not supported (linear, llama3)"
        )),
    }
}

/// An unsigned integer from any GGUF integer value.
pub(crate) fn gguf_uint(v: &Value) -> Option<usize> {
    match v {
        Value::U8(x) => Some(*x as usize),
        Value::U16(x) => Some(*x as usize),
        Value::U32(x) => Some(*x as usize),
        Value::U64(x) => usize::try_from(*x).ok(),
        Value::I8(x) => usize::try_from(*x).ok(),
        Value::I16(x) => usize::try_from(*x).ok(),
        Value::I32(x) => usize::try_from(*x).ok(),
        Value::I64(x) => usize::try_from(*x).ok(),
        _ => None,
    }
}
