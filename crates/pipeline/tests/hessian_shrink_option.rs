//! GPTQ's Hessian shrinkage (issue 18, `--hessian-shrink`): refused by name outside [0, 1]
//! (only GPTQ carries it: `GptqOptions::hessian_shrink`; the CLI refuses the flag with other
//! methods, crates/cli/tests); its default is 0.5 on ggml's block grids, 0.9 on the K grids
//! and 0 elsewhere.

use quantlab_grids::{FormatSpec, GgmlGrid, UniformGrid};
use quantlab_pipeline::config::{DEFAULT_GGML_HESSIAN_SHRINK, DEFAULT_GGML_K_HESSIAN_SHRINK};
use quantlab_pipeline::{GptqOptions, Method, PipelineError, QuantizeConfig};

fn shrink(s: f64) -> QuantizeConfig {
    QuantizeConfig {
        method: Method::Gptq(GptqOptions {
            hessian_shrink: Some(s),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn option_of(r: quantlab_pipeline::Result<()>) -> String {
    match r {
        Err(PipelineError::InvalidOption { option, .. }) => option,
        other => panic!("expected an option error, got {other:?}"),
    }
}

#[test]
fn refused_outside_the_unit_interval() {
    for s in [-0.01, 1.01, f64::NAN] {
        assert_eq!(option_of(shrink(s).validate()), "--hessian-shrink", "{s}");
    }
    for s in [0.0, 0.5, 1.0] {
        assert!(shrink(s).validate().is_ok(), "{s}");
    }
}

#[test]
fn default_depends_on_the_grid() {
    let c = QuantizeConfig::default();
    let ggml = FormatSpec::Ggml(GgmlGrid::Q4_0);
    let int4 = FormatSpec::Uniform(UniformGrid::new(4, true).unwrap());
    assert_eq!(c.hessian_shrink_for(&ggml), DEFAULT_GGML_HESSIAN_SHRINK);
    assert_eq!(DEFAULT_GGML_HESSIAN_SHRINK, 0.5);
    let k = FormatSpec::Ggml(GgmlGrid::Q4_K);
    assert_eq!(c.hessian_shrink_for(&k), DEFAULT_GGML_K_HESSIAN_SHRINK);
    assert_eq!(DEFAULT_GGML_K_HESSIAN_SHRINK, 0.9);
    assert_eq!(
        c.hessian_shrink_for(&FormatSpec::Ggml(GgmlGrid::IQ4_NL)),
        0.5
    );
    // IQ4_XS is a super-block grid (GgmlGrid::K): the K grids' default
    assert_eq!(
        c.hessian_shrink_for(&FormatSpec::Ggml(GgmlGrid::IQ4_XS)),
        DEFAULT_GGML_K_HESSIAN_SHRINK
    );
    assert_eq!(c.hessian_shrink_for(&int4), 0.0);
    let set = shrink(0.25);
    assert_eq!(set.hessian_shrink_for(&ggml), 0.25);
    assert_eq!(set.hessian_shrink_for(&int4), 0.25);
}
