//! `cargo run --release -p quantlab-solvers --example gptq_profile -- N [f32|f64] [repeats]`: GPTQ
//! int4-sym g128 on the benchmark layer of `quantlab bench gptq`, with the Hessian cached in
//! `/tmp/quantlab_gptq_H{N}.bin` so that a profiler sees the solver only. Prints the phases.
#![allow(non_snake_case)]
use quantlab_grids::{Granularity, UniformGrid};
use quantlab_solvers::gptq::{gptq_with_format, GptqParams};
use quantlab_solvers::Par;

fn main() {
    let mut args = std::env::args().skip(1);
    let n: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(4096);
    let f64_factor = args.next().is_none_or(|a| a != "f32");
    let repeats: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(1);
    let path = format!("/tmp/quantlab_gptq_H{n}.bin");
    let H = match std::fs::read(&path) {
        Ok(b) if b.len() == 4 * n * n => ndarray::Array2::from_shape_vec(
            (n, n),
            b.chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        )
        .unwrap(),
        _ => {
            let H = quantlab_solvers::synth::correlated_hessian(n, 0, 8, Par::rayon(0));
            let bytes: Vec<u8> = H.iter().flat_map(|v| v.to_le_bytes()).collect();
            std::fs::write(&path, bytes).unwrap();
            H
        }
    };
    let W = quantlab_solvers::synth::random_weight(n, n, 0);
    let grid = UniformGrid::new(4, true).unwrap();
    let p = GptqParams {
        granularity: Granularity::Group(128),
        factor_in_f64: f64_factor,
        ..Default::default()
    };
    for _ in 0..repeats {
        let o = gptq_with_format(W.view(), H.view(), &grid, &p).unwrap();
        println!(
            "{:.3} s {:?} loss {}",
            o.report.seconds,
            o.report.phases,
            o.report.loss.unwrap()
        );
    }
}
