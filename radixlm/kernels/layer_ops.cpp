// Elementwise layer ops for the CPU as kernel calls over a batch of rows (see layer_ops.h);
// called through ctypes by radixlm/kernels/cpu.py.
#include "layer_ops.h"

namespace {

// Elements per thread below which a parallel region costs more than it saves.
constexpr int64_t kMinElementsPerThread = 16384;

int threads_for(int64_t elements, int num_threads) {
    const int64_t useful = elements / kMinElementsPerThread;
    return useful < 1 ? 1 : (useful < num_threads ? int(useful) : num_threads);
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
    for (int64_t t = 0; t < tokens; ++t)
        rope_store_token(q + t * q_stride, k + t * k_stride, v + t * v_stride, cos + t * d,
                         sin + t * d, slots[t], num_heads, num_kv_heads, d,
                         q_out + t * num_heads * d, k_out + t * d, v_out + t * d, tokens * d,
                         k_cache, v_cache, head_stride);
}

template <typename W>
void rms_norm(const float* x, int64_t x_stride, float* residual, const W* weight, float eps,
              float* out, int64_t rows, int64_t dim, int num_threads) {
#pragma omp parallel for num_threads(threads_for(rows * dim, num_threads)) schedule(static)
    for (int64_t r = 0; r < rows; ++r)
        rms_norm_row(x + r * x_stride, residual == nullptr ? nullptr : residual + r * dim, weight,
                     eps, dim, out + r * dim);
}

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
// first, in place: residual[r] += x[r], and the norm is of the sum. The weight is float32
// (radixlm_rms_norm_f32) or bfloat16 (radixlm_rms_norm_bf16).
void radixlm_rms_norm_f32(const float* x, int64_t x_stride, float* residual, const float* weight,
                          float eps, float* out, int64_t rows, int64_t dim, int num_threads) {
    rms_norm(x, x_stride, residual, weight, eps, out, rows, dim, num_threads);
}

void radixlm_rms_norm_bf16(const float* x, int64_t x_stride, float* residual,
                           const uint16_t* weight, float eps, float* out, int64_t rows,
                           int64_t dim, int num_threads) {
    rms_norm(x, x_stride, residual, weight, eps, out, rows, dim, num_threads);
}

// out[r, i] = silu(gate_up[r, i]) * gate_up[r, inter + i]; gate_up is [rows, 2 * inter].
void radixlm_silu_mul_f32(const float* gate_up, float* out, int64_t rows, int64_t inter,
                          int num_threads) {
#pragma omp parallel for num_threads(threads_for(rows * inter, num_threads)) schedule(static)
    for (int64_t r = 0; r < rows; ++r)
        silu_mul_row(gate_up + r * 2 * inter, gate_up + r * 2 * inter + inter, inter,
                     out + r * inter);
}

}  // extern "C"
