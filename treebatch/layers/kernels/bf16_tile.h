/* Attention over tiles of sixteen bfloat16 keys with AVX512-BF16 dot products (VDPBF16PS, which
 * adds the products of bfloat16 pairs into float32 lanes), shared by chunk_attention.c (prefill
 * chunks) and paged_decode.c (a prefix group's decodes over the prefix).
 *
 * Each tile of sixteen keys of one KV head is laid out once (tile_lay_out): the keys transposed
 * to one 16-lane vector per pair of dims (lane j: key j), the values interleaved by pairs of keys
 * (lane d: dims d of keys 2u and 2u + 1). Then every row (a query head) that reads the tile
 * (tile_attend_rows): its sixteen scores are D / 2 dot-product instructions with its query's
 * pairs broadcast, its running softmax (max, sum, rescaled output) is updated on sixteen lanes,
 * and the weights, rounded to bfloat16 as torch's CPU flash attention rounds them, multiply the
 * values by pairs into its float32 output. Products of bfloat16 values are exact in float32 and
 * every sum is float32. Rows go four at a time so the dot products form independent chains.
 */
#ifndef TREEBATCH_BF16_TILE_H
#define TREEBATCH_BF16_TILE_H

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "fast_exp.h"

#if defined(__AVX512BF16__) && defined(__AVX512VL__)
#define BF16_TILES 1
#include <immintrin.h>

#define TILE_KEYS 16
#define TILE_MAX_DIM 256

/* A tile is 16 * dim uint32 (64-byte aligned where it is a scratch buffer): the keys, [pair of
 * dims][key] (two bfloat16 per entry), then the values, [pair of keys][dim]: as many bytes as the
 * sixteen keys' K and V themselves, so a prefix kept in tiles costs what its K and V do. */
#define TILE_WORDS(dim) (16 * (dim))
static inline uint32_t *tile_keys(uint32_t *tile, int64_t p) { return tile + p * TILE_KEYS; }
static inline uint32_t *tile_values(uint32_t *tile, int64_t dim, int64_t u) { return tile + 8 * dim + u * dim; }

/* Keys [first, first + count) of KV head `head` into `tile` (missing keys as zeros). */
static inline void tile_lay_out(uint32_t *restrict tile, const uint16_t *k, const uint16_t *v, const int64_t *table,
                           int64_t block_size, int64_t kv_heads, int64_t head, int64_t dim, int64_t first,
                           int64_t count) {
    const uint16_t *key_rows[TILE_KEYS], *value_rows[TILE_KEYS];
    for (int64_t j = 0; j < count; ++j) {
        const int64_t t = first + j;
        const int64_t slot = table[t / block_size] * block_size + t % block_size;
        key_rows[j] = k + (slot * kv_heads + head) * dim;
        value_rows[j] = v + (slot * kv_heads + head) * dim;
    }
    for (int64_t p = 0; p < dim / 2; ++p) {
        for (int64_t j = 0; j < count; ++j) {
            uint32_t pair;
            memcpy(&pair, key_rows[j] + 2 * p, sizeof pair);
            tile_keys(tile, p)[j] = pair;
        }
        for (int64_t j = count; j < TILE_KEYS; ++j) tile_keys(tile, p)[j] = 0;
    }
    for (int64_t u = 0; u < TILE_KEYS / 2; ++u) {
        const int64_t a = 2 * u, b = 2 * u + 1;
        uint32_t *restrict row = tile_values(tile, dim, u);
        if (b < count) {
            const uint16_t *restrict va = value_rows[a], *restrict vb = value_rows[b];
#pragma omp simd
            for (int64_t d = 0; d < dim; ++d) row[d] = (uint32_t)va[d] | ((uint32_t)vb[d] << 16);
        } else if (a < count) {
            const uint16_t *restrict va = value_rows[a];
#pragma omp simd
            for (int64_t d = 0; d < dim; ++d) row[d] = va[d];
        } else {
            memset(row, 0, sizeof(uint32_t) * dim);
        }
    }
}

/* ROWS rows (query heads) take a tile's keys into their running softmax: row r its first
 * visible[r]. The rows go side by side so that the dot products form independent chains (one
 * row's 32 products in a row wait on each one's latency: measured 1.3x torch's kernel, against
 * TILE_ROWS = 4). */
#define TILE_ROWS 4
static inline __attribute__((always_inline)) void tile_attend(const uint32_t *restrict tile, const uint32_t *query[TILE_ROWS],
                                                              int64_t dim, const int64_t visible[TILE_ROWS], float scale,
                                                              float *max[TILE_ROWS], float *sum[TILE_ROWS], float *acc[TILE_ROWS]) {
    __m512 even[TILE_ROWS], odd[TILE_ROWS];
    for (int r = 0; r < TILE_ROWS; ++r) even[r] = odd[r] = _mm512_setzero_ps();
    for (int64_t p = 0; p < dim / 2; p += 2) {
        const __m512bh k0 = (__m512bh)_mm512_loadu_si512(tile + p * TILE_KEYS);
        const __m512bh k1 = (__m512bh)_mm512_loadu_si512(tile + (p + 1) * TILE_KEYS);
        for (int r = 0; r < TILE_ROWS; ++r) {
            even[r] = _mm512_dpbf16_ps(even[r], (__m512bh)_mm512_set1_epi32((int)query[r][p]), k0);
            odd[r] = _mm512_dpbf16_ps(odd[r], (__m512bh)_mm512_set1_epi32((int)query[r][p + 1]), k1);
        }
    }
    /* The weights of each row by pairs of keys, rounded to bfloat16: lane u of pairs[r] holds
     * keys 2u and 2u + 1. */
    uint32_t pairs[TILE_ROWS][TILE_KEYS / 2];
    __m512 keep[TILE_ROWS];
    int64_t used = 0;
    for (int r = 0; r < TILE_ROWS; ++r) {
        const __mmask16 seen = visible[r] >= TILE_KEYS ? (__mmask16)0xffff : (__mmask16)((1u << visible[r]) - 1);
        const __m512 scores = _mm512_mul_ps(_mm512_add_ps(even[r], odd[r]), _mm512_set1_ps(scale));
        const float tile_max = _mm512_reduce_max_ps(_mm512_mask_blend_ps(seen, _mm512_set1_ps(EMPTY_MAX), scores));
        const float new_max = tile_max > *max[r] ? tile_max : *max[r];
        const __m512 weights = _mm512_maskz_mov_ps(seen, exp16(_mm512_sub_ps(scores, _mm512_set1_ps(new_max))));
        const float correction = *max[r] == EMPTY_MAX ? 0.0f : expf(*max[r] - new_max);
        *sum[r] = *sum[r] * correction + _mm512_reduce_add_ps(weights);
        *max[r] = new_max;
        keep[r] = _mm512_set1_ps(correction);
        _mm256_storeu_si256((__m256i *)pairs[r], (__m256i)_mm512_cvtneps_pbh(weights));
        const int64_t pairs_used = (visible[r] + 1) / 2;
        used = pairs_used > used ? pairs_used : used; /* a row's unseen keys weigh exactly 0 */
    }
    for (int64_t d = 0; d < dim; d += 16) {
        __m512 a[TILE_ROWS];
        for (int r = 0; r < TILE_ROWS; ++r) a[r] = _mm512_mul_ps(_mm512_loadu_ps(acc[r] + d), keep[r]);
        for (int64_t u = 0; u < used; ++u) {
            const __m512bh values = (__m512bh)_mm512_loadu_si512(tile + 8 * dim + u * dim + d);
            for (int r = 0; r < TILE_ROWS; ++r)
                a[r] = _mm512_dpbf16_ps(a[r], (__m512bh)_mm512_set1_epi32((int)pairs[r][u]), values);
        }
        for (int r = 0; r < TILE_ROWS; ++r) _mm512_storeu_ps(acc[r] + d, a[r]);
    }
}

/* Rows [0, rows) take the tile's keys: row r with its query's pairs queries[r], its first
 * visible[r] keys of the tile (0: none), its running max, sum and output maxes[r], sums[r],
 * acc[r * dim ...]. */
static inline void tile_attend_rows(const uint32_t *restrict tile, int64_t rows, const uint32_t *const *queries,
                                    const int64_t *visible, int64_t dim, float scale, float *maxes, float *sums,
                                    float *acc) {
    /* A place-holder row where the last four are short or one sees no key: zero queries, no
     * visible key, its results thrown away. */
    static __thread uint32_t spare_query[TILE_MAX_DIM / 2];
    static __thread float spare_acc[TILE_MAX_DIM] __attribute__((aligned(64)));
    float spare_max[TILE_ROWS], spare_sum[TILE_ROWS];
    for (int64_t r0 = 0; r0 < rows; r0 += TILE_ROWS) {
        const uint32_t *query[TILE_ROWS];
        int64_t seen[TILE_ROWS];
        float *max[TILE_ROWS], *sum[TILE_ROWS], *out[TILE_ROWS];
        int any = 0;
        for (int j = 0; j < TILE_ROWS; ++j) {
            const int64_t r = r0 + j;
            if (r < rows && visible[r] > 0) {
                query[j] = queries[r], seen[j] = visible[r];
                max[j] = maxes + r, sum[j] = sums + r, out[j] = acc + r * dim;
                any = 1;
            } else {
                spare_max[j] = EMPTY_MAX, spare_sum[j] = 0.0f;
                query[j] = spare_query, seen[j] = 0;
                max[j] = spare_max + j, sum[j] = spare_sum + j, out[j] = spare_acc;
            }
        }
        if (any) tile_attend(tile, query, dim, seen, scale, max, sum, out);
    }
}

/* Keys [0, length) of a block table, every KV head, into tiles [kv_heads][ceil(length / 16)]
 * of TILE_WORDS(dim) each: a group's prefix, laid out once and kept while the group lives. */
static inline void tile_lay_out_all(uint32_t *tiles, const uint16_t *k, const uint16_t *v, const int64_t *table,
                                    int64_t block_size, int64_t length, int64_t kv_heads, int64_t dim, int threads) {
    const int64_t count = (length + TILE_KEYS - 1) / TILE_KEYS;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t item = 0; item < kv_heads * count; ++item) {
        const int64_t head = item / count, t = item % count;
        const int64_t keys = length - t * TILE_KEYS < TILE_KEYS ? length - t * TILE_KEYS : TILE_KEYS;
        tile_lay_out(tiles + item * TILE_WORDS(dim), k, v, table, block_size, kv_heads, head, dim, t * TILE_KEYS, keys);
    }
}

#endif
#endif
