// The matrix units of Intel Xeons (AMX: Sapphire Rapids and later) for the GEMMs of a decode or
// prefill step, on the same weight layouts as their AVX512 kernels:
//
// - wq_gemm_amx: the group-quantized linears (wq_gemm.c's layout). A 16-channel x 32-input
//   group dequantized to bf16 channel by channel (dequant_rows, the same bf16 weights) is
//   exactly an AMX "A" tile; up to 16 rows of x, pair-interleaved, are a "B" tile; TDPBF16PS
//   accumulates in float32. A chunk's tiles are dequantized once and kept (L2) for every
//   16-row tile of x.
// - int8_gemm_amx: the LM head's coarse logits (int8_gemm.c's layout [N/16][K/4][16][4], which
//   is the VNNI layout of a B tile: 16 rows of 4 inputs x 16 channels). TDPBSSD sums exactly in
//   int32, so the logits are bitwise int8_gemm's.
// - int4_head_gemm_amx: the 4-bit LM head (int4_head.c's layout), bitwise int4_head_gemm's (below).
//
// Batch invariance: a row of x's result is computed from that row alone, by the same tile
// operations in the same order whatever M is and wherever the row sits in its tile, so a row's
// result never depends on the other rows (tests/model/test_wq_gemm.py, test_int4_head.py). The bf16 linears therefore
// take this path for every M on a CPU with AMX (a switch to the AVX512 kernel at small M would
// change a row's last bits with the batch size); the int8 head may switch freely (exact).
//
// Linux grants AMX's 8 KiB of tile state per process on request (amx_init); where it is
// refused, or the CPU lacks AMX, the callers use the AVX512 kernels.
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "int4_head.h"
#include "wq_panel.h"

#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

// 1 where the kernel may use AMX tiles (the OS granted the tile data state), else 0.
int amx_init(void) {
    return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
}

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} __attribute__((packed)) tile_config;

// Tiles 0-3: C (rows x 16 float32 or int32), 4: A (rows x a_bytes), 5-7: B (b_rows x 64 bytes).
static void configure_tiles(int rows, int a_bytes, int b_rows) {
    tile_config cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int t = 0; t < 5; t++) {
        cfg.rows[t] = (uint8_t)rows;
        cfg.colsb[t] = t == 4 ? (uint16_t)a_bytes : 64;
    }
    for (int t = 5; t < 8; t++) {
        cfg.rows[t] = (uint8_t)b_rows;
        cfg.colsb[t] = 64;
    }
    _tile_loadconfig(&cfg);
}

// The int8 head: A holds 64 bytes of a row (64 int8), B 16 rows.
static void configure(int rows) { configure_tiles(rows, 64, 16); }

// ---- group-quantized linears (bf16) -------------------------------------------------------
//
// Weights are the A operand and x's rows the B one: C[channel][row] += W[channel][k] x[row][k].
// A block's group dequantized channel by channel (dequant_rows) is exactly an A tile (16 rows of
// 32 inputs); x's rows, pair-interleaved (x^T in VNNI layout), are B tiles of up to 16 columns.
// A 1-row decode step then runs on tiles of one column: its cost is dequantizing the panels,
// which the channel rows make cheap (wq_panel.h). The products and their order are those of
// x . W^T with the roles swapped: the same bits.

#define CHUNK 4  // 16-channel blocks per task, as in wq_gemm.c
#define PANEL_BYTES 1024
#define XT_BYTES 1024  // one group of a 16-row tile of x^T: 16 pairs x 16 rows x 2 bf16

// Tiles 0-3: C (16 channels x r rows of float32), 4: B (16 input pairs x r rows), 5-7: A (16
// channels x 32 inputs).
static void configure_wq(int r) {
    tile_config cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int t = 0; t < 8; t++) {
        cfg.rows[t] = 16;
        cfg.colsb[t] = t < 5 ? (uint16_t)(4 * r) : 64;
    }
    _tile_loadconfig(&cfg);
}

// C[b] += A(panel b) . B for the bt blocks of one group; A tiles rotate over 5-7 so that a
// load need not wait for the previous product to release its register.
#define WQ_STEP(b, t) \
    _tile_loadd(t, panels + (b) * PANEL_BYTES, 64); \
    _tile_dpbf16ps(b, t, 4)

static inline __attribute__((always_inline)) void wq_group(const uint8_t *panels, int bt) {
    WQ_STEP(0, 5);
    if (bt > 1) { WQ_STEP(1, 6); }
    if (bt > 2) { WQ_STEP(2, 7); }
    if (bt > 3) { WQ_STEP(3, 5); }
}

// C[b] (16 channels x r rows) into rows of y (ldy floats apart), 16 channels each.
static inline void store_c(float *y, int64_t ldy, int bt, int r) {
    __m512i c[16] __attribute__((aligned(64)));
    __m512i t[16];
    const __m512i column = _mm512_set_epi32(240, 224, 208, 192, 176, 160, 144, 128, 112, 96, 80,
                                            64, 48, 32, 16, 0);
    for (int b = 0; b < bt; b++) {
        switch (b) {  // a tile's number must be a constant
        case 0: _tile_stored(0, c, 64); break;
        case 1: _tile_stored(1, c, 64); break;
        case 2: _tile_stored(2, c, 64); break;
        default: _tile_stored(3, c, 64); break;
        }
        if (r == 16) {
            transpose16(c, t);
            for (int i = 0; i < 16; i++) _mm512_storeu_si512((void *)(y + i * ldy + 16 * b), t[i]);
        } else {
            for (int i = 0; i < r; i++)
                _mm512_storeu_ps(y + i * ldy + 16 * b,
                                 _mm512_i32gather_ps(column, (const float *)c + i, 4));
        }
    }
}

// The rows of the tile at m0 (16, or the last tile's rest), reconfiguring the tiles when that
// differs from the `rows` they hold.
static inline int tile_rows(int64_t M, int64_t m0, int *rows, void (*config)(int)) {
    const int r = M - m0 < 16 ? (int)(M - m0) : 16;
    if (r != *rows) {
        *rows = r;
        config(r);
    }
    return r;
}

static inline void zero_c(void) {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
}

static __thread wq_buffer panel_buffer, xt_buffer;

// x's rows as B tiles: xt[tile][group][pair p][row i] = x[16 tile + i][32 group + 2p .. + 1].
static void transpose_x(const uint16_t *x, int64_t M, int64_t K, uint32_t *xt) {
    const int64_t groups = K / 32, tiles = (M + 15) / 16;
#pragma omp for schedule(static)
    for (int64_t tg = 0; tg < tiles * groups; tg++) {
        const int64_t m0 = tg / groups * 16, g = tg % groups;
        const int r = M - m0 < 16 ? (int)(M - m0) : 16;
        uint32_t *dst = xt + tg * (XT_BYTES / 4);
        if (r == 16) {
            __m512i rows[16], pairs[16];
            for (int i = 0; i < 16; i++)
                rows[i] = _mm512_loadu_si512((const void *)(x + (m0 + i) * K + 32 * g));
            transpose16(rows, pairs);
            for (int p = 0; p < 16; p++) _mm512_store_si512((void *)(dst + 16 * p), pairs[p]);
            continue;
        }
        for (int i = 0; i < r; i++) {
            const uint32_t *src = (const uint32_t *)(x + (m0 + i) * K + 32 * g);
            for (int p = 0; p < 16; p++) dst[16 * p + i] = src[p];
        }
    }
}

void wq_gemm_amx(const uint16_t *x, int64_t M, int64_t K, const uint8_t *q, int bits,
                 const uint8_t *params, int64_t N, float *y, int64_t ldy, int nthreads) {
    const int64_t nblocks = N / 16, groups = K / 32;
    const int64_t nchunks = (nblocks + CHUNK - 1) / CHUNK;
    const uint8_t *factors = wq_factors(params, bits, nblocks, groups);
    // x^T (x's size): kept for the next call up to 8 MiB (decode steps), else for this one.
    const int64_t xt_bytes = (M + 15) / 16 * groups * XT_BYTES;
    const int keep = xt_bytes <= (8 << 20);
    uint32_t *xt = (uint32_t *)(keep ? wq_buffer_for(&xt_buffer, xt_bytes)
                                     : aligned_alloc(64, (size_t)xt_bytes));
    if (xt == NULL) return;
#pragma omp parallel num_threads(nthreads)
    {
        transpose_x(x, M, K, xt);  // ends in the loop's barrier
        // A chunk's panels for every group: up to 256 KiB at K = 2048, held in L2.
        const int64_t panel_bytes = (groups < 2 ? 2 : groups) * CHUNK * PANEL_BYTES;
        uint8_t *buf = wq_buffer_for(&panel_buffer, panel_bytes);
#define slot(g) (buf + (M <= 16 ? ((g) & 1) : (g)) * CHUNK * PANEL_BYTES)
        int rows = M < 16 ? (int)M : 16;
        configure_wq(rows);
#pragma omp for schedule(static)
        for (int64_t c = 0; c < nchunks; c++) {
            const int64_t nb0 = c * CHUNK;
            const int bt = nblocks - nb0 < CHUNK ? (int)(nblocks - nb0) : CHUNK;
            for (int64_t m0 = 0; m0 < M; m0 += 16) {
                const int r = tile_rows(M, m0, &rows, configure_wq);
                const uint8_t *xg = (const uint8_t *)xt + m0 / 16 * groups * XT_BYTES;
                zero_c();
                // On the first row tile each group's panels are dequantized one group ahead of
                // their products (the tile loads then find them stored); one row tile cycles
                // two 4 KiB slots (L1), more keep every group's panels for the next tiles.
                if (m0 == 0)
                    wq_dequant_group(q, bits, params, factors, nb0, groups, 0, bt,
                                     (__m512i *)slot(0), PANEL_BYTES / 64);
                for (int64_t g = 0; g < groups; g++) {
                    if (m0 == 0 && g + 1 < groups)
                        wq_dequant_group(q, bits, params, factors, nb0, groups, g + 1, bt,
                                         (__m512i *)slot(g + 1), PANEL_BYTES / 64);
                    _tile_loadd(4, xg + g * XT_BYTES, 64);
                    wq_group(slot(g), bt);
                }
                store_c(y + m0 * ldy + 16 * nb0, ldy, bt, r);
            }
        }
#undef slot
        _tile_release();
    }
    if (!keep) free(xt);
}

// ---- int8 LM head -------------------------------------------------------------------------

#define HEAD_BLOCKS 4  // 16-channel blocks per task, as in int8_gemm.c

#define I8_STEP(b, t) \
    _tile_loadd(t, wt + ((int64_t)(b) * quads + 16 * kc) * 64, 64); \
    _tile_dpbssd(b, 4, t)

// Requires K % 64 == 0 (one A tile row holds 64 inputs).
void int8_gemm_amx(const int8_t *x, int64_t M, int64_t K, const int8_t *w, const float *xs,
                   const float *wscale, int64_t N, float *y, int nthreads) {
    const int64_t nblocks = N / 16, ntasks = (nblocks + HEAD_BLOCKS - 1) / HEAD_BLOCKS;
    const int64_t quads = K / 4, kchunks = K / 64;
#pragma omp parallel num_threads(nthreads)
    {
        int32_t acc[HEAD_BLOCKS][16][16];
        int rows = M < 16 ? (int)M : 16;
        configure(rows);
#pragma omp for schedule(static)
        for (int64_t t = 0; t < ntasks; t++) {
            const int64_t nb = t * HEAD_BLOCKS;
            const int bt = nblocks - nb < HEAD_BLOCKS ? (int)(nblocks - nb) : HEAD_BLOCKS;
            const int8_t *wt = w + nb * 16 * K;
            for (int64_t m0 = 0; m0 < M; m0 += 16) {
                const int r = tile_rows(M, m0, &rows, configure);
                zero_c();
                for (int64_t kc = 0; kc < kchunks; kc++) {
                    _tile_loadd(4, x + m0 * K + 64 * kc, K);
                    I8_STEP(0, 5);
                    if (bt > 1) { I8_STEP(1, 6); }
                    if (bt > 2) { I8_STEP(2, 7); }
                    if (bt > 3) { I8_STEP(3, 5); }
                }
                _tile_stored(0, acc[0], 64);
                if (bt > 1) _tile_stored(1, acc[1], 64);
                if (bt > 2) _tile_stored(2, acc[2], 64);
                if (bt > 3) _tile_stored(3, acc[3], 64);
                // The same two float multiplications as int8_gemm.c, in the same order.
                for (int i = 0; i < r; i++) {
                    const __m512 sx = _mm512_set1_ps(xs[m0 + i]);
                    float *yr = y + (m0 + i) * N + 16 * nb;
                    for (int b = 0; b < bt; b++) {
                        const __m512 v =
                            _mm512_cvtepi32_ps(_mm512_loadu_si512((const void *)acc[b][i]));
                        const __m512 ws = _mm512_loadu_ps(wscale + 16 * (nb + b));
                        _mm512_storeu_ps(yr + 16 * b, _mm512_mul_ps(_mm512_mul_ps(v, sx), ws));
                    }
                }
            }
        }
        _tile_release();
    }
}

// ---- 4-bit LM head (int4_head.c's layout) -------------------------------------------------
//
// Per group of 32 inputs, TDPBSUD gives each row's exact int32 dot with a block's levels (x
// signed, levels unsigned): the integers int4_head.c sums with VNNI. The float steps after it
// are int4_head.c's, in its order, so the logits are bitwise the same: the head may switch
// between the two kernels by row count without changing a row's numbers.

#define HEAD4_BLOCK_BYTES 320
#define HEAD4_BLOCKS 4

// The 4-bit head: A holds one group of a row (32 int8), B one group's 8 quads of 16 channels.
static void configure_head4(int rows) { configure_tiles(rows, 32, 8); }

#define HEAD4_STEP(b)                                          \
    _tile_zero(b);                                             \
    _tile_loadd(5, quads[b], 64);                              \
    _tile_dpbsud(b, 4, 5);                                     \
    _tile_stored(b, dots[b], 64)

void int4_head_gemm_amx(const int8_t *x, int64_t M, int64_t K, const uint8_t *w,
                        const float *xs, int64_t N, float *y, int nthreads) {
    const int64_t nblocks = N / 16, groups = K / 32;
    const int64_t ntasks = (nblocks + HEAD4_BLOCKS - 1) / HEAD4_BLOCKS;
    float *xsum = int4_head_group_sums(x, M, K);
    const __m512i nibble = _mm512_set1_epi8(15);
#pragma omp parallel num_threads(nthreads)
    {
        uint8_t quads[HEAD4_BLOCKS][8][64] __attribute__((aligned(64)));
        int32_t dots[HEAD4_BLOCKS][16][16] __attribute__((aligned(64)));
        __m512 acc[16][HEAD4_BLOCKS];
        int rows = M < 16 ? (int)M : 16;
        configure_head4(rows);
#pragma omp for schedule(static)
        for (int64_t t = 0; t < ntasks; t++) {
            const int64_t nb = t * HEAD4_BLOCKS;
            const int bt =
                nblocks - nb < HEAD4_BLOCKS ? (int)(nblocks - nb) : HEAD4_BLOCKS;
            const uint8_t *wt = w + nb * groups * HEAD4_BLOCK_BYTES;
            for (int64_t m0 = 0; m0 < M; m0 += 16) {
                const int r = tile_rows(M, m0, &rows, configure_head4);
                for (int i = 0; i < r; i++)
                    for (int b = 0; b < bt; b++) acc[i][b] = _mm512_setzero_ps();
                for (int64_t g = 0; g < groups; g++) {
                    const uint8_t *grp = wt + g * bt * HEAD4_BLOCK_BYTES;
                    // Levels as B tiles: quad 2j = line j's low nibbles, 2j + 1 its high ones.
                    for (int b = 0; b < bt; b++)
                        for (int j = 0; j < 4; j++) {
                            const __m512i v = _mm512_loadu_si512(
                                (const void *)(grp + b * HEAD4_BLOCK_BYTES + 64 * j));
                            _mm512_store_si512((void *)quads[b][2 * j], _mm512_and_si512(v, nibble));
                            _mm512_store_si512((void *)quads[b][2 * j + 1],
                                               _mm512_and_si512(_mm512_srli_epi16(v, 4), nibble));
                        }
                    _tile_loadd(4, x + m0 * K + 32 * g, K);
                    HEAD4_STEP(0);
                    if (bt > 1) { HEAD4_STEP(1); }
                    if (bt > 2) { HEAD4_STEP(2); }
                    if (bt > 3) { HEAD4_STEP(3); }
                    for (int b = 0; b < bt; b++) {
                        const uint8_t *blk = grp + b * HEAD4_BLOCK_BYTES;
                        const __m512 scale =
                            _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(blk + 256)));
                        const __m512 mn =
                            _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(blk + 288)));
                        for (int i = 0; i < r; i++) {
                            const __m512i dot = _mm512_load_si512((const void *)dots[b][i]);
                            acc[i][b] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), scale, acc[i][b]);
                            acc[i][b] = _mm512_fmadd_ps(
                                mn, _mm512_set1_ps(xsum[(m0 + i) * groups + g]), acc[i][b]);
                        }
                    }
                }
                for (int i = 0; i < r; i++) {
                    const __m512 sx = _mm512_set1_ps(xs[m0 + i]);
                    for (int b = 0; b < bt; b++)
                        _mm512_storeu_ps(y + (m0 + i) * N + 16 * (nb + b),
                                         _mm512_mul_ps(acc[i][b], sx));
                }
            }
        }
        _tile_release();
    }
    free(xsum);
}
