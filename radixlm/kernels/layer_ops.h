// Elementwise layer ops for the CPU, one row (or token) at a time, each one pass over memory
// where torch makes several: RMSNorm with the residual add before it, SwiGLU's silu(gate) * up,
// and the rotary embedding of a token's q and k with its K/V written into the pool. Shared by
// the standalone kernels (layer_ops.cpp) and the fused decode pass (decode_layers.cpp).
// float32 activations; norm weights in float32 or bfloat16 (widened as they are read).
#pragma once

#include <cmath>
#include <cstdint>

#include "cpu_math.h"

namespace {

using radixlm::exp_nonpositive;
using radixlm::store;
using radixlm::to_float;

// Here products and sums are rounded separately (no fused multiply-add), as torch's ops round
// them.
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")

// o = x * cos + rotate_half(x) * sin for one head (sin carries rotate-half's sign).
inline void rope_head(const float* __restrict x, const float* __restrict c,
                      const float* __restrict s, int64_t d, float* __restrict o) {
    const int64_t half = d / 2;
#pragma omp simd
    for (int64_t i = 0; i < half; ++i) o[i] = x[i] * c[i] + x[i + half] * s[i];
#pragma omp simd
    for (int64_t i = half; i < d; ++i) o[i] = x[i] * c[i] + x[i - half] * s[i];
}

// One token whose heads are contiguous in q, k, v: q_out[h] = rope(q[h]); rope(k[kh]) and v[kh],
// in the cache's dtype, at `slot` of each head of the pool [KVH, head_stride / D, D]; and, where
// k_out / v_out are given, in float32 at k_out[kh * out_stride] and v_out[kh * out_stride].
template <typename KV>
void rope_store_token(const float* q, const float* k, const float* v, const float* c,
                      const float* s, int64_t slot, int64_t num_heads, int64_t num_kv_heads,
                      int64_t d, float* q_out, float* k_out, float* v_out, int64_t out_stride,
                      KV* k_cache, KV* v_cache, int64_t head_stride) {
    for (int64_t h = 0; h < num_heads; ++h) rope_head(q + h * d, c, s, d, q_out + h * d);
    float rotated[512];  // the head size is at most 512 (checked by the caller)
    for (int64_t h = 0; h < num_kv_heads; ++h) {
        const float* __restrict vi = v + h * d;
        KV* __restrict kc = k_cache + h * head_stride + slot * d;
        KV* __restrict vc = v_cache + h * head_stride + slot * d;
        float* __restrict ko = k_out != nullptr ? k_out + h * out_stride : rotated;
        rope_head(k + h * d, c, s, d, ko);
#pragma omp simd
        for (int64_t i = 0; i < d; ++i) {
            store(ko[i], kc + i);
            store(vi[i], vc + i);
        }
        if (v_out != nullptr) {
            float* __restrict vo = v_out + h * out_stride;
#pragma omp simd
            for (int64_t i = 0; i < d; ++i) vo[i] = vi[i];
        }
    }
}
#pragma GCC pop_options

// out = weight * (x / sqrt(mean(x^2) + eps)) over dim floats; out may be x. With a residual,
// the residual add comes first, in place: residual += x, and the norm is of the sum. The weight
// is float32 or bfloat16 (W = uint16_t).
template <typename W>
inline void rms_norm_row(const float* x, float* residual, const W* weight, float eps,
                         int64_t dim, float* out) {
    const float* xr = x;
    if (residual != nullptr) {
        float* __restrict res = residual;
#pragma omp simd
        for (int64_t i = 0; i < dim; ++i) res[i] += xr[i];
        xr = res;
    }
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int64_t i = 0; i < dim; ++i) sum += xr[i] * xr[i];
    const float inv = 1.0f / std::sqrt(sum / float(dim) + eps);
#pragma omp simd
    for (int64_t i = 0; i < dim; ++i) out[i] = to_float(weight[i]) * (xr[i] * inv);
}

// out[i] = silu(gate[i]) * up[i] for i < n.
inline void silu_mul_row(const float* __restrict gate, const float* __restrict up, int64_t n,
                         float* __restrict out) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
        const float x = gate[i];
        const float e = exp_nonpositive(-std::fabs(x));  // exp(-|x|): never overflows
        const float inv = 1.0f / (1.0f + e);
        out[i] = x * (x < 0.0f ? e * inv : inv) * up[i];
    }
}

}  // namespace
