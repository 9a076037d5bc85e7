/* The small element-wise parts of a decoder layer, each one pass over its rows instead of the
 * several torch ops (and their thread-pool round trips and temporaries) they take otherwise.
 *
 *   add_rms_norm: h += r (in place, where r is given), then x = h / rms(h) * w  (RMSNorm);
 *   silu_mul:     y = silu(g) * u for gu = [g | u] per row (the gated MLP's activation);
 *   argmax_rows:  each float32 row's index of its largest value (greedy sampling's logits).
 *
 * Rows are `dim` (or 2 x `dim`) contiguous values, float32 or bfloat16 (`bf16`, the same for
 * every tensor but the norm weight, which is float32). The arithmetic is float32: a bfloat16
 * value is widened exactly and a result rounded to nearest even once, when it is stored. The
 * residual sum h is stored in h's dtype first and the norm computed from the stored value, as
 * torch computes `h = h + r` and then the norm of h. Work under PARALLEL_MIN values runs on
 * the calling thread: for a decode step's dozen rows a parallel region costs more than it saves.
 */
#pragma GCC optimize("fp-contract=fast")
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "bf16.h"
#include "fast_exp.h"

#define PARALLEL_MIN 65536

static inline float load(const void *p, int64_t i, int bf16) {
    return bf16 ? bf16_widen(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

static inline void store(void *p, int64_t i, float value, int bf16) {
    if (bf16)
        ((uint16_t *)p)[i] = bf16_round(value);
    else
        ((float *)p)[i] = value;
}

static inline __attribute__((always_inline)) void norm_row(void *h, const void *r, const float *w, float eps,
                                                           int64_t dim, void *x, const int bf16) {
    float squares = 0.0f;
    if (r) {
#pragma omp simd reduction(+ : squares)
        for (int64_t d = 0; d < dim; ++d) {
            store(h, d, load(h, d, bf16) + load(r, d, bf16), bf16);
            const float value = load(h, d, bf16);
            squares += value * value;
        }
    } else {
#pragma omp simd reduction(+ : squares)
        for (int64_t d = 0; d < dim; ++d) {
            const float value = load(h, d, bf16);
            squares += value * value;
        }
    }
    const float inverse = 1.0f / sqrtf(squares / (float)dim + eps);
#pragma omp simd
    for (int64_t d = 0; d < dim; ++d) store(x, d, load(h, d, bf16) * inverse * w[d], bf16);
}

/* h, x: [rows, dim]; r: [rows, dim] or NULL; w: [dim] float32. */
int add_rms_norm(void *h, const void *r, const float *w, float eps, int64_t rows, int64_t dim, void *x, int bf16,
                 int threads) {
    const size_t element = bf16 ? 2 : 4;
    const int team = rows * dim < PARALLEL_MIN ? 1 : threads;
#pragma omp parallel for num_threads(team) schedule(static) if (team > 1)
    for (int64_t i = 0; i < rows; ++i) {
        const size_t offset = (size_t)(i * dim) * element;
        void *hi = (char *)h + offset, *xi = (char *)x + offset;
        const void *ri = r ? (const char *)r + offset : NULL;
        if (bf16)
            norm_row(hi, ri, w, eps, dim, xi, 1);
        else
            norm_row(hi, ri, w, eps, dim, xi, 0);
    }
    return 0;
}

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

static inline __m256 load8(const void *p, int64_t i, const int bf16) {
    if (!bf16) return _mm256_loadu_ps((const float *)p + i);
    const __m128i half = _mm_loadu_si128((const __m128i *)((const uint16_t *)p + i));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(half), 16));
}

static inline void store8(void *p, int64_t i, __m256 value, const int bf16) {
    if (!bf16) {
        _mm256_storeu_ps((float *)p + i, value);
        return;
    }
    _mm_storeu_si128((__m128i *)((uint16_t *)p + i), bf16_round8(value));
}
#endif

#if defined(__AVX512F__)
static inline __m512 load16(const void *p, int64_t i, const int bf16) {
    if (!bf16) return _mm512_loadu_ps((const float *)p + i);
    const __m256i half = _mm256_loadu_si256((const __m256i *)((const uint16_t *)p + i));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
}

static inline void store16(void *p, int64_t i, __m512 value, const int bf16) {
    if (!bf16)
        _mm512_storeu_ps((float *)p + i, value);
    else
        _mm256_storeu_si256((__m256i *)((uint16_t *)p + i), bf16_round16(value));
}
#endif

static inline __attribute__((always_inline)) void silu_row(const void *gu, int64_t dim, void *y, const int bf16) {
    int64_t d = 0;
#if defined(__AVX512F__) /* the eight-lane arithmetic below, on sixteen lanes: the same results */
    const __m512 one16 = _mm512_set1_ps(1.0f);
    for (; d + 16 <= dim; d += 16) {
        const __m512 g = load16(gu, d, bf16), u = load16(gu, dim + d, bf16);
        const __m512 e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), g));
        store16(y, d, _mm512_mul_ps(_mm512_div_ps(g, _mm512_add_ps(one16, e)), u), bf16);
    }
#endif
#if defined(__AVX2__) && defined(__FMA__)
    const __m256 one = _mm256_set1_ps(1.0f);
    for (; d + 8 <= dim; d += 8) {
        const __m256 g = load8(gu, d, bf16), u = load8(gu, dim + d, bf16);
        const __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), g));
        store8(y, d, _mm256_mul_ps(_mm256_div_ps(g, _mm256_add_ps(one, e)), u), bf16);
    }
#endif
    for (; d < dim; ++d) {
        const float g = load(gu, d, bf16), u = load(gu, dim + d, bf16);
        store(y, d, g / (1.0f + exp_any(-g)) * u, bf16);
    }
}

/* gu: [rows, 2 * dim] (gate, then up); y: [rows, dim]. */
int silu_mul(const void *gu, int64_t rows, int64_t dim, void *y, int bf16, int threads) {
    const size_t element = bf16 ? 2 : 4;
    const int team = rows * dim < PARALLEL_MIN ? 1 : threads;
#pragma omp parallel for num_threads(team) schedule(static) if (team > 1)
    for (int64_t i = 0; i < rows; ++i) {
        const void *gi = (const char *)gu + (size_t)(2 * i * dim) * element;
        void *yi = (char *)y + (size_t)(i * dim) * element;
        if (bf16)
            silu_row(gi, dim, yi, 1);
        else
            silu_row(gi, dim, yi, 0);
    }
    return 0;
}

/* The first index of row's largest value, or of its first NaN where it has one (as torch's
 * argmax). Two passes over a row that stays in cache: its max (and whether it has a NaN) by a
 * vector reduction, then the first index holding it. */
static int64_t argmax_row(const float *row, int64_t n) {
    float top = -INFINITY;
    int nans = 0;
#pragma omp simd reduction(max : top) reduction(| : nans)
    for (int64_t i = 0; i < n; ++i) {
        top = row[i] > top ? row[i] : top;
        nans |= row[i] != row[i];
    }
    for (int64_t i = 0; i < n; ++i)
        if (nans ? row[i] != row[i] : row[i] == top) return i;
    return 0;
}

/* x: [rows, n] float32; out: [rows] int64. */
int argmax_rows(const float *x, int64_t rows, int64_t n, int64_t *out, int threads) {
    const int team = rows * n < PARALLEL_MIN ? 1 : threads;
#pragma omp parallel for num_threads(team) schedule(static) if (team > 1)
    for (int64_t i = 0; i < rows; ++i) out[i] = argmax_row(x + i * n, n);
    return 0;
}
