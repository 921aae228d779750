//! Streaming accumulation of the layer Hessian `H = 2/n * sum_t x_t x_t^T` over the input
//! rows `x_t` of a linear layer, without keeping the inputs.
//!
//! # Convention (reference GPTQ `add_batch`)
//! The reference keeps a running mean: for a batch of `m` samples with rows `X`,
//! `H *= n/(n+m); n += m; X *= sqrt(2/n); H += X^T X`, where `m` counts **sequences**
//! (the batch dimension), not tokens. After all batches `H = 2/n * sum_t x_t x_t^T` with `n`
//! the number of sequences and the sum over every token: the scale of `H` grows with the
//! tokens per sequence. This is what [`Counting::Sequences`] (the default) reproduces.
//! [`Counting::Tokens`] counts every row as one sample, giving the proper mean
//! `H = 2/T * X^T X`. The scale of `H` does not change any GPTQ/OBQ solution (the solvers are
//! invariant to `H -> c H`, and damping is relative to `mean(diag H)`), only reported losses.
//!
//! # Numerics
//! Instead of rescaling a running mean at every batch, this accumulator keeps the exact sum
//! `S = sum_t x_t x_t^T` in an **f64** accumulator (each batch's `X^T X` computed by an f64
//! matrix product) and the sample count `n`; [`Hessian::finish`] returns `2/n * S` rounded
//! once to f32. In exact arithmetic this equals the running mean above; in floating point it
//! avoids the repeated `n/(n+m)` rescaling and the f32 cancellation of long sums.
//!
//! # Diagonal mode = llama.cpp's importance matrix
//! [`Hessian::diagonal`] keeps only `sum_t x_{t,j}^2` per input column `j` (O(in) memory).
//! llama.cpp's `imatrix` tool accumulates exactly this per-column sum of squared activations
//! (and divides by its number of tokens when it writes the file), so
//! `imatrix_j = sum_t x_{t,j}^2 / T = diag(H)_j * n / (2 T)`: with [`Counting::Tokens`],
//! `imatrix = diag(H) / 2`. [`Hessian::sum_sq`] and [`Hessian::tokens`] give the raw parts.
#![allow(non_snake_case)]

use crate::error::{check_finite_view, shape_err};
use crate::Result;
use faer::linalg::matmul::triangular::{self, BlockStructure};
use faer::{Accum, MatRef, Par};
use ndarray::{Array1, Array2, ArrayView2};

/// What one sample is for the running mean.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub enum Counting {
    /// `m` = the `sequences` argument of [`Hessian::add_batch`] (reference GPTQ).
    #[default]
    Sequences,
    /// `m` = the number of rows (tokens) of the batch.
    Tokens,
}

/// A streaming Hessian accumulator, full (`[in, in]`) or diagonal-only.
///
/// ```
/// use ndarray::array;
/// use quantlab_solvers::hessian::{Counting, Hessian};
/// let mut h = Hessian::new(2).with_counting(Counting::Tokens);
/// h.add_batch(array![[1.0f32, 2.0], [3.0, 0.0]].view(), 1).unwrap();
/// let H = h.finish();
/// // 2/2 * (x1 x1^T + x2 x2^T) = [[1+9, 2], [2, 4]]
/// assert!((H[[0, 0]] - 10.0).abs() < 1e-6 && (H[[0, 1]] - 2.0).abs() < 1e-6);
/// assert!((H[[1, 1]] - 4.0).abs() < 1e-6);
/// ```
#[derive(Clone, Debug)]
pub struct Hessian {
    dim: usize,
    diagonal_only: bool,
    counting: Counting,
    par: Par,
    /// Per-batch products as full f64 matrix products (the reference) instead of f32 lower
    /// triangles.
    f64_products: bool,
    /// `sum_t x_t x_t^T`, column-major `[dim, dim]` (full mode; only the lower triangle is
    /// read) or `sum_t x_t^2` (diagonal).
    S: Vec<f64>,
    /// The f32 product of the last batch (reused between batches).
    scratch: Vec<f32>,
    n: u64,
    tokens: u64,
}

impl Hessian {
    /// A full `[dim, dim]` accumulator, counting sequences (reference GPTQ), using every
    /// rayon thread for the batch products.
    pub fn new(dim: usize) -> Self {
        Self {
            dim,
            diagonal_only: false,
            counting: Counting::Sequences,
            par: Par::rayon(0),
            f64_products: false,
            S: vec![0.0; dim * dim],
            scratch: Vec::new(),
            n: 0,
            tokens: 0,
        }
    }

    /// A diagonal-only accumulator (llama.cpp importance matrix): O(dim) memory.
    pub fn diagonal(dim: usize) -> Self {
        Self {
            dim,
            diagonal_only: true,
            counting: Counting::Sequences,
            par: Par::rayon(0),
            f64_products: false,
            S: vec![0.0; dim],
            scratch: Vec::new(),
            n: 0,
            tokens: 0,
        }
    }

    /// Choose what counts as one sample.
    pub fn with_counting(mut self, counting: Counting) -> Self {
        self.counting = counting;
        self
    }

    /// Compute each batch's `X^T X` as a full f64 matrix product (the plain reference)
    /// instead of the default: the lower triangle only, in f32, added to the f64 sum. The
    /// default does about a quarter of the work in time (half the products, twice the SIMD
    /// width); its per-batch rounding is that of an f32 sum over the batch's rows (the
    /// precision of the reference GPTQ's own f32 accumulation), and the running sum stays f64.
    pub fn with_f64_products(mut self, on: bool) -> Self {
        self.f64_products = on;
        self
    }

    /// Choose the parallelism of the per-batch `X^T X` products.
    pub fn with_par(mut self, par: Par) -> Self {
        self.par = par;
        self
    }

    /// Input dimension.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Whether only the diagonal is kept.
    pub fn is_diagonal(&self) -> bool {
        self.diagonal_only
    }

    /// Samples counted so far (`n` of the running mean).
    pub fn samples(&self) -> u64 {
        self.n
    }

    /// Rows (tokens) seen so far.
    pub fn tokens(&self) -> u64 {
        self.tokens
    }

    /// Add a batch of input rows `x` (`[tokens, in]`) holding `sequences` sequences.
    /// `sequences` is ignored with [`Counting::Tokens`]. Errors on a wrong width, NaN or
    /// infinite inputs, or `sequences == 0` with a non-empty batch.
    pub fn add_batch(&mut self, x: ArrayView2<f32>, sequences: usize) -> Result<()> {
        let (t, d) = x.dim();
        if d != self.dim {
            return Err(shape_err(
                "Hessian::add_batch",
                format!(
                    "inputs have {d} columns, the Hessian has dimension {}",
                    self.dim
                ),
            ));
        }
        if t == 0 {
            return Ok(());
        }
        let m = match self.counting {
            Counting::Sequences => sequences,
            Counting::Tokens => t,
        };
        if m == 0 {
            return Err(crate::SolverError::InvalidOption {
                option: "sequences".into(),
                detail: "a non-empty batch must count at least one sequence".into(),
            });
        }
        if self.diagonal_only || self.f64_products {
            check_finite_view("inputs", x)?;
        }
        if self.diagonal_only {
            for row in x.rows() {
                for (s, &v) in self.S.iter_mut().zip(row.iter()) {
                    *s += (v as f64) * (v as f64);
                }
            }
        } else if !self.f64_products {
            // C = lower(X^T X) in f32; lower(S) += C. A row-major X [t, d] is already
            // X^T in column-major order, so standard-layout inputs are used in place.
            let owned;
            let xs: &[f32] = match x.as_slice() {
                Some(s) => s,
                None => {
                    owned = x.as_standard_layout().into_owned();
                    owned.as_slice().expect("standard layout")
                }
            };
            let Xt = MatRef::from_column_major_slice(xs, d, t);
            // the product's scratch is kept between batches (a fresh d x d buffer per batch
            // costs page faults and a memset comparable to a small product)
            let c = &mut self.scratch;
            c.resize(d * d, 0.0);
            let C = faer::MatMut::from_column_major_slice_mut(c, d, d);
            triangular::matmul(
                C,
                BlockStructure::TriangularLower,
                Accum::Replace,
                Xt,
                BlockStructure::Rectangular,
                Xt.transpose(),
                BlockStructure::Rectangular,
                1.0f32,
                self.par,
            );
            // A NaN or infinite input makes its column's diagonal entry `sum x^2` non-finite:
            // checking the d diagonal entries replaces a scan of the t x d inputs, which
            // runs only to name the offending element.
            if let Some(j) = (0..d).find(|&j| !c[j * d + j].is_finite()) {
                check_finite_view("inputs", x)?;
                return Err(crate::SolverError::InvalidOption {
                    option: "inputs".into(),
                    detail: format!(
                        "sum of squares of input column {j} overflows f32 ({}): scale the inputs down",
                        c[j * d + j]
                    ),
                });
            }
            // column j of the lower triangle: rows j..d
            for j in 0..d {
                let (s, c) = (
                    &mut self.S[j * d + j..(j + 1) * d],
                    &c[j * d + j..(j + 1) * d],
                );
                for (s, &c) in s.iter_mut().zip(c) {
                    *s += c as f64;
                }
            }
        } else {
            // X (f64) column-major [t, d]; S += X^T X
            let xs: Vec<f64> = {
                let mut v = vec![0.0f64; t * d];
                for (i, row) in x.rows().into_iter().enumerate() {
                    for (j, &e) in row.iter().enumerate() {
                        v[j * t + i] = e as f64;
                    }
                }
                v
            };
            let X = MatRef::from_column_major_slice(&xs, t, d);
            let S = faer::MatMut::from_column_major_slice_mut(&mut self.S, d, d);
            faer::linalg::matmul::matmul(S, Accum::Add, X.transpose(), X, 1.0, self.par);
        }
        self.n += m as u64;
        self.tokens += t as u64;
        Ok(())
    }

    /// `H = 2/n * S` as `[in, in]` f32 (a diagonal matrix in diagonal mode). Zero when no
    /// sample was added.
    pub fn finish(&self) -> Array2<f32> {
        let c = self.scale();
        if self.diagonal_only {
            let mut H = Array2::<f32>::zeros((self.dim, self.dim));
            for j in 0..self.dim {
                H[[j, j]] = (c * self.S[j]) as f32;
            }
            H
        } else {
            let d = self.dim;
            // the lower triangle of S (column-major: (i, j) with i >= j at j * d + i), mirrored
            Array2::from_shape_fn((d, d), |(i, j)| {
                let (r, k) = if i >= j { (i, j) } else { (j, i) };
                (c * self.S[k * d + r]) as f32
            })
        }
    }

    /// `diag(H) = 2/n * sum_t x_t^2` per input column.
    pub fn diag(&self) -> Array1<f32> {
        let c = self.scale();
        Array1::from_shape_fn(self.dim, |j| (c * self.sum_sq_at(j)) as f32)
    }

    /// The raw `sum_t x_{t,j}^2` per input column (llama.cpp's imatrix before its division
    /// by the token count).
    pub fn sum_sq(&self) -> Array1<f64> {
        Array1::from_shape_fn(self.dim, |j| self.sum_sq_at(j))
    }

    /// llama.cpp's importance value per column: `sum_t x_{t,j}^2 / T` (T = tokens seen).
    pub fn imatrix(&self) -> Array1<f32> {
        let t = self.tokens.max(1) as f64;
        Array1::from_shape_fn(self.dim, |j| (self.sum_sq_at(j) / t) as f32)
    }

    fn sum_sq_at(&self, j: usize) -> f64 {
        if self.diagonal_only {
            self.S[j]
        } else {
            self.S[j * self.dim + j]
        }
    }

    fn scale(&self) -> f64 {
        if self.n == 0 {
            0.0
        } else {
            2.0 / self.n as f64
        }
    }
}
