//! The whole-model pipeline on a tiny random LLaMA written by the test as a Hugging Face
//! directory (safetensors + a byte-level tokenizer.json).
#![allow(non_snake_case)]

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use ndarray::Array2;
use quantlab_grids::{quantize_rtn, FormatSpec, Granularity, UniformGrid};
use quantlab_models::{CaptureHook, LlamaModel};
use quantlab_pipeline::driver::{to_array, to_tensor};
use quantlab_pipeline::save::{load_quantized, save_quantized, SaveInputs};
use quantlab_pipeline::source::SourceModel;
use quantlab_pipeline::{
    dry_run, run, AwqOptions, Calibration, CodebookOptions, EvalSpec, GptqOptions, Int8Options,
    Method, Override, QuantizeConfig, QuantizeJob,
};
use quantlab_solvers::gptq::{gptq, GptqParams};
use quantlab_solvers::hessian::{Counting, Hessian};

mod support;
use support::{prose, quantize_in_memory, InMemory, HEADS, LAYERS};

const INTER: usize = 96;

/// Writes the tiny random LLaMA of `support` with `kv` KV heads and an MLP of 96 into `dir`.
fn write_tiny(dir: &Path, kv: usize, seed: u64) {
    support::write_tiny(dir, kv, INTER, seed);
}

fn tmpdir(tag: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("pipeline-{tag}-"))
        .tempdir()
        .unwrap()
}

fn logits(m: &LlamaModel, tokens: &[u32]) -> Array2<f32> {
    to_array(&m.forward(tokens).unwrap()).unwrap()
}

fn max_abs_diff(a: &Array2<f32>, b: &Array2<f32>) -> f32 {
    a.iter()
        .zip(b.iter())
        .fold(0.0, |m, (x, y)| m.max((x - y).abs()))
}

fn cfg(mut method: Method) -> QuantizeConfig {
    if let Method::Awq(a) | Method::AwqGptq(a, _) = &mut method {
        a.samples = 4;
    }
    QuantizeConfig {
        method,
        bits: None,
        group_size: Some(32),
        nsamples: 8,
        seqlen: 48,
        batch_size: 3,
        ..Default::default()
    }
}

/// Quantizes in memory, saves, and returns (source after quantization, out dir, driver output).
fn quantize_and_save(
    model_dir: &Path,
    out: &Path,
    c: &QuantizeConfig,
) -> (SourceModel, quantlab_pipeline::DriverOutput) {
    let InMemory {
        src, plan, out: o, ..
    } = quantize_in_memory(model_dir, c, false);
    let inputs = SaveInputs {
        model: &src.model,
        others: &src.others,
        layers: &o.layers,
        norm_scales: &o.norm_scales,
        source: model_dir,
        tokenizer: &src.tokenizer,
        quant_config: quantlab_pipeline::job::quantization_config_json(
            &QuantizeJob::new(model_dir, c.clone()),
            &plan,
            &o,
            &quantlab_pipeline::report::CalibrationFacts {
                source: "test".into(),
                nsamples: c.nsamples,
                seqlen: c.seqlen,
                seed: c.seed,
                tokens: c.nsamples * c.seqlen,
            },
            "HfDir",
        ),
        report: serde_json::json!({}),
    };
    save_quantized(out, &inputs, false, None).unwrap();
    (src, o)
}

/// quantize -> save -> load gives the in-memory quantized model's logits (1e-5), the saved
/// codes dequantize to exactly the saved dense weights, and the quantized model differs from
/// the original (the test is not vacuous).
#[test]
fn pipeline_gptq_save_load_roundtrip() {
    let tmp = tmpdir("rt");
    let model_dir = tmp.path().join("tiny");
    write_tiny(&model_dir, 2, 1);
    let out = tmp.path().join("q");
    let c = cfg(Method::Gptq(GptqOptions {
        act_order: true,
        ..Default::default()
    }));
    let (src, o) = quantize_and_save(&model_dir, &out, &c);
    let tokens: Vec<u32> = (0..40).map(|i| (i * 37 % 250) as u32).collect();
    let mem = logits(&src.model, &tokens);
    let ck = load_quantized(&out).unwrap();
    let back = logits(&ck.model, &tokens);
    assert!(
        max_abs_diff(&mem, &back) < 1e-5,
        "{}",
        max_abs_diff(&mem, &back)
    );
    let orig = logits(&LlamaModel::load(&model_dir).unwrap(), &tokens);
    assert!(max_abs_diff(&mem, &orig) > 1e-3);
    assert_eq!(ck.linears.len(), LAYERS * 7);
    for l in &o.layers {
        let q = &ck.linears[&l.name];
        let mine = l.linear.as_ref().unwrap();
        assert_eq!(q.codes, mine.codes, "{}", l.name);
        assert_eq!(q.g_idx, mine.g_idx);
        let dense = to_array(&ck.model.linear(&l.name).unwrap().weight().unwrap()).unwrap();
        assert_eq!(q.dequantize(), dense, "{}", l.name);
    }
    // act-order: a non-trivial g_idx is stored and charged 32 bits per column
    assert!(o
        .layers
        .iter()
        .any(|l| !l.linear.as_ref().unwrap().g_idx_is_trivial()));
    let tok_json = out.join("tokenizer.json");
    assert!(tok_json.is_file() && out.join("config.json").is_file());
    let qc: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("quantization_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(qc["method"], "gptq");
    assert_eq!(qc["group_size"], 32);
    assert_eq!(qc["act_order"], true);
}

/// The whole-model GPTQ equals the layer solver run directly on Hessians captured here with a
/// plain hook and whole-block forwards: in block 0, q, k, v from the original block (codes
/// identical); o from the block with the solver's quantized q, k, v set; gate/up and down
/// likewise after o, then gate/up (true-sequential); block 1 likewise, its inputs the output
/// of the quantized block 0. Codes must be identical in every block.
#[test]
fn pipeline_gptq_equals_layer_solver_on_every_block() {
    let tmp = tmpdir("eq");
    let model_dir = tmp.path().join("tiny");
    write_tiny(&model_dir, 2, 2);
    let c = cfg(Method::gptq());
    let InMemory {
        windows, out: o, ..
    } = quantize_in_memory(&model_dir, &c, false);
    let mut model = LlamaModel::load(&model_dir).unwrap();
    let spec = FormatSpec::Uniform(UniformGrid::new(4, true).unwrap());
    let p = GptqParams {
        granularity: Granularity::Group(32),
        ..Default::default()
    };
    let groups: [&[&str]; 4] = [
        &["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
        &["self_attn.o_proj"],
        &["mlp.gate_proj", "mlp.up_proj"],
        &["mlp.down_proj"],
    ];
    let n_blocks = model.n_blocks();
    assert!(n_blocks >= 2);
    for b in 0..n_blocks {
        for group in groups {
            let first = format!("model.layers.{b}.{}", group[0]);
            let dim = model.linear(&first).unwrap().in_features();
            let mut h = Hessian::new(dim).with_counting(Counting::Tokens);
            {
                let mut hook = CaptureHook::new([first.clone()], |_n: &str, x: &Tensor| {
                    h.add_batch(to_array(x).unwrap().view(), 1).unwrap();
                });
                for chunk in windows.chunks(c.batch_size) {
                    let refs: Vec<&[u32]> = chunk.iter().map(|w| w.as_slice()).collect();
                    let mut e = model.embed(&refs).unwrap();
                    for j in 0..b {
                        e = model.block_forward(j, &e, 0, None, None).unwrap();
                    }
                    model
                        .block_forward(b, &e, 0, None, Some(&mut hook))
                        .unwrap();
                }
            }
            let H = h.finish();
            for l in group {
                let name = format!("model.layers.{b}.{l}");
                let W = to_array(&model.linear(&name).unwrap().weight().unwrap()).unwrap();
                let (lin, _) = gptq(W.view(), H.view(), &spec, &p).unwrap();
                let mine = o
                    .layers
                    .iter()
                    .find(|x| x.name == name)
                    .unwrap()
                    .linear
                    .as_ref()
                    .unwrap();
                assert_eq!(lin.codes, mine.codes, "{name}");
                assert_eq!(lin.scales, mine.scales, "{name}");
                model
                    .set_weight(&name, to_tensor(lin.dequantize().view()).unwrap())
                    .unwrap();
            }
        }
    }
}

/// AWQ scaling folded into the norms and the neighbouring linears, without quantization,
/// keeps the model's function: the saved (folded) checkpoint's logits match the original
/// model's within 1e-5 relative to the largest logit, while its norms and weights did change.
/// Checked with grouped-query attention (v->o scaling skipped) and without (v->o folded).
#[test]
fn pipeline_awq_fold_keeps_outputs() {
    for kv in [2, HEADS] {
        let tmp = tmpdir("awq");
        let model_dir = tmp.path().join("tiny");
        write_tiny(&model_dir, kv, 3);
        let out = tmp.path().join("q");
        let c = cfg(Method::Awq(AwqOptions {
            fold_only: true,
            ..Default::default()
        }));
        let (_src, o) = quantize_and_save(&model_dir, &out, &c);
        let tokens: Vec<u32> = (0..40).map(|i| (i * 53 % 250) as u32).collect();
        let orig_model = LlamaModel::load(&model_dir).unwrap();
        let orig = logits(&orig_model, &tokens);
        let folded_model = LlamaModel::load(&out).unwrap();
        let folded = logits(&folded_model, &tokens);
        let scale = orig.iter().fold(0f32, |m, v| m.max(v.abs()));
        assert!(
            max_abs_diff(&orig, &folded) < 1e-5 * scale,
            "kv {kv}: {} vs {scale}",
            max_abs_diff(&orig, &folded)
        );
        // not vacuous: the norms were divided by non-trivial scales
        assert_eq!(o.norm_scales.len(), 2 * LAYERS);
        let st =
            candle_core::safetensors::load(out.join("model.safetensors"), &Device::Cpu).unwrap();
        let st0 = candle_core::safetensors::load(model_dir.join("model.safetensors"), &Device::Cpu)
            .unwrap();
        let n = "model.layers.0.input_layernorm.weight";
        let d = (&st[n] - &st0[n])
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(d > 1e-3, "norm unchanged");
        let v = "model.layers.0.self_attn.v_proj.weight";
        let o_ = "model.layers.0.self_attn.o_proj.weight";
        let dv = (&st[o_] - &st0[o_])
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        if kv == HEADS {
            assert!(dv > 1e-4, "v->o scaling should change o_proj without GQA");
        } else {
            assert_eq!(dv, 0.0, "with GQA o_proj must be untouched");
        }
        let _ = v;
    }
}

/// Real AWQ (4-bit): the folded checkpoint reproduces the in-memory model (which keeps the
/// norms and holds Q(W s)/s) to float rounding, and the codes dequantize to the stored
/// weights.
#[test]
fn pipeline_awq_quantized_roundtrip() {
    let tmp = tmpdir("awqq");
    let model_dir = tmp.path().join("tiny");
    write_tiny(&model_dir, 2, 4);
    let out = tmp.path().join("q");
    let (src, o) = quantize_and_save(&model_dir, &out, &cfg(Method::awq()));
    let tokens: Vec<u32> = (0..40).map(|i| (i * 29 % 250) as u32).collect();
    let mem = logits(&src.model, &tokens);
    let ck = load_quantized(&out).unwrap();
    let back = logits(&ck.model, &tokens);
    let scale = mem.iter().fold(0f32, |m, v| m.max(v.abs()));
    assert!(max_abs_diff(&mem, &back) < 1e-5 * scale);
    assert!(o
        .reports
        .iter()
        .all(|r| r.awq_alpha.is_some() || r.name.contains("o_proj")));
    assert_eq!(ck.awq_scales.len(), LAYERS * 7);
    for l in &o.layers {
        let dense = to_array(&ck.model.linear(&l.name).unwrap().weight().unwrap()).unwrap();
        assert_eq!(ck.linears[&l.name].dequantize(), dense);
    }
}

/// RTN 8-bit per row: the codes are exactly quantize_rtn of the original weights (RTN does
/// not look at data), every layer's relative output error is tiny and the logits stay close.
#[test]
fn pipeline_rtn8_close_to_original() {
    let tmp = tmpdir("rtn");
    let model_dir = tmp.path().join("tiny");
    write_tiny(&model_dir, 2, 5);
    let out = tmp.path().join("q");
    let c = QuantizeConfig {
        bits: Some(8),
        group_size: Some(-1),
        ..cfg(Method::Rtn)
    };
    let (src, o) = quantize_and_save(&model_dir, &out, &c);
    let orig_model = LlamaModel::load(&model_dir).unwrap();
    let spec = FormatSpec::Uniform(UniformGrid::new(8, true).unwrap());
    for l in &o.layers {
        let W = to_array(&orig_model.linear(&l.name).unwrap().weight().unwrap()).unwrap();
        let q = quantize_rtn("w", W.view(), &spec, Granularity::PerChannel).unwrap();
        assert_eq!(q.codes, l.linear.as_ref().unwrap().codes);
    }
    assert!(
        o.reports
            .iter()
            .all(|r| r.rel_output_error > 0.0 && r.rel_output_error < 1e-3),
        "{:?}",
        o.reports
            .iter()
            .map(|r| r.rel_output_error)
            .collect::<Vec<_>>()
    );
    let tokens: Vec<u32> = (0..40).map(|i| (i * 11 % 250) as u32).collect();
    let a = logits(&orig_model, &tokens);
    let b = logits(&src.model, &tokens);
    let scale = a.iter().fold(0f32, |m, v| m.max(v.abs()));
    assert!(max_abs_diff(&a, &b) < 0.02 * scale);
    // 8-bit codes + one f16 scale per 64 or 96 weights
    let bpw = o.reports[0].bits_per_weight;
    assert!((bpw - (8.0 + 16.0 / 64.0)).abs() < 1e-12, "{bpw}");
}

/// nf4 with double quantization, int8 and fp8: data-free formats, codes equal to
/// quantize_rtn on the original weights, read back through the checkpoint (nested absmax
/// included).
#[test]
fn pipeline_codebook_and_float_formats() {
    let tmp = tmpdir("fmt");
    let model_dir = tmp.path().join("tiny");
    write_tiny(&model_dir, 2, 6);
    let orig = LlamaModel::load(&model_dir).unwrap();
    for (m, dq, g) in [
        (Method::nf4(), true, Some(32)),
        (Method::int8(), false, None),
        (Method::Fp8, false, None),
    ] {
        let out = tmp.path().join(m.name());
        let m = match m {
            Method::Nf4(_) => Method::Nf4(CodebookOptions { double_quant: dq }),
            m => m,
        };
        let c = QuantizeConfig {
            group_size: g,
            ..cfg(m)
        };
        let (_src, o) = quantize_and_save(&model_dir, &out, &c);
        let ck = load_quantized(&out).unwrap();
        let plan = c.plan(orig.config()).unwrap();
        for (l, lp) in o.layers.iter().zip(&plan.layers) {
            let W = to_array(&orig.linear(&l.name).unwrap().weight().unwrap()).unwrap();
            let q = quantize_rtn("w", W.view(), &lp.spec, lp.granularity).unwrap();
            let mine = l.linear.as_ref().unwrap();
            assert_eq!(q.codes, mine.codes, "{m} {}", l.name);
            let back = &ck.linears[&l.name];
            assert_eq!(back.dequantize(), mine.dequantize());
            assert_eq!(back.bits_per_weight(), mine.bits_per_weight());
            assert_eq!(back.nested.is_some(), dq);
        }
    }
}

/// The job API end to end: JSON report keys, perplexity before/after, no temp directory
/// left, deterministic for a seed; skip and override patterns are applied.
#[test]
fn pipeline_job_report_and_determinism() {
    let tmp = tmpdir("job");
    let model_dir = tmp.path().join("tiny");
    write_tiny(&model_dir, 2, 7);
    let eval = tmp.path().join("eval.txt");
    std::fs::write(&eval, prose().join("\n\n")).unwrap();
    let calib = tmp.path().join("calib.txt");
    std::fs::write(&calib, prose()[..3].join("\n\n")).unwrap();
    let mk = |out: &str| QuantizeJob {
        model: model_dir.clone(),
        config: QuantizeConfig {
            skip: vec!["layers.1.mlp.down_proj".into()],
            overrides: vec![Override::parse("model.layers.*.self_attn.q_proj:bits=8").unwrap()],
            ..cfg(Method::gptq())
        },
        calibration: Calibration::File {
            path: calib.clone(),
            field: None,
        },
        out: Some(tmp.path().join(out)),
        overwrite: false,
        eval: Some(EvalSpec {
            text: eval.clone(),
            field: None,
            ctx: 64,
            max_windows: Some(4),
        }),
        progress: false,
    };
    let r1 = run(&mk("a"), None).unwrap();
    let r2 = run(&mk("b"), None).unwrap();
    let v: serde_json::Value = serde_json::from_str(&r1.to_json()).unwrap();
    for k in [
        "bits_per_weight",
        "size_bytes",
        "seconds",
        "layers",
        "ppl_before",
        "ppl_after",
        "timings",
    ] {
        assert!(v.get(k).is_some(), "{k}");
    }
    for k in ["forward", "hessian", "solver"] {
        assert!(v["timings"][k].as_f64().unwrap() >= 0.0);
    }
    let l0 = &v["layers"][0];
    for k in [
        "name",
        "rel_output_error",
        "damp",
        "seconds",
        "bits_per_weight",
    ] {
        assert!(l0.get(k).is_some(), "{k}");
    }
    assert_eq!(v["layers"].as_array().unwrap().len(), LAYERS * 7);
    // determinism: same seed, same weights
    let a = load_quantized(&tmp.path().join("a")).unwrap();
    let b = load_quantized(&tmp.path().join("b")).unwrap();
    assert_eq!(a.linears.len(), b.linears.len());
    for (n, q) in &a.linears {
        assert_eq!(q.codes, b.linears[n].codes, "{n}");
    }
    assert_eq!(r1.ppl_after, r2.ppl_after);
    // skip: left dense; override: q_proj at 8 bits
    assert!(!a.linears.contains_key("model.layers.1.mlp.down_proj"));
    let skipped = r1
        .layers
        .iter()
        .find(|l| l.name == "model.layers.1.mlp.down_proj")
        .unwrap();
    assert!(skipped.skipped && skipped.bits_per_weight == 16.0);
    assert_eq!(
        a.linears["model.layers.0.self_attn.q_proj"].spec,
        FormatSpec::Uniform(UniformGrid::new(8, true).unwrap())
    );
    assert_eq!(
        a.linears["model.layers.0.self_attn.v_proj"].spec,
        FormatSpec::Uniform(UniformGrid::new(4, true).unwrap())
    );
    // the report's bits per weight is the weighted mean over the block linears
    let (mut bits, mut n) = (0.0, 0.0);
    for l in &r1.layers {
        let w = (l.shape.0 * l.shape.1) as f64;
        bits += l.bits_per_weight * w;
        n += w;
    }
    assert!((r1.bits_per_weight - bits / n).abs() < 1e-9);
    assert!(r1.ppl_before.unwrap().is_finite() && r1.ppl_after.unwrap().is_finite());
    // the report's KL divergence and perplexities are those of the written checkpoint
    // against the source model, each loaded from disk, on the same windows
    assert!(v["kld"]["kld_mean"].as_f64().is_some() && v["kld"]["top1_agreement"].is_number());
    let k = r1.kld.as_ref().unwrap();
    {
        let src = SourceModel::load(&model_dir).unwrap();
        let saved = LlamaModel::load(tmp.path().join("a")).unwrap();
        let toks = src
            .tokenizer
            .encode(&std::fs::read_to_string(&eval).unwrap())
            .unwrap();
        let pp = quantlab_models::PplParams {
            ctx: 64,
            max_windows: Some(4),
        };
        let direct = quantlab_models::kl_divergence(
            quantlab_models::KldBase::Model(&src.model),
            &saved,
            &toks,
            &pp,
        )
        .unwrap();
        assert_eq!(direct.kld_mean, k.kld_mean);
        assert_eq!(direct.top1_agreement, k.top1_agreement);
        assert_eq!(
            quantlab_models::perplexity(&src.model, &toks, &pp)
                .unwrap()
                .ppl,
            r1.ppl_before.unwrap()
        );
        assert_eq!(
            quantlab_models::perplexity(&saved, &toks, &pp).unwrap().ppl,
            r1.ppl_after.unwrap()
        );
        assert!(k.kld_mean > 0.0 && k.windows == 4);
    }
    // the written report.json and no temp directories
    assert!(tmp.path().join("a/report.json").is_file());
    let leftovers: Vec<PathBuf> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().contains(".tmp-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    // an existing output directory is refused before any work
    let e = run(&mk("a"), None).unwrap_err().to_string();
    assert!(e.contains("already exists"), "{e}");
    // dry run: nothing written
    let mut j = mk("dry");
    j.eval = None;
    let d = dry_run(&j).unwrap();
    assert_eq!(d.plan.layers.len(), LAYERS * 7);
    assert!(d.table().contains("dry run") && !tmp.path().join("dry").exists());
}

/// Clear errors before any work, each naming the option or path.
#[test]
fn pipeline_errors_before_work() {
    let tmp = tmpdir("err");
    let model_dir = tmp.path().join("tiny");
    write_tiny(&model_dir, 2, 8);
    let out = tmp.path().join("out");
    let job = |c: QuantizeConfig| QuantizeJob {
        out: Some(out.clone()),
        ..QuantizeJob::new(&model_dir, c)
    };
    let err = |j: QuantizeJob| run(&j, None).unwrap_err().to_string();
    // not a model
    let txt = tmp.path().join("notes.txt");
    std::fs::write(&txt, "hello").unwrap();
    let e = err(QuantizeJob {
        model: txt.clone(),
        ..job(cfg(Method::gptq()))
    });
    assert!(
        e.contains("is not a model") && e.contains("notes.txt"),
        "{e}"
    );
    let e = err(QuantizeJob {
        model: tmp.path().to_path_buf(),
        ..job(cfg(Method::gptq()))
    });
    assert!(e.contains("config.json"), "{e}");
    // unknown method
    assert!(Method::parse("gptq2")
        .unwrap_err()
        .to_string()
        .contains("unknown method"));
    // a method's parameters are checked by name
    let e = err(job(cfg(Method::Gptq(GptqOptions {
        damp: -0.5,
        ..Default::default()
    }))));
    assert!(e.contains("--damp") && e.contains("-0.5"), "{e}");
    let e = err(job(cfg(Method::Int8(Int8Options { threshold: 0.0 }))));
    assert!(e.contains("--int8-threshold"), "{e}");
    let e = err(job(QuantizeConfig {
        method: Method::Awq(AwqOptions {
            samples: 0,
            ..Default::default()
        }),
        ..cfg(Method::Rtn)
    }));
    assert!(e.contains("--awq-samples"), "{e}");
    // bits the method does not support
    let e = err(job(QuantizeConfig {
        bits: Some(3),
        ..cfg(Method::nf4())
    }));
    assert!(e.contains("--bits") && e.contains("nf4"), "{e}");
    let e = err(job(QuantizeConfig {
        bits: Some(9),
        ..cfg(Method::gptq())
    }));
    assert!(e.contains("--bits"), "{e}");
    // a group size not dividing the columns (96 of down's input): integer grids take a short
    // last group, bitsandbytes' flat blocks cannot
    let e = err(job(QuantizeConfig {
        group_size: Some(64),
        ..cfg(Method::nf4())
    }));
    assert!(
        e.contains("--group-size") && e.contains("down_proj") && e.contains("96"),
        "{e}"
    );
    // int8 takes no groups, fp8 no asym, double quant only for nf4/fp4
    assert!(err(job(QuantizeConfig {
        group_size: Some(32),
        ..cfg(Method::int8())
    }))
    .contains("--group-size"));
    assert!(err(job(QuantizeConfig {
        sym: false,
        ..cfg(Method::Fp8)
    }))
    .contains("--asym"));
    // a skip pattern that matches nothing; a malformed override
    assert!(err(job(QuantizeConfig {
        skip: vec!["lm_head".into()],
        ..cfg(Method::gptq())
    }))
    .contains("matches no linear"));
    assert!(Override::parse("down_proj").is_err());
    // an interrupted run (the Ctrl-C flag already set) stops and writes nothing
    let stop = std::sync::atomic::AtomicBool::new(true);
    let e = run(&job(cfg(Method::gptq())), Some(&stop))
        .unwrap_err()
        .to_string();
    assert!(e.contains("interrupted"), "{e}");
    assert!(!out.exists());
    // calibration text shorter than one window: fails, and leaves no output
    let short = tmp.path().join("short.txt");
    std::fs::write(&short, "too short").unwrap();
    let e = err(QuantizeJob {
        calibration: Calibration::File {
            path: short,
            field: None,
        },
        ..job(cfg(Method::gptq()))
    });
    assert!(e.contains("fewer than one window"), "{e}");
    assert!(!out.exists());
    let left: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .contains(".tmp-")
        })
        .collect();
    assert!(left.is_empty());
}

/// Low-memory mode (`lazy`): block linears read from the file when their block is reached and
/// kept as codes once quantized. It must give the same codes and scales as the eager mode for
/// every linear, and the same logits (the in-memory model dequantizes the same codes), for the
/// GPTQ, RTN and AWQ+GPTQ paths of the driver; the linears are held as codes afterwards and the
/// skipped one stays in the file (AWQ+GPTQ: in memory, as AWQ scales the whole block).
#[test]
fn lazy_loading_gives_the_same_model() {
    let tmp = tmpdir("lazy");
    let model_dir = tmp.path().join("tiny");
    write_tiny(&model_dir, 1, 7);
    let tokens: Vec<u32> = (0..40).map(|i| (i * 37 % 200) as u32 + 10).collect();
    for method in [Method::gptq(), Method::Rtn, Method::awq_gptq()] {
        let mut c = cfg(method);
        c.skip = vec!["model.layers.1.mlp.up_proj".into()];
        let run_mode = |lazy: bool| {
            let mut c = c.clone();
            c.lazy = lazy;
            let r = quantize_in_memory(&model_dir, &c, lazy);
            (r.src, r.out)
        };
        let (eager, oe) = run_mode(false);
        let (lazy, ol) = run_mode(true);
        for (a, b) in oe.layers.iter().zip(&ol.layers) {
            assert_eq!(a.name, b.name);
            match (&a.linear, &b.linear) {
                (Some(x), Some(y)) => {
                    assert_eq!(x.codes, y.codes, "{method:?} {}", a.name);
                    assert_eq!(x.scales, y.scales, "{method:?} {}", a.name);
                }
                (None, None) => {}
                _ => panic!("{method:?} {}: quantized in one mode only", a.name),
            }
            // (AWQ puts a block's scaled weights in memory, the skipped one included)
            let kind = lazy.model.linear(&a.name).unwrap().kind();
            let want = match (&a.linear, method) {
                (Some(_), _) => "codes",
                (None, Method::AwqGptq(..)) => "dense",
                (None, _) => "lazy",
            };
            assert_eq!(kind, want, "{method:?} {}", a.name);
        }
        let (le, ll) = (logits(&eager.model, &tokens), logits(&lazy.model, &tokens));
        let d = max_abs_diff(&le, &ll);
        assert!(d <= 1e-5, "{method:?}: logits differ by {d}");
    }
}

/// A linear that returns zeros (removes the MLP from a block in the reference AWQ search).
#[derive(Debug)]
struct ZeroLinear(usize, usize);

impl quantlab_models::Linear for ZeroLinear {
    fn forward(&self, x: &Tensor) -> quantlab_models::Result<Tensor> {
        Ok(Tensor::zeros(
            (x.dims()[0], self.0),
            candle_core::DType::F32,
            &Device::Cpu,
        )?)
    }
    fn in_features(&self) -> usize {
        self.1
    }
    fn out_features(&self) -> usize {
        self.0
    }
    fn weight(&self) -> quantlab_models::Result<Tensor> {
        Ok(Tensor::zeros(
            (self.0, self.1),
            candle_core::DType::F32,
            &Device::Cpu,
        )?)
    }
    fn bias(&self) -> Option<Tensor> {
        None
    }
    fn kind(&self) -> &'static str {
        "zero"
    }
}

/// The driver's AWQ scale search re-runs each candidate only from the block stage whose
/// linears it changes. The plain search it replaces, written out here on a fresh float copy
/// of the model (every candidate through the whole block with `block_forward`; for q/k/v
/// with the MLP's three linears replaced by zeros, scored against the same block's float
/// output), chooses the same scales, bit for bit, for block 0 (whose input, the embeddings,
/// both see unchanged).
#[test]
fn awq_staged_search_equals_whole_block_search() {
    use ndarray::Array1;
    use quantlab_solvers::awq::{search_scales, AwqParams, AwqStats};
    let tmp = tmpdir("awqs");
    let model_dir = tmp.path().join("tiny");
    write_tiny(&model_dir, 2, 6);
    let c = cfg(Method::awq());
    let InMemory {
        plan,
        windows,
        out: o,
        ..
    } = quantize_in_memory(&model_dir, &c, false);
    let mut m = LlamaModel::load(&model_dir).unwrap();
    let inps: Vec<Tensor> = windows
        .chunks(c.batch_size)
        .map(|ch| {
            let r: Vec<&[u32]> = ch.iter().map(|w| w.as_slice()).collect();
            m.embed(&r).unwrap()
        })
        .collect();
    // the first awq_samples windows
    let mut subset = Vec::new();
    let mut left = c.method.awq_options().unwrap().samples;
    for h in &inps {
        let take = h.dims()[0].min(left);
        if take > 0 {
            subset.push(h.narrow(0, 0, take).unwrap());
        }
        left -= take;
    }
    // mean |x| of the q and gate inputs over the subset's tokens (the driver's statistics
    // come from the windows it searches on)
    let q_name = "model.layers.0.self_attn.q_proj";
    let g_name = "model.layers.0.mlp.gate_proj";
    let mut sums: std::collections::BTreeMap<String, (Vec<f64>, usize)> = Default::default();
    {
        let mut hook = CaptureHook::new([q_name, g_name], |name: &str, x: &Tensor| {
            let X = to_array(x).unwrap();
            let e = sums
                .entry(name.to_string())
                .or_insert_with(|| (vec![0.0; X.ncols()], 0));
            for row in X.rows() {
                for (a, &v) in e.0.iter_mut().zip(row.iter()) {
                    *a += v.abs() as f64;
                }
                e.1 += 1;
            }
        });
        for h in &subset {
            m.block_forward(0, h, 0, None, Some(&mut hook)).unwrap();
        }
    }
    let stats = |name: &str| {
        let (s, t) = &sums[name];
        let d = s.len();
        AwqStats {
            x_mean: Array1::from_shape_fn(d, |j| (s[j] / *t as f64) as f32),
            H: Array2::zeros((d, d)),
            H_clip: Array2::zeros((d, d)),
        }
    };
    let mse = |a: &[Tensor], b: &[Tensor]| -> f64 {
        let (mut s, mut n) = (0.0, 0usize);
        for (x, y) in a.iter().zip(b) {
            s += (x - y)
                .unwrap()
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap() as f64;
            n += x.elem_count();
        }
        s / n as f64
    };
    let whole = |m: &LlamaModel| -> Vec<Tensor> {
        subset
            .iter()
            .map(|h| m.block_forward(0, h, 0, None, None).unwrap())
            .collect()
    };
    let search = |m: &mut LlamaModel, kinds: &[usize], reference: &[Tensor], st: &AwqStats| {
        let names: Vec<String> = kinds.iter().map(|&k| plan.layers[k].name.clone()).collect();
        let W0: Vec<Array2<f32>> = names
            .iter()
            .map(|n| to_array(&m.linear(n).unwrap().weight().unwrap()).unwrap())
            .collect();
        let views: Vec<_> = W0.iter().map(|w| w.view()).collect();
        let format = plan.layers[kinds[0]].spec.build();
        let params = AwqParams {
            granularity: plan.layers[kinds[0]].granularity,
            ..Default::default()
        };
        let mut loss = |_a: f64, _s: &Array1<f32>, qs: &[Array2<f32>]| -> f64 {
            for (n, q) in names.iter().zip(qs) {
                m.set_weight(n, to_tensor(q.view()).unwrap()).unwrap();
            }
            mse(&whole(m), reference)
        };
        let (a, s, _) =
            search_scales(&views, st, format.as_ref(), &params, Some(&mut loss)).unwrap();
        for (n, w) in names.iter().zip(&W0) {
            m.set_weight(n, to_tensor(w.view()).unwrap()).unwrap();
        }
        (a, s)
    };
    // q, k, v: the block without its MLP
    let mlp = ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"];
    let mut saved = Vec::new();
    for l in mlp {
        let name = format!("model.layers.0.{l}");
        let (o_, i_) = {
            let lin = m.linear(&name).unwrap();
            (lin.out_features(), lin.in_features())
        };
        saved.push(
            m.replace_linear(&name, Box::new(ZeroLinear(o_, i_)))
                .unwrap(),
        );
    }
    let ref_attn = whole(&m);
    let (_, s_qkv) = search(&mut m, &[0, 1, 2], &ref_attn, &stats(q_name));
    for (l, old) in mlp.iter().zip(saved) {
        m.replace_linear(&format!("model.layers.0.{l}"), old)
            .unwrap();
    }
    // gate, up: the whole block
    let ref_full = whole(&m);
    let (_, s_gu) = search(&mut m, &[4, 5], &ref_full, &stats(g_name));

    let got_qkv = &o.norm_scales["model.layers.0.input_layernorm.weight"];
    let got_gu = &o.norm_scales["model.layers.0.post_attention_layernorm.weight"];
    assert_eq!(got_qkv, &s_qkv, "q/k/v scales");
    assert_eq!(got_gu, &s_gu, "gate/up scales");
    // not vacuous: both searches chose non-trivial scales
    assert!(s_qkv.iter().any(|&v| (v - 1.0).abs() > 1e-3));
    assert!(s_gu.iter().any(|&v| (v - 1.0).abs() > 1e-3));
}
