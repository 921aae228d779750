//! The default batch product (lower triangle in f32, f64 running sum) against the full f64
//! product and a plain f64 loop, on inputs with outlier channels and a width that is not a
//! multiple of any SIMD or block size.
#![allow(non_snake_case)]

use ndarray::{s, Array2};
use quantlab_solvers::hessian::{Counting, Hessian};
use quantlab_solvers::synth::correlated_inputs;

#[test]
fn f32_lower_triangle_products_match_the_f64_reference() {
    let X = correlated_inputs(700, 77, 3, 7);
    let mut fast = Hessian::new(77).with_counting(Counting::Tokens);
    let mut reference = Hessian::new(77)
        .with_counting(Counting::Tokens)
        .with_f64_products(true);
    for rows in [0..300, 300..301, 301..700] {
        fast.add_batch(X.slice(s![rows.clone(), ..]), 1).unwrap();
        reference.add_batch(X.slice(s![rows, ..]), 1).unwrap();
    }
    // plain f64 loop: 2/T sum_t x x^T
    let mut H = Array2::<f64>::zeros((77, 77));
    for row in X.rows() {
        for i in 0..77 {
            for j in 0..77 {
                H[[i, j]] += row[i] as f64 * row[j] as f64;
            }
        }
    }
    H *= 2.0 / 700.0;
    let (Hf, Hr) = (fast.finish(), reference.finish());
    let mut worst: f64 = 0.0;
    for i in 0..77 {
        for j in 0..77 {
            let scale = (H[[i, i]] * H[[j, j]]).sqrt();
            worst = worst.max((Hf[[i, j]] as f64 - H[[i, j]]).abs() / scale);
            assert!((Hr[[i, j]] as f64 - H[[i, j]]).abs() < 1e-6 * scale);
            // symmetric, both halves filled
            assert_eq!(Hf[[i, j]], Hf[[j, i]]);
        }
    }
    assert!(worst < 1e-5, "worst relative deviation {worst:e}");
}
