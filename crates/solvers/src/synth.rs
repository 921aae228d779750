//! Seeded synthetic data for tests, benchmarks and notebooks: correlated inputs with a few
//! outlier channels, the Hessian they induce, random weights.
//!
//! Inputs are `X = Z A S`: `Z [tokens, dim]` i.i.d. N(0, 1), a random mixing
//! `A = 0.3 I + G / sqrt(dim)` (`G` i.i.d. N(0, 1)) that correlates the channels, and a
//! diagonal `S` scaling `outliers` channels (chosen by the seed) by 20, like the
//! activation outliers of real transformers.
#![allow(non_snake_case)]

use faer::{Accum, Mat, Par};
use ndarray::Array2;
use rand::rngs::StdRng;
use rand::seq::index::sample;
use rand::{Rng, SeedableRng};
use rand_distr::StandardNormal;

/// Scale of the outlier channels.
pub const OUTLIER_SCALE: f32 = 20.0;

fn normal_matrix(rng: &mut StdRng, rows: usize, cols: usize) -> Array2<f32> {
    Array2::from_shape_simple_fn((rows, cols), || rng.sample::<f32, _>(StandardNormal))
}

/// The mixing `A S` (`[dim, dim]`) of [`correlated_inputs`] for `seed`.
pub fn mixing(dim: usize, seed: u64, outliers: usize) -> Array2<f32> {
    let mut rng = StdRng::seed_from_u64(seed ^ 0x6d69_7869_6e67);
    let s = 1.0 / (dim as f32).sqrt();
    let mut A = normal_matrix(&mut rng, dim, dim).mapv(|v| v * s);
    for i in 0..dim {
        A[[i, i]] += 0.3;
    }
    for c in sample(&mut rng, dim, outliers.min(dim)) {
        A.column_mut(c).mapv_inplace(|v| v * OUTLIER_SCALE);
    }
    A
}

/// `tokens x dim` correlated inputs `X = Z A S` (see the module documentation).
///
/// ```
/// let X = quantlab_solvers::synth::correlated_inputs(64, 8, 1, 1);
/// assert_eq!(X.dim(), (64, 8));
/// assert_eq!(X, quantlab_solvers::synth::correlated_inputs(64, 8, 1, 1));
/// ```
pub fn correlated_inputs(tokens: usize, dim: usize, seed: u64, outliers: usize) -> Array2<f32> {
    let A = mixing(dim, seed, outliers);
    let mut rng = StdRng::seed_from_u64(seed);
    let Z = normal_matrix(&mut rng, tokens, dim);
    Z.dot(&A)
}

/// The Hessian of infinitely many rows of [`correlated_inputs`]:
/// `H = 2 E[x x^T] = 2 (A S)^T (A S)`, one `dim^3` product (for large benchmarks where
/// generating the inputs would dominate). Full rank.
pub fn correlated_hessian(dim: usize, seed: u64, outliers: usize, par: Par) -> Array2<f32> {
    let A = mixing(dim, seed, outliers);
    let Am = Mat::<f32>::from_fn(dim, dim, |i, j| A[[i, j]]);
    let mut Hm = Mat::<f32>::zeros(dim, dim);
    faer::linalg::matmul::matmul(
        Hm.as_mut(),
        Accum::Replace,
        Am.transpose(),
        Am.as_ref(),
        2.0f32,
        par,
    );
    Array2::from_shape_fn((dim, dim), |(i, j)| Hm[(i, j)])
}

/// A `[out, in]` weight with i.i.d. N(0, 0.02^2) entries (a typical init scale).
pub fn random_weight(out: usize, inp: usize, seed: u64) -> Array2<f32> {
    let mut rng = StdRng::seed_from_u64(seed.wrapping_add(0x7765_6967_6874));
    normal_matrix(&mut rng, out, inp).mapv(|v| v * 0.02)
}
