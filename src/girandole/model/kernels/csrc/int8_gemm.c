// Integer GEMM for the LM head's coarse logits on x86 CPUs with AVX512-VNNI:
//
//   y[M][N] = (float)(sum_k x[m][k] * w[n][k]) * xs[m] * ws[n]     (x, w int8; sums int32)
//
// The same integers as torch._int_mm (integer sums are exact), then the same two float
// multiplications in the same order: bitwise the coarse logits torch computes, faster for a
// few rows. Rows are independent: a row's result does not depend on the others.
//
// vpdpbusd multiplies unsigned by signed bytes, so x is offset by 128 (its sign bit flipped)
// and 128 * sum_k w[n][k] (`wsum`) is subtracted.
//
// Layout of w (made by kernels/int8_gemm.py): [N/16][K/4][16 channels][4 inputs].
#include <immintrin.h>

#include "avx2_compat.h"
#include <stdint.h>

#define BLOCKS 4  // 16-channel blocks per task (64 channels)

static inline __attribute__((always_inline)) void tile(const int8_t *x, int64_t K, const int8_t *w,
                                                       int64_t quads, const __m512i *wsum128,
                                                       const float *xs, const __m512 *ws,
                                                       float *y, int64_t N, int MT, int BT,
                                                       const int8_t *pf) {
    __m512i acc[4][BLOCKS];
    for (int r = 0; r < MT; r++)
        for (int b = 0; b < BT; b++) acc[r][b] = _mm512_setzero_si512();
    const __m512i flip = _mm512_set1_epi32((int)0x80808080u);
    for (int64_t k4 = 0; k4 < quads; k4++) {
        if (pf) {  // the next task's weights (as many bytes as this one's), 4 lines a step
            _mm_prefetch((const char *)pf + 256 * k4, _MM_HINT_T1);
            _mm_prefetch((const char *)pf + 256 * k4 + 64, _MM_HINT_T1);
            _mm_prefetch((const char *)pf + 256 * k4 + 128, _MM_HINT_T1);
            _mm_prefetch((const char *)pf + 256 * k4 + 192, _MM_HINT_T1);
        }
        __m512i wv[BLOCKS];
        for (int b = 0; b < BT; b++)
            wv[b] = _mm512_loadu_si512((const void *)(w + (b * quads + k4) * 64));
        for (int r = 0; r < MT; r++) {
            const __m512i xr =
                _mm512_xor_si512(_mm512_set1_epi32(*(const int32_t *)(x + r * K + 4 * k4)), flip);
            for (int b = 0; b < BT; b++) acc[r][b] = _mm512_dpbusd_epi32(acc[r][b], xr, wv[b]);
        }
    }
    for (int r = 0; r < MT; r++) {
        const __m512 sx = _mm512_set1_ps(xs[r]);
        for (int b = 0; b < BT; b++) {
            __m512 v = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc[r][b], wsum128[b]));
            _mm512_storeu_ps(y + r * N + 16 * b, _mm512_mul_ps(_mm512_mul_ps(v, sx), ws[b]));
        }
    }
}

static inline __attribute__((always_inline)) void task(const int8_t *x, int64_t M, int64_t K,
                                                       const int8_t *w, const int32_t *wsum,
                                                       const float *xs, const float *wscale,
                                                       float *y, int64_t N, int BT,
                                                       const int8_t *pf) {
    const int64_t quads = K / 4;
    __m512i wsum128[BLOCKS];
    __m512 ws[BLOCKS];
    for (int b = 0; b < BT; b++) {
        wsum128[b] = _mm512_slli_epi32(_mm512_loadu_si512((const void *)(wsum + 16 * b)), 7);
        ws[b] = _mm512_loadu_ps(wscale + 16 * b);
    }
    int64_t m = 0;
    for (; m + 4 <= M; m += 4)
        tile(x + m * K, K, w, quads, wsum128, xs + m, ws, y + m * N, N, 4, BT,
             m == 0 ? pf : NULL);
    for (; m < M; m++)
        tile(x + m * K, K, w, quads, wsum128, xs + m, ws, y + m * N, N, 1, BT,
             m == 0 ? pf : NULL);
}

void int8_gemm(const int8_t *x, int64_t M, int64_t K, const int8_t *w, const int32_t *wsum,
               const float *xs, const float *wscale, int64_t N, float *y, int nthreads) {
    const int64_t nblocks = N / 16, ntasks = (nblocks + BLOCKS - 1) / BLOCKS;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t t = 0; t < ntasks; t++) {
        const int64_t nb = t * BLOCKS;
        const int bt = nblocks - nb < BLOCKS ? (int)(nblocks - nb) : BLOCKS;
        const int8_t *wt = w + nb * 16 * K;
        float *yt = y + 16 * nb;
        const int8_t *pf = t + 1 < ntasks && bt == BLOCKS ? wt + BLOCKS * 16 * K : NULL;
        switch (bt) {
        case 4: task(x, M, K, wt, wsum + 16 * nb, xs, wscale + 16 * nb, yt, N, 4, pf); break;
        case 3: task(x, M, K, wt, wsum + 16 * nb, xs, wscale + 16 * nb, yt, N, 3, pf); break;
        case 2: task(x, M, K, wt, wsum + 16 * nb, xs, wscale + 16 * nb, yt, N, 2, pf); break;
        default: task(x, M, K, wt, wsum + 16 * nb, xs, wscale + 16 * nb, yt, N, 1, pf); break;
        }
    }
}
