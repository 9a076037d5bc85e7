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
#include "fast_exp.h"

int chunk_attention_available(void);
int chunk_attention_bf16(const uint16_t *q, int64_t n, int64_t heads, int64_t kv_heads, int64_t dim, const uint16_t *k,
                         const uint16_t *v, const int64_t *table, int64_t block_size, int64_t length, int64_t base,
                         float scale, uint16_t *out, float *lse, int threads);

#if defined(__AVX512BF16__) && defined(__AVX512VL__)
#include <immintrin.h>

#define MAX_DIM 256
#define MAX_ROWS 64
#define KEYS 16
#define EMPTY_MAX (-3.0e38f) /* a running max before any key: finite, so no inf - inf */

int chunk_attention_available(void) { return 1; }

typedef struct {
    uint32_t keys[MAX_DIM / 2][KEYS];          /* [pair of dims][key]: two bfloat16 per entry */
    uint32_t values[KEYS / 2][MAX_DIM];        /* [pair of keys][dim] */
} Tile;

/* Keys [first, first + count) of KV head `head` into `tile` (missing keys as zeros). */
static inline void lay_out(Tile *restrict tile, const uint16_t *k, const uint16_t *v, const int64_t *table,
                           int64_t block_size, int64_t kv_heads, int64_t head, int64_t dim, int64_t first,
                           int64_t count) {
    const uint16_t *key_rows[KEYS], *value_rows[KEYS];
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
            tile->keys[p][j] = pair;
        }
        for (int64_t j = count; j < KEYS; ++j) tile->keys[p][j] = 0;
    }
    for (int64_t u = 0; u < KEYS / 2; ++u) {
        const int64_t a = 2 * u, b = 2 * u + 1;
        uint32_t *restrict row = tile->values[u];
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
 * ROWS = 4). */
#define ROWS 4
static inline __attribute__((always_inline)) void attend_tile(const Tile *restrict tile, const uint32_t *query[ROWS],
                                                              int64_t dim, const int64_t visible[ROWS], float scale,
                                                              float *max[ROWS], float *sum[ROWS], float *acc[ROWS]) {
    __m512 even[ROWS], odd[ROWS];
    for (int r = 0; r < ROWS; ++r) even[r] = odd[r] = _mm512_setzero_ps();
    for (int64_t p = 0; p < dim / 2; p += 2) {
        const __m512bh k0 = (__m512bh)_mm512_load_si512(tile->keys[p]);
        const __m512bh k1 = (__m512bh)_mm512_load_si512(tile->keys[p + 1]);
        for (int r = 0; r < ROWS; ++r) {
            even[r] = _mm512_dpbf16_ps(even[r], (__m512bh)_mm512_set1_epi32((int)query[r][p]), k0);
            odd[r] = _mm512_dpbf16_ps(odd[r], (__m512bh)_mm512_set1_epi32((int)query[r][p + 1]), k1);
        }
    }
    /* The weights of each row by pairs of keys, rounded to bfloat16: lane u of pairs[r] holds
     * keys 2u and 2u + 1. */
    uint32_t pairs[ROWS][KEYS / 2];
    __m512 keep[ROWS];
    int64_t used = 0;
    for (int r = 0; r < ROWS; ++r) {
        const __mmask16 seen = visible[r] >= KEYS ? (__mmask16)0xffff : (__mmask16)((1u << visible[r]) - 1);
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
        __m512 a[ROWS];
        for (int r = 0; r < ROWS; ++r) a[r] = _mm512_mul_ps(_mm512_loadu_ps(acc[r] + d), keep[r]);
        for (int64_t u = 0; u < used; ++u) {
            const __m512bh values = (__m512bh)_mm512_loadu_si512(tile->values[u] + d);
            for (int r = 0; r < ROWS; ++r)
                a[r] = _mm512_dpbf16_ps(a[r], (__m512bh)_mm512_set1_epi32((int)pairs[r][u]), values);
        }
        for (int r = 0; r < ROWS; ++r) _mm512_storeu_ps(acc[r] + d, a[r]);
    }
}

/* Queries [q0, q0 + count) of KV head `head`: rows r = (query q0 + r / group, head head * group
 * + r % group). */
static void attend_item(const uint16_t *q, int64_t q0, int64_t count, int64_t heads, int64_t kv_heads, int64_t dim,
                        int64_t head, const uint16_t *k, const uint16_t *v, const int64_t *table, int64_t block_size,
                        int64_t length, int64_t base, float scale, uint16_t *out, float *lse) {
    const int64_t group = heads / kv_heads, rows = count * group;
    static __thread Tile tile __attribute__((aligned(64)));
    float maxes[MAX_ROWS], sums[MAX_ROWS], acc[MAX_ROWS * MAX_DIM];
    int64_t seen[MAX_ROWS];
    /* A place-holder row: zero queries, no visible key, its results thrown away. */
    static __thread uint32_t spare_query[MAX_DIM / 2];
    static __thread float spare_acc[MAX_DIM] __attribute__((aligned(64)));
    float spare_max[ROWS], spare_sum[ROWS];
    for (int j = 0; j < ROWS; ++j) spare_max[j] = EMPTY_MAX, spare_sum[j] = 0.0f;
    for (int64_t r = 0; r < rows; ++r) {
        const int64_t i = q0 + r / group;
        seen[r] = base + i < length ? base + i : length;
        maxes[r] = EMPTY_MAX;
        sums[r] = 0.0f;
    }
    memset(acc, 0, sizeof(float) * rows * dim);
    const int64_t last = seen[rows - 1]; /* rows see more keys as their query moves on */
    for (int64_t first = 0; first < last; first += KEYS) {
        const int64_t keys = last - first < KEYS ? last - first : KEYS;
        lay_out(&tile, k, v, table, block_size, kv_heads, head, dim, first, keys);
        /* Rows in fours; a row past the last, or with no key of this tile (causal), fills a
         * place with a scratch row that sees no key. */
        for (int64_t r0 = 0; r0 < rows; r0 += ROWS) {
            const uint32_t *query[ROWS];
            int64_t visible[ROWS];
            float *max[ROWS], *sum[ROWS], *out_acc[ROWS];
            int any = 0;
            for (int j = 0; j < ROWS; ++j) {
                const int64_t r = r0 + j;
                if (r < rows && seen[r] > first) {
                    const int64_t i = q0 + r / group, h = head * group + r % group;
                    query[j] = (const uint32_t *)(q + (i * heads + h) * dim);
                    visible[j] = seen[r] - first < KEYS ? seen[r] - first : KEYS;
                    max[j] = maxes + r, sum[j] = sums + r, out_acc[j] = acc + r * dim;
                    any = 1;
                } else {
                    query[j] = spare_query;
                    visible[j] = 0;
                    max[j] = spare_max + j, sum[j] = spare_sum + j, out_acc[j] = spare_acc;
                }
            }
            if (any) attend_tile(&tile, query, dim, visible, scale, max, sum, out_acc);
        }
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
    if (dim % 32 || dim > MAX_DIM || group * kv_heads != heads || group > MAX_ROWS || n < 1 || length < 1)
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
