/* Prefill attention in bfloat16, read straight out of the paged KV cache, on AVX512-BF16.
 *
 * The queries of one chunk, q [n, H, D], attend to keys [0, length) of one block table (key t in
 * slot table[t / block_size] * block_size + t % block_size of k, v [slots, KVH, D]); query i sees
 * keys [0, min(length, base + i)): base = length - n + 1 is a causal chunk at the end of its
 * context, base = length lets every query see every key (a group's shared prefix). Returns out
 * [n, H, D] (bfloat16) and each query head's log-sum-exp lse [n, H] (float32), so a part over
 * some of the keys merges exactly with another.
 *
 * A work item is one KV head and a tile of queries: its rows are (query, head of the group)
 * pairs, up to MAX_ROWS. Keys go 64 at a time, each tile of sixteen keys laid out once per item
 * for the bf16 dot-product instruction and then read by every row (bf16_tile.h), or, where
 * the caller passes `tiles` (a group's prefix, laid out once by lay_out_tiles_bf16 and kept while
 * the group lives), read from there. The output is rounded to bfloat16 once.
 *
 * Built where the CPU has AVX512-BF16; elsewhere chunk_attention_available() is 0 and the caller
 * keeps torch's attention. Head sizes: multiples of 32 up to TILE_MAX_DIM.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"
#include "bf16_tile.h"

int chunk_attention_available(void);
int chunk_attention_bf16(const uint16_t *q, int64_t n, int64_t heads, int64_t kv_heads, int64_t dim, const uint16_t *k,
                         const uint16_t *v, const int64_t *table, int64_t block_size, int64_t length, int64_t base,
                         float scale, const uint32_t *tiles, uint16_t *out, float *lse, int threads);
int lay_out_tiles_bf16(const uint16_t *k, const uint16_t *v, const int64_t *table, int64_t block_size, int64_t length,
                       int64_t kv_heads, int64_t dim, uint32_t *tiles, int threads);

#if defined(BF16_TILES)
#define MAX_ROWS 64

int chunk_attention_available(void) { return 1; }

/* Queries [q0, q0 + count) of KV head `head`: rows r = (query q0 + r / group, head head * group
 * + r % group). */
static void attend_item(const uint16_t *q, int64_t q0, int64_t count, int64_t heads, int64_t kv_heads, int64_t dim,
                        int64_t head, const uint16_t *k, const uint16_t *v, const int64_t *table, int64_t block_size,
                        int64_t length, int64_t base, float scale, const uint32_t *tiles, uint16_t *out,
                        float *lse) {
    const int64_t group = heads / kv_heads, rows = count * group;
    float maxes[MAX_ROWS], sums[MAX_ROWS], acc[MAX_ROWS * TILE_MAX_DIM];
    int64_t seen[MAX_ROWS];
    const uint32_t *queries[MAX_ROWS];
    for (int64_t r = 0; r < rows; ++r) {
        const int64_t i = q0 + r / group, h = head * group + r % group;
        seen[r] = base + i < length ? base + i : length;
        queries[r] = (const uint32_t *)(q + (i * heads + h) * dim);
        maxes[r] = EMPTY_MAX;
        sums[r] = 0.0f;
    }
    memset(acc, 0, sizeof(float) * rows * dim);
    tiles_attend(tiles, k, v, table, block_size, kv_heads, head, dim, length, rows, queries, seen, scale, maxes, sums,
                 acc);
    for (int64_t r = 0; r < rows; ++r) {
        const int64_t i = q0 + r / group, h = head * group + r % group;
        uint16_t *restrict o = out + (i * heads + h) * dim;
        if (sums[r] > 0.0f) {
            const float inverse = 1.0f / sums[r];
#pragma omp simd
            for (int64_t d = 0; d < dim; ++d) o[d] = bf16_round(acc[r * dim + d] * inverse);
            lse[i * heads + h] = maxes[r] + logf(sums[r]);
        } else {
            memset(o, 0, sizeof(uint16_t) * dim);
            lse[i * heads + h] = -INFINITY;
        }
    }
}

/* Returns 0, or -1 for a shape the kernel does not take (the caller keeps torch's path). */
int chunk_attention_bf16(const uint16_t *q, int64_t n, int64_t heads, int64_t kv_heads, int64_t dim, const uint16_t *k,
                         const uint16_t *v, const int64_t *table, int64_t block_size, int64_t length, int64_t base,
                         float scale, const uint32_t *tiles, uint16_t *out, float *lse, int threads) {
    const int64_t group = heads / kv_heads;
    if (dim % 32 || dim > TILE_MAX_DIM || group * kv_heads != heads || group > MAX_ROWS || n < 1 || length < 1)
        return -1;
    const int64_t per_item = MAX_ROWS / group; /* queries per work item */
    const int64_t query_tiles = (n + per_item - 1) / per_item;
    /* More than one tile of queries would each lay the same keys out again: lay them all out
     * once (as many bytes as their K and V), in parallel, and read them from there. */
    uint32_t *laid_out = NULL;
    if (!tiles && query_tiles > 1) {
        const size_t words = (size_t)(kv_heads * ((length + TILE_KEYS - 1) / TILE_KEYS) * TILE_WORDS(dim));
        laid_out = aligned_alloc(64, (words * sizeof(uint32_t) + 63) / 64 * 64);
        if (laid_out) {
            tile_lay_out_all(laid_out, k, v, table, block_size, length, kv_heads, dim, threads);
            tiles = laid_out;
        }
    }
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
    for (int64_t item = 0; item < query_tiles * kv_heads; ++item) {
        /* Later query tiles see more keys: hand them out first. */
        const int64_t query_tile = query_tiles - 1 - item / kv_heads, head = item % kv_heads;
        const int64_t q0 = query_tile * per_item, count = n - q0 < per_item ? n - q0 : per_item;
        attend_item(q, q0, count, heads, kv_heads, dim, head, k, v, table, block_size, length, base, scale, tiles, out,
                    lse);
    }
    free(laid_out);
    return 0;
}

/* Keys [0, length) of a block table laid out in tiles (bf16_tile.h) for every KV head. */
int lay_out_tiles_bf16(const uint16_t *k, const uint16_t *v, const int64_t *table, int64_t block_size, int64_t length,
                       int64_t kv_heads, int64_t dim, uint32_t *tiles, int threads) {
    if (dim % 32 || dim > TILE_MAX_DIM) return -1;
    tile_lay_out_all(tiles, k, v, table, block_size, length, kv_heads, dim, threads);
    return 0;
}

#else

int chunk_attention_available(void) { return 0; }

int chunk_attention_bf16(const uint16_t *q, int64_t n, int64_t heads, int64_t kv_heads, int64_t dim, const uint16_t *k,
                         const uint16_t *v, const int64_t *table, int64_t block_size, int64_t length, int64_t base,
                         float scale, const uint32_t *tiles, uint16_t *out, float *lse, int threads) {
    (void)q, (void)tiles, (void)n, (void)heads, (void)kv_heads, (void)dim, (void)k, (void)v, (void)table, (void)block_size;
    (void)length, (void)base, (void)scale, (void)out, (void)lse, (void)threads;
    return -1;
}

int lay_out_tiles_bf16(const uint16_t *k, const uint16_t *v, const int64_t *table, int64_t block_size, int64_t length,
                       int64_t kv_heads, int64_t dim, uint32_t *tiles, int threads) {
    (void)k, (void)v, (void)table, (void)block_size, (void)length, (void)kv_heads, (void)dim, (void)tiles, (void)threads;
    return -1;
}

#endif
