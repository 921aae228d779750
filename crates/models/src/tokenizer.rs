//! Tokenizers of the decoders: read from `tokenizer.json` or built from GGUF metadata, plus
//! the chat template.
//!
//! From GGUF (`tokenizer.ggml.model = gpt2`) we build a byte-level BPE: the vocabulary from
//! `tokenizer.ggml.tokens`, the merges from `tokenizer.ggml.merges` (ranked by position),
//! control tokens (type 3) as special added tokens and user-defined tokens (type 4) as plain
//! added tokens. The pre-tokenizer follows `tokenizer.ggml.pre`; for `smollm` (and
//! `starcoder`, `refact`, `command-r`, `codeshell`, `exaone`) llama.cpp first isolates every
//! single digit (`\p{N}`), then applies the GPT-2 split
//! `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)`, which is the
//! split of the tokenizers crate's ByteLevel pre-tokenizer.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::Value;
use serde::Serialize;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

use crate::weights::GgufWeights;
use crate::{ModelError, Result};

/// The GPT-2 / Llama 3 / Qwen2 split regexes as llama.cpp uses them, by `tokenizer.ggml.pre`.
/// `None` means "isolate digits, then the ByteLevel GPT-2 split".
fn pre_tokenizer_for(pre: &str) -> Option<Vec<PreTokenizerWrapper>> {
    let isolate = |re: &str| -> PreTokenizerWrapper {
        Split::new(
            SplitPattern::Regex(re.into()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .expect("static regex compiles")
        .into()
    };
    let bl_regex = || -> PreTokenizerWrapper { ByteLevel::new(false, true, true).into() };
    let bl_plain = || -> PreTokenizerWrapper { ByteLevel::new(false, true, false).into() };
    const LLAMA3: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    const QWEN2: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    Some(match pre {
        "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" => {
            vec![isolate(r"\p{N}"), bl_regex()]
        }
        "gpt2" | "default" | "mpt" | "olmo" | "jais" => vec![bl_regex()],
        "llama3" | "llama-bpe" | "llama-v3" | "dbrx" | "smaug-bpe" => {
            vec![isolate(LLAMA3), bl_plain()]
        }
        "qwen2" | "stablelm2" => vec![isolate(QWEN2), bl_plain()],
        _ => return None,
    })
}

/// One message of a chat, as chat templates expect it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ChatMessage {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The text.
    pub content: String,
}

impl ChatMessage {
    /// A message with this role and content.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// A decoder's tokenizer with its special tokens and chat template.
#[derive(Debug, Clone)]
pub struct LlamaTokenizer {
    /// Encodes special tokens written in the text as plain text.
    plain: Tokenizer,
    /// Recognises special tokens written in the text.
    special: Tokenizer,
    bos: Option<u32>,
    eos: Vec<u32>,
    add_bos: bool,
    chat_template: Option<String>,
    source: PathBuf,
}

fn tok_err(path: &Path, detail: impl std::fmt::Display) -> ModelError {
    ModelError::Tokenizer {
        path: path.display().to_string(),
        detail: detail.to_string(),
    }
}

fn meta_strings(meta: &HashMap<String, Value>, key: &str, path: &Path) -> Result<Vec<String>> {
    match meta.get(key) {
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| match v {
                Value::String(s) => Ok(s.clone()),
                other => Err(tok_err(
                    path,
                    format!("`{key}` holds a non-string {other:?}"),
                )),
            })
            .collect(),
        Some(other) => Err(tok_err(path, format!("`{key}` is not an array: {other:?}"))),
        None => Err(ModelError::MissingTokenizer {
            path: path.display().to_string(),
            detail: format!("GGUF metadata lacks `{key}`"),
        }),
    }
}

impl LlamaTokenizer {
    /// Loads the tokenizer of a model path: a `.gguf` file (from its metadata), a Hugging Face
    /// directory (`tokenizer.json` + `tokenizer_config.json`), or a `.safetensors` file whose
    /// directory holds them.
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        if path.is_dir() {
            return Self::from_hf_dir(path);
        }
        if path.extension().and_then(|e| e.to_str()) == Some("safetensors") {
            return Self::from_hf_dir(path.parent().unwrap_or(Path::new(".")));
        }
        let w = GgufWeights::open(path)?;
        Self::from_gguf_metadata(w.metadata(), path)
    }

    /// Builds the tokenizer from GGUF metadata (`tokenizer.ggml.*`, `tokenizer.chat_template`).
    pub fn from_gguf_metadata(meta: &HashMap<String, Value>, path: &Path) -> Result<Self> {
        let model = match meta.get("tokenizer.ggml.model") {
            Some(Value::String(s)) => s.clone(),
            _ => {
                return Err(ModelError::MissingTokenizer {
                    path: path.display().to_string(),
                    detail: "GGUF metadata lacks `tokenizer.ggml.model`".into(),
                })
            }
        };
        if model != "gpt2" {
            return Err(tok_err(
                path,
                format!("tokenizer.ggml.model `{model}` is not supported from GGUF metadata (only gpt2 byte-level BPE); use a Hugging Face directory with tokenizer.json"),
            ));
        }
        let pre = match meta.get("tokenizer.ggml.pre") {
            Some(Value::String(s)) => s.clone(),
            _ => "default".to_string(),
        };
        let pretok = pre_tokenizer_for(&pre).ok_or_else(|| {
            tok_err(path, format!("tokenizer.ggml.pre `{pre}` is not supported (smollm, gpt2, llama-bpe, qwen2, ...)"))
        })?;
        let tokens = meta_strings(meta, "tokenizer.ggml.tokens", path)?;
        let merges_raw = meta_strings(meta, "tokenizer.ggml.merges", path)?;
        let types: Vec<i64> = match meta.get("tokenizer.ggml.token_type") {
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| match v {
                    Value::I32(x) => *x as i64,
                    Value::U32(x) => *x as i64,
                    Value::I8(x) => *x as i64,
                    Value::U8(x) => *x as i64,
                    _ => 1,
                })
                .collect(),
            _ => vec![1; tokens.len()],
        };
        let mut vocab = tokenizers::models::bpe::Vocab::default();
        for (i, t) in tokens.iter().enumerate() {
            vocab.insert(t.clone(), i as u32);
        }
        let mut merges = Vec::with_capacity(merges_raw.len());
        for m in &merges_raw {
            let (a, b) = m
                .split_once(' ')
                .ok_or_else(|| tok_err(path, format!("merge `{m}` is not two tokens")))?;
            merges.push((a.to_string(), b.to_string()));
        }
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(|e| tok_err(path, format!("BPE: {e}")))?;
        let mut tk = Tokenizer::new(bpe);
        tk.with_pre_tokenizer(Some(Sequence::new(pretok)));
        tk.with_decoder(Some(ByteLevelDecoder::default()));
        let mut specials = Vec::new();
        let mut user = Vec::new();
        for (i, t) in tokens.iter().enumerate() {
            match types.get(i) {
                Some(3) => specials.push(AddedToken::from(t.clone(), true).normalized(false)),
                Some(4) => user.push(AddedToken::from(t.clone(), false).normalized(false)),
                _ => {}
            }
        }
        tk.add_special_tokens(&specials);
        tk.add_tokens(&user);
        let id = |k: &str| {
            meta.get(k)
                .and_then(crate::config::gguf_uint)
                .map(|u| u as u32)
        };
        let add_bos = matches!(
            meta.get("tokenizer.ggml.add_bos_token"),
            Some(Value::Bool(true))
        );
        let chat_template = match meta.get("tokenizer.chat_template") {
            Some(Value::String(s)) => Some(s.clone()),
            _ => None,
        };
        Ok(Self::assemble(
            tk,
            id("tokenizer.ggml.bos_token_id"),
            id("tokenizer.ggml.eos_token_id").into_iter().collect(),
            add_bos,
            chat_template,
            path,
        ))
    }

    fn assemble(
        tk: Tokenizer,
        bos: Option<u32>,
        eos: Vec<u32>,
        add_bos: bool,
        chat_template: Option<String>,
        path: &Path,
    ) -> Self {
        let mut plain = tk.clone();
        plain.set_encode_special_tokens(true);
        Self {
            plain,
            special: tk,
            bos,
            eos,
            add_bos,
            chat_template,
            source: path.to_path_buf(),
        }
    }

    /// Reads `tokenizer.json` (required), `tokenizer_config.json` (chat template, bos/eos,
    /// `add_bos_token`) and `config.json` / `generation_config.json` (eos ids) from a
    /// Hugging Face directory.
    pub fn from_hf_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let tj = dir.join("tokenizer.json");
        if !tj.exists() {
            return Err(ModelError::MissingTokenizer {
                path: dir.display().to_string(),
                detail: "no tokenizer.json in the directory".into(),
            });
        }
        let tk = Tokenizer::from_file(&tj).map_err(|e| tok_err(&tj, e))?;
        let read_json = |name: &str| -> Result<Option<serde_json::Value>> {
            let p = dir.join(name);
            if !p.exists() {
                return Ok(None);
            }
            let text = std::fs::read_to_string(&p).map_err(|source| ModelError::Io {
                path: p.display().to_string(),
                source,
            })?;
            serde_json::from_str(&text)
                .map(Some)
                .map_err(|e| tok_err(&p, format!("not JSON: {e}")))
        };
        let tc = read_json("tokenizer_config.json")?;
        let token_of = |v: Option<&serde_json::Value>| -> Option<u32> {
            let s = match v? {
                serde_json::Value::String(s) => s.clone(),
                serde_json::Value::Object(o) => o.get("content")?.as_str()?.to_string(),
                _ => return None,
            };
            tk.token_to_id(&s)
        };
        let mut bos = None;
        let mut eos = Vec::new();
        let mut add_bos = false;
        let mut chat_template = None;
        if let Some(tc) = &tc {
            bos = token_of(tc.get("bos_token"));
            eos.extend(token_of(tc.get("eos_token")));
            add_bos = tc
                .get("add_bos_token")
                .and_then(|b| b.as_bool())
                .unwrap_or(false);
            chat_template = match tc.get("chat_template") {
                Some(serde_json::Value::String(s)) => Some(s.clone()),
                Some(serde_json::Value::Array(a)) => a
                    .iter()
                    .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                    .or_else(|| a.first())
                    .and_then(|t| t.get("template"))
                    .and_then(|t| t.as_str())
                    .map(str::to_string),
                _ => None,
            };
        }
        if chat_template.is_none() {
            let p = dir.join("chat_template.jinja");
            if p.exists() {
                chat_template = std::fs::read_to_string(&p).ok();
            }
        }
        for name in ["generation_config.json", "config.json"] {
            if let Some(v) = read_json(name)? {
                match v.get("eos_token_id") {
                    Some(serde_json::Value::Number(n)) => eos.extend(n.as_u64().map(|u| u as u32)),
                    Some(serde_json::Value::Array(a)) => {
                        eos.extend(a.iter().filter_map(|x| x.as_u64().map(|u| u as u32)))
                    }
                    _ => {}
                }
                if bos.is_none() {
                    bos = v
                        .get("bos_token_id")
                        .and_then(|x| x.as_u64())
                        .map(|u| u as u32);
                }
            }
        }
        eos.sort_unstable();
        eos.dedup();
        Ok(Self::assemble(tk, bos, eos, add_bos, chat_template, dir))
    }

    /// Token ids of `text`, with special-token strings (`<|im_start|>`) encoded as plain text
    /// and no BOS: what llama.cpp's `tokenize(text, add_bos=False, special=False)` gives.
    ///
    /// ```no_run
    /// # fn main() -> quantlab_models::Result<()> {
    /// let tok = quantlab_models::LlamaTokenizer::load("SmolLM2-135M-Instruct.Q4_1.gguf")?;
    /// let ids = tok.encode("Hello world")?;
    /// assert_eq!(tok.decode(&ids)?, "Hello world");
    /// # Ok(()) }
    /// ```
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let e = self
            .plain
            .encode(text, false)
            .map_err(|e| tok_err(&self.source, e))?;
        Ok(e.get_ids().to_vec())
    }

    /// Token ids of `text`, recognising special tokens written in it (for chat prompts):
    /// llama.cpp's `tokenize(text, add_bos=False, special=True)`.
    pub fn encode_special(&self, text: &str) -> Result<Vec<u32>> {
        let e = self
            .special
            .encode(text, false)
            .map_err(|e| tok_err(&self.source, e))?;
        Ok(e.get_ids().to_vec())
    }

    /// Text of token ids (special tokens included).
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.special
            .decode(ids, false)
            .map_err(|e| tok_err(&self.source, e))
    }

    /// The beginning-of-sequence token, if the model has one.
    pub fn bos_token_id(&self) -> Option<u32> {
        self.bos
    }

    /// Whether the model wants BOS prepended to a prompt.
    pub fn add_bos(&self) -> bool {
        self.add_bos
    }

    /// The end-of-sequence tokens.
    pub fn eos_token_ids(&self) -> &[u32] {
        &self.eos
    }

    /// The Jinja chat template, if the model ships one.
    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    /// The underlying `tokenizers::Tokenizer` (recognising special tokens).
    pub fn inner(&self) -> &Tokenizer {
        &self.special
    }

    /// Number of tokens including added ones.
    pub fn vocab_size(&self) -> usize {
        self.special.get_vocab_size(true)
    }

    /// Renders `messages` with the model's chat template (Jinja, rendered with minijinja
    /// using Hugging Face's settings `trim_blocks` and `lstrip_blocks`), optionally opening an
    /// assistant turn.
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String> {
        let tpl = self
            .chat_template
            .as_deref()
            .ok_or_else(|| ModelError::ChatTemplate {
                path: self.source.display().to_string(),
                detail: "the model has no chat template".into(),
            })?;
        let bos = self
            .bos
            .and_then(|b| self.special.id_to_token(b))
            .unwrap_or_default();
        let eos = self
            .eos
            .first()
            .and_then(|&e| self.special.id_to_token(e))
            .unwrap_or_default();
        render_chat_template(tpl, messages, add_generation_prompt, &bos, &eos).map_err(|detail| {
            ModelError::ChatTemplate {
                path: self.source.display().to_string(),
                detail,
            }
        })
    }
}

/// Renders a Hugging Face chat template with minijinja.
///
/// ```
/// use quantlab_models::{render_chat_template, ChatMessage};
/// let tpl = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}";
/// let s = render_chat_template(tpl, &[ChatMessage::new("user", "hi")], true, "", "").unwrap();
/// assert_eq!(s, "<|user|>hi\n<|assistant|>");
/// ```
pub fn render_chat_template(
    template: &str,
    messages: &[ChatMessage],
    add_generation_prompt: bool,
    bos_token: &str,
    eos_token: &str,
) -> std::result::Result<String, String> {
    let mut env = minijinja::Environment::new();
    env.set_syntax(
        minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(|e| e.to_string())?,
    );
    env.add_function(
        "raise_exception",
        |msg: String| -> std::result::Result<String, minijinja::Error> {
            Err(minijinja::Error::new(
                minijinja::ErrorKind::InvalidOperation,
                msg,
            ))
        },
    );
    env.render_str(
        template,
        minijinja::context! {
            messages => minijinja::value::Serde(messages),
            add_generation_prompt => add_generation_prompt,
            bos_token => bos_token,
            eos_token => eos_token,
        },
    )
    .map_err(|e| format!("{e:#}"))
}
