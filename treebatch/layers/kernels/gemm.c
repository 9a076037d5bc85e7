/* y = x @ W^T (+ bias) for the few-to-few-hundred-row batches of a decoding step.
 *
 * Layouts: x [M, K] row-major (float32 or bfloat16); W packed once into panels of 16 output
 * features, panel p holding W[16p + j][k] at (p * K + k) * 16 + j (float32 or bfloat16; the last
 * panel zero-padded); bias [N] float32 or NULL; y [M, N] row-major (float32 or bfloat16).
 *
 * Each thread takes whole panels. A panel (K x 16 weights, 36 KB for K = 576) stays in L1/L2
 * while every tile of up to 6 rows of x streams past it: per k, two 8-lane weight vectors, six
 * broadcasts of x and twelve fused multiply-adds into twelve accumulator registers (the 6 x 16
 * tile lives in registers for the whole of K). Rows are taken in chunks of about 1.5 MB of x
 * (read from L2/L3 once per panel), so a large batch re-reads each panel from memory once per
 * chunk, not once per tile.
 *
 * The arithmetic is float32 throughout: bfloat16 inputs are widened exactly (a bfloat16 is the
 * upper half of a float32), the sums run in float32 in the order k = 0, 1, ..., and a bfloat16
 * output is rounded to nearest even once, at the end. A bfloat16 x is widened into a scratch
 * buffer once per call. Built only where the CPU has AVX2 and FMA: elsewhere `gemm_available`
 * returns 0 and the caller keeps torch's kernels.
 *
 * Where the CPU has AVX512-BF16 (`gemm_pairs_available`), bfloat16 weights are packed instead
 * in panels of 32 features by pairs of k: panel p holds W[32p + j][2t + i] at ((p * K2 + t) * 32
 * + j) * 2 + i (K2 = ceil(K / 2); zeros pad the last panel and an odd K). With a bfloat16 x,
 * `gemm_pairs` multiplies them with the dot-product instruction (VDPBF16PS): per pair of k, two
 * 16-lane weight vectors, one 32-bit broadcast of x's pair per row, and two instructions per row
 * that each add 16 features' two products into float32 sums, in an 8 x 32 tile of sixteen
 * registers. The products of bfloat16 values are exact in float32 and summed in float32, as in
 * the widening path (the order differs: pairs first); the output is rounded once. Where the CPU
 * has the AMX matrix unit too (and K is a multiple of 32), the same panels go through it instead
 * (gemm_pairs_amx: the panels are already in the layout its tile product takes).
 */
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "amx.h"
#include "bf16.h"
#include "fast_exp.h"

int gemm_available(void);
int gemm_pairs_available(void);
int gemm_pairs_gated(const uint16_t *x, int64_t M, int64_t K, const uint16_t *w, int64_t N, uint16_t *y,
                     int threads);

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

#define NR 16          /* output features per panel: two 8-lane vectors */
#define MR 6           /* rows per register tile */
/* x rows per chunk: as many as fit in this many bytes (at least MR). Measured on an AMD EPYC
 * (AVX2 only), 512 rows of Llama-3.2-1B's down projection (K = 8192): 341 ms with 192 KB chunks
 * (L2-sized: each weight panel re-read from memory 85 times), 253 with 768 KB, 237 with 1.5 MB
 * (oneDNN 242); for K <= 2048 the chunk holds every row of a 256-token step. */
#ifndef CHUNK_BYTES
#define CHUNK_BYTES 1572864
#endif

int gemm_available(void) { return 1; }

static inline __attribute__((always_inline)) __m256 widen8(const uint16_t *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}

/* One accumulator row: acc(r)(0..1) += x[r][k] * w[k][0..15]. */
#define FMA_ROW(r)                                                                              \
    if (R > r) {                                                                                \
        const __m256 a = _mm256_broadcast_ss(x + r * K + k);                                    \
        c##r##0 = _mm256_fmadd_ps(a, w0, c##r##0);                                              \
        c##r##1 = _mm256_fmadd_ps(a, w1, c##r##1);                                              \
    }
#define STORE_ROW(r)                                                                            \
    if (R > r) {                                                                                \
        _mm256_storeu_ps(out, c##r##0);                                                         \
        _mm256_storeu_ps(out + 8, c##r##1);                                                     \
        store(out, y, r * N, cols, bias, y_bf16);                                               \
    }

/* The tile's row in `row` -> y's row (+ bias), in y's dtype, the panel's first `cols` columns. */
static inline void store(float *row, void *y, int64_t offset, int cols, const float *bias, int y_bf16) {
    if (cols <= 0) return; /* never: a panel has a column; said so GCC's bounds warning knows it */
    if (bias)
        for (int c = 0; c < cols; ++c) row[c] += bias[c];
    if (y_bf16) {
        uint16_t *dst = (uint16_t *)y + offset;
#pragma omp simd
        for (int c = 0; c < cols; ++c) dst[c] = bf16_round(row[c]);
    } else {
        memcpy((float *)y + offset, row, (size_t)cols * sizeof(float));
    }
}

/* The R x 16 tile of rows x[0..R) against one panel; y points at the tile's first element. */
#define TILE(NAME, WEIGHT_TYPE, LOAD_LOW, LOAD_HIGH)                                            \
    static inline __attribute__((always_inline)) void NAME(                                     \
        const int R, const float *restrict x, const WEIGHT_TYPE *restrict panel, int64_t K,     \
        void *y, int64_t N, int cols, const float *bias, int y_bf16) {                          \
        __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00,           \
               c21 = c00, c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;     \
        for (int64_t k = 0; k < K; ++k) {                                                       \
            const __m256 w0 = LOAD_LOW(panel + k * NR), w1 = LOAD_HIGH(panel + k * NR);         \
            FMA_ROW(0) FMA_ROW(1) FMA_ROW(2) FMA_ROW(3) FMA_ROW(4) FMA_ROW(5)                   \
        }                                                                                       \
        float out[NR];                                                                          \
        STORE_ROW(0) STORE_ROW(1) STORE_ROW(2) STORE_ROW(3) STORE_ROW(4) STORE_ROW(5)           \
    }

#define LOAD_F32_LOW(p) _mm256_loadu_ps(p)
#define LOAD_F32_HIGH(p) _mm256_loadu_ps((p) + 8)
#define LOAD_BF16_LOW(p) widen8(p)
#define LOAD_BF16_HIGH(p) widen8((p) + 8)
TILE(tile_f32, float, LOAD_F32_LOW, LOAD_F32_HIGH)
TILE(tile_bf16, uint16_t, LOAD_BF16_LOW, LOAD_BF16_HIGH)

/* Rows [m, m + rows) of x against panel p, tile by tile (a switch, so each tile height is
 * compiled with its rows known and its accumulators in registers). */
#define PANEL(NAME, TILE_FN, WEIGHT_TYPE)                                                       \
    static void NAME(const float *x, int64_t rows, int64_t K, const WEIGHT_TYPE *panel, int64_t N, \
                     int cols, const float *bias, void *y, int y_bf16) {                        \
        const size_t element = y_bf16 ? 2 : 4;                                                  \
        for (int64_t m = 0; m < rows; m += MR) {                                                \
            const float *xm = x + m * K;                                                        \
            void *ym = (char *)y + (size_t)(m * N) * element;                                   \
            switch (rows - m < MR ? rows - m : MR) {                                            \
            case 6: TILE_FN(6, xm, panel, K, ym, N, cols, bias, y_bf16); break;                \
            case 5: TILE_FN(5, xm, panel, K, ym, N, cols, bias, y_bf16); break;                \
            case 4: TILE_FN(4, xm, panel, K, ym, N, cols, bias, y_bf16); break;                \
            case 3: TILE_FN(3, xm, panel, K, ym, N, cols, bias, y_bf16); break;                \
            case 2: TILE_FN(2, xm, panel, K, ym, N, cols, bias, y_bf16); break;                \
            default: TILE_FN(1, xm, panel, K, ym, N, cols, bias, y_bf16); break;               \
            }                                                                                   \
        }                                                                                       \
    }
PANEL(panel_f32, tile_f32, float)
PANEL(panel_bf16, tile_bf16, uint16_t)

/* x_bf16, w_bf16, y_bf16: whether each is bfloat16 (else float32). Returns 0, or -1 where the
 * scratch buffer for a bfloat16 x cannot be had. */
int gemm(const void *x, int x_bf16, int64_t M, int64_t K, const void *w, int w_bf16, int64_t N,
         const float *bias, void *y, int y_bf16, int threads) {
    float *widened = NULL;
    const float *xf = (const float *)x;
    if (x_bf16) {
        widened = malloc((size_t)(M * K) * sizeof(float));
        if (!widened) return -1;
        const uint16_t *xh = (const uint16_t *)x;
#pragma omp parallel for num_threads(threads) schedule(static)
        for (int64_t i = 0; i < M * K; ++i) {
            const uint32_t bits = (uint32_t)xh[i] << 16;
            memcpy(widened + i, &bits, sizeof bits);
        }
        xf = widened;
    }
    const int64_t panels = (N + NR - 1) / NR;
    int64_t chunk = CHUNK_BYTES / (K * (int64_t)sizeof(float)) / MR * MR;
    if (chunk < MR) chunk = MR;
    const size_t element = y_bf16 ? 2 : 4;
#pragma omp parallel num_threads(threads)
    for (int64_t m = 0; m < M; m += chunk) {
        const int64_t rows = M - m < chunk ? M - m : chunk;
#pragma omp for schedule(static)
        for (int64_t p = 0; p < panels; ++p) {
            const int cols = (int)(N - p * NR < NR ? N - p * NR : NR);
            void *yp = (char *)y + (size_t)(m * N + p * NR) * element;
            const float *bp = bias ? bias + p * NR : NULL;
            if (w_bf16)
                panel_bf16(xf + m * K, rows, K, (const uint16_t *)w + p * K * NR, N, cols, bp, yp, y_bf16);
            else
                panel_f32(xf + m * K, rows, K, (const float *)w + p * K * NR, N, cols, bp, yp, y_bf16);
        }
    }
    free(widened);
    return 0;
}

#if defined(__AVX512BF16__) && defined(__AVX512VL__)
#define NR2 32         /* output features per pair panel: two 16-lane vectors */
#define MR2 8          /* rows per register tile */
/* A K longer than KBLOCK_AFTER is taken KBLOCK at a time, the tiles' sums kept in float32 between
 * blocks: a panel's block of 64 KB then serves every tile of the chunk from L1/L2, where a whole
 * 512 KB panel (K = 8192) was streamed again for each tile (Llama-1B's down projection at 256
 * rows: 13.4 ms against oneDNN's 10.6; see BENCHMARKS.md). */
#define KBLOCK 1024
#define KBLOCK_AFTER 2048
#define KBLOCK_ROWS 256 /* rows per chunk when blocking: their partial sums, 32 KB, on the stack */

int gemm_pairs_available(void) { return 1; }

/* x[r][2t], x[r][2t + 1] as one 32-bit lane pattern broadcast; `last`: t is an odd K's last
 * pair, whose second value is 0. */
static inline __attribute__((always_inline)) __m512bh pair_of(const uint16_t *x, int64_t t, const int last) {
    uint32_t pair = x[2 * t];
    if (!last) memcpy(&pair, x + 2 * t, sizeof pair);
    return (__m512bh)_mm512_set1_epi32((int)pair);
}

#define DOT_ROW(r)                                                                              \
    if (R > r) {                                                                                \
        const __m512bh a = pair_of(x + r * ldx, t, last);                                       \
        c##r##0 = _mm512_dpbf16_ps(c##r##0, a, w0);                                             \
        c##r##1 = _mm512_dpbf16_ps(c##r##1, a, w1);                                             \
    }
/* Pair t of every row of the tile into its sums. */
#define DOT_PAIR                                                                                \
    {                                                                                           \
        const __m512bh w0 = (__m512bh)_mm512_loadu_si512(panel + t * 2 * NR2);                 \
        const __m512bh w1 = (__m512bh)_mm512_loadu_si512(panel + t * 2 * NR2 + NR2);           \
        DOT_ROW(0) DOT_ROW(1) DOT_ROW(2) DOT_ROW(3) DOT_ROW(4) DOT_ROW(5) DOT_ROW(6) DOT_ROW(7) \
    }
#define STORE_PAIR_ROW(r)                                                                       \
    if (R > r) store_pairs(c##r##0, c##r##1, y, r * N, cols, bias, y_bf16);

/* Sixteen-lane sums (+ bias) -> y's row, its first `cols` of 32 columns, in y's dtype. */
static inline void store_pairs(__m512 low, __m512 high, void *y, int64_t offset, int cols, const float *bias,
                               int y_bf16) {
    const __mmask16 m0 = cols >= 16 ? 0xffff : (__mmask16)((1u << cols) - 1);
    const __mmask16 m1 = cols >= 32 ? 0xffff : (cols <= 16 ? 0 : (__mmask16)((1u << (cols - 16)) - 1));
    if (bias) {
        low = _mm512_add_ps(low, _mm512_maskz_loadu_ps(m0, bias));
        high = _mm512_add_ps(high, _mm512_maskz_loadu_ps(m1, bias + 16));
    }
    if (y_bf16) {
        uint16_t *dst = (uint16_t *)y + offset;
        _mm256_mask_storeu_epi16(dst, m0, (__m256i)_mm512_cvtneps_pbh(low));
        _mm256_mask_storeu_epi16(dst + 16, m1, (__m256i)_mm512_cvtneps_pbh(high));
    } else {
        float *dst = (float *)y + offset;
        _mm512_mask_storeu_ps(dst, m0, low);
        _mm512_mask_storeu_ps(dst + 16, m1, high);
    }
}

/* The R x 32 tile of rows x[0..R) (bfloat16, rows `ldx` apart) against `kc` values of k of one
 * pair panel (x and panel at the block's first k). Sums start at 0 (`first`) or from `partial`
 * (R rows of 32 floats), and go to y (`final`: + bias, in y's dtype) or back to `partial`. */
static inline __attribute__((always_inline)) void tile_pairs(const int R, const uint16_t *restrict x, int64_t ldx,
                                                             const uint16_t *restrict panel, int64_t kc,
                                                             const uint16_t *next, float *partial, int first,
                                                             int final, void *y, int64_t N, int cols,
                                                             const float *bias, int y_bf16) {
    __m512 c00 = _mm512_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00, c30 = c00, c31 = c00,
           c40 = c00, c41 = c00, c50 = c00, c51 = c00, c60 = c00, c61 = c00, c70 = c00, c71 = c00;
    if (!first) {
#define LOAD_PARTIAL(r)                                                                         \
        if (R > r) {                                                                            \
            c##r##0 = _mm512_loadu_ps(partial + r * NR2);                                       \
            c##r##1 = _mm512_loadu_ps(partial + r * NR2 + 16);                                  \
        }
        LOAD_PARTIAL(0) LOAD_PARTIAL(1) LOAD_PARTIAL(2) LOAD_PARTIAL(3)
        LOAD_PARTIAL(4) LOAD_PARTIAL(5) LOAD_PARTIAL(6) LOAD_PARTIAL(7)
#undef LOAD_PARTIAL
    }
    int64_t t = 0;
    if (next) /* the next panel's block, into L2 while this one is multiplied (its two lines per pair) */
        for (const int last = 0; t < kc / 2; ++t) {
            __builtin_prefetch(next + t * 2 * NR2, 0, 2);
            __builtin_prefetch(next + t * 2 * NR2 + NR2, 0, 2);
            DOT_PAIR
        }
    else
        for (const int last = 0; t < kc / 2; ++t) DOT_PAIR
    if (kc % 2) {
        const int last = 1;
        DOT_PAIR
    }
    if (final) {
        STORE_PAIR_ROW(0) STORE_PAIR_ROW(1) STORE_PAIR_ROW(2) STORE_PAIR_ROW(3)
        STORE_PAIR_ROW(4) STORE_PAIR_ROW(5) STORE_PAIR_ROW(6) STORE_PAIR_ROW(7)
        return;
    }
#define SAVE_PARTIAL(r)                                                                         \
    if (R > r) {                                                                                \
        _mm512_storeu_ps(partial + r * NR2, c##r##0);                                           \
        _mm512_storeu_ps(partial + r * NR2 + 16, c##r##1);                                      \
    }
    SAVE_PARTIAL(0) SAVE_PARTIAL(1) SAVE_PARTIAL(2) SAVE_PARTIAL(3)
    SAVE_PARTIAL(4) SAVE_PARTIAL(5) SAVE_PARTIAL(6) SAVE_PARTIAL(7)
#undef SAVE_PARTIAL
}

/* Rows [0, rows) of x against one pair panel, K in blocks of `kc` (all of K in one where it is
 * short), tile by tile within each block. */
static void panel_pairs(const uint16_t *x, int64_t rows, int64_t K, int64_t kc, const uint16_t *panel,
                        const uint16_t *next, int64_t N, int cols, const float *bias, void *y, int y_bf16) {
    const size_t element = y_bf16 ? 2 : 4;
    float partial[KBLOCK_ROWS * NR2];
    for (int64_t k0 = 0; k0 < K; k0 += kc) {
        const int64_t block = K - k0 < kc ? K - k0 : kc;
        const int first = k0 == 0, final = k0 + block >= K;
        const uint16_t *panel_block = panel + k0 / 2 * 2 * NR2;
        for (int64_t m = 0; m < rows; m += MR2) {
            const uint16_t *xm = x + m * K + k0;
            void *ym = (char *)y + (size_t)(m * N) * element;
            float *pm = kc < K ? partial + m * NR2 : NULL; /* one block: no partial sums */
            /* The first tile of the block asks for the next panel's block, early enough for memory to
             * deliver it while every tile of this one runs. */
            const uint16_t *ahead = next && m == 0 ? next + k0 / 2 * 2 * NR2 : NULL;
#define TILE_CASE(R)                                                                            \
    case R: tile_pairs(R, xm, K, panel_block, block, ahead, pm, first, final, ym, N, cols, bias, y_bf16); break;
            switch (rows - m < MR2 ? rows - m : MR2) {
            TILE_CASE(8) TILE_CASE(7) TILE_CASE(6) TILE_CASE(5) TILE_CASE(4) TILE_CASE(3) TILE_CASE(2)
            default: tile_pairs(1, xm, K, panel_block, block, ahead, pm, first, final, ym, N, cols, bias, y_bf16); break;
            }
#undef TILE_CASE
        }
    }
}

#if defined(AMX_BUILT)
/* The pair panels on the AMX matrix unit, for K a multiple of 32. A panel's pairs of k are the
 * right-hand matrix TDPBF16PS takes: 32 k (sixteen pairs) of its features [0, 16) are sixteen rows
 * of 64 bytes, 128 bytes apart, and features [16, 32) the 64 bytes beside them; x's rows, 32 k at
 * a time, are the left-hand one as they lie. A block of 32 rows x 32 features sums in four tile
 * registers (0-3; x in 4 and 5, the panel in 6 and 7: each load serves two products) over all of
 * K, then goes out through a float32 buffer (+ bias, rounded once to y's dtype). Rows past M in
 * the last block of sixteen are read from a zero-padded copy. */
/* Rows of x (and of the zero-padded tail copy) are K apart. */
static inline __attribute__((always_inline)) void amx_products(const uint16_t *x0, const uint16_t *x1,
                                                                const uint16_t *b0, const uint16_t *b1, int64_t K) {
    const int64_t lda = K * (int64_t)sizeof(uint16_t);
    _tile_zero(0);
    _tile_zero(1);
    if (x1) {
        _tile_zero(2);
        _tile_zero(3);
    }
    for (int64_t c = 0; c < K / 32; ++c) {
        _tile_loadd(6, b0 + c * 16 * 2 * NR2, 2 * NR2 * sizeof(uint16_t));
        _tile_loadd(7, b1 + c * 16 * 2 * NR2, 2 * NR2 * sizeof(uint16_t));
        _tile_loadd(4, x0 + 32 * c, lda);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        if (x1) {
            _tile_loadd(5, x1 + 32 * c, lda);
            _tile_dpbf16ps(2, 5, 6);
            _tile_dpbf16ps(3, 5, 7);
        }
    }
}

/* The four sums out: tile 0 and 1 side by side in rows 0-15 of `sums`, 2 and 3 in rows 16-31. */
static inline __attribute__((always_inline)) void amx_store(float sums[2 * AMX_ROWS][NR2], const int both) {
    _tile_stored(0, sums[0], NR2 * sizeof(float));
    _tile_stored(1, sums[0] + 16, NR2 * sizeof(float));
    if (both) {
        _tile_stored(2, sums[AMX_ROWS], NR2 * sizeof(float));
        _tile_stored(3, sums[AMX_ROWS] + 16, NR2 * sizeof(float));
    }
}

static void amx_block(const uint16_t *x0, const uint16_t *x1, const uint16_t *panel, int64_t K,
                      int64_t rows, int64_t N, int cols, const float *bias, void *y, int y_bf16) {
    float sums[2 * AMX_ROWS][NR2] __attribute__((aligned(64)));
    amx_products(x0, x1, panel, panel + NR2, K);
    amx_store(sums, x1 != NULL);
    for (int64_t r = 0; r < rows; ++r)
        store_pairs(_mm512_load_ps(sums[r]), _mm512_load_ps(sums[r] + 16), y, r * N, cols, bias, y_bf16);
}

/* The gated MLP's block: 32 rows x 32 features of its gate panel and the same features of its up
 * panel, sixteen features at a time, each gate beside its up in the tiles; out goes
 * silu(gate) * up from the float32 sums, rounded once to bfloat16 (y: [rows][I]). */
static void amx_block_gated(const uint16_t *x0, const uint16_t *x1, const uint16_t *gate,
                            const uint16_t *up, int64_t K, int64_t rows, int64_t I, uint16_t *y) {
    float sums[2 * AMX_ROWS][NR2] __attribute__((aligned(64)));
    for (int half = 0; half < 2; ++half) {
        amx_products(x0, x1, gate + half * NR2, up + half * NR2, K);
        amx_store(sums, x1 != NULL);
        for (int64_t r = 0; r < rows; ++r) {
            const __m512 g = _mm512_load_ps(sums[r]), u = _mm512_load_ps(sums[r] + 16);
            const __m512 e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), g));
            const __m512 out = _mm512_mul_ps(_mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.0f), e)), u);
            _mm256_storeu_si256((__m256i *)(y + r * I + 16 * half), (__m256i)_mm512_cvtneps_pbh(out));
        }
    }
}

/* Bytes of panels a thread takes at a time past every block of rows: measured on an Intel Xeon
 * with AMX (L2 2 MB per core), SmolLM2's gate/up and down projections ran 1.2-1.7x faster at
 * 64-512 rows with each block of rows passing many panels than with each panel passing every
 * block, and a 49,152-feature head at 64 rows kept its speed only with the panels in chunks. */
#ifndef AMX_PANEL_BYTES
#define AMX_PANEL_BYTES (1 << 20)
#endif

/* `gated`: W is [gate; up] (N = 2I, I a multiple of 32) and y [M, I] bfloat16 takes silu(gate) *
 * up; else y = x W^T (+ bias) as in gemm. */
static int gemm_pairs_amx(const uint16_t *x, int64_t M, int64_t K, const uint16_t *w, int64_t N, const float *bias,
                          void *y, int y_bf16, int threads, const int gated) {
    const int64_t panel_size = K / 2 * 2 * NR2, whole = M / AMX_ROWS * AMX_ROWS;
    const int64_t panels = gated ? N / 2 / NR2 : (N + NR2 - 1) / NR2; /* gated: the gate's */
    const size_t element = y_bf16 ? 2 : 4;
    uint16_t *tail = NULL; /* rows [whole, M), then zeros to sixteen rows */
    if (whole < M) {
        tail = aligned_alloc(64, (AMX_ROWS * K * sizeof(uint16_t) + 63) / 64 * 64);
        if (!tail) return -1;
        memcpy(tail, x + whole * K, (M - whole) * K * sizeof(uint16_t));
        memset(tail + (M - whole) * K, 0, (AMX_ROWS - (M - whole)) * K * sizeof(uint16_t));
    }
#pragma omp parallel num_threads(threads)
    {
        amx_configure(NULL, NULL);
        /* Each thread its share of the panels, AMX_PANEL_BYTES of them at a time (kept in L2) while
         * every block of rows passes (each block's rows stay in L1 across the panels). */
        const int64_t team = omp_get_num_threads(), me = omp_get_thread_num();
        const int64_t first = panels * me / team, last = panels * (me + 1) / team;
        int64_t step = AMX_PANEL_BYTES / ((gated ? 2 : 1) * panel_size * (int64_t)sizeof(uint16_t));
        if (step < 1) step = 1;
        for (int64_t p0 = first; p0 < last; p0 += step)
            for (int64_t m = 0; m < M; m += 2 * AMX_ROWS) {
                const uint16_t *x0 = m < whole ? x + m * K : tail;
                const uint16_t *x1 = m + AMX_ROWS >= M ? NULL : m + AMX_ROWS < whole ? x + (m + AMX_ROWS) * K : tail;
                const int64_t rows = M - m < 2 * AMX_ROWS ? M - m : 2 * AMX_ROWS;
                for (int64_t p = p0; p < last && p < p0 + step; ++p) {
                    if (gated) {
                        amx_block_gated(x0, x1, w + p * panel_size, w + (p + panels) * panel_size, K, rows, N / 2,
                                        (uint16_t *)y + m * (N / 2) + p * NR2);
                        continue;
                    }
                    const int cols = (int)(N - p * NR2 < NR2 ? N - p * NR2 : NR2);
                    amx_block(x0, x1, w + p * panel_size, K, rows, N, cols, bias ? bias + p * NR2 : NULL,
                              (char *)y + (size_t)(m * N + p * NR2) * element, y_bf16);
                }
            }
        _tile_release();
    }
    free(tail);
    return 0;
}
#endif

/* x [M, K] bfloat16 against pair panels of W [N, K]; y as in gemm. */
int gemm_pairs(const uint16_t *x, int64_t M, int64_t K, const uint16_t *w, int64_t N, const float *bias, void *y,
               int y_bf16, int threads) {
#if defined(AMX_BUILT)
    if (K % 32 == 0 && amx_permitted()) return gemm_pairs_amx(x, M, K, w, N, bias, y, y_bf16, threads, 0);
#endif
    const int64_t panels = (N + NR2 - 1) / NR2, panel_size = (K + 1) / 2 * 2 * NR2;
    const int64_t kc = K > KBLOCK_AFTER ? KBLOCK : K;
    int64_t chunk = CHUNK_BYTES / (kc * (int64_t)sizeof(uint16_t)) / MR2 * MR2;
    if (kc < K && chunk > KBLOCK_ROWS) chunk = KBLOCK_ROWS;
    if (chunk < MR2) chunk = MR2;
    const size_t element = y_bf16 ? 2 : 4;
#pragma omp parallel num_threads(threads)
    for (int64_t m = 0; m < M; m += chunk) {
        const int64_t rows = M - m < chunk ? M - m : chunk;
#pragma omp for schedule(static)
        for (int64_t p = 0; p < panels; ++p) {
            const int cols = (int)(N - p * NR2 < NR2 ? N - p * NR2 : NR2);
            panel_pairs(x + m * K, rows, K, kc, w + p * panel_size, p + 1 < panels ? w + (p + 1) * panel_size : NULL, N,
                        cols, bias ? bias + p * NR2 : NULL, (char *)y + (size_t)(m * N + p * NR2) * element, y_bf16);
        }
    }
    return 0;
}

/* x [M, K] bfloat16 against the pair panels of a gated MLP's [gate; up] weight ([N, K], N = 2I):
 * y [M, I] bfloat16 = silu(x gate^T) * (x up^T), each product's float32 sums taken into the
 * activation and rounded once. -1 (nothing written) where it does not run here: no AMX, or K or I
 * not a multiple of 32; the caller then runs gemm_pairs and the activation apart. */
int gemm_pairs_gated(const uint16_t *x, int64_t M, int64_t K, const uint16_t *w, int64_t N, uint16_t *y,
                     int threads) {
#if defined(AMX_BUILT)
    if (K % 32 == 0 && N % 64 == 0 && amx_permitted()) return gemm_pairs_amx(x, M, K, w, N, NULL, y, 1, threads, 1);
#endif
    (void)x, (void)M, (void)K, (void)w, (void)N, (void)y, (void)threads;
    return -1;
}
#else
int gemm_pairs_available(void) { return 0; }

int gemm_pairs(const uint16_t *x, int64_t M, int64_t K, const uint16_t *w, int64_t N, const float *bias, void *y,
               int y_bf16, int threads) {
    (void)x, (void)M, (void)K, (void)w, (void)N, (void)bias, (void)y, (void)y_bf16, (void)threads;
    return -1;
}

int gemm_pairs_gated(const uint16_t *x, int64_t M, int64_t K, const uint16_t *w, int64_t N, uint16_t *y,
                     int threads) {
    (void)x, (void)M, (void)K, (void)w, (void)N, (void)y, (void)threads;
    return -1;
}
#endif

#else

int gemm_available(void) { return 0; }
int gemm_pairs_available(void) { return 0; }

int gemm_pairs(const uint16_t *x, int64_t M, int64_t K, const uint16_t *w, int64_t N, const float *bias, void *y,
               int y_bf16, int threads) {
    (void)x, (void)M, (void)K, (void)w, (void)N, (void)bias, (void)y, (void)y_bf16, (void)threads;
    return -1;
}

int gemm_pairs_gated(const uint16_t *x, int64_t M, int64_t K, const uint16_t *w, int64_t N, uint16_t *y,
                     int threads) {
    (void)x, (void)M, (void)K, (void)w, (void)N, (void)y, (void)threads;
    return -1;
}

int gemm(const void *x, int x_bf16, int64_t M, int64_t K, const void *w, int w_bf16, int64_t N,
         const float *bias, void *y, int y_bf16, int threads) {
    (void)x, (void)x_bf16, (void)M, (void)K, (void)w, (void)w_bf16, (void)N, (void)bias, (void)y;
    (void)y_bf16, (void)threads;
    return -1;
}

#endif
