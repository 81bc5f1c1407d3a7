// Coarse logits of the LM head from a 4-bit copy of the output weight, on AVX512-VNNI:
//
//   y[m][n] = xs[m] * sum_g (scale[n][g] * sum_{k in g} q[n][k] x[m][k] + min[n][g] * sum_{k in g} x[m][k])
//
// x int8 (the hidden state quantized per row, scale xs), q in 0..15 with a float16 scale and
// minimum per vocabulary row and group of 32 inputs (w = q * scale + min). 5 bits a weight
// where the int8 copy takes 8: a decode step streams 105 MB instead of 168 MB for Gemma 3's 262k
// vocabulary, and the coarse logits are only used to pick the candidates that QuantLMHead then
// recomputes exactly (its margin covers this copy's error; see layers.py).
//
// vpdpbusd multiplies unsigned by signed bytes: the levels are the unsigned side, x the signed.
// Rows are independent and summed group by group in the same order: batch invariant.
//
// Layout (kernels/int4_head.py): tasks of up to 4 blocks of 16 channels, each task group-major
// ([task][K/32 groups][block], one sequential stream), a block-group 320 bytes: 256 bytes of
// levels, then 16 float16 scales and 16 float16 minimums (one per channel). In the levels,
// byte 64 j + 4 c + i holds input 8 j + i (low nibble) and 8 j + 4 + i (high nibble) of channel c,
// for j < 4, i < 4: each 64-byte line gives two vpdpbusd operands of 16 channels x 4 inputs.
#include <immintrin.h>

#include "avx2_compat.h"
#include <stdint.h>
#include <stdlib.h>

#include "int4_head.h"

#define BLOCK_BYTES 320
#define BLOCKS 4  // 16-channel blocks per task (64 channels)

#define BCAST(xr, k) _mm512_set1_epi32(*(const int32_t *)((xr) + (k)))

// acc + the products of levels lo and hi with inputs x0 and x4, summed 4 by 4 (vpdpbusd). On
// AVX2 they stay 16-bit pair sums until dot_widen: levels below 16 and |x| <= 127, so a group's
// 8 operands fit (8 x 2 x 15 x 127 < 2^15), the same integers as vpdpbusd's.
static inline __attribute__((always_inline)) __m512i dot_pairs(__m512i acc, __m512i lo, __m512i x0,
                                                               __m512i hi, __m512i x4) {
#ifdef GIR_AVX2
    acc.lo = _mm256_add_epi16(acc.lo, _mm256_add_epi16(_mm256_maddubs_epi16(lo.lo, x0.lo),
                                                       _mm256_maddubs_epi16(hi.lo, x4.lo)));
    acc.hi = _mm256_add_epi16(acc.hi, _mm256_add_epi16(_mm256_maddubs_epi16(lo.hi, x0.hi),
                                                       _mm256_maddubs_epi16(hi.hi, x4.hi)));
    return acc;
#else
    return _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(acc, lo, x0), hi, x4);
#endif
}

static inline __attribute__((always_inline)) __m512i dot_widen(__m512i acc) {
#ifdef GIR_AVX2
    const __m256i ones = _mm256_set1_epi16(1);
    acc.lo = _mm256_madd_epi16(acc.lo, ones);
    acc.hi = _mm256_madd_epi16(acc.hi, ones);
#endif
    return acc;
}

// The next task's lines prefetched into L2 while this task runs: on the Intel host it was
// written on, 3.8 -> 2.2 ms for the default model's head at one row; on AMD Zen 4 it costs
// 12-30 % instead (one row, cold: 262,144 x 640 2.99 -> 2.06 ms without it, 16,384 x 2,048 0.665
// -> 0.588, 128,256 x 2,048 4.86 -> 4.28; docs/benchmarks.md), so kernels/loader.py turns it off
// on AMD CPUs (int4_head_set_prefetch).
static int prefetch_next_task = 1;

void int4_head_set_prefetch(int on) { prefetch_next_task = on; }

// MT rows x bt blocks of one task: each 64-byte line of levels is unpacked once for the MT rows.
static inline __attribute__((always_inline)) void tile(const int8_t *x, int64_t K,
                                                       const float *xsum, int64_t groups,
                                                       const uint8_t *w, const float *xs,
                                                       float *y, int64_t N, int MT, int bt,
                                                       const uint8_t *pf) {
    const __m512i nibble = _mm512_set1_epi8(15);
    __m512 acc[4][BLOCKS];
    for (int r = 0; r < MT; r++)
        for (int b = 0; b < bt; b++) acc[r][b] = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; g++) {
        if (pf && prefetch_next_task) {  // the next task's lines on their way, as many as this group's
            for (int64_t i = 0; i < bt * BLOCK_BYTES; i += 64)
                _mm_prefetch((const char *)pf + g * bt * BLOCK_BYTES + i, _MM_HINT_T1);
        }
        for (int b = 0; b < bt; b++) {
            const uint8_t *blk = w + (g * bt + b) * BLOCK_BYTES;
            __m512i dot[4];
            for (int r = 0; r < MT; r++) dot[r] = _mm512_setzero_si512();
            for (int j = 0; j < 4; j++) {
                const __m512i v = _mm512_loadu_si512((const void *)(blk + 64 * j));
                const __m512i lo = _mm512_and_si512(v, nibble);
                const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), nibble);
                for (int r = 0; r < MT; r++) {
                    const int8_t *xr = x + r * K + 32 * g + 8 * j;
                    dot[r] = dot_pairs(dot[r], lo, BCAST(xr, 0), hi, BCAST(xr, 4));
                }
            }
            for (int r = 0; r < MT; r++) dot[r] = dot_widen(dot[r]);
            const __m512 scale =
                _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(blk + 256)));
            const __m512 mn = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(blk + 288)));
            for (int r = 0; r < MT; r++) {
                acc[r][b] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[r]), scale, acc[r][b]);
                acc[r][b] = _mm512_fmadd_ps(mn, _mm512_set1_ps(xsum[r * groups + g]), acc[r][b]);
            }
        }
    }
    for (int r = 0; r < MT; r++) {
        const __m512 sx = _mm512_set1_ps(xs[r]);
        for (int b = 0; b < bt; b++)
            _mm512_storeu_ps(y + r * N + 16 * b, _mm512_mul_ps(acc[r][b], sx));
    }
}

static inline __attribute__((always_inline)) void task(const int8_t *x, int64_t M, int64_t K,
                                                       const float *xsum, int64_t groups,
                                                       const uint8_t *w, const float *xs,
                                                       float *y, int64_t N, int bt,
                                                       const uint8_t *pf) {
    int64_t m = 0;
    for (; m + 4 <= M; m += 4)
        tile(x + m * K, K, xsum + m * groups, groups, w, xs + m, y + m * N, N, 4, bt,
             m == 0 ? pf : NULL);
    for (; m < M; m++)
        tile(x + m * K, K, xsum + m * groups, groups, w, xs + m, y + m * N, N, 1, bt,
             m == 0 ? pf : NULL);
}

// x int8 [M][K], xs float [M], w (layout above) for N channels; y float [M][N]. K % 32 == 0,
// N % 16 == 0.
void int4_head_gemm(const int8_t *x, int64_t M, int64_t K, const uint8_t *w, const float *xs,
                    int64_t N, float *y, int nthreads) {
    const int64_t nblocks = N / 16, groups = K / 32;
    const int64_t ntasks = (nblocks + BLOCKS - 1) / BLOCKS;
    float *xsum = int4_head_group_sums(x, M, K);
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t t = 0; t < ntasks; t++) {
        const int64_t nb = t * BLOCKS;
        const int bt = nblocks - nb < BLOCKS ? (int)(nblocks - nb) : BLOCKS;
        const uint8_t *wt = w + nb * groups * BLOCK_BYTES;
        float *yt = y + 16 * nb;
        // Only ahead of a whole task: the next one starts right after this one.
        const uint8_t *pf = t + 1 < ntasks && bt == BLOCKS ? wt + BLOCKS * groups * BLOCK_BYTES : NULL;
        switch (bt) {
        case 4: task(x, M, K, xsum, groups, wt, xs, yt, N, 4, pf); break;
        case 3: task(x, M, K, xsum, groups, wt, xs, yt, N, 3, pf); break;
        case 2: task(x, M, K, xsum, groups, wt, xs, yt, N, 2, pf); break;
        default: task(x, M, K, xsum, groups, wt, xs, yt, N, 1, pf); break;
        }
    }
    free(xsum);
}
