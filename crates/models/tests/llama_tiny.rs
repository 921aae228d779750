//! A tiny random LLaMA written by the test as a Hugging Face directory (safetensors) and as
//! GGUF (q/k rows permuted the way llama.cpp's converter does), checked against a plain
//! reference forward written here with Vec loops (no candle).

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use quantlab_models::{
    perplexity, perplexity_of_file, CaptureHook, KvCache, LlamaModel, LlamaTokenizer, ModelError,
    PplParams, WeightSource, BLOCK_LINEARS,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

// ---------------------------------------------------------------------------------------------
// The tiny model and its reference forward
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy)]
struct Cfg {
    d: usize,
    inter: usize,
    layers: usize,
    heads: usize,
    kv: usize,
    vocab: usize,
    theta: f64,
    eps: f64,
    qkv_bias: bool,
    tied: bool,
    window: Option<usize>,
}

impl Cfg {
    fn hd(&self) -> usize {
        self.d / self.heads
    }
}

const LLAMA: Cfg = Cfg {
    d: 64,
    inter: 96,
    layers: 2,
    heads: 4,
    kv: 2,
    vocab: 300,
    theta: 500.0,
    eps: 1e-5,
    qkv_bias: false,
    tied: false,
    window: None,
};

/// Weights in Hugging Face names and layout, row-major `[out, in]`.
struct Weights {
    cfg: Cfg,
    t: HashMap<String, (Vec<usize>, Vec<f32>)>,
}

impl Weights {
    fn random(cfg: Cfg, seed: u64) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut t = HashMap::new();
        let mut put = |name: &str, shape: Vec<usize>, scale: f32, offset: f32, rng: &mut StdRng| {
            let n = shape.iter().product();
            let v: Vec<f32> = (0..n)
                .map(|_| offset + scale * (rng.random::<f32>() * 2.0 - 1.0))
                .collect();
            t.insert(name.to_string(), (shape, v));
        };
        let (d, hd) = (cfg.d, cfg.hd());
        put(
            "model.embed_tokens.weight",
            vec![cfg.vocab, d],
            1.0,
            0.0,
            &mut rng,
        );
        for l in 0..cfg.layers {
            let p = format!("model.layers.{l}");
            put(
                &format!("{p}.input_layernorm.weight"),
                vec![d],
                0.2,
                1.0,
                &mut rng,
            );
            put(
                &format!("{p}.post_attention_layernorm.weight"),
                vec![d],
                0.2,
                1.0,
                &mut rng,
            );
            put(
                &format!("{p}.self_attn.q_proj.weight"),
                vec![cfg.heads * hd, d],
                0.3,
                0.0,
                &mut rng,
            );
            put(
                &format!("{p}.self_attn.k_proj.weight"),
                vec![cfg.kv * hd, d],
                0.3,
                0.0,
                &mut rng,
            );
            put(
                &format!("{p}.self_attn.v_proj.weight"),
                vec![cfg.kv * hd, d],
                0.2,
                0.0,
                &mut rng,
            );
            put(
                &format!("{p}.self_attn.o_proj.weight"),
                vec![d, cfg.heads * hd],
                0.2,
                0.0,
                &mut rng,
            );
            if cfg.qkv_bias {
                put(
                    &format!("{p}.self_attn.q_proj.bias"),
                    vec![cfg.heads * hd],
                    0.3,
                    0.0,
                    &mut rng,
                );
                put(
                    &format!("{p}.self_attn.k_proj.bias"),
                    vec![cfg.kv * hd],
                    0.3,
                    0.0,
                    &mut rng,
                );
                put(
                    &format!("{p}.self_attn.v_proj.bias"),
                    vec![cfg.kv * hd],
                    0.3,
                    0.0,
                    &mut rng,
                );
            }
            put(
                &format!("{p}.mlp.gate_proj.weight"),
                vec![cfg.inter, d],
                0.2,
                0.0,
                &mut rng,
            );
            put(
                &format!("{p}.mlp.up_proj.weight"),
                vec![cfg.inter, d],
                0.2,
                0.0,
                &mut rng,
            );
            put(
                &format!("{p}.mlp.down_proj.weight"),
                vec![d, cfg.inter],
                0.2,
                0.0,
                &mut rng,
            );
        }
        put("model.norm.weight", vec![d], 0.2, 1.0, &mut rng);
        if !cfg.tied {
            put("lm_head.weight", vec![cfg.vocab, d], 0.3, 0.0, &mut rng);
        }
        Self { cfg, t }
    }

    fn get(&self, name: &str) -> &[f32] {
        &self.t[name].1
    }

    fn config_json(&self, arch: &str) -> String {
        let c = self.cfg;
        let window = match c.window {
            Some(w) => format!(", \"sliding_window\": {w}"),
            None => String::new(),
        };
        let model_type = match arch {
            "Qwen2ForCausalLM" => "qwen2",
            "MistralForCausalLM" => "mistral",
            _ => "llama",
        };
        format!(
            r#"{{"architectures": ["{arch}"], "model_type": "{model_type}", "hidden_size": {}, "intermediate_size": {},
            "num_hidden_layers": {}, "num_attention_heads": {}, "num_key_value_heads": {}, "vocab_size": {},
            "rope_theta": {}, "rms_norm_eps": {}, "tie_word_embeddings": {}, "hidden_act": "silu",
            "max_position_embeddings": 256, "bos_token_id": 1, "eos_token_id": 2{window}}}"#,
            c.d, c.inter, c.layers, c.heads, c.kv, c.vocab, c.theta, c.eps, c.tied
        )
    }

    fn write_hf(&self, dir: &Path, arch: &str) {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join("config.json"), self.config_json(arch)).unwrap();
        let tensors: HashMap<String, Tensor> = self
            .t
            .iter()
            .map(|(k, (s, v))| {
                (
                    k.clone(),
                    Tensor::from_vec(v.clone(), s.as_slice(), &Device::Cpu).unwrap(),
                )
            })
            .collect();
        candle_core::safetensors::save(&tensors, dir.join("model.safetensors")).unwrap();
    }

    /// GGUF in llama.cpp naming; q/k rows permuted as llama.cpp's converter does for the
    /// `llama` architecture: within each head, HF row `j * hd/2 + i` goes to row `2i + j`.
    fn write_gguf(&self, path: &Path, dtype: GgmlDType, permute: bool, arch: &str) {
        let c = self.cfg;
        let hd = c.hd();
        let mut tensors: Vec<(String, QTensor)> = Vec::new();
        for (name, (shape, v)) in &self.t {
            let gguf = hf_to_gguf(name);
            let mut v = v.clone();
            let is_q = name.contains("q_proj");
            let is_k = name.contains("k_proj");
            if permute && (is_q || is_k) {
                let heads = if is_q { c.heads } else { c.kv };
                let cols = if shape.len() == 2 { shape[1] } else { 1 };
                let mut out = vec![0f32; v.len()];
                for h in 0..heads {
                    for j in 0..2 {
                        for i in 0..hd / 2 {
                            let src = h * hd + j * hd / 2 + i;
                            let dst = h * hd + 2 * i + j;
                            out[dst * cols..(dst + 1) * cols]
                                .copy_from_slice(&v[src * cols..(src + 1) * cols]);
                        }
                    }
                }
                v = out;
            }
            let t = Tensor::from_vec(v, shape.as_slice(), &Device::Cpu).unwrap();
            let dt = if shape.len() == 2 {
                dtype
            } else {
                GgmlDType::F32
            };
            tensors.push((gguf, QTensor::quantize(&t, dt).unwrap()));
        }
        tensors.sort_by(|a, b| a.0.cmp(&b.0));
        let a = |k: &str| format!("{arch}.{k}");
        let meta: Vec<(String, Value)> = vec![
            ("general.architecture".into(), Value::String(arch.into())),
            (a("block_count"), Value::U32(c.layers as u32)),
            (a("embedding_length"), Value::U32(c.d as u32)),
            (a("feed_forward_length"), Value::U32(c.inter as u32)),
            (a("attention.head_count"), Value::U32(c.heads as u32)),
            (a("attention.head_count_kv"), Value::U32(c.kv as u32)),
            (a("rope.freq_base"), Value::F32(c.theta as f32)),
            (
                a("attention.layer_norm_rms_epsilon"),
                Value::F32(c.eps as f32),
            ),
            (a("context_length"), Value::U32(256)),
            (a("vocab_size"), Value::U32(c.vocab as u32)),
        ];
        let meta_refs: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let t_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let mut f = std::fs::File::create(path).unwrap();
        gguf_file::write(&mut f, &meta_refs, &t_refs).unwrap();
    }
}

fn hf_to_gguf(name: &str) -> String {
    match name {
        "model.embed_tokens.weight" => return "token_embd.weight".into(),
        "model.norm.weight" => return "output_norm.weight".into(),
        "lm_head.weight" => return "output.weight".into(),
        _ => {}
    }
    let rest = name.strip_prefix("model.layers.").unwrap();
    let (l, rest) = rest.split_once('.').unwrap();
    let (module, suffix) = rest.rsplit_once('.').unwrap();
    let g = match module {
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" => "ffn_norm",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        m => panic!("unknown module {m}"),
    };
    format!("blk.{l}.{g}.{suffix}")
}

/// `y = W x (+ b)` for `W` `[rows, cols]` row-major, accumulated in f64.
fn matvec(w: &[f32], b: Option<&[f32]>, x: &[f32]) -> Vec<f32> {
    let cols = x.len();
    let rows = w.len() / cols;
    (0..rows)
        .map(|r| {
            let s: f64 = (0..cols)
                .map(|c| w[r * cols + c] as f64 * x[c] as f64)
                .sum();
            (s + b.map_or(0.0, |b| b[r] as f64)) as f32
        })
        .collect()
}

fn rmsnorm(x: &[f32], g: &[f32], eps: f64) -> Vec<f32> {
    let ms: f64 = x.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / x.len() as f64;
    let r = 1.0 / (ms + eps).sqrt();
    x.iter()
        .zip(g)
        .map(|(&v, &g)| (v as f64 * r * g as f64) as f32)
        .collect()
}

/// HF rotate-half RoPE on one head vector at position `p`.
fn rope(x: &mut [f32], p: usize, theta: f64) {
    let hd = x.len();
    let half = hd / 2;
    for i in 0..half {
        let f = theta.powf(-(2.0 * i as f64) / hd as f64);
        let (c, s) = ((p as f64 * f).cos(), (p as f64 * f).sin());
        let (a, b) = (x[i] as f64, x[i + half] as f64);
        x[i] = (a * c - b * s) as f32;
        x[i + half] = (b * c + a * s) as f32;
    }
}

type Captured = HashMap<String, Vec<Vec<f32>>>;

/// Reference forward: logits of every position, and the inputs of every linear.
fn reference(w: &Weights, tokens: &[u32]) -> (Vec<Vec<f32>>, Captured) {
    let c = w.cfg;
    let (d, hd) = (c.d, c.hd());
    let g = c.heads / c.kv;
    let n = tokens.len();
    let mut cap: Captured = HashMap::new();
    let emb = w.get("model.embed_tokens.weight");
    let mut h: Vec<Vec<f32>> = tokens
        .iter()
        .map(|&t| emb[t as usize * d..(t as usize + 1) * d].to_vec())
        .collect();
    let opt = |name: &str| w.t.get(name).map(|x| x.1.as_slice());
    for l in 0..c.layers {
        let p = format!("model.layers.{l}");
        let x: Vec<Vec<f32>> = h
            .iter()
            .map(|r| rmsnorm(r, w.get(&format!("{p}.input_layernorm.weight")), c.eps))
            .collect();
        for lin in ["q_proj", "k_proj", "v_proj"] {
            cap.insert(format!("{p}.self_attn.{lin}"), x.clone());
        }
        let proj = |name: &str, x: &[f32]| {
            matvec(
                w.get(&format!("{p}.{name}.weight")),
                opt(&format!("{p}.{name}.bias")),
                x,
            )
        };
        let mut q: Vec<Vec<f32>> = x.iter().map(|r| proj("self_attn.q_proj", r)).collect();
        let mut k: Vec<Vec<f32>> = x.iter().map(|r| proj("self_attn.k_proj", r)).collect();
        let v: Vec<Vec<f32>> = x.iter().map(|r| proj("self_attn.v_proj", r)).collect();
        for t in 0..n {
            for hh in 0..c.heads {
                rope(&mut q[t][hh * hd..(hh + 1) * hd], t, c.theta);
            }
            for hh in 0..c.kv {
                rope(&mut k[t][hh * hd..(hh + 1) * hd], t, c.theta);
            }
        }
        let mut attn = vec![vec![0f32; c.heads * hd]; n];
        for t in 0..n {
            for hh in 0..c.heads {
                let kh = hh / g;
                let lo = c.window.map_or(0, |w| (t + 1).saturating_sub(w));
                let scores: Vec<f64> = (lo..=t)
                    .map(|j| {
                        (0..hd)
                            .map(|i| q[t][hh * hd + i] as f64 * k[j][kh * hd + i] as f64)
                            .sum::<f64>()
                            / (hd as f64).sqrt()
                    })
                    .collect();
                let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
                let z: f64 = e.iter().sum();
                for i in 0..hd {
                    let s: f64 = (lo..=t)
                        .map(|j| e[j - lo] / z * v[j][kh * hd + i] as f64)
                        .sum();
                    attn[t][hh * hd + i] = s as f32;
                }
            }
        }
        cap.insert(format!("{p}.self_attn.o_proj"), attn.clone());
        for t in 0..n {
            let o = proj("self_attn.o_proj", &attn[t]);
            for i in 0..d {
                h[t][i] += o[i];
            }
        }
        let x: Vec<Vec<f32>> = h
            .iter()
            .map(|r| {
                rmsnorm(
                    r,
                    w.get(&format!("{p}.post_attention_layernorm.weight")),
                    c.eps,
                )
            })
            .collect();
        cap.insert(format!("{p}.mlp.gate_proj"), x.clone());
        cap.insert(format!("{p}.mlp.up_proj"), x.clone());
        let mut acts = Vec::new();
        for t in 0..n {
            let gt = proj("mlp.gate_proj", &x[t]);
            let up = proj("mlp.up_proj", &x[t]);
            let a: Vec<f32> = gt
                .iter()
                .zip(&up)
                .map(|(&g, &u)| ((g as f64) / (1.0 + (-(g as f64)).exp()) * u as f64) as f32)
                .collect();
            let dn = proj("mlp.down_proj", &a);
            for i in 0..d {
                h[t][i] += dn[i];
            }
            acts.push(a);
        }
        cap.insert(format!("{p}.mlp.down_proj"), acts);
    }
    let head = if c.tied {
        w.get("model.embed_tokens.weight")
    } else {
        w.get("lm_head.weight")
    };
    let x: Vec<Vec<f32>> = h
        .iter()
        .map(|r| rmsnorm(r, w.get("model.norm.weight"), c.eps))
        .collect();
    cap.insert("lm_head".into(), x.clone());
    (x.iter().map(|r| matvec(head, None, r)).collect(), cap)
}

fn rows(t: &Tensor) -> Vec<Vec<f32>> {
    t.to_vec2::<f32>().unwrap()
}

fn max_abs_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .flat_map(|(x, y)| {
            assert_eq!(x.len(), y.len());
            x.iter().zip(y).map(|(p, q)| (p - q).abs())
        })
        .fold(0.0, f32::max)
}

fn tokens(n: usize, vocab: usize, seed: u64) -> Vec<u32> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n).map(|_| rng.random_range(0..vocab as u32)).collect()
}

// ---------------------------------------------------------------------------------------------
// Forward, loading, cache, hook
// ---------------------------------------------------------------------------------------------

#[test]
fn hf_and_gguf_forward_match_reference() {
    let dir = tempfile::tempdir().unwrap();
    let w = Weights::random(LLAMA, 1);
    let hf = dir.path().join("hf");
    w.write_hf(&hf, "LlamaForCausalLM");
    let gguf = dir.path().join("tiny.gguf");
    w.write_gguf(&gguf, GgmlDType::F32, true, "llama");

    let toks = tokens(20, LLAMA.vocab, 7);
    let (want, _) = reference(&w, &toks);
    let m_hf = LlamaModel::load(&hf).unwrap();
    let m_gg = LlamaModel::load(&gguf).unwrap();
    let (cg, ch) = (m_gg.config(), m_hf.config());
    assert_eq!(
        (
            cg.hidden_size,
            cg.intermediate_size,
            cg.num_hidden_layers,
            cg.num_attention_heads
        ),
        (
            ch.hidden_size,
            ch.intermediate_size,
            ch.num_hidden_layers,
            ch.num_attention_heads
        )
    );
    assert_eq!(
        (cg.num_key_value_heads, cg.head_dim, cg.vocab_size),
        (ch.num_key_value_heads, 16, 300)
    );
    assert_eq!((cg.rope_theta, ch.rope_theta), (500.0, 500.0));
    assert!((cg.rms_norm_eps - 1e-5).abs() < 1e-9 && (ch.rms_norm_eps - 1e-5).abs() < 1e-12);
    assert!(!cg.tie_word_embeddings && !ch.tie_word_embeddings);
    let got_hf = rows(&m_hf.forward(&toks).unwrap());
    let got_gg = rows(&m_gg.forward(&toks).unwrap());
    let e_hf = max_abs_diff(&got_hf, &want);
    assert!(e_hf < 1e-4, "HF forward vs reference: {e_hf}");
    let e_gg = max_abs_diff(&got_gg, &got_hf);
    assert!(e_gg < 1e-5, "GGUF vs HF logits: {e_gg}");
    // the un-permuted GGUF weights are the HF weights, name by name
    for name in m_hf.linear_names() {
        let a = m_hf.linear(&name).unwrap().weight().unwrap();
        let b = m_gg.linear(&name).unwrap().weight().unwrap();
        let d = (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(d, 0.0, "{name} differs between GGUF and safetensors");
    }
    // the logits are not trivially small
    let spread = want.iter().flatten().fold(0f32, |a, &b| a.max(b.abs()));
    assert!(spread > 0.5, "logits too small to test anything: {spread}");
}

#[test]
fn unpermuting_matters() {
    // A `llama` GGUF written WITHOUT the converter's permutation, un-permuted by the loader,
    // must give different logits: the GGUF test above is not vacuous.
    let dir = tempfile::tempdir().unwrap();
    let w = Weights::random(LLAMA, 1);
    let gguf = dir.path().join("tiny.gguf");
    w.write_gguf(&gguf, GgmlDType::F32, false, "llama");
    let toks = tokens(12, LLAMA.vocab, 3);
    let (want, _) = reference(&w, &toks);
    let got = rows(&LlamaModel::load(&gguf).unwrap().forward(&toks).unwrap());
    assert!(
        max_abs_diff(&got, &want) > 1e-2,
        "permutation had no effect"
    );
}

#[test]
fn quantized_gguf_dequantizes_like_q8_0_by_hand() {
    // Q8_0 blocks {f16 d; i8 q[32]}: w = d * q, decoded here by hand from the file bytes.
    let dir = tempfile::tempdir().unwrap();
    let w = Weights::random(LLAMA, 5);
    let gguf = dir.path().join("q8.gguf");
    w.write_gguf(&gguf, GgmlDType::Q8_0, true, "llama");
    let src = quantlab_models::GgufWeights::open(&gguf).unwrap();
    assert_eq!(
        src.ggml_dtype("model.layers.0.self_attn.q_proj.weight"),
        Some(GgmlDType::Q8_0)
    );
    // independent decode of blk.0.attn_q.weight from the bytes
    let bytes = std::fs::read(&gguf).unwrap();
    let mut f = std::io::Cursor::new(&bytes);
    let content = gguf_file::Content::read(&mut f).unwrap();
    let info = &content.tensor_infos["blk.0.attn_q.weight"];
    let start = (content.tensor_data_offset + info.offset) as usize;
    let (out, inp) = (LLAMA.d, LLAMA.d);
    let mut gg = vec![0f32; out * inp];
    for b in 0..out * inp / 32 {
        let blk = &bytes[start + b * 34..start + (b + 1) * 34];
        let d = half::f16::from_le_bytes([blk[0], blk[1]]).to_f32();
        for i in 0..32 {
            gg[b * 32 + i] = d * (blk[2 + i] as i8) as f32;
        }
    }
    // un-permute by hand: GGUF row h*hd + 2i + j -> HF row h*hd + j*hd/2 + i
    let hd = LLAMA.hd();
    let mut hf = vec![0f32; out * inp];
    for h in 0..LLAMA.heads {
        for i in 0..hd / 2 {
            for j in 0..2 {
                let s = h * hd + 2 * i + j;
                let t = h * hd + j * hd / 2 + i;
                hf[t * inp..(t + 1) * inp].copy_from_slice(&gg[s * inp..(s + 1) * inp]);
            }
        }
    }
    let got = src.load("model.layers.0.self_attn.q_proj.weight").unwrap();
    let got: Vec<f32> = got.flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(got, hf);
    // and the quantization error vs the original is within Q8_0's half step
    let orig = w.get("model.layers.0.self_attn.q_proj.weight");
    let worst = got
        .iter()
        .zip(orig)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(worst < 0.3 / 127.0, "Q8_0 error {worst}");
}

#[test]
fn qwen2_biases_tied_and_mistral_window_match_reference() {
    let dir = tempfile::tempdir().unwrap();
    let qwen = Cfg {
        qkv_bias: true,
        tied: true,
        ..LLAMA
    };
    let w = Weights::random(qwen, 11);
    w.write_hf(&dir.path().join("qwen"), "Qwen2ForCausalLM");
    let m = LlamaModel::load(dir.path().join("qwen")).unwrap();
    assert!(m.config().qkv_bias && m.config().tie_word_embeddings);
    let toks = tokens(16, LLAMA.vocab, 2);
    let e = max_abs_diff(&rows(&m.forward(&toks).unwrap()), &reference(&w, &toks).0);
    assert!(e < 1e-4, "qwen2: {e}");
    // Qwen2 GGUF: biases, no q/k permutation, no output.weight (tied)
    let gg = dir.path().join("qwen.gguf");
    w.write_gguf(&gg, GgmlDType::F32, false, "qwen2");
    let m = LlamaModel::load(&gg).unwrap();
    let e = max_abs_diff(&rows(&m.forward(&toks).unwrap()), &reference(&w, &toks).0);
    assert!(e < 1e-4, "qwen2 gguf: {e}");

    let mistral = Cfg {
        window: Some(5),
        ..LLAMA
    };
    let w = Weights::random(mistral, 12);
    w.write_hf(&dir.path().join("mistral"), "MistralForCausalLM");
    let m = LlamaModel::load(dir.path().join("mistral")).unwrap();
    assert_eq!(m.config().sliding_window, Some(5));
    let toks = tokens(14, LLAMA.vocab, 4);
    let e = max_abs_diff(&rows(&m.forward(&toks).unwrap()), &reference(&w, &toks).0);
    assert!(e < 1e-4, "mistral: {e}");
    // cached decoding with the window equals the full pass
    let mut cache = KvCache::new(m.n_blocks());
    let mut last = Vec::new();
    for &t in &toks {
        last.push(rows(&m.forward_cached(&[t], &mut cache).unwrap()).remove(0));
    }
    let e = max_abs_diff(&last, &reference(&w, &toks).0);
    assert!(e < 1e-4, "mistral cached: {e}");
}

#[test]
fn long_prompt_uses_chunked_attention_correctly() {
    // n >= 256 takes the chunked causal path
    let dir = tempfile::tempdir().unwrap();
    let w = Weights::random(LLAMA, 21);
    w.write_hf(dir.path(), "LlamaForCausalLM");
    let m = LlamaModel::load(dir.path()).unwrap();
    let toks = tokens(300, LLAMA.vocab, 8);
    let (want, _) = reference(&w, &toks);
    let e = max_abs_diff(&rows(&m.forward(&toks).unwrap()), &want);
    assert!(e < 2e-4, "chunked attention: {e}");
}

#[test]
fn kv_cache_equals_full_recomputation() {
    let dir = tempfile::tempdir().unwrap();
    let w = Weights::random(LLAMA, 3);
    w.write_hf(dir.path(), "LlamaForCausalLM");
    let m = LlamaModel::load(dir.path()).unwrap();
    let toks = tokens(18, LLAMA.vocab, 9);
    let full = rows(&m.forward(&toks).unwrap());
    // prompt of 7, then 1, then chunks of 4 and 6
    let mut cache = KvCache::new(m.n_blocks());
    let mut got = Vec::new();
    let mut at = 0;
    for len in [7, 1, 4, 6] {
        got.extend(rows(
            &m.forward_cached(&toks[at..at + len], &mut cache).unwrap(),
        ));
        at += len;
        assert_eq!(cache.len(), at);
    }
    let e = max_abs_diff(&got, &full);
    assert!(e < 1e-4, "cached vs full: {e}");
    // greedy continuation with the cache equals greedy by recomputing everything
    let mut seq = toks[..5].to_vec();
    let mut cache = KvCache::new(m.n_blocks());
    let mut logits = rows(&m.forward_cached(&seq, &mut cache).unwrap())
        .pop()
        .unwrap();
    let mut cached_tokens = Vec::new();
    for _ in 0..8 {
        let next = quantlab_models::generate::argmax(&logits);
        cached_tokens.push(next);
        logits = rows(&m.forward_cached(&[next], &mut cache).unwrap())
            .pop()
            .unwrap();
    }
    let mut full_tokens = Vec::new();
    for _ in 0..8 {
        let (l, _) = reference(&w, &seq);
        let last = l.last().unwrap();
        let next = quantlab_models::generate::argmax(last);
        full_tokens.push(next);
        seq.push(next);
    }
    assert_eq!(cached_tokens, full_tokens);
}

#[test]
fn capture_hook_sees_linear_inputs_and_blocks_compose() {
    let dir = tempfile::tempdir().unwrap();
    let w = Weights::random(LLAMA, 4);
    w.write_hf(dir.path(), "LlamaForCausalLM");
    let m = LlamaModel::load(dir.path()).unwrap();
    let a = tokens(10, LLAMA.vocab, 1);
    let b = tokens(10, LLAMA.vocab, 2);
    let (want_a, cap_a) = reference(&w, &a);
    let (want_b, cap_b) = reference(&w, &b);

    let mut seen: HashMap<String, Vec<Vec<f32>>> = HashMap::new();
    let mut calls = Vec::new();
    let chosen = [
        "model.layers.1.self_attn.q_proj",
        "model.layers.0.self_attn.o_proj",
        "model.layers.1.mlp.down_proj",
        "lm_head",
    ];
    {
        let mut hook = CaptureHook::new(chosen, |name: &str, x: &Tensor| {
            calls.push(name.to_string());
            seen.insert(name.to_string(), rows(x));
        });
        // batched: two sequences at once; the hook sees [2 * 10, in]
        let logits = m.forward_batch(&[&a, &b], Some(&mut hook)).unwrap();
        let l = rows(&logits);
        assert!(max_abs_diff(&l[..10], &want_a) < 1e-4);
        assert!(max_abs_diff(&l[10..], &want_b) < 1e-4);
    }
    assert_eq!(
        calls,
        vec![
            "model.layers.0.self_attn.o_proj",
            "model.layers.1.self_attn.q_proj",
            "model.layers.1.mlp.down_proj",
            "lm_head"
        ]
    );
    for name in chosen {
        let got = &seen[name];
        assert_eq!(got.len(), 20, "{name}");
        let want: Vec<Vec<f32>> = cap_a[name].iter().chain(&cap_b[name]).cloned().collect();
        let e = max_abs_diff(got, &want);
        assert!(e < 1e-4, "{name}: captured input differs by {e}");
    }

    // block-level access: embed -> blocks -> head reproduces forward
    let mut h = m.embed(&[&a]).unwrap();
    for i in 0..m.n_blocks() {
        h = m.block_forward(i, &h, 0, None, None).unwrap();
    }
    let l = rows(&m.head(&h, None).unwrap());
    assert!(max_abs_diff(&l, &want_a) < 1e-4);
    assert_eq!(BLOCK_LINEARS.len() * 2 + 1, m.linear_names().len());
}

#[test]
fn block_stages_give_the_linear_inputs_and_compose_to_the_forward() {
    // the stages a true-sequential driver runs one at a time, against the plain reference's
    // captured inputs of every linear, on a batch of two sequences
    let dir = tempfile::tempdir().unwrap();
    let w = Weights::random(LLAMA, 5);
    w.write_hf(dir.path(), "LlamaForCausalLM");
    let m = LlamaModel::load(dir.path()).unwrap();
    let a = tokens(9, LLAMA.vocab, 3);
    let b = tokens(9, LLAMA.vocab, 4);
    let (want_a, cap_a) = reference(&w, &a);
    let (want_b, cap_b) = reference(&w, &b);
    let check = |name: String, x: &Tensor| {
        let want: Vec<Vec<f32>> = cap_a[&name].iter().chain(&cap_b[&name]).cloned().collect();
        let e = max_abs_diff(&rows(x), &want);
        assert!(
            e < 1e-4,
            "{name}: stage output differs from the input by {e}"
        );
    };
    let mut h = m.embed(&[&a, &b]).unwrap();
    for i in 0..m.n_blocks() {
        let x = m.block_attn_input(i, &h).unwrap();
        check(format!("model.layers.{i}.self_attn.k_proj"), &x);
        let attn = m.block_attention(i, &x, 2).unwrap();
        check(format!("model.layers.{i}.self_attn.o_proj"), &attn);
        let (resid, x2) = m.block_mlp_input(i, &h, &attn).unwrap();
        check(format!("model.layers.{i}.mlp.up_proj"), &x2);
        let act = m.block_mlp_act(i, &x2).unwrap();
        check(format!("model.layers.{i}.mlp.down_proj"), &act);
        let next = m.block_output(i, &resid, &act).unwrap();
        // the stages are the block's own computation, bit for bit
        let whole = m.block_forward(i, &h, 0, None, None).unwrap();
        assert_eq!(
            rows(&next.flatten_to(1).unwrap()),
            rows(&whole.flatten_to(1).unwrap())
        );
        h = next;
    }
    let l = rows(&m.head(&h, None).unwrap());
    assert!(max_abs_diff(&l[..9], &want_a) < 1e-4);
    assert!(max_abs_diff(&l[9..], &want_b) < 1e-4);
    // a batch that does not divide the rows, a block that does not exist
    let x = m.block_attn_input(0, &m.embed(&[&a]).unwrap()).unwrap();
    assert!(m.block_attention(0, &x, 2).is_err());
    assert!(m.block_attn_input(99, &h).is_err());
}

#[test]
fn set_weight_changes_the_forward_like_the_reference() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = Weights::random(LLAMA, 6);
    w.write_hf(dir.path(), "LlamaForCausalLM");
    let mut m = LlamaModel::load(dir.path()).unwrap();
    let name = "model.layers.1.mlp.down_proj";
    let old = m.linear(name).unwrap().weight().unwrap();
    let new = (old * 0.25).unwrap();
    m.set_weight(name, new.clone()).unwrap();
    let entry = w.t.get_mut(&format!("{name}.weight")).unwrap();
    entry.1.iter_mut().for_each(|v| *v *= 0.25);
    let toks = tokens(9, LLAMA.vocab, 5);
    let e = max_abs_diff(&rows(&m.forward(&toks).unwrap()), &reference(&w, &toks).0);
    assert!(e < 1e-4, "after set_weight: {e}");
    // wrong shape is refused with the name
    let bad = Tensor::zeros((3, 3), candle_core::DType::F32, &Device::Cpu).unwrap();
    let err = m.set_weight(name, bad).unwrap_err().to_string();
    assert!(err.contains(name), "{err}");
    let err = m.linear("model.layers.9.mlp.down_proj").unwrap_err();
    assert!(matches!(err, ModelError::UnknownLinear { .. }));
}

// ---------------------------------------------------------------------------------------------
// Perplexity protocol
// ---------------------------------------------------------------------------------------------

#[test]
fn perplexity_follows_the_window_protocol() {
    let dir = tempfile::tempdir().unwrap();
    let w = Weights::random(LLAMA, 8);
    w.write_hf(dir.path(), "LlamaForCausalLM");
    let m = LlamaModel::load(dir.path()).unwrap();
    let ctx = 16;
    let toks = tokens(3 * ctx + 7, LLAMA.vocab, 10); // 3 windows, tail of 7 dropped
    let mut total = 0f64;
    let mut n = 0;
    for win in toks.chunks_exact(ctx) {
        let (l, _) = reference(&w, win);
        for t in 1..ctx {
            let row = &l[t - 1];
            let m = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
            let lse = m + row.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln();
            total += lse - row[win[t] as usize] as f64;
            n += 1;
        }
    }
    let want = (total / n as f64).exp();
    let r = perplexity(
        &m,
        &toks,
        &PplParams {
            ctx,
            max_windows: None,
        },
    )
    .unwrap();
    assert_eq!(r.windows, 3);
    assert_eq!(r.tokens_scored, 3 * (ctx - 1));
    assert!(
        (r.ppl - want).abs() / want < 1e-5,
        "ppl {} vs reference {want}",
        r.ppl
    );
    let r2 = perplexity(
        &m,
        &toks,
        &PplParams {
            ctx,
            max_windows: Some(2),
        },
    )
    .unwrap();
    assert_eq!(r2.windows, 2);
    assert_eq!(&r2.window_nll[..], &r.window_nll[..2]);
    let err = perplexity(
        &m,
        &toks[..ctx - 1],
        &PplParams {
            ctx,
            max_windows: None,
        },
    )
    .unwrap_err();
    assert!(matches!(err, ModelError::TextTooShort { .. }), "{err}");
}

// ---------------------------------------------------------------------------------------------
// Tokenizer from GGUF metadata
// ---------------------------------------------------------------------------------------------

fn tokenizer_gguf(path: &Path, pre: &str) {
    let toks = [
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
    let types: Vec<Value> = toks
        .iter()
        .map(|t| Value::I32(if t.starts_with("<|") { 3 } else { 1 }))
        .collect();
    let merges = ["Ġ a", "a b", "Ġa b", "1 2"];
    let meta: Vec<(&str, Value)> = vec![
        ("general.architecture", Value::String("llama".into())),
        ("tokenizer.ggml.model", Value::String("gpt2".into())),
        ("tokenizer.ggml.pre", Value::String(pre.into())),
        (
            "tokenizer.ggml.tokens",
            Value::Array(toks.iter().map(|t| Value::String(t.to_string())).collect()),
        ),
        ("tokenizer.ggml.token_type", Value::Array(types)),
        (
            "tokenizer.ggml.merges",
            Value::Array(
                merges
                    .iter()
                    .map(|t| Value::String(t.to_string()))
                    .collect(),
            ),
        ),
        ("tokenizer.ggml.eos_token_id", Value::U32(0)),
        (
            "tokenizer.chat_template",
            Value::String(
                "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}".into(),
            ),
        ),
    ];
    let refs: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (*k, v)).collect();
    let mut f = std::fs::File::create(path).unwrap();
    gguf_file::write(&mut f, &refs, &[]).unwrap();
}

#[test]
fn gguf_tokenizer_isolates_digits_for_smollm() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("tok.gguf");
    tokenizer_gguf(&p, "smollm");
    let tok = LlamaTokenizer::load(&p).unwrap();
    // "ab ab12 c\n": pieces ab | Ġab | 1 | 2 | Ġ c | Ċ  (digits isolated, so no "12")
    let ids = tok.encode("ab ab12 c\n").unwrap();
    assert_eq!(ids, vec![7, 9, 5, 6, 4, 3, 11]);
    assert_eq!(tok.decode(&ids).unwrap(), "ab ab12 c\n");
    assert_eq!(tok.eos_token_ids(), &[0]);
    // the control token is recognised only by encode_special
    assert_eq!(tok.encode_special("a<|endoftext|>").unwrap(), vec![1, 0]);
    // the plain GPT-2 split keeps "12" together
    let p2 = dir.path().join("tok2.gguf");
    tokenizer_gguf(&p2, "gpt2");
    let tok2 = LlamaTokenizer::load(&p2).unwrap();
    assert_eq!(tok2.encode("ab12").unwrap(), vec![7, 10]);
    let chat = tok
        .apply_chat_template(&[quantlab_models::ChatMessage::new("user", "hi")], true)
        .unwrap();
    assert_eq!(chat, "<user>hi");
}

// ---------------------------------------------------------------------------------------------
// Errors name the file, never panic
// ---------------------------------------------------------------------------------------------

#[test]
fn bad_files_give_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let w = Weights::random(LLAMA, 1);
    let gguf = dir.path().join("tiny.gguf");
    w.write_gguf(&gguf, GgmlDType::Q8_0, true, "llama");
    let bytes = std::fs::read(&gguf).unwrap();

    // truncated in the tensor data, in the header, and garbage
    for (name, data) in [
        ("cut_data.gguf", &bytes[..bytes.len() - 1000]),
        ("cut_header.gguf", &bytes[..200]),
        ("garbage.gguf", &b"this is not a gguf file at all"[..]),
        ("empty.gguf", &b""[..]),
    ] {
        let p = dir.path().join(name);
        std::fs::write(&p, data).unwrap();
        let err = LlamaModel::load(&p).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains(name), "{name}: {msg}");
        assert!(matches!(err, ModelError::Gguf { .. }), "{name}: {err:?}");
    }

    // truncated safetensors
    let hf = dir.path().join("hf");
    w.write_hf(&hf, "LlamaForCausalLM");
    let st = hf.join("model.safetensors");
    let sb = std::fs::read(&st).unwrap();
    std::fs::write(&st, &sb[..sb.len() / 2]).unwrap();
    let err = LlamaModel::load(&hf).unwrap_err();
    assert!(matches!(err, ModelError::Safetensors { .. }), "{err:?}");
    assert!(err.to_string().contains("model.safetensors"), "{err}");

    // unsupported architecture, in config.json and in GGUF
    let gpt2 = dir.path().join("gpt2");
    w.write_hf(&gpt2, "LlamaForCausalLM");
    std::fs::write(
        gpt2.join("config.json"),
        r#"{"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_embd": 64}"#,
    )
    .unwrap();
    let err = LlamaModel::load(&gpt2).unwrap_err();
    assert!(
        matches!(err, ModelError::UnsupportedArchitecture { .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("GPT2LMHeadModel") && err.to_string().contains("config.json"));
    let g2 = dir.path().join("falcon.gguf");
    w.write_gguf(&g2, GgmlDType::F32, true, "falcon");
    let err = LlamaModel::load(&g2).unwrap_err();
    assert!(
        matches!(err, ModelError::UnsupportedArchitecture { .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("falcon.gguf"));

    // missing tokenizer: an HF dir without tokenizer.json, a GGUF without tokenizer metadata
    let err = LlamaTokenizer::load(dir.path().join("gpt2")).unwrap_err();
    assert!(
        matches!(err, ModelError::MissingTokenizer { .. }),
        "{err:?}"
    );
    let err = LlamaTokenizer::load(&gguf).unwrap_err();
    assert!(
        matches!(err, ModelError::MissingTokenizer { .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("tiny.gguf"));

    // a missing tensor is named
    let hf2 = dir.path().join("hf2");
    let mut w2 = Weights::random(LLAMA, 2);
    w2.t.remove("model.layers.1.mlp.up_proj.weight");
    w2.write_hf(&hf2, "LlamaForCausalLM");
    let err = LlamaModel::load(&hf2).unwrap_err().to_string();
    assert!(err.contains("model.layers.1.mlp.up_proj.weight"), "{err}");

    // text shorter than one window names the file
    let tp = dir.path().join("tok.gguf");
    tokenizer_gguf(&tp, "smollm");
    let tok = LlamaTokenizer::load(&tp).unwrap();
    let m = LlamaModel::load(&gguf).unwrap();
    let short = dir.path().join("short.txt");
    std::fs::write(&short, "ab ab c").unwrap();
    let err = perplexity_of_file(
        &m,
        &tok,
        &short,
        None,
        &PplParams {
            ctx: 16,
            max_windows: None,
        },
    )
    .unwrap_err();
    assert!(matches!(err, ModelError::TextTooShort { .. }), "{err:?}");
    assert!(err.to_string().contains("short.txt"), "{err}");
    // the source trait names its file
    let src = quantlab_models::GgufWeights::open(&gguf).unwrap();
    assert!(src.path().ends_with("tiny.gguf"));
    assert!(src.contains("lm_head.weight"));
}

// ---------------------------------------------------------------------------------------------
// Every ggml type, against the `gguf` Python package's dequantizer
// ---------------------------------------------------------------------------------------------

#[test]
fn gguf_types_dequantize_like_python_gguf() {
    let ok = std::process::Command::new("python3")
        .args(["-c", "import gguf, numpy"])
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        eprintln!("SKIPPED gguf_types_dequantize_like_python_gguf: python3 cannot import gguf");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("types.gguf");
    let types = [
        GgmlDType::F32,
        GgmlDType::F16,
        GgmlDType::BF16,
        GgmlDType::Q4_0,
        GgmlDType::Q4_1,
        GgmlDType::Q5_0,
        GgmlDType::Q5_1,
        GgmlDType::Q8_0,
        GgmlDType::Q2K,
        GgmlDType::Q3K,
        GgmlDType::Q4K,
        GgmlDType::Q5K,
        GgmlDType::Q6K,
    ];
    let mut rng = StdRng::seed_from_u64(99);
    let src: Vec<f32> = (0..4 * 256)
        .map(|_| rng.random::<f32>() * 2.0 - 1.0)
        .collect();
    let t = Tensor::from_vec(src, (4, 256), &Device::Cpu).unwrap();
    let tensors: Vec<(String, QTensor)> = types
        .iter()
        .map(|&d| (format!("t_{d:?}"), QTensor::quantize(&t, d).unwrap()))
        .collect();
    let refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let arch = Value::String("llama".into());
    let mut f = std::fs::File::create(&path).unwrap();
    gguf_file::write(&mut f, &[("general.architecture", &arch)], &refs).unwrap();
    drop(f);
    let script = r#"
import sys, json, numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize
r = GGUFReader(sys.argv[1])
out = {}
for t in r.tensors:
    out[t.name] = dequantize(t.data, t.tensor_type).astype(np.float64).ravel().tolist()
print(json.dumps(out))
"#;
    let o = std::process::Command::new("timeout")
        .args(["60", "python3", "-c", script])
        .arg(&path)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let want: HashMap<String, Vec<f64>> = serde_json::from_slice(&o.stdout).unwrap();
    let w = quantlab_models::GgufWeights::open(&path).unwrap();
    for &d in &types {
        let name = format!("t_{d:?}");
        let got: Vec<f32> = w
            .load_raw(&name)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let exp = &want[&name];
        assert_eq!(got.len(), exp.len(), "{name}");
        let worst = got
            .iter()
            .zip(exp)
            .map(|(&a, &b)| (a as f64 - b).abs())
            .fold(0f64, f64::max);
        assert!(
            worst < 1e-6,
            "{name}: max difference {worst} vs python gguf"
        );
    }
}

#[test]
fn sharded_safetensors_and_hf_tokenizer_dir() {
    let dir = tempfile::tempdir().unwrap();
    let w = Weights::random(LLAMA, 31);
    let hf = dir.path().join("sharded");
    std::fs::create_dir_all(&hf).unwrap();
    std::fs::write(hf.join("config.json"), w.config_json("LlamaForCausalLM")).unwrap();
    // two shards: layer 0 + embeddings in the first, the rest in the second
    let mut shards: [HashMap<String, Tensor>; 2] = [HashMap::new(), HashMap::new()];
    let mut map = serde_json::Map::new();
    for (k, (s, v)) in &w.t {
        let i = usize::from(!(k.contains("layers.0.") || k.contains("embed")));
        let file = format!("model-0000{}-of-00002.safetensors", i + 1);
        map.insert(k.clone(), serde_json::Value::String(file));
        shards[i].insert(
            k.clone(),
            Tensor::from_vec(v.clone(), s.as_slice(), &Device::Cpu).unwrap(),
        );
    }
    for (i, sh) in shards.iter().enumerate() {
        candle_core::safetensors::save(
            sh,
            hf.join(format!("model-0000{}-of-00002.safetensors", i + 1)),
        )
        .unwrap();
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": map});
    std::fs::write(hf.join("model.safetensors.index.json"), index.to_string()).unwrap();
    let m = LlamaModel::load(&hf).unwrap();
    let toks = tokens(11, LLAMA.vocab, 12);
    let e = max_abs_diff(&rows(&m.forward(&toks).unwrap()), &reference(&w, &toks).0);
    assert!(e < 1e-4, "sharded: {e}");

    // tokenizer.json + tokenizer_config.json (chat template, eos) in the same directory
    let tp = dir.path().join("tok.gguf");
    tokenizer_gguf(&tp, "smollm");
    let from_gguf = LlamaTokenizer::load(&tp).unwrap();
    from_gguf
        .inner()
        .save(hf.join("tokenizer.json"), false)
        .unwrap();
    std::fs::write(
        hf.join("tokenizer_config.json"),
        r#"{"eos_token": "<|endoftext|>", "add_bos_token": false,
            "chat_template": "{% for m in messages %}\n[{{ m.role }}]{{ m.content }}\n{% endfor %}"}"#,
    )
    .unwrap();
    let tok = LlamaTokenizer::load(&hf).unwrap();
    assert_eq!(
        tok.encode("ab ab12 c\n").unwrap(),
        vec![7, 9, 5, 6, 4, 3, 11]
    );
    assert!(tok.eos_token_ids().contains(&0) && tok.eos_token_ids().contains(&2));
    let chat = tok
        .apply_chat_template(&[quantlab_models::ChatMessage::new("user", "hi")], false)
        .unwrap();
    // trim_blocks drops the newline right after a block tag, as transformers renders it
    assert_eq!(chat, "[user]hi\n");
}
