/* float32 <-> bfloat16, shared by the kernels: rounding one way, a 16-bit shift (exact) the other. */
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

/* A bfloat16 is the upper half of a float32: widening is exact. */
static inline float bf16_widen(uint16_t value) {
    const uint32_t bits = (uint32_t)value << 16;
    float out;
    memcpy(&out, &bits, sizeof out);
    return out;
}

#endif
