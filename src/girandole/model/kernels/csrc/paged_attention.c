// Paged attention on CPU (AVX512, float32): each query row against the keys it sees (causal,
// optionally a sliding window) in the paged KV cache, read through its sequence's slot list.
//
// Every row has its own chunks of KEY_CHUNK keys, from the first key it sees (with a window, a
// prompt's neighbouring rows' chunks start one key apart). A tile is up to TILE_ROWS consecutive
// rows of one sequence at consecutive positions (a prompt's rows; a decode row is a tile of one);
// a tile's chunk c of one KV head gives the softmax partials (max, sum, weighted values) of chunk
// c for every row of the tile, reading each key and value once for them all: the scores of all
// the rows and heads against the keys of their chunks together (a few more than one chunk), then
// each row's partials over its own chunk's keys. The chunks of a row's head are then combined in
// order. For a prompt's rows the threads take (tile, KV head) tasks, each of its chunks in turn
// (attend); decode rows' chunks are spread over the threads one by one.
//
// Every number depends only on the row's own query and keys and on its fixed chunk boundaries:
// never on the batch, on how a prompt was split into chunks (or tiles), on whether the row is a
// decode or a prefill token, or on the thread count. A row's arithmetic (its scores' lane chains
// and the adds that finish them, the softmax partial, the weighted values summed in key order,
// the chunks' combination) is the one it has alone; only the loop order across rows and the
// register blocks differ.
//
// The cache holds float32 or float16 (`_f16` entry points: half the bytes a step reads, where a
// model with many KV heads spends most of a batched decode step on this kernel). Half keys and
// values are widened to float32 as they are loaded (exactly), so the f16 kernel's numbers are the
// float32 kernel's on the widened cache; all arithmetic is float32.
//
// Attention sinks (gpt-oss): an optional learned logit per query head that joins every row's
// softmax as one more column without a value; it enters once, where a head's chunks are
// combined (the running max starts at it, the sum at its exp). NULL: no sinks.
#include <immintrin.h>

#include "avx2_compat.h"
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "simd_math.h"

#define KEY_CHUNK 128
#define TILE_ROWS 8  // consecutive query rows of one sequence per task
// The keys a tile's rows see of one chunk, together (KEY_CHUNK + TILE_ROWS - 1), rounded up to
// whole blocks of 8 keys (the scores' unit).
#define SPAN ((KEY_CHUNK + TILE_ROWS + 6) & ~7)
#define PREFETCH_AHEAD 16  // keys
#define MAX_REP 8  // query heads per KV head handled together (more: in several passes)
#define F16_MAX 65504.0f
// The scores' lane vectors: a key's dot product with a query is summed in lanes of 16 floats
// (avx2_compat.h: two halves of 8 on AVX2), each 64-dim block's 16-dim quarter c into chain c.
// Here a lane vector is what the CPU's registers hold (AVX2: one half of a quarter), and the
// register blocks (query vectors x keys, one lane vector's chain at a time) fit its registers:
// 16 of 8 floats on AVX2, 32 of 16 on AVX-512; so do the weighted values' (VALUE_ACC vectors of
// 16 dims: heads x dims).
#ifdef GIR_AVX2
typedef __m256 lanes_t;
#define LANES 8
#define lanes_zero _mm256_setzero_ps
#define lanes_load _mm256_loadu_ps
#define lanes_load_half(p) _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p)))
#define lanes_fmadd _mm256_fmadd_ps
#define lanes_add _mm256_add_ps
#define IN_REGISTER(v) __asm__("" : "+x"(v))
#define CHAIN_PAIRS 3
#define CHAIN_KEYS 2
#define VALUE_ACC 4
#else
typedef __m512 lanes_t;
#define LANES 16
#define lanes_zero _mm512_setzero_ps
#define lanes_load _mm512_loadu_ps
#define lanes_load_half(p) _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(p)))
#define lanes_fmadd _mm512_fmadd_ps
#define lanes_add _mm512_add_ps
#define IN_REGISTER(v) __asm__("" : "+v"(v))
#define CHAIN_PAIRS 4
#define CHAIN_KEYS 2
#define VALUE_ACC 16
#endif
#define VALUE_DIMS_MAX 64
#define SLOTS (64 / LANES)  // lane vectors per 64-dim block
#define QUARTER (16 / LANES)  // lane vectors per 16-dim quarter (chain c: slots c * QUARTER ..)

// 16 cache elements from element index i of a float32 (half = 0) or float16 (half = 1) cache.
// Inlined with a constant `half`: each kernel below is compiled once per cache type.
static inline __attribute__((always_inline)) __m512 load16(const void *base, int64_t i, int half) {
    if (half) return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((const uint16_t *)base + i)));
    return _mm512_loadu_ps((const float *)base + i);
}

// out[h][16 c ..] = sum_j p[h][j] * v_j[16 c ..] for HN heads (rows of p: p_stride apart) and
// CN vectors of 16 dims, summed in key order from zero; v_j at element vofs[j] of v.
// Inlined with constant HN, CN, half.
static inline __attribute__((always_inline)) void weighted_values(
    const float *p, int64_t p_stride, const int64_t *vofs, int64_t n, const void *v, float *out,
    int64_t out_stride, int HN, int CN, int half) {
    __m512 acc[4][4];
    for (int h = 0; h < HN; h++)
        for (int c = 0; c < CN; c++) acc[h][c] = _mm512_setzero_ps();
    for (int64_t j = 0; j < n; j++) {
        __m512 vj[4];
        for (int c = 0; c < CN; c++) vj[c] = load16(v, vofs[j] + 16 * c, half);
        for (int h = 0; h < HN; h++) {
            const __m512 ph = _mm512_set1_ps(p[h * p_stride + j]);
            for (int c = 0; c < CN; c++) acc[h][c] = _mm512_fmadd_ps(ph, vj[c], acc[h][c]);
        }
    }
    for (int h = 0; h < HN; h++)
        for (int c = 0; c < CN; c++) _mm512_storeu_ps(out + h * out_stride + 16 * c, acc[h][c]);
}

// weighted_values for hn heads and dn vectors of 16 dims (a slice of dn * 16 dims), in blocks of
// constant sizes whose accumulators fit the registers (runtime sizes spill them): up to
// VALUE_ACC vectors of 16 per block (heads x vectors).
static inline __attribute__((always_inline)) void values_slice(
    const float *p, int64_t p_stride, int hn, int dn, const int64_t *vofs, int64_t n, const void *v,
    float *out, int64_t out_stride, int half) {
#define VALUES(H, HN, CN)                                                                   \
    weighted_values(p + (H) * p_stride, p_stride, vofs, n, v, out + (H) * out_stride, out_stride, \
                    HN, CN, half)
    const int hmax = VALUE_ACC / dn < 4 ? VALUE_ACC / dn : 4;
    for (int h = 0; h < hn; h += hmax) {
        const int hb = hn - h < hmax ? hn - h : hmax;
        if (dn == 1 && hb == 4) VALUES(h, 4, 1);
        else if (dn == 1 && hb == 3) VALUES(h, 3, 1);
        else if (dn == 1 && hb == 2) VALUES(h, 2, 1);
        else if (dn == 1) VALUES(h, 1, 1);
        else if (dn == 2 && hb == 2) VALUES(h, 2, 2);
        else if (dn == 4 && hb == 4 && VALUE_ACC >= 16) VALUES(h, 4, 4);
        else if (dn == 4 && hb == 3 && VALUE_ACC >= 12) VALUES(h, 3, 4);
        else if (dn == 4 && hb == 2 && VALUE_ACC >= 8) VALUES(h, 2, 4);
        else if (dn == 2)  // the heads one at a time
            for (int i = h; i < h + hb; i++) VALUES(i, 1, 2);
        else if (dn == 4)
            for (int i = h; i < h + hb; i++) VALUES(i, 1, 4);
        else  // other widths (AVX-512's last slice of D % 64 dims): one vector at a time too
            for (int i = h; i < h + hb; i++)
                for (int c = 0; c < dn; c++)
                    weighted_values(p + i * p_stride, p_stride, vofs, n,
                                    (const char *)v + 16 * c * (half ? 2 : 4),
                                    out + i * out_stride + 16 * c, out_stride, 1, 1, half);
    }
#undef VALUES
}

// The values' slice width for nh query heads: AVX2's 4 accumulators (heads x vectors of 16) per
// block as 4 heads x 16 dims, 2 x 32 or 1 x 64; AVX-512's 16 as 4 x 64.
static inline int value_dims(int nh) {
#ifdef GIR_AVX2
    return nh >= 3 ? 16 : nh == 2 ? 32 : 64;
#else
    (void)nh;
    return 64;
#endif
}

// A key's score is the sum of its accumulator's 16 lanes, by the tree of GCC's
// _mm512_reduce_add_ps (and avx2_compat.h's gir_reduce_add_ps): t = hi + lo (8 lanes), then
// lanes i + (i + 4), then (0 + 2, 1 + 3), then 0 + 1, a chain of shuffles and adds per key and
// head. Here the same adds for 8 keys at once (t[k]: key k's hi + lo), vertical across the keys
// after transposing shuffles: the same floats, times scale, into out[0..8). One key at a time
// the reduction took more instructions than the key's FMAs at head_dim 128.
static inline __attribute__((always_inline)) void scores8(const __m256 *t, float scale,
                                                          float *out) {
    __m256 s[4];  // s[p]: keys 2p and 2p + 1, each a 128-bit lane of its 4 sums i + (i + 4)
    for (int p = 0; p < 4; p++)
        s[p] = _mm256_add_ps(_mm256_permute2f128_ps(t[2 * p], t[2 * p + 1], 0x31),
                             _mm256_permute2f128_ps(t[2 * p], t[2 * p + 1], 0x20));
    // w0: lane 0 keys 0, 2 and lane 1 keys 1, 3 (each 0 + 2, 1 + 3); w1: keys 4 to 7 alike.
    const __m256 w0 = _mm256_add_ps(_mm256_shuffle_ps(s[0], s[1], 0x44),
                                    _mm256_shuffle_ps(s[0], s[1], 0xEE));
    const __m256 w1 = _mm256_add_ps(_mm256_shuffle_ps(s[2], s[3], 0x44),
                                    _mm256_shuffle_ps(s[2], s[3], 0xEE));
    // Keys 0, 2, 4, 6 | 1, 3, 5, 7: 0 + 1 of each; then in key order.
    const __m256 r = _mm256_add_ps(_mm256_shuffle_ps(w0, w1, 0x88),
                                   _mm256_shuffle_ps(w0, w1, 0xDD));
    const __m256 scaled = _mm256_mul_ps(r, _mm256_set1_ps(scale));
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    _mm256_storeu_ps(out, _mm256_permutevar8x32_ps(scaled, order));
}

// LANES key elements from element i of a float32 (half = 0) or float16 (half = 1) cache row.
static inline __attribute__((always_inline)) lanes_t key_lanes(const void *k, int64_t i, int half) {
    return half ? lanes_load_half((const uint16_t *)k + i) : lanes_load((const float *)k + i);
}

// One step of the lane chains below: a[p][j] += q[p][d ..] * key j[d ..] (LANES dims). Each
// query vector and key loaded once into a register for the block (the compiler would rather
// load the key again for each query as an operand: more loads than FMAs).
static inline __attribute__((always_inline)) void chain_step(
    const float *const *q, const void *k, const int64_t *koff, int64_t d, int RP, int RJ,
    int half, lanes_t a[CHAIN_PAIRS][CHAIN_KEYS]) {
    lanes_t qv[CHAIN_PAIRS];
    for (int p = 0; p < RP; p++) {
        qv[p] = lanes_load(q[p] + d);
        IN_REGISTER(qv[p]);
    }
    for (int j = 0; j < RJ; j++) {
        lanes_t kv = key_lanes(k, koff[j] + d, half);
        IN_REGISTER(kv);
        for (int p = 0; p < RP; p++) a[p][j] = lanes_fmadd(qv[p], kv, a[p][j]);
    }
}

// The lane chains of RP query vectors q[p] (a row's head each) against RJ keys (key j's D
// elements at element koff[j] of k), two quarters' at a time and summed as they finish:
// out[p][j][e * QUARTER + h] = a_2e + a_2e+1 on lane vector h of the quarters, where a_c = the
// sum, over the 64-dim blocks in order, of q[p] * key j on that lane vector of quarter c (quarter
// 0's chains go on over the last D % 64 dims). A block's accumulators stay in registers.
static inline __attribute__((always_inline)) void lane_chains(
    const float *const *q, const void *k, const int64_t *koff, int64_t D, int RP, int RJ,
    int half, lanes_t out[CHAIN_PAIRS][CHAIN_KEYS][2 * QUARTER]) {
    const int64_t D64 = D & ~(int64_t)63;
    for (int e = 0; e < 2; e++)
        for (int h = 0; h < QUARTER; h++) {
            const int64_t d0 = LANES * (2 * e * QUARTER + h);  // quarter 2e's lane vector h
            lanes_t a[CHAIN_PAIRS][CHAIN_KEYS], b[CHAIN_PAIRS][CHAIN_KEYS];
            for (int p = 0; p < RP; p++)
                for (int j = 0; j < RJ; j++) a[p][j] = b[p][j] = lanes_zero();
            for (int64_t d = d0; d < D64; d += 64) {
                chain_step(q, k, koff, d, RP, RJ, half, a);
                chain_step(q, k, koff, d + 16, RP, RJ, half, b);  // quarter 2e + 1
            }
            if (e == 0)
                for (int64_t d = D64 + d0; d < D; d += 16)
                    chain_step(q, k, koff, d, RP, RJ, half, a);
            for (int p = 0; p < RP; p++)
                for (int j = 0; j < RJ; j++)
                    out[p][j][e * QUARTER + h] = lanes_add(a[p][j], b[p][j]);
        }
}

// A key's 16 lanes from its lane chains (one query vector), (a0 + a1) + (a2 + a3) lane by lane,
// summed hi + lo into 8 lanes: the first add of the reduction tree (scores8 does the rest).
static inline __attribute__((always_inline)) __m256 quarters_sum(const lanes_t *y) {
#ifdef GIR_AVX2
    return _mm256_add_ps(_mm256_add_ps(y[1], y[3]), _mm256_add_ps(y[0], y[2]));
#else
    const __m512 z = _mm512_add_ps(y[0], y[1]);
    return _mm256_add_ps(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(z), 1)),
                         _mm512_castps512_ps256(z));
#endif
}

// Software prefetch of the paged rows, spread through the scores' work: a burst of a block's
// rows at once stalls on the CPU's few outstanding misses. Keys ahead[0..nk) (8 or fewer,
// PREFETCH_AHEAD keys ahead) and the block's own values now[0..8) into L2 (element offsets); NULL:
// nothing to fetch. Into L2, not L1, for the keys too: an L1 prefetch holds one of the L1's few
// miss buffers until its line comes, and a block's 8 keys are 32 lines (head_dim 128, float16):
// decode from memory on Zen 4 went from ~12 to ~18 GB/s (docs/benchmarks.md).
typedef struct {
    const char *k, *v;
    const int64_t *ahead, *now;
    int64_t nk, elt, row_bytes;
} prefetch_plan;

// The plan's rows for keys [i0, i1) of the block.
static inline __attribute__((always_inline)) void prefetch_rows(const prefetch_plan *pf, int i0,
                                                                int i1) {
    for (int i = i0; i < i1; i++)
        for (int64_t b = 0; b < pf->row_bytes; b += 64) {
            if (i < pf->nk) _mm_prefetch(pf->k + pf->ahead[i] * pf->elt + b, _MM_HINT_T1);
            _mm_prefetch(pf->v + pf->now[i] * pf->elt + b, _MM_HINT_T1);
        }
}

// s[p][0..8) = scale * (q[p] . key j) for RP query vectors and 8 keys (rows of s SPAN apart).
static inline __attribute__((always_inline)) void scores_keys8(
    const float *const *q, int RP, const void *k, const int64_t *koff, int64_t D, float scale,
    float *s, const prefetch_plan *pf, int half) {
    __m256 t[CHAIN_PAIRS][8];  // each key's hi + lo: scores8 finishes 8 keys' sums together
    for (int j = 0; j < 8; j += CHAIN_KEYS) {
        if (pf) prefetch_rows(pf, j, j + CHAIN_KEYS);
        lanes_t a[CHAIN_PAIRS][CHAIN_KEYS][2 * QUARTER];
        lane_chains(q, k, koff + j, D, RP, CHAIN_KEYS, half, a);
        for (int p = 0; p < RP; p++)
            for (int i = 0; i < CHAIN_KEYS; i++) t[p][j + i] = quarters_sum(a[p][i]);
    }
    for (int p = 0; p < RP; p++) scores8(t[p], scale, s + p * SPAN);
}

// scores_keys8 for one query vector of D = 64 dims: each chain is one FMA (from zero), so the
// query's lane vectors stay in registers across the 8 keys and each key's are loaded once.
static inline __attribute__((always_inline)) void scores_keys8_d64(
    const float *q, const void *k, const int64_t *koff, float scale, float *s,
    const prefetch_plan *pf, int half) {
    lanes_t qv[SLOTS];
    for (int i = 0; i < SLOTS; i++) {
        qv[i] = lanes_load(q + LANES * i);
        IN_REGISTER(qv[i]);
    }
    __m256 t[8];
    for (int j = 0; j < 8; j++) {
        if (pf) prefetch_rows(pf, j, j + 1);
        lanes_t y[2 * QUARTER];  // as lane_chains: quarters 2e and 2e + 1 summed, lane vector h
        for (int e = 0; e < 2; e++)
            for (int h = 0; h < QUARTER; h++) {
                const int sa = 2 * e * QUARTER + h, sb = sa + QUARTER;
                const lanes_t a =
                    lanes_fmadd(qv[sa], key_lanes(k, koff[j] + LANES * sa, half), lanes_zero());
                const lanes_t b =
                    lanes_fmadd(qv[sb], key_lanes(k, koff[j] + LANES * sb, half), lanes_zero());
                y[e * QUARTER + h] = lanes_add(a, b);
            }
        t[j] = quarters_sum(y);
    }
    scores8(t, scale, s);
}

// s[p][0..8) for rp query vectors (rp: CHAIN_PAIRS, 2 or 1; head_dim 64: 1) and 8 keys, with
// a constant block size.
static inline __attribute__((always_inline)) void scores_block(
    const float *const *q, int rp, const void *k, const int64_t *koff, int64_t D, float scale,
    float *s, const prefetch_plan *pf, int half) {
    if (D == 64)
        scores_keys8_d64(q[0], k, koff, scale, s, pf, half);
    else if (rp == CHAIN_PAIRS)
        scores_keys8(q, CHAIN_PAIRS, k, koff, D, scale, s, pf, half);
    else if (rp == 2)
        scores_keys8(q, 2, k, koff, D, scale, s, pf, half);
    else
        scores_keys8(q, 1, k, koff, D, scale, s, pf, half);
}

// s[p][0..8) for np query vectors and 8 keys: blocks of CHAIN_PAIRS query vectors, the rest
// in blocks of 2 rather than leave one alone (a block of one loads a key for each FMA). The
// first block fetches the plan's rows; the others get a NULL plan, a constant once inlined (a
// test of the plan in their loops cost the head_dim 64 scores 10 %).
static inline __attribute__((always_inline)) void scores_block8(
    const float *const *q, int np, const void *k, const int64_t *koff, int64_t D, float scale,
    float *s, const prefetch_plan *pf, int half) {
    for (int p = 0; p < np;) {
        const int left = np - p;
        const int rp = D == 64                                           ? 1
                       : left >= CHAIN_PAIRS && left != CHAIN_PAIRS + 1 ? CHAIN_PAIRS
                       : left >= 2                                      ? 2
                                                                        : 1;
        if (p == 0)
            scores_block(q + p, rp, k, koff, D, scale, s + p * SPAN, pf, half);
        else
            scores_block(q + p, rp, k, koff, D, scale, s + p * SPAN, NULL, half);
        p += rp;
    }
}

// s[p][j] = scale * (q[p] . key j) for np query vectors and n keys, n a multiple of 8 (key j at
// element koff[j] of k_cache; rows of s SPAN apart). kbuf (8 * D floats) or NULL: where given,
// each 8 keys are copied (widened) into it once for all the query vectors. Later keys, and the
// values' rows, are fetched ahead, for every tile: a prompt's later tiles found them in the
// caches, but a long prompt's keys (Qwen3-0.6B's 2,048) no longer fit L2, and its tiles' 512-row
// step took 4-8 % less with them fetched.
static inline __attribute__((always_inline)) void scores_t(
    const float *const *q, int np, const void *k_cache, const void *v_cache, const int64_t *koff,
    int64_t n, int64_t D, float scale, float *kbuf, float *s, int half) {
    const int64_t elt = half ? 2 : 4;
    for (int64_t j = 0; j < n; j += 8) {
        // The rows are scattered (paged): later keys, and these keys' values, fetched ahead.
        const int64_t ahead = n - (j + PREFETCH_AHEAD);
        const prefetch_plan plan = {(const char *)k_cache, (const char *)v_cache,
                                    koff + j + PREFETCH_AHEAD, koff + j,
                                    ahead < 0 ? 0 : ahead < 8 ? ahead : 8, elt, D * elt};
        if (kbuf) {
            int64_t boff[8];
            for (int i = 0; i < 8; i++) {
                for (int64_t d = 0; d < D; d += 16)
                    _mm512_storeu_ps(kbuf + i * D + d, load16(k_cache, koff[j + i] + d, half));
                boff[i] = i * D;
            }
            scores_block8(q, np, kbuf, boff, D, scale, s + j, &plan, 0);
        } else {
            scores_block8(q, np, k_cache, koff + j, D, scale, s + j, &plan, half);
        }
    }
}

// A chunk's softmax partials from its n scores s[0..n): *m = their max, s[j] = e^(s[j] - m) in
// place, *l = the sum of those (16 lanes from s[0], then their sum).
static inline __attribute__((always_inline)) void softmax_partial(float *s, int64_t n, float *m,
                                                                  float *l) {
    // The max as the scalar loop `if (s[j] > mx) mx = s[j]` finds it, 16 lanes at a time (each
    // lane keeps its first greatest score: max_ps(x, m) is m unless x > m, NaNs skipped), then
    // the greatest lane: the same float, except a zero's sign (then that loop itself).
    __m512 lanes = _mm512_set1_ps(-INFINITY);
    int64_t j16 = 0;
    for (; j16 + 16 <= n; j16 += 16) lanes = _mm512_max_ps(_mm512_loadu_ps(s + j16), lanes);
    float mx = _mm512_reduce_max_ps(lanes);
    for (int64_t j = j16; j < n; j++)
        if (s[j] > mx) mx = s[j];
    if (mx == 0.0f) {
        mx = -INFINITY;
        for (int64_t j = 0; j < n; j++)
            if (s[j] > mx) mx = s[j];
    }
    *m = mx;
    const __m512 mv = _mm512_set1_ps(mx);
    __m512 sum = _mm512_setzero_ps();
    for (int64_t j = 0; j < j16; j += 16) {  // masked moves only for the last n % 16 (slow on AVX2)
        const __m512 p = exp512(_mm512_sub_ps(_mm512_loadu_ps(s + j), mv));
        _mm512_storeu_ps(s + j, p);
        sum = _mm512_add_ps(sum, p);
    }
    if (j16 < n) {
        const __mmask16 k = (__mmask16)((1u << (n - j16)) - 1);
        __m512 p = exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, s + j16), mv));
        p = _mm512_maskz_mov_ps(k, p);
        _mm512_mask_storeu_ps(s + j16, k, p);
        sum = _mm512_add_ps(sum, p);
    }
    *l = _mm512_reduce_add_ps(sum);
}

// The first keys' rows of the thread's next chunk task, fetched into L2 while this task weighs
// its values, which it finds in the caches already: the next task's scores no longer start by
// waiting on memory. n == 0: none.
typedef struct {
    const char *k[PREFETCH_AHEAD];
    int n;
    int64_t bytes;
} next_rows;

// One task's partials: na rows of one sequence (a tile) against one KV head's keys, nh query
// heads each (row r's at q[r], nh rows of D). Row r sees its chunk's keys [j0[r], j0[r] + n[r])
// of the sequence's slots, all within [lo, lo + span) (span <= SPAN); the caches' element 0 is
// this KV head's first dim of slot 0 (rows row_stride elements apart). Each key is read once for
// the tile: the scores of every row and head against it, then each row's softmax partials of its
// own keys, then the weighted values, a slice of dims at a time for every row (the slice of the
// values stays in L1 meanwhile). Into m[r][h] = max score, l[r][h] = sum of e^(score - m),
// o[r][h * D ..] = sum of e^(score - m) * v.
static inline __attribute__((always_inline)) void tile_partials_t(
    const float *const *q, int na, int nh, int64_t D, const void *k_cache, const void *v_cache,
    int64_t row_stride, const int64_t *slots, int64_t lo, int64_t span, const int64_t *j0,
    const int64_t *n, float scale, float *const *m, float *const *l,
    float *const *o, const next_rows *next, int half) {
    float s[TILE_ROWS * MAX_REP][SPAN];  // scores, then weights: row r's head h at r * nh + h
    const float *qp[TILE_ROWS * MAX_REP];
    int64_t koff[SPAN];  // element offset of each key's (and value's) row
    const int np = na * nh;
    const int64_t elt = half ? 2 : 4;
    for (int r = 0; r < na; r++)
        for (int h = 0; h < nh; h++) qp[r * nh + h] = q[r] + h * D;
    for (int64_t j = 0; j < span; j++) koff[j] = slots[lo + j] * row_stride;
    // Whole blocks of 8 keys: the last key again (its scores there are not used).
    const int64_t span8 = (span + 7) & ~(int64_t)7;
    for (int64_t j = span; j < span8; j++) koff[j] = koff[span - 1];
    for (int64_t j = 0; j < span && j < PREFETCH_AHEAD; j++)  // scores_t: the rest
        for (int64_t b = 0; b < D * elt; b += 64)
            _mm_prefetch((const char *)k_cache + koff[j] * elt + b, _MM_HINT_T0);
    // Where more rows than one read them, the keys (8 at a time) and each slice of the values
    // are copied (half ones widened) into contiguous buffers once for the tile: rows of a paged
    // cache with several KV heads lie a multiple of 4 KiB apart, on the same few L1 sets.
    float *kbuf = NULL, *vbuf = NULL;
    const int vdims = value_dims(nh);
    int64_t vofs[SPAN];
    if (na > 1) {
        kbuf = aligned_alloc(64, sizeof(float) * (8 * (size_t)D + SPAN * VALUE_DIMS_MAX));
        vbuf = kbuf ? kbuf + 8 * D : NULL;  // none: the rows read the caches in place
        for (int64_t j = 0; j < span; j++) vofs[j] = j * vdims;
    } else if (half && D == 64 && nh > 2) {
        // A decode row's keys widened once too where 64-dim heads take one query vector a pass
        // (scores_keys8_d64), each pass widening every key again: Llama-3.2-1B's 4 heads a KV
        // head, decode rows from memory 1.04-1.15x faster. Its values are read in place.
        kbuf = aligned_alloc(64, sizeof(float) * 8 * (size_t)D);
    }
    scores_t(qp, np, k_cache, v_cache, koff, span8, D, scale, kbuf, &s[0][0], half);
    for (int r = 0; r < na; r++)
        for (int h = 0; h < nh; h++)
            softmax_partial(s[r * nh + h] + (j0[r] - lo), n[r], m[r] + h, l[r] + h);
    if (next)
        for (int i = 0; i < next->n; i++)
            for (int64_t b = 0; b < next->bytes; b += 64) _mm_prefetch(next->k[i] + b, _MM_HINT_T1);
    for (int64_t d = 0; d < D; d += vdims) {
        const int dn = (int)((D - d < vdims ? D - d : vdims) / 16);
        const void *vd = (const char *)v_cache + d * elt;
        if (vbuf)
            for (int64_t j = 0; j < span; j++)
                for (int c = 0; c < dn; c++)
                    _mm512_storeu_ps(vbuf + j * vdims + 16 * c, load16(vd, koff[j] + 16 * c, half));
        for (int r = 0; r < na; r++) {
            const float *p = s[r * nh] + (j0[r] - lo);
            float *od = o[r] + d;
            if (vbuf)
                values_slice(p, SPAN, nh, dn, vofs + (j0[r] - lo), n[r], vbuf, od, D, 0);
            else
                values_slice(p, SPAN, nh, dn, koff + (j0[r] - lo), n[r], vd, od, D, half);
        }
    }
    free(kbuf);
}

// tile_partials_t compiled for each cache type.
static void tile_partials_f32(const float *const *q, int na, int nh, int64_t D, const void *k,
                              const void *v, int64_t row_stride, const int64_t *slots, int64_t lo,
                              int64_t span, const int64_t *j0, const int64_t *n, float scale,
                              float *const *m, float *const *l, float *const *o,
                              const next_rows *next) {
    tile_partials_t(q, na, nh, D, k, v, row_stride, slots, lo, span, j0, n, scale, m, l, o, next,
                    0);
}

static void tile_partials_f16(const float *const *q, int na, int nh, int64_t D, const void *k,
                              const void *v, int64_t row_stride, const int64_t *slots, int64_t lo,
                              int64_t span, const int64_t *j0, const int64_t *n, float scale,
                              float *const *m, float *const *l, float *const *o,
                              const next_rows *next) {
    tile_partials_t(q, na, nh, D, k, v, row_stride, slots, lo, span, j0, n, scale, m, l, o, next,
                    1);
}

// The first key a row of ctx keys sees, and its number of chunks (KEY_CHUNK keys from there).
static inline int64_t window_start(int64_t ctx, int64_t window) {
    return window > 0 && ctx > window ? ctx - window : 0;
}

static inline int64_t row_chunks(int64_t ctx, int64_t window) {
    return (ctx - window_start(ctx, window) + KEY_CHUNK - 1) / KEY_CHUNK;
}

// What attend's tasks share (see attend).
typedef struct {
    const float *q;
    const void *k_cache, *v_cache;
    const int64_t *slots, *starts, *lens, *tile_row;
    int64_t H, Hkv, D, window, rep, per_task;
    float scale;
    int half;
} attention_t;

// Tile k's chunk c of KV head g: the partials (rep maxima, rep sums, rep * D weighted values) of
// each of the tile's rows that has a chunk c (a row of fewer keys may not), the tile's row r's
// at part[r] + c * per_task. A row's chunk c holds the same keys in a tile as alone; the tile's
// rows' chunks c lie within SPAN keys (each row's window starts at most one key after the
// previous row's).
static void tile_chunk(const attention_t *a, int64_t k, int64_t g, int64_t c, float *const *part,
                       const next_rows *next) {
    const int64_t i0 = a->tile_row[k], tn = a->tile_row[k + 1] - i0;
    const int64_t rep = a->rep, D = a->D, elt = a->half ? 2 : 4;
    int64_t rows[TILE_ROWS], j0[TILE_ROWS], n[TILE_ROWS];
    float *base[TILE_ROWS];
    int na = 0;
    int64_t lo = INT64_MAX, hi = 0;
    for (int64_t i = i0; i < i0 + tn; i++) {
        if (c >= row_chunks(a->lens[i], a->window)) continue;
        rows[na] = i;
        j0[na] = window_start(a->lens[i], a->window) + c * KEY_CHUNK;
        n[na] = a->lens[i] - j0[na] < KEY_CHUNK ? a->lens[i] - j0[na] : KEY_CHUNK;
        base[na] = part[i - i0] + c * a->per_task;
        if (j0[na] < lo) lo = j0[na];
        if (j0[na] + n[na] > hi) hi = j0[na] + n[na];
        na++;
    }
    for (int64_t h0 = 0; h0 < rep; h0 += MAX_REP) {
        const int nh = rep - h0 < MAX_REP ? (int)(rep - h0) : MAX_REP;
        const float *qr[TILE_ROWS];
        float *pm[TILE_ROWS], *pl[TILE_ROWS], *po[TILE_ROWS];
        for (int r = 0; r < na; r++) {
            qr[r] = a->q + (rows[r] * a->H + g * rep + h0) * D;
            pm[r] = base[r] + h0;
            pl[r] = base[r] + rep + h0;
            po[r] = base[r] + 2 * rep + h0 * D;
        }
        const void *kg = (const char *)a->k_cache + g * D * elt;
        const void *vg = (const char *)a->v_cache + g * D * elt;
        (a->half ? tile_partials_f16 : tile_partials_f32)(
            qr, na, nh, D, kg, vg, a->Hkv * D, a->slots + a->starts[i0], lo, hi - lo, j0, n,
            a->scale, pm, pl, po, h0 + MAX_REP >= rep ? next : NULL);
    }
}

// The first keys' rows of tile k's chunk c of KV head g (of its first row that has one).
static void task_rows(const attention_t *a, int64_t k, int64_t g, int64_t c, next_rows *next) {
    const int64_t elt = a->half ? 2 : 4;
    next->n = 0;
    next->bytes = a->D * elt;
    for (int64_t i = a->tile_row[k]; i < a->tile_row[k + 1]; i++) {
        if (c >= row_chunks(a->lens[i], a->window)) continue;
        const int64_t j0 = window_start(a->lens[i], a->window) + c * KEY_CHUNK;
        const int64_t left = a->lens[i] - j0;
        const int64_t *slots = a->slots + a->starts[i] + j0;
        for (int64_t j = 0; j < PREFETCH_AHEAD && j < left; j++)
            next->k[next->n++] = (const char *)a->k_cache + (slots[j] * a->Hkv + g) * a->D * elt;
        return;
    }
}

// Row i's output for KV head g's query heads from its nchunks partials (chunk c's at
// part + c * per_task), combined in chunk order. sinks: NULL, or [H] (see attend).
static void combine(const attention_t *a, int64_t i, int64_t g, const float *part,
                    int64_t nchunks, const float *sinks, float *out) {
    const int64_t rep = a->rep, D = a->D, per_task = a->per_task;
    for (int64_t h = 0; h < rep; h++) {
        const float sink = sinks ? sinks[g * rep + h] : -INFINITY;
        float mx = sink;
        for (int64_t c = 0; c < nchunks; c++) {
            const float mc = part[c * per_task + h];
            if (mc > mx) mx = mc;
        }
        // The sink's column: weight e^(sink - max), no value.
        float total = sinks ? _mm512_cvtss_f32(exp512(_mm512_set1_ps(sink - mx))) : 0.0f;
        float *dst = out + (i * a->H + g * rep + h) * D;
        for (int64_t d = 0; d < D; d += 16) _mm512_storeu_ps(dst + d, _mm512_setzero_ps());
        for (int64_t c = 0; c < nchunks; c++) {
            const float *pc = part + c * per_task;
            const __m512 w = exp512(_mm512_set1_ps(pc[h] - mx));
            total += _mm512_cvtss_f32(w) * pc[rep + h];
            const float *oc = pc + 2 * rep + h * D;
            for (int64_t d = 0; d < D; d += 16)
                _mm512_storeu_ps(dst + d, _mm512_fmadd_ps(w, _mm512_loadu_ps(oc + d),
                                                          _mm512_loadu_ps(dst + d)));
        }
        const __m512 inv = _mm512_set1_ps(1.0f / total);
        for (int64_t d = 0; d < D; d += 16)
            _mm512_storeu_ps(dst + d, _mm512_mul_ps(_mm512_loadu_ps(dst + d), inv));
    }
}

// Takes the next of the chunk tasks from *counter: its number t (ntasks or more: none left),
// and where there is one its tile k (binary search in tile_task[]: a batch has many rows), KV
// head g and chunk c.
static int64_t take_task(int64_t *counter, int64_t ntasks, const int64_t *tile_task,
                         int64_t ntiles, const int64_t *tile_row, const int64_t *lens,
                         int64_t window, int64_t *k, int64_t *g, int64_t *c) {
    const int64_t t = __atomic_fetch_add(counter, 1, __ATOMIC_RELAXED);
    if (t >= ntasks) return t;
    int64_t found = 0;
    for (int64_t lo = 0, hi = ntiles - 1; lo <= hi;) {
        const int64_t mid = (lo + hi) / 2;
        if (tile_task[mid] <= t) {
            found = mid;
            lo = mid + 1;
        } else {
            hi = mid - 1;
        }
    }
    const int64_t nchunks = row_chunks(lens[tile_row[found + 1] - 1], window);
    *k = found;
    *g = (t - tile_task[found]) / nchunks;
    *c = (t - tile_task[found]) % nchunks;
    return t;
}

// q, out: [S, H, D] (S query rows); k_cache, v_cache: [slots, Hkv, D]; row i sees the keys at
// cache slots slots[starts[i]] .. slots[starts[i] + lens[i] - 1] (its positions 0 .. lens[i] - 1;
// the query is at the last). window > 0: only the last `window` keys. D % 16 == 0.
// sinks: NULL, or [H] logits (in the scaled scores' units) of each head's sink column.
//
// Rows are grouped into tiles: runs of up to TILE_ROWS consecutive rows of one sequence at
// consecutive positions (a prompt's rows), from tile_row[t]. Where a prompt's tiles give the
// threads work enough (below), a task is a tile's KV head: its chunks in order, into the
// thread's own buffer, then each row's combination; otherwise (decode rows alone, or a tile far
// longer than the rest) a task is one chunk of a tile's KV head, into a buffer of every row's
// chunks, combined after them all. Either way a row's chunk partials are the same numbers and
// are combined the same way.
static void attend(const float *q, const void *k_cache, const void *v_cache, const int64_t *slots,
                   const int64_t *starts, const int64_t *lens, int64_t S, int64_t H, int64_t Hkv,
                   int64_t D, int64_t window, float scale, const float *sinks, float *out,
                   int nthreads, int half) {
    const int64_t rep = H / Hkv;
    int64_t *tile_row = malloc(sizeof(int64_t) * (S + 1));
    int64_t ntiles = 0;
    for (int64_t i = 0; i < S; i++) {
        const int joins = i > 0 && starts[i] == starts[i - 1] && lens[i] == lens[i - 1] + 1 &&
                          i - tile_row[ntiles - 1] < TILE_ROWS;
        if (!joins) tile_row[ntiles++] = i;
    }
    tile_row[ntiles] = S;
    const attention_t a = {q,     k_cache, v_cache, slots, starts, lens, tile_row, H,
                           Hkv,   D,       window,  rep,   rep * (D + 2), scale, half};
    // A tile's last row has the most chunks (a row sees one key more than the row before). A
    // tile's work: its rows' chunks. Whole-tile tasks where some tile is a prompt's (several
    // rows) and the largest is at most a quarter of a thread's share, so that the threads end
    // together. Decode rows alone keep chunk tasks: whole-row tasks took 1.07-1.28x as long for
    // Qwen3-0.6B's shapes (8 KV heads; one row of 16,384 keys, 16 rows of 2,048), the same for
    // the default model's.
    int64_t most = 0, largest = 0, work = 0;
    for (int64_t t = 0; t < ntiles; t++) {
        const int64_t chunks = row_chunks(lens[tile_row[t + 1] - 1], window);
        if (chunks > most) most = chunks;
        int64_t tile_work = 0;
        for (int64_t i = tile_row[t]; i < tile_row[t + 1]; i++)
            tile_work += row_chunks(lens[i], window);
        if (tile_work > largest) largest = tile_work;
        work += Hkv * tile_work;
    }

    if (S > ntiles && largest * 4 * nthreads <= work) {
        // Tasks sequence by sequence; a prompt's (a sequence of several tiles) KV head by KV
        // head, each head's tiles from the last (the longest) to the first: neighbouring tasks
        // read the same keys and values, which stay in the cache. A sequence's heads one after
        // another (a decode row beside a prompt is a tile of its own) read its cache rows whole,
        // in order: a pass per head over all the sequences took 1.3x as long for 16 decode rows
        // of 2,048 keys (Qwen3-0.6B's shapes).
        int64_t *unit = malloc(sizeof(int64_t) * 2 * ntiles * Hkv);  // (tile, head) pairs
        int64_t nu = 0;
        for (int64_t t0 = 0, t1; t0 < ntiles; t0 = t1) {
            for (t1 = t0 + 1; t1 < ntiles && starts[tile_row[t1]] == starts[tile_row[t0]]; t1++) {
            }
            for (int64_t g = 0; g < Hkv; g++)
                for (int64_t t = t1 - 1; t >= t0; t--) {
                    unit[2 * nu] = t;
                    unit[2 * nu++ + 1] = g;
                }
        }
#pragma omp parallel num_threads(nthreads)
        {
            float *buf = malloc(sizeof(float) * TILE_ROWS * most * a.per_task);
            float *part[TILE_ROWS];
            for (int r = 0; r < TILE_ROWS; r++) part[r] = buf + r * most * a.per_task;
#pragma omp for schedule(dynamic, 1)
            for (int64_t u = 0; u < nu; u++) {
                const int64_t k = unit[2 * u], g = unit[2 * u + 1];
                const int64_t i0 = tile_row[k], i1 = tile_row[k + 1];
                const int64_t chunks = row_chunks(lens[i1 - 1], window);
                for (int64_t c = 0; c < chunks; c++) tile_chunk(&a, k, g, c, part, NULL);
                for (int64_t i = i0; i < i1; i++)
                    combine(&a, i, g, part[i - i0], row_chunks(lens[i], window), sinks, out);
            }
            free(buf);
        }
        free(unit);
        free(tile_row);
        return;
    }

    // Row i's partials start at first[i] (KV head g's chunk c: first[i] + g * chunks + c); tile
    // k's tasks (its heads' chunks, in order) from tile_task[k].
    int64_t *first = malloc(sizeof(int64_t) * (S + 1));
    int64_t *tile_task = malloc(sizeof(int64_t) * (ntiles + 1));
    int64_t nparts = 0, ntasks = 0;
    for (int64_t i = 0; i < S; i++) {
        first[i] = nparts;
        nparts += Hkv * row_chunks(lens[i], window);
    }
    first[S] = nparts;
    for (int64_t t = 0; t < ntiles; t++) {
        tile_task[t] = ntasks;
        ntasks += Hkv * row_chunks(lens[tile_row[t + 1] - 1], window);
    }
    tile_task[ntiles] = ntasks;
    float *part = malloc(sizeof(float) * (nparts * a.per_task + 1));
    // The tasks dynamically, as schedule(dynamic, 1) would, but a thread takes its next task
    // before it weighs this one's values, and fetches that task's first keys meanwhile: decode
    // rows of 2,048 keys (Qwen3-0.6B's shapes, 16 rows) 1.2x faster. Only while more tasks are
    // left than threads: a thread must not hold one that an idle thread could run (a 16-row
    // prompt of one KV head is two tasks).
    int64_t counter = 0;
#pragma omp parallel num_threads(nthreads)
    {
        int64_t k = 0, g = 0, c = 0;
        int64_t t = take_task(&counter, ntasks, tile_task, ntiles, tile_row, lens, window, &k, &g,
                              &c);
        while (t < ntasks) {
            int64_t t2 = -1, k2 = 0, g2 = 0, c2 = 0;
            next_rows next = {{0}, 0, 0};
            if (__atomic_load_n(&counter, __ATOMIC_RELAXED) + nthreads < ntasks) {
                t2 = take_task(&counter, ntasks, tile_task, ntiles, tile_row, lens, window, &k2,
                               &g2, &c2);
                if (t2 < ntasks) task_rows(&a, k2, g2, c2, &next);
            }
            float *rows[TILE_ROWS];
            for (int64_t i = tile_row[k]; i < tile_row[k + 1]; i++)
                rows[i - tile_row[k]] =
                    part + (first[i] + g * row_chunks(lens[i], window)) * a.per_task;
            tile_chunk(&a, k, g, c, rows, &next);
            if (t2 < 0)  // none taken ahead: the next one now
                t2 = take_task(&counter, ntasks, tile_task, ntiles, tile_row, lens, window, &k2,
                               &g2, &c2);
            t = t2, k = k2, g = g2, c = c2;
        }
    }
    // Combine each head's chunks in order.
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t ig = 0; ig < S * Hkv; ig++) {
        const int64_t i = ig / Hkv, g = ig % Hkv;
        const int64_t nchunks = (first[i + 1] - first[i]) / Hkv;
        combine(&a, i, g, part + (first[i] + g * nchunks) * a.per_task, nchunks, sinks, out);
    }
    free(part);
    free(tile_task);
    free(first);
    free(tile_row);
}

void paged_attention(const float *q, const float *k_cache, const float *v_cache,
                     const int64_t *slots, const int64_t *starts, const int64_t *lens, int64_t S,
                     int64_t H, int64_t Hkv, int64_t D, int64_t window, float scale,
                     const float *sinks, float *out, int nthreads) {
    attend(q, k_cache, v_cache, slots, starts, lens, S, H, Hkv, D, window, scale, sinks, out,
           nthreads, 0);
}

// The same over a float16 cache (uint16_t: IEEE half bits).
void paged_attention_f16(const float *q, const uint16_t *k_cache, const uint16_t *v_cache,
                         const int64_t *slots, const int64_t *starts, const int64_t *lens,
                         int64_t S, int64_t H, int64_t Hkv, int64_t D, int64_t window, float scale,
                         const float *sinks, float *out, int nthreads) {
    attend(q, k_cache, v_cache, slots, starts, lens, S, H, Hkv, D, window, scale, sinks, out,
           nthreads, 1);
}

// The step's new keys and values into their cache slots: row i of k and v (`width` floats each,
// rows `k_stride` / `v_stride` floats apart) to slot slots[i] of the caches (rows of `width`).
// A copy, as torch's index_copy_, without its per-call overhead (two calls a layer).
void kv_cache_write(const float *k, const float *v, int64_t k_stride, int64_t v_stride,
                    const int64_t *slots, int64_t rows, int64_t width, float *k_cache,
                    float *v_cache) {
    for (int64_t i = 0; i < rows; i++) {
        memcpy(k_cache + slots[i] * width, k + i * k_stride, sizeof(float) * (size_t)width);
        memcpy(v_cache + slots[i] * width, v + i * v_stride, sizeof(float) * (size_t)width);
    }
}

// kv_cache_write into a float16 cache: each value rounded to the nearest half (ties to even, as
// torch's .half()), beyond the half range clamped to +-65504 instead of becoming infinite.
void kv_cache_write_f16(const float *k, const float *v, int64_t k_stride, int64_t v_stride,
                        const int64_t *slots, int64_t rows, int64_t width, uint16_t *k_cache,
                        uint16_t *v_cache) {
    const __m512 hi = _mm512_set1_ps(F16_MAX), lo = _mm512_set1_ps(-F16_MAX);
    for (int64_t i = 0; i < rows; i++) {
        for (int t = 0; t < 2; t++) {
            const float *src = t ? v + i * v_stride : k + i * k_stride;
            uint16_t *dst = (t ? v_cache : k_cache) + slots[i] * width;
            for (int64_t d = 0; d < width; d += 16) {
                const __mmask16 m = width - d >= 16 ? 0xFFFF : (__mmask16)((1u << (width - d)) - 1);
                __m512 x = _mm512_maskz_loadu_ps(m, src + d);
                x = _mm512_min_ps(_mm512_max_ps(x, lo), hi);  // NaN: max/min return the bound
                const __m256i h = _mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
                _mm256_mask_storeu_epi16(dst + d, m, h);
            }
        }
    }
}
