//! Fixtures shared by the workspace's integration tests (a `dev-dependency`, never published).
//!
//! * [`TinyLlama`]: a tiny random LLaMA with Hugging Face names and layout: its tensors from a
//!   caller-chosen uniform source ([`std_rng_uniform`], [`lcg_uniform`]), its `config.json`,
//!   and a directory writer ([`TinyLlama::write_hf_dir`]).
//! * [`write_byte_tokenizer`]: a byte-level BPE `tokenizer.json` without merges.
//! * [`prose`]: deterministic calibration text; [`write_f32_safetensors`] /
//!   [`read_f32_safetensors`].
//!
//! ```
//! use quantlab_testsupport::{std_rng_uniform, TinyLlama};
//! let spec = TinyLlama { kv_heads: 2, intermediate: 96, ..TinyLlama::default() };
//! let t = spec.tensors(std_rng_uniform(5));
//! assert_eq!(t[0].0, "model.embed_tokens.weight");
//! assert_eq!(t.len(), 1 + 2 * 9 + 2);
//! assert_eq!(spec.config()["num_key_value_heads"], 2);
//! ```

use std::collections::HashMap;
use std::path::Path;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use safetensors::tensor::{Dtype, TensorView};
use serde_json::{json, Value};

/// `(name, shape, row-major values)` of f32 tensors.
pub type NamedF32 = Vec<(String, Vec<usize>, Vec<f32>)>;

/// The shape of a tiny random LLaMA and how its weights are drawn: every tensor is
/// `offset + scale * u` with `u` uniform in `[-1, 1)`, in the order embedding, then per
/// block `input_layernorm`, `post_attention_layernorm`, `q/k/v/o_proj`, `gate/up/down_proj`,
/// then `model.norm` (scale 0.2, offset 1) and, untied, `lm_head` (scale 0.3). Norms have
/// offset 1, everything else offset 0; projections have scale 0.3 (q, k) or 0.2 (the rest).
#[derive(Clone, Debug, PartialEq)]
pub struct TinyLlama {
    /// `hidden_size` (default 64).
    pub hidden: usize,
    /// `num_attention_heads` (default 4).
    pub heads: usize,
    /// `num_key_value_heads` (default 4).
    pub kv_heads: usize,
    /// `intermediate_size` (default 96).
    pub intermediate: usize,
    /// `vocab_size` (default 300).
    pub vocab: usize,
    /// `num_hidden_layers` (default 2).
    pub layers: usize,
    /// Scale of the embedding (default 1.0).
    pub embed_scale: f32,
    /// Scale of the two norms of each block (default 0.3).
    pub block_norm_scale: f32,
    /// `tie_word_embeddings`: no `lm_head.weight` (default false).
    pub tied: bool,
    /// `max_position_embeddings` (default 512).
    pub max_position: usize,
    /// `bos_token_id` / `eos_token_id` in the config (default `Some((1, 2))`).
    pub bos_eos: Option<(u32, u32)>,
}

impl Default for TinyLlama {
    fn default() -> Self {
        Self {
            hidden: 64,
            heads: 4,
            kv_heads: 4,
            intermediate: 96,
            vocab: 300,
            layers: 2,
            embed_scale: 1.0,
            block_norm_scale: 0.3,
            tied: false,
            max_position: 512,
            bos_eos: Some((1, 2)),
        }
    }
}

impl TinyLlama {
    /// The tensors, drawn from `uniform` (values in `[-1, 1)`) in the documented order.
    pub fn tensors(&self, mut uniform: impl FnMut() -> f32) -> NamedF32 {
        let (d, hd) = (self.hidden, self.hidden / self.heads);
        let (heads, kv, inter) = (self.heads, self.kv_heads, self.intermediate);
        let mut t = Vec::new();
        let mut put = |name: String, shape: Vec<usize>, scale: f32, offset: f32| {
            let n = shape.iter().product();
            let v = (0..n).map(|_| offset + scale * uniform()).collect();
            t.push((name, shape, v));
        };
        put(
            "model.embed_tokens.weight".into(),
            vec![self.vocab, d],
            self.embed_scale,
            0.0,
        );
        let ns = self.block_norm_scale;
        for l in 0..self.layers {
            let p = format!("model.layers.{l}");
            let block = [
                ("input_layernorm", vec![d], ns, 1.0),
                ("post_attention_layernorm", vec![d], ns, 1.0),
                ("self_attn.q_proj", vec![heads * hd, d], 0.3, 0.0),
                ("self_attn.k_proj", vec![kv * hd, d], 0.3, 0.0),
                ("self_attn.v_proj", vec![kv * hd, d], 0.2, 0.0),
                ("self_attn.o_proj", vec![d, heads * hd], 0.2, 0.0),
                ("mlp.gate_proj", vec![inter, d], 0.2, 0.0),
                ("mlp.up_proj", vec![inter, d], 0.2, 0.0),
                ("mlp.down_proj", vec![d, inter], 0.2, 0.0),
            ];
            for (name, shape, scale, offset) in block {
                put(format!("{p}.{name}.weight"), shape, scale, offset);
            }
        }
        put("model.norm.weight".into(), vec![d], 0.2, 1.0);
        if !self.tied {
            put("lm_head.weight".into(), vec![self.vocab, d], 0.3, 0.0);
        }
        t
    }

    /// The `config.json` of a `LlamaForCausalLM` with these sizes (RoPE theta 10000, RMS
    /// norm epsilon 1e-5, SiLU).
    pub fn config(&self) -> Value {
        let mut c = json!({
            "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "hidden_size": self.hidden, "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers, "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads, "vocab_size": self.vocab,
            "rope_theta": 10000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": self.tied,
            "hidden_act": "silu", "max_position_embeddings": self.max_position,
        });
        if let Some((bos, eos)) = self.bos_eos {
            c["bos_token_id"] = json!(bos);
            c["eos_token_id"] = json!(eos);
        }
        c
    }

    /// Writes `config.json` and `model.safetensors` (f32 `tensors`) into `dir`, created if
    /// needed; no tokenizer (see [`write_byte_tokenizer`]).
    pub fn write_hf_dir(&self, dir: &Path, tensors: &[(String, Vec<usize>, Vec<f32>)]) {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join("config.json"), self.config().to_string()).unwrap();
        write_f32_safetensors(&dir.join("model.safetensors"), tensors);
    }
}

/// Uniform values in `[-1, 1)` from `StdRng::seed_from_u64(seed)`:
/// `rng.random::<f32>() * 2 - 1`.
pub fn std_rng_uniform(seed: u64) -> impl FnMut() -> f32 {
    let mut rng = StdRng::seed_from_u64(seed);
    move || rng.random::<f32>() * 2.0 - 1.0
}

/// Uniform values in `[-1, 1)` from a 64-bit linear congruential generator (Knuth's MMIX
/// constants, the top 31 bits of the state), starting from `seed`.
pub fn lcg_uniform(seed: u64) -> impl FnMut() -> f32 {
    let mut s = seed;
    move || {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((s >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
    }
}

/// Writes f32 tensors as a safetensors file (no metadata).
pub fn write_f32_safetensors(path: &Path, tensors: &[(String, Vec<usize>, Vec<f32>)]) {
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(n, s, v)| {
            let b = v.iter().flat_map(|x| x.to_le_bytes()).collect();
            (n.clone(), s.clone(), b)
        })
        .collect();
    let views: Vec<(String, TensorView)> = bytes
        .iter()
        .map(|(n, s, b)| {
            let v = TensorView::new(Dtype::F32, s.clone(), b).unwrap();
            (n.clone(), v)
        })
        .collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

/// Every float32 tensor of a safetensors file: name -> (shape, values).
pub fn read_f32_safetensors(path: &Path) -> HashMap<String, (Vec<usize>, Vec<f32>)> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(n, v)| {
            let d: Vec<f32> = v
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect();
            (n, (v.shape().to_vec(), d))
        })
        .collect()
}

/// A byte-level BPE without merges: one token per byte (ids < 256, GPT-2's byte alphabet in
/// sorted order), ByteLevel pre-tokenizer (no prefix space, regex) and decoder.
pub fn write_byte_tokenizer(path: &Path) {
    use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
    use tokenizers::models::bpe::BPE;
    use tokenizers::pre_tokenizers::byte_level::ByteLevel;
    let mut alphabet: Vec<char> = ByteLevel::alphabet().into_iter().collect();
    alphabet.sort();
    let vocab: tokenizers::models::bpe::Vocab = alphabet
        .iter()
        .enumerate()
        .map(|(i, c)| (c.to_string(), i as u32))
        .collect();
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, vec![])
        .build()
        .unwrap();
    let mut tk = tokenizers::Tokenizer::new(bpe);
    tk.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
    tk.with_decoder(Some(ByteLevelDecoder::default()));
    tk.save(path, false).unwrap();
}

/// Six deterministic paragraphs of 400 words from a small word list.
pub fn prose() -> Vec<String> {
    let words = [
        "the",
        "model",
        "quantizes",
        "every",
        "layer",
        "with",
        "a",
        "small",
        "grid",
        "and",
        "measures",
        "its",
        "error",
        "on",
        "calibration",
        "text",
        "while",
        "Emma",
        "walked",
        "to",
        "Highbury",
        "in",
        "rain",
        "of",
        "April",
        ",",
        ".",
    ];
    let mut rng = StdRng::seed_from_u64(42);
    (0..6)
        .map(|_| {
            (0..400)
                .map(|_| words[rng.random_range(0..words.len())])
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect()
}
