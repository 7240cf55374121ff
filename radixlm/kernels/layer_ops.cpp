// Elementwise layer ops for the CPU, each one pass over memory where torch makes several:
// RMSNorm (torch: square, mean, add, rsqrt, two multiplies) and SwiGLU's silu(gate) * up.
// float32 only; called through ctypes by radixlm/kernels/cpu.py.
#include <cmath>
#include <cstdint>

#include "cpu_math.h"

namespace {

using radixlm::exp_nonpositive;

// Rows per thread below which a parallel region costs more than it saves.
constexpr int64_t kMinElementsPerThread = 16384;

int threads_for(int64_t elements, int num_threads) {
    const int64_t useful = elements / kMinElementsPerThread;
    return useful < 1 ? 1 : (useful < num_threads ? int(useful) : num_threads);
}

}  // namespace

extern "C" {

// out[r] = weight * (x[r] / sqrt(mean(x[r]^2) + eps)) for rows r of x (row stride x_stride);
// out is [rows, dim] contiguous.
void radixlm_rms_norm_f32(const float* x, int64_t x_stride, const float* weight, float eps,
                          float* out, int64_t rows, int64_t dim, int num_threads) {
#pragma omp parallel for num_threads(threads_for(rows * dim, num_threads)) schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
        const float* __restrict xr = x + r * x_stride;
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
