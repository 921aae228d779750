//! Replaceable linear layers `y = x W^T + b`.
//!
//! Every projection of the decoder is a `Box<dyn Linear>`: dense f32 today; quantized kinds
//! (packed codes with a fused dequantizing matmul) implement the same trait later and are
//! swapped in by name with [`crate::LlamaModel::replace_linear`].

use candle_core::{DType, Device, Tensor};

use crate::{ModelError, Result};

/// A linear layer: input `[tokens, in_features]`, output `[tokens, out_features]`.
pub trait Linear: Send + Sync + std::fmt::Debug {
    /// `x W^T + b` for `x` of shape `[tokens, in_features]`.
    fn forward(&self, x: &Tensor) -> Result<Tensor>;
    /// Input width.
    fn in_features(&self) -> usize;
    /// Output width.
    fn out_features(&self) -> usize;
    /// The (dequantized) weight as a dense f32 tensor `[out_features, in_features]`,
    /// Hugging Face layout.
    fn weight(&self) -> Result<Tensor>;
    /// The bias `[out_features]`, if any.
    fn bias(&self) -> Option<Tensor>;
    /// A short name of the kind ("dense", "q4", ...), for reports.
    fn kind(&self) -> &'static str;
}

/// A dense f32 linear layer. The weight is kept transposed, `[in, out]` row-major, and the
/// product `x [tokens, in] @ W^T` runs through faer's f32 matmul (measured faster than
/// candle's here at the decoder's shapes).
#[derive(Debug, Clone)]
pub struct DenseLinear {
    weight_t: Tensor,
    bias: Option<Tensor>,
}

impl DenseLinear {
    /// Builds from a weight `[out, in]` (Hugging Face layout) and an optional bias `[out]`.
    /// Both are converted to contiguous f32 on the CPU.
    ///
    /// ```
    /// use candle_core::{Device, Tensor};
    /// use quantlab_models::{DenseLinear, Linear};
    /// let w = Tensor::new(&[[1f32, 2.0], [3.0, 4.0], [5.0, 6.0]], &Device::Cpu).unwrap();
    /// let b = Tensor::new(&[0.5f32, 0.0, -1.0], &Device::Cpu).unwrap();
    /// let lin = DenseLinear::new(w, Some(b)).unwrap();
    /// let x = Tensor::new(&[[1f32, 1.0]], &Device::Cpu).unwrap();
    /// let y: Vec<f32> = lin.forward(&x).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    /// assert!((y[0] - 3.5).abs() < 1e-6 && (y[1] - 7.0).abs() < 1e-6 && (y[2] - 10.0).abs() < 1e-6);
    /// ```
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        let (out, _inp) = weight.dims2().map_err(|_| ModelError::InvalidOption {
            option: "weight".into(),
            detail: format!("a linear weight must be 2-D, got shape {:?}", weight.dims()),
        })?;
        if let Some(b) = &bias {
            if b.dims() != [out] {
                return Err(ModelError::InvalidOption {
                    option: "bias".into(),
                    detail: format!("bias shape {:?} does not match {out} outputs", b.dims()),
                });
            }
        }
        let weight_t =
            crate::ops::transpose(&weight.to_device(&Device::Cpu)?.to_dtype(DType::F32)?)?;
        let bias = match bias {
            Some(b) => Some(
                b.to_device(&Device::Cpu)?
                    .to_dtype(DType::F32)?
                    .contiguous()?,
            ),
            None => None,
        };
        Ok(Self { weight_t, bias })
    }

    /// The transposed weight `[in, out]` as stored.
    pub fn weight_t(&self) -> &Tensor {
        &self.weight_t
    }
}

impl Linear for DenseLinear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        crate::ops::linear(x, &self.weight_t, self.bias.as_ref())
    }

    fn in_features(&self) -> usize {
        self.weight_t.dims()[0]
    }

    fn out_features(&self) -> usize {
        self.weight_t.dims()[1]
    }

    fn weight(&self) -> Result<Tensor> {
        crate::ops::transpose(&self.weight_t)
    }

    fn bias(&self) -> Option<Tensor> {
        self.bias.clone()
    }

    fn kind(&self) -> &'static str {
        "dense"
    }
}

/// A linear whose weight stays in its (memory-mapped) file: every [`Linear::weight`] and
/// [`Linear::forward`] reads the tensor from the [`crate::WeightSource`] and dequantizes it to
/// f32, and nothing is kept. A model built with [`crate::LlamaModel::from_source_lazy`] holds
/// its block linears this way, so its resident memory is the embeddings, the norms and what is
/// in use at the moment: a quantization driver that reads a block's weights once, quantizes
/// them and replaces them keeps about one block in f32 at a time. The bias (small) is held.
pub struct LazyLinear {
    src: std::sync::Arc<dyn crate::WeightSource + Send + Sync>,
    /// The weight tensor's (Hugging Face) name.
    name: String,
    out: usize,
    inp: usize,
    bias: Option<Tensor>,
}

impl std::fmt::Debug for LazyLinear {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LazyLinear")
            .field("path", &self.src.path())
            .field("name", &self.name)
            .field("shape", &(self.out, self.inp))
            .finish()
    }
}

impl LazyLinear {
    /// The weight `name` (`[out, in]`) of `src`, with an optional bias `[out]` held in memory.
    /// The shape is checked on every read (an error names the file and the tensor).
    pub fn new(
        src: std::sync::Arc<dyn crate::WeightSource + Send + Sync>,
        name: impl Into<String>,
        out: usize,
        inp: usize,
        bias: Option<Tensor>,
    ) -> Self {
        Self {
            src,
            name: name.into(),
            out,
            inp,
            bias,
        }
    }
}

impl Linear for LazyLinear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        DenseLinear::new(self.weight()?, self.bias.clone())?.forward(x)
    }

    fn in_features(&self) -> usize {
        self.inp
    }

    fn out_features(&self) -> usize {
        self.out
    }

    fn weight(&self) -> Result<Tensor> {
        let w = self.src.load(&self.name)?;
        if w.dims() != [self.out, self.inp] {
            return Err(ModelError::TensorShape {
                path: self.src.path().display().to_string(),
                tensor: self.name.clone(),
                expected: vec![self.out, self.inp],
                got: w.dims().to_vec(),
            });
        }
        Ok(w)
    }

    fn bias(&self) -> Option<Tensor> {
        self.bias.clone()
    }

    fn kind(&self) -> &'static str {
        "lazy"
    }
}

/// A linear held as what a checkpoint stores, its codes and group parameters
/// ([`quantlab_grids::QuantizedLinear`]), dequantized when used: about a byte per weight
/// instead of four (the quantization driver's low-memory mode). `col_div` divides the input
/// columns of the dequantized weight (AWQ's scale on the linears fed by a norm, whose
/// in-memory weight is `Q(W diag(s)) diag(1/s)`).
#[derive(Debug)]
pub struct CodesLinear {
    q: quantlab_grids::QuantizedLinear,
    col_div: Option<Vec<f32>>,
    bias: Option<Tensor>,
}

impl CodesLinear {
    /// The quantized weight, an optional column divisor (one value per input column) and
    /// the layer's bias.
    pub fn new(
        q: quantlab_grids::QuantizedLinear,
        col_div: Option<Vec<f32>>,
        bias: Option<Tensor>,
    ) -> Self {
        Self { q, col_div, bias }
    }
}

impl Linear for CodesLinear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        DenseLinear::new(self.weight()?, self.bias.clone())?.forward(x)
    }
    fn in_features(&self) -> usize {
        self.q.codes.ncols()
    }
    fn out_features(&self) -> usize {
        self.q.codes.nrows()
    }
    fn weight(&self) -> Result<Tensor> {
        let mut w = self.q.dequantize();
        if let Some(s) = &self.col_div {
            for mut row in w.rows_mut() {
                for (v, d) in row.iter_mut().zip(s) {
                    *v /= d;
                }
            }
        }
        let dims = w.dim();
        let (v, _) = w.into_raw_vec_and_offset();
        Ok(Tensor::from_vec(v, dims, &Device::Cpu)?)
    }
    fn bias(&self) -> Option<Tensor> {
        self.bias.clone()
    }
    fn kind(&self) -> &'static str {
        "codes"
    }
}
