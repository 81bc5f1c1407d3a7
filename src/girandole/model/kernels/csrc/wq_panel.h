// One block's group of wq_gemm.c's layout dequantized: 16 output channels x 32 inputs,
// w = bf16(q * scale + offset), as 16 channel rows of 32 bf16 weights. Shared by the AVX512
// kernel (wq_gemm.c), which dots rows of x with them, and the AMX one (amx.c), for which they
// are an A tile.
//
// `bits`: the levels' width (4, 5 or 8) in its low 4 bits, or'ed with
//   WQ_FUSED: every weight's q * scale + offset is exact in float32 (see wq_scale);
//   WQ_HALF:  the scales and offsets are stored as float16 (they are exactly, as GGUF's Q4_0,
//             Q4_1, Q5_0, Q5_1 and Q8_0 store them): half the bytes of float32 ones.
//   WQ_FACTORED: each channel's scales (and offsets) over a superblock of 8 groups are exactly
//             a float32 factor times integers 0..255 (GGUF's K-quants: a float16 d times 6-bit
//             scales): a group's params are then 16 + 16 bytes, its superblock's factors
//             2 x 16 float32 (wq_gemm.c's layout): 0.75 bits a weight instead of 2. With
//             WQ_HALF too, the factors are float16 numbers, stored so (2 x 16 float16): 0.625.
// A block's group (16 channels x 32 inputs) is stored channel by channel:
//   4 bits: 4 lines of 32 little-endian 16-bit words; bits 4j..4j+3 of word i of line t are
//           the level of channel 4t + j at input i;
//   5 bits: those 256 bytes of the low 4 bits, then 32 words: bit c of word i is bit 4 of
//           channel c's level at input i (62.5 % of the bytes of one byte a level);
//   8 bits: 16 x 32 bytes, channel c's levels at bytes 32c.. in input order.
//
// WQ_VNNI: a block's group is stored in quads instead (wq_vnni.c's layout, for its int8
// kernel): quad k (64 bytes) holds byte 4c + b = the level of channel c at input 4k + b; 8-bit
// levels as quads 0..7; 4-bit: 4 x 64 bytes, quad j in the low nibbles and quad j + 4 in the
// high ones; 5-bit: those, then per quad a 64-bit word whose bit i is bit 4 of its byte i.
// dequant_rows gives the same bf16 channel rows from either layout (so the bf16 kernels serve
// the rows the int8 one does not: prefill).
//
// WQ_Q6K (level bits 6, with WQ_VNNI only): GGUF's Q6_K as the file stores it, w = d * sc * (q -
// 32) with q 0..63, an int8 sc per channel and 16 inputs and a float16 d per channel and 256
// inputs (6.5625 bits a weight, as the file; every w is exact in float32: d's 11 significant
// bits times sc's 7 times |q - 32|'s 5). A block's group is 384 bytes: the 4-bit layout's 256
// bytes of low nibbles, then 2 parts of 64 bytes, byte i of part h holding in bits 2t, 2t + 1
// bits 4 and 5 of quad 4h + t's byte i (t = 0..3). Its params: [2][16] int8, the 16 channels'
// sc for inputs 0..15 of the group, then for 16..31 (32 bytes); its superblock's factors: the
// 16 channels' d, float16 (32 bytes).
//
// Why by channel: a channel's group has at most 32 distinct weights, so the 4- and 5-bit
// levels become bf16 weights by one table lookup each (vpermw, 32 lanes at once) from a table
// of its group's q * scale + offset for every q, computed once: about half the instructions of
// converting and scaling every level (the AMX kernel's decode steps were bound by them).
#pragma once
#include <immintrin.h>

#include "avx2_compat.h"
#include <stdint.h>
#include <stdlib.h>

#define WQ_LEVEL_BITS 15
#define WQ_FUSED 16
#define WQ_HALF 32
#define WQ_FACTORED 64
#define WQ_VNNI 128  // the levels are in wq_vnni.c's layout (quads), not by channel
#define WQ_Q6K 6    // level bits of Q6_K's own format (with WQ_VNNI; see above)
#define WQ_SUPER 8  // groups of a superblock sharing factors
#define WQ_FACTOR_BYTES 128

// Bytes of one block's group of levels (16 channels x 32 inputs).
static inline int64_t wq_group_bytes(int bits) {
    switch (bits & WQ_LEVEL_BITS) {
    case 4: return 256;
    case 5: return 320;
    case WQ_Q6K: return 384;
    default: return 512;
    }
}

// Bytes of one block's group of (16 scales, 16 offsets).
static inline int64_t wq_param_bytes(int bits) {
    if ((bits & WQ_LEVEL_BITS) == WQ_Q6K) return 32;
    return bits & WQ_FACTORED ? 32 : bits & WQ_HALF ? 64 : 128;
}

// Whether the params are followed by per-superblock factors (WQ_FACTORED's, or Q6_K's d).
static inline int wq_has_factors(int bits) {
    return (bits & WQ_FACTORED) || (bits & WQ_LEVEL_BITS) == WQ_Q6K;
}

// Bytes of one block's superblock factors.
static inline int64_t wq_factor_bytes(int bits) {
    if ((bits & WQ_LEVEL_BITS) == WQ_Q6K) return 32;
    return bits & WQ_HALF ? WQ_FACTOR_BYTES / 2 : WQ_FACTOR_BYTES;
}

// Where a factored layout's superblock factors start: after every group's params.
static inline const uint8_t *wq_factors(const uint8_t *params, int bits, int64_t nblocks,
                                        int64_t groups) {
    return wq_has_factors(bits) ? params + nblocks * groups * wq_param_bytes(bits) : NULL;
}

// The factors of block `b` of a chunk whose first block is nb0 (bt blocks) at group g.
static inline const uint8_t *wq_block_factors(const uint8_t *factors, int bits, int64_t nb0,
                                              int64_t groups, int64_t g, int bt, int b) {
    if (factors == NULL) return NULL;
    const int64_t supers = groups / WQ_SUPER;
    return factors + (nb0 * supers + g / WQ_SUPER * bt + b) * wq_factor_bytes(bits);
}

// A block's group in the WQ_VNNI layout: its 8 quads of levels as bytes.
static inline __attribute__((always_inline)) void wq_vnni_quads(const uint8_t *q, int level_bits,
                                                                __m512i *quads) {
    if (level_bits == 8) {
        for (int k = 0; k < 8; k++) quads[k] = _mm512_loadu_si512((const void *)(q + 64 * k));
        return;
    }
    const __m512i nibble = _mm512_set1_epi8(15);
    for (int j = 0; j < 4; j++) {
        const __m512i v = _mm512_loadu_si512((const void *)(q + 64 * j));
        quads[j] = _mm512_and_si512(v, nibble);
        quads[j + 4] = _mm512_and_si512(_mm512_srli_epi16(v, 4), nibble);
    }
    if (level_bits == 5) {
        const uint64_t *top = (const uint64_t *)(q + 256);
        const __m512i sixteen = _mm512_set1_epi8(16);
        for (int k = 0; k < 8; k++)
            quads[k] = _mm512_mask_add_epi8(quads[k], _cvtu64_mask64(top[k]), quads[k], sixteen);
    }
    if (level_bits == WQ_Q6K) {  // bits 4-5 of quad 4h + t at bits 2t of part h, moved to 4
        const __m512i two = _mm512_set1_epi8(0x30);
        for (int h = 0; h < 2; h++) {
            const __m512i v = _mm512_loadu_si512((const void *)(q + 256 + 64 * h));
            __m512i *qd = quads + 4 * h;
            qd[0] = _mm512_or_si512(qd[0], _mm512_and_si512(_mm512_slli_epi16(v, 4), two));
            qd[1] = _mm512_or_si512(qd[1], _mm512_and_si512(_mm512_slli_epi16(v, 2), two));
            qd[2] = _mm512_or_si512(qd[2], _mm512_and_si512(v, two));
            qd[3] = _mm512_or_si512(qd[3], _mm512_and_si512(_mm512_srli_epi16(v, 2), two));
        }
    }
}

// A Q6_K block's group's scales: s_lo[c] = d[c] * sc[c] for inputs 0..15, s_hi for 16..31, in
// float32 (exact: 11 x 8 significant bits).
static inline __attribute__((always_inline)) void wq_q6k_scales(const uint8_t *params,
                                                                const uint8_t *factors,
                                                                __m512 *s_lo, __m512 *s_hi) {
    const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)factors));
    const __m128i *sc = (const __m128i *)params;
    *s_lo = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(sc))));
    *s_hi = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(sc + 1))));
}

// The 16 channels' 32 levels each, in input order, from a WQ_VNNI group: a transpose of the
// quads' 32-bit words (channel c's bytes are word c of quads 0..7).
static inline __attribute__((always_inline)) void wq_vnni_channels(const uint8_t *q,
                                                                   int level_bits,
                                                                   __m256i *channels) {
    __m512i quads[8], a[8], lo[4], hi[4];
    wq_vnni_quads(q, level_bits, quads);
    for (int k = 0; k < 8; k += 2) {  // 128-bit lane L: words 4L.. of quads k, k + 1 interleaved
        a[k] = _mm512_unpacklo_epi32(quads[k], quads[k + 1]);
        a[k + 1] = _mm512_unpackhi_epi32(quads[k], quads[k + 1]);
    }
    // lo[i] lane L: channel 4L + i's words from quads 0..3; hi[i]: from quads 4..7.
    lo[0] = _mm512_unpacklo_epi64(a[0], a[2]);
    lo[1] = _mm512_unpackhi_epi64(a[0], a[2]);
    lo[2] = _mm512_unpacklo_epi64(a[1], a[3]);
    lo[3] = _mm512_unpackhi_epi64(a[1], a[3]);
    hi[0] = _mm512_unpacklo_epi64(a[4], a[6]);
    hi[1] = _mm512_unpackhi_epi64(a[4], a[6]);
    hi[2] = _mm512_unpacklo_epi64(a[5], a[7]);
    hi[3] = _mm512_unpackhi_epi64(a[5], a[7]);
    for (int i = 0; i < 4; i++) {
        const __m128i l[4] = {_mm512_extracti32x4_epi32(lo[i], 0), _mm512_extracti32x4_epi32(lo[i], 1),
                              _mm512_extracti32x4_epi32(lo[i], 2), _mm512_extracti32x4_epi32(lo[i], 3)};
        const __m128i h[4] = {_mm512_extracti32x4_epi32(hi[i], 0), _mm512_extracti32x4_epi32(hi[i], 1),
                              _mm512_extracti32x4_epi32(hi[i], 2), _mm512_extracti32x4_epi32(hi[i], 3)};
        for (int L = 0; L < 4; L++) channels[4 * L + i] = _mm256_set_m128i(h[L], l[L]);
    }
}

// q * scale + offset for 16 levels q in float32, in two roundings (no FMA, -ffp-contract=off):
// the same float the bf16 dense copy of the weight was made from. Where neither rounding rounds
// (WQ_FUSED, checked when packing: GGUF's Q5_0 and Q8_0 and most Q4_K), one FMA gives it.
static inline __m512 wq_scale(__m512 q, __m512 s, __m512 o, int fused) {
    return fused ? _mm512_fmadd_ps(q, s, o) : _mm512_add_ps(_mm512_mul_ps(q, s), o);
}

// A block's group's 16 scales and 16 offsets in float32, from any of the three storage forms.
static inline __attribute__((always_inline)) void wq_params(const uint8_t *params, int bits,
                                                            const uint8_t *factors, __m512 *s,
                                                            __m512 *o) {
    if (bits & WQ_FACTORED) {  // exact products: checked when packing
        const __m128i *integers = (const __m128i *)params;  // 16 for scales, 16 for offsets
        __m512 fs, fo;  // the factors, float16 with WQ_HALF (wq_gemm.py's half_factors)
        if (bits & WQ_HALF) {
            fs = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)factors));
            fo = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(factors + 32)));
        } else {
            fs = _mm512_loadu_ps((const float *)factors);
            fo = _mm512_loadu_ps((const float *)factors + 16);
        }
        *s = _mm512_mul_ps(fs, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(integers))));
        *o = _mm512_mul_ps(fo,
                           _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(integers + 1))));
    } else if (bits & WQ_HALF) {
        *s = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)params));
        *o = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(params + 32)));
    } else {
        *s = _mm512_loadu_ps((const float *)params);
        *o = _mm512_loadu_ps((const float *)params + 16);
    }
}

// A channel's 32 bf16 weights from its 32 16-bit level indices (their low 4 or 5 bits: `mask`),
// looked up by vpermw in the table of its group's weights. AVX2 has no vpermw: there each
// weight is computed as its table entry was, bf16(wq_scale(level)), the same bits.
static inline __attribute__((always_inline)) __m512i wq_lookup(__m512i idx, __m512i table,
                                                               short mask, __m512 sc, __m512 oc,
                                                               int fused) {
#ifdef GIR_AVX2
    (void)table;
    const __m512i levels = _mm512_and_si512(idx, _mm512_set1_epi16(mask));
    const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepu16_epi32(levels.lo));
    const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepu16_epi32(levels.hi));
    return _mm512_cvtne2ps_pbh(wq_scale(hi, sc, oc, fused), wq_scale(lo, sc, oc, fused));
#else
    (void)mask, (void)sc, (void)oc, (void)fused;
    return _mm512_permutexvar_epi16(idx, table);
#endif
}

// The 16 channels' rows of one block's group: rows[c] holds channel c's 32 bf16 weights in
// input order.
static inline __attribute__((always_inline)) void dequant_rows(const uint8_t *q, int bits,
                                                                 const uint8_t *params,
                                                                 const uint8_t *factors,
                                                                 __m512i *rows) {
    const int fused = bits & WQ_FUSED;
    const int level_bits = bits & WQ_LEVEL_BITS;
    if (level_bits == WQ_Q6K) {  // (q - 32) * s, exact in float32, then to bf16
        __m256i channels[16];
        wq_vnni_channels(q, level_bits, channels);
        float lo_f[16], hi_f[16];
        __m512 s_lo, s_hi;
        wq_q6k_scales(params, factors, &s_lo, &s_hi);
        _mm512_storeu_ps(lo_f, s_lo);
        _mm512_storeu_ps(hi_f, s_hi);
        const __m512 mid = _mm512_set1_ps(32.0f);
        for (int c = 0; c < 16; c++) {
            const __m128i *bytes = (const __m128i *)&channels[c];
            const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(bytes)));
            const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(bytes + 1)));
            rows[c] = GIR_AS_SI(_mm512_cvtne2ps_pbh(
                _mm512_mul_ps(_mm512_sub_ps(hi, mid), _mm512_set1_ps(hi_f[c])),
                _mm512_mul_ps(_mm512_sub_ps(lo, mid), _mm512_set1_ps(lo_f[c]))));
        }
        return;
    }
    float sf[16], of[16];
    const float *s = (const float *)params, *o = s + 16;  // float32 params: read in place
    if (bits & (WQ_FACTORED | WQ_HALF)) {
        __m512 sv, ov;
        wq_params(params, bits, factors, &sv, &ov);
        _mm512_storeu_ps(sf, sv);
        _mm512_storeu_ps(of, ov);
        s = sf;
        o = of;
    }
    const __m512 levels = _mm512_set_ps(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    const __m512 levels16 = _mm512_add_ps(levels, _mm512_set1_ps(16.0f));
    __m256i channels[16];  // WQ_VNNI: each channel's 32 levels, as the 8-bit layout stores them
    if (bits & WQ_VNNI) wq_vnni_channels(q, level_bits, channels);
    if (level_bits == 8 || bits & WQ_VNNI) {
        for (int c = 0; c < 16; c++) {
            const __m512 sc = _mm512_set1_ps(s[c]), oc = _mm512_set1_ps(o[c]);
            if (bits & WQ_VNNI && level_bits != 8) {  // by the same table lookup as below
                const __m512 low = wq_scale(levels, sc, oc, fused);
                const __m512i table = GIR_AS_SI(_mm512_cvtne2ps_pbh(
                    level_bits == 5 ? wq_scale(levels16, sc, oc, fused) : low, low));
                rows[c] = wq_lookup(_mm512_cvtepu8_epi16(channels[c]), table, 31, sc, oc, fused);
                continue;
            }
            const __m128i *bytes = bits & WQ_VNNI ? (const __m128i *)&channels[c]
                                                  : (const __m128i *)(q + 32 * c);
            const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(bytes)));
            const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(bytes + 1)));
            rows[c] = GIR_AS_SI(_mm512_cvtne2ps_pbh(wq_scale(hi, sc, oc, fused),
                                                    wq_scale(lo, sc, oc, fused)));
        }
        return;
    }
    const __m512i nibble = _mm512_set1_epi16(15);
    __m512i top = _mm512_setzero_si512();
    if (level_bits == 5) top = _mm512_loadu_si512((const void *)(q + 256));
    for (int t = 0; t < 4; t++) {
        const __m512i line = _mm512_loadu_si512((const void *)(q + 64 * t));
        for (int j = 0; j < 4; j++) {
            const int c = 4 * t + j;
            const __m512 sc = _mm512_set1_ps(s[c]), oc = _mm512_set1_ps(o[c]);
            const __m512 low = wq_scale(levels, sc, oc, fused);
            // vpermw reads an index's low 5 bits: for 4 bits the table repeats its 16 weights
            // (bit 4 is the next level's), for 5 bits bit 4 is the level's top bit.
            __m512i idx = _mm512_srli_epi16(line, 4 * j);
            __m512i table;
            if (level_bits == 5) {
                table = GIR_AS_SI(_mm512_cvtne2ps_pbh(wq_scale(levels16, sc, oc, fused), low));
                const __m512i hi = c >= 4 ? _mm512_srli_epi16(top, c - 4)
                                          : _mm512_slli_epi16(top, 4 - c);
                idx = _mm512_ternarylogic_epi32(nibble, idx, hi, 0xCA);  // nibble ? idx : hi
            } else {
                table = GIR_AS_SI(_mm512_cvtne2ps_pbh(low, low));
            }
            rows[c] = wq_lookup(idx, table, level_bits == 5 ? 31 : 15, sc, oc, fused);
        }
    }
}

// One group of a chunk (bt blocks from nb0 on) dequantized: block b's channel rows to
// out + b * stride; the next group's levels prefetched into L1 meanwhile.
static inline __attribute__((always_inline)) void wq_dequant_group(
    const uint8_t *q, int bits, const uint8_t *params, const uint8_t *factors, int64_t nb0,
    int64_t groups, int64_t g, int bt, __m512i *out, int64_t stride) {
    const int64_t group_bytes = wq_group_bytes(bits), param_bytes = wq_param_bytes(bits);
    const int64_t blk = nb0 * groups + g * bt;  // the layout's first block of this group
    const uint8_t *next = q + (blk + bt) * group_bytes;
    for (int64_t b = 0; b < bt * group_bytes; b += 64)
        _mm_prefetch((const char *)next + b, _MM_HINT_T0);
    for (int b = 0; b < bt; b++)
        dequant_rows(q + (blk + b) * group_bytes, bits, params + param_bytes * (blk + b),
                     wq_block_factors(factors, bits, nb0, groups, g, bt, b), out + b * stride);
}

// 16 x 16 32-bit elements transposed: out[p] lane c = in[c] lane p.
static inline __attribute__((always_inline)) void transpose16(const __m512i *in, __m512i *out) {
    __m512i a[16], b[16];
    for (int i = 0; i < 16; i += 2) {
        a[i] = _mm512_unpacklo_epi32(in[i], in[i + 1]);
        a[i + 1] = _mm512_unpackhi_epi32(in[i], in[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) {
        b[i] = _mm512_unpacklo_epi64(a[i], a[i + 2]);
        b[i + 1] = _mm512_unpackhi_epi64(a[i], a[i + 2]);
        b[i + 2] = _mm512_unpacklo_epi64(a[i + 1], a[i + 3]);
        b[i + 3] = _mm512_unpackhi_epi64(a[i + 1], a[i + 3]);
    }
    // b[4q + r] lane 4l + e = in[4q + e] lane 4l + r: 128-bit lanes still to transpose (4 x 4).
    for (int i = 0; i < 4; i++) {
        a[i] = _mm512_shuffle_i32x4(b[i], b[4 + i], 0x88);
        a[4 + i] = _mm512_shuffle_i32x4(b[i], b[4 + i], 0xDD);
        a[8 + i] = _mm512_shuffle_i32x4(b[8 + i], b[12 + i], 0x88);
        a[12 + i] = _mm512_shuffle_i32x4(b[8 + i], b[12 + i], 0xDD);
    }
    for (int i = 0; i < 4; i++) {
        out[i] = _mm512_shuffle_i32x4(a[i], a[8 + i], 0x88);
        out[8 + i] = _mm512_shuffle_i32x4(a[i], a[8 + i], 0xDD);
        out[4 + i] = _mm512_shuffle_i32x4(a[4 + i], a[12 + i], 0x88);
        out[12 + i] = _mm512_shuffle_i32x4(a[4 + i], a[12 + i], 0xDD);
    }
}

// A buffer of at least `bytes`, kept per thread from call to call (a decode step makes ~100
// calls; allocating each time would map and fault fresh pages).
typedef struct {
    uint8_t *data;
    int64_t bytes;
} wq_buffer;

static inline uint8_t *wq_buffer_for(wq_buffer *b, int64_t bytes) {
    if (bytes > b->bytes) {
        free(b->data);
        b->data = aligned_alloc(64, (size_t)bytes);
        b->bytes = b->data ? bytes : 0;
    }
    return b->data;
}
