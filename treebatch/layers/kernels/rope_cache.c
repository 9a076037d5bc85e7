/* Between a layer's qkv projection and its attention, in one pass over the step's rows: the
 * optional per-head RMSNorm of queries and keys (Qwen 3, Gemma 3), the rotary embedding of both,
 * and the write of each token's key and value into its cache slot. Torch takes a dozen ops for
 * this (slices, norms, a concatenation, two products and a roll, two index copies), each a
 * thread-pool round trip and a temporary, once per layer.
 *
 *   qkv:       [tokens, (heads + 2 kv_heads) * dim]: queries, keys, values of each token;
 *   cos, sin:  [positions, rotary] tables, sin signed (-sin | sin over the two halves), so that
 *              a rotated x is x * cos + roll(x, rotary / 2) * sin on its first `rotary` values;
 *   positions: [tokens] each row's position; slots: [tokens] its cache slot;
 *   q_norm, k_norm: [dim] float32 weights, or NULL for none;
 *   k_cache, v_cache: [slots, kv_heads, dim]; q: [tokens, heads, dim], the rotated queries.
 *
 * Everything but the norm weights is float32 or bfloat16 alike (`bf16`). The arithmetic is
 * float32, in torch's order and without fused multiply-adds, so that float32 results equal the
 * torch path (and Hugging Face's) exactly: the norm as x * (1 / sqrt(mean(x^2) + eps)) * w, the
 * rotation as the sum of two rounded products. A normed bfloat16 value is rounded to bfloat16
 * before it rotates, as the torch path stores it; the rotation is then rounded once. */
#pragma GCC optimize("fp-contract=off")
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "bf16.h"

#define PARALLEL_MIN 65536
#define MAX_DIM 1024

static inline void load_row(const void *p, int64_t n, float *out, const int bf16) {
    if (bf16) {
        const uint16_t *src = (const uint16_t *)p;
#pragma omp simd
        for (int64_t d = 0; d < n; ++d) out[d] = bf16_widen(src[d]);
    } else {
        memcpy(out, p, (size_t)n * sizeof(float));
    }
}

static inline void store_row(void *p, int64_t n, const float *values, const int bf16) {
    if (bf16) {
        uint16_t *dst = (uint16_t *)p;
#pragma omp simd
        for (int64_t d = 0; d < n; ++d) dst[d] = bf16_round(values[d]);
    } else {
        memcpy(p, values, (size_t)n * sizeof(float));
    }
}

/* One head: norm (where a weight is given), rotate, store. */
static inline __attribute__((always_inline)) void rotate_head(const void *src, void *dst, const float *cos,
                                                              const float *sin, int64_t dim, int64_t rotary,
                                                              const float *norm, float eps, const int bf16) {
    float x[MAX_DIM], y[MAX_DIM];
    load_row(src, dim, x, bf16);
    if (norm) {
        float squares = 0.0f;
#pragma omp simd reduction(+ : squares)
        for (int64_t d = 0; d < dim; ++d) squares += x[d] * x[d];
        const float inverse = 1.0f / sqrtf(squares / (float)dim + eps);
#pragma omp simd
        for (int64_t d = 0; d < dim; ++d) x[d] = x[d] * inverse * norm[d];
        if (bf16) {
#pragma omp simd
            for (int64_t d = 0; d < dim; ++d) x[d] = bf16_widen(bf16_round(x[d]));
        }
    }
    const int64_t half = rotary / 2;
#pragma omp simd
    for (int64_t d = 0; d < half; ++d) {
        const float a = x[d] * cos[d], b = x[d + half] * sin[d];
        y[d] = a + b;
    }
#pragma omp simd
    for (int64_t d = half; d < rotary; ++d) {
        const float a = x[d] * cos[d], b = x[d - half] * sin[d];
        y[d] = a + b;
    }
    for (int64_t d = rotary; d < dim; ++d) y[d] = x[d];
    store_row(dst, dim, y, bf16);
}

static inline __attribute__((always_inline)) void token_row(
    const void *qkv, int64_t i, int64_t heads, int64_t kv_heads, int64_t dim, int64_t rotary, const void *cos_table,
    const void *sin_table, const int64_t *positions, const float *q_norm, const float *k_norm, float eps,
    const int64_t *slots, void *k_cache, void *v_cache, void *q, const int bf16) {
    const size_t element = bf16 ? 2 : 4;
    const char *row = (const char *)qkv + (size_t)(i * (heads + 2 * kv_heads) * dim) * element;
    float cos[MAX_DIM], sin[MAX_DIM];
    load_row((const char *)cos_table + (size_t)(positions[i] * rotary) * element, rotary, cos, bf16);
    load_row((const char *)sin_table + (size_t)(positions[i] * rotary) * element, rotary, sin, bf16);
    char *q_row = (char *)q + (size_t)(i * heads * dim) * element;
    for (int64_t h = 0; h < heads; ++h)
        rotate_head(row + (size_t)(h * dim) * element, q_row + (size_t)(h * dim) * element, cos, sin, dim, rotary,
                    q_norm, eps, bf16);
    const size_t slot = (size_t)(slots[i] * kv_heads * dim) * element;
    for (int64_t h = 0; h < kv_heads; ++h)
        rotate_head(row + (size_t)((heads + h) * dim) * element, (char *)k_cache + slot + (size_t)(h * dim) * element,
                    cos, sin, dim, rotary, k_norm, eps, bf16);
    memcpy((char *)v_cache + slot, row + (size_t)((heads + kv_heads) * dim) * element, (size_t)(kv_heads * dim) * element);
}

/* Returns 0, or -1 for a head size over MAX_DIM or an odd rotary size (the caller's torch path
 * takes those). */
int rope_store(const void *qkv, int64_t tokens, int64_t heads, int64_t kv_heads, int64_t dim, int64_t rotary,
               const void *cos_table, const void *sin_table, const int64_t *positions, const float *q_norm,
               const float *k_norm, float eps, const int64_t *slots, void *k_cache, void *v_cache, void *q, int bf16,
               int threads) {
    if (dim > MAX_DIM || rotary > dim || rotary % 2) return -1;
    const int team = tokens * (heads + 2 * kv_heads) * dim < PARALLEL_MIN ? 1 : threads;
#pragma omp parallel for num_threads(team) schedule(static) if (team > 1)
    for (int64_t i = 0; i < tokens; ++i) {
        if (bf16)
            token_row(qkv, i, heads, kv_heads, dim, rotary, cos_table, sin_table, positions, q_norm, k_norm, eps, slots,
                      k_cache, v_cache, q, 1);
        else
            token_row(qkv, i, heads, kv_heads, dim, rotary, cos_table, sin_table, positions, q_norm, k_norm, eps, slots,
                      k_cache, v_cache, q, 0);
    }
    return 0;
}
