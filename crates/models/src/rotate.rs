//! Orthogonal rotations of a LLaMA's residual stream and attention heads, fused into its
//! weights (QuaRot's and SpinQuant's R1 and R2): the rotated model computes the same function
//! in exact arithmetic, while its linears' weights and inputs lose most of their outliers,
//! which is what makes them easier to quantize.
//!
//! * The matrices: [`hadamard`] (a ±1 matrix with `H H^T = n I` for the sizes built from
//!   Sylvester's doubling and Paley's construction), [`random_hadamard`] (`H D / sqrt(n)`
//!   with random signs `D`, QuaRot's choice), [`random_orthogonal`] (Gram-Schmidt of a Gaussian
//!   matrix, for any size), [`rotation_matrix`] picking one by [`RotationKind`].
//! * The fusion, on [`LlamaModel`]: [`LlamaModel::fold_norms`] (every RMSNorm scale into the
//!   linears that read it, so the norms become rotation-invariant),
//!   [`LlamaModel::rotate_residual`] (R1: embeddings and the readers of the residual times
//!   `Q`, its writers `Q^T` times), [`LlamaModel::rotate_heads_vo`] (R2: `v_proj`'s rows and
//!   `o_proj`'s columns, head by head); [`rotate_model`] does all three.
//!
//! All products are computed in f64 and rounded to f32 once. The rotated model has no tied
//! embeddings (the output head becomes its own tensor) and every norm weight is 1; it is
//! still a plain LLaMA, so any loader (llama.cpp included) runs it unchanged.
//!
//! ```
//! use quantlab_models::rotate::hadamard;
//! let h = hadamard(12).unwrap(); // Paley, q = 11
//! for i in 0..12 {
//!     for j in 0..12 {
//!         let dot: f64 = (0..12).map(|k| h[i * 12 + k] * h[j * 12 + k]).sum();
//!         assert_eq!(dot, if i == j { 12.0 } else { 0.0 });
//!     }
//! }
//! assert!(hadamard(576).is_some()); // SmolLM2's hidden size: 2 x 2 x 2 x 72 (Paley, q = 71)
//! assert!(hadamard(6).is_none()); // no Hadamard matrix of order 6 exists
//! ```

use candle_core::{DType, Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::{LlamaModel, ModelError, Result};

/// Which orthogonal matrix a rotation uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RotationKind {
    /// [`random_hadamard`]: a Hadamard matrix with random column signs (QuaRot); an error for
    /// a size [`hadamard`] cannot build.
    Hadamard,
    /// [`random_orthogonal`]: Haar-like random orthogonal matrix, any size (SpinQuant's
    /// starting point).
    Random,
}

impl RotationKind {
    /// `hadamard` or `random`.
    pub fn name(self) -> &'static str {
        match self {
            RotationKind::Hadamard => "hadamard",
            RotationKind::Random => "random",
        }
    }

    /// The kind named `name` (case-insensitive).
    pub fn parse(name: &str) -> Option<Self> {
        [RotationKind::Hadamard, RotationKind::Random]
            .into_iter()
            .find(|k| k.name().eq_ignore_ascii_case(name))
    }
}

fn is_prime(q: usize) -> bool {
    q >= 2 && (2..).take_while(|d| d * d <= q).all(|d| q % d != 0)
}

/// Paley's construction I: for a prime `q ≡ 3 (mod 4)`, `H = I + S` of order `q + 1`, with
/// `S = [[0, 1^T], [-1, Q]]` and `Q_ij = χ(j - i)` the quadratic character modulo `q`.
fn paley(q: usize) -> Vec<f64> {
    let n = q + 1;
    let mut square = vec![false; q];
    for x in 1..q {
        square[x * x % q] = true;
    }
    let chi = |a: usize| -> f64 {
        if a == 0 {
            0.0
        } else if square[a] {
            1.0
        } else {
            -1.0
        }
    };
    let mut h = vec![0.0; n * n];
    for i in 0..n {
        for j in 0..n {
            let s = match (i, j) {
                (0, 0) => 0.0,
                (0, _) => 1.0,
                (_, 0) => -1.0,
                _ => chi((j + q - i) % q),
            };
            h[i * n + j] = s + if i == j { 1.0 } else { 0.0 };
        }
    }
    h
}

/// The Kronecker product of square row-major matrices of orders `a` and `b`.
fn kron(x: &[f64], a: usize, y: &[f64], b: usize) -> Vec<f64> {
    let n = a * b;
    let mut out = vec![0.0; n * n];
    for i in 0..a {
        for j in 0..a {
            let s = x[i * a + j];
            for k in 0..b {
                for l in 0..b {
                    out[(i * b + k) * n + j * b + l] = s * y[k * b + l];
                }
            }
        }
    }
    out
}

/// A Hadamard matrix of order `n` (row-major, entries ±1, `H H^T = n I`), built as a
/// Kronecker product of `[[1, 1], [1, -1]]` factors (Sylvester) and Paley matrices of order
/// `q + 1` for primes `q ≡ 3 (mod 4)`; `None` when `n` has no such factorisation: odd
/// orders above 1 and 2 mod 4 (no Hadamard matrix exists), and some multiples of 4 that need
/// other constructions (28, 36, 52, ...; [`RotationKind::Random`] covers them). Powers of
/// two, 12, 20, 24, 48, 72, 80, 96, 576, 768, 1536, 3072, ... are covered.
pub fn hadamard(n: usize) -> Option<Vec<f64>> {
    if n == 1 {
        return Some(vec![1.0]);
    }
    if n % 2 == 1 {
        return None;
    }
    if let Some(h) = hadamard(n / 2) {
        return Some(kron(&[1.0, 1.0, 1.0, -1.0], 2, &h, n / 2));
    }
    for p in (4..=n).step_by(4) {
        if n % p == 0 && is_prime(p - 1) && (p - 1) % 4 == 3 {
            if let Some(h) = hadamard(n / p) {
                return Some(kron(&paley(p - 1), p, &h, n / p));
            }
        }
    }
    None
}

fn tensor(v: Vec<f64>, n: usize) -> Result<Tensor> {
    Ok(Tensor::from_vec(v, (n, n), &Device::Cpu)?)
}

/// QuaRot's randomized Hadamard rotation of order `n`: `H D / sqrt(n)` with `D` a diagonal of
/// random signs drawn from `seed` (f64 `[n, n]`, orthogonal). An error naming the size when
/// [`hadamard`] has no matrix of order `n` (use [`RotationKind::Random`] there).
pub fn random_hadamard(n: usize, seed: u64) -> Result<Tensor> {
    let h = hadamard(n).ok_or_else(|| ModelError::InvalidOption {
        option: "rotate".into(),
        detail: format!(
            "no Hadamard matrix of order {n} from Sylvester and Paley factors; \
             use a random orthogonal rotation instead"
        ),
    })?;
    let mut rng = StdRng::seed_from_u64(seed);
    let signs: Vec<f64> = (0..n)
        .map(|_| if rng.random::<bool>() { 1.0 } else { -1.0 })
        .collect();
    let s = 1.0 / (n as f64).sqrt();
    let q = h
        .iter()
        .enumerate()
        .map(|(k, &v)| v * signs[k % n] * s)
        .collect();
    tensor(q, n)
}

/// A random orthogonal matrix of order `n` (f64 `[n, n]`): the Q of a Gaussian matrix drawn
/// from `seed` (Box-Muller), by modified Gram-Schmidt run twice for orthogonality to
/// rounding.
pub fn random_orthogonal(n: usize, seed: u64) -> Result<Tensor> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut gauss = || {
        let u1: f64 = rng.random_range(1e-300..1.0);
        let u2: f64 = rng.random();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    };
    // rows of `a` become the orthonormal basis
    let mut a: Vec<Vec<f64>> = (0..n).map(|_| (0..n).map(|_| gauss()).collect()).collect();
    for i in 0..n {
        for _ in 0..2 {
            for j in 0..i {
                let dot: f64 = a[i].iter().zip(&a[j]).map(|(x, y)| x * y).sum();
                let (done, rest) = a.split_at_mut(i);
                for (x, y) in rest[0].iter_mut().zip(&done[j]) {
                    *x -= dot * y;
                }
            }
        }
        let norm = a[i].iter().map(|x| x * x).sum::<f64>().sqrt();
        a[i].iter_mut().for_each(|x| *x /= norm);
    }
    tensor(a.into_iter().flatten().collect(), n)
}

/// The orthogonal matrix of `kind` and order `n` from `seed` (f64 `[n, n]`).
pub fn rotation_matrix(kind: RotationKind, n: usize, seed: u64) -> Result<Tensor> {
    match kind {
        RotationKind::Hadamard => random_hadamard(n, seed),
        RotationKind::Random => random_orthogonal(n, seed),
    }
}

/// What [`rotate_model`] did.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct RotationFacts {
    /// The kind of both rotations.
    pub kind: RotationKind,
    /// The seed of R1; R2 uses `seed + 1`.
    pub seed: u64,
    /// Order of R1 (the hidden size).
    pub residual: usize,
    /// Order of R2 (the head dimension).
    pub head: usize,
}

/// Folds the norms, then rotates the residual stream by `rotation_matrix(kind, hidden, seed)`
/// (R1) and every head's values by `rotation_matrix(kind, head_dim, seed + 1)` (R2). The
/// model computes the same logits (to f32 rounding) and is untied.
pub fn rotate_model(
    model: &mut LlamaModel,
    kind: RotationKind,
    seed: u64,
) -> Result<RotationFacts> {
    let (d, hd) = (model.config().hidden_size, model.config().head_dim);
    let r1 = rotation_matrix(kind, d, seed)?;
    let r2 = rotation_matrix(kind, hd, seed.wrapping_add(1))?;
    model.fold_norms()?;
    model.rotate_residual(&r1)?;
    model.rotate_heads_vo(&r2)?;
    Ok(RotationFacts {
        kind,
        seed,
        residual: d,
        head: hd,
    })
}

/// `f(x as f64)` rounded back to f32.
pub(crate) fn in_f64(x: &Tensor, f: impl FnOnce(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
    Ok(f(&x.to_dtype(DType::F64)?)?.to_dtype(DType::F32)?)
}
