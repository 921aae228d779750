//! `cargo run --release -p quantlab-solvers --example gptq_bench -- 4096 [repeats] [threads]`: the GPTQ
//! benchmark of `quantlab bench gptq` without the CLI, printed as JSON.
fn main() {
    let mut args = std::env::args().skip(1);
    let n: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(1024);
    let repeats: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(1);
    let threads: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(0);
    let par = if threads == 1 {
        quantlab_solvers::Par::Seq
    } else {
        quantlab_solvers::Par::rayon(threads)
    };
    let r = quantlab_solvers::bench::gptq_bench(n, 0, par, repeats).expect("benchmark");
    println!("{}", serde_json::to_string_pretty(&r).unwrap());
}
