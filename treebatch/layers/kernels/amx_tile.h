/* Attention over tiles of bfloat16 keys with AMX tile instructions (TDPBF16PS): the same spans,
 * tiles and running softmax as bf16_tile.h, with the two products done by the matrix unit, up to
 * sixteen rows (query heads) at a time.
 *
 * A tile of sixteen keys is already in the layouts the matrix unit takes (bf16_tile.h):
 *   - its keys, [pair of dims][key], are the right-hand matrix of Q K^T for 32 dims at a time
 *     (sixteen rows of 64 bytes), so the scores of sixteen rows against sixteen keys are one
 *     16 x 16 float32 result per 32 dims;
 *   - its values, [pair of keys][dim], are the right-hand matrix of P V for 16 keys at a time (eight
 *     rows of 16 dims' pairs), so the weighted values of sixteen rows are one 16 x 16 result per
 *     16 dims and 16 keys.
 * Between the two, the scores are written out and each row's running softmax (max, sum, the
 * factor its output is rescaled by) is updated with AVX-512 as in bf16_tile.h; its weights are
 * rounded to bfloat16 (as there, and as torch's CPU flash attention rounds them) into the
 * left-hand matrix of P V. The products are exact in float32 and summed in float32, as with the
 * dot-product instruction, in another order.
 *
 * Rows come as their queries gathered into sixteen-row blocks (zero rows pad the last), so one
 * tile load serves a block's queries over 32 dims. Permission and tile configuration: amx.h.
 */
#ifndef TREEBATCH_AMX_TILE_H
#define TREEBATCH_AMX_TILE_H

#include <stdint.h>
#include <string.h>

#include "amx.h"
#include "bf16_tile.h"

#if defined(BF16_TILES) && defined(AMX_BUILT)
#define AMX_TILES 1

/* Tile registers (GCC's tile intrinsics take literal numbers only): 0-3 a span's scores (one per
 * tile of keys) or 64 dims of weighted values; 4 a block's queries over 32 dims; 5 a tile's keys
 * over 32 dims; 6 a block's weights over 16 keys; 7 a tile's values over 16 dims. */

/* Whether the caller wants the matrix unit (attention_amx): the engine decides by a measurement. */
static int amx_wanted = 1;

static inline int amx_on(void) { return amx_permitted() && __atomic_load_n(&amx_wanted, __ATOMIC_RELAXED); }

static inline void amx_configure_attention(void) {
    static const int rows[] = {7, 8, -1};    /* the values: 8 pairs of keys */
    static const int bytes[] = {6, 32, -1};  /* the weights: 16 keys */
    amx_configure(rows, bytes);
}

/* A block of up to sixteen rows (its queries `block`, [16][dim] bfloat16, zero past the real
 * ones; row r its first visible[r] keys of the span, its running max, sum and output maxes[r],
 * sums[r], acc[r * dim ...]) takes the first `tiles` tiles of a span. */
static inline __attribute__((always_inline)) void amx_span_block(const uint32_t *restrict span, const int tiles,
                                                                 int64_t dim, const uint16_t *block, int64_t rows,
                                                                 const int64_t *visible, float scale, float *maxes,
                                                                 float *sums, float *acc) {
    float scores[AMX_ROWS][SPAN_KEYS] __attribute__((aligned(64)));
    uint16_t weights[AMX_ROWS][SPAN_KEYS] __attribute__((aligned(64)));
    float values[AMX_ROWS][64] __attribute__((aligned(64)));
    float keep[AMX_ROWS];
    const int64_t words = TILE_WORDS(dim);
#define AMX_EACH_TILE(DO) \
    do {                  \
        DO(0);            \
        if (tiles > 1) DO(1); \
        if (tiles > 2) DO(2); \
        if (tiles > 3) DO(3); \
    } while (0)
#define ZERO(t) _tile_zero(t)
    AMX_EACH_TILE(ZERO);
    for (int64_t c = 0; c < dim / 32; ++c) {
        _tile_loadd(4, block + 32 * c, dim * sizeof(uint16_t));
#define SCORE(t)                                                                          \
        _tile_loadd(5, span + (t) * words + 16 * TILE_KEYS * c, TILE_KEYS * 4);   \
        _tile_dpbf16ps(t, 4, 5)
        AMX_EACH_TILE(SCORE);
#undef SCORE
    }
#define STORE_SCORES(t) _tile_stored(t, scores[0] + (t) * TILE_KEYS, SPAN_KEYS * sizeof(float))
    AMX_EACH_TILE(STORE_SCORES);
#undef STORE_SCORES
    /* Each row's running softmax, four rows at a time as bf16_tile.h's span takes them (rows past
     * `rows` as place-holders that see no key: their weights come out 0). */
    float spare_max[TILE_ROWS], spare_sum[TILE_ROWS];
    for (int64_t r0 = 0; r0 < AMX_ROWS; r0 += TILE_ROWS) {
        __m512 s[TILE_ROWS][SPAN_TILES], factor[TILE_ROWS], w[TILE_ROWS][SPAN_TILES];
        int64_t seen[TILE_ROWS], used[SPAN_TILES];
        float *max[TILE_ROWS], *sum[TILE_ROWS];
        for (int j = 0; j < TILE_ROWS; ++j) {
            const int64_t r = r0 + j;
            spare_max[j] = EMPTY_MAX, spare_sum[j] = 0.0f;
            seen[j] = r < rows ? visible[r] : 0;
            max[j] = r < rows ? maxes + r : spare_max + j;
            sum[j] = r < rows ? sums + r : spare_sum + j;
            for (int t = 0; t < tiles; ++t) s[j][t] = _mm512_load_ps(scores[r] + t * TILE_KEYS);
        }
        span_softmax(s, tiles, seen, scale, max, sum, factor, w, used);
        for (int j = 0; j < TILE_ROWS; ++j) {
            keep[r0 + j] = _mm512_cvtss_f32(factor[j]);
            for (int t = 0; t < tiles; ++t)
                _mm256_store_si256((__m256i *)(weights[r0 + j] + t * TILE_KEYS), (__m256i)_mm512_cvtneps_pbh(w[j][t]));
        }
    }
    /* The weighted values, 64 dims at a time (dim is a multiple of 32). */
    for (int64_t d0 = 0; d0 < dim; d0 += 64) {
        const int chunks = dim - d0 >= 64 ? 4 : 2;
        _tile_zero(0);
        _tile_zero(1);
        if (chunks > 2) {
            _tile_zero(2);
            _tile_zero(3);
        }
        for (int t = 0; t < tiles; ++t) {
            const uint32_t *pairs = span + t * words + 8 * dim + d0;
            _tile_loadd(6, weights[0] + t * TILE_KEYS, SPAN_KEYS * sizeof(uint16_t));
#define WEIGH(j)                                                                    \
            _tile_loadd(7, pairs + 16 * (j), dim * sizeof(uint32_t));      \
            _tile_dpbf16ps(j, 6, 7)
            WEIGH(0);
            WEIGH(1);
            if (chunks > 2) {
                WEIGH(2);
                WEIGH(3);
            }
#undef WEIGH
        }
        _tile_stored(0, values[0], sizeof values[0]);
        _tile_stored(1, values[0] + 16, sizeof values[0]);
        if (chunks > 2) {
            _tile_stored(2, values[0] + 32, sizeof values[0]);
            _tile_stored(3, values[0] + 48, sizeof values[0]);
        }
        for (int64_t r = 0; r < rows; ++r) {
            if (visible[r] <= 0) continue;
            const __m512 factor = _mm512_set1_ps(keep[r]);
            float *out = acc + r * dim + d0;
            for (int j = 0; j < chunks; ++j)
                _mm512_storeu_ps(out + 16 * j,
                                 _mm512_fmadd_ps(_mm512_loadu_ps(out + 16 * j), factor, _mm512_load_ps(values[r] + 16 * j)));
        }
    }
#undef ZERO
#undef AMX_EACH_TILE
}

#endif

/* Exported by each library that includes this header (each is built from one source file):
 * `wanted` 1 or 0 sets whether its bfloat16 tile kernels use the matrix unit (-1 leaves it);
 * returns whether they do (0 where the build or the CPU has none). */
int attention_amx(int wanted);
int attention_amx(int wanted) {
#if defined(AMX_TILES)
    if (wanted >= 0) __atomic_store_n(&amx_wanted, wanted != 0, __ATOMIC_RELAXED);
    return amx_on();
#else
    (void)wanted;
    return 0;
#endif
}

#endif
