//! NF4 / FP4 codebooks: tables bit-exact against the published literals, encoding against
//! brute-force nearest code, bitsandbytes' flattened block layout.

use ndarray::Array2;
use proptest::prelude::*;
use quantlab_grids::codebook::{dequantize_blockwise, quantize_blockwise};
use quantlab_grids::{
    quantize_rtn, Codebook, Format, FormatSpec, Granularity, GroupParams, FP4_CODE, NF4_CODE,
};
use rand::{rngs::StdRng, Rng, SeedableRng};

/// The NF4 table as printed in docs/formats.md (bitsandbytes' `get_4bit_type("nf4")`).
const NF4_LITERALS: [&str; 16] = [
    "-1.0",
    "-0.6961928009986877",
    "-0.5250730514526367",
    "-0.39491748809814453",
    "-0.28444138169288635",
    "-0.18477343022823334",
    "-0.09105003625154495",
    "0.0",
    "0.07958029955625534",
    "0.16093020141124725",
    "0.24611230194568634",
    "0.33791524171829224",
    "0.44070982933044434",
    "0.5626170039176941",
    "0.7229568362236023",
    "1.0",
];

#[test]
fn nf4_table_is_bit_exact() {
    for (i, lit) in NF4_LITERALS.iter().enumerate() {
        let d: f64 = lit.parse().unwrap();
        // the literal is the shortest decimal of an f32 widened to f64: exactly an f32
        assert_eq!((d as f32) as f64, d, "literal {lit} is not an f32");
        assert_eq!(NF4_CODE[i].to_bits(), (d as f32).to_bits(), "NF4[{i}]");
    }
    let nf4 = Codebook::nf4();
    assert_eq!(nf4.values(), &NF4_CODE);
    assert_eq!((nf4.code_bits(), nf4.param_bits()), (4, 32.0));
}

#[test]
fn fp4_table_is_listed_values_over_12() {
    let listed = [
        0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0,
        -3.0f64,
    ];
    for (i, v) in listed.iter().enumerate() {
        let want = (v / 12.0) as f32; // f64 quotient rounded once: the f32 quotient
        assert_eq!(FP4_CODE[i].to_bits(), want.to_bits(), "FP4[{i}]");
    }
    assert_eq!(FP4_CODE[3], 1.0);
    assert!(FP4_CODE[8].is_sign_negative() && FP4_CODE[8] == 0.0);
}

/// Brute force: the value of the nearest code to `clamp(x * (1 / absmax), -1, 1)` (exact
/// distances in f64).
fn brute_value(table: &[f32], x: f32, absmax: f32) -> f32 {
    let y = if absmax == 0.0 {
        0.0
    } else {
        (x * (1.0 / absmax)).clamp(-1.0, 1.0)
    };
    let mut best = (f64::INFINITY, 0.0f32);
    for &c in table {
        let d = (y as f64 - c as f64).abs();
        if d < best.0 {
            best = (d, c);
        }
    }
    best.1 * absmax
}

#[test]
fn encode_equals_brute_force_nearest() {
    let mut rng = StdRng::seed_from_u64(11);
    for (book, table) in [(Codebook::nf4(), NF4_CODE), (Codebook::fp4(), FP4_CODE)] {
        for _ in 0..200 {
            let absmax = rng.random_range(0.01f32..5.0);
            let p = GroupParams::scale_only(absmax);
            for _ in 0..50 {
                let x = rng.random_range(-1.3 * absmax..1.3 * absmax);
                let got = book.quantize(x, p);
                assert_eq!(got, brute_value(&table, x, absmax), "{} x {x}", book.name());
                assert_eq!(got, table[book.encode(x, p) as usize] * absmax);
            }
        }
        // fit is the absmax
        assert_eq!(book.fit(&[0.25, -3.5, 1.0]).scale, 3.5);
        assert_eq!(book.fit(&[0.0, 0.0]).scale, 0.0);
        // a zero block decodes to zero
        assert_eq!(book.quantize(0.0, GroupParams::scale_only(0.0)), 0.0);
    }
}

#[test]
fn nf4_ties_go_to_the_lower_code() {
    let nf4 = Codebook::nf4();
    let p = GroupParams::scale_only(1.0);
    let mut exact_ties = 0;
    for i in 0..15 {
        let m = (NF4_CODE[i] as f64 + NF4_CODE[i + 1] as f64) / 2.0;
        let m32 = m as f32;
        if m32 as f64 == m {
            // an exact midpoint: goes down, like bitsandbytes' `x > pivot` tree
            assert_eq!(nf4.encode(m32, p) as usize, i, "midpoint {m}");
            exact_ties += 1;
        }
        assert_eq!(nf4.encode(m32.next_down(), p) as usize, i);
        assert_eq!(nf4.encode(m32.next_up(), p) as usize, i + 1);
    }
    // e.g. between 0 and 0.0795802995... the midpoint is exact (a halving)
    assert!(exact_ties >= 2);
    assert_eq!(nf4.encode(0.039_790_15, p), 7);
}

#[test]
fn fp4_is_sign_magnitude_with_ties_toward_zero() {
    let fp4 = Codebook::fp4();
    let p = GroupParams::scale_only(12.0); // codes become 0, 0.0625, 2, 3, 4, 6, 8, 12
    assert_eq!(fp4.encode(0.0, p), 0);
    assert_eq!(fp4.encode(-0.0, p), 0);
    assert_eq!(fp4.encode(-1e-6, p), 8); // -0
                                         // ties: 2.5 between 2 and 3 -> 2 (toward zero); 5.0 between 4 and 6 -> 4; 10 -> 8
    for (x, c) in [(2.5f32, 6u8), (5.0, 4), (10.0, 2), (7.0, 5), (1.03125, 1)] {
        assert_eq!(fp4.encode(x, p), c, "x {x}");
        assert_eq!(fp4.encode(-x, p), c + 8, "x {}", -x);
        assert_eq!(fp4.quantize(-x, p), -fp4.quantize(x, p));
    }
    assert_eq!(fp4.quantize(2.51, p), 3.0);
    assert_eq!(fp4.quantize(-2.51, p), -3.0);
    assert_eq!(fp4.quantize(100.0, p), 12.0); // clamped to the absmax
}

#[test]
fn blockwise_flat_layout_with_a_short_tail() {
    let mut rng = StdRng::seed_from_u64(12);
    let values: Vec<f32> = (0..1000).map(|_| rng.random_range(-2.0f32..2.0)).collect();
    let nf4 = Codebook::nf4();
    let (codes, absmax) = quantize_blockwise(&values, &nf4, 64);
    assert_eq!(codes.len(), 1000);
    assert_eq!(absmax.len(), 16); // 15 full blocks and one of 40
    for (b, chunk) in values.chunks(64).enumerate() {
        let m = chunk.iter().fold(0.0f32, |m, x| m.max(x.abs()));
        assert_eq!(absmax[b], m);
    }
    let back = dequantize_blockwise(&codes, &absmax, &nf4, 64);
    for (i, (&x, &y)) in values.iter().zip(&back).enumerate() {
        assert_eq!(y, brute_value(&NF4_CODE, x, absmax[i / 64]), "i {i}");
    }
}

#[test]
fn group_64_equals_flattened_blocks_when_in_is_a_multiple() {
    let mut rng = StdRng::seed_from_u64(13);
    let w = Array2::from_shape_fn((5, 192), |_| rng.random_range(-1.0f32..1.0));
    for (spec, book) in [
        (FormatSpec::Nf4, Codebook::nf4()),
        (FormatSpec::Fp4, Codebook::fp4()),
    ] {
        let q = quantize_rtn("w", w.view(), &spec, Granularity::Group(64)).unwrap();
        let flat: Vec<f32> = w.iter().copied().collect();
        let (codes, absmax) = quantize_blockwise(&flat, &book, 64);
        assert_eq!(q.codes.iter().copied().collect::<Vec<_>>(), codes);
        assert_eq!(q.scales.iter().copied().collect::<Vec<_>>(), absmax);
        assert!(q.zeros.iter().all(|&z| z == 0.0));
        let dq: Vec<f32> = q.dequantize().iter().copied().collect();
        assert_eq!(dq, dequantize_blockwise(&codes, &absmax, &book, 64));
    }
}

#[test]
fn custom_codebook_and_its_errors() {
    let c = Codebook::new("t3", &[0.5, -1.0, 0.0]).unwrap();
    assert_eq!(c.code_bits(), 2);
    let p = GroupParams::scale_only(1.0);
    assert_eq!(c.encode(0.25, p), 2); // tie between 0 and 0.5 -> lower
    assert_eq!(c.encode(0.26, p), 0);
    assert_eq!(c.encode(-0.8, p), 1);
    assert!(Codebook::new("bad", &[0.0, 1.5]).is_err());
    assert!(Codebook::new("bad", &[0.0, f32::NAN]).is_err());
    assert!(Codebook::new("bad", &[0.0]).is_err());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn codebook_round_trips(
        x in -3.0f32..3.0,
        absmax in 0.001f32..3.0,
        fp4 in any::<bool>(),
    ) {
        let (book, table) = if fp4 { (Codebook::fp4(), FP4_CODE) } else { (Codebook::nf4(), NF4_CODE) };
        let p = GroupParams::scale_only(absmax);
        let levels = book.levels(p);
        let q = book.quantize(x, p);
        prop_assert!(levels.contains(&q));
        prop_assert_eq!(book.quantize(q, p), q);
        // inside [-absmax, absmax] the error is at most half the widest gap of the table
        let mut sorted = table.to_vec();
        sorted.sort_by(f32::total_cmp);
        let gap = sorted.windows(2).map(|w| w[1] - w[0]).fold(0.0f32, f32::max);
        if x.abs() <= absmax {
            prop_assert!((x - q).abs() <= gap / 2.0 * absmax * (1.0 + 1e-5));
        }
        for (c, &l) in levels.iter().enumerate() {
            prop_assert_eq!(book.decode(book.encode(l, p), p), l);
            if !fp4 {
                prop_assert_eq!(book.encode(l, p) as usize, c);
            }
        }
    }
}
