// One panel of wq_gemm.c's layout dequantized: 16 output channels x 32 inputs of one group as
// 16 vectors of 16 (channel, input pair) bf16 pairs, w = bf16(q * scale + offset). Shared by the
// AVX512 kernel (wq_gemm.c) and the AMX one (amx.c), for which the panel is a B tile.
#pragma once
#include <immintrin.h>
#include <stdint.h>

// Or'ed into `bits`: every weight's q * scale + offset is exact in float32 (see dequant_panel).
#define WQ_FUSED 16

// Bytes of one (channel, input) pair vector of levels: 16 at 4 bits, 32 at 8.
static inline int64_t wq_pair_bytes(int bits) { return (bits & ~WQ_FUSED) == 4 ? 16 : 32; }

static inline void dequant_panel(const uint8_t *q, int bits, const float *params,
                                 __m512i *panel){
    const __m512i lo_idx = _mm512_set_epi32(7, 7, 6, 6, 5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0);
    const __m512i hi_idx =
        _mm512_set_epi32(15, 15, 14, 14, 13, 13, 12, 12, 11, 11, 10, 10, 9, 9, 8, 8);
    const __m512 s = _mm512_loadu_ps(params), o = _mm512_loadu_ps(params + 16);
    const __m512 s_lo = _mm512_permutexvar_ps(lo_idx, s), s_hi = _mm512_permutexvar_ps(hi_idx, s);
    const __m512 o_lo = _mm512_permutexvar_ps(lo_idx, o), o_hi = _mm512_permutexvar_ps(hi_idx, o);
    const __m512i nibble = _mm512_set1_epi32(15);
    const int fused = bits & WQ_FUSED;
    bits &= ~WQ_FUSED;
    for (int p = 0; p < 16; p++) {
        __m512i lo, hi;
        if (bits == 4) {
            __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(q + 16 * p)));
            lo = _mm512_and_si512(v, nibble);
            hi = _mm512_srli_epi32(v, 4);
        } else {
            lo = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(q + 32 * p)));
            hi = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(q + 32 * p + 16)));
        }
        // q * scale + offset in two roundings (no FMA, -ffp-contract=off): the same float the
        // bf16 dense copy of the weight was made from. Where neither rounding rounds (WQ_FUSED,
        // checked when packing: GGUF's Q5_0 and Q8_0 and most Q4_K), one FMA gives that float
        // for fewer instructions.
        __m512 wl, wh;
        if (fused) {
            wl = _mm512_fmadd_ps(_mm512_cvtepi32_ps(lo), s_lo, o_lo);
            wh = _mm512_fmadd_ps(_mm512_cvtepi32_ps(hi), s_hi, o_hi);
        } else {
            wl = _mm512_add_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(lo), s_lo), o_lo);
            wh = _mm512_add_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(hi), s_hi), o_hi);
        }
        panel[p] = (__m512i)_mm512_cvtne2ps_pbh(wh, wl);  // low half from wl
    }
}
