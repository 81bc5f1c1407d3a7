// RMSNorm in one pass per row (AVX512, float32): out = x * (1 / sqrt(mean(x^2) + eps)) * w.
// torch runs it as six ops (pow, mean, add, rsqrt, mul, mul), each a pass over the tensor.
//
// Rows are grouped: x holds T groups of P rows of D values (group stride `stride` floats,
// rows of a group contiguous); row p of every group uses weight row p (w: [P, D]). A plain
// norm is P = 1; the per-head QK norm is P = heads, reading the q and k heads in place from the
// fused QKV output. out: [T, P, D] contiguous. Every row is computed alone (batch invariant).
// cos, sin ([T, D/2], or NULL): the rotary embedding of group t's position, applied after the norm.
// w NULL: no norm, the rows copied (then rotated): the rotary alone, for models without QK norm.
#include <immintrin.h>

#include "avx2_compat.h"
#include <math.h>
#include <stdint.h>

// Rotate-half rotary embedding of one row in place, rounded as torch's
// cat((x1 * c - x2 * s, x2 * c + x1 * s)) is (a multiply, a multiply, then the sum).
static void rope_row(float *o, int64_t D, const float *c, const float *s) {
    const int64_t half = D / 2;
    int64_t i = 0;
    for (; i + 16 <= half; i += 16) {
        const __m512 a = _mm512_loadu_ps(o + i), b = _mm512_loadu_ps(o + half + i);
        const __m512 cv = _mm512_loadu_ps(c + i), sv = _mm512_loadu_ps(s + i);
        _mm512_storeu_ps(o + i, _mm512_sub_ps(_mm512_mul_ps(a, cv), _mm512_mul_ps(b, sv)));
        _mm512_storeu_ps(o + half + i, _mm512_add_ps(_mm512_mul_ps(b, cv), _mm512_mul_ps(a, sv)));
    }
    for (; i < half; i++) {
        const float a = o[i], b = o[half + i];
        o[i] = a * c[i] - b * s[i];
        o[half + i] = b * c[i] + a * s[i];
    }
}

void rms_norm(const float *x, int64_t T, int64_t P, int64_t D, int64_t stride, const float *w,
              float eps, const float *cos, const float *sin, float *out, int nthreads) {
    // A decode row's few KiB cost less than waking the other threads (a step has ~100 norms).
    if (T * P * D < 8192) nthreads = 1;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t r = 0; r < T * P; r++) {
        const int64_t t = r / P, p = r % P;
        const float *xr = x + t * stride + p * D;
        const float *wr = w ? w + p * D : 0;
        float *o = out + r * D;
        if (!w) {
            for (int64_t d = 0; d < D; d++) o[d] = xr[d];
            if (cos) rope_row(o, D, cos + t * (D / 2), sin + t * (D / 2));
            continue;
        }
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
        if (cos) rope_row(o, D, cos + t * (D / 2), sin + t * (D / 2));
    }
}
