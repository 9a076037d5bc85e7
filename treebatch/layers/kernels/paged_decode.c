/* Single-query attention read straight out of the paged KV cache.
 *
 * Each of S sequences has one query per head and attends to `lengths[s]` keys whose slots its
 * block table names: key t lives in slot table[s][t / block_size] * block_size + t % block_size.
 * Nothing is gathered: each sequence is one work item that walks its blocks once, every KV
 * head of a block in turn (one contiguous run of memory; 8% faster than an item per (sequence,
 * KV head), which a sliding window or more than MAX_GROUP heads still take), scores the group of
 * query heads that share each KV head, and keeps a running softmax (max, sum, weighted values)
 * per query head, rescaled block by block. Besides the output it returns each query's
 * log-sum-exp, so a result over part of the keys can be merged exactly.
 *
 * cascade_decode_attention: the single-query rows of shared-prefix groups, every group of a
 * step's layer in one call. A work item is a KV head and a run of a group's members: the run's
 * query rows read each prefix block once, together, then each member's rows go on over its own
 * blocks in the same running softmax, so there is nothing to merge afterwards.
 *
 * Layouts (row-major, contiguous):
 *   q [S, H, D]; k, v [num_slots, KVH, D]; tables [S, width] (int64); lengths [S] (int64)
 *   out [S, H, D]; lse [S, H]. Query head h reads KV head h / (H / KVH).
 * q and out are in the cache's dtype, lse float32 (or NULL: not wanted); the cache is float32
 * (paged_decode_attention) or bfloat16 (paged_decode_attention_bf16), whose queries are widened
 * exactly and whose outputs are rounded once. bfloat16 is read at half the bytes: each block's keys and values
 * are widened to float32 once (exactly: a bfloat16 is the upper half of a float32), then scored
 * and summed as in float32. Widening inside the dot products instead would repeat it for every
 * query head of the group and, measured, made the bf16 kernel slower than the float32 one. On
 * AVX512-BF16 the keys are not widened: the bf16 dot-product instruction scores them in place
 * (head size 64, blocks of 16); with up to four query heads per KV head the whole block runs in
 * registers, its weights rounded to bfloat16 for the values (bf16_decode.h: 0.69 -> 0.58 ms for a gsp-shaped cascade call, 16 groups x 8
 * members, 187 -> 130 ns per block and KV head with the keys in L2). On AVX-512 a group's
 * prefix goes in tiles, in either dtype (tile_attend.h). Each sequence's
 * next block is prefetched while one is scored.
 * A sequence with no key gets out 0 and lse -inf.
 *
 * Where the CPU has AVX2 and FMA but not AVX-512, head sizes that are multiples of 64 take
 * vector code: a block's scores eight keys at a time (each key's products in one 8-lane vector,
 * the eight reduced together by horizontal adds), and its values summed into 64 output dims held
 * in registers, query head by query head. Against the plain loops (whose horizontal sum per key
 * and per query head cost more than the products) it is 2.7-3.3x faster per layer (AMD EPYC,
 * AVX2 only, 16 sequences x 256-1,024 keys, 9 heads over 3; benchmarks in BENCHMARKS.md).
 *
 * `window` > 0: a sliding window, each query seeing only its last `window` keys (Mistral, Gemma's
 * local layers); blocks wholly before it are not read. `softcap` > 0: scores are soft-capped,
 * s -> softcap * tanh(s / softcap), before the softmax (Gemma 2). 0 turns either off.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"
#include "bf16_decode.h"
#include "tile_attend.h"
#include "fast_exp.h"

#if defined(__AVX512F__)
#include <immintrin.h>

/* 16 keys' dot products with one query of 64 dims, vectorized over the keys: each key's four
 * products land in one 16-lane vector, and the 16 vectors are summed pairwise into one vector
 * whose lane j holds key j's dot product (four rounds of lane permutes and adds, instead of a
 * horizontal sum per key, which costs as much as the products themselves). */
typedef struct {
    __m512i low[4], high[4];
} ReduceIndex;

/* Round r combines vectors of 2^r keys, each key's partial sums in 16 / 2^r lanes, two at a
 * time: the result's key segments are the first vector's keys, then the second's, each half as
 * wide, holding the sum of the source segment's two halves. */
static ReduceIndex reduce_index(void) {
    ReduceIndex index;
    for (int round = 0; round < 4; ++round) {
        const int width = 8 >> round, keys_each = 1 << round; /* width: lanes per key after */
        int low[16], high[16];
        for (int lane = 0; lane < 16; ++lane) {
            const int segment = lane / width, offset = lane % width;
            const int second = segment >= keys_each, key = second ? segment - keys_each : segment;
            low[lane] = key * 2 * width + offset + (second ? 16 : 0);
            high[lane] = key * 2 * width + width + offset + (second ? 16 : 0);
        }
        index.low[round] = _mm512_loadu_si512(low);
        index.high[round] = _mm512_loadu_si512(high);
    }
    return index;
}

/* parts[j]: key j's partial sums on 16 lanes -> one vector whose lane j is key j's total. */
static inline __m512 reduce16(__m512 parts[16], const ReduceIndex *index) {
    for (int round = 0, count = 16; round < 4; ++round, count /= 2)
        for (int i = 0; i < count / 2; ++i)
            parts[i] = _mm512_add_ps(_mm512_permutex2var_ps(parts[2 * i], index->low[round], parts[2 * i + 1]),
                                     _mm512_permutex2var_ps(parts[2 * i], index->high[round], parts[2 * i + 1]));
    return parts[0];
}

static inline __m512 dots16_dim64(const float *restrict query, const float *restrict keys, int64_t stride,
                                  int64_t n, const ReduceIndex *index) {
    const __m512 q0 = _mm512_loadu_ps(query), q1 = _mm512_loadu_ps(query + 16);
    const __m512 q2 = _mm512_loadu_ps(query + 32), q3 = _mm512_loadu_ps(query + 48);
    __m512 parts[16];
    for (int64_t j = 0; j < 16; ++j) {
        if (j >= n) {
            parts[j] = _mm512_setzero_ps();
            continue;
        }
        const float *restrict key = keys + j * stride;
        __m512 acc = _mm512_mul_ps(q0, _mm512_loadu_ps(key));
        acc = _mm512_fmadd_ps(q1, _mm512_loadu_ps(key + 16), acc);
        acc = _mm512_fmadd_ps(q2, _mm512_loadu_ps(key + 32), acc);
        parts[j] = _mm512_fmadd_ps(q3, _mm512_loadu_ps(key + 48), acc);
    }
    return reduce16(parts, index);
}

#if defined(__AVX512BF16__) && defined(__AVX512VL__)
#define BF16_DOTS 1
#define BF16_DOTS_ON 1
/* As dots16_dim64 for a bfloat16 query and keys read in place: each key's 64 products by two
 * bf16 dot-product instructions (pairs of dims summed into 16 float32 lanes), no widening. The
 * query's float32 values came from bfloat16, so rounding them back is exact. */
static inline __m512 dots16_dim64_bf16(const float *restrict query, const uint16_t *restrict keys, int64_t stride,
                                       int64_t n, const ReduceIndex *index) {
    const __m512bh q0 = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(query + 16), _mm512_loadu_ps(query));
    const __m512bh q1 = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(query + 48), _mm512_loadu_ps(query + 32));
    __m512 parts[16];
    for (int64_t j = 0; j < 16; ++j) {
        if (j >= n) {
            parts[j] = _mm512_setzero_ps();
            continue;
        }
        const uint16_t *restrict key = keys + j * stride;
        const __m512 acc = _mm512_dpbf16_ps(_mm512_setzero_ps(), q0, (__m512bh)_mm512_loadu_si512(key));
        parts[j] = _mm512_dpbf16_ps(acc, q1, (__m512bh)_mm512_loadu_si512(key + 32));
    }
    return reduce16(parts, index);
}
#endif
#endif
#ifndef BF16_DOTS_ON
#define BF16_DOTS_ON 0
#endif

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define AVX2_PATH 1

/* Lane j of the result: the sum of v_j's eight lanes (three rounds of pairwise horizontal adds
 * and one cross-half add, instead of a horizontal sum per key). */
static inline __m256 sum8x8(const __m256 v[8]) {
    const __m256 a = _mm256_hadd_ps(v[0], v[1]), b = _mm256_hadd_ps(v[2], v[3]);
    const __m256 c = _mm256_hadd_ps(v[4], v[5]), d = _mm256_hadd_ps(v[6], v[7]);
    const __m256 ab = _mm256_hadd_ps(a, b), cd = _mm256_hadd_ps(c, d);
    return _mm256_add_ps(_mm256_permute2f128_ps(ab, cd, 0x20), _mm256_permute2f128_ps(ab, cd, 0x31));
}

/* Scores of one query (dim a multiple of 8) against keys [0, n), rows `stride` floats apart,
 * eight keys per round: each key's products summed into one 8-lane vector, then the eight
 * vectors reduced together. Four keys' sums run side by side: one key's alone would be a chain
 * of dependent multiply-adds, waiting on each one's latency (measured 2.3x slower). */
static inline __attribute__((always_inline)) void scores_avx2(const float *restrict query, const float *restrict keys,
                                                              int64_t stride, int64_t n, int64_t dim, float scale,
                                                              float *restrict scores) {
    const __m256 factor = _mm256_set1_ps(scale);
    for (int64_t j0 = 0; j0 < n; j0 += 8) {
        __m256 parts[8];
        for (int64_t half = 0; half < 8; half += 4) {
            /* Keys past n re-read key 0 (always present); their scores are not stored. */
            const float *restrict key[4];
            for (int64_t i = 0; i < 4; ++i) key[i] = keys + (j0 + half + i < n ? j0 + half + i : 0) * stride;
            __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(),
                   a3 = _mm256_setzero_ps();
            for (int64_t d = 0; d < dim; d += 8) {
                const __m256 q = _mm256_loadu_ps(query + d);
                a0 = _mm256_fmadd_ps(q, _mm256_loadu_ps(key[0] + d), a0);
                a1 = _mm256_fmadd_ps(q, _mm256_loadu_ps(key[1] + d), a1);
                a2 = _mm256_fmadd_ps(q, _mm256_loadu_ps(key[2] + d), a2);
                a3 = _mm256_fmadd_ps(q, _mm256_loadu_ps(key[3] + d), a3);
            }
            parts[half] = a0;
            parts[half + 1] = a1;
            parts[half + 2] = a2;
            parts[half + 3] = a3;
        }
        float row[8];
        _mm256_storeu_ps(row, _mm256_mul_ps(sum8x8(parts), factor));
        for (int64_t j = 0; j < 8 && j0 + j < n; ++j) scores[j0 + j] = row[j];
    }
}

/* acc[0, dim) += sum_j p[j] * values[j] over keys [0, n), 64 dims at a time in registers. */
static inline __attribute__((always_inline)) void values_avx2(float *restrict acc, const float *restrict p,
                                                              const float *restrict values, int64_t stride,
                                                              int64_t n, int64_t dim) {
#if defined(__AVX512F__)
    for (int64_t d0 = 0; d0 < dim; d0 += 64) {
        __m512 a[4];
        for (int i = 0; i < 4; ++i) a[i] = _mm512_loadu_ps(acc + d0 + 16 * i);
        for (int64_t j = 0; j < n; ++j) {
            const __m512 weight = _mm512_set1_ps(p[j]);
            const float *restrict value = values + j * stride + d0;
            for (int i = 0; i < 4; ++i) a[i] = _mm512_fmadd_ps(weight, _mm512_loadu_ps(value + 16 * i), a[i]);
        }
        for (int i = 0; i < 4; ++i) _mm512_storeu_ps(acc + d0 + 16 * i, a[i]);
    }
    return;
#endif
    for (int64_t d0 = 0; d0 < dim; d0 += 64) {
        __m256 a[8];
        for (int i = 0; i < 8; ++i) a[i] = _mm256_loadu_ps(acc + d0 + 8 * i);
        for (int64_t j = 0; j < n; ++j) {
            const __m256 weight = _mm256_broadcast_ss(p + j);
            const float *restrict value = values + j * stride + d0;
            for (int i = 0; i < 8; ++i) a[i] = _mm256_fmadd_ps(weight, _mm256_loadu_ps(value + 8 * i), a[i]);
        }
        for (int i = 0; i < 8; ++i) _mm256_storeu_ps(acc + d0 + 8 * i, a[i]);
    }
}
#endif

#define MAX_GROUP 32
#define MAX_DIM 256
#define MAX_BLOCK 128

/* Whether a KV head's group of `rows` query rows takes bf16_decode.h's register loop. */
#if defined(REG_DECODE)
#define REG_PATH(bf16, rows, dim, block_size, softcap) \
    ((bf16) && (rows) <= REG_ROWS && (dim) == 64 && (block_size) == 16 && (softcap) == 0.0f)
#else
#define REG_PATH(bf16, rows, dim, block_size, softcap) 0
#endif

/* rows x dim bfloat16 values, `stride` elements from one row to the next -> packed float32. */
static inline void widen(const uint16_t *restrict from, int64_t rows, int64_t dim, int64_t stride,
                         float *restrict to) {
    for (int64_t r = 0; r < rows; ++r) {
        const uint16_t *restrict row = from + r * stride;
        uint32_t *restrict bits = (uint32_t *)(to + r * dim);
#pragma omp simd
        for (int64_t d = 0; d < dim; ++d) bits[d] = (uint32_t)row[d] << 16;
    }
}

/* The running softmax of `rows` query rows: each row's max, sum and weighted values. */
typedef struct {
    float maxes[MAX_GROUP], sums[MAX_GROUP];
    float acc[MAX_GROUP * MAX_DIM];
} Running;

static inline void running_start(Running *state, int64_t rows, int64_t dim) {
    for (int64_t g = 0; g < rows; ++g) {
        state->maxes[g] = EMPTY_MAX;
        state->sums[g] = 0.0f;
    }
    memset(state->acc, 0, sizeof(float) * rows * dim);
}

/* Rows [first, first + rows) divided by their sums into out (bfloat16 where `bf16`, rounded
 * once, else float32) and their log-sum-exp into lse (where not NULL). */
static inline __attribute__((always_inline)) void running_finish(const Running *state, int64_t first, int64_t rows,
                                                                 int64_t dim, void *restrict out, const int bf16,
                                                                 float *restrict lse) {
    for (int64_t g = 0; g < rows; ++g) {
        const int64_t r = first + g;
        const float inverse = state->sums[r] > 0.0f ? 1.0f / state->sums[r] : 0.0f;
        if (bf16) {
            uint16_t *restrict o = (uint16_t *)out + g * dim;
#pragma omp simd
            for (int64_t d = 0; d < dim; ++d) o[d] = bf16_round(state->acc[r * dim + d] * inverse);
        } else {
            float *restrict o = (float *)out + g * dim;
#pragma omp simd
            for (int64_t d = 0; d < dim; ++d) o[d] = state->acc[r * dim + d] * inverse;
        }
        if (lse) lse[g] = state->sums[r] > 0.0f ? state->maxes[r] + logf(state->sums[r]) : -INFINITY;
    }
}

/* `rows` query rows of `dim` at q (bfloat16 where `bf16`) as float32: q itself, or widened
 * (exactly) into `buffer`. */
static inline __attribute__((always_inline)) const float *queries_f32(const void *q, const int bf16, int64_t rows,
                                                                      int64_t dim, float *buffer) {
    if (!bf16) return (const float *)q;
    widen((const uint16_t *)q, rows, dim, dim, buffer);
    return buffer;
}

/* One query row's scores row[0, n) of a block -> e^(score - new max) in place, taken into the
 * row's running max and sum. Returns the factor the row's weighted values so far must take: 1
 * where the max did not move, 0 on the first block. */
static inline float softmax_step(float *restrict row, int64_t n, float *restrict max, float *restrict sum) {
    float new_max = *max, total = 0.0f;
#if defined(__AVX2__) && defined(__FMA__)
    /* Eight lanes at a time, the last partial eight masked: as scalar code the exponentials cost
     * more than the block's products (measured: a third of the cascade kernel's time). */
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256 empty = _mm256_set1_ps(EMPTY_MAX);
    __m256 top = empty;
    for (int64_t j = 0; j < n; j += 8) {
        const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32((int)(n - j)), lane);
        top = _mm256_max_ps(top, _mm256_blendv_ps(empty, _mm256_maskload_ps(row + j, mask), _mm256_castsi256_ps(mask)));
    }
    __m128 half = _mm_max_ps(_mm256_castps256_ps128(top), _mm256_extractf128_ps(top, 1));
    half = _mm_max_ps(half, _mm_movehl_ps(half, half));
    half = _mm_max_ss(half, _mm_shuffle_ps(half, half, 1));
    new_max = _mm_cvtss_f32(half) > new_max ? _mm_cvtss_f32(half) : new_max;
    const __m256 shift = _mm256_set1_ps(new_max);
    __m256 sums8 = _mm256_setzero_ps();
    for (int64_t j = 0; j < n; j += 8) {
        const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32((int)(n - j)), lane);
        const __m256 e = exp8_nonpositive(_mm256_sub_ps(_mm256_maskload_ps(row + j, mask), shift));
        _mm256_maskstore_ps(row + j, mask, e);
        sums8 = _mm256_add_ps(sums8, _mm256_and_ps(e, _mm256_castsi256_ps(mask)));
    }
    half = _mm_add_ps(_mm256_castps256_ps128(sums8), _mm256_extractf128_ps(sums8, 1));
    half = _mm_add_ps(half, _mm_movehl_ps(half, half));
    total = _mm_cvtss_f32(_mm_add_ss(half, _mm_shuffle_ps(half, half, 1)));
#else
    for (int64_t j = 0; j < n; ++j) new_max = row[j] > new_max ? row[j] : new_max;
#pragma omp simd reduction(+ : total)
    for (int64_t j = 0; j < n; ++j) {
        row[j] = exp_nonpositive(row[j] - new_max);
        total += row[j];
    }
#endif
    const float correction = exp_nonpositive(*max - new_max);
    *sum = *sum * correction + total;
    *max = new_max;
    return correction;
}

/* Rows [first, first + rows) of `state` (their queries q, contiguous) take keys [0, length) of a
 * block table (or, with a window, its last `window`) into their running softmax. k and v point
 * to float32, or to bfloat16 when `bf16` (a constant at every call, so each kind compiles to its
 * own loop). */
static inline __attribute__((always_inline)) void attend_blocks(
    Running *restrict state, int64_t first, int64_t rows, const float *restrict q, const void *k, const void *v,
    const int bf16, const int64_t *restrict table, int64_t length, int64_t kv_heads, int64_t head, int64_t dim,
    int64_t block_size, float scale, int64_t window, float softcap, const void *reduce) {
    float scores[MAX_GROUP * MAX_BLOCK];
    float wide_keys[bf16 ? MAX_BLOCK * MAX_DIM : 1], wide_values[bf16 ? MAX_BLOCK * MAX_DIM : 1];
    float *restrict maxes = state->maxes + first, *restrict sums = state->sums + first;
    float *restrict accs = state->acc + first * dim;

    /* A sliding window of W keys: the query (the last key) sees keys [length - W, length). */
    const int64_t first_key = window > 0 && length > window ? length - window : 0;
    for (int64_t start = first_key - first_key % block_size; start < length; start += block_size) {
        /* Keys [start + skip, start + skip + n) of this block are attended. */
        const int64_t skip = first_key > start ? first_key - start : 0;
        const int64_t n = (length - start < block_size ? length - start : block_size) - skip;
        const int64_t first_slot = table[start / block_size] * block_size + skip;
        int64_t stride = kv_heads * dim; /* from one slot's row of this head to the next */
        const int64_t offset = (first_slot * kv_heads + head) * dim;
        const float *restrict keys = (const float *)k + offset;
        const float *restrict values = (const float *)v + offset;
        /* On AVX512-BF16 a bf16 block's keys are scored where they lie, by bf16 dot products:
         * only its values are widened. */
        const int keys_in_place = BF16_DOTS_ON && bf16 && dim == 64 && block_size == 16;
        if (bf16) {
            if (!keys_in_place) {
                widen((const uint16_t *)k + offset, n, dim, stride, wide_keys);
                keys = wide_keys;
            }
            widen((const uint16_t *)v + offset, n, dim, stride, wide_values);
            values = wide_values;
        }
        if (bf16) stride = dim; /* the widened block's rows lie one after the other */
#if defined(BF16_DOTS)
        if (keys_in_place) {
            for (int64_t g = 0; g < rows; ++g)
                _mm512_storeu_ps(scores + g * 16, _mm512_mul_ps(dots16_dim64_bf16(q + g * 64, (const uint16_t *)k + offset,
                                                                                  kv_heads * dim, n, reduce),
                                                                _mm512_set1_ps(scale)));
        } else
#endif
#if defined(__AVX512F__)
        /* Over the widened bf16 block (contiguous rows) this is faster than the per-key sums
         * (0.30 against 0.40 ms for 16 sequences x 256 keys, 9 heads over 3, per layer); read in
         * place from a float32 cache, whose rows lie a slot apart, it was slower (0.38 against
         * 0.30), so float32 keeps the loop below. */
        if (bf16 && dim == 64 && block_size == 16) {
            for (int64_t g = 0; g < rows; ++g)
                _mm512_storeu_ps(scores + g * 16,
                                 _mm512_mul_ps(dots16_dim64(q + g * 64, keys, stride, n, reduce), _mm512_set1_ps(scale)));
        } else
#endif
#if defined(AVX2_PATH)
        if (dim % 64 == 0) {
            for (int64_t g = 0; g < rows; ++g)
                scores_avx2(q + g * dim, keys, stride, n, dim, scale, scores + g * block_size);
        } else
#endif
        for (int64_t j = 0; j < n; ++j) {
            const float *restrict key = keys + j * stride;
            for (int64_t g = 0; g < rows; ++g) {
                const float *restrict query = q + g * dim;
                float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
                for (int64_t d = 0; d < dim; ++d) dot += query[d] * key[d];
                scores[g * block_size + j] = dot * scale;
            }
        }
        if (softcap > 0.0f) /* Gemma 2's logit soft-capping: s -> c tanh(s / c) */
            for (int64_t g = 0; g < rows; ++g)
                for (int64_t j = 0; j < n; ++j)
                    scores[g * block_size + j] = softcap * tanhf(scores[g * block_size + j] / softcap);
        for (int64_t g = 0; g < rows; ++g) {
            const float correction = softmax_step(scores + g * block_size, n, maxes + g, sums + g);
            if (correction != 1.0f) {
                float *restrict a = accs + g * dim;
#pragma omp simd
                for (int64_t d = 0; d < dim; ++d) a[d] *= correction;
            }
        }
#if defined(AVX2_PATH)
        if (dim % 64 == 0) {
            for (int64_t g = 0; g < rows; ++g)
                values_avx2(accs + g * dim, scores + g * block_size, values, stride, n, dim);
            continue;
        }
#endif
        for (int64_t j = 0; j < n; ++j) {
            const float *restrict value = values + j * stride;
            for (int64_t g = 0; g < rows; ++g) {
                const float p = scores[g * block_size + j];
                float *restrict a = accs + g * dim;
#pragma omp simd
                for (int64_t d = 0; d < dim; ++d) a[d] += p * value[d];
            }
        }
    }
}

/* One (sequence, KV head) work item: the group of query heads that share the KV head. */
static inline __attribute__((always_inline)) void attend_one(const void *restrict q, const void *k, const void *v,
                       const int bf16, const int64_t *restrict table, int64_t length, int64_t kv_heads,
                       int64_t head, int64_t group, int64_t dim, int64_t block_size, float scale,
                       int64_t window, float softcap, void *restrict out, float *restrict lse,
                       const void *reduce) {
    Running state;
    float buffer[MAX_GROUP * MAX_DIM];
    running_start(&state, group, dim);
    attend_blocks(&state, 0, group, queries_f32(q, bf16, group, dim, buffer), k, v, bf16, table, length, kv_heads,
                  head, dim, block_size, scale, window, softcap, reduce);
    running_finish(&state, 0, group, dim, out, bf16, lse);
}

/* All KV heads of one sequence, block by block: each block's keys (and values) of every head
 * are read in turn, one contiguous run of memory, where a (sequence, KV head) item reads every
 * kv_heads-th row of it. No window: the caller keeps that to attend_one. */
static inline __attribute__((always_inline)) void attend_sequence(
    const void *restrict query, const void *k, const void *v, const int bf16, const int64_t *restrict table,
    int64_t length, int64_t kv_heads, int64_t group, int64_t dim, int64_t block_size, float scale, float softcap,
    void *restrict out, float *restrict lse, const void *reduce) {
    Running state;
    float buffer[MAX_GROUP * MAX_DIM];
    const int regs = REG_PATH(bf16, group, dim, block_size, softcap);
    const float *restrict q = regs ? NULL : queries_f32(query, bf16, kv_heads * group, dim, buffer);
#if defined(REG_DECODE)
    const uint16_t *rows[MAX_GROUP]; /* the register path's query rows, as they lie in q */
    for (int64_t r = 0; r < (regs ? kv_heads * group : 0); ++r) rows[r] = (const uint16_t *)query + r * dim;
#endif
    running_start(&state, kv_heads * group, dim);
    const int64_t element = bf16 ? 2 : 4, block_bytes = block_size * kv_heads * dim * element;
    for (int64_t start = 0; start < length; start += block_size) {
        const int64_t n = length - start < block_size ? length - start : block_size;
        /* The next block lies anywhere in the cache: ask for its keys and values now, while this
         * one is scored (measured: see BENCHMARKS.md). */
        if (start + block_size < length) {
            const int64_t next = table[start / block_size + 1] * block_bytes;
            for (int64_t line = 0; line < block_bytes; line += 64) {
                __builtin_prefetch((const char *)k + next + line);
                __builtin_prefetch((const char *)v + next + line);
            }
        }
        for (int64_t head = 0; head < kv_heads; ++head) {
#if defined(REG_DECODE)
            if (regs) {
                reg_decode(group, rows + head * group, k, v, table + start / block_size, n, kv_heads, head, scale,
                           state.maxes + head * group, state.sums + head * group, state.acc + head * group * dim);
                continue;
            }
#endif
            attend_blocks(&state, head * group, group, q + head * group * dim, k, v, bf16, table + start / block_size,
                          n, kv_heads, head, dim, block_size, scale, 0, softcap, reduce);
        }
    }
    running_finish(&state, 0, kv_heads * group, dim, out, bf16, lse);
}

/* `reduce`: the lane permutations dots16_dim64 sums with, built once per call on AVX-512 builds
 * (nothing elsewhere). */
#if defined(__AVX512F__)
#define REDUCE_INDEX                                                                                           \
    const ReduceIndex reduce_table = reduce_index();                                                           \
    const void *reduce = &reduce_table
#else
#define REDUCE_INDEX const void *reduce = 0
#endif

/* CALL(dim, block_size) with the common sizes as constants, so the compiler unrolls the inner
 * loops into whole vectors for them; `dim` and `block_size` are the variables in scope. */
#define WITH_CONSTANT_SIZES(CALL)                                                                              \
    do {                                                                                                       \
        if (dim == 64 && block_size == 16)                                                                     \
            CALL(64, 16);                                                                                      \
        else if (dim == 64)                                                                                    \
            CALL(64, block_size);                                                                              \
        else if (dim == 128)                                                                                   \
            CALL(128, block_size);                                                                             \
        else                                                                                                   \
            CALL(dim, block_size);                                                                             \
    } while (0)

/* Returns 0, or -1 when a size is beyond the fixed scratch buffers (the caller falls back). */
static inline __attribute__((always_inline)) int attend_all(const void *q, const void *k, const void *v, const int bf16,
                      const int64_t *tables, int64_t width, const int64_t *lengths, int64_t num_seqs,
                      int64_t num_heads, int64_t kv_heads, int64_t dim, int64_t block_size, float scale,
                      int64_t window, float softcap, void *out, float *lse, int num_threads) {
    const int64_t group = num_heads / kv_heads, element = bf16 ? 2 : 4;
    if (group > MAX_GROUP || dim > MAX_DIM || block_size > MAX_BLOCK || group * kv_heads != num_heads)
        return -1;
    const int64_t items = num_seqs * kv_heads;
    REDUCE_INDEX;
    if (window == 0 && num_heads <= MAX_GROUP) {
#pragma omp parallel for num_threads(num_threads) schedule(dynamic, 1)
        for (int64_t s = 0; s < num_seqs; ++s) {
            const void *query = (const char *)q + s * num_heads * dim * element;
            const int64_t *table = tables + s * width;
            void *o = (char *)out + s * num_heads * dim * element;
            float *l = lse ? lse + s * num_heads : NULL;
#define CALL(DIM, BLOCK)                                                                                      \
    attend_sequence(query, k, v, bf16, table, lengths[s], kv_heads, group, DIM, BLOCK, scale, softcap, o, l, reduce)
            WITH_CONSTANT_SIZES(CALL);
#undef CALL
        }
        return 0;
    }
#pragma omp parallel for num_threads(num_threads) schedule(dynamic, 1)
    for (int64_t item = 0; item < items; ++item) {
        const int64_t s = item / kv_heads, head = item % kv_heads;
        const int64_t first_head = head * group;
        const void *query = (const char *)q + (s * num_heads + first_head) * dim * element;
        const int64_t *table = tables + s * width;
        void *o = (char *)out + (s * num_heads + first_head) * dim * element;
        float *l = lse ? lse + s * num_heads + first_head : NULL;
#define CALL(DIM, BLOCK)                                                                                      \
    attend_one(query, k, v, bf16, table, lengths[s], kv_heads, head, group, DIM, BLOCK, scale, window, softcap, o, l, \
               reduce)
        WITH_CONSTANT_SIZES(CALL);
#undef CALL
    }
    return 0;
}

#if defined(TILES_512)
/* The `rows` query rows (queries[r]: a row of q as it lies, in the cache's dtype) take keys [0,
 * prefix_len) of KV head `head` of the block table into their running softmax, 64 keys at a
 * time (tile_attend.h): bfloat16 keys by bf16 dot products on the queries' pairs in place,
 * float32 keys by FMA. Each tile is laid out once for all the rows, or read from `kept` (the
 * prefix's tiles of every KV head, laid out when the group first ran). */
static inline __attribute__((always_inline)) void prefix_tiles(
    const int bf16, Running *restrict state, int64_t rows, const void *const *queries, const void *k, const void *v,
    const int64_t *table, int64_t prefix_len, const void *kept, int64_t kv_heads, int64_t head, int64_t dim,
    int64_t block_size, float scale) {
    int64_t seen[MAX_GROUP];
    for (int64_t r = 0; r < rows; ++r) seen[r] = prefix_len;
    tiles_attend(!bf16, kept, k, v, table, block_size, kv_heads, head, dim, prefix_len, rows, queries, seen, scale,
                 state->maxes, state->sums, state->acc);
}
#endif

/* One (KV head, run of members) item of a shared-prefix group: the run's query rows read each
 * prefix block once, together, then each member continues its own rows over its own blocks. */
static inline __attribute__((always_inline)) void cascade_item(
    const void *q, const void *k, const void *v, const int bf16, const int64_t *prefix, int64_t prefix_len,
    const void *kept, const int64_t *tables, int64_t width, const int64_t *lengths, int64_t first_member,
    int64_t members, int64_t num_heads, int64_t kv_heads, int64_t head, int64_t dim, int64_t block_size, float scale, float softcap,
    void *out, float *lse, const void *reduce) {
    const int64_t group = num_heads / kv_heads, rows = members * group, element = bf16 ? 2 : 4;
    /* Row m * group + g: query head head * group + g of member first_member + m, as it lies in q. */
    const void *raw[MAX_GROUP];
    for (int64_t r = 0; r < rows; ++r)
        raw[r] = (const char *)q + (((first_member + r / group) * num_heads + head * group + r % group) * dim) * element;
#if defined(TILES_512)
    const int tiled = tiles_take(!bf16) && softcap == 0.0f && dim % 32 == 0; /* the prefix in tiles */
#else
    const int tiled = 0;
#endif
    const int regs = REG_PATH(bf16, group, dim, block_size, softcap); /* the members' own keys in registers */
    float queries[MAX_GROUP * MAX_DIM]; /* the same rows as float32, where a path below reads them */
    for (int64_t r = 0; r < (tiled && regs ? 0 : rows); ++r) {
        if (bf16)
            widen(raw[r], 1, dim, dim, queries + r * dim);
        else
            memcpy(queries + r * dim, raw[r], sizeof(float) * dim);
    }
    /* The members' own keys and values of this head lie scattered over the cache: ask for them
     * now (into L2), so they arrive while the prefix is scored. */
    const int64_t row_bytes = dim * element;
    for (int64_t m = 0; m < members; ++m) {
        const int64_t *table = tables + (first_member + m) * width;
        for (int64_t t = 0; t < lengths[first_member + m]; ++t) {
            const int64_t at = ((table[t / block_size] * block_size + t % block_size) * kv_heads + head) * row_bytes;
            for (int64_t line = 0; line < row_bytes; line += 64) {
                __builtin_prefetch((const char *)k + at + line, 0, 2);
                __builtin_prefetch((const char *)v + at + line, 0, 2);
            }
        }
    }
    Running state;
    running_start(&state, rows, dim);
#if defined(TILES_512)
    if (tiled)
        prefix_tiles(bf16, &state, rows, raw, k, v, prefix, prefix_len, kept, kv_heads, head, dim, block_size, scale);
    else
#endif
    attend_blocks(&state, 0, rows, queries, k, v, bf16, prefix, prefix_len, kv_heads, head, dim, block_size, scale,
                  0, softcap, reduce);
    for (int64_t m = 0; m < members; ++m) {
        const int64_t member = first_member + m;
#if defined(REG_DECODE)
        if (regs)
            reg_decode(group, (const uint16_t *const *)raw + m * group, k, v, tables + member * width, lengths[member],
                       kv_heads, head, scale, state.maxes + m * group, state.sums + m * group,
                       state.acc + m * group * dim);
        else
#endif
        attend_blocks(&state, m * group, group, queries + m * group * dim, k, v, bf16, tables + member * width,
                      lengths[member], kv_heads, head, dim, block_size, scale, 0, softcap, reduce);
        running_finish(&state, m * group, group, dim,
                       (char *)out + (member * num_heads + head * group) * dim * element, bf16,
                       lse ? lse + member * num_heads + head * group : NULL);
    }
}

/* A group's row of `groups` (int64, GROUP_FIELDS each): the row of its first member in q, out
 * and lse; its members; the address of its prefix's block ids, its prefix's keys and the address
 * of its kept tiles (or 0); the address of its members' block tables [members, width], width,
 * and the address of their own key counts. */
enum { G_ROW, G_MEMBERS, G_PREFIX, G_PREFIX_LEN, G_KEPT, G_TABLES, G_WIDTH, G_LENGTHS, GROUP_FIELDS };
#define FIELD(g, f) groups[(g) * GROUP_FIELDS + (f)]
#define ADDRESS(g, f) ((const void *)(intptr_t)FIELD(g, f))

/* The single-query rows of several shared-prefix groups in one call, rows [row, row + members)
 * of q [S, H, D] for each group: out, lse as for paged_decode_attention, over the group's prefix
 * and the member's own keys together. Each group's members are cut into runs of at most
 * MAX_GROUP query rows, shorter where all the work items together would leave a thread idle;
 * a work item is a run and a KV head, and each reads its group's prefix once. */
static inline __attribute__((always_inline)) int cascade_all(
    const void *q, const void *k, const void *v, const int bf16, const int64_t *groups, int64_t num_groups,
    int64_t num_heads, int64_t kv_heads, int64_t dim, int64_t block_size, float scale, float softcap, void *out,
    float *lse, int num_threads) {
    const int64_t group = num_heads / kv_heads, element = bf16 ? 2 : 4;
    if (group > MAX_GROUP || dim > MAX_DIM || block_size > MAX_BLOCK || group * kv_heads != num_heads)
        return -1;
    int64_t total = 0; /* members of all groups: the most runs there can be */
    for (int64_t g = 0; g < num_groups; ++g) {
        if (FIELD(g, G_PREFIX_LEN) % block_size) return -1;
        total += FIELD(g, G_MEMBERS);
    }
    int64_t per_run = MAX_GROUP / group, runs;
    for (;; --per_run) {
        runs = 0;
        for (int64_t g = 0; g < num_groups; ++g) runs += (FIELD(g, G_MEMBERS) + per_run - 1) / per_run;
        if (per_run == 1 || runs * kv_heads >= 2 * num_threads) break;
    }
    /* Run r: members [run_first[r], + run_size[r]) of group run_group[r]; a group's runs share its
     * members evenly (16 in runs of at most 10: 8 and 8, not 10 and 6). */
    int64_t *run_group = malloc(sizeof(int64_t) * 3 * (total > 0 ? total : 1));
    if (!run_group) return -1;
    int64_t *run_first = run_group + total, *run_size = run_first + total;
    runs = 0; /* as counted above, or fewer: even sizes can cover a group in fewer runs */
    for (int64_t g = 0; g < num_groups; ++g) {
        const int64_t members = FIELD(g, G_MEMBERS), count = (members + per_run - 1) / per_run;
        const int64_t size = count ? (members + count - 1) / count : 0;
        for (int64_t first = 0; first < members; first += size, ++runs)
            run_group[runs] = g, run_first[runs] = first, run_size[runs] = members - first < size ? members - first : size;
    }
    REDUCE_INDEX;
#pragma omp parallel for num_threads(num_threads) schedule(dynamic, 1)
    for (int64_t item = 0; item < runs * kv_heads; ++item) {
        const int64_t run = item / kv_heads, head = item % kv_heads;
        const int64_t g = run_group[run], first = run_first[run], members = run_size[run];
        const int64_t row = FIELD(g, G_ROW);
        const void *q_g = (const char *)q + row * num_heads * dim * element;
        void *out_g = (char *)out + row * num_heads * dim * element;
        float *lse_g = lse ? lse + row * num_heads : NULL;
        const int64_t *prefix = ADDRESS(g, G_PREFIX), *tables = ADDRESS(g, G_TABLES), *lengths = ADDRESS(g, G_LENGTHS);
        const void *kept = ADDRESS(g, G_KEPT);
        const int64_t prefix_len = FIELD(g, G_PREFIX_LEN), width = FIELD(g, G_WIDTH);
#define CALL(DIM, BLOCK)                                                                                      \
    cascade_item(q_g, k, v, bf16, prefix, prefix_len, kept, tables, width, lengths, first, members, num_heads,     \
                 kv_heads, head, DIM, BLOCK, scale, softcap, out_g, lse_g, reduce)
        WITH_CONSTANT_SIZES(CALL);
#undef CALL
    }
    free(run_group);
    return 0;
}

int paged_decode_attention(const float *q, const float *k, const float *v, const int64_t *tables, int64_t width,
                           const int64_t *lengths, int64_t num_seqs, int64_t num_heads, int64_t kv_heads,
                           int64_t dim, int64_t block_size, float scale, int64_t window, float softcap, float *out,
                           float *lse, int num_threads) {
    return attend_all(q, k, v, 0, tables, width, lengths, num_seqs, num_heads, kv_heads, dim, block_size, scale,
                      window, softcap, out, lse, num_threads);
}

int paged_decode_attention_bf16(const uint16_t *q, const uint16_t *k, const uint16_t *v, const int64_t *tables,
                                int64_t width, const int64_t *lengths, int64_t num_seqs, int64_t num_heads,
                                int64_t kv_heads, int64_t dim, int64_t block_size, float scale, int64_t window,
                                float softcap, uint16_t *out, float *lse, int num_threads) {
    return attend_all(q, k, v, 1, tables, width, lengths, num_seqs, num_heads, kv_heads, dim, block_size, scale,
                      window, softcap, out, lse, num_threads);
}

/* `groups` as for cascade_all; a group's kept tiles: its prefix laid out in tiles of the cache's
 * dtype (tile_attend.h) for every KV head, or 0 (the kernel then lays out each tile itself). */
int cascade_decode_attention(const float *q, const float *k, const float *v, const int64_t *groups,
                             int64_t num_groups, int64_t num_heads, int64_t kv_heads, int64_t dim, int64_t block_size,
                             float scale, float softcap, float *out, float *lse, int num_threads) {
    return cascade_all(q, k, v, 0, groups, num_groups, num_heads, kv_heads, dim, block_size, scale, softcap, out, lse,
                       num_threads);
}

int cascade_decode_attention_bf16(const uint16_t *q, const uint16_t *k, const uint16_t *v, const int64_t *groups,
                                  int64_t num_groups, int64_t num_heads, int64_t kv_heads, int64_t dim,
                                  int64_t block_size, float scale, float softcap, uint16_t *out, float *lse,
                                  int num_threads) {
    return cascade_all(q, k, v, 1, groups, num_groups, num_heads, kv_heads, dim, block_size, scale, softcap, out, lse,
                       num_threads);
}
