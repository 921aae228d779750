//! Shared helpers of the fuzz targets: splitting one fuzz input into several files, and a
//! reader that hands bytes out one at a time (to exercise short reads).

use std::io::Read;
use std::path::Path;

/// Separates the files packed into one fuzz input (see [`split`]).
pub const SEP: &[u8] = b"\n--8<--\n";

/// Splits `data` at [`SEP`] into at most `n` parts (the last part keeps any further
/// separators); missing parts are `None`.
pub fn split(data: &[u8], n: usize) -> Vec<Option<&[u8]>> {
    let mut out = Vec::with_capacity(n);
    let mut rest = data;
    while out.len() + 1 < n {
        match find(rest, SEP) {
            Some(i) => {
                out.push(Some(&rest[..i]));
                rest = &rest[i + SEP.len()..];
            }
            None => break,
        }
    }
    out.push(Some(rest));
    out.resize(n, None);
    out
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Writes `bytes` to `dir/name` when present.
pub fn put(dir: &Path, name: &str, bytes: Option<&[u8]>) {
    if let Some(b) = bytes {
        std::fs::write(dir.join(name), b).expect("write to the fuzz temp dir");
    }
}

/// A reader returning at most one byte per `read` call.
pub struct Trickle<'a>(pub &'a [u8]);

impl Read for Trickle<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if buf.is_empty() || self.0.is_empty() {
            return Ok(0);
        }
        buf[0] = self.0[0];
        self.0 = &self.0[1..];
        Ok(1)
    }
}

/// A scratch directory reused by every run of a target (created once per process).
pub fn scratch() -> &'static Path {
    static DIR: std::sync::OnceLock<tempfile::TempDir> = std::sync::OnceLock::new();
    DIR.get_or_init(|| tempfile::tempdir().expect("temp dir"))
        .path()
}

/// Empties the scratch directory.
pub fn clear(dir: &Path) {
    for e in std::fs::read_dir(dir).expect("read scratch dir") {
        let p = e.expect("entry").path();
        if p.is_dir() {
            std::fs::remove_dir_all(&p).expect("remove");
        } else {
            std::fs::remove_file(&p).expect("remove");
        }
    }
}

/// A fixed tiny LLaMA (1 block, width 8) for the targets that need a model beside the fuzzed
/// file.
pub mod tiny {
    use candle_core::{Device, Tensor};
    use quantlab_models::MemoryWeights;
    use std::path::Path;

    /// Model width.
    pub const D: usize = 8;
    /// Query heads.
    pub const HEADS: usize = 2;
    /// Key/value heads.
    pub const KV: usize = 1;
    /// MLP width.
    pub const INTER: usize = 16;
    /// Vocabulary.
    pub const VOCAB: usize = 16;
    /// Width of one head.
    pub const HD: usize = D / HEADS;

    /// `config.json` of the tiny model.
    pub fn config_json() -> String {
        format!(
            r#"{{"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": {D},
  "intermediate_size": {INTER}, "num_hidden_layers": 1, "num_attention_heads": {HEADS},
  "num_key_value_heads": {KV}, "vocab_size": {VOCAB}, "rope_theta": 10000.0,
  "rms_norm_eps": 1e-5, "tie_word_embeddings": true, "hidden_act": "silu",
  "max_position_embeddings": 64, "bos_token_id": 1, "eos_token_id": 2}}"#
        )
    }

    /// `(Hugging Face name, row-major shape, values)` of every tensor (tied embeddings).
    pub fn tensors() -> Vec<(String, Vec<usize>, Vec<f32>)> {
        let mut t = Vec::new();
        let mut put = |name: String, shape: Vec<usize>, base: f32| {
            let n: usize = shape.iter().product();
            let v = (0..n)
                .map(|i| base + 0.3 * ((i as f32 + 1.0) * 0.618 + t_len(&name)).sin())
                .collect();
            t.push((name, shape, v));
        };
        put("model.embed_tokens.weight".into(), vec![VOCAB, D], 0.0);
        let p = "model.layers.0";
        put(format!("{p}.input_layernorm.weight"), vec![D], 1.0);
        put(format!("{p}.post_attention_layernorm.weight"), vec![D], 1.0);
        put(
            format!("{p}.self_attn.q_proj.weight"),
            vec![HEADS * HD, D],
            0.0,
        );
        put(
            format!("{p}.self_attn.k_proj.weight"),
            vec![KV * HD, D],
            0.0,
        );
        put(
            format!("{p}.self_attn.v_proj.weight"),
            vec![KV * HD, D],
            0.0,
        );
        put(
            format!("{p}.self_attn.o_proj.weight"),
            vec![D, HEADS * HD],
            0.0,
        );
        put(format!("{p}.mlp.gate_proj.weight"), vec![INTER, D], 0.0);
        put(format!("{p}.mlp.up_proj.weight"), vec![INTER, D], 0.0);
        put(format!("{p}.mlp.down_proj.weight"), vec![D, INTER], 0.0);
        put("model.norm.weight".into(), vec![D], 1.0);
        t
    }

    fn t_len(name: &str) -> f32 {
        name.len() as f32
    }

    /// The tensors as in-memory weights (built once).
    pub fn weights() -> &'static MemoryWeights {
        static W: std::sync::OnceLock<MemoryWeights> = std::sync::OnceLock::new();
        W.get_or_init(|| {
            let mut w = MemoryWeights::new("tiny");
            for (n, s, v) in tensors() {
                w.insert(&n, Tensor::from_vec(v, s, &Device::Cpu).expect("tensor"));
            }
            w
        })
    }

    /// `model.safetensors` bytes of the tiny model (f32).
    pub fn safetensors_bytes() -> Vec<u8> {
        use safetensors::tensor::{Dtype, TensorView};
        let raw: Vec<(String, Vec<usize>, Vec<u8>)> = tensors()
            .into_iter()
            .map(|(n, s, v)| (n, s, v.iter().flat_map(|x| x.to_le_bytes()).collect()))
            .collect();
        let views: Vec<(String, TensorView)> = raw
            .iter()
            .map(|(n, s, b)| {
                (
                    n.clone(),
                    TensorView::new(Dtype::F32, s.clone(), b).expect("view"),
                )
            })
            .collect();
        safetensors::serialize(views, None).expect("serialize")
    }

    /// Writes `config.json` and `model.safetensors` into `dir`.
    pub fn write_hf_dir(dir: &Path) {
        std::fs::write(dir.join("config.json"), config_json()).expect("write config");
        std::fs::write(dir.join("model.safetensors"), safetensors_bytes()).expect("write st");
    }
}
