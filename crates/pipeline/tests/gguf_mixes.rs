//! `--format gguf:q4_k_m` and the other K-quant mixes give every tensor the type llama.cpp's
//! own quantizer gives it. The oracle is `tests/data/llama_quantize_types.json`: the tensor
//! types of the files `llama-quantize --imatrix` (llama-cpp-python 0.3.36's llama.cpp)
//! wrote from SmolLM2-135M's F32 GGUF for each file type, read with the `gguf` package
//! (how it was made: docs/quantize.md, "llama.cpp's K-quant mixes"). The plan is built from
//! SmolLM2's hyper-parameters alone, so this needs no model file.

use std::collections::BTreeMap;

use quantlab_checkpoints::export::gguf::hf_to_gguf_name;
use quantlab_checkpoints::gguf::GgmlType;
use quantlab_grids::FormatSpec;
use quantlab_models::LlamaConfig;
use quantlab_pipeline::export::{k_fallback, llama_cpp_embedding_type, ExportFormat};
use quantlab_pipeline::{Method, QuantizeConfig};
use serde_json::Value;

/// SmolLM2-135M-Instruct's config.json (the fields the plan reads).
fn smollm2() -> LlamaConfig {
    LlamaConfig::from_hf_json(
        r#"{"architectures": ["LlamaForCausalLM"], "hidden_size": 576,
            "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
            "num_key_value_heads": 3, "vocab_size": 49152, "rms_norm_eps": 1e-5,
            "rope_theta": 100000.0, "max_position_embeddings": 8192,
            "tie_word_embeddings": true}"#,
        "smollm2-config.json",
    )
    .unwrap()
}

fn oracle() -> BTreeMap<String, Value> {
    let p = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/data/llama_quantize_types.json"
    );
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn ggml_name(spec: &FormatSpec) -> &'static str {
    match spec {
        FormatSpec::Ggml(g) => g.ggml_name(),
        s => panic!("not a ggml grid: {s:?}"),
    }
}

/// The type llama.cpp 0.3.36 writes where we write `ours`: the same, except that Q2_K / Q3_K
/// rows that are not whole super-blocks fall back to IQ4_NL here and to Q4_0 there (both 4.5
/// bits per weight; docs/quantize.md). In an IQ4_NL or IQ4_XS file they are IQ4_NL in both.
fn theirs_for<'a>(file: &ExportFormat, ours: &'a str) -> &'a str {
    if !matches!(file.gguf_type(), Some(GgmlType::IQ4_NL | GgmlType::IQ4_XS))
        && ours == k_fallback(GgmlType::Q2_K).name()
    {
        "Q4_0"
    } else {
        ours
    }
}

#[test]
fn every_block_linear_gets_llama_quantizes_type_for_each_k_quant_mix() {
    let mc = smollm2();
    let oracle = oracle();
    let names = [
        "q2_k", "q3_k_s", "q3_k_m", "q3_k_l", "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m", "q6_k",
        "iq4_nl", "iq4_xs",
    ];
    for name in names {
        let want = &oracle[&name.to_ascii_uppercase()];
        let fmt = ExportFormat::parse(&format!("gguf:{}", name.to_ascii_uppercase())).unwrap();
        let c = QuantizeConfig {
            method: Method::gptq(),
            format: fmt,
            ..Default::default()
        };
        let plan = c.plan(&mc).unwrap();
        assert_eq!(plan.layers.len(), 7 * 30);
        let tensors = want["tensors"].as_object().unwrap();
        let mut raised = 0;
        for l in &plan.layers {
            let g = hf_to_gguf_name(&format!("{}.weight", l.name)).unwrap();
            let theirs = tensors[&g].as_str().unwrap();
            let ours = ggml_name(&l.spec);
            assert_eq!(theirs_for(&fmt, ours), theirs, "{name}: {g}");
            if ours != ggml_name(&c.spec(4, true).unwrap()) {
                raised += 1;
            }
        }
        // the embeddings (tied: the output role) as llama.cpp types them
        let emb = llama_cpp_embedding_type(fmt.gguf_type().unwrap(), 576, true);
        assert_eq!(
            emb.name(),
            tensors["token_embd.weight"].as_str().unwrap(),
            "{name}"
        );
        // general.file_type as llama.cpp writes it
        assert_eq!(
            fmt.gguf_file().unwrap().file_type(),
            want["file_type"].as_u64().map(|v| v as u32),
            "{name}"
        );
        eprintln!("{name}: {raised} of 210 linears off the base grid");
    }
}

#[test]
fn pure_gives_every_linear_the_base_type_and_the_mixes_are_not_vacuous() {
    let mc = smollm2();
    let types = |fmt: ExportFormat| {
        let c = QuantizeConfig {
            method: Method::gptq(),
            format: fmt,
            ..Default::default()
        };
        let p = c.plan(&mc).unwrap();
        p.layers
            .iter()
            .map(|l| ggml_name(&l.spec))
            .collect::<Vec<_>>()
    };
    let m = ExportFormat::parse("gguf:q4_k_m").unwrap();
    let mixed = types(m);
    let pure = types(m.pure().unwrap());
    assert_eq!(pure, types(ExportFormat::parse("gguf:q4_k").unwrap()));
    // Q4_K_M raises attn_v (Q6_K -> Q8_0 on rows of 576) and ffn_down (Q6_K) in the
    // use_more_bits layers: 14 of the 30 each (0-2, 5, 8, ..., 23, 26-29)
    let n = |v: &[&str], t: &str| v.iter().filter(|x| **x == t).count();
    assert_eq!(n(&mixed, "Q6_K"), 14);
    assert_eq!(n(&mixed, "Q8_0"), 14);
    assert_eq!(n(&pure, "Q6_K") + n(&pure, "Q8_0"), 0);
    assert!(ExportFormat::parse("gptq")
        .unwrap()
        .pure()
        .unwrap_err()
        .to_string()
        .contains("--pure"));
    let e = ExportFormat::parse("gguf:q4_k_x").unwrap_err().to_string();
    assert!(e.contains("q4_k_m") && e.contains("q4_k_x"), "{e}");
}
