// Elementwise layer ops for the CPU, each one pass over memory where torch makes several:
// RMSNorm (torch: square, mean, add, rsqrt, two multiplies; and the residual add before it), SwiGLU's silu(gate) * up, and the
// rotary embedding of q and k with this step's K/V written into the pool (torch: a cat, two
// multiplies and an add per tensor, then a transposed index_copy per cache).
// float32 activations; called through ctypes by radixlm/kernels/cpu.py.
#include <cmath>
#include <cstdint>

#include "cpu_math.h"

namespace {

using radixlm::exp_nonpositive;
using radixlm::store;

// Rows per thread below which a parallel region costs more than it saves.
constexpr int64_t kMinElementsPerThread = 16384;

int threads_for(int64_t elements, int num_threads) {
    const int64_t useful = elements / kMinElementsPerThread;
    return useful < 1 ? 1 : (useful < num_threads ? int(useful) : num_threads);
}

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

// Token t (row t of q, k, v, whose heads are contiguous): q_out[t, h] = rope(q[t, h]);
// k_out[kh, t] = rope(k[t, kh]) and v_out[kh, t] = v[t, kh], head-major; the same K/V, in the
// cache's dtype, at slot slots[t] of each head of the pool [KVH, head_stride / D, D].
template <typename KV>
void rope_store(const float* q, int64_t q_stride, const float* k, int64_t k_stride,
                const float* v, int64_t v_stride, const float* cos, const float* sin,
                const int64_t* slots, int64_t tokens, int64_t num_heads, int64_t num_kv_heads,
                int64_t d, float* q_out, float* k_out, float* v_out, KV* k_cache, KV* v_cache,
                int64_t head_stride, int num_threads) {
    const int64_t work = tokens * (num_heads + 2 * num_kv_heads) * d;
#pragma omp parallel for num_threads(threads_for(work, num_threads)) schedule(static)
    for (int64_t t = 0; t < tokens; ++t) {
        const float* c = cos + t * d;
        const float* s = sin + t * d;
        for (int64_t h = 0; h < num_heads; ++h)
            rope_head(q + t * q_stride + h * d, c, s, d, q_out + (t * num_heads + h) * d);
        for (int64_t h = 0; h < num_kv_heads; ++h) {
            float* __restrict ko = k_out + (h * tokens + t) * d;
            float* __restrict vo = v_out + (h * tokens + t) * d;
            const float* __restrict vi = v + t * v_stride + h * d;
            KV* __restrict kc = k_cache + h * head_stride + slots[t] * d;
            KV* __restrict vc = v_cache + h * head_stride + slots[t] * d;
            rope_head(k + t * k_stride + h * d, c, s, d, ko);
#pragma omp simd
            for (int64_t i = 0; i < d; ++i) {
                vo[i] = vi[i];
                store(ko[i], kc + i);
                store(vi[i], vc + i);
            }
        }
    }
}
#pragma GCC pop_options

}  // namespace

extern "C" {

void radixlm_rope_store_f32(const float* q, int64_t q_stride, const float* k, int64_t k_stride,
                            const float* v, int64_t v_stride, const float* cos, const float* sin,
                            const int64_t* slots, int64_t tokens, int64_t num_heads,
                            int64_t num_kv_heads, int64_t d, float* q_out, float* k_out,
                            float* v_out, float* k_cache, float* v_cache, int64_t head_stride,
                            int num_threads) {
    rope_store(q, q_stride, k, k_stride, v, v_stride, cos, sin, slots, tokens, num_heads,
               num_kv_heads, d, q_out, k_out, v_out, k_cache, v_cache, head_stride, num_threads);
}

void radixlm_rope_store_bf16(const float* q, int64_t q_stride, const float* k, int64_t k_stride,
                             const float* v, int64_t v_stride, const float* cos,
                             const float* sin, const int64_t* slots, int64_t tokens,
                             int64_t num_heads, int64_t num_kv_heads, int64_t d, float* q_out,
                             float* k_out, float* v_out, uint16_t* k_cache, uint16_t* v_cache,
                             int64_t head_stride, int num_threads) {
    rope_store(q, q_stride, k, k_stride, v, v_stride, cos, sin, slots, tokens, num_heads,
               num_kv_heads, d, q_out, k_out, v_out, k_cache, v_cache, head_stride, num_threads);
}


// out[r] = weight * (x[r] / sqrt(mean(x[r]^2) + eps)) for rows r of x (row stride x_stride);
// out is [rows, dim] contiguous. With a residual [rows, dim] contiguous, the residual add comes
// first, in place: residual[r] += x[r], and the norm is of the sum.
void radixlm_rms_norm_f32(const float* x, int64_t x_stride, float* residual, const float* weight,
                          float eps, float* out, int64_t rows, int64_t dim, int num_threads) {
#pragma omp parallel for num_threads(threads_for(rows * dim, num_threads)) schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
        const float* __restrict xr = x + r * x_stride;
        if (residual != nullptr) {
            float* __restrict res = residual + r * dim;
#pragma omp simd
            for (int64_t i = 0; i < dim; ++i) res[i] += xr[i];
            xr = res;
        }
        float* __restrict o = out + r * dim;
        float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
        for (int64_t i = 0; i < dim; ++i) sum += xr[i] * xr[i];
        const float inv = 1.0f / std::sqrt(sum / float(dim) + eps);
#pragma omp simd
        for (int64_t i = 0; i < dim; ++i) o[i] = weight[i] * (xr[i] * inv);
    }
}

// out[r, i] = silu(gate_up[r, i]) * gate_up[r, inter + i]; gate_up is [rows, 2 * inter].
void radixlm_silu_mul_f32(const float* gate_up, float* out, int64_t rows, int64_t inter,
                          int num_threads) {
#pragma omp parallel for num_threads(threads_for(rows * inter, num_threads)) schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
        const float* g = gate_up + r * 2 * inter;  // gate, then up at g + inter
        float* __restrict o = out + r * inter;
#pragma omp simd
        for (int64_t i = 0; i < inter; ++i) {
            const float x = g[i];
            const float e = exp_nonpositive(-std::fabs(x));  // exp(-|x|): never overflows
            const float inv = 1.0f / (1.0f + e);
            o[i] = x * (x < 0.0f ? e * inv : inv) * g[inter + i];
        }
    }
}

}  // extern "C"
