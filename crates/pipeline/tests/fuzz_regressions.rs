//! Inputs found with the `quantlab_config` fuzz target (`fuzz/`, docs/fuzzing.md) on our own
//! checkpoint reader, kept as ordinary tests.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use ndarray::Array2;
use quantlab_grids::double_quant::DoubleQuant;
use quantlab_grids::{quantize_rtn, FormatSpec, Granularity};
use quantlab_pipeline::save::load_quantized;
use safetensors::tensor::{Dtype, TensorView};

/// A one-block LLaMA (width 8, 2 heads, 1 KV head, MLP 16, vocab 16, tied embeddings).
fn write_tiny_model(dir: &Path) {
    let shapes: Vec<(String, Vec<usize>)> = [
        ("model.embed_tokens.weight", vec![16, 8]),
        ("model.norm.weight", vec![8]),
        ("model.layers.0.input_layernorm.weight", vec![8]),
        ("model.layers.0.post_attention_layernorm.weight", vec![8]),
        ("model.layers.0.self_attn.q_proj.weight", vec![8, 8]),
        ("model.layers.0.self_attn.k_proj.weight", vec![4, 8]),
        ("model.layers.0.self_attn.v_proj.weight", vec![4, 8]),
        ("model.layers.0.self_attn.o_proj.weight", vec![8, 8]),
        ("model.layers.0.mlp.gate_proj.weight", vec![16, 8]),
        ("model.layers.0.mlp.up_proj.weight", vec![16, 8]),
        ("model.layers.0.mlp.down_proj.weight", vec![8, 16]),
    ]
    .into_iter()
    .map(|(n, s)| (n.to_string(), s))
    .collect();
    let data: Vec<Vec<u8>> = shapes
        .iter()
        .map(|(_, s)| {
            (0..s.iter().product::<usize>())
                .flat_map(|i| (i as f32 * 0.37).sin().to_le_bytes())
                .collect()
        })
        .collect();
    let views: Vec<(String, TensorView)> = shapes
        .iter()
        .zip(&data)
        .map(|((n, s), d)| {
            (
                n.clone(),
                TensorView::new(Dtype::F32, s.clone(), d).unwrap(),
            )
        })
        .collect();
    std::fs::write(
        dir.join("model.safetensors"),
        safetensors::serialize(views, None).unwrap(),
    )
    .unwrap();
    std::fs::write(
        dir.join("config.json"),
        r#"{"architectures": ["LlamaForCausalLM"], "hidden_size": 8, "intermediate_size": 16,
            "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
            "vocab_size": 16, "tie_word_embeddings": true}"#,
    )
    .unwrap();
}

/// Our checkpoint files for `up_proj` in NF4 (groups of 8) with double quantization (blocks
/// of 4), as `save_quantized` writes them; `dq_offset` holds `offset_len` values.
fn write_nf4_dq(dir: &Path, offset_len: usize) {
    let name = "model.layers.0.mlp.up_proj";
    let spec = FormatSpec::Nf4;
    let gran = Granularity::Group(8);
    let w = Array2::from_shape_fn((16, 8), |(r, c)| ((r * 8 + c) as f32 * 0.41).sin());
    let q = quantize_rtn(name, w.view(), &spec, gran)
        .unwrap()
        .with_double_quant(DoubleQuant { blocksize: 4 })
        .unwrap();
    let n = q.nested.as_ref().unwrap();
    let cpu = &Device::Cpu;
    let arr = |a: &Array2<f32>| Tensor::from_vec(a.iter().copied().collect(), a.dim(), cpu);
    let mut t: HashMap<String, Tensor> = HashMap::new();
    let codes: Vec<u8> = q.codes.iter().copied().collect();
    t.insert(
        format!("{name}.codes"),
        Tensor::from_vec(codes, (16, 8), cpu).unwrap(),
    );
    t.insert(format!("{name}.scales"), arr(&q.scales).unwrap());
    t.insert(format!("{name}.zeros"), arr(&q.zeros).unwrap());
    t.insert(
        format!("{name}.g_idx"),
        Tensor::from_vec(q.g_idx.clone(), 8, cpu).unwrap(),
    );
    let len = n.codes.len();
    t.insert(
        format!("{name}.dq_codes"),
        Tensor::from_vec(n.codes.clone(), len, cpu).unwrap(),
    );
    let len = n.nested_absmax.len();
    t.insert(
        format!("{name}.dq_absmax"),
        Tensor::from_vec(n.nested_absmax.clone(), len, cpu).unwrap(),
    );
    t.insert(
        format!("{name}.dq_offset"),
        Tensor::from_vec(vec![n.offset; offset_len], offset_len, cpu).unwrap(),
    );
    candle_core::safetensors::save(&t, dir.join("quantized.safetensors")).unwrap();
    let qc = serde_json::json!({"layers": {name: {
        "quantized": true,
        "format_spec": serde_json::to_value(&spec).unwrap(),
        "granularity": serde_json::to_value(gran).unwrap(),
        "double_quant_blocksize": 4,
    }}});
    std::fs::write(
        dir.join("quantization_config.json"),
        serde_json::to_vec(&qc).unwrap(),
    )
    .unwrap();
}

/// The control for the test below: the well-formed checkpoint loads, with its nested scales.
#[test]
fn nf4_double_quant_checkpoint_loads() {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_model(dir.path());
    write_nf4_dq(dir.path(), 1);
    let ck = load_quantized(dir.path()).unwrap();
    let q = &ck.linears["model.layers.0.mlp.up_proj"];
    assert_eq!(q.nested.as_ref().unwrap().blocksize, 4);
    assert_eq!(q.dequantize().dim(), (16, 8));
}

/// Found by replaying a hand-mutated `quantlab_config` seed through the fuzz target (the
/// fuzzer did not reach it in 1.4 million inputs): an empty `dq_offset` tensor. `save.rs`
/// `load_quantized` takes `to_vec1::<f32>()?[0]` ("index out of bounds: the len is 0 but the
/// index is 0"). Minimal fix: `.first().copied()` and a `PipelineError::Format` naming
/// `{layer}.dq_offset` when it is not exactly one value.
#[test]
fn empty_dq_offset_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_model(dir.path());
    write_nf4_dq(dir.path(), 0);
    let e = load_quantized(dir.path())
        .map(|_| ())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("quantized.safetensors") && e.contains("dq_offset"),
        "{e}"
    );
}
