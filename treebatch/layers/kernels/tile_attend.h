/* Rows of queries over keys in tiles, in either dtype: the drivers of bf16_tile.h's and
 * f32_tile.h's span kernels, shared by chunk_attention.c (prefill chunks) and paged_decode.c (a
 * prefix group's decodes over the prefix).
 *
 * `f32` is a constant at every call (1: float32 keys, values and queries; 0: bfloat16 keys and
 * values, queries as bfloat16 pairs), so each dtype compiles to its own code.
 */
#ifndef TREEBATCH_TILE_ATTEND_H
#define TREEBATCH_TILE_ATTEND_H

#include <stdint.h>

#include "amx_tile.h"
#include "bf16_tile.h"
#include "f32_tile.h"

#if defined(TILES_512)

/* Bytes of one tile of `dim`-wide keys. */
static inline int64_t tile_bytes(const int f32, int64_t dim) {
    return f32 ? (int64_t)sizeof(float) * F32_TILE_FLOATS(dim) : (int64_t)sizeof(uint32_t) * 16 * dim;
}

/* Whether this build has the span kernels for the dtype. */
static inline int tiles_take(const int f32) {
#if defined(BF16_TILES)
    return 1;
#else
    return f32;
#endif
}

static inline __attribute__((always_inline)) void lay_out_tile(const int f32, void *tile, const void *k, const void *v,
                                                               const int64_t *table, int64_t block_size,
                                                               int64_t kv_heads, int64_t head, int64_t dim,
                                                               int64_t first, int64_t count) {
    if (f32)
        f32_tile_lay_out(tile, k, v, table, block_size, kv_heads, head, dim, first, count);
#if defined(BF16_TILES)
    else
        tile_lay_out(tile, k, v, table, block_size, kv_heads, head, dim, first, count);
#endif
}

/* Rows [0, rows) take a span of `tiles` tiles: row r with its query queries[r] (bfloat16 pairs
 * or float32, as the keys), its first visible[r] keys of the span (0: none), its running max,
 * sum and output maxes[r], sums[r], acc[r * dim ...]. */
static inline __attribute__((always_inline)) void span_attend_rows(const int f32, const void *restrict span,
                                                                   const int tiles, int64_t rows,
                                                                   const void *const *queries,
                                                                   const int64_t *visible, int64_t dim, float scale,
                                                                   float *maxes, float *sums, float *acc) {
    /* A place-holder row where the last four are short or one sees no key: zero queries, no
     * visible key, its results thrown away. */
    static __thread float spare_query[TILE_MAX_DIM] __attribute__((aligned(64)));
    static __thread float spare_acc[TILE_MAX_DIM] __attribute__((aligned(64)));
    float spare_max[TILE_ROWS], spare_sum[TILE_ROWS];
    for (int64_t r0 = 0; r0 < rows; r0 += TILE_ROWS) {
        const void *query[TILE_ROWS];
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
        if (!any) continue;
        if (f32)
            f32_span_attend(span, tiles, (const float **)query, dim, seen, scale, max, sum, out);
#if defined(BF16_TILES)
        else
            span_attend(span, tiles, (const uint32_t **)query, dim, seen, scale, max, sum, out);
#endif
    }
}

/* Rows [0, rows) take keys [0, seen[r]) of KV head `head` (every seen[r] <= length) into their
 * running softmax (maxes, sums, acc as for span_attend_rows), a span at a time: the span's
 * tiles read from `kept` (keys [0, length) of every KV head in tiles, [kv_heads][ceil(length /
 * 16)]) or, where it is NULL, laid out from the block table into a scratch span first, once for
 * all the rows. */
static inline __attribute__((always_inline)) void tiles_attend(const int f32, const void *kept, const void *k,
                                                               const void *v, const int64_t *table, int64_t block_size,
                                                               int64_t kv_heads, int64_t head, int64_t dim,
                                                               int64_t length, int64_t rows,
                                                               const void *const *queries, const int64_t *seen,
                                                               float scale, float *maxes, float *sums, float *acc) {
    static __thread float scratch[SPAN_TILES * F32_TILE_FLOATS(TILE_MAX_DIM)] __attribute__((aligned(64)));
    const int64_t bytes = tile_bytes(f32, dim);
    int64_t visible[rows > 0 ? rows : 1];
    int64_t last = 0; /* the most keys any row sees */
    for (int64_t r = 0; r < rows; ++r) last = seen[r] > last ? seen[r] : last;
    const int64_t per_head = (length + TILE_KEYS - 1) / TILE_KEYS;
#if defined(AMX_TILES)
    /* bfloat16 rows on the matrix unit, however few (so a row's result never depends on the rows
     * beside it): their queries gathered in blocks of sixteen. */
    const int amx = !f32 && amx_on();
    const int64_t blocks = amx ? (rows + AMX_ROWS - 1) / AMX_ROWS : 0;
    uint16_t gathered[blocks > 0 ? blocks * AMX_ROWS * dim : 1] __attribute__((aligned(64)));
    if (amx) {
        for (int64_t r = 0; r < blocks * AMX_ROWS; ++r) {
            if (r < rows)
                memcpy(gathered + r * dim, queries[r], sizeof(uint16_t) * dim);
            else
                memset(gathered + r * dim, 0, sizeof(uint16_t) * dim);
        }
        amx_configure_attention();
    }
#endif
    for (int64_t first = 0; first < last; first += SPAN_KEYS) {
        const int64_t keys = last - first < SPAN_KEYS ? last - first : SPAN_KEYS;
        const int tiles = (int)((keys + TILE_KEYS - 1) / TILE_KEYS);
        const char *span = (const char *)scratch;
        if (kept)
            span = (const char *)kept + (head * per_head + first / TILE_KEYS) * bytes;
        else
            for (int t = 0; t < tiles; ++t) {
                const int64_t count = keys - t * TILE_KEYS < TILE_KEYS ? keys - t * TILE_KEYS : TILE_KEYS;
                lay_out_tile(f32, (char *)scratch + t * bytes, k, v, table, block_size, kv_heads, head, dim,
                             first + t * TILE_KEYS, count);
            }
        for (int64_t r = 0; r < rows; ++r)
            visible[r] = seen[r] <= first ? 0 : (seen[r] - first < SPAN_KEYS ? seen[r] - first : SPAN_KEYS);
#if defined(AMX_TILES)
        if (amx) {
            for (int64_t b = 0; b < blocks; ++b) {
                const int64_t r0 = b * AMX_ROWS, count = rows - r0 < AMX_ROWS ? rows - r0 : AMX_ROWS;
                int any = 0;
                for (int64_t r = r0; r < r0 + count; ++r) any |= visible[r] > 0;
                if (any)
                    amx_span_block((const uint32_t *)span, tiles, dim, gathered + r0 * dim, count, visible + r0, scale,
                                   maxes + r0, sums + r0, acc + r0 * dim);
            }
            continue;
        }
#endif
        switch (tiles) { /* a constant count, so each span's loops unroll into whole registers */
        case 4: span_attend_rows(f32, span, 4, rows, queries, visible, dim, scale, maxes, sums, acc); break;
        case 3: span_attend_rows(f32, span, 3, rows, queries, visible, dim, scale, maxes, sums, acc); break;
        case 2: span_attend_rows(f32, span, 2, rows, queries, visible, dim, scale, maxes, sums, acc); break;
        default: span_attend_rows(f32, span, 1, rows, queries, visible, dim, scale, maxes, sums, acc); break;
        }
    }
#if defined(AMX_TILES)
    if (amx) _tile_release();
#endif
}

/* Keys [0, length) of a block table, every KV head, into tiles [kv_heads][ceil(length / 16)]
 * of tile_bytes(f32, dim) each: a group's prefix, laid out once and kept while the group lives. */
static inline void tile_lay_out_all(const int f32, void *tiles, const void *k, const void *v, const int64_t *table,
                                    int64_t block_size, int64_t length, int64_t kv_heads, int64_t dim, int threads) {
    const int64_t count = (length + TILE_KEYS - 1) / TILE_KEYS, bytes = tile_bytes(f32, dim);
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t item = 0; item < kv_heads * count; ++item) {
        const int64_t head = item / count, t = item % count;
        const int64_t keys = length - t * TILE_KEYS < TILE_KEYS ? length - t * TILE_KEYS : TILE_KEYS;
        lay_out_tile(f32, (char *)tiles + item * bytes, k, v, table, block_size, kv_heads, head, dim, t * TILE_KEYS,
                     keys);
    }
}

#endif
#endif
