//! KL divergence of a model's next-token distributions from a base model's, as llama.cpp's
//! users compare a quantized model with its source (`llama-perplexity --kl-divergence`).
//!
//! The text is cut into windows exactly as [`crate::ppl`] does (no BOS, `floor(len / ctx)`
//! non-overlapping windows of `ctx` tokens, every token but a window's first scored), so the
//! perplexities reported here equal [`crate::perplexity`]'s. At every scored position `t`,
//! with `P` the base model's and `Q` the model's next-token distribution (softmax of the
//! logits, computed in f64 from the f32 logits):
//!
//! * `KLD_t = sum_v P(v) (ln P(v) - ln Q(v))` (nats), reported as its mean with the
//!   standard error of the mean (`sd / sqrt(n)`), its median, 90th and 99th percentile
//!   (nearest rank) and maximum;
//! * top-1 agreement: the share of positions where both distributions have the same most
//!   likely token (the first index among equal maxima), with its standard error
//!   `sqrt(a (1 - a) / n)`;
//! * the perplexities of both models on the text's tokens and their ratio; the mean of
//!   `ln Q(x_t) - ln P(x_t)` is `ln(ppl / ppl_base)`.
//!
//! The base's log-probabilities can be stored once ([`save_base`], f16, as llama.cpp stores
//! its `--kl-divergence-base` file in 16 bits) and read back for every later comparison
//! ([`SavedBase`]); the file records the tokens it was computed on and is refused for any
//! other text or window length.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use half::f16;
use rayon::prelude::*;
use serde::Serialize;

use crate::llama::LlamaModel;
use crate::ppl::{self, PplParams};
use crate::{ModelError, Result};

/// The numbers [`kl_divergence`] reports.
#[derive(Clone, Debug, Serialize)]
pub struct KldReport {
    /// Mean KL divergence per scored token (nats).
    pub kld_mean: f64,
    /// Standard error of `kld_mean`.
    pub kld_err: f64,
    /// Median KL divergence.
    pub kld_median: f64,
    /// 90th percentile.
    pub kld_p90: f64,
    /// 99th percentile.
    pub kld_p99: f64,
    /// Largest KL divergence of a position.
    pub kld_max: f64,
    /// Share of positions where the most likely token is the same (0..1).
    pub top1_agreement: f64,
    /// Standard error of `top1_agreement`.
    pub top1_err: f64,
    /// Perplexity of the model.
    pub ppl: f64,
    /// Perplexity of the base.
    pub ppl_base: f64,
    /// `ppl / ppl_base`.
    pub ppl_ratio: f64,
    /// Mean of `ln Q(x_t) - ln P(x_t)` (= `ln ppl_ratio`).
    pub ln_ppl_ratio: f64,
    /// Standard error of `ln_ppl_ratio`.
    pub ln_ppl_ratio_err: f64,
    /// Positions scored, `windows * (ctx - 1)`.
    pub tokens_scored: usize,
    /// Windows evaluated.
    pub windows: usize,
    /// Tokens per window.
    pub ctx: usize,
    /// Wall seconds.
    pub seconds: f64,
}

/// Per-position statistics of one distribution pair.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Position {
    kld: f64,
    same_top1: bool,
    /// `-ln Q(x)`, `-ln P(x)` of the actual next token, as [`crate::perplexity`] computes
    /// them (so the perplexities here equal its figures bit for bit).
    nll: f64,
    nll_base: f64,
}

/// `ln softmax(row)` in f64.
fn log_softmax(row: &[f32]) -> Vec<f64> {
    let m = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
    let s: f64 = row.iter().map(|&v| (v as f64 - m).exp()).sum();
    let lse = m + s.ln();
    row.iter().map(|&v| v as f64 - lse).collect()
}

fn argmax<T: PartialOrd + Copy>(xs: &[T]) -> usize {
    let mut best = 0;
    for (i, &x) in xs.iter().enumerate() {
        if x > xs[best] {
            best = i;
        }
    }
    best
}

/// `(KLD, same top-1)` of one position from the base's log-probabilities and the model's
/// logits.
fn divergence(base_lp: &[f64], logits: &[f32]) -> (f64, bool) {
    let lq = log_softmax(logits);
    let kld = base_lp
        .iter()
        .zip(&lq)
        .map(|(&lp, &lq)| {
            if lp == f64::NEG_INFINITY {
                0.0
            } else {
                lp.exp() * (lp - lq)
            }
        })
        .sum::<f64>()
        .max(0.0);
    (kld, argmax(base_lp) == argmax(&lq))
}

/// Where the base distributions come from.
pub enum KldBase<'a> {
    /// A model run on the same windows.
    Model(&'a LlamaModel),
    /// Log-probabilities stored by [`save_base`].
    Saved(&'a SavedBase),
}

/// The logits of one window as a row-major vector and its next-token NLLs.
fn window_logits(model: &LlamaModel, win: &[u32]) -> Result<(Vec<f32>, Vec<f64>)> {
    let (logits, nll) = ppl::window_logits(model, win)?;
    Ok((logits.flatten_all()?.to_vec1::<f32>()?, nll))
}

/// KL divergence of `model` from `base` on `tokens` (see the module documentation).
pub fn kl_divergence(
    base: KldBase<'_>,
    model: &LlamaModel,
    tokens: &[u32],
    params: &PplParams,
) -> Result<KldReport> {
    let windows = ppl::window_count(tokens, params)?;
    let ctx = params.ctx;
    let vocab = model.config().vocab_size;
    if let KldBase::Saved(s) = &base {
        s.check(tokens, params, windows, vocab)?;
    }
    if let KldBase::Model(b) = &base {
        if b.config().vocab_size != vocab {
            return Err(ModelError::InvalidOption {
                option: "base".into(),
                detail: format!(
                    "the base model has a vocabulary of {} tokens, the model {vocab}",
                    b.config().vocab_size
                ),
            });
        }
    }
    let start = Instant::now();
    let mut pos: Vec<Position> = Vec::with_capacity(windows * (ctx - 1));
    let (mut total, mut total_base) = (0f64, 0f64);
    for w in 0..windows {
        let win = &tokens[w * ctx..(w + 1) * ctx];
        let (q, nll) = window_logits(model, win)?;
        let (base_lp, nll_base): (Vec<f64>, Vec<f64>) = match &base {
            KldBase::Model(b) => {
                let (l, n) = window_logits(b, win)?;
                (l.par_chunks(vocab).flat_map_iter(log_softmax).collect(), n)
            }
            KldBase::Saved(s) => s.window(w, ctx, vocab)?,
        };
        let per: Vec<(f64, bool)> = base_lp
            .par_chunks(vocab)
            .zip(q.par_chunks(vocab))
            .map(|(lp, lq)| divergence(lp, lq))
            .collect();
        // summed per window, then over windows, in perplexity()'s order
        total += nll.iter().sum::<f64>();
        total_base += nll_base.iter().sum::<f64>();
        pos.extend(per.into_iter().zip(nll.iter().zip(&nll_base)).map(
            |((kld, same_top1), (&nll, &nll_base))| Position {
                kld,
                same_top1,
                nll,
                nll_base,
            },
        ));
    }
    let n = pos.len() as f64;
    Ok(summarise(
        &pos,
        (total / n, total_base / n),
        windows,
        ctx,
        start.elapsed().as_secs_f64(),
    ))
}

fn mean_err(xs: impl Iterator<Item = f64> + Clone, n: usize) -> (f64, f64) {
    let nf = n as f64;
    let mean = xs.clone().sum::<f64>() / nf;
    if n < 2 {
        return (mean, 0.0);
    }
    let var = xs.map(|x| (x - mean) * (x - mean)).sum::<f64>() / (nf - 1.0);
    (mean, (var / nf).sqrt())
}

/// Nearest-rank percentile `p` (0..100) of sorted values.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    let n = sorted.len();
    let rank = ((p / 100.0) * n as f64).ceil() as usize;
    sorted[rank.clamp(1, n) - 1]
}

fn summarise(
    pos: &[Position],
    (nll, nll_base): (f64, f64),
    windows: usize,
    ctx: usize,
    seconds: f64,
) -> KldReport {
    let n = pos.len();
    let (kld_mean, kld_err) = mean_err(pos.iter().map(|p| p.kld), n);
    let mut sorted: Vec<f64> = pos.iter().map(|p| p.kld).collect();
    sorted.sort_by(f64::total_cmp);
    let median = if n % 2 == 1 {
        sorted[n / 2]
    } else {
        0.5 * (sorted[n / 2 - 1] + sorted[n / 2])
    };
    let agree = pos.iter().filter(|p| p.same_top1).count() as f64 / n as f64;
    let (ln_ratio, ln_ratio_err) = mean_err(pos.iter().map(|p| p.nll - p.nll_base), n);
    KldReport {
        kld_mean,
        kld_err,
        kld_median: median,
        kld_p90: percentile(&sorted, 90.0),
        kld_p99: percentile(&sorted, 99.0),
        kld_max: sorted[n - 1],
        top1_agreement: agree,
        top1_err: (agree * (1.0 - agree) / n as f64).sqrt(),
        ppl: nll.exp(),
        ppl_base: nll_base.exp(),
        ppl_ratio: (nll - nll_base).exp(),
        ln_ppl_ratio: ln_ratio,
        ln_ppl_ratio_err: ln_ratio_err,
        tokens_scored: n,
        windows,
        ctx,
        seconds,
    }
}

const FORMAT_TAG: &str = "quantlab-kld-base-1";

/// What [`save_base`] wrote.
#[derive(Clone, Debug, Serialize)]
pub struct SavedBaseFacts {
    /// The file.
    pub path: String,
    /// Windows stored.
    pub windows: usize,
    /// Tokens per window.
    pub ctx: usize,
    /// Vocabulary size.
    pub vocab: usize,
    /// Bytes written.
    pub bytes: u64,
    /// Perplexity of the base on these windows.
    pub ppl: f64,
}

/// Runs `model` on the windows of `tokens` and stores its log-probabilities at every
/// scored position as f16 in a safetensors file (`logprobs` `[windows * (ctx - 1), vocab]`,
/// `tokens` u32 `[windows * ctx]`, and the window length in the metadata), written to a
/// temporary path and renamed: `windows * (ctx - 1) * vocab * 2` bytes (804 MB for 16
/// windows of 512 on SmolLM2's 49152 tokens).
pub fn save_base(
    model: &LlamaModel,
    tokens: &[u32],
    params: &PplParams,
    path: &Path,
) -> Result<SavedBaseFacts> {
    let windows = ppl::window_count(tokens, params)?;
    let ctx = params.ctx;
    let vocab = model.config().vocab_size;
    let rows = windows * (ctx - 1);
    let lp_bytes = rows * vocab * 2;
    let tok_bytes = windows * ctx * 4;
    let nll_bytes = rows * 8;
    let (a, b) = (lp_bytes + tok_bytes, lp_bytes + tok_bytes + nll_bytes);
    let header = serde_json::json!({
        "__metadata__": {"format": FORMAT_TAG, "ctx": ctx.to_string(), "windows": windows.to_string()},
        "logprobs": {"dtype": "F16", "shape": [rows, vocab], "data_offsets": [0, lp_bytes]},
        "tokens": {"dtype": "U32", "shape": [windows * ctx], "data_offsets": [lp_bytes, a]},
        "nll": {"dtype": "F64", "shape": [rows], "data_offsets": [a, b]},
    });
    let mut h = serde_json::to_vec(&header).expect("json");
    while h.len() % 8 != 0 {
        h.push(b' ');
    }
    let io = |e: std::io::Error| ModelError::Io {
        path: path.display().to_string(),
        source: e,
    };
    let tmp = tmp_path(path);
    let result = (|| -> Result<f64> {
        let f = std::fs::File::create(&tmp).map_err(io)?;
        let mut f = std::io::BufWriter::with_capacity(1 << 20, f);
        f.write_all(&(h.len() as u64).to_le_bytes()).map_err(io)?;
        f.write_all(&h).map_err(io)?;
        let mut total = 0.0;
        let mut nlls = Vec::with_capacity(rows);
        for w in 0..windows {
            let win = &tokens[w * ctx..(w + 1) * ctx];
            let (logits, nll) = window_logits(model, win)?;
            let half: Vec<u8> = logits
                .par_chunks(vocab)
                .flat_map_iter(|row| {
                    log_softmax(row)
                        .into_iter()
                        .flat_map(|v| f16::from_f64(v).to_le_bytes())
                })
                .collect();
            f.write_all(&half).map_err(io)?;
            total += nll.iter().sum::<f64>();
            nlls.extend(nll);
        }
        for &t in &tokens[..windows * ctx] {
            f.write_all(&t.to_le_bytes()).map_err(io)?;
        }
        for v in &nlls {
            f.write_all(&v.to_le_bytes()).map_err(io)?;
        }
        f.into_inner()
            .map_err(|e| io(e.into_error()))?
            .sync_all()
            .map_err(io)?;
        Ok(total / rows as f64)
    })();
    match result {
        Ok(nll) => {
            std::fs::rename(&tmp, path).map_err(io)?;
            Ok(SavedBaseFacts {
                path: path.display().to_string(),
                windows,
                ctx,
                vocab,
                bytes: (8 + h.len() + b) as u64,
                ppl: nll.exp(),
            })
        }
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(e)
        }
    }
}

fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".tmp-{}", std::process::id()));
    path.with_file_name(name)
}

/// Base log-probabilities stored by [`save_base`], memory-mapped.
pub struct SavedBase {
    path: String,
    map: memmap2::Mmap,
    ctx: usize,
    windows: usize,
    vocab: usize,
    lp_start: usize,
    tokens: Vec<u32>,
    nll: Vec<f64>,
}

impl SavedBase {
    /// Opens and checks a file written by [`save_base`].
    pub fn open(path: &Path) -> Result<Self> {
        let p = path.display().to_string();
        let bad = |d: String| ModelError::InvalidOption {
            option: "base".into(),
            detail: format!("{p}: {d}"),
        };
        let f = std::fs::File::open(path).map_err(|e| ModelError::Io {
            path: p.clone(),
            source: e,
        })?;
        // SAFETY: read-only map of a file this process does not write.
        let map = unsafe { memmap2::Mmap::map(&f) }.map_err(|e| ModelError::Io {
            path: p.clone(),
            source: e,
        })?;
        let (n, meta) = safetensors::SafeTensors::read_metadata(&map)
            .map_err(|e| bad(format!("not a safetensors file ({e})")))?;
        let md = meta.metadata().clone().unwrap_or_default();
        if md.get("format").map(String::as_str) != Some(FORMAT_TAG) {
            return Err(bad(format!(
                "not a base written by `quantlab eval kld --save-base` (no `format: {FORMAT_TAG}` in its metadata)"
            )));
        }
        let num = |k: &str| -> Result<usize> {
            md.get(k)
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| bad(format!("metadata `{k}` missing or not a number")))
        };
        let (ctx, windows) = (num("ctx")?, num("windows")?);
        let st = safetensors::SafeTensors::deserialize(&map)
            .map_err(|e| bad(format!("unreadable ({e})")))?;
        let lp = st
            .tensor("logprobs")
            .map_err(|_| bad("no `logprobs` tensor".into()))?;
        let tk = st
            .tensor("tokens")
            .map_err(|_| bad("no `tokens` tensor".into()))?;
        let nl = st
            .tensor("nll")
            .map_err(|_| bad("no `nll` tensor".into()))?;
        let shape = lp.shape().to_vec();
        if lp.dtype() != safetensors::Dtype::F16
            || shape.len() != 2
            || ctx < 2
            || shape[0] != windows * (ctx - 1)
            || tk.dtype() != safetensors::Dtype::U32
            || tk.shape() != [windows * ctx]
            || nl.dtype() != safetensors::Dtype::F64
            || nl.shape() != [windows * (ctx - 1)]
        {
            return Err(bad(format!(
                "tensors do not match {windows} windows of {ctx} (logprobs {shape:?})"
            )));
        }
        let vocab = shape[1];
        let tokens = tk
            .data()
            .chunks_exact(4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        let nll = nl
            .data()
            .chunks_exact(8)
            .map(|b| f64::from_le_bytes(b.try_into().expect("8 bytes")))
            .collect();
        let lp_start = 8 + n + meta.info("logprobs").expect("checked").data_offsets.0;
        Ok(Self {
            path: p,
            map,
            ctx,
            windows,
            vocab,
            lp_start,
            tokens,
            nll,
        })
    }

    /// Windows stored.
    pub fn windows(&self) -> usize {
        self.windows
    }

    /// Tokens per window.
    pub fn ctx(&self) -> usize {
        self.ctx
    }

    fn check(
        &self,
        tokens: &[u32],
        params: &PplParams,
        windows: usize,
        vocab: usize,
    ) -> Result<()> {
        let bad = |d: String| {
            Err(ModelError::InvalidOption {
                option: "base".into(),
                detail: format!("{}: {d}", self.path),
            })
        };
        if params.ctx != self.ctx {
            return bad(format!(
                "stored with windows of {} tokens, asked for {}",
                self.ctx, params.ctx
            ));
        }
        if windows > self.windows {
            return bad(format!(
                "holds {} windows, {windows} asked for (use --max-windows {})",
                self.windows, self.windows
            ));
        }
        if vocab != self.vocab {
            return bad(format!(
                "a vocabulary of {} tokens, the model has {vocab}",
                self.vocab
            ));
        }
        if tokens[..windows * self.ctx] != self.tokens[..windows * self.ctx] {
            return bad("computed on another text (the tokens differ)".into());
        }
        Ok(())
    }

    /// Window `w`'s log-probabilities `[ctx - 1, vocab]` and next-token NLLs.
    fn window(&self, w: usize, ctx: usize, vocab: usize) -> Result<(Vec<f64>, Vec<f64>)> {
        let n = (ctx - 1) * vocab;
        let a = self.lp_start + w * n * 2;
        let bytes = &self.map[a..a + n * 2];
        let lp = bytes
            .par_chunks(2)
            .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f64())
            .collect();
        Ok((lp, self.nll[w * (ctx - 1)..(w + 1) * (ctx - 1)].to_vec()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kld_of_a_distribution_with_itself_is_zero_and_positive_otherwise() {
        let row = [0.5f32, -1.0, 2.0, 0.0];
        let lp = log_softmax(&row);
        let (k, same) = divergence(&lp, &row);
        assert!(k.abs() < 1e-15 && same);
        let other = [2.0f32, -1.0, 0.5, 0.0];
        let (k, same) = divergence(&lp, &other);
        // by hand: P = softmax(row), Q = softmax(other)
        let lq = log_softmax(&other);
        let want: f64 = (0..4).map(|i| lp[i].exp() * (lp[i] - lq[i])).sum();
        assert!((k - want).abs() < 1e-15 && k > 0.1);
        assert!(!same);
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 99.0), 99.0);
        assert_eq!(percentile(&v, 90.0), 90.0);
        assert_eq!(percentile(&[3.0], 99.0), 3.0);
    }
}
