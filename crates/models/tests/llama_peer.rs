//! SmolLM2-135M-Instruct (the cached Q4_1 GGUF) against llama.cpp through llama-cpp-python:
//! tokenization, perplexity on the same windows, greedy continuation.
//!
//! Runs only when QUANTLAB_PEER_TESTS=1, `import llama_cpp` works and the model is in the
//! cache (`quantlab fetch smollm2`); otherwise each test prints why it skipped.

use std::path::PathBuf;
use std::process::Command;

use quantlab_models::fetch::{cache_dir, model_path, KnownModel};
use quantlab_models::{perplexity, GenerateParams, LlamaModel, LlamaTokenizer, PplParams};

const PEER: &str = r#"
import json, math, sys, time
import numpy as np
import llama_cpp
from llama_cpp import Llama

req = json.load(open(sys.argv[1]))
mode, model = req["mode"], req["model"]
if mode == "tokenize":
    llm = Llama(model_path=model, vocab_only=True, verbose=False)
    out = []
    for t in req["texts"]:
        b = t.encode("utf-8")
        out.append({"plain": llm.tokenize(b, add_bos=False, special=False),
                    "special": llm.tokenize(b, add_bos=False, special=True)})
    print(json.dumps(out))
elif mode == "ppl":
    ctx = req["ctx"]
    llm = Llama(model_path=model, n_ctx=ctx, n_batch=ctx, n_ubatch=ctx, n_threads=2,
                logits_all=True, verbose=False)
    toks = llm.tokenize(req["text"].encode("utf-8"), add_bos=False, special=False)
    nwin = min(len(toks) // ctx, req["max_windows"])
    nll, secs = [], 0.0
    for w in range(nwin):
        win = toks[w * ctx:(w + 1) * ctx]
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(win)
        secs += time.perf_counter() - t0
        s = np.asarray(llm.scores[:ctx - 1], dtype=np.float64)
        m = s.max(axis=1, keepdims=True)
        lse = (m[:, 0] + np.log(np.exp(s - m).sum(axis=1)))
        tgt = np.asarray(win[1:])
        nll.append(float((lse - s[np.arange(ctx - 1), tgt]).sum()))
    print(json.dumps({"tokens": toks, "windows": nwin, "nll_sum": sum(nll),
                      "scored": nwin * (ctx - 1), "seconds": secs,
                      "tokens_per_second": nwin * ctx / secs}))
elif mode == "to_f32":
    import ctypes
    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype = 0  # LLAMA_FTYPE_ALL_F32: llama.cpp dequantizes every tensor
    p.allow_requantize = True
    p.nthread = 2
    rc = llama_cpp.llama_model_quantize(model.encode(), req["out"].encode(), ctypes.byref(p))
    print(json.dumps({"rc": rc}))
elif mode == "greedy":
    llm = Llama(model_path=model, n_ctx=512, n_threads=2, logits_all=True, verbose=False)
    llm.reset()
    llm.eval(req["prompt"])
    out = []
    for _ in range(req["n"]):
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(nxt)
        llm.eval([nxt])
    print(json.dumps(out))
"#;

fn setup(test: &str) -> Option<PathBuf> {
    if std::env::var("QUANTLAB_PEER_TESTS").ok().as_deref() != Some("1") {
        eprintln!("SKIPPED {test}: set QUANTLAB_PEER_TESTS=1 to compare with llama.cpp");
        return None;
    }
    let ok = Command::new("python3")
        .args(["-c", "import llama_cpp"])
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        eprintln!("SKIPPED {test}: python3 cannot `import llama_cpp` (pip install llama-cpp-python==0.3.36, AMX off: see docs)");
        return None;
    }
    let path = model_path(KnownModel::SmolLM2, &cache_dir().ok()?);
    if !path.exists() {
        eprintln!(
            "SKIPPED {test}: {} is missing (run `quantlab fetch smollm2`)",
            path.display()
        );
        return None;
    }
    Some(path)
}

fn peer(req: serde_json::Value) -> serde_json::Value {
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("peer.py");
    let reqf = dir.path().join("req.json");
    std::fs::write(&script, PEER).unwrap();
    std::fs::write(&reqf, req.to_string()).unwrap();
    let out = Command::new("python3")
        .arg(&script)
        .arg(&reqf)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "llama_cpp script failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn eval_text() -> String {
    std::fs::read_to_string(quantlab_models::text::shipped_eval()).unwrap()
}

#[test]
fn tokenization_matches_llama_cpp() {
    let Some(path) = setup("tokenization_matches_llama_cpp") else {
        return;
    };
    let tok = LlamaTokenizer::load(&path).unwrap();
    let prose = eval_text();
    let texts = vec![
        prose[..20000].to_string(),
        "In 1818, 3.14159 and 1,234,567 items cost $12.50 (about 42%).".to_string(),
        "Tabs\tand   multiple    spaces\n\n\nnewlines  \n trailing   ".to_string(),
        "Unicode: café, naïve, Straße, 日本語のテキスト, emoji 🎉🚀, Ελληνικά, русский."
            .to_string(),
        "Contractions: I'm, you're, he's, we've, they'll, I'd, can't, won't, DON'T, It'S."
            .to_string(),
        "<|im_start|>user\nHello there<|im_end|>\n<|im_start|>assistant\n".to_string(),
        "code: fn main() { let x = vec![1, 2, 3]; println!(\"{x:?}\"); } // done".to_string(),
        "   leading spaces and a final newline\n".to_string(),
    ];
    let want = peer(serde_json::json!({"mode": "tokenize", "model": path, "texts": texts}));
    for (i, t) in texts.iter().enumerate() {
        let plain = ids(&want[i]["plain"]);
        let special = ids(&want[i]["special"]);
        assert_eq!(
            tok.encode(t).unwrap(),
            plain,
            "plain tokenization of text {i}: {t:?}"
        );
        assert_eq!(
            tok.encode_special(t).unwrap(),
            special,
            "special tokenization of text {i}"
        );
        assert_eq!(tok.decode(&plain).unwrap(), *t, "round trip of text {i}");
    }
}

#[test]
fn perplexity_matches_llama_cpp_on_the_same_windows() {
    let Some(path) = setup("perplexity_matches_llama_cpp_on_the_same_windows") else {
        return;
    };
    let ctx = 512;
    let max_windows = 4;
    let text = eval_text();
    let tok = LlamaTokenizer::load(&path).unwrap();
    let tokens = tok.encode(&text).unwrap();
    let model = LlamaModel::load(&path).unwrap();
    let r = perplexity(
        &model,
        &tokens,
        &PplParams {
            ctx,
            max_windows: Some(max_windows),
        },
    )
    .unwrap();
    let peer_ppl = |model: &std::path::Path| {
        let want = peer(
            serde_json::json!({"mode": "ppl", "model": model, "text": text, "ctx": ctx, "max_windows": max_windows}),
        );
        assert_eq!(
            tokens,
            ids(&want["tokens"]),
            "tokenization of the eval text differs"
        );
        assert_eq!(r.windows as u64, want["windows"].as_u64().unwrap());
        let ppl = (want["nll_sum"].as_f64().unwrap() / want["scored"].as_f64().unwrap()).exp();
        (ppl, want["tokens_per_second"].as_f64().unwrap())
    };
    // llama.cpp on the Q4_1 file itself (its CPU matmuls quantize activations to 8 bits)
    let (q_ppl, q_tps) = peer_ppl(&path);
    // llama.cpp on the same weights dequantized to F32 by llama.cpp: our f32 forward
    let dir = tempfile::tempdir().unwrap();
    let f32_path = dir.path().join("smollm2-f32.gguf");
    let rc = peer(serde_json::json!({"mode": "to_f32", "model": path, "out": f32_path}));
    assert_eq!(rc["rc"], 0);
    let (f_ppl, f_tps) = peer_ppl(&f32_path);
    eprintln!(
        "SmolLM2 ppl on {} windows of {ctx}: ours {:.4} ({:.0} tokens/s); llama.cpp Q4_1 {q_ppl:.4} ({q_tps:.0} tokens/s), llama.cpp F32 {f_ppl:.4} ({f_tps:.0} tokens/s)",
        r.windows, r.ppl, r.tokens_per_second
    );
    assert!(
        (r.ppl - q_ppl).abs() / q_ppl < 0.01,
        "ppl {} vs llama.cpp Q4_1 {q_ppl}",
        r.ppl
    );
    assert!(
        (r.ppl - f_ppl).abs() / f_ppl < 1e-3,
        "ppl {} vs llama.cpp F32 {f_ppl}",
        r.ppl
    );
}

#[test]
fn greedy_continuation_matches_llama_cpp() {
    let Some(path) = setup("greedy_continuation_matches_llama_cpp") else {
        return;
    };
    let tok = LlamaTokenizer::load(&path).unwrap();
    let model = LlamaModel::load(&path).unwrap();
    let text = tok
        .apply_chat_template(
            &[quantlab_models::ChatMessage::new(
                "user",
                "What is the capital of France? Answer in one sentence.",
            )],
            true,
        )
        .unwrap();
    let prompt = tok.encode_special(&text).unwrap();
    let n = 32;
    let want = ids(&peer(
        serde_json::json!({"mode": "greedy", "model": path, "prompt": prompt, "n": n}),
    ));
    let got = quantlab_models::generate(
        &model,
        &tok,
        &prompt,
        &GenerateParams {
            max_tokens: n,
            temperature: 0.0,
            seed: 0,
            stop_at_eos: false,
        },
    )
    .unwrap();
    eprintln!(
        "ours: {:?}\nllama.cpp: {:?}",
        got.text,
        tok.decode(&want).unwrap()
    );
    assert_eq!(got.tokens, want);
}
