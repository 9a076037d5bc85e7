/* Attention over tiles of sixteen bfloat16 keys with AVX512-BF16 dot products (VDPBF16PS, which
 * adds the products of bfloat16 pairs into float32 lanes), shared by chunk_attention.c (prefill
 * chunks) and paged_decode.c (a prefix group's decodes over the prefix).
 *
 * Each tile of sixteen keys of one KV head is laid out once (tile_lay_out): the keys transposed
 * to one 16-lane vector per pair of dims (lane j: key j), the values interleaved by pairs of keys
 * (lane d: dims d of keys 2u and 2u + 1). Tiles go four at a time (a span of 64 keys), and
 * every row (a query head) that reads a span (span_attend_rows) gets its scores by D / 2
 * dot-product instructions per tile with its query's pairs broadcast, updates its running
 * softmax (max, sum, rescaled output) once per span, and multiplies the values by its weights,
 * rounded to bfloat16 as torch's CPU flash attention rounds them, by pairs into its float32
 * output. Products of bfloat16 values are exact in float32 and every sum is float32. Rows go
 * four at a time, so the four rows x four tiles of products form sixteen independent chains.
 */
#ifndef TREEBATCH_BF16_TILE_H
#define TREEBATCH_BF16_TILE_H

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "tile_common.h"

#if defined(TILES_512) && defined(__AVX512BF16__) && defined(__AVX512VL__)
#define BF16_TILES 1

/* A tile is 16 * dim uint32 (64-byte aligned where it is a scratch buffer): the keys, [pair of
 * dims][key] (two bfloat16 per entry), then the values, [pair of keys][dim]: as many bytes as the
 * sixteen keys' K and V themselves, so a prefix kept in tiles costs what its K and V do. */
#define TILE_WORDS(dim) (16 * (dim))
static inline uint32_t *tile_keys(uint32_t *tile, int64_t p) { return tile + p * TILE_KEYS; }
static inline uint32_t *tile_values(uint32_t *tile, int64_t dim, int64_t u) { return tile + 8 * dim + u * dim; }

/* Keys [first, first + count) of KV head `head` into `tile` (missing keys as zeros): the keys by
 * sixteen-by-sixteen transposes of their pairs, the values by pairs of keys interleaved. */
static inline void tile_lay_out(uint32_t *restrict tile, const uint16_t *k, const uint16_t *v, const int64_t *table,
                           int64_t block_size, int64_t kv_heads, int64_t head, int64_t dim, int64_t first,
                           int64_t count) {
    const void *key_rows[TILE_KEYS], *value_rows[TILE_KEYS];
    tile_rows(k, v, sizeof(uint16_t), table, block_size, kv_heads, head, dim, first, count, key_rows, value_rows);
    for (int64_t c = 0; c < dim / 32; ++c) { /* pairs [16c, 16c + 16) of every key */
        __m512i rows[TILE_KEYS];
        for (int64_t j = 0; j < TILE_KEYS; ++j)
            rows[j] = j < count ? _mm512_loadu_si512((const uint16_t *)key_rows[j] + 32 * c) : _mm512_setzero_si512();
        transpose16(rows);
        for (int64_t i = 0; i < 16; ++i) _mm512_storeu_si512(tile_keys(tile, 16 * c + i), rows[i]);
    }
    /* Dims d of keys a and b side by side: a's 16 bits low, b's high. */
    const __m512i low16 = _mm512_setr_epi32(0x200000, 0x210001, 0x220002, 0x230003, 0x240004, 0x250005, 0x260006,
                                            0x270007, 0x280008, 0x290009, 0x2a000a, 0x2b000b, 0x2c000c, 0x2d000d,
                                            0x2e000e, 0x2f000f);
    const __m512i high16 = _mm512_add_epi16(low16, _mm512_set1_epi16(16));
    for (int64_t u = 0; u < TILE_KEYS / 2; ++u) {
        const int64_t a = 2 * u, b = 2 * u + 1;
        uint32_t *restrict row = tile_values(tile, dim, u);
        for (int64_t d = 0; d < dim; d += 32) {
            const __m512i va = a < count ? _mm512_loadu_si512((const uint16_t *)value_rows[a] + d) : _mm512_setzero_si512();
            const __m512i vb = b < count ? _mm512_loadu_si512((const uint16_t *)value_rows[b] + d) : _mm512_setzero_si512();
            _mm512_storeu_si512(row + d, _mm512_permutex2var_epi16(va, low16, vb));
            _mm512_storeu_si512(row + d + 16, _mm512_permutex2var_epi16(va, high16, vb));
        }
    }
}

/* The weighted values of TILE_ROWS rows for dims [d0, d0 + 16 * CHUNKS) (CHUNKS a constant, so
 * the rows x chunks sums stay in registers): each row's output rescaled by keep[r], then the
 * weights' pairs times the values' pairs of each tile's first used[t] pairs of keys. */
static inline __attribute__((always_inline)) void span_values(const uint32_t *restrict span, const int tiles,
                                                              int64_t dim, int64_t d0, const int CHUNKS,
                                                              const int64_t used[SPAN_TILES],
                                                              const uint32_t pairs[TILE_ROWS][SPAN_KEYS / 2],
                                                              const __m512 keep[TILE_ROWS], float *acc[TILE_ROWS]) {
    __m512 a[TILE_ROWS][4];
    for (int r = 0; r < TILE_ROWS; ++r)
        for (int c = 0; c < CHUNKS; ++c) a[r][c] = _mm512_mul_ps(_mm512_loadu_ps(acc[r] + d0 + 16 * c), keep[r]);
    for (int t = 0; t < tiles; ++t)
        for (int64_t u = 0; u < used[t]; ++u) {
            const uint32_t *restrict row = span + t * TILE_WORDS(dim) + 8 * dim + u * dim + d0;
            __m512bh values[4];
            for (int c = 0; c < CHUNKS; ++c) values[c] = (__m512bh)_mm512_loadu_si512(row + 16 * c);
            for (int r = 0; r < TILE_ROWS; ++r) {
                const __m512bh w = (__m512bh)_mm512_set1_epi32((int)pairs[r][t * TILE_KEYS / 2 + u]);
                for (int c = 0; c < CHUNKS; ++c) a[r][c] = _mm512_dpbf16_ps(a[r][c], w, values[c]);
            }
        }
    for (int r = 0; r < TILE_ROWS; ++r)
        for (int c = 0; c < CHUNKS; ++c) _mm512_storeu_ps(acc[r] + d0 + 16 * c, a[r][c]);
}

/* TILE_ROWS rows (query heads) take the first `tiles` tiles of a span (tile t at span + t *
 * TILE_WORDS(dim)) into their running softmax: row r its first visible[r] keys of the span. */
static inline __attribute__((always_inline)) void span_attend(const uint32_t *restrict span, const int tiles,
                                                              const uint32_t *query[TILE_ROWS], int64_t dim,
                                                              const int64_t visible[TILE_ROWS], float scale,
                                                              float *max[TILE_ROWS], float *sum[TILE_ROWS],
                                                              float *acc[TILE_ROWS]) {
    const int64_t words = TILE_WORDS(dim);
    __m512 s[TILE_ROWS][SPAN_TILES];
    for (int r = 0; r < TILE_ROWS; ++r)
        for (int t = 0; t < tiles; ++t) s[r][t] = _mm512_setzero_ps();
    for (int64_t p = 0; p < dim / 2; ++p) {
        __m512bh keys[SPAN_TILES];
        for (int t = 0; t < tiles; ++t) keys[t] = (__m512bh)_mm512_loadu_si512(span + t * words + p * TILE_KEYS);
        for (int r = 0; r < TILE_ROWS; ++r) {
            const __m512bh q = (__m512bh)_mm512_set1_epi32((int)query[r][p]);
            for (int t = 0; t < tiles; ++t) s[r][t] = _mm512_dpbf16_ps(s[r][t], q, keys[t]);
        }
    }
    /* Each row's weights by pairs of keys, rounded to bfloat16 as torch's CPU flash attention
     * rounds them: entry t * 8 + u holds keys 2u and 2u + 1 of tile t. */
    __m512 keep[TILE_ROWS], weights[TILE_ROWS][SPAN_TILES];
    int64_t used[SPAN_TILES]; /* keys of each tile any row weighs (unseen keys weigh 0), then pairs */
    span_softmax(s, tiles, visible, scale, max, sum, keep, weights, used);
    uint32_t pairs[TILE_ROWS][SPAN_KEYS / 2];
    for (int r = 0; r < TILE_ROWS; ++r)
        for (int t = 0; t < tiles; ++t)
            _mm256_storeu_si256((__m256i *)(pairs[r] + t * TILE_KEYS / 2), (__m256i)_mm512_cvtneps_pbh(weights[r][t]));
    for (int t = 0; t < tiles; ++t) used[t] = (used[t] + 1) / 2;
    /* The weighted values, 64 dims of the four rows at a time (sixteen chains); dim is a
     * multiple of 32. */
    for (int64_t d0 = 0; d0 < dim; d0 += 64) {
        if (dim - d0 >= 64)
            span_values(span, tiles, dim, d0, 4, used, pairs, keep, acc);
        else
            span_values(span, tiles, dim, d0, 2, used, pairs, keep, acc);
    }
}

#endif
#endif
