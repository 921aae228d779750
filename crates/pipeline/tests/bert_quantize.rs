//! Whole-model quantization of the real all-MiniLM-L6-v2 (from the cache; skips visibly when
//! it is missing: `quantlab fetch minilm`).
//!
//! Oracle for the sequential driver: in true-sequential order, the input a linear sees when
//! it is quantized depends only on the linears quantized before it. So the *written* model
//! (every linear quantized) gives, for every linear, exactly the input the driver captured:
//! one capture over the checkpoint's model, then the layer solver on the float weight with
//! that Hessian, must give the checkpoint's codes and scales bit for bit.

#![allow(non_snake_case)]

use std::cell::RefCell;
use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::Device;
use ndarray::Array2;
use quantlab_models::embed::{eval_embed, EmbedOptions, SentenceEncoder};
use quantlab_pipeline::bert::{batches, calibration_sequences};
use quantlab_pipeline::{run, Calibration, EvalSpec, Method, QuantizeConfig, QuantizeJob};
use quantlab_solvers::gptq::{gptq, GptqParams};
use quantlab_solvers::hessian::{Counting, Hessian};

fn minilm_dir() -> Option<PathBuf> {
    let dir = match std::env::var_os("QUANTLAB_MINILM") {
        Some(d) => PathBuf::from(d),
        None => quantlab_models::fetch::cache_dir().ok()?.join("minilm"),
    };
    (dir.join("model.safetensors").is_file() && dir.join("tokenizer.json").is_file()).then_some(dir)
}

fn to_array(t: &candle_core::Tensor) -> Array2<f32> {
    let (r, c) = t.dims2().unwrap();
    Array2::from_shape_vec((r, c), t.flatten_all().unwrap().to_vec1::<f32>().unwrap()).unwrap()
}

fn config(method: Method, bits: u32) -> QuantizeConfig {
    QuantizeConfig {
        method,
        bits: Some(bits),
        group_size: Some(128),
        nsamples: 8,
        seqlen: 64,
        batch_size: 4,
        ..Default::default()
    }
}

#[test]
fn minilm_gptq_equals_the_layer_solver_on_the_checkpoints_own_inputs() {
    let Some(src) = minilm_dir() else {
        println!("SKIPPED minilm gptq: no MiniLM in the cache (run `quantlab fetch minilm`)");
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("minilm-gptq");
    let cfg = config(Method::gptq(), 4);
    let mut job = QuantizeJob::new(&src, cfg.clone());
    job.out = Some(out.clone());
    job.eval = Some(EvalSpec {
        text: quantlab_models::text::shipped_eval(),
        field: None,
        ctx: 64,
        max_windows: Some(32),
    });
    let rep = run(&job, None).unwrap();
    assert_eq!(rep.layers.len(), 36);
    assert!(rep
        .layers
        .iter()
        .all(|l| !l.skipped && l.rel_output_error > 0.0));
    // 4-bit codes + an f16 scale per 128 columns (symmetric: no stored zero)
    assert!(
        (rep.bits_per_weight - (4.0 + 16.0 / 128.0)).abs() < 1e-9,
        "{}",
        rep.bits_per_weight
    );
    let cos = rep
        .embed_cosine
        .expect("eval text given: embedding cosine reported");
    assert!(cos > 0.9 && cos < 1.0, "cosine {cos}");

    // the checkpoint loads as a sentence encoder and embeds like the report says
    let e = eval_embed(
        &out,
        &quantlab_models::text::shipped_eval(),
        Some(&src),
        &EmbedOptions {
            limit: Some(32),
            max_len: Some(64),
            ..Default::default()
        },
    )
    .unwrap();
    assert!(
        (e.mean_cosine.unwrap() - cos).abs() < 1e-4,
        "{:?} vs {cos}",
        e.mean_cosine
    );

    // the oracle: inputs captured on the written model, solver on the float weights
    let float = SentenceEncoder::load(&src).unwrap();
    let mut qenc = SentenceEncoder::load(&out).unwrap();
    qenc.set_max_len(64).unwrap();
    let seqs =
        calibration_sequences(&qenc, &Calibration::Shipped, cfg.nsamples, 64, cfg.seed).unwrap();
    let data = batches(&seqs, cfg.batch_size, 0).unwrap();
    let names = qenc.model().linear_names();
    let hs: RefCell<HashMap<String, Hessian>> = RefCell::new(HashMap::new());
    let mut hook = |name: &str, x: &candle_core::Tensor| {
        let X = to_array(x);
        hs.borrow_mut()
            .entry(name.to_string())
            .or_insert_with(|| Hessian::new(X.ncols()).with_counting(Counting::Tokens))
            .add_batch(X.view(), 1)
            .unwrap();
    };
    for (ids, mask) in &data {
        qenc.model()
            .forward_with_hook(ids, mask, &mut hook)
            .unwrap();
    }
    let hs = hs.into_inner();
    let saved =
        candle_core::safetensors::load(out.join("quantized.safetensors"), &Device::Cpu).unwrap();
    for name in &names {
        let W = to_array(&float.model().weight(name).unwrap());
        let H = hs[name].finish();
        let p = GptqParams {
            granularity: quantlab_grids::Granularity::Group(128),
            ..Default::default()
        };
        let spec =
            quantlab_grids::FormatSpec::Uniform(quantlab_grids::UniformGrid::new(4, true).unwrap());
        let (q, _) = gptq(W.view(), H.view(), &spec, &p).unwrap();
        let codes: Vec<u8> = saved[&format!("{name}.codes")]
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let want: Vec<u8> = q.codes.iter().copied().collect();
        assert_eq!(codes, want, "codes of {name}");
        let scales = to_array(&saved[&format!("{name}.scales")]);
        assert_eq!(scales, q.scales, "scales of {name}");
        // and the dense weight the loaders read is the dequantized codes
        let dense = to_array(&qenc.model().weight(name).unwrap());
        assert_eq!(dense, q.dequantize(), "dense weight of {name}");
    }
}

#[test]
fn minilm_options_that_do_not_fit_are_refused_before_any_work() {
    let Some(src) = minilm_dir() else {
        println!("SKIPPED minilm errors: no MiniLM in the cache (run `quantlab fetch minilm`)");
        return;
    };
    let e = run(&QuantizeJob::new(&src, config(Method::awq(), 4)), None).unwrap_err();
    assert!(e.to_string().contains("BERT"), "{e}");
    let nf4 = QuantizeConfig {
        group_size: Some(100),
        ..config(Method::nf4(), 4)
    };
    let e = run(&QuantizeJob::new(&src, nf4), None).unwrap_err();
    assert!(e.to_string().contains("encoder.layer.0"), "{e}");
    // an export layout the BERT writer does not have is refused, not silently replaced
    let gguf = QuantizeConfig {
        format: quantlab_pipeline::export::ExportFormat::parse("gguf:q4_0").unwrap(),
        bits: None,
        ..config(Method::Rtn, 4)
    };
    let e = run(&QuantizeJob::new(&src, gguf), None).unwrap_err();
    assert!(
        e.to_string().contains("--format") && e.to_string().contains("BERT"),
        "{e}"
    );
}
