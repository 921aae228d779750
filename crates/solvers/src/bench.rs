//! The GPTQ benchmark behind `quantlab bench gptq`: 4-bit, groups of 128, symmetric, on an
//! `N x N` layer whose Hessian comes from correlated inputs with outlier channels
//! ([`crate::synth::correlated_hessian`]), next to this machine's f32 GEMM rate measured the
//! same way (an `N x N` by `N x N` faer product).
//!
//! # Flop count (stated, so the GFLOP/s figure can be checked)
//! For `out` rows, `N` columns, block `B` (`N` a multiple of `B`):
//! * Cholesky of the reversed `H`: `N^3 / 3` (f64);
//! * triangular inverse: `N^3 / 3` (f64);
//! * in-block updates: `2 out sum_blocks B(B-1)/2 = out N (B - 1)`;
//! * lazy-batch GEMMs `W[:, i2:] -= Err1 U[i1:i2, i2:]`: `2 out B sum_k (N - (k+1) B) =
//!   out N (N - B)`;
//!
//! total `2 N^3 / 3 + out N (N - 1)` (= `5/3 N^3` for a square layer). Quantization,
//! grouping and copies are not counted.

#![allow(non_snake_case)]

use crate::gptq::{gptq_with_format, GptqParams};
use crate::Result;
use faer::{Accum, Mat, Par};
use quantlab_grids::{Granularity, UniformGrid};
use serde::Serialize;
use std::time::Instant;

/// One benchmark result.
#[derive(Clone, Debug, Serialize)]
pub struct GptqBench {
    /// `N` (the layer is `N x N`).
    pub size: usize,
    /// Bits, group size, block size of the run.
    pub bits: u32,
    pub group_size: usize,
    pub block_size: usize,
    /// Threads (rayon) used.
    pub threads: usize,
    /// Best wall-clock seconds of the GPTQ solve over the repeats.
    pub seconds: f64,
    /// Every repeat's seconds.
    pub all_seconds: Vec<f64>,
    /// Flops counted by [`gptq_flops`].
    pub flops: f64,
    /// `flops / seconds / 1e9`.
    pub gflops: f64,
    /// The formula used for `flops`.
    pub flops_formula: String,
    /// Best seconds of one `N x N x N` f32 faer matmul on this machine.
    pub gemm_seconds: f64,
    /// Its rate, `2 N^3 / seconds / 1e9`.
    pub gemm_gflops: f64,
    /// Setup seconds (Hessian and weight generation), not counted.
    pub setup_seconds: f64,
    /// GPTQ's loss and the damping retries (sanity).
    pub loss: f64,
    pub damp_retries: usize,
    /// Seconds per phase of the last repeat.
    pub phases: Vec<(String, f64)>,
}

/// Flops of blocked GPTQ as counted in the module documentation.
pub fn gptq_flops(out: usize, n: usize, block: usize) -> f64 {
    let (o, n, b) = (out as f64, n as f64, block.min(n) as f64);
    2.0 * n * n * n / 3.0 + o * n * (b - 1.0) + o * n * (n - b)
}

/// Best-of-`repeats` seconds and GFLOP/s of an `n x n x n` f32 faer matmul.
pub fn gemm_rate(n: usize, par: Par, repeats: usize) -> (f64, f64) {
    let a = Mat::<f32>::from_fn(n, n, |i, j| ((i * 7 + j * 13) % 17) as f32 * 0.01);
    let b = Mat::<f32>::from_fn(n, n, |i, j| ((i * 5 + j * 3) % 11) as f32 * 0.01);
    let mut c = Mat::<f32>::zeros(n, n);
    faer::linalg::matmul::matmul(c.as_mut(), Accum::Replace, a.as_ref(), b.as_ref(), 1.0, par);
    let mut best = f64::INFINITY;
    for _ in 0..repeats.max(1) {
        let t = Instant::now();
        faer::linalg::matmul::matmul(c.as_mut(), Accum::Replace, a.as_ref(), b.as_ref(), 1.0, par);
        best = best.min(t.elapsed().as_secs_f64());
    }
    let n = n as f64;
    (best, 2.0 * n * n * n / best / 1e9)
}

/// Run the benchmark: GPTQ int4-sym g128 on `size x size` (a short last group when 128
/// does not divide `size`), default [`GptqParams`] otherwise.
pub fn gptq_bench(size: usize, seed: u64, par: Par, repeats: usize) -> Result<GptqBench> {
    let params = GptqParams {
        granularity: Granularity::Group(128),
        par,
        ..Default::default()
    };
    gptq_bench_with(size, seed, &params, repeats)
}

/// [`gptq_bench`] with explicit solver parameters (e.g. `factor_in_f64: false`, another
/// block size); the grid is int4-sym.
pub fn gptq_bench_with(
    size: usize,
    seed: u64,
    params: &GptqParams,
    repeats: usize,
) -> Result<GptqBench> {
    let par = params.par;
    let t = Instant::now();
    let H = crate::synth::correlated_hessian(size, seed, 8.min(size), par);
    let W = crate::synth::random_weight(size, size, seed);
    let setup_seconds = t.elapsed().as_secs_f64();
    let grid = UniformGrid::new(4, true)?;
    let granularity = params.granularity;
    let params = params.clone();
    let mut all = Vec::new();
    let mut last = None;
    for _ in 0..repeats.max(1) {
        let o = gptq_with_format(W.view(), H.view(), &grid, &params)?;
        all.push(o.report.seconds);
        last = Some(o.report);
    }
    let report = last.expect("at least one repeat");
    let seconds = all.iter().cloned().fold(f64::INFINITY, f64::min);
    let flops = gptq_flops(size, size, params.block_size);
    let (gemm_seconds, gemm_gflops) = gemm_rate(size, par, 3);
    Ok(GptqBench {
        size,
        bits: 4,
        group_size: granularity.group_len(size),
        block_size: params.block_size,
        threads: match par {
            Par::Seq => 1,
            Par::Rayon(k) => k.get(),
        },
        seconds,
        all_seconds: all,
        flops,
        gflops: flops / seconds / 1e9,
        flops_formula: format!(
            "2 N^3/3 (Cholesky + triangular inverse, {}) + out N (B-1) (in-block) + out N (N-B) (lazy GEMMs)",
            if params.factor_in_f64 { "f64" } else { "f32" }
        ),
        gemm_seconds,
        gemm_gflops,
        setup_seconds,
        loss: report.loss.unwrap_or(f64::NAN),
        damp_retries: report.damp_retries.len(),
        phases: report.phases,
    })
}
