/* What the tile kernels share (bf16_tile.h, f32_tile.h, tile_attend.h): a tile is sixteen
 * consecutive keys of one KV head, laid out once so that the scores of a query against all
 * sixteen come out as one 16-lane vector (the keys transposed: one vector per dim, or pair of
 * dims, with lane j for key j); tiles go SPAN_TILES at a time (a span), rows TILE_ROWS at a time,
 * and each row keeps a running softmax (max, sum, output) that a span updates once.
 */
#ifndef TREEBATCH_TILE_COMMON_H
#define TREEBATCH_TILE_COMMON_H

#include <stdint.h>

#include "fast_exp.h"

#if defined(__AVX512F__)
#define TILES_512 1
#include <immintrin.h>

#define TILE_KEYS 16
#define TILE_MAX_DIM 256

/* A span: up to SPAN_TILES tiles side by side, taken into the running softmax in one step: one
 * max, one correction and one rescale of the outputs per 64 keys rather than per 16 (their
 * cross-lane reductions and exponentials cost as much as a tile's products did: measured in
 * BENCHMARKS.md), and 16 independent chains in the scores and in the weighted values (four rows
 * x four tiles), enough to keep both vector pipes busy. */
#define SPAN_TILES 4
#define SPAN_KEYS (SPAN_TILES * TILE_KEYS)
#define TILE_ROWS 4

static inline __mmask16 tile_mask(int64_t keys) {
    return keys >= TILE_KEYS ? (__mmask16)0xffff : keys <= 0 ? (__mmask16)0 : (__mmask16)((1u << keys) - 1);
}

/* r[j] lane i -> r[i] lane j: sixteen rows of sixteen 32-bit lanes transposed (two rounds of
 * unpacking within 128-bit lanes, two of shuffling whole lanes). */
static inline __attribute__((always_inline)) void transpose16(__m512i r[16]) {
    __m512i t[16], u[16];
    for (int i = 0; i < 8; ++i) {
        t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 4; ++i) {
        u[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
        u[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
        u[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
        u[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
    }
    for (int i = 0; i < 2; ++i)
        for (int j = 0; j < 4; ++j) {
            t[8 * i + j] = _mm512_shuffle_i32x4(u[8 * i + j], u[8 * i + j + 4], 0x88);
            t[8 * i + j + 4] = _mm512_shuffle_i32x4(u[8 * i + j], u[8 * i + j + 4], 0xdd);
        }
    for (int j = 0; j < 8; ++j) {
        r[j] = _mm512_shuffle_i32x4(t[j], t[j + 8], 0x88);
        r[j + 8] = _mm512_shuffle_i32x4(t[j], t[j + 8], 0xdd);
    }
}

/* Where keys [first, first + count) of KV head `head` lie in k and v (slot t of a block table
 * at table[t / block_size] * block_size + t % block_size; `element`: bytes per value). */
static inline void tile_rows(const void *k, const void *v, int64_t element, const int64_t *table, int64_t block_size,
                             int64_t kv_heads, int64_t head, int64_t dim, int64_t first, int64_t count,
                             const void *key_rows[TILE_KEYS], const void *value_rows[TILE_KEYS]) {
    for (int64_t j = 0; j < count; ++j) {
        const int64_t t = first + j;
        const int64_t at = ((table[t / block_size] * block_size + t % block_size) * kv_heads + head) * dim * element;
        key_rows[j] = (const char *)k + at;
        value_rows[j] = (const char *)v + at;
    }
}

/* The running softmax of TILE_ROWS rows takes a span's scores s[r][t] (unscaled): row r its
 * first visible[r] keys. Sets keep[r] (the factor the row's output so far is rescaled by) and
 * weights[r][t] (each tile's e^(score - max), 0 past the visible keys), updates max and sum, and
 * sets seen_keys[t] to the most keys of tile t any row weighs. */
static inline __attribute__((always_inline)) void span_softmax(__m512 s[TILE_ROWS][SPAN_TILES], const int tiles,
                                                               const int64_t visible[TILE_ROWS], float scale,
                                                               float *max[TILE_ROWS], float *sum[TILE_ROWS],
                                                               __m512 keep[TILE_ROWS],
                                                               __m512 weights[TILE_ROWS][SPAN_TILES],
                                                               int64_t seen_keys[SPAN_TILES]) {
    for (int t = 0; t < tiles; ++t) seen_keys[t] = 0;
    for (int r = 0; r < TILE_ROWS; ++r) {
        __m512 top = _mm512_set1_ps(EMPTY_MAX);
        for (int t = 0; t < tiles; ++t) {
            s[r][t] = _mm512_mask_blend_ps(tile_mask(visible[r] - t * TILE_KEYS), _mm512_set1_ps(EMPTY_MAX),
                                           _mm512_mul_ps(s[r][t], _mm512_set1_ps(scale)));
            top = _mm512_max_ps(top, s[r][t]);
        }
        const float span_max = _mm512_reduce_max_ps(top);
        const float new_max = span_max > *max[r] ? span_max : *max[r];
        const __m512 shift = _mm512_set1_ps(new_max);
        keep[r] = *max[r] == EMPTY_MAX ? _mm512_setzero_ps() : exp16(_mm512_set1_ps(*max[r] - new_max));
        __m512 total = _mm512_setzero_ps();
        for (int t = 0; t < tiles; ++t) {
            weights[r][t] = _mm512_maskz_mov_ps(tile_mask(visible[r] - t * TILE_KEYS), exp16(_mm512_sub_ps(s[r][t], shift)));
            total = _mm512_add_ps(total, weights[r][t]);
            const int64_t seen = visible[r] - t * TILE_KEYS;
            const int64_t keys = seen >= TILE_KEYS ? TILE_KEYS : seen < 0 ? 0 : seen;
            seen_keys[t] = keys > seen_keys[t] ? keys : seen_keys[t];
        }
        *sum[r] = *sum[r] * _mm512_cvtss_f32(keep[r]) + _mm512_reduce_add_ps(total);
        *max[r] = new_max;
    }
}

#endif
#endif
