//! Criterion benchmarks of the blocked GPTQ solver (4-bit, groups of 128, symmetric) on
//! square layers with a correlated, outlier-heavy Hessian, and of its factorization step.
#![allow(non_snake_case)]

use criterion::{criterion_group, criterion_main, Criterion};
use quantlab_grids::{Granularity, UniformGrid};
use quantlab_solvers::gptq::{gptq_with_format, GptqParams};
use quantlab_solvers::synth::{correlated_hessian, random_weight};
use quantlab_solvers::Par;

fn bench(c: &mut Criterion) {
    let par = Par::rayon(0);
    let grid = UniformGrid::new(4, true).unwrap();
    let mut g = c.benchmark_group("gptq_int4_g128");
    g.sample_size(10);
    for n in [512usize, 1024, 2048] {
        let H = correlated_hessian(n, 0, 8, par);
        let W = random_weight(n, n, 0);
        let p = GptqParams {
            granularity: Granularity::Group(128),
            par,
            ..Default::default()
        };
        g.bench_function(format!("{n}x{n}"), |b| {
            b.iter(|| gptq_with_format(W.view(), H.view(), &grid, &p).unwrap())
        });
        let Hm = faer::Mat::<f64>::from_fn(n, n, |i, j| {
            H[[i, j]] as f64 + if i == j { 1e-2 } else { 0.0 }
        });
        g.bench_function(format!("factor {n}"), |b| {
            b.iter(|| quantlab_solvers::linalg::upper_cholesky_of_inverse(&Hm, par).unwrap())
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
