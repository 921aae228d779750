//! Shared fixtures of the export tests: a tiny random LLaMA in a Hugging Face directory with a
//! byte-level tokenizer, calibration prose, and the Python oracle runner.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use safetensors::tensor::{Dtype, TensorView};

/// Width.
pub const D: usize = 64;
/// Attention heads (head dimension 16).
pub const HEADS: usize = 4;
/// Vocabulary (ids >= 256 are never produced by the byte tokenizer).
pub const VOCAB: usize = 300;
/// Blocks.
pub const LAYERS: usize = 2;

/// Writes a tiny random LLaMA (HF names and layout) with `kv` KV heads and an MLP of `inter`
/// into `dir`, with a byte-level tokenizer.
pub fn write_tiny(dir: &Path, kv: usize, inter: usize, seed: u64) {
    std::fs::create_dir_all(dir).unwrap();
    let hd = D / HEADS;
    let mut rng = StdRng::seed_from_u64(seed);
    let mut t: Vec<(String, Vec<usize>, Vec<f32>)> = Vec::new();
    let mut put = |name: String, shape: Vec<usize>, scale: f32, offset: f32| {
        let n = shape.iter().product();
        let v = (0..n)
            .map(|_| offset + scale * (rng.random::<f32>() * 2.0 - 1.0))
            .collect();
        t.push((name, shape, v));
    };
    put("model.embed_tokens.weight".into(), vec![VOCAB, D], 1.0, 0.0);
    for l in 0..LAYERS {
        let p = format!("model.layers.{l}");
        put(format!("{p}.input_layernorm.weight"), vec![D], 0.3, 1.0);
        put(
            format!("{p}.post_attention_layernorm.weight"),
            vec![D],
            0.3,
            1.0,
        );
        put(
            format!("{p}.self_attn.q_proj.weight"),
            vec![HEADS * hd, D],
            0.3,
            0.0,
        );
        put(
            format!("{p}.self_attn.k_proj.weight"),
            vec![kv * hd, D],
            0.3,
            0.0,
        );
        put(
            format!("{p}.self_attn.v_proj.weight"),
            vec![kv * hd, D],
            0.2,
            0.0,
        );
        put(
            format!("{p}.self_attn.o_proj.weight"),
            vec![D, HEADS * hd],
            0.2,
            0.0,
        );
        put(
            format!("{p}.mlp.gate_proj.weight"),
            vec![inter, D],
            0.2,
            0.0,
        );
        put(format!("{p}.mlp.up_proj.weight"), vec![inter, D], 0.2, 0.0);
        put(
            format!("{p}.mlp.down_proj.weight"),
            vec![D, inter],
            0.2,
            0.0,
        );
    }
    put("model.norm.weight".into(), vec![D], 0.2, 1.0);
    put("lm_head.weight".into(), vec![VOCAB, D], 0.3, 0.0);
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = t
        .into_iter()
        .map(|(n, s, v)| (n, s, v.iter().flat_map(|x| x.to_le_bytes()).collect()))
        .collect();
    let views: Vec<(String, TensorView)> = bytes
        .iter()
        .map(|(n, s, b)| {
            (
                n.clone(),
                TensorView::new(Dtype::F32, s.clone(), b).unwrap(),
            )
        })
        .collect();
    std::fs::write(
        dir.join("model.safetensors"),
        safetensors::serialize(views, None).unwrap(),
    )
    .unwrap();
    let cfg = format!(
        r#"{{"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": {D},
        "intermediate_size": {inter}, "num_hidden_layers": {LAYERS}, "num_attention_heads": {HEADS},
        "num_key_value_heads": {kv}, "vocab_size": {VOCAB}, "rope_theta": 10000.0, "rms_norm_eps": 1e-5,
        "tie_word_embeddings": false, "hidden_act": "silu", "max_position_embeddings": 512,
        "bos_token_id": 1, "eos_token_id": 2}}"#
    );
    std::fs::write(dir.join("config.json"), cfg).unwrap();
    write_byte_tokenizer(&dir.join("tokenizer.json"));
}

/// A byte-level BPE without merges: one token per byte (ids < 256).
pub fn write_byte_tokenizer(path: &Path) {
    use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
    use tokenizers::models::bpe::BPE;
    use tokenizers::pre_tokenizers::byte_level::ByteLevel;
    let mut alphabet: Vec<char> = ByteLevel::alphabet().into_iter().collect();
    alphabet.sort();
    let vocab: tokenizers::models::bpe::Vocab = alphabet
        .iter()
        .enumerate()
        .map(|(i, c)| (c.to_string(), i as u32))
        .collect();
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, vec![])
        .build()
        .unwrap();
    let mut tk = tokenizers::Tokenizer::new(bpe);
    tk.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
    tk.with_decoder(Some(ByteLevelDecoder::default()));
    tk.save(path, false).unwrap();
}

/// Random prose from a small word list (deterministic).
pub fn prose() -> Vec<String> {
    let words = [
        "the",
        "model",
        "quantizes",
        "every",
        "layer",
        "with",
        "a",
        "small",
        "grid",
        "and",
        "measures",
        "its",
        "error",
        "on",
        "calibration",
        "text",
        "while",
        "Emma",
        "walked",
        "to",
        "Highbury",
        "in",
        "rain",
        "of",
        "April",
        ",",
        ".",
    ];
    let mut rng = StdRng::seed_from_u64(42);
    (0..6)
        .map(|_| {
            (0..400)
                .map(|_| words[rng.random_range(0..words.len())])
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect()
}

/// A temporary directory named after the test.
pub fn tmpdir(tag: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("export-{tag}-"))
        .tempdir()
        .unwrap()
}

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Runs `python3 ARGS` (an oracle under tests/oracles) with a time limit and parses its JSON
/// output; prints `SKIP: ...` and returns `None` when python3 or `modules` are missing.
pub fn python(modules: &str, args: &[&str]) -> Option<serde_json::Value> {
    let probe = Command::new("python3")
        .args(["-c", &format!("import {modules}")])
        .output();
    match probe {
        Ok(o) if o.status.success() => {}
        Ok(o) => {
            eprintln!(
                "SKIP: python3 lacks {modules}: {}",
                String::from_utf8_lossy(&o.stderr)
            );
            return None;
        }
        Err(e) => {
            eprintln!("SKIP: python3 not runnable: {e}");
            return None;
        }
    }
    let out = Command::new("timeout")
        .arg("300")
        .arg("python3")
        .args(args)
        .output()
        .expect("run python3");
    assert!(
        out.status.success(),
        "python3 {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(serde_json::from_slice(&out.stdout).expect("python printed JSON"))
}

/// Every float32 tensor of a safetensors file: name -> (shape, values).
pub fn read_f32_safetensors(
    path: &Path,
) -> std::collections::HashMap<String, (Vec<usize>, Vec<f32>)> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(n, v)| {
            let d: Vec<f32> = v
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect();
            (n, (v.shape().to_vec(), d))
        })
        .collect()
}
