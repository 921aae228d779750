//! Row-wise kernels on f32 slices (RMSNorm, RoPE + head reshuffles, causal softmax, SwiGLU,
//! log-softmax NLL), parallel over rows with rayon. Candle does the matrix products; these do
//! the memory-bound steps in one pass each instead of a chain of tensor ops.

use candle_core::{CpuStorage, Device, Storage, Tensor};
use faer::{Accum, MatMut, MatRef, Par};
use rayon::prelude::*;

use crate::Result;

/// Runs `f` on the contiguous f32 data of a CPU tensor, in place when the tensor is
/// contiguous (no copy), else on a contiguous copy. Errors on another dtype or device.
pub fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let t = if t.is_contiguous() {
        t.clone()
    } else {
        t.contiguous()?
    };
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        Storage::Cpu(CpuStorage::F32(v)) => {
            let (a, b) = layout
                .contiguous_offsets()
                .expect("contiguous tensor has contiguous offsets");
            Ok(f(&v[a..b]))
        }
        _ => Err(candle_core::Error::Msg(format!(
            "expected an f32 CPU tensor, got {:?} on {:?}",
            t.dtype(),
            t.device()
        ))
        .into()),
    }
}

pub(crate) fn tensor(v: Vec<f32>, shape: &[usize]) -> Result<Tensor> {
    Ok(Tensor::from_vec(v, shape, &Device::Cpu)?)
}

/// A vector of `len` f32 values written in parallel, chunk by chunk: `f(i, chunk)` gets the
/// `i`-th chunk of `chunk` values (the last one may be shorter), zeroed by the same task just
/// before. This replaces `vec![0; len]` followed by `par_chunks_mut(chunk)`: the zeroing of a
/// fresh output (one serial `memset` in the allocating thread, up to a tenth of a block's
/// forward here) moves into the parallel tasks, on memory they are about to write.
pub(crate) fn par_fill(
    len: usize,
    chunk: usize,
    f: impl Fn(usize, &mut [f32]) + Sync + Send,
) -> Vec<f32> {
    let mut v: Vec<f32> = Vec::with_capacity(len);
    v.spare_capacity_mut()[..len]
        .par_chunks_mut(chunk.max(1))
        .enumerate()
        .for_each(|(i, c)| {
            for x in c.iter_mut() {
                x.write(0.0);
            }
            // SAFETY: every element of `c` was initialised just above, and `MaybeUninit<f32>`
            // has the layout of `f32`.
            let c = unsafe { &mut *(c as *mut [std::mem::MaybeUninit<f32>] as *mut [f32]) };
            f(i, c);
        });
    // SAFETY: the chunks cover `0..len`, and each was initialised by its task.
    unsafe { v.set_len(len) };
    v
}

/// Defines `fn $name(args) -> ret` that runs its body compiled for AVX2 when the CPU has it,
/// and for the build's baseline (SSE2 on x86-64) otherwise. The body and the helpers it calls
/// (`#[inline(always)]`: [`fast_exp`], [`sum_lanes`], [`max_lanes`]) are inlined into both
/// copies, so the same loops vectorise 8 lanes wide instead of 4. The results are the same
/// bits: Rust never contracts `a * b + c` into an FMA, and the lane accumulators fix the
/// order of every sum.
macro_rules! avx2_kernel {
    ($(#[$doc:meta])* fn $name:ident($($arg:ident : $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$doc])*
        fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn imp($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2")]
                unsafe fn avx2($($arg: $ty),*) $(-> $ret)? {
                    imp($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx2") {
                    // SAFETY: the CPU supports AVX2 (checked just above).
                    return unsafe { avx2($($arg),*) };
                }
            }
            imp($($arg),*)
        }
    };
}

/// Rows processed per rayon task: enough work to amortise scheduling.
fn rows_per_task(row_len: usize) -> usize {
    (16384 / row_len.max(1)).max(1)
}

/// Sum with 8 independent accumulators, so that the loop vectorises.
#[inline(always)]
fn sum_lanes(x: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let mut it = x.chunks_exact(8);
    for c in &mut it {
        for i in 0..8 {
            acc[i] += c[i];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for &v in it.remainder() {
        s += v;
    }
    s
}

/// Maximum with 8 independent lanes (NaN-free input), so that the loop vectorises.
#[inline(always)]
fn max_lanes(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 8];
    let mut it = x.chunks_exact(8);
    for c in &mut it {
        for i in 0..8 {
            acc[i] = if c[i] > acc[i] { c[i] } else { acc[i] };
        }
    }
    let mut m = acc.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    for &v in it.remainder() {
        m = m.max(v);
    }
    m
}

/// `y = x / sqrt(mean(x^2) + eps) * w`, row by row, for `x` of shape `[.., d]`.
pub(crate) fn rms_norm(x: &Tensor, w: &[f32], eps: f32) -> Result<Tensor> {
    let d = w.len();
    let shape = x.dims().to_vec();
    let out = with_f32(x, |xs| {
        let rpt = rows_per_task(d);
        par_fill(xs.len(), d * rpt, |ci, o| {
            let xi = &xs[ci * d * rpt..ci * d * rpt + o.len()];
            rms_norm_rows(o, xi, w, eps);
        })
    })?;
    tensor(out, &shape)
}

avx2_kernel! {
    /// [`rms_norm`] on whole rows of `w.len()` values.
    fn rms_norm_rows(o: &mut [f32], xi: &[f32], w: &[f32], eps: f32) {
        let d = w.len();
        for (orow, xrow) in o.chunks_mut(d).zip(xi.chunks(d)) {
            let mut acc = [0f32; 8];
            let mut it = xrow.chunks_exact(8);
            for c in &mut it {
                for i in 0..8 {
                    acc[i] += c[i] * c[i];
                }
            }
            let ss: f32 =
                acc.iter().sum::<f32>() + it.remainder().iter().map(|v| v * v).sum::<f32>();
            let r = 1.0 / (ss / d as f32 + eps).sqrt();
            for ((o, &v), &g) in orow.iter_mut().zip(xrow).zip(w) {
                *o = v * r * g;
            }
        }
    }
}

/// Rotary tables for positions `pos0 .. pos0 + n`: `cos`, `sin` of shape `[n, half]`.
pub(crate) struct Rope {
    pub cos: Vec<f32>,
    pub sin: Vec<f32>,
    pub half: usize,
}

impl Rope {
    pub(crate) fn new(inv_freq: &[f64], pos0: usize, n: usize, pos_scale: f64) -> Self {
        let half = inv_freq.len();
        let mut cos = Vec::with_capacity(n * half);
        let mut sin = Vec::with_capacity(n * half);
        for t in 0..n {
            let p = (pos0 + t) as f64 / pos_scale;
            for &f in inv_freq {
                let a = p * f;
                cos.push(a.cos() as f32);
                sin.push(a.sin() as f32);
            }
        }
        Self { cos, sin, half }
    }
}

/// Rearranges `x` of shape `[b, n, kvh, g, hd]` (tokens-major, as a projection returns it)
/// into `[b, kvh, n, g, hd]` (one matrix of `n * g` rows per KV head), applying the
/// Hugging Face "rotate half" RoPE on the way when `rope` is given:
/// `y[i] = x[i] cos - x[i + hd/2] sin`, `y[i + hd/2] = x[i + hd/2] cos + x[i] sin`.
pub(crate) fn to_kv_major(
    x: &Tensor,
    b: usize,
    n: usize,
    kvh: usize,
    g: usize,
    hd: usize,
    rope: Option<&Rope>,
) -> Result<Tensor> {
    let out = with_f32(x, |xs| {
        let block = n * g * hd; // one (batch, kv head) matrix
        par_fill(xs.len(), block, |bk, o| {
            let (bi, k) = (bk / kvh, bk % kvh);
            for t in 0..n {
                for gi in 0..g {
                    let src = (((bi * n + t) * kvh + k) * g + gi) * hd;
                    let dst = (t * g + gi) * hd;
                    let xrow = &xs[src..src + hd];
                    let orow = &mut o[dst..dst + hd];
                    match rope {
                        None => orow.copy_from_slice(xrow),
                        Some(r) => {
                            let h = r.half;
                            let c = &r.cos[t * h..(t + 1) * h];
                            let s = &r.sin[t * h..(t + 1) * h];
                            let (x1, x2) = xrow.split_at(h);
                            let (o1, o2) = orow.split_at_mut(h);
                            for i in 0..h {
                                o1[i] = x1[i] * c[i] - x2[i] * s[i];
                                o2[i] = x2[i] * c[i] + x1[i] * s[i];
                            }
                        }
                    }
                }
            }
        })
    })?;
    tensor(out, &[b, kvh, n * g, hd])
}

/// Inverse of [`to_kv_major`] without RoPE: `[b, kvh, n, g, hd]` -> `[b, n, kvh * g * hd]`.
pub(crate) fn from_kv_major(
    x: &Tensor,
    b: usize,
    n: usize,
    kvh: usize,
    g: usize,
    hd: usize,
) -> Result<Tensor> {
    let width = kvh * g * hd;
    let out = with_f32(x, |xs| {
        let rpt = rows_per_task(width);
        par_fill(xs.len(), width * rpt, |ci, o| {
            for (r, o) in o.chunks_mut(width).enumerate() {
                let bt = ci * rpt + r;
                let (bi, t) = (bt / n, bt % n);
                for k in 0..kvh {
                    let src = ((bi * kvh + k) * n + t) * g * hd;
                    o[k * g * hd..(k + 1) * g * hd].copy_from_slice(&xs[src..src + g * hd]);
                }
            }
        })
    })?;
    tensor(out, &[b, n, width])
}

/// `e^x` for f32 by range reduction `x = k ln2 + r`, `|r| <= ln2/2`, and a degree-6 Taylor
/// polynomial of `e^r` (relative error below 2e-7); written branch-free so that loops over
/// it vectorise. Inputs below -87 give 0.
#[inline(always)]
pub(crate) fn fast_exp(x: f32) -> f32 {
    let x = x.clamp(-87.0, 88.0);
    // Round x log2(e) to the nearest integer k by adding 1.5 * 2^23: the sum's low mantissa
    // bits then hold k, read back with integer ops (no libm call, no float->int conversion,
    // only wrapping integer arithmetic, so loops over it vectorise in every profile).
    const SHIFT: f32 = 12_582_912.0;
    let t = x * std::f32::consts::LOG2_E + SHIFT;
    let k = t - SHIFT;
    // ln 2 split in a high part exact in f32 and a low correction.
    let r = x - k * 0.693_145_75 - k * 1.428_606_8e-6;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    let ki = t.to_bits().wrapping_sub(SHIFT.to_bits()); // k in two's complement
    p * f32::from_bits(ki.wrapping_add(127).wrapping_shl(23))
}

/// Rows of `A` per parallel task in [`matmul`].
const ROW_TASK: usize = 128;

/// `C = A B` for row-major `A` `[m, k]` and `B` `[k, n]` (f32, faer), as a new row-major
/// `[m, n]` vector.
///
/// Tall products are split into independent tasks of [`ROW_TASK`] rows of `A` and `C`, each a
/// sequential faer product, balanced by rayon's work stealing; short ones (decoding) let faer
/// parallelise inside the product.
pub(crate) fn matmul(a: &[f32], b: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
    let bm = MatRef::from_row_major_slice(b, k, n);
    if m >= 2 * ROW_TASK {
        par_fill(m * n, ROW_TASK * n, |ci, c| {
            let rows = c.len() / n;
            let a = &a[ci * ROW_TASK * k..(ci * ROW_TASK + rows) * k];
            let am = MatRef::from_row_major_slice(a, rows, k);
            let cm = MatMut::from_row_major_slice_mut(c, rows, n);
            faer::linalg::matmul::matmul(cm, Accum::Replace, am, bm, 1.0f32, Par::Seq);
        })
    } else {
        let mut c = vec![0f32; m * n];
        let am = MatRef::from_row_major_slice(a, m, k);
        let cm = MatMut::from_row_major_slice_mut(&mut c, m, n);
        faer::linalg::matmul::matmul(cm, Accum::Replace, am, bm, 1.0f32, Par::rayon(0));
        c
    }
}

/// This machine's f32 GEMM rate through the forward's own product ([`matmul`], the kernel
/// every linear of the forward runs): the best of `reps` products `[m, k] x [k, n]`, in
/// GFLOP/s (`2 m k n` flops each), with the seconds of the best run. For benchmarks that
/// report a phase's speed beside the machine's, measured in the same process.
pub fn gemm_gflops(m: usize, k: usize, n: usize, reps: usize) -> (f64, f64) {
    let a: Vec<f32> = (0..m * k)
        .map(|i| ((i * 37 % 101) as f32) / 101.0 - 0.5)
        .collect();
    let b: Vec<f32> = (0..k * n)
        .map(|i| ((i * 53 % 97) as f32) / 97.0 - 0.5)
        .collect();
    let mut best = f64::INFINITY;
    for _ in 0..reps.max(1) {
        let t = std::time::Instant::now();
        let c = matmul(&a, &b, m, k, n);
        best = best.min(t.elapsed().as_secs_f64());
        std::hint::black_box(c);
    }
    (2.0 * (m * k * n) as f64 / best / 1e9, best)
}

/// `y = x W^T (+ bias)` with `wt = W^T` stored `[k, n]` row-major; `x` is `[m, k]`.
pub(crate) fn linear(x: &Tensor, wt: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let (k, n) = wt.dims2()?;
    let m = x.elem_count() / k;
    let mut out = with_f32(x, |xs| with_f32(wt, |ws| matmul(xs, ws, m, k, n)))??;
    if let Some(b) = bias {
        with_f32(b, |bs| {
            out.par_chunks_mut(n).for_each(|row| {
                for (o, &b) in row.iter_mut().zip(bs) {
                    *o += b;
                }
            })
        })?;
    }
    let mut shape = x.dims().to_vec();
    *shape.last_mut().expect("x has a last dim") = n;
    tensor(out, &shape)
}

avx2_kernel! {
/// Causal softmax of scaled scores, in place, row by row.
///
/// `s` holds `rows` rows of `t_keys` scores; row `r` belongs to query token `r / g` at
/// absolute position `pos0 + r / g`, which sees keys at absolute positions `key0 + j` with
/// `key0 + j <= pos` (and `> pos - window` with a sliding window). Masked entries become 0.
fn causal_softmax_rows(
    s: &mut [f32],
    t_keys: usize,
    g: usize,
    pos0: usize,
    key0: usize,
    scale: f32,
    window: Option<usize>,
) {
    for (r, row) in s.chunks_mut(t_keys).enumerate() {
        let pos = pos0 + r / g;
        let hi = (pos + 1).saturating_sub(key0).min(t_keys);
        let lo = match window {
            Some(w) => (pos + 1).saturating_sub(w).saturating_sub(key0).min(hi),
            None => 0,
        };
        let m = max_lanes(&row[lo..hi]) * scale;
        for v in &mut row[lo..hi] {
            *v = fast_exp(*v * scale - m);
        }
        let inv = 1.0 / sum_lanes(&row[lo..hi]);
        for v in &mut row[lo..hi] {
            *v *= inv;
        }
        row[..lo].fill(0.0);
        row[hi..].fill(0.0);
    }
}
}

/// Causal scaled dot-product attention for grouped queries.
///
/// `q` is `[bk, n * g, hd]` (per batch and KV head, rows token-major: row `t * g + i` is
/// query head `i` of the group at token `t`, absolute position `pos0 + t`); `k`, `v` are
/// `[bk, t_keys, hd]` with keys at absolute positions `key0 ..`. Long prompts are cut into
/// query chunks that each multiply only the keys they can see.
pub(crate) fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    g: usize,
    pos0: usize,
    key0: usize,
    scale: f32,
    window: Option<usize>,
) -> Result<Tensor> {
    let dims = q.dims().to_vec();
    let (rows, hd) = (dims[2], dims[3]);
    let n = rows / g;
    let t_keys = k.dims()[2];
    let chunk = if n >= 256 { n.div_ceil(4) } else { n };
    let mut out = par_fill(q.elem_count(), 1 << 16, |_, _| {});
    with_f32(q, |qs| {
        with_f32(k, |ks| {
            with_f32(v, |vs| {
                // one task per (batch x KV head, query chunk); chunks of one matrix are
                // consecutive row blocks of its output
                let mut tasks: Vec<(usize, usize, &mut [f32])> = Vec::new();
                for (m, om) in out.chunks_mut(rows * hd).enumerate() {
                    for (ci, oc) in om.chunks_mut(chunk * g * hd).enumerate() {
                        tasks.push((m, ci * chunk, oc));
                    }
                }
                tasks.into_par_iter().for_each(|(m, t0, oc)| {
                    let t1 = t0 + oc.len() / (g * hd);
                    let qm = &qs[m * rows * hd..(m + 1) * rows * hd];
                    let km = &ks[m * t_keys * hd..(m + 1) * t_keys * hd];
                    let vm = &vs[m * t_keys * hd..(m + 1) * t_keys * hd];
                    let visible = (pos0 + t1).saturating_sub(key0).min(t_keys);
                    let (r0, r1) = (t0 * g, t1 * g);
                    let mut scores = vec![0f32; (r1 - r0) * visible];
                    let a = MatRef::from_row_major_slice(&qm[r0 * hd..r1 * hd], r1 - r0, hd);
                    let kt = MatRef::from_row_major_slice(&km[..visible * hd], visible, hd);
                    let sc = MatMut::from_row_major_slice_mut(&mut scores, r1 - r0, visible);
                    faer::linalg::matmul::matmul(
                        sc,
                        Accum::Replace,
                        a,
                        kt.transpose(),
                        1.0f32,
                        Par::Seq,
                    );
                    causal_softmax_rows(&mut scores, visible, g, pos0 + t0, key0, scale, window);
                    let p = MatRef::from_row_major_slice(&scores, r1 - r0, visible);
                    let vv = MatRef::from_row_major_slice(&vm[..visible * hd], visible, hd);
                    let o = MatMut::from_row_major_slice_mut(oc, r1 - r0, hd);
                    faer::linalg::matmul::matmul(o, Accum::Replace, p, vv, 1.0f32, Par::Seq);
                });
            })
        })
    })???;
    tensor(out, &dims)
}

/// Transpose of a 2-D f32 tensor `[r, c]` into a new contiguous `[c, r]`, by 32 x 32 tiles.
pub(crate) fn transpose(w: &Tensor) -> Result<Tensor> {
    let (r, c) = w.dims2()?;
    const T: usize = 32;
    let out = with_f32(w, |ws| {
        // each task owns T rows of the output (= T columns of the input)
        par_fill(r * c, T * r, |cb, o| {
            let c0 = cb * T;
            let cn = o.len() / r;
            for r0 in (0..r).step_by(T) {
                for i in r0..(r0 + T).min(r) {
                    let src = &ws[i * c + c0..i * c + c0 + cn];
                    for (j, &v) in src.iter().enumerate() {
                        o[j * r + i] = v;
                    }
                }
            }
        })
    })?;
    tensor(out, &[c, r])
}

/// Elements per parallel task of the elementwise kernels.
const ELEMWISE_TASK: usize = 16384;

/// `a + b` elementwise (the residual connection), same shapes, single pass.
pub(crate) fn add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let shape = a.dims().to_vec();
    let out = with_f32(a, |xs| {
        with_f32(b, |ys| {
            par_fill(xs.len(), ELEMWISE_TASK, |ci, o| {
                let at = ci * ELEMWISE_TASK;
                add_chunk(o, &xs[at..at + o.len()], &ys[at..at + o.len()]);
            })
        })
    })??;
    tensor(out, &shape)
}

/// SwiGLU: `silu(gate) * up`, elementwise.
pub(crate) fn silu_mul(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    let shape = gate.dims().to_vec();
    let out = with_f32(gate, |gs| {
        with_f32(up, |us| {
            par_fill(gs.len(), ELEMWISE_TASK, |ci, o| {
                let at = ci * ELEMWISE_TASK;
                silu_mul_chunk(o, &gs[at..at + o.len()], &us[at..at + o.len()]);
            })
        })
    })??;
    tensor(out, &shape)
}

avx2_kernel! {
    /// `o = x + y`.
    fn add_chunk(o: &mut [f32], x: &[f32], y: &[f32]) {
        for ((o, &x), &y) in o.iter_mut().zip(x).zip(y) {
            *o = x + y;
        }
    }
}

avx2_kernel! {
    /// `o = silu(g) * u`.
    fn silu_mul_chunk(o: &mut [f32], g: &[f32], u: &[f32]) {
        for ((o, &g), &u) in o.iter_mut().zip(g).zip(u) {
            *o = g / (1.0 + fast_exp(-g)) * u;
        }
    }
}

/// Negative log-likelihoods `logsumexp(logits_r) - logits_r[target_r]` of each row of
/// `logits` `[rows, vocab]`, accumulated in f64.
pub(crate) fn row_nll(logits: &Tensor, targets: &[u32]) -> Result<Vec<f64>> {
    let vocab = logits.dims()[logits.rank() - 1];
    with_f32(logits, |l| {
        l.par_chunks(vocab)
            .zip(targets.par_iter())
            .map(|(row, &t)| nll_row(row, t as usize))
            .collect()
    })
}

avx2_kernel! {
    /// `logsumexp(row) - row[t]`.
    fn nll_row(row: &[f32], t: usize) -> f64 {
        let m = max_lanes(row);
        // 8 partial sums so the loop vectorises.
        let mut acc = [0f32; 8];
        let mut chunks = row.chunks_exact(8);
        for c in &mut chunks {
            for i in 0..8 {
                acc[i] += fast_exp(c[i] - m);
            }
        }
        let mut sum: f64 = acc.iter().map(|&a| a as f64).sum();
        for &v in chunks.remainder() {
            sum += fast_exp(v - m) as f64;
        }
        (m as f64 + sum.ln()) - row[t] as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn par_fill_hands_out_every_chunk_zeroed() {
        let v = par_fill(1000, 64, |i, c| {
            assert!(c.iter().all(|&x| x == 0.0));
            assert_eq!(c.len(), if i == 15 { 1000 - 15 * 64 } else { 64 });
            for (j, x) in c.iter_mut().enumerate() {
                *x = (i * 64 + j) as f32;
            }
        });
        assert_eq!(v, (0..1000).map(|x| x as f32).collect::<Vec<_>>());
        assert!(par_fill(0, 8, |_, _| panic!("no chunk of an empty vector")).is_empty());
    }

    #[test]
    fn fast_exp_matches_std() {
        let mut worst = 0f64;
        let mut x = -80.0f32;
        while x < 80.0 {
            let a = fast_exp(x) as f64;
            let b = (x as f64).exp();
            worst = worst.max(((a - b) / b).abs());
            x += 0.0137;
        }
        assert!(worst < 1e-6, "worst relative error {worst}");
        assert_eq!(fast_exp(-200.0), fast_exp(-87.0));
        assert!(fast_exp(-200.0) < 2e-38);
    }
}
