//! Ragged last group: `Granularity::Group(g)` on a width that `g` does not divide gives
//! `G = ceil(in / g)` groups per row, `g_idx[k] = k / g`, the last group `in - (G - 1) g`
//! columns wide (reference GPTQ and every GPTQ checkpoint). Checked against brute force and
//! by hand.

use ndarray::Array2;
use quantlab_grids::{
    quantize_rtn, FormatSpec, Granularity, GroupParams, QuantizedLinear, UniformGrid, NF4_CODE,
};
use rand::{rngs::StdRng, SeedableRng};
use rand_distr::{Distribution, Normal};

fn matrix(out: usize, inp: usize, seed: u64) -> Array2<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    let normal = Normal::new(0.0f32, 0.05).unwrap();
    Array2::from_shape_fn((out, inp), |(_, k)| {
        // a few outlier columns, one of them in the short last group
        let boost = if k % 37 == 0 || k + 3 == inp {
            8.0
        } else {
            1.0
        };
        boost * normal.sample(&mut rng)
    })
}

/// The reference `find_params` for one group, written out independently.
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

/// Brute-force nearest level, in steps as the reference measures it (ties to even).
fn brute_code(x: f32, p: GroupParams, bits: u32) -> u8 {
    let t = (x / p.scale) as f64;
    let mut best = (f64::INFINITY, 0u32);
    for q in 0..(1u32 << bits) {
        let d = (t - (q as f64 - p.zero as f64)).abs();
        let even = (q as i64 - p.zero as i64) % 2 == 0;
        if d < best.0 || (d == best.0 && even) {
            best = (d, q);
        }
    }
    best.1 as u8
}

/// The groups of a row of `inp` columns in groups of `g`, written out by hand.
fn groups_by_hand(inp: usize, g: usize) -> Vec<(usize, usize)> {
    let mut v = Vec::new();
    let mut start = 0;
    while start < inp {
        v.push((start, (start + g).min(inp)));
        start += g;
    }
    v
}

#[test]
fn rtn_ragged_equals_brute_force_per_group() {
    for &(out, inp, g, bits, sym) in &[
        (7usize, 576usize, 128usize, 4u32, true),
        (7, 576, 128, 4, false),
        (5, 100, 32, 3, false),
        (5, 100, 32, 2, true),
        (3, 33, 32, 4, false), // last group of one column
        (3, 40, 64, 4, true),  // g wider than the row: one group of 40
    ] {
        let w = matrix(out, inp, (inp * 31 + g) as u64);
        let spec = FormatSpec::Uniform(UniformGrid::new(bits, sym).unwrap());
        let q = quantize_rtn("w", w.view(), &spec, Granularity::Group(g)).unwrap();
        let groups = groups_by_hand(inp, g);
        assert_eq!(q.n_groups(), groups.len(), "{inp} / {g}");
        assert_eq!(q.scales.dim(), (out, groups.len()));
        for (gi, &(a, b)) in groups.iter().enumerate() {
            for k in a..b {
                assert_eq!(q.g_idx[k] as usize, gi);
            }
        }
        assert!(q.g_idx_is_trivial());
        for r in 0..out {
            for (gi, &(a, b)) in groups.iter().enumerate() {
                let slab: Vec<f32> = (a..b).map(|k| w[[r, k]]).collect();
                let p = reference_params(&slab, bits, sym);
                assert_eq!(
                    (q.scales[[r, gi]], q.zeros[[r, gi]]),
                    (p.scale, p.zero),
                    "row {r} group {gi} ({a}..{b}) of {inp} / {g}"
                );
                for k in a..b {
                    assert_eq!(
                        q.codes[[r, k]],
                        brute_code(w[[r, k]], p, bits),
                        "({r}, {k})"
                    );
                }
            }
        }
    }
}

#[test]
fn nf4_ragged_equals_brute_force_nearest_level() {
    let (out, inp, g) = (4usize, 200usize, 64usize); // groups of 64, 64, 64, 8
    let w = matrix(out, inp, 99);
    let q = quantize_rtn("w", w.view(), &FormatSpec::Nf4, Granularity::Group(g)).unwrap();
    assert_eq!(q.n_groups(), 4);
    let deq = q.dequantize();
    for r in 0..out {
        for (gi, (a, b)) in groups_by_hand(inp, g).into_iter().enumerate() {
            let absmax = (a..b).fold(0.0f32, |m, k| m.max(w[[r, k]].abs()));
            assert_eq!(q.scales[[r, gi]], absmax, "row {r} group {gi}");
            for k in a..b {
                let x = w[[r, k]] * (1.0 / absmax); // bitsandbytes multiplies by 1/absmax
                let (mut best, mut bd) = (0usize, f32::INFINITY);
                for (c, &l) in NF4_CODE.iter().enumerate() {
                    let d = (x - l).abs();
                    if d < bd {
                        (best, bd) = (c, d);
                    }
                }
                assert_eq!(q.codes[[r, k]] as usize, best, "({r}, {k})");
                assert_eq!(deq[[r, k]], NF4_CODE[best] * absmax);
            }
        }
    }
}

#[test]
fn bits_and_g_idx_by_hand_576_g128() {
    // SmolLM2's 576-column layers: 4 groups of 128 and one of 64
    let (out, inp) = (16usize, 576usize);
    let w = matrix(out, inp, 3);
    let sym4 = FormatSpec::Uniform(UniformGrid::new(4, true).unwrap());
    let asym4 = FormatSpec::Uniform(UniformGrid::new(4, false).unwrap());
    let q = quantize_rtn("w", w.view(), &sym4, Granularity::Group(128)).unwrap();
    assert_eq!(q.n_groups(), 5);
    let expect: Vec<u32> = (0..576)
        .map(|k| match k {
            0..=127 => 0,
            128..=255 => 1,
            256..=383 => 2,
            384..=511 => 3,
            _ => 4,
        })
        .collect();
    assert_eq!(q.g_idx, expect);
    let b = q.bits();
    assert_eq!(b.weights, 16 * 576);
    assert_eq!(b.code_bits, 4.0 * 16.0 * 576.0);
    assert_eq!(b.param_bits, 16.0 * 5.0 * 16.0); // 16 rows x 5 groups x f16 scale
    assert_eq!(b.index_bits, 0.0);
    assert_eq!(q.bits_per_weight(), 4.0 + 80.0 / 576.0); // 4.1389, not 4.125
    let qa = quantize_rtn("w", w.view(), &asym4, Granularity::Group(128)).unwrap();
    assert_eq!(qa.bits_per_weight(), 4.0 + 5.0 * 20.0 / 576.0);
    // an act-order g_idx (positions / 128 of a permutation) is not trivial: 32 bits a column
    let mut perm: Vec<usize> = (0..576).collect();
    perm.reverse();
    let mut g_idx = vec![0u32; 576];
    for (p, &k) in perm.iter().enumerate() {
        g_idx[k] = (p / 128) as u32;
    }
    assert_eq!(g_idx[575], 0);
    assert_eq!(g_idx[0], 4); // the last position falls in the short group
    assert_eq!(g_idx.iter().filter(|&&g| g == 4).count(), 64);
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
    assert_eq!(q2.bits().index_bits, 32.0 * 576.0);
    // Granularity helpers agree
    let gr = Granularity::Group(128);
    assert_eq!(gr.n_groups(576), 5);
    assert_eq!(gr.group_range(0, 576), 0..128);
    assert_eq!(gr.group_range(4, 576), 512..576);
}

#[test]
fn ragged_group_with_double_quant_counts_every_scale() {
    use quantlab_grids::DoubleQuant;
    let w = matrix(8, 200, 5); // NF4 g64: 4 groups per row, 32 scales
    let q = quantize_rtn("w", w.view(), &FormatSpec::Nf4, Granularity::Group(64))
        .unwrap()
        .with_double_quant(DoubleQuant::default())
        .unwrap();
    assert_eq!(q.scales.len(), 32);
    // 8-bit codes for 32 scales, one nested block (f32 absmax), the f32 offset
    let expected = 4.0 + (8.0 * 32.0 + 32.0 + 32.0) / (8.0 * 200.0);
    assert!((q.bits_per_weight() - expected).abs() < 1e-12);
}
