// Dequantize GPTQ-packed 4-bit weights (AutoGPTQ / GPTQModel / transformers layout).
//
// With `in`, `out` the layer sizes and G the number of groups:
//   qweight  u32 [in / 8, out]   word (r, n) holds rows 8r .. 8r+7 of column n, row 8r+j at
//                                bits 4j .. 4j+3 (packed along the INPUT dimension, LSB first)
//   qzeros   u32 [G, out / 8]    word (g, c) holds columns 8c .. 8c+7 of group g, column
//                                8c+j at bits 4j .. 4j+3 (packed along the OUTPUT dimension)
//   scales   f16 [G, out]        passed as raw 16-bit patterns
//   g_idx    i32 [in]            group of each input row (any order: act-order allowed)
//
//   W[k, n] = scales[g, n] * (q[k, n] - (z[g, n] + zero_offset)),  g = g_idx[k]
//
// zero_offset is 1 for `checkpoint_format: "gptq"` (v1 stores zero - 1) and 0 for gptq_v2.
// The output W is [in, out] row-major (the orientation of qweight; transpose for a
// PyTorch-style [out, in] weight). One thread per packed word: it writes 8 rows of a column.
// The host checks the shapes and that every g_idx value is below G.
//
// Self-contained for NVRTC: no headers; f16 <-> f32 conversions through PTX `cvt`.

__device__ __forceinline__ float quantlab_f16_to_f32(unsigned short h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

__device__ __forceinline__ unsigned short quantlab_f32_to_f16(float f) {
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}

// Value j (0..7) of the word, and the group's zero and scale for column n.
__device__ __forceinline__ float quantlab_gptq4_value(
    unsigned int word, int j, const unsigned int* qzeros, const unsigned short* scales,
    int g, int n, int out_features, int zero_offset) {
    int q = (int)((word >> (4 * j)) & 0xFu);
    unsigned int zword = qzeros[(long long)g * (out_features / 8) + n / 8];
    int z = (int)((zword >> (4 * (n % 8))) & 0xFu) + zero_offset;
    float s = quantlab_f16_to_f32(scales[(long long)g * out_features + n]);
    return s * (float)(q - z);
}

extern "C" __global__ void dequant_gptq4_f32(
    const unsigned int* __restrict__ qweight, const unsigned int* __restrict__ qzeros,
    const unsigned short* __restrict__ scales, const int* __restrict__ g_idx,
    float* __restrict__ out, int in_features, int out_features, int zero_offset) {
    long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    long long words = (long long)(in_features / 8) * out_features;
    if (idx >= words) return;
    int r = (int)(idx / out_features);
    int n = (int)(idx % out_features);
    unsigned int word = qweight[idx];
    for (int j = 0; j < 8; ++j) {
        int k = 8 * r + j;
        float w = quantlab_gptq4_value(word, j, qzeros, scales, g_idx[k], n, out_features,
                                       zero_offset);
        out[(long long)k * out_features + n] = w;
    }
}

extern "C" __global__ void dequant_gptq4_f16(
    const unsigned int* __restrict__ qweight, const unsigned int* __restrict__ qzeros,
    const unsigned short* __restrict__ scales, const int* __restrict__ g_idx,
    unsigned short* __restrict__ out, int in_features, int out_features, int zero_offset) {
    long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    long long words = (long long)(in_features / 8) * out_features;
    if (idx >= words) return;
    int r = (int)(idx / out_features);
    int n = (int)(idx % out_features);
    unsigned int word = qweight[idx];
    for (int j = 0; j < 8; ++j) {
        int k = 8 * r + j;
        float w = quantlab_gptq4_value(word, j, qzeros, scales, g_idx[k], n, out_features,
                                       zero_offset);
        out[(long long)k * out_features + n] = quantlab_f32_to_f16(w);
    }
}
