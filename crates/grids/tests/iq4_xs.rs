//! IQ4_XS as a super-block grid ([`GgmlGrid::IQ4_XS`]): the layout facts of ggml's
//! `block_iq4_xs` (136 bytes per 256 weights, sub-blocks of 32, signed 6-bit scales of one
//! f16 `d`, the 16 IQ4_NL levels), encode against brute force over the 16 levels of a
//! sub-block (under fitted and under arbitrary stored parameters), the fitted parameters
//! against those facts, and the importance-weighted fit never worse than the unweighted one
//! under the weighted error.

use half::f16;
use ndarray::Array2;
use quantlab_grids::ggml::{quantize_ggml_weighted, IQ4_NL_LEVELS};
use quantlab_grids::ggml_k::{fit_superblock, KSuperParams, QK_K};
use quantlab_grids::{quantize_rtn, Format, FormatSpec, GgmlGrid, Granularity, GroupParams};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const G: GgmlGrid = GgmlGrid::IQ4_XS;

fn gaussian(rng: &mut StdRng) -> f32 {
    let u1: f32 = rng.random_range(1e-7f32..1.0);
    let u2: f32 = rng.random();
    (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
}

/// A super-block whose sub-blocks differ in magnitude and sign balance (what the signed
/// integer scales are for), with an outlier now and then.
fn superblock(rng: &mut StdRng, trial: usize) -> Vec<f32> {
    (0..QK_K)
        .map(|i| {
            let mag = 0.01 + ((i / 32 + trial) % 7) as f32 * 0.2;
            let skew = if (i / 32 + trial) % 3 == 0 { 0.3 } else { 0.0 };
            let v = mag * (gaussian(rng) + skew);
            if rng.random_range(0..97) == 0 {
                v * 6.0
            } else {
                v
            }
        })
        .collect()
}

/// `sum_i w_i (x_i - quantize(x_i))^2` of one super-block under `sp`.
fn werr(x: &[f32], w: Option<&[f32]>, sp: &KSuperParams) -> f64 {
    x.iter()
        .enumerate()
        .map(|(i, &v)| {
            let e = (v - G.quantize(v, sp.group_params(G, i / 32))) as f64;
            w.map_or(1.0, |w| w[i] as f64) * e * e
        })
        .sum()
}

/// The distance from `x` to the nearest of the 16 levels `scale * IQ4_NL_LEVELS[c]`.
fn brute_nearest(x: f32, p: GroupParams) -> f32 {
    IQ4_NL_LEVELS
        .iter()
        .map(|&l| (x - p.scale * l as f32).abs())
        .fold(f32::INFINITY, f32::min)
}

#[test]
fn layout_facts_of_block_iq4_xs() {
    assert!(G.is_k(), "a super-block grid");
    assert!(GgmlGrid::K.contains(&G));
    assert_eq!(G.ggml_name(), "IQ4_XS");
    assert_eq!(G.name(), "ggml-iq4_xs");
    assert_eq!((G.group_len(), G.span_len(), G.bits()), (32, 256, 4));
    let fs = G.fit_span().unwrap();
    assert_eq!((fs.span, fs.group), (256, 32));
    // the 16 levels: scale times kvalues_iq4nl, in code order
    let p = GroupParams::scale_only(-0.25);
    let lv = G.levels(p);
    assert_eq!(lv.len(), 16);
    for (c, &l) in lv.iter().enumerate() {
        assert_eq!(l, -0.25 * IQ4_NL_LEVELS[c] as f32);
        assert_eq!(G.decode(c as u8, p), l);
    }
    // bits: 136 bytes per 256 weights = 4.25 bits per weight
    let w = Array2::from_shape_fn((3, 512), |(r, k)| ((r * 512 + k) as f32 * 0.37).sin());
    let q = quantize_rtn("w", w.view(), &FormatSpec::Ggml(G), Granularity::Group(32)).unwrap();
    assert_eq!(q.bits_per_weight(), 136.0 * 8.0 / 256.0);
    // rows that are not whole super-blocks are refused by name
    let short = Array2::from_shape_fn((2, 288), |(r, k)| (r + k) as f32 * 0.01);
    let e = quantize_rtn(
        "blk.0.attn_q",
        short.view(),
        &FormatSpec::Ggml(G),
        Granularity::Group(32),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("blk.0.attn_q") && e.contains("256"), "{e}");
}

#[test]
fn fitted_parameters_are_one_f16_d_times_signed_6_bit_integers() {
    let mut rng = StdRng::seed_from_u64(7);
    let mut saw_negative_d = false;
    for trial in 0..60 {
        let x = superblock(&mut rng, trial);
        let sp = fit_superblock(G, &x, None);
        assert_eq!(f16::from_f32(sp.d).to_f32(), sp.d, "f16 d");
        assert_eq!(sp.sc.len(), 8);
        assert!(sp.sc.iter().all(|s| (-32..=31).contains(s)), "{:?}", sp.sc);
        saw_negative_d |= sp.d < 0.0;
        // the groups' parameters are the f32 products ggml decodes with, and factor
        // recovers parameters giving the same products bit for bit
        let mut ps = vec![GroupParams::scale_only(0.0); 8];
        G.fit_groups(&x, None, 32, &mut ps);
        for s in 0..8 {
            assert_eq!(ps[s].scale.to_bits(), (sp.d * sp.sc[s] as f32).to_bits());
            assert_eq!(ps[s].zero, 0.0);
        }
        let back = KSuperParams::factor(G, &ps).expect("factorizable");
        for s in 0..8 {
            assert_eq!(back.group_params(G, s), ps[s], "trial {trial}");
        }
        // and useful: at 4.25 bits the relative RMS error stays small on these blocks
        let e = werr(&x, None, &sp);
        let n: f64 = x.iter().map(|&v| (v as f64).powi(2)).sum();
        assert!(e < 0.02 * n, "trial {trial}: error {e} of {n}");
    }
    // ggml maps the sub-block scale of largest |s| onto -32: d takes the opposite sign
    assert!(saw_negative_d, "no super-block used a negative d");
    // a non-zero zero, or scales no f16 times 6-bit integers give, are refused
    let mut bad = vec![GroupParams::scale_only(0.5); 8];
    bad[3].zero = 8.0;
    assert!(KSuperParams::factor(G, &bad).is_none());
    let mut bad = vec![GroupParams::scale_only(0.0); 8];
    bad[0].scale = 0.1;
    bad[1].scale = 0.1 * std::f32::consts::PI;
    assert!(KSuperParams::factor(G, &bad).is_none());
}

#[test]
fn encode_is_the_nearest_of_the_16_levels() {
    let mut rng = StdRng::seed_from_u64(3);
    let mut checked = 0usize;
    // under fitted parameters, on the data and on probes around it
    for trial in 0..40 {
        let x = superblock(&mut rng, trial);
        let mut ps = vec![GroupParams::scale_only(0.0); 8];
        G.fit_groups(&x, None, 32, &mut ps);
        for (i, &v) in x.iter().enumerate() {
            let p = ps[i / 32];
            for xv in [v, -v, v * 1.9 + 0.01, v * 0.3 - 0.02, 1e4 * v] {
                let c = G.encode(xv, p);
                assert!(c < 16);
                assert_eq!(
                    (xv - G.decode(c, p)).abs(),
                    brute_nearest(xv, p),
                    "x {xv} p {p:?}"
                );
                checked += 1;
            }
        }
    }
    // under arbitrary stored parameters: any f16 d (either sign) times any integer in
    // -32..=31, with values spread over the whole range, on and between the levels
    for _ in 0..4000 {
        let d = f16::from_f32(rng.random_range(-2.0f32..2.0) * 10f32.powi(rng.random_range(-4..3)))
            .to_f32();
        let sc = rng.random_range(-32..=31);
        let p = GroupParams::scale_only(d * sc as f32);
        let span = (p.scale * 140.0).abs();
        let mut probes: Vec<f32> = (0..8).map(|_| rng.random_range(-1.0..1.0) * span).collect();
        // exactly on a level, and exactly between two neighbours
        let c = rng.random_range(0..15);
        probes.push(p.scale * IQ4_NL_LEVELS[c] as f32);
        probes.push(p.scale * (IQ4_NL_LEVELS[c] as f32 + IQ4_NL_LEVELS[c + 1] as f32) / 2.0);
        probes.extend([0.0, f32::MAX, -f32::MAX]);
        for &xv in &probes {
            let c = G.encode(xv, p);
            assert!(c < 16);
            let got = (xv - G.decode(c, p)).abs();
            let want = brute_nearest(xv, p);
            assert!(
                got == want,
                "x {xv} scale {} code {c}: {got} vs {want}",
                p.scale
            );
            checked += 1;
        }
    }
    // a zero scale encodes to the level nearest 0 (code 8, level 1): value 0
    let z = GroupParams::scale_only(0.0);
    assert_eq!(G.decode(G.encode(0.7, z), z), 0.0);
    eprintln!("{checked} encodes equal the brute-force nearest level");
}

#[test]
fn weighted_fit_is_never_worse_than_the_unweighted_under_the_weighted_error() {
    let mut rng = StdRng::seed_from_u64(19);
    let (mut sum_plain, mut sum_weighted) = (0.0f64, 0.0f64);
    for trial in 0..80 {
        let x = superblock(&mut rng, trial);
        let w: Vec<f32> = (0..QK_K)
            .map(|i| match (trial + i) % 11 {
                0 => rng.random_range(20.0f32..200.0),
                1 => 0.0,
                _ => rng.random_range(0.0f32..1.5),
            })
            .collect();
        let plain = fit_superblock(G, &x, None);
        let weighted = fit_superblock(G, &x, Some(&w));
        let (ep, ew) = (werr(&x, Some(&w), &plain), werr(&x, Some(&w), &weighted));
        assert!(ew <= ep, "trial {trial}: weighted {ew} > plain {ep}");
        sum_plain += ep;
        sum_weighted += ew;
        assert!(weighted.sc.iter().all(|s| (-32..=31).contains(s)));
        assert_eq!(f16::from_f32(weighted.d).to_f32(), weighted.d);
        // importance summing to 0 is the unweighted fit
        assert_eq!(fit_superblock(G, &x, Some(&[0.0; QK_K])), plain);
    }
    eprintln!("weighted objective: plain fit {sum_plain:.4}, weighted fit {sum_weighted:.4}");
    // not vacuous: the importance changes the fit where it matters
    assert!(
        sum_weighted < 0.97 * sum_plain,
        "{sum_weighted} vs {sum_plain}"
    );

    // whole matrices through the imatrix RTN, importance per input column
    let w = Array2::from_shape_fn((6, 768), |(_, k)| {
        gaussian(&mut rng) * if k % 13 == 0 { 4.0 } else { 1.0 }
    });
    let imp: Vec<f32> = (0..768)
        .map(|k| {
            if k % 5 == 0 {
                40.0
            } else {
                0.2 + (k % 3) as f32
            }
        })
        .collect();
    let plain = quantize_ggml_weighted("w", w.view(), G, None).unwrap();
    let weighted = quantize_ggml_weighted("w", w.view(), G, Some(&imp)).unwrap();
    let err = |q: &quantlab_grids::QuantizedLinear| -> f64 {
        let d = q.dequantize();
        w.indexed_iter()
            .map(|((r, k), x)| imp[k] as f64 * ((x - d[[r, k]]) as f64).powi(2))
            .sum()
    };
    let (ep, ew) = (err(&plain), err(&weighted));
    assert!(ew <= ep, "matrix: weighted {ew} vs plain {ep}");
    // a lone group (fit_weighted) keeps the same guarantee
    let x: Vec<f32> = (0..32).map(|_| gaussian(&mut rng)).collect();
    let wi: Vec<f32> = (0..32)
        .map(|k| if k % 4 == 0 { 30.0 } else { 1.0 })
        .collect();
    let (pp, pw) = (G.fit(&x), G.fit_weighted(&x, Some(&wi)));
    let e = |p: GroupParams| -> f64 {
        x.iter()
            .zip(&wi)
            .map(|(&v, &w)| w as f64 * ((v - G.quantize(v, p)) as f64).powi(2))
            .sum()
    };
    assert!(e(pw) <= e(pp));
}

#[test]
fn rtn_beats_q4_0_and_stays_near_iq4_nl() {
    // IQ4_XS spends 4.25 bits per weight, Q4_0 and IQ4_NL 4.5: on Gaussian weights the
    // non-uniform levels beat Q4_0's uniform ones, and the 6-bit sub-block scales cost little
    // against IQ4_NL's f16 scale per 32
    let mut rng = StdRng::seed_from_u64(23);
    let w = Array2::from_shape_fn((16, 1024), |_| gaussian(&mut rng));
    let rmse = |g: GgmlGrid| -> f64 {
        let q = quantize_rtn(
            "w",
            w.view(),
            &FormatSpec::Ggml(g),
            Granularity::Group(g.group_len()),
        )
        .unwrap();
        let d = q.dequantize();
        let s: f64 = w
            .iter()
            .zip(d.iter())
            .map(|(a, b)| ((a - b) as f64).powi(2))
            .sum();
        (s / w.len() as f64).sqrt()
    };
    let (xs, nl, q40) = (rmse(G), rmse(GgmlGrid::IQ4_NL), rmse(GgmlGrid::Q4_0));
    eprintln!("rmse on N(0,1): IQ4_XS {xs:.5}, IQ4_NL {nl:.5}, Q4_0 {q40:.5}");
    assert!(xs < q40, "IQ4_XS {xs} vs Q4_0 {q40}");
    assert!(xs < 1.05 * nl, "IQ4_XS {xs} vs IQ4_NL {nl}");
}
