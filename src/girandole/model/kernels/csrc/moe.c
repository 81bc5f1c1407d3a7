// A mixture-of-experts block's experts in one native call (CPU fast mode, every expert's gate_up
// and down stored in wq_vnni.c's layout):
//
//   y[t] = sum over token t's k experts e, ascending e, of w[t][e] * down_e(act(gate_up_e(x[t])))
//
// moe.py's per-expert dispatch makes two wq_gemm calls and an activation call per active expert
// (each its own OpenMP region) and Python between them: at one or two rows an expert, the
// regions' fork/join and the glue cost about as much as the products. Here one region runs the
// whole block, its phases separated by barriers:
//   1. each (token, expert) pair's row made ready for its kernel: a decode row quantized for the
//      int8 kernel (wq_vnni.c), a prompt row copied (widened on AVX2) for the bf16 one (wq_gemm.c);
//   2. gate_up, over work items (segment, chunk of 64 output channels), a segment being an
//      expert's decode rows or its prompt rows;
//   3. the activation per pair (gated_act.c), its bf16 output made ready for down as in 1;
//   4. down, over work items as in 2;
//   5. each token's k weighted outputs summed in ascending expert order, from zero.
// Pairs are sorted by expert (stable: by token within an expert), so a segment's rows are
// contiguous and an expert's decode rows (tokens below `decode`) come first.
//
// Every row goes through the same chunk routines (wq_vnni_chunk, wq_gemm_chunk) as a wq_gemm_vnni
// or wq_gemm call with the same role would take it, the activation is gated_act's, and the sums
// are moe.py's (each product rounded, then added, in expert order): bitwise the per-expert
// dispatch's results. A row's kernel follows its role (`decode`), never the other rows: a token's
// output does not depend on which tokens share the step (batch invariance).
#include <stdint.h>
#include <string.h>

#include "wq_panel.h"

#define MOE_CHUNK 4  // blocks of 16 channels per work item: wq_gemm.c's and wq_vnni.c's CHUNK

// wq_vnni.c, wq_gemm.c, gated_act.c
void wq_vnni_quantize(const uint16_t *x, int64_t M, int64_t K, int8_t *xq, float *xs, float *xb);
void wq_vnni_chunk(const int8_t *xq, const float *xs, const float *xb, int64_t M, int64_t K,
                   const uint8_t *q, int bits, const uint8_t *params, int64_t N, int64_t c,
                   float *y, int64_t ldy);
void wq_widen_rows(const uint16_t *x, int64_t M, int64_t K, float *xf);
void wq_gemm_chunk(const uint16_t *x, const float *xf, int64_t M, int64_t K, const uint8_t *q,
                   int bits, const uint8_t *params, int64_t N, int64_t c, float *y, int64_t ldy);
void gated_act_row(const float *gu, int64_t I, int act, uint16_t *out);

// An expert's rows of one role: pairs [first, first + rows), decode rows or prompt rows.
typedef struct {
    int64_t expert, first, rows;
    int decode;
} moe_segment;

// The calling thread's buffers (kept from call to call, as wq_gemm's), and each thread's row.
static __thread wq_buffer index_buffer, quant_buffer, prompt_buffer, product_buffer, row_buffer;

static inline int64_t round64(int64_t bytes) { return (bytes + 63) / 64 * 64; }

// A buffer above this is given back after the call: a 512-token prompt chunk of Qwen3-30B-A3B
// (4096 pairs) keeps ~75 MiB in all, but a chunk of a few thousand tokens would keep hundreds of
// MiB mapped for the decode steps after it, which need a few MiB.
#define KEEP_BYTES (64LL << 20)

static void release(wq_buffer *b) {
    if (b->bytes > KEEP_BYTES) {
        free(b->data);
        b->data = NULL;
        b->bytes = 0;
    }
}

// A pair's row of K bf16 inputs made ready for its kernel: quantized (decode) into xq, xs, xb at
// row `pos` (K apart), or as the bf16 kernel reads it into xp (floats on AVX2, bf16 elsewhere).
static void prepare_row(const uint16_t *row, int64_t K, int64_t pos, int decode, int8_t *xq,
                        float *xs, float *xb, void *xp) {
    const int64_t groups = K / 32;
    if (decode) {
        wq_vnni_quantize(row, 1, K, xq + pos * K, xs + pos * groups, xb + pos * groups);
        return;
    }
#ifdef GIR_AVX2
    wq_widen_rows(row, 1, K, (float *)xp + pos * K);
#else
    memcpy((uint16_t *)xp + pos * K, row, (size_t)K * sizeof(uint16_t));
#endif
}

// Chunk c of a segment's product with the weight (q, params, bits) of N outputs over K inputs,
// from its prepared rows, into out (N floats a row, by pair).
static void segment_chunk(const moe_segment *s, int64_t c, int64_t K, int64_t N,
                          const int64_t *weight, const int8_t *xq, const float *xs,
                          const float *xb, const void *xp, float *out) {
    const uint8_t *q = (const uint8_t *)(intptr_t)weight[0];
    const uint8_t *params = (const uint8_t *)(intptr_t)weight[1];
    const int bits = (int)weight[2];
    const int64_t f = s->first, groups = K / 32;
    if (s->decode) {
        wq_vnni_chunk(xq + f * K, xs + f * groups, xb + f * groups, s->rows, K, q, bits, params, N,
                      c, out + f * N, N);
        return;
    }
#ifdef GIR_AVX2
    wq_gemm_chunk(NULL, (const float *)xp + f * K, s->rows, K, q, bits, params, N, c, out + f * N,
                  N);
#else
    wq_gemm_chunk((const uint16_t *)xp + f * K, NULL, s->rows, K, q, bits, params, N, c,
                  out + f * N, N);
#endif
}

// x: bf16 [T][H]; ids, weights: [T][k] (expert ids, their router weights); decode: the leading
// tokens that are decode rows, or -1 outside an engine step (then, as quant.decode_rows, an
// expert's rows are decode rows where it has fewer than dense_min_rows); gate_up, down: per
// expert (levels pointer, params pointer, bits) of its [2I][H] and [H][I] weights; act:
// gated_act.c's; y: float32 [T][H].
void moe_experts(const uint16_t *x, int64_t T, int64_t H, int64_t I, int64_t E,
                 const int64_t *ids, const float *weights, int64_t k, int64_t decode,
                 int64_t dense_min_rows, const int64_t *gate_up, const int64_t *down, int act,
                 float *y, int nthreads) {
    const int64_t P = T * k, KMAX = H > I ? H : I, NMAX = 2 * I > H ? 2 * I : H;
    if (decode > T) decode = T;
    // Indices: cnt, dcnt, start [E + 1], fill [E], pair_pos [P] (pair j's sorted position),
    // pair_token [P]; then the segments; then the sorted pairs' weights and roles.
    int64_t *ix = (int64_t *)wq_buffer_for(
        &index_buffer, round64((5 * E + 1 + 2 * P) * 8 + 2 * E * (int64_t)sizeof(moe_segment) +
                               P * (int64_t)(sizeof(float) + 1)));
    int64_t *cnt = ix, *dcnt = cnt + E, *start = dcnt + E, *fill = start + E + 1;
    int64_t *pair_pos = fill + E, *pair_token = pair_pos + P;
    moe_segment *seg = (moe_segment *)(pair_token + P);
    float *pair_w = (float *)(seg + 2 * E);
    int8_t *pair_decode = (int8_t *)(pair_w + P);
    memset(cnt, 0, (size_t)(2 * E) * sizeof(int64_t));
    for (int64_t j = 0; j < P; j++) {
        cnt[ids[j]]++;
        if (j / k < decode) dcnt[ids[j]]++;
    }
    start[0] = 0;
    int64_t nseg = 0;
    for (int64_t e = 0; e < E; e++) {
        start[e + 1] = start[e] + cnt[e];
        fill[e] = start[e];
        if (decode < 0) dcnt[e] = cnt[e] < dense_min_rows ? cnt[e] : 0;
        if (dcnt[e]) seg[nseg++] = (moe_segment){e, start[e], dcnt[e], 1};
        if (cnt[e] > dcnt[e]) seg[nseg++] = (moe_segment){e, start[e] + dcnt[e], cnt[e] - dcnt[e], 0};
        for (int64_t p = start[e]; p < start[e + 1]; p++) pair_decode[p] = p < start[e] + dcnt[e];
    }
    for (int64_t j = 0; j < P; j++) {
        const int64_t pos = fill[ids[j]]++;
        pair_pos[j] = pos;
        pair_token[pos] = j / k;
        pair_w[pos] = weights[j];
    }
    // Rows as their kernels read them (gate_up's inputs, then down's, over the same bytes), and
    // the products (gate_up's [P][2I], then down's [P][H], over the same bytes).
    const int64_t xq_bytes = round64(P * KMAX);
    uint8_t *qb = wq_buffer_for(&quant_buffer, xq_bytes + round64(2 * P * (KMAX / 32) * 4));
    int8_t *xq = (int8_t *)qb;
    float *xs = (float *)(qb + xq_bytes), *xb = xs + P * (KMAX / 32);
#ifdef GIR_AVX2
    void *xp = wq_buffer_for(&prompt_buffer, round64(P * KMAX * (int64_t)sizeof(float)));
#else
    void *xp = wq_buffer_for(&prompt_buffer, round64(P * KMAX * (int64_t)sizeof(uint16_t)));
#endif
    float *prod = (float *)wq_buffer_for(&product_buffer, round64(P * NMAX * (int64_t)sizeof(float)));
    const int64_t gu_chunks = (2 * I / 16 + MOE_CHUNK - 1) / MOE_CHUNK;
    const int64_t down_chunks = (H / 16 + MOE_CHUNK - 1) / MOE_CHUNK;
#pragma omp parallel num_threads(nthreads)
    {
        uint16_t *act_row = (uint16_t *)wq_buffer_for(&row_buffer, round64(I * 2));
#pragma omp for schedule(static)
        for (int64_t p = 0; p < P; p++)
            prepare_row(x + pair_token[p] * H, H, p, pair_decode[p], xq, xs, xb, xp);
        // Dynamic: segments differ in rows (a prompt's experts), and on a shared host a thread
        // may lose its core for a while; each item writes its own outputs, so any order of
        // items gives the same floats.
#pragma omp for schedule(dynamic, 2)
        for (int64_t i = 0; i < nseg * gu_chunks; i++) {
            const moe_segment *s = seg + i / gu_chunks;
            segment_chunk(s, i % gu_chunks, H, 2 * I, gate_up + 3 * s->expert, xq, xs, xb, xp,
                          prod);
        }
#pragma omp for schedule(static)
        for (int64_t p = 0; p < P; p++) {
            gated_act_row(prod + p * 2 * I, I, act, act_row);
            prepare_row(act_row, I, p, pair_decode[p], xq, xs, xb, xp);
        }
#pragma omp for schedule(dynamic, 2)
        for (int64_t i = 0; i < nseg * down_chunks; i++) {
            const moe_segment *s = seg + i / down_chunks;
            segment_chunk(s, i % down_chunks, I, H, down + 3 * s->expert, xq, xs, xb, xp, prod);
        }
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
    release(&prompt_buffer);
    release(&product_buffer);
}
