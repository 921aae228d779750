//! `quantlab`: quantize, measure and export transformer models.
//!
//! Each verb parses its arguments and calls one library function.

use anyhow::Result;
use clap::{Parser, Subcommand};

mod bench;
mod eval;
mod fetch;
mod generate;
mod imatrix;
mod inspect;
mod interrupt;
mod layer;
mod quantize;

/// Post-training quantization of transformer models: number formats, GPTQ/AWQ solvers,
/// evaluation and export.
#[derive(Parser, Debug)]
#[command(name = "quantlab", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// On an error, also print where it happened (the backtrace, when RUST_BACKTRACE or
    /// RUST_LIB_BACKTRACE is set); without it an error is one line with its causes.
    #[arg(short, long, global = true)]
    verbose: bool,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Download, verify and unpack a known model (smollm2, minilm) into the cache.
    Fetch(fetch::FetchArgs),
    /// Generate text from a prompt with a LLaMA-style model (chat template applied).
    Generate(generate::GenerateArgs),
    /// Evaluate a model: `eval ppl` (perplexity on a text file), `eval kld` (KL divergence
    /// from a base model), `eval embed` (sentence embeddings).
    Eval(eval::EvalArgs),
    /// Compute an importance matrix (llama-imatrix's statistics) over a text and write it in
    /// llama.cpp's GGUF or legacy format, for `quantize --imatrix` or `llama-quantize --imatrix`.
    Imatrix(imatrix::ImatrixArgs),
    /// List the tensors (and GGUF metadata) of a GGUF or safetensors file.
    Inspect(inspect::InspectArgs),
    /// Quantize one linear layer from a safetensors file (`weight` + `inputs` or `hessian`)
    /// with rtn, gptq, obq or awq, and report its relative output error.
    Layer(layer::LayerArgs),
    /// Benchmarks: `bench gptq --size N`, `bench quantize --model M --method gptq`.
    Bench(bench::BenchArgs),
    /// Quantize every linear of a model's blocks (rtn, gptq, awq, awq+gptq, nf4, fp4, int8,
    /// fp8) and write the quantized model as a directory `eval`/`generate` load.
    Quantize(Box<quantize::QuantizeArgs>),
}

/// glibc returns every freed block of 128 KiB or more to the kernel (`munmap`), so each
/// activation a forward allocates comes back as fresh pages that fault and are zeroed again:
/// keeping blocks up to 32 MiB (glibc's ceiling for this threshold) on the heap, and the
/// heap untrimmed, removed most of those faults (GPTQ on SmolLM2, 128 x 512 calibration:
/// forward 75.7 s -> 72.8 s on 2 cores).
fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; called before any thread starts.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TOP_PAD, 64 << 20);
    }
}

fn main() -> std::process::ExitCode {
    tune_allocator();
    let cli = Cli::parse();
    let verbose = cli.verbose;
    match run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // `{:#}`: the error and its causes on one line; the backtrace that anyhow captures
            // when RUST_BACKTRACE is set only with --verbose
            if verbose {
                eprintln!("Error: {e:?}");
            } else {
                eprintln!("Error: {e:#}");
            }
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Fetch(a) => fetch::run_fetch(a),
        Command::Generate(a) => generate::run_generate(a),
        Command::Eval(a) => eval::run_eval(a),
        Command::Imatrix(a) => imatrix::run_imatrix(a),
        Command::Inspect(a) => inspect::run_inspect(a),
        Command::Layer(a) => layer::run_layer_cmd(a),
        Command::Bench(a) => bench::run_bench(a),
        Command::Quantize(a) => quantize::run_quantize(*a),
    }
}
