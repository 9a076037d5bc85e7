/* Attention over tiles of sixteen float32 keys with AVX-512 FMA, the float32 twin of bf16_tile.h
 * (chunk_attention.c's float32 prefill chunks).
 *
 * A tile of sixteen keys of one KV head is laid out once (f32_tile_lay_out): the keys transposed
 * to one 16-lane vector per dim (lane j: key j), then the values as they are, one row of dim
 * floats per key. A row (a query head) gets its 16 scores against a tile by D multiply-adds of
 * a tile vector by its query's dim, broadcast: no cross-lane sums. Its running softmax is
 * updated once per span of four tiles (tile_common.h), and its output takes each key's weight,
 * broadcast, times that key's values. Every product and sum is float32, as in the reference.
 */
#ifndef TREEBATCH_F32_TILE_H
#define TREEBATCH_F32_TILE_H

#include <stdint.h>
#include <string.h>

#include "tile_common.h"

#if defined(TILES_512)
#define F32_TILES 1

/* A tile is 32 * dim floats: the keys, [dim][key], then the values, [key][dim]: as many bytes
 * as the sixteen keys' K and V themselves. */
#define F32_TILE_FLOATS(dim) (32 * (dim))

/* Keys [first, first + count) of KV head `head` into `tile` (missing keys as zeros). */
static inline void f32_tile_lay_out(float *restrict tile, const float *k, const float *v, const int64_t *table,
                                    int64_t block_size, int64_t kv_heads, int64_t head, int64_t dim, int64_t first,
                                    int64_t count) {
    const void *key_rows[TILE_KEYS], *value_rows[TILE_KEYS];
    tile_rows(k, v, sizeof(float), table, block_size, kv_heads, head, dim, first, count, key_rows, value_rows);
    for (int64_t c = 0; c < dim / 16; ++c) { /* dims [16c, 16c + 16) of every key */
        __m512i rows[TILE_KEYS];
        for (int64_t j = 0; j < TILE_KEYS; ++j)
            rows[j] = j < count ? _mm512_loadu_si512((const float *)key_rows[j] + 16 * c) : _mm512_setzero_si512();
        transpose16(rows);
        for (int64_t i = 0; i < 16; ++i) _mm512_storeu_si512(tile + (16 * c + i) * TILE_KEYS, rows[i]);
    }
    float *values = tile + TILE_KEYS * dim;
    for (int64_t j = 0; j < TILE_KEYS; ++j) {
        if (j < count)
            memcpy(values + j * dim, value_rows[j], sizeof(float) * dim);
        else
            memset(values + j * dim, 0, sizeof(float) * dim);
    }
}

/* The weighted values of TILE_ROWS rows for dims [d0, d0 + 16 * CHUNKS) (CHUNKS a constant, so
 * the rows x chunks sums stay in registers): each row's output rescaled by keep[r], then each
 * tile's first used[t] keys' weights, broadcast, times their values. */
static inline __attribute__((always_inline)) void f32_span_values(const float *restrict span, const int tiles,
                                                                  int64_t dim, int64_t d0, const int CHUNKS,
                                                                  const int64_t used[SPAN_TILES],
                                                                  const float weights[TILE_ROWS][SPAN_KEYS],
                                                                  const __m512 keep[TILE_ROWS], float *acc[TILE_ROWS]) {
    __m512 a[TILE_ROWS][4];
    for (int r = 0; r < TILE_ROWS; ++r)
        for (int c = 0; c < CHUNKS; ++c) a[r][c] = _mm512_mul_ps(_mm512_loadu_ps(acc[r] + d0 + 16 * c), keep[r]);
    for (int t = 0; t < tiles; ++t)
        for (int64_t j = 0; j < used[t]; ++j) {
            const float *restrict row = span + t * F32_TILE_FLOATS(dim) + TILE_KEYS * dim + j * dim + d0;
            __m512 values[4];
            for (int c = 0; c < CHUNKS; ++c) values[c] = _mm512_loadu_ps(row + 16 * c);
            for (int r = 0; r < TILE_ROWS; ++r) {
                const __m512 w = _mm512_set1_ps(weights[r][t * TILE_KEYS + j]);
                for (int c = 0; c < CHUNKS; ++c) a[r][c] = _mm512_fmadd_ps(w, values[c], a[r][c]);
            }
        }
    for (int r = 0; r < TILE_ROWS; ++r)
        for (int c = 0; c < CHUNKS; ++c) _mm512_storeu_ps(acc[r] + d0 + 16 * c, a[r][c]);
}

/* TILE_ROWS rows (query heads) take the first `tiles` tiles of a span (tile t at span + t *
 * F32_TILE_FLOATS(dim)) into their running softmax: row r its first visible[r] keys of it. */
static inline __attribute__((always_inline)) void f32_span_attend(const float *restrict span, const int tiles,
                                                                  const float *query[TILE_ROWS], int64_t dim,
                                                                  const int64_t visible[TILE_ROWS], float scale,
                                                                  float *max[TILE_ROWS], float *sum[TILE_ROWS],
                                                                  float *acc[TILE_ROWS]) {
    const int64_t floats = F32_TILE_FLOATS(dim);
    __m512 s[TILE_ROWS][SPAN_TILES];
    for (int r = 0; r < TILE_ROWS; ++r)
        for (int t = 0; t < tiles; ++t) s[r][t] = _mm512_setzero_ps();
    for (int64_t d = 0; d < dim; ++d) {
        __m512 keys[SPAN_TILES];
        for (int t = 0; t < tiles; ++t) keys[t] = _mm512_loadu_ps(span + t * floats + d * TILE_KEYS);
        for (int r = 0; r < TILE_ROWS; ++r) {
            const __m512 q = _mm512_set1_ps(query[r][d]);
            for (int t = 0; t < tiles; ++t) s[r][t] = _mm512_fmadd_ps(q, keys[t], s[r][t]);
        }
    }
    __m512 keep[TILE_ROWS], w[TILE_ROWS][SPAN_TILES];
    int64_t used[SPAN_TILES];
    span_softmax(s, tiles, visible, scale, max, sum, keep, w, used);
    float weights[TILE_ROWS][SPAN_KEYS] __attribute__((aligned(64)));
    for (int r = 0; r < TILE_ROWS; ++r)
        for (int t = 0; t < tiles; ++t) _mm512_store_ps(weights[r] + t * TILE_KEYS, w[r][t]);
    /* The weighted values, 64 dims of the four rows at a time (sixteen chains); dim is a
     * multiple of 32. */
    for (int64_t d0 = 0; d0 < dim; d0 += 64) {
        if (dim - d0 >= 64)
            f32_span_values(span, tiles, dim, d0, 4, used, weights, keep, acc);
        else
            f32_span_values(span, tiles, dim, d0, 2, used, weights, keep, acc);
    }
}

#endif
#endif
