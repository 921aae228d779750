//! Shared fixtures of the pipeline's tests: a tiny random LLaMA in a Hugging Face directory
//! with a byte-level tokenizer and calibration prose (both from the workspace's
//! `quantlab-testsupport`), and the Python oracle runner.
#![allow(dead_code, unused_imports)]

use std::path::{Path, PathBuf};
use std::process::Command;

pub use quantlab_testsupport::{prose, read_f32_safetensors, write_byte_tokenizer};
use quantlab_testsupport::{std_rng_uniform, TinyLlama};

/// Width.
pub const D: usize = 64;
/// Attention heads (head dimension 16).
pub const HEADS: usize = 4;
/// Vocabulary (ids >= 256 are never produced by the byte tokenizer).
pub const VOCAB: usize = 300;
/// Blocks.
pub const LAYERS: usize = 2;

/// Writes a tiny random LLaMA (HF names and layout; `quantlab_testsupport::TinyLlama` with
/// the sizes above, drawn from `StdRng` seeded with `seed`) with `kv` KV heads and an MLP of
/// `inter` into `dir`, with a byte-level tokenizer.
pub fn write_tiny(dir: &Path, kv: usize, inter: usize, seed: u64) {
    let spec = TinyLlama {
        hidden: D,
        heads: HEADS,
        kv_heads: kv,
        intermediate: inter,
        vocab: VOCAB,
        layers: LAYERS,
        ..TinyLlama::default()
    };
    spec.write_hf_dir(dir, &spec.tensors(std_rng_uniform(seed)));
    write_byte_tokenizer(&dir.join("tokenizer.json"));
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

/// A model quantized in memory by the whole-model driver, with what went in.
pub struct InMemory {
    /// The loaded source; its model is now quantized.
    pub src: quantlab_pipeline::source::SourceModel,
    /// The plan the driver ran.
    pub plan: quantlab_pipeline::Plan,
    /// The calibration windows, drawn from [`prose`] with the config's sizes and seed.
    pub windows: Vec<Vec<u32>>,
    /// The driver's output.
    pub out: quantlab_pipeline::DriverOutput,
}

/// Loads `model_dir` (lazily with `lazy`), plans `c`, draws the calibration windows from
/// [`prose`] and runs `quantize_model`.
pub fn quantize_in_memory(
    model_dir: &Path,
    c: &quantlab_pipeline::QuantizeConfig,
    lazy: bool,
) -> InMemory {
    let mut src = quantlab_pipeline::source::SourceModel::load_with(model_dir, lazy).unwrap();
    let plan = c.plan(src.model.config()).unwrap();
    let windows = quantlab_pipeline::calib::calibration_windows(
        &src.tokenizer,
        &quantlab_pipeline::Calibration::Texts(prose()),
        c.nsamples,
        c.seqlen,
        c.seed,
    )
    .unwrap();
    let out =
        quantlab_pipeline::quantize_model(&mut src.model, &windows, &plan, c, Default::default())
            .unwrap();
    InMemory {
        src,
        plan,
        windows,
        out,
    }
}
