// Short-row paged attention for the CPU: its tiles and one (row, KV head) task, shared by the
// standalone kernel (row_attention.cpp) and the fused decode pass (decode_layers.cpp).
//
// Each row (a decode, or a few new tokens after a cached prefix) attends over its own slots,
// read straight from the head-major pool [KVH, slots, D]: no gathered copy of the K/V is made,
// so a decode step reads every K/V byte once. An online softmax runs over blocks of keys, and the
// query heads of a GQA group go through each block together, so a K/V row is loaded (and widened
// from bfloat16) once for the group: in AVX-512 or AVX2 registers, or on other CPUs (SSE, NEON)
// in 4-float vectors of the compiler's vector extensions. Head sizes other than 64 and 128, or a
// compiler without those, take a plain loop per head.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu_math.h"

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

namespace {

using radixlm::exp_nonpositive;
using radixlm::to_float;

constexpr int64_t kBlock = 64;         // keys per block of the online softmax
constexpr int64_t kTile = 4;           // queries per block pass, at most
constexpr float kNoScore = -1.0e30f;   // finite "minus infinity": exp of a difference stays 0

// Pointers to a block's K or V rows, padded to a multiple of 16 with the first row.
template <typename KV>
inline void block_rows(const KV* base, const int64_t* slots, int64_t n, int64_t d,
                       const KV** rows) {
    for (int64_t j = 0; j < n; ++j) rows[j] = base + slots[j] * d;
    for (int64_t j = n; j % 16; ++j) rows[j] = rows[0];
}

// Asks for a K or V row of d values ahead of its use, one cache line at a time. A step's K/V is
// read once (hundreds of MB at a large batch, far beyond the caches): without this a block's
// dot products wait on each row's arrival instead of running under the next rows' reads.
template <typename KV>
inline void prefetch_row(const KV* row, int64_t d) {
    const char* p = reinterpret_cast<const char*>(row);
    for (int64_t b = 0; b < d * int64_t(sizeof(KV)); b += 64) __builtin_prefetch(p + b);
}

// s[j] = q . rows[j] for j < n: the portable loop (see tile_block for AVX-512).
template <typename KV>
inline void block_scores(const float* __restrict q, const KV* const* rows, int64_t n,
                         int64_t d, float* __restrict s) {
    for (int64_t j = 0; j < n; ++j) {
        float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
        for (int64_t x = 0; x < d; ++x) dot += q[x] * to_float(rows[j][x]);
        s[j] = dot;
    }
}

// acc = acc * correction + sum_j p[j] * rows[j], for j < n: the portable loop.
template <typename KV>
inline void block_values(const float* __restrict p, const KV* const* rows, int64_t n,
                         int64_t d, float correction, float* __restrict acc) {
    for (int64_t x = 0; x < d; ++x) acc[x] *= correction;
    for (int64_t j = 0; j < n; ++j) {
        const float pj = p[j];
        const KV* __restrict v = rows[j];
        for (int64_t x = 0; x < d; ++x) acc[x] += pj * to_float(v[x]);
    }
}

// The keys [lo, hi) of a block (its first key j0, nb keys) that query m of a row sees: those up
// to its own position, last_visible + m / group, and with a sliding window (window > 0) only
// the last `window` of them. A query sees at least its own key in the first block a row
// attends over: it starts at the first query's first key, and a row has fewer queries than a
// block has keys (MAX_ROW_QUERIES in radixlm/core/plan.py).
inline void visible_keys(int64_t last_visible, int64_t m, int64_t group, int64_t window,
                         int64_t j0, int64_t nb, int64_t& lo, int64_t& hi) {
    const int64_t own = last_visible + m / group - j0;
    hi = std::clamp(own + 1, int64_t(0), nb);
    lo = window > 0 ? std::clamp(own + 1 - window, int64_t(0), nb) : 0;
}

// Turns one query's scores s[0, n) of a block into probabilities (keys outside [lo, hi) are
// its future or out of its window: probability 0), folds the block into its running max and
// sum, and returns the factor that rescales its accumulated values.
inline float softmax_block(float* __restrict s, int64_t n, int64_t lo, int64_t hi,
                           float& row_max, float& row_sum) {
    float block_max = kNoScore;
#pragma omp simd reduction(max : block_max)
    for (int64_t j = lo; j < hi; ++j) block_max = std::max(block_max, s[j]);
    const float new_max = std::max(row_max, block_max);
    const float correction = exp_nonpositive(row_max - new_max);
    for (int64_t j = 0; j < lo; ++j) s[j] = kNoScore;
    for (int64_t j = hi; j < n; ++j) s[j] = kNoScore;
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < n; ++j) {
        const float p = exp_nonpositive(s[j] - new_max);
        s[j] = p;
        sum += p;
    }
    row_sum = row_sum * correction + sum;
    row_max = new_max;
    return correction;
}

#if defined(__has_builtin)
#if __has_builtin(__builtin_shufflevector) && __has_builtin(__builtin_convertvector)
#define RADIXLM_VECTOR_BUILTINS 1  // GCC 12+, Clang
#endif
#endif

// Simd, for the widest vectors this CPU has: a vector type V of kWidth floats; load (floats, or
// bfloat16 widened), set1, mul, fmadd, store; store_sum4, which writes the totals of four
// vectors; and keep, an empty asm that takes a vector in a register: a loaded vector passed
// through it is loaded once and reused, where the compiler would fold its load into each FMA
// that uses it (GCC did so in stream_tile's 3 x 4 tiles: 15 loads for 12 FMAs, and the tiles
// ran at half the speed). tile_block is written once over it.
#if defined(__AVX512F__)
#define RADIXLM_TILES 1
// 16 floats a vector.
struct Simd {
    using V = __m512;
    static constexpr int64_t kWidth = 16;
    static constexpr int64_t kRegs = 32;
    static V load(const float* p) { return _mm512_loadu_ps(p); }
    static V load(const uint16_t* p) {
        const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p));
        return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
    }
    static V set1(float x) { return _mm512_set1_ps(x); }
    static void keep(V& v) { asm("" : "+v"(v)); }
    static V mul(V a, V b) { return _mm512_mul_ps(a, b); }
    static V fmadd(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
    static void store(float* p, V a) { _mm512_storeu_ps(p, a); }
    // out[0..3] = the totals of a0's, a1's, a2's and a3's lanes.
    static void store_sum4(float* out, V a0, V a1, V a2, V a3) {
        // Per 128-bit lane: [a0 a1 a0 a1] pair sums, then [a0 a1 a2 a3]; then the lanes are added.
        const V t0 = _mm512_add_ps(_mm512_unpacklo_ps(a0, a1), _mm512_unpackhi_ps(a0, a1));
        const V t1 = _mm512_add_ps(_mm512_unpacklo_ps(a2, a3), _mm512_unpackhi_ps(a2, a3));
        const V u = _mm512_add_ps(_mm512_shuffle_ps(t0, t1, 0x44), _mm512_shuffle_ps(t0, t1, 0xEE));
        const V v = _mm512_add_ps(u, _mm512_shuffle_f32x4(u, u, 0x4E));
        _mm_storeu_ps(out, _mm512_castps512_ps128(_mm512_add_ps(v, _mm512_shuffle_f32x4(v, v, 0xB1))));
    }
};
#elif defined(__AVX2__) && defined(__FMA__)
#define RADIXLM_TILES 1
// 8 floats a vector. With 16 registers a tile of several heads spills some queries and
// accumulators to the stack; it still beats one head a pass, which re-reads each block.
struct Simd {
    using V = __m256;
    static constexpr int64_t kWidth = 8;
    static constexpr int64_t kRegs = 16;
    static V load(const float* p) { return _mm256_loadu_ps(p); }
    static V load(const uint16_t* p) {
        const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p));
        return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
    }
    static V set1(float x) { return _mm256_set1_ps(x); }
    static void keep(V& v) { asm("" : "+x"(v)); }
    static V mul(V a, V b) { return _mm256_mul_ps(a, b); }
    static V fmadd(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
    static void store(float* p, V a) { _mm256_storeu_ps(p, a); }
    static void store_sum4(float* out, V a0, V a1, V a2, V a3) {
        // Per 128-bit lane: pair sums, then [a0 a1 a2 a3] sums; then the two lanes are added.
        const V u = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
        _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(u), _mm256_extractf128_ps(u, 1)));
    }
};
#elif defined(RADIXLM_VECTOR_BUILTINS)
#define RADIXLM_TILES 1
// Any other CPU (SSE, NEON, ...): GCC / Clang vector extensions, 4 floats a vector.
struct Simd {
    typedef float V __attribute__((vector_size(16)));
    typedef uint16_t Half __attribute__((vector_size(8)));
    typedef uint32_t Wide __attribute__((vector_size(16)));
    static constexpr int64_t kWidth = 4;
    static constexpr int64_t kRegs = 16;  // SSE's 16; NEON has 32
    static V load(const float* p) {
        V v;
        std::memcpy(&v, p, sizeof v);
        return v;
    }
    static V load(const uint16_t* p) {
        Half h;
        std::memcpy(&h, p, sizeof h);
        return (V)(__builtin_convertvector(h, Wide) << 16);
    }
    static V set1(float x) { return V{x, x, x, x}; }
    static void keep(V& v) {
#if defined(__x86_64__) || defined(__i386__)
        asm("" : "+x"(v));
#elif defined(__aarch64__)
        asm("" : "+w"(v));
#else
        (void)v;
#endif
    }
    static V mul(V a, V b) { return a * b; }
    static V fmadd(V a, V b, V c) { return a * b + c; }
    static void store(float* p, V a) { std::memcpy(p, &a, sizeof a); }
    static void store_sum4(float* out, V a0, V a1, V a2, V a3) {
        // [a0 a1 a0 a1] pair sums, then [a0 a1 a2 a3].
        const V t0 = __builtin_shufflevector(a0, a1, 0, 4, 1, 5) + __builtin_shufflevector(a0, a1, 2, 6, 3, 7);
        const V t1 = __builtin_shufflevector(a2, a3, 0, 4, 1, 5) + __builtin_shufflevector(a2, a3, 2, 6, 3, 7);
        store(out, __builtin_shufflevector(t0, t1, 0, 1, 4, 5) + __builtin_shufflevector(t0, t1, 2, 3, 6, 7));
    }
};
#endif

#if defined(RADIXLM_TILES)
// The most vectors of a row (a divisor of C) whose MT x CG accumulators, CG values and one
// probability fit the CPU's vector registers (Simd::kRegs).
constexpr int64_t value_group(int64_t mt, int64_t c) {
    int64_t best = 1;
    for (int64_t g = 1; g <= c; ++g)
        if (c % g == 0 && mt * g + g + 1 <= Simd::kRegs) best = g;
    return best;
}

// One block of keys for MT queries at once (the heads of a GQA group share their K/V): each K
// and V row is loaded and widened once for all MT. q holds MT scaled queries of D floats; s is
// scratch of MT x kBlock; m0 is the first query's index m in its row.
//
// The first pass over a block (kFirst) brings it from memory: it prefetches the block's V rows
// while it scores the K rows, and the next block's K rows (next_slots, nb_next of them, in
// k_head) while it
// sums the V rows, and it reads the V rows in order, a whole row at a time (read any other way
// the rows arriving from memory stall it). A later pass (the queries of a row beyond the first
// MT) finds the block in L1 and takes its values a group of CG vectors at a time, so that its
// MT x CG accumulators, CG vectors of a row and a probability stay in registers (with 16
// vector registers a whole row's accumulators spill); each V vector is still read (and widened)
// once for all MT queries.
template <typename KV, int64_t D, int64_t MT, bool kFirst>
void tile_block(const float* __restrict q, int64_t m0, int64_t group, int64_t last_visible,
                int64_t window, int64_t j0, const KV* const* k_rows, const KV* const* v_rows,
                int64_t nb, const KV* k_head, const int64_t* next_slots, int64_t nb_next,
                float* __restrict s, float* __restrict acc, float* __restrict row_max,
                float* __restrict row_sum) {
    using V = Simd::V;
    constexpr int64_t W = Simd::kWidth, C = D / W;
    V qv[MT][C];
    for (int64_t i = 0; i < MT; ++i)
        for (int64_t c = 0; c < C; ++c) qv[i][c] = Simd::load(q + i * D + W * c);
    for (int64_t j = 0; j < nb; j += 4) {  // rows are padded to a multiple of 16
        for (int64_t jj = 0; kFirst && jj < 4 && j + jj < nb; ++jj) prefetch_row(v_rows[j + jj], D);
        V dot[MT][4];
        for (int64_t jj = 0; jj < 4; ++jj) {
            V k[C];
            for (int64_t c = 0; c < C; ++c) k[c] = Simd::load(k_rows[j + jj] + W * c);
            for (int64_t i = 0; i < MT; ++i) {
                V a = Simd::mul(qv[i][0], k[0]);
                for (int64_t c = 1; c < C; ++c) a = Simd::fmadd(qv[i][c], k[c], a);
                dot[i][jj] = a;
            }
        }
        for (int64_t i = 0; i < MT; ++i)
            Simd::store_sum4(s + i * kBlock + j, dot[i][0], dot[i][1], dot[i][2], dot[i][3]);
    }
    float corr[MT];
    for (int64_t i = 0; i < MT; ++i) {
        int64_t lo, hi;
        visible_keys(last_visible, m0 + i, group, window, j0, nb, lo, hi);
        corr[i] = softmax_block(s + i * kBlock, nb, lo, hi, row_max[i], row_sum[i]);
    }
    constexpr int64_t CG = kFirst ? C : value_group(MT, C);
    for (int64_t c0 = 0; c0 < C; c0 += CG) {
        V out[MT][CG];
        for (int64_t i = 0; i < MT; ++i)
            for (int64_t c = 0; c < CG; ++c)
                out[i][c] = Simd::mul(Simd::load(acc + i * D + W * (c0 + c)), Simd::set1(corr[i]));
        for (int64_t j = 0; j < nb; ++j) {
            if (kFirst && j < nb_next) prefetch_row(k_head + next_slots[j] * D, D);
            V v[CG];
            for (int64_t c = 0; c < CG; ++c) v[c] = Simd::load(v_rows[j] + W * (c0 + c));
            for (int64_t i = 0; i < MT; ++i) {
                const V p = Simd::set1(s[i * kBlock + j]);
                for (int64_t c = 0; c < CG; ++c) out[i][c] = Simd::fmadd(p, v[c], out[i][c]);
            }
        }
        for (int64_t i = 0; i < MT; ++i)
            for (int64_t c = 0; c < CG; ++c) Simd::store(acc + i * D + W * (c0 + c), out[i][c]);
    }
}

// tile_block for mt (1 to 4) queries.
template <typename KV, int64_t D, bool kFirst>
auto tile_for(int64_t mt) {
    return mt == 4   ? tile_block<KV, D, 4, kFirst>
           : mt == 3 ? tile_block<KV, D, 3, kFirst>
           : mt == 2 ? tile_block<KV, D, 2, kFirst>
                     : tile_block<KV, D, 1, kFirst>;
}
#endif

// One row's queries of one KV head (m = query * group + head in group) over its keys, block by
// block with an online softmax; with a sliding window (window > 0) only over the keys in some
// query's window. D is a compile-time constant for the common head sizes.
template <typename KV, int64_t D>
void attend_row(const float* __restrict qs, int64_t m_count, int64_t group, int64_t nq,
                int64_t len, int64_t window, const int64_t* slots, const KV* k_head,
                const KV* v_head, int64_t d_runtime, float* __restrict acc,
                float* __restrict row_max, float* __restrict row_sum) {
    const int64_t d = D > 0 ? D : d_runtime;
    const KV* k_rows[kBlock];
    const KV* v_rows[kBlock];
    alignas(64) float s[kTile * kBlock];
    for (int64_t m = 0; m < m_count; ++m) {
        std::fill_n(acc + m * d, d, 0.0f);
        row_max[m] = kNoScore;
        row_sum[m] = 0.0f;
    }
    // The row's first query sits at position len - nq; the first key it sees starts the blocks.
    const int64_t last_visible = len - nq;
    const int64_t first_key = window > 0 ? std::max(int64_t(0), last_visible + 1 - window) : 0;
    for (int64_t j0 = first_key; j0 < len; j0 += kBlock) {
        const int64_t nb = std::min(kBlock, len - j0);
        block_rows(k_head, slots + j0, nb, d, k_rows);
        block_rows(v_head, slots + j0, nb, d, v_rows);
#if defined(RADIXLM_TILES)
        if constexpr (D > 0 && D % 16 == 0) {
            constexpr int64_t kMt = D <= 64 ? 4 : 2;  // heads a pass: 4 x 64 floats of queries
            static_assert(kMt <= kTile);
            const int64_t nb_next = std::clamp(len - j0 - kBlock, int64_t(0), kBlock);
            for (int64_t m0 = 0; m0 < m_count; m0 += kMt) {
                const int64_t mt = std::min(kMt, m_count - m0);
                auto tile = m0 == 0 ? tile_for<KV, D, true>(mt) : tile_for<KV, D, false>(mt);
                tile(qs + m0 * D, m0, group, last_visible, window, j0, k_rows, v_rows, nb, k_head,
                     slots + j0 + kBlock, nb_next, s, acc + m0 * D, row_max + m0, row_sum + m0);
            }
            continue;
        }
#endif
        for (int64_t m = 0; m < m_count; ++m) {
            block_scores(qs + m * d, k_rows, nb, d, s);
            int64_t lo, hi;
            visible_keys(last_visible, m, group, window, j0, nb, lo, hi);
            const float correction = softmax_block(s, nb, lo, hi, row_max[m], row_sum[m]);
            block_values(s, v_rows, nb, d, correction, acc + m * d);
        }
    }
}

// A batch of short rows: q [T, H, D] float32 and out [T, H, D]; caches [KVH, head_stride / D, D];
// row_kv [rows, row_stride] slots (row b uses its first kv_len[b]); row b's queries are tokens
// q_start[b] .. q_start[b] + q_len[b] - 1, at the last q_len[b] positions of its kv_len[b];
// window > 0: the sliding window (a query sees itself and the window - 1 keys before it).
template <typename KV>
struct RowBatch {
    const float* q;
    const KV* k_cache;
    const KV* v_cache;
    const int64_t* row_kv;
    int64_t row_stride;
    const int64_t* q_start;
    const int64_t* q_len;
    const int64_t* kv_len;
    int64_t num_rows, num_heads, num_kv_heads, head_dim, head_stride;
    float scale;
    int64_t window;
    float* out;

    int64_t tasks() const { return num_rows * num_kv_heads; }
    // Query heads of the row with the most queries: the scratch a task needs.
    int64_t max_m() const {
        int64_t most = 0;
        for (int64_t b = 0; b < num_rows; ++b) most = std::max(most, q_len[b]);
        return most * (num_heads / num_kv_heads);
    }
};

// One thread's buffers for RowBatch tasks.
struct RowScratch {
    std::vector<float> qs, acc, row_max, row_sum;
    RowScratch(int64_t max_m, int64_t d)
        : qs(max_m * d), acc(max_m * d), row_max(max_m), row_sum(max_m) {}
};

// Task `task` of a RowBatch: row task / KVH's queries of KV head task % KVH, into out.
template <typename KV>
void attend_task(const RowBatch<KV>& a, int64_t task, RowScratch& s) {
    const int64_t group = a.num_heads / a.num_kv_heads, d = a.head_dim;
    const int64_t b = task / a.num_kv_heads, kh = task % a.num_kv_heads;
    const int64_t nq = a.q_len[b], m_count = nq * group;
    for (int64_t m = 0; m < m_count; ++m) {
        const int64_t i = m / group, h = kh * group + m % group;
        const float* src = a.q + ((a.q_start[b] + i) * a.num_heads + h) * d;
        for (int64_t x = 0; x < d; ++x) s.qs[m * d + x] = src[x] * a.scale;
    }
    auto attend = d == 64 ? attend_row<KV, 64> : d == 128 ? attend_row<KV, 128> : attend_row<KV, 0>;
    attend(s.qs.data(), m_count, group, nq, a.kv_len[b], a.window, a.row_kv + b * a.row_stride,
           a.k_cache + kh * a.head_stride, a.v_cache + kh * a.head_stride, d, s.acc.data(),
           s.row_max.data(), s.row_sum.data());
    for (int64_t m = 0; m < m_count; ++m) {
        const int64_t i = m / group, h = kh * group + m % group;
        float* dst = a.out + ((a.q_start[b] + i) * a.num_heads + h) * d;
        const float inv = 1.0f / s.row_sum[m];
        for (int64_t x = 0; x < d; ++x) dst[x] = s.acc[m * d + x] * inv;
    }
}

}  // namespace
