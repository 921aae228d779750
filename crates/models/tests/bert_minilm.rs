//! all-MiniLM-L6-v2 from the cache against an independent NumPy forward
//! (`tests/oracles/minilm_numpy.py`: float64, one sentence at a time, tokenized by the
//! `tokenizers` Python package when installed, else fed our token ids). Skips visibly when
//! the model cache, python3, numpy or safetensors is missing.

use std::path::PathBuf;
use std::process::Command;

use quantlab_models::embed::{eval_embed, EmbedOptions, SentenceEncoder};

fn minilm_dir() -> Option<PathBuf> {
    let dir = match std::env::var_os("QUANTLAB_MINILM") {
        Some(d) => PathBuf::from(d),
        None => quantlab_models::fetch::cache_dir().ok()?.join("minilm"),
    };
    (dir.join("model.safetensors").is_file() && dir.join("tokenizer.json").is_file()).then_some(dir)
}

fn python_has(modules: &str) -> bool {
    Command::new("python3")
        .args(["-c", &format!("import {modules}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

const SENTENCES: [&str; 5] = [
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want of a wife.",
    "Hello world!",
    "Quantization maps 32-bit floats onto a small grid; GPTQ corrects the error column by column.",
    "Café naïve résumé — déjà vu.",
    "A",
];

#[test]
fn minilm_embeddings_match_numpy_oracle() {
    let Some(dir) = minilm_dir() else {
        println!("SKIPPED minilm oracle: no MiniLM in the cache (run `quantlab fetch minilm`)");
        return;
    };
    if !python_has("numpy, safetensors") {
        println!("SKIPPED minilm oracle: python3 with numpy and safetensors not available");
        return;
    }
    let enc = SentenceEncoder::load(&dir).unwrap();
    let ids = enc.tokenize(&SENTENCES).unwrap();
    // One padded batch: the padding mask is exercised (the oracle never pads).
    let ours = enc.embed_ids(&ids).unwrap();

    let tmp = tempfile::tempdir().unwrap();
    let oracle = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/oracles/minilm_numpy.py");
    let mut cmd = Command::new("python3");
    cmd.arg(&oracle).arg(&dir);
    let python_tokenizes = python_has("tokenizers");
    if python_tokenizes {
        let f = tmp.path().join("sentences.json");
        std::fs::write(&f, serde_json::to_string(&SENTENCES).unwrap()).unwrap();
        cmd.arg("--sentences").arg(&f).arg("--max-len").arg("256");
    } else {
        println!("NOTE: python `tokenizers` missing: the oracle is fed our token ids");
        let f = tmp.path().join("ids.json");
        std::fs::write(&f, serde_json::to_string(&ids).unwrap()).unwrap();
        cmd.arg("--ids").arg(&f);
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "oracle failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let py_ids: Vec<Vec<u32>> = serde_json::from_value(v["ids"].clone()).unwrap();
    assert_eq!(py_ids, ids, "token ids differ from the Python tokenizer's");
    let py: Vec<Vec<f64>> = serde_json::from_value(v["embeddings"].clone()).unwrap();
    let mut max_diff = 0f64;
    for (a, b) in ours.iter().zip(&py) {
        assert_eq!(a.len(), 384);
        for (x, y) in a.iter().zip(b) {
            max_diff = max_diff.max((*x as f64 - y).abs());
        }
    }
    println!(
        "MiniLM vs NumPy f64 oracle ({}): max |diff| = {max_diff:.3e} over {} sentences",
        v["tokenizer"],
        SENTENCES.len()
    );
    assert!(max_diff < 1e-4, "max diff {max_diff}");
    // Related sentences are closer than unrelated ones (a sanity check of the head).
    let e = enc
        .encode(
            &[
                "A man is eating food.",
                "A man is eating a meal.",
                "The sky is blue.",
            ],
            8,
        )
        .unwrap();
    let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>();
    assert!(dot(&e[0], &e[1]) > dot(&e[0], &e[2]) + 0.3);
}

#[test]
fn minilm_eval_embed_on_shipped_text() {
    let Some(dir) = minilm_dir() else {
        println!("SKIPPED minilm eval_embed: no MiniLM in the cache");
        return;
    };
    let opts = EmbedOptions {
        limit: Some(64),
        ..Default::default()
    };
    let rep = eval_embed(
        &dir,
        &quantlab_models::text::shipped_eval(),
        Some(&dir),
        &opts,
    )
    .unwrap();
    println!("{rep}");
    assert_eq!(rep.sentences, 64);
    assert!((rep.mean_cosine.unwrap() - 1.0).abs() < 1e-6);
    assert!(rep.tokens > 64 * 5);
}
