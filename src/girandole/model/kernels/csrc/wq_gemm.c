// Weight-quantized GEMM for x86 CPUs with AVX512-BF16, or AVX2 + FMA (avx2_compat.h):
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
// Two summation orders, both of exact bf16 products in float32: the AVX512 build sums each
// output in 16 lanes of partial sums (vdpbf16ps over a group's input pairs), then across them
// (sum16); the AVX2 build, without vdpbf16ps and with 16 registers, runs one FMA chain per
// output over the inputs in order (a register-blocked product: see GIR_AVX2 below). So the two
// builds' results differ by float32 rounding (as the AMX kernel's, amx.c, do from both).
//
// Layouts (made by kernels/wq_gemm.py). Channels go in chunks of CHUNK blocks of 16
// (the last chunk may have fewer blocks); within a chunk, group by group, so each thread
// reads two sequential streams:
//   q:      [chunk][K/32][block][group of 16 channels x 32 inputs]; a group's bytes, channel
//           by channel: wq_panel.h (4 and 5 bits are packed).
//   params: [chunk][K/32][block][2][16] float32 (float16 with WQ_HALF): the block's 16 scales,
//           then 16 offsets. WQ_FACTORED: [chunk][K/32][block][2][16] uint8 integers, then
//           [chunk][K/256][block][2][16] float32 factors (scale = factor * integer, exactly;
//           float16 with WQ_HALF too).
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

// Channels are taken CHUNK blocks (64) at a time: the chunk's groups dequantized into channel
// rows once (up to 1 MiB at K = 8192, in L2; on AVX2 a K-slice at a time), then every row of x
// against them.
#define CHUNK 4

#ifdef GIR_AVX2
// AVX2 (no vdpbf16ps, 16 registers): a register-blocked product instead of the dot products
// above. x's rows are widened to float32 once per call; a K-slice of the chunk's weights is
// dequantized (channel rows, as above) and transposed into a float32 panel, [block][input][16
// channels]; then a tile of R rows x NB blocks keeps its 2 R NB accumulators in registers and,
// per input, loads 2 NB vectors of weights, broadcasts each row's input and does 2 R NB FMAs.
// Each output sums each K-slice (KC groups) in one FMA chain over its inputs in order, from
// zero, and the slices' sums in order (through y): the same operations whatever tile its row
// lands in, so a row's result does not depend on M or the other rows. Products of bf16 values
// are exact in float32, so each FMA rounds once, as an add would. (A chain per slice, not one
// over all of K: ~half the rounding error at K = 2048, at no cost; a chain per group cost ~8 %.)
// The order differs from the AVX512 build's (16 lanes of partial sums, then sum16), so prompt
// rows' floats differ from that build's by float32 rounding.
#define KC 16  // groups of a K-slice: a block's panel 32 KiB (L1), the chunk's 128 KiB (L2)
#define MAX_ROWS 6  // a tile's rows: 12 accumulators + 2 weights + 1 broadcast of 16 registers

// An 8 x 8 transpose of 32-bit elements: r[i] element e -> r[e] element i.
static inline __attribute__((always_inline)) void transpose8(__m256i *r) {
    __m256i t[8], u[8];
    for (int i = 0; i < 8; i += 2) {
        t[i] = _mm256_unpacklo_epi32(r[i], r[i + 1]);
        t[i + 1] = _mm256_unpackhi_epi32(r[i], r[i + 1]);
    }
    for (int i = 0; i < 8; i += 4) {  // u[i + e] 128-bit lane L: element 4L + e of rows i..i+3
        u[i] = _mm256_unpacklo_epi64(t[i], t[i + 2]);
        u[i + 1] = _mm256_unpackhi_epi64(t[i], t[i + 2]);
        u[i + 2] = _mm256_unpacklo_epi64(t[i + 1], t[i + 3]);
        u[i + 3] = _mm256_unpackhi_epi64(t[i + 1], t[i + 3]);
    }
    for (int e = 0; e < 4; e++) {
        r[e] = _mm256_permute2x128_si256(u[e], u[4 + e], 0x20);
        r[4 + e] = _mm256_permute2x128_si256(u[e], u[4 + e], 0x31);
    }
}

// A block's group (16 bf16 channel rows of 32 inputs) into its panel: panel[16 i + c] is
// channel c's weight at input i, as a float. The rows' 32-bit elements are pairs of inputs
// (2p, 2p + 1): transposed 8 x 8, then split into their two floats.
static inline __attribute__((always_inline)) void panel_group(const __m512i *rows, float *panel) {
    const __m256i high = _mm256_set1_epi32((int)0xFFFF0000u);
    for (int h = 0; h < 2; h++)  // pairs 8h .. 8h + 7
        for (int c0 = 0; c0 < 16; c0 += 8) {
            __m256i r[8];
            for (int i = 0; i < 8; i++) r[i] = h ? rows[c0 + i].hi : rows[c0 + i].lo;
            transpose8(r);  // r[p] element i: channel c0 + i's pair 8h + p
            for (int p = 0; p < 8; p++) {
                float *even = panel + 16 * (16 * h + 2 * p) + c0;
                _mm256_storeu_ps(even, _mm256_castsi256_ps(_mm256_slli_epi32(r[p], 16)));
                _mm256_storeu_ps(even + 16, _mm256_castsi256_ps(_mm256_and_si256(r[p], high)));
            }
        }
}

// R rows of x (floats, ldx apart) times NB blocks' panels (pstride floats apart) over a K-slice
// of n inputs: per output, the slice's n products summed in one FMA chain in input order (from
// zero), then stored to y[r][16 b + c] (`first`: the first slice) or added to it.
static inline __attribute__((always_inline)) void tile(const float *x, int64_t ldx,
                                                       const float *p, int64_t pstride,
                                                       int64_t n, int R, int NB, float *y,
                                                       int64_t ldy, int first) {
    __m256 acc[MAX_ROWS][8];
    for (int r = 0; r < R; r++)
        for (int j = 0; j < 2 * NB; j++) acc[r][j] = _mm256_setzero_ps();
    for (int64_t k = 0; k < n; k++) {
        __m256 w[8];
        for (int j = 0; j < 2 * NB; j++)
            w[j] = _mm256_loadu_ps(p + (j / 2) * pstride + 16 * k + 8 * (j % 2));
        for (int r = 0; r < R; r++) {
            const __m256 b = _mm256_broadcast_ss(x + r * ldx + k);
            for (int j = 0; j < 2 * NB; j++) acc[r][j] = _mm256_fmadd_ps(b, w[j], acc[r][j]);
        }
    }
    for (int r = 0; r < R; r++)
        for (int j = 0; j < 2 * NB; j++) {
            float *out = y + r * ldy + 16 * (j / 2) + 8 * (j % 2);
            const __m256 sum = first ? acc[r][j] : _mm256_add_ps(_mm256_loadu_ps(out), acc[r][j]);
            _mm256_storeu_ps(out, sum);
        }
}

// The blocks a tile of R rows takes at once (of nb left): enough accumulators to hide the FMAs'
// latency (8 chains) where few rows share the weights, within 16 registers.
static inline int tile_blocks(int R, int nb) {
    const int want = R >= 4 ? 1 : R >= 2 ? 2 : 4;
    return nb < want ? nb : want;
}

#define TILE(R, NB) tile(x, ldx, p, pstride, n, R, NB, y, ldy, first)
static void tile_any(const float *x, int64_t ldx, const float *p, int64_t pstride, int64_t n,
                     int R, int NB, float *y, int64_t ldy, int first) {
    switch (R * 8 + NB) {
    case 6 * 8 + 1: TILE(6, 1); break;
    case 5 * 8 + 1: TILE(5, 1); break;
    case 4 * 8 + 1: TILE(4, 1); break;
    case 3 * 8 + 2: TILE(3, 2); break;
    case 3 * 8 + 1: TILE(3, 1); break;
    case 2 * 8 + 2: TILE(2, 2); break;
    case 2 * 8 + 1: TILE(2, 1); break;
    case 1 * 8 + 4: TILE(1, 4); break;
    case 1 * 8 + 3: TILE(1, 3); break;
    case 1 * 8 + 2: TILE(1, 2); break;
    default: TILE(1, 1); break;
    }
}
#undef TILE

// A row's K bf16 inputs as floats.
static void widen_row(const uint16_t *x, int64_t K, float *out) {
    for (int64_t i = 0; i < K; i += 8) {
        const __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(x + i)));
        _mm256_storeu_ps(out + i, _mm256_castsi256_ps(_mm256_slli_epi32(v, 16)));
    }
}

// One chunk (bt blocks from nb0) for every row: K-slice by K-slice, the slice's panel made, then
// the rows in tiles of up to MAX_ROWS (as even as they go: 13 rows as 5 + 4 + 4).
static void chunk_avx2(const float *xf, int64_t M, int64_t K, const uint8_t *q, int bits,
                       const uint8_t *params, const uint8_t *factors, int64_t nb0, int bt,
                       float *panel, float *y, int64_t ldy) {
    const int64_t groups = K / 32, pstride = KC * 32 * 16;
    const int64_t tiles = (M + MAX_ROWS - 1) / MAX_ROWS;
    __m512i rows[CHUNK * 16];
    for (int64_t g0 = 0; g0 < groups; g0 += KC) {
        const int64_t ng = groups - g0 < KC ? groups - g0 : KC;
        for (int64_t g = g0; g < g0 + ng; g++) {
            wq_dequant_group(q, bits, params, factors, nb0, groups, g, bt, rows, 16);
            for (int b = 0; b < bt; b++)
                panel_group(rows + 16 * b, panel + b * pstride + (g - g0) * 512);
        }
        for (int64_t t = 0, m = 0; t < tiles; t++) {
            const int R = (int)(M / tiles + (t < M % tiles));
            for (int b = 0; b < bt;) {
                const int NB = tile_blocks(R, bt - b);
                tile_any(xf + m * K + 32 * g0, K, panel + b * pstride, pstride, 32 * ng, R, NB,
                         y + m * ldy + 16 * (nb0 + b), ldy, g0 == 0);
                b += NB;
            }
            m += R;
        }
    }
}

static __thread wq_buffer x_buffer, panel_buffer;
#else
static __thread wq_buffer weight_buffer;
#endif

// Rows of bf16 x widened to float32 for the AVX2 chunk (a no-op elsewhere: the AVX512 one
// reads bf16).
void wq_widen_rows(const uint16_t *x, int64_t M, int64_t K, float *xf) {
#ifdef GIR_AVX2
    for (int64_t m = 0; m < M; m++) widen_row(x + m * K, K, xf + m * K);
#else
    (void)x, (void)M, (void)K, (void)xf;
#endif
}

// Chunk c (CHUNK blocks of 16 output channels) of y for M rows: x bf16 [M][K] (the AVX512
// build) or xf, those rows widened (wq_widen_rows; the AVX2 build). Runs on the calling thread
// with its buffers: wq_gemm's work item, and moe.c's.
void wq_gemm_chunk(const uint16_t *x, const float *xf, int64_t M, int64_t K, const uint8_t *q,
                   int bits, const uint8_t *params, int64_t N, int64_t c, float *y, int64_t ldy) {
    const int64_t nblocks = N / 16, groups = K / 32;
    const uint8_t *factors = wq_factors(params, bits, nblocks, groups);
    const int64_t nb0 = c * CHUNK;
    const int bt = nblocks - nb0 < CHUNK ? (int)(nblocks - nb0) : CHUNK;
#ifdef GIR_AVX2
    (void)x;
    float *panel = (float *)wq_buffer_for(&panel_buffer, CHUNK * KC * 32 * 16 * 4);
    chunk_avx2(xf, M, K, q, bits, params, factors, nb0, bt, panel, y, ldy);
#else
    (void)xf;
    // [block][group][16 channel rows]
    __m512i *w = (__m512i *)wq_buffer_for(&weight_buffer, CHUNK * groups * 1024);
    for (int64_t g = 0; g < groups; g++)
        wq_dequant_group(q, bits, params, factors, nb0, groups, g, bt, w + 16 * g, 16 * groups);
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
#endif
}

void wq_gemm(const uint16_t *x, int64_t M, int64_t K, const uint8_t *q, int bits,
             const uint8_t *params, int64_t N, float *y, int64_t ldy, int nthreads) {
    const int64_t nchunks = (N / 16 + CHUNK - 1) / CHUNK;
    float *xf = NULL;
#ifdef GIR_AVX2
    xf = (float *)wq_buffer_for(&x_buffer, M * K * (int64_t)sizeof(float));
#endif
#pragma omp parallel num_threads(nthreads)
    {
#ifdef GIR_AVX2
#pragma omp for schedule(static)
        for (int64_t m = 0; m < M; m++) wq_widen_rows(x + m * K, 1, K, xf + m * K);
#endif
#pragma omp for schedule(static)
        for (int64_t c = 0; c < nchunks; c++)
            wq_gemm_chunk(x, xf, M, K, q, bits, params, N, c, y, ldy);
    }
}
