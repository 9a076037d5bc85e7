/* float32 -> bfloat16 rounding, shared by the kernels (the other way is a 16-bit shift). */
#ifndef TREEBATCH_BF16_H
#define TREEBATCH_BF16_H

#include <stdint.h>
#include <string.h>

/* Round to nearest even, as torch rounds; a NaN stays a NaN. */
static inline uint16_t bf16_round(float value) {
    uint32_t bits;
    memcpy(&bits, &value, sizeof bits);
    if ((bits & 0x7f800000u) == 0x7f800000u && (bits & 0x007fffffu))
        return (uint16_t)((bits >> 16) | 0x40);
    return (uint16_t)((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

#endif
