// Causal attention of a step's extends (prompt chunks, each after a cached prefix or none) on the
// CPU, for head sizes 64 and 128: flash attention over blocks of keys with an online softmax,
// all the extends in one parallel region.
//
// The keys and values are read through each extend's slots (rows of the head-major pool, or of
// this step's K/V for an extend with no cached prefix): first gathered block by block, KB keys
// of a KV head at a time, into a scratch buffer of float32 (bfloat16 widened), the keys
// transposed ([D, KB] each, contiguous so that a block's rows do not collide in the cache's
// sets), the values as rows. A block the extends' slots share (a cached prefix common to
// several, e.g. a few-shot prompt's) is gathered once and read by all of them.
//
// Each task is then a tile of up to QT queries of one head of one extend; every block of keys
// is read once for the tile and stays in L1 while the tile's queries go through it NQ at a
// time: a block's scores are vector FMAs over its keys, then the softmax update (in vectors)
// and the value rows. Built with the other kernels (build.py) and called through ctypes (cpu.py).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <unordered_map>
#include <vector>

#include "cpu_math.h"

namespace extend_attention {

// Floats a vector: AVX-512's 16, else AVX2's 8 (vectors of the compiler's extensions, so a
// CPU without them runs narrower instructions; tests build the 16-lane code on any CPU).
#ifndef RADIXLM_EXTEND_WIDTH
#if defined(__AVX512F__)
#define RADIXLM_EXTEND_WIDTH 16
#else
#define RADIXLM_EXTEND_WIDTH 8
#endif
#endif
constexpr int W = RADIXLM_EXTEND_WIDTH;
// Queries a pass over a block: their NQ x 2 accumulators stay in registers (AVX-512 has 32,
// AVX2 16).
constexpr int NQ = W == 16 ? 8 : 6;
static_assert(W == 8 || W == 16, "RADIXLM_EXTEND_WIDTH is 8 or 16");
constexpr int BK = 2 * W;        // keys a pass of the score loop
constexpr int64_t QT = NQ * 16;  // queries a task, at most
constexpr int64_t KB = 32;  // keys a block: its transposed K, its V rows (8 KB each at D = 64)
constexpr float kNoScore = -1.0e30f;  // finite "minus infinity": exp of a difference stays 0
static_assert(KB % BK == 0 && KB % W == 0 && QT % NQ == 0, "blocks must tile");

typedef float vec __attribute__((vector_size(4 * W), aligned(4)));
typedef int32_t ivec __attribute__((vector_size(4 * W), aligned(4)));
inline vec load(const float* p) { return *reinterpret_cast<const vec*>(p); }
inline void store(float* p, vec x) { *reinterpret_cast<vec*>(p) = x; }

// One extend: its first token among the step's, its number of new tokens, its cached prefix
// (its query i sits at position prefix + i and sees keys 0 .. prefix + i), and where its
// prefix + t slots start in the slots array.
struct Seq {
    int64_t q_start, t, prefix, slot0;
};

template <typename KV>
struct Args {
    const float* q;  // [tokens, H, D], contiguous
    const KV* k;     // KV head g's row s at k + g * kv_head_stride + s * D
    const KV* v;
    int64_t kv_head_stride;
    const int64_t* slots;
    const Seq* seqs;
    int64_t n, h, kvh;
    float scale;
    float* out;  // [tokens, H, D], contiguous
};

// The gathered blocks: unique block u holds, for each KV head g, KB transposed keys at
// data + (u * kvh + g) * 2 * KB * D and their KB value rows right after; block b of extend i
// is unique block ids[first[i] + b].
struct Blocks {
    std::vector<int64_t> first, ids;
    std::vector<int64_t> source_seq, source_j0;  // unique block u: an extend that holds it, j0
};

// Full blocks of the cached prefix whose slots equal another extend's are shared; every other
// block is the extend's own.
inline Blocks plan_blocks(const int64_t* slots, const Seq* seqs, int64_t n) {
    Blocks b;
    std::unordered_map<int64_t, int64_t> by_first_slot;  // a shared block's first slot -> u
    for (int64_t i = 0; i < n; ++i) {
        const Seq& s = seqs[i];
        const int64_t len = s.prefix + s.t;
        b.first.push_back(int64_t(b.ids.size()));
        for (int64_t j0 = 0; j0 < len; j0 += KB) {
            const int64_t* own = slots + s.slot0 + j0;
            if (j0 + KB <= s.prefix) {
                const auto found = by_first_slot.find(own[0]);
                if (found != by_first_slot.end()) {
                    const int64_t u = found->second;
                    const int64_t* other = slots + seqs[b.source_seq[u]].slot0 + b.source_j0[u];
                    const bool same = std::memcmp(own, other, KB * sizeof(int64_t)) == 0;
                    if (b.source_j0[u] == j0 && same) {
                        b.ids.push_back(u);
                        continue;
                    }
                } else {
                    by_first_slot.emplace(own[0], int64_t(b.source_seq.size()));
                }
            }
            b.ids.push_back(int64_t(b.source_seq.size()));
            b.source_seq.push_back(i);
            b.source_j0.push_back(j0);
        }
    }
    b.first.push_back(int64_t(b.ids.size()));
    return b;
}

// Gathers unique block u's keys (transposed) and values of KV head g into dst (float32); keys
// past the extend's end are zeros.
template <int D, typename KV>
void gather_block(const Args<KV>& a, const Seq* seqs, const Blocks& b, int64_t u, int64_t g,
                  float* dst) {
    const Seq& s = seqs[b.source_seq[u]];
    const int64_t j0 = b.source_j0[u], nk = std::min(KB, s.prefix + s.t - j0);
    const int64_t* slot = a.slots + s.slot0 + j0;
    const KV* k = a.k + g * a.kv_head_stride;
    const KV* v = a.v + g * a.kv_head_stride;
    float* kt = dst;
    float* vr = dst + KB * D;
    for (int64_t j = 0; j < nk; ++j) {
        const KV* krow = k + slot[j] * D;
        const KV* vrow = v + slot[j] * D;
        for (int x = 0; x < D; ++x) kt[x * KB + j] = radixlm::to_float(krow[x]);
        for (int x = 0; x < D; ++x) vr[j * D + x] = radixlm::to_float(vrow[x]);
    }
    for (int64_t j = nk; j < KB; ++j) {
        for (int x = 0; x < D; ++x) kt[x * KB + j] = 0.0f;
        std::fill(vr + j * D, vr + (j + 1) * D, 0.0f);
    }
}

// out[r] = op over the lanes of v[r], for 8 vectors, their lanes reduced pairwise in a
// transpose (at 8 lanes 7 ops and 14 shuffles, where one reduction at a time takes 7 dependent
// ops each); a loop where the compiler has no __builtin_shufflevector (before GCC 12).
#if defined(__has_builtin)
#if __has_builtin(__builtin_shufflevector)
#define RADIXLM_SHUFFLES 1
#endif
#endif
template <typename Op>
inline vec reduce_lanes(const vec* v, Op op) {
#if !defined(RADIXLM_SHUFFLES)
    vec out = v[0];
    for (int r = 0; r < 8; ++r) {
        float x = v[r][0];
        for (int j = 1; j < W; ++j) x = op(vec{} + x, vec{} + v[r][j])[0];
        out[r] = x;
    }
    return out;
#elif RADIXLM_EXTEND_WIDTH == 16
    vec b[4], c[2];
    for (int i = 0; i < 4; ++i)
        b[i] = op(__builtin_shufflevector(v[2 * i], v[2 * i + 1], 0, 16, 2, 18, 4, 20, 6, 22, 8,
                                          24, 10, 26, 12, 28, 14, 30),
                  __builtin_shufflevector(v[2 * i], v[2 * i + 1], 1, 17, 3, 19, 5, 21, 7, 23, 9,
                                          25, 11, 27, 13, 29, 15, 31));
    for (int i = 0; i < 2; ++i)
        c[i] = op(__builtin_shufflevector(b[2 * i], b[2 * i + 1], 0, 1, 16, 17, 4, 5, 20, 21, 8,
                                          9, 24, 25, 12, 13, 28, 29),
                  __builtin_shufflevector(b[2 * i], b[2 * i + 1], 2, 3, 18, 19, 6, 7, 22, 23, 10,
                                          11, 26, 27, 14, 15, 30, 31));
    const vec d = op(__builtin_shufflevector(c[0], c[1], 0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10,
                                             11, 24, 25, 26, 27),
                     __builtin_shufflevector(c[0], c[1], 4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14,
                                             15, 28, 29, 30, 31));
    return op(d, __builtin_shufflevector(d, d, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6,
                                         7));
#else
    vec b[4], c[2];
    for (int i = 0; i < 4; ++i)
        b[i] = op(__builtin_shufflevector(v[2 * i], v[2 * i + 1], 0, 8, 2, 10, 4, 12, 6, 14),
                  __builtin_shufflevector(v[2 * i], v[2 * i + 1], 1, 9, 3, 11, 5, 13, 7, 15));
    for (int i = 0; i < 2; ++i)
        c[i] = op(__builtin_shufflevector(b[2 * i], b[2 * i + 1], 0, 1, 8, 9, 4, 5, 12, 13),
                  __builtin_shufflevector(b[2 * i], b[2 * i + 1], 2, 3, 10, 11, 6, 7, 14, 15));
    return op(__builtin_shufflevector(c[0], c[1], 0, 1, 2, 3, 8, 9, 10, 11),
              __builtin_shufflevector(c[0], c[1], 4, 5, 6, 7, 12, 13, 14, 15));
#endif
}
static_assert(NQ <= 8 && NQ <= W, "reduce_lanes takes 8 rows into one vector");

inline vec vmax(vec a, vec b) { return a > b ? a : b; }

// The softmax update of NQ queries' scores s[r][0, KB) of a block, query r seeing its first
// visible[r] keys (0: none, or a row past the tile): the scores become exp(score - the query's
// new running max) (zeros for the keys it does not see), m[r] and l[r] (its running max and
// sum) take the block in, and correction[r] is the factor that rescales its values. The
// queries' maxima, sums and corrections are vectors over the queries.
inline void softmax_block(float (*s)[KB], const int64_t* visible, float* m, float* l,
                          float* correction) {
    constexpr int NV = KB / W;
    ivec lane;
    for (int x = 0; x < W; ++x) lane[x] = x;
    vec most[8];
    for (int r = 0; r < NQ; ++r) {
        most[r] = vec{} + kNoScore;
        for (int i = 0; i < NV; ++i) {
            vec v = load(s[r] + i * W);
            if (visible[r] < KB) v = lane + i * W < int(visible[r]) ? v : vec{} + kNoScore;
            store(s[r] + i * W, v);
            most[r] = vmax(most[r], v);
        }
    }
    for (int r = NQ; r < 8; ++r) most[r] = most[NQ - 1];
    vec old_max = vec{} + kNoScore, old_sum{};
    for (int r = 0; r < NQ; ++r) old_max[r] = m[r], old_sum[r] = l[r];
    const vec new_max = vmax(old_max, reduce_lanes(most, vmax));
    const vec scale = radixlm::exp_nonpositive(old_max - new_max);
    vec sums[8];
    for (int r = 0; r < NQ; ++r) {
        sums[r] = vec{};
        if (visible[r] == 0) {  // its max may be the initial "minus infinity": keep it out
            for (int i = 0; i < NV; ++i) store(s[r] + i * W, vec{});
            continue;
        }
        const float top = new_max[r];
        for (int i = 0; i < NV; ++i) {
            const vec e = radixlm::exp_nonpositive(load(s[r] + i * W) - top);
            store(s[r] + i * W, e);
            sums[r] += e;
        }
    }
    for (int r = NQ; r < 8; ++r) sums[r] = vec{};
    const vec new_sum = old_sum * scale + reduce_lanes(sums, [](vec a, vec b) { return a + b; });
    for (int r = 0; r < NQ; ++r) {
        m[r] = new_max[r];
        l[r] = new_sum[r];
        correction[r] = scale[r];
    }
}

// Queries i0 .. i0 + nt - 1 of head hq of extend `seq`; `block(j0)` is the gathered block of
// its keys j0 .. j0 + KB - 1 for the head's KV head.
template <int D, typename KV, typename BlockOf>
void attend_tile(const Args<KV>& a, const Seq& seq, int64_t hq, int64_t i0, int64_t nt,
                 BlockOf block) {
    alignas(64) float qs[QT][D];
    alignas(64) float o[QT][D];
    alignas(64) float s[NQ][KB];
    float m[QT], l[QT];
    // Rows past nt, to the end of the last pass of NQ, repeat the last query (never stored).
    for (int64_t r = 0; r < (nt + NQ - 1) / NQ * NQ; ++r) {
        const float* src = a.q + ((seq.q_start + i0 + std::min(r, nt - 1)) * a.h + hq) * D;
        for (int x = 0; x < D; ++x) qs[r][x] = src[x] * a.scale;
        std::fill(o[r], o[r] + D, 0.0f);
        m[r] = kNoScore;
        l[r] = 0.0f;
    }
    const int64_t end = seq.prefix + i0 + nt;  // one past the last query's last key
    for (int64_t j0 = 0; j0 < end; j0 += KB) {
        const int64_t nk = std::min<int64_t>(KB, end - j0);
        const float* kblock = block(j0);
        const float* vblock = kblock + KB * D;
        // Queries before r_first see none of this block's keys.
        const int64_t r_first = std::max<int64_t>(0, j0 - seq.prefix - i0) / NQ * NQ;
        for (int64_t r0 = r_first; r0 < nt; r0 += NQ) {
            for (int c0 = 0; c0 < KB; c0 += BK) {
                vec acc[NQ][2];
                for (int r = 0; r < NQ; ++r) acc[r][0] = acc[r][1] = vec{};
                for (int x = 0; x < D; ++x) {
                    const vec k0 = load(kblock + x * KB + c0), k1 = load(kblock + x * KB + c0 + W);
                    for (int r = 0; r < NQ; ++r) {
                        acc[r][0] += qs[r0 + r][x] * k0;
                        acc[r][1] += qs[r0 + r][x] * k1;
                    }
                }
                for (int r = 0; r < NQ; ++r) {
                    store(s[r] + c0, acc[r][0]);
                    store(s[r] + c0 + W, acc[r][1]);
                }
            }
            // The softmax update of the NQ queries; a query that sees none of the block (or a
            // row past the tile) gets zero weights, so the value loop below runs them all alike.
            int64_t visible[NQ];
            int64_t seen = 0;  // keys the sub-block's queries see, at most
            for (int r = 0; r < NQ; ++r) {
                const int64_t qr = r0 + r;
                const int64_t own = seq.prefix + i0 + qr + 1 - j0;  // keys up to its own
                visible[r] = qr < nt ? std::clamp<int64_t>(own, 0, nk) : 0;
                seen = std::max(seen, visible[r]);
            }
            float correction[NQ];
            softmax_block(s, visible, m + r0, l + r0, correction);
            // o = o * correction + p . V, two vectors of the head at a time for all NQ queries:
            // each value vector loaded once for them.
            for (int c = 0; c < D; c += 2 * W) {
                vec acc[NQ][2];
                for (int r = 0; r < NQ; ++r) {
                    acc[r][0] = load(o[r0 + r] + c) * correction[r];
                    acc[r][1] = load(o[r0 + r] + c + W) * correction[r];
                }
                const float* vrow = vblock + c;
                for (int64_t j = 0; j < seen; ++j, vrow += D) {
                    const vec v0 = load(vrow), v1 = load(vrow + W);
                    for (int r = 0; r < NQ; ++r) {
                        acc[r][0] += s[r][j] * v0;
                        acc[r][1] += s[r][j] * v1;
                    }
                }
                for (int r = 0; r < NQ; ++r) {
                    store(o[r0 + r] + c, acc[r][0]);
                    store(o[r0 + r] + c + W, acc[r][1]);
                }
            }
        }
    }
    for (int64_t r = 0; r < nt; ++r) {
        const float inv = 1.0f / l[r];
        float* dst = a.out + ((seq.q_start + i0 + r) * a.h + hq) * D;
        for (int x = 0; x < D; ++x) dst[x] = o[r][x] * inv;
    }
}

// A call's extends go through in groups whose gathered blocks fit in this many floats (256 MB;
// an extend that needs more goes alone), in a buffer the calling thread keeps between calls:
// a step's K/V is gathered anew each layer, and a fresh allocation costs a page fault per 4 KB.
// Tests build a variant with a small one.
#ifndef RADIXLM_EXTEND_SCRATCH_FLOATS
#define RADIXLM_EXTEND_SCRATCH_FLOATS (int64_t(64) << 20)
#endif
constexpr int64_t kScratchFloats = RADIXLM_EXTEND_SCRATCH_FLOATS;

// The extends seqs[0, n) in one parallel region: their blocks gathered, then their tasks.
template <int D, typename KV>
void run_group(const Args<KV>& a, const Seq* seqs, int64_t n, std::vector<float>& scratch,
               int num_threads) {
    const Blocks b = plan_blocks(a.slots, seqs, n);
    const int64_t unique = int64_t(b.source_seq.size());
    const int64_t block_floats = 2 * KB * D;  // one KV head's keys and values
    const size_t want = size_t(unique * a.kvh * block_floats);
    if (scratch.size() < want) scratch = std::vector<float>(want);
    float* data = scratch.data();
    // Queries a task: QT, or fewer (a multiple of NQ) where that leaves too few tasks to keep
    // every thread busy to the end (one 60-token extend: 9 tasks, one a head).
    const auto tiles = [&](int64_t size) {
        int64_t count = 0;
        for (int64_t i = 0; i < n; ++i) count += (seqs[i].t + size - 1) / size * a.h;
        return count;
    };
    int64_t qt = QT;
    while (qt > NQ && tiles(qt) < 8 * num_threads) qt -= NQ;
    // Tasks, the costliest (most queries times keys) first, so that the short ones fill in at
    // the end: extend, head, first query, queries.
    struct Task {
        int64_t cost, seq, hq, i0, nt;
    };
    std::vector<Task> tasks;
    for (int64_t i = 0; i < n; ++i) {
        const Seq& s = seqs[i];
        const int64_t count = (s.t + qt - 1) / qt;  // its tiles, of equal size to NQ
        const int64_t size = ((s.t + count - 1) / count + NQ - 1) / NQ * NQ;
        for (int64_t i0 = 0; i0 < s.t; i0 += size) {
            const int64_t nt = std::min(size, s.t - i0);
            for (int64_t hq = 0; hq < a.h; ++hq)
                tasks.push_back({nt * (s.prefix + i0 + nt), i, hq, i0, nt});
        }
    }
    std::stable_sort(tasks.begin(), tasks.end(),
                     [](const Task& x, const Task& y) { return x.cost > y.cost; });
    const int64_t group = a.h / a.kvh;
#pragma omp parallel num_threads(num_threads)
    {
#pragma omp for schedule(static)
        for (int64_t ug = 0; ug < unique * a.kvh; ++ug)
            gather_block<D>(a, seqs, b, ug / a.kvh, ug % a.kvh, data + ug * block_floats);
#pragma omp for schedule(dynamic, 1)
        for (size_t task = 0; task < tasks.size(); ++task) {
            const Task& tk = tasks[task];
            const Seq& seq = seqs[tk.seq];
            const int64_t* ids = b.ids.data() + b.first[tk.seq];
            const int64_t g = tk.hq / group;
            auto block = [&](int64_t j0) {
                return data + (ids[j0 / KB] * a.kvh + g) * block_floats;
            };
            attend_tile<D>(a, seq, tk.hq, tk.i0, tk.nt, block);
        }
    }
}

template <int D, typename KV>
void run(const Args<KV>& a, int num_threads) {
    thread_local std::vector<float> scratch;
    const int64_t block_floats = 2 * KB * D * a.kvh;  // a block's keys and values, all KV heads
    for (int64_t i = 0, j; i < a.n; i = j) {
        int64_t floats = 0;  // at most: blocks shared by several extends count for each
        for (j = i; j < a.n; ++j) {
            const int64_t own = (a.seqs[j].prefix + a.seqs[j].t + KB - 1) / KB * block_floats;
            if (j > i && floats + own > kScratchFloats) break;
            floats += own;
        }
        run_group<D>(a, a.seqs + i, j - i, scratch, num_threads);
    }
    if (int64_t(scratch.size()) > kScratchFloats) std::vector<float>().swap(scratch);
}

// See radixlm_extend_attention_f32.
template <typename KV>
int attend(const float* q, const KV* k, const KV* v, int64_t kv_head_stride,
           const int64_t* slots, const int64_t* seqs, int64_t n, int64_t h, int64_t kvh,
           int64_t d, float scale, float* out, int num_threads) {
    const Seq* extends = reinterpret_cast<const Seq*>(seqs);
    const Args<KV> a{q, k, v, kv_head_stride, slots, extends, n, h, kvh, scale, out};
    if (d == 64) {
        run<64>(a, num_threads);
        return 0;
    }
    if (d == 128) {
        run<128>(a, num_threads);
        return 0;
    }
    return 1;
}

}  // namespace extend_attention

extern "C" {

// Causal attention of n extends into out [tokens, h, d]: extend i's queries are rows
// seqs[4i] .. seqs[4i] + seqs[4i+1] - 1 of q [tokens, h, d], at positions seqs[4i+2] (its
// cached prefix) onward, over keys 0 .. prefix + t - 1 whose rows are slots[seqs[4i+3] ..]
// (KV head g's row s of k / v at + g * kv_head_stride + s * d). Returns 0, or 1 (nothing done)
// for a head size other than 64 and 128.
int radixlm_extend_attention_f32(const float* q, const float* k, const float* v,
                                 int64_t kv_head_stride, const int64_t* slots,
                                 const int64_t* seqs, int64_t n, int64_t h, int64_t kvh,
                                 int64_t d, float scale, float* out, int num_threads) {
    return extend_attention::attend(q, k, v, kv_head_stride, slots, seqs, n, h, kvh, d, scale,
                                    out, num_threads);
}

// The same over a bfloat16 pool.
int radixlm_extend_attention_bf16(const float* q, const uint16_t* k, const uint16_t* v,
                                  int64_t kv_head_stride, const int64_t* slots,
                                  const int64_t* seqs, int64_t n, int64_t h, int64_t kvh,
                                  int64_t d, float scale, float* out, int num_threads) {
    return extend_attention::attend(q, k, v, kv_head_stride, slots, seqs, n, h, kvh, d, scale,
                                    out, num_threads);
}

}  // extern "C"
