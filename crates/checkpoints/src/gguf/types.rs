//! The ggml tensor types a GGUF file can name, with their block geometry.
//!
//! Facts from ggml's `enum ggml_type` and the `gguf` Python package's `GGML_QUANT_SIZES`:
//! ids 4, 5 (Q4_2, Q4_3), 31..33 (Q4_0_4_4, Q4_0_4_8, Q4_0_8_8) and 36..38 (IQ4_NL_4_4, ...)
//! were removed from GGUF files and are rejected.

use serde::{Deserialize, Serialize};

/// Weights per super-block of the K-quants and most IQ types.
const QK_K: u64 = 256;

macro_rules! ggml_types {
    ($( $(#[$doc:meta])* $variant:ident = $id:literal, $name:literal, $block:expr, $size:expr; )*) => {
        /// A ggml tensor type (`enum ggml_type`): the storage of one tensor in a GGUF file.
        ///
        /// Values are stored in blocks of [`GgmlType::block_size`] weights taking
        /// [`GgmlType::type_size`] bytes; blocks run along `ne[0]`, the innermost dimension.
        ///
        /// ```
        /// use quantlab_checkpoints::gguf::GgmlType;
        /// let t = GgmlType::from_id(3).unwrap();
        /// assert_eq!(t, GgmlType::Q4_1);
        /// assert_eq!((t.name(), t.block_size(), t.type_size()), ("Q4_1", 32, 20));
        /// // 4.99 bits per weight: 20 bytes for 32 weights.
        /// assert!((t.bits_per_weight() - 5.0).abs() < 1e-9);
        /// ```
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[allow(non_camel_case_types)]
        #[non_exhaustive]
        pub enum GgmlType {
            $( $(#[$doc])* $variant, )*
        }

        impl GgmlType {
            /// Every type this reader knows, in id order.
            pub const ALL: &'static [GgmlType] = &[ $( GgmlType::$variant, )* ];

            /// The type with ggml id `id`, or `None` for an unknown or removed id.
            pub fn from_id(id: u32) -> Option<GgmlType> {
                match id {
                    $( $id => Some(GgmlType::$variant), )*
                    _ => None,
                }
            }

            /// The ggml id written in GGUF tensor infos.
            pub fn id(self) -> u32 {
                match self {
                    $( GgmlType::$variant => $id, )*
                }
            }

            /// ggml's name for the type (`"Q4_K"`, `"BF16"`, ...).
            pub fn name(self) -> &'static str {
                match self {
                    $( GgmlType::$variant => $name, )*
                }
            }

            /// Weights per block.
            pub fn block_size(self) -> u64 {
                match self {
                    $( GgmlType::$variant => $block, )*
                }
            }

            /// Bytes per block.
            pub fn type_size(self) -> u64 {
                match self {
                    $( GgmlType::$variant => $size, )*
                }
            }
        }
    };
}

ggml_types! {
    /// IEEE binary32.
    F32 = 0, "F32", 1, 4;
    /// IEEE binary16.
    F16 = 1, "F16", 1, 2;
    /// 4-bit symmetric, blocks of 32: `{f16 d; u8 qs[16]}`.
    Q4_0 = 2, "Q4_0", 32, 2 + 16;
    /// 4-bit asymmetric, blocks of 32: `{f16 d; f16 m; u8 qs[16]}`.
    Q4_1 = 3, "Q4_1", 32, 2 + 2 + 16;
    /// 5-bit symmetric, blocks of 32.
    Q5_0 = 6, "Q5_0", 32, 2 + 4 + 16;
    /// 5-bit asymmetric, blocks of 32.
    Q5_1 = 7, "Q5_1", 32, 2 + 2 + 4 + 16;
    /// 8-bit symmetric, blocks of 32: `{f16 d; i8 qs[32]}`.
    Q8_0 = 8, "Q8_0", 32, 2 + 32;
    /// 8-bit with a precomputed sum, blocks of 32 (activations).
    Q8_1 = 9, "Q8_1", 32, 4 + 4 + 32;
    /// 2-bit K-quant, super-blocks of 256.
    Q2_K = 10, "Q2_K", QK_K, 2 + 2 + QK_K / 16 + QK_K / 4;
    /// 3-bit K-quant, super-blocks of 256.
    Q3_K = 11, "Q3_K", QK_K, 2 + QK_K / 4 + QK_K / 8 + 12;
    /// 4-bit K-quant, super-blocks of 256 (144 bytes).
    Q4_K = 12, "Q4_K", QK_K, 2 + 2 + QK_K / 2 + 12;
    /// 5-bit K-quant, super-blocks of 256.
    Q5_K = 13, "Q5_K", QK_K, 2 + 2 + QK_K / 2 + QK_K / 8 + 12;
    /// 6-bit K-quant, super-blocks of 256 (210 bytes).
    Q6_K = 14, "Q6_K", QK_K, 2 + QK_K / 2 + QK_K / 4 + QK_K / 16;
    /// 8-bit K-quant, super-blocks of 256 (activations).
    Q8_K = 15, "Q8_K", QK_K, 4 + QK_K + QK_K / 8;
    /// Importance 2-bit, extra-extra-small.
    IQ2_XXS = 16, "IQ2_XXS", QK_K, 2 + QK_K / 4;
    /// Importance 2-bit, extra-small.
    IQ2_XS = 17, "IQ2_XS", QK_K, 2 + QK_K / 4 + QK_K / 32;
    /// Importance 3-bit, extra-extra-small.
    IQ3_XXS = 18, "IQ3_XXS", QK_K, 2 + QK_K / 4 + QK_K / 8;
    /// Importance 1-bit, small.
    IQ1_S = 19, "IQ1_S", QK_K, 2 + QK_K / 8 + QK_K / 16;
    /// Importance 4-bit non-linear, blocks of 32.
    IQ4_NL = 20, "IQ4_NL", 32, 2 + 16;
    /// Importance 3-bit, small.
    IQ3_S = 21, "IQ3_S", QK_K, 2 + QK_K / 4 + QK_K / 8 + QK_K / 32 + 4;
    /// Importance 2-bit, small.
    IQ2_S = 22, "IQ2_S", QK_K, 2 + QK_K / 4 + QK_K / 16;
    /// Importance 4-bit non-linear, extra-small, super-blocks of 256.
    IQ4_XS = 23, "IQ4_XS", QK_K, 2 + 2 + QK_K / 2 + QK_K / 64;
    /// Signed 8-bit integer.
    I8 = 24, "I8", 1, 1;
    /// Signed 16-bit integer.
    I16 = 25, "I16", 1, 2;
    /// Signed 32-bit integer.
    I32 = 26, "I32", 1, 4;
    /// Signed 64-bit integer.
    I64 = 27, "I64", 1, 8;
    /// IEEE binary64.
    F64 = 28, "F64", 1, 8;
    /// Importance 1-bit, medium.
    IQ1_M = 29, "IQ1_M", QK_K, QK_K / 8 + QK_K / 16 + QK_K / 32;
    /// bfloat16.
    BF16 = 30, "BF16", 1, 2;
    /// Ternary, 1.69 bits per weight.
    TQ1_0 = 34, "TQ1_0", QK_K, 2 + 4 * 13;
    /// Ternary, 2 bits per weight.
    TQ2_0 = 35, "TQ2_0", QK_K, 2 + 64;
    /// OCP microscaling FP4 (E2M1 with an E8M0 scale per 32).
    MXFP4 = 39, "MXFP4", 32, 1 + 16;
    /// NVIDIA FP4 (E2M1 with FP8 scales), blocks of 64.
    NVFP4 = 40, "NVFP4", 64, 4 + 32;
    /// 1-bit, blocks of 128.
    Q1_0 = 41, "Q1_0", 128, 2 + 16;
}

impl GgmlType {
    /// Storage cost in bits per weight (`8 * type_size / block_size`).
    pub fn bits_per_weight(self) -> f64 {
        8.0 * self.type_size() as f64 / self.block_size() as f64
    }

    /// Whether the type is block-quantized (block size above 1).
    pub fn is_quantized(self) -> bool {
        self.block_size() > 1
    }
}

impl std::fmt::Display for GgmlType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}
