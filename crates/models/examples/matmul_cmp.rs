//! candle vs faer f32 matmul at the decoder's shapes, interleaved, best of N.

use std::time::Instant;

use candle_core::{Device, Tensor};
use faer::{Accum, MatMut, MatRef, Par};

fn main() {
    let shapes = [
        (512usize, 576usize, 1536usize),
        (512, 1536, 576),
        (512, 576, 576),
        (511, 576, 49152),
    ];
    for (m, k, n) in shapes {
        let x = Tensor::randn(0f32, 1.0, (m, k), &Device::Cpu).unwrap();
        let w = Tensor::randn(0f32, 1.0, (k, n), &Device::Cpu).unwrap();
        let xs: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
        let ws: Vec<f32> = w.flatten_all().unwrap().to_vec1().unwrap();
        let mut out = vec![0f32; m * n];
        let (mut bc, mut bf) = (f64::INFINITY, f64::INFINITY);
        for _ in 0..8 {
            let t = Instant::now();
            let _ = x.matmul(&w).unwrap();
            bc = bc.min(t.elapsed().as_secs_f64());
            let t = Instant::now();
            let a = MatRef::from_row_major_slice(&xs, m, k);
            let b = MatRef::from_row_major_slice(&ws, k, n);
            let c = MatMut::from_row_major_slice_mut(&mut out, m, n);
            faer::linalg::matmul::matmul(c, Accum::Replace, a, b, 1.0f32, Par::rayon(2));
            bf = bf.min(t.elapsed().as_secs_f64());
        }
        let fl = 2.0 * (m * k * n) as f64 / 1e9;
        println!(
            "{m}x{k}x{n}: candle {:.1} GFLOP/s, faer {:.1} GFLOP/s",
            fl / bc,
            fl / bf
        );
    }
}
