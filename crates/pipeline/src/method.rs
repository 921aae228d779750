//! The whole-model methods (`--method`), each carrying its own parameters ([`Method`]), and
//! their kinds ([`MethodKind`]: what each needs, its defaults, its name).
//!
//! A parameter exists only on the method that reads it: GPTQ's damping, act-order or Hessian
//! shrinkage are fields of [`GptqOptions`], AWQ's search subset of [`AwqOptions`], the
//! codebooks' double quantization of [`CodebookOptions`], LLM.int8's outlier threshold of
//! [`Int8Options`]; a configuration that gives `rtn` a damping cannot be written.
//! [`Method::validate`] checks the values and names the parameter at fault.

use std::fmt;

use serde::{Serialize, Serializer};

use crate::{PipelineError, Result};

/// GPTQ's parameters (`--method gptq`, and the GPTQ half of `awq+gptq`).
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct GptqOptions {
    /// Columns by descending `diag H` (`desc_act`).
    pub act_order: bool,
    /// Every group's parameters fitted from the original weights before the sweep.
    pub static_groups: bool,
    /// Damping as a fraction of `mean(diag H)` (`damp_percent`; 0.01).
    pub damp: f64,
    /// Columns per lazy batch (128).
    pub block_size: usize,
    /// Shrinkage of the Hessian toward its diagonal, in `[0, 1]`
    /// ([`quantlab_solvers::gptq::GptqParams::hessian_shrink`]); `None`: 0.5 on ggml's block
    /// grids, 0.9 on its K grids, where GPTQ also fits each block's scale by the
    /// importance-weighted search, and 0 on every other format
    /// ([`crate::config::default_ggml_hessian_shrink`]).
    pub hessian_shrink: Option<f64>,
    /// Re-capture the inputs after each group of the block is quantized (q,k,v; o; gate,up;
    /// down). When false, one capture per block with the block's original weights.
    pub true_sequential: bool,
}

impl Default for GptqOptions {
    fn default() -> Self {
        Self {
            act_order: false,
            static_groups: false,
            damp: 0.01,
            block_size: 128,
            hessian_shrink: None,
            true_sequential: true,
        }
    }
}

impl GptqOptions {
    /// Checks the values, naming the parameter at fault.
    pub fn validate(&self) -> Result<()> {
        if !(self.damp.is_finite() && self.damp >= 0.0) {
            return Err(PipelineError::option(
                "--damp",
                format!("{}: use a fraction >= 0 (e.g. 0.01)", self.damp),
            ));
        }
        if let Some(s) = self.hessian_shrink {
            if !(0.0..=1.0).contains(&s) {
                return Err(PipelineError::option(
                    "--hessian-shrink",
                    format!("{s}: use a value in [0, 1] (0 = plain GPTQ, 1 = weighted RTN)"),
                ));
            }
        }
        if self.block_size == 0 {
            return Err(PipelineError::option(
                "--block-size",
                "0: use a positive number of columns (e.g. 128)",
            ));
        }
        Ok(())
    }
}

/// AWQ's parameters (`--method awq`, and the AWQ half of `awq+gptq`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct AwqOptions {
    /// The first N calibration windows, on which the scale candidates are scored on the
    /// block output and from which the float block's statistics (mean `|x|`, `H` for the
    /// per-layer error, the clip search's rows) are taken; every window goes through the
    /// quantized block for the next block's inputs (8).
    pub samples: usize,
    /// Fold the searched scales into the model without quantizing (experiments; the saved
    /// model is then the float model re-parametrised).
    pub fold_only: bool,
}

impl Default for AwqOptions {
    fn default() -> Self {
        Self {
            samples: 8,
            fold_only: false,
        }
    }
}

impl AwqOptions {
    /// Checks the values, naming the parameter at fault.
    pub fn validate(&self) -> Result<()> {
        if self.samples == 0 {
            return Err(PipelineError::option(
                "--awq-samples",
                "0: use at least 1 window",
            ));
        }
        Ok(())
    }
}

/// The bitsandbytes codebooks' parameters (`--method nf4`, `fp4`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct CodebookOptions {
    /// Double-quantize the absmax (QLoRA).
    pub double_quant: bool,
}

/// LLM.int8's parameters (`--method int8`).
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Int8Options {
    /// The outlier threshold recorded for run time (`llm_int8_threshold`, 6.0).
    pub threshold: f32,
}

impl Default for Int8Options {
    fn default() -> Self {
        Self { threshold: 6.0 }
    }
}

/// A whole-model quantization method with its parameters.
///
/// ```
/// use quantlab_pipeline::{GptqOptions, Method, MethodKind};
/// let m = Method::Gptq(GptqOptions { act_order: true, ..Default::default() });
/// assert_eq!((m.kind(), m.name()), (MethodKind::Gptq, "gptq"));
/// assert!(m.gptq_options().unwrap().act_order && m.awq_options().is_none());
/// // parsing a name gives the method with its defaults
/// assert_eq!(Method::parse("awq+gptq").unwrap(), Method::awq_gptq());
/// let bad = Method::Gptq(GptqOptions { damp: -1.0, ..Default::default() });
/// assert!(bad.validate().unwrap_err().to_string().contains("--damp"));
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
#[non_exhaustive]
pub enum Method {
    /// Round to nearest on a uniform integer grid.
    Rtn,
    /// GPTQ (blocked, Cholesky of `H^-1`), true-sequential by default.
    Gptq(GptqOptions),
    /// AWQ scale search on the block output, clip search, then RTN.
    Awq(AwqOptions),
    /// AWQ scaling, then GPTQ on the scaled weights.
    AwqGptq(AwqOptions, GptqOptions),
    /// NF4 codebook with absmax per group (QLoRA / bitsandbytes).
    Nf4(CodebookOptions),
    /// bitsandbytes FP4 codebook with absmax per group.
    Fp4(CodebookOptions),
    /// LLM.int8(): absmax int8 per row; outlier decomposition at run time.
    Int8(Int8Options),
    /// FP8 E4M3 with a scale per output channel.
    Fp8,
}

impl Default for Method {
    fn default() -> Self {
        Self::gptq()
    }
}

impl Method {
    /// GPTQ with its defaults.
    pub fn gptq() -> Self {
        Self::Gptq(GptqOptions::default())
    }

    /// AWQ with its defaults.
    pub fn awq() -> Self {
        Self::Awq(AwqOptions::default())
    }

    /// AWQ then GPTQ, each with its defaults.
    pub fn awq_gptq() -> Self {
        Self::AwqGptq(AwqOptions::default(), GptqOptions::default())
    }

    /// NF4 without double quantization.
    pub fn nf4() -> Self {
        Self::Nf4(CodebookOptions::default())
    }

    /// FP4 without double quantization.
    pub fn fp4() -> Self {
        Self::Fp4(CodebookOptions::default())
    }

    /// LLM.int8 with the threshold 6.0.
    pub fn int8() -> Self {
        Self::Int8(Int8Options::default())
    }

    /// The method of `kind` with its default parameters.
    pub fn with_defaults(kind: MethodKind) -> Self {
        match kind {
            MethodKind::Rtn => Self::Rtn,
            MethodKind::Gptq => Self::gptq(),
            MethodKind::Awq => Self::awq(),
            MethodKind::AwqGptq => Self::awq_gptq(),
            MethodKind::Nf4 => Self::nf4(),
            MethodKind::Fp4 => Self::fp4(),
            MethodKind::Int8 => Self::int8(),
            MethodKind::Fp8 => Self::Fp8,
        }
    }

    /// Parses a method name into the method with its defaults ([`MethodKind::parse`]).
    pub fn parse(s: &str) -> Result<Self> {
        MethodKind::parse(s).map(Self::with_defaults)
    }

    /// Which method this is, without its parameters.
    pub fn kind(&self) -> MethodKind {
        match self {
            Self::Rtn => MethodKind::Rtn,
            Self::Gptq(_) => MethodKind::Gptq,
            Self::Awq(_) => MethodKind::Awq,
            Self::AwqGptq(..) => MethodKind::AwqGptq,
            Self::Nf4(_) => MethodKind::Nf4,
            Self::Fp4(_) => MethodKind::Fp4,
            Self::Int8(_) => MethodKind::Int8,
            Self::Fp8 => MethodKind::Fp8,
        }
    }

    /// The name used on the command line and in files.
    pub fn name(&self) -> &'static str {
        self.kind().name()
    }

    /// GPTQ's parameters, for the methods that run GPTQ.
    pub fn gptq_options(&self) -> Option<&GptqOptions> {
        match self {
            Self::Gptq(g) | Self::AwqGptq(_, g) => Some(g),
            _ => None,
        }
    }

    /// AWQ's parameters, for the methods that run the AWQ searches.
    pub fn awq_options(&self) -> Option<&AwqOptions> {
        match self {
            Self::Awq(a) | Self::AwqGptq(a, _) => Some(a),
            _ => None,
        }
    }

    /// Whether the codebook's absmax is double-quantized (NF4/FP4 with `double_quant`).
    pub fn double_quant(&self) -> bool {
        matches!(self, Self::Nf4(c) | Self::Fp4(c) if c.double_quant)
    }

    /// LLM.int8's outlier threshold, for `int8`.
    pub fn int8_threshold(&self) -> Option<f32> {
        match self {
            Self::Int8(o) => Some(o.threshold),
            _ => None,
        }
    }

    /// Whether the captures re-run after each true-sequential group (GPTQ with
    /// `true_sequential`, and AWQ+GPTQ's GPTQ pass); the other methods capture once per
    /// block.
    pub fn true_sequential(&self) -> bool {
        self.gptq_options().is_some_and(|g| g.true_sequential)
    }

    /// Whether the method runs GPTQ.
    pub fn uses_gptq(&self) -> bool {
        self.kind().uses_gptq()
    }

    /// Whether the method runs the AWQ searches.
    pub fn uses_awq(&self) -> bool {
        self.kind().uses_awq()
    }

    /// Whether the method's weights depend on the calibration data.
    pub fn needs_calibration(&self) -> bool {
        self.kind().needs_calibration()
    }

    /// Whether the format is a uniform integer grid.
    pub fn is_uniform(&self) -> bool {
        self.kind().is_uniform()
    }

    /// Bits used when `--bits` is not given.
    pub fn default_bits(&self) -> u32 {
        self.kind().default_bits()
    }

    /// Group size used when `--group-size` is not given (`-1` = per row).
    pub fn default_group_size(&self) -> i64 {
        self.kind().default_group_size()
    }

    /// The bit widths the method supports, for error messages.
    pub fn supported_bits(&self) -> &'static str {
        self.kind().supported_bits()
    }

    pub(crate) fn supports_bits(&self, bits: u32) -> bool {
        self.kind().supports_bits(bits)
    }

    /// Checks the parameters' values, naming the one at fault.
    pub fn validate(&self) -> Result<()> {
        if let Some(g) = self.gptq_options() {
            g.validate()?;
        }
        if let Some(a) = self.awq_options() {
            a.validate()?;
        }
        if let Some(t) = self.int8_threshold() {
            if !(t.is_finite() && t > 0.0) {
                return Err(PipelineError::option(
                    "--int8-threshold",
                    format!("{t}: use a positive number (6.0)"),
                ));
            }
        }
        Ok(())
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Serialised as its name (`"gptq"`); the parameters are written by the job's
/// `quantization_config.json`.
impl Serialize for Method {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

/// The kind of a whole-model method, without its parameters: its name, what it needs and its
/// defaults.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub enum MethodKind {
    /// Round to nearest on a uniform integer grid.
    #[serde(rename = "rtn")]
    Rtn,
    /// GPTQ (blocked, Cholesky of `H^-1`), true-sequential.
    #[serde(rename = "gptq")]
    Gptq,
    /// AWQ scale search on the block output, clip search, then RTN.
    #[serde(rename = "awq")]
    Awq,
    /// AWQ scaling, then GPTQ on the scaled weights.
    #[serde(rename = "awq+gptq")]
    AwqGptq,
    /// NF4 codebook with absmax per group (QLoRA / bitsandbytes).
    #[serde(rename = "nf4")]
    Nf4,
    /// bitsandbytes FP4 codebook with absmax per group.
    #[serde(rename = "fp4")]
    Fp4,
    /// LLM.int8(): absmax int8 per row; outlier decomposition at run time.
    #[serde(rename = "int8")]
    Int8,
    /// FP8 E4M3 with a scale per output channel.
    #[serde(rename = "fp8")]
    Fp8,
}

impl MethodKind {
    /// Every method, in the order of `--help`.
    pub const ALL: [MethodKind; 8] = [
        MethodKind::Rtn,
        MethodKind::Gptq,
        MethodKind::Awq,
        MethodKind::AwqGptq,
        MethodKind::Nf4,
        MethodKind::Fp4,
        MethodKind::Int8,
        MethodKind::Fp8,
    ];

    /// The name used on the command line and in files.
    pub fn name(self) -> &'static str {
        match self {
            MethodKind::Rtn => "rtn",
            MethodKind::Gptq => "gptq",
            MethodKind::Awq => "awq",
            MethodKind::AwqGptq => "awq+gptq",
            MethodKind::Nf4 => "nf4",
            MethodKind::Fp4 => "fp4",
            MethodKind::Int8 => "int8",
            MethodKind::Fp8 => "fp8",
        }
    }

    /// Parses a method name.
    ///
    /// ```
    /// use quantlab_pipeline::MethodKind;
    /// assert_eq!(MethodKind::parse("awq+gptq").unwrap(), MethodKind::AwqGptq);
    /// assert!(MethodKind::parse("bogus").unwrap_err().to_string().contains("rtn, gptq"));
    /// ```
    pub fn parse(s: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|m| m.name() == s.to_ascii_lowercase())
            .ok_or_else(|| {
                PipelineError::option(
                    "--method",
                    format!(
                        "unknown method `{s}`; use one of {}",
                        Self::ALL.map(|m| m.name()).join(", ")
                    ),
                )
            })
    }

    /// Whether the method runs GPTQ (and so takes `--act-order`, `--damp`, ...).
    pub fn uses_gptq(self) -> bool {
        matches!(self, MethodKind::Gptq | MethodKind::AwqGptq)
    }

    /// Whether the method runs the AWQ searches.
    pub fn uses_awq(self) -> bool {
        matches!(self, MethodKind::Awq | MethodKind::AwqGptq)
    }

    /// Whether the method's weights depend on the calibration data (RTN-like methods use it
    /// only to measure the output error).
    pub fn needs_calibration(self) -> bool {
        self.uses_gptq() || self.uses_awq()
    }

    /// Whether the format is a uniform integer grid.
    pub fn is_uniform(self) -> bool {
        matches!(
            self,
            MethodKind::Rtn | MethodKind::Gptq | MethodKind::Awq | MethodKind::AwqGptq
        )
    }

    /// Bits used when `--bits` is not given.
    pub fn default_bits(self) -> u32 {
        match self {
            MethodKind::Int8 | MethodKind::Fp8 => 8,
            _ => 4,
        }
    }

    /// Group size used when `--group-size` is not given (`-1` = per row).
    pub fn default_group_size(self) -> i64 {
        match self {
            MethodKind::Nf4 | MethodKind::Fp4 => 64,
            MethodKind::Int8 | MethodKind::Fp8 => -1,
            _ => 128,
        }
    }

    /// The bit widths the method supports, for error messages.
    pub fn supported_bits(self) -> &'static str {
        match self {
            MethodKind::Nf4 | MethodKind::Fp4 => "4",
            MethodKind::Int8 | MethodKind::Fp8 => "8",
            _ => "2 to 8",
        }
    }

    pub(crate) fn supports_bits(self, bits: u32) -> bool {
        match self {
            MethodKind::Nf4 | MethodKind::Fp4 => bits == 4,
            MethodKind::Int8 | MethodKind::Fp8 => bits == 8,
            _ => (2..=8).contains(&bits),
        }
    }
}

impl fmt::Display for MethodKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}
