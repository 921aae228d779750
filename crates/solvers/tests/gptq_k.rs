//! GPTQ on ggml's K super-block grids (Q2_K .. Q6_K and IQ4_XS, [`GgmlGrid::K`]: a
//! 256-column fit span of sub-block groups): the
//! blocked version equals the plain reference, an identity Hessian gives exactly the RTN of
//! the same super-block fit, static groups are fitted on the original weights, the result
//! beats RTN on correlated inputs, and shapes the grid cannot hold are clear errors.
#![allow(non_snake_case)]

mod common;
use common::*;
use ndarray::Array2;
use quantlab_grids::ggml_k::KSuperParams;
use quantlab_grids::{quantize_rtn, FormatSpec, GgmlGrid, Granularity, GroupParams};
use quantlab_solvers::gptq::{gptq, gptq_reference, gptq_with_format, GptqParams};
use quantlab_solvers::synth::{correlated_inputs, random_weight};
use quantlab_solvers::{rel_output_error, SolverOutput};

fn params(g: GgmlGrid) -> GptqParams {
    GptqParams {
        granularity: Granularity::Group(g.group_len()),
        ..Default::default()
    }
}

/// Every super-block of every row holds parameters of one f16 d times integers.
fn assert_superblocks(g: GgmlGrid, o: &SolverOutput, what: &str) {
    let sub = g.group_len();
    let per = 256 / sub;
    for r in 0..o.scales.nrows() {
        for b in 0..o.scales.ncols() / per {
            let ps: Vec<GroupParams> = (0..per)
                .map(|j| GroupParams {
                    scale: o.scales[[r, b * per + j]],
                    zero: o.zeros[[r, b * per + j]],
                })
                .collect();
            assert!(
                KSuperParams::factor(g, &ps).is_some(),
                "{what}: row {r} super-block {b} is not a K super-block"
            );
        }
    }
}

#[test]
fn blocked_equals_reference_on_k_grids() {
    let (out, n) = (6, 512);
    let X = correlated_inputs(4 * n, n, 21, 2);
    let H = hessian_of(X.view());
    let W = random_weight(out, n, 22);
    for g in GgmlGrid::K {
        for (static_groups, act_order, bs) in [
            (false, false, 128),
            (false, false, 96),
            (true, true, 128),
            (true, false, 200),
        ] {
            let p = GptqParams {
                static_groups,
                act_order,
                block_size: bs,
                group_params_from_outer_w: false,
                ..params(g)
            };
            let what = format!("{g:?} static {static_groups} act-order {act_order} block {bs}");
            let fast = gptq_with_format(W.view(), H.view(), &g, &p).unwrap();
            let reference = gptq_reference(W.view(), H.view(), &g, &p).unwrap();
            let differ = fast
                .codes
                .iter()
                .zip(reference.codes.iter())
                .filter(|(a, b)| a != b)
                .count();
            // the f32 sweep may round a weight lying on a level boundary differently from the
            // f64 reference (module docs); on this well-conditioned problem: never
            assert_eq!(differ, 0, "{what}: {differ} codes differ");
            assert_eq!(fast.scales, reference.scales, "{what}: scales");
            assert_eq!(fast.zeros, reference.zeros, "{what}: zeros");
            assert_eq!(fast.g_idx, reference.g_idx, "{what}");
            let (lf, lr) = (fast.report.loss.unwrap(), reference.report.loss.unwrap());
            assert!((lf - lr).abs() <= 1e-5 * lr, "{what}: loss {lf} vs {lr}");
            assert_superblocks(g, &fast, &what);
            if static_groups || !act_order {
                let trivial: Vec<u32> = (0..n as u32).map(|k| k / g.group_len() as u32).collect();
                assert_eq!(fast.g_idx, trivial, "{what}");
            }
        }
    }
}

#[test]
fn identity_hessian_gives_the_rtn_of_the_same_fit() {
    // H = I: U is diagonal, no error feeds forward, every span is fitted on the original W
    let (out, n) = (5, 768);
    let W = random_weight(out, n, 3);
    let H = Array2::<f32>::eye(n);
    for g in GgmlGrid::K {
        let spec = FormatSpec::Ggml(g);
        let rtn = quantize_rtn("w", W.view(), &spec, Granularity::Group(g.group_len())).unwrap();
        for static_groups in [false, true] {
            let p = GptqParams {
                static_groups,
                ..params(g)
            };
            let (q, _) = gptq(W.view(), H.view(), &spec, &p).unwrap();
            assert_eq!(q.codes, rtn.codes, "{g:?} static {static_groups}");
            assert_eq!(q.scales, rtn.scales, "{g:?}");
            assert_eq!(q.zeros, rtn.zeros, "{g:?}");
            assert_eq!(q.dequantize(), rtn.dequantize(), "{g:?}");
            let r = gptq_reference(W.view(), H.view(), &g, &p).unwrap();
            assert_eq!(r.codes, rtn.codes, "{g:?} reference");
        }
    }
}

#[test]
fn static_groups_are_fitted_on_the_original_weights() {
    let (out, n) = (4, 512);
    let X = correlated_inputs(4 * n, n, 8, 3);
    let H = hessian_of(X.view());
    let W = random_weight(out, n, 9);
    for g in [GgmlGrid::Q4_K, GgmlGrid::Q6_K, GgmlGrid::IQ4_XS] {
        let spec = FormatSpec::Ggml(g);
        let rtn = quantize_rtn("w", W.view(), &spec, Granularity::Group(g.group_len())).unwrap();
        let p = GptqParams {
            static_groups: true,
            act_order: true,
            ..params(g)
        };
        let (q, rep) = gptq(W.view(), H.view(), &spec, &p).unwrap();
        assert_eq!(q.scales, rtn.scales, "{g:?}: static = RTN's parameters");
        assert_eq!(q.zeros, rtn.zeros, "{g:?}");
        assert!(q.g_idx_is_trivial(), "{g:?}");
        assert!(rep.order.is_some(), "{g:?}: act-order permutes the sweep");
        // GPTQ moved codes (error feedback), on the same levels
        assert_ne!(q.codes, rtn.codes, "{g:?}");
    }
}

#[test]
fn gptq_on_k_grids_beats_rtn_on_correlated_inputs() {
    let (out, n) = (32, 512);
    let X = correlated_inputs(4 * n, n, 31, 4);
    let H = hessian_of(X.view());
    let W = random_weight(out, n, 32);
    for g in GgmlGrid::K {
        let spec = FormatSpec::Ggml(g);
        let rtn = quantize_rtn("w", W.view(), &spec, Granularity::Group(g.group_len())).unwrap();
        let (q, _) = gptq(W.view(), H.view(), &spec, &params(g)).unwrap();
        let e_rtn = rel_output_error(W.view(), rtn.dequantize().view(), H.view()).unwrap();
        let e_gptq = rel_output_error(W.view(), q.dequantize().view(), H.view()).unwrap();
        eprintln!("{g:?}: rel output error RTN {e_rtn:.3e}, GPTQ {e_gptq:.3e}");
        assert!(e_gptq < 0.8 * e_rtn, "{g:?}: GPTQ {e_gptq} vs RTN {e_rtn}");
    }
}

#[test]
fn shapes_a_k_grid_cannot_hold_are_errors() {
    let W = random_weight(4, 576, 1);
    let H = Array2::<f32>::eye(576);
    let spec = FormatSpec::Ggml(GgmlGrid::Q4_K);
    let e = gptq(W.view(), H.view(), &spec, &params(GgmlGrid::Q4_K))
        .unwrap_err()
        .to_string();
    assert!(e.contains("256") && e.contains("576"), "{e}");
    let W = random_weight(4, 512, 1);
    let H = Array2::<f32>::eye(512);
    for gran in [Granularity::Group(16), Granularity::PerChannel] {
        let p = GptqParams {
            granularity: gran,
            ..Default::default()
        };
        let e = gptq(W.view(), H.view(), &spec, &p).unwrap_err().to_string();
        assert!(e.contains("groups of 32"), "{e}");
        let e = gptq_reference(W.view(), H.view(), &GgmlGrid::Q4_K, &p)
            .unwrap_err()
            .to_string();
        assert!(e.contains("groups of 32"), "{e}");
    }
}
