// Every decoder layer of a Llama-family model over a batch of short rows (decodes), in one
// OpenMP region on the CPU.
//
// Layer by layer, torch would run each op as its own parallel region: about six a layer, each
// waking the sleeping worker threads (OMP_WAIT_POLICY=PASSIVE) and each followed by Python.
// Here the threads are woken once per forward and meet at a barrier (a short spin, then a futex
// sleep) between ops. Each weight GEMM is split by output columns: every thread multiplies all
// rows by its share of the weight through the BLAS sgemm torch links (single-threaded inside
// the region), or for up to kStreamRows rows streams its share (stream_cols), so each weight byte
// is read once, by one core. Weights are float32 or bfloat16: bfloat16 weights stream for any
// number of rows (BLAS has no such GEMM), multiplied with AVX512-BF16's dot products where the
// CPU has them, else widened to float32 in registers (a shift), every product accumulated in
// float32; a decode step reads half the bytes. Norms, rotary + KV write
// and SwiGLU reuse layer_ops.h; the attention reuses row_attention.h.
// Built at first use by radixlm/kernels/build.py; called through ctypes by
// radixlm/kernels/decode.py (the pass) and cpu.py (the GEMM alone).
#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <optional>
#include <thread>
#include <type_traits>
#include <vector>

#if defined(__linux__)
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include "layer_ops.h"
#include "row_attention.h"

extern "C" {

// BLAS sgemm, column-major, 32-bit integers (Fortran calling convention).
typedef void (*Sgemm)(const char* transa, const char* transb, const int* m, const int* n,
                      const int* k, const float* alpha, const float* a, const int* lda,
                      const float* b, const int* ldb, const float* beta, float* c,
                      const int* ldc);

// Mirrored by _DecodeArgs in radixlm/kernels/decode.py. Per-layer arrays have `layers` entries;
// qkv_b, q_norm and k_norm are null where the model has none.
struct DecodeArgs {
    // The model: hidden size, heads, KV heads, head size, MLP width; weights (all float32 or
    // all bfloat16) as nn.Linear stores them ([out, in], row-major); caches
    // [KVH, head_stride / D, D] in float32 or bfloat16.
    int64_t layers, hidden, heads, kv_heads, head_dim, inter;
    const void* const* in_norm;
    const void* const* qkv_w;  // [(H + 2 KVH) D, hidden]: q, then k, then v
    const void* const* qkv_b;
    const void* const* q_norm;  // [D], applied to each head before the rotary embedding
    const void* const* k_norm;
    const void* const* o_w;  // [hidden, H D]
    const void* const* post_norm;
    const void* const* gate_up_w;  // [2 inter, hidden]: gate, then up
    const void* const* down_w;     // [hidden, inter]
    void* const* k_cache;
    void* const* v_cache;
    int64_t head_stride;
    // The batch: `tokens` rows of residual [tokens, hidden] (the embeddings; updated in place),
    // out [tokens, hidden] receives the last layer's output (the model adds it to the residual
    // before its final norm); cos / sin [tokens, D]; out_slots [tokens], where each token's K/V
    // is written; the short rows as in RowBatch.
    int64_t tokens;
    float* residual;
    float* out;
    const float* cos;
    const float* sin;
    const int64_t* out_slots;
    const int64_t* row_kv;
    int64_t row_stride;
    const int64_t* q_start;
    const int64_t* q_len;
    const int64_t* kv_len;
    int64_t rows;
    int64_t window;  // the sliding window (a query sees this many keys, itself last); 0: none
    Sgemm sgemm;
    int64_t num_threads;
    int64_t gemms_only;  // nonzero: only the weight GEMMs, as the pass runs them (benchmarks)
    float eps, scale;
};

}  // extern "C"

namespace {

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    asm volatile("yield");
#endif
}

// Sleep while *word == value (until a wake), and wake every sleeper: a futex on Linux; elsewhere
// a yield and nothing.
inline void sleep_while(std::atomic<int>& word, int value) {
#if defined(__linux__)
    syscall(SYS_futex, reinterpret_cast<int*>(&word), FUTEX_WAIT_PRIVATE, value, nullptr,
            nullptr, 0);
#else
    (void)word, (void)value;
    std::this_thread::yield();
#endif
}
inline void wake_all(std::atomic<int>& word) {
#if defined(__linux__)
    syscall(SYS_futex, reinterpret_cast<int*>(&word), FUTEX_WAKE_PRIVATE, INT32_MAX, nullptr,
            nullptr, 0);
#else
    (void)word;
#endif
}

// Threads wait here for each other between ops. A spin first: the other threads are working on
// the same op and arrive within microseconds, far sooner than the futex sleep of an OpenMP
// barrier under OMP_WAIT_POLICY=PASSIVE would return. A wait that outlasts the spin (another
// thread descheduled on a shared machine) sleeps, leaving the core to whoever needs it.
class Barrier {
  public:
    explicit Barrier(int n) : n_(n) {}

    void wait() {
        const int gen = gen_.load();
        if (arrived_.fetch_add(1) == n_ - 1) {
            arrived_.store(0);
            gen_.fetch_add(1);
            if (sleepers_.load() > 0) wake_all(gen_);
            return;
        }
        for (int spins = 0; gen_.load(std::memory_order_acquire) == gen; ++spins) {
            if (spins < kSpins) {
                cpu_relax();
                continue;
            }
            // Seen by the last arrival (sequentially consistent), or it has moved gen_ on.
            sleepers_.fetch_add(1);
            sleep_while(gen_, gen);
            sleepers_.fetch_sub(1);
        }
    }

  private:
    // ~10-30 us of pauses. On 2 cores next to a busy process, decode steps at batch 4 took 73 ms
    // with 512, 143 ms with 16384 (162 ms spinning without end), 80 ms layer by layer; without
    // the neighbour the spin count made no difference (docs/benchmarks.md).
    static constexpr int kSpins = 512;
    const int n_;
    std::atomic<int> arrived_{0};
    std::atomic<int> gen_{0};
    std::atomic<int> sleepers_{0};
};

// Thread t's share [lo, hi) of n items split into `parts`, in multiples of `align`.
struct Range {
    int64_t lo, hi;
};
inline Range share(int64_t n, int t, int parts, int64_t align = 1) {
    const int64_t units = (n + align - 1) / align;
    return {std::min(n, units * t / parts * align), std::min(n, units * (t + 1) / parts * align)};
}

#if defined(RADIXLM_TILES)
// Rows of x at most, for which a GEMM is a stream over its weight: each block of 4 weight rows is
// loaded from memory once, by one core, and dotted with every row of x, a tile of rows at a time
// (the block is in L1 for the tiles after the first). BLAS runs far below memory speed for a few
// rows (the LM head at 1 row: 11 GB/s) and below this kernel up to 64 (docs/benchmarks.md).
// Every row's dot products are summed in the same order whatever the number of rows and
// whichever tile it falls in, so a token's logits do not depend on its batch.
constexpr int64_t kStreamRows = 64;
// Rows of a tile: 4 R accumulators, R vectors of x and a weight vector in registers; 16 of
// AVX2's 16 (R = 3), 21 of AVX-512's 32 (R = 4).
#if defined(__AVX512F__)
constexpr int64_t kTileRows = 4;
#else
constexpr int64_t kTileRows = 3;
#endif
// A single row's GEMM is bound by memory, and the hardware prefetcher keeps up with its one
// pass; there the software prefetch of the next block is kept only for weight rows of up to
// this many bytes, so that both blocks fit in L1 (at 1 row on Zen 3 the MLP's down projection,
// 1,536-float rows, ran 22% slower with it).
constexpr int64_t kPrefetchRowBytes = 3072;
// A weight row longer than this many floats is taken in ceil(k / kChunk) equal chunks (whole
// vectors), each chunk's partial sums added into y: a block's 4 weight rows and a tile's rows
// of x then stay in L1 together (at 1,536, the MLP's down projection, they did not).
constexpr int64_t kChunk = 768;

// y[0..R, 0..4] = x[0..R] @ w0[0..4]^T over len floats of each row (len a multiple of the vector
// width; rows of x and w0 k apart; w float32 or bfloat16, widened as it is loaded), written to
// y or, with add, added to it (a later chunk of the rows), while `lines` cache lines from
// `ahead` (the next block's weight rows) are prefetched, two an iteration: without it the first
// tile of each block waits on memory while the FMA units idle (1.3x at 8-32 rows, Zen 3).
template <int64_t R, typename Wt>
void stream_tile(const float* __restrict x, int64_t k, int64_t len, const Wt* __restrict w0,
                 float* __restrict y, int64_t ldy, bool add, const char* ahead, int64_t lines) {
    using V = Simd::V;
    constexpr int64_t W = Simd::kWidth;
    V acc[R][4];
    for (int64_t r = 0; r < R; ++r)
        for (int64_t j = 0; j < 4; ++j) acc[r][j] = Simd::set1(0.0f);
    int64_t line = 0;
    for (int64_t i = 0; i < len; i += W) {
        for (int p = 0; p < 2 && line < lines; ++p, ++line)
            __builtin_prefetch(ahead + 64 * line);
        V xv[R];
        for (int64_t r = 0; r < R; ++r) {
            xv[r] = Simd::load(x + r * k + i);
            Simd::keep(xv[r]);
        }
        for (int64_t j = 0; j < 4; ++j) {
            V wv = Simd::load(w0 + j * k + i);
            Simd::keep(wv);
            for (int64_t r = 0; r < R; ++r) acc[r][j] = Simd::fmadd(xv[r], wv, acc[r][j]);
        }
    }
    for (; line < lines; ++line) __builtin_prefetch(ahead + 64 * line);
    for (int64_t r = 0; r < R; ++r) {
        float sums[4];
        Simd::store_sum4(sums, acc[r][0], acc[r][1], acc[r][2], acc[r][3]);
        float* out = y + r * ldy;
        for (int64_t j = 0; j < 4; ++j) out[j] = add ? out[j] + sums[j] : sums[j];
    }
}

// y[:, cols] = x @ w[cols]^T for m rows of x: per block of 4 weight rows, per chunk of them
// (kChunk), tiles of kTileRows rows (fewer in the last), which share the prefetch of the next
// block between them. Up to 4 rows make one tile: a single pass over the weight (on AVX2 a
// few accumulators spill, which costs less than a second pass at these memory-bound sizes).
template <typename Wt>
void stream_cols(const float* __restrict x, int64_t m, int64_t k, const Wt* __restrict w,
                 Range cols, float* __restrict y, int64_t ldy) {
    const int64_t tile_rows = m <= 4 ? m : kTileRows, tiles = (m + tile_rows - 1) / tile_rows;
    const int64_t row_bytes = k * int64_t(sizeof(Wt));
    const int64_t block_lines = m > 1 || row_bytes <= kPrefetchRowBytes ? 4 * row_bytes / 64 : 0;
    const int64_t chunks = (k + kChunk - 1) / kChunk, units = chunks * tiles;
    int64_t c = cols.lo;
    for (; c + 4 <= cols.hi; c += 4) {
        const char* ahead = reinterpret_cast<const char*>(w + (c + 4) * k);
        const int64_t lines = c + 8 <= cols.hi ? block_lines : 0;
        for (int64_t ch = 0; ch < chunks; ++ch) {
            const Range part = share(k, int(ch), int(chunks), Simd::kWidth);
            for (int64_t t = 0; t < tiles; ++t) {
                const int64_t r = t * tile_rows, rows = std::min(tile_rows, m - r);
                const int64_t u = ch * tiles + t;
                const int64_t a = lines * u / units, b = lines * (u + 1) / units;
                const auto tile = rows == 1   ? stream_tile<1, Wt>
                                  : rows == 2 ? stream_tile<2, Wt>
                                  : rows == 3 ? stream_tile<3, Wt>
                                              : stream_tile<4, Wt>;
                tile(x + r * k + part.lo, k, part.hi - part.lo, w + c * k + part.lo,
                     y + r * ldy + c, ldy, ch > 0, ahead + 64 * a, b - a);
            }
        }
    }
    for (; c < cols.hi; ++c)
        for (int64_t r = 0; r < m; ++r) {
            float dot = 0.0f;
            for (int64_t i = 0; i < k; ++i) dot += x[r * k + i] * to_float(w[c * k + i]);
            y[r * ldy + c] = dot;
        }
}
#endif

// y[r, cols] = x[r] @ w[cols]^T by plain dot products: where the vector kernels do not apply
// to a bfloat16 weight (k not a multiple of the vector width, or no vector support).
template <typename W>
void dot_cols(const float* x, int64_t m, int64_t k, const W* w, Range cols, float* y,
              int64_t ldy) {
    for (int64_t r = 0; r < m; ++r)
        for (int64_t c = cols.lo; c < cols.hi; ++c) {
            float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
            for (int64_t i = 0; i < k; ++i) dot += x[r * k + i] * to_float(w[c * k + i]);
            y[r * ldy + c] = dot;
        }
}

#if defined(RADIXLM_TILES) && defined(__AVX512BF16__)
#define RADIXLM_DPBF16 1
// stream_cols for bfloat16 weights where the CPU has AVX512-BF16: x is rounded to bfloat16 too
// (as torch's bfloat16 GEMMs round it), and each vdpbf16ps multiplies 32 pairs into 16 float32
// sums, twice the products of a float32 FMA and no widening. k is a multiple of 32.
template <int64_t M>
void stream_cols_dp(const uint16_t* __restrict x, int64_t k, const uint16_t* __restrict w,
                    Range cols, float* __restrict y, int64_t ldy) {
    int64_t c = cols.lo;
    for (; c + 4 <= cols.hi; c += 4) {
        __m512 acc[M][4];
        for (int64_t r = 0; r < M; ++r)
            for (int64_t j = 0; j < 4; ++j) acc[r][j] = _mm512_setzero_ps();
        const uint16_t* w0 = w + c * k;
        for (int64_t i = 0; i < k; i += 32) {
            __m512bh wv[4];
            for (int64_t j = 0; j < 4; ++j) wv[j] = (__m512bh)_mm512_loadu_si512(w0 + j * k + i);
            for (int64_t r = 0; r < M; ++r) {
                const __m512bh xv = (__m512bh)_mm512_loadu_si512(x + r * k + i);
                for (int64_t j = 0; j < 4; ++j) acc[r][j] = _mm512_dpbf16_ps(acc[r][j], xv, wv[j]);
            }
        }
        for (int64_t r = 0; r < M; ++r)
            Simd::store_sum4(y + r * ldy + c, acc[r][0], acc[r][1], acc[r][2], acc[r][3]);
    }
    for (; c < cols.hi; ++c)
        for (int64_t r = 0; r < M; ++r) {
            float dot = 0.0f;
            for (int64_t i = 0; i < k; ++i) dot += to_float(x[r * k + i]) * to_float(w[c * k + i]);
            y[r * ldy + c] = dot;
        }
}

// y[:, cols] = x @ w[cols]^T through stream_cols_dp: up to 4 rows in one pass over the weight,
// more in groups of 4 over each block of 4 weight rows (read from L1 after the first group).
void stream_rows_dp(const uint16_t* x, int64_t m, int64_t k, const uint16_t* w, Range cols,
                    float* y, int64_t ldy) {
    const auto group = [](int64_t rows) {
        return rows >= 4 ? stream_cols_dp<4> : rows == 3 ? stream_cols_dp<3>
                                             : rows == 2 ? stream_cols_dp<2>
                                                         : stream_cols_dp<1>;
    };
    if (m <= 4) {
        group(m)(x, k, w, cols, y, ldy);
        return;
    }
    for (int64_t c = cols.lo; c < cols.hi; c += 4) {
        const Range block{c, std::min(c + 4, cols.hi)};
        for (int64_t r = 0; r < m; r += 4) group(m - r)(x + r * k, k, w, block, y + r * ldy, ldy);
    }
}
#endif

// y[:, cols] = x @ w[cols]^T (+ bias[cols]) for x [m, k] and w [n, k] row-major; y has row
// stride ldy. A few rows stream the weight (stream_cols); more go to sgemm, in whose
// column-major terms y^T[cols] = w[cols] (k x |cols|, transposed) x^T. A bfloat16 weight
// (W = uint16_t) streams for any number of rows: widened to float32 (float32 products), or
// with AVX512-BF16 multiplied natively (x rounded to bfloat16, float32 sums).
template <typename W>
void linear_cols(Sgemm sgemm, const float* x, int64_t m, int64_t k, const W* w, const W* bias,
                 Range cols, float* y, int64_t ldy) {
    if (cols.hi <= cols.lo || m <= 0) return;
    constexpr bool kWide = std::is_same_v<W, float>;
#if defined(RADIXLM_DPBF16)
    if (!kWide && k % 32 == 0) {
        thread_local std::vector<uint16_t> xb;
        xb.resize(m * k);
        for (int64_t i = 0; i < m * k; ++i) radixlm::store(x[i], xb.data() + i);
        stream_rows_dp(xb.data(), m, k, reinterpret_cast<const uint16_t*>(w), cols, y, ldy);
    } else
#endif
#if defined(RADIXLM_TILES)
    if ((m <= kStreamRows || !kWide) && k % Simd::kWidth == 0) {
        stream_cols(x, m, k, w, cols, y, ldy);
    } else
#endif
    if constexpr (kWide) {
        const int n = int(cols.hi - cols.lo), mm = int(m), kk = int(k), ld = int(ldy);
        const float one = 1.0f, zero = 0.0f;
        sgemm("T", "N", &n, &mm, &kk, &one, w + cols.lo * k, &kk, x, &kk, &zero, y + cols.lo,
              &ld);
    } else {
        dot_cols(x, m, k, w, cols, y, ldy);
    }
    if (bias == nullptr) return;
    for (int64_t r = 0; r < m; ++r)
        for (int64_t c = cols.lo; c < cols.hi; ++c) y[r * ldy + c] += to_float(bias[c]);
}

template <typename W, typename KV>
void decode_layers(const DecodeArgs& a) {
    // Layer l's weight `name` in its dtype.
    const auto wt = [](const void* const* name, int64_t l) {
        return static_cast<const W*>(name[l]);
    };
    const int64_t m = a.tokens, hid = a.hidden, d = a.head_dim, inter = a.inter;
    const int64_t q_cols = a.heads * d, kv_cols = a.kv_heads * d, qkv_cols = q_cols + 2 * kv_cols;
    const bool all = a.gemms_only == 0;
    std::vector<float> h(m * hid), qkv(m * qkv_cols), q(m * q_cols), attn(m * q_cols),
        o(m * hid), gate_up(m * 2 * inter), act(m * inter);
    const RowBatch<KV> rows{q.data(), nullptr, nullptr, a.row_kv, a.row_stride, a.q_start,
                            a.q_len, a.kv_len, a.rows, a.heads, a.kv_heads, d, a.head_stride,
                            a.scale, a.window, attn.data()};
    const int64_t max_m = rows.max_m();
    std::optional<Barrier> barrier;
    std::atomic<int64_t> next_task{0};  // the attention's work queue

#pragma omp parallel num_threads(int(std::max<int64_t>(1, a.num_threads)))
    {
        const int t = omp_get_thread_num(), n = omp_get_num_threads();
        omp_set_num_threads(1);  // this thread's sgemm calls run on it alone, never nested
#pragma omp single
        barrier.emplace(n);  // the single's own barrier publishes it
        Barrier& sync = *barrier;
        RowScratch scratch(max_m, d);
        RowBatch<KV> my_rows_batch = rows;  // pointed at each layer's caches
        const Range my_rows = share(m, t, n);
        const Range my_hidden = share(hid, t, n, 16), my_qkv = share(qkv_cols, t, n, 16);
        const Range gate = share(inter, t, n, 16), up{inter + gate.lo, inter + gate.hi};

        for (int64_t l = 0; l < a.layers; ++l) {
            KV* k_cache = static_cast<KV*>(a.k_cache[l]);
            KV* v_cache = static_cast<KV*>(a.v_cache[l]);
            // Input norm; from the second layer on, the previous layer's output joins the
            // residual first.
            for (int64_t r = my_rows.lo; all && r < my_rows.hi; ++r) {
                const float* x = l == 0 ? a.residual + r * hid : a.out + r * hid;
                float* res = l == 0 ? nullptr : a.residual + r * hid;
                rms_norm_row(x, res, wt(a.in_norm, l), a.eps, hid, h.data() + r * hid);
            }
            sync.wait();
            linear_cols(a.sgemm, h.data(), m, hid, wt(a.qkv_w, l),
                        a.qkv_b ? wt(a.qkv_b, l) : nullptr, my_qkv, qkv.data(), qkv_cols);
            sync.wait();
            // Per token: q/k head norms where the model has them, the rotary embedding, and
            // the token's K/V into the pool.
            for (int64_t r = my_rows.lo; all && r < my_rows.hi; ++r) {
                float* x = qkv.data() + r * qkv_cols;
                for (int64_t hh = 0; a.q_norm != nullptr && hh < a.heads + a.kv_heads; ++hh)
                    rms_norm_row(x + hh * d, nullptr,
                                 hh < a.heads ? wt(a.q_norm, l) : wt(a.k_norm, l), a.eps, d,
                                 x + hh * d);
                rope_store_token(x, x + q_cols, x + q_cols + kv_cols, a.cos + r * d,
                                 a.sin + r * d, a.out_slots[r], a.heads, a.kv_heads, d,
                                 q.data() + r * q_cols, nullptr, nullptr, 0, k_cache, v_cache,
                                 a.head_stride);
            }
            // The previous layer's attention ended at a barrier: nobody takes from the queue.
            if (t == 0) next_task.store(0, std::memory_order_relaxed);
            sync.wait();
            my_rows_batch.k_cache = k_cache;
            my_rows_batch.v_cache = v_cache;
            for (int64_t task; all && (task = next_task.fetch_add(1)) < rows.tasks();)
                attend_task(my_rows_batch, task, scratch);
            sync.wait();
            linear_cols<W>(a.sgemm, attn.data(), m, q_cols, wt(a.o_w, l), nullptr, my_hidden,
                           o.data(), hid);
            sync.wait();
            for (int64_t r = my_rows.lo; all && r < my_rows.hi; ++r)
                rms_norm_row(o.data() + r * hid, a.residual + r * hid, wt(a.post_norm, l), a.eps,
                             hid, h.data() + r * hid);
            sync.wait();
            // This thread's columns of both gate and up, so SwiGLU needs no barrier before it.
            linear_cols<W>(a.sgemm, h.data(), m, hid, wt(a.gate_up_w, l), nullptr, gate,
                           gate_up.data(), 2 * inter);
            linear_cols<W>(a.sgemm, h.data(), m, hid, wt(a.gate_up_w, l), nullptr, up,
                           gate_up.data(), 2 * inter);
            for (int64_t r = 0; all && r < m; ++r) {
                const float* g = gate_up.data() + r * 2 * inter;
                silu_mul_row(g + gate.lo, g + inter + gate.lo, gate.hi - gate.lo,
                             act.data() + r * inter + gate.lo);
            }
            sync.wait();
            linear_cols<W>(a.sgemm, act.data(), m, inter, wt(a.down_w, l), nullptr, my_hidden,
                           a.out, hid);
            sync.wait();
        }
    }
}

template <typename W>
void linear(const float* x, int64_t m, int64_t k, const W* w, int64_t n, float* y, Sgemm sgemm,
            int num_threads) {
#pragma omp parallel num_threads(num_threads)
    {
        omp_set_num_threads(1);  // as in the pass
        const Range cols = share(n, omp_get_thread_num(), omp_get_num_threads(), 16);
        linear_cols<W>(sgemm, x, m, k, w, nullptr, cols, y, n);
    }
}

}  // namespace

extern "C" {

// y [m, n] = x [m, k] @ w [n, k]^T, row-major, each thread computing its share of y's columns
// as the decode pass does (for the LM head after it); w float32 (_f32) or bfloat16 (_bf16,
// which never calls sgemm).
void radixlm_linear_f32(const float* x, int64_t m, int64_t k, const float* w, int64_t n, float* y,
                        Sgemm sgemm, int num_threads) {
    linear(x, m, k, w, n, y, sgemm, num_threads);
}

void radixlm_linear_bf16(const float* x, int64_t m, int64_t k, const uint16_t* w, int64_t n,
                         float* y, Sgemm sgemm, int num_threads) {
    linear(x, m, k, w, n, y, sgemm, num_threads);
}

// GFLOP/s of num_threads threads doing only independent vector FMAs in registers, `iters` rounds
// each: the cores' float32 peak, which benchmarks set a GEMM's speed against; 0 where the
// kernels have no vector path.
double radixlm_fma_peak(int num_threads, int64_t iters) {
#if defined(RADIXLM_TILES)
    constexpr int kChains = 12;  // independent accumulators: more than FMA latency x pipes
    static volatile float sink;  // keeps the sums, so that the loop is not optimised away
    int used = 1;
    float total = 0.0f;
    const double start = omp_get_wtime();
#pragma omp parallel num_threads(num_threads) reduction(+ : total)
    {
#pragma omp single nowait
        used = omp_get_num_threads();
        Simd::V acc[kChains];
        const Simd::V mul = Simd::set1(0.999999f), add = Simd::set1(1e-7f);
        for (int i = 0; i < kChains; ++i) acc[i] = Simd::set1(float(i + omp_get_thread_num()));
        for (int64_t it = 0; it < iters; ++it)
            for (int i = 0; i < kChains; ++i) acc[i] = Simd::fmadd(acc[i], mul, add);
        float lanes[Simd::kWidth];
        for (int i = 0; i < kChains; ++i) {
            Simd::store(lanes, acc[i]);
            total += lanes[0];
        }
    }
    const double seconds = omp_get_wtime() - start;
    sink = total;
    return 2.0 * Simd::kWidth * kChains * double(iters) * used / seconds / 1e9;
#else
    (void)num_threads, (void)iters;
    return 0.0;
#endif
}

// 1 where bfloat16 weights are multiplied natively (AVX512-BF16: x rounded to bfloat16), 0 where
// they are widened to float32.
int radixlm_native_bf16_dot() {
#if defined(RADIXLM_DPBF16)
    return 1;
#else
    return 0;
#endif
}

// The pass, radixlm_decode_layers_<weights>_<KV pool>.
void radixlm_decode_layers_f32_f32(const DecodeArgs* args) { decode_layers<float, float>(*args); }

void radixlm_decode_layers_f32_bf16(const DecodeArgs* args) {
    decode_layers<float, uint16_t>(*args);
}

void radixlm_decode_layers_bf16_f32(const DecodeArgs* args) {
    decode_layers<uint16_t, float>(*args);
}

void radixlm_decode_layers_bf16_bf16(const DecodeArgs* args) {
    decode_layers<uint16_t, uint16_t>(*args);
}

}  // extern "C"
