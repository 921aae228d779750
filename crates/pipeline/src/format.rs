//! The checkpoint layouts `quantlab quantize --format` names ([`ExportFormat`]) and the
//! ggml type rules they follow (K-type fallbacks, llama.cpp's embedding types): what a format
//! is, apart from the writers ([`crate::export`]) and the plan checks ([`crate::config`]).

use quantlab_checkpoints::gguf::GgmlType;
pub use quantlab_checkpoints::pack::gguf_blocks::{grid_of, is_k_type};
use quantlab_grids::FormatSpec;

use crate::method::Method;
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
    /// One GGUF file whose block linears are mostly of this type.
    Gguf(GgmlType),
}

/// The GGUF file types `--format gguf:<type>` accepts: the block types with a grid
/// ([`quantlab_checkpoints::pack::gguf_blocks::BLOCK_TYPES`]) that llama.cpp offers as a
/// file type here, IQ4_NL being written only as the K types' fallback, and the two floats.
pub const GGUF_TYPES: [GgmlType; 12] = [
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q8_0,
    GgmlType::Q2_K,
    GgmlType::Q3_K,
    GgmlType::Q4_K,
    GgmlType::Q5_K,
    GgmlType::Q6_K,
    GgmlType::F32,
    GgmlType::F16,
];

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
/// IQ4_NL). Other types are returned unchanged.
pub fn k_fallback(ty: GgmlType) -> GgmlType {
    match ty {
        GgmlType::Q2_K | GgmlType::Q3_K => GgmlType::IQ4_NL,
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
    /// `gguf:<type>`.
    ///
    /// ```
    /// use quantlab_pipeline::export::ExportFormat;
    /// use quantlab_checkpoints::gguf::GgmlType;
    /// assert_eq!(ExportFormat::parse("gguf:q4_k").unwrap(), ExportFormat::Gguf(GgmlType::Q4_K));
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
        let types = GGUF_TYPES
            .iter()
            .map(|t| t.name().to_ascii_lowercase())
            .collect::<Vec<_>>()
            .join(", ");
        if let Some(t) = l.strip_prefix("gguf:").or(l.strip_prefix("gguf-")) {
            return GGUF_TYPES
                .iter()
                .find(|g| g.name().eq_ignore_ascii_case(t))
                .map(|&g| Self::Gguf(g))
                .ok_or_else(|| {
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
            Self::Gguf(t) => format!("gguf:{}", t.name().to_ascii_lowercase()),
        }
    }

    /// Whether the output is one file (GGUF) rather than a directory.
    pub fn writes_file(&self) -> bool {
        matches!(self, Self::Gguf(_))
    }

    /// The GGUF type, for `gguf:<type>`.
    pub fn gguf_type(&self) -> Option<GgmlType> {
        match self {
            Self::Gguf(t) => Some(*t),
            _ => None,
        }
    }

    /// The group size this format implies when `--group-size` is not given: 32 for GGUF
    /// (ggml blocks), 64 for GPTQ onto a bitsandbytes codebook (its blocksize).
    pub fn default_group_size(&self, m: Method) -> Option<i64> {
        match self {
            Self::Gguf(_) => Some(32),
            Self::BnbNf4 | Self::BnbFp4 if m == Method::Gptq => Some(64),
            _ => None,
        }
    }

    /// The number format the driver quantizes onto for this format, when it is not the
    /// method's own: the ggml grid of the type (the K types' fallback grid, fixed per layer
    /// by [`ExportFormat::fit_layer`]), or the codebook for GPTQ onto bitsandbytes.
    pub fn spec_override(&self, m: Method) -> Option<FormatSpec> {
        match self {
            Self::Gguf(t) => grid_of(k_fallback(*t)).map(FormatSpec::Ggml),
            Self::BnbNf4 if m == Method::Gptq => Some(FormatSpec::Nf4),
            Self::BnbFp4 if m == Method::Gptq => Some(FormatSpec::Fp4),
            _ => None,
        }
    }
}
