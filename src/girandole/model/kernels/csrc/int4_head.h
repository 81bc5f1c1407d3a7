// Shared by the 4-bit LM head's kernels (int4_head.c on VNNI, amx.c on the tiles).
#pragma once
#include <stdint.h>
#include <stdlib.h>

// Each row's sums of x per group of 32 inputs, as floats (the minimums' term of the head's
// logits): a malloc'ed [M][K / 32] array for the caller to free.
static inline float *int4_head_group_sums(const int8_t *x, int64_t M, int64_t K) {
    const int64_t groups = K / 32;
    float *xsum = malloc(sizeof(float) * (size_t)(M * groups + 1));
    for (int64_t m = 0; m < M; m++)
        for (int64_t g = 0; g < groups; g++) {
            int32_t s = 0;
            for (int k = 0; k < 32; k++) s += x[m * K + 32 * g + k];
            xsum[m * groups + g] = (float)s;
        }
    return xsum;
}
