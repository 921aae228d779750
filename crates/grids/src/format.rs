//! The shared trait that every scalar number format implements, so that a notebook or a
//! solver can swap one format for another.
//!
//! A format quantizes one *group* of weights (a run of input columns of one output row,
//! or a whole row, or the whole tensor) with a small set of parameters, [`GroupParams`]:
//! a scale and a zero point. Uniform grids use both; codebook formats (NF4, FP4) use the
//! scale as the block absmax; FP8 uses the scale as the per-channel or per-tensor scale.

use serde::{Deserialize, Serialize};

/// Parameters shared by one group of weights.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct GroupParams {
    /// Step (uniform), absmax (codebooks) or scale (FP8, int8).
    pub scale: f32,
    /// Zero point in code units (uniform affine); 0 for formats without one.
    pub zero: f32,
}

impl GroupParams {
    /// Parameters with a scale and no zero point.
    pub fn scale_only(scale: f32) -> Self {
        Self { scale, zero: 0.0 }
    }
}

/// A scalar number format: fit parameters to a group, then encode and decode scalars.
///
/// Implementations are plain, deterministic reference code. `encode` must return the code
/// of the grid point nearest to `x` under the format's rounding rule.
pub trait Format: Send + Sync + std::fmt::Debug {
    /// A short, stable name such as `int4-sym`, `nf4`, `fp8-e4m3`.
    fn name(&self) -> String;
    /// Bits of one stored code.
    fn code_bits(&self) -> u32;
    /// Bits stored for the parameters of one group (scale and zero), before any
    /// double quantization.
    fn param_bits(&self) -> f64;
    /// Bits of the scale alone inside [`Format::param_bits`] (the part that double
    /// quantization replaces); the default says the parameters are a scale only.
    fn scale_bits(&self) -> f64 {
        self.param_bits()
    }
    /// Choose the parameters of one group from its weights.
    fn fit(&self, w: &[f32]) -> GroupParams;
    /// Choose parameters minimising an importance-weighted error; the default ignores the
    /// weights. `importance[i]` weighs `w[i]` (e.g. the diagonal of the Hessian).
    fn fit_weighted(&self, w: &[f32], importance: Option<&[f32]>) -> GroupParams {
        let _ = importance;
        self.fit(w)
    }
    /// When the parameters of several consecutive groups are fitted together (ggml's K
    /// types: the sub-block scales of a 256-weight super-block are quantized against one
    /// f16 scale), the span and the group length it is made of; `None` (the default): every
    /// group is fitted alone. Solvers fit a span when they reach its first column
    /// ([`Format::fit_groups`]), so the parameters of its groups are consistent.
    fn fit_span(&self) -> Option<FitSpan> {
        None
    }
    /// The parameters of the consecutive groups of `group_len` columns covering `w` (one
    /// span, or one group), one per entry of `out` (`ceil(w.len() / group_len)` entries);
    /// `importance` as in [`Format::fit_weighted`]. The default fits each group alone with
    /// [`Format::fit_weighted`].
    #[track_caller]
    fn fit_groups(
        &self,
        w: &[f32],
        importance: Option<&[f32]>,
        group_len: usize,
        out: &mut [GroupParams],
    ) {
        assert_eq!(
            out.len(),
            w.len().div_ceil(group_len.max(1)),
            "one parameter set per group"
        );
        for (i, (chunk, o)) in w.chunks(group_len.max(1)).zip(out.iter_mut()).enumerate() {
            let s = i * group_len;
            *o = self.fit_weighted(chunk, importance.map(|imp| &imp[s..s + chunk.len()]));
        }
    }
    /// The code of `x` under `p`.
    fn encode(&self, x: f32, p: GroupParams) -> u8;
    /// The value of `code` under `p`.
    fn decode(&self, code: u8, p: GroupParams) -> f32;
    /// `decode(encode(x))`: the value `x` is replaced by.
    #[inline]
    fn quantize(&self, x: f32, p: GroupParams) -> f32 {
        self.decode(self.encode(x, p), p)
    }
    /// Every representable value under `p`, in code order (for plots and brute force).
    /// All `2^code_bits` codes are decoded, so FP8 lists its NaN (and E5M2 its inf) codes
    /// and int8 lists code -128, which the encoder never produces.
    fn levels(&self, p: GroupParams) -> Vec<f32> {
        (0..(1u32 << self.code_bits()))
            .map(|c| self.decode(c as u8, p))
            .collect()
    }
}

/// Groups whose parameters are fitted together ([`Format::fit_span`]): `span` columns made
/// of groups of `group` columns (ggml Q4_K: 256 and 32; Q6_K: 256 and 16).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FitSpan {
    /// Columns fitted together (a multiple of `group`).
    pub span: usize,
    /// Columns per parameter group.
    pub group: usize,
}

/// The number of columns whose parameters are fitted together for `format` with
/// `granularity` on rows of `columns` inputs: the span of [`Format::fit_span`], or the group
/// length ([`Granularity::group_len`]) when the format fits groups alone. A spanning format
/// needs `Granularity::Group(span.group)` and rows of whole spans; the error names `tensor`.
///
/// ```
/// use quantlab_grids::format::fit_span_len;
/// use quantlab_grids::{GgmlGrid, Granularity, UniformGrid};
/// let int4 = UniformGrid::new(4, true).unwrap();
/// assert_eq!(fit_span_len(&int4, Granularity::Group(128), "w", 576).unwrap(), 128);
/// assert_eq!(fit_span_len(&GgmlGrid::Q4_K, Granularity::Group(32), "w", 1536).unwrap(), 256);
/// assert!(fit_span_len(&GgmlGrid::Q4_K, Granularity::Group(32), "w", 576).is_err());
/// assert!(fit_span_len(&GgmlGrid::Q6_K, Granularity::Group(32), "w", 512).is_err());
/// ```
pub fn fit_span_len(
    format: &dyn Format,
    granularity: Granularity,
    tensor: &str,
    columns: usize,
) -> crate::Result<usize> {
    let Some(fs) = format.fit_span() else {
        return Ok(granularity.group_len(columns));
    };
    if granularity != Granularity::Group(fs.group) {
        return Err(crate::GridError::InvalidOption {
            option: "granularity".into(),
            detail: format!(
                "{} of `{tensor}` groups {} columns under one fit of {} columns: use groups of {} (not {granularity:?})",
                format.name(),
                fs.group,
                fs.span,
                fs.group
            ),
        });
    }
    if columns == 0 || columns % fs.span != 0 {
        return Err(crate::GridError::Shape {
            what: format!("tensor `{tensor}`"),
            detail: format!(
                "rows of {columns} values: {} needs whole super-blocks of {} (a multiple of {} columns)",
                format.name(),
                fs.span,
                fs.span
            ),
        });
    }
    Ok(fs.span)
}

/// How weights of an `[out, in]` matrix are grouped to share parameters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Granularity {
    /// One parameter set for the whole tensor.
    PerTensor,
    /// One parameter set per output row (= group size -1 in GPTQ's terms).
    PerChannel,
    /// One parameter set per run of `g` input columns of each row.
    Group(usize),
}

impl Granularity {
    /// From the GPTQ convention: `-1` = whole row, `g > 0` = groups of `g` columns.
    pub fn from_group_size(group_size: i64) -> crate::Result<Self> {
        match group_size {
            -1 => Ok(Self::PerChannel),
            g if g > 0 => Ok(Self::Group(g as usize)),
            g => Err(crate::GridError::InvalidOption {
                option: "group size".into(),
                detail: format!("{g}: use -1 (whole row) or a positive number of columns"),
            }),
        }
    }

    /// The nominal group length in columns for a row of `columns` inputs: `min(g, columns)`
    /// for `Group(g)` (the last group of a row may be shorter, see [`Granularity::n_groups`];
    /// a group wider than the row is the row), the whole row otherwise. Group `gi` holds
    /// the columns (or quantization positions) `p` with `p / group_len == gi`.
    pub fn group_len(&self, columns: usize) -> usize {
        match *self {
            Self::PerTensor | Self::PerChannel => columns,
            Self::Group(g) => g.min(columns),
        }
    }

    /// Number of parameter sets per row for a row of `columns` inputs: `ceil(columns / g)`
    /// for `Group(g)` (as the reference GPTQ and every GPTQ checkpoint: when `g` does not
    /// divide `columns` the last group is short, `columns - (G - 1) g` columns), 1 otherwise
    /// (per tensor: one set shared by every row).
    ///
    /// ```
    /// use quantlab_grids::Granularity;
    /// // SmolLM2's 576-column layers with g = 128: 4 full groups and one of 64
    /// assert_eq!(Granularity::Group(128).n_groups(576), 5);
    /// assert_eq!(Granularity::Group(128).group_range(4, 576), 512..576);
    /// assert_eq!(Granularity::Group(128).n_groups(512), 4);
    /// assert_eq!(Granularity::PerChannel.n_groups(576), 1);
    /// ```
    pub fn n_groups(&self, columns: usize) -> usize {
        match *self {
            Self::PerTensor | Self::PerChannel => 1,
            Self::Group(g) => columns.div_ceil(g.max(1)),
        }
    }

    /// The columns of group `gi` (in quantization order) of a row of `columns` inputs:
    /// `gi g .. min((gi + 1) g, columns)`.
    pub fn group_range(&self, gi: usize, columns: usize) -> std::ops::Range<usize> {
        let g = self.group_len(columns);
        (gi * g).min(columns)..((gi + 1) * g).min(columns)
    }

    /// Check that the granularity fits an `[out, in]` matrix named `tensor`: any positive
    /// group size fits any width (a short last group); only `Group(0)` is refused. Formats
    /// that need exact blocks (ggml blocks of 32, AWQ GEMM packing) check that themselves.
    pub fn check(&self, tensor: &str, columns: usize) -> crate::Result<()> {
        if let Self::Group(g) = *self {
            if g == 0 {
                return Err(crate::GridError::GroupSize {
                    tensor: tensor.into(),
                    group_size: g as i64,
                    columns,
                });
            }
        }
        Ok(())
    }
}
