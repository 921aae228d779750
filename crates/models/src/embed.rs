//! Sentence embeddings from a sentence-transformers directory, and `eval embed`: throughput
//! and agreement (mean cosine similarity) of a model's embeddings with a reference model's.

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{Device, Tensor};
use tokenizers::{Tokenizer, TruncationParams};

use crate::bert::{l2_normalize, mean_pool, BertModel};
use crate::text::{read_text, split_sentences};
use crate::{ModelError, Result};

/// How token states become one sentence vector (sentence-transformers' `1_Pooling`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pooling {
    /// Mean over the real tokens (`pooling_mode_mean_tokens`).
    Mean,
    /// The first (`[CLS]`) token (`pooling_mode_cls_token`).
    Cls,
}

/// A BERT model with its tokenizer and the sentence-transformers head (pooling, optional
/// normalisation), read from a model directory.
#[derive(Debug)]
pub struct SentenceEncoder {
    model: BertModel,
    tokenizer: Tokenizer,
    dir: PathBuf,
    max_len: usize,
    pooling: Pooling,
    normalize: bool,
}

/// The default truncation length (sentence-transformers' `max_seq_length` of
/// all-MiniLM-L6-v2), used when `sentence_bert_config.json` is absent.
pub const DEFAULT_MAX_LEN: usize = 256;

impl SentenceEncoder {
    /// Loads `config.json`, `model.safetensors`, `tokenizer.json` and, when present,
    /// `sentence_bert_config.json` (`max_seq_length`), `modules.json` (a `Normalize` module)
    /// and `1_Pooling/config.json` (mean or CLS pooling). Without `modules.json` the head is
    /// mean pooling followed by L2 normalisation.
    pub fn load(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        let model = BertModel::load(&dir)?;
        let tok_path = dir.join("tokenizer.json");
        if !tok_path.is_file() {
            return Err(ModelError::MissingTokenizer {
                path: dir.display().to_string(),
                detail: format!("{} does not exist", tok_path.display()),
            });
        }
        let mut tokenizer = Tokenizer::from_file(&tok_path).map_err(|e| ModelError::Tokenizer {
            path: tok_path.display().to_string(),
            detail: e.to_string(),
        })?;
        let read_json = |p: &Path| -> Result<Option<serde_json::Value>> {
            if !p.is_file() {
                return Ok(None);
            }
            let text = std::fs::read_to_string(p).map_err(|e| ModelError::Io {
                path: p.display().to_string(),
                source: e,
            })?;
            serde_json::from_str(&text)
                .map(Some)
                .map_err(|e| ModelError::Config {
                    path: p.display().to_string(),
                    detail: format!("not JSON: {e}"),
                })
        };
        let mut max_len = read_json(&dir.join("sentence_bert_config.json"))?
            .and_then(|v| v.get("max_seq_length").and_then(|m| m.as_u64()))
            .map(|m| m as usize)
            .unwrap_or(DEFAULT_MAX_LEN);
        max_len = max_len.min(model.config().max_position_embeddings);
        let mut normalize = true;
        let mut pooling = Pooling::Mean;
        if let Some(modules) = read_json(&dir.join("modules.json"))? {
            let types: Vec<(String, String)> = modules
                .as_array()
                .map(|a| {
                    a.iter()
                        .map(|m| {
                            let s = |k: &str| {
                                m.get(k)
                                    .and_then(|v| v.as_str())
                                    .unwrap_or_default()
                                    .to_string()
                            };
                            (s("type"), s("path"))
                        })
                        .collect()
                })
                .unwrap_or_default();
            normalize = types.iter().any(|(t, _)| t.ends_with(".Normalize"));
            if let Some((_, p)) = types.iter().find(|(t, _)| t.ends_with(".Pooling")) {
                let pc = dir.join(p).join("config.json");
                if let Some(cfg) = read_json(&pc)? {
                    let flag = |k: &str| cfg.get(k).and_then(|v| v.as_bool()).unwrap_or(false);
                    pooling = if flag("pooling_mode_mean_tokens") {
                        Pooling::Mean
                    } else if flag("pooling_mode_cls_token") {
                        Pooling::Cls
                    } else {
                        return Err(ModelError::Config {
                            path: pc.display().to_string(),
                            detail: "only mean-token or CLS pooling is supported".into(),
                        });
                    };
                }
            }
        }
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: max_len,
                ..Default::default()
            }))
            .map_err(|e| ModelError::Tokenizer {
                path: tok_path.display().to_string(),
                detail: e.to_string(),
            })?;
        tokenizer.with_padding(None);
        Ok(SentenceEncoder {
            model,
            tokenizer,
            dir,
            max_len,
            pooling,
            normalize,
        })
    }

    /// The encoder.
    pub fn model(&self) -> &BertModel {
        &self.model
    }

    /// The encoder, mutably (to replace linears).
    pub fn model_mut(&mut self) -> &mut BertModel {
        &mut self.model
    }

    /// The model directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Truncation length in tokens, special tokens included.
    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// Sets the truncation length (at most `max_position_embeddings`).
    pub fn set_max_len(&mut self, max_len: usize) -> Result<()> {
        let cap = self.model.config().max_position_embeddings;
        if max_len < 2 || max_len > cap {
            return Err(ModelError::InvalidOption {
                option: "max_len".into(),
                detail: format!("{max_len} is outside 2..={cap}"),
            });
        }
        self.tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: max_len,
                ..Default::default()
            }))
            .map_err(|e| ModelError::Tokenizer {
                path: self.dir.display().to_string(),
                detail: e.to_string(),
            })?;
        self.max_len = max_len;
        Ok(())
    }

    /// Token ids of each text, with `[CLS]`/`[SEP]`, truncated to [`Self::max_len`].
    pub fn tokenize(&self, texts: &[&str]) -> Result<Vec<Vec<u32>>> {
        texts
            .iter()
            .map(|t| {
                self.tokenizer
                    .encode(*t, true)
                    .map(|e| e.get_ids().to_vec())
                    .map_err(|e| ModelError::Tokenizer {
                        path: self.dir.display().to_string(),
                        detail: e.to_string(),
                    })
            })
            .collect()
    }

    /// Embeddings of one batch of token-id sequences (padded with the pad id to the
    /// longest), one vector per sequence.
    pub fn embed_ids(&self, ids: &[Vec<u32>]) -> Result<Vec<Vec<f32>>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let b = ids.len();
        let t = ids.iter().map(|s| s.len()).max().unwrap_or(0).max(1);
        let pad = self.model.config().pad_token_id;
        let mut flat = vec![pad; b * t];
        let mut mask = vec![0u32; b * t];
        for (i, s) in ids.iter().enumerate() {
            flat[i * t..i * t + s.len()].copy_from_slice(s);
            mask[i * t..i * t + s.len()].iter_mut().for_each(|m| *m = 1);
        }
        let ids_t = Tensor::from_vec(flat, (b, t), &Device::Cpu)?;
        let mask_t = Tensor::from_vec(mask, (b, t), &Device::Cpu)?;
        let hs = self.model.forward(&ids_t, &mask_t)?;
        let mut pooled = match self.pooling {
            Pooling::Mean => mean_pool(&hs, &mask_t)?,
            Pooling::Cls => hs.narrow(1, 0, 1)?.squeeze(1)?,
        };
        if self.normalize {
            pooled = l2_normalize(&pooled)?;
        }
        Ok(pooled.to_vec2()?)
    }

    /// Embeddings of `texts`, in order, computed in batches of `batch_size` texts of similar
    /// length (sorted by token count to limit padding).
    ///
    /// ```no_run
    /// # fn main() -> quantlab_models::Result<()> {
    /// let enc = quantlab_models::embed::SentenceEncoder::load("/root/.cache/quantlab/minilm")?;
    /// let e = enc.encode(&["A cat sat.", "A cat was sitting."], 32)?;
    /// let cos: f32 = e[0].iter().zip(&e[1]).map(|(a, b)| a * b).sum();
    /// assert!(cos > 0.5);
    /// # Ok(()) }
    /// ```
    pub fn encode(&self, texts: &[&str], batch_size: usize) -> Result<Vec<Vec<f32>>> {
        let ids = self.tokenize(texts)?;
        self.encode_tokenized(&ids, batch_size)
    }

    fn encode_tokenized(&self, ids: &[Vec<u32>], batch_size: usize) -> Result<Vec<Vec<f32>>> {
        let bs = batch_size.max(1);
        let mut order: Vec<usize> = (0..ids.len()).collect();
        order.sort_by_key(|&i| ids[i].len());
        let mut out = vec![Vec::new(); ids.len()];
        for chunk in order.chunks(bs) {
            let batch: Vec<Vec<u32>> = chunk.iter().map(|&i| ids[i].clone()).collect();
            for (&i, e) in chunk.iter().zip(self.embed_ids(&batch)?) {
                out[i] = e;
            }
        }
        Ok(out)
    }
}

/// Options of [`eval_embed`].
#[derive(Clone, Debug)]
pub struct EmbedOptions {
    /// Sentences per forward batch (default 32).
    pub batch_size: usize,
    /// Truncation length in tokens; `None` keeps the model's (`max_seq_length`, else 256,
    /// capped by `max_position_embeddings`).
    pub max_len: Option<usize>,
    /// Embed only the first `limit` sentences.
    pub limit: Option<usize>,
    /// Field or column for `.jsonl` / `.parquet` texts (default `"text"`).
    pub field: Option<String>,
}

impl Default for EmbedOptions {
    fn default() -> Self {
        EmbedOptions {
            batch_size: 32,
            max_len: None,
            limit: None,
            field: None,
        }
    }
}

/// What [`eval_embed`] measured.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct EmbedReport {
    /// The model evaluated.
    pub model: String,
    /// The text file.
    pub text: String,
    /// The reference model, if any.
    pub reference: Option<String>,
    /// Sentences embedded.
    pub sentences: usize,
    /// Tokens embedded (special tokens included, after truncation).
    pub tokens: usize,
    /// Truncation length used.
    pub max_len: usize,
    /// Wall-clock seconds to tokenize and embed every sentence with the model (the
    /// reference's time is not counted).
    pub seconds: f64,
    /// `sentences / seconds`.
    pub sentences_per_s: f64,
    /// Mean over sentences of the cosine similarity between the model's and the reference's
    /// embeddings.
    pub mean_cosine: Option<f64>,
    /// The smallest of those cosine similarities.
    pub min_cosine: Option<f64>,
}

impl std::fmt::Display for EmbedReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} sentences ({} tokens, max {} per sentence) in {:.2} s: {:.1} sentences/s",
            self.sentences, self.tokens, self.max_len, self.seconds, self.sentences_per_s
        )?;
        if let (Some(m), Some(n), Some(r)) = (self.mean_cosine, self.min_cosine, &self.reference) {
            write!(f, "\ncosine vs {r}: mean {m:.6}, min {n:.6}")?;
        }
        Ok(())
    }
}

/// Cosine similarity of two vectors (0 when either is zero).
///
/// ```
/// let c = quantlab_models::embed::cosine(&[1.0, 0.0], &[1.0, 1.0]);
/// assert!((c - std::f64::consts::FRAC_1_SQRT_2).abs() < 1e-12);
/// ```
pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let (mut ab, mut aa, mut bb) = (0f64, 0f64, 0f64);
    for (&x, &y) in a.iter().zip(b) {
        let (x, y) = (x as f64, y as f64);
        ab += x * y;
        aa += x * x;
        bb += y * y;
    }
    if aa == 0.0 || bb == 0.0 {
        0.0
    } else {
        ab / (aa.sqrt() * bb.sqrt())
    }
}

/// `eval embed`: read `text_file` ([`read_text`]), split it into sentences
/// ([`split_sentences`]: paragraphs at blank lines, sentences at `.`/`!`/`?` followed by
/// white space and a non-lower-case character), embed them with the model in `model_dir`
/// (batched, truncated to the model's maximum), time it, and, with a `reference` model
/// directory, compare every embedding with the reference's by cosine similarity.
///
/// ```no_run
/// use quantlab_models::embed::{eval_embed, EmbedOptions};
/// let dir = std::path::Path::new("/root/.cache/quantlab/minilm");
/// let text = quantlab_models::text::shipped_eval();
/// let r = eval_embed(dir, &text, Some(dir), &EmbedOptions::default()).unwrap();
/// assert!((r.mean_cosine.unwrap() - 1.0).abs() < 1e-6);
/// ```
pub fn eval_embed(
    model_dir: &Path,
    text_file: &Path,
    reference: Option<&Path>,
    opts: &EmbedOptions,
) -> Result<EmbedReport> {
    let text = read_text(text_file, opts.field.as_deref())?;
    let mut sentences = split_sentences(&text);
    if let Some(n) = opts.limit {
        sentences.truncate(n);
    }
    if sentences.is_empty() {
        return Err(ModelError::Text {
            path: text_file.display().to_string(),
            detail: "no sentence to embed (the text is empty)".into(),
        });
    }
    let refs: Vec<&str> = sentences.iter().map(|s| s.as_str()).collect();
    let mut enc = SentenceEncoder::load(model_dir)?;
    if let Some(m) = opts.max_len {
        enc.set_max_len(m)?;
    }
    let start = Instant::now();
    let ids = enc.tokenize(&refs)?;
    let emb = enc.encode_tokenized(&ids, opts.batch_size)?;
    let seconds = start.elapsed().as_secs_f64();
    let tokens = ids.iter().map(|s| s.len()).sum();
    let (mean_cosine, min_cosine) = match reference {
        Some(r) => {
            let mut renc = SentenceEncoder::load(r)?;
            renc.set_max_len(enc.max_len())?;
            let remb = renc.encode(&refs, opts.batch_size)?;
            let cos: Vec<f64> = emb.iter().zip(&remb).map(|(a, b)| cosine(a, b)).collect();
            let mean = cos.iter().sum::<f64>() / cos.len() as f64;
            let min = cos.iter().cloned().fold(f64::INFINITY, f64::min);
            (Some(mean), Some(min))
        }
        None => (None, None),
    };
    Ok(EmbedReport {
        model: model_dir.display().to_string(),
        text: text_file.display().to_string(),
        reference: reference.map(|r| r.display().to_string()),
        sentences: sentences.len(),
        tokens,
        max_len: enc.max_len(),
        seconds,
        sentences_per_s: sentences.len() as f64 / seconds.max(1e-12),
        mean_cosine,
        min_cosine,
    })
}
