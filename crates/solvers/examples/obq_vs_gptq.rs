//! `cargo run --release -p quantlab-solvers --example obq_vs_gptq -- [out] [in] [seeds]`:
//! relative output error of RTN, GPTQ, GPTQ act-order and OBQ on synthetic correlated layers
//! with outlier channels, per channel and with groups, per seed (the OBQ investigation of
//! docs/solvers.md).
#![allow(non_snake_case)]
use quantlab_grids::{Format, FormatSpec, Granularity, UniformGrid};
use quantlab_solvers::gptq::{gptq_with_format, GptqParams};
use quantlab_solvers::obq::{obq_with_format, ObqParams};
use quantlab_solvers::synth::{correlated_inputs, random_weight};
use quantlab_solvers::{hessian::Hessian, rel_output_error};

fn main() {
    let mut args = std::env::args().skip(1);
    let out: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(32);
    let n: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(128);
    let seeds: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(3);
    for bits in [3u32, 4] {
        for sym in [true, false] {
            let grid = UniformGrid::new(bits, sym).unwrap();
            let spec = FormatSpec::Uniform(grid);
            for gran in [Granularity::PerChannel, Granularity::Group(32)] {
                for seed in 0..seeds {
                    let X = correlated_inputs(4 * n, n, seed, 4);
                    let mut h = Hessian::new(n);
                    h.add_batch(X.view(), 1).unwrap();
                    let H = h.finish();
                    let W = random_weight(out, n, seed + 1);
                    let e = |q: &ndarray::Array2<f32>| {
                        rel_output_error(W.view(), q.view(), H.view()).unwrap()
                    };
                    let rtn = quantlab_grids::quantize_rtn("w", W.view(), &spec, gran).unwrap();
                    let gp = GptqParams {
                        granularity: gran,
                        ..Default::default()
                    };
                    let g = gptq_with_format(W.view(), H.view(), &grid, &gp).unwrap();
                    let ga = gptq_with_format(
                        W.view(),
                        H.view(),
                        &grid,
                        &GptqParams {
                            act_order: true,
                            ..gp.clone()
                        },
                    )
                    .unwrap();
                    let gs = gptq_with_format(
                        W.view(),
                        H.view(),
                        &grid,
                        &GptqParams {
                            static_groups: true,
                            ..gp.clone()
                        },
                    )
                    .unwrap();
                    let t = std::time::Instant::now();
                    let o = obq_with_format(
                        W.view(),
                        H.view(),
                        &grid,
                        &ObqParams {
                            granularity: gran,
                            ..Default::default()
                        },
                    )
                    .unwrap();
                    let to = t.elapsed().as_secs_f64();
                    println!(
                        "{} {gran:?} seed {seed}: rtn {:.5} gptq {:.5} gptq-act {:.5} gptq-static {:.5} obq {:.5} ({to:.2} s)",
                        grid.name(),
                        e(&rtn.dequantize()),
                        e(&g.q),
                        e(&ga.q),
                        e(&gs.q),
                        e(&o.q)
                    );
                }
            }
        }
    }
}
