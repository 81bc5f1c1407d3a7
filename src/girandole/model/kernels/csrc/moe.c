// A mixture-of-experts block's experts in one native call (CPU fast mode, every expert's gate_up
// and down stored in wq_vnni.c's layout):
//
//   y[t] = sum over token t's k experts e, ascending e, of w[t][e] * down_e(act(gate_up_e(x[t])))
//
// moe.py's per-expert dispatch makes two wq_gemm calls and an activation call per active expert
// (each its own OpenMP region) and Python between them: at one or two rows an expert, the
// regions' fork/join and the glue cost about as much as the products. Here one region runs the
// whole block, its phases separated by barriers:
//   1. each (token, expert) pair's row quantized for the int8 kernel (wq_vnni.c);
//   2. gate_up, over work items (expert, chunk of 64 output channels): with a few rows an
//      expert (decode) each expert's chunks split between the threads, else dynamic items;
//   3. the activation per pair (gated_act.c), its bf16 output quantized for down as in 1;
//   4. down, over work items as in 2;
//   5. each token's k weighted outputs summed in ascending expert order, from zero.
// Pairs are sorted by expert (stable: by token within an expert), so an expert's rows are
// contiguous.
//
// Every row, decode or prompt, takes the int8 kernel: an expert gets a few rows of a short
// prompt (64 tokens, 128 experts, top-8: ~4), for which the bf16 panel kernel (wq_gemm.c)
// dequantizes the expert's whole weight; the int8 kernel is faster at every row count an
// expert gets in a prompt chunk (docs/benchmarks.md, "prompt rows on the int8 kernel"), and a
// row's result never depends on how many rows share its expert (batch invariance).
//
// Every row goes through the same chunk routine (wq_vnni_chunk) as a wq_gemm_vnni call would
// take it, the activation is gated_act's, and the sums are moe.py's (each product rounded, then
// added, in expert order): bitwise the per-expert dispatch's results.
#include <stdint.h>
#include <string.h>

#include "wq_panel.h"

#define MOE_CHUNK 4  // blocks of 16 channels per work item: wq_gemm.c's and wq_vnni.c's CHUNK
#define SPLIT_ROWS 4  // experts of at most this many rows split their chunks statically

// wq_vnni.c, gated_act.c
void wq_vnni_quantize(const uint16_t *x, int64_t M, int64_t K, int8_t *xq, float *xs, float *xb);
void wq_vnni_chunk(const int8_t *xq, const float *xs, const float *xb, int64_t M, int64_t K,
                   const uint8_t *q, int bits, const uint8_t *params, int64_t N, int64_t c,
                   float *y, int64_t ldy);
void gated_act_row(const float *gu, int64_t I, int act, uint16_t *out);

// An expert's rows: pairs [first, first + rows).
typedef struct {
    int64_t expert, first, rows;
} moe_segment;

// The calling thread's buffers (kept from call to call, as wq_gemm's), and each thread's row.
static __thread wq_buffer index_buffer, quant_buffer, product_buffer, row_buffer;

static inline int64_t round64(int64_t bytes) { return (bytes + 63) / 64 * 64; }

// A buffer above this is given back after the call: a 512-token prompt chunk of Qwen3-30B-A3B
// (4096 pairs) keeps ~42 MiB in all, but a chunk of a few thousand tokens would keep hundreds of
// MiB mapped for the decode steps after it, which need a few MiB.
#define KEEP_BYTES (64LL << 20)

static void release(wq_buffer *b) {
    if (b->bytes > KEEP_BYTES) {
        free(b->data);
        b->data = NULL;
        b->bytes = 0;
    }
}

// Chunk c of a segment's product with the weight (q, params, bits) of N outputs over K inputs,
// from its quantized rows (xq, xs, xb: K and K/32 apart), into out (N floats a row, by pair).
static void segment_chunk(const moe_segment *s, int64_t c, int64_t K, int64_t N,
                          const int64_t *weight, const int8_t *xq, const float *xs,
                          const float *xb, float *out) {
    const uint8_t *q = (const uint8_t *)(intptr_t)weight[0];
    const uint8_t *params = (const uint8_t *)(intptr_t)weight[1];
    const int bits = (int)weight[2];
    const int64_t f = s->first, groups = K / 32;
    wq_vnni_chunk(xq + f * K, xs + f * groups, xb + f * groups, s->rows, K, q, bits, params, N, c,
                  out + f * N, N);
}

// Every segment's product with its expert's weight (weights: per expert (levels, params,
// bits) of N outputs over K inputs), work shared by the threads of the calling parallel region
// and finished at a barrier. Each item writes its own outputs, so any order of items gives the
// same floats.
static void segment_products(const moe_segment *seg, int64_t nseg, int64_t K, int64_t N,
                             const int64_t *weights, const int8_t *xq, const float *xs,
                             const float *xb, float *out, int split) {
    const int64_t chunks = (N / 16 + MOE_CHUNK - 1) / MOE_CHUNK;
    if (split) {
        // Decode rows: each expert's chunks split between the threads as wq_gemm_vnni splits a
        // matrix's (each thread one contiguous run, the threads side by side), expert after
        // expert without waiting: ~10 % faster than dynamic items, which left each thread a
        // stream broken every two items (Qwen3-30B-A3B's experts, one token: 3.34 -> 2.96 ms
        // for 4 layers, Zen 4; 16 separate wq_gemm calls a layer took 3.14).
        for (int64_t i = 0; i < nseg; i++) {
#pragma omp for schedule(static) nowait
            for (int64_t c = 0; c < chunks; c++)
                segment_chunk(seg + i, c, K, N, weights + 3 * seg[i].expert, xq, xs, xb, out);
        }
#pragma omp barrier
    } else {
        // Dynamic: a prompt's experts differ in rows, and on a shared host a thread may lose
        // its core for a while.
#pragma omp for schedule(dynamic, 2)
        for (int64_t i = 0; i < nseg * chunks; i++) {
            const moe_segment *s = seg + i / chunks;
            segment_chunk(s, i % chunks, K, N, weights + 3 * s->expert, xq, xs, xb, out);
        }
    }
}

// A pair's row of K bf16 inputs quantized for the int8 kernel into xq, xs, xb at row `pos`.
static inline void quantize_pair(const uint16_t *row, int64_t K, int64_t pos, int8_t *xq,
                                 float *xs, float *xb) {
    const int64_t groups = K / 32;
    wq_vnni_quantize(row, 1, K, xq + pos * K, xs + pos * groups, xb + pos * groups);
}

// x: bf16 [T][H]; ids, weights: [T][k] (expert ids, their router weights); gate_up, down: per
// expert (levels pointer, params pointer, bits) of its [2I][H] and [H][I] weights; act:
// gated_act.c's; y: float32 [T][H].
void moe_experts(const uint16_t *x, int64_t T, int64_t H, int64_t I, int64_t E,
                 const int64_t *ids, const float *weights, int64_t k, const int64_t *gate_up,
                 const int64_t *down, int act, float *y, int nthreads) {
    const int64_t P = T * k, KMAX = H > I ? H : I, NMAX = 2 * I > H ? 2 * I : H;
    // Indices: cnt, start [E + 1], fill [E], pair_pos [P] (pair j's sorted position),
    // pair_token [P]; then the segments; then the sorted pairs' weights.
    int64_t *ix = (int64_t *)wq_buffer_for(
        &index_buffer, round64((3 * E + 1 + 2 * P) * 8 + E * (int64_t)sizeof(moe_segment) +
                               P * (int64_t)sizeof(float)));
    int64_t *cnt = ix, *start = cnt + E, *fill = start + E + 1;
    int64_t *pair_pos = fill + E, *pair_token = pair_pos + P;
    moe_segment *seg = (moe_segment *)(pair_token + P);
    float *pair_w = (float *)(seg + E);
    memset(cnt, 0, (size_t)E * sizeof(int64_t));
    for (int64_t j = 0; j < P; j++) cnt[ids[j]]++;
    start[0] = 0;
    int64_t nseg = 0;
    for (int64_t e = 0; e < E; e++) {
        start[e + 1] = start[e] + cnt[e];
        fill[e] = start[e];
        if (cnt[e]) seg[nseg++] = (moe_segment){e, start[e], cnt[e]};
    }
    for (int64_t j = 0; j < P; j++) {
        const int64_t pos = fill[ids[j]]++;
        pair_pos[j] = pos;
        pair_token[pos] = j / k;
        pair_w[pos] = weights[j];
    }
    // The quantized rows (gate_up's inputs, then down's, over the same bytes), and the products
    // (gate_up's [P][2I], then down's [P][H], over the same bytes).
    const int64_t xq_bytes = round64(P * KMAX);
    uint8_t *qb = wq_buffer_for(&quant_buffer, xq_bytes + round64(2 * P * (KMAX / 32) * 4));
    int8_t *xq = (int8_t *)qb;
    float *xs = (float *)(qb + xq_bytes), *xb = xs + P * (KMAX / 32);
    float *prod = (float *)wq_buffer_for(&product_buffer, round64(P * NMAX * (int64_t)sizeof(float)));
    // Few rows an expert (decode steps): its chunks split statically (segment_products).
    int64_t most = 0;
    for (int64_t i = 0; i < nseg; i++) most = seg[i].rows > most ? seg[i].rows : most;
    const int split = most <= SPLIT_ROWS;
#pragma omp parallel num_threads(nthreads)
    {
        uint16_t *act_row = (uint16_t *)wq_buffer_for(&row_buffer, round64(I * 2));
#pragma omp for schedule(static)
        for (int64_t p = 0; p < P; p++)
            quantize_pair(x + pair_token[p] * H, H, p, xq, xs, xb);
        segment_products(seg, nseg, H, 2 * I, gate_up, xq, xs, xb, prod, split);
#pragma omp for schedule(static)
        for (int64_t p = 0; p < P; p++) {
            gated_act_row(prod + p * 2 * I, I, act, act_row);
            quantize_pair(act_row, I, p, xq, xs, xb);
        }
        segment_products(seg, nseg, I, H, down, xq, xs, xb, prod, split);
#pragma omp for schedule(static)
        for (int64_t t = 0; t < T; t++) {
            int64_t pos[64];  // the token's pairs in ascending expert order: ascending position
            for (int64_t j = 0; j < k; j++) {
                int64_t v = pair_pos[t * k + j], m = j;
                for (; m > 0 && pos[m - 1] > v; m--) pos[m] = pos[m - 1];
                pos[m] = v;
            }
            float *yt = y + t * H;
            for (int64_t h = 0; h < H; h++) yt[h] = 0.0f;
            for (int64_t j = 0; j < k; j++) {
                const float *o = prod + pos[j] * H, w = pair_w[pos[j]];
                for (int64_t h = 0; h < H; h++) yt[h] += o[h] * w;  // rounded, then added
            }
        }
    }
    release(&quant_buffer);
    release(&product_buffer);
}
