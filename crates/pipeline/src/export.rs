//! `quantlab quantize --format F`: the checkpoint layouts the ecosystem loads, written from the
//! driver's output, and a loader that reads every one of them back.
//!
//! | `--format` | written | methods |
//! |------------|---------|---------|
//! | `quantlab` (default) | the project's own directory ([`crate::save`]) | all |
//! | `gptq`, `gptq_v2` | Hugging Face directory, GPTQ tensors (v1: zeros minus one; v2: raw) | `rtn`, `gptq`, `awq`, `awq+gptq` with 2, 3, 4 or 8 bits |
//! | `awq` | Hugging Face directory, AutoAWQ GEMM tensors | `rtn`, `gptq`, `awq`, `awq+gptq` with 4 bits, no act-order |
//! | `bnb-nf4`, `bnb-fp4` | Hugging Face directory, bitsandbytes 4-bit (double quant with `--double-quant`) | `nf4` / `fp4` (RTN), or `gptq` (GPTQ on the codebook grid, blocks of 64) |
//! | `bnb-int8` | Hugging Face directory, LLM.int8 (`weight` i8 + `SCB`) | `int8` |
//! | `gguf:<type>` | one GGUF v3 file | `rtn` (imatrix-weighted with calibration), `gptq` (on the ggml grid) |
//!
//! GGUF types: `q4_0`, `q4_1`, `q5_0`, `q5_1`, `q8_0` (each block linear is quantized ON the
//! ggml grid, [`quantlab_grids::GgmlGrid`], groups of 32, so GPTQ's error feedback places the
//! weights on exactly the block values written; `rtn` fits each block's scale with the
//! importance matrix `diag(X^T X)` from the same capture, as llama.cpp's imatrix does);
//! `q2_k` .. `q6_k` (linears whose rows are a multiple of 256 are quantized ON the K grid,
//! [`quantlab_grids::ggml_k`]: each 256-column super-block's f16 `d`, `dmin` and sub-block
//! scales are fitted when GPTQ's sweep reaches it (or up front with static groups; `rtn`
//! with the imatrix), and the codes and parameters are written as they are; shorter rows
//! fall back as llama.cpp does, see [`k_fallback`]); `f32`, `f16` (nothing quantized).
//! Embeddings and `output.weight` follow llama.cpp's quantizer
//! ([`llama_cpp_embedding_type`]); norms and biases are F32.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use ndarray::{Array1, Array2, Axis};
use quantlab_checkpoints::export::gguf::{
    quantize_tensor, write_gguf_metadata_typed, write_gguf_typed, GgufTensor,
};
use quantlab_checkpoints::export::hf::{
    write_hf_dir, DenseDtype, DenseTensor, GptqMeta, HfExport, HfQuantFormat,
};
use quantlab_checkpoints::export::read::{detect_format, read_quantized_dir, DetectedFormat};
use quantlab_checkpoints::gguf::{GgmlType, GgufArray, GgufValue};
use quantlab_checkpoints::pack::GptqFormat;
use quantlab_checkpoints::CheckpointError;
use quantlab_grids::{FormatSpec, GgmlGrid, Granularity};
use quantlab_models::{LlamaConfig, LlamaModel, LlamaTokenizer, MemoryWeights};
use serde_json::{json, Value};

use crate::config::{Method, Plan, QuantizeConfig};
use crate::driver::{to_array, QuantizedLayer};
use crate::source::SourceKind;
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

/// The GGUF types `--format gguf:<type>` accepts.
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

/// Whether `ty` is one of ggml's K types (super-blocks of 256).
pub fn is_k_type(ty: GgmlType) -> bool {
    matches!(
        ty,
        GgmlType::Q2_K | GgmlType::Q3_K | GgmlType::Q4_K | GgmlType::Q5_K | GgmlType::Q6_K
    )
}

/// The type llama.cpp writes instead of a K type for rows that are not a multiple of 256
/// (`llama_tensor_get_type`): Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0, Q2_K and Q3_K ->
/// IQ4_NL (4.5 bits per weight, 16 non-uniform levels). Other types are returned unchanged.
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

/// The ggml grid of a block type (legacy or K).
pub fn grid_of(ty: GgmlType) -> Option<GgmlGrid> {
    Some(match ty {
        GgmlType::Q2_K => GgmlGrid::Q2_K,
        GgmlType::Q3_K => GgmlGrid::Q3_K,
        GgmlType::Q4_K => GgmlGrid::Q4_K,
        GgmlType::Q5_K => GgmlGrid::Q5_K,
        GgmlType::Q6_K => GgmlGrid::Q6_K,
        GgmlType::Q4_0 => GgmlGrid::Q4_0,
        GgmlType::Q4_1 => GgmlGrid::Q4_1,
        GgmlType::Q5_0 => GgmlGrid::Q5_0,
        GgmlType::Q5_1 => GgmlGrid::Q5_1,
        GgmlType::Q8_0 => GgmlGrid::Q8_0,
        GgmlType::IQ4_NL => GgmlGrid::IQ4_NL,
        _ => return None,
    })
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
    /// by [`adjust_plan`]), or the codebook for GPTQ onto bitsandbytes.
    pub fn spec_override(&self, m: Method) -> Option<FormatSpec> {
        match self {
            Self::Gguf(t) => grid_of(k_fallback(*t)).map(FormatSpec::Ggml),
            Self::BnbNf4 if m == Method::Gptq => Some(FormatSpec::Nf4),
            Self::BnbFp4 if m == Method::Gptq => Some(FormatSpec::Fp4),
            _ => None,
        }
    }

    /// Checks the format against the method and options (no model needed); called by
    /// [`QuantizeConfig::validate`], so before any work.
    pub fn check_config(&self, c: &QuantizeConfig) -> Result<()> {
        let m = c.method;
        let f = self.name();
        let bad = |d: String| Err(PipelineError::option("--format", format!("{f}: {d}")));
        let bits = c.bits.unwrap_or(m.default_bits());
        let shape_overrides = c
            .overrides
            .iter()
            .find(|o| o.bits.is_some() || o.group_size.is_some() || o.sym.is_some());
        match self {
            Self::Quantlab => Ok(()),
            Self::Gptq | Self::GptqV2 | Self::Awq => {
                if !m.is_uniform() {
                    return bad(format!("stores uniform integer codes: use --method rtn, gptq, awq or awq+gptq, not {m}"));
                }
                if let Some(o) = shape_overrides {
                    return bad(format!("one bits / group size / sym for the whole checkpoint: the override `{}` changes them", o.pattern));
                }
                if *self == Self::Awq {
                    if bits != 4 {
                        return bad(format!("AWQ GEMM packs 4-bit codes, not {bits}"));
                    }
                    if c.act_order {
                        return bad("AWQ GEMM has no g_idx: groups are consecutive columns; drop --act-order (or write gptq)".into());
                    }
                } else if ![2, 3, 4, 8].contains(&bits) {
                    return bad(format!("GPTQ packs 2, 3, 4 or 8 bits, not {bits}"));
                }
                if *self == Self::Gptq && !c.sym {
                    return bad("v1 stores `zero - 1`, so an asymmetric group whose zero point is 0 (all its weights >= 0) cannot be stored; write --format gptq_v2 (raw zeros) or use a symmetric grid".into());
                }
                Ok(())
            }
            Self::BnbNf4 | Self::BnbFp4 => {
                let own = if *self == Self::BnbNf4 {
                    Method::Nf4
                } else {
                    Method::Fp4
                };
                if m != own && m != Method::Gptq {
                    return bad(format!("stores {own} codes: use --method {own} (round to nearest) or --method gptq (GPTQ on the {own} grid), not {m}"));
                }
                if m == Method::Gptq {
                    if bits != 4 {
                        return bad(format!("4-bit codes, not {bits}"));
                    }
                    if !c.sym || c.mse {
                        return bad(
                            "the codebook has no zero point or range search: drop --asym / --mse"
                                .into(),
                        );
                    }
                    if c.act_order && !c.static_groups {
                        return bad("bitsandbytes blocks are consecutive runs of weights: act-order needs --static-groups".into());
                    }
                }
                if let Some(o) = shape_overrides {
                    return bad(format!(
                        "one blocksize for the whole checkpoint: the override `{}` changes it",
                        o.pattern
                    ));
                }
                Ok(())
            }
            Self::BnbInt8 => {
                if m != Method::Int8 {
                    return bad(format!("stores LLM.int8 rows: use --method int8, not {m}"));
                }
                Ok(())
            }
            Self::Gguf(t) => {
                if !matches!(m, Method::Rtn | Method::Gptq) {
                    return bad(format!("GGUF blocks are written from --method rtn (with the calibration imatrix) or --method gptq (on the block grid), not {m}"));
                }
                if !t.is_quantized() && m != Method::Rtn {
                    return bad("a float GGUF quantizes nothing: use --method rtn".into());
                }
                if c.bits.is_some() {
                    return bad(
                        "the GGUF type decides the bits: drop --bits (e.g. gguf:q5_0 for 5 bits)"
                            .into(),
                    );
                }
                if let Some(g) = c.group_size {
                    if g != 32 {
                        return bad(format!("ggml blocks are groups of 32 columns, not {g}"));
                    }
                }
                if !c.sym {
                    return bad("the GGUF type decides the zero point (q4_1 / q5_1 store a minimum): drop --asym".into());
                }
                if c.mse {
                    return bad(
                        "the block scales are ggml's fit (or the imatrix search): drop --mse"
                            .into(),
                    );
                }
                if c.act_order && !c.static_groups {
                    return bad("ggml blocks are consecutive runs of 32 columns: act-order needs --static-groups".into());
                }
                if let Some(o) = shape_overrides {
                    return bad(format!(
                        "the type decides bits and groups: the override `{}` changes them",
                        o.pattern
                    ));
                }
                Ok(())
            }
        }
    }
}

/// Fixes the plan for the format (after the method's defaults): per-layer GGUF grids (K
/// types: the K grid with groups of its sub-blocks for rows that are multiples of 256, the
/// fallback grid for shorter rows), and the shape checks the format needs, each naming the
/// linear.
pub fn adjust_plan(c: &QuantizeConfig, plan: &mut Plan) -> Result<()> {
    let f = c.format;
    let fname = f.name();
    let bad = |name: &str, d: String| {
        Err(PipelineError::option(
            "--format",
            format!("{fname}: linear `{name}` {d}"),
        ))
    };
    let mut k_layers = 0;
    for lp in plan.layers.iter_mut() {
        let (out, inp) = lp.shape;
        match f {
            ExportFormat::Quantlab | ExportFormat::BnbInt8 => {}
            ExportFormat::Gptq | ExportFormat::GptqV2 => {
                if !lp.skip && (inp % 32 != 0 || out % 32 != 0) {
                    return bad(&lp.name, format!("is [out, in] = [{out}, {inp}]: GPTQ checkpoints need both multiples of 32 (--skip it or write another format)"));
                }
            }
            ExportFormat::Awq => {
                let g = lp.granularity.group_len(inp);
                if !lp.skip && (inp % g != 0 || out % 8 != 0) {
                    return bad(&lp.name, format!("is [out, in] = [{out}, {inp}]: AWQ GEMM needs in % group_size == 0 (group {g}) and out % 8 == 0"));
                }
            }
            ExportFormat::BnbNf4 | ExportFormat::BnbFp4 => {
                let g = lp.granularity.group_len(inp);
                if !lp.skip && inp % g != 0 {
                    return bad(
                        &lp.name,
                        format!(
                            "has {inp} input columns: bitsandbytes blocks of {g} must divide them"
                        ),
                    );
                }
            }
            ExportFormat::Gguf(t) => {
                if !t.is_quantized() {
                    lp.skip = true;
                    continue;
                }
                if lp.skip {
                    continue;
                }
                let lt = type_for_row(t, inp);
                if inp % 32 != 0 {
                    return bad(
                        &lp.name,
                        format!("has rows of {inp} values: ggml blocks need a multiple of 32"),
                    );
                }
                let Some(g) = grid_of(lt) else {
                    return bad(&lp.name, format!("cannot be quantized to {}", lt.name()));
                };
                if g.is_k() {
                    k_layers += 1;
                }
                lp.spec = FormatSpec::Ggml(g);
                lp.granularity = Granularity::Group(g.group_len());
                lp.group_size = g.group_len() as i64;
                lp.bits = quantlab_grids::Format::code_bits(&g);
                lp.sym = true;
            }
        }
    }
    if let ExportFormat::Gguf(t) = f {
        if !t.is_quantized() {
            plan.notes.push(format!(
                "{fname}: nothing is quantized; every tensor is written as {}",
                t.name()
            ));
        } else if is_k_type(t) {
            let fb = k_fallback(t);
            plan.notes.push(format!(
                "{fname}: {k_layers} linears with rows of whole 256-blocks are quantized on the {} grid (each super-block's d, dmin and sub-block scales fitted together, {} method), the others on the {} grid (llama.cpp's fallback)",
                t.name(),
                c.method,
                fb.name(),
            ));
        }
        if c.method == Method::Rtn && t.is_quantized() {
            plan.notes.push(format!("{fname}: rtn fits each block's scale with the importance matrix diag(X^T X) of the calibration capture (llama.cpp's imatrix)"));
        }
    }
    Ok(())
}

/// Everything [`write_export`] needs from a run.
pub struct ExportInputs<'a> {
    /// The quantized model in memory.
    pub model: &'a LlamaModel,
    /// Tensors that are not block linears (HF names, f32).
    pub others: &'a BTreeMap<String, Tensor>,
    /// The driver's layers.
    pub layers: &'a [QuantizedLayer],
    /// AWQ: norm name -> scale to divide it by.
    pub norm_scales: &'a BTreeMap<String, Array1<f32>>,
    /// The source model path.
    pub source: &'a Path,
    /// GGUF or HF directory.
    pub source_kind: SourceKind,
    /// The tokenizer.
    pub tokenizer: &'a LlamaTokenizer,
    /// The configuration of the run.
    pub config: &'a QuantizeConfig,
    /// The plan.
    pub plan: &'a Plan,
    /// The run's `quantization_config.json` (kept as `quantlab_config.json` in HF exports).
    pub quant_config: Value,
}

fn ck(e: CheckpointError) -> PipelineError {
    PipelineError::Format {
        path: "export".into(),
        detail: e.to_string(),
    }
}

fn tensor_2d(t: &Tensor, name: &str) -> Result<Array2<f32>> {
    let t = match t.dims().len() {
        1 => t
            .reshape((1, t.dims()[0]))
            .map_err(|e| PipelineError::Format {
                path: name.into(),
                detail: e.to_string(),
            })?,
        _ => t.clone(),
    };
    to_array(&t)
}

/// The value stored for a linear that is not quantized (skipped): the model's weight (AWQ:
/// times the norm's share of the scale).
fn float_weight(inp: &ExportInputs<'_>, l: &QuantizedLayer) -> Result<Array2<f32>> {
    let w = to_array(&inp.model.linear(&l.name)?.weight()?)?;
    Ok(match &l.norm_scale {
        Some(s) => w * s.view().insert_axis(Axis(0)),
        None => w,
    })
}

/// Dense tensors (embeddings, norms with AWQ scales folded, biases, `lm_head`) under HF names.
fn dense_tensors(inp: &ExportInputs<'_>) -> Result<Vec<(String, Tensor)>> {
    let tied = inp.model.config().tie_word_embeddings;
    let mut v = Vec::new();
    for (name, t) in inp.others {
        if name == "lm_head.weight" && tied {
            continue;
        }
        let t = match inp.norm_scales.get(name) {
            Some(s) => Tensor::from_slice(s.as_slice().expect("contiguous"), s.len(), &Device::Cpu)
                .and_then(|s| t.div(&s))
                .map_err(|e| PipelineError::Format {
                    path: name.clone(),
                    detail: e.to_string(),
                })?,
            None => t.clone(),
        };
        v.push((name.clone(), t));
    }
    Ok(v)
}

/// Writes the checkpoint of a run in `c.format` at `out` (a directory, or a file for GGUF),
/// atomically. The default `quantlab` format is [`crate::save::save_quantized`]'s.
pub fn write_export(out: &Path, inp: &ExportInputs<'_>) -> Result<()> {
    match inp.config.format {
        ExportFormat::Quantlab => Err(PipelineError::option(
            "--format",
            "quantlab: written by save_quantized",
        )),
        ExportFormat::Gguf(t) => write_gguf_export(out, inp, t),
        f => write_hf_export(out, inp, f),
    }
}

fn write_hf_export(out: &Path, inp: &ExportInputs<'_>, f: ExportFormat) -> Result<()> {
    let c = inp.config;
    let mut config = crate::save::hf_config_json(inp.model.config());
    config["torch_dtype"] = json!("float16");
    let mut ex = HfExport::new(config);
    ex.gptq = GptqMeta {
        damp_percent: c.damp.unwrap_or(0.01),
        true_sequential: c.true_sequential,
        static_groups: c.static_groups,
    };
    let mut unquantized = Vec::new();
    for l in inp.layers {
        match &l.linear {
            Some(q) => ex.linears.push((l.name.clone(), q.clone())),
            None => {
                let w = float_weight(inp, l)?;
                unquantized.push(l.name.clone());
                ex.dense.push((
                    format!("{}.weight", l.name),
                    DenseTensor {
                        shape: vec![w.nrows(), w.ncols()],
                        data: w.iter().copied().collect(),
                        dtype: DenseDtype::F16,
                    },
                ));
            }
        }
    }
    for (name, t) in dense_tensors(inp)? {
        let a = tensor_2d(&t, &name)?;
        ex.dense.push((
            name,
            DenseTensor {
                shape: t.dims().to_vec(),
                data: a.iter().copied().collect(),
                dtype: DenseDtype::F16,
            },
        ));
    }
    // tokenizer files (and a generation config), via a scratch directory
    let scratch = crate::save::temp_dir_for(&out.with_extension("tokenizer"));
    let _ = std::fs::remove_dir_all(&scratch);
    std::fs::create_dir_all(&scratch).map_err(|e| PipelineError::io(&scratch, e))?;
    let files = (|| -> Result<Vec<(String, Vec<u8>)>> {
        crate::save::write_tokenizer(&scratch, inp.source, inp.tokenizer)?;
        let mut files = Vec::new();
        for e in std::fs::read_dir(&scratch).map_err(|e| PipelineError::io(&scratch, e))? {
            let p = e.map_err(|e| PipelineError::io(&scratch, e))?.path();
            let name = p
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .to_string();
            files.push((
                name,
                std::fs::read(&p).map_err(|e| PipelineError::io(&p, e))?,
            ));
        }
        Ok(files)
    })();
    let _ = std::fs::remove_dir_all(&scratch);
    ex.files = files?;
    if !ex.files.iter().any(|(n, _)| n == "generation_config.json") {
        let mc = inp.model.config();
        let mut g = json!({"_from_model_config": true});
        if let Some(b) = mc.bos_token_id {
            g["bos_token_id"] = json!(b);
        }
        match mc.eos_token_ids.as_slice() {
            [] => {}
            [e] => g["eos_token_id"] = json!(e),
            many => g["eos_token_id"] = json!(many),
        }
        ex.files.push((
            "generation_config.json".into(),
            serde_json::to_vec_pretty(&g).expect("JSON"),
        ));
    }
    let mut qc = inp.quant_config.clone();
    if let Some(o) = qc.as_object_mut() {
        o.insert("export_format".into(), json!(f.name()));
    }
    ex.files.push((
        "quantlab_config.json".into(),
        serde_json::to_vec_pretty(&qc).expect("JSON"),
    ));
    let hf = match f {
        ExportFormat::Gptq => HfQuantFormat::Gptq(GptqFormat::V1),
        ExportFormat::GptqV2 => HfQuantFormat::Gptq(GptqFormat::V2),
        ExportFormat::Awq => HfQuantFormat::Awq,
        ExportFormat::BnbNf4 | ExportFormat::BnbFp4 => HfQuantFormat::Bnb4,
        _ => HfQuantFormat::Int8,
    };
    write_hf_dir(out, &ex, hf).map_err(ck)?;
    if !unquantized.is_empty() {
        // record the float linears the way transformers' quantizers name them
        let p = out.join("config.json");
        let mut v: Value =
            serde_json::from_slice(&std::fs::read(&p).map_err(|e| PipelineError::io(&p, e))?)
                .map_err(|e| PipelineError::Format {
                    path: p.display().to_string(),
                    detail: e.to_string(),
                })?;
        let key = if matches!(
            f,
            ExportFormat::BnbNf4 | ExportFormat::BnbFp4 | ExportFormat::BnbInt8
        ) {
            "llm_int8_skip_modules"
        } else {
            "modules_to_not_convert"
        };
        v["quantization_config"][key] = json!(unquantized);
        let tmp = p.with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_string_pretty(&v).expect("JSON") + "\n")
            .and_then(|_| std::fs::rename(&tmp, &p))
            .map_err(|e| PipelineError::io(&p, e))?;
    }
    Ok(())
}

fn write_gguf_export(out: &Path, inp: &ExportInputs<'_>, t: GgmlType) -> Result<()> {
    let mc = inp.model.config();
    let float_ty = if t == GgmlType::F16 {
        GgmlType::F16
    } else {
        GgmlType::F32
    };
    let mut tensors: Vec<(String, GgufTensor)> = Vec::new();
    for l in inp.layers {
        let wname = format!("{}.weight", l.name);
        let gt = match &l.linear {
            Some(q) => GgufTensor::from_quantized(&wname, q).map_err(ck)?,
            None => {
                let w = float_weight(inp, l)?;
                quantize_tensor(&wname, w.view(), float_ty).map_err(ck)?
            }
        };
        tensors.push((wname, gt));
    }
    let has_output = inp.others.contains_key("lm_head.weight") && !mc.tie_word_embeddings;
    for (name, tt) in dense_tensors(inp)? {
        if quantlab_checkpoints::export::gguf::hf_to_gguf_name(&name).is_none() {
            continue; // e.g. rotary inv_freq buffers: not part of a GGUF
        }
        let a = tensor_2d(&tt, &name)?;
        let ty = match name.as_str() {
            "model.embed_tokens.weight" => llama_cpp_embedding_type(t, a.ncols(), !has_output),
            "lm_head.weight" => llama_cpp_embedding_type(t, a.ncols(), true),
            _ => GgmlType::F32,
        };
        let mut g = quantize_tensor(&name, a.view(), ty).map_err(ck)?;
        g.shape = tt.dims().to_vec();
        tensors.push((name, g));
    }
    let main = Some(t);
    match inp.source_kind {
        SourceKind::Gguf => write_gguf_typed(out, inp.source, &tensors, main).map_err(ck),
        SourceKind::HfDir => {
            let meta = gguf_metadata_from_hf(mc, inp.source, inp.tokenizer)?;
            write_gguf_metadata_typed(out, &meta, &tensors, main).map_err(ck)
        }
    }?;
    Ok(())
}

/// GGUF metadata for a LLaMA-family model read from a Hugging Face directory: architecture
/// `llama`, the hyper-parameters, and a `gpt2` (byte-level BPE) tokenizer from
/// `tokenizer.json` (tokens by id, padded to the vocabulary with `[PAD<i>]` of type unused,
/// merges, added special tokens as control tokens, bos / eos, `add_bos_token`, chat template).
/// Other tokenizer models are refused with an error naming the file.
pub fn gguf_metadata_from_hf(
    mc: &LlamaConfig,
    dir: &Path,
    tok: &LlamaTokenizer,
) -> Result<Vec<(String, GgufValue)>> {
    let tj = dir.join("tokenizer.json");
    let bad = |d: String| PipelineError::Format {
        path: tj.display().to_string(),
        detail: d,
    };
    let v: Value =
        serde_json::from_slice(&std::fs::read(&tj).map_err(|e| PipelineError::io(&tj, e))?)
            .map_err(|e| bad(format!("not JSON: {e}")))?;
    if v["model"]["type"].as_str() != Some("BPE") {
        return Err(bad(format!(
            "tokenizer model {:?}: only byte-level BPE tokenizers are converted to GGUF (tokenizer.ggml.model gpt2)",
            v["model"]["type"]
        )));
    }
    let n = mc.vocab_size;
    let mut tokens: Vec<Option<String>> = vec![None; n];
    let mut types = vec![1i32; n];
    let vocab = v["model"]["vocab"]
        .as_object()
        .ok_or_else(|| bad("model.vocab is not an object".into()))?;
    let mut put = |id: u64, s: &str, ty: i32| -> Result<()> {
        let id = id as usize;
        if id >= n {
            return Err(bad(format!(
                "token `{s}` has id {id}, outside the vocabulary of {n}"
            )));
        }
        tokens[id] = Some(s.to_string());
        types[id] = ty;
        Ok(())
    };
    for (s, id) in vocab {
        put(
            id.as_u64().ok_or_else(|| bad(format!("token `{s}`: id")))?,
            s,
            1,
        )?;
    }
    if let Some(added) = v["added_tokens"].as_array() {
        for a in added {
            let (Some(id), Some(s)) = (a["id"].as_u64(), a["content"].as_str()) else {
                continue;
            };
            let special = a["special"].as_bool().unwrap_or(false);
            put(id, s, if special { 3 } else { 4 })?;
        }
    }
    let tokens: Vec<String> = tokens
        .into_iter()
        .enumerate()
        .map(|(i, t)| {
            t.unwrap_or_else(|| {
                types[i] = 5;
                format!("[PAD{i}]")
            })
        })
        .collect();
    let merges: Vec<String> = match v["model"]["merges"].as_array() {
        None => Vec::new(),
        Some(m) => m
            .iter()
            .filter_map(|x| match x {
                Value::String(s) => Some(s.clone()),
                Value::Array(p) if p.len() == 2 => Some(format!(
                    "{} {}",
                    p[0].as_str().unwrap_or(""),
                    p[1].as_str().unwrap_or("")
                )),
                _ => None,
            })
            .collect(),
    };
    let a = |k: &str| format!("llama.{k}");
    let u = |x: usize| GgufValue::U32(x as u32);
    let mut meta = vec![
        (
            "general.architecture".to_string(),
            GgufValue::String("llama".into()),
        ),
        (
            "general.name".into(),
            GgufValue::String(
                dir.file_name()
                    .map(|s| s.to_string_lossy().to_string())
                    .unwrap_or_else(|| "model".into()),
            ),
        ),
        (a("block_count"), u(mc.num_hidden_layers)),
        (a("context_length"), u(mc.max_position_embeddings)),
        (a("embedding_length"), u(mc.hidden_size)),
        (a("feed_forward_length"), u(mc.intermediate_size)),
        (a("attention.head_count"), u(mc.num_attention_heads)),
        (a("attention.head_count_kv"), u(mc.num_key_value_heads)),
        (a("attention.key_length"), u(mc.head_dim)),
        (a("attention.value_length"), u(mc.head_dim)),
        (a("rope.freq_base"), GgufValue::F32(mc.rope_theta as f32)),
        (
            a("attention.layer_norm_rms_epsilon"),
            GgufValue::F32(mc.rms_norm_eps as f32),
        ),
        (a("rope.dimension_count"), u(mc.head_dim)),
        (a("vocab_size"), u(n)),
        (
            "tokenizer.ggml.model".into(),
            GgufValue::String("gpt2".into()),
        ),
        (
            "tokenizer.ggml.pre".into(),
            GgufValue::String("default".into()),
        ),
        (
            "tokenizer.ggml.tokens".into(),
            GgufValue::Array(GgufArray::String(tokens)),
        ),
        (
            "tokenizer.ggml.token_type".into(),
            GgufValue::Array(GgufArray::I32(types)),
        ),
        (
            "tokenizer.ggml.merges".into(),
            GgufValue::Array(GgufArray::String(merges)),
        ),
        (
            "tokenizer.ggml.add_bos_token".into(),
            GgufValue::Bool(tok.add_bos()),
        ),
    ];
    if let Some(b) = tok.bos_token_id().or(mc.bos_token_id) {
        meta.push(("tokenizer.ggml.bos_token_id".into(), GgufValue::U32(b)));
    }
    if let Some(&e) = tok.eos_token_ids().first().or(mc.eos_token_ids.first()) {
        meta.push(("tokenizer.ggml.eos_token_id".into(), GgufValue::U32(e)));
    }
    if let Some(t) = tok.chat_template() {
        meta.push((
            "tokenizer.chat_template".into(),
            GgufValue::String(t.into()),
        ));
    }
    Ok(meta)
}

/// Loads a model from any checkpoint `quantlab` writes or reads: a GGUF file, a plain or
/// `quantlab` Hugging Face directory ([`LlamaModel::load`]), or a GPTQ (v1 / v2), AWQ GEMM or
/// bitsandbytes (4-bit, int8) directory, dequantized with the peer loader's formula
/// ([`read_quantized_dir`]).
pub fn load_model(path: &Path) -> Result<LlamaModel> {
    let quantized_dir = path.is_dir()
        && path.join("config.json").is_file()
        && !matches!(detect_format(path).map_err(ck)?, DetectedFormat::Dense);
    if !quantized_dir {
        return Ok(LlamaModel::load(path)?);
    }
    let config = LlamaConfig::from_hf_file(&path.join("config.json"))?;
    let (_, weights) = read_quantized_dir(path).map_err(ck)?;
    let mut mem = MemoryWeights::new(PathBuf::from(path));
    for (name, a) in weights {
        let one_d = a.nrows() == 1
            && !(name.ends_with("_proj.weight")
                || name == "lm_head.weight"
                || name == "model.embed_tokens.weight");
        let (r, k) = a.dim();
        let data: Vec<f32> = a.into_iter().collect();
        let t = if one_d {
            Tensor::from_vec(data, k, &Device::Cpu)
        } else {
            Tensor::from_vec(data, (r, k), &Device::Cpu)
        }
        .map_err(|e| PipelineError::Format {
            path: format!("{}: tensor `{name}`", path.display()),
            detail: e.to_string(),
        })?;
        mem.insert(&name, t);
    }
    Ok(LlamaModel::from_source(config, &mem)?)
}
