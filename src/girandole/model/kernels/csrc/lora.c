// LoRA deltas of a mixed batch in one call per linear (the segmented gather matmul of punica /
// S-LoRA, per row): for every row t that runs an adapter (s = slot[t] >= 0),
//
//   h = A_s x_t          A_s: float32 [R_s, K]
//   y_t += Bt_s^T h      Bt_s: float32 [R_s, N] (B transposed, the scaling folded in)
//
// Rows of the base model (slot -1) are left alone. Each row is computed on its own, in a fixed
// order, so its numbers do not depend on the other rows of the batch.
#include <immintrin.h>
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

// x [T, K], y [T, N] (both float32, rows contiguous); slot [T]; a, bt, rank: per slot.
// h: scratch float32 [T, MAX_RANK].
void lora_apply(const float *x, int64_t T, int64_t K, const int32_t *slot, const int64_t *a,
                const int64_t *bt, const int64_t *rank, int64_t N, float *y, float *h,
                int nthreads) {
    // h = A x, one dot product per (row, rank index)
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t i = 0; i < T * MAX_RANK; i++) {
        const int64_t t = i / MAX_RANK, r = i % MAX_RANK;
        const int32_t s = slot[t];
        if (s < 0 || r >= rank[s]) continue;
        h[i] = dot((const float *)a[s] + r * K, x + t * K, K);
    }
    // y += Bt^T h, over chunks of 64 output columns
    const int64_t chunks = (N + 63) / 64;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t i = 0; i < T * chunks; i++) {
        const int64_t t = i / chunks, n0 = (i % chunks) * 64;
        const int32_t s = slot[t];
        if (s < 0) continue;
        const float *b = (const float *)bt[s];
        const float *ht = h + t * MAX_RANK;
        float *yt = y + t * N;
        for (int64_t n = n0; n < n0 + 64 && n < N; n += 16) {
            const __mmask16 m = N - n >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (N - n)) - 1);
            __m512 acc = _mm512_maskz_loadu_ps(m, yt + n);
            for (int64_t r = 0; r < rank[s]; r++)
                acc = _mm512_fmadd_ps(_mm512_set1_ps(ht[r]), _mm512_maskz_loadu_ps(m, b + r * N + n), acc);
            _mm512_mask_storeu_ps(yt + n, m, acc);
        }
    }
}
