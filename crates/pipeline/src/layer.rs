//! One layer, from a file: read `weight` and `inputs` (or `hessian`) from a safetensors file,
//! run a solver (RTN, GPTQ, OBQ, AWQ), measure the relative output error, optionally write
//! the quantized layer. The library side of `quantlab layer`.
//!
//! Input file: `weight` `[out, in]` (f32, f16 or bf16) and either `inputs` `[n, in]`
//! (then `H = 2/n X^T X`, counting tokens) or `hessian` `[in, in]`; when both are present
//! the inputs win. Output file (`--out`, written atomically: temp file + rename): `weight`
//! (dequantized f32 `[out, in]`, the effective weight for AWQ), `codes` (u8 `[out, in]`),
//! `scales`, `zeros` (f32 `[out, groups]`), `g_idx` (i32 `[in]`), plus `awq_scales` (f32
//! `[in]`) for AWQ, whose codes are those of `W diag(s)`.
#![allow(non_snake_case)]

use ndarray::{Array1, Array2, ArrayView2, Axis};
use quantlab_grids::{
    FormatSpec, Fp8Kind, Granularity, GridError, MseClip, QuantizedLinear, UniformGrid,
};
use quantlab_solvers::awq::{self, AwqParams, AwqStats};
use quantlab_solvers::gptq::{gptq, GptqParams};
use quantlab_solvers::hessian::{Counting, Hessian};
use quantlab_solvers::obq::{obq, ObqParams};
use quantlab_solvers::{rel_output_error, rtn::rtn, Par, SolveReport, SolverError};
use safetensors::tensor::{Dtype, TensorView};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// What can go wrong in a layer job; every variant names the file, tensor or option.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LayerError {
    /// Reading or writing a file.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The file is not valid safetensors.
    #[error("{path}: not a valid safetensors file: {detail}")]
    Safetensors { path: PathBuf, detail: String },
    /// A tensor the job needs is absent.
    #[error("{path}: no tensor `{name}` (the file holds: {available})")]
    MissingTensor {
        path: PathBuf,
        name: String,
        available: String,
    },
    /// A tensor of an unsupported dtype.
    #[error("{path}: tensor `{name}` has dtype {dtype}; expected F32, F16 or BF16")]
    Dtype {
        path: PathBuf,
        name: String,
        dtype: String,
    },
    /// Shapes that do not fit together.
    #[error("{path}: {detail}")]
    Shape { path: PathBuf, detail: String },
    /// An invalid option value.
    #[error("invalid {option}: {detail}")]
    InvalidOption { option: String, detail: String },
    /// From the solvers (non-PD Hessian after retries, all-zero Hessian, NaN, ...).
    #[error(transparent)]
    Solver(#[from] SolverError),
    /// From the number formats.
    #[error(transparent)]
    Grid(#[from] GridError),
}

/// Result alias of this module.
pub type LayerResult<T> = std::result::Result<T, LayerError>;

/// The solver to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LayerMethod {
    /// Round to nearest.
    Rtn,
    /// GPTQ (blocked, fast).
    Gptq,
    /// OBQ (greedy per row; small layers only: O(out * in^3)).
    Obq,
    /// AWQ scale + clip search, then RTN.
    Awq,
}

/// The number format family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LayerFormat {
    /// Uniform affine integer grid of `bits` bits (sym or asym).
    Int,
    /// NF4 codebook (absmax per group).
    Nf4,
    /// FP4 codebook (absmax per group).
    Fp4,
    /// FP8 E4M3 with a scale per group.
    Fp8,
}

/// One layer job (the options of `quantlab layer`).
#[derive(Clone, Debug)]
pub struct LayerJob {
    /// The input safetensors file.
    pub input: PathBuf,
    /// The solver.
    pub method: LayerMethod,
    /// The number format family.
    pub format: LayerFormat,
    /// Bits of the integer grid (ignored by nf4/fp4/fp8).
    pub bits: u32,
    /// Group size in input columns; -1 = one group per row.
    pub group_size: i64,
    /// Symmetric integer grid.
    pub sym: bool,
    /// GPTQ act-order (`desc_act`).
    pub act_order: bool,
    /// GPTQ static groups.
    pub static_groups: bool,
    /// Damping fraction of `mean(diag H)` (GPTQ, OBQ).
    pub damp: f64,
    /// GPTQ block size.
    pub block_size: usize,
    /// The reference GPTQ MSE clipping search on the integer grid.
    pub mse: bool,
    /// Where to write the quantized layer.
    pub out: Option<PathBuf>,
    /// Threads (0 = all).
    pub threads: usize,
}

impl Default for LayerJob {
    fn default() -> Self {
        Self {
            input: PathBuf::new(),
            method: LayerMethod::Gptq,
            format: LayerFormat::Int,
            bits: 4,
            group_size: 128,
            sym: true,
            act_order: false,
            static_groups: false,
            damp: 0.01,
            block_size: 128,
            mse: false,
            out: None,
            threads: 0,
        }
    }
}

/// What a layer job measured.
#[derive(Clone, Debug, Serialize)]
pub struct LayerReport {
    pub method: LayerMethod,
    pub format: String,
    pub bits: u32,
    pub group_size: i64,
    /// `[out, in]`.
    pub shape: [usize; 2],
    /// `tr(D H D^T) / tr(W H W^T)` with the undamped `H`.
    pub rel_output_error: f64,
    /// Bits per weight, codes + parameters + non-trivial g_idx.
    pub bits_per_weight: f64,
    /// Solver seconds (not counting I/O and the error measurement).
    pub seconds: f64,
    /// Absolute damping used (0 for RTN/AWQ).
    pub damp: f64,
    /// Damping fraction finally used.
    pub damp_percent: f64,
    /// Number of automatic damping retries.
    pub damp_retries: usize,
    /// The solver's report (loss, retries, dead columns, order).
    pub solver: SolveReport,
    /// `inputs` or `hessian`.
    pub hessian_source: String,
    /// Rows of `inputs` when given.
    pub tokens: Option<usize>,
    /// AWQ's chosen exponent.
    pub awq_alpha: Option<f64>,
    /// The output file, when written.
    pub out: Option<String>,
}

impl LayerReport {
    /// One JSON object.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("report serialises")
    }

    /// A readable two-column table.
    pub fn table(&self) -> String {
        let mut rows: Vec<(&str, String)> = vec![
            ("method", format!("{:?}", self.method).to_lowercase()),
            ("format", self.format.clone()),
            ("shape", format!("{} x {}", self.shape[0], self.shape[1])),
            ("group size", self.group_size.to_string()),
            (
                "rel. output error",
                format!("{:.6e}", self.rel_output_error),
            ),
            ("bits per weight", format!("{:.4}", self.bits_per_weight)),
            ("seconds", format!("{:.3}", self.seconds)),
            (
                "damp",
                format!("{:.4e} ({} of mean diag H)", self.damp, self.damp_percent),
            ),
            ("damp retries", self.damp_retries.to_string()),
            ("dead columns", self.solver.dead_columns.to_string()),
            ("hessian from", self.hessian_source.clone()),
        ];
        if let Some(l) = self.solver.loss {
            rows.push(("solver loss", format!("{l:.6e}")));
        }
        if let Some(a) = self.awq_alpha {
            rows.push(("awq alpha", format!("{a}")));
        }
        if let Some(o) = &self.out {
            rows.push(("written to", o.clone()));
        }
        let w = rows.iter().map(|r| r.0.len()).max().unwrap_or(0);
        rows.iter()
            .map(|(k, v)| format!("{k:<w$}  {v}\n"))
            .collect()
    }
}

fn to_f32(path: &Path, name: &str, t: &TensorView) -> LayerResult<Vec<f32>> {
    let d = t.data();
    Ok(match t.dtype() {
        Dtype::F32 => d
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        Dtype::F16 => d
            .chunks_exact(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Dtype::BF16 => d
            .chunks_exact(2)
            .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        other => {
            return Err(LayerError::Dtype {
                path: path.into(),
                name: name.into(),
                dtype: format!("{other:?}"),
            })
        }
    })
}

fn matrix(
    path: &Path,
    st: &safetensors::SafeTensors,
    name: &str,
) -> LayerResult<Option<Array2<f32>>> {
    let t = match st.tensor(name) {
        Ok(t) => t,
        Err(_) => return Ok(None),
    };
    let shape = t.shape().to_vec();
    if shape.len() != 2 {
        return Err(LayerError::Shape {
            path: path.into(),
            detail: format!("tensor `{name}` has shape {shape:?}; expected 2 dimensions"),
        });
    }
    let v = to_f32(path, name, &t)?;
    Ok(Some(
        Array2::from_shape_vec((shape[0], shape[1]), v).expect("safetensors checked the size"),
    ))
}

/// The tensors of a layer file.
pub struct LayerInputs {
    /// `[out, in]`.
    pub weight: Array2<f32>,
    /// `[n, in]`, when present.
    pub inputs: Option<Array2<f32>>,
    /// `[in, in]`, given or built from the inputs.
    pub hessian: Array2<f32>,
}

/// Read and check `weight` and `inputs`/`hessian` from `path`.
pub fn read_layer_file(path: &Path, threads: usize) -> LayerResult<LayerInputs> {
    let bytes = std::fs::read(path).map_err(|source| LayerError::Io {
        path: path.into(),
        source,
    })?;
    let st =
        safetensors::SafeTensors::deserialize(&bytes).map_err(|e| LayerError::Safetensors {
            path: path.into(),
            detail: e.to_string(),
        })?;
    let names = || {
        let mut n: Vec<String> = st.names().into_iter().map(|s| s.to_string()).collect();
        n.sort();
        if n.is_empty() {
            "nothing".to_string()
        } else {
            n.join(", ")
        }
    };
    let weight = matrix(path, &st, "weight")?.ok_or_else(|| LayerError::MissingTensor {
        path: path.into(),
        name: "weight".into(),
        available: names(),
    })?;
    let (out, inp) = weight.dim();
    if out == 0 || inp == 0 {
        return Err(LayerError::Shape {
            path: path.into(),
            detail: format!("tensor `weight` is empty ({out} x {inp})"),
        });
    }
    let inputs = matrix(path, &st, "inputs")?;
    let hessian = if let Some(x) = &inputs {
        if x.ncols() != inp {
            return Err(LayerError::Shape {
                path: path.into(),
                detail: format!(
                    "tensor `inputs` is {:?} but `weight` has {inp} input columns (expected [n, {inp}])",
                    x.dim()
                ),
            });
        }
        let mut h = Hessian::new(inp)
            .with_counting(Counting::Tokens)
            .with_par(par(threads));
        h.add_batch(x.view(), 1)?;
        h.finish()
    } else {
        let h = matrix(path, &st, "hessian")?.ok_or_else(|| LayerError::MissingTensor {
            path: path.into(),
            name: "inputs` or `hessian".into(),
            available: names(),
        })?;
        if h.dim() != (inp, inp) {
            return Err(LayerError::Shape {
                path: path.into(),
                detail: format!(
                    "tensor `hessian` is {:?} but `weight` has {inp} input columns (expected [{inp}, {inp}])",
                    h.dim()
                ),
            });
        }
        h
    };
    Ok(LayerInputs {
        weight,
        inputs,
        hessian,
    })
}

fn par(threads: usize) -> Par {
    if threads == 1 {
        Par::Seq
    } else {
        Par::rayon(threads)
    }
}

/// The format of a job.
pub fn format_spec(job: &LayerJob) -> LayerResult<FormatSpec> {
    Ok(match job.format {
        LayerFormat::Int => {
            let g = UniformGrid::new(job.bits, job.sym)?;
            FormatSpec::Uniform(if job.mse {
                g.with_clip(MseClip::default())
            } else {
                g
            })
        }
        LayerFormat::Nf4 => FormatSpec::Nf4,
        LayerFormat::Fp4 => FormatSpec::Fp4,
        LayerFormat::Fp8 => FormatSpec::Fp8(Fp8Kind::E4M3),
    })
}

/// Run one layer job: read, solve, measure, write.
pub fn run_layer(job: &LayerJob) -> LayerResult<LayerReport> {
    let granularity = Granularity::from_group_size(job.group_size)?;
    let spec = format_spec(job)?;
    if !(job.damp >= 0.0 && job.damp.is_finite()) {
        return Err(LayerError::InvalidOption {
            option: "--damp".into(),
            detail: format!("{}: use a finite fraction >= 0 (e.g. 0.01)", job.damp),
        });
    }
    if job.block_size == 0 {
        return Err(LayerError::InvalidOption {
            option: "--block-size".into(),
            detail: "0: use a positive number of columns (e.g. 128)".into(),
        });
    }
    let li = read_layer_file(&job.input, job.threads)?;
    let (W, H) = (li.weight.view(), li.hessian.view());
    let p = par(job.threads);
    let t0 = Instant::now();
    let mut awq_alpha = None;
    let mut awq_scales: Option<Array1<f32>> = None;
    let (lin, report, Qeff): (QuantizedLinear, SolveReport, Array2<f32>) = match job.method {
        LayerMethod::Rtn => {
            let (lin, rep) = rtn(W, Some(H), &spec, granularity)?;
            let q = lin.dequantize();
            (lin, rep, q)
        }
        LayerMethod::Gptq => {
            let params = GptqParams {
                block_size: job.block_size,
                damp_percent: job.damp,
                act_order: job.act_order,
                static_groups: job.static_groups,
                granularity,
                par: p,
                ..Default::default()
            };
            let (lin, rep) = gptq(W, H, &spec, &params)?;
            let q = lin.dequantize();
            (lin, rep, q)
        }
        LayerMethod::Obq => {
            let params = ObqParams {
                damp_percent: job.damp,
                granularity,
                par: p,
                ..Default::default()
            };
            let (lin, rep) = obq(W, H, &spec, &params)?;
            let q = lin.dequantize();
            (lin, rep, q)
        }
        LayerMethod::Awq => {
            let aparams = AwqParams {
                granularity,
                ..Default::default()
            };
            let stats = match &li.inputs {
                Some(x) => AwqStats::from_inputs(x.view(), aparams.clip_samples)?,
                None => AwqStats::from_hessian(H)?,
            };
            let f = spec.build();
            let r = awq::awq(&[W], &stats, f.as_ref(), &aparams)?;
            let Ws = awq::apply(W, &r.scales, r.clip.first(), granularity);
            let (lin, mut rep) = rtn(Ws.view(), None, &spec, granularity)?;
            let q = &lin.dequantize() / &r.scales.view().insert_axis(Axis(0));
            rep.method = "awq".into();
            rep.seconds = t0.elapsed().as_secs_f64();
            awq_alpha = Some(r.alpha);
            awq_scales = Some(r.scales);
            (lin, rep, q)
        }
    };
    let seconds = t0.elapsed().as_secs_f64();
    let rel = rel_output_error(W, Qeff.view(), H)?;
    let mut written = None;
    if let Some(out) = &job.out {
        write_layer(out, &lin, Qeff.view(), awq_scales.as_ref())?;
        written = Some(out.display().to_string());
    }
    let (out_dim, in_dim) = W.dim();
    Ok(LayerReport {
        method: job.method,
        format: report.format.clone(),
        bits: spec.build().code_bits(),
        group_size: job.group_size,
        shape: [out_dim, in_dim],
        rel_output_error: rel,
        bits_per_weight: lin.bits_per_weight(),
        seconds,
        damp: report.damp,
        damp_percent: report.damp_percent,
        damp_retries: report.damp_retries.len(),
        hessian_source: if li.inputs.is_some() {
            "inputs"
        } else {
            "hessian"
        }
        .into(),
        tokens: li.inputs.as_ref().map(|x| x.nrows()),
        awq_alpha,
        out: written,
        solver: report,
    })
}

fn bytes_f32<'a>(v: impl Iterator<Item = &'a f32>) -> Vec<u8> {
    v.flat_map(|x| x.to_le_bytes()).collect()
}

fn view<'a>(
    path: &Path,
    dt: Dtype,
    shape: Vec<usize>,
    data: &'a [u8],
) -> LayerResult<TensorView<'a>> {
    TensorView::new(dt, shape, data).map_err(|e| LayerError::Safetensors {
        path: path.into(),
        detail: e.to_string(),
    })
}

/// Write the quantized layer to `path` atomically (a temp file beside it, then rename).
pub fn write_layer(
    path: &Path,
    lin: &QuantizedLinear,
    weight: ArrayView2<f32>,
    awq_scales: Option<&Array1<f32>>,
) -> LayerResult<()> {
    let (out, inp) = lin.shape();
    let weight_b = bytes_f32(weight.iter());
    let codes_b: Vec<u8> = lin.codes.iter().copied().collect();
    let scales_b = bytes_f32(lin.scales.iter());
    let zeros_b = bytes_f32(lin.zeros.iter());
    let gidx_b: Vec<u8> = lin
        .g_idx
        .iter()
        .flat_map(|&g| (g as i32).to_le_bytes())
        .collect();
    let awq_b = awq_scales.map(|s| bytes_f32(s.iter()));
    let ng = lin.n_groups();
    let mk = |dt, shape, data| view(path, dt, shape, data);
    let mut tensors = vec![
        (
            "weight".to_string(),
            mk(Dtype::F32, vec![out, inp], &weight_b)?,
        ),
        (
            "codes".to_string(),
            mk(Dtype::U8, vec![out, inp], &codes_b)?,
        ),
        (
            "scales".to_string(),
            mk(Dtype::F32, vec![out, ng], &scales_b)?,
        ),
        (
            "zeros".to_string(),
            mk(Dtype::F32, vec![out, ng], &zeros_b)?,
        ),
        ("g_idx".to_string(), mk(Dtype::I32, vec![inp], &gidx_b)?),
    ];
    if let Some(b) = &awq_b {
        tensors.push(("awq_scales".to_string(), mk(Dtype::F32, vec![inp], b)?));
    }
    let bytes = safetensors::serialize(tensors, None).map_err(|e| LayerError::Safetensors {
        path: path.into(),
        detail: e.to_string(),
    })?;
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.tmp{}",
        path.file_name()
            .map(|s| s.to_string_lossy())
            .unwrap_or_default(),
        std::process::id()
    ));
    let io = |source| LayerError::Io {
        path: path.into(),
        source,
    };
    std::fs::write(&tmp, &bytes).map_err(io)?;
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        io(e)
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_input(path: &Path, tensors: Vec<(&str, Dtype, Vec<usize>, Vec<u8>)>) {
        let views: Vec<(String, TensorView)> = tensors
            .iter()
            .map(|(n, d, s, b)| (n.to_string(), TensorView::new(*d, s.clone(), b).unwrap()))
            .collect();
        std::fs::write(path, safetensors::serialize(views, None).unwrap()).unwrap();
    }

    fn tmp(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("quantlab-layer-{}-{name}", std::process::id()))
    }

    /// End to end: inputs file (f16 weight), GPTQ and RTN, the output file read back; the
    /// error oracle is ||(W - Q) X^T||^2 / ||W X^T||^2 computed here from X.
    #[test]
    fn layer_roundtrip_and_errors() {
        let X = quantlab_solvers::synth::correlated_inputs(256, 32, 1, 2);
        let W = quantlab_solvers::synth::random_weight(8, 32, 2);
        let wb: Vec<u8> = W
            .iter()
            .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
            .collect();
        let Wh = W.mapv(|v| half::f16::from_f32(v).to_f32());
        let path = tmp("in.safetensors");
        write_input(
            &path,
            vec![
                ("weight", Dtype::F16, vec![8, 32], wb.clone()),
                ("inputs", Dtype::F32, vec![256, 32], bytes_f32(X.iter())),
            ],
        );
        let out = tmp("out.safetensors");
        let mut job = LayerJob {
            input: path.clone(),
            group_size: 16,
            out: Some(out.clone()),
            ..Default::default()
        };
        let rep = run_layer(&job).unwrap();
        let bytes = std::fs::read(&out).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let Q = matrix(&out, &st, "weight").unwrap().unwrap();
        let num = (&Wh - &Q).dot(&X.t()).mapv(|v| (v as f64).powi(2)).sum();
        let den = Wh.dot(&X.t()).mapv(|v| (v as f64).powi(2)).sum();
        assert!((rep.rel_output_error - num / den).abs() < 1e-3 * num / den);
        assert_eq!(st.tensor("g_idx").unwrap().dtype(), Dtype::I32);
        assert_eq!(st.tensor("codes").unwrap().shape(), &[8, 32]);
        assert_eq!(st.tensor("scales").unwrap().shape(), &[8, 2]);
        // 4-bit codes + f16 scale per 16 weights
        assert!((rep.bits_per_weight - 5.0).abs() < 1e-9);
        let json: serde_json::Value = serde_json::from_str(&rep.to_json()).unwrap();
        for k in ["rel_output_error", "bits_per_weight", "seconds", "damp"] {
            assert!(json.get(k).is_some(), "{k}");
        }
        job.method = LayerMethod::Rtn;
        job.out = None;
        let rtn_rep = run_layer(&job).unwrap();
        assert!(rep.rel_output_error < rtn_rep.rel_output_error);
        job.method = LayerMethod::Awq;
        let awq_rep = run_layer(&job).unwrap();
        assert!(awq_rep.awq_alpha.is_some() && awq_rep.rel_output_error.is_finite());

        // missing hessian/inputs: named
        write_input(&path, vec![("weight", Dtype::F16, vec![8, 32], wb.clone())]);
        let e = run_layer(&job).unwrap_err().to_string();
        assert!(e.contains("hessian") && e.contains("weight"), "{e}");
        // all-zero Hessian: a clear error
        job.method = LayerMethod::Gptq;
        write_input(
            &path,
            vec![
                ("weight", Dtype::F16, vec![8, 32], wb.clone()),
                ("hessian", Dtype::F32, vec![32, 32], vec![0u8; 32 * 32 * 4]),
            ],
        );
        let e = run_layer(&job).unwrap_err().to_string();
        assert!(e.contains("all zero"), "{e}");
        // mismatched shapes
        write_input(
            &path,
            vec![
                ("weight", Dtype::F16, vec![8, 32], wb.clone()),
                ("hessian", Dtype::F32, vec![16, 16], vec![0u8; 16 * 16 * 4]),
            ],
        );
        let e = run_layer(&job).unwrap_err().to_string();
        assert!(e.contains("hessian") && e.contains("[32, 32]"), "{e}");
        // wrong dtype
        write_input(
            &path,
            vec![("weight", Dtype::I32, vec![8, 32], vec![0u8; 8 * 32 * 4])],
        );
        let e = run_layer(&job).unwrap_err().to_string();
        assert!(e.contains("dtype"), "{e}");
        // NaN inputs
        let mut Xn = X.clone();
        Xn[[3, 4]] = f32::NAN;
        write_input(
            &path,
            vec![
                ("weight", Dtype::F16, vec![8, 32], wb),
                ("inputs", Dtype::F32, vec![256, 32], bytes_f32(Xn.iter())),
            ],
        );
        let e = run_layer(&job).unwrap_err().to_string();
        assert!(e.contains("inputs") && e.contains("NaN"), "{e}");
        let _ = std::fs::remove_file(&path);
        let _ = std::fs::remove_file(&out);
    }
}
