//! Ragged last group (`Group(g)` with `g` not dividing `in`: `ceil(in / g)` groups, the last
//! one short) through every solver: GPTQ blocked == reference == a test-local unblocked OBS
//! loop (inverse-Hessian downdates, no Cholesky), with and without act-order and static
//! groups; g_idx by hand; OBQ and AWQ on ragged groups against brute force.
#![allow(non_snake_case)]

mod common;
use common::*;
use ndarray::{Array1, Array2};
use quantlab_grids::{quantize_rtn, Format, FormatSpec, Granularity, GroupParams, UniformGrid};
use quantlab_solvers::awq::{apply, scaled_pseudo_quant, search_clip, AwqParams};
use quantlab_solvers::gptq::{gptq, gptq_reference, gptq_with_format, GptqParams};
use quantlab_solvers::obq::{obq_with_format, ObqParams};
use quantlab_solvers::synth::{correlated_inputs, random_weight};
use quantlab_solvers::SolverOutput;

fn problem(out: usize, n: usize, seed: u64, outliers: usize) -> (Array2<f32>, Array2<f32>) {
    let X = correlated_inputs(4 * n, n, seed, outliers);
    (random_weight(out, n, seed + 1), hessian_of(X.view()))
}

fn codes_equal(a: &SolverOutput, b: &SolverOutput, what: &str) {
    let mism = a
        .codes
        .iter()
        .zip(b.codes.iter())
        .filter(|(x, y)| x != y)
        .count();
    assert_eq!(mism, 0, "{what}: {mism} codes differ");
    assert_eq!(a.g_idx, b.g_idx, "{what}: g_idx");
    assert_eq!(a.scales.dim(), b.scales.dim(), "{what}: scales shape");
    let ds = a
        .scales
        .iter()
        .zip(b.scales.iter())
        .fold(0.0f32, |m, (x, y)| {
            m.max((x - y).abs() / y.abs().max(1e-12))
        });
    assert!(ds < 1e-5, "{what}: scales differ by {ds}");
    let (la, lb) = (a.report.loss.unwrap(), b.report.loss.unwrap());
    assert!(
        (la - lb).abs() <= 1e-5 * lb.max(1e-12),
        "{what}: loss {la} vs {lb}"
    );
}

/// The oracle: GPTQ as the OBS derivation states it, one column at a time in the given
/// order, with the explicit inverse Hessian of the not-yet-quantized columns (OBC eq. (3)
/// downdate after each column) instead of the Cholesky factor; group parameters fitted on
/// the current W when the sweep reaches a group (positions `p` with `p / g` equal), the last
/// group short. Returns `(q [out, n], g_idx)`. f64, plain loops, no code shared with the
/// solvers.
fn obs_loop_oracle(
    W: &Array2<f32>,
    H: &Array2<f32>,
    damp_percent: f64,
    fmt: &dyn Format,
    g: usize,
    order: &[usize],
    static_params: Option<&Array2<GroupParams>>,
) -> (Array2<f32>, Vec<u32>) {
    let (out, n) = W.dim();
    let mean = (0..n).map(|i| H[[i, i]] as f64).sum::<f64>() / n as f64;
    let mut Hd = H.mapv(|v| v as f64);
    for i in 0..n {
        Hd[[i, i]] += damp_percent * mean;
    }
    let Hinv0 = quantlab_solvers::linalg::spd_inverse_ref(Hd.view()).unwrap();
    let mut Q = Array2::<f32>::zeros((out, n));
    let mut g_idx = vec![0u32; n];
    for (p, &k) in order.iter().enumerate() {
        g_idx[k] = match static_params {
            Some(_) => (k / g) as u32,
            None => (p / g) as u32,
        };
    }
    for r in 0..out {
        let mut w: Vec<f64> = W.row(r).iter().map(|&v| v as f64).collect();
        let mut Hinv = Hinv0.clone();
        let mut params = GroupParams::scale_only(1.0);
        for (p, &k) in order.iter().enumerate() {
            let gp = match static_params {
                Some(sp) => sp[[r, k / g]],
                None => {
                    if p % g == 0 {
                        let end = (p + g).min(n);
                        let slab: Vec<f32> = order[p..end].iter().map(|&c| w[c] as f32).collect();
                        params = fmt.fit(&slab);
                    }
                    params
                }
            };
            let q = fmt.quantize(w[k] as f32, gp) as f64;
            Q[[r, k]] = q as f32;
            let d = Hinv[[k, k]];
            let e = (w[k] - q) / d;
            let col: Vec<f64> = (0..n).map(|i| Hinv[[i, k]]).collect();
            for i in 0..n {
                w[i] -= e * col[i];
            }
            w[k] = q;
            // remove k from the inverse Hessian of the free columns
            for i in 0..n {
                for j in 0..n {
                    Hinv[[i, j]] -= col[i] * col[j] / d;
                }
            }
        }
    }
    (Q, g_idx)
}

/// Blocked (several block sizes, group starts inside blocks) == reference == the OBS-loop
/// oracle, with a short last group, act-order on and off.
#[test]
fn gptq_blocked_equals_reference_equals_obs_loop_ragged() {
    // 44 columns: groups of 12 -> 12, 12, 12, 8; groups of 16 -> 16, 16, 12
    let (W, H) = problem(9, 44, 31, 0);
    for (bits, gsz) in [(3u32, 12usize), (4, 16), (2, 40)] {
        let f = UniformGrid::new(bits, false).unwrap();
        for act_order in [false, true] {
            let base = GptqParams {
                granularity: Granularity::Group(gsz),
                act_order,
                group_params_from_outer_w: false,
                ..Default::default()
            };
            let r = gptq_reference(W.view(), H.view(), &f, &base).unwrap();
            assert_eq!(r.scales.ncols(), 44usize.div_ceil(gsz));
            for bs in [1, 5, 7, 16, 128] {
                let p = GptqParams {
                    block_size: bs,
                    ..base.clone()
                };
                let a = gptq_with_format(W.view(), H.view(), &f, &p).unwrap();
                codes_equal(&a, &r, &format!("b{bits} g{gsz} act={act_order} B={bs}"));
            }
            // block size 1 with the reference quirk on is the unblocked loop too
            let b1 = gptq_with_format(
                W.view(),
                H.view(),
                &f,
                &GptqParams {
                    block_size: 1,
                    group_params_from_outer_w: true,
                    ..base.clone()
                },
            )
            .unwrap();
            codes_equal(
                &b1,
                &r,
                &format!("b{bits} g{gsz} act={act_order} B=1 quirk"),
            );
            let order = r.report.order.clone().unwrap_or_else(|| (0..44).collect());
            let (Qo, gi) = obs_loop_oracle(&W, &H, 0.01, &f, gsz, &order, None);
            assert_eq!(gi, r.g_idx, "oracle g_idx");
            let same = Qo.iter().zip(r.q.iter()).filter(|(x, y)| x == y).count();
            let dq = Qo
                .iter()
                .zip(r.q.iter())
                .fold(0.0f32, |m, (x, y)| m.max((x - y).abs()));
            assert_eq!(
                same,
                9 * 44,
                "b{bits} g{gsz} act={act_order}: oracle agrees on {same}/396 (max |dq| {dq})"
            );
        }
    }
}

/// Static groups with act-order and a short last group: parameters are RTN's ragged fit of
/// the original W, g_idx = k / g, and blocked == reference == oracle.
#[test]
fn gptq_static_groups_ragged() {
    let (W, H) = problem(7, 40, 32, 0);
    let f = UniformGrid::new(4, false).unwrap();
    let spec = FormatSpec::Uniform(f);
    let rtn = quantize_rtn("w", W.view(), &spec, Granularity::Group(16)).unwrap();
    assert_eq!(rtn.n_groups(), 3); // 16, 16, 8
    for act_order in [false, true] {
        let p = GptqParams {
            granularity: Granularity::Group(16),
            static_groups: true,
            act_order,
            block_size: 6,
            ..Default::default()
        };
        let a = gptq_with_format(W.view(), H.view(), &f, &p).unwrap();
        let r = gptq_reference(W.view(), H.view(), &f, &p).unwrap();
        codes_equal(&a, &r, &format!("static act={act_order}"));
        assert_eq!(a.scales, rtn.scales);
        assert_eq!(a.zeros, rtn.zeros);
        assert_eq!(
            a.g_idx,
            (0..40).map(|k| (k / 16) as u32).collect::<Vec<_>>()
        );
        let sp = Array2::from_shape_fn((7, 3), |(rr, gi)| GroupParams {
            scale: rtn.scales[[rr, gi]],
            zero: rtn.zeros[[rr, gi]],
        });
        let order = r.report.order.clone().unwrap_or_else(|| (0..40).collect());
        let (Qo, _) = obs_loop_oracle(&W, &H, 0.01, &f, 16, &order, Some(&sp));
        assert_eq!(Qo, r.q, "static act={act_order}: oracle");
    }
}

/// act-order g_idx with 576 columns and g = 128 (SmolLM2's width): g_idx[perm[p]] = p / 128,
/// 64 columns in group 4, scales [out, 5]; the hand-off type dequantizes to the solver's Q
/// and counts 4 + 16 * 5 / 576 bits per weight plus 32 bits per column for the g_idx.
#[test]
fn act_order_g_idx_and_bits_576_g128() {
    let (W, H) = problem(8, 576, 33, 4);
    let f = UniformGrid::new(4, true).unwrap();
    let spec = FormatSpec::Uniform(f);
    let p = GptqParams {
        granularity: Granularity::Group(128),
        act_order: true,
        ..Default::default()
    };
    let (lin, rep) = gptq(W.view(), H.view(), &spec, &p).unwrap();
    let mut perm: Vec<usize> = (0..576).collect();
    perm.sort_by(|&a, &b| H[[b, b]].total_cmp(&H[[a, a]]));
    assert_eq!(rep.order.as_ref().unwrap(), &perm);
    for (pos, &k) in perm.iter().enumerate() {
        assert_eq!(lin.g_idx[k] as usize, pos / 128);
    }
    assert_eq!(lin.scales.dim(), (8, 5));
    assert_eq!(lin.g_idx.iter().filter(|&&g| g == 4).count(), 64);
    let b = lin.bits();
    assert_eq!(b.param_bits, 16.0 * 5.0 * 8.0);
    assert_eq!(b.index_bits, 32.0 * 576.0);
    assert_eq!(
        lin.bits_per_weight(),
        4.0 + 80.0 / 576.0 + 32.0 * 576.0 / (8.0 * 576.0)
    );
    // without act-order: trivial g_idx, 4 + 80/576 bits per weight
    let (lin2, _) = gptq(
        W.view(),
        H.view(),
        &spec,
        &GptqParams {
            act_order: false,
            ..p
        },
    )
    .unwrap();
    assert!(lin2.g_idx_is_trivial());
    assert_eq!(lin2.bits_per_weight(), 4.0 + 80.0 / 576.0);
    // GPTQ beats RTN with the short group too
    let rtn = quantize_rtn("w", W.view(), &spec, Granularity::Group(128)).unwrap();
    let e = |q: &Array2<f32>| quantlab_solvers::rel_output_error(W.view(), q.view(), H.view());
    let (eg, er) = (
        e(&lin2.dequantize()).unwrap(),
        e(&rtn.dequantize()).unwrap(),
    );
    assert!(eg < er, "gptq {eg} vs rtn {er}");
}

/// OBQ with a short last group: parameters are RTN's ragged fit, every value lies on its
/// group's grid, the reported loss is `1/2 tr(D H_damped D^T)`, and an exhaustive search
/// over all 4^7 code vectors of each row (with the same ragged parameters) bounds it.
#[test]
fn obq_ragged_static_params_bounded_by_exhaustive() {
    let (W, H) = problem(3, 7, 34, 0);
    let f = UniformGrid::new(2, false).unwrap();
    let spec = FormatSpec::Uniform(f);
    let gran = Granularity::Group(3); // 3, 3, 1
    let o = obq_with_format(
        W.view(),
        H.view(),
        &f,
        &ObqParams {
            granularity: gran,
            ..Default::default()
        },
    )
    .unwrap();
    let rtn = quantize_rtn("w", W.view(), &spec, gran).unwrap();
    assert_eq!(o.scales, rtn.scales);
    assert_eq!(o.scales.ncols(), 3);
    assert_eq!(o.g_idx, vec![0, 0, 0, 1, 1, 1, 2]);
    let lam = o.report.damp;
    let Hd = H.mapv(|v| v as f64) + Array2::<f64>::eye(7) * lam;
    let mut best_total = 0.0;
    let mut direct_total = 0.0;
    for r in 0..3 {
        for k in 0..7 {
            let gp = rtn.params(r, k);
            assert_eq!(f.quantize(o.q[[r, k]], gp), o.q[[r, k]]);
        }
        let w = W.row(r).mapv(|v| v as f64);
        let levels: Vec<Vec<f64>> = (0..7)
            .map(|k| {
                f.levels(rtn.params(r, k))
                    .iter()
                    .map(|&v| v as f64)
                    .collect()
            })
            .collect();
        let mut best = f64::INFINITY;
        for code in 0..(1usize << 14) {
            let q = Array1::from_shape_fn(7, |k| levels[k][(code >> (2 * k)) & 3]);
            best = best.min(half_quad(w.view(), q.view(), Hd.view()));
        }
        let oq = o.q.row(r).mapv(|v| v as f64);
        let direct = half_quad(w.view(), oq.view(), Hd.view());
        assert!(
            best <= direct + 1e-12,
            "row {r}: exhaustive {best} obq {direct}"
        );
        best_total += best;
        direct_total += direct;
    }
    let loss = o.report.loss.unwrap();
    assert!(
        (loss - direct_total).abs() < 1e-6 * direct_total,
        "{loss} vs {direct_total}"
    );
    assert!(best_total <= loss + 1e-9);
}

/// AWQ on a short last group: the pseudo-quantization with unit scales is RTN's ragged
/// quantization, and the clip search's choice for every group (the short one included) is
/// the brute-force best of the shrink candidates.
#[test]
fn awq_clip_and_pseudo_quant_ragged() {
    let (W, H) = problem(4, 40, 35, 2);
    let f = UniformGrid::new(4, false).unwrap();
    let spec = FormatSpec::Uniform(f);
    let gran = Granularity::Group(16); // 16, 16, 8
    let ones = Array1::<f32>::ones(40);
    let pq = scaled_pseudo_quant(W.view(), &ones, &f, gran);
    let rtn = quantize_rtn("w", W.view(), &spec, gran).unwrap();
    assert_eq!(pq, rtn.dequantize());
    let params = AwqParams {
        granularity: gran,
        ..Default::default()
    };
    let clip = search_clip(W.view(), H.view(), &f, &params).unwrap();
    assert_eq!(clip.dim(), (4, 3));
    for r in 0..4 {
        for (gi, (a, b)) in [(0usize, 16usize), (16, 32), (32, 40)]
            .into_iter()
            .enumerate()
        {
            let org = (a..b).fold(0.0f32, |m, k| m.max(W[[r, k]].abs()));
            let mut best = (f64::INFINITY, org);
            for i in 0..10 {
                let mx = org * (1.0 - i as f32 / 20.0);
                let clamped: Vec<f32> = (a..b).map(|k| W[[r, k]].clamp(-mx, mx)).collect();
                let gp = f.fit(&clamped);
                let d: Vec<f64> = (a..b)
                    .map(|k| (W[[r, k]] - f.quantize(clamped[k - a], gp)) as f64)
                    .collect();
                let mut e = 0.0;
                for x in 0..b - a {
                    for y in 0..b - a {
                        e += d[x] * H[[a + x, a + y]] as f64 * d[y];
                    }
                }
                if 0.5 * e < best.0 {
                    best = (0.5 * e, mx);
                }
            }
            assert_eq!(clip[[r, gi]], best.1, "row {r} group {gi}");
        }
    }
    let applied = apply(W.view(), &ones, Some(&clip), gran);
    for r in 0..4 {
        for k in 32..40 {
            assert!(applied[[r, k]].abs() <= clip[[r, 2]]);
        }
    }
}
