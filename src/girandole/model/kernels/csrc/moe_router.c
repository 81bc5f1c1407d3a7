// A mixture-of-experts router's logits in float32, the same for a row whatever rows share the
// call (F.linear's sums follow the row count: moe.py padded a lone token to MIN_DENSE_ROWS rows
// for that, and torch's CPU GEMM takes ~0.1-0.8 ms for those 4 rows x 128 experts x 2048 inputs,
// on this host more than the 1 MiB of router weights takes to read).
//
//   logits[t][e] = x[t] . w[e]      x: float32 [T][H], w: float32 [E][H], H % 16 == 0
//
// Each output is one chain of 16-lane FMAs over the inputs in order, then _mm512_reduce_add_ps's
// tree (avx2_compat.h emulates GCC's, so both builds give the same floats).
#include <immintrin.h>

#include "avx2_compat.h"
#include <math.h>
#include <stdint.h>

#define EXPERTS 4  // outputs computed together: independent chains to hide the FMA latency

void moe_router(const float *x, int64_t T, int64_t H, const float *w, int64_t E, float *logits,
                int nthreads) {
    const int64_t blocks = (E + EXPERTS - 1) / EXPERTS;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t b = 0; b < blocks; b++) {
        const int64_t e0 = b * EXPERTS, n = E - e0 < EXPERTS ? E - e0 : EXPERTS;
        for (int64_t t = 0; t < T; t++) {
            const float *xt = x + t * H;
            __m512 acc[EXPERTS];
            for (int j = 0; j < EXPERTS; j++) acc[j] = _mm512_setzero_ps();
            for (int64_t h = 0; h < H; h += 16) {
                const __m512 xv = _mm512_loadu_ps(xt + h);
                for (int j = 0; j < n; j++)
                    acc[j] = _mm512_fmadd_ps(xv, _mm512_loadu_ps(w + (e0 + j) * H + h), acc[j]);
            }
            for (int j = 0; j < n; j++) logits[t * E + e0 + j] = _mm512_reduce_add_ps(acc[j]);
        }
    }
}

// Each row's top-k experts and their weights from its logits, as model/moe.py's route reads
// them (transformers' order of work: softmax over all E, top-k, then the k renormalised to sum
// to 1 where `norm`):
//
//   p[e] = exp(l[e] - max) / sum_e' exp(l[e'] - max);  ids: the k largest p, largest first
//   (ties: the lower expert first);  weights = p[ids] (/ their sum where norm)
//
// One pass of scalar float32 arithmetic a row, in a fixed order: a row's result never depends
// on the other rows. The eager path (moe.py, CPU fast mode) and the recorded decode step
// (engine/cpu_graphs.py) both take it, so the two agree bitwise; it replaces four torch calls
// (softmax, topk, sum, divide: ~20 us of dispatch a layer against ~1 us of work).
void moe_route(const float *logits, int64_t T, int64_t E, int64_t k, int norm, int64_t *ids,
               float *weights) {
    for (int64_t t = 0; t < T; t++) {
        const float *l = logits + t * E;
        int64_t *id = ids + t * k;
        float *w = weights + t * k;
        float top = l[0];
        for (int64_t e = 1; e < E; e++) top = l[e] > top ? l[e] : top;
        float sum = 0.0f;
        for (int64_t e = 0; e < E; e++) sum += expf(l[e] - top);
        // the k largest logits, largest first, by insertion (k <= 64, E a few hundred)
        int64_t n = 0;
        for (int64_t e = 0; e < E; e++) {
            if (n == k && !(l[e] > l[id[k - 1]])) continue;
            int64_t m = n < k ? n++ : k - 1;
            for (; m > 0 && l[e] > l[id[m - 1]]; m--) id[m] = id[m - 1];
            id[m] = e;
        }
        float picked = 0.0f;
        for (int64_t j = 0; j < k; j++) {
            w[j] = expf(l[id[j]] - top) / sum;
            picked += w[j];
        }
        if (norm)
            for (int64_t j = 0; j < k; j++) w[j] = w[j] / picked;
    }
}
