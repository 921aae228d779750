//! Small dense linear algebra the solvers need: plain reference loops (for the reference
//! solvers and as test oracles) and the fast faer path (Cholesky, triangular inverse).
//!
//! Everything here works in `f64`: the Hessian is factorized in double precision in every
//! solver (the reference GPTQ uses `float32`; `f64` removes spurious non-PD failures on
//! ill-conditioned Hessians at a cost of about 2x on the factorization only).
#![allow(non_snake_case)]

use faer::dyn_stack::{MemBuffer, MemStack};
use faer::linalg::cholesky::llt::factor::{cholesky_in_place, cholesky_in_place_scratch};
use faer::{Mat, Par};
use ndarray::{Array2, ArrayView2};

/// Plain (unblocked, Cholesky–Banachiewicz) lower Cholesky factor `L` with `A = L L^T`,
/// reading the lower triangle of `A`. `Err(j)` names the first column whose pivot is not
/// positive.
///
/// ```
/// use ndarray::array;
/// let a = array![[4.0, 2.0], [2.0, 5.0]];
/// let l = quantlab_solvers::linalg::cholesky_ref(a.view()).unwrap();
/// assert!((l[[0, 0]] - 2.0).abs() < 1e-12 && (l[[1, 0]] - 1.0).abs() < 1e-12);
/// assert!((l[[1, 1]] - 2.0).abs() < 1e-12 && l[[0, 1]] == 0.0);
/// ```
pub fn cholesky_ref(A: ArrayView2<f64>) -> Result<Array2<f64>, usize> {
    let n = A.nrows();
    assert_eq!(A.ncols(), n, "cholesky_ref: matrix is not square");
    let mut L = Array2::<f64>::zeros((n, n));
    for j in 0..n {
        let mut s = A[[j, j]];
        for k in 0..j {
            s -= L[[j, k]] * L[[j, k]];
        }
        if s.is_nan() || s <= 0.0 || !s.is_finite() {
            return Err(j);
        }
        let d = s.sqrt();
        L[[j, j]] = d;
        for i in j + 1..n {
            let mut s = A[[i, j]];
            for k in 0..j {
                s -= L[[i, k]] * L[[j, k]];
            }
            L[[i, j]] = s / d;
        }
    }
    Ok(L)
}

/// Inverse of a lower-triangular `L` by forward substitution, plain loops.
pub fn lower_inverse_ref(L: ArrayView2<f64>) -> Array2<f64> {
    let n = L.nrows();
    let mut X = Array2::<f64>::zeros((n, n));
    for c in 0..n {
        // solve L x = e_c
        for i in c..n {
            let mut s = if i == c { 1.0 } else { 0.0 };
            for k in c..i {
                s -= L[[i, k]] * X[[k, c]];
            }
            X[[i, c]] = s / L[[i, i]];
        }
    }
    X
}

/// `A^-1` of a symmetric positive definite `A` through its Cholesky factor:
/// `A^-1 = L^-T L^-1` (what `torch.cholesky_inverse` computes). Plain loops.
pub fn spd_inverse_ref(A: ArrayView2<f64>) -> Result<Array2<f64>, usize> {
    let L = cholesky_ref(A)?;
    let Li = lower_inverse_ref(L.view());
    Ok(Li.t().dot(&Li))
}

/// The upper Cholesky factor `U` of `H^-1` (`H^-1 = U^T U`), computed literally as the
/// reference GPTQ does: `cholesky(H)`, `cholesky_inverse`, then `cholesky(.., upper=True)`.
/// Plain loops, O(n^3) three times; for the reference solver and tests.
pub fn upper_cholesky_of_inverse_ref(H: ArrayView2<f64>) -> Result<Array2<f64>, usize> {
    let Hinv = spd_inverse_ref(H)?;
    // Hinv is SPD in exact arithmetic; a failure here is reported at column 0.
    let L2 = cholesky_ref(Hinv.view()).map_err(|_| 0usize)?;
    Ok(L2.t().to_owned())
}

/// The upper Cholesky factor `U` of `H^-1` (`H^-1 = U^T U`) with one Cholesky and one
/// triangular inverse instead of the reference's three O(n^3) steps.
///
/// With `J` the reversal permutation, factor `J H J = L' L'^T`; then
/// `H^-1 = (J L'^-T J)(J L'^-1 J) = U^T U` with `U = J L'^-1 J` upper triangular with a
/// positive diagonal, which by uniqueness is the Cholesky factor. Cost `n^3/3 + n^3/3`
/// flops. `Err(j)` names the failing pivot column in the original (unreversed) order.
///
/// Returns `U` as a faer matrix (column-major).
pub fn upper_cholesky_of_inverse(H: &Mat<f64>, par: Par) -> Result<Mat<f64>, usize> {
    let n = H.nrows();
    assert_eq!(
        H.ncols(),
        n,
        "upper_cholesky_of_inverse: matrix is not square"
    );
    // A = J H J (lower triangle is what the factorization reads)
    let A = Mat::<f64>::from_fn(n, n, |i, j| H[(n - 1 - i, n - 1 - j)]);
    let Linv = inverse_factor_reversed(A, par)?;
    // U = J Linv J
    let U = Mat::<f64>::from_fn(n, n, |i, j| {
        if j >= i {
            Linv[(n - 1 - i, n - 1 - j)]
        } else {
            0.0
        }
    });
    Ok(U)
}

/// Factor `A = L L^T` (A = the reversed Hessian `J H J`) and return `L^-1` (lower). `Err(j)`
/// names the failing pivot in the UNREVERSED order (`n - 1 - index`). Works in f32 or f64.
pub(crate) fn inverse_factor_reversed<T>(mut A: Mat<T>, par: Par) -> Result<Mat<T>, usize>
where
    T: faer::traits::RealField,
{
    let n = A.nrows();
    let mut buf = MemBuffer::new(cholesky_in_place_scratch::<T>(n, par, Default::default()));
    let stack = MemStack::new(&mut buf);
    if let Err(faer::linalg::cholesky::llt::factor::LltError::NonPositivePivot { index }) =
        cholesky_in_place(
            A.as_mut(),
            Default::default(),
            par,
            stack,
            Default::default(),
        )
    {
        return Err(n - 1 - index);
    }
    // cholesky_in_place leaves the strict upper triangle untouched; it is never read below.
    let mut Linv = Mat::<T>::zeros(n, n);
    faer::linalg::triangular_inverse::invert_lower_triangular(Linv.as_mut(), A.as_ref(), par);
    if Linv
        .col_iter()
        .any(|c| c.iter().any(|v| !faer::traits::math_utils::is_finite(v)))
    {
        return Err(n - 1);
    }
    Ok(Linv)
}
