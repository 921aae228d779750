//! OBD / OBS / OBQ against brute force and the KKT system, and GPTQ forced into OBQ's order.
#![allow(non_snake_case)]

mod common;
use common::*;
use ndarray::{Array1, Array2};
use quantlab_grids::{Format, Granularity, GroupParams, UniformGrid};
use quantlab_solvers::gptq::{gptq_reference, gptq_with_format, GptqParams};
use quantlab_solvers::linalg::spd_inverse_ref;
use quantlab_solvers::{obd, obq, obs};

/// Oracle: the KKT system of `min 1/2 dw^T H dw s.t. dw_q = t - w_q`, solved directly.
#[test]
fn obs_single_step_equals_kkt_solution() {
    let mut r = rng(1);
    let d = 6;
    let H = spd(&mut r, d, 0.1);
    let Hinv = spd_inverse_ref(H.view()).unwrap();
    let w = normal(&mut r, 1, d).row(0).to_owned();
    for q in 0..d {
        for t in [0.0, 0.37] {
            let (dw_kkt, loss_kkt) = kkt_single(H.view(), w.view(), q, t);
            let dw = obs::update(w.view(), q, t, Hinv.view());
            let tv = Array1::from_elem(d, t);
            let s = obs::saliency(w.view(), tv.view(), Hinv.view())[q];
            for i in 0..d {
                assert!(
                    (dw[i] - dw_kkt[i]).abs() < 1e-9,
                    "q={q} i={i}: {} vs {}",
                    dw[i],
                    dw_kkt[i]
                );
            }
            assert!(
                (s - loss_kkt).abs() < 1e-9 * loss_kkt.max(1.0),
                "q={q}: {s} vs {loss_kkt}"
            );
        }
    }
    // pruning saliency is the t = 0 case
    let ps = obs::pruning_saliency(w.view(), Hinv.view());
    let (_, l0) = kkt_single(H.view(), w.view(), 2, 0.0);
    assert!((ps[2] - l0).abs() < 1e-9);
}

fn tiny_problem(seed: u64, d: usize) -> (Array1<f64>, Array2<f64>) {
    let mut r = rng(seed);
    // correlated H: strong off-diagonal structure
    let H = spd(&mut r, d, 0.05);
    let w = normal(&mut r, 1, d).row(0).to_owned();
    (w, H)
}

/// Oracle: brute force over every single weight (KKT loss of moving it to its grid point).
#[test]
fn obq_first_step_is_the_best_single_weight() {
    let g = UniformGrid::new(2, false).unwrap();
    for seed in 0..10 {
        let (w, H) = tiny_problem(seed, 5);
        let p = g.fit(&w.iter().map(|&v| v as f32).collect::<Vec<_>>());
        let ps = vec![p; 5];
        let tr = obq::quantize_row(w.view(), H.view(), &g, &ps).unwrap();
        let losses: Vec<f64> = (0..5)
            .map(|q| kkt_single(H.view(), w.view(), q, g.quantize(w[q] as f32, p) as f64).1)
            .collect();
        let (best, lbest) =
            losses.iter().enumerate().fold(
                (0, f64::INFINITY),
                |b, (i, &l)| if l < b.1 { (i, l) } else { b },
            );
        assert_eq!(tr.steps[0].index, best, "seed {seed}");
        assert!((tr.steps[0].saliency - lbest).abs() < 1e-9 * lbest.max(1.0));
    }
}

/// OBQ's O(d^2) downdate gives the same run as OBS with the inverse recomputed explicitly.
#[test]
fn obq_downdate_equals_obs_with_explicit_inverse() {
    let g = UniformGrid::new(3, true).unwrap();
    for seed in 0..5 {
        let (w, H) = tiny_problem(100 + seed, 8);
        let p = g.fit(&w.iter().map(|&v| v as f32).collect::<Vec<_>>());
        let ps = vec![p; 8];
        let a = obq::quantize_row(w.view(), H.view(), &g, &ps).unwrap();
        let b = obs::quantize(w.view(), H.view(), &g, &ps).unwrap();
        let ia: Vec<usize> = a.steps.iter().map(|s| s.index).collect();
        let ib: Vec<usize> = b.steps.iter().map(|s| s.index).collect();
        assert_eq!(ia, ib, "seed {seed}");
        for i in 0..8 {
            assert!((a.w[i] - b.w[i]).abs() < 1e-9);
        }
        assert!((a.loss - b.loss).abs() < 1e-9);
    }
}

/// 1 row x 4 columns, 2-bit: all 4^4 code vectors enumerated. The exhaustive minimum bounds
/// OBQ, GPTQ and RTN from below; OBQ's loss is the quadratic error of its own codes. OBQ is
/// greedy, so "OBQ <= RTN" is not a theorem (seed 209 here is a counter-example): it is checked in
/// aggregate, OBQ winning on most problems and in total.
#[test]
fn exhaustive_search_bounds_obq_gptq_rtn() {
    let g = UniformGrid::new(2, false).unwrap();
    let (mut obq_wins, mut obq_optimal) = (0, 0);
    let (mut tot_obq, mut tot_rtn) = (0.0, 0.0);
    for seed in 0..12 {
        let (w, H) = tiny_problem(200 + seed, 4);
        let wf: Vec<f32> = w.iter().map(|&v| v as f32).collect();
        let p = g.fit(&wf);
        let levels: Vec<f64> = g.levels(p).iter().map(|&v| v as f64).collect();
        let mut best = f64::INFINITY;
        for code in 0..256usize {
            let q = Array1::from_shape_fn(4, |i| levels[(code >> (2 * i)) & 3]);
            best = best.min(half_quad(w.view(), q.view(), H.view()));
        }
        let rtn_q = Array1::from_shape_fn(4, |i| g.quantize(wf[i], p) as f64);
        let rtn = half_quad(w.view(), rtn_q.view(), H.view());
        let tr = obq::quantize_row(w.view(), H.view(), &g, &[p; 4]).unwrap();
        let direct = half_quad(w.view(), tr.w.view(), H.view());
        assert!((direct - tr.loss).abs() < 1e-9);
        // every OBQ value is a grid point
        for &v in tr.w.iter() {
            assert!(
                levels.iter().any(|&l| (l - v).abs() < 1e-6),
                "{v} not on the grid"
            );
        }
        // GPTQ (per-row params = the same p, no damping) on the same problem
        let W = Array2::from_shape_vec((1, 4), wf.clone()).unwrap();
        let Hf = H.mapv(|v| v as f32);
        let gp = GptqParams {
            damp_percent: 0.0,
            granularity: Granularity::PerChannel,
            ..Default::default()
        };
        let go = gptq_reference(W.view(), Hf.view(), &g, &gp).unwrap();
        let gq = go.q.row(0).mapv(|v| v as f64);
        let gl = half_quad(w.view(), gq.view(), H.view());
        assert!(best <= tr.loss + 1e-12 && best <= gl + 1e-9 && best <= rtn + 1e-12);
        if tr.loss <= best + 1e-12 {
            obq_optimal += 1;
        }
        tot_obq += tr.loss;
        tot_rtn += rtn;
        if tr.loss < rtn - 1e-12 {
            obq_wins += 1;
        }
    }
    // (measured: OBQ strictly better than RTN on 5/12, optimal on 8/12, total 0.88 x RTN)
    assert!(
        obq_wins >= 4,
        "OBQ strictly beats RTN on only {obq_wins}/12 problems"
    );
    assert!(
        obq_optimal >= 6,
        "OBQ reaches the exhaustive optimum on only {obq_optimal}/12"
    );
    assert!(
        tot_obq < 0.95 * tot_rtn,
        "total obq {tot_obq} rtn {tot_rtn}"
    );
}

/// OBS pruning: the first pruned weight is the brute-force best; saliencies add up to the loss.
#[test]
fn obs_pruning_matches_brute_force_and_adds_up() {
    for seed in 0..5 {
        let (w, H) = tiny_problem(300 + seed, 6);
        let tr = obs::prune(w.view(), H.view(), 3).unwrap();
        let losses: Vec<f64> = (0..6)
            .map(|q| kkt_single(H.view(), w.view(), q, 0.0).1)
            .collect();
        let best = (0..6)
            .min_by(|&a, &b| losses[a].total_cmp(&losses[b]))
            .unwrap();
        assert_eq!(tr.steps[0].index, best);
        let s: f64 = tr.steps.iter().map(|s| s.saliency).sum();
        assert!((s - tr.loss).abs() < 1e-9 * tr.loss.max(1.0));
        for st in &tr.steps {
            assert_eq!(tr.w[st.index], 0.0);
        }
        // OBS is never worse than OBD pruning the same number of weights
        let od = obd::prune(w.view(), H.view(), 3).unwrap();
        assert!(tr.loss <= od.loss + 1e-12);
    }
}

/// OBD: the order is by 1/2 H_qq w_q^2 (hand-computed), quantization equals RTN.
#[test]
fn obd_order_and_quantization() {
    let w = Array1::from(vec![0.5, -1.0, 0.2, 0.9]);
    let H = Array2::from_shape_fn((4, 4), |(i, j)| {
        if i == j {
            [1.0, 0.1, 4.0, 2.0][i]
        } else {
            0.05
        }
    });
    // saliencies: 0.125, 0.05, 0.08, 0.81
    let tr = obd::prune(w.view(), H.view(), 4).unwrap();
    let order: Vec<usize> = tr.steps.iter().map(|s| s.index).collect();
    assert_eq!(order, vec![1, 2, 0, 3]);
    assert!((tr.steps[0].saliency - 0.05).abs() < 1e-12);
    let g = UniformGrid::new(3, false).unwrap();
    let p = g.fit(&[0.5, -1.0, 0.2, 0.9]);
    let tq = obd::quantize(w.view(), H.view(), &g, &[p; 4]).unwrap();
    for i in 0..4 {
        assert_eq!(tq.w[i] as f32, g.quantize(w[i] as f32, p));
    }
}

/// GPTQ run in OBQ's greedy order (one row, same static parameters, no damping) reproduces
/// OBQ exactly: same codes and same loss. This is the paper's claim that GPTQ = OBQ with a
/// fixed order, in Cholesky form.
#[test]
fn gptq_in_obq_order_equals_obq() {
    let g = UniformGrid::new(3, false).unwrap();
    for seed in 0..5 {
        let (w, H) = tiny_problem(400 + seed, 8);
        let wf: Vec<f32> = w.iter().map(|&v| v as f32).collect();
        let p = g.fit(&wf);
        let tr = obq::quantize_row(w.view(), H.view(), &g, &[p; 8]).unwrap();
        let order: Vec<usize> = tr.steps.iter().map(|s| s.index).collect();
        let W = Array2::from_shape_vec((1, 8), wf).unwrap();
        let Hf = H.mapv(|v| v as f32);
        let gp = GptqParams {
            damp_percent: 0.0,
            granularity: Granularity::PerChannel,
            order: Some(order.clone()),
            block_size: 3,
            ..Default::default()
        };
        for out in [
            gptq_reference(W.view(), Hf.view(), &g, &gp).unwrap(),
            gptq_with_format(W.view(), Hf.view(), &g, &gp).unwrap(),
        ] {
            for k in 0..8 {
                assert!(
                    (out.q[[0, k]] as f64 - tr.w[k]).abs() < 1e-5,
                    "seed {seed} col {k}"
                );
            }
            let rel = (out.report.loss.unwrap() - tr.loss).abs() / tr.loss;
            assert!(
                rel < 1e-4,
                "seed {seed}: {} vs {}",
                out.report.loss.unwrap(),
                tr.loss
            );
            assert_eq!(out.report.order.as_ref().unwrap(), &order);
        }
    }
}

/// Layer-wise OBQ: beats RTN on correlated inputs, report loss = 1/2 tr(D H_damped D^T).
#[test]
fn obq_layer_beats_rtn_and_reports_its_loss() {
    let X = quantlab_solvers::synth::correlated_inputs(256, 16, 5, 2);
    let H = hessian_of(X.view());
    let W = quantlab_solvers::synth::random_weight(6, 16, 9);
    let g = UniformGrid::new(3, true).unwrap();
    let params = obq::ObqParams {
        granularity: Granularity::Group(8),
        ..Default::default()
    };
    let out = obq::obq_with_format(W.view(), H.view(), &g, &params).unwrap();
    let rtn = quantlab_grids::quantize_rtn(
        "w",
        W.view(),
        &quantlab_grids::FormatSpec::Uniform(g),
        Granularity::Group(8),
    )
    .unwrap();
    let e_obq = rel_err_from_inputs(W.view(), out.q.view(), X.view());
    let e_rtn = rel_err_from_inputs(W.view(), rtn.dequantize().view(), X.view());
    assert!(e_obq < e_rtn, "obq {e_obq} rtn {e_rtn}");
    // loss identity with the damped Hessian
    let lam = out.report.damp;
    let Hd = H.mapv(|v| v as f64) + Array2::<f64>::eye(16) * lam;
    let D = (&W - &out.q).mapv(|v| v as f64);
    let direct = 0.5 * (D.dot(&Hd) * &D).sum();
    assert!((out.report.loss.unwrap() - direct).abs() < 1e-4 * direct);
    // static params: the RTN fit of W
    assert_eq!(out.scales, rtn.scales);
    let _ = GroupParams::scale_only(1.0);
}
