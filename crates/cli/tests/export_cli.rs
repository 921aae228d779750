//! `quantlab quantize --format` end to end through the binary on a tiny random LLaMA written
//! here (a Hugging Face directory: safetensors and a byte-level tokenizer.json, from
//! `quantlab-testsupport`): GGUF and GPTQ outputs, read back by `quantlab inspect` and
//! `quantlab eval ppl` (the perplexity of the file equals the one `quantize --eval` measured
//! in memory), and a refused combination that writes nothing.

use std::path::Path;
use std::process::Command;

use quantlab_testsupport::{lcg_uniform, write_byte_tokenizer, TinyLlama};
use serde_json::Value;

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

/// A tiny random LLaMA (`quantlab_testsupport::TinyLlama`: width 64, 4 heads, 2 KV heads, MLP
/// 128, vocabulary 260, tied embeddings of scale 0.1, block norms of scale 0.2) drawn from
/// the LCG seeded with 12345, with a byte-level tokenizer.
fn tiny_model(dir: &Path) {
    let spec = TinyLlama {
        kv_heads: 2,
        intermediate: 128,
        vocab: 260,
        embed_scale: 0.1,
        block_norm_scale: 0.2,
        tied: true,
        max_position: 256,
        bos_eos: None,
        ..TinyLlama::default()
    };
    spec.write_hf_dir(dir, &spec.tensors(lcg_uniform(12345)));
    write_byte_tokenizer(&dir.join("tokenizer.json"));
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
