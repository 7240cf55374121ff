// Causal attention of an extend (a prompt chunk, after prefix cached keys or none) on the CPU,
// for head sizes 64 and 128: flash attention over blocks of keys with an online softmax.
//
// Each task is a tile of QT queries of one head; every block of KB keys is read once for the
// tile and stays in L1 while the tile's queries go through it NQ at a time: a block's scores
// are vector FMAs over its keys (the keys of each KV head are first transposed block by block,
// [D, KB] each, contiguous so that a block's rows do not collide in the cache's sets), then
// the softmax update and the value rows. Built with the other kernels (build.py) and called
// through ctypes (cpu.py).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "cpu_math.h"

namespace extend_attention {

#if defined(__AVX512F__)
constexpr int W = 16;  // floats a vector
constexpr int NQ = 8;  // queries a pass over a block: NQ x 2 accumulators stay in registers
#else
constexpr int W = 8;
constexpr int NQ = 6;
#endif
constexpr int BK = 2 * W;    // keys a pass of the score loop
constexpr int64_t QT = NQ * 16;  // queries a task
constexpr int64_t KB = 32;   // keys a block: its transposed K and its V rows (8 KB each at D = 64)
constexpr float kNoScore = -1.0e30f;  // finite "minus infinity": exp of a difference stays 0
static_assert(KB % BK == 0 && QT % NQ == 0, "blocks must tile");

typedef float vec __attribute__((vector_size(4 * W), aligned(4)));
inline vec load(const float* p) { return *reinterpret_cast<const vec*>(p); }
inline void store(float* p, vec x) { *reinterpret_cast<vec*>(p) = x; }

struct Args {
    const float* q;  // [T, H, D], contiguous
    const float* k;  // KV head g's keys at k + g * kv_head_stride, rows of D, prefix + T of them
    const float* v;
    int64_t kv_head_stride;
    int64_t t, prefix, h, kvh;
    float scale;
    float* out;  // [T, H, D], contiguous
};

// Queries i0 .. i0 + nt - 1 of head hq (query i sees keys 0 .. prefix + i); kt: the KV head's
// keys, block by block transposed [lpad / KB, D, KB].
template <int D>
void attend_tile(const Args& a, const float* kt, int64_t hq, int64_t i0, int64_t nt) {
    const float* vbase = a.v + hq / (a.h / a.kvh) * a.kv_head_stride;
    alignas(64) float qs[QT][D];
    alignas(64) float o[QT][D];
    alignas(64) float s[NQ][KB];
    float m[QT], l[QT];
    for (int64_t r = 0; r < QT; ++r) {  // rows past nt repeat the last query (never stored)
        const float* src = a.q + ((i0 + std::min(r, nt - 1)) * a.h + hq) * D;
        for (int x = 0; x < D; ++x) qs[r][x] = src[x] * a.scale;
        std::fill(o[r], o[r] + D, 0.0f);
        m[r] = kNoScore;
        l[r] = 0.0f;
    }
    const int64_t end = a.prefix + i0 + nt;  // one past the last query's last key
    for (int64_t j0 = 0; j0 < end; j0 += KB) {
        const int64_t nk = std::min<int64_t>(KB, end - j0);
        const float* block = kt + j0 * D;
        // Queries before r_first see none of this block's keys.
        const int64_t r_first = std::max<int64_t>(0, j0 - a.prefix - i0) / NQ * NQ;
        for (int64_t r0 = r_first; r0 < nt; r0 += NQ) {
            for (int c0 = 0; c0 < KB; c0 += BK) {
                vec acc[NQ][2];
                for (int r = 0; r < NQ; ++r) acc[r][0] = acc[r][1] = vec{};
                for (int x = 0; x < D; ++x) {
                    const vec k0 = load(block + x * KB + c0), k1 = load(block + x * KB + c0 + W);
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
            // The softmax update of each query; a query that sees none of the block (or a row
            // past the tile) gets zero weights, so the value loop below runs them all alike.
            float correction[NQ];
            int64_t seen = 0;  // keys the sub-block's queries see, at most
            for (int r = 0; r < NQ; ++r) {
                const int64_t qr = r0 + r;
                const int64_t visible =
                    qr < nt ? std::clamp<int64_t>(a.prefix + i0 + qr + 1 - j0, 0, nk) : 0;
                float* p = s[r];
                if (visible == 0) {
                    std::fill(p, p + KB, 0.0f);
                    correction[r] = 1.0f;
                    continue;
                }
                seen = std::max(seen, visible);
                for (int64_t j = visible; j < KB; ++j) p[j] = kNoScore;
                float top = m[qr];
#pragma omp simd reduction(max : top)
                for (int j = 0; j < KB; ++j) top = std::max(top, p[j]);
                correction[r] = radixlm::exp_nonpositive(m[qr] - top);
                float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
                for (int j = 0; j < KB; ++j) {
                    p[j] = radixlm::exp_nonpositive(p[j] - top);
                    sum += p[j];
                }
                m[qr] = top;
                l[qr] = l[qr] * correction[r] + sum;
            }
            // o = o * correction + p . V, two vectors of the head at a time for all NQ queries:
            // each value vector loaded once for them.
            const float* vblock = vbase + j0 * D;
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
        float* dst = a.out + ((i0 + r) * a.h + hq) * D;
        for (int x = 0; x < D; ++x) dst[x] = o[r][x] * inv;
    }
}

template <int D>
void run(const Args& a, int num_threads) {
    const int64_t len = a.prefix + a.t;
    const int64_t blocks = (len + KB - 1) / KB, lpad = blocks * KB;
    std::vector<float> kt(size_t(a.kvh * D * lpad), 0.0f);
    const int64_t tiles = (a.t + QT - 1) / QT;
#pragma omp parallel num_threads(num_threads)
    {
#pragma omp for schedule(static)
        for (int64_t gb = 0; gb < a.kvh * blocks; ++gb) {
            const int64_t g = gb / blocks, j0 = gb % blocks * KB;
            const float* src = a.k + g * a.kv_head_stride + j0 * D;
            float* dst = kt.data() + (g * lpad + j0) * D;
            for (int64_t j = 0; j < std::min(KB, len - j0); ++j)
                for (int x = 0; x < D; ++x) dst[x * KB + j] = src[j * D + x];
        }
        // The last tiles (the most keys) first, so that the short ones fill in at the end.
#pragma omp for schedule(dynamic, 1)
        for (int64_t task = 0; task < a.h * tiles; ++task) {
            const int64_t i0 = (tiles - 1 - task / a.h) * QT, hq = task % a.h;
            const float* kt_head = kt.data() + hq / (a.h / a.kvh) * lpad * D;
            attend_tile<D>(a, kt_head, hq, i0, std::min(QT, a.t - i0));
        }
    }
}

}  // namespace extend_attention

extern "C" {

// Causal attention of q [t, h, d] (positions prefix .. prefix + t - 1) over the keys and values
// 0 .. prefix + t - 1 of each KV head (head g's rows of d at k / v + g * kv_head_stride), into
// out [t, h, d]. Returns 0, or 1 (nothing done) for a head size other than 64 and 128.
int radixlm_extend_attention_f32(const float* q, const float* k, const float* v,
                                 int64_t kv_head_stride, int64_t t, int64_t prefix, int64_t h,
                                 int64_t kvh, int64_t d, float scale, float* out,
                                 int num_threads) {
    const extend_attention::Args a{q, k, v, kv_head_stride, t, prefix, h, kvh, scale, out};
    if (d == 64) {
        extend_attention::run<64>(a, num_threads);
        return 0;
    }
    if (d == 128) {
        extend_attention::run<128>(a, num_threads);
        return 0;
    }
    return 1;
}

}  // extern "C"
