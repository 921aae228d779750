//! Uniform grids against the reference GPTQ `quant.py` conventions, by hand and by brute force.

use ndarray::Array2;
use proptest::prelude::*;
use quantlab_grids::{
    quantize_rtn, Format, FormatSpec, Granularity, GroupParams, MseClip, QuantizedLinear,
    UniformGrid,
};
use rand::{rngs::StdRng, Rng, SeedableRng};
use rand_distr::{Distribution, Normal};

/// Brute force: the code `q in 0..=maxq` whose level is nearest to `x`, measured in steps
/// as the reference does (`t = x / scale`, one f32 division, then exact distances
/// `|t - (q - z)|`); an exact tie goes to the even `q - z` (round half to even).
/// The symmetric grid puts `+-max|x|` exactly at half a step beyond the end levels, so
/// ties are common there and the f32 quotient decides them, as in torch.
fn brute_code(x: f32, p: GroupParams, bits: u32) -> u8 {
    let maxq = (1u32 << bits) - 1;
    let t = (x / p.scale) as f64;
    let mut best = (f64::INFINITY, 0u32);
    for q in 0..=maxq {
        let d = (t - (q as f64 - p.zero as f64)).abs();
        let even = (q as i64 - p.zero as i64) % 2 == 0;
        if d < best.0 || (d == best.0 && even) {
            best = (d, q);
        }
    }
    best.1 as u8
}

/// Independent statement of the reference `find_params` (no clipping).
fn reference_params(w: &[f32], bits: u32, sym: bool) -> GroupParams {
    let maxq = ((1u32 << bits) - 1) as f32;
    let mut xmin = w.iter().copied().fold(0.0f32, f32::min);
    let mut xmax = w.iter().copied().fold(0.0f32, f32::max);
    if sym {
        xmax = xmax.max(-xmin);
        if xmin < 0.0 {
            xmin = -xmax;
        }
    }
    if xmin == 0.0 && xmax == 0.0 {
        (xmin, xmax) = (-1.0, 1.0);
    }
    let scale = (xmax - xmin) / maxq;
    let zero = if sym {
        (maxq + 1.0) / 2.0
    } else {
        (-xmin / scale).round_ties_even()
    };
    GroupParams { scale, zero }
}

fn random_groups(rng: &mut StdRng, n: usize, len: usize) -> Vec<Vec<f32>> {
    let normal = Normal::new(0.0f32, 1.0).unwrap();
    (0..n)
        .map(|i| {
            let shift = match i % 4 {
                0 => 0.0,
                1 => 3.0,  // all positive: the symmetric quirk
                2 => -3.0, // all negative
                _ => 0.7,
            };
            (0..len).map(|_| normal.sample(rng) + shift).collect()
        })
        .collect()
}

#[test]
fn gptq_conventions_by_hand() {
    let a4 = UniformGrid::new(4, false).unwrap();
    let s4 = UniformGrid::new(4, true).unwrap();
    // asym [-1, 0.5, 2]: scale 3 / 15, zero round(1 / 0.2) = 5
    let p = a4.fit(&[-1.0, 0.5, 2.0]);
    assert_eq!(p.scale, 3.0f32 / 15.0);
    assert_eq!(p.zero, 5.0);
    // sym [-1, 0.5, 2]: range +-2, scale 4 / 15, zero (15 + 1) / 2 = 8
    let p = s4.fit(&[-1.0, 0.5, 2.0]);
    assert_eq!(p.scale, 4.0f32 / 15.0);
    assert_eq!(p.zero, 8.0);
    // sym with no negative value keeps xmin = 0 (reference quirk): scale 3 / 15, zero 8,
    // so the top level is 7 * 0.2 = 1.4 and 3.0 clips there
    let p = s4.fit(&[0.5, 3.0]);
    assert_eq!(p.scale, 3.0f32 / 15.0);
    assert_eq!(p.zero, 8.0);
    assert_eq!(s4.encode(3.0, p), 15);
    assert!((s4.quantize(3.0, p) - 1.4).abs() < 1e-6);
    // asym all positive: range forced to include 0: [0, 3], zero 0
    let p = a4.fit(&[1.0, 3.0]);
    assert_eq!((p.scale, p.zero), (0.2, 0.0));
    // all-zero group: range [-1, 1]; asym zero = round(1 / s) with s = f32(2/15) =
    // 0.13333334 > 2/15, so 1 / s = 7.4999996 in f32 and the zero is 7 (torch agrees: f32)
    let p = a4.fit(&[0.0, 0.0]);
    assert_eq!(1.0f32 / (2.0f32 / 15.0), 7.4999995);
    assert_eq!((p.scale, p.zero), (2.0f32 / 15.0, 7.0));
    let p = s4.fit(&[0.0; 4]);
    assert_eq!((p.scale, p.zero), (2.0f32 / 15.0, 8.0));
    // symmetric zero (maxq + 1) / 2 for every width
    for (bits, z) in [(2, 2.0), (3, 4.0), (8, 128.0)] {
        let g = UniformGrid::new(bits, true).unwrap();
        assert_eq!(g.fit(&[-1.0, 1.0]).zero, z);
        assert_eq!(g.maxq(), ((1u32 << bits) - 1) as f32);
    }
    // round half to even on x / s: s = 0.25, z = 8
    let p = GroupParams {
        scale: 0.25,
        zero: 8.0,
    };
    assert_eq!(s4.encode(0.125, p), 8); // 0.5 -> 0
    assert_eq!(s4.encode(0.375, p), 10); // 1.5 -> 2
    assert_eq!(s4.encode(-0.375, p), 6); // -1.5 -> -2
    assert_eq!(s4.encode(-0.625, p), 6); // -2.5 -> -2
    assert_eq!(s4.quantize_with(0.625, p), 0.5); // 2.5 -> 2
    assert_eq!(s4.quantize_with(100.0, p), 7.0 * 0.25); // clamp to maxq
    assert_eq!(s4.quantize_with(-100.0, p), -8.0 * 0.25); // clamp to 0
}

#[test]
fn fit_matches_reference_find_params() {
    let mut rng = StdRng::seed_from_u64(1);
    for bits in 2..=8 {
        for sym in [false, true] {
            let g = UniformGrid::new(bits, sym).unwrap();
            for w in random_groups(&mut rng, 12, 32) {
                assert_eq!(
                    g.fit(&w),
                    reference_params(&w, bits, sym),
                    "bits {bits} sym {sym}"
                );
                let (lo, hi) = g.initial_range(&w);
                assert!(lo <= 0.0 && hi >= 0.0);
                assert_eq!((hi - lo) / g.maxq(), g.fit(&w).scale);
            }
        }
    }
}

#[test]
fn encode_equals_brute_force_nearest() {
    let mut rng = StdRng::seed_from_u64(2);
    let mut checked = 0;
    for bits in 2..=8 {
        for sym in [false, true] {
            let g = UniformGrid::new(bits, sym).unwrap();
            for w in random_groups(&mut rng, 20, 64) {
                let p = g.fit(&w);
                // also values outside the range, which must clamp
                let extra: Vec<f32> = (0..16).map(|_| rng.random_range(-8.0f32..8.0)).collect();
                for &x in w.iter().chain(&extra) {
                    let c = g.encode(x, p);
                    assert_eq!(
                        c,
                        brute_code(x, p, bits),
                        "x {x} bits {bits} sym {sym} {p:?}"
                    );
                    assert_eq!(g.quantize(x, p), g.decode(c, p));
                    checked += 1;
                }
            }
        }
    }
    assert!(checked > 20_000);
}

/// Brute-force clipping search over the reference shrink grid: for each `p = 1 - i / grid`,
/// parameters from the shrunk range, every weight to its brute-force nearest level, error
/// `sum |q - x|^norm`; the first strict minimum wins.
fn brute_clip(w: &[f32], bits: u32, sym: bool, clip: MseClip) -> GroupParams {
    let base = reference_params(w, bits, sym);
    let maxq = ((1u32 << bits) - 1) as f32;
    let mut xmin = w.iter().copied().fold(0.0f32, f32::min);
    let mut xmax = w.iter().copied().fold(0.0f32, f32::max);
    if sym {
        xmax = xmax.max(-xmin);
        if xmin < 0.0 {
            xmin = -xmax;
        }
    }
    if xmin == 0.0 && xmax == 0.0 {
        (xmin, xmax) = (-1.0, 1.0);
    }
    let mut best = (f32::INFINITY, base);
    for i in 0..80 {
        let p = (1.0 - i as f64 / 100.0) as f32;
        let (lo, hi) = (p * xmin, p * xmax);
        let scale = (hi - lo) / maxq;
        let zero = if sym {
            base.zero
        } else {
            (-lo / scale).round_ties_even()
        };
        let gp = GroupParams { scale, zero };
        let err: f32 = w
            .iter()
            .map(|&x| {
                let q = brute_code(x, gp, bits) as f32;
                (scale * (q - zero) - x).abs().powf(clip.norm)
            })
            .sum();
        if err < best.0 {
            best = (err, gp);
        }
    }
    best.1
}

#[test]
fn mse_clip_equals_brute_force_over_shrink_grid() {
    let mut rng = StdRng::seed_from_u64(3);
    let clip = MseClip::default();
    assert_eq!((clip.grid, clip.max_shrink, clip.norm), (100, 0.8, 2.4));
    let mut shrunk = 0;
    for bits in [2, 3, 4, 8] {
        for sym in [false, true] {
            let g = UniformGrid::new(bits, sym).unwrap().with_clip(clip);
            for mut w in random_groups(&mut rng, 8, 64) {
                w[5] *= 6.0; // an outlier makes clipping worthwhile
                let got = g.fit(&w);
                assert_eq!(
                    got,
                    brute_clip(&w, bits, sym, clip),
                    "bits {bits} sym {sym}"
                );
                if got.scale < reference_params(&w, bits, sym).scale {
                    shrunk += 1;
                }
            }
        }
    }
    assert!(
        shrunk > 10,
        "the search should shrink most ranges ({shrunk})"
    );
}

fn matrix(out: usize, inp: usize, seed: u64) -> Array2<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    let normal = Normal::new(0.0f32, 0.05).unwrap();
    Array2::from_shape_fn((out, inp), |_| normal.sample(&mut rng))
}

#[test]
fn bits_per_weight_by_hand() {
    let w = matrix(16, 256, 4);
    let sym4 = FormatSpec::Uniform(UniformGrid::new(4, true).unwrap());
    let asym4 = FormatSpec::Uniform(UniformGrid::new(4, false).unwrap());
    let asym3 = FormatSpec::Uniform(UniformGrid::new(3, false).unwrap());
    let bpw = |spec: &FormatSpec, g| {
        quantize_rtn("w", w.view(), spec, g)
            .unwrap()
            .bits_per_weight()
    };
    assert_eq!(bpw(&sym4, Granularity::Group(128)), 4.125); // 4 + 16/128
    assert_eq!(bpw(&asym4, Granularity::Group(128)), 4.15625); // 4 + (16+4)/128
    assert_eq!(bpw(&asym3, Granularity::Group(64)), 3.0 + 19.0 / 64.0);
    assert_eq!(bpw(&sym4, Granularity::PerChannel), 4.0 + 16.0 / 256.0);
    assert_eq!(bpw(&sym4, Granularity::PerTensor), 4.0 + 16.0 / 4096.0);
    assert_eq!(bpw(&FormatSpec::Nf4, Granularity::Group(64)), 4.5); // f32 absmax / 64
    assert_eq!(
        bpw(&FormatSpec::Int8, Granularity::PerChannel),
        8.0 + 32.0 / 256.0
    );
    let q = quantize_rtn("w", w.view(), &sym4, Granularity::Group(128)).unwrap();
    let b = q.bits();
    assert_eq!(b.weights, 4096);
    assert_eq!(b.code_bits, 4.0 * 4096.0);
    assert_eq!(b.param_bits, 16.0 * 32.0); // 16 rows x 2 groups x f16
    assert_eq!(b.index_bits, 0.0);
    assert!(q.g_idx_is_trivial());
    // an act-order g_idx (not k / g) costs 32 bits per input column
    let mut g_idx: Vec<u32> = (0..256).map(|k| (k / 128) as u32).collect();
    g_idx.swap(0, 255);
    let q2 = QuantizedLinear::from_parts(
        q.spec.clone(),
        q.granularity,
        q.codes.clone(),
        q.scales.clone(),
        q.zeros.clone(),
        g_idx,
    )
    .unwrap();
    assert!(!q2.g_idx_is_trivial());
    assert_eq!(q2.bits().index_bits, 32.0 * 256.0);
    assert_eq!(q2.bits_per_weight(), 4.125 + 32.0 / 16.0);
}

#[test]
fn rtn_matrix_matches_groupwise_fit_and_mse() {
    let w = matrix(6, 96, 5);
    let g = UniformGrid::new(3, false).unwrap();
    let q = quantize_rtn(
        "w",
        w.view(),
        &FormatSpec::Uniform(g),
        Granularity::Group(32),
    )
    .unwrap();
    assert_eq!((q.shape(), q.n_groups()), ((6, 96), 3));
    let mut sse = 0.0f64;
    for r in 0..6 {
        for gi in 0..3 {
            let slab: Vec<f32> = (0..32).map(|j| w[[r, gi * 32 + j]]).collect();
            let p = reference_params(&slab, 3, false);
            assert_eq!(q.params(r, gi * 32), p);
            for (j, &x) in slab.iter().enumerate() {
                let c = brute_code(x, p, 3);
                assert_eq!(q.codes[[r, gi * 32 + j]], c);
                let d = p.scale * (c as f32 - p.zero) - x;
                sse += (d as f64).powi(2);
            }
        }
    }
    let mse = (sse / (6.0 * 96.0)) as f32;
    assert!((q.mse(w.view()) - mse).abs() <= 1e-6 * mse);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn uniform_round_trips(
        w in prop::collection::vec(-10.0f32..10.0, 1..40),
        x in -12.0f32..12.0,
        bits in 2u32..=8,
        sym in any::<bool>(),
    ) {
        let g = UniformGrid::new(bits, sym).unwrap();
        let p = g.fit(&w);
        let levels = g.levels(p);
        prop_assert_eq!(levels.len(), 1usize << bits);
        let q = g.quantize(x, p);
        // decode(encode(x)) is a level
        prop_assert!(levels.contains(&q));
        // idempotent
        prop_assert_eq!(g.quantize(q, p), q);
        // inside the range, the error is at most half a step
        let (lo, hi) = (levels[0], levels[levels.len() - 1]);
        if x >= lo && x <= hi {
            prop_assert!((x - q).abs() <= p.scale / 2.0 * (1.0 + 1e-5), "x {} q {} {:?}", x, q, p);
        }
        // encoding a level returns its code
        for (c, &l) in levels.iter().enumerate() {
            prop_assert_eq!(g.encode(l, p) as usize, c);
        }
    }
}
