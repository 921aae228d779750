//! Hessian accumulation, the error metric and AWQ against plain-loop oracles.
#![allow(non_snake_case)]

mod common;
use common::*;
use ndarray::{s, Array1, Array2, Axis};
use quantlab_grids::{quantize_rtn, Format, FormatSpec, Granularity, UniformGrid};
use quantlab_solvers::awq::{self, AwqParams, AwqStats};
use quantlab_solvers::hessian::{Counting, Hessian};
use quantlab_solvers::synth::{correlated_inputs, random_weight};
use quantlab_solvers::{output_error, rel_output_error};

/// Oracle: a literal f64 simulation of the reference running mean
/// (H *= n/(n+m); n += m; x *= sqrt(2/n); H += x x^T), batch by batch.
#[test]
fn running_mean_convention_counts_sequences() {
    let X = correlated_inputs(60, 6, 1, 1);
    let batches = [(0..20, 2usize), (20..30, 1), (30..60, 3)];
    let mut h = Hessian::new(6);
    let mut Href = Array2::<f64>::zeros((6, 6));
    let mut n = 0usize;
    for (rows, m) in batches.iter().cloned() {
        let xb = X.slice(s![rows, ..]);
        h.add_batch(xb, m).unwrap();
        Href *= n as f64 / (n + m) as f64;
        n += m;
        let xs = xb.mapv(|v| v as f64 * (2.0 / n as f64).sqrt());
        Href += &xs.t().dot(&xs);
    }
    let H = h.finish();
    for i in 0..6 {
        for j in 0..6 {
            assert!((H[[i, j]] as f64 - Href[[i, j]]).abs() < 1e-5 * Href[[i, i]].abs().max(1.0));
        }
    }
    assert_eq!(h.samples(), 6);
    assert_eq!(h.tokens(), 60);
}

/// Per-token counting gives 2/T X^T X (plain loops).
#[test]
fn token_counting_is_the_mean() {
    let X = correlated_inputs(50, 5, 2, 1);
    let mut h = Hessian::new(5).with_counting(Counting::Tokens);
    h.add_batch(X.slice(s![..17, ..]), 99).unwrap();
    h.add_batch(X.slice(s![17.., ..]), 99).unwrap();
    let H = h.finish();
    let Href = hessian_of(X.view());
    for (a, b) in H.iter().zip(Href.iter()) {
        assert!((a - b).abs() < 1e-4 * b.abs().max(1.0));
    }
}

/// Diagonal mode = diag of the full mode = llama.cpp's per-column sum of x^2 (by hand).
#[test]
fn diagonal_mode_is_the_importance_matrix() {
    let X = correlated_inputs(40, 7, 3, 2);
    let mut full = Hessian::new(7);
    let mut diag = Hessian::diagonal(7);
    full.add_batch(X.view(), 4).unwrap();
    diag.add_batch(X.view(), 4).unwrap();
    let s2: Vec<f64> = (0..7)
        .map(|j| X.column(j).iter().map(|&v| (v as f64).powi(2)).sum())
        .collect();
    for j in 0..7 {
        assert!((diag.sum_sq()[j] - s2[j]).abs() < 1e-6 * s2[j]);
        assert!((diag.diag()[j] - full.diag()[j]).abs() < 1e-5 * full.diag()[j]);
        assert!((diag.diag()[j] as f64 - 2.0 / 4.0 * s2[j]).abs() < 1e-5 * s2[j]);
        assert!((diag.imatrix()[j] as f64 - s2[j] / 40.0).abs() < 1e-5 * s2[j]);
    }
    assert_eq!(diag.finish()[[0, 1]], 0.0);
}

#[test]
fn hessian_rejects_bad_batches() {
    let mut h = Hessian::new(3);
    assert!(h.add_batch(Array2::<f32>::zeros((2, 4)).view(), 1).is_err());
    let mut x = Array2::<f32>::zeros((2, 3));
    x[[1, 1]] = f32::NAN;
    let e = h.add_batch(x.view(), 1).unwrap_err();
    assert!(e.to_string().contains("inputs"), "{e}");
    assert!(h.add_batch(Array2::<f32>::ones((2, 3)).view(), 0).is_err());
    // an infinity anywhere (found from the product's diagonal, then named by a scan), and a
    // finite input whose square overflows f32, are refused; a refused batch adds nothing
    for (r, c, v) in [
        (0, 2, f32::INFINITY),
        (1, 0, f32::NEG_INFINITY),
        (1, 2, 3e19),
    ] {
        let mut h = Hessian::new(3);
        h.add_batch(Array2::<f32>::ones((4, 3)).view(), 1).unwrap();
        let before = h.finish();
        let mut x = Array2::<f32>::ones((2, 3));
        x[[r, c]] = v;
        let e = h.add_batch(x.view(), 1).unwrap_err().to_string();
        assert!(e.contains("inputs"), "{e}");
        if v.is_finite() {
            assert!(e.contains("column 2") && e.contains("overflows"), "{e}");
        } else {
            assert!(e.contains(&format!("flat index {}", r * 3 + c)), "{e}");
        }
        assert_eq!(h.finish(), before);
        assert_eq!(h.tokens(), 4);
    }
}

/// tr(D H D^T) / tr(W H W^T) equals ||(W - Q) X^T||^2 / ||W X^T||^2 computed from X.
#[test]
fn rel_output_error_equals_explicit_formula() {
    let X = correlated_inputs(80, 16, 4, 2);
    let W = random_weight(8, 16, 5);
    let spec = FormatSpec::Uniform(UniformGrid::new(3, true).unwrap());
    let Q = quantize_rtn("w", W.view(), &spec, Granularity::Group(8))
        .unwrap()
        .dequantize();
    let mut h = Hessian::new(16);
    h.add_batch(X.view(), 3).unwrap();
    let H = h.finish();
    let e = rel_output_error(W.view(), Q.view(), H.view()).unwrap();
    let (num, den) = explicit_output_errors(W.view(), Q.view(), X.view());
    assert!(
        (e - num / den).abs() < 1e-5 * (num / den),
        "{e} vs {}",
        num / den
    );
    // the unnormalised one: 2/n ||D X^T||^2 with n = 3 sequences
    let oe = output_error(W.view(), Q.view(), H.view()).unwrap();
    assert!((oe - 2.0 / 3.0 * num).abs() < 1e-5 * num);
    assert!(rel_output_error(W.view(), Q.view(), Array2::<f32>::zeros((16, 16)).view()).is_err());
    assert!(rel_output_error(W.view(), Q.slice(s![.., ..8]), H.view()).is_err());
}

/// AutoAWQ's statistics by hand, the scale normalisation, the curve and its argmin, a
/// caller's loss closure, and the clip search against brute force from X.
#[test]
fn awq_statistics_and_search() {
    let X = correlated_inputs(300, 16, 6, 2);
    let W1 = random_weight(6, 16, 7);
    let W2 = random_weight(4, 16, 8);
    let gran = Granularity::Group(8);
    let stats = AwqStats::from_inputs(X.view(), 512).unwrap();
    // x_mean by hand
    for j in 0..16 {
        let m: f64 = X.column(j).iter().map(|&v| (v as f64).abs()).sum::<f64>() / 300.0;
        assert!((stats.x_mean[j] as f64 - m).abs() < 1e-5 * m);
    }
    // w_mean by hand over the stacked rows
    let wm = awq::weight_mean(&[W1.view(), W2.view()], gran).unwrap();
    let stacked = ndarray::concatenate(Axis(0), &[W1.view(), W2.view()]).unwrap();
    for j in 0..16 {
        let g0 = (j / 8) * 8;
        let mut acc = 0.0;
        for r in 0..10 {
            let mx = (g0..g0 + 8)
                .map(|k| stacked[[r, k]].abs())
                .fold(0.0f32, f32::max)
                + 1e-6;
            acc += (stacked[[r, j]].abs() / mx) as f64;
        }
        assert!((wm[j] as f64 - acc / 10.0).abs() < 1e-5);
    }
    // normalisation: max * min = 1
    let s = awq::candidate_scales(&stats.x_mean, &wm, 0.5, true);
    let mx = s.iter().cloned().fold(f32::MIN, f32::max);
    let mn = s.iter().cloned().fold(f32::MAX, f32::min);
    assert!((mx * mn - 1.0).abs() < 1e-4);
    // x^a / w^(1-a) before normalisation: ratios are preserved
    let raw = |j: usize| (stats.x_mean[j] as f64).powf(0.5) / ((wm[j] as f64).powf(0.5) + 1e-4);
    assert!(((s[3] / s[5]) as f64 - raw(3) / raw(5)).abs() < 1e-4 * raw(3) / raw(5));

    let grid = UniformGrid::new(3, false).unwrap();
    let p = AwqParams {
        granularity: gran,
        ..Default::default()
    };
    let r = awq::awq(&[W1.view(), W2.view()], &stats, &grid, &p).unwrap();
    assert_eq!(r.loss_per_alpha.len(), 20);
    let (amin, _) = r
        .loss_per_alpha
        .iter()
        .cloned()
        .fold((0.0, f64::INFINITY), |b, c| if c.1 < b.1 { c } else { b });
    assert_eq!(r.alpha, amin);
    // each curve point is the output MSE of the candidate, recomputed here from X
    let (a3, l3) = r.loss_per_alpha[3];
    let s3 = awq::candidate_scales(&stats.x_mean, &wm, a3, true);
    let mut num = 0.0;
    for W in [&W1, &W2] {
        let Q = awq::scaled_pseudo_quant(W.view(), &s3, &grid, gran);
        num += explicit_output_errors(W.view(), Q.view(), X.view()).0;
    }
    let mse = num / (300.0 * 10.0);
    assert!((l3 - mse).abs() < 1e-4 * mse, "{l3} vs {mse}");

    // a caller's loss decides
    let mut seen = 0;
    let mut f = |a: f64, _s: &Array1<f32>, qs: &[Array2<f32>]| {
        seen += 1;
        assert_eq!(qs.len(), 2);
        (a - 0.35).abs()
    };
    let r2 = awq::awq_with_loss(&[W1.view(), W2.view()], &stats, &grid, &p, Some(&mut f)).unwrap();
    assert_eq!(seen, 20);
    assert!((r2.alpha - 0.35).abs() < 1e-12);

    // clip search, brute force from the (<= 512) token rows, on the scaled problem
    let c = &r.clip[0];
    let Ws = awq::apply(W1.view(), &r.scales, None, gran);
    let Xs = &X / &r.scales.view().insert_axis(Axis(0));
    for row in 0..6 {
        for gi in 0..2 {
            let org: f32 = (0..8)
                .map(|t| Ws[[row, gi * 8 + t]].abs())
                .fold(0.0, f32::max);
            let mut best = (f64::INFINITY, 0.0f32);
            for i in 0..10 {
                let m = org * (1.0 - i as f32 / 20.0);
                let cl: Vec<f32> = (0..8).map(|t| Ws[[row, gi * 8 + t]].clamp(-m, m)).collect();
                let gp = grid.fit(&cl);
                let mut err = 0.0;
                for tok in 0..300 {
                    let mut o = 0.0f64;
                    for t in 0..8 {
                        o += Xs[[tok, gi * 8 + t]] as f64
                            * (Ws[[row, gi * 8 + t]] - grid.quantize(cl[t], gp)) as f64;
                    }
                    err += o * o;
                }
                if err < best.0 * (1.0 - 1e-9) {
                    best = (err, m);
                }
            }
            assert_eq!(c[[row, gi]], best.1, "row {row} group {gi}");
        }
    }
}

/// On inputs with outlier channels, AWQ (scale + clip, then RTN) beats plain RTN.
#[test]
fn awq_beats_rtn_with_outlier_channels() {
    let grid = UniformGrid::new(3, false).unwrap();
    let spec = FormatSpec::Uniform(grid);
    let gran = Granularity::Group(16);
    let mut wins = 0;
    for seed in 0..4 {
        let X = correlated_inputs(256, 32, 30 + seed, 3);
        let W = random_weight(16, 32, 40 + seed);
        let stats = AwqStats::from_inputs(X.view(), 512).unwrap();
        let r = awq::awq(
            &[W.view()],
            &stats,
            &grid,
            &AwqParams {
                granularity: gran,
                ..Default::default()
            },
        )
        .unwrap();
        let Ws = awq::apply(W.view(), &r.scales, Some(&r.clip[0]), gran);
        let Qs = quantize_rtn("w", Ws.view(), &spec, gran)
            .unwrap()
            .dequantize();
        let Qeff = &Qs / &r.scales.view().insert_axis(Axis(0));
        let rtn = quantize_rtn("w", W.view(), &spec, gran)
            .unwrap()
            .dequantize();
        let ea = rel_err_from_inputs(W.view(), Qeff.view(), X.view());
        let er = rel_err_from_inputs(W.view(), rtn.view(), X.view());
        if ea < er {
            wins += 1;
        }
    }
    assert_eq!(wins, 4);
}

/// The fast clip search (one matrix product per group and candidate, groups in parallel)
/// chooses exactly the reference's clip values, for integer grids with and without zero point,
/// NF4, whole-row groups and a ragged last group, on correlated inputs with outlier channels.
#[test]
fn fast_clip_search_equals_reference() {
    use quantlab_grids::Codebook;
    let X = correlated_inputs(300, 72, 5, 11);
    let stats = AwqStats::from_inputs(X.view(), 512).unwrap();
    let W = random_weight(24, 72, 12);
    let formats: Vec<Box<dyn Format>> = vec![
        Box::new(UniformGrid::new(3, true).unwrap()),
        Box::new(UniformGrid::new(4, false).unwrap()),
        Box::new(Codebook::nf4()),
    ];
    for f in &formats {
        for gran in [
            Granularity::Group(16),
            Granularity::Group(32), // 32, 32, 8
            Granularity::PerChannel,
        ] {
            let params = AwqParams {
                granularity: gran,
                ..Default::default()
            };
            let fast =
                awq::search_clip(W.view(), stats.H_clip.view(), f.as_ref(), &params).unwrap();
            let reference =
                awq::search_clip_reference(W.view(), stats.H_clip.view(), f.as_ref(), &params)
                    .unwrap();
            assert_eq!(fast, reference, "{} {gran:?}", f.name());
            // the search did choose: some values were shrunk below the row/group maximum
            let full = awq::search_clip_reference(
                W.view(),
                stats.H_clip.view(),
                f.as_ref(),
                &AwqParams {
                    clip_max_shrink: 0.0,
                    ..params.clone()
                },
            )
            .unwrap();
            assert!(
                fast.iter().zip(full.iter()).any(|(a, b)| a < b),
                "{} {gran:?}",
                f.name()
            );
        }
    }
}
