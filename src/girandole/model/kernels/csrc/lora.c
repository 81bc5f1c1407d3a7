// LoRA deltas of a mixed batch in one call per linear (the segmented gather matmul of punica /
// S-LoRA, per row): for every row t that runs an adapter (s = slot[t] >= 0),
//
//   h = A_s x_t          A_s: float32 [R_s, K]
//   y_t += Bt_s^T h      Bt_s: float32 [R_s, N] (B transposed, the scaling folded in)
//
// Rows of the base model (slot -1) are left alone. Each row is computed on its own, in a fixed
// order, so its numbers do not depend on the other rows of the batch.
#include <immintrin.h>

#include "avx2_compat.h"
#include <stdint.h>

#define MAX_RANK 192  // 3 fused projections of rank 64

static inline float dot(const float *a, const float *b, int64_t k) {
    __m512 acc = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= k; i += 16)
        acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc);
    if (i < k) {
        const __mmask16 m = (__mmask16)((1u << (k - i)) - 1);
        acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + i), _mm512_maskz_loadu_ps(m, b + i), acc);
    }
    return _mm512_reduce_add_ps(acc);
}

// y_t += Bt^T h over 128 columns at a time: 8 accumulators, each row of Bt read contiguously.
static inline void project_back(const float *h, int64_t R, const float *bt, int64_t N, float *y) {
    int64_t n = 0;
    for (; n + 128 <= N; n += 128) {
        __m512 acc[8];
        for (int j = 0; j < 8; j++) acc[j] = _mm512_loadu_ps(y + n + 16 * j);
        for (int64_t r = 0; r < R; r++) {
            const __m512 hr = _mm512_set1_ps(h[r]);
            const float *b = bt + r * N + n;
            for (int j = 0; j < 8; j++) acc[j] = _mm512_fmadd_ps(hr, _mm512_loadu_ps(b + 16 * j), acc[j]);
        }
        for (int j = 0; j < 8; j++) _mm512_storeu_ps(y + n + 16 * j, acc[j]);
    }
    for (; n < N; n += 16) {
        const __mmask16 m = N - n >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (N - n)) - 1);
        __m512 acc = _mm512_maskz_loadu_ps(m, y + n);
        for (int64_t r = 0; r < R; r++)
            acc = _mm512_fmadd_ps(_mm512_set1_ps(h[r]), _mm512_maskz_loadu_ps(m, bt + r * N + n), acc);
        _mm512_mask_storeu_ps(y + n, m, acc);
    }
}

// x [T, K], y [T, N] (both float32, rows contiguous); slot [T]; a, bt, rank: per slot (a rank
// of 0: the adapter does not target this linear). One parallel region over the rows; a batch
// too small to share out runs on one thread (a region's start and end cost more than it).
void lora_apply(const float *x, int64_t T, int64_t K, const int32_t *slot, const int64_t *a,
                const int64_t *bt, const int64_t *rank, int64_t N, float *y, int nthreads) {
    int64_t work = 0;
    for (int64_t t = 0; t < T; t++)
        if (slot[t] >= 0) work += rank[slot[t]] * (K + N);
    if (work < (1 << 20)) nthreads = 1;
#pragma omp parallel for num_threads(nthreads) schedule(static, 1)
    for (int64_t t = 0; t < T; t++) {
        const int32_t s = slot[t];
        if (s < 0 || rank[s] == 0) continue;
        float h[MAX_RANK];
        const float *as = (const float *)a[s];
        for (int64_t r = 0; r < rank[s]; r++) h[r] = dot(as + r * K, x + t * K, K);
        project_back(h, rank[s], (const float *)bt[s], N, y + t * N);
    }
}
