//! Conversions between candle tensors (what the models compute on) and ndarray matrices
//! (what the solvers take), and an in-place view of a tensor's f32 data.

use candle_core::{DType, Device, Tensor};
use ndarray::{Array2, ArrayView2};

use crate::error::TensorContext;
use crate::Result;

/// `[rows, cols]` tensor to an ndarray.
pub fn to_array(t: &Tensor) -> Result<Array2<f32>> {
    let (r, c) = t.dims2().ctx("tensor to array")?;
    let v = t
        .to_dtype(DType::F32)
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1::<f32>())
        .ctx("tensor to array")?;
    Ok(Array2::from_shape_vec((r, c), v).expect("dims2 gave the size"))
}

/// Runs `f` on a `[rows, cols]` tensor's f32 data viewed as an ndarray, without a copy when
/// the tensor is a contiguous f32 CPU tensor (the forward's activations are).
pub fn with_view<R>(t: &Tensor, f: impl FnOnce(ArrayView2<f32>) -> Result<R>) -> Result<R> {
    let (r, c) = t.dims2().ctx("tensor view")?;
    let t = t.to_dtype(DType::F32).ctx("tensor view")?;
    quantlab_models::with_f32(&t, |xs| {
        f(ArrayView2::from_shape((r, c), xs).expect("dims2 gave the size"))
    })?
}

/// An ndarray to a `[rows, cols]` f32 tensor on the CPU.
pub fn to_tensor(a: ArrayView2<f32>) -> Result<Tensor> {
    let std = a.as_standard_layout();
    Tensor::from_slice(
        std.as_slice().expect("standard layout"),
        a.dim(),
        &Device::Cpu,
    )
    .ctx("array to tensor")
}
