// The AVX512 intrinsics the kernels use, on AVX2 + FMA + F16C (laptops, AMD Zen 2/3, Intel
// before Ice Lake): a no-op where the compiler targets AVX512 (__AVX512F__).
//
// Why: the kernels are written once, for 16 float lanes; on an AVX2-only CPU the loader builds
// them a second time with this header, so every kernel (and its tests) exists there too, with
// the same order of operations. A 512-bit vector is two 256-bit halves (a struct the compiler
// keeps in two registers); a mask is an integer, as in AVX512.
//
// The same numbers as the AVX512 build, bit for bit, where the instruction is exact or its
// rounding is reproduced: float arithmetic lane by lane, the reductions (GCC's trees), the
// integer dot products (vpdpbusd from vpmaddubsw on nibbles: no saturation), bf16 conversion
// (round to nearest even, denormals to zero, quiet NaNs: VCVTNEPS2BF16's). Two differ only
// where the kernels never go: vdpbf16ps's denormal flushing (two FMAs here), and
// _mm512_cvtepi32_epi8 saturates here where vpmovdb truncates (the kernels' values fit a byte).
//
// Where the sources cast between vector types, they say GIR_AS_BH / GIR_AS_SI (a struct cannot
// be cast). Hot paths may take an AVX2 branch of their own (#ifdef GIR_AVX2); vpermw has none
// here (wq_panel.h's wq_lookup computes instead).
#pragma once
#include <immintrin.h>
#include <stdint.h>

#ifdef __AVX512F__

#define GIR_AS_BH(x) ((__m512bh)(x))
#define GIR_AS_SI(x) ((__m512i)(x))

#else  // AVX2

#define GIR_AVX2 1
#define GIR_INLINE static inline __attribute__((always_inline))

typedef struct {
    __m256 lo, hi;
} gir_ps;
typedef struct {
    __m256i lo, hi;
} gir_si;

#define __m512 gir_ps
#define __m512i gir_si
#define __m512bh gir_si
#define __mmask16 uint16_t
#define __mmask64 uint64_t
#define GIR_AS_BH(x) (x)
#define GIR_AS_SI(x) (x)

// ---- float lanes, one half at a time ----
// A binary operation on both halves.
#define GIR_HALVES(name, T, op)                                                 \
    GIR_INLINE T name(T a, T b) { return (T){op(a.lo, b.lo), op(a.hi, b.hi)}; }
#define GIR_PS2(name, op) GIR_HALVES(name, gir_ps, op)
#define GIR_SI2(name, op) GIR_HALVES(name, gir_si, op)
GIR_PS2(gir_add_ps, _mm256_add_ps)
GIR_PS2(gir_sub_ps, _mm256_sub_ps)
GIR_PS2(gir_mul_ps, _mm256_mul_ps)
GIR_PS2(gir_div_ps, _mm256_div_ps)
GIR_PS2(gir_max_ps, _mm256_max_ps)
GIR_PS2(gir_min_ps, _mm256_min_ps)
GIR_PS2(gir_unpacklo_ps, _mm256_unpacklo_ps)
GIR_PS2(gir_unpackhi_ps, _mm256_unpackhi_ps)

GIR_SI2(gir_and_si512, _mm256_and_si256)
GIR_SI2(gir_xor_si512, _mm256_xor_si256)
GIR_SI2(gir_or_si512, _mm256_or_si256)
GIR_SI2(gir_mullo_epi32, _mm256_mullo_epi32)
GIR_SI2(gir_add_epi32, _mm256_add_epi32)
GIR_SI2(gir_sub_epi32, _mm256_sub_epi32)
GIR_SI2(gir_unpacklo_epi32, _mm256_unpacklo_epi32)
GIR_SI2(gir_unpackhi_epi32, _mm256_unpackhi_epi32)
GIR_SI2(gir_unpacklo_epi64, _mm256_unpacklo_epi64)
GIR_SI2(gir_unpackhi_epi64, _mm256_unpackhi_epi64)

GIR_INLINE gir_ps gir_fmadd_ps(gir_ps a, gir_ps b, gir_ps c) {
    return (gir_ps){_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi)};
}
GIR_INLINE gir_ps gir_fnmadd_ps(gir_ps a, gir_ps b, gir_ps c) {
    return (gir_ps){_mm256_fnmadd_ps(a.lo, b.lo, c.lo), _mm256_fnmadd_ps(a.hi, b.hi, c.hi)};
}
GIR_INLINE gir_ps gir_set1_ps(float v) { return (gir_ps){_mm256_set1_ps(v), _mm256_set1_ps(v)}; }
GIR_INLINE gir_ps gir_setzero_ps(void) { return (gir_ps){_mm256_setzero_ps(), _mm256_setzero_ps()}; }
GIR_INLINE gir_ps gir_set_ps(float e15, float e14, float e13, float e12, float e11, float e10,
                             float e9, float e8, float e7, float e6, float e5, float e4,
                             float e3, float e2, float e1, float e0) {
    return (gir_ps){_mm256_set_ps(e7, e6, e5, e4, e3, e2, e1, e0),
                    _mm256_set_ps(e15, e14, e13, e12, e11, e10, e9, e8)};
}
GIR_INLINE gir_ps gir_loadu_ps(const float *p) {
    return (gir_ps){_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)};
}
GIR_INLINE void gir_storeu_ps(float *p, gir_ps v) {
    _mm256_storeu_ps(p, v.lo);
    _mm256_storeu_ps(p + 8, v.hi);
}
GIR_INLINE gir_ps gir_abs_ps(gir_ps v) {
    const __m256 m = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
    return (gir_ps){_mm256_and_ps(v.lo, m), _mm256_and_ps(v.hi, m)};
}
GIR_INLINE float gir_cvtss_f32(gir_ps v) { return _mm256_cvtss_f32(v.lo); }
GIR_INLINE gir_ps gir_cvtepi32_ps(gir_si v) {
    return (gir_ps){_mm256_cvtepi32_ps(v.lo), _mm256_cvtepi32_ps(v.hi)};
}
GIR_INLINE gir_si gir_cvtps_epi32(gir_ps v) {
    return (gir_si){_mm256_cvtps_epi32(v.lo), _mm256_cvtps_epi32(v.hi)};
}
GIR_INLINE gir_ps gir_castsi512_ps(gir_si v) {
    return (gir_ps){_mm256_castsi256_ps(v.lo), _mm256_castsi256_ps(v.hi)};
}
#define gir_roundscale_ps(v, imm)                                               \
    ({                                                                          \
        const gir_ps v_ = (v);                                                  \
        (gir_ps){_mm256_round_ps(v_.lo, imm), _mm256_round_ps(v_.hi, imm)};     \
    })
// v * 2^n for integral n whose power is a normal float (simd_math.h's exp512: n in -126..127).
GIR_INLINE gir_ps gir_scalef_ps(gir_ps v, gir_ps n) {
    const __m256i bias = _mm256_set1_epi32(127);
    const __m256 lo = _mm256_castsi256_ps(
        _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n.lo), bias), 23));
    const __m256 hi = _mm256_castsi256_ps(
        _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n.hi), bias), 23));
    return (gir_ps){_mm256_mul_ps(v.lo, lo), _mm256_mul_ps(v.hi, hi)};
}

// ---- reductions: GCC's trees for _mm512_reduce_* ----
// The sum of 8 lanes, as the tail of the 16-lane sum below (paged_attention.c finishes
// its keys' sums of hi + lo with it).
GIR_INLINE float gir_reduce_add_ps8(__m256 t3) {
    const __m128 t6 = _mm_add_ps(_mm256_extractf128_ps(t3, 1), _mm256_castps256_ps128(t3));
    const __m128 t8 = _mm_add_ps(t6, _mm_shuffle_ps(t6, t6, _MM_SHUFFLE(1, 0, 3, 2)));
    return _mm_cvtss_f32(t8) + _mm_cvtss_f32(_mm_shuffle_ps(t8, t8, 1));
}
GIR_INLINE float gir_reduce_add_ps(gir_ps a) { return gir_reduce_add_ps8(_mm256_add_ps(a.hi, a.lo)); }
GIR_INLINE float gir_reduce_max_ps(gir_ps a) {
    const __m256 t3 = _mm256_max_ps(a.hi, a.lo);
    const __m128 t6 = _mm_max_ps(_mm256_extractf128_ps(t3, 1), _mm256_castps256_ps128(t3));
    const __m128 t8 = _mm_max_ps(t6, _mm_shuffle_ps(t6, t6, _MM_SHUFFLE(1, 0, 3, 2)));
    const __m128 t10 = _mm_max_ps(t8, _mm_shuffle_ps(t8, t8, _MM_SHUFFLE(0, 1, 0, 1)));
    return _mm_cvtss_f32(t10);
}
GIR_INLINE int gir_reduce_add_epi32(gir_si a) {
    const __m256i t3 = _mm256_add_epi32(a.hi, a.lo);
    const __m128i t6 = _mm_add_epi32(_mm256_extracti128_si256(t3, 1), _mm256_castsi256_si128(t3));
    const __m128i t8 = _mm_add_epi32(t6, _mm_shuffle_epi32(t6, _MM_SHUFFLE(1, 0, 3, 2)));
    return _mm_cvtsi128_si32(t8) + _mm_extract_epi32(t8, 1);
}

// ---- masks ----
GIR_INLINE __m256i gir_mask8(unsigned m) {  // bit i of m -> all ones in 32-bit lane i
    const __m256i bits = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    return _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32((int)m), bits), bits);
}
GIR_INLINE __m256i gir_mask32_bytes(uint32_t m) {  // bit i of m -> all ones in byte i
    const __m256i spread = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2,
                                            2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
    const __m256i bit = _mm256_set1_epi64x((long long)0x8040201008040201ULL);
    const __m256i v = _mm256_shuffle_epi8(_mm256_set1_epi32((int)m), spread);
    return _mm256_cmpeq_epi8(_mm256_and_si256(v, bit), bit);
}
#define gir_cmp_ps_mask(a, b, imm)                                                          \
    ({                                                                                      \
        const gir_ps a_ = (a), b_ = (b);                                                    \
        (uint16_t)(_mm256_movemask_ps(_mm256_cmp_ps(a_.lo, b_.lo, imm)) |                   \
                   (_mm256_movemask_ps(_mm256_cmp_ps(a_.hi, b_.hi, imm)) << 8));            \
    })
// Masked-off lanes are neither read nor written (vmaskmov), as AVX512's masked moves.
GIR_INLINE gir_ps gir_maskz_loadu_ps(uint16_t m, const float *p) {
    return (gir_ps){_mm256_maskload_ps(p, gir_mask8(m & 255)),
                    _mm256_maskload_ps(p + 8, gir_mask8(m >> 8))};
}
GIR_INLINE void gir_mask_storeu_ps(float *p, uint16_t m, gir_ps v) {
    _mm256_maskstore_ps(p, gir_mask8(m & 255), v.lo);
    _mm256_maskstore_ps(p + 8, gir_mask8(m >> 8), v.hi);
}
GIR_INLINE gir_ps gir_maskz_mov_ps(uint16_t m, gir_ps v) {
    return (gir_ps){_mm256_and_ps(v.lo, _mm256_castsi256_ps(gir_mask8(m & 255))),
                    _mm256_and_ps(v.hi, _mm256_castsi256_ps(gir_mask8(m >> 8)))};
}
GIR_INLINE void gir_mask_storeu_epi16(void *p, uint16_t m, __m256i v) {
    if (m == 0xFFFF) {
        _mm256_storeu_si256((__m256i *)p, v);
        return;
    }
    uint16_t lanes[16];
    _mm256_storeu_si256((__m256i *)lanes, v);
    for (int i = 0; i < 16; i++)
        if (m >> i & 1) ((uint16_t *)p)[i] = lanes[i];
}
GIR_INLINE gir_ps gir_maskz_compress_ps(uint16_t m, gir_ps v) {
    float in[16], out[16] = {0};
    gir_storeu_ps(in, v);
    for (int i = 0, n = 0; i < 16; i++)
        if (m >> i & 1) out[n++] = in[i];
    return gir_loadu_ps(out);
}

// ---- integers ----
GIR_INLINE gir_si gir_loadu_si512(const void *p) {
    return (gir_si){_mm256_loadu_si256((const __m256i *)p),
                    _mm256_loadu_si256((const __m256i *)p + 1)};
}
GIR_INLINE void gir_storeu_si512(void *p, gir_si v) {
    _mm256_storeu_si256((__m256i *)p, v.lo);
    _mm256_storeu_si256((__m256i *)p + 1, v.hi);
}
GIR_INLINE gir_si gir_setzero_si512(void) {
    return (gir_si){_mm256_setzero_si256(), _mm256_setzero_si256()};
}
GIR_INLINE gir_si gir_set1_epi32(int v) { return (gir_si){_mm256_set1_epi32(v), _mm256_set1_epi32(v)}; }
GIR_INLINE gir_si gir_set1_epi16(short v) { return (gir_si){_mm256_set1_epi16(v), _mm256_set1_epi16(v)}; }
GIR_INLINE gir_si gir_set1_epi8(char v) { return (gir_si){_mm256_set1_epi8(v), _mm256_set1_epi8(v)}; }
GIR_INLINE gir_si gir_setr_epi32(int e0, int e1, int e2, int e3, int e4, int e5, int e6, int e7,
                                 int e8, int e9, int e10, int e11, int e12, int e13, int e14,
                                 int e15) {
    return (gir_si){_mm256_setr_epi32(e0, e1, e2, e3, e4, e5, e6, e7),
                    _mm256_setr_epi32(e8, e9, e10, e11, e12, e13, e14, e15)};
}
GIR_INLINE gir_si gir_set_epi32(int e15, int e14, int e13, int e12, int e11, int e10, int e9,
                                int e8, int e7, int e6, int e5, int e4, int e3, int e2, int e1,
                                int e0) {
    return gir_setr_epi32(e0, e1, e2, e3, e4, e5, e6, e7, e8, e9, e10, e11, e12, e13, e14, e15);
}
GIR_INLINE gir_si gir_slli_epi32(gir_si v, int n) {
    return (gir_si){_mm256_slli_epi32(v.lo, n), _mm256_slli_epi32(v.hi, n)};
}
GIR_INLINE gir_si gir_slli_epi16(gir_si v, int n) {
    return (gir_si){_mm256_slli_epi16(v.lo, n), _mm256_slli_epi16(v.hi, n)};
}
GIR_INLINE gir_si gir_srli_epi16(gir_si v, int n) {
    return (gir_si){_mm256_srli_epi16(v.lo, n), _mm256_srli_epi16(v.hi, n)};
}
// Only the selector the kernels use: 0xCA, a ? b : c bit by bit.
GIR_INLINE gir_si gir_ternarylogic_epi32(gir_si a, gir_si b, gir_si c, int imm) {
    if (imm != 0xCA) __builtin_trap();
    return (gir_si){_mm256_or_si256(_mm256_and_si256(a.lo, b.lo), _mm256_andnot_si256(a.lo, c.lo)),
                    _mm256_or_si256(_mm256_and_si256(a.hi, b.hi), _mm256_andnot_si256(a.hi, c.hi))};
}
GIR_INLINE gir_si gir_mask_add_epi8(gir_si src, uint64_t m, gir_si a, gir_si b) {
    return (gir_si){
        _mm256_blendv_epi8(src.lo, _mm256_add_epi8(a.lo, b.lo), gir_mask32_bytes((uint32_t)m)),
        _mm256_blendv_epi8(src.hi, _mm256_add_epi8(a.hi, b.hi),
                           gir_mask32_bytes((uint32_t)(m >> 32)))};
}
GIR_INLINE gir_si gir_cvtepu8_epi32(__m128i x) {
    return (gir_si){_mm256_cvtepu8_epi32(x), _mm256_cvtepu8_epi32(_mm_srli_si128(x, 8))};
}
GIR_INLINE gir_si gir_cvtepi8_epi32(__m128i x) {
    return (gir_si){_mm256_cvtepi8_epi32(x), _mm256_cvtepi8_epi32(_mm_srli_si128(x, 8))};
}
GIR_INLINE gir_si gir_cvtepu16_epi32(__m256i x) {
    return (gir_si){_mm256_cvtepu16_epi32(_mm256_castsi256_si128(x)),
                    _mm256_cvtepu16_epi32(_mm256_extracti128_si256(x, 1))};
}
GIR_INLINE gir_si gir_cvtepu8_epi16(__m256i x) {
    return (gir_si){_mm256_cvtepu8_epi16(_mm256_castsi256_si128(x)),
                    _mm256_cvtepu8_epi16(_mm256_extracti128_si256(x, 1))};
}
// 16 int32 -> 16 bytes, saturating (vpmovdb truncates; the kernels' values fit: -127..127).
GIR_INLINE __m128i gir_cvtepi32_epi8(gir_si v) {
    const __m256i w = _mm256_permute4x64_epi64(_mm256_packs_epi32(v.lo, v.hi), 0xD8);
    return _mm_packs_epi16(_mm256_castsi256_si128(w), _mm256_extracti128_si256(w, 1));
}
GIR_INLINE __m256i gir_castsi512_si256(gir_si v) { return v.lo; }
GIR_INLINE __m256i gir_extracti64x4_epi64(gir_si v, int k) { return k ? v.hi : v.lo; }
GIR_INLINE gir_si gir_maskz_compress_epi32(uint16_t m, gir_si v) {
    int32_t in[16], out[16] = {0};
    gir_storeu_si512(in, v);
    for (int i = 0, n = 0; i < 16; i++)
        if (m >> i & 1) out[n++] = in[i];
    return gir_loadu_si512(out);
}
GIR_INLINE void gir_mask_compressstoreu_epi32(void *p, uint16_t m, gir_si v) {
    int32_t in[16];
    gir_storeu_si512(in, v);
    for (int i = 0, n = 0; i < 16; i++)
        if (m >> i & 1) ((int32_t *)p)[n++] = in[i];
}

// vpdpbusd: acc + the sums of 4 products of unsigned bytes a and signed bytes b, exactly
// (vpmaddubsw saturates its 16-bit pair sums: a is taken a nibble at a time).
GIR_INLINE __m256i gir_dpbusd_half(__m256i acc, __m256i a, __m256i b) {
    const __m256i nibble = _mm256_set1_epi8(15), ones = _mm256_set1_epi16(1);
    const __m256i lo = _mm256_maddubs_epi16(_mm256_and_si256(a, nibble), b);
    const __m256i hi = _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(a, 4), nibble), b);
    const __m256i sum = _mm256_add_epi32(_mm256_madd_epi16(lo, ones),
                                         _mm256_slli_epi32(_mm256_madd_epi16(hi, ones), 4));
    return _mm256_add_epi32(acc, sum);
}
GIR_INLINE gir_si gir_dpbusd_epi32(gir_si acc, gir_si a, gir_si b) {
    return (gir_si){gir_dpbusd_half(acc.lo, a.lo, b.lo), gir_dpbusd_half(acc.hi, a.hi, b.hi)};
}
// ---- float16 and bfloat16 ----
GIR_INLINE gir_ps gir_cvtph_ps(__m256i h) {
    return (gir_ps){_mm256_cvtph_ps(_mm256_castsi256_si128(h)),
                    _mm256_cvtph_ps(_mm256_extracti128_si256(h, 1))};
}
#define gir_cvtps_ph(v, imm)                                                          \
    ({                                                                                \
        const gir_ps v_ = (v);                                                        \
        _mm256_set_m128i(_mm256_cvtps_ph(v_.hi, imm), _mm256_cvtps_ph(v_.lo, imm));   \
    })
// 8 floats -> bf16 in each 32-bit lane's low half, as VCVTNEPS2BF16 rounds: denormals (and
// zeros) to a signed zero, NaNs quiet, else round to nearest even.
GIR_INLINE __m256i gir_bf16_bits(__m256 x) {
    const __m256i b = _mm256_castps_si256(x);
    const __m256i top = _mm256_srli_epi32(b, 16);
    const __m256i lsb = _mm256_and_si256(top, _mm256_set1_epi32(1));
    const __m256i rounded =
        _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(b, _mm256_set1_epi32(0x7FFF)), lsb), 16);
    const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_UNORD_Q));
    const __m256i tiny = _mm256_cmpeq_epi32(_mm256_and_si256(b, _mm256_set1_epi32(0x7F800000)),
                                            _mm256_setzero_si256());
    __m256i r = _mm256_blendv_epi8(rounded, _mm256_or_si256(top, _mm256_set1_epi32(0x40)), nan);
    return _mm256_blendv_epi8(r, _mm256_and_si256(top, _mm256_set1_epi32(0x8000)), tiny);
}
GIR_INLINE __m256i gir_cvtneps_pbh(gir_ps x) {  // 16 floats -> 16 bf16
    return _mm256_permute4x64_epi64(_mm256_packus_epi32(gir_bf16_bits(x.lo), gir_bf16_bits(x.hi)),
                                    0xD8);
}
GIR_INLINE gir_si gir_cvtne2ps_pbh(gir_ps a, gir_ps b) {  // b's 16 bf16, then a's
    return (gir_si){gir_cvtneps_pbh(b), gir_cvtneps_pbh(a)};
}
// vdpbf16ps: acc + a[2i+1] b[2i+1], then + a[2i] b[2i] (each product exact in float32).
GIR_INLINE __m256 gir_dpbf16_half(__m256 acc, __m256i a, __m256i b) {
    const __m256i high = _mm256_set1_epi32((int)0xFFFF0000u);
    acc = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_and_si256(a, high)),
                          _mm256_castsi256_ps(_mm256_and_si256(b, high)), acc);
    return _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(a, 16)),
                           _mm256_castsi256_ps(_mm256_slli_epi32(b, 16)), acc);
}
GIR_INLINE gir_ps gir_dpbf16_ps(gir_ps acc, gir_si a, gir_si b) {
    return (gir_ps){gir_dpbf16_half(acc.lo, a.lo, b.lo), gir_dpbf16_half(acc.hi, a.hi, b.hi)};
}

// ---- lane moves ----
GIR_INLINE __m128 gir_lane_ps(gir_ps v, int k) {
    switch (k & 3) {
    case 0: return _mm256_castps256_ps128(v.lo);
    case 1: return _mm256_extractf128_ps(v.lo, 1);
    case 2: return _mm256_castps256_ps128(v.hi);
    default: return _mm256_extractf128_ps(v.hi, 1);
    }
}
GIR_INLINE __m128i gir_lane_si(gir_si v, int k) {
    switch (k & 3) {
    case 0: return _mm256_castsi256_si128(v.lo);
    case 1: return _mm256_extracti128_si256(v.lo, 1);
    case 2: return _mm256_castsi256_si128(v.hi);
    default: return _mm256_extracti128_si256(v.hi, 1);
    }
}
GIR_INLINE __m256 gir_lanes_ps(gir_ps v, int k0, int k1) {  // 128-bit lanes k0, k1 of v
    if (k0 == 0 && k1 == 1) return v.lo;
    if (k0 == 2 && k1 == 3) return v.hi;
    return _mm256_set_m128(gir_lane_ps(v, k1), gir_lane_ps(v, k0));
}
GIR_INLINE __m256i gir_lanes_si(gir_si v, int k0, int k1) {
    if (k0 == 0 && k1 == 1) return v.lo;
    if (k0 == 2 && k1 == 3) return v.hi;
    return _mm256_set_m128i(gir_lane_si(v, k1), gir_lane_si(v, k0));
}
GIR_INLINE gir_ps gir_shuffle_f32x4(gir_ps a, gir_ps b, int imm) {
    return (gir_ps){gir_lanes_ps(a, imm & 3, imm >> 2 & 3), gir_lanes_ps(b, imm >> 4 & 3, imm >> 6 & 3)};
}
GIR_INLINE gir_si gir_shuffle_i32x4(gir_si a, gir_si b, int imm) {
    return (gir_si){gir_lanes_si(a, imm & 3, imm >> 2 & 3), gir_lanes_si(b, imm >> 4 & 3, imm >> 6 & 3)};
}
#define gir_shuffle_ps(a, b, imm)                                                        \
    ({                                                                                   \
        const gir_ps a_ = (a), b_ = (b);                                                 \
        (gir_ps){_mm256_shuffle_ps(a_.lo, b_.lo, imm), _mm256_shuffle_ps(a_.hi, b_.hi, imm)}; \
    })
GIR_INLINE __m128 gir_extractf32x4_ps(gir_ps v, int k) { return gir_lane_ps(v, k); }
GIR_INLINE __m128i gir_extracti32x4_epi32(gir_si v, int k) { return gir_lane_si(v, k); }
GIR_INLINE gir_ps gir_permutexvar_ps(gir_si idx, gir_ps v) {
    int32_t i[16];
    float in[16], out[16];
    gir_storeu_si512(i, idx);
    gir_storeu_ps(in, v);
    for (int k = 0; k < 16; k++) out[k] = in[i[k] & 15];
    return gir_loadu_ps(out);
}
// ---- the AVX512 names, mapped ----
#define _mm512_add_ps gir_add_ps
#define _mm512_sub_ps gir_sub_ps
#define _mm512_mul_ps gir_mul_ps
#define _mm512_div_ps gir_div_ps
#define _mm512_max_ps gir_max_ps
#define _mm512_min_ps gir_min_ps
#define _mm512_unpacklo_ps gir_unpacklo_ps
#define _mm512_unpackhi_ps gir_unpackhi_ps
#define _mm512_and_si512 gir_and_si512
#define _mm512_xor_si512 gir_xor_si512
#define _mm512_or_si512 gir_or_si512
#define _mm512_mullo_epi32 gir_mullo_epi32
#define _mm512_add_epi32 gir_add_epi32
#define _mm512_sub_epi32 gir_sub_epi32
#define _mm512_unpacklo_epi32 gir_unpacklo_epi32
#define _mm512_unpackhi_epi32 gir_unpackhi_epi32
#define _mm512_unpacklo_epi64 gir_unpacklo_epi64
#define _mm512_unpackhi_epi64 gir_unpackhi_epi64
#define _mm512_fmadd_ps gir_fmadd_ps
#define _mm512_fnmadd_ps gir_fnmadd_ps
#define _mm512_set1_ps gir_set1_ps
#define _mm512_setzero_ps gir_setzero_ps
#define _mm512_set_ps gir_set_ps
#define _mm512_loadu_ps gir_loadu_ps
#define _mm512_storeu_ps gir_storeu_ps
#define _mm512_abs_ps gir_abs_ps
#define _mm512_cvtss_f32 gir_cvtss_f32
#define _mm512_cvtepi32_ps gir_cvtepi32_ps
#define _mm512_cvtps_epi32 gir_cvtps_epi32
#define _mm512_castsi512_ps gir_castsi512_ps
#define _mm512_roundscale_ps gir_roundscale_ps
#define _mm512_scalef_ps gir_scalef_ps
#define _mm512_reduce_add_ps gir_reduce_add_ps
#define _mm512_reduce_max_ps gir_reduce_max_ps
#define _mm512_reduce_add_epi32 gir_reduce_add_epi32
#define _mm512_cmp_ps_mask gir_cmp_ps_mask
#define _mm512_maskz_loadu_ps gir_maskz_loadu_ps
#define _mm512_mask_storeu_ps gir_mask_storeu_ps
#define _mm512_maskz_mov_ps gir_maskz_mov_ps
#define _mm256_mask_storeu_epi16 gir_mask_storeu_epi16
#define _mm512_maskz_compress_ps gir_maskz_compress_ps
#define _mm512_loadu_si512 gir_loadu_si512
#define _mm512_storeu_si512 gir_storeu_si512
#define _mm512_setzero_si512 gir_setzero_si512
#define _mm512_set1_epi32 gir_set1_epi32
#define _mm512_set1_epi16 gir_set1_epi16
#define _mm512_set1_epi8 gir_set1_epi8
#undef _mm512_setr_epi32  // a macro in GCC's header
#define _mm512_setr_epi32 gir_setr_epi32
#define _mm512_set_epi32 gir_set_epi32
#define _mm512_slli_epi32 gir_slli_epi32
#define _mm512_slli_epi16 gir_slli_epi16
#define _mm512_srli_epi16 gir_srli_epi16
#define _mm512_ternarylogic_epi32 gir_ternarylogic_epi32
#define _mm512_mask_add_epi8 gir_mask_add_epi8
#define _mm512_cvtepu8_epi32 gir_cvtepu8_epi32
#define _mm512_cvtepi8_epi32 gir_cvtepi8_epi32
#define _mm512_cvtepu16_epi32 gir_cvtepu16_epi32
#define _mm512_cvtepu8_epi16 gir_cvtepu8_epi16
#define _mm512_cvtepi32_epi8 gir_cvtepi32_epi8
#define _mm512_castsi512_si256 gir_castsi512_si256
#define _mm512_extracti64x4_epi64 gir_extracti64x4_epi64
#define _mm512_maskz_compress_epi32 gir_maskz_compress_epi32
#define _mm512_mask_compressstoreu_epi32 gir_mask_compressstoreu_epi32
#define _mm512_dpbusd_epi32 gir_dpbusd_epi32
#define _mm512_cvtph_ps gir_cvtph_ps
#define _mm512_cvtps_ph gir_cvtps_ph
#define _mm512_cvtneps_pbh gir_cvtneps_pbh
#define _mm512_cvtne2ps_pbh gir_cvtne2ps_pbh
#define _mm512_dpbf16_ps gir_dpbf16_ps
#define _mm512_shuffle_f32x4 gir_shuffle_f32x4
#define _mm512_shuffle_i32x4 gir_shuffle_i32x4
#define _mm512_shuffle_ps gir_shuffle_ps
#define _mm512_extractf32x4_ps gir_extractf32x4_ps
#define _mm512_extracti32x4_epi32 gir_extracti32x4_epi32
#define _mm512_permutexvar_ps gir_permutexvar_ps
#define _cvtu64_mask64(m) ((uint64_t)(m))

#endif
