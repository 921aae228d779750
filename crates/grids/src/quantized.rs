//! The hand-off type between solvers, models and checkpoint formats.

use crate::format::{Format, Granularity, GroupParams};
use crate::uniform::UniformGrid;
use crate::{GridError, Result};
use ndarray::{Array2, ArrayView2};
use serde::{Deserialize, Serialize};

/// A serialisable description of a number format; [`FormatSpec::build`] gives the
/// implementation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum FormatSpec {
    /// Uniform affine grid (GPTQ/AWQ/RTN integer formats).
    Uniform(UniformGrid),
}

impl FormatSpec {
    /// The format implementation.
    pub fn build(&self) -> Box<dyn Format> {
        match self {
            FormatSpec::Uniform(g) => Box::new(*g),
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
#[derive(Clone, Debug)]
pub struct QuantizedLinear {
    pub spec: FormatSpec,
    pub granularity: Granularity,
    pub codes: Array2<u8>,
    pub scales: Array2<f32>,
    pub zeros: Array2<f32>,
    pub g_idx: Vec<u32>,
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
        Ok(Self {
            spec,
            granularity,
            codes,
            scales,
            zeros,
            g_idx,
        })
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
    /// non-trivial `g_idx`.
    pub fn bits(&self) -> BitsAccounting {
        let (out, inp) = self.shape();
        let f = self.spec.build();
        let sets = match self.granularity {
            Granularity::PerTensor => 1,
            _ => out * self.n_groups(),
        };
        BitsAccounting {
            weights: (out * inp) as u64,
            code_bits: (out * inp) as f64 * f.code_bits() as f64,
            param_bits: sets as f64 * f.param_bits(),
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
/// group's weights, each weight is encoded independently. `name` is used in errors.
pub fn quantize_rtn(
    name: &str,
    w: ArrayView2<f32>,
    spec: &FormatSpec,
    granularity: Granularity,
) -> Result<QuantizedLinear> {
    let (out, inp) = w.dim();
    crate::check_finite(name, &w.iter().copied().collect::<Vec<_>>())?;
    granularity.check(name, inp)?;
    let f = spec.build();
    let g = granularity.group_len(inp);
    let n_groups = inp / g;
    let mut codes = Array2::<u8>::zeros((out, inp));
    let mut scales = Array2::<f32>::zeros((out, n_groups));
    let mut zeros = Array2::<f32>::zeros((out, n_groups));
    let tensor_params = match granularity {
        Granularity::PerTensor => Some(f.fit(&w.iter().copied().collect::<Vec<_>>())),
        _ => None,
    };
    for r in 0..out {
        for gi in 0..n_groups {
            let slab: Vec<f32> = (gi * g..(gi + 1) * g).map(|k| w[[r, k]]).collect();
            let p = tensor_params.unwrap_or_else(|| f.fit(&slab));
            scales[[r, gi]] = p.scale;
            zeros[[r, gi]] = p.zero;
            for (j, &x) in slab.iter().enumerate() {
                codes[[r, gi * g + j]] = f.encode(x, p);
            }
        }
    }
    let g_idx = (0..inp).map(|k| (k / g) as u32).collect();
    QuantizedLinear::from_parts(spec.clone(), granularity, codes, scales, zeros, g_idx)
}
