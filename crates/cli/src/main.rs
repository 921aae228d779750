//! `quantlab`: quantize, measure and export transformer models.
//!
//! Each verb parses its arguments and calls one library function.

use anyhow::Result;
use clap::{Parser, Subcommand};

mod bench;
mod eval;
mod fetch;
mod generate;
mod inspect;
mod layer;
mod quantize;

/// Post-training quantization of transformer models: number formats, GPTQ/AWQ solvers,
/// evaluation and export.
#[derive(Parser, Debug)]
#[command(name = "quantlab", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Download, verify and unpack a known model (smollm2, minilm) into the cache.
    Fetch(fetch::FetchArgs),
    /// Generate text from a prompt with a LLaMA-style model (chat template applied).
    Generate(generate::GenerateArgs),
    /// Evaluate a model: `eval ppl` (perplexity on a text file).
    Eval(eval::EvalArgs),
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

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Fetch(a) => fetch::run_fetch(a),
        Command::Generate(a) => generate::run_generate(a),
        Command::Eval(a) => eval::run_eval(a),
        Command::Inspect(a) => inspect::run_inspect(a),
        Command::Layer(a) => layer::run_layer_cmd(a),
        Command::Bench(a) => bench::run_bench(a),
        Command::Quantize(a) => quantize::run_quantize(*a),
    }
}
