//! Inputs found by fuzzing the model loaders (`fuzz/` targets `llama_config` and `gguf_model`,
//! docs/fuzzing.md), kept as ordinary tests: each hostile config or GGUF file gives an error
//! naming the file and the problem, never a panic or an abort.

use candle_core::{Device, Tensor};
use quantlab_models::weights::{GgufWeights, WeightSource};
use quantlab_models::{LlamaConfig, LlamaModel, MemoryWeights, ModelError};

/// A tiny LLaMA config (width 8, 2 heads, 1 KV head, MLP 16, vocab 16) with `extra` fields
/// appended (a later repeated key wins in serde_json, so `extra` overrides).
fn config(extra: &str) -> String {
    format!(
        r#"{{"architectures": ["LlamaForCausalLM"], "hidden_size": 8, "intermediate_size": 16,
  "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
  "vocab_size": 16, "tie_word_embeddings": true{extra}}}"#
    )
}

/// Weights of exactly the shapes `config("")` asks for.
fn tiny_weights() -> MemoryWeights {
    let mut w = MemoryWeights::new("tiny");
    let mut put = |name: &str, shape: &[usize]| {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
        w.insert(name, Tensor::from_vec(v, shape, &Device::Cpu).unwrap());
    };
    put("model.embed_tokens.weight", &[16, 8]);
    put("model.norm.weight", &[8]);
    let p = "model.layers.0";
    put(&format!("{p}.input_layernorm.weight"), &[8]);
    put(&format!("{p}.post_attention_layernorm.weight"), &[8]);
    for (n, s) in [
        ("self_attn.q_proj", [8, 8]),
        ("self_attn.k_proj", [4, 8]),
        ("self_attn.v_proj", [4, 8]),
        ("self_attn.o_proj", [8, 8]),
        ("mlp.gate_proj", [16, 8]),
        ("mlp.up_proj", [16, 8]),
        ("mlp.down_proj", [8, 16]),
    ] {
        put(&format!("{p}.{n}.weight"), &s);
    }
    w
}

/// `llama_config`: a config claiming 10^14 blocks whose other sizes match the weights. The
/// loader reserved room for every block up front and the process aborted ("memory
/// allocation of 9600000000000000 bytes failed"); now the first missing block is the error.
#[test]
fn huge_block_count_is_a_missing_tensor_not_an_abort() {
    let w = tiny_weights();
    // The control: the same config with one block loads and runs.
    let cfg = LlamaConfig::from_hf_json(&config(""), "config.json").unwrap();
    let m = LlamaModel::from_source(cfg, &w).unwrap();
    assert_eq!(m.forward(&[1, 2]).unwrap().dims(), &[2, 16]);

    let cfg = LlamaConfig::from_hf_json(
        &config(r#", "num_hidden_layers": 100000000000000"#),
        "config.json",
    )
    .unwrap();
    match LlamaModel::from_source(cfg, &w) {
        Err(ModelError::MissingTensor { tensor, .. }) => {
            assert!(tensor.starts_with("model.layers.1."), "{tensor}")
        }
        other => panic!("expected a missing block-1 tensor, got {other:?}"),
    }
}

/// `llama_config`: head count times head width overflowing `usize` panicked ("attempt to
/// multiply with overflow") in `LlamaModel::from_source`; the config is now rejected when read.
#[test]
fn overflowing_head_sizes_are_a_config_error() {
    for (extra, what) in [
        (
            r#", "num_attention_heads": 8589934592, "num_key_value_heads": 1, "head_dim": 4294967296"#,
            "num_attention_heads x head_dim",
        ),
        (
            r#", "vocab_size": 4611686018427387904, "hidden_size": 8"#,
            "vocab_size x hidden_size",
        ),
        (
            r#", "intermediate_size": 4611686018427387904"#,
            "intermediate_size x hidden_size",
        ),
    ] {
        let e = LlamaConfig::from_hf_json(&config(extra), "config.json").unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, ModelError::Config { .. }), "{msg}");
        assert!(msg.contains("config.json"), "{msg}");
        assert!(msg.contains(what) && msg.contains("overflows"), "{msg}");
    }
}

/// Little-endian GGUF v3 with `u32`, `u64` and string metadata values and F32 tensors (`ne`
/// innermost first), written here from the format description.
fn gguf(
    kvs: &[(&str, u32)],
    kvs64: &[(&str, u64)],
    strings: &[(&str, &str)],
    tensors: &[(&str, Vec<u64>)],
) -> Vec<u8> {
    let s = |b: &mut Vec<u8>, x: &str| {
        b.extend_from_slice(&(x.len() as u64).to_le_bytes());
        b.extend_from_slice(x.as_bytes());
    };
    let mut b = b"GGUF".to_vec();
    b.extend_from_slice(&3u32.to_le_bytes());
    b.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    b.extend_from_slice(&((kvs.len() + kvs64.len() + strings.len()) as u64).to_le_bytes());
    for (k, v) in strings {
        s(&mut b, k);
        b.extend_from_slice(&8u32.to_le_bytes());
        s(&mut b, v);
    }
    for (k, v) in kvs {
        s(&mut b, k);
        b.extend_from_slice(&4u32.to_le_bytes());
        b.extend_from_slice(&v.to_le_bytes());
    }
    for (k, v) in kvs64 {
        s(&mut b, k);
        b.extend_from_slice(&10u32.to_le_bytes());
        b.extend_from_slice(&v.to_le_bytes());
    }
    let mut off = 0u64;
    let mut data = Vec::new();
    for (name, ne) in tensors {
        s(&mut b, name);
        b.extend_from_slice(&(ne.len() as u32).to_le_bytes());
        for d in ne {
            b.extend_from_slice(&d.to_le_bytes());
        }
        b.extend_from_slice(&0u32.to_le_bytes()); // F32
        b.extend_from_slice(&off.to_le_bytes());
        let n: u64 = ne.iter().product();
        data.extend((0..n).flat_map(|i| (i as f32 * 0.1).to_le_bytes()));
        data.resize(data.len().next_multiple_of(32), 0);
        off = data.len() as u64;
    }
    b.resize(b.len().next_multiple_of(32), 0);
    b.extend_from_slice(&data);
    b
}

/// `gguf_model` (after 74 thousand inputs): a `general.alignment` of 0. candle 0.11's GGUF
/// reader divides by it ("attempt to divide by zero"); `GgufWeights::open` refuses it before
/// candle reads the header, naming the key.
#[test]
fn gguf_zero_alignment_is_an_error_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let ok = dir.path().join("ok.gguf");
    std::fs::write(
        &ok,
        gguf(&[("general.alignment", 32)], &[], &[], &[("x", vec![4])]),
    )
    .unwrap();
    assert!(GgufWeights::open(&ok).is_ok());
    let bad = dir.path().join("zero-alignment.gguf");
    std::fs::write(
        &bad,
        gguf(&[("general.alignment", 0)], &[], &[], &[("x", vec![4])]),
    )
    .unwrap();
    match GgufWeights::open(&bad) {
        Err(e @ ModelError::Gguf { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains("zero-alignment.gguf"), "{msg}");
            assert!(msg.contains("`general.alignment` is 0"), "{msg}");
            assert!(!msg.contains("panicked"), "{msg}");
        }
        other => panic!("expected a GGUF error, got {other:?}"),
    }
}

/// A `llama` GGUF claiming 2^63 attention heads: the q/k un-permutation checked the rows
/// against `2 * heads`, which overflowed ("attempt to multiply with overflow"). Now an error
/// naming the tensor. (Found reading `weights.rs` while the `gguf_model` target ran.)
#[test]
fn gguf_huge_head_count_is_an_error_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, heads: u64| {
        let p = dir.path().join(name);
        let bytes = gguf(
            &[],
            &[("llama.attention.head_count", heads)],
            &[("general.architecture", "llama")],
            &[("blk.0.attn_q.weight", vec![8, 4])],
        );
        std::fs::write(&p, bytes).unwrap();
        GgufWeights::open(&p).unwrap()
    };
    // The control: 2 heads of 2 rows un-permute.
    let ok = write("two-heads.gguf", 2);
    let q = ok.load("model.layers.0.self_attn.q_proj.weight").unwrap();
    assert_eq!(q.dims(), &[4, 8]);
    let w = write("huge-heads.gguf", 1 << 63);
    let e = w
        .load("model.layers.0.self_attn.q_proj.weight")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("huge-heads.gguf") && e.contains("blk.0.attn_q.weight") && e.contains("heads"),
        "{e}"
    );
}
