// Weight-quantized GEMM for decode rows on x86 CPUs with AVX512-BF16.
//
//   y[M][N] (fp32) = x[M][K] (bf16) . W[N][K]^T,   W = bf16(q * scale + offset)
//
// y's rows are ldy floats apart (ldy >= N): a linear whose parts are stored at different widths
// (quant.py's ConcatLinear) writes each part's columns into one output.
//
// with q an integer level (4, 5 or 8 bits; `bits` and its flags: wq_panel.h) and (scale, offset)
// per output row and group of 32 inputs: GGUF's Q4_K/Q4_0/Q4_1 (4 bits), Q5_0/Q5_1/Q5_K (5) and
// Q6_K/Q8_0 (8) exactly.
//
// Why not torch's int4 kernel: it dequantizes the weights again for every 4 rows of x, so a
// 16-row decode step costs 4x a 1-row one, and a 5-bit group needs two int4 matmuls. Here a
// chunk's weights are dequantized once into bf16 channel rows (in L2) and reused for every row.
//
// Batch invariance: every row is computed by the same sequence of instructions whatever M is
// (rows are independent; a row's sum always runs over the groups, lanes and pairs in the same
// order), so a row's result does not depend on the other rows of the call.
//
// Layouts (made by kernels/wq_gemm.py). Channels go in chunks of CHUNK blocks of 16
// (the last chunk may have fewer blocks); within a chunk, group by group, so each thread
// reads two sequential streams:
//   q:      [chunk][K/32][block][group of 16 channels x 32 inputs]; a group's bytes, channel
//           by channel: wq_panel.h (4 and 5 bits are packed).
//   params: [chunk][K/32][block][2][16] float32 (float16 with WQ_HALF): the block's 16 scales,
//           then 16 offsets. WQ_FACTORED: [chunk][K/32][block][2][16] uint8 integers, then
//           [chunk][K/256][block][2][16] float32 factors (scale = factor * integer, exactly).
#include <immintrin.h>

#include "avx2_compat.h"
#include <stdint.h>

#include "wq_panel.h"

// The 16 channel sums of a[c] (16 partial sums each): a fixed tree, lanes combined 128 bits
// at a time, then within them.
static inline __attribute__((always_inline)) __m512 sum16(const __m512 *a) {
    __m512 b[8], c[4];
    for (int i = 0; i < 8; i++)  // b[i]: 128-bit lanes a[2i](0+2, 1+3), a[2i+1](0+2, 1+3)
        b[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0x44),
                             _mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0xEE));
    for (int j = 0; j < 4; j++)  // c[j]: 128-bit lane k holds a[4j + k]'s 4 partial sums
        c[j] = _mm512_add_ps(_mm512_shuffle_f32x4(b[2 * j], b[2 * j + 1], 0x88),
                             _mm512_shuffle_f32x4(b[2 * j], b[2 * j + 1], 0xDD));
    const __m512 d0 = _mm512_add_ps(_mm512_unpacklo_ps(c[0], c[1]), _mm512_unpackhi_ps(c[0], c[1]));
    const __m512 d1 = _mm512_add_ps(_mm512_unpacklo_ps(c[2], c[3]), _mm512_unpackhi_ps(c[2], c[3]));
    // Element e of 128-bit lane k now sums channel 4e + k.
    const __m512 r = _mm512_add_ps(_mm512_shuffle_ps(d0, d1, _MM_SHUFFLE(1, 0, 1, 0)),
                                   _mm512_shuffle_ps(d0, d1, _MM_SHUFFLE(3, 2, 3, 2)));
    const __m512i order = _mm512_set_epi32(15, 11, 7, 3, 14, 10, 6, 2, 13, 9, 5, 1, 12, 8, 4, 0);
    return _mm512_permutexvar_ps(order, r);
}

// One row's 16 channels of a block over every group: 16 dot products of the row with the
// channels' bf16 rows (lane j sums input pair j of each group), then summed across lanes.
static inline __attribute__((always_inline)) __m512 block_row(const uint16_t *xr, int64_t groups,
                                                              const __m512i *w) {
    __m512 acc[16];
    for (int c = 0; c < 16; c++) acc[c] = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; g++) {
        const __m512bh xv = GIR_AS_BH(_mm512_loadu_si512((const void *)(xr + 32 * g)));
        const __m512i *wg = w + 16 * g;
        for (int c = 0; c < 16; c++) acc[c] = _mm512_dpbf16_ps(acc[c], xv, GIR_AS_BH(wg[c]));
    }
    return sum16(acc);
}

// Four rows x four channels (c0 .. c0 + 3 of a block), the same sums as block_row's for each
// (the same chain per channel and row, the same tree): each channel row loaded once for four
// rows, so more rows read the chunk's weights from L2 a quarter as often. Row r's four sums
// go to y + r * ldy.
static inline __attribute__((always_inline)) void quad_rows(const uint16_t *x, int64_t K,
                                                            int64_t groups, const __m512i *w,
                                                            int c0, float *y, int64_t ldy) {
    __m512 acc[16];  // acc[4r + c]
    for (int i = 0; i < 16; i++) acc[i] = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; g++) {
        const __m512i *wg = w + 16 * g + c0;
        __m512bh xv[4];
        for (int r = 0; r < 4; r++)
            xv[r] = GIR_AS_BH(_mm512_loadu_si512((const void *)(x + r * K + 32 * g)));
        for (int c = 0; c < 4; c++) {
            const __m512bh wc = GIR_AS_BH(_mm512_loadu_si512((const void *)(wg + c)));
            for (int r = 0; r < 4; r++)
                acc[4 * r + c] = _mm512_dpbf16_ps(acc[4 * r + c], xv[r], wc);
        }
    }
    const __m512 sums = sum16(acc);  // 128-bit lane r: row r's four channels
    _mm_storeu_ps(y, _mm512_extractf32x4_ps(sums, 0));
    _mm_storeu_ps(y + ldy, _mm512_extractf32x4_ps(sums, 1));
    _mm_storeu_ps(y + 2 * ldy, _mm512_extractf32x4_ps(sums, 2));
    _mm_storeu_ps(y + 3 * ldy, _mm512_extractf32x4_ps(sums, 3));
}

#ifdef GIR_AVX2
// Without vdpbf16ps (avx2_compat.h unpacks each bf16 pair into two FMAs) the x side is unpacked
// once per call instead of once per channel: row m's group g as 4 vectors of 8 floats, the odd
// and the even inputs of its first 16, then of its last 16.
static void split_row(const uint16_t *x, int64_t groups, __m256 *out) {
    const __m256i high = _mm256_set1_epi32((int)0xFFFF0000u);
    for (int64_t g = 0; g < groups; g++) {
        const __m512i raw = _mm512_loadu_si512((const void *)(x + 32 * g));
        out[4 * g] = _mm256_castsi256_ps(_mm256_and_si256(raw.lo, high));
        out[4 * g + 1] = _mm256_castsi256_ps(_mm256_slli_epi32(raw.lo, 16));
        out[4 * g + 2] = _mm256_castsi256_ps(_mm256_and_si256(raw.hi, high));
        out[4 * g + 3] = _mm256_castsi256_ps(_mm256_slli_epi32(raw.hi, 16));
    }
}

// R rows (1..4) of split x against one block's 16 channel rows: per row and channel the same
// FMAs in the same order as the emulated vdpbf16ps of block_row / quad_rows (odd input, then
// even, group by group), and the same tree (sum16): the same floats, with 8 accumulators
// instead of 32 (AVX2 has 16 registers).
static inline __attribute__((always_inline)) void block_rows_split(const __m256 *xs,
                                                                   int64_t groups, int R,
                                                                   const __m512i *w, float *y,
                                                                   int64_t ldy) {
    const __m256i high = _mm256_set1_epi32((int)0xFFFF0000u);
    __m512 acc[4][16];
    for (int c = 0; c < 16; c++) {
        __m256 lo[4], hi[4];
        for (int r = 0; r < R; r++) lo[r] = hi[r] = _mm256_setzero_ps();
        for (int64_t g = 0; g < groups; g++) {
            const __m512i wc = w[16 * g + c];
            const __m256 wo_lo = _mm256_castsi256_ps(_mm256_and_si256(wc.lo, high));
            const __m256 we_lo = _mm256_castsi256_ps(_mm256_slli_epi32(wc.lo, 16));
            const __m256 wo_hi = _mm256_castsi256_ps(_mm256_and_si256(wc.hi, high));
            const __m256 we_hi = _mm256_castsi256_ps(_mm256_slli_epi32(wc.hi, 16));
            for (int r = 0; r < R; r++) {
                const __m256 *xr = xs + 4 * (r * groups + g);
                lo[r] = _mm256_fmadd_ps(xr[0], wo_lo, lo[r]);
                lo[r] = _mm256_fmadd_ps(xr[1], we_lo, lo[r]);
                hi[r] = _mm256_fmadd_ps(xr[2], wo_hi, hi[r]);
                hi[r] = _mm256_fmadd_ps(xr[3], we_hi, hi[r]);
            }
        }
        for (int r = 0; r < R; r++) acc[r][c] = (__m512){lo[r], hi[r]};
    }
    for (int r = 0; r < R; r++) _mm512_storeu_ps(y + r * ldy, sum16(acc[r]));
}

static __thread wq_buffer split_buffer;
#endif

// Channels are taken CHUNK blocks (64) at a time: the chunk's groups dequantized into channel
// rows once (up to 1 MiB at K = 8192, in L2), then every row of x against them.
#define CHUNK 4

static __thread wq_buffer weight_buffer;

void wq_gemm(const uint16_t *x, int64_t M, int64_t K, const uint8_t *q, int bits,
             const uint8_t *params, int64_t N, float *y, int64_t ldy, int nthreads) {
    const int64_t nblocks = N / 16, groups = K / 32;
    const int64_t nchunks = (nblocks + CHUNK - 1) / CHUNK;
    const uint8_t *factors = wq_factors(params, bits, nblocks, groups);
#ifdef GIR_AVX2
    __m256 *xs = (__m256 *)wq_buffer_for(&split_buffer, M * K * (int64_t)sizeof(float));
#endif
#pragma omp parallel num_threads(nthreads)
    {
        // [block][group][16 channel rows]
        __m512i *w = (__m512i *)wq_buffer_for(&weight_buffer, CHUNK * groups * 1024);
#ifdef GIR_AVX2
#pragma omp for schedule(static)
        for (int64_t m = 0; m < M; m++) split_row(x + m * K, groups, xs + 4 * m * groups);
#endif
#pragma omp for schedule(static)
        for (int64_t c = 0; c < nchunks; c++) {
            const int64_t nb0 = c * CHUNK;
            const int bt = nblocks - nb0 < CHUNK ? (int)(nblocks - nb0) : CHUNK;
            for (int64_t g = 0; g < groups; g++)
                wq_dequant_group(q, bits, params, factors, nb0, groups, g, bt, w + 16 * g,
                                 16 * groups);
#ifdef GIR_AVX2
            for (int64_t m = 0; m < M; m += 4)
                for (int b = 0; b < bt; b++) {
                    const __m256 *xm = xs + 4 * m * groups;
                    const __m512i *wb = w + 16 * b * groups;
                    float *ym = y + m * ldy + 16 * (nb0 + b);
                    switch (M - m < 4 ? M - m : 4) {
                    case 4: block_rows_split(xm, groups, 4, wb, ym, ldy); break;
                    case 3: block_rows_split(xm, groups, 3, wb, ym, ldy); break;
                    case 2: block_rows_split(xm, groups, 2, wb, ym, ldy); break;
                    default: block_rows_split(xm, groups, 1, wb, ym, ldy); break;
                    }
                }
            continue;
#endif
            int64_t m = 0;
            for (; m + 4 <= M; m += 4)
                for (int b = 0; b < bt; b++)
                    for (int c0 = 0; c0 < 16; c0 += 4)
                        quad_rows(x + m * K, K, groups, w + 16 * b * groups, c0,
                                  y + m * ldy + 16 * (nb0 + b) + c0, ldy);
            for (; m < M; m++)
                for (int b = 0; b < bt; b++)
                    _mm512_storeu_ps(y + m * ldy + 16 * (nb0 + b),
                                     block_row(x + m * K, groups, w + 16 * b * groups));
        }
    }
}
