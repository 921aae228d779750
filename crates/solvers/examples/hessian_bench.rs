//! Hessian accumulation speed on the driver's shapes against a plain f32 GEMM of the same
//! operands: `hessian_bench [TOKENS]`.
use std::time::Instant;

use faer::linalg::matmul::triangular::{self, BlockStructure};
use faer::{Accum, MatMut, MatRef, Par};
use ndarray::Array2;
use quantlab_solvers::hessian::{Counting, Hessian};

fn main() {
    let t: usize = std::env::args()
        .nth(1)
        .map_or(4096, |s| s.parse().expect("TOKENS"));
    for d in [576usize, 1536, 2048] {
        let x = Array2::from_shape_fn((t, d), |(i, j)| {
            ((i * 31 + j * 17) % 97) as f32 / 97.0 - 0.5
        });
        let xs = x.as_slice().unwrap();
        let reps = 5;
        // Hessian::add_batch
        let mut h = Hessian::new(d).with_counting(Counting::Tokens);
        h.add_batch(x.view(), 1).unwrap();
        let t0 = Instant::now();
        for _ in 0..reps {
            h.add_batch(x.view(), 1).unwrap();
        }
        let s_h = t0.elapsed().as_secs_f64() / reps as f64;
        // full GEMM X^T X
        let mut c = vec![0f32; d * d];
        let xt = MatRef::from_column_major_slice(xs, d, t);
        let t0 = Instant::now();
        for _ in 0..reps {
            let cm = MatMut::from_column_major_slice_mut(&mut c, d, d);
            faer::linalg::matmul::matmul(
                cm,
                Accum::Replace,
                xt,
                xt.transpose(),
                1.0f32,
                Par::rayon(0),
            );
        }
        let s_g = t0.elapsed().as_secs_f64() / reps as f64;
        // triangular only
        let t0 = Instant::now();
        for _ in 0..reps {
            let cm = MatMut::from_column_major_slice_mut(&mut c, d, d);
            triangular::matmul(
                cm,
                BlockStructure::TriangularLower,
                Accum::Replace,
                xt,
                BlockStructure::Rectangular,
                xt.transpose(),
                BlockStructure::Rectangular,
                1.0f32,
                Par::rayon(0),
            );
        }
        let s_t = t0.elapsed().as_secs_f64() / reps as f64;
        let full = 2.0 * (d * d * t) as f64;
        println!(
            "d {d:5} t {t}: add_batch {:.1} ms ({:.0} GFLOP/s useful), full gemm {:.1} ms ({:.0} GFLOP/s), triangular {:.1} ms ({:.0} GFLOP/s useful)",
            s_h * 1e3, full / 2.0 / s_h / 1e9, s_g * 1e3, full / s_g / 1e9, s_t * 1e3, full / 2.0 / s_t / 1e9
        );
    }
}
