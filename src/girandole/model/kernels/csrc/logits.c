// Row-wise passes over [M, V] float32 logits (AVX512), rows spread over the threads and each
// row's result computed by one thread alone: a row's numbers never depend on the other rows.
//
// - lm_head_refine: the LM head's refinement step (QuantLMHead in girandole/model/layers.py).
//   A row's candidates are its coarse logits within `margin` of the row's maximum, at most `top`
//   of them (the largest; equal values: the lower token id first). Each candidate is recomputed
//   exactly: the dot product of the hidden state with the table row dequantized (int8 times its
//   group's scale, float32).
// - argmax_rows: the first index of each row's maximum, or of its first NaN (torch.argmax's).
// - top_rows: each row's n first (value, index) by `before` (torch.topk's, ties by index): the
//   samplers' top-k and top-p candidates and the top logprobs.
// - sampling_weights_rows: each row's exp(x / t - max(x / t)) in place (the samplers' weights;
//   0 below e^-87, -inf included).
#include <immintrin.h>

#include "avx2_compat.h"
#include "simd_math.h"
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define GROUP 32  // table scale group (Int8Embedding.GROUP)
#define REFINE_AHEAD 6  // candidates whose table rows are fetched ahead of their dot product

typedef struct {
    float v;
    int32_t i;
} cand_t;

// A strict total order: larger value first, then lower index.
static inline int before(cand_t a, cand_t b) { return a.v > b.v || (a.v == b.v && a.i < b.i); }

// Quickselect: reorders c[0..n) so that its first k elements are the k first by BEFORE. With a
// strict order the chosen set is the same whatever the algorithm's path.
#define DEFINE_SELECT(NAME, TYPE, BEFORE)                       \
    static void NAME(TYPE *c, int64_t n, int64_t k) {           \
        int64_t lo = 0, hi = n - 1;                             \
        while (lo < hi) {                                       \
            const TYPE pivot = c[lo + (hi - lo) / 2];           \
            int64_t i = lo, j = hi;                             \
            while (i <= j) {                                    \
                while (BEFORE(c[i], pivot)) i++;                \
                while (BEFORE(pivot, c[j])) j--;                \
                if (i <= j) {                                   \
                    const TYPE t = c[i];                        \
                    c[i] = c[j];                                \
                    c[j] = t;                                   \
                    i++;                                        \
                    j--;                                        \
                }                                               \
            }                                                   \
            if (k - 1 <= j)                                     \
                hi = j;                                         \
            else if (k - 1 >= i)                                \
                lo = i;                                         \
            else                                                \
                break;                                          \
        }                                                       \
    }

// The refinement's candidates and top_rows': the first by `before`.
DEFINE_SELECT(select_first, cand_t, before)

static float row_max(const float *row, int64_t V) {
    __m512 mx = _mm512_set1_ps(-INFINITY);
    int64_t v = 0;
    for (; v + 16 <= V; v += 16) mx = _mm512_max_ps(mx, _mm512_loadu_ps(row + v));
    float m = _mm512_reduce_max_ps(mx);
    for (; v < V; v++) m = row[v] > m ? row[v] : m;
    return m;
}

// The exact logit: x . (q * scale), float32.
static float exact_logit(const int8_t *q, const float *scale, const float *x, int64_t H) {
    __m512 acc = _mm512_setzero_ps();
    for (int64_t k = 0; k < H; k += 16) {
        const __m512 qf =
            _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(q + k))));
        const __m512 w = _mm512_mul_ps(qf, _mm512_set1_ps(scale[k / GROUP]));
        acc = _mm512_fmadd_ps(w, _mm512_loadu_ps(x + k), acc);
    }
    return _mm512_reduce_add_ps(acc);
}

// How many of row[0..V) are at least t (NaN never is).
static int64_t count_at_least(const float *row, int64_t V, float t) {
    const __m512 tv = _mm512_set1_ps(t);
    int64_t n = 0, v = 0;
    for (; v + 16 <= V; v += 16)
        n += __builtin_popcount(_mm512_cmp_ps_mask(_mm512_loadu_ps(row + v), tv, _CMP_GE_OQ));
    for (; v < V; v++) n += row[v] >= t;
    return n;
}

// The indices of row[0..V) that are at least t, in order, into ids (room for V + 16); their
// count. Compressed in a register, then stored whole: AMD's Zen 4 microcodes a compress
// straight to memory.
static int64_t ids_at_least(const float *row, int64_t V, float t, int32_t *ids) {
    const __m512 tv = _mm512_set1_ps(t);
    const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    int64_t n = 0, v = 0;
    for (; v + 16 <= V; v += 16) {
        const __mmask16 k = _mm512_cmp_ps_mask(_mm512_loadu_ps(row + v), tv, _CMP_GE_OQ);
        if (k) {
            const __m512i idx = _mm512_add_epi32(_mm512_set1_epi32((int32_t)v), iota);
            _mm512_storeu_si512(ids + n, _mm512_maskz_compress_epi32(k, idx));
            n += __builtin_popcount(k);
        }
    }
    for (; v < V; v++)
        if (row[v] >= t) ids[n++] = (int32_t)v;
    return n;
}

// A threshold t >= lo with at least `top` of the row's values at or above it, and, where one
// is found in a few dozen counts, at most 2 * top of them: bisection between lo (`n` values at
// or above it, n > top) and hi (the row's maximum). Every value below t is below every value
// kept, so the `top` first by `before` among the kept are those among all that are at least
// lo: the same set, at a small share of the selection's work when a row's logits are flat and
// most of a large vocabulary lies within the margin (random weights; a high-entropy step).
static float narrow_threshold(const float *row, int64_t V, float lo, float hi, int64_t n,
                              int64_t top) {
    for (int it = 0; it < 40 && n > 2 * top; it++) {
        const float mid = lo + 0.5f * (hi - lo);
        if (!(mid > lo && mid < hi)) break;  // no float between them (or not finite)
        const int64_t c = count_at_least(row, V, mid);
        if (c >= top) {
            lo = mid;
            n = c;
        } else {
            hi = mid;
        }
    }
    return lo;
}

// logits [M, V] (coarse; candidates overwritten with exact values), x [M, H] float32,
// table_q int8 [V, H], table_scale float32 [V, H / GROUP]; H % 32 == 0.
void lm_head_refine(float *logits, int64_t M, int64_t V, const float *x, int64_t H,
                    const int8_t *table_q, const float *table_scale, float margin, int64_t top,
                    int nthreads) {
    // Each row's candidates (a row's choice is its own), then every (row, candidate) dot product
    // spread over the threads: a single decode row's hundreds of candidates use them all.
    if (top > V) top = V;
    int32_t *ids = malloc(sizeof(int32_t) * (size_t)(M * top + 1));  // row m's at m * top
    int64_t *counts = malloc(sizeof(int64_t) * (size_t)(M + 1));
#pragma omp parallel for num_threads(nthreads) schedule(dynamic, 1)
    for (int64_t m = 0; m < M; m++) {
        const float *row = logits + m * V;
        const float mx = row_max(row, V);
        int32_t *rid = malloc(sizeof(int32_t) * (size_t)(V + 16));
        int64_t n = ids_at_least(row, V, mx - margin, rid);
        if (n > top) {  // a flat row: a tighter threshold first, then the selection
            const float t = narrow_threshold(row, V, mx - margin, mx, n, top);
            if (t > mx - margin) n = ids_at_least(row, V, t, rid);
        }
        if (n > top) {  // keep the `top` largest
            cand_t *c = malloc(sizeof(cand_t) * n);
            for (int64_t j = 0; j < n; j++) c[j] = (cand_t){row[rid[j]], rid[j]};
            select_first(c, n, top);
            for (int64_t j = 0; j < top; j++) rid[j] = c[j].i;
            n = top;
            free(c);
        }
        memcpy(ids + m * top, rid, sizeof(int32_t) * (size_t)n);
        free(rid);
        counts[m] = n;
    }
    // Candidates in row-major order: [start[m], start[m] + counts[m]) are row m's.
    int64_t total = 0;
    for (int64_t m = 0; m < M; m++) {
        const int64_t n = counts[m];
        counts[m] = total;
        total += n;
    }
    counts[M] = total;
    // Flat (row, token) pairs, so a thread can fetch the table rows a few candidates ahead: the
    // candidates are scattered over the 178 MB table and each costs a memory round trip. Into
    // L2: a row is ~36 lines, and an L1 prefetch holds one of the L1's few miss buffers until its
    // line comes (a 16,384 x 2,048 table's 1,024 cold candidates: 0.36 -> 0.25 ms on Zen 4).
    int32_t *flat_m = malloc(sizeof(int32_t) * (size_t)(total + 1));
    int32_t *flat_t = malloc(sizeof(int32_t) * (size_t)(total + 1));
    for (int64_t m = 0; m < M; m++)
        for (int64_t j = counts[m]; j < counts[m + 1]; j++) {
            flat_m[j] = (int32_t)m;
            flat_t[j] = ids[m * top + (j - counts[m])];
        }
    const int64_t row_bytes = H, scale_bytes = (H / GROUP) * (int64_t)sizeof(float);
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t j = 0; j < total; j++) {
        if (j + REFINE_AHEAD < total) {
            const int64_t ahead = flat_t[j + REFINE_AHEAD];
            for (int64_t b = 0; b < row_bytes; b += 64)
                _mm_prefetch((const char *)(table_q + ahead * H) + b, _MM_HINT_T1);
            for (int64_t b = 0; b < scale_bytes; b += 64)
                _mm_prefetch((const char *)(table_scale + ahead * (H / GROUP)) + b, _MM_HINT_T1);
        }
        const int64_t m = flat_m[j], t = flat_t[j];
        logits[m * V + t] =
            exact_logit(table_q + t * H, table_scale + t * (H / GROUP), x + m * H, H);
    }
    free(flat_t);
    free(flat_m);
    free(counts);
    free(ids);
}

void argmax_rows(const float *logits, int64_t M, int64_t V, int64_t *out, int nthreads) {
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t m = 0; m < M; m++) {
        const float *row = logits + m * V;
        // torch's answer with NaNs: the first NaN. Otherwise the first maximum.
        const float mx = row_max(row, V);
        int64_t found = -1, v = 0;
        for (; v + 16 <= V && found < 0; v += 16) {
            const __m512 x = _mm512_loadu_ps(row + v);
            const __mmask16 k = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
            if (k) found = v + __builtin_ctz(k);
        }
        for (; v < V && found < 0; v++)
            if (isnan(row[v])) found = v;
        for (v = 0; found < 0 && v + 16 <= V; v += 16) {
            const __mmask16 k =
                _mm512_cmp_ps_mask(_mm512_loadu_ps(row + v), _mm512_set1_ps(mx), _CMP_EQ_OQ);
            if (k) found = v + __builtin_ctz(k);
        }
        for (; v < V && found < 0; v++)
            if (row[v] == mx) found = v;
        out[m] = found < 0 ? 0 : found;
    }
}

// Two passes a row instead of torch's five (divide, max, subtract, exp, each over the whole
// [M, V]): the max of x (x / t's max is max(x) / t: rounding a division by t > 0 keeps the
// order), then x / t - that, its exp written back. A token at -inf (banned), or more than 87
// below the maximum after the division, weighs exactly 0.
void sampling_weights_rows(float *x, const float *temps, int64_t M, int64_t V, int nthreads) {
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t m = 0; m < M; m++) {
        float *row = x + m * V;
        const float t = temps[m];
        const float mx = row_max(row, V) / t;
        const __m512 tv = _mm512_set1_ps(t), mv = _mm512_set1_ps(mx);
        // exp512 clamps at -87: anything below weighs 0 (as -inf, a banned token, does), so
        // a row's non-zero set is the tokens within e^87 of its most likely one.
        const __m512 floor = _mm512_set1_ps(-87.0f);
        int64_t v = 0;
        for (; v + 16 <= V; v += 16) {
            const __m512 d = _mm512_sub_ps(_mm512_div_ps(_mm512_loadu_ps(row + v), tv), mv);
            const __mmask16 live = _mm512_cmp_ps_mask(d, floor, _CMP_GT_OQ);
            _mm512_storeu_ps(row + v, _mm512_maskz_mov_ps(live, exp512(d)));
        }
        if (v < V) {
            const __mmask16 tail = (__mmask16)((1u << (V - v)) - 1);
            const __m512 d = _mm512_sub_ps(_mm512_div_ps(_mm512_maskz_loadu_ps(tail, row + v), tv), mv);
            const __mmask16 live = _mm512_cmp_ps_mask(d, floor, _CMP_GT_OQ) & tail;
            _mm512_mask_storeu_ps(row + v, tail, _mm512_maskz_mov_ps(live, exp512(d)));
        }
    }
}

static int before_first(const void *a, const void *b) {
    return before(*(const cand_t *)a, *(const cand_t *)b) ? -1 : 1;
}

// Cuts c[0..len) back to its n first by `before`; returns the value of the last of them.
static float cut_back_cands(cand_t *c, int64_t len, int64_t n) {
    select_first(c, len, n);
    float t = c[0].v;
    for (int64_t i = 1; i < n; i++) t = c[i].v < t ? c[i].v : t;
    return t;
}

// One pass per row: candidates above a running threshold go to a buffer of 4n + 16 (compressed
// in registers: AMD's Zen 4 microcodes a compress straight to memory); when it is full it is
// cut back to its n first, whose last value becomes the threshold. A value equal to the
// threshold that comes later has a higher index, so it ranks after every kept one and can be
// left out. Rows with fewer than n values above -inf get index -1 past them (the caller asks
// torch then).
void top_rows(const float *x, int64_t M, int64_t V, int64_t n, float *out_v, int64_t *out_i,
              int nthreads) {
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t m = 0; m < M; m++) {
        const float *row = x + m * V;
        const int64_t cap = 4 * n + 16;
        cand_t *buf = malloc(cap * sizeof(cand_t));
        int64_t len = 0, v = 0;
        float t = -INFINITY;
        const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
        float vals[16];
        int32_t ids[16];
        for (; v + 16 <= V; v += 16) {
            const __m512 xv = _mm512_loadu_ps(row + v);
            __mmask16 k = _mm512_cmp_ps_mask(xv, _mm512_set1_ps(t), _CMP_GT_OQ);
            if (!k) continue;
            if (len + 16 > cap) {
                t = cut_back_cands(buf, len, n);
                len = n;
                k = _mm512_cmp_ps_mask(xv, _mm512_set1_ps(t), _CMP_GT_OQ);
            }
            _mm512_storeu_ps(vals, _mm512_maskz_compress_ps(k, xv));
            const __m512i idx = _mm512_add_epi32(iota, _mm512_set1_epi32((int32_t)v));
            _mm512_storeu_si512(ids, _mm512_maskz_compress_epi32(k, idx));
            const int cnt = __builtin_popcount(k);
            for (int j = 0; j < cnt; j++) buf[len++] = (cand_t){vals[j], ids[j]};
        }
        for (; v < V; v++) {
            if (!(row[v] > t)) continue;
            if (len == cap) {
                t = cut_back_cands(buf, len, n);
                len = n;
                if (!(row[v] > t)) continue;
            }
            buf[len++] = (cand_t){row[v], (int32_t)v};
        }
        if (len > n) {
            select_first(buf, len, n);
            len = n;
        }
        qsort(buf, len, sizeof(cand_t), before_first);
        for (int64_t j = 0; j < n; j++) {
            out_v[m * n + j] = j < len ? buf[j].v : -INFINITY;
            out_i[m * n + j] = j < len ? buf[j].i : -1;
        }
        free(buf);
    }
}
