//! Wall-clock time of `quantize_rtn` on a 4096 x 4096 matrix for each format.
//! Run: `cargo run --release -p quantlab-grids --example rtn_timing`.

use ndarray::Array2;
use quantlab_grids::{
    quantize_rtn, DoubleQuant, FormatSpec, Fp8Kind, Granularity, MseClip, UniformGrid,
};
use std::time::Instant;

fn main() -> Result<(), quantlab_grids::GridError> {
    let n = 4096;
    // a deterministic, roughly Gaussian-looking matrix (no RNG dependency in examples)
    let w = Array2::from_shape_fn((n, n), |(r, k)| {
        let t = (r * 7919 + k * 104729) as f32;
        0.02 * ((t * 0.001).sin() + (t * 0.0007).cos() * 0.5)
    });
    let cases: Vec<(&str, FormatSpec, Granularity)> = vec![
        (
            "int4-sym g128",
            FormatSpec::Uniform(UniformGrid::new(4, true)?),
            Granularity::Group(128),
        ),
        (
            "int4-asym g128",
            FormatSpec::Uniform(UniformGrid::new(4, false)?),
            Granularity::Group(128),
        ),
        (
            "int4-sym-mse g128",
            FormatSpec::Uniform(UniformGrid::new(4, true)?.with_clip(MseClip::default())),
            Granularity::Group(128),
        ),
        ("nf4 g64", FormatSpec::Nf4, Granularity::Group(64)),
        ("fp4 g64", FormatSpec::Fp4, Granularity::Group(64)),
        (
            "fp8-e4m3 per-channel",
            FormatSpec::Fp8(Fp8Kind::E4M3),
            Granularity::PerChannel,
        ),
        (
            "int8 per-channel",
            FormatSpec::Int8,
            Granularity::PerChannel,
        ),
    ];
    for (label, spec, g) in cases {
        let t = Instant::now();
        let q = quantize_rtn("w", w.view(), &spec, g)?;
        let dt = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let mse = q.mse(w.view());
        let dt_mse = t.elapsed().as_secs_f64();
        println!(
            "{label:24} quantize {dt:7.3} s   mse {dt_mse:6.3} s   bpw {:.4}   mse {mse:.3e}",
            q.bits_per_weight()
        );
    }
    let q = quantize_rtn("w", w.view(), &FormatSpec::Nf4, Granularity::Group(64))?;
    let t = Instant::now();
    let dq = q.with_double_quant(DoubleQuant::default())?;
    println!(
        "{:24} {:7.3} s   bpw {:.6}",
        "nf4 g64 + double quant",
        t.elapsed().as_secs_f64(),
        dq.bits_per_weight()
    );
    Ok(())
}
