//! `quantlab`: quantize, measure and export transformer models.
//!
//! Each verb parses its arguments and calls one library function.

use anyhow::Result;
use clap::{Parser, Subcommand};

/// Post-training quantization of transformer models: number formats, GPTQ/AWQ solvers,
/// evaluation and export.
#[derive(Parser, Debug)]
#[command(name = "quantlab", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {}
}
