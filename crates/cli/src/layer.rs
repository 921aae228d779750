//! `quantlab layer`: quantize ONE linear layer from a safetensors file and measure it.

use anyhow::Result;
use clap::{Args, ValueEnum};
use quantlab::pipeline::layer::{run_layer, LayerFormat, LayerJob, LayerMethod};
use std::path::PathBuf;

/// The solver (`rtn`: round to nearest; `gptq`: GPTQ, blocked; `obq`: greedy OBQ, small layers
/// only; `awq`: AWQ scale + clip search, then RTN).
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum MethodArg {
    Rtn,
    Gptq,
    Obq,
    Awq,
}

/// The number format (`int`: uniform affine grid of `--bits`; `nf4`, `fp4`: QLoRA codebooks
/// with absmax per group; `fp8`: E4M3 with a scale per group).
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum FormatArg {
    Int,
    Nf4,
    Fp4,
    Fp8,
}

/// Arguments of `quantlab layer`.
///
/// The input file holds `weight` [out, in] (f32, f16 or bf16) and either `inputs` [n, in]
/// (calibration rows; H = 2/n X^T X) or `hessian` [in, in]. Option names follow GPTQConfig:
/// --group-size = group_size, --act-order = desc_act, --damp = damp_percent, --sym = sym,
/// --static-groups = static_groups.
#[derive(Args, Debug)]
pub struct LayerArgs {
    /// Safetensors file with `weight` and `inputs` or `hessian`.
    #[arg(long)]
    pub input: PathBuf,
    /// Solver.
    #[arg(long, value_enum, default_value = "gptq")]
    pub method: MethodArg,
    /// Number format.
    #[arg(long, value_enum, default_value = "int")]
    pub format: FormatArg,
    /// Bits of the integer grid (2..8; GPTQConfig `bits`, AutoAWQ `w_bit`).
    #[arg(long, default_value_t = 4)]
    pub bits: u32,
    /// Input columns per group of parameters; -1 = one group per row (GPTQConfig `group_size`).
    #[arg(long, default_value_t = 128, allow_negative_numbers = true)]
    pub group_size: i64,
    /// Symmetric grid (the default; GPTQConfig `sym=True`).
    #[arg(long, conflicts_with = "asym")]
    pub sym: bool,
    /// Asymmetric grid with a zero point (AutoAWQ `zero_point=True`).
    #[arg(long)]
    pub asym: bool,
    /// Quantize columns by descending Hessian diagonal (GPTQ `desc_act`).
    #[arg(long)]
    pub act_order: bool,
    /// Fit every group's parameters before GPTQ's updates (GPTQ `static_groups`).
    #[arg(long)]
    pub static_groups: bool,
    /// Damping as a fraction of mean(diag H) (GPTQ `damp_percent`); retried x10 on a
    /// non-positive-definite Hessian.
    #[arg(long, default_value_t = 0.01)]
    pub damp: f64,
    /// GPTQ lazy-batch block size in columns.
    #[arg(long, default_value_t = 128)]
    pub block_size: usize,
    /// MSE clipping search on the integer grid (reference GPTQ `mse`).
    #[arg(long)]
    pub mse: bool,
    /// Threads (0 = all cores).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Write the quantized layer (weight, codes, scales, zeros, g_idx) to this safetensors
    /// file, atomically.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// Runs `quantlab layer`.
pub fn run_layer_cmd(a: LayerArgs) -> Result<()> {
    let job = LayerJob {
        input: a.input,
        method: match a.method {
            MethodArg::Rtn => LayerMethod::Rtn,
            MethodArg::Gptq => LayerMethod::Gptq,
            MethodArg::Obq => LayerMethod::Obq,
            MethodArg::Awq => LayerMethod::Awq,
        },
        format: match a.format {
            FormatArg::Int => LayerFormat::Int,
            FormatArg::Nf4 => LayerFormat::Nf4,
            FormatArg::Fp4 => LayerFormat::Fp4,
            FormatArg::Fp8 => LayerFormat::Fp8,
        },
        bits: a.bits,
        group_size: a.group_size,
        sym: !a.asym,
        act_order: a.act_order,
        static_groups: a.static_groups,
        damp: a.damp,
        block_size: a.block_size,
        mse: a.mse,
        out: a.out,
        threads: a.threads,
    };
    let report = run_layer(&job)?;
    if a.json {
        println!("{}", report.to_json());
    } else {
        print!("{}", report.table());
    }
    Ok(())
}
