//! Independent oracles shared by the solver tests.
#![allow(dead_code, non_snake_case, clippy::excessive_precision)]

use ndarray::{Array1, Array2, ArrayView1, ArrayView2};
use quantlab_grids::{Format, GroupParams};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::StandardNormal;

/// The NF4 code table (QLoRA / bitsandbytes, from docs/formats.md), as a test-local Format,
/// so the solvers are exercised with a codebook format independent of the grids crate.
pub const NF4: [f32; 16] = [
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
];

#[derive(Debug, Clone, Copy)]
pub struct TestNf4;

impl Format for TestNf4 {
    fn name(&self) -> String {
        "nf4-test".into()
    }
    fn code_bits(&self) -> u32 {
        4
    }
    fn param_bits(&self) -> f64 {
        32.0
    }
    fn fit(&self, w: &[f32]) -> GroupParams {
        let m = w.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        GroupParams::scale_only(if m == 0.0 { 1.0 } else { m })
    }
    fn encode(&self, x: f32, p: GroupParams) -> u8 {
        let v = (x / p.scale).clamp(-1.0, 1.0);
        let mut best = 0;
        for (i, &c) in NF4.iter().enumerate() {
            if (c - v).abs() < (NF4[best] - v).abs() {
                best = i;
            }
        }
        best as u8
    }
    fn decode(&self, code: u8, p: GroupParams) -> f32 {
        NF4[code as usize] * p.scale
    }
}

pub fn rng(seed: u64) -> StdRng {
    StdRng::seed_from_u64(seed)
}

pub fn normal(rng: &mut StdRng, r: usize, c: usize) -> Array2<f64> {
    Array2::from_shape_simple_fn((r, c), || rng.sample::<f64, _>(StandardNormal))
}

/// A random SPD matrix `A A^T / d + eps I`.
pub fn spd(rng: &mut StdRng, d: usize, eps: f64) -> Array2<f64> {
    let A = normal(rng, d, d + 2);
    A.dot(&A.t()) / d as f64 + Array2::<f64>::eye(d) * eps
}

/// Solve `M z = b` by Gaussian elimination with partial pivoting (plain, f64).
pub fn solve(M: &Array2<f64>, b: &Array1<f64>) -> Array1<f64> {
    let n = b.len();
    let mut A = M.clone();
    let mut x = b.clone();
    for k in 0..n {
        let p = (k..n)
            .max_by(|&i, &j| A[[i, k]].abs().total_cmp(&A[[j, k]].abs()))
            .unwrap();
        for j in 0..n {
            A.swap([k, j], [p, j]);
        }
        x.swap(k, p);
        for i in k + 1..n {
            let f = A[[i, k]] / A[[k, k]];
            for j in k..n {
                A[[i, j]] -= f * A[[k, j]];
            }
            x[i] -= f * x[k];
        }
    }
    for k in (0..n).rev() {
        let mut s = x[k];
        for j in k + 1..n {
            s -= A[[k, j]] * x[j];
        }
        x[k] = s / A[[k, k]];
    }
    x
}

/// The constrained quadratic of OBS solved directly through its KKT system:
/// min 1/2 dw^T H dw  s.t.  dw_q = t - w_q. Returns (dw, loss).
pub fn kkt_single(H: ArrayView2<f64>, w: ArrayView1<f64>, q: usize, t: f64) -> (Array1<f64>, f64) {
    let d = w.len();
    let mut M = Array2::<f64>::zeros((d + 1, d + 1));
    M.slice_mut(ndarray::s![..d, ..d]).assign(&H);
    M[[q, d]] = 1.0;
    M[[d, q]] = 1.0;
    let mut b = Array1::<f64>::zeros(d + 1);
    b[d] = t - w[q];
    let z = solve(&M, &b);
    let dw = z.slice(ndarray::s![..d]).to_owned();
    let loss = 0.5 * dw.dot(&H.dot(&dw));
    (dw, loss)
}

/// `1/2 (a - b)^T H (a - b)`.
pub fn half_quad(a: ArrayView1<f64>, b: ArrayView1<f64>, H: ArrayView2<f64>) -> f64 {
    let d = &a - &b;
    0.5 * d.dot(&H.dot(&d))
}

/// `||(W - Q) X^T||_F^2` and `||W X^T||_F^2` computed from the inputs, in f64.
pub fn explicit_output_errors(
    W: ArrayView2<f32>,
    Q: ArrayView2<f32>,
    X: ArrayView2<f32>,
) -> (f64, f64) {
    let W = W.mapv(|v| v as f64);
    let Q = Q.mapv(|v| v as f64);
    let X = X.mapv(|v| v as f64);
    let num = (&W - &Q).dot(&X.t()).mapv(|v| v * v).sum();
    let den = W.dot(&X.t()).mapv(|v| v * v).sum();
    (num, den)
}

/// `H = 2/T X^T X` in f64 by plain loops, as f32.
pub fn hessian_of(X: ArrayView2<f32>) -> Array2<f32> {
    let (t, d) = X.dim();
    Array2::from_shape_fn((d, d), |(i, j)| {
        let mut s = 0.0f64;
        for k in 0..t {
            s += X[[k, i]] as f64 * X[[k, j]] as f64;
        }
        (2.0 * s / t as f64) as f32
    })
}

/// Relative output error computed from the inputs.
pub fn rel_err_from_inputs(W: ArrayView2<f32>, Q: ArrayView2<f32>, X: ArrayView2<f32>) -> f64 {
    let (n, d) = explicit_output_errors(W, Q, X);
    n / d
}
