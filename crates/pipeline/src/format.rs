//! The checkpoint layouts `quantlab quantize --format` names ([`ExportFormat`]) and the
//! ggml type rules they follow (K-type fallbacks, llama.cpp's embedding types): what a format
//! is, apart from the writers ([`crate::export`]) and the plan checks ([`crate::config`]).

use quantlab_checkpoints::gguf::GgmlType;
pub use quantlab_checkpoints::pack::gguf_blocks::{grid_of, is_k_type};
use quantlab_grids::FormatSpec;

use crate::method::{Method, MethodKind};
use crate::{PipelineError, Result};

/// The checkpoint layout `quantlab quantize` writes (`--format`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum ExportFormat {
    /// The project's own directory (dequantized safetensors + codes).
    #[default]
    Quantlab,
    /// GPTQ, `checkpoint_format: "gptq"` (v1).
    Gptq,
    /// GPTQ, `checkpoint_format: "gptq_v2"` (raw zeros).
    GptqV2,
    /// AutoAWQ GEMM.
    Awq,
    /// bitsandbytes NF4.
    BnbNf4,
    /// bitsandbytes FP4.
    BnbFp4,
    /// bitsandbytes LLM.int8.
    BnbInt8,
    /// One GGUF file of this file type (the block linears' types by llama.cpp's rule for it).
    Gguf(GgufFile),
}

/// Which of llama.cpp's per-tensor type rules a GGUF file type follows (`llama-quantize`'s
/// file types, [`GgufFile::tensor_type`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GgufMix {
    /// Every block linear of the file's type (rows that are not whole blocks of it fall
    /// back, [`type_for_row`]): `q4_0` .. `q8_0`, and our `q3_k`, `q4_k`, `q5_k` (which
    /// `llama-quantize` takes as aliases of its `_M` mixes; here they are pure).
    Pure,
    /// llama.cpp's rule for the type's own file type: `q2_k` (attn_v, attn_output and
    /// ffn_down one step up), `q6_k`, `iq4_nl`, `iq4_xs`.
    Default,
    /// `_S`.
    Small,
    /// `_M`.
    Medium,
    /// `_L`.
    Large,
}

/// A GGUF file type `--format gguf:<type>` names: the type of most block linears, and the
/// per-tensor rule llama.cpp's quantizer applies for that file type (`q4_k_m`: attn_v and
/// ffn_down of some layers Q6_K, ...). `pure` (`--pure`, as llama-quantize's) gives every
/// block linear the base type.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct GgufFile {
    /// The type of the block linears the rule does not raise.
    pub ty: GgmlType,
    /// llama.cpp's per-tensor rule.
    pub mix: GgufMix,
    /// `--pure`: the rule is not applied.
    pub pure: bool,
}

/// Where a block linear sits, for llama.cpp's per-tensor rules ([`GgufFile::tensor_type`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TensorSite {
    /// The linear's role, from its name ([`LinearRole::of`]).
    pub role: LinearRole,
    /// Its block.
    pub layer: usize,
    /// Blocks in the model.
    pub n_layer: usize,
    /// Query heads per key/value head (1 without grouped-query attention).
    pub n_gqa: usize,
    /// Whether the block scales are fitted with importance weights (an imatrix, or the
    /// calibration Hessian for GPTQ): llama.cpp relaxes two rules then.
    pub has_imatrix: bool,
}

/// A block linear's role in llama.cpp's tensor categories.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinearRole {
    /// `attn_q`.
    AttnQ,
    /// `attn_k`.
    AttnK,
    /// `attn_v`.
    AttnV,
    /// `attn_output`.
    AttnOutput,
    /// `ffn_gate`.
    FfnGate,
    /// `ffn_up`.
    FfnUp,
    /// `ffn_down`.
    FfnDown,
    /// Anything else.
    Other,
}

impl LinearRole {
    /// The role of a Hugging Face LLaMA-family linear (`model.layers.3.self_attn.v_proj` ->
    /// `AttnV`).
    pub fn of(name: &str) -> Self {
        let last = name.rsplit('.').next().unwrap_or("");
        match last {
            "q_proj" => Self::AttnQ,
            "k_proj" => Self::AttnK,
            "v_proj" => Self::AttnV,
            "o_proj" => Self::AttnOutput,
            "gate_proj" => Self::FfnGate,
            "up_proj" => Self::FfnUp,
            "down_proj" => Self::FfnDown,
            _ => Self::Other,
        }
    }
}

/// llama.cpp's "more bits" layers of its `_M` mixes: the first and last eighth and every
/// third layer between.
pub fn use_more_bits(i: usize, n: usize) -> bool {
    let (i, n) = (i as i64, n as i64);
    i < n / 8 || i >= 7 * n / 8 || (i - n / 8).rem_euclid(3) == 2
}

/// The GGUF file types `--format gguf:<type>` accepts (case-insensitive): the block types
/// with a grid, llama-quantize's K-quant mixes, `iq4_nl`, `iq4_xs`, and the two floats.
pub const GGUF_FILES: [(&str, GgmlType, GgufMix); 21] = [
    ("q4_0", GgmlType::Q4_0, GgufMix::Pure),
    ("q4_1", GgmlType::Q4_1, GgufMix::Pure),
    ("q5_0", GgmlType::Q5_0, GgufMix::Pure),
    ("q5_1", GgmlType::Q5_1, GgufMix::Pure),
    ("q8_0", GgmlType::Q8_0, GgufMix::Pure),
    ("q2_k", GgmlType::Q2_K, GgufMix::Default),
    ("q3_k", GgmlType::Q3_K, GgufMix::Pure),
    ("q3_k_s", GgmlType::Q3_K, GgufMix::Small),
    ("q3_k_m", GgmlType::Q3_K, GgufMix::Medium),
    ("q3_k_l", GgmlType::Q3_K, GgufMix::Large),
    ("q4_k", GgmlType::Q4_K, GgufMix::Pure),
    ("q4_k_s", GgmlType::Q4_K, GgufMix::Small),
    ("q4_k_m", GgmlType::Q4_K, GgufMix::Medium),
    ("q5_k", GgmlType::Q5_K, GgufMix::Pure),
    ("q5_k_s", GgmlType::Q5_K, GgufMix::Small),
    ("q5_k_m", GgmlType::Q5_K, GgufMix::Medium),
    ("q6_k", GgmlType::Q6_K, GgufMix::Default),
    ("iq4_nl", GgmlType::IQ4_NL, GgufMix::Default),
    ("iq4_xs", GgmlType::IQ4_XS, GgufMix::Default),
    ("f32", GgmlType::F32, GgufMix::Pure),
    ("f16", GgmlType::F16, GgufMix::Pure),
];

impl GgufFile {
    /// The file type named `name` (`q4_k_m`, case-insensitive), not pure.
    pub fn named(name: &str) -> Option<Self> {
        GGUF_FILES
            .iter()
            .find(|(n, _, _)| n.eq_ignore_ascii_case(name))
            .map(|&(_, ty, mix)| Self {
                ty,
                mix,
                pure: false,
            })
    }

    /// A pure file of `ty` (every block linear of that type).
    pub fn pure_of(ty: GgmlType) -> Self {
        Self {
            ty,
            mix: GgufMix::Pure,
            pure: true,
        }
    }

    /// The name, lower case (`q4_k_m`); the same with `pure` set.
    pub fn name(&self) -> String {
        let base = self.ty.name().to_ascii_lowercase();
        match self.mix {
            GgufMix::Pure | GgufMix::Default => base,
            GgufMix::Small => format!("{base}_s"),
            GgufMix::Medium => format!("{base}_m"),
            GgufMix::Large => format!("{base}_l"),
        }
    }

    /// llama.cpp's `general.file_type` (`enum llama_ftype`): Q4_0 2, ..., Q2_K 10, Q3_K_S 11,
    /// Q3_K_M 12, Q3_K_L 13, Q4_K_S 14, Q4_K_M 15, Q5_K_S 16, Q5_K_M 17, Q6_K 18, IQ4_NL 25,
    /// IQ4_XS 30 (our pure q3_k / q4_k / q5_k: the `_S` numbers).
    pub fn file_type(&self) -> Option<u32> {
        let base = quantlab_checkpoints::export::gguf::file_type_of(self.ty)?;
        let step = match (self.ty, self.mix) {
            (GgmlType::Q3_K, GgufMix::Medium) => 1,
            (GgmlType::Q3_K, GgufMix::Large) => 2,
            (GgmlType::Q4_K | GgmlType::Q5_K, GgufMix::Medium) => 1,
            _ => 0,
        };
        Some(base + step)
    }

    /// The type llama.cpp's quantizer (llama-cpp-python 0.3.36, `llama_tensor_get_type_impl`,
    /// dense models) gives the block linear at `site` in a file of this type, before the row
    /// fallback ([`type_for_row`]):
    ///
    /// | file type | attn_v | ffn_down | attn_output |
    /// |-----------|--------|----------|-------------|
    /// | q2_k | Q4_K if n_gqa >= 4, else Q3_K | Q3_K | Q3_K |
    /// | q3_k_m | Q5_K in layers 0-1, else Q4_K | Q5_K in the first 1/16, else Q4_K | Q4_K |
    /// | q3_k_l | Q5_K | Q5_K | Q5_K |
    /// | q4_k_s | Q5_K in layers 0-3 | Q5_K in the first 1/8 | - |
    /// | q4_k_m, q5_k_m | Q6_K where [`use_more_bits`] | Q6_K where [`use_more_bits`] | - |
    /// | iq4_nl, iq4_xs | Q5_K if n_gqa >= 4 | Q5_K in the first 1/8 without an imatrix | - |
    ///
    /// Every other linear, and every linear of a pure file, keeps [`GgufFile::ty`].
    ///
    /// ```
    /// use quantlab_pipeline::export::{GgufFile, LinearRole, TensorSite};
    /// use quantlab_checkpoints::gguf::GgmlType;
    /// let f = GgufFile::named("Q4_K_M").unwrap();
    /// let site = |role, layer| TensorSite { role, layer, n_layer: 30, n_gqa: 3, has_imatrix: true };
    /// assert_eq!(f.tensor_type(&site(LinearRole::FfnDown, 0)), GgmlType::Q6_K);
    /// assert_eq!(f.tensor_type(&site(LinearRole::FfnDown, 4)), GgmlType::Q4_K);
    /// assert_eq!(f.tensor_type(&site(LinearRole::FfnDown, 5)), GgmlType::Q6_K);
    /// assert_eq!(f.tensor_type(&site(LinearRole::AttnQ, 0)), GgmlType::Q4_K);
    /// ```
    pub fn tensor_type(&self, s: &TensorSite) -> GgmlType {
        use GgmlType as T;
        use GgufMix as M;
        use LinearRole as R;
        let base = self.ty;
        if self.pure || !base.is_quantized() {
            return base;
        }
        let (i, n) = (s.layer, s.n_layer);
        let more = use_more_bits(i, n);
        match (s.role, base, self.mix) {
            (R::AttnV, T::Q2_K, M::Default) => {
                if s.n_gqa >= 4 {
                    T::Q4_K
                } else {
                    T::Q3_K
                }
            }
            (R::AttnV, T::Q3_K, M::Medium) => {
                if i < 2 {
                    T::Q5_K
                } else {
                    T::Q4_K
                }
            }
            (R::AttnV, T::Q3_K, M::Large) => T::Q5_K,
            (R::AttnV, T::IQ4_NL | T::IQ4_XS, M::Default) if s.n_gqa >= 4 => T::Q5_K,
            (R::AttnV, T::Q4_K | T::Q5_K, M::Medium) if more => T::Q6_K,
            (R::AttnV, T::Q4_K, M::Small) if i < 4 => T::Q5_K,
            (R::FfnDown, T::Q2_K, M::Default) => T::Q3_K,
            (R::FfnDown, T::Q3_K, M::Medium) => {
                if i < n / 16 {
                    T::Q5_K
                } else {
                    T::Q4_K
                }
            }
            (R::FfnDown, T::Q3_K, M::Large) => T::Q5_K,
            (R::FfnDown, T::Q4_K | T::Q5_K, M::Medium) if more => T::Q6_K,
            (R::FfnDown, T::IQ4_NL | T::IQ4_XS, M::Default) if i < n / 8 && !s.has_imatrix => {
                T::Q5_K
            }
            (R::FfnDown, T::Q4_K, M::Small) if i < n / 8 => T::Q5_K,
            (R::AttnOutput, T::Q2_K, M::Default) => T::Q3_K,
            (R::AttnOutput, T::Q3_K, M::Medium) => T::Q4_K,
            (R::AttnOutput, T::Q3_K, M::Large) => T::Q5_K,
            _ => base,
        }
    }
}

impl serde::Serialize for ExportFormat {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&self.name())
    }
}

impl std::fmt::Display for ExportFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name())
    }
}

/// The type written instead of a K type for rows that are not a multiple of 256: Q4_K ->
/// Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0 as llama.cpp's `tensor_type_fallback`; Q2_K and Q3_K ->
/// IQ4_NL (4.5 bits per weight, 16 non-uniform levels), where the llama.cpp vendored in
/// llama-cpp-python 0.3.36 writes Q4_0 (the same 4.5 bits per weight; older llama.cpp wrote
/// IQ4_NL); IQ4_XS -> IQ4_NL as llama.cpp. Other types are returned unchanged.
pub fn k_fallback(ty: GgmlType) -> GgmlType {
    match ty {
        GgmlType::Q2_K | GgmlType::Q3_K | GgmlType::IQ4_XS => GgmlType::IQ4_NL,
        GgmlType::Q4_K => GgmlType::Q5_0,
        GgmlType::Q5_K => GgmlType::Q5_1,
        GgmlType::Q6_K => GgmlType::Q8_0,
        t => t,
    }
}

/// `ty` for a row of `nx` values, or its fallback when the row is not whole blocks of it.
pub fn type_for_row(ty: GgmlType, nx: usize) -> GgmlType {
    if nx % ty.block_size() as usize == 0 {
        ty
    } else {
        k_fallback(ty)
    }
}

/// The type llama.cpp's quantizer gives the embedding / output matrix of a file of type
/// `base` with rows of `nx` values: `output.weight` (or `token_embd.weight` when the
/// embeddings are tied and there is no output matrix) becomes Q6_K (Q8_0 when the file type
/// is Q8_0 or the row is not whole blocks of `base`), then falls back like any tensor
/// (Q6_K -> Q8_0 for rows not a multiple of 256); an untied `token_embd.weight` keeps `base`
/// (with the fallback). Float file types keep their type.
pub fn llama_cpp_embedding_type(base: GgmlType, nx: usize, output_role: bool) -> GgmlType {
    if !base.is_quantized() {
        return base;
    }
    let t = if !output_role {
        base
    } else if nx % base.block_size() as usize != 0 || base == GgmlType::Q8_0 {
        GgmlType::Q8_0
    } else {
        GgmlType::Q6_K
    };
    type_for_row(t, nx)
}

impl ExportFormat {
    /// Parses `quantlab`, `gptq`, `gptq_v2`, `awq`, `bnb-nf4`, `bnb-fp4`, `bnb-int8` or
    /// `gguf:<type>` with a type of [`GGUF_FILES`] (case-insensitive: `gguf:Q4_K_M`).
    ///
    /// ```
    /// use quantlab_pipeline::export::ExportFormat;
    /// use quantlab_checkpoints::gguf::GgmlType;
    /// assert_eq!(ExportFormat::parse("gguf:q4_k").unwrap().gguf_type(), Some(GgmlType::Q4_K));
    /// assert_eq!(ExportFormat::parse("GGUF:Q4_K_M").unwrap().name(), "gguf:q4_k_m");
    /// assert_eq!(ExportFormat::parse("gptq_v2").unwrap().name(), "gptq_v2");
    /// assert!(ExportFormat::parse("gguf:q9_9").unwrap_err().to_string().contains("q4_0"));
    /// ```
    pub fn parse(s: &str) -> Result<Self> {
        let l = s.trim().to_ascii_lowercase();
        let simple = match l.as_str() {
            "quantlab" => Some(Self::Quantlab),
            "gptq" => Some(Self::Gptq),
            "gptq_v2" | "gptq-v2" => Some(Self::GptqV2),
            "awq" => Some(Self::Awq),
            "bnb-nf4" | "bnb_nf4" => Some(Self::BnbNf4),
            "bnb-fp4" | "bnb_fp4" => Some(Self::BnbFp4),
            "bnb-int8" | "bnb_int8" => Some(Self::BnbInt8),
            _ => None,
        };
        if let Some(f) = simple {
            return Ok(f);
        }
        let types = GGUF_FILES
            .iter()
            .map(|(n, _, _)| *n)
            .collect::<Vec<_>>()
            .join(", ");
        if let Some(t) = l.strip_prefix("gguf:").or(l.strip_prefix("gguf-")) {
            return GgufFile::named(t).map(Self::Gguf).ok_or_else(|| {
                PipelineError::option(
                    "--format",
                    format!("unknown GGUF type `{t}`; use gguf:<type> with one of {types}"),
                )
            });
        }
        Err(PipelineError::option(
            "--format",
            format!("unknown format `{s}`; use quantlab, gptq, gptq_v2, awq, bnb-nf4, bnb-fp4, bnb-int8 or gguf:<type> ({types})"),
        ))
    }

    /// The name on the command line.
    pub fn name(&self) -> String {
        match self {
            Self::Quantlab => "quantlab".into(),
            Self::Gptq => "gptq".into(),
            Self::GptqV2 => "gptq_v2".into(),
            Self::Awq => "awq".into(),
            Self::BnbNf4 => "bnb-nf4".into(),
            Self::BnbFp4 => "bnb-fp4".into(),
            Self::BnbInt8 => "bnb-int8".into(),
            Self::Gguf(f) => format!("gguf:{}", f.name()),
        }
    }

    /// Whether the output is one file (GGUF) rather than a directory.
    pub fn writes_file(&self) -> bool {
        matches!(self, Self::Gguf(_))
    }

    /// The GGUF file's base type, for `gguf:<type>` (`gguf:q4_k_m`: Q4_K).
    pub fn gguf_type(&self) -> Option<GgmlType> {
        self.gguf_file().map(|f| f.ty)
    }

    /// The GGUF file type, for `gguf:<type>`.
    pub fn gguf_file(&self) -> Option<GgufFile> {
        match self {
            Self::Gguf(f) => Some(*f),
            _ => None,
        }
    }

    /// `--pure`: a GGUF format whose block linears all get the base type (llama-quantize's
    /// `--pure`); other formats are refused.
    pub fn pure(self) -> Result<Self> {
        match self {
            Self::Gguf(f) => Ok(Self::Gguf(GgufFile { pure: true, ..f })),
            f => Err(PipelineError::option(
                "--pure",
                format!("chooses GGUF tensor types; --format {f} has none"),
            )),
        }
    }

    /// The group size this format implies when `--group-size` is not given: 32 for GGUF
    /// (ggml blocks), 64 for GPTQ onto a bitsandbytes codebook (its blocksize).
    pub fn default_group_size(&self, m: Method) -> Option<i64> {
        match self {
            Self::Gguf(_) => Some(32),
            Self::BnbNf4 | Self::BnbFp4 if m.kind() == MethodKind::Gptq => Some(64),
            _ => None,
        }
    }

    /// The number format the driver quantizes onto for this format, when it is not the
    /// method's own: the ggml grid of the type (the K types' fallback grid, fixed per layer
    /// by [`ExportFormat::fit_layer`]), or the codebook for GPTQ onto bitsandbytes.
    pub fn spec_override(&self, m: Method) -> Option<FormatSpec> {
        match self {
            Self::Gguf(f) => grid_of(k_fallback(f.ty)).map(FormatSpec::Ggml),
            Self::BnbNf4 if m.kind() == MethodKind::Gptq => Some(FormatSpec::Nf4),
            Self::BnbFp4 if m.kind() == MethodKind::Gptq => Some(FormatSpec::Fp4),
            _ => None,
        }
    }
}
