//! Writes the seed corpus of every fuzz target into `fuzz/seeds/<target>/` (small files, a few
//! KB at most): `cargo run --manifest-path fuzz/Cargo.toml --example make_seeds`.
//!
//! GGUF seeds come from a writer written here from the format description (not from the
//! crate's writer), quantized Hugging Face directories from the crate's own `write_hf_dir`,
//! and our checkpoint's quantized tensors from `quantize_rtn`.

// Linked for the sanitizer-coverage hooks: this example is built with the fuzz targets' flags
// (see docs/fuzzing.md) so it reuses their build.
use libfuzzer_sys as _;

use candle_core::{Device, Tensor};
use ndarray::Array2;
use quantlab_checkpoints::export::hf::{
    write_hf_dir, DenseDtype, DenseTensor, HfExport, HfQuantFormat,
};
use quantlab_checkpoints::pack::GptqFormat;
use quantlab_fuzz::{tiny, SEP};
use quantlab_grids::double_quant::DoubleQuant;
use quantlab_grids::{quantize_rtn, FormatSpec, Granularity, QuantizedLinear, UniformGrid};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// A GGUF metadata value: type id and encoded bytes.
struct Kv(&'static str, u32, Vec<u8>);

fn s(x: &str) -> Vec<u8> {
    let mut b = (x.len() as u64).to_le_bytes().to_vec();
    b.extend_from_slice(x.as_bytes());
    b
}

fn str_kv(k: &'static str, v: &str) -> Kv {
    Kv(k, 8, s(v))
}

fn u32_kv(k: &'static str, v: u32) -> Kv {
    Kv(k, 4, v.to_le_bytes().to_vec())
}

fn f32_kv(k: &'static str, v: f32) -> Kv {
    Kv(k, 6, v.to_le_bytes().to_vec())
}

fn arr(elem: u32, items: &[Vec<u8>]) -> Vec<u8> {
    let mut b = elem.to_le_bytes().to_vec();
    b.extend_from_slice(&(items.len() as u64).to_le_bytes());
    for i in items {
        b.extend_from_slice(i);
    }
    b
}

/// A GGUF file: `tensors` are (name, ne[] innermost first, ggml type id, data).
fn gguf(version: u32, kvs: &[Kv], tensors: &[(String, Vec<u64>, u32, Vec<u8>)]) -> Vec<u8> {
    const ALIGN: usize = 32;
    let mut b = b"GGUF".to_vec();
    b.extend_from_slice(&version.to_le_bytes());
    b.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    b.extend_from_slice(&(kvs.len() as u64).to_le_bytes());
    for Kv(k, t, v) in kvs {
        b.extend_from_slice(&s(k));
        b.extend_from_slice(&t.to_le_bytes());
        b.extend_from_slice(v);
    }
    let mut off = 0usize;
    for (name, dims, ty, data) in tensors {
        b.extend_from_slice(&s(name));
        b.extend_from_slice(&(dims.len() as u32).to_le_bytes());
        for d in dims {
            b.extend_from_slice(&d.to_le_bytes());
        }
        b.extend_from_slice(&ty.to_le_bytes());
        b.extend_from_slice(&(off as u64).to_le_bytes());
        off += data.len().next_multiple_of(ALIGN);
    }
    b.resize(b.len().next_multiple_of(ALIGN), 0);
    for (_, _, _, data) in tensors {
        b.extend_from_slice(data);
        b.resize(b.len().next_multiple_of(ALIGN), 0);
    }
    b
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn f16_bytes(v: &[f32]) -> Vec<u8> {
    v.iter()
        .flat_map(|x| half::f16::from_f32(*x).to_le_bytes())
        .collect()
}

/// The tiny model as a GGUF (`arch` llama or qwen2; `f16` stores the linears as F16).
fn tiny_gguf(arch: &str, f16: bool, untied: bool) -> Vec<u8> {
    let key = |k: &str| -> &'static str { Box::leak(format!("{arch}.{k}").into_boxed_str()) };
    let tokens: Vec<Vec<u8>> = (0..tiny::VOCAB).map(|i| s(&format!("t{i}"))).collect();
    let kvs = vec![
        str_kv("general.architecture", arch),
        u32_kv("general.alignment", 32),
        u32_kv(key("block_count"), 1),
        u32_kv(key("embedding_length"), tiny::D as u32),
        u32_kv(key("feed_forward_length"), tiny::INTER as u32),
        u32_kv(key("attention.head_count"), tiny::HEADS as u32),
        u32_kv(key("attention.head_count_kv"), tiny::KV as u32),
        u32_kv(key("context_length"), 64),
        f32_kv(key("rope.freq_base"), 10000.0),
        f32_kv(key("attention.layer_norm_rms_epsilon"), 1e-5),
        Kv("tokenizer.ggml.tokens", 9, arr(8, &tokens)),
        u32_kv("tokenizer.ggml.eos_token_id", 2),
    ];
    let mut ts = Vec::new();
    for (name, shape, v) in tiny::tensors() {
        let g = name
            .replace("model.embed_tokens", "token_embd")
            .replace("model.norm", "output_norm")
            .replace("model.layers.", "blk.")
            .replace("input_layernorm", "attn_norm")
            .replace("post_attention_layernorm", "ffn_norm")
            .replace("self_attn.q_proj", "attn_q")
            .replace("self_attn.k_proj", "attn_k")
            .replace("self_attn.v_proj", "attn_v")
            .replace("self_attn.o_proj", "attn_output")
            .replace("mlp.gate_proj", "ffn_gate")
            .replace("mlp.up_proj", "ffn_up")
            .replace("mlp.down_proj", "ffn_down");
        let dims: Vec<u64> = shape.iter().rev().map(|&d| d as u64).collect();
        if f16 && shape.len() == 2 {
            ts.push((g, dims, 1, f16_bytes(&v)));
        } else {
            ts.push((g, dims, 0, f32_bytes(&v)));
        }
    }
    if untied {
        let v: Vec<f32> = (0..tiny::VOCAB * tiny::D)
            .map(|i| (i as f32).cos())
            .collect();
        ts.push((
            "output.weight".into(),
            vec![tiny::D as u64, tiny::VOCAB as u64],
            0,
            f32_bytes(&v),
        ));
    }
    gguf(3, &kvs, &ts)
}

/// A GGUF with a value of every metadata type and a few tensor types.
fn every_type_gguf(version: u32) -> Vec<u8> {
    let kvs = vec![
        Kv("u8", 0, vec![7]),
        Kv("i8", 1, vec![0xf9]),
        Kv("u16", 2, 300u16.to_le_bytes().to_vec()),
        Kv("i16", 3, (-300i16).to_le_bytes().to_vec()),
        u32_kv("u32", 70000),
        Kv("i32", 5, (-70000i32).to_le_bytes().to_vec()),
        f32_kv("f32", 0.5),
        Kv("bool", 7, vec![1]),
        str_kv("string", "héllo"),
        Kv("u64", 10, u64::MAX.to_le_bytes().to_vec()),
        Kv("i64", 11, i64::MIN.to_le_bytes().to_vec()),
        Kv("f64", 12, f64::NAN.to_le_bytes().to_vec()),
        Kv(
            "arr.u32",
            9,
            arr(
                4,
                &[1u32.to_le_bytes().to_vec(), 2u32.to_le_bytes().to_vec()],
            ),
        ),
        Kv("arr.str", 9, arr(8, &[s("a"), s("")])),
        Kv("arr.bool", 9, arr(7, &[vec![0], vec![1]])),
        Kv(
            "arr.arr",
            9,
            arr(9, &[arr(0, &[vec![1], vec![2]]), arr(8, &[s("x")])]),
        ),
        Kv("arr.empty", 9, arr(12, &[])),
    ];
    let q4_0: Vec<u8> = (0..18u8).collect();
    let q8_0: Vec<u8> = (0..34u8).collect();
    let ts = vec![
        ("w.f32".to_string(), vec![4, 2], 0, f32_bytes(&[1.0; 8])),
        ("w.q4_0".to_string(), vec![32], 2, q4_0),
        ("w.q8_0".to_string(), vec![32, 1], 8, q8_0),
        ("w.f16".to_string(), vec![3], 1, f16_bytes(&[1.0, 2.0, 3.0])),
        ("w.empty".to_string(), vec![0, 5], 0, vec![]),
        ("scalar".to_string(), vec![], 0, f32_bytes(&[2.0])),
    ];
    gguf(version, &kvs, &ts)
}

fn safetensors_seed() -> Vec<u8> {
    use safetensors::tensor::{Dtype, TensorView};
    let a = f32_bytes(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    let b = f16_bytes(&[1.0, -1.0]);
    let c = vec![1u8, 0, 1];
    let d = 7i64.to_le_bytes().to_vec();
    let views = vec![
        (
            "a".to_string(),
            TensorView::new(Dtype::F32, vec![2, 3], &a).unwrap(),
        ),
        (
            "b".to_string(),
            TensorView::new(Dtype::BF16, vec![2], &b).unwrap(),
        ),
        (
            "c".to_string(),
            TensorView::new(Dtype::BOOL, vec![3], &c).unwrap(),
        ),
        (
            "d".to_string(),
            TensorView::new(Dtype::I64, vec![], &d).unwrap(),
        ),
        (
            "e".to_string(),
            TensorView::new(Dtype::U8, vec![0, 4], &[]).unwrap(),
        ),
    ];
    let meta: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    safetensors::serialize(views, Some(meta)).unwrap()
}

/// Joins files with the separator the multi-file targets split on.
fn join(parts: &[&[u8]]) -> Vec<u8> {
    let mut b = Vec::new();
    for (i, p) in parts.iter().enumerate() {
        if i > 0 {
            b.extend_from_slice(SEP);
        }
        b.extend_from_slice(p);
    }
    b
}

fn hf_linears(spec: &FormatSpec, gran: Granularity, dq: bool) -> Vec<(String, QuantizedLinear)> {
    let w = Array2::from_shape_fn((32, 64), |(r, c)| 0.3 * ((r * 64 + c) as f32 * 0.77).sin());
    let mut q = quantize_rtn("model.layers.0.mlp.up_proj", w.view(), spec, gran).unwrap();
    if dq {
        q = q.with_double_quant(DoubleQuant { blocksize: 16 }).unwrap();
    }
    vec![("model.layers.0.mlp.up_proj".into(), q)]
}

fn hf_seed(
    tmp: &Path,
    label: &str,
    format: HfQuantFormat,
    ls: Vec<(String, QuantizedLinear)>,
    side: Option<&str>,
) -> Vec<u8> {
    let mut ex = HfExport::new(serde_json::json!({"model_type": "llama", "hidden_size": 64}));
    ex.linears = ls;
    ex.dense.push((
        "model.norm.weight".into(),
        DenseTensor {
            shape: vec![4],
            data: vec![1.0, 0.5, -0.25, 2.0],
            dtype: DenseDtype::F16,
        },
    ));
    let out = tmp.join(label);
    write_hf_dir(&out, &ex, format).unwrap();
    let mut config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
    let st = std::fs::read(out.join("model.safetensors")).unwrap();
    let (mut qz, mut qa) = (Vec::new(), Vec::new());
    if let Some(side) = side {
        let qc = config
            .as_object_mut()
            .unwrap()
            .remove("quantization_config")
            .unwrap();
        let bytes = serde_json::to_vec(&qc).unwrap();
        if side == "quantize_config.json" {
            qz = bytes;
        } else {
            qa = bytes;
        }
    }
    let config = serde_json::to_vec(&config).unwrap();
    join(&[&config, &qz, &qa, &st])
}

fn quantlab_seed(nested: bool) -> Vec<u8> {
    let mut layers = serde_json::Map::new();
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    let specs = [
        (
            "model.layers.0.mlp.down_proj",
            (tiny::D, tiny::INTER),
            FormatSpec::Uniform(UniformGrid::new(4, false).unwrap()),
            Granularity::Group(8),
        ),
        (
            "model.layers.0.mlp.up_proj",
            (tiny::INTER, tiny::D),
            FormatSpec::Nf4,
            Granularity::Group(8),
        ),
    ];
    for (name, (o, i), spec, gran) in specs {
        let w = Array2::from_shape_fn((o, i), |(r, c)| ((r * i + c) as f32 * 0.41).sin());
        let mut q = quantize_rtn(name, w.view(), &spec, gran).unwrap();
        let mut lv = serde_json::json!({
            "quantized": true,
            "format_spec": serde_json::to_value(&spec).unwrap(),
            "granularity": serde_json::to_value(gran).unwrap(),
        });
        let cpu = &Device::Cpu;
        let codes: Vec<u8> = q.codes.iter().copied().collect();
        let arr2 = |a: &Array2<f32>| {
            Tensor::from_vec(a.iter().copied().collect::<Vec<f32>>(), a.dim(), cpu).unwrap()
        };
        tensors.insert(
            format!("{name}.codes"),
            Tensor::from_vec(codes, (o, i), cpu).unwrap(),
        );
        tensors.insert(format!("{name}.scales"), arr2(&q.scales));
        tensors.insert(format!("{name}.zeros"), arr2(&q.zeros));
        tensors.insert(
            format!("{name}.g_idx"),
            Tensor::from_vec(q.g_idx.clone(), i, cpu).unwrap(),
        );
        if nested && spec == FormatSpec::Nf4 {
            q = q.with_double_quant(DoubleQuant { blocksize: 4 }).unwrap();
            let n = q.nested.as_ref().unwrap();
            lv["double_quant_blocksize"] = 4.into();
            let len = n.codes.len();
            tensors.insert(
                format!("{name}.dq_codes"),
                Tensor::from_vec(n.codes.clone(), len, cpu).unwrap(),
            );
            let len = n.nested_absmax.len();
            tensors.insert(
                format!("{name}.dq_absmax"),
                Tensor::from_vec(n.nested_absmax.clone(), len, cpu).unwrap(),
            );
            tensors.insert(
                format!("{name}.dq_offset"),
                Tensor::from_vec(vec![n.offset], 1, cpu).unwrap(),
            );
        }
        if !nested && spec != FormatSpec::Nf4 {
            tensors.insert(
                format!("{name}.awq_scale"),
                Tensor::from_vec(vec![1.5f32; i], i, cpu).unwrap(),
            );
        }
        layers.insert(name.to_string(), lv);
    }
    layers.insert(
        "model.layers.0.self_attn.q_proj".into(),
        serde_json::json!({"quantized": false}),
    );
    let qc = serde_json::to_vec_pretty(&serde_json::json!({ "layers": layers })).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("q.safetensors");
    candle_core::safetensors::save(&tensors, &p).unwrap();
    join(&[&qc, &std::fs::read(&p).unwrap()])
}

fn main() {
    let root: PathBuf = std::env::args()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("seeds"));
    let mut n = 0;
    let mut write = |target: &str, name: &str, bytes: Vec<u8>| {
        let dir = root.join(target);
        std::fs::create_dir_all(&dir).unwrap();
        assert!(
            bytes.len() < 16 * 1024,
            "{target}/{name}: {} bytes",
            bytes.len()
        );
        std::fs::write(dir.join(name), bytes).unwrap();
        n += 1;
    };

    write("gguf_header", "every-type-v3.gguf", every_type_gguf(3));
    write("gguf_header", "every-type-v2.gguf", every_type_gguf(2));
    write(
        "gguf_header",
        "tiny-llama.gguf",
        tiny_gguf("llama", false, false),
    );

    write(
        "gguf_model",
        "tiny-llama-f32.gguf",
        tiny_gguf("llama", false, false),
    );
    write(
        "gguf_model",
        "tiny-llama-f16-untied.gguf",
        tiny_gguf("llama", true, true),
    );
    write(
        "gguf_model",
        "tiny-qwen2.gguf",
        tiny_gguf("qwen2", false, false),
    );

    write(
        "safetensors_header",
        "dtypes.safetensors",
        safetensors_seed(),
    );
    write(
        "safetensors_header",
        "tiny-llama.safetensors",
        tiny::safetensors_bytes(),
    );

    let base = tiny::config_json();
    write("llama_config", "tiny-llama.json", base.clone().into_bytes());
    let variants = [
        (
            "mistral",
            r#""architectures": ["MistralForCausalLM"], "sliding_window": 4096"#,
        ),
        (
            "qwen2",
            r#""architectures": ["Qwen2ForCausalLM"], "use_sliding_window": true, "sliding_window": 32"#,
        ),
        (
            "llama3-rope",
            r#""architectures": ["LlamaForCausalLM"], "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}, "head_dim": 4, "attention_bias": true, "mlp_bias": false, "eos_token_id": [2, 3]"#,
        ),
        (
            "linear-rope",
            r#""architectures": ["LlamaForCausalLM"], "rope_scaling": {"type": "linear", "factor": 2.0}, "tie_word_embeddings": false"#,
        ),
    ];
    for (label, extra) in variants {
        let text = base.replacen(r#""architectures": ["LlamaForCausalLM"]"#, extra, 1);
        write("llama_config", &format!("{label}.json"), text.into_bytes());
    }

    let tmp = tempfile::tempdir().unwrap();
    let u4 = FormatSpec::Uniform(UniformGrid::new(4, false).unwrap());
    let u8s = FormatSpec::Uniform(UniformGrid::new(8, true).unwrap());
    let g32 = Granularity::Group(32);
    let t = tmp.path();
    write(
        "quant_config",
        "gptq-v1",
        hf_seed(
            t,
            "a",
            HfQuantFormat::Gptq(GptqFormat::V1),
            hf_linears(&u4, g32, false),
            None,
        ),
    );
    write(
        "quant_config",
        "gptq-v2-8bit",
        hf_seed(
            t,
            "b",
            HfQuantFormat::Gptq(GptqFormat::V2),
            hf_linears(&u8s, g32, false),
            None,
        ),
    );
    write(
        "quant_config",
        "gptq-side-file",
        hf_seed(
            t,
            "c",
            HfQuantFormat::Gptq(GptqFormat::V1),
            hf_linears(&u4, g32, false),
            Some("quantize_config.json"),
        ),
    );
    write(
        "quant_config",
        "awq",
        hf_seed(
            t,
            "d",
            HfQuantFormat::Awq,
            hf_linears(&u4, g32, false),
            None,
        ),
    );
    write(
        "quant_config",
        "awq-side-file",
        hf_seed(
            t,
            "e",
            HfQuantFormat::Awq,
            hf_linears(&u4, g32, false),
            Some("quant_config.json"),
        ),
    );
    write(
        "quant_config",
        "bnb-nf4-dq",
        hf_seed(
            t,
            "f",
            HfQuantFormat::Bnb4,
            hf_linears(&FormatSpec::Nf4, Granularity::Group(64), true),
            None,
        ),
    );
    write(
        "quant_config",
        "bnb-fp4",
        hf_seed(
            t,
            "g",
            HfQuantFormat::Bnb4,
            hf_linears(&FormatSpec::Fp4, Granularity::Group(64), false),
            None,
        ),
    );
    write(
        "quant_config",
        "int8",
        hf_seed(
            t,
            "h",
            HfQuantFormat::Int8,
            hf_linears(&FormatSpec::Int8, Granularity::PerChannel, false),
            None,
        ),
    );
    write(
        "quant_config",
        "dense",
        join(&[
            tiny::config_json().as_bytes(),
            b"",
            b"",
            &tiny::safetensors_bytes(),
        ]),
    );

    write("quantlab_config", "uniform-nf4-awq", quantlab_seed(false));
    write("quantlab_config", "uniform-nf4-dq", quantlab_seed(true));
    eprintln!("wrote {n} seeds under {}", root.display());
    check(&root);
}

/// Every seed (but the pipeline one) is accepted by its reader: a seed that fails early
/// would only teach the fuzzer the error paths.
fn check(root: &Path) {
    use quantlab_checkpoints::export::read::read_quantized_dir;
    use quantlab_checkpoints::gguf::GgufFile;
    use quantlab_checkpoints::safetensors_header::SafetensorsHeader;
    use quantlab_models::weights::GgufWeights;
    use quantlab_models::{LlamaConfig, LlamaModel};
    let files = |t: &str| -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(root.join(t))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        v.sort();
        v
    };
    for f in files("gguf_header") {
        GgufFile::parse(&std::fs::read(&f).unwrap(), "seed").unwrap();
    }
    for f in files("gguf_model") {
        let w = GgufWeights::open(&f).unwrap();
        LlamaModel::from_source(w.config().unwrap(), &w).unwrap();
    }
    for f in files("safetensors_header") {
        SafetensorsHeader::parse(&std::fs::read(&f).unwrap(), "seed").unwrap();
    }
    for f in files("llama_config") {
        let cfg = LlamaConfig::from_hf_json(&std::fs::read_to_string(&f).unwrap(), "seed").unwrap();
        if let Err(e) = LlamaModel::from_source(cfg, tiny::weights()) {
            eprintln!(
                "{}: parses; the tiny weights do not fit it ({e})",
                f.display()
            );
        }
    }
    let dir = tempfile::tempdir().unwrap();
    for f in files("quant_config") {
        let data = std::fs::read(&f).unwrap();
        quantlab_fuzz::clear(dir.path());
        for (name, part) in [
            "config.json",
            "quantize_config.json",
            "quant_config.json",
            "model.safetensors",
        ]
        .iter()
        .zip(quantlab_fuzz::split(&data, 4))
        {
            quantlab_fuzz::put(dir.path(), name, part.filter(|p| !p.is_empty()));
        }
        let (_, w) =
            read_quantized_dir(dir.path()).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        assert!(!w.is_empty());
    }
    eprintln!("every seed is accepted by its reader");
}
