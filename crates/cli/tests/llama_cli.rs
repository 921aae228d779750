//! `quantlab eval ppl` and `quantlab generate` end to end on a tiny GGUF written byte by byte
//! here (GGUF v3 layout). The model's output head is zero, so it predicts the uniform
//! distribution and its perplexity is exactly the vocabulary size (12); its greedy choice is
//! token 0, the end-of-sequence token, so generation stops at once.

use std::path::Path;
use std::process::Command;

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

fn gguf_string(b: &mut Vec<u8>, s: &str) {
    b.extend((s.len() as u64).to_le_bytes());
    b.extend(s.as_bytes());
}

enum Kv<'a> {
    U32(u32),
    Str(&'a str),
    Strs(Vec<&'a str>),
    I32s(Vec<i32>),
}

/// A GGUF v3 file: metadata, then F32 tensors (dims given HF-style `[rows, cols]`).
fn write_gguf(path: &Path, kvs: &[(&str, Kv)], tensors: &[(&str, Vec<usize>, Vec<f32>)]) {
    let mut b = Vec::new();
    b.extend(b"GGUF");
    b.extend(3u32.to_le_bytes());
    b.extend((tensors.len() as u64).to_le_bytes());
    b.extend((kvs.len() as u64).to_le_bytes());
    for (k, v) in kvs {
        gguf_string(&mut b, k);
        match v {
            Kv::U32(x) => {
                b.extend(4u32.to_le_bytes());
                b.extend(x.to_le_bytes());
            }
            Kv::Str(s) => {
                b.extend(8u32.to_le_bytes());
                gguf_string(&mut b, s);
            }
            Kv::Strs(a) => {
                b.extend(9u32.to_le_bytes());
                b.extend(8u32.to_le_bytes());
                b.extend((a.len() as u64).to_le_bytes());
                for s in a {
                    gguf_string(&mut b, s);
                }
            }
            Kv::I32s(a) => {
                b.extend(9u32.to_le_bytes());
                b.extend(5u32.to_le_bytes());
                b.extend((a.len() as u64).to_le_bytes());
                for x in a {
                    b.extend(x.to_le_bytes());
                }
            }
        }
    }
    let mut offset = 0u64;
    for (name, dims, data) in tensors {
        gguf_string(&mut b, name);
        b.extend((dims.len() as u32).to_le_bytes());
        for d in dims.iter().rev() {
            b.extend((*d as u64).to_le_bytes());
        }
        b.extend(0u32.to_le_bytes()); // F32
        b.extend(offset.to_le_bytes());
        offset += (data.len() * 4).div_ceil(32) as u64 * 32;
    }
    while b.len() % 32 != 0 {
        b.push(0);
    }
    for (_, _, data) in tensors {
        let start = b.len();
        for x in data {
            b.extend(x.to_le_bytes());
        }
        while (b.len() - start) % 32 != 0 {
            b.push(0);
        }
    }
    std::fs::write(path, b).unwrap();
}

fn tiny_model(path: &Path) {
    let (v, d, f) = (12usize, 8usize, 16usize);
    let toks = vec![
        "<|endoftext|>",
        "a",
        "b",
        "c",
        "Ġ",
        "1",
        "2",
        "ab",
        "Ġa",
        "Ġab",
        "12",
        "Ċ",
    ];
    let types = toks
        .iter()
        .map(|t| if t.starts_with("<|") { 3 } else { 1 })
        .collect();
    let kvs = vec![
        ("general.architecture", Kv::Str("llama")),
        ("llama.block_count", Kv::U32(1)),
        ("llama.embedding_length", Kv::U32(d as u32)),
        ("llama.feed_forward_length", Kv::U32(f as u32)),
        ("llama.attention.head_count", Kv::U32(2)),
        ("llama.attention.head_count_kv", Kv::U32(2)),
        ("tokenizer.ggml.model", Kv::Str("gpt2")),
        ("tokenizer.ggml.pre", Kv::Str("smollm")),
        ("tokenizer.ggml.tokens", Kv::Strs(toks)),
        ("tokenizer.ggml.token_type", Kv::I32s(types)),
        (
            "tokenizer.ggml.merges",
            Kv::Strs(vec!["Ġ a", "a b", "Ġa b", "1 2"]),
        ),
        ("tokenizer.ggml.eos_token_id", Kv::U32(0)),
        (
            "tokenizer.chat_template",
            Kv::Str("{% for m in messages %}{{ m.content }}{% endfor %}"),
        ),
    ];
    let z = |n: usize| vec![0f32; n];
    let one = |n: usize| vec![1f32; n];
    let tensors = vec![
        ("token_embd.weight", vec![v, d], z(v * d)),
        ("output_norm.weight", vec![d], one(d)),
        ("blk.0.attn_norm.weight", vec![d], one(d)),
        ("blk.0.ffn_norm.weight", vec![d], one(d)),
        ("blk.0.attn_q.weight", vec![d, d], z(d * d)),
        ("blk.0.attn_k.weight", vec![d, d], z(d * d)),
        ("blk.0.attn_v.weight", vec![d, d], z(d * d)),
        ("blk.0.attn_output.weight", vec![d, d], z(d * d)),
        ("blk.0.ffn_gate.weight", vec![f, d], z(f * d)),
        ("blk.0.ffn_up.weight", vec![f, d], z(f * d)),
        ("blk.0.ffn_down.weight", vec![d, f], z(d * f)),
    ];
    write_gguf(path, &kvs, &tensors);
}

#[test]
fn eval_ppl_json_on_a_uniform_model_gives_the_vocabulary_size() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny.gguf");
    tiny_model(&model);
    let text = dir.path().join("text.txt");
    // 7 tokens per repetition (ab | Ġab | 1 | 2 | Ġ | c | Ċ): 280 tokens, 17 windows of 16
    std::fs::write(&text, "ab ab12 c\n".repeat(40)).unwrap();
    let (ok, out, err) = quantlab(&[
        "eval",
        "ppl",
        "--model",
        model.to_str().unwrap(),
        "--text",
        text.to_str().unwrap(),
        "--ctx",
        "16",
        "--json",
    ]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert!((v["ppl"].as_f64().unwrap() - 12.0).abs() < 1e-4, "{v}");
    assert!((v["nll"].as_f64().unwrap() - 12f64.ln()).abs() < 1e-5);
    assert_eq!(v["windows"], 17);
    assert_eq!(v["tokens_scored"], 17 * 15);
    for k in ["seconds", "tokens_per_second", "peak_rss_mb"] {
        assert!(v[k].as_f64().unwrap() > 0.0, "{k} in {v}");
    }
    // --max-windows keeps the first N
    let (ok, out, _) = quantlab(&[
        "eval",
        "ppl",
        "--model",
        model.to_str().unwrap(),
        "--text",
        text.to_str().unwrap(),
        "--ctx",
        "16",
        "--max-windows",
        "3",
        "--json",
    ]);
    assert!(ok);
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["windows"], 3);
    // a text shorter than one window is an error naming the file
    let short = dir.path().join("short.txt");
    std::fs::write(&short, "ab ab12").unwrap();
    let (ok, _, err) = quantlab(&[
        "eval",
        "ppl",
        "--model",
        model.to_str().unwrap(),
        "--text",
        short.to_str().unwrap(),
        "--ctx",
        "16",
    ]);
    assert!(!ok);
    assert!(
        err.contains("short.txt") && err.contains("fewer than one window"),
        "{err}"
    );
}

#[test]
fn generate_stops_at_end_of_sequence() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny.gguf");
    tiny_model(&model);
    let (ok, out, err) = quantlab(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "ab c",
        "--max-tokens",
        "5",
        "--json",
    ]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    // uniform logits: argmax is token 0 = EOS, so nothing is generated
    assert_eq!(v["stopped_at_eos"], true, "{v}");
    assert_eq!(v["tokens"].as_array().unwrap().len(), 0);
    assert_eq!(v["prompt_tokens"], 3); // ab | Ġ | c
                                       // a missing model file is named
    let (ok, _, err) = quantlab(&[
        "generate",
        "--model",
        "/nonexistent/m.gguf",
        "--prompt",
        "x",
    ]);
    assert!(!ok);
    assert!(err.contains("/nonexistent/m.gguf"), "{err}");
}

#[test]
fn quantize_refuses_a_flag_of_another_method_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny.gguf");
    tiny_model(&model);
    let m = model.to_str().unwrap();
    // each method carries its own parameters: a flag that belongs to another one is refused
    // before any work, naming the flag and the method
    for (method, flag, value) in [
        ("rtn", "--act-order", None),
        ("awq", "--static-groups", None),
        ("nf4", "--damp", Some("0.1")),
        ("fp8", "--block-size", Some("64")),
        ("rtn", "--hessian-shrink", Some("0.5")),
        ("gptq", "--double-quant", None),
        ("nf4", "--int8-threshold", Some("5")),
    ] {
        let mut args = vec![
            "quantize",
            "--model",
            m,
            "--method",
            method,
            "--dry-run",
            flag,
        ];
        args.extend(value);
        let (ok, _, err) = quantlab(&args);
        assert!(!ok, "{method} {flag} accepted");
        assert!(err.contains(flag) && err.contains(method), "{err}");
    }
    // a method's own parameter out of range is named too
    let (ok, _, err) = quantlab(&[
        "quantize",
        "--model",
        m,
        "--method",
        "gptq",
        "--dry-run",
        "--damp=-1",
    ]);
    assert!(!ok && err.contains("--damp") && err.contains("-1"), "{err}");
    // and the same flags are taken by the method they belong to
    let (ok, out, err) = quantlab(&[
        "quantize",
        "--model",
        m,
        "--method",
        "gptq",
        "--dry-run",
        "--act-order",
        "--static-groups",
        "--damp",
        "0.1",
        "--hessian-shrink",
        "0.5",
        "--group-size",
        "-1",
    ]);
    assert!(ok, "{out}{err}");
}

/// `--model smollm2` / `--model minilm` name the cached models in every verb that takes a
/// model, `quantize` included (a BERT directory there): resolved through the cache directory
/// (`QUANTLAB_CACHE`), a file of that name taking precedence.
#[test]
fn quantize_takes_the_cached_models_by_name() {
    let home = std::env::var_os("HOME").map(std::path::PathBuf::from);
    let real = std::env::var_os("QUANTLAB_CACHE")
        .map(std::path::PathBuf::from)
        .or_else(|| home.map(|h| h.join(".cache/quantlab")))
        .map(|c| c.join("minilm"));
    let Some(real) = real.filter(|p| p.join("config.json").is_file()) else {
        println!("SKIP the cached MiniLM is not there (quantlab fetch minilm)");
        return;
    };
    let cache = tempfile::tempdir().unwrap();
    let dst = cache.path().join("minilm");
    std::fs::create_dir_all(&dst).unwrap();
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        std::fs::copy(real.join(f), dst.join(f)).unwrap();
    }
    let work = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_quantlab"))
        .args([
            "quantize",
            "--model",
            "minilm",
            "--method",
            "rtn",
            "--dry-run",
        ])
        .env("QUANTLAB_CACHE", cache.path())
        .current_dir(work.path())
        .output()
        .unwrap();
    let (o, e) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{o}{e}");
    assert!(o.contains("encoder.layer.0.attention.self.query"), "{o}");
}

/// An error is one line naming what is wrong, even with RUST_BACKTRACE set in the
/// environment; `--verbose` adds where it happened.
#[test]
fn errors_are_one_line_unless_verbose() {
    let run = |extra: &[&str]| {
        let mut args = vec![
            "quantize",
            "--model",
            "no-such-model.gguf",
            "--method",
            "rtn",
            "--out",
            "unused-out",
        ];
        args.extend(extra);
        let out = Command::new(env!("CARGO_BIN_EXE_quantlab"))
            .args(&args)
            .env("RUST_BACKTRACE", "1")
            .output()
            .unwrap();
        assert!(!out.status.success());
        String::from_utf8(out.stderr).unwrap()
    };
    let e = run(&[]);
    assert_eq!(e.lines().count(), 1, "{e}");
    assert!(
        e.starts_with("Error: ") && e.contains("no-such-model.gguf"),
        "{e}"
    );
    let v = run(&["--verbose"]);
    assert!(
        v.contains("no-such-model.gguf") && v.lines().count() > 1,
        "{v}"
    );
}
