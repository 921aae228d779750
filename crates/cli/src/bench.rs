//! `quantlab bench gptq --size N [--json]`: time the GPTQ solver on this machine.

use anyhow::Result;
use clap::{Args, Subcommand};
use quantlab::grids::Granularity;
use quantlab::solvers::{bench::gptq_bench_with, gptq::GptqParams, Par};

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
}

/// Runs `quantlab bench`.
pub fn run_bench(a: BenchArgs) -> Result<()> {
    match a.what {
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
