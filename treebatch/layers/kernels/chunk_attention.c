/* Prefill attention in bfloat16 or float32, read straight out of the paged KV cache, on AVX-512
 * (bfloat16: AVX512-BF16).
 *
 * Every prefill chunk of a step's layer in one call. A chunk's queries, rows [row, row + n) of
 * q [T, H, D], attend to keys [0, length) of its block table (key t in slot table[t /
 * block_size] * block_size + t % block_size of k, v [slots, KVH, D]); query i sees keys [0,
 * min(length, base + i)): base = length - n + 1 is a causal chunk at the end of its context,
 * base = length lets every query see every key. A chunk of a prefix group's member sees the
 * group's prefix first, every query all of it, in the same running softmax: nothing is left to
 * merge. Writes out [T, H, D] (the dtype of q, k and v) at the chunks' rows and, where lse is not NULL, each
 * query head's log-sum-exp lse [T, H] (float32), so a part over some of the keys merges exactly
 * with another.
 *
 * A work item is one KV head and a tile of a chunk's queries: its rows are (query, head of the
 * group) pairs, up to MAX_ROWS. Keys go 64 at a time, each tile of sixteen keys laid out once per
 * item and then read by every row (tile_attend.h: bf16 dot products or float32 FMA), or, where
 * the chunk has more than one tile of queries, laid out once for all of them before the items
 * run, or, where the caller passes them (a group's prefix, laid out once by lay_out_tiles and
 * kept while the group lives), read from there. A bfloat16 output is rounded once.
 *
 * chunk_attention_available(f32) says whether this build takes the dtype (AVX-512 for float32,
 * AVX512-BF16 too for bfloat16); elsewhere the caller keeps torch's attention. Head sizes:
 * multiples of 32 up to TILE_MAX_DIM.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"
#include "tile_attend.h"

/* A chunk's row of `chunks` (int64, CHUNK_FIELDS each): its first query's row, its queries, the
 * address of its block table, its keys, its base, the address of those keys in tiles (or 0),
 * and its group's prefix: the address of the prefix's block table, its keys (0: no prefix) and
 * the address of its kept tiles (or 0). */
enum { C_ROW, C_N, C_TABLE, C_LENGTH, C_BASE, C_TILES, C_PREFIX, C_PREFIX_LEN, C_PREFIX_TILES, CHUNK_FIELDS };

int chunk_attention_available(int f32);
int chunk_attention_bf16(const uint16_t *q, int64_t heads, int64_t kv_heads, int64_t dim, const uint16_t *k,
                         const uint16_t *v, int64_t block_size, const int64_t *chunks, int64_t num_chunks, float scale,
                         uint16_t *out, float *lse, int threads);
int chunk_attention_f32(const float *q, int64_t heads, int64_t kv_heads, int64_t dim, const float *k, const float *v,
                        int64_t block_size, const int64_t *chunks, int64_t num_chunks, float scale, float *out,
                        float *lse, int threads);
int lay_out_tiles(int f32, const void *k, const void *v, const int64_t *table, int64_t block_size, int64_t length,
                  int64_t kv_heads, int64_t dim, void *tiles, int threads);

#if defined(TILES_512)
#define MAX_ROWS 64
#define FIELD(c, f) chunks[(c) * CHUNK_FIELDS + (f)]
#define ADDRESS(c, f) ((const void *)(intptr_t)FIELD(c, f))

int chunk_attention_available(int f32) { return tiles_take(f32); }

/* Queries [q0, q0 + count) of chunk c, KV head `head`: rows r = (query q0 + r / group, head
 * head * group + r % group); `tiles`: the chunk's keys laid out, or NULL. */
static inline __attribute__((always_inline)) void attend_item(
    const int f32, const void *q, const int64_t *chunks, int64_t c, int64_t q0, int64_t count, int64_t heads,
    int64_t kv_heads, int64_t dim, int64_t head, const void *k, const void *v, int64_t block_size, const void *tiles,
    float scale, void *out, float *lse) {
    const int64_t group = heads / kv_heads, rows = count * group, row0 = FIELD(c, C_ROW);
    const int64_t length = FIELD(c, C_LENGTH), base = FIELD(c, C_BASE), prefix_len = FIELD(c, C_PREFIX_LEN);
    const int64_t element = f32 ? 4 : 2;
    float maxes[MAX_ROWS], sums[MAX_ROWS], acc[MAX_ROWS * TILE_MAX_DIM];
    int64_t seen[MAX_ROWS];
    const void *queries[MAX_ROWS];
    for (int64_t r = 0; r < rows; ++r) {
        const int64_t i = q0 + r / group, h = head * group + r % group;
        queries[r] = (const char *)q + ((row0 + i) * heads + h) * dim * element;
        maxes[r] = EMPTY_MAX;
        sums[r] = 0.0f;
        seen[r] = prefix_len;
    }
    memset(acc, 0, sizeof(float) * rows * dim);
    if (prefix_len > 0)
        tiles_attend(f32, ADDRESS(c, C_PREFIX_TILES), k, v, ADDRESS(c, C_PREFIX), block_size, kv_heads, head, dim,
                     prefix_len, rows, queries, seen, scale, maxes, sums, acc);
    for (int64_t r = 0; r < rows; ++r) {
        const int64_t i = q0 + r / group;
        seen[r] = base + i < length ? base + i : length;
    }
    tiles_attend(f32, tiles, k, v, ADDRESS(c, C_TABLE), block_size, kv_heads, head, dim, length, rows, queries, seen,
                 scale, maxes, sums, acc);
    for (int64_t r = 0; r < rows; ++r) {
        const int64_t at = (row0 + q0 + r / group) * heads + head * group + r % group;
        const float inverse = sums[r] > 0.0f ? 1.0f / sums[r] : 0.0f;
        if (f32) {
            float *restrict o = (float *)out + at * dim;
#pragma omp simd
            for (int64_t d = 0; d < dim; ++d) o[d] = acc[r * dim + d] * inverse;
        } else {
            uint16_t *restrict o = (uint16_t *)out + at * dim;
#pragma omp simd
            for (int64_t d = 0; d < dim; ++d) o[d] = bf16_round(acc[r * dim + d] * inverse);
        }
        if (lse) lse[at] = sums[r] > 0.0f ? maxes[r] + logf(sums[r]) : -INFINITY;
    }
}

/* Returns 0, or -1 for a shape the kernel does not take (the caller keeps torch's path). */
static inline __attribute__((always_inline)) int chunk_all(const int f32, const void *q, int64_t heads,
                                                           int64_t kv_heads, int64_t dim, const void *k, const void *v,
                                                           int64_t block_size, const int64_t *chunks,
                                                           int64_t num_chunks, float scale, void *out, float *lse,
                                                           int threads) {
    const int64_t group = heads / kv_heads;
    if (!tiles_take(f32) || dim % 32 || dim > TILE_MAX_DIM || group * kv_heads != heads || group > MAX_ROWS) return -1;
    for (int64_t c = 0; c < num_chunks; ++c)
        if (FIELD(c, C_N) < 1 || FIELD(c, C_LENGTH) < 1 || FIELD(c, C_PREFIX_LEN) < 0) return -1;
    const int64_t per_item = MAX_ROWS / group; /* queries per work item */
    /* A chunk with more than one tile of queries would have each lay the same keys out again:
     * lay them out once (as many bytes as their K and V), all such chunks' tiles in parallel,
     * and read them from there. */
    int64_t *offset = malloc(sizeof(int64_t) * (3 * num_chunks + 1)), *first_item = offset + num_chunks + 1;
    int64_t *first_unit = first_item + num_chunks;
    if (!offset) return -1;
    const int64_t bytes = tile_bytes(f32, dim);
    int64_t offset_bytes = 0, items = 0, units = 0;
    for (int64_t c = 0; c < num_chunks; ++c) {
        const int64_t query_tiles = (FIELD(c, C_N) + per_item - 1) / per_item;
        const int64_t key_tiles = (FIELD(c, C_LENGTH) + TILE_KEYS - 1) / TILE_KEYS;
        const int laid_out = !FIELD(c, C_TILES) && query_tiles > 1;
        offset[c] = laid_out ? offset_bytes : -1;
        first_unit[c] = units;
        first_item[c] = items;
        offset_bytes += laid_out ? kv_heads * key_tiles * bytes : 0;
        units += laid_out ? kv_heads * key_tiles : 0;
        items += query_tiles * kv_heads;
    }
    char *laid = offset_bytes ? aligned_alloc(64, (offset_bytes + 63) / 64 * 64) : NULL;
    if (offset_bytes && !laid) {
        free(offset);
        return -1;
    }
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(static)
        for (int64_t unit = 0; unit < units; ++unit) {
            int64_t c = 0;
            while (offset[c] < 0 || (c + 1 < num_chunks && first_unit[c + 1] <= unit)) ++c;
            const int64_t key_tiles = (FIELD(c, C_LENGTH) + TILE_KEYS - 1) / TILE_KEYS, local = unit - first_unit[c];
            const int64_t head = local / key_tiles, t = local % key_tiles, length = FIELD(c, C_LENGTH);
            const int64_t keys = length - t * TILE_KEYS < TILE_KEYS ? length - t * TILE_KEYS : TILE_KEYS;
            lay_out_tile(f32, laid + offset[c] + local * bytes, k, v, ADDRESS(c, C_TABLE), block_size, kv_heads, head,
                         dim, t * TILE_KEYS, keys);
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t item = 0; item < items; ++item) {
            int64_t c = 0;
            while (c + 1 < num_chunks && first_item[c + 1] <= item) ++c;
            const int64_t n = FIELD(c, C_N), query_tiles = (n + per_item - 1) / per_item;
            /* Later query tiles see more keys: hand them out first. */
            const int64_t local = item - first_item[c], query_tile = query_tiles - 1 - local / kv_heads;
            const int64_t head = local % kv_heads, q0 = query_tile * per_item;
            const int64_t count = n - q0 < per_item ? n - q0 : per_item;
            const void *tiles = FIELD(c, C_TILES) ? ADDRESS(c, C_TILES) : offset[c] >= 0 ? laid + offset[c] : NULL;
            attend_item(f32, q, chunks, c, q0, count, heads, kv_heads, dim, head, k, v, block_size, tiles, scale, out,
                        lse);
        }
    }
    free(laid);
    free(offset);
    return 0;
}

int chunk_attention_bf16(const uint16_t *q, int64_t heads, int64_t kv_heads, int64_t dim, const uint16_t *k,
                         const uint16_t *v, int64_t block_size, const int64_t *chunks, int64_t num_chunks, float scale,
                         uint16_t *out, float *lse, int threads) {
    return chunk_all(0, q, heads, kv_heads, dim, k, v, block_size, chunks, num_chunks, scale, out, lse, threads);
}

int chunk_attention_f32(const float *q, int64_t heads, int64_t kv_heads, int64_t dim, const float *k, const float *v,
                        int64_t block_size, const int64_t *chunks, int64_t num_chunks, float scale, float *out,
                        float *lse, int threads) {
    return chunk_all(1, q, heads, kv_heads, dim, k, v, block_size, chunks, num_chunks, scale, out, lse, threads);
}

/* Keys [0, length) of a block table laid out in tiles (tile_attend.h) for every KV head. */
int lay_out_tiles(int f32, const void *k, const void *v, const int64_t *table, int64_t block_size, int64_t length,
                  int64_t kv_heads, int64_t dim, void *tiles, int threads) {
    if (!tiles_take(f32) || dim % 32 || dim > TILE_MAX_DIM) return -1;
    tile_lay_out_all(f32, tiles, k, v, table, block_size, length, kv_heads, dim, threads);
    return 0;
}

#else

int chunk_attention_available(int f32) {
    (void)f32;
    return 0;
}

int chunk_attention_bf16(const uint16_t *q, int64_t heads, int64_t kv_heads, int64_t dim, const uint16_t *k,
                         const uint16_t *v, int64_t block_size, const int64_t *chunks, int64_t num_chunks, float scale,
                         uint16_t *out, float *lse, int threads) {
    (void)q, (void)heads, (void)kv_heads, (void)dim, (void)k, (void)v, (void)block_size, (void)chunks, (void)num_chunks;
    (void)scale, (void)out, (void)lse, (void)threads;
    return -1;
}

int chunk_attention_f32(const float *q, int64_t heads, int64_t kv_heads, int64_t dim, const float *k, const float *v,
                        int64_t block_size, const int64_t *chunks, int64_t num_chunks, float scale, float *out,
                        float *lse, int threads) {
    (void)q, (void)heads, (void)kv_heads, (void)dim, (void)k, (void)v, (void)block_size, (void)chunks, (void)num_chunks;
    (void)scale, (void)out, (void)lse, (void)threads;
    return -1;
}

int lay_out_tiles(int f32, const void *k, const void *v, const int64_t *table, int64_t block_size, int64_t length,
                  int64_t kv_heads, int64_t dim, void *tiles, int threads) {
    (void)f32, (void)k, (void)v, (void)table, (void)block_size, (void)length, (void)kv_heads, (void)dim, (void)tiles;
    (void)threads;
    return -1;
}

#endif
