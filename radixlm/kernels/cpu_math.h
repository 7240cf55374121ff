// Math shared by the CPU kernels.
#pragma once

#include <cmath>
#include <cstdint>

namespace radixlm {

// e^y for |y| <= ln(2) / 2 (its series to y^7), on a float or each lane of a GCC vector.
template <typename T>
inline T exp_reduced(T y) {
    T p = T{} + 1.0f / 5040;
    p = p * y + 1.0f / 720;
    p = p * y + 1.0f / 120;
    p = p * y + 1.0f / 24;
    p = p * y + 1.0f / 6;
    p = p * y + 0.5f;
    p = p * y + 1.0f;
    return p * y + 1.0f;
}

// exp(x) for x <= 0 without libm, so loops over it vectorize; 0 below -87. Relative error
// ~1e-7 near 0.
inline float exp_nonpositive(float x) {
    const float c = x < -87.0f ? -87.0f : x;
    const float t = c * 1.44269504088896341f;
    const float n = std::floor(t + 0.5f);
    const float y = (t - n) * 0.693147180559945309f;  // |y| <= ln(2) / 2
    const float two_n = __builtin_bit_cast(float, (int32_t(n) + 127) << 23);
    return x < -87.0f ? 0.0f : exp_reduced(y) * two_n;
}

// exp_nonpositive on each lane of a GCC vector of floats (V: vector_size of 4 * lanes bytes), in
// vector instructions only: n rounds to nearest by the 1.5 * 2^23 trick (whose low mantissa
// bits then hold n), so no floor or conversion has to vectorize. Same error as the scalar one.
template <typename V>
inline V exp_nonpositive(V x) {
    typedef int32_t IV __attribute__((vector_size(sizeof(V))));
    const V lowest = V{} - 87.0f, magic = V{} + 12582912.0f;  // 1.5 * 2^23
    const V c = x < lowest ? lowest : x;
    const V shifted = c * 1.44269504088896341f + magic;
    const V n = shifted - magic;
    const V y = (c * 1.44269504088896341f - n) * 0.693147180559945309f;
    const IV bits = ((IV)shifted - 0x4B400000 + 127) << 23;  // a vector cast keeps the bits
    return x < lowest ? V{} : exp_reduced(y) * (V)bits;
}

// bfloat16 is the top half of a float32: widening is exact.
inline float to_float(float x) { return x; }
inline float to_float(uint16_t x) { return __builtin_bit_cast(float, uint32_t(x) << 16); }

// float32 to float32 or bfloat16; bfloat16 rounds to nearest even like torch (NaN: 0x7fc0).
inline void store(float x, float* out) { *out = x; }
inline void store(float x, uint16_t* out) {
    const uint32_t u = __builtin_bit_cast(uint32_t, x);
    const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    *out = uint16_t(x != x ? 0x7fc0u : rounded);
}

}  // namespace radixlm
