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
// panel of 16 output channels x 32 inputs is dequantized once into bf16 (1 KiB, in L1) and
// reused for every row.
//
// Batch invariance: every row is computed by the same sequence of instructions whatever M is
// (rows are independent; a row's sum always runs over the groups and pairs in the same order),
// so a row's result does not depend on the other rows of the call.
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
#include <stdint.h>

#include "wq_panel.h"

#define PAIR(xrow, p) ((__m512bh)_mm512_set1_epi32(*(const int32_t *)((xrow) + 2 * (p))))

// Adds one group's contribution to MT rows x BT channel blocks of y, accumulating in registers
// (MT * BT independent chains keep the dot-product unit busy). Inlined with constant MT, BT.
static inline __attribute__((always_inline)) void tile(const uint16_t *x, int64_t K, float *y,
                                                       int64_t N, const __m512i *panels, int MT,
                                                       int BT, int first) {
    __m512 acc[4][4];
    for (int r = 0; r < MT; r++)
        for (int b = 0; b < BT; b++)
            acc[r][b] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(y + r * N + 16 * b);
    for (int p = 0; p < 16; p++) {
        for (int r = 0; r < MT; r++) {
            __m512bh xr = PAIR(x + r * K, p);
            for (int b = 0; b < BT; b++)
                acc[r][b] = _mm512_dpbf16_ps(acc[r][b], xr, (__m512bh)panels[16 * b + p]);
        }
    }
    for (int r = 0; r < MT; r++)
        for (int b = 0; b < BT; b++) _mm512_storeu_ps(y + r * N + 16 * b, acc[r][b]);
}

// One group of BT channel blocks for all M rows: 4 rows at a time, then one by one.
static inline __attribute__((always_inline)) void group_rows(const uint16_t *xg, int64_t M,
                                                             int64_t K, float *yb, int64_t N,
                                                             const __m512i *panels, int BT,
                                                             int first) {
    int64_t m = 0;
    for (; m + 4 <= M; m += 4) tile(xg + m * K, K, yb + m * N, N, panels, 4, BT, first);
    for (; m < M; m++) tile(xg + m * K, K, yb + m * N, N, panels, 1, BT, first);
}

// Channels are taken CHUNK blocks (64) at a time: CHUNK panels dequantized per group, then
// every row.
#define CHUNK 4
#define PREFETCH_GROUPS 1

void wq_gemm(const uint16_t *x, int64_t M, int64_t K, const uint8_t *q, int bits,
             const uint8_t *params, int64_t N, float *y, int64_t ldy, int nthreads) {
    const int64_t nblocks = N / 16, groups = K / 32;
    const int64_t nchunks = (nblocks + CHUNK - 1) / CHUNK;
    const int64_t group_bytes = wq_group_bytes(bits), param_bytes = wq_param_bytes(bits);
    const uint8_t *factors = wq_factors(params, bits, nblocks, groups);
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t c = 0; c < nchunks; c++) {
        __m512i panels[16 * CHUNK];
        const int64_t nb0 = c * CHUNK;
        const int bt = nblocks - nb0 < CHUNK ? (int)(nblocks - nb0) : CHUNK;
        for (int64_t g = 0; g < groups; g++) {
            const int64_t blk = nb0 * groups + g * bt;  // first block of this chunk-group
            // The next group's levels, fetched into L1 while this group computes (16 rows: 8.0
            // -> 5.9 ms per step; further ahead, or across chunks, measured slower).
            if (g + PREFETCH_GROUPS < groups) {
                const uint8_t *next = q + (blk + PREFETCH_GROUPS * bt) * group_bytes;
                for (int64_t b = 0; b < bt * group_bytes; b += 64)
                    _mm_prefetch((const char *)next + b, _MM_HINT_T0);
            }
            for (int b = 0; b < bt; b++)
                dequant_panel(q + (blk + b) * group_bytes, bits, params + param_bytes * (blk + b),
                              wq_block_factors(factors, nb0, groups, g, bt, b), panels + 16 * b);
            const uint16_t *xg = x + 32 * g;
            float *yb = y + 16 * nb0;
            switch (bt) {
            case 4: group_rows(xg, M, K, yb, ldy, panels, 4, g == 0); break;
            case 3: group_rows(xg, M, K, yb, ldy, panels, 3, g == 0); break;
            case 2: group_rows(xg, M, K, yb, ldy, panels, 2, g == 0); break;
            default: group_rows(xg, M, K, yb, ldy, panels, 1, g == 0); break;
            }
        }
    }
}
