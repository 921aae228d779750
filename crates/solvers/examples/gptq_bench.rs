//! `cargo run --release -p quantlab-solvers --example gptq_bench -- 4096 [repeats] [threads] [f32|f64] [block]`:
//! the GPTQ benchmark of `quantlab bench gptq` without the CLI, printed as JSON. `f32`
//! factorizes the Hessian in f32 (`GptqParams::factor_in_f64 = false`).
fn main() {
    let mut args = std::env::args().skip(1);
    let n: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(1024);
    let repeats: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(1);
    let threads: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(0);
    let factor_in_f64 = args.next().is_none_or(|a| a != "f32");
    let block_size: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(128);
    let par = if threads == 1 {
        quantlab_solvers::Par::Seq
    } else {
        quantlab_solvers::Par::rayon(threads)
    };
    let params = quantlab_solvers::gptq::GptqParams {
        granularity: quantlab_grids::Granularity::Group(128),
        par,
        factor_in_f64,
        block_size,
        ..Default::default()
    };
    let r = quantlab_solvers::bench::gptq_bench_with(n, 0, &params, repeats).expect("benchmark");
    println!("{}", serde_json::to_string_pretty(&r).unwrap());
}
