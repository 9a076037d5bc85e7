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
 * pairs, up to MAX_ROWS. Keys go sixteen at a time. Each tile of sixteen keys is laid out once
 * per item for the dot-product instruction (VDPBF16PS, which adds the products of bfloat16 pairs
 * into float32 lanes): the keys transposed to one 16-lane vector per pair of dims (lane j: key
 * j), the values interleaved by pairs of keys (lane d: dims d of keys 2u and 2u + 1). Then per
 * row: the sixteen scores are D / 2 dot-product instructions with the row's query pairs
 * broadcast, the running softmax (max, sum, rescaled output) is updated on sixteen lanes, and the
 * weights, rounded to bfloat16 as torch's CPU flash attention rounds them, multiply the values by
 * pairs into the row's float32 output. Products of bfloat16 values are exact in float32 and every
 * sum is float32; the output is rounded once.
 *
 * Built where the CPU has AVX512-BF16; elsewhere chunk_attention_available() is 0 and the caller
 * keeps torch's attention. Head sizes: multiples of 32 up to MAX_DIM.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "bf16.h"
#include "bf16_tile.h"

int chunk_attention_available(void);
int chunk_attention_bf16(const uint16_t *q, int64_t n, int64_t heads, int64_t kv_heads, int64_t dim, const uint16_t *k,
                         const uint16_t *v, const int64_t *table, int64_t block_size, int64_t length, int64_t base,
                         float scale, uint16_t *out, float *lse, int threads);

#if defined(BF16_TILES)
#define MAX_ROWS 64

int chunk_attention_available(void) { return 1; }

/* Queries [q0, q0 + count) of KV head `head`: rows r = (query q0 + r / group, head head * group
 * + r % group). */
static void attend_item(const uint16_t *q, int64_t q0, int64_t count, int64_t heads, int64_t kv_heads, int64_t dim,
                        int64_t head, const uint16_t *k, const uint16_t *v, const int64_t *table, int64_t block_size,
                        int64_t length, int64_t base, float scale, uint16_t *out, float *lse) {
    const int64_t group = heads / kv_heads, rows = count * group;
    static __thread KeyTile tile __attribute__((aligned(64)));
    float maxes[MAX_ROWS], sums[MAX_ROWS], acc[MAX_ROWS * TILE_MAX_DIM];
    int64_t seen[MAX_ROWS], visible[MAX_ROWS];
    const uint32_t *queries[MAX_ROWS];
    for (int64_t r = 0; r < rows; ++r) {
        const int64_t i = q0 + r / group, h = head * group + r % group;
        seen[r] = base + i < length ? base + i : length;
        queries[r] = (const uint32_t *)(q + (i * heads + h) * dim);
        maxes[r] = TILE_EMPTY_MAX;
        sums[r] = 0.0f;
    }
    memset(acc, 0, sizeof(float) * rows * dim);
    const int64_t last = seen[rows - 1]; /* rows see more keys as their query moves on */
    for (int64_t first = 0; first < last; first += TILE_KEYS) {
        const int64_t keys = last - first < TILE_KEYS ? last - first : TILE_KEYS;
        tile_lay_out(&tile, k, v, table, block_size, kv_heads, head, dim, first, keys);
        for (int64_t r = 0; r < rows; ++r)
            visible[r] = seen[r] <= first ? 0 : (seen[r] - first < TILE_KEYS ? seen[r] - first : TILE_KEYS);
        tile_attend_rows(&tile, rows, queries, visible, dim, scale, maxes, sums, acc);
    }
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
                         float scale, uint16_t *out, float *lse, int threads) {
    const int64_t group = heads / kv_heads;
    if (dim % 32 || dim > TILE_MAX_DIM || group * kv_heads != heads || group > MAX_ROWS || n < 1 || length < 1)
        return -1;
    const int64_t per_item = MAX_ROWS / group; /* queries per work item */
    const int64_t tiles = (n + per_item - 1) / per_item;
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
    for (int64_t item = 0; item < tiles * kv_heads; ++item) {
        /* Later query tiles see more keys: hand them out first. */
        const int64_t tile = tiles - 1 - item / kv_heads, head = item % kv_heads;
        const int64_t q0 = tile * per_item, count = n - q0 < per_item ? n - q0 : per_item;
        attend_item(q, q0, count, heads, kv_heads, dim, head, k, v, table, block_size, length, base, scale, out, lse);
    }
    return 0;
}

#else

int chunk_attention_available(void) { return 0; }

int chunk_attention_bf16(const uint16_t *q, int64_t n, int64_t heads, int64_t kv_heads, int64_t dim, const uint16_t *k,
                         const uint16_t *v, const int64_t *table, int64_t block_size, int64_t length, int64_t base,
                         float scale, uint16_t *out, float *lse, int threads) {
    (void)q, (void)n, (void)heads, (void)kv_heads, (void)dim, (void)k, (void)v, (void)table, (void)block_size;
    (void)length, (void)base, (void)scale, (void)out, (void)lse, (void)threads;
    return -1;
}

#endif
