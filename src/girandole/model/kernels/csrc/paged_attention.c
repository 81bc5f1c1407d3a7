// Paged attention on CPU (AVX512, float32), one query row at a time: each query token against
// the keys it sees (causal, optionally a sliding window) in the paged KV cache, read in place
// through its sequence's slot list (no gather copy).
//
// Work is split into tasks of (query row, KV head, chunk of KEY_CHUNK keys), spread over the
// threads; each task computes its chunk's softmax partials (max, sum, weighted values) and the
// chunks of a head are then combined in order. Every number depends only on the row's own query
// and keys and on fixed chunk boundaries: never on the batch, on how a prompt was split into
// chunks, on whether the row is a decode or a prefill token, or on the thread count.
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
#define PREFETCH_AHEAD 16  // keys
#define MAX_REP 8  // query heads per KV head handled together (more: in several passes)
#define F16_MAX 65504.0f

// 16 cache elements from element index i of a float32 (half = 0) or float16 (half = 1) cache.
// Inlined with a constant `half`: each kernel below is compiled once per cache type.
static inline __attribute__((always_inline)) __m512 load16(const void *base, int64_t i, int half) {
    if (half) return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((const uint16_t *)base + i)));
    return _mm512_loadu_ps((const float *)base + i);
}

// out[h][16 c ..] = sum_j p[h][j] * v_j[16 c ..] for HN heads (rows of p: KEY_CHUNK apart) and
// CN vectors of 16 dims, summed in key order; v_j at element slots[j] * row_stride of v_cache.
// Inlined with constant HN, CN, half.
static inline __attribute__((always_inline)) void weighted_values(
    const float *p, const int64_t *slots, int64_t n, const void *v_cache, int64_t row_stride,
    float *out, int64_t out_stride, int HN, int CN, int half) {
    __m512 acc[4][4];
    for (int h = 0; h < HN; h++)
        for (int c = 0; c < CN; c++) acc[h][c] = _mm512_setzero_ps();
    for (int64_t j = 0; j < n; j++) {
        const int64_t vj = slots[j] * row_stride;
        __m512 v[4];
        for (int c = 0; c < CN; c++) v[c] = load16(v_cache, vj + 16 * c, half);
        for (int h = 0; h < HN; h++) {
            const __m512 ph = _mm512_set1_ps(p[h * KEY_CHUNK + j]);
            for (int c = 0; c < CN; c++) acc[h][c] = _mm512_fmadd_ps(ph, v[c], acc[h][c]);
        }
    }
    for (int h = 0; h < HN; h++)
        for (int c = 0; c < CN; c++) _mm512_storeu_ps(out + h * out_stride + 16 * c, acc[h][c]);
}

#ifdef GIR_AVX2
// A key's score is the sum of its accumulator's 16 lanes, by avx2_compat.h's tree
// (gir_reduce_add_ps): t = hi + lo (8 lanes), then lanes i + (i + 4), then (0 + 2, 1 + 3),
// then 0 + 1, a chain of shuffles and adds per key and head. Here the same adds for 8 keys at
// once (t[k]: key k's hi + lo), vertical across the keys after transposing shuffles: the same
// floats, times scale, into out[0..8).
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

// Key j's accumulator for head h: its score now (AVX-512), or 8 keys' together (AVX2).
#define KEY_SCORE(h, acc) (pending[h][j & 7] = _mm256_add_ps((acc).hi, (acc).lo))
#else
#define KEY_SCORE(h, acc) (s[h][j] = _mm512_reduce_add_ps(acc) * scale)
#endif

// Partials of `nh` query heads (q: nh rows of D) over keys [j0, j1) of one sequence; the
// caches' element 0 is this KV head's first dim of slot 0 (rows row_stride elements apart).
// m[h] = max score, l[h] = sum of e^(score - m), o[h][D] = sum of e^(score - m) * v.
static inline __attribute__((always_inline)) void chunk_partials_t(
    const float *q, int nh, int64_t D, const void *k_cache, const void *v_cache,
    int64_t row_stride, const int64_t *slots, int64_t j0, int64_t j1, float scale, int prefetch,
    float *m, float *l, float *o, int half) {
    float s[MAX_REP][KEY_CHUNK];
#ifdef GIR_AVX2
    __m256 pending[MAX_REP][8];
#endif
    const int64_t n = j1 - j0, row_bytes = D * (half ? 2 : 4), elt = half ? 2 : 4;
    const char *kbytes = (const char *)k_cache, *vbytes = (const char *)v_cache;
    for (int64_t j = 0; prefetch && j < n && j < PREFETCH_AHEAD; j++) {
        const char *kn = kbytes + slots[j0 + j] * row_stride * elt;
        for (int64_t b = 0; b < row_bytes; b += 64) _mm_prefetch(kn + b, _MM_HINT_T0);
    }
    for (int64_t j = 0; j < n; j++) {
        const int64_t kj = slots[j0 + j] * row_stride;
        // The rows are scattered (paged): fetch a later key and this key's value ahead of use.
        if (prefetch && j + PREFETCH_AHEAD < n) {
            const char *kn = kbytes + slots[j0 + j + PREFETCH_AHEAD] * row_stride * elt;
            for (int64_t b = 0; b < row_bytes; b += 64) _mm_prefetch(kn + b, _MM_HINT_T0);
        }
        if (prefetch) {
            const char *vp = vbytes + kj * elt;
            for (int64_t b = 0; b < row_bytes; b += 64) _mm_prefetch(vp + b, _MM_HINT_T1);
        }
        if (nh == 4 && D % 64 == 0) {  // the key's 64-dim blocks loaded once for the 4 heads
            __m512 a[4][4];
            for (int h = 0; h < 4; h++)
                for (int c = 0; c < 4; c++) a[h][c] = _mm512_setzero_ps();
            for (int64_t d = 0; d < D; d += 64) {
                __m512 kv[4];
                for (int c = 0; c < 4; c++) kv[c] = load16(k_cache, kj + d + 16 * c, half);
                for (int h = 0; h < 4; h++)
                    for (int c = 0; c < 4; c++)
                        a[h][c] = _mm512_fmadd_ps(_mm512_loadu_ps(q + h * D + d + 16 * c), kv[c],
                                                  a[h][c]);
            }
            for (int h = 0; h < 4; h++) {  // the same sums, in the same order, as below
                const __m512 acc = _mm512_add_ps(_mm512_add_ps(a[h][0], a[h][1]),
                                                 _mm512_add_ps(a[h][2], a[h][3]));
                KEY_SCORE(h, acc);
            }
        } else {
            for (int h = 0; h < nh; h++) {
                const float *qh = q + h * D;
                // Four independent chains (a single one would wait on each FMA's latency).
                __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
                int64_t d = 0;
                for (; d + 64 <= D; d += 64) {
                    a0 = _mm512_fmadd_ps(_mm512_loadu_ps(qh + d), load16(k_cache, kj + d, half),
                                         a0);
                    a1 = _mm512_fmadd_ps(_mm512_loadu_ps(qh + d + 16),
                                         load16(k_cache, kj + d + 16, half), a1);
                    a2 = _mm512_fmadd_ps(_mm512_loadu_ps(qh + d + 32),
                                         load16(k_cache, kj + d + 32, half), a2);
                    a3 = _mm512_fmadd_ps(_mm512_loadu_ps(qh + d + 48),
                                         load16(k_cache, kj + d + 48, half), a3);
                }
                for (; d < D; d += 16)
                    a0 = _mm512_fmadd_ps(_mm512_loadu_ps(qh + d), load16(k_cache, kj + d, half),
                                         a0);
                const __m512 acc = _mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3));
                KEY_SCORE(h, acc);
            }
        }
#ifdef GIR_AVX2
        if ((j & 7) == 7)
            for (int h = 0; h < nh; h++) scores8(pending[h], scale, s[h] + j - 7);
#endif
    }
#ifdef GIR_AVX2
    for (int64_t j = n & ~(int64_t)7; j < n; j++)  // the last n % 8 keys, one at a time
        for (int h = 0; h < nh; h++) s[h][j] = gir_reduce_add_ps8(pending[h][j & 7]) * scale;
#endif
    // The maxima after the scores, not key by key: a running maximum in m[] (a pointer the
    // compiler must store and reload around every key's loads) chained every key's scores.
    for (int h = 0; h < nh; h++) {
        float mh = -INFINITY;
        for (int64_t j = 0; j < n; j++)
            if (s[h][j] > mh) mh = s[h][j];
        m[h] = mh;
    }
    for (int h = 0; h < nh; h++) {
        const __m512 mh = _mm512_set1_ps(m[h]);
        __m512 sum = _mm512_setzero_ps();
        for (int64_t j = 0; j < n; j += 16) {
            const __mmask16 k = n - j >= 16 ? 0xFFFF : (__mmask16)((1u << (n - j)) - 1);
            __m512 p = exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, s[h] + j), mh));
            p = _mm512_maskz_mov_ps(k, p);
            _mm512_mask_storeu_ps(s[h] + j, k, p);
            sum = _mm512_add_ps(sum, p);
        }
        l[h] = _mm512_reduce_add_ps(sum);
    }
    // o[h] = sum_j p[h][j] * v_j, 64 dims of up to 4 heads at a time (16 accumulators).
    for (int h0 = 0; h0 < nh; h0 += 4) {
        const int hn = nh - h0 < 4 ? nh - h0 : 4;
        for (int64_t d = 0; d < D; d += 64) {
            const int dn = D - d < 64 ? (int)((D - d) / 16) : 4;
            const void *vd = vbytes + d * elt;
            float *od = o + (int64_t)h0 * D + d;
            // Constant tile sizes keep the accumulators in registers (runtime ones spill them).
            if (hn == 4 && dn == 4)
                weighted_values(s[h0], slots + j0, n, vd, row_stride, od, D, 4, 4, half);
            else if (hn == 2 && dn == 4)  // each value converted once for both heads
                for (int c = 0; c < 4; c += 2)  // 2 x 2 accumulators: AVX2's registers hold them
                    weighted_values(s[h0], slots + j0, n, (const char *)vd + 16 * c * elt,
                                    row_stride, od + 16 * c, D, 2, 2, half);
            else if (dn == 4)
                for (int h = 0; h < hn; h++)
                    weighted_values(s[h0 + h], slots + j0, n, vd, row_stride, od + h * D, D, 1, 4,
                                    half);
            else
                for (int h = 0; h < hn; h++)
                    for (int c = 0; c < dn; c++)
                        weighted_values(s[h0 + h], slots + j0, n, (const char *)vd + 16 * c * elt,
                                        row_stride, od + h * D + 16 * c, D, 1, 1, half);
        }
    }
}

// chunk_partials_t compiled for each cache type.
static void chunk_partials_f32(const float *q, int nh, int64_t D, const void *k, const void *v,
                               int64_t row_stride, const int64_t *slots, int64_t j0, int64_t j1,
                               float scale, int prefetch, float *m, float *l, float *o) {
    chunk_partials_t(q, nh, D, k, v, row_stride, slots, j0, j1, scale, prefetch, m, l, o, 0);
}

static void chunk_partials_f16(const float *q, int nh, int64_t D, const void *k, const void *v,
                               int64_t row_stride, const int64_t *slots, int64_t j0, int64_t j1,
                               float scale, int prefetch, float *m, float *l, float *o) {
    chunk_partials_t(q, nh, D, k, v, row_stride, slots, j0, j1, scale, prefetch, m, l, o, 1);
}

// q, out: [S, H, D] (S query rows); k_cache, v_cache: [slots, Hkv, D]; row i sees the keys at
// cache slots slots[starts[i]] .. slots[starts[i] + lens[i] - 1] (its positions 0 .. lens[i] - 1;
// the query is at the last). window > 0: only the last `window` keys. D % 16 == 0.
// sinks: NULL, or [H] logits (in the scaled scores' units) of each head's sink column.
static void attend(const float *q, const void *k_cache, const void *v_cache, const int64_t *slots,
                   const int64_t *starts, const int64_t *lens, int64_t S, int64_t H, int64_t Hkv,
                   int64_t D, int64_t window, float scale, const float *sinks, float *out,
                   int nthreads, int half) {
    const int64_t rep = H / Hkv, row_stride = Hkv * D, elt = half ? 2 : 4;
    int64_t *first = malloc(sizeof(int64_t) * (S + 1));  // first task of each sequence
    int64_t ntasks = 0;
    for (int64_t i = 0; i < S; i++) {
        int64_t ctx = lens[i];
        int64_t start = window > 0 && ctx > window ? ctx - window : 0;
        first[i] = ntasks;
        ntasks += Hkv * ((ctx - start + KEY_CHUNK - 1) / KEY_CHUNK);
    }
    first[S] = ntasks;
    // Per task: rep maxima, rep sums, rep * D weighted values.
    const int64_t per_task = rep * (D + 2);
    float *part = malloc(sizeof(float) * (ntasks * per_task + 1));

#pragma omp parallel for num_threads(nthreads) schedule(dynamic, 1)
    for (int64_t t = 0; t < ntasks; t++) {
        int64_t i = 0;  // the task's sequence: binary search in first[]
        for (int64_t lo = 0, hi = S - 1; lo <= hi;) {
            int64_t mid = (lo + hi) / 2;
            if (first[mid] <= t) {
                i = mid;
                lo = mid + 1;
            } else {
                hi = mid - 1;
            }
        }
        const int64_t ctx = lens[i];
        const int64_t start = window > 0 && ctx > window ? ctx - window : 0;
        const int64_t nchunks = (ctx - start + KEY_CHUNK - 1) / KEY_CHUNK;
        const int64_t g = (t - first[i]) / nchunks, c = (t - first[i]) % nchunks;
        const int64_t j0 = start + c * KEY_CHUNK;
        const int64_t j1 = j0 + KEY_CHUNK < ctx ? j0 + KEY_CHUNK : ctx;
        float *pm = part + t * per_task, *pl = pm + rep, *po = pl + rep;
        // Prefetching pays for keys coming from memory: a sequence's first row here (a decode
        // row, or a prompt chunk's first); its later rows find the same keys in the caches.
        const int prefetch = i == 0 || starts[i - 1] != starts[i];
        for (int64_t h0 = 0; h0 < rep; h0 += MAX_REP) {
            const int nh = rep - h0 < MAX_REP ? (int)(rep - h0) : MAX_REP;
            const float *qh = q + (i * H + g * rep + h0) * D;
            const void *kg = (const char *)k_cache + g * D * elt;
            const void *vg = (const char *)v_cache + g * D * elt;
            (half ? chunk_partials_f16 : chunk_partials_f32)(qh, nh, D, kg, vg, row_stride,
                                                             slots + starts[i], j0, j1, scale,
                                                             prefetch, pm + h0, pl + h0,
                                                             po + h0 * D);
        }
    }

    // Combine each head's chunks in order.
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t ig = 0; ig < S * Hkv; ig++) {
        const int64_t i = ig / Hkv, g = ig % Hkv;
        const int64_t nchunks = (first[i + 1] - first[i]) / Hkv;
        const float *base = part + (first[i] + g * nchunks) * per_task;
        for (int64_t h = 0; h < rep; h++) {
            const float sink = sinks ? sinks[g * rep + h] : -INFINITY;
            float mx = sink;
            for (int64_t c = 0; c < nchunks; c++) {
                const float mc = base[c * per_task + h];
                if (mc > mx) mx = mc;
            }
            // The sink's column: weight e^(sink - max), no value.
            float total = sinks ? _mm512_cvtss_f32(exp512(_mm512_set1_ps(sink - mx))) : 0.0f;
            float *dst = out + (i * H + g * rep + h) * D;
            for (int64_t d = 0; d < D; d += 16) _mm512_storeu_ps(dst + d, _mm512_setzero_ps());
            for (int64_t c = 0; c < nchunks; c++) {
                const float *pc = base + c * per_task;
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
    free(part);
    free(first);
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
