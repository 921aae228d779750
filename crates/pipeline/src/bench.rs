//! `quantlab bench quantize`: one whole-model quantization job timed phase by phase (load,
//! forward, Hessian, solve, AWQ search, save), its peak memory, and this machine's f32 GEMM
//! rate measured in the same process on the model's own MLP shape, so that each phase's
//! speed can be read against what the machine gives. Also a synthetic LLaMA with random
//! weights at any shape ([`SyntheticLlama`], e.g. a 1B model's), written as a Hugging Face
//! directory, for scale runs without downloading a model.

use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::time::Instant;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use safetensors::Dtype;
use serde::Serialize;
use serde_json::json;

use crate::job::QuantizeJob;
use crate::run;
use crate::save::{write_streamed, Streamed};
use crate::source::read_config;
use crate::{PipelineError, Result};

/// Seconds per phase of a job.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct Phases {
    /// Reading the model (and, with `--lazy`, mapping it).
    pub load: f64,
    /// Tokenizing the calibration text and drawing its windows.
    pub calibration: f64,
    /// Embedding and block forwards over the calibration windows.
    pub forward: f64,
    /// Accumulating the Hessians (and AWQ's statistics) from the captured inputs.
    pub hessian: f64,
    /// The layer solvers (GPTQ, RTN, AWQ's final rounding) and the error measurement.
    pub solve: f64,
    /// AWQ's scale and clip searches (their forwards included).
    pub awq_search: f64,
    /// Writing the checkpoint.
    pub save: f64,
}

/// What `quantlab bench quantize --json` prints.
#[derive(Clone, Debug, Serialize)]
pub struct QuantizeBench {
    /// The model path.
    pub model: String,
    /// The method's name.
    pub method: String,
    /// The output format's name.
    pub format: String,
    /// Calibration windows and their length.
    pub nsamples: usize,
    /// Tokens per calibration window.
    pub seqlen: usize,
    /// Calibration tokens in all (0 for a data-free run).
    pub calibration_tokens: usize,
    /// Low-memory mode.
    pub lazy: bool,
    /// Worker threads (rayon).
    pub threads: usize,
    /// Seconds per phase.
    pub phases: Phases,
    /// `phases.load`, repeated at the top level as the issue's JSON names it.
    pub load: f64,
    /// `phases.forward`.
    pub forward: f64,
    /// `phases.hessian`.
    pub hessian: f64,
    /// `phases.solve`.
    pub solve: f64,
    /// `phases.save`.
    pub save: f64,
    /// The whole job, wall clock (every phase and what lies between them).
    pub total_seconds: f64,
    /// Peak resident memory of the process (VmHWM), MB.
    pub peak_rss_mb: Option<f64>,
    /// This machine's f32 GEMM rate, GFLOP/s, through the forward's own product on
    /// `gemm_shape`, measured in this process after the job.
    pub gemm_gflops: f64,
    /// `[m, k, n]` of that product: one forward mini-batch's rows, hidden size,
    /// intermediate size (the shape of `gate_proj` / `up_proj`).
    pub gemm_shape: [usize; 3],
    /// FLOPs of one forward of every block over the calibration tokens (linears and
    /// attention), the work a true-sequential GPTQ run does in `forward`.
    pub forward_flops: f64,
    /// `forward_flops / forward` for one-forward-per-block methods (gptq, awq+gptq's GPTQ
    /// part excluded), GFLOP/s; `None` where the forward phase runs other work.
    pub forward_gflops: Option<f64>,
    /// `forward_gflops / gemm_gflops`.
    pub forward_vs_gemm: Option<f64>,
    /// Hessian FLOPs (`d^2 t` per distinct input, the lower triangle of `X^T X`) over
    /// `hessian` seconds, GFLOP/s.
    pub hessian_gflops: Option<f64>,
    /// With `eval_pass`: the perplexity evaluation's speed on the float model in the same
    /// process (windows of `seqlen` tokens of the shipped evaluation text, at most
    /// `nsamples` of them), tokens/s.
    pub eval_tokens_per_second: Option<f64>,
    /// `calibration_tokens / eval_tokens_per_second`: one evaluation pass over as many
    /// tokens as the calibration, seconds.
    pub eval_pass_seconds: Option<f64>,
    /// `total_seconds / eval_pass_seconds`.
    pub quantize_vs_eval: Option<f64>,
}

impl QuantizeBench {
    /// A readable table.
    pub fn table(&self) -> String {
        let p = &self.phases;
        let mut s = format!(
            "bench quantize: {} --method {} --format {} ({} x {} calibration tokens{}, {} threads)\n",
            self.model,
            self.method,
            self.format,
            self.nsamples,
            self.seqlen,
            if self.lazy { ", --lazy" } else { "" },
            self.threads
        );
        for (name, v) in [
            ("load", p.load),
            ("calibration", p.calibration),
            ("forward", p.forward),
            ("hessian", p.hessian),
            ("solve", p.solve),
            ("awq_search", p.awq_search),
            ("save", p.save),
        ] {
            s.push_str(&format!("  {name:<12} {v:9.2} s\n"));
        }
        s.push_str(&format!("  {:<12} {:9.2} s\n", "total", self.total_seconds));
        if let Some(m) = self.peak_rss_mb {
            s.push_str(&format!("  peak RSS     {m:9.0} MB\n"));
        }
        s.push_str(&format!(
            "  f32 GEMM     {:9.1} GFLOP/s ({} x {} x {}, the forward's product)\n",
            self.gemm_gflops, self.gemm_shape[0], self.gemm_shape[1], self.gemm_shape[2]
        ));
        if let (Some(f), Some(r)) = (self.forward_gflops, self.forward_vs_gemm) {
            s.push_str(&format!(
                "  forward      {f:9.1} GFLOP/s ({:.0}% of GEMM)\n",
                100.0 * r
            ));
        }
        if let Some(h) = self.hessian_gflops {
            s.push_str(&format!("  hessian      {h:9.1} GFLOP/s\n"));
        }
        if let (Some(v), Some(e), Some(r)) = (
            self.eval_tokens_per_second,
            self.eval_pass_seconds,
            self.quantize_vs_eval,
        ) {
            s.push_str(&format!(
                "  eval         {v:9.0} tokens/s: one pass over the calibration's tokens {e:.1} s; quantize = {r:.2}x that\n"
            ));
        }
        s
    }
}

/// Runs `job` once, writing its checkpoint into a temporary path in the system's temporary
/// directory that is removed afterwards, and times it. With `eval_pass`, first times a
/// perplexity evaluation of the float model (see [`QuantizeBench::eval_pass_seconds`]).
pub fn bench_quantize(job: &QuantizeJob, eval_pass: bool) -> Result<QuantizeBench> {
    let mc = read_config(&job.model)?;
    let c = &job.config;
    let eval_tps = if eval_pass {
        let src = crate::source::SourceModel::load_with(&job.model, c.lazy)?;
        let text = quantlab_models::text::read_text(&quantlab_models::text::shipped_eval(), None)?;
        let ids = src.tokenizer.encode(&text)?;
        let r = quantlab_models::perplexity(
            &src.model,
            &ids,
            &quantlab_models::PplParams {
                ctx: c.seqlen.max(2),
                max_windows: Some(c.nsamples.max(1)),
            },
        )?;
        Some(r.tokens_per_second)
    } else {
        None
    };
    let scratch = scratch_path(c.format.writes_file());
    let mut job = job.clone();
    job.out = Some(scratch.clone());
    job.overwrite = true;
    job.eval = None;
    let t0 = Instant::now();
    let r = run(&job, None);
    let total_seconds = t0.elapsed().as_secs_f64();
    let _ = std::fs::remove_dir_all(&scratch);
    let _ = std::fs::remove_file(&scratch);
    let report = r?;
    let peak_rss_mb = quantlab_models::peak_rss_mb();
    let rows = c.batch_size.clamp(1, c.nsamples.max(1)) * c.seqlen;
    let gemm_shape = [rows, mc.hidden_size, mc.intermediate_size];
    let (gemm_gflops, _) =
        quantlab_models::gemm_gflops(rows, mc.hidden_size, mc.intermediate_size, 3);

    let tokens = report.calibration.tokens;
    let (d, f) = (mc.hidden_size as f64, mc.intermediate_size as f64);
    let (qo, kvo) = (
        (mc.num_attention_heads * mc.head_dim) as f64,
        (mc.num_key_value_heads * mc.head_dim) as f64,
    );
    let linear_per_token = 2.0 * (d * qo + 2.0 * d * kvo + qo * d + 3.0 * d * f);
    // causal attention: q k^T and p v over the visible half of each window
    let attn_per_token = 2.0 * 2.0 * qo * c.seqlen as f64 / 2.0;
    let blocks = mc.num_hidden_layers as f64;
    let forward_flops = (linear_per_token + attn_per_token) * tokens as f64 * blocks;
    let t = &report.timings;
    let one_forward = !c.method.uses_awq() && c.method.true_sequential();
    let forward_gflops = (one_forward && t.forward > 0.0).then(|| forward_flops / t.forward / 1e9);
    let hess_flops = (3.0 * d * d + f * f) * tokens as f64 * blocks;
    let hessian_gflops = (tokens > 0 && t.hessian > 0.0 && !c.method.uses_awq())
        .then(|| hess_flops / t.hessian / 1e9);
    let phases = Phases {
        load: report.job_timings.load,
        calibration: report.job_timings.calibration,
        forward: t.forward,
        hessian: t.hessian,
        solve: t.solver,
        awq_search: t.awq_search,
        save: report.job_timings.save,
    };
    Ok(QuantizeBench {
        model: job.model.display().to_string(),
        method: c.method.name().into(),
        format: c.format.name(),
        nsamples: report.calibration.nsamples,
        seqlen: report.calibration.seqlen,
        calibration_tokens: tokens,
        lazy: c.lazy,
        threads: rayon::current_num_threads(),
        load: phases.load,
        forward: phases.forward,
        hessian: phases.hessian,
        solve: phases.solve,
        save: phases.save,
        phases,
        total_seconds,
        peak_rss_mb,
        gemm_gflops,
        gemm_shape,
        forward_flops,
        forward_gflops,
        forward_vs_gemm: forward_gflops.map(|g| g / gemm_gflops),
        hessian_gflops,
        eval_tokens_per_second: eval_tps,
        eval_pass_seconds: eval_tps.map(|v| tokens as f64 / v),
        quantize_vs_eval: eval_tps.map(|v| total_seconds / (tokens as f64 / v)),
    })
}

fn scratch_path(file: bool) -> PathBuf {
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    std::env::temp_dir().join(format!(
        "quantlab-bench-{}-{stamp}{}",
        std::process::id(),
        if file { ".gguf" } else { "" }
    ))
}

/// The shape of a synthetic LLaMA with random weights (bf16 on disk).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SyntheticLlama {
    /// `hidden_size`.
    pub hidden: usize,
    /// `intermediate_size`.
    pub intermediate: usize,
    /// `num_hidden_layers`.
    pub layers: usize,
    /// `num_attention_heads`.
    pub heads: usize,
    /// `num_key_value_heads`.
    pub kv_heads: usize,
    /// `vocab_size` (the tokenizer is byte-level: only ids below 256 occur in text).
    pub vocab: usize,
}

impl SyntheticLlama {
    /// A 1B model's shape (Llama 3.2 1B): hidden 2048, intermediate 8192, 16 layers, 32
    /// heads, 8 KV heads, vocabulary 128256, tied embeddings.
    pub fn one_b() -> Self {
        Self {
            hidden: 2048,
            intermediate: 8192,
            layers: 16,
            heads: 32,
            kv_heads: 8,
            vocab: 128_256,
        }
    }

    /// Parses `synthetic:1b` or `synthetic:HIDDEN,INTERMEDIATE,LAYERS[,HEADS,KV_HEADS]`.
    ///
    /// ```
    /// use quantlab_pipeline::bench::SyntheticLlama;
    /// assert_eq!(SyntheticLlama::parse("synthetic:1b").unwrap().unwrap().hidden, 2048);
    /// let s = SyntheticLlama::parse("synthetic:256,512,2,4,2").unwrap().unwrap();
    /// assert_eq!((s.intermediate, s.layers, s.kv_heads), (512, 2, 2));
    /// assert!(SyntheticLlama::parse("model.gguf").unwrap().is_none());
    /// assert!(SyntheticLlama::parse("synthetic:7,7").is_err());
    /// ```
    pub fn parse(s: &str) -> Result<Option<Self>> {
        let Some(spec) = s.strip_prefix("synthetic:") else {
            return Ok(None);
        };
        if spec.eq_ignore_ascii_case("1b") {
            return Ok(Some(Self::one_b()));
        }
        let bad = || {
            PipelineError::option(
                "--model",
                format!("`{s}`: use synthetic:1b or synthetic:HIDDEN,INTERMEDIATE,LAYERS[,HEADS,KV_HEADS]"),
            )
        };
        let v: Vec<usize> = spec
            .split(',')
            .map(|x| x.trim().parse().map_err(|_| bad()))
            .collect::<Result<_>>()?;
        let (hidden, intermediate, layers) = match v[..] {
            [h, i, l] | [h, i, l, _, _] => (h, i, l),
            _ => return Err(bad()),
        };
        let (heads, kv_heads) = match v[..] {
            [_, _, _, h, k] => (h, k),
            _ => ((hidden / 64).max(1), (hidden / 256).max(1)),
        };
        if hidden == 0
            || intermediate == 0
            || layers == 0
            || heads == 0
            || kv_heads == 0
            || hidden % heads != 0
            || heads % kv_heads != 0
            || (hidden / heads) % 2 != 0
        {
            return Err(PipelineError::option(
                "--model",
                format!("`{s}`: sizes must be positive, hidden a multiple of heads (even head size), heads a multiple of KV heads"),
            ));
        }
        Ok(Some(Self {
            hidden,
            intermediate,
            layers,
            heads,
            kv_heads,
            vocab: 128_256,
        }))
    }

    /// Parameters in all (tied embeddings).
    pub fn parameters(&self) -> u64 {
        let (d, f, hd) = (
            self.hidden as u64,
            self.intermediate as u64,
            (self.hidden / self.heads) as u64,
        );
        let kv = self.kv_heads as u64 * hd;
        let block = 2 * d * d + 2 * d * kv + 3 * d * f + 2 * d;
        self.vocab as u64 * d + self.layers as u64 * block + d
    }

    /// Writes a Hugging Face directory (`config.json`, `tokenizer.json` byte-level BPE,
    /// `model.safetensors` in bf16, one tensor in memory at a time) with weights drawn
    /// uniformly with the standard deviation of a `1/sqrt(fan_in)` initialisation, norms 1.
    /// Written atomically (temporary directory, then rename).
    pub fn write_hf_dir(&self, dir: &Path, seed: u64) -> Result<()> {
        let tmp = dir.with_extension("tmp-synthetic");
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(|e| PipelineError::io(&tmp, e))?;
        }
        std::fs::create_dir_all(&tmp).map_err(|e| PipelineError::io(&tmp, e))?;
        let r = self.write_into(&tmp, seed).and_then(|()| {
            if dir.exists() {
                std::fs::remove_dir_all(dir).map_err(|e| PipelineError::io(dir, e))?;
            }
            std::fs::rename(&tmp, dir).map_err(|e| PipelineError::io(dir, e))
        });
        if r.is_err() {
            let _ = std::fs::remove_dir_all(&tmp);
        }
        r
    }

    fn write_into(&self, dir: &Path, seed: u64) -> Result<()> {
        let (d, f) = (self.hidden, self.intermediate);
        let hd = d / self.heads;
        let kv = self.kv_heads * hd;
        let config = json!({
            "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "hidden_size": d, "intermediate_size": f, "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads, "num_key_value_heads": self.kv_heads,
            "vocab_size": self.vocab, "rope_theta": 500000.0, "rms_norm_eps": 1e-5,
            "tie_word_embeddings": true, "hidden_act": "silu", "max_position_embeddings": 8192,
            "torch_dtype": "bfloat16", "quantlab_synthetic": true,
        });
        let p = dir.join("config.json");
        std::fs::write(&p, config.to_string()).map_err(|e| PipelineError::io(&p, e))?;
        let p = dir.join("tokenizer.json");
        byte_level_tokenizer()
            .save(&p, false)
            .map_err(|e| PipelineError::option("tokenizer", format!("{}: {e}", p.display())))?;
        let mut shapes: Vec<(String, Vec<usize>)> =
            vec![("model.embed_tokens.weight".into(), vec![self.vocab, d])];
        for l in 0..self.layers {
            let p = format!("model.layers.{l}");
            for (n, s) in [
                ("input_layernorm", vec![d]),
                ("post_attention_layernorm", vec![d]),
                ("self_attn.q_proj", vec![d, d]),
                ("self_attn.k_proj", vec![kv, d]),
                ("self_attn.v_proj", vec![kv, d]),
                ("self_attn.o_proj", vec![d, d]),
                ("mlp.gate_proj", vec![f, d]),
                ("mlp.up_proj", vec![f, d]),
                ("mlp.down_proj", vec![d, f]),
            ] {
                shapes.push((format!("{p}.{n}.weight"), s));
            }
        }
        shapes.push(("model.norm.weight".into(), vec![d]));
        let err = RefCell::new(None);
        let entries: Vec<(String, Streamed<'_>)> = shapes
            .into_iter()
            .enumerate()
            .map(|(i, (name, shape))| {
                let s = shape.clone();
                let norm = shape.len() == 1;
                let make = Box::new(move || -> Result<Vec<u8>> {
                    let n: usize = s.iter().product();
                    if norm {
                        return Ok(half::bf16::from_f32(1.0).to_le_bytes().repeat(n));
                    }
                    // uniform on [-a, a] has standard deviation a / sqrt(3)
                    let a = (3.0 / *s.last().expect("2-D") as f32).sqrt();
                    let mut rng = StdRng::seed_from_u64(
                        seed ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
                    );
                    let mut out = Vec::with_capacity(2 * n);
                    for _ in 0..n {
                        let v = (rng.random::<f32>() * 2.0 - 1.0) * a;
                        out.extend_from_slice(&half::bf16::from_f32(v).to_le_bytes());
                    }
                    Ok(out)
                }) as Box<dyn Fn() -> Result<Vec<u8>>>;
                (
                    name,
                    Streamed {
                        dtype: Dtype::BF16,
                        shape,
                        make,
                        err: &err,
                    },
                )
            })
            .collect();
        write_streamed(&dir.join("model.safetensors"), entries, &err)
    }
}

/// A byte-level BPE without merges (one token per byte, GPT-2's byte alphabet in sorted
/// order), with the ByteLevel pre-tokenizer and decoder: any text tokenizes, one id per byte.
fn byte_level_tokenizer() -> tokenizers::Tokenizer {
    use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
    use tokenizers::models::bpe::BPE;
    use tokenizers::pre_tokenizers::byte_level::ByteLevel;
    let mut alphabet: Vec<char> = ByteLevel::alphabet().into_iter().collect();
    alphabet.sort();
    let vocab: tokenizers::models::bpe::Vocab = alphabet
        .iter()
        .enumerate()
        .map(|(i, c)| (c.to_string(), i as u32))
        .collect();
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, vec![])
        .build()
        .expect("a BPE without merges builds");
    let mut tk = tokenizers::Tokenizer::new(bpe);
    tk.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
    tk.with_decoder(Some(ByteLevelDecoder::default()));
    tk
}
