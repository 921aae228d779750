//! What to do to a model: the method, its number format and solver options, which linears to
//! skip, per-module overrides, calibration sizes. [`QuantizeConfig::plan`] resolves it against
//! a model's shapes into one [`LayerPlan`] per linear and reports every inconsistency before
//! any work is done.
//!
//! # Overrides
//! `--override 'PATTERN:key=value[,key=value...]'` changes the settings of every block linear
//! whose name matches `PATTERN` (later overrides win). A pattern with `*` or `?` is a glob on
//! the full name (`model.layers.*.mlp.down_proj`); any other pattern matches as a substring
//! (`down_proj`, `layers.0.`). Keys: `bits` (an integer the method supports),
//! `group_size` (or `gs`; `-1` = one group per row), `sym` (`true`/`false`), `act_order`
//! (`true`/`false`, GPTQ methods only), `damp` (a fraction >= 0, GPTQ methods only).
//!
//! # Skips
//! `--skip PATTERN` (same matching) leaves the matching linears in full precision. The
//! embeddings, the final norm and `lm_head` are never quantized: they are not linears of the
//! blocks.

use quantlab_grids::{DoubleQuant, FormatSpec, Fp8Kind, Granularity, MseClip, UniformGrid};
use quantlab_models::{LlamaConfig, BLOCK_LINEARS};
use serde::Serialize;

use crate::format::{
    grid_of, is_k_type, k_fallback, type_for_row, ExportFormat, LinearRole, TensorSite,
};
use crate::{PipelineError, Result};

pub use crate::method::{
    AwqOptions, CodebookOptions, GptqOptions, Int8Options, Method, MethodKind,
};

/// One `--override`: a pattern and the settings it changes.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Override {
    /// Substring, or glob when it holds `*` or `?`.
    pub pattern: String,
    /// New bit width.
    pub bits: Option<u32>,
    /// New group size (`-1` = per row).
    pub group_size: Option<i64>,
    /// Symmetric grid or not.
    pub sym: Option<bool>,
    /// GPTQ act-order.
    pub act_order: Option<bool>,
    /// GPTQ damping fraction.
    pub damp: Option<f64>,
}

impl Override {
    /// Parses `PATTERN:key=value[,key=value...]` (see the module documentation).
    ///
    /// ```
    /// use quantlab_pipeline::Override;
    /// let o = Override::parse("down_proj:bits=8,gs=-1").unwrap();
    /// assert_eq!((o.pattern.as_str(), o.bits, o.group_size), ("down_proj", Some(8), Some(-1)));
    /// assert!(Override::parse("down_proj:colour=red").is_err());
    /// ```
    pub fn parse(s: &str) -> Result<Self> {
        let bad = |d: String| PipelineError::option("--override", format!("`{s}`: {d}"));
        let (pattern, rest) = s
            .rsplit_once(':')
            .ok_or_else(|| bad("expected PATTERN:key=value[,key=value...]".into()))?;
        if pattern.is_empty() {
            return Err(bad("empty pattern".into()));
        }
        let mut o = Override {
            pattern: pattern.to_string(),
            bits: None,
            group_size: None,
            sym: None,
            act_order: None,
            damp: None,
        };
        let bool_of = |k: &str, v: &str| -> Result<bool> {
            match v {
                "true" | "1" | "yes" => Ok(true),
                "false" | "0" | "no" => Ok(false),
                _ => Err(bad(format!("`{k}` takes true or false, not `{v}`"))),
            }
        };
        for kv in rest.split(',').filter(|p| !p.trim().is_empty()) {
            let (k, v) = kv
                .split_once('=')
                .ok_or_else(|| bad(format!("`{kv}` is not key=value")))?;
            let (k, v) = (k.trim(), v.trim());
            match k {
                "bits" => {
                    o.bits = Some(
                        v.parse()
                            .map_err(|_| bad(format!("bits `{v}` is not an integer")))?,
                    )
                }
                "group_size" | "gs" | "group-size" => {
                    o.group_size = Some(
                        v.parse()
                            .map_err(|_| bad(format!("group size `{v}` is not an integer")))?,
                    )
                }
                "sym" => o.sym = Some(bool_of(k, v)?),
                "act_order" | "act-order" => o.act_order = Some(bool_of(k, v)?),
                "damp" => {
                    o.damp = Some(
                        v.parse()
                            .map_err(|_| bad(format!("damp `{v}` is not a number")))?,
                    )
                }
                _ => {
                    return Err(bad(format!(
                        "unknown key `{k}` (use bits, group_size, sym, act_order, damp)"
                    )))
                }
            }
        }
        Ok(o)
    }
}

/// Whether `name` matches `pattern`: a glob (`*`, `?`) on the whole name when the pattern
/// holds one of them, otherwise a substring test.
///
/// ```
/// use quantlab_pipeline::config::matches;
/// assert!(matches("down_proj", "model.layers.3.mlp.down_proj"));
/// assert!(matches("model.layers.*.self_attn.?_proj", "model.layers.12.self_attn.q_proj"));
/// assert!(!matches("model.layers.1.*", "model.layers.12.mlp.up_proj"));
/// ```
pub fn matches(pattern: &str, name: &str) -> bool {
    if pattern.contains('*') || pattern.contains('?') {
        glob(pattern.as_bytes(), name.as_bytes())
    } else {
        name.contains(pattern)
    }
}

fn glob(p: &[u8], s: &[u8]) -> bool {
    // iterative wildcard matching with one backtrack point
    let (mut pi, mut si) = (0, 0);
    let (mut star, mut mark) = (None, 0);
    while si < s.len() {
        if pi < p.len() && (p[pi] == b'?' || p[pi] == s[si]) {
            pi += 1;
            si += 1;
        } else if pi < p.len() && p[pi] == b'*' {
            star = Some(pi);
            mark = si;
            pi += 1;
        } else if let Some(st) = star {
            pi = st + 1;
            mark += 1;
            si = mark;
        } else {
            return false;
        }
    }
    while pi < p.len() && p[pi] == b'*' {
        pi += 1;
    }
    pi == p.len()
}

/// Everything that decides what the pipeline does to a model.
#[derive(Clone, Debug, Serialize)]
pub struct QuantizeConfig {
    /// The method, with its own parameters (GPTQ's damping, AWQ's search subset, ...).
    pub method: Method,
    /// Bit width (`None`: the method's default).
    pub bits: Option<u32>,
    /// Group size, `-1` = per row (`None`: the method's default).
    pub group_size: Option<i64>,
    /// Symmetric integer grid (default) or asymmetric.
    pub sym: bool,
    /// The reference GPTQ MSE clipping search of the grid range (uniform grids).
    pub mse: bool,
    /// Linears left in full precision (patterns).
    pub skip: Vec<String>,
    /// Per-module overrides, in order.
    pub overrides: Vec<Override>,
    /// Calibration windows.
    pub nsamples: usize,
    /// Tokens per calibration window.
    pub seqlen: usize,
    /// Seed of the window draw.
    pub seed: u64,
    /// Calibration windows per forward mini-batch.
    pub batch_size: usize,
    /// The checkpoint layout written (`--format`): the project's own directory (default),
    /// GPTQ, AWQ, bitsandbytes or GGUF ([`crate::export::ExportFormat`]). Checked against the
    /// method in [`QuantizeConfig::validate`]; GGUF and GPTQ-onto-bitsandbytes change the
    /// number format the driver quantizes onto ([`QuantizeConfig::spec`]).
    pub format: ExportFormat,
    /// Low memory (`--lazy`): the block linears stay in the memory-mapped model file until
    /// their block is quantized ([`crate::source::SourceModel::load_with`]), and each quantized
    /// linear is kept as its codes and group parameters ([`quantlab_models::CodesLinear`],
    /// dequantized when used) rather than as f32. Resident memory is then about the
    /// embeddings, one block in f32, the codes, and one block's calibration activations, so
    /// a model larger than half the RAM still quantizes; evaluation of the result is slower
    /// (each linear is dequantized on every forward). Same codes as without.
    pub lazy: bool,
    /// An importance matrix in llama.cpp's formats (`--imatrix FILE`, GGUF or legacy `.dat`,
    /// from `quantlab imatrix` or `llama-imatrix`): RTN onto a ggml grid weighs each block's
    /// scale search by it instead of by a calibration capture, as `llama-quantize
    /// --imatrix`. Only with `--method rtn` and `--format gguf:*`, without calibration.
    pub imatrix: Option<std::path::PathBuf>,
    /// Rotate the model before quantizing it (`--rotate hadamard|random`, `--rotate-seed`):
    /// norms folded, the residual stream rotated (R1) and each head's values (R2), fused
    /// into the weights ([`quantlab_models::rotate::rotate_model`]); the model computes the
    /// same function, its output head untied. LLaMA family only; not with `--lazy` or
    /// `--imatrix` (an importance matrix of the unrotated model does not apply).
    pub rotate: Option<Rotation>,
}

/// A rotation of the model before quantization ([`QuantizeConfig::rotate`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Rotation {
    /// Hadamard (QuaRot) or random orthogonal.
    pub kind: quantlab_models::rotate::RotationKind,
    /// Seed of R1's signs (or matrix); R2 uses `seed + 1`.
    pub seed: u64,
}

/// GPTQ's default Hessian shrinkage on ggml's block grids (issue 18; docs/quantize.md,
/// "GPTQ on ggml's grids"): per layer on SmolLM2's Q4_0 grid, calibrated on prose, the
/// output error on technical documentation was 0.0045 (0.25), 0.0044 (0.5), 0.0044 (0.75),
/// 0.0046 (0.9) against 0.0051 for weighted RTN and 0.0055 unshrunk, while on held-out prose
/// it grows with the shrinkage (0.0022, 0.0024, 0.0027, 0.0032; weighted RTN 0.0049).
pub const DEFAULT_GGML_HESSIAN_SHRINK: f64 = 0.5;

/// GPTQ's default Hessian shrinkage on ggml's K grids (Q2_K..Q6_K; issue 18). Measured on
/// SmolLM2's `ffn_down` (the only linears whose rows hold whole 256-weight super-blocks),
/// blocks 4, 8, ..., 28, calibrated on prose and scored on technical documentation: at 0.5
/// GPTQ lost to weighted RTN on most of them, at 0.9 it is below weighted RTN on 6-7 of the
/// 7 on every K grid (docs/quantize.md, "GPTQ on ggml's block grids"). On other prose it
/// still halves most of RTN's error at 0.9.
pub const DEFAULT_GGML_K_HESSIAN_SHRINK: f64 = 0.9;

/// The default Hessian shrinkage of GPTQ on the ggml grid `g`:
/// [`DEFAULT_GGML_K_HESSIAN_SHRINK`] on the K grids, [`DEFAULT_GGML_HESSIAN_SHRINK`] else.
pub fn default_ggml_hessian_shrink(g: quantlab_grids::GgmlGrid) -> f64 {
    if quantlab_grids::GgmlGrid::K.contains(&g) {
        DEFAULT_GGML_K_HESSIAN_SHRINK
    } else {
        DEFAULT_GGML_HESSIAN_SHRINK
    }
}

impl Default for QuantizeConfig {
    fn default() -> Self {
        Self {
            method: Method::gptq(),
            bits: None,
            group_size: None,
            sym: true,
            mse: false,
            skip: Vec::new(),
            overrides: Vec::new(),
            nsamples: 128,
            seqlen: 512,
            seed: 0,
            batch_size: 8,
            format: ExportFormat::Quantlab,
            lazy: false,
            imatrix: None,
            rotate: None,
        }
    }
}

/// The resolved settings of one linear.
#[derive(Clone, Debug, Serialize)]
pub struct LayerPlan {
    /// Full name, `model.layers.3.mlp.down_proj`.
    pub name: String,
    /// Block index.
    pub block: usize,
    /// Index into [`BLOCK_LINEARS`].
    pub kind: usize,
    /// `(out, in)`.
    pub shape: (usize, usize),
    /// Left in full precision.
    pub skip: bool,
    /// Bit width.
    pub bits: u32,
    /// Group size (`-1` = per row).
    pub group_size: i64,
    /// Symmetric grid.
    pub sym: bool,
    /// GPTQ act-order.
    pub act_order: bool,
    /// GPTQ static groups (every group's parameters fitted from the original weights before
    /// the sweep).
    pub static_groups: bool,
    /// GPTQ damping fraction.
    pub damp: f64,
    /// The number format.
    pub spec: FormatSpec,
    /// How weights share parameters.
    pub granularity: Granularity,
}

impl LayerPlan {
    /// Bits per weight this layer will cost (codes + parameters; without an act-order
    /// `g_idx` or double quantization).
    pub fn estimated_bits_per_weight(&self) -> f64 {
        if self.skip {
            return 16.0;
        }
        let f = self.spec.build();
        let (out, inp) = self.shape;
        let groups = match self.granularity {
            Granularity::PerTensor => 1.0 / out as f64,
            // a short last group costs a whole parameter set
            _ => inp.div_ceil(self.granularity.group_len(inp)) as f64,
        };
        f.code_bits() as f64 + f.param_bits() * groups / inp as f64
    }
}

/// The whole plan: one entry per block linear, in forward order.
#[derive(Clone, Debug, Serialize)]
pub struct Plan {
    /// The method.
    pub method: Method,
    /// Bits (after defaults).
    pub bits: u32,
    /// Group size (after defaults).
    pub group_size: i64,
    /// Per linear.
    pub layers: Vec<LayerPlan>,
    /// Notes about what the method will and will not do on this model.
    pub notes: Vec<String>,
}

impl QuantizeConfig {
    /// The Hessian shrinkage GPTQ uses on `spec`: [`GptqOptions::hessian_shrink`], else
    /// [`DEFAULT_GGML_K_HESSIAN_SHRINK`] on ggml's K grids, [`DEFAULT_GGML_HESSIAN_SHRINK`]
    /// on its other block grids and 0 elsewhere.
    pub fn hessian_shrink_for(&self, spec: &quantlab_grids::FormatSpec) -> f64 {
        let set = self.method.gptq_options().and_then(|g| g.hessian_shrink);
        set.unwrap_or(match spec {
            quantlab_grids::FormatSpec::Ggml(g) => default_ggml_hessian_shrink(*g),
            _ => 0.0,
        })
    }

    /// Checks the options that do not depend on the model.
    pub fn validate(&self) -> Result<()> {
        let m = self.method;
        if self.rotate.is_some() {
            if self.lazy {
                return Err(PipelineError::option(
                    "--rotate",
                    "rotates every weight in memory before quantizing; not with --lazy",
                ));
            }
            if self.imatrix.is_some() {
                return Err(PipelineError::option(
                    "--rotate",
                    "an importance matrix (--imatrix) holds the unrotated model's input statistics; calibrate instead (--calib)",
                ));
            }
        }
        if self.imatrix.is_some() {
            if m != Method::Rtn {
                return Err(PipelineError::option(
                    "--imatrix",
                    format!("weighs --method rtn on --format gguf:* (as llama-quantize --imatrix), not {m}: GPTQ and AWQ take their statistics from --calib"),
                ));
            }
            if !matches!(self.format, ExportFormat::Gguf(f) if f.ty.is_quantized()) {
                return Err(PipelineError::option(
                    "--imatrix",
                    "weighs the block scales of ggml's grids: use it with --format gguf:<type> (e.g. gguf:q4_0)",
                ));
            }
        }
        let bits = self.bits.unwrap_or(m.default_bits());
        if !m.supports_bits(bits) {
            return Err(PipelineError::option(
                "--bits",
                format!(
                    "{bits} is not supported by {m} (use {})",
                    m.supported_bits()
                ),
            ));
        }
        m.validate()?;
        if self.mse && !m.is_uniform() {
            return Err(PipelineError::option(
                "--mse",
                format!("the MSE range search is for integer grids, not {m}"),
            ));
        }
        if !self.sym && !m.is_uniform() {
            return Err(PipelineError::option(
                "--asym",
                format!("{m} has no zero point (it is symmetric by construction)"),
            ));
        }
        if let Some(g) = self.group_size {
            Granularity::from_group_size(g).map_err(|_| {
                PipelineError::option(
                    "--group-size",
                    format!("{g}: use -1 (one group per row) or a positive number of columns"),
                )
            })?;
            if matches!(m, Method::Int8(_) | Method::Fp8) && g != -1 {
                return Err(PipelineError::option(
                    "--group-size",
                    format!("{m} has one scale per output row: use -1 (or leave it out), not {g}"),
                ));
            }
        }
        if self.nsamples == 0 {
            return Err(PipelineError::option(
                "--nsamples",
                "0: use at least 1 calibration window",
            ));
        }
        if self.seqlen < 2 {
            return Err(PipelineError::option(
                "--seqlen",
                format!("{}: use at least 2 tokens", self.seqlen),
            ));
        }
        if self.batch_size == 0 {
            return Err(PipelineError::option(
                "--batch-size",
                "0: use at least 1 window per batch",
            ));
        }
        self.format.check_config(self)?;
        for o in &self.overrides {
            if let Some(b) = o.bits {
                if !m.supports_bits(b) {
                    return Err(PipelineError::option(
                        "--override",
                        format!(
                            "`{}`: {b} bits are not supported by {m} (use {})",
                            o.pattern,
                            m.supported_bits()
                        ),
                    ));
                }
            }
            if (o.act_order.is_some() || o.damp.is_some()) && !m.uses_gptq() {
                return Err(PipelineError::option(
                    "--override",
                    format!(
                        "`{}`: act_order and damp are GPTQ settings; {m} does not use them",
                        o.pattern
                    ),
                ));
            }
            if o.sym == Some(false) && !m.is_uniform() {
                return Err(PipelineError::option(
                    "--override",
                    format!("`{}`: {m} has no zero point", o.pattern),
                ));
            }
            if let Some(g) = o.group_size {
                if g == 0 || g < -1 || (matches!(m, Method::Int8(_) | Method::Fp8) && g != -1) {
                    return Err(PipelineError::option(
                        "--override",
                        format!("`{}`: group size {g} is not valid for {m}", o.pattern),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Resolves the settings of every block linear of a model with `cfg`; errors before any
    /// work on options that do not fit (bits, group sizes that do not divide a layer's input
    /// width, patterns that match nothing).
    ///
    /// ```
    /// use quantlab_pipeline::{Method, QuantizeConfig};
    /// let json = r#"{"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 96,
    ///   "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 300}"#;
    /// let mc = quantlab_models::LlamaConfig::from_hf_json(json, "config.json").unwrap();
    /// let cfg = QuantizeConfig { method: Method::Rtn, group_size: Some(32), ..Default::default() };
    /// let plan = cfg.plan(&mc).unwrap();
    /// assert_eq!(plan.layers.len(), 14);
    /// // 4-bit codes plus one f16 scale per 32 weights
    /// assert!((plan.layers[0].estimated_bits_per_weight() - 4.5).abs() < 1e-12);
    /// // integer grids take a short last group: down_proj's 96 columns are groups of 64 + 32
    /// let ragged = QuantizeConfig { group_size: Some(64), ..cfg.clone() };
    /// let p = ragged.plan(&mc).unwrap();
    /// assert!((p.layers[6].estimated_bits_per_weight() - (4.0 + 2.0 * 16.0 / 96.0)).abs() < 1e-12);
    /// // bitsandbytes' flat blocks cannot be ragged
    /// let bad = QuantizeConfig { method: Method::nf4(), group_size: Some(64), ..cfg };
    /// assert!(bad.plan(&mc).unwrap_err().to_string().contains("down_proj"));
    /// ```
    pub fn plan(&self, mc: &LlamaConfig) -> Result<Plan> {
        let m = self.method;
        let d = mc.hidden_size;
        let q_out = mc.num_attention_heads * mc.head_dim;
        let kv_out = mc.num_key_value_heads * mc.head_dim;
        let shapes = [
            (q_out, d),
            (kv_out, d),
            (kv_out, d),
            (d, q_out),
            (mc.intermediate_size, d),
            (mc.intermediate_size, d),
            (d, mc.intermediate_size),
        ];
        let linears: Vec<(String, usize, usize, (usize, usize))> = (0..mc.num_hidden_layers)
            .flat_map(|block| {
                BLOCK_LINEARS.iter().enumerate().map(move |(kind, l)| {
                    (
                        format!("model.layers.{block}.{l}"),
                        block,
                        kind,
                        shapes[kind],
                    )
                })
            })
            .collect();
        let mut notes = Vec::new();
        if m.uses_awq() && mc.num_key_value_heads != mc.num_attention_heads {
            notes.push(format!(
                "AWQ: v_proj -> o_proj scaling skipped: the model uses grouped-query attention ({} KV heads for {} heads)",
                mc.num_key_value_heads, mc.num_attention_heads
            ));
        }
        if let Some(r) = &self.rotate {
            notes.push(format!(
                "rotated ({}, seed {}): norms folded into the linears, the residual stream ({}) and each head's values ({}) rotated, the output head written as its own tensor",
                r.kind.name(),
                r.seed,
                mc.hidden_size,
                mc.head_dim
            ));
        }
        let n_gqa = (mc.num_attention_heads / mc.num_key_value_heads.max(1)).max(1);
        self.build_plan(&linears, "model.layers.0.mlp.down_proj", notes, n_gqa)
    }

    /// The architecture-independent part of [`QuantizeConfig::plan`]: resolves defaults, skips
    /// and overrides for `linears` given as `(full name, block, index within the block,
    /// (out, in))` in forward order. `example` is a linear name shown when a pattern matches
    /// nothing.
    pub fn plan_linears(
        &self,
        linears: &[(String, usize, usize, (usize, usize))],
        example: &str,
    ) -> Result<Plan> {
        self.build_plan(linears, example, Vec::new(), 1)
    }

    /// [`QuantizeConfig::plan_linears`] with the architecture's notes first. Each linear's
    /// settings are final when it enters the plan: the method's defaults, then the skips and
    /// overrides, then the format's rule for that linear ([`ExportFormat::fit_layer`]).
    /// `n_gqa`: query heads per key/value head (llama.cpp's GGUF type rules read it).
    fn build_plan(
        &self,
        linears: &[(String, usize, usize, (usize, usize))],
        example: &str,
        mut notes: Vec<String>,
        n_gqa: usize,
    ) -> Result<Plan> {
        self.validate()?;
        let m = self.method;
        let bits = self.bits.unwrap_or(m.default_bits());
        let group_size = self.group_size.unwrap_or(
            self.format
                .default_group_size(m)
                .unwrap_or(m.default_group_size()),
        );
        let mut layers = Vec::new();
        let mut used_skip = vec![false; self.skip.len()];
        let mut used_override = vec![false; self.overrides.len()];
        let n_layer = linears.iter().map(|l| l.1 + 1).max().unwrap_or(0);
        let has_imatrix = m.needs_calibration() || self.imatrix.is_some();
        {
            for (name, block, kind, shape) in linears {
                let (name, block, kind, shape) = (name.clone(), *block, *kind, *shape);
                let mut skip = false;
                for (i, p) in self.skip.iter().enumerate() {
                    if matches(p, &name) {
                        skip = true;
                        used_skip[i] = true;
                    }
                }
                let gptq = m.gptq_options().copied().unwrap_or_default();
                let (mut b, mut g, mut sym, mut ao, mut damp) =
                    (bits, group_size, self.sym, gptq.act_order, gptq.damp);
                for (i, o) in self.overrides.iter().enumerate() {
                    if matches(&o.pattern, &name) {
                        used_override[i] = true;
                        b = o.bits.unwrap_or(b);
                        g = o.group_size.unwrap_or(g);
                        sym = o.sym.unwrap_or(sym);
                        ao = o.act_order.unwrap_or(ao);
                        damp = o.damp.unwrap_or(damp);
                    }
                }
                let granularity = Granularity::from_group_size(g)?;
                // Integer grids allow a short last group (`ceil(in / g)` groups, as
                // reference GPTQ and every GPTQ checkpoint do); the bitsandbytes codebooks
                // store flat blocks, which a ragged row would misalign.
                if !skip && !m.is_uniform() {
                    if let Granularity::Group(gl) = granularity {
                        if shape.1 % gl != 0 {
                            return Err(PipelineError::option(
                                "--group-size",
                                format!(
                                    "{gl} does not divide the {} input columns of `{name}`; {m} stores flat blocks, so use a divisor of {} (or -1), or --skip / --override it",
                                    shape.1, shape.1
                                ),
                            ));
                        }
                    }
                }
                let spec = self.spec(b, sym)?;
                let site = TensorSite {
                    role: LinearRole::of(&name),
                    layer: block,
                    n_layer,
                    n_gqa,
                    has_imatrix,
                };
                layers.push(self.format.fit_layer(
                    LayerPlan {
                        name,
                        block,
                        kind,
                        shape,
                        skip,
                        bits: b,
                        group_size: g,
                        sym,
                        act_order: ao,
                        static_groups: gptq.static_groups,
                        damp,
                        spec,
                        granularity,
                    },
                    &site,
                )?);
            }
        }
        if let Some(i) = used_skip.iter().position(|u| !u) {
            return Err(PipelineError::option(
                "--skip",
                format!(
                    "`{}` matches no linear of the blocks (names look like {example})",
                    self.skip[i]
                ),
            ));
        }
        if let Some(i) = used_override.iter().position(|u| !u) {
            return Err(PipelineError::option(
                "--override",
                format!(
                    "`{}` matches no linear of the blocks",
                    self.overrides[i].pattern
                ),
            ));
        }
        if m.kind() == MethodKind::AwqGptq {
            notes.push("awq+gptq: AWQ scales only (no clipping: GPTQ fits each group's range itself; add --mse for a range search), then true-sequential GPTQ on the scaled weights".into());
        }
        if !m.needs_calibration() {
            notes.push(format!("{m}: data-free without calibration (errors measured on the weights); with calibration text it measures each layer's output error (one capture per block) and, on ggml grids, weights each block's scale by the inputs' importance"));
        }
        notes.extend(self.format.plan_notes(m, &layers, self.imatrix.as_deref()));
        Ok(Plan {
            method: m,
            bits,
            group_size,
            layers,
            notes,
        })
    }

    /// The number format for `bits` / `sym` under this method.
    pub fn spec(&self, bits: u32, sym: bool) -> Result<FormatSpec> {
        if let Some(s) = self.format.spec_override(self.method) {
            return Ok(s);
        }
        Ok(match self.method {
            Method::Nf4(_) => FormatSpec::Nf4,
            Method::Fp4(_) => FormatSpec::Fp4,
            Method::Int8(_) => FormatSpec::Int8,
            Method::Fp8 => FormatSpec::Fp8(Fp8Kind::E4M3),
            _ => {
                let g = UniformGrid::new(bits, sym)?;
                FormatSpec::Uniform(if self.mse {
                    g.with_clip(MseClip::default())
                } else {
                    g
                })
            }
        })
    }

    /// Double quantization settings when on ([`CodebookOptions::double_quant`]).
    pub fn double_quant(&self) -> Option<DoubleQuant> {
        self.method.double_quant().then(DoubleQuant::default)
    }
}

impl ExportFormat {
    /// Checks the format against the method and options (no model needed); called by
    /// [`QuantizeConfig::validate`], so before any work.
    pub fn check_config(&self, c: &QuantizeConfig) -> Result<()> {
        let m = c.method;
        let gptq = m.gptq_options().copied().unwrap_or_default();
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
                    if gptq.act_order {
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
                    MethodKind::Nf4
                } else {
                    MethodKind::Fp4
                };
                if m.kind() != own && m.kind() != MethodKind::Gptq {
                    return bad(format!("stores {own} codes: use --method {own} (round to nearest) or --method gptq (GPTQ on the {own} grid), not {m}"));
                }
                if m.kind() == MethodKind::Gptq {
                    if bits != 4 {
                        return bad(format!("4-bit codes, not {bits}"));
                    }
                    if !c.sym || c.mse {
                        return bad(
                            "the codebook has no zero point or range search: drop --asym / --mse"
                                .into(),
                        );
                    }
                    if gptq.act_order && !gptq.static_groups {
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
                if m.kind() != MethodKind::Int8 {
                    return bad(format!("stores LLM.int8 rows: use --method int8, not {m}"));
                }
                Ok(())
            }
            Self::Gguf(f) => {
                let t = f.ty;
                if !matches!(m, Method::Rtn | Method::Gptq(_)) {
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
                if gptq.act_order && !gptq.static_groups {
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

    /// The format's rule for one linear, applied as the plan is built (after the method's
    /// defaults, skips and overrides): the per-layer GGUF grid (K types: the K grid with
    /// groups of its sub-blocks for rows that are multiples of 256, the fallback grid for
    /// shorter rows; a float type quantizes nothing; the type of a GGUF file type's linear
    /// by llama.cpp's rule for `site`, [`crate::format::GgufFile::tensor_type`]), and the
    /// shape checks the format needs, each naming the linear.
    pub fn fit_layer(&self, mut lp: LayerPlan, site: &TensorSite) -> Result<LayerPlan> {
        let fname = self.name();
        let bad = |name: &str, d: String| {
            Err(PipelineError::option(
                "--format",
                format!("{fname}: linear `{name}` {d}"),
            ))
        };
        let (out, inp) = lp.shape;
        match *self {
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
            ExportFormat::Gguf(f) => {
                if !f.ty.is_quantized() {
                    lp.skip = true;
                    return Ok(lp);
                }
                if lp.skip {
                    return Ok(lp);
                }
                let lt = type_for_row(f.tensor_type(site), inp);
                if inp % 32 != 0 {
                    return bad(
                        &lp.name,
                        format!("has rows of {inp} values: ggml blocks need a multiple of 32"),
                    );
                }
                let Some(g) = grid_of(lt) else {
                    return bad(&lp.name, format!("cannot be quantized to {}", lt.name()));
                };
                lp.spec = FormatSpec::Ggml(g);
                lp.granularity = Granularity::Group(g.group_len());
                lp.group_size = g.group_len() as i64;
                lp.bits = quantlab_grids::Format::code_bits(&g);
                lp.sym = true;
                // K grids: GPTQ in the natural column order, each super-block fitted as the
                // sweep reaches it (issue 18: act-order with super-blocks fitted up front
                // from the original weights loses to weighted RTN on held-out text; the
                // natural order with shrinkage 0.9 is below it on every K grid)
                if g.is_k() {
                    lp.act_order = false;
                    lp.static_groups = false;
                }
            }
        }
        Ok(lp)
    }

    /// What the plan's notes say about this format, given its final layers.
    fn plan_notes(
        &self,
        m: Method,
        layers: &[LayerPlan],
        imatrix: Option<&std::path::Path>,
    ) -> Vec<String> {
        let mut notes = Vec::new();
        let ExportFormat::Gguf(f) = *self else {
            return notes;
        };
        let t = f.ty;
        let fname = self.name();
        if !t.is_quantized() {
            notes.push(format!(
                "{fname}: nothing is quantized; every tensor is written as {}",
                t.name()
            ));
            return notes;
        }
        let mut counts: Vec<(&'static str, usize)> = Vec::new();
        for l in layers.iter().filter(|l| !l.skip) {
            if let FormatSpec::Ggml(g) = l.spec {
                match counts.iter_mut().find(|(n, _)| *n == g.ggml_name()) {
                    Some(c) => c.1 += 1,
                    None => counts.push((g.ggml_name(), 1)),
                }
            }
        }
        let by_type = counts
            .iter()
            .map(|(n, c)| format!("{c} x {n}"))
            .collect::<Vec<_>>()
            .join(", ");
        let rule = match (f.pure, f.mix) {
            (true, _) => "--pure: every block linear of the base type".to_string(),
            (false, crate::format::GgufMix::Pure) => format!("every block linear {} where its rows allow", t.name()),
            (false, _) => format!(
                "llama.cpp's per-tensor rule for {} (attn_v / ffn_down / attn_output raised by layer)",
                f.name().to_ascii_uppercase()
            ),
        };
        let fallback = if is_k_type(t) || f.mix != crate::format::GgufMix::Pure {
            format!(
                "; rows that are not whole 256-weight super-blocks of a K type fall back as llama.cpp: Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0, Q2_K / Q3_K -> {}",
                k_fallback(quantlab_checkpoints::gguf::GgmlType::Q2_K).name()
            )
        } else {
            String::new()
        };
        notes.push(format!(
            "{fname}: block linears {by_type} ({rule}{fallback})"
        ));
        let k_layers = layers
            .iter()
            .filter(|l| !l.skip && matches!(l.spec, FormatSpec::Ggml(g) if g.is_k()))
            .count();
        if k_layers > 0 {
            notes.push(format!(
                "{fname}: {k_layers} linears are on K grids (each super-block's d, dmin and sub-block scales fitted together, {m} method)"
            ));
            if m.uses_gptq() {
                notes.push(format!("{fname}: GPTQ runs the K-grid linears in the natural column order, each super-block fitted when the sweep reaches it, whatever --act-order / --static-groups say (measured better on held-out text; docs/quantize.md, issue 18), with the Hessian shrunk by {DEFAULT_GGML_K_HESSIAN_SHRINK} unless --hessian-shrink is given"));
            }
        }
        if m == Method::Rtn {
            notes.push(match imatrix {
                Some(f) => format!("{fname}: rtn fits each block's scale with the importance matrix of {} (as llama-quantize --imatrix); no calibration pass", f.display()),
                None => format!("{fname}: rtn fits each block's scale with the importance matrix diag(X^T X) of the calibration capture when calibration text is given (llama.cpp's imatrix), by ggml's plain fit without it"),
            });
        }
        notes
    }
}
