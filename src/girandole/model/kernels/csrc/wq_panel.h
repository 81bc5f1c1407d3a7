// One panel of wq_gemm.c's layout dequantized: 16 output channels x 32 inputs of one group as
// 16 vectors of 16 (channel, input pair) bf16 pairs, w = bf16(q * scale + offset). Shared by the
// AVX512 kernel (wq_gemm.c) and the AMX one (amx.c), for which the panel is a B tile.
//
// `bits`: the levels' width (4, 5 or 8) in its low 4 bits, or'ed with
//   WQ_FUSED: every weight's q * scale + offset is exact in float32 (see dequant_panel);
//   WQ_HALF:  the scales and offsets are stored as float16 (they are exactly, as GGUF's Q4_0,
//             Q4_1, Q5_0, Q5_1 and Q8_0 store them): half the bytes of float32 ones.
// A block's group (16 channels x 32 inputs, 16 pairs of 32 values) is stored as
//   4 bits: 16 x 16 bytes, byte i of pair p = value i | value (i + 16) << 4;
//   5 bits: those 256 bytes of the low 4 bits, then 16 x 4 bytes: bit i of pair p's word is
//           bit 4 of value i (62.5 % of the bytes of one byte a level);
//   8 bits: 16 x 32 bytes, one a value.
#pragma once
#include <immintrin.h>
#include <stdint.h>

#define WQ_LEVEL_BITS 15
#define WQ_FUSED 16
#define WQ_HALF 32

// Bytes of one block's group of levels (16 channels x 32 inputs).
static inline int64_t wq_group_bytes(int bits) {
    switch (bits & WQ_LEVEL_BITS) {
    case 4: return 256;
    case 5: return 320;
    default: return 512;
    }
}

// Bytes of one block's group of (16 scales, 16 offsets).
static inline int64_t wq_param_bytes(int bits) { return bits & WQ_HALF ? 64 : 128; }

static inline __m512 wq_load_params(const uint8_t *p, int half) {
    return half ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p))
                : _mm512_loadu_ps((const float *)p);
}

static inline void dequant_panel(const uint8_t *q, int bits, const uint8_t *params,
                                 __m512i *panel) {
    const __m512i lo_idx = _mm512_set_epi32(7, 7, 6, 6, 5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0);
    const __m512i hi_idx =
        _mm512_set_epi32(15, 15, 14, 14, 13, 13, 12, 12, 11, 11, 10, 10, 9, 9, 8, 8);
    const int half = bits & WQ_HALF;
    const __m512 s = wq_load_params(params, half);
    const __m512 o = wq_load_params(params + (half ? 32 : 64), half);
    const __m512 s_lo = _mm512_permutexvar_ps(lo_idx, s), s_hi = _mm512_permutexvar_ps(hi_idx, s);
    const __m512 o_lo = _mm512_permutexvar_ps(lo_idx, o), o_hi = _mm512_permutexvar_ps(hi_idx, o);
    const __m512i nibble = _mm512_set1_epi32(15), sixteen = _mm512_set1_epi32(16);
    const int fused = bits & WQ_FUSED;
    const int level_bits = bits & WQ_LEVEL_BITS;
    for (int p = 0; p < 16; p++) {
        __m512i lo, hi;
        if (level_bits == 8) {
            lo = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(q + 32 * p)));
            hi = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(q + 32 * p + 16)));
        } else {
            __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(q + 16 * p)));
            lo = _mm512_and_si512(v, nibble);
            hi = _mm512_srli_epi32(v, 4);
            if (level_bits == 5) {  // the fifth bit, as a mask of the lanes that have it
                const uint32_t top = *(const uint32_t *)(q + 256 + 4 * p);
                lo = _mm512_mask_or_epi32(lo, (__mmask16)top, lo, sixteen);
                hi = _mm512_mask_or_epi32(hi, (__mmask16)(top >> 16), hi, sixteen);
            }
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
