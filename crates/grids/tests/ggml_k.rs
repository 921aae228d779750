//! ggml K super-block grids (Q2_K .. Q6_K, IQ4_XS): encode against brute force over every level of
//! the sub-block, the fitted parameters against the layout facts of formats.md (one f16 `d`
//! times small integers per super-block), bits per weight against ggml's block sizes, the
//! importance-weighted fit never worse than the plain one, and the shape errors.

use half::f16;
use ndarray::Array2;
use quantlab_grids::ggml::quantize_ggml_weighted;
use quantlab_grids::ggml_k::{fit_superblock, KSuperParams, QK_K};
use quantlab_grids::{quantize_rtn, Format, FormatSpec, GgmlGrid, Granularity, GroupParams};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Bytes per 256-weight block from ggml's type table (formats.md / `GGML_QUANT_SIZES`).
fn type_size(g: GgmlGrid) -> usize {
    match g {
        GgmlGrid::Q2_K => 84,
        GgmlGrid::Q3_K => 110,
        GgmlGrid::Q4_K => 144,
        GgmlGrid::Q5_K => 176,
        GgmlGrid::Q6_K => 210,
        GgmlGrid::IQ4_XS => 136,
        _ => unreachable!(),
    }
}

/// (sub-block length, code bits, stored scale range) written from the layouts.
fn facts(g: GgmlGrid) -> (usize, u32, i32, i32) {
    match g {
        GgmlGrid::Q2_K => (16, 2, 0, 15),
        GgmlGrid::Q3_K => (16, 3, -32, 31),
        GgmlGrid::Q4_K => (32, 4, 0, 63),
        GgmlGrid::Q5_K => (32, 5, 0, 63),
        GgmlGrid::Q6_K => (16, 6, -128, 127),
        GgmlGrid::IQ4_XS => (32, 4, -32, 31),
        _ => unreachable!(),
    }
}

fn superblock(rng: &mut StdRng, trial: usize) -> Vec<f32> {
    // sub-blocks of different magnitudes (what the integer scales are for), some offset
    (0..QK_K)
        .map(|i| {
            let mag = 0.05 + ((i / 16 + trial) % 7) as f32 * 0.3;
            let off = if trial % 3 == 0 { 0.4 } else { 0.0 };
            off + mag * (rng.random::<f32>() * 2.0 - 1.0)
        })
        .collect()
}

#[test]
fn k_grids_layout_facts() {
    for g in GgmlGrid::K {
        let (sub, bits, _, _) = facts(g);
        assert!(g.is_k());
        assert_eq!(g.group_len(), sub, "{g:?}");
        assert_eq!(g.bits(), bits, "{g:?}");
        assert_eq!(g.span_len(), 256);
        let fs = g.fit_span().unwrap();
        assert_eq!((fs.span, fs.group), (256, sub));
        assert_eq!(g.levels(GroupParams::scale_only(1.0)).len(), 1 << bits);
    }
    for g in GgmlGrid::ALL {
        assert!(!g.is_k() && g.fit_span().is_none());
    }
}

#[test]
fn fitted_parameters_are_one_f16_scale_times_integers() {
    let mut rng = StdRng::seed_from_u64(11);
    for g in GgmlGrid::K {
        let (sub, _, lo, hi) = facts(g);
        for trial in 0..40 {
            let x = superblock(&mut rng, trial);
            let mut ps = vec![GroupParams::scale_only(0.0); QK_K / sub];
            g.fit_groups(&x, None, sub, &mut ps);
            let sp = fit_superblock(g, &x, None);
            // d and dmin are f16 values, the integers in range, the products what the
            // groups hold, bit for bit
            assert_eq!(f16::from_f32(sp.d).to_f32(), sp.d, "{g:?}");
            assert_eq!(f16::from_f32(sp.dmin).to_f32(), sp.dmin, "{g:?}");
            for s in 0..QK_K / sub {
                assert!((lo..=hi).contains(&sp.sc[s]), "{g:?} sc {}", sp.sc[s]);
                assert_eq!(ps[s].scale.to_bits(), (sp.d * sp.sc[s] as f32).to_bits());
                if lo == 0 {
                    assert!((0..=hi).contains(&sp.m[s]));
                    assert_eq!(ps[s].zero.to_bits(), (sp.dmin * sp.m[s] as f32).to_bits());
                }
            }
            // factor recovers parameters giving the same products
            let back = KSuperParams::factor(g, &ps).expect("factorizable");
            for s in 0..QK_K / sub {
                let gp = back.group_params(g, s);
                assert_eq!(gp.scale.to_bits(), ps[s].scale.to_bits(), "{g:?}");
                assert_eq!(gp.zero.to_bits(), ps[s].zero.to_bits(), "{g:?}");
            }
            // and the fit is useful: the block's error is below the coarsest step
            let err = x
                .iter()
                .enumerate()
                .map(|(i, &v)| (v - g.quantize(v, ps[i / sub])).abs())
                .fold(0.0f32, f32::max);
            let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            assert!(err < amax, "{g:?}: max error {err} for amax {amax}");
        }
        // parameters that no f16 times integers can give are refused
        let mut bad = vec![GroupParams::scale_only(0.0); QK_K / sub];
        bad[0].scale = 0.1;
        bad[1].scale = 0.1 * std::f32::consts::PI;
        if lo != 0 {
            for p in bad.iter_mut() {
                p.zero = (-lo / 8) as f32; // the offset: 4 (Q3_K) or 16 (wrong for Q6_K)
            }
        }
        assert!(KSuperParams::factor(g, &bad).is_none(), "{g:?}");
    }
}

#[test]
fn encode_is_the_nearest_of_all_levels() {
    let mut rng = StdRng::seed_from_u64(3);
    for g in GgmlGrid::K {
        let sub = g.group_len();
        for trial in 0..20 {
            let x = superblock(&mut rng, trial);
            let mut ps = vec![GroupParams::scale_only(0.0); QK_K / sub];
            g.fit_groups(&x, None, sub, &mut ps);
            for (i, &v) in x.iter().enumerate() {
                let p = ps[i / sub];
                let probes = [v, v * 1.7 + 0.01, -v - 0.3];
                for &xv in &probes {
                    let c = g.encode(xv, p);
                    let best = g
                        .levels(p)
                        .iter()
                        .map(|&l| (xv - l).abs())
                        .fold(f32::INFINITY, f32::min);
                    assert_eq!((xv - g.decode(c, p)).abs(), best, "{g:?} x {xv} p {p:?}");
                }
            }
        }
    }
}

#[test]
fn bits_per_weight_equal_ggml_block_sizes() {
    let w = Array2::from_shape_fn((3, 512), |(r, k)| ((r * 512 + k) as f32 * 0.37).sin());
    for g in GgmlGrid::K {
        let q = quantize_rtn(
            "w",
            w.view(),
            &FormatSpec::Ggml(g),
            Granularity::Group(g.group_len()),
        )
        .unwrap();
        let want = 8.0 * type_size(g) as f64 / 256.0;
        assert!(
            (q.bits_per_weight() - want).abs() < 1e-12,
            "{g:?}: {} vs {want}",
            q.bits_per_weight()
        );
        // RTN through quantize_rtn is the super-block fit of every span
        let sub = g.group_len();
        for r in 0..3 {
            for b in 0..2 {
                let x: Vec<f32> = (0..256).map(|j| w[[r, 256 * b + j]]).collect();
                let sp = fit_superblock(g, &x, None);
                for s in 0..256 / sub {
                    let gp = sp.group_params(g, s);
                    assert_eq!(q.scales[[r, b * 256 / sub + s]], gp.scale, "{g:?}");
                    assert_eq!(q.zeros[[r, b * 256 / sub + s]], gp.zero, "{g:?}");
                }
            }
        }
        // the weighted path without importance is the same RTN
        let u = quantize_ggml_weighted("w", w.view(), g, None).unwrap();
        assert_eq!(u.codes, q.codes, "{g:?}");
        assert_eq!(u.scales, q.scales, "{g:?}");
    }
}

#[test]
fn weighted_fit_is_never_worse_under_the_importance() {
    let mut rng = StdRng::seed_from_u64(5);
    let w = Array2::from_shape_fn((8, 512), |(_, k)| {
        (rng.random::<f32>() * 2.0 - 1.0) * if k % 9 == 0 { 3.0 } else { 1.0 }
    });
    let imp: Vec<f32> = (0..512)
        .map(|k| {
            if k % 5 == 0 {
                50.0
            } else {
                0.5 + (k % 3) as f32
            }
        })
        .collect();
    for g in GgmlGrid::K {
        let plain = quantize_ggml_weighted("w", w.view(), g, None).unwrap();
        let weighted = quantize_ggml_weighted("w", w.view(), g, Some(&imp)).unwrap();
        let err = |q: &quantlab_grids::QuantizedLinear| -> f64 {
            let d = q.dequantize();
            w.indexed_iter()
                .map(|((r, k), x)| imp[k] as f64 * ((x - d[[r, k]]) as f64).powi(2))
                .sum()
        };
        let (ep, ew) = (err(&plain), err(&weighted));
        assert!(
            ew <= ep * (1.0 + 1e-9),
            "{g:?}: weighted {ew} vs plain {ep}"
        );
        eprintln!("{g:?}: weighted error {ew:.4} vs plain {ep:.4}");
        // still parameters of the file's super-blocks
        let sub = g.group_len();
        for r in 0..8 {
            for b in 0..2 {
                let ps: Vec<GroupParams> = (0..256 / sub)
                    .map(|s| weighted.params(r, 256 * b + s * sub))
                    .collect();
                assert!(KSuperParams::factor(g, &ps).is_some(), "{g:?}");
            }
        }
    }
}

#[test]
fn shapes_a_k_grid_cannot_hold_are_errors_naming_the_tensor() {
    let w = Array2::from_shape_fn((2, 576), |(r, k)| (r + k) as f32 * 0.01);
    for g in GgmlGrid::K {
        let spec = FormatSpec::Ggml(g);
        let e = quantize_rtn(
            "blk.0.attn_q",
            w.view(),
            &spec,
            Granularity::Group(g.group_len()),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("blk.0.attn_q") && e.contains("256"), "{e}");
        let e = quantize_ggml_weighted("blk.0.attn_q", w.view(), g, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("blk.0.attn_q") && e.contains("256"), "{e}");
        let w2 = w.slice(ndarray::s![.., ..512]);
        for bad in [
            Granularity::Group(64),
            Granularity::PerChannel,
            Granularity::PerTensor,
        ] {
            let e = quantize_rtn("ffn_down", w2, &spec, bad)
                .unwrap_err()
                .to_string();
            assert!(e.contains("ffn_down") && e.contains("groups of"), "{e}");
        }
    }
}

#[test]
fn iq4_nl_levels_encode_and_fit() {
    use quantlab_grids::ggml::IQ4_NL_LEVELS;
    let g = GgmlGrid::IQ4_NL;
    // the levels as the gguf package lists them (kvalues_iq4nl)
    let p = GroupParams::scale_only(0.5);
    let lv = g.levels(p);
    assert_eq!(lv.len(), 16);
    assert_eq!(lv[0], -63.5);
    assert_eq!(lv[15], 56.5);
    assert!(lv.windows(2).all(|w| w[0] < w[1]));
    assert_eq!(IQ4_NL_LEVELS[8], 1);
    let mut rng = StdRng::seed_from_u64(17);
    for trial in 0..200 {
        let x: Vec<f32> = (0..32)
            .map(|_| (0.1 + trial as f32 * 0.01) * (rng.random::<f32>() * 2.0 - 1.0))
            .collect();
        let p = g.fit(&x);
        assert_eq!(f16::from_f32(p.scale).to_f32(), p.scale, "f16 d");
        let mut probes = x.clone();
        probes.extend([0.0, -1e3, 1e3]);
        for &v in &probes {
            let c = g.encode(v, p);
            let best = g
                .levels(p)
                .iter()
                .map(|&l| (v - l).abs())
                .fold(f32::INFINITY, f32::min);
            assert_eq!((v - g.decode(c, p)).abs(), best, "x {v} p {p:?}");
        }
        // the search is at least as good as mapping the largest |x| onto -127 or +113
        let err = |d: f32| -> f64 {
            let p = GroupParams::scale_only(f16::from_f32(d).to_f32());
            x.iter()
                .map(|&v| ((v - g.quantize(v, p)) as f64).powi(2))
                .sum()
        };
        let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let max = *x.iter().find(|v| v.abs() == amax).unwrap();
        let fitted = err(p.scale);
        assert!(fitted <= err(max / -127.0) + 1e-12 && fitted <= err(max / 113.0) + 1e-12);
        // weighted: never worse than the plain fit under the weights
        let imp: Vec<f32> = (0..32)
            .map(|k| if k % 4 == 0 { 20.0 } else { 1.0 })
            .collect();
        let pw = g.fit_weighted(&x, Some(&imp));
        let werr = |p: GroupParams| -> f64 {
            x.iter()
                .zip(&imp)
                .map(|(&v, &w)| w as f64 * ((v - g.quantize(v, p)) as f64).powi(2))
                .sum()
        };
        assert!(werr(pw) <= werr(p) + 1e-12);
    }
    // bits: 4-bit codes and an f16 per 32 = 4.5 (18 bytes per block)
    let w = Array2::from_shape_fn((2, 64), |(r, k)| ((r * 64 + k) as f32).cos());
    let q = quantize_rtn("w", w.view(), &FormatSpec::Ggml(g), Granularity::Group(32)).unwrap();
    assert_eq!(q.bits_per_weight(), 4.5);
}
