/* A vectorizable e^x, shared by the kernels. */
#ifndef TREEBATCH_FAST_EXP_H
#define TREEBATCH_FAST_EXP_H

#include <stdint.h>

/* e^x for x in [-87, 88]: x = n ln2 + r with |r| <= ln2 / 2, e^r by its degree-6 Taylor
 * polynomial (relative error under 2e-7), times 2^n built in the exponent bits. */
static inline float exp_in_range(float x) {
    /* Round to the nearest integer by the float-adding trick (|x log2 e| < 2^22 here): plain
     * arithmetic, so the loop around it vectorizes; a libm rounding call would not. */
    const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
    const float r = x - n * 0.693145751953125f - n * 1.42860682030941723e-6f;
    float p = 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    union { int32_t i; float f; } scale = {.i = ((int32_t)n + 127) << 23};
    return p * scale.f;
}

/* e^x for x <= 0 (scores minus their running max). Below -87 the result is 0, as float e^x
 * underflows there anyway. */
static inline float exp_nonpositive(float x) {
    x = x < -87.0f ? -87.0f : x;
    const float e = exp_in_range(x);
    return x <= -87.0f ? 0.0f : e;
}

/* e^x for any float x, clamped to [-87, 88] first. */
static inline float exp_any(float x) {
    return exp_in_range(x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x));
}

/* A running softmax max before any key: finite, so no inf - inf (the decode and tile kernels
 * share running states, so they share this). */
#define EMPTY_MAX (-3.0e38f)

/* exp_any on a vector of lanes, for the vector type V (prefix P: _mm256 or _mm512) -- a compiler
 * keeps the scalar form's clamps as branches, so loops over it stay scalar. */
#define VECTOR_EXP(NAME, V, VI, P, ROUND, CAST_TO_FLOAT)                                          \
    static inline V NAME(V x) {                                                                   \
        x = P##_min_ps(P##_max_ps(x, P##_set1_ps(-87.0f)), P##_set1_ps(88.0f));                   \
        const V n = ROUND(P##_mul_ps(x, P##_set1_ps(1.44269504088896341f)),                       \
                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);                         \
        V r = P##_fnmadd_ps(n, P##_set1_ps(0.693145751953125f), x);                               \
        r = P##_fnmadd_ps(n, P##_set1_ps(1.42860682030941723e-6f), r);                            \
        V p = P##_set1_ps(1.0f / 720.0f);                                                         \
        p = P##_fmadd_ps(p, r, P##_set1_ps(1.0f / 120.0f));                                       \
        p = P##_fmadd_ps(p, r, P##_set1_ps(1.0f / 24.0f));                                        \
        p = P##_fmadd_ps(p, r, P##_set1_ps(1.0f / 6.0f));                                         \
        p = P##_fmadd_ps(p, r, P##_set1_ps(0.5f));                                                \
        p = P##_fmadd_ps(p, r, P##_set1_ps(1.0f));                                                \
        p = P##_fmadd_ps(p, r, P##_set1_ps(1.0f));                                                \
        const VI scale = P##_slli_epi32(P##_add_epi32(P##_cvtps_epi32(n), P##_set1_epi32(127)), 23); \
        return P##_mul_ps(p, CAST_TO_FLOAT(scale));                                               \
    }

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

VECTOR_EXP(exp8, __m256, __m256i, _mm256, _mm256_round_ps, _mm256_castsi256_ps)

/* exp_nonpositive on eight lanes: 0 at and below -87. */
static inline __m256 exp8_nonpositive(__m256 x) {
    const __m256 e = exp8(x);
    return _mm256_and_ps(e, _mm256_cmp_ps(x, _mm256_set1_ps(-87.0f), _CMP_GT_OQ));
}
#endif

#if defined(__AVX512F__)
#include <immintrin.h>

VECTOR_EXP(exp16, __m512, __m512i, _mm512, _mm512_roundscale_ps, _mm512_castsi512_ps)
#endif

#endif
