// The gated MLP's activation in one pass (AVX512-BF16): out = bf16(act(gate) * up), from the
// fused gate_up projection's float32 output [T, 2I] (gate: the first I columns, up: the last I)
// straight into the bfloat16 input of the down projection. torch takes four passes (act, mul,
// the cast, and a copy for the slices).
//
//   act 0: silu(x)      = x / (1 + e^-x)
//   act 1: gelu_tanh(x) = 0.5 x (1 + tanh(y)) = x / (1 + e^(-2y)),  y = sqrt(2/pi) (x + 0.044715 x^3)
//
// Elementwise (e^x from simd_math.h), so every row is independent.
#include <immintrin.h>

#include "avx2_compat.h"
#include <stdint.h>

#include "simd_math.h"

static inline __m512 act512(__m512 x, int act) {
    __m512 z;  // act(x) = x / (1 + e^z)
    if (act == 0) {
        z = _mm512_sub_ps(_mm512_setzero_ps(), x);
    } else {
        const __m512 x3 = _mm512_mul_ps(_mm512_mul_ps(x, x), x);
        const __m512 y = _mm512_mul_ps(_mm512_set1_ps(0.7978845608028654f),
                                       _mm512_fmadd_ps(_mm512_set1_ps(0.044715f), x3, x));
        z = _mm512_mul_ps(_mm512_set1_ps(-2.0f), y);
    }
    return _mm512_div_ps(x, _mm512_add_ps(_mm512_set1_ps(1.0f), exp512(z)));
}

// 16 outputs of a row from its gate g[0..15] and up g[I..I + 15].
static inline void act16(const float *g, int64_t I, int act, uint16_t *out) {
    const __m512 y = _mm512_mul_ps(act512(_mm512_loadu_ps(g), act), _mm512_loadu_ps(g + I));
    _mm256_storeu_si256((__m256i *)out, (__m256i)_mm512_cvtneps_pbh(y));
}

// One row on the calling thread (moe.c's): gu float32 [2I] -> out bfloat16 [I].
void gated_act_row(const float *gu, int64_t I, int act, uint16_t *out) {
    for (int64_t i = 0; i < I; i += 16) act16(gu + i, I, act, out + i);
}

// gu: float32 [T, 2I]; out: bfloat16 [T, I]; I % 16 == 0.
void gated_act(const float *gu, int64_t T, int64_t I, int act, uint16_t *out, int nthreads) {
    const int64_t per_row = I / 16;
    if (T * I < 4096) nthreads = 1;  // a decode row's activation: cheaper on one thread
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t t = 0; t < T * per_row; t++) {
        const int64_t row = t / per_row, i = (t % per_row) * 16;
        act16(gu + row * 2 * I + i, I, act, out + row * I + i);
    }
}
