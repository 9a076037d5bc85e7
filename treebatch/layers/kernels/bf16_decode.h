/* A few single-query rows over bfloat16 keys in paged blocks, everything in registers
 * (AVX512-BF16, head size 64, blocks of 16): the decode kernels' inner loop for a KV head's
 * group of query heads (up to four rows: Llama's 32 over 8, SmolLM's 9 over 3).
 *
 * Per block of 16 keys, each row's 16 scores come from two bf16 dot-product instructions per
 * key (the query's pairs against the key's, read where they lie) and one transposing sum of the
 * 16 partial vectors (sum16x16). The block's softmax step runs on those 16 lanes, and the values
 * go into the rows' 64 float32 outputs by bf16 dot products on pairs of keys (each dim of two
 * keys side by side, times the two keys' weights rounded to bf16, as bf16_tile.h and torch's CPU
 * flash attention round them; the sums stay float32). The rows' running max, sum and
 * outputs stay where the decode kernels' other paths keep them (paged_decode.c's Running), so
 * the paths mix freely: a group's prefix in tiles, then a member's own blocks here.
 */
#ifndef TREEBATCH_BF16_DECODE_H
#define TREEBATCH_BF16_DECODE_H

#include <stdint.h>
#include <string.h>

#include "fast_exp.h"

#if defined(__AVX512F__) && defined(__AVX512BF16__) && defined(__AVX512VL__)
#include <immintrin.h>

#define REG_DECODE 1
#define REG_ROWS 4
#define ARANGE16 _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15)

/* Lane j of the result: the total of parts[j]'s 16 lanes. Two rounds of in-lane shuffles (each
 * 128-bit lane ends up with four keys' partial sums), then two of 128-bit lane shuffles: 45
 * shuffles and adds, of which only 9 cross lanes. */
static inline __attribute__((always_inline)) __m512 sum16x16(const __m512 parts[16]) {
    __m512 pairs[8], quads[4], halves[2];
    for (int i = 0; i < 8; ++i) /* lanes: [a0+a2, b0+b2, a1+a3, b1+b3] per 128 bits */
        pairs[i] = _mm512_add_ps(_mm512_unpacklo_ps(parts[2 * i], parts[2 * i + 1]),
                                 _mm512_unpackhi_ps(parts[2 * i], parts[2 * i + 1]));
    for (int i = 0; i < 4; ++i) /* lanes: keys 4i .. 4i + 3, each 128 bits its own quarter of dims */
        quads[i] = _mm512_add_ps(_mm512_shuffle_ps(pairs[2 * i], pairs[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                                 _mm512_shuffle_ps(pairs[2 * i], pairs[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
    for (int i = 0; i < 2; ++i)
        halves[i] = _mm512_add_ps(_mm512_shuffle_f32x4(quads[2 * i], quads[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                                  _mm512_shuffle_f32x4(quads[2 * i], quads[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
    return _mm512_add_ps(_mm512_shuffle_f32x4(halves[0], halves[1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(halves[0], halves[1], _MM_SHUFFLE(3, 1, 3, 1)));
}

/* 32 bfloat16 values as the dot-product instruction's operand. A cast of an integer vector load
 * made the compiler bounce each load through the stack. */
static inline __m512bh load_bf16x32(const uint16_t *from) {
    __m512bh x;
    memcpy(&x, from, sizeof x);
    return x;
}

/* Lane j: the dot product of a query's 64 bfloat16 values with key j of a block (keys `stride`
 * elements apart), by two bf16 dot-product instructions per key; keys from n on re-read key 0
 * (their lanes are for the caller to mask). `n` is 16 at the call that matters, a constant. */
static inline __attribute__((always_inline)) __m512 block_dots(const uint16_t *query, const uint16_t *keys,
                                                               int64_t stride, int64_t n) {
    const __m512bh q0 = load_bf16x32(query), q1 = load_bf16x32(query + 32);
    __m512 parts[16];
    for (int64_t j = 0; j < 16; ++j) {
        const uint16_t *key = keys + (j < n ? j : 0) * stride;
        parts[j] = _mm512_dpbf16_ps(_mm512_dpbf16_ps(_mm512_setzero_ps(), q0, load_bf16x32(key)), q1,
                                    load_bf16x32(key + 32));
    }
    return sum16x16(parts);
}

/* `rows` (a constant, 1 to REG_ROWS) query rows, queries[r] 64 bfloat16 values, take keys [0,
 * length) of KV head `head` of a block table (blocks of 16) into their running softmax: maxes[r],
 * sums[r] and acc[r * 64 ...] (float32). k, v: the bfloat16 cache [slots, kv_heads, 64].
 *
 * A block goes in three phases, each with only its own values in registers (all at once, the
 * compiler spilled them: the exponential alone keeps a dozen constants): every row's scores,
 * then every row's softmax step, then the values into every row's outputs, which are read from
 * and written back to acc (a row is 256 bytes, in L1) around that phase. */
static inline __attribute__((always_inline)) void reg_decode_blocks(
    const int rows, const uint16_t *const *queries, const uint16_t *k, const uint16_t *v, const int64_t *table,
    int64_t length, int64_t kv_heads, int64_t head, float scale, float *maxes, float *sums, float *acc) {
    const int64_t stride = kv_heads * 64; /* from one slot's row of this head to the next */
    float weights[REG_ROWS][16] __attribute__((aligned(64))); /* scores */
    uint32_t pairs[REG_ROWS][8] __attribute__((aligned(32)));  /* e^(score - max), bfloat16 pairs of keys */
    float corrections[REG_ROWS];
    /* Dims d of two keys side by side (the first's 16 bits low), dims [0, 16) and [16, 32) of 32. */
    const __m512i low16 = _mm512_add_epi32(_mm512_set1_epi32(0x200000),
                                           _mm512_mullo_epi32(_mm512_set1_epi32(0x10001), ARANGE16));
    const __m512i high16 = _mm512_add_epi16(low16, _mm512_set1_epi16(16));
    for (int64_t start = 0; start < length; start += 16) {
        const int64_t n = length - start < 16 ? length - start : 16;
        const __mmask16 live = (__mmask16)((1u << n) - 1u);
        const int64_t offset = (table[start / 16] * 16 * kv_heads + head) * 64;
        const uint16_t *keys = k + offset, *values = v + offset;
        for (int r = 0; r < rows; ++r)
            _mm512_store_ps(weights[r], _mm512_mul_ps(n == 16 ? block_dots(queries[r], keys, stride, 16)
                                                              : block_dots(queries[r], keys, stride, n),
                                                      _mm512_set1_ps(scale)));
        for (int r = 0; r < rows; ++r) {
            const __m512 scores = _mm512_mask_mov_ps(_mm512_set1_ps(EMPTY_MAX), live, _mm512_load_ps(weights[r]));
            const float top = _mm512_reduce_max_ps(scores), new_max = top > maxes[r] ? top : maxes[r];
            const __m512 shifted = _mm512_sub_ps(scores, _mm512_set1_ps(new_max));
            const __mmask16 kept = _mm512_mask_cmp_ps_mask(live, shifted, _mm512_set1_ps(-87.0f), _CMP_GT_OQ);
            const __m512 e = _mm512_maskz_mov_ps(kept, exp16(shifted));
            _mm256_store_si256((__m256i *)pairs[r], (__m256i)_mm512_cvtneps_pbh(e));
            corrections[r] = exp_nonpositive(maxes[r] - new_max);
            sums[r] = sums[r] * corrections[r] + _mm512_reduce_add_ps(e);
            maxes[r] = new_max;
        }
        __m512 out[REG_ROWS][4];
        for (int r = 0; r < rows; ++r)
            for (int i = 0; i < 4; ++i)
                out[r][i] = _mm512_mul_ps(_mm512_loadu_ps(acc + r * 64 + 16 * i), _mm512_set1_ps(corrections[r]));
        for (int64_t u = 0; u < (n + 1) / 2; ++u) { /* keys 2u and 2u + 1 (a last odd key with itself) */
            const uint16_t *a = values + 2 * u * stride, *b = 2 * u + 1 < n ? a + stride : a;
            __m512bh both[4]; /* dims [16i, 16i + 16) of the two keys, side by side */
            for (int c = 0; c < 2; ++c) {
                const __m512i va = _mm512_loadu_si512(a + 32 * c), vb = _mm512_loadu_si512(b + 32 * c);
                both[2 * c] = (__m512bh)_mm512_permutex2var_epi16(va, low16, vb);
                both[2 * c + 1] = (__m512bh)_mm512_permutex2var_epi16(va, high16, vb);
            }
            for (int r = 0; r < rows; ++r) {
                const __m512bh w = (__m512bh)_mm512_set1_epi32((int)pairs[r][u]);
                for (int i = 0; i < 4; ++i) out[r][i] = _mm512_dpbf16_ps(out[r][i], w, both[i]);
            }
        }
        for (int r = 0; r < rows; ++r)
            for (int i = 0; i < 4; ++i) _mm512_storeu_ps(acc + r * 64 + 16 * i, out[r][i]);
    }
}

/* reg_decode_blocks for one row count each, compiled apart: inlined together (or into their
 * callers), the compiler spilled the key vectors of the dot products to the stack. */
#define REG_DECODE_ROWS(R)                                                                                     \
    static __attribute__((noinline)) void reg_decode_##R(const uint16_t *const *queries, const uint16_t *k,    \
                                                         const uint16_t *v, const int64_t *table, int64_t length, \
                                                         int64_t kv_heads, int64_t head, float scale,          \
                                                         float *maxes, float *sums, float *acc) {              \
        reg_decode_blocks(R, queries, k, v, table, length, kv_heads, head, scale, maxes, sums, acc);           \
    }
REG_DECODE_ROWS(1)
REG_DECODE_ROWS(2)
REG_DECODE_ROWS(3)
REG_DECODE_ROWS(4)
#undef REG_DECODE_ROWS

/* reg_decode_blocks for a row count known only at run time (1 to REG_ROWS). */
static inline void reg_decode(int64_t rows, const uint16_t *const *queries, const uint16_t *k, const uint16_t *v,
                              const int64_t *table, int64_t length, int64_t kv_heads, int64_t head, float scale,
                              float *maxes, float *sums, float *acc) {
    void (*const by_rows[REG_ROWS])(const uint16_t *const *, const uint16_t *, const uint16_t *, const int64_t *,
                                    int64_t, int64_t, int64_t, float, float *, float *, float *) = {
        reg_decode_1, reg_decode_2, reg_decode_3, reg_decode_4};
    by_rows[rows - 1](queries, k, v, table, length, kv_heads, head, scale, maxes, sums, acc);
}
#endif

#endif
