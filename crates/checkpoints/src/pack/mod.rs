//! Bit packers of the checkpoint formats: pure functions, scalar references, no files.
//!
//! Each format is a pair of functions `QuantizedLinear -> tensors` and back, plus a
//! dequantizer that follows the peer loader's formula literally:
//!
//! * [`gptq`]: GPTQ `qweight` / `qzeros` / `scales` / `g_idx`, 2, 3, 4 and 8 bits, checkpoint
//!   formats v1 (`"gptq"`, zeros stored minus one) and v2 (`"gptq_v2"`, raw zeros);
//! * [`awq`]: AutoAWQ GEMM, 4 bits, packed along the output dimension with the interleave;
//! * [`bnb`]: bitsandbytes NF4 / FP4 (with double quantization) and LLM.int8 tensors;
//! * [`gguf_blocks`]: the ggml block types Q4_0 .. Q6_K as `#[repr(C)]` structs with
//!   slice-to-slice quantizers and dequantizers and their exact little-endian bytes.
//!
//! Whole-file writers and readers build on these.
//!
//! The shared helper of the integer formats is an LSB-first bit stream: [`pack_lsb`] writes
//! value `j` of a run at bit `b * j` of a stream of 32-bit words (value bits crossing a word
//! boundary continue at bit 0 of the next word, which is exactly GPTQ's three-word 3-bit
//! layout), and [`unpack_lsb`] reads it back.

pub mod awq;
pub mod bnb;
pub mod gguf_blocks;
pub mod gptq;

pub use awq::{pack_awq, AwqTensors};
pub use gptq::{pack_gptq, GptqFormat, GptqTensors};

use crate::CheckpointError;

/// Values per group of whole words in the LSB-first stream: 32 values of `bits` bits fill
/// `bits` words exactly; for 2, 4 and 8 bits a single word already holds `32 / bits`.
pub fn pack_unit(bits: u32) -> usize {
    if 32 % bits == 0 {
        (32 / bits) as usize
    } else {
        32
    }
}

/// Pack `values` (each `< 2^bits`, `bits` in 1..=8) LSB first into `values.len() * bits / 32`
/// words: value `j` starts at bit `bits * j` of the stream.
///
/// Panics (caller bug) if the run does not fill whole words or a value does not fit.
///
/// ```
/// use quantlab_checkpoints::pack::{pack_lsb, unpack_lsb};
/// let v: Vec<u8> = (0..8).collect();
/// let w = pack_lsb(&v, 4);
/// assert_eq!(w, vec![0x7654_3210]);
/// assert_eq!(unpack_lsb(&w, 4, 8), v);
/// ```
#[track_caller]
pub fn pack_lsb(values: &[u8], bits: u32) -> Vec<u32> {
    assert!((1..=8).contains(&bits), "bits = {bits}");
    let total = values.len() * bits as usize;
    assert!(
        total % 32 == 0,
        "{} values of {bits} bits do not fill whole words",
        values.len()
    );
    let mut words = vec![0u32; total / 32];
    for (j, &v) in values.iter().enumerate() {
        assert!(
            (v as u32) >> bits == 0,
            "value {v} does not fit in {bits} bits"
        );
        let bit = j * bits as usize;
        let (w, s) = (bit / 32, (bit % 32) as u32);
        words[w] |= (v as u32) << s;
        if s + bits > 32 {
            words[w + 1] |= (v as u32) >> (32 - s);
        }
    }
    words
}

/// Read `n` values of `bits` bits from an LSB-first word stream (inverse of [`pack_lsb`]).
#[track_caller]
pub fn unpack_lsb(words: &[u32], bits: u32, n: usize) -> Vec<u8> {
    assert!((1..=8).contains(&bits), "bits = {bits}");
    assert!(
        n * bits as usize <= words.len() * 32,
        "{n} values of {bits} bits exceed {} words",
        words.len()
    );
    let mask = (1u64 << bits) - 1;
    (0..n)
        .map(|j| {
            let bit = j * bits as usize;
            let (w, s) = (bit / 32, bit % 32);
            let lo = words[w] as u64;
            let hi = words.get(w + 1).copied().unwrap_or(0) as u64;
            (((lo | hi << 32) >> s) & mask) as u8
        })
        .collect()
}

/// The error of a tensor that does not fit a format.
pub(crate) fn pack_err(
    format: impl Into<String>,
    tensor: &str,
    detail: impl Into<String>,
) -> CheckpointError {
    CheckpointError::Pack {
        format: format.into(),
        tensor: tensor.to_string(),
        detail: detail.into(),
    }
}

/// Check that `zero` is an integer in `lo..=hi` (zero points of the integer formats).
pub(crate) fn integer_in(x: f32, lo: i64, hi: i64) -> Option<i64> {
    if x.is_finite() && x.fract() == 0.0 && (lo as f32..=hi as f32).contains(&x) {
        Some(x as i64)
    } else {
        None
    }
}
