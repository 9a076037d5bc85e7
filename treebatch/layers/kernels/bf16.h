/* float32 <-> bfloat16, shared by the kernels: rounding one way, a 16-bit shift (exact) the other. */
#ifndef TREEBATCH_BF16_H
#define TREEBATCH_BF16_H

#include <stdint.h>
#include <string.h>

/* Round to nearest even, as torch rounds; a NaN stays a NaN. Branch-free (the NaN case is a
 * select), so a loop over it vectorizes: with the branch, every bfloat16 store of the kernels
 * ran one value at a time. */
static inline uint16_t bf16_round(float value) {
    uint32_t bits;
    memcpy(&bits, &value, sizeof bits);
    const uint32_t rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
    const uint32_t quiet = (bits >> 16) | 0x40u;
    return (uint16_t)((bits & 0x7fffffffu) > 0x7f800000u ? quiet : rounded);
}

/* A bfloat16 is the upper half of a float32: widening is exact. */
static inline float bf16_widen(uint16_t value) {
    const uint32_t bits = (uint32_t)value << 16;
    float out;
    memcpy(&out, &bits, sizeof out);
    return out;
}

#if defined(__AVX2__)
#include <immintrin.h>

/* bf16_round on eight lanes -> eight bfloat16 values. */
static inline __m128i bf16_round8(__m256 value) {
    const __m256i bits = _mm256_castps_si256(value);
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    const __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(bits, _mm256_set1_epi32(0x7fff)), odd), 16);
    const __m256i quiet = _mm256_or_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(0x40));
    const __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(bits, _mm256_set1_epi32(0x7fffffff)), _mm256_set1_epi32(0x7f800000));
    const __m256i both = _mm256_blendv_epi8(rounded, quiet, nan);
    /* Each 32-bit lane holds 16 bits: pack within the 128-bit halves, then join the halves. */
    return _mm256_castsi256_si128(_mm256_permute4x64_epi64(_mm256_packus_epi32(both, both), 0x08));
}
#endif

#if defined(__AVX512F__)
/* bf16_round on sixteen lanes -> sixteen bfloat16 values; with AVX512-BF16 by its one conversion
 * instruction, which rounds alike but flushes float32 denormals (below 1.2e-38) to zero. */
static inline __m256i bf16_round16(__m512 value) {
#if defined(__AVX512BF16__)
    return (__m256i)_mm512_cvtneps_pbh(value);
#else
    const __m512i bits = _mm512_castps_si512(value);
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    const __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(bits, _mm512_set1_epi32(0x7fff)), odd), 16);
    const __m512i quiet = _mm512_or_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(0x40));
    const __mmask16 nan = _mm512_cmpgt_epi32_mask(_mm512_and_si512(bits, _mm512_set1_epi32(0x7fffffff)),
                                                  _mm512_set1_epi32(0x7f800000));
    return _mm512_cvtepi32_epi16(_mm512_mask_blend_epi32(nan, rounded, quiet));
#endif
}
#endif

#endif
