//! The model being quantized: its configuration, every tensor under Hugging Face names, its
//! tokenizer, and the [`LlamaModel`] built from them.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::Tensor;
use quantlab_models::{
    GgufWeights, LlamaConfig, LlamaModel, LlamaTokenizer, SafetensorsWeights, WeightSource,
    BLOCK_LINEARS,
};

use crate::{PipelineError, Result};

/// What kind of model a path holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum SourceKind {
    /// A `.gguf` file.
    Gguf,
    /// A Hugging Face directory (`config.json` + `model.safetensors`).
    HfDir,
}

/// Checks that `path` looks like a model (without reading the weights): a GGUF file (magic
/// `GGUF`) or a directory with `config.json` and `model.safetensors` (or its index).
pub fn detect(path: &Path) -> Result<SourceKind> {
    let not = |d: &str| PipelineError::NotAModel {
        path: path.display().to_string(),
        detail: d.to_string(),
    };
    if !path.exists() {
        return Err(not("no such file or directory"));
    }
    if path.is_dir() {
        if !path.join("config.json").is_file() {
            return Err(not(
                "the directory has no config.json (expected a Hugging Face model directory)",
            ));
        }
        if !path.join("model.safetensors").is_file()
            && !path.join("model.safetensors.index.json").is_file()
        {
            return Err(not(
                "the directory has no model.safetensors (or model.safetensors.index.json)",
            ));
        }
        return Ok(SourceKind::HfDir);
    }
    let mut magic = [0u8; 4];
    let ok = std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok();
    if ok && &magic == b"GGUF" {
        Ok(SourceKind::Gguf)
    } else {
        Err(not(
            "not a GGUF file (no GGUF magic) nor a Hugging Face directory",
        ))
    }
}

/// Reads only the configuration of a model path (cheap: no weights are dequantized).
pub fn read_config(path: &Path) -> Result<LlamaConfig> {
    Ok(match detect(path)? {
        SourceKind::Gguf => GgufWeights::open(path)?.config()?,
        SourceKind::HfDir => LlamaConfig::from_hf_file(&path.join("config.json"))?,
    })
}

/// Tensors held in memory, served as a [`WeightSource`].
#[derive(Debug)]
pub struct MapSource<'a> {
    /// Reported in errors.
    pub path: PathBuf,
    /// Hugging Face name -> f32 tensor.
    pub tensors: &'a BTreeMap<String, Tensor>,
}

impl WeightSource for MapSource<'_> {
    fn path(&self) -> &Path {
        &self.path
    }
    fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }
    fn load(&self, name: &str) -> quantlab_models::Result<Tensor> {
        self.tensors
            .get(name)
            .cloned()
            .ok_or_else(|| quantlab_models::ModelError::MissingTensor {
                path: self.path.display().to_string(),
                tensor: name.to_string(),
            })
    }
    fn names(&self) -> Vec<String> {
        self.tensors.keys().cloned().collect()
    }
}

/// A loaded source model.
pub struct SourceModel {
    /// The path it came from.
    pub path: PathBuf,
    /// GGUF or HF directory.
    pub kind: SourceKind,
    /// The model (f32, linears replaceable).
    pub model: LlamaModel,
    /// Every tensor that is not a block linear's weight (embeddings, norms, biases, lm_head,
    /// rope frequencies), f32, Hugging Face names: written back untouched (norms with AWQ's
    /// scales folded in).
    pub others: BTreeMap<String, Tensor>,
    /// The tokenizer.
    pub tokenizer: LlamaTokenizer,
}

impl std::fmt::Debug for SourceModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SourceModel")
            .field("path", &self.path)
            .field("kind", &self.kind)
            .field("others", &self.others.len())
            .finish()
    }
}

fn is_block_linear_weight(name: &str) -> bool {
    name.starts_with("model.layers.")
        && BLOCK_LINEARS
            .iter()
            .any(|l| name.ends_with(&format!(".{l}.weight")))
}

/// The file's weights under the names the model asks for: checkpoints of a bare
/// `LlamaModel` lack the `model.` prefix (`layers.0...`, `embed_tokens.weight`,
/// `norm.weight`), which is added here.
struct Prefixed(Box<dyn WeightSource + Send + Sync>);

impl Prefixed {
    fn inner_name<'a>(&self, name: &'a str) -> &'a str {
        match name.strip_prefix("model.") {
            Some(rest) if !self.0.contains(name) && self.0.contains(rest) => rest,
            _ => name,
        }
    }
}

impl WeightSource for Prefixed {
    fn path(&self) -> &Path {
        self.0.path()
    }
    fn contains(&self, name: &str) -> bool {
        self.0.contains(self.inner_name(name))
    }
    fn load(&self, name: &str) -> quantlab_models::Result<Tensor> {
        self.0.load(self.inner_name(name))
    }
    fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.0.names().into_iter().map(|n| prefixed(&n)).collect();
        v.sort();
        v
    }
}

fn prefixed(name: &str) -> String {
    let bare = name.starts_with("layers.")
        || name.starts_with("embed_tokens.")
        || name.starts_with("norm.");
    if bare {
        format!("model.{name}")
    } else {
        name.to_string()
    }
}

fn open_source(path: &Path, kind: SourceKind) -> Result<(LlamaConfig, Prefixed)> {
    Ok(match kind {
        SourceKind::Gguf => {
            let w = GgufWeights::open(path)?;
            (w.config()?, Prefixed(Box::new(w)))
        }
        SourceKind::HfDir => (
            LlamaConfig::from_hf_file(&path.join("config.json"))?,
            Prefixed(Box::new(SafetensorsWeights::open_dir(path)?)),
        ),
    })
}

impl SourceModel {
    /// Loads a GGUF file or a Hugging Face directory (every tensor dequantized to f32 once).
    pub fn load(path: &Path) -> Result<Self> {
        Self::load_with(path, false)
    }

    /// As [`SourceModel::load`], with `lazy` the block linears left in the memory-mapped file
    /// ([`LlamaModel::from_source_lazy`]): only the embeddings, norms and other small tensors
    /// are read now. The quantization driver then holds one block's weights in f32 at a time,
    /// and (with [`crate::QuantizeConfig::lazy`]) keeps each quantized linear as its codes.
    pub fn load_with(path: &Path, lazy: bool) -> Result<Self> {
        let kind = detect(path)?;
        if lazy {
            let (config, src) = open_source(path, kind)?;
            let src: Arc<dyn WeightSource + Send + Sync> = Arc::new(src);
            let model = LlamaModel::from_source_lazy(config, src.clone())?;
            let mut others = BTreeMap::new();
            for name in src.names() {
                if !is_block_linear_weight(&name) {
                    // the embeddings are the largest: share the model's copy
                    let t = if name == "model.embed_tokens.weight" {
                        model.embed_weight().clone()
                    } else {
                        src.load(&name)?
                    };
                    others.insert(name, t);
                }
            }
            let tokenizer = LlamaTokenizer::load(path)?;
            return Ok(Self {
                path: path.to_path_buf(),
                kind,
                model,
                others,
                tokenizer,
            });
        }
        let (config, src) = open_source(path, kind)?;
        let mut tensors = BTreeMap::new();
        for name in src.names() {
            let t = src.load(&name)?;
            tensors.insert(name, t);
        }
        drop(src);
        let model = LlamaModel::from_source(
            config,
            &MapSource {
                path: path.to_path_buf(),
                tensors: &tensors,
            },
        )?;
        let others = tensors
            .into_iter()
            .filter(|(n, _)| !is_block_linear_weight(n))
            .collect();
        let tokenizer = LlamaTokenizer::load(path)?;
        Ok(Self {
            path: path.to_path_buf(),
            kind,
            model,
            others,
            tokenizer,
        })
    }
}

impl SourceModel {
    /// Rotates the model ([`quantlab_models::rotate::rotate_model`]: norms folded, R1 on
    /// the residual stream, R2 on each head's values) and brings [`SourceModel::others`] in
    /// line with it: the rotated embeddings, unit norms, the output head as its own
    /// `lm_head.weight`, and the rotated biases, so every export writes the rotated model.
    pub fn rotate(
        &mut self,
        kind: quantlab_models::rotate::RotationKind,
        seed: u64,
    ) -> Result<quantlab_models::rotate::RotationFacts> {
        let facts = quantlab_models::rotate::rotate_model(&mut self.model, kind, seed)?;
        let m = &self.model;
        let fmt_err = |name: &str, e: candle_core::Error| PipelineError::Format {
            path: name.to_string(),
            detail: e.to_string(),
        };
        self.others
            .insert("model.embed_tokens.weight".into(), m.embed_weight().clone());
        for (name, v) in m.norm_weights() {
            let t = Tensor::from_vec(v.clone(), v.len(), &candle_core::Device::Cpu)
                .map_err(|e| fmt_err(&name, e))?;
            self.others.insert(name, t);
        }
        self.others
            .insert("lm_head.weight".into(), m.linear("lm_head")?.weight()?);
        let biases: Vec<String> = self
            .others
            .keys()
            .filter(|n| n.ends_with(".bias"))
            .cloned()
            .collect();
        for name in biases {
            let lin = name.strip_suffix(".bias").unwrap_or(&name);
            if let Ok(l) = m.linear(lin) {
                if let Some(b) = l.bias() {
                    self.others.insert(name, b);
                }
            }
        }
        Ok(facts)
    }
}

/// Whether `path` is a directory whose `config.json` describes a BERT model
/// (`model_type: "bert"` or a `Bert*` architecture).
pub fn is_bert_dir(path: &Path) -> bool {
    let Ok(s) = std::fs::read_to_string(path.join("config.json")) else {
        return false;
    };
    let Ok(v) = serde_json::from_str::<serde_json::Value>(&s) else {
        return false;
    };
    v.get("model_type").and_then(serde_json::Value::as_str) == Some("bert")
        || v.get("architectures")
            .and_then(serde_json::Value::as_array)
            .is_some_and(|a| {
                a.iter()
                    .any(|x| x.as_str().is_some_and(|s| s.starts_with("Bert")))
            })
}
