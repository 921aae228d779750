//! `quantlab quantize --format` end to end through the binary on a tiny random LLaMA written
//! here (a Hugging Face directory: safetensors and a byte-level tokenizer.json written by
//! hand): GGUF and GPTQ outputs, read back by `quantlab inspect` and `quantlab eval ppl`
//! (the perplexity of the file equals the one `quantize --eval` measured in memory), and a
//! refused combination that writes nothing.

use std::path::Path;
use std::process::Command;

use serde_json::{json, Value};

fn quantlab(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_quantlab"))
        .args(args)
        .output()
        .expect("run quantlab");
    (
        out.status.success(),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

const D: usize = 64;
const INTER: usize = 128;
const VOCAB: usize = 260;

/// A safetensors file of f32 tensors, written by hand (8-byte header length, JSON, data).
fn write_safetensors(path: &Path, tensors: &[(String, Vec<usize>, Vec<f32>)]) {
    let mut header = serde_json::Map::new();
    let mut data = Vec::new();
    for (name, shape, v) in tensors {
        let start = data.len();
        data.extend(v.iter().flat_map(|x| x.to_le_bytes()));
        header.insert(
            name.clone(),
            json!({"dtype": "F32", "shape": shape, "data_offsets": [start, data.len()]}),
        );
    }
    let mut h = serde_json::to_vec(&Value::Object(header)).unwrap();
    while h.len() % 8 != 0 {
        h.push(b' ');
    }
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend(h);
    out.extend(data);
    std::fs::write(path, out).unwrap();
}

/// GPT-2's byte-to-unicode alphabet as a byte-level BPE vocabulary without merges.
fn byte_tokenizer_json() -> Value {
    let mut bs: Vec<u32> = (33..=126).chain(161..=172).chain(174..=255).collect();
    let mut cs = bs.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !bs.contains(&b) {
            bs.push(b);
            cs.push(256 + n);
            n += 1;
        }
    }
    let mut chars: Vec<char> = cs.iter().map(|&c| char::from_u32(c).unwrap()).collect();
    chars.sort();
    let vocab: serde_json::Map<String, Value> = chars
        .iter()
        .enumerate()
        .map(|(i, c)| (c.to_string(), json!(i)))
        .collect();
    let bl = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true});
    json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": bl, "post_processor": null, "decoder": bl,
        "model": {"type": "BPE", "dropout": null, "unk_token": null,
                  "continuing_subword_prefix": null, "end_of_word_suffix": null,
                  "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": vocab, "merges": []}
    })
}

fn tiny_model(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    // a small linear congruential generator: deterministic, no dependency
    let mut s = 12345u64;
    let mut rnd = move || {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((s >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
    };
    let mut t = Vec::new();
    let mut put = |name: String, shape: Vec<usize>, scale: f32, offset: f32| {
        let n: usize = shape.iter().product();
        let v = (0..n).map(|_| offset + scale * rnd()).collect();
        t.push((name, shape, v));
    };
    put("model.embed_tokens.weight".into(), vec![VOCAB, D], 0.1, 0.0);
    for l in 0..2 {
        let p = format!("model.layers.{l}");
        put(format!("{p}.input_layernorm.weight"), vec![D], 0.2, 1.0);
        put(
            format!("{p}.post_attention_layernorm.weight"),
            vec![D],
            0.2,
            1.0,
        );
        put(format!("{p}.self_attn.q_proj.weight"), vec![D, D], 0.3, 0.0);
        put(
            format!("{p}.self_attn.k_proj.weight"),
            vec![32, D],
            0.3,
            0.0,
        );
        put(
            format!("{p}.self_attn.v_proj.weight"),
            vec![32, D],
            0.2,
            0.0,
        );
        put(format!("{p}.self_attn.o_proj.weight"), vec![D, D], 0.2, 0.0);
        put(
            format!("{p}.mlp.gate_proj.weight"),
            vec![INTER, D],
            0.2,
            0.0,
        );
        put(format!("{p}.mlp.up_proj.weight"), vec![INTER, D], 0.2, 0.0);
        put(
            format!("{p}.mlp.down_proj.weight"),
            vec![D, INTER],
            0.2,
            0.0,
        );
    }
    put("model.norm.weight".into(), vec![D], 0.2, 1.0);
    write_safetensors(&dir.join("model.safetensors"), &t);
    let cfg = json!({"architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": D, "intermediate_size": INTER, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": VOCAB,
        "rope_theta": 10000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": true,
        "hidden_act": "silu", "max_position_embeddings": 256});
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    std::fs::write(
        dir.join("tokenizer.json"),
        byte_tokenizer_json().to_string(),
    )
    .unwrap();
}

fn text() -> String {
    let words = [
        "the", "grid", "of", "Emma", "walked", "rain", "a", "model", ",", ".",
    ];
    (0..3000)
        .map(|i| words[(i * 7 + i / 3) % words.len()])
        .collect::<Vec<_>>()
        .join(" ")
}

fn json_of(s: &str) -> Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("{e}: {s}"))
}

#[test]
fn quantize_to_gguf_and_gptq_then_inspect_and_eval_the_files() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("tiny");
    tiny_model(&model);
    let txt = tmp.path().join("text.txt");
    std::fs::write(&txt, text()).unwrap();
    let (m, t) = (model.to_str().unwrap(), txt.to_str().unwrap());
    let common = [
        "--model",
        m,
        "--calib",
        t,
        "--nsamples",
        "6",
        "--seqlen",
        "40",
        "--eval",
        t,
        "--eval-ctx",
        "48",
        "--max-windows",
        "3",
        "--json",
    ];
    for (fmt, out) in [("gguf:q4_0", "tiny-q4_0.gguf"), ("gptq", "tiny-gptq")] {
        let out = tmp.path().join(out);
        let o = out.to_str().unwrap();
        let mut args = vec!["quantize", "--method", "gptq", "--format", fmt, "--out", o];
        if fmt == "gptq" {
            args.extend(["--group-size", "32"]);
        }
        args.extend(common);
        let (ok, stdout, stderr) = quantlab(&args);
        assert!(ok, "{fmt}: {stderr}");
        let rep = json_of(&stdout);
        let after = rep["ppl_after"].as_f64().unwrap();
        assert!(out.exists());

        let (ok, stdout, stderr) = quantlab(&["inspect", o, "--json"]);
        assert!(ok, "{stderr}");
        let ins = json_of(&stdout);
        let q = if fmt == "gptq" {
            ins.clone()
        } else {
            ins["quantization"].clone()
        };
        if fmt == "gptq" {
            assert_eq!(q["format"], "gptq");
            assert_eq!(q["bits"], 4);
            assert_eq!(q["group_size"], 32);
            // 4-bit codes + f16 scale and packed 4-bit zero per 32 + int32 g_idx per column
            let bpw = q["bits_per_weight"].as_f64().unwrap();
            let want = 4.0 + (16.0 + 4.0) / 32.0;
            assert!(bpw > want && bpw < want + 0.6, "{bpw}");
        } else {
            assert_eq!(q["format"], "gguf Q4_0");
            assert_eq!(q["group_size"], 32);
            assert!((q["bits_per_weight"].as_f64().unwrap() - 4.5).abs() < 1e-9);
            assert_eq!(q["quantized_tensors"], 14);
        }
        assert!(q["size_bytes"].as_u64().unwrap() > 0);

        let (ok, stdout, stderr) = quantlab(&[
            "eval",
            "ppl",
            "--model",
            o,
            "--text",
            t,
            "--ctx",
            "48",
            "--max-windows",
            "3",
            "--json",
        ]);
        assert!(ok, "{stderr}");
        let ppl = json_of(&stdout)["ppl"].as_f64().unwrap();
        // gptq: f16 scales and f16 embeddings; gguf: the tied embedding is written as Q8_0
        // (llama.cpp's rule), so the file's model differs slightly from the in-memory one
        let tol = if fmt == "gptq" { 5e-3 } else { 2e-2 };
        assert!(
            (ppl - after).abs() / after < tol,
            "{fmt}: eval {ppl} vs quantize's in-memory {after}"
        );
    }
    // refused before any work, nothing written
    let out = tmp.path().join("v1-asym");
    let o = out.to_str().unwrap();
    let mut args = vec![
        "quantize", "--method", "gptq", "--asym", "--format", "gptq", "--out", o,
    ];
    args.extend(common);
    let (ok, _, stderr) = quantlab(&args);
    assert!(!ok && stderr.contains("gptq_v2"), "{stderr}");
    assert!(!out.exists());
}
