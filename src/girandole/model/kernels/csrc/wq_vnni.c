// Weight-quantized GEMM on AVX512-VNNI: int8 activations against the weights' integer levels.
// The linears' kernel on x86 CPUs without AMX (AMD Zen 4 and later, Intel before Sapphire
// Rapids); where AMX runs, amx.c takes the bf16 path instead. On AVX2-only CPUs (avx2_compat.h)
// its dot products are vpmaddubsw + vpmaddwd, as llama.cpp's Q4_0 x Q8_0 dot.
//
//   y[m][n] = sum_g xs[m][g] * (s[n][g] * (q[n][g] . xq[m][g]) + o[n][g] * sum(xq[m][g]))
//
// with (s, o) the weights' scale and offset per output channel and group of 32 inputs (w = q * s
// + o, wq_panel.h's formats), and x quantized per row and group of 32 inputs as llama.cpp's Q8_0:
// xs = max|x| / 127, xq = round(x / xs) in -127..127. That is the exact dot product of the
// weights with the quantized row (up to float32 rounding of the group sums).
//
// Why: at one row the bf16 kernel (wq_gemm.c) spends ~7 instructions a channel and group turning
// levels into bf16 weights and is bound by them, not by memory (12 of ~30 GB/s). Here a vpdpbusd
// multiplies 64 levels by int8 inputs and adds them in fours, straight from the stored bits: a
// 4-bit group of 16 channels x 32 inputs takes 4 loads, 8 masks/shifts, 8 vpdpbusd and 4 float
// operations a row.
//
// Batch invariance: each row is quantized alone and its sums run in the same order whatever M
// is (integer sums are exact; the float steps per group are the same instructions for a row in
// a group of four as alone).
//
// Layout (kernels/wq_gemm.py's pack with VNNI): chunks, groups, blocks and params exactly as
// wq_gemm.c's; only the bytes within a block's group differ. Quad k (inputs 4k .. 4k + 3 of the
// group) is 64 bytes, byte 4c + b the level of channel c at input 4k + b:
//   8 bits: quads 0..7 (512 bytes);
//   4 bits: 4 x 64 bytes: byte i of part j holds quad j's byte i in its low nibble, quad
//           j + 4's in its high one (256 bytes);
//   5 bits: those 256 bytes of low nibbles, then per quad a 64-bit word whose bit i is bit 4 of
//           the quad's byte i (320 bytes);
//   Q6_K (WQ_Q6K): those 256 bytes, then bits 4-5 of the levels in 128 bytes (wq_panel.h), with
//           the file's own scales: its sums are chunk_rows_q6k's.
#include <immintrin.h>

#include "avx2_compat.h"
#include <stdint.h>

#include "wq_panel.h"

#define CHUNK 4  // blocks of 16 channels per chunk, as wq_gemm.c
#define ROWS 4   // rows of x against each unpacked group

// Each block's levels are read after a software prefetch of the levels this many bytes further
// on, into L1: the stream runs ahead of the hardware prefetchers, which stop at 4 KiB pages and
// ramp up again after each. One-row products of cold matrices on Zen 4 (weights in 2 MiB pages,
// two runs, 0 -> 8192 bytes ahead): 4,096 x 2,048 114.5 / 141.3 -> 91.8 / 134.2 us, 2,048 x
// 8,192 231.3 / 269.2 -> 180.9 / 255.2, an expert's 1,536 x 2,048 53.5 / 53.7 -> 51.9 / 52.5
// (benchmarks/bench_prefetch.py: the gain is largest when the host's memory is least busy).
// Into L2 instead (_MM_HINT_T1) gained nothing; 512 bytes ahead lost 10 %, 32 KiB 5-10 %.
// Off until set (wq_vnni_set_prefetch): kernels/loader.py sets it on AMD CPUs, where it was
// measured; an Intel host's linears disliked prefetching further ahead once (on AMX hosts they
// run amx.c anyway).
static int prefetch_bytes = 0;

void wq_vnni_set_prefetch(int bytes) { prefetch_bytes = bytes; }

static inline __attribute__((always_inline)) void prefetch_ahead(const uint8_t *block,
                                                                  int64_t group_bytes) {
    if (prefetch_bytes <= 0) return;
    const char *ahead = (const char *)block + prefetch_bytes;
    for (int64_t i = 0; i < group_bytes; i += 64) _mm_prefetch(ahead + i, _MM_HINT_T0);
}

// One row of bf16 x quantized per group of 32: xq (int8), xs (the group's scale) and xb (xs
// times the sum of its xq, the offsets' coefficient).
static void quantize_row(const uint16_t *x, int64_t groups, int8_t *xq, float *xs, float *xb) {
    for (int64_t g = 0; g < groups; g++) {
        const __m512i raw = _mm512_loadu_si512((const void *)(x + 32 * g));
        const __m512 lo = _mm512_castsi512_ps(
            _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(raw)), 16));
        const __m512 hi = _mm512_castsi512_ps(
            _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(raw, 1)), 16));
        const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(lo), _mm512_abs_ps(hi)));
        const float d = amax / 127.0f;
        const float id = d > 0.0f ? 1.0f / d : 0.0f;
        const __m512 vid = _mm512_set1_ps(id);
        // round to nearest even (the default rounding mode), then to bytes (in range already)
        const __m512i qlo = _mm512_cvtps_epi32(_mm512_mul_ps(lo, vid));
        const __m512i qhi = _mm512_cvtps_epi32(_mm512_mul_ps(hi, vid));
        _mm_storeu_si128((__m128i *)(xq + 32 * g), _mm512_cvtepi32_epi8(qlo));
        _mm_storeu_si128((__m128i *)(xq + 32 * g + 16), _mm512_cvtepi32_epi8(qhi));
        xs[g] = d;
        xb[g] = d * (float)_mm512_reduce_add_epi32(_mm512_add_epi32(qlo, qhi));
    }
}

// The 16 channels' dot products of a group's 8 quads of levels with a row's 32 int8 inputs.
static inline __attribute__((always_inline)) __m512i dot_quads(const __m512i *quads,
                                                               const int32_t *xr, int level_bits) {
    __m512i sum = _mm512_setzero_si512();
#ifdef GIR_AVX2
    // Levels below 32 and |x| <= 127: vpmaddubsw's pair sums of 4 quads fit 16 bits (4 x 2 x 31
    // x 127 < 2^15), so they add up there and widen once per 4 quads (the same integers).
    if (level_bits != 8) {
        const __m256i ones = _mm256_set1_epi16(1);
        for (int k0 = 0; k0 < 8; k0 += 4) {
            __m256i lo = _mm256_setzero_si256(), hi = lo;
            for (int k = k0; k < k0 + 4; k++) {
                const __m256i xb = _mm256_set1_epi32(xr[k]);
                lo = _mm256_add_epi16(lo, _mm256_maddubs_epi16(quads[k].lo, xb));
                hi = _mm256_add_epi16(hi, _mm256_maddubs_epi16(quads[k].hi, xb));
            }
            sum.lo = _mm256_add_epi32(sum.lo, _mm256_madd_epi16(lo, ones));
            sum.hi = _mm256_add_epi32(sum.hi, _mm256_madd_epi16(hi, ones));
        }
        return sum;
    }
#endif
    (void)level_bits;
    for (int k = 0; k < 8; k++) sum = _mm512_dpbusd_epi32(sum, quads[k], _mm512_set1_epi32(xr[k]));
    return sum;
}

// R rows (1..ROWS) of quantized x against a chunk's bt blocks, group by group over the blocks
// (the layout's order: one sequential stream, R x bt independent sums in flight); each block's
// group unpacked once for the R rows. Row r's sums go to y + r * ldy.
static inline __attribute__((always_inline)) void chunk_rows(
    int R, const int8_t *xq, const float *xs, const float *xb, int64_t K, int64_t groups,
    const uint8_t *q, int bits, const uint8_t *params, const uint8_t *factors, int64_t nb0,
    int bt, float *y, int64_t ldy) {
    const int level_bits = bits & WQ_LEVEL_BITS;
    const int64_t group_bytes = wq_group_bytes(bits), param_bytes = wq_param_bytes(bits);
    __m512 acc[CHUNK * ROWS];  // acc[b * R + r]
    for (int i = 0; i < CHUNK * R; i++) acc[i] = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; g++) {
        for (int b = 0; b < bt; b++) {
            const int64_t blk = nb0 * groups + g * bt + b;  // the layout's block of this group
            prefetch_ahead(q + blk * group_bytes, group_bytes);
            __m512i quads[8];
            wq_vnni_quads(q + blk * group_bytes, level_bits, quads);
            __m512 s, o;
            wq_params(params + blk * param_bytes, bits,
                      wq_block_factors(factors, bits, nb0, groups, g, bt, b), &s, &o);
            for (int r = 0; r < R; r++) {
                const int32_t *xr = (const int32_t *)(xq + r * K + 32 * g);
                const __m512i sum = dot_quads(quads, xr, level_bits);
                const int64_t rg = r * groups + g;
                __m512 *a = acc + b * R + r;
                *a = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum),
                                     _mm512_mul_ps(s, _mm512_set1_ps(xs[rg])), *a);
                *a = _mm512_fmadd_ps(o, _mm512_set1_ps(xb[rg]), *a);
            }
        }
    }
    for (int b = 0; b < bt; b++)
        for (int r = 0; r < R; r++) _mm512_storeu_ps(y + r * ldy + 16 * b, acc[b * R + r]);
}

// Q6_K's format (wq_panel.h's WQ_Q6K): w = d * (sc_lo or sc_hi) * (q - 32), q 0..63. Per channel
// and group an exact integer
//   T = sc_lo * (D_lo - 32 X_lo) + sc_hi * (D_hi - 32 X_hi)
// with D the levels' dot products with the row's xq over the group's inputs 0..15 (quads 0..3)
// and 16..31 (quads 4..7), X the row's sums of xq there (|T| < 2^24: exact as a float too);
// then y += (d * xs) * T. The row's quantization is the other formats' (quantize_row).
static inline __attribute__((always_inline)) __m512i q6k_dot(const __m512i *quads,
                                                             const int32_t *xr, __m512i sc_lo,
                                                             __m512i sc_hi, __m512i x32_lo,
                                                             __m512i x32_hi) {
    __m512i d[2];
#ifdef GIR_AVX2
    // vpmaddubsw's pair sums of 2 quads fit 16 bits (2 x 2 x 63 x 127 < 2^15), not of 4.
    const __m256i ones = _mm256_set1_epi16(1);
    for (int h = 0; h < 2; h++) {
        __m256i lo = _mm256_setzero_si256(), hi = lo;
        for (int k = 4 * h; k < 4 * h + 4; k += 2) {
            const __m256i x0 = _mm256_set1_epi32(xr[k]), x1 = _mm256_set1_epi32(xr[k + 1]);
            const __m256i l = _mm256_add_epi16(_mm256_maddubs_epi16(quads[k].lo, x0),
                                               _mm256_maddubs_epi16(quads[k + 1].lo, x1));
            const __m256i u = _mm256_add_epi16(_mm256_maddubs_epi16(quads[k].hi, x0),
                                               _mm256_maddubs_epi16(quads[k + 1].hi, x1));
            lo = _mm256_add_epi32(lo, _mm256_madd_epi16(l, ones));
            hi = _mm256_add_epi32(hi, _mm256_madd_epi16(u, ones));
        }
        d[h] = (__m512i){lo, hi};
    }
#else
    for (int h = 0; h < 2; h++) {
        d[h] = _mm512_setzero_si512();
        for (int k = 4 * h; k < 4 * h + 4; k++)
            d[h] = _mm512_dpbusd_epi32(d[h], quads[k], _mm512_set1_epi32(xr[k]));
    }
#endif
    return _mm512_add_epi32(_mm512_mullo_epi32(sc_lo, _mm512_sub_epi32(d[0], x32_lo)),
                            _mm512_mullo_epi32(sc_hi, _mm512_sub_epi32(d[1], x32_hi)));
}

// 32 times a row's sums of xq over a group's inputs 0..15 and 16..31.
static inline __attribute__((always_inline)) void q6k_row_sums(const int8_t *x, int32_t *lo,
                                                               int32_t *hi) {
    const __m256i v = _mm256_loadu_si256((const __m256i *)x);
    const __m256i fours = _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_set1_epi8(1), v),
                                            _mm256_set1_epi16(1));  // 8 sums of 4 inputs
    __m128i s = _mm_hadd_epi32(_mm256_castsi256_si128(fours), _mm256_extracti128_si256(fours, 1));
    s = _mm_hadd_epi32(s, s);
    *lo = 32 * _mm_cvtsi128_si32(s);
    *hi = 32 * _mm_extract_epi32(s, 1);
}

// chunk_rows for Q6_K's format: the same order of work (group by group over the blocks, each
// block's group unpacked once for the R rows).
static inline __attribute__((always_inline)) void chunk_rows_q6k(
    int R, const int8_t *xq, const float *xs, int64_t K, int64_t groups, const uint8_t *q,
    int bits, const uint8_t *params, const uint8_t *factors, int64_t nb0, int bt, float *y,
    int64_t ldy) {
    const int64_t group_bytes = wq_group_bytes(bits), param_bytes = wq_param_bytes(bits);
    __m512 acc[CHUNK * ROWS];  // acc[b * R + r]
    for (int i = 0; i < CHUNK * R; i++) acc[i] = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; g++) {
        __m512i x32_lo[ROWS], x32_hi[ROWS];
        for (int r = 0; r < R; r++) {
            int32_t lo, hi;
            q6k_row_sums(xq + r * K + 32 * g, &lo, &hi);
            x32_lo[r] = _mm512_set1_epi32(lo);
            x32_hi[r] = _mm512_set1_epi32(hi);
        }
        for (int b = 0; b < bt; b++) {
            const int64_t blk = nb0 * groups + g * bt + b;  // the layout's block of this group
            prefetch_ahead(q + blk * group_bytes, group_bytes);
            __m512i quads[8];
            wq_vnni_quads(q + blk * group_bytes, WQ_Q6K, quads);
            const __m128i *sc = (const __m128i *)(params + blk * param_bytes);
            const __m512i sc_lo = _mm512_cvtepi8_epi32(_mm_loadu_si128(sc));
            const __m512i sc_hi = _mm512_cvtepi8_epi32(_mm_loadu_si128(sc + 1));
            const uint8_t *f = wq_block_factors(factors, bits, nb0, groups, g, bt, b);
            const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)f));
            for (int r = 0; r < R; r++) {
                const int32_t *xr = (const int32_t *)(xq + r * K + 32 * g);
                const __m512i t = q6k_dot(quads, xr, sc_lo, sc_hi, x32_lo[r], x32_hi[r]);
                __m512 *a = acc + b * R + r;
                *a = _mm512_fmadd_ps(_mm512_cvtepi32_ps(t),
                                     _mm512_mul_ps(d, _mm512_set1_ps(xs[r * groups + g])), *a);
            }
        }
    }
    for (int b = 0; b < bt; b++)
        for (int r = 0; r < R; r++) _mm512_storeu_ps(y + r * ldy + 16 * b, acc[b * R + r]);
}

// Rows of bf16 x [M][K] quantized as this kernel takes them: xq int8 [M][K], xs and xb
// [M][K/32] (quantize_row).
void wq_vnni_quantize(const uint16_t *x, int64_t M, int64_t K, int8_t *xq, float *xs, float *xb) {
    const int64_t groups = K / 32;
    for (int64_t m = 0; m < M; m++)
        quantize_row(x + m * K, groups, xq + m * K, xs + m * groups, xb + m * groups);
}

// Chunk c (CHUNK blocks of 16 output channels) of y for M quantized rows (wq_vnni_quantize),
// on the calling thread: wq_gemm_vnni's work item, and moe.c's.
void wq_vnni_chunk(const int8_t *xq, const float *xs, const float *xb, int64_t M, int64_t K,
                   const uint8_t *q, int bits, const uint8_t *params, int64_t N, int64_t c,
                   float *y, int64_t ldy) {
    const int64_t nblocks = N / 16, groups = K / 32;
    const uint8_t *factors = wq_factors(params, bits, nblocks, groups);
    const int64_t nb0 = c * CHUNK;
    const int bt = nblocks - nb0 < CHUNK ? (int)(nblocks - nb0) : CHUNK;
    // bt as a constant in each call (the switches): the accumulators then stay in registers;
    // with bt a variable they lived on the stack, a load and a store around every update.
    // Rows ROWS at a time, then one by one; R and BT constants in each CALL.
#define BT_CASES(call)          \
    switch (bt) {               \
    case 4: call(4); break;     \
    case 3: call(3); break;     \
    case 2: call(2); break;     \
    default: call(1); break;    \
    }
#define EACH_ROW_TILE(call)                  \
    for (; m + ROWS <= M; m += ROWS) {       \
        enum { R = ROWS };                   \
        BT_CASES(call)                       \
    }                                        \
    for (; m < M; m++) {                     \
        enum { R = 1 };                      \
        BT_CASES(call)                       \
    }
#define Q6K_ROWS(BT)                                                                          \
    chunk_rows_q6k(R, xq + m * K, xs + m * groups, K, groups, q, bits, params, factors, nb0, \
                   BT, y + m * ldy + 16 * nb0, ldy)
#define LEVEL_ROWS(BT)                                                                        \
    chunk_rows(R, xq + m * K, xs + m * groups, xb + m * groups, K, groups, q, bits, params,  \
               factors, nb0, BT, y + m * ldy + 16 * nb0, ldy)
    int64_t m = 0;
    if ((bits & WQ_LEVEL_BITS) == WQ_Q6K) {
        EACH_ROW_TILE(Q6K_ROWS)
    } else {
        EACH_ROW_TILE(LEVEL_ROWS)
    }
#undef LEVEL_ROWS
#undef Q6K_ROWS
#undef EACH_ROW_TILE
#undef BT_CASES
}

static __thread wq_buffer row_buffer;

void wq_gemm_vnni(const uint16_t *x, int64_t M, int64_t K, const uint8_t *q, int bits,
                  const uint8_t *params, int64_t N, float *y, int64_t ldy, int nthreads) {
    const int64_t groups = K / 32;
    const int64_t nchunks = (N / 16 + CHUNK - 1) / CHUNK;
    // The quantized rows, in the calling thread's buffer: int8 [M][K], then xs and xb [M][groups].
    const int64_t xq_bytes = (M * K + 63) / 64 * 64;
    uint8_t *buffer = wq_buffer_for(&row_buffer, xq_bytes + 2 * M * groups * (int64_t)sizeof(float));
    int8_t *xq = (int8_t *)buffer;
    float *xs = (float *)(buffer + xq_bytes), *xb = xs + M * groups;
#pragma omp parallel num_threads(nthreads)
    {
#pragma omp for schedule(static)
        for (int64_t m = 0; m < M; m++)
            wq_vnni_quantize(x + m * K, 1, K, xq + m * K, xs + m * groups, xb + m * groups);
#pragma omp for schedule(static)
        for (int64_t c = 0; c < nchunks; c++)
            wq_vnni_chunk(xq, xs, xb, M, K, q, bits, params, N, c, y, ldy);
    }
}
