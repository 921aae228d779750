//! `quantlab quantize`: quantize every linear of a LLaMA-style model's blocks and write the
//! project's checkpoint (docs/quantize.md).

use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, ValueEnum};
use quantlab::models::rotate::RotationKind;
use quantlab::pipeline::{
    self, AwqOptions, Calibration, CodebookOptions, EvalSpec, ExportFormat, GptqOptions,
    Int8Options, Method, MethodKind, Override, PipelineError, QuantizeConfig, QuantizeJob,
    Rotation,
};

/// The methods.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum MethodArg {
    /// Round to nearest on an integer grid.
    Rtn,
    /// GPTQ, true-sequential.
    Gptq,
    /// AWQ scale + clip search, then RTN.
    Awq,
    /// AWQ scaling, then GPTQ.
    #[value(name = "awq+gptq")]
    AwqGptq,
    /// NF4 codebook (bitsandbytes), absmax per group of 64.
    Nf4,
    /// FP4 codebook (bitsandbytes), absmax per group of 64.
    Fp4,
    /// LLM.int8(): absmax int8 per row.
    Int8,
    /// FP8 E4M3, one scale per output channel.
    Fp8,
}

impl From<MethodArg> for MethodKind {
    fn from(m: MethodArg) -> Self {
        match m {
            MethodArg::Rtn => MethodKind::Rtn,
            MethodArg::Gptq => MethodKind::Gptq,
            MethodArg::Awq => MethodKind::Awq,
            MethodArg::AwqGptq => MethodKind::AwqGptq,
            MethodArg::Nf4 => MethodKind::Nf4,
            MethodArg::Fp4 => MethodKind::Fp4,
            MethodArg::Int8 => MethodKind::Int8,
            MethodArg::Fp8 => MethodKind::Fp8,
        }
    }
}

/// The method of `--method` with the parameters its flags give; a flag of another method is
/// refused by name (GPTQ's flags with `rtn`, `--double-quant` with `int8`, ...).
fn method_of(a: &QuantizeArgs) -> pipeline::Result<Method> {
    let kind = MethodKind::from(a.method);
    let refuse = |flag: &str, d: String| Err(PipelineError::option(flag, d));
    if !kind.uses_gptq() {
        let gptq_only = [
            (a.act_order, "--act-order"),
            (a.static_groups, "--static-groups"),
            (a.damp.is_some(), "--damp"),
            (a.block_size.is_some(), "--block-size"),
            (a.hessian_shrink.is_some(), "--hessian-shrink"),
        ];
        if let Some((_, flag)) = gptq_only.iter().find(|(on, _)| *on) {
            return refuse(
                flag,
                format!("only GPTQ uses it (--method gptq or awq+gptq), not {kind}"),
            );
        }
    }
    if a.double_quant && !matches!(kind, MethodKind::Nf4 | MethodKind::Fp4) {
        return refuse(
            "--double-quant",
            format!("only nf4 and fp4 double-quantize their absmax, not {kind}"),
        );
    }
    if a.int8_threshold.is_some() && kind != MethodKind::Int8 {
        return refuse("--int8-threshold", format!("only int8 uses it, not {kind}"));
    }
    let defaults = GptqOptions::default();
    let gptq = GptqOptions {
        act_order: a.act_order,
        static_groups: a.static_groups,
        damp: a.damp.unwrap_or(defaults.damp),
        block_size: a.block_size.unwrap_or(defaults.block_size),
        hessian_shrink: a.hessian_shrink,
        true_sequential: !a.no_true_sequential,
    };
    let awq = AwqOptions {
        samples: a.awq_samples,
        ..Default::default()
    };
    let codebook = CodebookOptions {
        double_quant: a.double_quant,
    };
    let m = match kind {
        MethodKind::Rtn => Method::Rtn,
        MethodKind::Gptq => Method::Gptq(gptq),
        MethodKind::Awq => Method::Awq(awq),
        MethodKind::AwqGptq => Method::AwqGptq(awq, gptq),
        MethodKind::Nf4 => Method::Nf4(codebook),
        MethodKind::Fp4 => Method::Fp4(codebook),
        MethodKind::Int8 => Method::Int8(Int8Options {
            threshold: a.int8_threshold.unwrap_or(Int8Options::default().threshold),
        }),
        MethodKind::Fp8 => Method::Fp8,
        other => Method::with_defaults(other),
    };
    m.validate()?;
    Ok(m)
}

/// Arguments of `quantize`.
#[derive(Args, Debug)]
pub struct QuantizeArgs {
    /// Model: a .gguf file, a Hugging Face directory (LLaMA family or a sentence-transformers
    /// BERT), or `smollm2` / `minilm` for the cached models (`quantlab fetch`).
    #[arg(long, value_name = "PATH")]
    pub model: PathBuf,
    /// Quantization method.
    #[arg(long, value_enum)]
    pub method: MethodArg,
    /// Bits per weight code (default: 4; 8 for int8 and fp8; nf4/fp4 take only 4).
    #[arg(long)]
    pub bits: Option<u32>,
    /// Input columns per group of parameters; -1 = one group per row (default: 128; 64 for
    /// nf4/fp4; -1 for int8/fp8).
    #[arg(long, allow_hyphen_values = true)]
    pub group_size: Option<i64>,
    /// GPTQ: quantize columns by descending Hessian diagonal (desc_act).
    #[arg(long)]
    pub act_order: bool,
    /// GPTQ: fit every group's parameters from the original weights (with --act-order).
    #[arg(long)]
    pub static_groups: bool,
    /// GPTQ: damping as a fraction of mean(diag H) (default 0.01).
    #[arg(long)]
    pub damp: Option<f64>,
    /// GPTQ: columns per lazy batch (default 128).
    #[arg(long)]
    pub block_size: Option<usize>,
    /// GPTQ: shrink the Hessian toward its diagonal, 0..1: solve with diag(H) + (1 - S)
    /// offdiag(H), so the error feedback overfits the calibration text less (0 = plain GPTQ,
    /// 1 = importance-weighted RTN; default 0.9 on the K types gguf:q2_k..q6_k, 0.5 on the other gguf:* types, 0 otherwise).
    #[arg(long, value_name = "S")]
    pub hessian_shrink: Option<f64>,
    /// Symmetric integer grid (the default).
    #[arg(long, conflicts_with = "asym")]
    pub sym: bool,
    /// Asymmetric integer grid (zero point per group).
    #[arg(long)]
    pub asym: bool,
    /// Search each group's range for the least squared error (reference GPTQ `mse`).
    #[arg(long)]
    pub mse: bool,
    /// nf4/fp4: double-quantize the absmax with 8-bit codes (QLoRA).
    #[arg(long)]
    pub double_quant: bool,
    /// int8: the LLM.int8() outlier threshold recorded for run time (default 6.0).
    #[arg(long)]
    pub int8_threshold: Option<f32>,
    /// Leave matching linears in full precision (substring, or glob with * and ?);
    /// repeatable. Embeddings and lm_head are never quantized.
    #[arg(long, value_name = "PATTERN")]
    pub skip: Vec<String>,
    /// Per-module settings: 'PATTERN:key=value[,key=value]' with keys bits, group_size,
    /// sym, act_order, damp (e.g. 'down_proj:bits=8'); repeatable, later wins.
    #[arg(long = "override", value_name = "SPEC")]
    pub overrides: Vec<String>,
    /// Calibration text (.txt, .jsonl, .parquet), or `shipped` for the shipped prose.
    /// Default: the shipped prose for gptq, awq and awq+gptq; none for the data-free methods
    /// (rtn, nf4, fp4, int8, fp8), which then run no forward pass and report each linear's
    /// error on its weights, as llama.cpp quantizes without `--imatrix`. Giving --calib to
    /// one of them measures each linear's output error on it, and with `--format gguf:*`
    /// weights each block's scale search by the inputs' importance (llama.cpp's imatrix).
    #[arg(long, value_name = "FILE")]
    pub calib: Option<PathBuf>,
    /// Field (jsonl) or column (parquet) of the calibration text.
    #[arg(long)]
    pub calib_field: Option<String>,
    /// Importance matrix in llama.cpp's formats (GGUF or legacy .dat, from `quantlab
    /// imatrix` or `llama-imatrix`): with --method rtn and --format gguf:<type>, each block's
    /// scale search is weighted by it, as `llama-quantize --imatrix`; no calibration pass.
    #[arg(long, value_name = "FILE")]
    pub imatrix: Option<PathBuf>,
    /// Rotate the model before quantizing it (QuaRot / SpinQuant's R1 on the residual stream
    /// and R2 on each head's values, norms folded, all fused into the weights): `hadamard`
    /// (a Hadamard matrix with random signs) or `random` (a random orthogonal matrix). The
    /// rotated model computes the same function and is written as a plain LLaMA (its output
    /// head untied), so every format and loader takes it. LLaMA family only.
    #[arg(long, value_name = "KIND")]
    pub rotate: Option<String>,
    /// Seed of the rotation's signs or matrix (with --rotate).
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub rotate_seed: u64,
    /// Calibration windows.
    #[arg(long, default_value_t = 128)]
    pub nsamples: usize,
    /// Tokens per calibration window.
    #[arg(long, default_value_t = 512)]
    pub seqlen: usize,
    /// Seed of the calibration window draw.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Calibration windows per forward mini-batch.
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// GPTQ: capture each block's inputs once instead of after each group (q,k,v; o;
    /// gate,up; down) is quantized.
    #[arg(long)]
    pub no_true_sequential: bool,
    /// Low memory: read each block's weights from the memory-mapped model file only when the
    /// block is quantized, and keep quantized linears as codes (dequantized when used) instead
    /// of f32. Same result; peak memory about one block in f32 plus the codes, so a model
    /// larger than half the RAM still quantizes; `--eval` after quantization is slower.
    #[arg(long)]
    pub lazy: bool,
    /// AWQ: the first N calibration windows, on which the scale candidates are scored (on
    /// the block output) and the statistics (mean |x|, the clip search's rows) are taken.
    #[arg(long, default_value_t = AwqOptions::default().samples)]
    pub awq_samples: usize,
    /// Checkpoint layout: `quantlab` (the project's own directory, default), `gptq`
    /// (checkpoint_format "gptq", zeros minus one, what transformers / AutoGPTQ / vLLM load),
    /// `gptq_v2` (raw zeros, GPTQModel), `awq` (AutoAWQ GEMM, 4 bits), `bnb-nf4` / `bnb-fp4`
    /// (bitsandbytes Linear4bit; --method nf4/fp4, or gptq for GPTQ on the codebook),
    /// `bnb-int8` (LLM.int8; --method int8), or `gguf:<type>` (case-insensitive) with type
    /// q4_0, q4_1, q5_0, q5_1, q8_0, q2_k, q3_k, q3_k_s, q3_k_m, q3_k_l, q4_k, q4_k_s,
    /// q4_k_m, q5_k, q5_k_s, q5_k_m, q6_k, iq4_nl, iq4_xs, f32, f16 (one .gguf file for llama.cpp;
    /// the _S/_M/_L mixes and q2_k give attn_v, ffn_down and attn_output llama-quantize's
    /// per-layer types, q3_k / q4_k / q5_k are pure; --method gptq quantizes every linear on
    /// its own ggml grid, K types on their 256-weight super-blocks, --method rtn with --calib
    /// fits each block with the calibration's imatrix; K-type rows that are not multiples of
    /// 256 fall back as llama.cpp does: Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0, Q2_K / Q3_K
    /// -> IQ4_NL). Checked against the method before any work.
    #[arg(long, default_value = "quantlab", value_name = "FORMAT")]
    pub format: String,
    /// GGUF: every block linear of the file type's base type (no per-tensor mix), as
    /// llama-quantize --pure.
    #[arg(long)]
    pub pure: bool,
    /// Output directory (a .gguf file for --format gguf:*), written atomically.
    #[arg(long, value_name = "PATH", required_unless_present = "dry_run")]
    pub out: Option<PathBuf>,
    /// Replace an existing output directory.
    #[arg(long)]
    pub overwrite: bool,
    /// Perplexity before and after on this text (.txt, .jsonl, .parquet).
    #[arg(long, value_name = "FILE")]
    pub eval: Option<PathBuf>,
    /// Field (jsonl) or column (parquet) of the eval text.
    #[arg(long)]
    pub eval_field: Option<String>,
    /// Tokens per perplexity window.
    #[arg(long, default_value_t = 512)]
    pub eval_ctx: usize,
    /// Evaluate only the first N windows.
    #[arg(long, value_name = "N")]
    pub max_windows: Option<usize>,
    /// Print one JSON object (bits_per_weight, size_bytes, seconds, timings, layers,
    /// ppl_before/ppl_after, ...) instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Check the options and print the plan (layers, bits, estimated memory and time)
    /// without loading the weights or writing anything.
    #[arg(long)]
    pub dry_run: bool,
}

fn job_of(a: &QuantizeArgs) -> Result<QuantizeJob> {
    let overrides = a
        .overrides
        .iter()
        .map(|s| Override::parse(s))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    let config = QuantizeConfig {
        method: method_of(a)?,
        bits: a.bits,
        group_size: a.group_size,
        sym: !a.asym,
        mse: a.mse,
        skip: a.skip.clone(),
        overrides,
        nsamples: a.nsamples,
        seqlen: a.seqlen,
        seed: a.seed,
        batch_size: a.batch_size,
        format: {
            let f = ExportFormat::parse(&a.format)?;
            if a.pure {
                f.pure()?
            } else {
                f
            }
        },
        lazy: a.lazy,
        imatrix: a.imatrix.clone(),
        rotate: match &a.rotate {
            Some(k) => Some(Rotation {
                kind: RotationKind::parse(k).ok_or_else(|| {
                    PipelineError::option(
                        "--rotate",
                        format!("unknown rotation `{k}`; use hadamard or random"),
                    )
                })?,
                seed: a.rotate_seed,
            }),
            None => None,
        },
    };
    Ok(QuantizeJob {
        model: crate::generate::resolve_model(&a.model)?,
        config,
        calibration: match &a.calib {
            Some(p) if p.as_os_str() == "shipped" => Calibration::Shipped,
            Some(p) => Calibration::File {
                path: p.clone(),
                field: a.calib_field.clone(),
            },
            None if MethodKind::from(a.method).needs_calibration() => Calibration::Shipped,
            None => Calibration::None,
        },
        out: a.out.clone(),
        overwrite: a.overwrite,
        eval: a.eval.as_ref().map(|t| EvalSpec {
            text: t.clone(),
            field: a.eval_field.clone(),
            ctx: a.eval_ctx,
            max_windows: a.max_windows,
        }),
        progress: !a.json && std::io::IsTerminal::is_terminal(&std::io::stderr()),
    })
}

/// Runs the verb.
pub fn run_quantize(a: QuantizeArgs) -> Result<()> {
    let job = job_of(&a)?;
    if a.dry_run {
        let d = pipeline::dry_run(&job)?;
        if a.json {
            println!("{}", serde_json::to_string(&d)?);
        } else {
            print!("{}", d.table());
        }
        return Ok(());
    }
    let cancel = crate::interrupt::install();
    let report = pipeline::run(&job, Some(cancel))?;
    if a.json {
        println!("{}", report.to_json());
    } else {
        print!("{}", report.table());
    }
    Ok(())
}
