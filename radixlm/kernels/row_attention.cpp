// Short-row paged attention for the CPU, as one kernel call (see row_attention.h).
// Built at first use by radixlm/kernels/build.py and called through ctypes with raw pointers
// (radixlm/kernels/cpu.py).
#include "row_attention.h"

namespace {

template <typename KV>
void row_attention(const RowBatch<KV>& a, int num_threads) {
    const int64_t max_m = a.max_m();
#pragma omp parallel num_threads(num_threads)
    {
        RowScratch scratch(max_m, a.head_dim);
#pragma omp for schedule(dynamic, 1)
        for (int64_t task = 0; task < a.tasks(); ++task) attend_task(a, task, scratch);
    }
}

}  // namespace

extern "C" {

// See RowBatch for the arguments.
void radixlm_row_attention_f32(const float* q, const float* k_cache, const float* v_cache,
                               const int64_t* row_kv, int64_t row_stride, const int64_t* q_start,
                               const int64_t* q_len, const int64_t* kv_len, int64_t num_rows,
                               int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                               int64_t head_stride, float scale, int64_t window, float* out,
                               int num_threads) {
    row_attention(RowBatch<float>{q, k_cache, v_cache, row_kv, row_stride, q_start, q_len, kv_len,
                                  num_rows, num_heads, num_kv_heads, head_dim, head_stride, scale,
                                  window, out},
                  num_threads);
}

void radixlm_row_attention_bf16(const float* q, const uint16_t* k_cache, const uint16_t* v_cache,
                                const int64_t* row_kv, int64_t row_stride,
                                const int64_t* q_start, const int64_t* q_len,
                                const int64_t* kv_len, int64_t num_rows, int64_t num_heads,
                                int64_t num_kv_heads, int64_t head_dim, int64_t head_stride,
                                float scale, int64_t window, float* out, int num_threads) {
    row_attention(RowBatch<uint16_t>{q, k_cache, v_cache, row_kv, row_stride, q_start, q_len,
                                     kv_len, num_rows, num_heads, num_kv_heads, head_dim,
                                     head_stride, scale, window, out},
                  num_threads);
}

}  // extern "C"
