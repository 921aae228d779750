//! `quantlab bench gptq --size N [--json]`: time the GPTQ solver on this machine.
//! `quantlab bench quantize --model M --method gptq|awq|rtn [--nsamples N] [--lazy] [--json]`:
//! time a whole-model job phase by phase beside this machine's GEMM rate.

use anyhow::Result;
use std::path::PathBuf;

use clap::{Args, Subcommand};
use quantlab::grids::Granularity;
use quantlab::pipeline::bench::{bench_quantize, SyntheticLlama};
use quantlab::pipeline::{
    AwqOptions, Calibration, ExportFormat, Method, QuantizeConfig, QuantizeJob,
};
use quantlab::solvers::{bench::gptq_bench_with, gptq::GptqParams, Par};

use crate::quantize::MethodArg;

/// Arguments of `quantlab bench`.
#[derive(Args, Debug)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub what: BenchWhat,
}

/// What to benchmark.
#[derive(Subcommand, Debug)]
pub enum BenchWhat {
    /// GPTQ 4-bit, group 128 (sym), on an N x N layer whose Hessian comes from seeded
    /// correlated inputs with outlier channels; prints seconds, effective GFLOP/s (flops
    /// counted as 2N^3/3 + N^2 (N-1)) and this machine's f32 GEMM GFLOP/s (an N x N faer
    /// matmul) for comparison.
    Gptq {
        /// The layer is N x N.
        #[arg(long, default_value_t = 4096)]
        size: usize,
        /// Repeats (the best is reported).
        #[arg(long, default_value_t = 1)]
        repeats: usize,
        /// Seed of the synthetic layer.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Threads (0 = all cores).
        #[arg(long, default_value_t = 0)]
        threads: usize,
        /// Factorize the Hessian in f32 (as the reference gptq.py) instead of f64 (the
        /// default): about twice as fast for that step; codes can differ where a weight sits
        /// on a rounding boundary.
        #[arg(long)]
        f32_factor: bool,
        /// Lazy-batch block size in columns (GPTQ `blocksize`).
        #[arg(long, default_value_t = 128)]
        block_size: usize,
        /// Print one JSON object instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// One whole-model quantization job (as `quantlab quantize`, the checkpoint written to a
    /// temporary path and removed) timed per phase: `load`, `calibration`, `forward`,
    /// `hessian`, `solve`, `awq_search`, `save`, `total_seconds`, `peak_rss_mb`, and
    /// `gemm_gflops`, this machine's f32 GEMM rate on the model's MLP shape measured in the
    /// same process (with the forward's and the Hessians' GFLOP/s beside it).
    Quantize(Box<BenchQuantizeArgs>),
}

/// Arguments of `bench quantize`.
#[derive(Args, Debug)]
pub struct BenchQuantizeArgs {
    /// Model: a .gguf file, a Hugging Face directory, `smollm2`, or `synthetic:1b` (random
    /// weights at a 1B model's shape: hidden 2048, intermediate 8192, 16 layers, 32 / 8
    /// heads) or `synthetic:HIDDEN,INTERMEDIATE,LAYERS[,HEADS,KV_HEADS]`, written once as
    /// bf16 safetensors under --synthetic-dir.
    #[arg(long, value_name = "PATH")]
    pub model: PathBuf,
    /// Quantization method.
    #[arg(long, value_enum)]
    pub method: MethodArg,
    /// Calibration windows (gptq/awq; rtn runs data-free unless --calib is given).
    #[arg(long, default_value_t = 128)]
    pub nsamples: usize,
    /// Tokens per calibration window.
    #[arg(long, default_value_t = 512)]
    pub seqlen: usize,
    /// Calibration windows per forward mini-batch.
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Bits per code (default: the method's).
    #[arg(long)]
    pub bits: Option<u32>,
    /// Group size (default: the method's; -1 = per row).
    #[arg(long, allow_hyphen_values = true)]
    pub group_size: Option<i64>,
    /// Calibration text (default: the shipped prose for gptq/awq, none for rtn), or `shipped`.
    #[arg(long, value_name = "FILE")]
    pub calib: Option<PathBuf>,
    /// Checkpoint layout written (and removed), as `quantize --format`.
    #[arg(long, default_value = "quantlab")]
    pub format: String,
    /// Low memory: block weights read from the memory-mapped file when reached, quantized
    /// linears kept as codes.
    #[arg(long)]
    pub lazy: bool,
    /// Where synthetic models are written (default: the cache, ~/.cache/quantlab/synthetic).
    #[arg(long, value_name = "DIR")]
    pub synthetic_dir: Option<PathBuf>,
    /// Also time a perplexity evaluation of the float model in the same process (windows of
    /// --seqlen tokens of the shipped evaluation text), to compare the quantization with one
    /// evaluation pass over as many tokens.
    #[arg(long)]
    pub eval_pass: bool,
    /// AWQ: windows the scale candidates are scored on (and the statistics taken from), as
    /// `quantize --awq-samples`.
    #[arg(long, default_value_t = AwqOptions::default().samples)]
    pub awq_samples: usize,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
}

fn run_bench_quantize(a: &BenchQuantizeArgs) -> Result<()> {
    let model = match SyntheticLlama::parse(&a.model.to_string_lossy())? {
        Some(spec) => {
            let root = match &a.synthetic_dir {
                Some(d) => d.clone(),
                None => quantlab::models::fetch::cache_dir()?.join("synthetic"),
            };
            let dir = root.join(format!(
                "llama-{}h-{}i-{}l-{}x{}",
                spec.hidden, spec.intermediate, spec.layers, spec.heads, spec.kv_heads
            ));
            if !dir.join("model.safetensors").is_file() {
                std::fs::create_dir_all(&root)?;
                eprintln!(
                    "writing a synthetic LLaMA ({:.2} B parameters, bf16) to {}",
                    spec.parameters() as f64 / 1e9,
                    dir.display()
                );
                spec.write_hf_dir(&dir, 0)?;
            }
            dir
        }
        None => crate::generate::resolve_model(&a.model)?,
    };
    let mut method = Method::with_defaults(a.method.into());
    if let Method::Awq(o) | Method::AwqGptq(o, _) = &mut method {
        o.samples = a.awq_samples;
    }
    method.validate()?;
    let config = QuantizeConfig {
        method,
        bits: a.bits,
        group_size: a.group_size,
        nsamples: a.nsamples,
        seqlen: a.seqlen,
        batch_size: a.batch_size,
        format: ExportFormat::parse(&a.format)?,
        lazy: a.lazy,
        ..Default::default()
    };
    let mut job = QuantizeJob::new(model, config);
    job.calibration = match &a.calib {
        Some(p) if p.as_os_str() == "shipped" => Calibration::Shipped,
        Some(p) => Calibration::File {
            path: p.clone(),
            field: None,
        },
        None if method.needs_calibration() => Calibration::Shipped,
        None => Calibration::None,
    };
    let r = bench_quantize(&job, a.eval_pass)?;
    if a.json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        print!("{}", r.table());
    }
    Ok(())
}

/// Runs `quantlab bench`.
pub fn run_bench(a: BenchArgs) -> Result<()> {
    match a.what {
        BenchWhat::Quantize(q) => run_bench_quantize(&q),
        BenchWhat::Gptq {
            size,
            repeats,
            seed,
            threads,
            f32_factor,
            block_size,
            json,
        } => {
            anyhow::ensure!(size >= 8, "--size {size}: use at least 8");
            let par = if threads == 1 {
                Par::Seq
            } else {
                Par::rayon(threads)
            };
            anyhow::ensure!(
                block_size >= 1,
                "--block-size 0: use a positive number of columns"
            );
            let params = GptqParams {
                granularity: Granularity::Group(128),
                par,
                factor_in_f64: !f32_factor,
                block_size,
                ..Default::default()
            };
            let r = gptq_bench_with(size, seed, &params, repeats)?;
            if json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                println!(
                    "GPTQ int4 g{} on {n} x {n} ({} threads)",
                    r.group_size,
                    r.threads,
                    n = r.size
                );
                let mut sorted = r.all_seconds.clone();
                sorted.sort_by(f64::total_cmp);
                println!(
                    "  seconds          {:.3}  (best of {}; median {:.3}; factorization in {})",
                    r.seconds,
                    r.all_seconds.len(),
                    sorted[sorted.len() / 2],
                    if f32_factor { "f32" } else { "f64" }
                );
                for (name, s) in &r.phases {
                    println!("    {name:<16} {s:.3}");
                }
                println!(
                    "  effective        {:.1} GFLOP/s  ({:.1} GFLOP: {})",
                    r.gflops,
                    r.flops / 1e9,
                    r.flops_formula
                );
                println!(
                    "  f32 GEMM here    {:.1} GFLOP/s  ({n} x {n} faer matmul, {:.3} s)",
                    r.gemm_gflops,
                    r.gemm_seconds,
                    n = r.size
                );
            }
            Ok(())
        }
    }
}
