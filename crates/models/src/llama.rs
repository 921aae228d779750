//! The LLaMA-family decoder on candle-core: pre-norm blocks of RMSNorm, rotary grouped-query
//! attention with a causal mask and a SwiGLU MLP, replaceable linears, a capture hook and
//! block-level access for the sequential quantization pipeline, and a KV cache.
//!
//! Hidden states are `[batch, tokens, hidden]` f32 tensors on the CPU; all sequences of a
//! batch have the same length (no padding).

use std::collections::HashSet;
use std::path::Path;

use candle_core::{DType, Device, IndexOp, Tensor};

use crate::config::{LlamaConfig, RopeScaling};
use crate::linear::{DenseLinear, LazyLinear, Linear};
use crate::ops;
use crate::weights::{GgufWeights, SafetensorsWeights, WeightSource};
use crate::{ModelError, Result};

/// The seven projections of a block, in forward order.
pub const BLOCK_LINEARS: [&str; 7] = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
];

/// A callback that sees the input of chosen linears during a forward pass.
///
/// The callback gets the linear's name (`model.layers.3.mlp.down_proj`, `lm_head`) and its
/// input `[tokens, in_features]` (batch and sequence flattened). Linears that share an input
/// (q/k/v, gate/up) are each reported, with the same tensor.
pub struct CaptureHook<'a> {
    names: Option<HashSet<String>>,
    callback: CaptureFn<'a>,
}

/// The boxed callback of a [`CaptureHook`]: linear name, input `[tokens, in_features]`.
pub type CaptureFn<'a> = Box<dyn FnMut(&str, &Tensor) + 'a>;

impl<'a> CaptureHook<'a> {
    /// A hook on the linears named in `names`.
    pub fn new<I, S>(names: I, callback: impl FnMut(&str, &Tensor) + 'a) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self {
            names: Some(names.into_iter().map(Into::into).collect()),
            callback: Box::new(callback),
        }
    }

    /// A hook on every linear.
    pub fn all(callback: impl FnMut(&str, &Tensor) + 'a) -> Self {
        Self {
            names: None,
            callback: Box::new(callback),
        }
    }

    /// Whether the hook wants the input of `name`.
    pub fn wants(&self, name: &str) -> bool {
        self.names.as_ref().is_none_or(|n| n.contains(name))
    }

    fn offer(&mut self, name: &str, x: &Tensor) {
        if self.wants(name) {
            (self.callback)(name, x);
        }
    }
}

impl std::fmt::Debug for CaptureHook<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaptureHook")
            .field("names", &self.names)
            .finish()
    }
}

/// Keys and values of past positions, per block, for incremental decoding.
#[derive(Debug, Clone)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    len: usize,
}

impl KvCache {
    /// An empty cache for a model with `n_blocks` blocks.
    pub fn new(n_blocks: usize) -> Self {
        Self {
            layers: vec![None; n_blocks],
            len: 0,
        }
    }

    /// Number of positions already cached.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Forgets every position.
    pub fn clear(&mut self) {
        self.layers.iter_mut().for_each(|l| *l = None);
        self.len = 0;
    }
}

/// One decoder block.
#[derive(Debug)]
pub struct LlamaBlock {
    input_layernorm: Vec<f32>,
    post_attention_layernorm: Vec<f32>,
    /// q, k, v, o, gate, up, down, in [`BLOCK_LINEARS`] order.
    linears: Vec<Box<dyn Linear>>,
    /// Full names, `model.layers.{i}.{BLOCK_LINEARS[j]}`.
    names: Vec<String>,
}

impl LlamaBlock {
    /// The linear `BLOCK_LINEARS[j]`.
    pub fn linear(&self, j: usize) -> &dyn Linear {
        self.linears[j].as_ref()
    }

    /// The full name of linear `j`.
    pub fn linear_name(&self, j: usize) -> &str {
        &self.names[j]
    }
}

/// A LLaMA-style decoder (Llama, SmolLM, Mistral, Qwen2) with f32 weights.
#[derive(Debug)]
pub struct LlamaModel {
    config: LlamaConfig,
    embed_tokens: Tensor,
    blocks: Vec<LlamaBlock>,
    norm: Vec<f32>,
    lm_head: Box<dyn Linear>,
    inv_freq: Vec<f64>,
    pos_scale: f64,
}

fn check_shape(src: &dyn WeightSource, name: &str, t: &Tensor, expected: &[usize]) -> Result<()> {
    if t.dims() != expected {
        return Err(ModelError::TensorShape {
            path: src.path().display().to_string(),
            tensor: name.to_string(),
            expected: expected.to_vec(),
            got: t.dims().to_vec(),
        });
    }
    Ok(())
}

fn vec_f32(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?)
}

impl LlamaModel {
    /// Loads a model from a `.gguf` file, a Hugging Face directory (`config.json` plus
    /// `model.safetensors` or a sharded index), or a `.safetensors` file with a
    /// `config.json` beside it.
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        if path.is_dir() {
            return Self::from_hf_dir(path);
        }
        match path.extension().and_then(|e| e.to_str()) {
            Some("safetensors") => {
                let dir = path.parent().unwrap_or(Path::new("."));
                let cfg = LlamaConfig::from_hf_file(&dir.join("config.json"))?;
                let src = SafetensorsWeights::open_file(path)?;
                Self::from_source(cfg, &src)
            }
            _ => Self::from_gguf(path),
        }
    }

    /// Loads a GGUF file (architecture `llama` or `qwen2`), dequantizing every tensor to f32.
    pub fn from_gguf(path: impl AsRef<Path>) -> Result<Self> {
        let src = GgufWeights::open(path)?;
        let cfg = src.config()?;
        Self::from_source(cfg, &src)
    }

    /// Loads a Hugging Face directory.
    pub fn from_hf_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let cfg = LlamaConfig::from_hf_file(&dir.join("config.json"))?;
        let src = SafetensorsWeights::open_dir(dir)?;
        Self::from_source(cfg, &src)
    }

    /// Builds the model from any weight source (Hugging Face names and layout).
    pub fn from_source(config: LlamaConfig, src: &dyn WeightSource) -> Result<Self> {
        Self::build(config, src, None)
    }

    /// Builds the model with its block linears left in the source ([`LazyLinear`]: read and
    /// dequantized from the memory-mapped file each time they are used, nothing kept), and the
    /// embeddings, norms and output head loaded. For drivers that visit the blocks one by one
    /// and replace each linear once quantized: resident memory stays about one block in f32
    /// plus what replaced the visited ones, whatever the model's size. Running it as it is
    /// re-reads every linear on every forward (slow, but the same numbers as
    /// [`LlamaModel::from_source`]).
    pub fn from_source_lazy(
        config: LlamaConfig,
        src: std::sync::Arc<dyn WeightSource + Send + Sync>,
    ) -> Result<Self> {
        Self::build(config, src.as_ref(), Some(&src))
    }

    fn build(
        mut config: LlamaConfig,
        src: &dyn WeightSource,
        lazy: Option<&std::sync::Arc<dyn WeightSource + Send + Sync>>,
    ) -> Result<Self> {
        config.validate(&src.path().display().to_string())?;
        let c = &config;
        let d = c.hidden_size;
        let q_out = c.num_attention_heads * c.head_dim;
        let kv_out = c.num_key_value_heads * c.head_dim;
        let embed_tokens = src.load("model.embed_tokens.weight")?;
        check_shape(
            src,
            "model.embed_tokens.weight",
            &embed_tokens,
            &[c.vocab_size, d],
        )?;
        let load_vec = |name: &str, len: usize| -> Result<Vec<f32>> {
            let t = src.load(name)?;
            check_shape(src, name, &t, &[len])?;
            vec_f32(&t)
        };
        let load_linear = |name: &str,
                           out: usize,
                           inp: usize,
                           bias: bool,
                           keep: bool|
         -> Result<Box<dyn Linear>> {
            let wn = format!("{name}.weight");
            let bn = format!("{name}.bias");
            let b = if bias || src.contains(&bn) {
                let b = src.load(&bn)?;
                check_shape(src, &bn, &b, &[out])?;
                Some(b)
            } else {
                None
            };
            if let (Some(arc), false) = (lazy, keep) {
                if !src.contains(&wn) {
                    return Err(ModelError::MissingTensor {
                        path: src.path().display().to_string(),
                        tensor: wn,
                    });
                }
                return Ok(Box::new(LazyLinear::new(arc.clone(), wn, out, inp, b)));
            }
            let w = src.load(&wn)?;
            check_shape(src, &wn, &w, &[out, inp])?;
            Ok(Box::new(DenseLinear::new(w, b)?))
        };
        // Not `with_capacity(num_hidden_layers)`: the count comes from the file, and a hostile
        // one would allocate before the first missing block is noticed.
        let mut blocks = Vec::new();
        for i in 0..c.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let shapes = [
                (q_out, d, c.qkv_bias),
                (kv_out, d, c.qkv_bias),
                (kv_out, d, c.qkv_bias),
                (d, q_out, c.o_bias),
                (c.intermediate_size, d, c.mlp_bias),
                (c.intermediate_size, d, c.mlp_bias),
                (d, c.intermediate_size, c.mlp_bias),
            ];
            let names: Vec<String> = BLOCK_LINEARS.iter().map(|l| format!("{p}.{l}")).collect();
            let linears = names
                .iter()
                .zip(shapes)
                .map(|(n, (o, i, b))| load_linear(n, o, i, b, false))
                .collect::<Result<Vec<_>>>()?;
            blocks.push(LlamaBlock {
                input_layernorm: load_vec(&format!("{p}.input_layernorm.weight"), d)?,
                post_attention_layernorm: load_vec(
                    &format!("{p}.post_attention_layernorm.weight"),
                    d,
                )?,
                linears,
                names,
            });
        }
        let norm = load_vec("model.norm.weight", d)?;
        let tied = c.tie_word_embeddings || !src.contains("lm_head.weight");
        let lm_head: Box<dyn Linear> = if tied {
            Box::new(DenseLinear::new(embed_tokens.clone(), None)?)
        } else {
            load_linear("lm_head", c.vocab_size, d, false, true)?
        };
        config.tie_word_embeddings = tied;
        let mut inv_freq = config.inv_freqs();
        let mut pos_scale = match config.rope_scaling {
            Some(RopeScaling::Linear { factor }) => factor,
            _ => 1.0,
        };
        if src.contains("rope_freqs.weight") {
            // llama.cpp stores Llama 3.1 scaling as per-frequency divisors.
            let f = load_vec("rope_freqs.weight", config.head_dim / 2)?;
            for (i, v) in inv_freq.iter_mut().enumerate() {
                *v /= f[i] as f64;
            }
            pos_scale = 1.0;
        }
        Ok(Self {
            config,
            embed_tokens,
            blocks,
            norm,
            lm_head,
            inv_freq,
            pos_scale,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    /// Number of decoder blocks.
    pub fn n_blocks(&self) -> usize {
        self.blocks.len()
    }

    /// Block `i`.
    pub fn block(&self, i: usize) -> &LlamaBlock {
        &self.blocks[i]
    }

    /// The token embedding `[vocab, hidden]`.
    pub fn embed_weight(&self) -> &Tensor {
        &self.embed_tokens
    }

    /// Names of every replaceable linear, in forward order: the seven of each block, then
    /// `lm_head`.
    pub fn linear_names(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .blocks
            .iter()
            .flat_map(|b| b.names.iter().cloned())
            .collect();
        v.push("lm_head".into());
        v
    }

    fn locate(&self, name: &str) -> Option<(usize, usize)> {
        let name = name.strip_suffix(".weight").unwrap_or(name);
        let rest = name.strip_prefix("model.layers.")?;
        let (i, l) = rest.split_once('.')?;
        let i: usize = i.parse().ok()?;
        let j = BLOCK_LINEARS.iter().position(|x| *x == l)?;
        (i < self.blocks.len()).then_some((i, j))
    }

    /// The linear of that name (`model.layers.3.mlp.down_proj` or `lm_head`; a trailing
    /// `.weight` is accepted).
    pub fn linear(&self, name: &str) -> Result<&dyn Linear> {
        let stripped = name.strip_suffix(".weight").unwrap_or(name);
        if stripped == "lm_head" {
            return Ok(self.lm_head.as_ref());
        }
        let (i, j) = self.locate(name).ok_or_else(|| ModelError::UnknownLinear {
            name: name.to_string(),
        })?;
        Ok(self.blocks[i].linears[j].as_ref())
    }

    /// Mutable access to the boxed linear of that name, to swap it for another kind.
    pub fn linear_mut(&mut self, name: &str) -> Result<&mut Box<dyn Linear>> {
        let stripped = name.strip_suffix(".weight").unwrap_or(name);
        if stripped == "lm_head" {
            return Ok(&mut self.lm_head);
        }
        let (i, j) = self.locate(name).ok_or_else(|| ModelError::UnknownLinear {
            name: name.to_string(),
        })?;
        Ok(&mut self.blocks[i].linears[j])
    }

    /// Replaces a linear, checking its shape, and returns the old one.
    pub fn replace_linear(&mut self, name: &str, new: Box<dyn Linear>) -> Result<Box<dyn Linear>> {
        let slot = self.linear_mut(name)?;
        if (slot.out_features(), slot.in_features()) != (new.out_features(), new.in_features()) {
            return Err(ModelError::InvalidOption {
                option: name.to_string(),
                detail: format!(
                    "replacement is {}x{}, the linear is {}x{}",
                    new.out_features(),
                    new.in_features(),
                    slot.out_features(),
                    slot.in_features()
                ),
            });
        }
        Ok(std::mem::replace(slot, new))
    }

    /// Sets the weight `[out, in]` of a linear (as a dense layer, keeping its bias).
    ///
    /// ```no_run
    /// # fn main() -> quantlab_models::Result<()> {
    /// let mut m = quantlab_models::LlamaModel::load("model.gguf")?;
    /// let w = m.linear("model.layers.3.mlp.down_proj")?.weight()?;
    /// m.set_weight("model.layers.3.mlp.down_proj", (w * 0.5)?)?;
    /// # Ok(()) }
    /// ```
    pub fn set_weight(&mut self, name: &str, weight: Tensor) -> Result<()> {
        let bias = self.linear(name)?.bias();
        let new = DenseLinear::new(weight, bias)?;
        self.replace_linear(name, Box::new(new))?;
        Ok(())
    }

    /// Folds every RMSNorm's scale into the linears that read its output (rotation
    /// preparation, [`crate::rotate`]): `input_layernorm` into q/k/v, `post_attention_layernorm`
    /// into gate/up and `model.norm` into the output head (`W diag(g)`), each norm's weight then
    /// all ones. The output head becomes its own tensor (the model is no longer tied). The
    /// logits are unchanged up to f32 rounding. Every linear touched becomes a
    /// [`DenseLinear`] (a lazy or quantized one is read in f32 first): fold before quantizing.
    pub fn fold_norms(&mut self) -> Result<()> {
        let d = self.config.hidden_size;
        let fold = |lin: &mut Box<dyn Linear>, g: &[f32]| -> Result<()> {
            let g = Tensor::from_slice(g, (1, g.len()), &Device::Cpu)?;
            let w = lin.weight()?.broadcast_mul(&g)?;
            *lin = Box::new(DenseLinear::new(w, lin.bias())?);
            Ok(())
        };
        for b in &mut self.blocks {
            let g = std::mem::replace(&mut b.input_layernorm, vec![1.0; d]);
            for j in [0, 1, 2] {
                fold(&mut b.linears[j], &g)?;
            }
            let g = std::mem::replace(&mut b.post_attention_layernorm, vec![1.0; d]);
            for j in [4, 5] {
                fold(&mut b.linears[j], &g)?;
            }
        }
        let g = std::mem::replace(&mut self.norm, vec![1.0; d]);
        fold(&mut self.lm_head, &g)?;
        self.config.tie_word_embeddings = false;
        Ok(())
    }

    /// Whether every RMSNorm weight is 1 (as after [`LlamaModel::fold_norms`]).
    pub fn norms_are_folded(&self) -> bool {
        let one = |v: &[f32]| v.iter().all(|&x| x == 1.0);
        one(&self.norm)
            && self
                .blocks
                .iter()
                .all(|b| one(&b.input_layernorm) && one(&b.post_attention_layernorm))
    }

    /// The RMSNorm weights under Hugging Face names (`model.layers.{i}.input_layernorm.weight`,
    /// `...post_attention_layernorm.weight`, `model.norm.weight`).
    pub fn norm_weights(&self) -> Vec<(String, Vec<f32>)> {
        let mut v = Vec::new();
        for (i, b) in self.blocks.iter().enumerate() {
            let p = format!("model.layers.{i}");
            v.push((
                format!("{p}.input_layernorm.weight"),
                b.input_layernorm.clone(),
            ));
            v.push((
                format!("{p}.post_attention_layernorm.weight"),
                b.post_attention_layernorm.clone(),
            ));
        }
        v.push(("model.norm.weight".into(), self.norm.clone()));
        v
    }

    /// Rotates the residual stream by the orthogonal `q` (`[hidden, hidden]`, any float
    /// dtype; QuaRot's R1): the stream `h` becomes `q^T h`, so the embedding rows and every
    /// linear reading the stream (q/k/v, gate/up, the output head) are multiplied by `q` on
    /// the right, and every linear writing into it (o_proj, down_proj: weight and bias) by
    /// `q^T` on the left. RMSNorm commutes with the rotation only with unit weights, so the
    /// norms must be folded first ([`LlamaModel::fold_norms`]; an error otherwise). Products
    /// in f64, rounded to f32 once.
    pub fn rotate_residual(&mut self, q: &Tensor) -> Result<()> {
        let d = self.config.hidden_size;
        let bad = |detail: String| ModelError::InvalidOption {
            option: "rotate".into(),
            detail,
        };
        if q.dims() != [d, d] {
            return Err(bad(format!(
                "the residual rotation is {:?}, the hidden size is {d}",
                q.dims()
            )));
        }
        if !self.norms_are_folded() || self.config.tie_word_embeddings {
            return Err(bad(
                "the norms are not folded (call fold_norms before rotate_residual)".into(),
            ));
        }
        let q = q.to_dtype(DType::F64)?;
        let qt = q.t()?.contiguous()?;
        let right = |w: &Tensor| crate::rotate::in_f64(w, |w| Ok(w.matmul(&q)?));
        let left = |w: &Tensor| crate::rotate::in_f64(w, |w| Ok(qt.matmul(w)?));
        self.embed_tokens = right(&self.embed_tokens)?;
        let reread = |lin: &mut Box<dyn Linear>, writer: bool| -> Result<()> {
            let w = lin.weight()?;
            let (w, b) = if writer {
                let b = match lin.bias() {
                    Some(b) => Some(left(&b.reshape((d, 1))?)?.reshape(d)?),
                    None => None,
                };
                (left(&w)?, b)
            } else {
                (right(&w)?, lin.bias())
            };
            *lin = Box::new(DenseLinear::new(w, b)?);
            Ok(())
        };
        for b in &mut self.blocks {
            for (j, lin) in b.linears.iter_mut().enumerate() {
                reread(lin, j == 3 || j == 6)?;
            }
        }
        reread(&mut self.lm_head, false)?;
        Ok(())
    }

    /// Rotates each attention head's values by the orthogonal `h` (`[head_dim, head_dim]`;
    /// QuaRot's R2): the rows of every kv head of `v_proj` (and its bias) are multiplied by
    /// `h^T`, and the columns of every head of `o_proj` by `h` (a query head reads the value
    /// head of its group, rotated the same way), so attention's weighted sums of values pass
    /// the rotation through to `o_proj` and the block computes the same output. Needs no
    /// folding. Products in f64, rounded to f32 once.
    pub fn rotate_heads_vo(&mut self, h: &Tensor) -> Result<()> {
        let c = &self.config;
        let (d, hd, nh, kv) = (
            c.hidden_size,
            c.head_dim,
            c.num_attention_heads,
            c.num_key_value_heads,
        );
        if h.dims() != [hd, hd] {
            return Err(ModelError::InvalidOption {
                option: "rotate".into(),
                detail: format!(
                    "the head rotation is {:?}, the head dimension is {hd}",
                    h.dims()
                ),
            });
        }
        let h = h.to_dtype(DType::F64)?;
        let ht = h.t()?.contiguous()?;
        for b in &mut self.blocks {
            // v_proj [kv * hd, d]: per head [hd, d] -> h^T [hd, d]
            let v = &mut b.linears[2];
            let w = crate::rotate::in_f64(&v.weight()?, |w| {
                Ok(ht
                    .broadcast_matmul(&w.reshape((kv, hd, d))?)?
                    .reshape((kv * hd, d))?)
            })?;
            let bias = match v.bias() {
                Some(bv) => Some(crate::rotate::in_f64(&bv, |bv| {
                    Ok(ht
                        .broadcast_matmul(&bv.reshape((kv, hd, 1))?)?
                        .reshape(kv * hd)?)
                })?),
                None => None,
            };
            *v = Box::new(DenseLinear::new(w, bias)?);
            // o_proj [d, nh * hd]: per head's columns [d, hd] -> [d, hd] h
            let o = &mut b.linears[3];
            let w = crate::rotate::in_f64(&o.weight()?, |w| {
                Ok(w.reshape((d * nh, hd))?.matmul(&h)?.reshape((d, nh * hd))?)
            })?;
            *o = Box::new(DenseLinear::new(w, o.bias())?);
        }
        Ok(())
    }

    /// Looks up token embeddings: `[batch, tokens, hidden]` for a batch of equally long
    /// sequences.
    pub fn embed(&self, batch: &[&[u32]]) -> Result<Tensor> {
        let n = batch.first().map_or(0, |s| s.len());
        if batch.iter().any(|s| s.len() != n) || n == 0 {
            return Err(ModelError::InvalidOption {
                option: "tokens".into(),
                detail: "sequences of a batch must be non-empty and equally long".into(),
            });
        }
        let flat: Vec<u32> = batch.iter().flat_map(|s| s.iter().copied()).collect();
        if let Some(&t) = flat.iter().find(|&&t| t as usize >= self.config.vocab_size) {
            return Err(ModelError::InvalidOption {
                option: "tokens".into(),
                detail: format!(
                    "token id {t} is outside the vocabulary of {}",
                    self.config.vocab_size
                ),
            });
        }
        let ids = Tensor::from_vec(flat, batch.len() * n, &Device::Cpu)?;
        let e = self.embed_tokens.index_select(&ids, 0)?;
        Ok(e.reshape((batch.len(), n, self.config.hidden_size))?)
    }

    /// Runs block `i` on hidden states `[batch, tokens, hidden]` whose first token sits at
    /// absolute position `pos0`, returning the new hidden states. With a cache, the block's
    /// keys and values are appended to it (the cache's length is advanced by
    /// [`LlamaModel::forward_cached`], not here). The hook sees the inputs of this block's
    /// linears.
    ///
    /// It is the composition of the stages [`LlamaModel::block_attn_input`],
    /// [`LlamaModel::block_attention`], [`LlamaModel::block_mlp_input`],
    /// [`LlamaModel::block_mlp_act`] and [`LlamaModel::block_output`], which a driver can run
    /// one at a time (quantizing the linears of each stage before computing the next).
    pub fn block_forward(
        &self,
        i: usize,
        hidden: &Tensor,
        pos0: usize,
        cache: Option<&mut KvCache>,
        mut hook: Option<&mut CaptureHook<'_>>,
    ) -> Result<Tensor> {
        let blk = &self.blocks[i];
        let (b, n, _) = hidden.dims3()?;
        let x = self.block_attn_input(i, hidden)?;
        if let Some(h) = hook.as_deref_mut() {
            for j in 0..3 {
                h.offer(&blk.names[j], &x);
            }
        }
        let attn = self.attention_stage(i, &x, b, n, pos0, cache)?;
        if let Some(h) = hook.as_deref_mut() {
            h.offer(&blk.names[3], &attn);
        }
        let (hidden, x) = self.block_mlp_input(i, hidden, &attn)?;
        if let Some(h) = hook.as_deref_mut() {
            h.offer(&blk.names[4], &x);
            h.offer(&blk.names[5], &x);
        }
        let act = self.block_mlp_act(i, &x)?;
        if let Some(h) = hook {
            h.offer(&blk.names[6], &act);
        }
        self.block_output(i, &hidden, &act)
    }

    /// Stage 1 of block `i`: the input RMSNorm of hidden states `[batch, tokens, hidden]`,
    /// i.e. the input of `q_proj`, `k_proj` and `v_proj` as `[batch * tokens, hidden]`.
    pub fn block_attn_input(&self, i: usize, hidden: &Tensor) -> Result<Tensor> {
        let blk = self.block_checked(i)?;
        let (b, n, d) = hidden.dims3()?;
        let eps = self.config.rms_norm_eps as f32;
        Ok(ops::rms_norm(hidden, &blk.input_layernorm, eps)?.reshape((b * n, d))?)
    }

    /// Stage 2 of block `i`: q, k, v of the normed input `x` (`[batch * tokens, hidden]`,
    /// from [`LlamaModel::block_attn_input`]), RoPE from position 0 and causal attention
    /// over the `batch` sequences: the input of `o_proj`, `[batch * tokens, heads * head_dim]`.
    pub fn block_attention(&self, i: usize, x: &Tensor, batch: usize) -> Result<Tensor> {
        self.block_checked(i)?;
        let rows = x.dims2()?.0;
        if batch == 0 || rows % batch != 0 {
            return Err(ModelError::InvalidOption {
                option: "batch".into(),
                detail: format!("{rows} rows do not split into {batch} equal sequences"),
            });
        }
        self.attention_stage(i, x, batch, rows / batch, 0, None)
    }

    /// Stage 3 of block `i`: the residual after attention, `hidden + o_proj(attn)`
    /// (`[batch, tokens, hidden]`), and its post-attention RMSNorm, the input of `gate_proj`
    /// and `up_proj` (`[batch * tokens, hidden]`).
    pub fn block_mlp_input(
        &self,
        i: usize,
        hidden: &Tensor,
        attn: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let blk = self.block_checked(i)?;
        let (b, n, d) = hidden.dims3()?;
        let eps = self.config.rms_norm_eps as f32;
        let o = blk.linears[3].forward(attn)?;
        let hidden = ops::add(hidden, &o)?;
        let x = ops::rms_norm(&hidden, &blk.post_attention_layernorm, eps)?.reshape((b * n, d))?;
        Ok((hidden, x))
    }

    /// Stage 4 of block `i`: `silu(gate_proj(x)) * up_proj(x)`, the input of `down_proj`.
    pub fn block_mlp_act(&self, i: usize, x: &Tensor) -> Result<Tensor> {
        let blk = self.block_checked(i)?;
        let gate = blk.linears[4].forward(x)?;
        let up = blk.linears[5].forward(x)?;
        ops::silu_mul(&gate, &up)
    }

    /// Stage 5 of block `i`: the block's output `hidden + down_proj(act)` with `hidden` the
    /// residual from [`LlamaModel::block_mlp_input`].
    pub fn block_output(&self, i: usize, hidden: &Tensor, act: &Tensor) -> Result<Tensor> {
        let blk = self.block_checked(i)?;
        let down = blk.linears[6].forward(act)?;
        ops::add(hidden, &down)
    }

    fn block_checked(&self, i: usize) -> Result<&LlamaBlock> {
        self.blocks.get(i).ok_or_else(|| ModelError::InvalidOption {
            option: "block".into(),
            detail: format!("block {i} of a model with {} blocks", self.blocks.len()),
        })
    }

    /// q, k, v, RoPE, the KV cache and attention of block `i` on the normed input `x`
    /// (`[b * n, hidden]`).
    fn attention_stage(
        &self,
        i: usize,
        x: &Tensor,
        b: usize,
        n: usize,
        pos0: usize,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let c = &self.config;
        let blk = &self.blocks[i];
        let (hd, kvh) = (c.head_dim, c.num_key_value_heads);
        let g = c.group_size();
        let q = blk.linears[0].forward(x)?;
        let k = blk.linears[1].forward(x)?;
        let v = blk.linears[2].forward(x)?;
        let rope = ops::Rope::new(&self.inv_freq, pos0, n, self.pos_scale);
        let q = ops::to_kv_major(&q, b, n, kvh, g, hd, Some(&rope))?; // [b, kvh, n*g, hd]
        let mut k = ops::to_kv_major(&k, b, n, kvh, 1, hd, Some(&rope))?; // [b, kvh, n, hd]
        let mut v = ops::to_kv_major(&v, b, n, kvh, 1, hd, None)?;
        let mut key0 = pos0;
        if let Some(cache) = cache {
            if let Some((pk, pv)) = &cache.layers[i] {
                k = Tensor::cat(&[pk, &k], 2)?;
                v = Tensor::cat(&[pv, &v], 2)?;
                key0 = pos0 - pk.dims()[2];
            }
            let keep_from = match c.sliding_window {
                Some(w) if k.dims()[2] > w => k.dims()[2] - w,
                _ => 0,
            };
            let (ks, vs) = if keep_from > 0 {
                let t = k.dims()[2];
                (
                    k.narrow(2, keep_from, t - keep_from)?.contiguous()?,
                    v.narrow(2, keep_from, t - keep_from)?.contiguous()?,
                )
            } else {
                (k.clone(), v.clone())
            };
            cache.layers[i] = Some((ks, vs));
        }
        let scale = 1.0 / (hd as f32).sqrt();
        let attn = ops::attention(&q, &k, &v, g, pos0, key0, scale, c.sliding_window)?;
        Ok(ops::from_kv_major(&attn, b, n, kvh, g, hd)?.reshape((b * n, kvh * g * hd))?)
    }

    /// Final RMSNorm and output head: hidden `[batch, tokens, hidden]` (or `[rows, hidden]`)
    /// to logits `[batch * tokens, vocab]`.
    pub fn head(&self, hidden: &Tensor, hook: Option<&mut CaptureHook<'_>>) -> Result<Tensor> {
        let d = self.config.hidden_size;
        let rows = hidden.elem_count() / d;
        let x = ops::rms_norm(hidden, &self.norm, self.config.rms_norm_eps as f32)?
            .reshape((rows, d))?;
        if let Some(h) = hook {
            h.offer("lm_head", &x);
        }
        self.lm_head.forward(&x)
    }

    /// Logits `[tokens, vocab]` for one sequence processed from position 0.
    ///
    /// ```no_run
    /// # fn main() -> quantlab_models::Result<()> {
    /// let m = quantlab_models::LlamaModel::load("model.gguf")?;
    /// let logits = m.forward(&[1, 2, 3])?;
    /// assert_eq!(logits.dims(), &[3, m.config().vocab_size]);
    /// # Ok(()) }
    /// ```
    pub fn forward(&self, tokens: &[u32]) -> Result<Tensor> {
        self.forward_batch(&[tokens], None)
    }

    /// Logits `[batch * tokens, vocab]` for a batch of equally long sequences, with an
    /// optional capture hook.
    pub fn forward_batch(
        &self,
        batch: &[&[u32]],
        mut hook: Option<&mut CaptureHook<'_>>,
    ) -> Result<Tensor> {
        let mut h = self.embed(batch)?;
        for i in 0..self.blocks.len() {
            h = self.block_forward(i, &h, 0, None, hook.as_deref_mut())?;
        }
        self.head(&h, hook)
    }

    /// Processes `tokens` after the positions already in `cache`, appends their keys and
    /// values, and returns their logits `[tokens, vocab]`.
    pub fn forward_cached(&self, tokens: &[u32], cache: &mut KvCache) -> Result<Tensor> {
        if cache.layers.len() != self.blocks.len() {
            *cache = KvCache::new(self.blocks.len());
        }
        let pos0 = cache.len;
        let mut h = self.embed(&[tokens])?;
        for i in 0..self.blocks.len() {
            h = self.block_forward(i, &h, pos0, Some(cache), None)?;
        }
        cache.len += tokens.len();
        self.head(&h, None)
    }

    /// Logits of the last position only, `[vocab]` (for generation).
    pub fn last_logits(logits: &Tensor) -> Result<Vec<f32>> {
        let rows = logits.dims()[0];
        Ok(logits.i(rows - 1)?.to_vec1::<f32>()?)
    }
}
