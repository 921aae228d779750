//! A tiny random BERT written as safetensors by the test: our candle forward against a plain
//! f64 reference written here with loops (no tensors), plus capture hooks, weight get/set,
//! `eval_embed` end to end, and the errors on bad files.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use quantlab_models::bert::{BertModel, LAYER_LINEARS};
use quantlab_models::embed::{eval_embed, EmbedOptions, SentenceEncoder};
use quantlab_models::ModelError;

const V: usize = 20; // vocab
const H: usize = 8; // hidden
const NH: usize = 2; // heads
const L: usize = 2; // layers
const FF: usize = 12; // intermediate
const P: usize = 16; // max positions
const EPS: f64 = 1e-12;

/// xorshift64*: deterministic weights without a dependency.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> f32 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let v = self.0.wrapping_mul(0x2545F4914F6CDD1D) >> 40;
        (v as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    fn vec(&mut self, n: usize, scale: f32, offset: f32) -> Vec<f32> {
        (0..n).map(|_| offset + scale * self.next()).collect()
    }
}

type Weights = HashMap<String, (Vec<usize>, Vec<f32>)>;

fn random_weights(seed: u64) -> Weights {
    let mut r = Rng(seed);
    let mut w: Weights = HashMap::new();
    let mut put = |name: &str, shape: Vec<usize>, scale: f32, offset: f32, r: &mut Rng| {
        let n = shape.iter().product();
        w.insert(name.to_string(), (shape, r.vec(n, scale, offset)));
    };
    put(
        "embeddings.word_embeddings.weight",
        vec![V, H],
        1.0,
        0.0,
        &mut r,
    );
    put(
        "embeddings.position_embeddings.weight",
        vec![P, H],
        0.5,
        0.0,
        &mut r,
    );
    put(
        "embeddings.token_type_embeddings.weight",
        vec![2, H],
        0.5,
        0.0,
        &mut r,
    );
    put("embeddings.LayerNorm.weight", vec![H], 0.2, 1.0, &mut r);
    put("embeddings.LayerNorm.bias", vec![H], 0.1, 0.0, &mut r);
    for l in 0..L {
        for (j, n) in LAYER_LINEARS.iter().enumerate() {
            let (o, i) = match j {
                4 => (FF, H),
                5 => (H, FF),
                _ => (H, H),
            };
            let base = format!("encoder.layer.{l}.{n}");
            put(&format!("{base}.weight"), vec![o, i], 0.6, 0.0, &mut r);
            put(&format!("{base}.bias"), vec![o], 0.1, 0.0, &mut r);
        }
        for n in ["attention.output.LayerNorm", "output.LayerNorm"] {
            put(
                &format!("encoder.layer.{l}.{n}.weight"),
                vec![H],
                0.2,
                1.0,
                &mut r,
            );
            put(
                &format!("encoder.layer.{l}.{n}.bias"),
                vec![H],
                0.1,
                0.0,
                &mut r,
            );
        }
    }
    w
}

fn config_json(model_type: &str) -> String {
    format!(
        r#"{{"architectures": ["BertModel"], "model_type": "{model_type}", "vocab_size": {V},
        "hidden_size": {H}, "num_hidden_layers": {L}, "num_attention_heads": {NH},
        "intermediate_size": {FF}, "max_position_embeddings": {P}, "type_vocab_size": 2,
        "layer_norm_eps": {EPS:e}, "hidden_act": "gelu", "pad_token_id": 0}}"#
    )
}

const VOCAB: [&str; V] = [
    "[PAD]", "[CLS]", "[SEP]", "[UNK]", "the", "cat", "sat", "on", "mat", "a", "dog", "ran", ".",
    "!", "big", "small", "house", "in", "was", "is",
];

fn tokenizer_json() -> String {
    let vocab: Vec<String> = VOCAB
        .iter()
        .enumerate()
        .map(|(i, w)| format!("\"{w}\": {i}"))
        .collect();
    let special = |id: usize, t: &str| {
        format!(
            r#"{{"id": {id}, "content": "{t}", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}}"#
        )
    };
    format!(
        r#"{{"version": "1.0", "truncation": null, "padding": null,
  "added_tokens": [{}, {}, {}, {}],
  "normalizer": {{"type": "Lowercase"}},
  "pre_tokenizer": {{"type": "Whitespace"}},
  "post_processor": {{"type": "TemplateProcessing",
    "single": [{{"SpecialToken": {{"id": "[CLS]", "type_id": 0}}}}, {{"Sequence": {{"id": "A", "type_id": 0}}}}, {{"SpecialToken": {{"id": "[SEP]", "type_id": 0}}}}],
    "pair": [{{"SpecialToken": {{"id": "[CLS]", "type_id": 0}}}}, {{"Sequence": {{"id": "A", "type_id": 0}}}}, {{"SpecialToken": {{"id": "[SEP]", "type_id": 0}}}}, {{"Sequence": {{"id": "B", "type_id": 1}}}}, {{"SpecialToken": {{"id": "[SEP]", "type_id": 1}}}}],
    "special_tokens": {{"[CLS]": {{"id": "[CLS]", "ids": [1], "tokens": ["[CLS]"]}}, "[SEP]": {{"id": "[SEP]", "ids": [2], "tokens": ["[SEP]"]}}}}}},
  "decoder": null,
  "model": {{"type": "WordLevel", "vocab": {{{}}}, "unk_token": "[UNK]"}}}}"#,
        special(0, "[PAD]"),
        special(1, "[CLS]"),
        special(2, "[SEP]"),
        special(3, "[UNK]"),
        vocab.join(", ")
    )
}

/// Token ids by hand: lower-case, split at spaces and before `.`/`!`.
fn hand_tokenize(s: &str) -> Vec<u32> {
    let mut ids = vec![1u32];
    for w in s
        .to_lowercase()
        .replace('.', " .")
        .replace('!', " !")
        .split_whitespace()
    {
        ids.push(VOCAB.iter().position(|v| *v == w).unwrap_or(3) as u32);
    }
    ids.push(2);
    ids
}

fn write_model(dir: &Path, w: &Weights, prefix: &str, with_tokenizer: bool) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("config.json"), config_json("bert")).unwrap();
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = w
        .iter()
        .map(|(k, (shape, v))| {
            let b: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
            (format!("{prefix}{k}"), shape.clone(), b)
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView)> = bytes
        .iter()
        .map(|(k, s, b)| {
            (
                k.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)
                    .unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &dir.join("model.safetensors")).unwrap();
    if with_tokenizer {
        std::fs::write(dir.join("tokenizer.json"), tokenizer_json()).unwrap();
    }
}

// ---------------------------------------------------------------- plain reference (f64)

fn mat(w: &Weights, name: &str) -> Vec<f64> {
    w[name].1.iter().map(|&x| x as f64).collect()
}

fn layer_norm(x: &[f64], g: &[f64], b: &[f64]) -> Vec<f64> {
    let n = x.len() as f64;
    let mu = x.iter().sum::<f64>() / n;
    let var = x.iter().map(|v| (v - mu) * (v - mu)).sum::<f64>() / n;
    (0..x.len())
        .map(|i| (x[i] - mu) / (var + EPS).sqrt() * g[i] + b[i])
        .collect()
}

/// erf by its Maclaurin series (|x| small) or continued fraction (large |x|), to ~1e-15.
fn erf(x: f64) -> f64 {
    if x.abs() > 3.0 {
        // erfc(x) continued fraction (Lentz), x > 0
        let a = x.abs();
        let mut f = a;
        let mut c = a;
        let mut d = 0.0;
        for k in 1..200 {
            let kk = k as f64 / 2.0;
            d = a + kk * d;
            d = 1.0 / d;
            c = a + kk / c;
            f *= c * d;
        }
        let erfc = (-a * a).exp() / (f * std::f64::consts::PI.sqrt());
        return x.signum() * (1.0 - erfc);
    }
    let mut sum = 0.0;
    let mut term = x;
    let mut k = 0.0;
    loop {
        let add = term / (2.0 * k + 1.0);
        sum += add;
        if add.abs() < 1e-17 {
            break;
        }
        k += 1.0;
        term *= -x * x / k;
    }
    2.0 / std::f64::consts::PI.sqrt() * sum
}

fn linear(w: &Weights, name: &str, x: &[f64]) -> Vec<f64> {
    let wt = mat(w, &format!("{name}.weight"));
    let b = mat(w, &format!("{name}.bias"));
    let (o, i) = (b.len(), x.len());
    (0..o)
        .map(|r| b[r] + (0..i).map(|c| wt[r * i + c] * x[c]).sum::<f64>())
        .collect()
}

/// Hidden states of one unpadded sequence, and the inputs of every linear.
fn reference(w: &Weights, ids: &[u32]) -> (Vec<Vec<f64>>, HashMap<String, Vec<Vec<f64>>>) {
    let t = ids.len();
    let d = H / NH;
    let we = mat(w, "embeddings.word_embeddings.weight");
    let pe = mat(w, "embeddings.position_embeddings.weight");
    let te = mat(w, "embeddings.token_type_embeddings.weight");
    let (g, b) = (
        mat(w, "embeddings.LayerNorm.weight"),
        mat(w, "embeddings.LayerNorm.bias"),
    );
    let mut caps: HashMap<String, Vec<Vec<f64>>> = HashMap::new();
    let mut x: Vec<Vec<f64>> = (0..t)
        .map(|p| {
            let e: Vec<f64> = (0..H)
                .map(|k| we[ids[p] as usize * H + k] + pe[p * H + k] + te[k])
                .collect();
            layer_norm(&e, &g, &b)
        })
        .collect();
    for l in 0..L {
        let nm = |j: usize| format!("encoder.layer.{l}.{}", LAYER_LINEARS[j]);
        for j in 0..3 {
            caps.insert(nm(j), x.clone());
        }
        let q: Vec<Vec<f64>> = x.iter().map(|r| linear(w, &nm(0), r)).collect();
        let k: Vec<Vec<f64>> = x.iter().map(|r| linear(w, &nm(1), r)).collect();
        let v: Vec<Vec<f64>> = x.iter().map(|r| linear(w, &nm(2), r)).collect();
        let mut ctx = vec![vec![0.0; H]; t];
        for h in 0..NH {
            for i in 0..t {
                let s: Vec<f64> = (0..t)
                    .map(|j| {
                        (0..d)
                            .map(|c| q[i][h * d + c] * k[j][h * d + c])
                            .sum::<f64>()
                            / (d as f64).sqrt()
                    })
                    .collect();
                let m = s.iter().cloned().fold(f64::MIN, f64::max);
                let e: Vec<f64> = s.iter().map(|v| (v - m).exp()).collect();
                let z: f64 = e.iter().sum();
                for j in 0..t {
                    for c in 0..d {
                        ctx[i][h * d + c] += e[j] / z * v[j][h * d + c];
                    }
                }
            }
        }
        caps.insert(nm(3), ctx.clone());
        let ln = |n: &str| {
            (
                mat(w, &format!("encoder.layer.{l}.{n}.weight")),
                mat(w, &format!("encoder.layer.{l}.{n}.bias")),
            )
        };
        let (g1, b1) = ln("attention.output.LayerNorm");
        let a: Vec<Vec<f64>> = (0..t)
            .map(|i| {
                let o = linear(w, &nm(3), &ctx[i]);
                let s: Vec<f64> = (0..H).map(|c| o[c] + x[i][c]).collect();
                layer_norm(&s, &g1, &b1)
            })
            .collect();
        caps.insert(nm(4), a.clone());
        let inter: Vec<Vec<f64>> = a
            .iter()
            .map(|r| {
                linear(w, &nm(4), r)
                    .into_iter()
                    .map(|u| 0.5 * u * (1.0 + erf(u / std::f64::consts::SQRT_2)))
                    .collect()
            })
            .collect();
        caps.insert(nm(5), inter.clone());
        let (g2, b2) = ln("output.LayerNorm");
        x = (0..t)
            .map(|i| {
                let o = linear(w, &nm(5), &inter[i]);
                let s: Vec<f64> = (0..H).map(|c| o[c] + a[i][c]).collect();
                layer_norm(&s, &g2, &b2)
            })
            .collect();
    }
    (x, caps)
}

fn reference_embedding(w: &Weights, ids: &[u32]) -> Vec<f64> {
    let (hs, _) = reference(w, ids);
    let mut m = [0.0; H];
    for r in &hs {
        for c in 0..H {
            m[c] += r[c] / hs.len() as f64;
        }
    }
    let n = m.iter().map(|v| v * v).sum::<f64>().sqrt().max(1e-12);
    m.iter().map(|v| v / n).collect()
}

// ---------------------------------------------------------------- helpers

fn batch(seqs: &[Vec<u32>]) -> (Tensor, Tensor) {
    let t = seqs.iter().map(|s| s.len()).max().unwrap();
    let mut ids = vec![0u32; seqs.len() * t];
    let mut mask = vec![0u32; seqs.len() * t];
    for (i, s) in seqs.iter().enumerate() {
        ids[i * t..i * t + s.len()].copy_from_slice(s);
        mask[i * t..i * t + s.len()].fill(1);
    }
    (
        Tensor::from_vec(ids, (seqs.len(), t), &Device::Cpu).unwrap(),
        Tensor::from_vec(mask, (seqs.len(), t), &Device::Cpu).unwrap(),
    )
}

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

fn model_dir(root: &Path, name: &str, w: &Weights, prefix: &str) -> PathBuf {
    let d = root.join(name);
    write_model(&d, w, prefix, true);
    d
}

fn seqs() -> Vec<Vec<u32>> {
    vec![
        vec![1, 4, 5, 6, 7, 4, 8, 12, 2],
        vec![1, 9, 10, 11, 2],
        vec![1, 14, 16, 13, 3, 19, 2],
    ]
}

// ---------------------------------------------------------------- tests

#[test]
fn forward_matches_plain_reference_with_padding() {
    let w = random_weights(7);
    let root = tmp();
    let dir = model_dir(root.path(), "m", &w, "");
    let model = BertModel::load(&dir).unwrap();
    let s = seqs();
    let (ids, mask) = batch(&s);
    let hs: Vec<Vec<Vec<f32>>> = model.forward(&ids, &mask).unwrap().to_vec3().unwrap();
    let emb: Vec<Vec<f32>> = model.embed(&ids, &mask).unwrap().to_vec2().unwrap();
    let mut max_diff = 0f64;
    for (b, seq) in s.iter().enumerate() {
        let (r, _) = reference(&w, seq);
        for (p, row) in r.iter().enumerate() {
            for c in 0..H {
                max_diff = max_diff.max((hs[b][p][c] as f64 - row[c]).abs());
            }
        }
        let re = reference_embedding(&w, seq);
        for c in 0..H {
            max_diff = max_diff.max((emb[b][c] as f64 - re[c]).abs());
        }
    }
    println!("tiny BERT: max |candle - plain f64 reference| = {max_diff:.3e}");
    assert!(max_diff < 1e-4, "max diff {max_diff}");
}

#[test]
fn bert_prefix_and_extra_tensors_are_accepted() {
    let mut w = random_weights(11);
    w.insert("pooler.dense.weight".into(), (vec![H, H], vec![0.0; H * H]));
    let root = tmp();
    let plain = BertModel::load(model_dir(root.path(), "a", &w, "")).unwrap();
    let pref = BertModel::load(model_dir(root.path(), "b", &w, "bert.")).unwrap();
    let (ids, mask) = batch(&seqs());
    let a: Vec<Vec<f32>> = plain.embed(&ids, &mask).unwrap().to_vec2().unwrap();
    let b: Vec<Vec<f32>> = pref.embed(&ids, &mask).unwrap().to_vec2().unwrap();
    assert_eq!(a, b);
    let r = reference_embedding(&w, &seqs()[1]);
    assert!((a[1][0] as f64 - r[0]).abs() < 1e-4);
}

#[test]
fn capture_hook_sees_real_token_inputs_of_every_linear() {
    let w = random_weights(3);
    let root = tmp();
    let model = BertModel::load(model_dir(root.path(), "m", &w, "")).unwrap();
    let s = seqs();
    let (ids, mask) = batch(&s);
    let mut seen: Vec<(String, Vec<Vec<f32>>)> = Vec::new();
    model
        .forward_with_hook(&ids, &mask, &mut |name, x| {
            seen.push((name.to_string(), x.to_vec2().unwrap()));
        })
        .unwrap();
    assert_eq!(seen.len(), 6 * L);
    let names: Vec<&str> = seen.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, model.linear_names());
    let refs: Vec<_> = s.iter().map(|q| reference(&w, q).1).collect();
    let n_real: usize = s.iter().map(|q| q.len()).sum();
    let mut max_diff = 0f64;
    for (name, rows) in &seen {
        assert_eq!(rows.len(), n_real, "{name}: padding rows must be left out");
        let mut k = 0;
        for (b, q) in s.iter().enumerate() {
            for p in 0..q.len() {
                let want = &refs[b][name][p];
                assert_eq!(rows[k].len(), want.len());
                for c in 0..want.len() {
                    max_diff = max_diff.max((rows[k][c] as f64 - want[c]).abs());
                }
                k += 1;
            }
        }
    }
    assert!(max_diff < 1e-4, "captured inputs differ by {max_diff}");
}

#[test]
fn set_weight_changes_the_forward_like_the_reference() {
    let mut w = random_weights(5);
    let root = tmp();
    let mut model = BertModel::load(model_dir(root.path(), "m", &w, "")).unwrap();
    let name = "encoder.layer.1.intermediate.dense";
    let old: Vec<Vec<f32>> = model.weight(name).unwrap().to_vec2().unwrap();
    assert_eq!(old[2][3], w[&format!("{name}.weight")].1[2 * H + 3]);
    // Halve the weight, in the model and in the reference weights.
    let new: Vec<f32> = w[&format!("{name}.weight")]
        .1
        .iter()
        .map(|x| x * 0.5)
        .collect();
    w.get_mut(&format!("{name}.weight")).unwrap().1 = new.clone();
    model
        .set_weight(
            name,
            Tensor::from_vec(new.clone(), (FF, H), &Device::Cpu).unwrap(),
        )
        .unwrap();
    let got: Vec<f32> = model
        .weight(name)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert_eq!(got, new);
    assert!(model.linear(name).unwrap().bias().is_some(), "bias kept");
    let s = seqs();
    let (ids, mask) = batch(&s);
    let emb: Vec<Vec<f32>> = model.embed(&ids, &mask).unwrap().to_vec2().unwrap();
    for (b, q) in s.iter().enumerate() {
        let r = reference_embedding(&w, q);
        for c in 0..H {
            assert!((emb[b][c] as f64 - r[c]).abs() < 1e-4);
        }
    }
    // Wrong shape and unknown names are errors.
    let bad = Tensor::zeros((H, H), candle_core::DType::F32, &Device::Cpu).unwrap();
    let e = model.set_weight(name, bad).unwrap_err().to_string();
    assert!(e.contains(name) && e.contains("12x8"), "{e}");
    let e = model
        .weight("encoder.layer.9.attention.self.query")
        .unwrap_err();
    assert!(e.to_string().contains("encoder.layer.9"), "{e}");
    assert!(model.weight("decoder.foo").is_err());
}

#[test]
fn sentence_encoder_and_eval_embed_on_tiny_model() {
    let w = random_weights(21);
    let mut w2 = w.clone();
    for (k, (_, v)) in w2.iter_mut() {
        if k.contains("attention.self.value.weight") {
            v.iter_mut().for_each(|x| *x *= 0.7);
        }
    }
    let root = tmp();
    let dir = model_dir(root.path(), "m", &w, "");
    let dir2 = model_dir(root.path(), "r", &w2, "");
    let text = "The cat sat on the mat. A dog ran!\n\nThe big house was small.\nIt is.";
    let tf = root.path().join("t.txt");
    std::fs::write(&tf, text).unwrap();
    let sentences = [
        "The cat sat on the mat.",
        "A dog ran!",
        "The big house was small.",
        "It is.",
    ];

    let enc = SentenceEncoder::load(&dir).unwrap();
    let ids = enc.tokenize(&sentences).unwrap();
    for (s, got) in sentences.iter().zip(&ids) {
        assert_eq!(got, &hand_tokenize(s), "{s}");
    }
    // Batched (sorted, padded) encode equals the per-sentence reference.
    let e = enc.encode(&sentences, 3).unwrap();
    for (s, got) in sentences.iter().zip(&e) {
        let r = reference_embedding(&w, &hand_tokenize(s));
        for c in 0..H {
            assert!((got[c] as f64 - r[c]).abs() < 1e-4, "{s}");
        }
    }

    let rep = eval_embed(&dir, &tf, Some(&dir2), &EmbedOptions::default()).unwrap();
    assert_eq!(rep.sentences, 4);
    assert_eq!(
        rep.tokens,
        sentences
            .iter()
            .map(|s| hand_tokenize(s).len())
            .sum::<usize>()
    );
    let mut want = 0.0;
    let mut min = f64::MAX;
    for s in &sentences {
        let a = reference_embedding(&w, &hand_tokenize(s));
        let b = reference_embedding(&w2, &hand_tokenize(s));
        let c: f64 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
        want += c / 4.0;
        min = min.min(c);
    }
    let got = rep.mean_cosine.unwrap();
    println!("tiny eval_embed: mean cosine {got:.6} (reference {want:.6}), min {min:.6}");
    assert!((got - want).abs() < 1e-5, "{got} vs {want}");
    assert!((rep.min_cosine.unwrap() - min).abs() < 1e-5);
    assert!(want < 0.9999, "the perturbation must show");
    assert!(rep.sentences_per_s > 0.0 && rep.seconds > 0.0);

    // Against itself: cosine 1.
    let same = eval_embed(&dir, &tf, Some(&dir), &EmbedOptions::default()).unwrap();
    assert!((same.mean_cosine.unwrap() - 1.0).abs() < 1e-6);
    // Truncation to 4 tokens: [CLS] + 2 words + [SEP].
    let opts = EmbedOptions {
        max_len: Some(4),
        ..Default::default()
    };
    let short = eval_embed(&dir, &tf, None, &opts).unwrap();
    assert_eq!(short.tokens, 4 + 4 + 4 + 4);
    assert!(short.mean_cosine.is_none());
}

#[test]
fn bad_files_give_clear_errors() {
    let w = random_weights(1);
    let root = tmp();

    // Truncated safetensors.
    let d = model_dir(root.path(), "trunc", &w, "");
    let st = d.join("model.safetensors");
    let bytes = std::fs::read(&st).unwrap();
    std::fs::write(&st, &bytes[..bytes.len() / 2]).unwrap();
    let e = BertModel::load(&d).unwrap_err();
    assert!(e.to_string().contains("model.safetensors"), "{e}");
    // Header cut too.
    std::fs::write(&st, &bytes[..5]).unwrap();
    let e = BertModel::load(&d).unwrap_err();
    assert!(e.to_string().contains("model.safetensors"), "{e}");

    // Missing tokenizer.json.
    let d = root.path().join("notok");
    write_model(&d, &w, "", false);
    let e = SentenceEncoder::load(&d).unwrap_err();
    assert!(matches!(e, ModelError::MissingTokenizer { .. }), "{e}");
    assert!(e.to_string().contains("tokenizer.json"), "{e}");

    // Unsupported architecture.
    let d = model_dir(root.path(), "gpt", &w, "");
    std::fs::write(d.join("config.json"), config_json("gpt2")).unwrap();
    let e = BertModel::load(&d).unwrap_err();
    assert!(
        matches!(e, ModelError::UnsupportedArchitecture { .. }),
        "{e}"
    );
    assert!(
        e.to_string().contains("config.json") && e.to_string().contains("gpt2"),
        "{e}"
    );

    // Invalid config JSON, missing config.
    std::fs::write(d.join("config.json"), "{not json").unwrap();
    let e = BertModel::load(&d).unwrap_err();
    assert!(e.to_string().contains("config.json"), "{e}");
    std::fs::remove_file(d.join("config.json")).unwrap();
    let e = BertModel::load(&d).unwrap_err();
    assert!(e.to_string().contains("config.json"), "{e}");

    // A missing tensor is named.
    let mut w2 = w.clone();
    w2.remove("encoder.layer.1.output.dense.bias");
    let d = model_dir(root.path(), "missing", &w2, "");
    let e = BertModel::load(&d).unwrap_err();
    assert!(
        e.to_string().contains("encoder.layer.1.output.dense.bias"),
        "{e}"
    );

    // Out-of-vocabulary ids and over-long inputs are errors, not panics.
    let m = BertModel::load(model_dir(root.path(), "ok", &w, "")).unwrap();
    let (ids, mask) = batch(&[vec![1, 99, 2]]);
    assert!(m.forward(&ids, &mask).is_err());
    let (ids, mask) = batch(&[vec![4; P + 1]]);
    assert!(m.forward(&ids, &mask).is_err());
}
