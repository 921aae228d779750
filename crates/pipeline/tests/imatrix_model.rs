//! Importance matrices of the real model (`quantlab imatrix`): the statistics equal the
//! diagonal of the full Hessians computed by another path (the GEMM accumulation of
//! `float_hessians`), the file round-trips through llama.cpp's GGUF layout, RTN weighted by a
//! file equals RTN weighted by a Hessian with that diagonal, and misuse is refused by name.
//! (That `llama-quantize --imatrix` accepts our file, and that we read llama-imatrix's, is
//! checked against llama.cpp's own tools in docs/quantize.md: they take ~10 minutes to build.)

#![allow(non_snake_case)]

use ndarray::Array2;
use quantlab_checkpoints::imatrix::{Imatrix, ImatrixFormat};
use quantlab_grids::GgmlGrid;
use quantlab_models::fetch::{cache_dir, model_path, KnownModel};
use quantlab_models::{LlamaModel, LlamaTokenizer, BLOCK_LINEARS};
use quantlab_pipeline::calib::float_hessians;
use quantlab_pipeline::imatrix::{chunk_windows, compute_imatrix, importance_for};
use quantlab_pipeline::{ExportFormat, Method, QuantizeConfig};
use quantlab_solvers::rtn::{rtn_imatrix, rtn_imatrix_weights};

#[test]
fn imatrix_of_the_real_model_matches_the_hessian_diagonal_and_weighs_rtn() {
    let path = match cache_dir() {
        Ok(c) => model_path(KnownModel::SmolLM2, &c),
        Err(e) => {
            eprintln!("SKIP: no model cache ({e})");
            return;
        }
    };
    if !path.is_file() {
        eprintln!(
            "SKIP: {} is not in the cache (run `quantlab fetch smollm2`)",
            path.display()
        );
        return;
    }
    let model = LlamaModel::load(&path).unwrap();
    let tok = LlamaTokenizer::load(&path).unwrap();
    let text = std::fs::read_to_string(quantlab_models::text::shipped_calibration()).unwrap();
    let tokens = tok.encode(&text).unwrap();
    let ctx = 128;
    let windows = chunk_windows(&tokens, ctx, Some(3), "calib").unwrap();
    assert_eq!(windows.len(), 3);
    assert_eq!(windows[1], tokens[ctx..2 * ctx].to_vec());
    let m = compute_imatrix(&model, &windows, "calib.txt", |_| {}).unwrap();
    assert_eq!(m.entries.len(), model.n_blocks() * BLOCK_LINEARS.len());
    assert_eq!((m.chunk_count, m.chunk_size), (3, ctx as u32));
    // q/k/v (and gate/up) read one input: one statistic, as llama.cpp's files hold
    for b in [0, 17] {
        let q = &m.entries[&format!("blk.{b}.attn_q.weight")];
        assert_eq!(q, &m.entries[&format!("blk.{b}.attn_k.weight")]);
        assert_eq!(q, &m.entries[&format!("blk.{b}.attn_v.weight")]);
        assert_eq!(q.counts, vec![(3 * ctx) as f32]);
        assert_eq!(
            m.entries[&format!("blk.{b}.ffn_gate.weight")],
            m.entries[&format!("blk.{b}.ffn_up.weight")]
        );
    }
    // against the full Hessians' diagonal: H = 2 / windows * X^T X, so
    // mean(x^2) = diag(H) * windows / (2 * tokens) = diag(H) / (2 * ctx)
    let names: Vec<String> = [
        "self_attn.k_proj",
        "self_attn.o_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    ]
    .iter()
    .map(|s| format!("model.layers.21.{s}"))
    .collect();
    let hs = float_hessians(&model, &windows, &names).unwrap();
    let file = std::path::Path::new("memory");
    for n in &names {
        let H = &hs[n];
        let imp = importance_for(&m, file, n, H.nrows()).unwrap();
        let mut worst = 0f64;
        for (k, v) in imp.iter().enumerate() {
            let want = H[[k, k]] as f64 / (2.0 * ctx as f64);
            worst = worst.max((*v as f64 - want).abs() / want.abs().max(1e-6));
        }
        assert!(worst < 1e-3, "{n}: relative difference {worst}");
    }

    // the file, written in llama.cpp's GGUF layout, gives the same importance back
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("smollm2.imatrix");
    m.write(&f, ImatrixFormat::Gguf).unwrap();
    let back = Imatrix::read(&f).unwrap();
    assert_eq!(back.entries, m.entries);

    // RTN weighted by the file == RTN weighted by a Hessian with that diagonal (codes)
    let down = "model.layers.21.mlp.down_proj";
    let W = quantlab_pipeline::tensors::to_array(&model.linear(down).unwrap().weight().unwrap())
        .unwrap();
    let W = W.slice(ndarray::s![..32, ..]).to_owned();
    let imp = importance_for(&back, &f, down, W.ncols()).unwrap();
    let D = Array2::from_diag(&ndarray::Array1::from(imp.clone()));
    for grid in [GgmlGrid::Q4_0, GgmlGrid::Q3_K] {
        let (a, _) = rtn_imatrix_weights(W.view(), grid, Some(&imp)).unwrap();
        let (b, _) = rtn_imatrix(W.view(), grid, Some(D.view())).unwrap();
        assert_eq!(a.codes, b.codes, "{grid:?}");
        assert_eq!(a.scales, b.scales, "{grid:?}");
    }

    // an entry missing, or another width: named
    let mut short = back.clone();
    short.entries.remove("blk.21.ffn_down.weight");
    let e = importance_for(&short, &f, down, W.ncols())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("blk.21.ffn_down.weight") && e.contains("smollm2.imatrix"),
        "{e}"
    );
    let e = importance_for(&back, &f, down, 999)
        .unwrap_err()
        .to_string();
    assert!(e.contains("999") && e.contains("--imatrix"), "{e}");
}

#[test]
fn imatrix_option_is_refused_where_it_has_no_meaning() {
    let base = QuantizeConfig {
        imatrix: Some("x.imatrix".into()),
        method: Method::Rtn,
        format: ExportFormat::parse("gguf:q4_0").unwrap(),
        ..Default::default()
    };
    base.validate().unwrap();
    let gptq = QuantizeConfig {
        method: Method::gptq(),
        ..base.clone()
    };
    let e = gptq.validate().unwrap_err().to_string();
    assert!(e.contains("--imatrix") && e.contains("gptq"), "{e}");
    let own = QuantizeConfig {
        format: ExportFormat::Quantlab,
        ..base.clone()
    };
    let e = own.validate().unwrap_err().to_string();
    assert!(e.contains("--imatrix") && e.contains("gguf"), "{e}");
}
