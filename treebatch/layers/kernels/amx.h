/* What the AMX kernels share (amx_tile.h's attention, gemm.c's projections): the process's
 * permission to use the matrix unit, asked of the operating system once, and the tile
 * configuration, set by each thread at the start of a call and released at its end (so no other
 * code, oneDNN's GEMM among it, ever meets a configuration it did not set).
 */
#ifndef TREEBATCH_AMX_H
#define TREEBATCH_AMX_H

#include <stdint.h>
#include <string.h>

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512F__)
#define AMX_BUILT 1
#include <immintrin.h>
#include <sys/syscall.h>

long syscall(long number, ...); /* unistd.h declares it only outside strict C11 */

#define AMX_ROWS 16

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t bytes_per_row[16];
    uint8_t rows[16];
} AmxConfig;

/* -1: not asked yet; 0: the operating system refused the matrix unit; 1: granted. */
static int amx_granted = -1;

/* Whether this process may use the matrix unit: asks the first time (the answer is the same for
 * every thread, so a race only asks twice). */
static inline int amx_permitted(void) {
    int state = __atomic_load_n(&amx_granted, __ATOMIC_RELAXED);
    if (state < 0) {
        state = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */) == 0;
        __atomic_store_n(&amx_granted, state, __ATOMIC_RELAXED);
    }
    return state;
}

/* Every tile register sixteen rows of 64 bytes, but where `rows` or `bytes` name another shape
 * for one (-1 ends each list: register, then its rows or bytes per row). */
static inline void amx_configure(const int *rows, const int *bytes) {
    AmxConfig config;
    memset(&config, 0, sizeof config);
    config.palette = 1;
    for (int t = 0; t < 8; ++t) config.rows[t] = AMX_ROWS, config.bytes_per_row[t] = 64;
    for (; rows && rows[0] >= 0; rows += 2) config.rows[rows[0]] = (uint8_t)rows[1];
    for (; bytes && bytes[0] >= 0; bytes += 2) config.bytes_per_row[bytes[0]] = (uint16_t)bytes[1];
    _tile_loadconfig(&config);
}

#endif
#endif
