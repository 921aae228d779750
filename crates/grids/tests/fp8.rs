//! FP8 E4M3 / E5M2: all 256 codes against an independent bit-field decoder, round to nearest
//! even on every midpoint, saturation and overflow.

use ndarray::Array2;
use proptest::prelude::*;
use quantlab_grids::fp8::{decode_e4m3, decode_e5m2, encode_e4m3, encode_e5m2};
use quantlab_grids::{quantize_rtn, Format, FormatSpec, Fp8Format, Fp8Kind, Granularity};
use rand::{rngs::StdRng, Rng, SeedableRng};

/// Independent decoder: `(-1)^s * 2^(e - bias) * (1 + m / 2^M)`, subnormal
/// `(-1)^s * 2^(1 - bias) * m / 2^M`; specials per format. Computed in f64.
fn reference_decode(code: u8, e_bits: u32, m_bits: u32, ieee_specials: bool) -> f64 {
    let bias = (1i32 << (e_bits - 1)) - 1;
    let s = if code >> 7 == 1 { -1.0 } else { 1.0 };
    let e = ((code >> m_bits) as u32 & ((1 << e_bits) - 1)) as i32;
    let m = (code as u32 & ((1 << m_bits) - 1)) as f64;
    let e_max_field = (1 << e_bits) - 1;
    let frac = m / (1u32 << m_bits) as f64;
    if ieee_specials && e == e_max_field {
        return if m == 0.0 {
            s * f64::INFINITY
        } else {
            f64::NAN
        };
    }
    if !ieee_specials && e == e_max_field && m as u32 == (1 << m_bits) - 1 {
        return f64::NAN; // E4M3: only S.1111.111 is NaN
    }
    if e == 0 {
        s * 2f64.powi(1 - bias) * frac
    } else {
        s * 2f64.powi(e - bias) * (1.0 + frac)
    }
}

struct Kind {
    encode: fn(f32) -> u8,
    decode: fn(u8) -> f32,
    e_bits: u32,
    m_bits: u32,
    ieee: bool,
}

const E4M3: Kind = Kind {
    encode: encode_e4m3,
    decode: decode_e4m3,
    e_bits: 4,
    m_bits: 3,
    ieee: false,
};
const E5M2: Kind = Kind {
    encode: encode_e5m2,
    decode: decode_e5m2,
    e_bits: 5,
    m_bits: 2,
    ieee: true,
};

#[test]
fn all_256_codes_decode_and_reencode() {
    for k in [E4M3, E5M2] {
        let mut nans = 0;
        for c in 0..=255u8 {
            let want = reference_decode(c, k.e_bits, k.m_bits, k.ieee);
            let got = (k.decode)(c);
            if want.is_nan() {
                assert!(got.is_nan(), "code {c:#04x}");
                nans += 1;
                continue;
            }
            assert_eq!(got as f64, want, "code {c:#04x}");
            assert_eq!(got.is_sign_negative(), c >> 7 == 1, "sign of {c:#04x}");
            assert_eq!((k.encode)(got), c, "re-encode {c:#04x} ({got})");
        }
        assert_eq!(nans, if k.ieee { 6 } else { 2 });
    }
    assert_eq!(decode_e4m3(0x7E), 448.0);
    assert_eq!(decode_e4m3(0x01), 2f32.powi(-9));
    assert_eq!(decode_e5m2(0x7B), 57344.0);
    assert_eq!(decode_e5m2(0x01), 2f32.powi(-16));
    assert_eq!(decode_e5m2(0x7C), f32::INFINITY);
    // NaN in, NaN out
    assert!(decode_e4m3(encode_e4m3(f32::NAN)).is_nan());
    assert!(decode_e5m2(encode_e5m2(f32::NAN)).is_nan());
}

/// Finite non-negative values of a kind with their codes, ascending.
fn finite_positive(k: &Kind) -> Vec<(f64, u8)> {
    let mut v: Vec<(f64, u8)> = (0..128u8)
        .map(|c| (reference_decode(c, k.e_bits, k.m_bits, k.ieee), c))
        .filter(|(x, _)| x.is_finite())
        .collect();
    v.sort_by(|a, b| a.0.total_cmp(&b.0));
    v
}

#[test]
fn midpoints_round_to_even() {
    for k in [E4M3, E5M2] {
        let vals = finite_positive(&k);
        for w in vals.windows(2) {
            let ((a, ca), (b, cb)) = (w[0], w[1]);
            let m = ((a + b) / 2.0) as f32;
            assert_eq!(m as f64, (a + b) / 2.0, "midpoint exact in f32");
            let even = if ca % 2 == 0 { ca } else { cb };
            assert_eq!((k.encode)(m), even, "tie between {a} and {b}");
            assert_eq!((k.encode)(-m), even | 0x80);
            assert_eq!((k.encode)(m.next_down()), ca);
            assert_eq!((k.encode)(m.next_up()), cb);
        }
    }
    // hand-picked: 1.0625 is halfway between 1 (0x38, even) and 1.125 (0x39) in E4M3
    assert_eq!(encode_e4m3(1.0625), 0x38);
    assert_eq!(encode_e4m3(1.1875), 0x3A); // between 1.125 and 1.25 -> 1.25 (even)
                                           // below the smallest subnormal: half of it is a tie with 0 -> 0
    assert_eq!(encode_e4m3(2f32.powi(-10)), 0x00);
    assert_eq!(encode_e4m3(2f32.powi(-10).next_up()), 0x01);
    assert_eq!(encode_e5m2(2f32.powi(-17)), 0x00);
    assert_eq!(encode_e5m2(-2f32.powi(-17)), 0x80);
    assert_eq!(encode_e5m2(1e-30), 0x00);
}

#[test]
fn saturation_and_overflow() {
    // E4M3 saturates to +-448, infinities included
    for x in [448.0f32, 460.0, 464.0, 480.0, 1e6, f32::MAX, f32::INFINITY] {
        assert_eq!(encode_e4m3(x), 0x7E, "{x}");
        assert_eq!(encode_e4m3(-x), 0xFE, "{}", -x);
    }
    assert_eq!(encode_e4m3(432.0), 0x7E); // tie 416 | 448 -> 448 (even mantissa 110)
    assert_eq!(encode_e4m3(431.0), 0x7D); // 416
                                          // E5M2 overflows like IEEE: up to 61440 (exclusive) rounds to 57344, from 61440 to inf
    assert_eq!(encode_e5m2(57344.0), 0x7B);
    assert_eq!(encode_e5m2(61440.0f32.next_down()), 0x7B);
    assert_eq!(encode_e5m2(61440.0), 0x7C);
    assert_eq!(encode_e5m2(-1e9), 0xFC);
    assert_eq!(encode_e5m2(f32::INFINITY), 0x7C);
    assert_eq!(encode_e5m2(f32::NEG_INFINITY), 0xFC);
}

/// Brute force over the finite codes: nearest by exact f64 distance, ties to the even code.
fn brute_encode(k: &Kind, x: f32) -> u8 {
    let vals = finite_positive(k);
    let a = x.abs() as f64;
    let mut best = (f64::INFINITY, 0u8);
    for &(v, c) in &vals {
        let d = (a - v).abs();
        if d < best.0 || (d == best.0 && c % 2 == 0) {
            best = (d, c);
        }
    }
    if x < 0.0 {
        best.1 | 0x80
    } else {
        best.1
    }
}

#[test]
fn encode_equals_brute_force_on_random_values() {
    let mut rng = StdRng::seed_from_u64(21);
    for k in [E4M3, E5M2] {
        let max_exp = if k.ieee { 15.9 } else { 8.8 };
        let min_exp = if k.ieee { -18.0 } else { -11.0 };
        for _ in 0..20_000 {
            let mag = 2f32.powf(rng.random_range(min_exp..max_exp));
            let x = if rng.random::<bool>() { mag } else { -mag };
            assert_eq!((k.encode)(x), brute_encode(&k, x), "x {x}");
        }
    }
}

#[test]
fn fp8_format_scales_per_tensor_and_per_channel() {
    let mut rng = StdRng::seed_from_u64(22);
    let mut w = Array2::from_shape_fn((4, 64), |_| rng.random_range(-1.0f32..1.0));
    w[[2, 7]] = -30.0;
    for kind in [Fp8Kind::E4M3, Fp8Kind::E5M2] {
        let f = Fp8Format::new(kind);
        let spec = FormatSpec::Fp8(kind);
        let qc = quantize_rtn("w", w.view(), &spec, Granularity::PerChannel).unwrap();
        assert_eq!(qc.bits_per_weight(), 8.0 + 32.0 / 64.0);
        for r in 0..4 {
            let amax = w.row(r).iter().fold(0.0f32, |m, x| m.max(x.abs()));
            let s = qc.scales[[r, 0]];
            assert_eq!(s, amax / kind.max_finite());
            for k in 0..64 {
                let want = kind.decode(brute_encode(
                    if kind == Fp8Kind::E4M3 { &E4M3 } else { &E5M2 },
                    (w[[r, k]] / s).clamp(-kind.max_finite(), kind.max_finite()),
                )) * s;
                assert_eq!(qc.dequantize()[[r, k]], want);
            }
        }
        let qt = quantize_rtn("w", w.view(), &spec, Granularity::PerTensor).unwrap();
        assert_eq!(qt.bits_per_weight(), 8.0 + 32.0 / 256.0);
        assert!(qt.scales.iter().all(|&s| s == 30.0 / kind.max_finite()));
        // the absmax itself survives (up to the scale's rounding)
        assert!((qt.dequantize()[[2, 7]] + 30.0).abs() < 1e-5);
        // a zero group gets scale 1 and decodes to zeros
        assert_eq!(f.fit(&[0.0, 0.0]).scale, 1.0);
        // per-channel is never worse than per-tensor here
        assert!(qc.mse(w.view()) <= qt.mse(w.view()));
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn fp8_round_trips(x in -500.0f32..500.0, e5 in any::<bool>()) {
        let k = if e5 { E5M2 } else { E4M3 };
        let c = (k.encode)(x);
        let q = (k.decode)(c);
        // a level, idempotent, its own code back
        prop_assert!(q.is_finite());
        prop_assert_eq!((k.encode)(q), c);
        prop_assert_eq!((k.decode)((k.encode)(q)), q);
        // relative error at most half an ulp of the format (normal range), or half the
        // subnormal spacing
        let sub = if e5 { 2f32.powi(-16) } else { 2f32.powi(-9) };
        let rel = if e5 { 0.125 } else { 0.0625 };
        if x.abs() <= if e5 { 57344.0 } else { 448.0 } {
            prop_assert!((x - q).abs() <= (x.abs() * rel).max(sub / 2.0) * (1.0 + 1e-6));
        }
    }
}
