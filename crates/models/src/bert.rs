//! The BERT encoder (Devlin et al. 2019, "BERT", section 3; Vaswani et al. 2017 for the
//! transformer block) as used by sentence-transformers' all-MiniLM-L6-v2, on candle-core.
//!
//! Forward pass, for token ids `x` of shape `[B, T]` and a padding mask `m` (1 = token,
//! 0 = padding):
//!
//! ```text
//! h0 = LayerNorm(E_word[x] + E_pos[0..T] + E_type[0])
//! for each layer:
//!     q, k, v = h Wq^T + bq, h Wk^T + bk, h Wv^T + bv            (split into heads of d)
//!     A = softmax(q k^T / sqrt(d) + (1 - m) * (-1e9))             (padding keys masked)
//!     h = LayerNorm(h + (A v) Wo^T + bo)                          (attention.output)
//!     h = LayerNorm(h + GELU(h Wi^T + bi) Wd^T + bd)              (intermediate, output)
//! ```
//!
//! GELU is the exact one, `x/2 (1 + erf(x/sqrt 2))`, as Hugging Face's `"gelu"`. Sentence
//! embeddings ([`BertModel::embed`]) are the mean of the last hidden states over the
//! non-padding tokens, divided by its L2 norm (sentence-transformers' `Pooling` with
//! `pooling_mode_mean_tokens` followed by `Normalize`, as listed in the model's
//! `modules.json`).
//!
//! Every projection is a [`Linear`] trait object (dense f32 now, quantized kinds later), named
//! as in the checkpoint without the `.weight` suffix, e.g.
//! `encoder.layer.0.attention.self.query`; [`BertModel::replace_linear`] swaps one by name and
//! [`BertModel::forward_with_hook`] shows each linear's input to a capture callback.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, D};
use serde::Deserialize;

use crate::linear::{DenseLinear, Linear};
use crate::weights::{SafetensorsWeights, WeightSource};
use crate::{ModelError, Result};

/// The fields of a Hugging Face BERT `config.json` that the forward pass uses.
#[derive(Clone, Debug, PartialEq, Deserialize, serde::Serialize)]
pub struct BertConfig {
    /// Vocabulary size (rows of `embeddings.word_embeddings`).
    pub vocab_size: usize,
    /// Hidden width.
    pub hidden_size: usize,
    /// Number of encoder layers.
    pub num_hidden_layers: usize,
    /// Attention heads per layer.
    pub num_attention_heads: usize,
    /// Width of the feed-forward layer.
    pub intermediate_size: usize,
    /// Longest sequence the position embeddings cover.
    pub max_position_embeddings: usize,
    /// Rows of `embeddings.token_type_embeddings`.
    #[serde(default = "default_type_vocab")]
    pub type_vocab_size: usize,
    /// LayerNorm epsilon.
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    /// Activation of the feed-forward layer; only `"gelu"` (exact) is supported.
    #[serde(default = "default_act")]
    pub hidden_act: String,
    /// Id of the padding token.
    #[serde(default)]
    pub pad_token_id: u32,
    /// `model_type`, checked to be `"bert"` when present.
    #[serde(default)]
    pub model_type: Option<String>,
    /// `architectures`, checked to name a BERT model when present.
    #[serde(default)]
    pub architectures: Option<Vec<String>>,
    /// Only `"absolute"` position embeddings are supported.
    #[serde(default)]
    pub position_embedding_type: Option<String>,
}

fn default_type_vocab() -> usize {
    2
}
fn default_eps() -> f64 {
    1e-12
}
fn default_act() -> String {
    "gelu".into()
}

impl BertConfig {
    /// Parses and validates a `config.json`; `path` names the file in errors.
    ///
    /// ```
    /// let json = r#"{"architectures": ["BertModel"], "model_type": "bert", "vocab_size": 10,
    ///   "hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2,
    ///   "intermediate_size": 16, "max_position_embeddings": 12}"#;
    /// let c = quantlab_models::bert::BertConfig::from_json(json, "config.json").unwrap();
    /// assert_eq!(c.hidden_size / c.num_attention_heads, 4);
    /// assert!((c.layer_norm_eps - 1e-12).abs() < 1e-20);
    /// ```
    pub fn from_json(json: &str, path: &str) -> Result<Self> {
        let cfg: BertConfig = serde_json::from_str(json).map_err(|e| ModelError::Config {
            path: path.to_string(),
            detail: e.to_string(),
        })?;
        cfg.validate(path)?;
        Ok(cfg)
    }

    /// Reads `config.json` (a file, or a directory holding one).
    pub fn from_file(path: &Path) -> Result<Self> {
        let file = if path.is_dir() {
            path.join("config.json")
        } else {
            path.to_path_buf()
        };
        let text = std::fs::read_to_string(&file).map_err(|e| ModelError::Io {
            path: file.display().to_string(),
            source: e,
        })?;
        Self::from_json(&text, &file.display().to_string())
    }

    /// Checks the architecture and the shapes.
    pub fn validate(&self, path: &str) -> Result<()> {
        let unsupported = |arch: &str| ModelError::UnsupportedArchitecture {
            path: path.to_string(),
            arch: arch.to_string(),
            supported: "BERT encoders (model_type \"bert\": BertModel, BertForMaskedLM, ...)"
                .into(),
        };
        if let Some(mt) = &self.model_type {
            if mt != "bert" {
                return Err(unsupported(mt));
            }
        }
        if let Some(archs) = &self.architectures {
            if let Some(a) = archs.iter().find(|a| !a.starts_with("Bert")) {
                return Err(unsupported(a));
            }
        }
        if let Some(p) = &self.position_embedding_type {
            if p != "absolute" {
                return Err(unsupported(&format!("position_embedding_type {p}")));
            }
        }
        if self.hidden_act != "gelu" {
            return Err(ModelError::Config {
                path: path.to_string(),
                detail: format!(
                    "hidden_act `{}` is not supported (only exact \"gelu\")",
                    self.hidden_act
                ),
            });
        }
        let bad = |detail: String| ModelError::Config {
            path: path.to_string(),
            detail,
        };
        if self.num_attention_heads == 0 || self.hidden_size % self.num_attention_heads != 0 {
            return Err(bad(format!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            )));
        }
        for (name, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("max_position_embeddings", self.max_position_embeddings),
            ("type_vocab_size", self.type_vocab_size),
        ] {
            if v == 0 {
                return Err(bad(format!("{name} is 0")));
            }
        }
        if self.layer_norm_eps.is_nan() || self.layer_norm_eps <= 0.0 {
            return Err(bad(format!(
                "layer_norm_eps {} is not positive",
                self.layer_norm_eps
            )));
        }
        Ok(())
    }
}

/// LayerNorm over the last dimension: `(x - mean) / sqrt(var + eps) * w + b`, with the
/// biased variance.
#[derive(Clone, Debug)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    /// From a weight and bias of shape `[n]`.
    pub fn new(weight: Tensor, bias: Tensor, eps: f64) -> Self {
        LayerNorm { weight, bias, eps }
    }

    /// Normalises the rows of `x` (`[.., n]`).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mean = x.mean_keepdim(D::Minus1)?;
        let xc = x.broadcast_sub(&mean)?;
        let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
        let y = xc.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        Ok(y.broadcast_mul(&self.weight)?.broadcast_add(&self.bias)?)
    }
}

/// The six projections of one encoder layer, in checkpoint order.
pub const LAYER_LINEARS: [&str; 6] = [
    "attention.self.query",
    "attention.self.key",
    "attention.self.value",
    "attention.output.dense",
    "intermediate.dense",
    "output.dense",
];

/// The capture callback: a linear's name and its input `[rows, in_features]`.
pub type HookFn<'a> = dyn FnMut(&str, &Tensor) + 'a;

/// One encoder layer.
#[derive(Debug)]
struct BertLayer {
    /// In [`LAYER_LINEARS`] order.
    linears: Vec<Box<dyn Linear>>,
    attn_ln: LayerNorm,
    out_ln: LayerNorm,
}

/// A BERT encoder with replaceable linears. See the [module docs](self) for the maths.
#[derive(Debug)]
pub struct BertModel {
    config: BertConfig,
    path: PathBuf,
    word: Tensor,
    pos: Tensor,
    token_type: Tensor,
    emb_ln: LayerNorm,
    layers: Vec<BertLayer>,
}

impl BertModel {
    /// Loads a Hugging Face directory: `config.json` and `model.safetensors` (or a sharded
    /// checkpoint). Tensor names may carry a `bert.` prefix (checkpoints of
    /// `BertForMaskedLM` and friends).
    ///
    /// ```no_run
    /// # fn main() -> quantlab_models::Result<()> {
    /// use candle_core::{Device, Tensor};
    /// let m = quantlab_models::bert::BertModel::load("/root/.cache/quantlab/minilm")?;
    /// let ids = Tensor::new(&[[101u32, 7592, 2088, 102]], &Device::Cpu)?;
    /// let mask = ids.ones_like()?;
    /// let e: Vec<Vec<f32>> = m.embed(&ids, &mask)?.to_vec2()?;
    /// let norm: f32 = e[0].iter().map(|x| x * x).sum::<f32>().sqrt();
    /// assert!((norm - 1.0).abs() < 1e-5);
    /// # Ok(()) }
    /// ```
    pub fn load(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let config = BertConfig::from_file(dir)?;
        let weights = SafetensorsWeights::open_dir(dir)?;
        Self::from_weights(config, &weights)
    }

    /// Builds the model from a config and any [`WeightSource`], checking every shape.
    pub fn from_weights(config: BertConfig, w: &dyn WeightSource) -> Result<Self> {
        let prefix = if !w.contains("embeddings.word_embeddings.weight")
            && w.contains("bert.embeddings.word_embeddings.weight")
        {
            "bert."
        } else {
            ""
        };
        let path = w.path().to_path_buf();
        let load = |name: &str, shape: &[usize]| -> Result<Tensor> {
            let full = format!("{prefix}{name}");
            let t = w.load(&full)?;
            if t.dims() != shape {
                return Err(ModelError::TensorShape {
                    path: path.display().to_string(),
                    tensor: full,
                    expected: shape.to_vec(),
                    got: t.dims().to_vec(),
                });
            }
            Ok(t.to_dtype(DType::F32)?.contiguous()?)
        };
        let (h, ff) = (config.hidden_size, config.intermediate_size);
        let ln = |name: &str| -> Result<LayerNorm> {
            Ok(LayerNorm::new(
                load(&format!("{name}.weight"), &[h])?,
                load(&format!("{name}.bias"), &[h])?,
                config.layer_norm_eps,
            ))
        };
        let word = load("embeddings.word_embeddings.weight", &[config.vocab_size, h])?;
        let pos = load(
            "embeddings.position_embeddings.weight",
            &[config.max_position_embeddings, h],
        )?;
        let token_type = load(
            "embeddings.token_type_embeddings.weight",
            &[config.type_vocab_size, h],
        )?;
        let emb_ln = ln("embeddings.LayerNorm")?;
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for l in 0..config.num_hidden_layers {
            let mut linears: Vec<Box<dyn Linear>> = Vec::with_capacity(6);
            for (j, name) in LAYER_LINEARS.iter().enumerate() {
                let (out, inp) = match j {
                    4 => (ff, h),
                    5 => (h, ff),
                    _ => (h, h),
                };
                let base = format!("encoder.layer.{l}.{name}");
                let weight = load(&format!("{base}.weight"), &[out, inp])?;
                let bias = load(&format!("{base}.bias"), &[out])?;
                linears.push(Box::new(DenseLinear::new(weight, Some(bias))?));
            }
            layers.push(BertLayer {
                linears,
                attn_ln: ln(&format!("encoder.layer.{l}.attention.output.LayerNorm"))?,
                out_ln: ln(&format!("encoder.layer.{l}.output.LayerNorm"))?,
            });
        }
        Ok(BertModel {
            config,
            path,
            word,
            pos,
            token_type,
            emb_ln,
            layers,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &BertConfig {
        &self.config
    }

    /// The directory or file the weights came from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Names of every linear, layer by layer in [`LAYER_LINEARS`] order, e.g.
    /// `encoder.layer.0.attention.self.query` (checkpoint names without `.weight`).
    pub fn linear_names(&self) -> Vec<String> {
        (0..self.layers.len())
            .flat_map(|l| {
                LAYER_LINEARS
                    .iter()
                    .map(move |n| format!("encoder.layer.{l}.{n}"))
            })
            .collect()
    }

    fn locate(&self, name: &str) -> Result<(usize, usize)> {
        let unknown = || ModelError::InvalidOption {
            option: "linear name".into(),
            detail: format!(
                "no linear `{name}` in this BERT model (names look like \
                 encoder.layer.0.attention.self.query; layers 0..{})",
                self.layers.len()
            ),
        };
        let name = name.strip_prefix("bert.").unwrap_or(name);
        let name = name.strip_suffix(".weight").unwrap_or(name);
        let rest = name.strip_prefix("encoder.layer.").ok_or_else(unknown)?;
        let (l, kind) = rest.split_once('.').ok_or_else(unknown)?;
        let l: usize = l.parse().map_err(|_| unknown())?;
        let j = LAYER_LINEARS
            .iter()
            .position(|n| *n == kind)
            .ok_or_else(unknown)?;
        if l >= self.layers.len() {
            return Err(unknown());
        }
        Ok((l, j))
    }

    /// The linear of that name (see [`BertModel::linear_names`]).
    pub fn linear(&self, name: &str) -> Result<&dyn Linear> {
        let (l, j) = self.locate(name)?;
        Ok(self.layers[l].linears[j].as_ref())
    }

    /// Replaces the linear of that name, returning the old one. The new one must have the
    /// same input and output widths.
    pub fn replace_linear(
        &mut self,
        name: &str,
        linear: Box<dyn Linear>,
    ) -> Result<Box<dyn Linear>> {
        let (l, j) = self.locate(name)?;
        let old = &self.layers[l].linears[j];
        if (old.in_features(), old.out_features()) != (linear.in_features(), linear.out_features())
        {
            return Err(ModelError::InvalidOption {
                option: name.to_string(),
                detail: format!(
                    "replacement is {}x{}, the linear is {}x{}",
                    linear.out_features(),
                    linear.in_features(),
                    old.out_features(),
                    old.in_features()
                ),
            });
        }
        Ok(std::mem::replace(&mut self.layers[l].linears[j], linear))
    }

    /// The (dequantized) weight `[out, in]` of a linear.
    pub fn weight(&self, name: &str) -> Result<Tensor> {
        self.linear(name)?.weight()
    }

    /// Sets the weight `[out, in]` of a linear (keeping its bias): the linear becomes a
    /// dense one.
    pub fn set_weight(&mut self, name: &str, weight: Tensor) -> Result<()> {
        let old = self.linear(name)?;
        let want = [old.out_features(), old.in_features()];
        if weight.dims() != want {
            return Err(ModelError::InvalidOption {
                option: name.to_string(),
                detail: format!(
                    "new weight has shape {:?}, the linear is {}x{}",
                    weight.dims(),
                    want[0],
                    want[1]
                ),
            });
        }
        let lin = DenseLinear::new(weight, old.bias())?;
        self.replace_linear(name, Box::new(lin))?;
        Ok(())
    }

    /// Last hidden states `[B, T, hidden]` for token ids `[B, T]` (u32) and a mask `[B, T]`
    /// (any dtype, 1 = token, 0 = padding).
    pub fn forward(&self, input_ids: &Tensor, attention_mask: &Tensor) -> Result<Tensor> {
        self.forward_impl(input_ids, attention_mask, None)
    }

    /// [`BertModel::forward`], calling `hook(name, x)` with the input of every linear before
    /// it runs. `x` is `[n, in_features]`: the rows of the real (non-padding) tokens of the
    /// batch, in batch-major order, so a calibration statistic never sees padding.
    pub fn forward_with_hook(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        hook: &mut dyn FnMut(&str, &Tensor),
    ) -> Result<Tensor> {
        self.forward_impl(input_ids, attention_mask, Some(hook))
    }

    fn forward_impl(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        mut hook: Option<&mut HookFn<'_>>,
    ) -> Result<Tensor> {
        let cfg = &self.config;
        let (b, t) = input_ids.dims2().map_err(|_| ModelError::InvalidOption {
            option: "input_ids".into(),
            detail: format!("expected shape [batch, tokens], got {:?}", input_ids.dims()),
        })?;
        if attention_mask.dims() != [b, t] {
            return Err(ModelError::InvalidOption {
                option: "attention_mask".into(),
                detail: format!(
                    "shape {:?} does not match input_ids {:?}",
                    attention_mask.dims(),
                    [b, t]
                ),
            });
        }
        if t > cfg.max_position_embeddings {
            return Err(ModelError::InvalidOption {
                option: "input_ids".into(),
                detail: format!(
                    "{t} tokens exceed max_position_embeddings {}: truncate the input",
                    cfg.max_position_embeddings
                ),
            });
        }
        let ids = input_ids.to_dtype(DType::U32)?.flatten_all()?;
        let ids_v: Vec<u32> = ids.to_vec1()?;
        if let Some(bad) = ids_v.iter().find(|&&i| i as usize >= cfg.vocab_size) {
            return Err(ModelError::InvalidOption {
                option: "input_ids".into(),
                detail: format!(
                    "token id {bad} is outside the vocabulary of {}",
                    cfg.vocab_size
                ),
            });
        }
        let mask = attention_mask.to_dtype(DType::F32)?;
        let (h, nh) = (cfg.hidden_size, cfg.num_attention_heads);
        let d = h / nh;

        // Rows of the real tokens, for the capture hook.
        let mask_v: Vec<f32> = mask.flatten_all()?.to_vec1()?;
        let keep: Vec<u32> = (0..b * t)
            .filter(|&i| mask_v[i] != 0.0)
            .map(|i| i as u32)
            .collect();
        let keep_idx = if hook.is_some() && keep.len() < b * t {
            Some(Tensor::from_vec(keep.clone(), keep.len(), &Device::Cpu)?)
        } else {
            None
        };
        let mut call = |name: String, x: &Tensor| -> Result<()> {
            if let Some(hk) = hook.as_deref_mut() {
                match &keep_idx {
                    Some(idx) => hk(&name, &x.index_select(idx, 0)?),
                    None => hk(&name, x),
                }
            }
            Ok(())
        };

        // Embeddings.
        let we = self.word.index_select(&ids, 0)?.reshape((b, t, h))?;
        let pe = self.pos.narrow(0, 0, t)?;
        let te = self.token_type.narrow(0, 0, 1)?;
        let x = we.broadcast_add(&pe)?.broadcast_add(&te)?;
        let mut x = self.emb_ln.forward(&x)?.reshape((b * t, h))?;

        // Additive mask over keys: 0 for tokens, -1e9 for padding; [B, 1, 1, T].
        let bias = ((mask.ones_like()? - &mask)? * -1e9)?.reshape((b, 1, 1, t))?;
        let scale = 1.0 / (d as f64).sqrt();

        for (l, layer) in self.layers.iter().enumerate() {
            let name = |j: usize| format!("encoder.layer.{l}.{}", LAYER_LINEARS[j]);
            let lin = &layer.linears;
            call(name(0), &x)?;
            call(name(1), &x)?;
            call(name(2), &x)?;
            let heads = |y: Tensor| -> Result<Tensor> {
                Ok(y.reshape((b, t, nh, d))?.transpose(1, 2)?.contiguous()?)
            };
            let q = heads(lin[0].forward(&x)?)?;
            let k = heads(lin[1].forward(&x)?)?;
            let v = heads(lin[2].forward(&x)?)?;
            let scores = (q.matmul(&k.t()?)? * scale)?.broadcast_add(&bias)?;
            let probs = softmax_last(&scores)?;
            let ctx = probs
                .matmul(&v)?
                .transpose(1, 2)?
                .contiguous()?
                .reshape((b * t, h))?;
            call(name(3), &ctx)?;
            let a = layer.attn_ln.forward(&(lin[3].forward(&ctx)? + &x)?)?;
            call(name(4), &a)?;
            let inter = lin[4].forward(&a)?.gelu_erf()?;
            call(name(5), &inter)?;
            x = layer.out_ln.forward(&(lin[5].forward(&inter)? + &a)?)?;
        }
        Ok(x.reshape((b, t, h))?)
    }

    /// Sentence embeddings `[B, hidden]`: [`mean_pool`] of the last hidden states over the
    /// real tokens, then [`l2_normalize`].
    pub fn embed(&self, input_ids: &Tensor, attention_mask: &Tensor) -> Result<Tensor> {
        let hs = self.forward(input_ids, attention_mask)?;
        l2_normalize(&mean_pool(&hs, attention_mask)?)
    }
}

/// Softmax over the last dimension, max-subtracted.
fn softmax_last(x: &Tensor) -> Result<Tensor> {
    let m = x.max_keepdim(D::Minus1)?;
    let e = x.broadcast_sub(&m)?.exp()?;
    let s = e.sum_keepdim(D::Minus1)?;
    Ok(e.broadcast_div(&s)?)
}

/// Mean of `hidden` `[B, T, H]` over the tokens where `mask` `[B, T]` is non-zero (the
/// token count is clamped below at 1e-9, as sentence-transformers does).
///
/// ```
/// use candle_core::{Device, Tensor};
/// let h = Tensor::new(&[[[1f32, 2.0], [3.0, 4.0], [100.0, 100.0]]], &Device::Cpu).unwrap();
/// let m = Tensor::new(&[[1u32, 1, 0]], &Device::Cpu).unwrap();
/// let p: Vec<f32> = quantlab_models::bert::mean_pool(&h, &m).unwrap().flatten_all().unwrap().to_vec1().unwrap();
/// assert!((p[0] - 2.0).abs() < 1e-6 && (p[1] - 3.0).abs() < 1e-6);
/// ```
pub fn mean_pool(hidden: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let m = mask.to_dtype(DType::F32)?.unsqueeze(2)?;
    let sum = hidden.broadcast_mul(&m)?.sum(1)?;
    let count = m.sum(1)?.clamp(1e-9f32, f32::MAX)?;
    Ok(sum.broadcast_div(&count)?)
}

/// Each row of `x` `[B, H]` divided by its L2 norm (clamped below at 1e-12, as
/// `torch.nn.functional.normalize`).
///
/// ```
/// use candle_core::{Device, Tensor};
/// let x = Tensor::new(&[[3f32, 4.0]], &Device::Cpu).unwrap();
/// let y: Vec<f32> = quantlab_models::bert::l2_normalize(&x).unwrap().flatten_all().unwrap().to_vec1().unwrap();
/// assert!((y[0] - 0.6).abs() < 1e-6 && (y[1] - 0.8).abs() < 1e-6);
/// ```
pub fn l2_normalize(x: &Tensor) -> Result<Tensor> {
    let n = x
        .sqr()?
        .sum_keepdim(D::Minus1)?
        .sqrt()?
        .clamp(1e-12f32, f32::MAX)?;
    Ok(x.broadcast_div(&n)?)
}
