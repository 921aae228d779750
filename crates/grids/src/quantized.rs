//! The hand-off type between solvers, models and checkpoint formats.

use crate::codebook::Codebook;
use crate::double_quant::{DoubleQuant, NestedScales};
use crate::format::{Format, Granularity, GroupParams};
use crate::fp8::{Fp8Format, Fp8Kind};
use crate::ggml::GgmlGrid;
use crate::int8::Int8Absmax;
use crate::uniform::UniformGrid;
use crate::{GridError, Result};
use ndarray::{Array2, ArrayView2};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

/// A serialisable description of a number format; [`FormatSpec::build`] gives the
/// implementation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum FormatSpec {
    /// Uniform affine grid (GPTQ/AWQ/RTN integer formats).
    Uniform(UniformGrid),
    /// QLoRA's NF4 codebook with absmax scaling ([`Codebook::nf4`]); bitsandbytes uses
    /// blocks of 64: `Granularity::Group(64)`.
    Nf4,
    /// bitsandbytes' FP4 codebook with absmax scaling ([`Codebook::fp4`]).
    Fp4,
    /// FP8 with an f32 scale per tensor or per channel ([`Fp8Format`]).
    Fp8(Fp8Kind),
    /// LLM.int8() absmax int8, `SCB` per row with `Granularity::PerChannel` ([`Int8Absmax`]).
    Int8,
    /// A ggml block format with `Granularity::Group(grid.group_len())`: legacy (Q4_0 ..
    /// Q8_0) each group is one ggml block, its parameters the block's f16 `d` (and `m`); K
    /// types (Q2_K .. Q6_K) each group is a sub-block of a 256-weight super-block fitted at
    /// once ([`GgmlGrid`], [`crate::ggml_k`]).
    Ggml(GgmlGrid),
}

impl FormatSpec {
    /// The format implementation.
    ///
    /// ```
    /// use quantlab_grids::{FormatSpec, Format, GroupParams};
    /// let nf4 = FormatSpec::Nf4.build();
    /// assert_eq!((nf4.name(), nf4.code_bits()), ("nf4".to_string(), 4));
    /// assert_eq!(nf4.quantize(-0.7, GroupParams::scale_only(1.0)), -0.6961928);
    /// ```
    pub fn build(&self) -> Box<dyn Format> {
        match self {
            FormatSpec::Uniform(g) => Box::new(*g),
            FormatSpec::Nf4 => Box::new(Codebook::nf4()),
            FormatSpec::Fp4 => Box::new(Codebook::fp4()),
            FormatSpec::Fp8(kind) => Box::new(Fp8Format { kind: *kind }),
            FormatSpec::Int8 => Box::new(Int8Absmax),
            FormatSpec::Ggml(g) => Box::new(*g),
        }
    }

    /// Check the settings (a spec read from a file bypasses the constructors).
    pub fn validate(&self) -> Result<()> {
        match self {
            FormatSpec::Uniform(g) => g.validate(),
            _ => Ok(()),
        }
    }
}

/// Bits spent on a quantized matrix, split by what they store.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct BitsAccounting {
    /// Number of weights.
    pub weights: u64,
    /// Bits of the codes.
    pub code_bits: f64,
    /// Bits of the scales and zero points (after double quantization, if any).
    pub param_bits: f64,
    /// Bits of a non-trivial `g_idx` (act-order permutation), 32 per input column; 0 when
    /// `g_idx[k] = k / g`.
    pub index_bits: f64,
}

impl BitsAccounting {
    /// All bits.
    pub fn total_bits(&self) -> f64 {
        self.code_bits + self.param_bits + self.index_bits
    }
    /// Average bits per weight, everything included.
    pub fn bits_per_weight(&self) -> f64 {
        self.total_bits() / self.weights as f64
    }
}

/// A quantized `[out, in]` linear layer: codes plus the parameters of each group.
///
/// `codes[[r, k]]` is the code of weight `(r, k)` in the original column order; its group is
/// `g_idx[k]`, whose parameters are `scales[[r, g_idx[k]]]` and `zeros[[r, g_idx[k]]]`.
/// With double quantization (`nested` is `Some`), `scales` holds the reconstructed
/// (double-quantized) scales, so every method decodes with the values a loader would use.
#[derive(Clone, Debug)]
pub struct QuantizedLinear {
    /// The number format.
    pub spec: FormatSpec,
    /// How weights share parameters.
    pub granularity: Granularity,
    /// `[out, in]` codes, original column order.
    pub codes: Array2<u8>,
    /// `[out, n_groups]` scales (step, absmax or FP8 scale).
    pub scales: Array2<f32>,
    /// `[out, n_groups]` zero points in code units (0 for formats without one).
    pub zeros: Array2<f32>,
    /// Group of each input column.
    pub g_idx: Vec<u32>,
    /// The 8-bit codes of the scales when double-quantized (QLoRA), row-major over `scales`.
    pub nested: Option<NestedScales>,
}

impl QuantizedLinear {
    /// Assemble and check the parts.
    pub fn from_parts(
        spec: FormatSpec,
        granularity: Granularity,
        codes: Array2<u8>,
        scales: Array2<f32>,
        zeros: Array2<f32>,
        g_idx: Vec<u32>,
    ) -> Result<Self> {
        spec.validate()?;
        let (out, inp) = codes.dim();
        let shape_err = |detail: String| GridError::Shape {
            what: "QuantizedLinear".into(),
            detail,
        };
        if scales.dim() != zeros.dim() || scales.nrows() != out {
            return Err(shape_err(format!(
                "codes {:?}, scales {:?}, zeros {:?}",
                codes.dim(),
                scales.dim(),
                zeros.dim()
            )));
        }
        if g_idx.len() != inp {
            return Err(shape_err(format!(
                "g_idx has {} entries for {inp} columns",
                g_idx.len()
            )));
        }
        if let Some(&bad) = g_idx.iter().find(|&&g| g as usize >= scales.ncols()) {
            return Err(shape_err(format!(
                "g_idx names group {bad} of {}",
                scales.ncols()
            )));
        }
        let bits = spec.build().code_bits();
        if bits < 8 {
            if let Some(&c) = codes.iter().find(|&&c| u32::from(c) >> bits != 0) {
                return Err(GridError::InvalidOption {
                    option: "codes".into(),
                    detail: format!("code {c} does not fit the {bits} bits of the format"),
                });
            }
        }
        Ok(Self {
            spec,
            granularity,
            codes,
            scales,
            zeros,
            g_idx,
            nested: None,
        })
    }

    /// Double-quantize the scales (QLoRA): the scales, row-major, are replaced by their
    /// reconstruction from 8-bit dynamic codes in blocks of `dq.blocksize`, and `nested`
    /// keeps the codes. Errors for per-tensor granularity (one scale: nothing to gain), when
    /// already double-quantized, or on non-finite scales.
    ///
    /// ```
    /// use ndarray::Array2;
    /// use quantlab_grids::{double_quant::DoubleQuant, quantize_rtn, FormatSpec, Granularity};
    /// let w = Array2::from_shape_fn((128, 256), |(r, k)| ((r * 7 + k * 13) % 17) as f32 - 8.0);
    /// let q = quantize_rtn("w", w.view(), &FormatSpec::Nf4, Granularity::Group(64)).unwrap();
    /// assert_eq!(q.bits_per_weight(), 4.0 + 32.0 / 64.0);
    /// let dq = q.with_double_quant(DoubleQuant::default()).unwrap();
    /// // 512 scales: 8 bits each, 2 nested f32 absmax, 1 f32 offset
    /// let expected = 4.0 + (8.0 * 512.0 + 32.0 * 2.0 + 32.0) / (128.0 * 256.0);
    /// assert!((dq.bits_per_weight() - expected).abs() < 1e-12);
    /// ```
    pub fn with_double_quant(mut self, dq: DoubleQuant) -> Result<Self> {
        if self.nested.is_some() {
            return Err(GridError::InvalidOption {
                option: "double quantization".into(),
                detail: "the scales are already double-quantized".into(),
            });
        }
        if self.granularity == Granularity::PerTensor {
            return Err(GridError::InvalidOption {
                option: "double quantization".into(),
                detail: "needs per-channel or per-group scales, not one per tensor".into(),
            });
        }
        let flat: Vec<f32> = self.scales.iter().copied().collect();
        let nested = dq.quantize_absmax(&flat)?;
        let back = nested.dequantize();
        self.scales =
            Array2::from_shape_vec(self.scales.dim(), back).expect("as many scales as before");
        self.nested = Some(nested);
        Ok(self)
    }

    /// Mean squared error of the dequantized weight against `w` (same shape; a mismatch is a
    /// caller bug and panics).
    ///
    /// ```
    /// use ndarray::array;
    /// use quantlab_grids::{quantize_rtn, FormatSpec, Granularity, UniformGrid};
    /// let w = array![[0.0f32, 0.4, 1.0, 1.5]];
    /// let spec = FormatSpec::Uniform(UniformGrid::new(2, false).unwrap());
    /// let q = quantize_rtn("w", w.view(), &spec, Granularity::PerChannel).unwrap();
    /// // step 0.5: levels 0, 0.5, 1, 1.5; only 0.4 moves, by 0.1
    /// assert!((q.mse(w.view()) - 0.01 / 4.0).abs() < 1e-7);
    /// ```
    #[track_caller]
    pub fn mse(&self, w: ArrayView2<f32>) -> f32 {
        assert_eq!(
            w.dim(),
            self.shape(),
            "mse: weight shape differs from the codes"
        );
        let d = self.dequantize();
        let sum: f64 = d
            .iter()
            .zip(w.iter())
            .map(|(&a, &b)| {
                let e = (a - b) as f64;
                e * e
            })
            .sum();
        (sum / w.len().max(1) as f64) as f32
    }

    /// `(out, in)`.
    pub fn shape(&self) -> (usize, usize) {
        self.codes.dim()
    }

    /// Number of parameter groups per row.
    pub fn n_groups(&self) -> usize {
        self.scales.ncols()
    }

    /// Parameters of weight `(r, k)`.
    #[inline]
    pub fn params(&self, r: usize, k: usize) -> GroupParams {
        let g = self.g_idx[k] as usize;
        GroupParams {
            scale: self.scales[[r, g]],
            zero: self.zeros[[r, g]],
        }
    }

    /// The dequantized `[out, in]` weight.
    pub fn dequantize(&self) -> Array2<f32> {
        let f = self.spec.build();
        Array2::from_shape_fn(self.codes.dim(), |(r, k)| {
            f.decode(self.codes[[r, k]], self.params(r, k))
        })
    }

    /// Whether `g_idx` is the trivial `k / group_len`.
    pub fn g_idx_is_trivial(&self) -> bool {
        let (_, inp) = self.shape();
        let g = self.granularity.group_len(inp);
        self.g_idx
            .iter()
            .enumerate()
            .all(|(k, &gi)| gi as usize == k / g || self.n_groups() == 1 && gi == 0)
    }

    /// Exact bits spent: codes, parameters (one set per tensor, row or group) and a
    /// non-trivial `g_idx`. With double quantization a scale costs 8 bits, plus 32 bits per
    /// nested block and 32 bits for the offset (zero points, if any, are unchanged).
    ///
    /// ```
    /// use ndarray::Array2;
    /// use quantlab_grids::{quantize_rtn, FormatSpec, Granularity, UniformGrid};
    /// let w = Array2::from_shape_fn((8, 256), |(r, k)| (r as f32 - k as f32).sin());
    /// let sym = FormatSpec::Uniform(UniformGrid::new(4, true).unwrap());
    /// let q = quantize_rtn("w", w.view(), &sym, Granularity::Group(128)).unwrap();
    /// assert_eq!(q.bits_per_weight(), 4.0 + 16.0 / 128.0); // f16 scale per 128 weights
    /// ```
    pub fn bits(&self) -> BitsAccounting {
        let (out, inp) = self.shape();
        let f = self.spec.build();
        let sets = match self.granularity {
            Granularity::PerTensor => 1,
            _ => out * self.n_groups(),
        };
        let param_bits = match &self.nested {
            None => sets as f64 * f.param_bits(),
            Some(n) => {
                sets as f64 * (f.param_bits() - f.scale_bits())
                    + 8.0 * n.codes.len() as f64
                    + 32.0 * n.nested_absmax.len() as f64
                    + 32.0
            }
        };
        BitsAccounting {
            weights: (out * inp) as u64,
            code_bits: (out * inp) as f64 * f.code_bits() as f64,
            param_bits,
            index_bits: if self.g_idx_is_trivial() {
                0.0
            } else {
                32.0 * inp as f64
            },
        }
    }

    /// Average bits per weight, everything included.
    pub fn bits_per_weight(&self) -> f64 {
        self.bits().bits_per_weight()
    }
}

/// Round-to-nearest of a whole `[out, in]` matrix onto `spec` with the given granularity.
///
/// The reference for every solver: each group's parameters come from `Format::fit` on the
/// group's weights, each weight is encoded independently. Rows run in parallel (rayon).
/// `name` is used in errors: non-finite weights, a group size of 0, an invalid spec, an
/// empty matrix. `Group(g)` with `g` not dividing `in` gives `ceil(in / g)` groups per row,
/// the last one short (as GPTQ checkpoints).
///
/// ```
/// use ndarray::array;
/// use quantlab_grids::{quantize_rtn, FormatSpec, Granularity, UniformGrid};
/// let w = array![[-1.0f32, 0.5, 2.0, 0.0]];
/// let spec = FormatSpec::Uniform(UniformGrid::new(4, false).unwrap());
/// let q = quantize_rtn("w", w.view(), &spec, Granularity::PerChannel).unwrap();
/// // scale (2 - -1) / 15 = 0.2, zero round(1 / 0.2) = 5
/// assert!((q.scales[[0, 0]] - 0.2).abs() < 1e-7 && q.zeros[[0, 0]] == 5.0);
/// // 0.5 / 0.2 = 2.5 rounds half to even: 2 + 5 = code 7, value 0.4
/// assert_eq!(q.codes.row(0).to_vec(), vec![0, 7, 15, 5]);
/// assert!((q.dequantize()[[0, 1]] - 0.4).abs() < 1e-6);
/// ```
pub fn quantize_rtn(
    name: &str,
    w: ArrayView2<f32>,
    spec: &FormatSpec,
    granularity: Granularity,
) -> Result<QuantizedLinear> {
    let (out, inp) = w.dim();
    spec.validate()?;
    if out == 0 || inp == 0 {
        return Err(GridError::Shape {
            what: format!("tensor `{name}`"),
            detail: format!("empty matrix {out} x {inp}"),
        });
    }
    crate::error::check_finite_iter(name, w.iter().copied())?;
    granularity.check(name, inp)?;
    let f = spec.build();
    let span = crate::format::fit_span_len(f.as_ref(), granularity, name, inp)?;
    let g = granularity.group_len(inp);
    let n_groups = granularity.n_groups(inp);
    let tensor_params = match granularity {
        Granularity::PerTensor => Some(f.fit(&w.iter().copied().collect::<Vec<_>>())),
        _ => None,
    };
    let rows: Vec<(Vec<u8>, Vec<GroupParams>)> = (0..out)
        .into_par_iter()
        .map(|r| {
            let row = w.row(r).to_vec();
            let mut codes = Vec::with_capacity(inp);
            let mut params = Vec::with_capacity(n_groups);
            if span != g {
                // groups fitted together (ggml K super-blocks): one fit per span
                let mut ps = vec![GroupParams::scale_only(0.0); span / g];
                for slab in row.chunks(span) {
                    f.fit_groups(slab, None, g, &mut ps);
                    params.extend_from_slice(&ps);
                    codes.extend(
                        slab.iter()
                            .enumerate()
                            .map(|(j, &x)| f.encode(x, ps[j / g])),
                    );
                }
            } else {
                for slab in row.chunks(g) {
                    let p = tensor_params.unwrap_or_else(|| f.fit(slab));
                    params.push(p);
                    codes.extend(slab.iter().map(|&x| f.encode(x, p)));
                }
            }
            (codes, params)
        })
        .collect();
    let codes = Array2::from_shape_fn((out, inp), |(r, k)| rows[r].0[k]);
    let scales = Array2::from_shape_fn((out, n_groups), |(r, gi)| rows[r].1[gi].scale);
    let zeros = Array2::from_shape_fn((out, n_groups), |(r, gi)| rows[r].1[gi].zero);
    let g_idx = (0..inp).map(|k| (k / g) as u32).collect();
    QuantizedLinear::from_parts(spec.clone(), granularity, codes, scales, zeros, g_idx)
}
