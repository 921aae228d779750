//! GPTQ's importance-weighted group fit ([`GroupFit`]) and Hessian shrinkage
//! ([`GptqParams::hessian_shrink`]) on ggml's block grids (issue 18):
//!
//! * the blocked version equals the plain reference in every mode;
//! * full shrinkage with the `diag(H)` fit is exactly importance-weighted RTN
//!   (`rtn_imatrix`, an independent code path), and with the plain fit exactly plain RTN;
//! * the weighted fit leaves the uniform grids' results unchanged (they have no search);
//! * static groups under the weighted fit carry exactly the weighted-RTN scales;
//! * a shrinkage outside `[0, 1]` is refused by name.
#![allow(non_snake_case)]

use ndarray::Array2;
use quantlab_grids::{FormatSpec, GgmlGrid, Granularity, UniformGrid};
use quantlab_solvers::gptq::{gptq, gptq_reference, gptq_with_format, GptqParams, GroupFit};
use quantlab_solvers::rtn::rtn_imatrix;
use quantlab_solvers::synth::{correlated_hessian, random_weight};
use quantlab_solvers::{Par, SolverError};

fn params(g: GgmlGrid, fit: GroupFit, shrink: f64) -> GptqParams {
    GptqParams {
        granularity: Granularity::Group(g.group_len()),
        group_fit: fit,
        hessian_shrink: shrink,
        ..Default::default()
    }
}

const GRIDS: [GgmlGrid; 9] = [
    GgmlGrid::Q4_0,
    GgmlGrid::Q4_1,
    GgmlGrid::Q5_0,
    GgmlGrid::Q5_1,
    GgmlGrid::Q8_0,
    GgmlGrid::IQ4_NL,
    GgmlGrid::Q4_K,
    GgmlGrid::Q6_K,
    GgmlGrid::IQ4_XS,
];

#[test]
fn blocked_equals_reference_in_every_mode() {
    let (out, n) = (6, 256);
    let W = random_weight(out, n, 3);
    let H = correlated_hessian(n, 4, 3, Par::Seq);
    for g in [
        GgmlGrid::Q4_0,
        GgmlGrid::Q5_1,
        GgmlGrid::Q4_K,
        GgmlGrid::IQ4_XS,
    ] {
        for fit in [GroupFit::Plain, GroupFit::HessianDiag, GroupFit::Gptq] {
            for shrink in [0.0, 0.5] {
                for (act, stat) in [(false, false), (true, true)] {
                    let p = GptqParams {
                        act_order: act,
                        static_groups: stat,
                        group_params_from_outer_w: false,
                        block_size: 64,
                        ..params(g, fit, shrink)
                    };
                    let fast = gptq_with_format(W.view(), H.view(), &g, &p).unwrap();
                    let refr = gptq_reference(W.view(), H.view(), &g, &p).unwrap();
                    let what = format!("{g:?} {fit:?} shrink {shrink} act {act}");
                    let differ = fast
                        .codes
                        .iter()
                        .zip(refr.codes.iter())
                        .filter(|(a, b)| a != b)
                        .count();
                    // f32 sweep against f64: a weight on a level boundary may round the
                    // other way (module docs of gptq); allow a handful in 1536
                    assert!(differ <= 8, "{what}: {differ} codes differ");
                    let (lf, lr) = (fast.report.loss.unwrap(), refr.report.loss.unwrap());
                    assert!(
                        (lf - lr).abs() <= 2e-3 * lr.max(1e-12),
                        "{what}: {lf} vs {lr}"
                    );
                }
            }
        }
    }
}

#[test]
fn full_shrinkage_is_weighted_rtn() {
    let (out, n) = (5, 512);
    let W = random_weight(out, n, 11);
    let H = correlated_hessian(n, 12, 4, Par::Seq);
    for g in GRIDS {
        let spec = FormatSpec::Ggml(g);
        let (rtn_w, _) = rtn_imatrix(W.view(), g, Some(H.view())).unwrap();
        let (rtn_p, _) = rtn_imatrix(W.view(), g, None).unwrap();
        for (act, stat) in [(false, false), (true, true)] {
            let base = GptqParams {
                act_order: act,
                static_groups: stat,
                ..params(g, GroupFit::HessianDiag, 1.0)
            };
            let (q, _) = gptq(W.view(), H.view(), &spec, &base).unwrap();
            assert_eq!(
                q.codes, rtn_w.codes,
                "{g:?} act {act}: codes of weighted RTN"
            );
            assert_eq!(q.scales, rtn_w.scales, "{g:?} act {act}: scales");
            assert_eq!(q.zeros, rtn_w.zeros, "{g:?} act {act}: zeros");
            let plain = GptqParams {
                group_fit: GroupFit::Plain,
                ..base
            };
            let (q, _) = gptq(W.view(), H.view(), &spec, &plain).unwrap();
            assert_eq!(q.codes, rtn_p.codes, "{g:?} act {act}: codes of plain RTN");
            assert_eq!(q.scales, rtn_p.scales, "{g:?} act {act}: plain scales");
        }
    }
}

#[test]
fn static_groups_carry_the_weighted_rtn_scales() {
    let (out, n) = (4, 256);
    let W = random_weight(out, n, 21);
    let H = correlated_hessian(n, 22, 2, Par::Seq);
    for g in [
        GgmlGrid::Q4_0,
        GgmlGrid::Q8_0,
        GgmlGrid::Q4_K,
        GgmlGrid::IQ4_XS,
    ] {
        let (rtn_w, _) = rtn_imatrix(W.view(), g, Some(H.view())).unwrap();
        let p = GptqParams {
            act_order: true,
            static_groups: true,
            ..params(g, GroupFit::HessianDiag, 0.5)
        };
        let (q, _) = gptq(W.view(), H.view(), &FormatSpec::Ggml(g), &p).unwrap();
        assert_eq!(q.scales, rtn_w.scales, "{g:?}");
        assert_eq!(q.zeros, rtn_w.zeros, "{g:?}");
        // ... and GPTQ's feedback on them lowers the calibration loss
        let e = |x: &quantlab_grids::QuantizedLinear| {
            quantlab_solvers::rel_output_error(W.view(), x.dequantize().view(), H.view()).unwrap()
        };
        assert!(e(&q) < e(&rtn_w), "{g:?}: {} vs {}", e(&q), e(&rtn_w));
    }
}

#[test]
fn uniform_grids_ignore_the_weighted_fit() {
    let W = random_weight(6, 96, 31);
    let H = correlated_hessian(96, 32, 2, Par::Seq);
    let spec = FormatSpec::Uniform(UniformGrid::new(4, false).unwrap());
    let base = GptqParams {
        granularity: Granularity::Group(32),
        ..Default::default()
    };
    let (a, _) = gptq(W.view(), H.view(), &spec, &base).unwrap();
    for fit in [GroupFit::HessianDiag, GroupFit::Gptq] {
        let (b, _) = gptq(
            W.view(),
            H.view(),
            &spec,
            &GptqParams {
                group_fit: fit,
                ..base.clone()
            },
        )
        .unwrap();
        assert_eq!(a.codes, b.codes, "{fit:?}");
        assert_eq!(a.scales, b.scales, "{fit:?}");
    }
}

#[test]
fn shrinkage_outside_the_unit_interval_is_refused() {
    let W = Array2::<f32>::ones((2, 32));
    let H = Array2::<f32>::eye(32);
    for s in [-0.1, 1.5, f64::NAN] {
        let p = params(GgmlGrid::Q4_0, GroupFit::Plain, s);
        for r in [
            gptq_with_format(W.view(), H.view(), &GgmlGrid::Q4_0, &p),
            gptq_reference(W.view(), H.view(), &GgmlGrid::Q4_0, &p),
        ] {
            match r {
                Err(SolverError::InvalidOption { option, .. }) => {
                    assert_eq!(option, "hessian_shrink")
                }
                other => panic!(
                    "{s}: expected an InvalidOption, got {:?}",
                    other.map(|_| ())
                ),
            }
        }
    }
}
