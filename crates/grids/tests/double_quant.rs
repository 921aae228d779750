//! Double quantization: the dynamic map from its construction, bits by hand, absmax round
//! trip against brute force.

use ndarray::Array2;
use quantlab_grids::double_quant::{bits_per_parameter, dynamic_map_8bit, DoubleQuant};
use quantlab_grids::{quantize_rtn, FormatSpec, Granularity, GridError};
use rand::{rngs::StdRng, Rng, SeedableRng};

fn ulps(a: f32, b: f32) -> u32 {
    (a.to_bits() as i64 - b.to_bits() as i64).unsigned_abs() as u32
}

#[test]
fn dynamic_map_signed_structure_and_spot_values() {
    let m = dynamic_map_8bit(true);
    assert!(
        m.windows(2).all(|w| w[0] < w[1]),
        "strictly sorted, so 256 distinct"
    );
    assert_eq!(m[255], 1.0);
    assert_eq!(m[127], 0.0);
    assert_eq!(m.iter().filter(|&&v| v == 0.0).count(), 1);
    // the negative half mirrors the positive half (1.0 has no mirror)
    for k in 1..=127 {
        assert_eq!(m[127 - k], -m[127 + k], "k {k}");
    }
    // spot values derived by hand: decade 10^-z holds 2^(6-z) values at the midpoints of
    // equal bins of [0.1, 1], times 10^-z.
    // z = 0: 64 values, the largest 0.1 + 0.9 * 63.5 / 64 = 0.99296875 (exact in binary)
    assert_eq!(m[254], 0.99296875);
    assert_eq!(m[0], -0.99296875);
    // its smallest: 0.1 + 0.9 * 0.5 / 64 = 0.10703125 at index 255 - 64 = 191
    assert!(ulps(m[191], 0.107_031_25) <= 1);
    // z = 1: 32 values; the largest 0.1 * (0.1 + 0.9 * 31.5 / 32) = 0.09859375 at 190
    assert!(ulps(m[190], 0.098_593_75) <= 1);
    // z = 6: one value, the midpoint of [0.1, 1] times 1e-6 = 0.55e-6, the smallest positive
    assert!(ulps(m[128], 0.55e-6) <= 1);
    // z = 5: two values 1e-5 * (0.1 + 0.9 * {0.25, 0.75}) = 3.25e-6, 7.75e-6
    assert!(ulps(m[129], 3.25e-6) <= 1 && ulps(m[130], 7.75e-6) <= 1);
    // counts per decade: 1, 2, 4, ..., 64 positive values
    let pos: Vec<f32> = m.iter().copied().filter(|&v| v > 0.0 && v < 1.0).collect();
    assert_eq!(pos.len(), 127);
    for z in 0..=6 {
        let (lo, hi) = (0.1 * 10f32.powi(-z), 10f32.powi(-z));
        let n = pos.iter().filter(|&&v| v > lo && v < hi).count();
        assert_eq!(n, 1 << (6 - z), "decade 10^-{z}");
    }
}

#[test]
fn dynamic_map_unsigned() {
    let m = dynamic_map_8bit(false);
    assert!(m.windows(2).all(|w| w[0] < w[1]));
    assert_eq!((m[0], m[255]), (0.0, 1.0));
    // z = 0 now has 128 values: the largest 0.1 + 0.9 * 127.5 / 128 = 0.996484375
    assert_eq!(m[254], 0.996_484_4);
    // z = 6: two values 1e-6 * (0.1 + 0.9 * {0.25, 0.75}) = 3.25e-7, 7.75e-7
    assert!(ulps(m[1], 3.25e-7) <= 1 && ulps(m[2], 7.75e-7) <= 1);
}

#[test]
fn bits_by_hand() {
    // 32 / 64 = 0.5 bits per parameter without; 8/64 + 32/(64*256) with
    assert_eq!(bits_per_parameter(64, 256), 0.125 + 32.0 / 16384.0);
    assert_eq!(bits_per_parameter(64, 256), 0.126953125);
    assert_eq!(bits_per_parameter(128, 256), 0.0625 + 32.0 / 32768.0);

    // NF4 g64 on [64, 512]: 512 scales -> 2 nested blocks
    let mut rng = StdRng::seed_from_u64(31);
    let w = Array2::from_shape_fn((64, 512), |_| rng.random_range(-1.0f32..1.0));
    let q = quantize_rtn("w", w.view(), &FormatSpec::Nf4, Granularity::Group(64)).unwrap();
    assert_eq!(q.bits().param_bits, 32.0 * 512.0);
    assert_eq!(q.bits_per_weight(), 4.5);
    let dq = q.with_double_quant(DoubleQuant::default()).unwrap();
    let b = dq.bits();
    assert_eq!(b.code_bits, 4.0 * 32768.0);
    assert_eq!(b.param_bits, 8.0 * 512.0 + 32.0 * 2.0 + 32.0);
    assert_eq!(dq.bits_per_weight(), 4.0 + 4192.0 / 32768.0);
    let n = dq.nested.as_ref().unwrap();
    assert_eq!(
        (n.codes.len(), n.nested_absmax.len(), n.blocksize),
        (512, 2, 256)
    );

    // 100 scales (not a multiple of 256): one short nested block
    let w = Array2::from_shape_fn((10, 640), |_| rng.random_range(-1.0f32..1.0));
    let q = quantize_rtn("w", w.view(), &FormatSpec::Fp4, Granularity::Group(64)).unwrap();
    let dq = q.with_double_quant(DoubleQuant::default()).unwrap();
    assert_eq!(dq.bits().param_bits, 800.0 + 32.0 + 32.0);

    // an asymmetric uniform grid keeps its 4-bit zeros; only the f16 scale becomes 8 bits
    let asym = FormatSpec::Uniform(quantlab_grids::UniformGrid::new(4, false).unwrap());
    let q = quantize_rtn("w", w.view(), &asym, Granularity::Group(64)).unwrap();
    assert_eq!(q.bits().param_bits, 100.0 * 20.0);
    let dq = q.with_double_quant(DoubleQuant::default()).unwrap();
    assert_eq!(dq.bits().param_bits, 100.0 * (4.0 + 8.0) + 32.0 + 32.0);
}

#[test]
fn absmax_round_trip_against_brute_force() {
    let mut rng = StdRng::seed_from_u64(32);
    let absmax: Vec<f32> = (0..600).map(|_| rng.random_range(0.01f32..0.2)).collect();
    let n = DoubleQuant::default().quantize_absmax(&absmax).unwrap();
    let mean = absmax.iter().map(|&a| a as f64).sum::<f64>() / 600.0;
    assert!((n.offset as f64 - mean).abs() < 1e-8);
    assert_eq!(n.nested_absmax.len(), 3); // 256 + 256 + 88
    let map = dynamic_map_8bit(true);
    let back = n.dequantize();
    for (i, &a) in absmax.iter().enumerate() {
        let b = i / 256;
        let chunk = &absmax[b * 256..((b + 1) * 256).min(600)];
        let nabs = chunk
            .iter()
            .fold(0.0f32, |m, &x| m.max((x - n.offset).abs()));
        assert_eq!(n.nested_absmax[b], nabs);
        // brute-force nearest map entry to the centred, normalised value
        let y = ((a - n.offset) * (1.0 / nabs)) as f64;
        let c = (0..256)
            .min_by(|&i, &j| ((map[i] as f64 - y).abs()).total_cmp(&(map[j] as f64 - y).abs()))
            .unwrap();
        assert_eq!(n.codes[i] as usize, c, "scale {i}");
        assert_eq!(back[i], map[c] * nabs + n.offset);
        // the widest gap of the map is 0.9 / 64 (decade 10^0) ... except -1 has no code:
        // -0.99296875 is the most negative, so the error is below 0.00704 * nabs
        assert!((back[i] - a).abs() <= 0.007_04 * nabs + 1e-7);
    }
}

#[test]
fn double_quant_errors() {
    let w = Array2::from_shape_fn((4, 64), |(r, k)| (r + k) as f32);
    let q = quantize_rtn("w", w.view(), &FormatSpec::Nf4, Granularity::PerTensor).unwrap();
    assert!(matches!(
        q.with_double_quant(DoubleQuant::default()),
        Err(GridError::InvalidOption { .. })
    ));
    let q = quantize_rtn("w", w.view(), &FormatSpec::Nf4, Granularity::Group(32)).unwrap();
    let dq = q.with_double_quant(DoubleQuant::default()).unwrap();
    assert!(dq.with_double_quant(DoubleQuant::default()).is_err());
    let e = DoubleQuant::default()
        .quantize_absmax(&[1.0, f32::INFINITY])
        .unwrap_err();
    assert!(e.to_string().contains("absmax"), "{e}");
    assert!(DoubleQuant::default().quantize_absmax(&[]).is_err());
    assert!(DoubleQuant { blocksize: 0 }
        .quantize_absmax(&[1.0])
        .is_err());
}
