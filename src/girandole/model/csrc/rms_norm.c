// RMSNorm in one pass per row (AVX512, float32): out = x * (1 / sqrt(mean(x^2) + eps)) * w.
// torch runs it as six ops (pow, mean, add, rsqrt, mul, mul), each a pass over the tensor.
//
// Rows are grouped: x holds T groups of P rows of D values (group stride `stride` floats,
// rows of a group contiguous); row p of every group uses weight row p (w: [P, D]). A plain
// norm is P = 1; the per-head QK norm is P = heads, reading the q and k heads in place from the
// fused QKV output. out: [T, P, D] contiguous. Every row is computed alone (batch invariant).
#include <immintrin.h>
#include <math.h>
#include <stdint.h>

void rms_norm(const float *x, int64_t T, int64_t P, int64_t D, int64_t stride, const float *w,
              float eps, float *out, int nthreads) {
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t r = 0; r < T * P; r++) {
        const int64_t t = r / P, p = r % P;
        const float *xr = x + t * stride + p * D;
        const float *wr = w + p * D;
        float *o = out + r * D;
        __m512 acc = _mm512_setzero_ps();
        int64_t d = 0;
        for (; d + 16 <= D; d += 16) {
            const __m512 v = _mm512_loadu_ps(xr + d);
            acc = _mm512_fmadd_ps(v, v, acc);
        }
        float ss = _mm512_reduce_add_ps(acc);
        for (; d < D; d++) ss += xr[d] * xr[d];
        const float inv = 1.0f / sqrtf(ss / (float)D + eps);
        const __m512 vi = _mm512_set1_ps(inv);
        for (d = 0; d + 16 <= D; d += 16)
            _mm512_storeu_ps(o + d, _mm512_mul_ps(_mm512_mul_ps(_mm512_loadu_ps(xr + d), vi),
                                                  _mm512_loadu_ps(wr + d)));
        for (; d < D; d++) o[d] = xr[d] * inv * wr[d];
    }
}
