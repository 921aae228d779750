//! RTN-like methods without calibration (no forward pass; errors on the weights), GPTQ's
//! refusal of no calibration, and `bench_quantize` with the synthetic LLaMA writer.
#![allow(non_snake_case)]

mod support;

use quantlab_grids::{quantize_rtn, FormatSpec, GgmlGrid, Granularity, UniformGrid};
use quantlab_models::LlamaModel;
use quantlab_pipeline::bench::{bench_quantize, SyntheticLlama};
use quantlab_pipeline::driver::to_array;
use quantlab_pipeline::source::SourceModel;
use quantlab_pipeline::{
    calib, quantize_model, Calibration, Control, ExportFormat, Method, QuantizeConfig, QuantizeJob,
};
use support::{tmpdir, write_tiny};

#[test]
fn data_free_rtn_equals_rtn_of_each_weight_and_reports_weight_error() {
    let dir = tmpdir("datafree");
    write_tiny(dir.path(), 2, 128, 11);
    let float = LlamaModel::load(dir.path()).unwrap();
    for (method, spec, gran) in [
        (
            Method::Rtn,
            FormatSpec::Uniform(UniformGrid::new(4, true).unwrap()),
            Granularity::Group(32),
        ),
        (Method::nf4(), FormatSpec::Nf4, Granularity::Group(64)),
    ] {
        let mut src = SourceModel::load(dir.path()).unwrap();
        let cfg = QuantizeConfig {
            method,
            group_size: Some(match gran {
                Granularity::Group(g) => g as i64,
                _ => -1,
            }),
            ..Default::default()
        };
        let plan = cfg.plan(src.model.config()).unwrap();
        let out = quantize_model(&mut src.model, &[], &plan, &cfg, Control::default()).unwrap();
        assert_eq!(out.timings.forward, 0.0, "{method:?}: no forward pass");
        assert_eq!(out.timings.hessian, 0.0);
        for (ql, r) in out.layers.iter().zip(&out.reports) {
            let W = to_array(&float.linear(&ql.name).unwrap().weight().unwrap()).unwrap();
            // the oracle: the grid's own RTN of the float weight
            let want = quantize_rtn(&ql.name, W.view(), &spec, gran).unwrap();
            let got = ql.linear.as_ref().expect("quantized");
            assert_eq!(got.codes, want.codes, "{}", ql.name);
            let Q = want.dequantize();
            let num: f64 = W
                .iter()
                .zip(Q.iter())
                .map(|(&w, &q)| ((w - q) as f64).powi(2))
                .sum();
            let den: f64 = W.iter().map(|&w| (w as f64).powi(2)).sum();
            assert_eq!(r.error_basis, "weights");
            assert!(
                (r.rel_output_error - num / den).abs() <= 1e-9 * (num / den),
                "{}: {} vs {}",
                ql.name,
                r.rel_output_error,
                num / den
            );
            // the model in memory holds the dequantized weight
            let mem = to_array(&src.model.linear(&ql.name).unwrap().weight().unwrap()).unwrap();
            assert_eq!(mem, Q);
        }
    }
}

#[test]
fn calibrated_rtn_measures_on_inputs_and_imatrix_needs_calibration() {
    let dir = tmpdir("calibrtn");
    write_tiny(dir.path(), 2, 96, 12);
    let cfg = QuantizeConfig {
        method: Method::Rtn,
        group_size: Some(32),
        format: ExportFormat::parse("gguf:q4_0").unwrap(),
        nsamples: 4,
        seqlen: 32,
        ..Default::default()
    };
    let free = {
        let mut src = SourceModel::load(dir.path()).unwrap();
        let plan = cfg.plan(src.model.config()).unwrap();
        quantize_model(&mut src.model, &[], &plan, &cfg, Control::default()).unwrap()
    };
    let texts = Calibration::Texts(support::prose());
    let calibrated = {
        let mut src = SourceModel::load(dir.path()).unwrap();
        let windows = calib::calibration_windows(&src.tokenizer, &texts, 4, 32, 0).unwrap();
        let plan = cfg.plan(src.model.config()).unwrap();
        quantize_model(&mut src.model, &windows, &plan, &cfg, Control::default()).unwrap()
    };
    let float = LlamaModel::load(dir.path()).unwrap();
    let mut differ = 0;
    for ((a, b), r) in free
        .layers
        .iter()
        .zip(&calibrated.layers)
        .zip(&calibrated.reports)
    {
        assert_eq!(r.error_basis, "calibration");
        let W = to_array(&float.linear(&a.name).unwrap().weight().unwrap()).unwrap();
        // data-free on a ggml grid is llama.cpp's plain quantizer
        let plain =
            quantlab_grids::ggml::quantize_ggml_weighted(&a.name, W.view(), GgmlGrid::Q4_0, None)
                .unwrap();
        assert_eq!(a.linear.as_ref().unwrap().codes, plain.codes, "{}", a.name);
        if a.linear.as_ref().unwrap().codes != b.linear.as_ref().unwrap().codes {
            differ += 1;
        }
    }
    assert!(differ > 0, "the imatrix changed no linear's codes");
}

#[test]
fn gptq_and_awq_refuse_no_calibration() {
    let dir = tmpdir("nocalib");
    write_tiny(dir.path(), 2, 96, 13);
    for m in [Method::gptq(), Method::awq(), Method::awq_gptq()] {
        let mut job = QuantizeJob::new(
            dir.path(),
            QuantizeConfig {
                method: m,
                ..Default::default()
            },
        );
        job.calibration = Calibration::None;
        let e = quantlab_pipeline::run(&job, None).unwrap_err().to_string();
        assert!(e.contains("--calib"), "{m:?}: {e}");
        let mut src = SourceModel::load(dir.path()).unwrap();
        let cfg = QuantizeConfig {
            method: m,
            ..Default::default()
        };
        let plan = cfg.plan(src.model.config()).unwrap();
        let e = quantize_model(&mut src.model, &[], &plan, &cfg, Control::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("needs calibration"), "{m:?}: {e}");
    }
}

#[test]
fn bench_quantize_times_a_synthetic_model_and_removes_its_output() {
    let root = tmpdir("bench");
    let spec = SyntheticLlama::parse("synthetic:64,128,2,4,2")
        .unwrap()
        .unwrap();
    let dir = root.path().join("synth");
    spec.write_hf_dir(&dir, 3).unwrap();
    // the written model loads, has the shape asked for, and bf16-rounded uniform weights
    let m = LlamaModel::load(&dir).unwrap();
    let c = m.config();
    assert_eq!(
        (c.hidden_size, c.intermediate_size, c.num_hidden_layers),
        (64, 128, 2)
    );
    assert_eq!((c.num_attention_heads, c.num_key_value_heads), (4, 2));
    let W = to_array(
        &m.linear("model.layers.1.mlp.down_proj")
            .unwrap()
            .weight()
            .unwrap(),
    )
    .unwrap();
    let a = (3.0f32 / 128.0).sqrt();
    assert!(W.iter().all(|v| v.abs() <= a * 1.01));
    let var = W.iter().map(|v| (v * v) as f64).sum::<f64>() / W.len() as f64;
    assert!(
        (var.sqrt() - 1.0 / 128f64.sqrt()).abs() < 0.1 / 128f64.sqrt(),
        "std {}",
        var.sqrt()
    );
    drop(m);
    let before: Vec<_> = std::fs::read_dir(std::env::temp_dir())
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    let cfg = QuantizeConfig {
        method: Method::gptq(),
        group_size: Some(32),
        nsamples: 4,
        seqlen: 32,
        batch_size: 2,
        ..Default::default()
    };
    let mut job = QuantizeJob::new(&dir, cfg);
    job.calibration = Calibration::Texts(support::prose());
    let r = bench_quantize(&job, true).unwrap();
    let e = r.eval_tokens_per_second.unwrap();
    assert!(e > 0.0);
    assert!((r.eval_pass_seconds.unwrap() - 128.0 / e).abs() < 1e-9);
    assert_eq!(r.calibration_tokens, 4 * 32);
    assert!(r.forward > 0.0 && r.hessian > 0.0 && r.solve > 0.0 && r.save > 0.0);
    let p = &r.phases;
    assert_eq!(
        (p.load, p.forward, p.hessian, p.solve, p.save),
        (r.load, r.forward, r.hessian, r.solve, r.save)
    );
    assert!(r.total_seconds >= p.load + p.forward + p.hessian + p.solve + p.save);
    assert!(r.gemm_gflops > 0.0 && r.peak_rss_mb.unwrap() > 0.0);
    assert_eq!(r.gemm_shape, [64, 64, 128]);
    // forward FLOPs: 2 * (q,k,v,o + 3 MLP) per token and block, plus causal attention
    let lin = 2.0 * (64.0 * 64.0 + 2.0 * 64.0 * 32.0 + 64.0 * 64.0 + 3.0 * 64.0 * 128.0);
    let attn = 2.0 * 2.0 * 64.0 * 32.0 / 2.0;
    assert!((r.forward_flops - (lin + attn) * 128.0 * 2.0).abs() < 1e-6);
    assert!(r.forward_gflops.is_some() && r.hessian_gflops.is_some());
    let json = serde_json::to_value(&r).unwrap();
    for k in [
        "load",
        "forward",
        "hessian",
        "solve",
        "save",
        "total_seconds",
        "peak_rss_mb",
        "gemm_gflops",
    ] {
        assert!(json[k].is_number(), "{k} in {json}");
    }
    let after: Vec<_> = std::fs::read_dir(std::env::temp_dir())
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    let left: Vec<_> = after
        .iter()
        .filter(|p| {
            !before.contains(p)
                && p.to_string_lossy()
                    .contains(&format!("quantlab-bench-{}-", std::process::id()))
        })
        .collect();
    assert!(left.is_empty(), "bench left {left:?}");
}
