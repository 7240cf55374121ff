// Short-row paged attention for the CPU, as one kernel call (see row_attention.h).
// Built at first use by radixlm/kernels/build.py and called through ctypes with raw pointers
// (radixlm/kernels/cpu.py).
#include "row_attention.h"

namespace {

template <typename KV>
void row_attention(RowBatch<KV> a, const int64_t* groups, int num_threads) {
    // groups: num_groups + 1 group starts, num_groups prefix lengths, the group rows, and each
    // row's prefix (see RowBatch).
    std::vector<float> prefix_out, lse;
    if (a.num_groups > 0) {
        a.group_start = groups;
        a.group_prefix = groups + a.num_groups + 1;
        a.group_rows = a.group_prefix + a.num_groups;
        a.row_prefix = a.group_rows + a.group_start[a.num_groups];
        prefix_out.resize(a.tokens() * a.num_heads * a.head_dim);
        lse.resize(2 * a.tokens() * a.num_heads);
        a.prefix_out = prefix_out.data();
        a.lse = lse.data();
    }
    const int64_t max_m = a.max_m();
#pragma omp parallel num_threads(num_threads)
    {
        RowScratch scratch(max_m, a.head_dim);
#pragma omp for schedule(dynamic, 1)
        for (int64_t task = 0; task < a.tasks(); ++task) attend_task(a, task, scratch);
        if (a.num_groups > 0) {
#pragma omp for
            for (int64_t b = 0; b < a.num_rows; ++b) merge_row(a, b);
        }
    }
}

}  // namespace

extern "C" {

// See RowBatch for the arguments; groups as in row_attention above (null where num_groups is 0).
void radixlm_row_attention_f32(const float* q, const float* k_cache, const float* v_cache,
                               const int64_t* row_kv, int64_t row_stride, const int64_t* q_start,
                               const int64_t* q_len, const int64_t* kv_len, int64_t num_rows,
                               int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                               int64_t head_stride, float scale, int64_t window, float* out,
                               int64_t num_groups, const int64_t* groups, int num_threads) {
    row_attention(RowBatch<float>{q, k_cache, v_cache, row_kv, row_stride, q_start, q_len, kv_len,
                                  num_rows, num_heads, num_kv_heads, head_dim, head_stride, scale,
                                  window, out, num_groups},
                  groups, num_threads);
}

void radixlm_row_attention_bf16(const float* q, const uint16_t* k_cache, const uint16_t* v_cache,
                                const int64_t* row_kv, int64_t row_stride,
                                const int64_t* q_start, const int64_t* q_len,
                                const int64_t* kv_len, int64_t num_rows, int64_t num_heads,
                                int64_t num_kv_heads, int64_t head_dim, int64_t head_stride,
                                float scale, int64_t window, float* out, int64_t num_groups,
                                const int64_t* groups, int num_threads) {
    row_attention(RowBatch<uint16_t>{q, k_cache, v_cache, row_kv, row_stride, q_start, q_len,
                                     kv_len, num_rows, num_heads, num_kv_heads, head_dim,
                                     head_stride, scale, window, out, num_groups},
                  groups, num_threads);
}

}  // extern "C"
