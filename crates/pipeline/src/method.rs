//! The whole-model methods (`--method`) and what each needs.

use std::fmt;

use serde::Serialize;

use crate::{PipelineError, Result};

/// A whole-model quantization method.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub enum Method {
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

impl Method {
    /// Every method, in the order of `--help`.
    pub const ALL: [Method; 8] = [
        Method::Rtn,
        Method::Gptq,
        Method::Awq,
        Method::AwqGptq,
        Method::Nf4,
        Method::Fp4,
        Method::Int8,
        Method::Fp8,
    ];

    /// The name used on the command line and in files.
    pub fn name(self) -> &'static str {
        match self {
            Method::Rtn => "rtn",
            Method::Gptq => "gptq",
            Method::Awq => "awq",
            Method::AwqGptq => "awq+gptq",
            Method::Nf4 => "nf4",
            Method::Fp4 => "fp4",
            Method::Int8 => "int8",
            Method::Fp8 => "fp8",
        }
    }

    /// Parses a method name.
    ///
    /// ```
    /// use quantlab_pipeline::Method;
    /// assert_eq!(Method::parse("awq+gptq").unwrap(), Method::AwqGptq);
    /// assert!(Method::parse("bogus").unwrap_err().to_string().contains("rtn, gptq"));
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
        matches!(self, Method::Gptq | Method::AwqGptq)
    }

    /// Whether the method runs the AWQ searches.
    pub fn uses_awq(self) -> bool {
        matches!(self, Method::Awq | Method::AwqGptq)
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
            Method::Rtn | Method::Gptq | Method::Awq | Method::AwqGptq
        )
    }

    /// Bits used when `--bits` is not given.
    pub fn default_bits(self) -> u32 {
        match self {
            Method::Int8 | Method::Fp8 => 8,
            _ => 4,
        }
    }

    /// Group size used when `--group-size` is not given (`-1` = per row).
    pub fn default_group_size(self) -> i64 {
        match self {
            Method::Nf4 | Method::Fp4 => 64,
            Method::Int8 | Method::Fp8 => -1,
            _ => 128,
        }
    }

    /// The bit widths the method supports, for error messages.
    pub fn supported_bits(self) -> &'static str {
        match self {
            Method::Nf4 | Method::Fp4 => "4",
            Method::Int8 | Method::Fp8 => "8",
            _ => "2 to 8",
        }
    }

    pub(crate) fn supports_bits(self, bits: u32) -> bool {
        match self {
            Method::Nf4 | Method::Fp4 => bits == 4,
            Method::Int8 | Method::Fp8 => bits == 8,
            _ => (2..=8).contains(&bits),
        }
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}
