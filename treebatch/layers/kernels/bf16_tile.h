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

/* Keys [first, first + count) of KV head `head` into `tile` (missing keys as zeros): the keys by
 * sixteen-by-sixteen transposes of their pairs, the values by pairs of keys interleaved. */
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
    for (int64_t c = 0; c < dim / 32; ++c) { /* pairs [16c, 16c + 16) of every key */
        __m512i rows[TILE_KEYS];
        for (int64_t j = 0; j < TILE_KEYS; ++j)
            rows[j] = j < count ? _mm512_loadu_si512(key_rows[j] + 32 * c) : _mm512_setzero_si512();
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
            const __m512i va = a < count ? _mm512_loadu_si512(value_rows[a] + d) : _mm512_setzero_si512();
            const __m512i vb = b < count ? _mm512_loadu_si512(value_rows[b] + d) : _mm512_setzero_si512();
            _mm512_storeu_si512(row + d, _mm512_permutex2var_epi16(va, low16, vb));
            _mm512_storeu_si512(row + d + 16, _mm512_permutex2var_epi16(va, high16, vb));
        }
    }
}

/* A span: up to SPAN_TILES tiles side by side, taken into the running softmax in one step: one
 * max, one correction and one rescale of the outputs per 64 keys rather than per 16 (their
 * cross-lane reductions and exponentials cost as much as a tile's products did: measured in
 * BENCHMARKS.md), and 16 independent dot-product chains in the scores and in the weighted values,
 * enough to keep both bf16 pipes busy. */
#define SPAN_TILES 4
#define SPAN_KEYS (SPAN_TILES * TILE_KEYS)
#define TILE_ROWS 4

static inline __mmask16 tile_mask(int64_t keys) {
    return keys >= TILE_KEYS ? (__mmask16)0xffff : keys <= 0 ? (__mmask16)0 : (__mmask16)((1u << keys) - 1);
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
    uint32_t pairs[TILE_ROWS][SPAN_KEYS / 2];
    __m512 keep[TILE_ROWS];
    int64_t used[SPAN_TILES] = {0}; /* pairs of each tile any row weighs (unseen keys weigh 0) */
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
            const __m512 w = _mm512_maskz_mov_ps(tile_mask(visible[r] - t * TILE_KEYS), exp16(_mm512_sub_ps(s[r][t], shift)));
            total = _mm512_add_ps(total, w);
            _mm256_storeu_si256((__m256i *)(pairs[r] + t * TILE_KEYS / 2), (__m256i)_mm512_cvtneps_pbh(w));
            const int64_t seen = visible[r] - t * TILE_KEYS, half = seen >= TILE_KEYS ? TILE_KEYS / 2 : (seen + 1) / 2;
            used[t] = half > used[t] ? half : used[t];
        }
        *sum[r] = *sum[r] * _mm512_cvtss_f32(keep[r]) + _mm512_reduce_add_ps(total);
        *max[r] = new_max;
    }
    /* The weighted values, 64 dims of the four rows at a time (sixteen chains); dim is a
     * multiple of 32. */
    for (int64_t d0 = 0; d0 < dim; d0 += 64) {
        if (dim - d0 >= 64)
            span_values(span, tiles, dim, d0, 4, used, pairs, keep, acc);
        else
            span_values(span, tiles, dim, d0, 2, used, pairs, keep, acc);
    }
}

/* Rows [0, rows) take a span of `tiles` tiles: row r with its query's pairs queries[r], its
 * first visible[r] keys of the span (0: none), its running max, sum and output maxes[r],
 * sums[r], acc[r * dim ...]. */
static inline __attribute__((always_inline)) void span_attend_rows(const uint32_t *restrict span, const int tiles,
                                                                   int64_t rows, const uint32_t *const *queries,
                                                                   const int64_t *visible, int64_t dim, float scale,
                                                                   float *maxes, float *sums, float *acc) {
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
        if (any) span_attend(span, tiles, query, dim, seen, scale, max, sum, out);
    }
}

/* Rows [0, rows) take keys [0, seen[r]) of KV head `head` (every seen[r] <= length) into their
 * running softmax (maxes, sums, acc as for span_attend_rows), a span at a time: the span's
 * tiles read from `kept` (keys [0, length) of every KV head in tiles, [kv_heads][ceil(length /
 * 16)]) or, where it is NULL, laid out from the block table into a scratch span first, once for
 * all the rows. */
static inline void tiles_attend(const uint32_t *kept, const uint16_t *k, const uint16_t *v, const int64_t *table,
                                int64_t block_size, int64_t kv_heads, int64_t head, int64_t dim, int64_t length,
                                int64_t rows, const uint32_t *const *queries, const int64_t *seen, float scale,
                                float *maxes, float *sums, float *acc) {
    static __thread uint32_t scratch[SPAN_TILES * TILE_WORDS(TILE_MAX_DIM)] __attribute__((aligned(64)));
    int64_t visible[rows > 0 ? rows : 1];
    int64_t last = 0; /* the most keys any row sees */
    for (int64_t r = 0; r < rows; ++r) last = seen[r] > last ? seen[r] : last;
    const int64_t per_head = (length + TILE_KEYS - 1) / TILE_KEYS;
    for (int64_t first = 0; first < last; first += SPAN_KEYS) {
        const int64_t keys = last - first < SPAN_KEYS ? last - first : SPAN_KEYS;
        const int tiles = (int)((keys + TILE_KEYS - 1) / TILE_KEYS);
        const uint32_t *span = scratch;
        if (kept)
            span = kept + (head * per_head + first / TILE_KEYS) * TILE_WORDS(dim);
        else
            for (int t = 0; t < tiles; ++t) {
                const int64_t count = keys - t * TILE_KEYS < TILE_KEYS ? keys - t * TILE_KEYS : TILE_KEYS;
                tile_lay_out(scratch + t * TILE_WORDS(dim), k, v, table, block_size, kv_heads, head, dim,
                             first + t * TILE_KEYS, count);
            }
        for (int64_t r = 0; r < rows; ++r)
            visible[r] = seen[r] <= first ? 0 : (seen[r] - first < SPAN_KEYS ? seen[r] - first : SPAN_KEYS);
        switch (tiles) { /* a constant count, so each span's loops unroll into whole registers */
        case 4: span_attend_rows(span, 4, rows, queries, visible, dim, scale, maxes, sums, acc); break;
        case 3: span_attend_rows(span, 3, rows, queries, visible, dim, scale, maxes, sums, acc); break;
        case 2: span_attend_rows(span, 2, rows, queries, visible, dim, scale, maxes, sums, acc); break;
        default: span_attend_rows(span, 1, rows, queries, visible, dim, scale, maxes, sums, acc); break;
        }
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
