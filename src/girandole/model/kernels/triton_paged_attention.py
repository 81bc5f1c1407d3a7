"""Paged attention in Triton for CUDA: query rows read their keys and values in place from the
paged KV cache through block tables (no gather, no padding to the longest context).

The cache is the engine's slot layout, [num_slots, Hkv, D] with num_slots = num_blocks *
block_size (the same memory as [num_blocks, block_size, Hkv, D]): position p of a sequence lives
in slot block_table[p // block_size] * block_size + p % block_size.

Two kernels (online softmax, fp32 accumulators, bf16 or fp32 cache):
- `paged_decode`: one query row per sequence; a program per (sequence, KV head) computes the
  whole GQA group of query heads that share the KV head, so each key is read once.
- `paged_prefill`: varlen and causal; sequence i's query rows are the last query_len_i
  positions of its context_len_i keys (chunked prefill over a cached prefix, or a decode row).
  With image spans (Gemma 3 vision), a query row inside an image's [start, end) positions also
  sees the image's later keys: causal OR both in the same image, then the sliding window
  (transformers' token-type mask; model/attention.py `_block_mask`).
Both take Gemma's sliding window and tanh logit soft-cap, and gpt-oss's attention sinks (a
float32 logit per query head, one more column of every row's softmax without a value: it joins
the running max and sum once, after the keys; split-K decode adds it in the merge).

`TRITON_INTERPRET=1` runs them on CPU tensors (the tests do); `available()` says whether triton
can be imported at all.
"""

from __future__ import annotations

import functools
import math
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU-only install: the engine never asks for these kernels there
    triton = None
    tl = None


def available() -> bool:
    return triton is not None


def _interpreted() -> bool:
    """Under TRITON_INTERPRET the kernels upcast their tiles to fp32 before tl.dot: the
    interpreter multiplies bf16 tiles as their raw 16-bit patterns (numpy has no bf16)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


if triton is not None:
    # A finite "minus infinity" for the running max: a block whose keys are all masked then
    # gives exp(-inf - m) = 0 instead of exp(-inf - -inf) = nan.
    _NEG_BIG = tl.constexpr(-1.0e30)

    @triton.jit
    def _softcap(s, cap):
        # cap * tanh(s / cap), tanh through exp: tl has no tanh that the interpreter also runs.
        x = s / cap
        return cap * (1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0))

    @triton.jit
    def _join_sink(m_i, l_i, acc, sink):
        """The online softmax's state (max, sum, unnormalised output; rows along axis 0) with
        each row's sink logit added as one more column that has no value."""
        m_new = tl.maximum(m_i, sink)
        alpha = tl.exp(m_i - m_new)
        return l_i * alpha + tl.exp(sink - m_new), acc * alpha[:, None]

    @triton.jit
    def _attend_keys(
        q,
        k_ptr,
        v_ptr,
        bt_row_ptr,
        kvh,
        stride_ks,
        stride_kh,
        scale,
        softcap,
        window,
        block_size,
        lo,
        hi,
        q_pos,
        BLOCK_G: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_N: tl.constexpr,
        USE_SOFTCAP: tl.constexpr,
        USE_WINDOW: tl.constexpr,
        DOT_F32: tl.constexpr,
    ):
        """Online softmax of one decode row's GQA group over the keys at positions [lo, hi):
        returns the running max, the sum of exponentials and the unnormalised output."""
        d = tl.arange(0, BLOCK_D)
        d_mask = d < HEAD_DIM
        m_i = tl.full([BLOCK_G], _NEG_BIG, tl.float32)
        l_i = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
        for start in range(lo, hi, BLOCK_N):
            pos = start + tl.arange(0, BLOCK_N)
            valid = pos < hi
            if USE_WINDOW:
                valid = valid & (q_pos - pos < window)
            blk = tl.load(bt_row_ptr + pos // block_size, mask=valid, other=0)
            slot = blk.to(tl.int64) * block_size + pos % block_size
            kv_mask = valid[:, None] & d_mask[None, :]
            kv_off = slot[:, None] * stride_ks + kvh * stride_kh + d[None, :]
            k = tl.load(k_ptr + kv_off, mask=kv_mask, other=0.0)
            if DOT_F32:
                k = k.to(tl.float32)
            s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
            if USE_SOFTCAP:
                s = _softcap(s, softcap)
            s = tl.where(valid[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_ptr + kv_off, mask=kv_mask, other=0.0)
            if DOT_F32:
                v = v.to(tl.float32)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
            m_i = m_new
        return m_i, l_i, acc

    @triton.jit
    def _load_group_query(
        q_ptr,
        seq,
        kvh,
        stride_qs,
        stride_qh,
        GROUP: tl.constexpr,
        BLOCK_G: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        BLOCK_D: tl.constexpr,
        DOT_F32: tl.constexpr,
    ):
        """The query rows of the GQA group that shares KV head `kvh`, padded to BLOCK_G rows."""
        g = tl.arange(0, BLOCK_G)
        d = tl.arange(0, BLOCK_D)
        heads = kvh * GROUP + g
        q = tl.load(
            q_ptr + seq * stride_qs + heads[:, None] * stride_qh + d[None, :],
            mask=(g < GROUP)[:, None] & (d < HEAD_DIM)[None, :],
            other=0.0,
        )
        if DOT_F32:
            q = q.to(tl.float32)
        return q

    @triton.jit
    def _decode_kernel(
        q_ptr,
        k_ptr,
        v_ptr,
        bt_ptr,
        lens_ptr,
        sinks_ptr,
        out_ptr,
        stride_qs,
        stride_qh,
        stride_ks,
        stride_kh,
        stride_bt,
        stride_os,
        stride_oh,
        scale,
        softcap,
        window,
        block_size,
        GROUP: tl.constexpr,
        BLOCK_G: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_N: tl.constexpr,
        USE_SOFTCAP: tl.constexpr,
        USE_WINDOW: tl.constexpr,
        USE_SINKS: tl.constexpr,
        DOT_F32: tl.constexpr,
    ):
        seq = tl.program_id(0)
        kvh = tl.program_id(1)
        ctx_len = tl.load(lens_ptr + seq)
        q = _load_group_query(
            q_ptr, seq, kvh, stride_qs, stride_qh, GROUP, BLOCK_G, HEAD_DIM, BLOCK_D, DOT_F32
        )
        q_pos = ctx_len - 1
        lo = 0
        if USE_WINDOW:
            lo = tl.maximum(q_pos - window + 1, 0) // BLOCK_N * BLOCK_N
        m_i, l_i, acc = _attend_keys(
            q,
            k_ptr,
            v_ptr,
            bt_ptr + seq * stride_bt,
            kvh,
            stride_ks,
            stride_kh,
            scale,
            softcap,
            window,
            block_size,
            lo,
            ctx_len,
            q_pos,
            BLOCK_G,
            HEAD_DIM,
            BLOCK_D,
            BLOCK_N,
            USE_SOFTCAP,
            USE_WINDOW,
            DOT_F32,
        )
        g = tl.arange(0, BLOCK_G)
        d = tl.arange(0, BLOCK_D)
        heads = kvh * GROUP + g
        if USE_SINKS:
            sink = tl.load(sinks_ptr + heads, mask=g < GROUP, other=0.0)
            l_i, acc = _join_sink(m_i, l_i, acc, sink)
        # A padded row (context_len 0) saw no key: zeros, not 0 / 0.
        l_i = tl.where(l_i > 0.0, l_i, 1.0)
        out = acc / l_i[:, None]
        tl.store(
            out_ptr + seq * stride_os + heads[:, None] * stride_oh + d[None, :],
            out.to(out_ptr.dtype.element_ty),
            mask=(g < GROUP)[:, None] & (d < HEAD_DIM)[None, :],
        )

    @triton.jit
    def _decode_split_kernel(
        q_ptr,
        k_ptr,
        v_ptr,
        bt_ptr,
        lens_ptr,
        part_out_ptr,
        part_lse_ptr,
        stride_qs,
        stride_qh,
        stride_ks,
        stride_kh,
        stride_bt,
        stride_pos,
        stride_poh,
        stride_pop,
        stride_pls,
        stride_plh,
        scale,
        softcap,
        window,
        block_size,
        num_parts,
        part_unit,
        GROUP: tl.constexpr,
        BLOCK_G: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_N: tl.constexpr,
        USE_SOFTCAP: tl.constexpr,
        USE_WINDOW: tl.constexpr,
        DOT_F32: tl.constexpr,
    ):
        """Stage 1 of split-K decode: partition `part` of the keys a decode row attends to.
        The attended range [lo, ctx_len) (lo: the window's first unit) is cut into num_parts
        runs of whole units (part_unit tokens: a multiple of both the KV block size and
        BLOCK_N), so each partition reads whole cache blocks and whole tiles; the partition's
        normalised output and log-sum-exp go to the fp32 scratch for stage 2. A partition past
        the range (short rows, padding rows) writes an empty result (lse -1e30, zeros)."""
        seq = tl.program_id(0)
        kvh = tl.program_id(1)
        part = tl.program_id(2)
        ctx_len = tl.load(lens_ptr + seq)
        q = _load_group_query(
            q_ptr, seq, kvh, stride_qs, stride_qh, GROUP, BLOCK_G, HEAD_DIM, BLOCK_D, DOT_F32
        )
        q_pos = ctx_len - 1
        lo = 0
        if USE_WINDOW:
            lo = tl.maximum(q_pos - window + 1, 0) // part_unit * part_unit
        units = (ctx_len - lo + part_unit - 1) // part_unit
        per_part = (units + num_parts - 1) // num_parts
        start = lo + part * per_part * part_unit
        end = tl.minimum(start + per_part * part_unit, ctx_len)
        m_i, l_i, acc = _attend_keys(
            q,
            k_ptr,
            v_ptr,
            bt_ptr + seq * stride_bt,
            kvh,
            stride_ks,
            stride_kh,
            scale,
            softcap,
            window,
            block_size,
            start,
            end,
            q_pos,
            BLOCK_G,
            HEAD_DIM,
            BLOCK_D,
            BLOCK_N,
            USE_SOFTCAP,
            USE_WINDOW,
            DOT_F32,
        )
        seen = l_i > 0.0
        out = acc / tl.where(seen, l_i, 1.0)[:, None]
        lse = tl.where(seen, m_i + tl.log(tl.where(seen, l_i, 1.0)), _NEG_BIG)
        g = tl.arange(0, BLOCK_G)
        d = tl.arange(0, BLOCK_D)
        g_mask = g < GROUP
        heads = kvh * GROUP + g
        row = seq * stride_pos + heads * stride_poh + part * stride_pop
        tl.store(
            part_out_ptr + row[:, None] + d[None, :],
            out,
            mask=g_mask[:, None] & (d < HEAD_DIM)[None, :],
        )
        tl.store(part_lse_ptr + seq * stride_pls + heads * stride_plh + part, lse, mask=g_mask)

    @triton.jit
    def _decode_reduce_kernel(
        part_out_ptr,
        part_lse_ptr,
        sinks_ptr,
        out_ptr,
        stride_pos,
        stride_poh,
        stride_pop,
        stride_pls,
        stride_plh,
        stride_os,
        stride_oh,
        num_parts,
        HEAD_DIM: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_P: tl.constexpr,
        USE_SINKS: tl.constexpr,
    ):
        """Stage 2 of split-K decode: one query head of one row, its partitions' outputs
        weighted by exp(lse - max lse). Empty partitions weigh exp(-1e30 - max) = 0; a row whose
        partitions are all empty (context 0) averages their zeros: zeros. The head's sink (if
        any) joins here, once: the max and the denominator, weight exp(sink - max), no value."""
        seq = tl.program_id(0)
        head = tl.program_id(1)
        p = tl.arange(0, BLOCK_P)
        d = tl.arange(0, BLOCK_D)
        p_mask = p < num_parts
        d_mask = d < HEAD_DIM
        lse = tl.load(
            part_lse_ptr + seq * stride_pls + head * stride_plh + p, mask=p_mask, other=_NEG_BIG
        )
        m = tl.max(lse, 0)
        if USE_SINKS:
            sink = tl.load(sinks_ptr + head)
            m = tl.maximum(m, sink)
            sink_w = tl.exp(sink - m)
        else:
            sink_w = 0.0
        w = tl.where(p_mask, tl.exp(lse - m), 0.0)
        parts = tl.load(
            part_out_ptr
            + seq * stride_pos
            + head * stride_poh
            + p[:, None] * stride_pop
            + d[None, :],
            mask=p_mask[:, None] & d_mask[None, :],
            other=0.0,
        )
        out = tl.sum(parts * w[:, None], 0) / (tl.sum(w, 0) + sink_w)
        tl.store(
            out_ptr + seq * stride_os + head * stride_oh + d,
            out.to(out_ptr.dtype.element_ty),
            mask=d_mask,
        )

    @triton.jit
    def _prefill_kernel(
        q_ptr,
        k_ptr,
        v_ptr,
        bt_ptr,
        qstart_ptr,
        lens_ptr,
        span_start_ptr,
        span_end_ptr,
        sinks_ptr,
        out_ptr,
        stride_qt,
        stride_qh,
        stride_ks,
        stride_kh,
        stride_bt,
        stride_ot,
        stride_oh,
        scale,
        softcap,
        window,
        block_size,
        GROUP: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        USE_SOFTCAP: tl.constexpr,
        USE_WINDOW: tl.constexpr,
        USE_SPANS: tl.constexpr,
        USE_SINKS: tl.constexpr,
        DOT_F32: tl.constexpr,
    ):
        seq = tl.program_id(0)
        mb = tl.program_id(1)
        head = tl.program_id(2)
        kvh = head // GROUP
        q_start = tl.load(qstart_ptr + seq)
        q_len = tl.load(qstart_ptr + seq + 1) - q_start
        if mb * BLOCK_M >= q_len:
            return
        ctx_len = tl.load(lens_ptr + seq)
        offs_m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
        m_mask = offs_m < q_len
        q_pos = ctx_len - q_len + offs_m
        d = tl.arange(0, BLOCK_D)
        d_mask = d < HEAD_DIM
        q_off = (q_start + offs_m)[:, None].to(tl.int64) * stride_qt + head * stride_qh + d[None, :]
        q = tl.load(q_ptr + q_off, mask=m_mask[:, None] & d_mask[None, :], other=0.0)
        if DOT_F32:
            q = q.to(tl.float32)
        m_i = tl.full([BLOCK_M], _NEG_BIG, tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        first_pos = ctx_len - q_len + mb * BLOCK_M
        hi = tl.minimum(ctx_len, first_pos + BLOCK_M)  # one past the block's last query position
        if USE_SPANS:
            # Each row's image span [span_lo, span_hi) (empty: 0, 0): its keys are seen both
            # ways, so the block reads on to the furthest span end of its rows.
            row = q_start + offs_m
            span_lo = tl.load(span_start_ptr + row, mask=m_mask, other=0)
            span_hi = tl.load(span_end_ptr + row, mask=m_mask, other=0)
            hi = tl.minimum(ctx_len, tl.maximum(hi, tl.max(span_hi, 0)))
        lo = 0
        if USE_WINDOW:
            lo = tl.maximum(first_pos - window + 1, 0) // BLOCK_N * BLOCK_N
        for start in range(lo, hi, BLOCK_N):
            pos = start + tl.arange(0, BLOCK_N)
            in_ctx = pos < ctx_len
            valid = pos[None, :] <= q_pos[:, None]
            if USE_SPANS:
                in_span = (pos[None, :] >= span_lo[:, None]) & (pos[None, :] < span_hi[:, None])
                valid = valid | in_span
            valid = in_ctx[None, :] & valid
            if USE_WINDOW:
                valid = valid & (q_pos[:, None] - pos[None, :] < window)
            blk = tl.load(bt_ptr + seq * stride_bt + pos // block_size, mask=in_ctx, other=0)
            slot = blk.to(tl.int64) * block_size + pos % block_size
            kv_mask = in_ctx[:, None] & d_mask[None, :]
            kv_off = slot[:, None] * stride_ks + kvh * stride_kh + d[None, :]
            k = tl.load(k_ptr + kv_off, mask=kv_mask, other=0.0)
            if DOT_F32:
                k = k.to(tl.float32)
            s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
            if USE_SOFTCAP:
                s = _softcap(s, softcap)
            s = tl.where(valid, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_ptr + kv_off, mask=kv_mask, other=0.0)
            if DOT_F32:
                v = v.to(tl.float32)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
            m_i = m_new
        if USE_SINKS:
            l_i, acc = _join_sink(m_i, l_i, acc, tl.load(sinks_ptr + head))
        l_i = tl.where(l_i > 0.0, l_i, 1.0)
        out = acc / l_i[:, None]
        o_off = (q_start + offs_m)[:, None].to(tl.int64) * stride_ot + head * stride_oh + d[None, :]
        tl.store(
            out_ptr + o_off,
            out.to(out_ptr.dtype.element_ty),
            mask=m_mask[:, None] & d_mask[None, :],
        )


def decode_config(
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    window: int | None,
    softcap: float | None,
    sinks: bool = False,
) -> dict:
    """The decode kernel's constexprs and launch options for a layer's shape (`sinks`: the
    variant with attention sinks)."""
    group = num_heads // num_kv_heads
    return dict(
        GROUP=group,
        BLOCK_G=max(16, _next_pow2(group)),  # tl.dot wants every side >= 16 on GPUs
        HEAD_DIM=head_dim,
        BLOCK_D=max(16, _next_pow2(head_dim)),
        BLOCK_N=64 if head_dim <= 128 else 32,
        USE_SOFTCAP=bool(softcap),
        USE_WINDOW=bool(window),
        USE_SINKS=sinks,
        DOT_F32=_interpreted(),
        num_warps=4,
    )


def reduce_config(head_dim: int, num_partitions: int, sinks: bool = False) -> dict:
    """The split-K merge kernel's constexprs: one query head's partitions as one tile, its
    loads all in flight at once (8 warps past 4096 values: at 64 partitions of head_dim 256,
    ptxas gives 4 warps 234 registers a thread, 8 warps 211, neither spilling)."""
    block_d = max(16, _next_pow2(head_dim))
    block_p = max(2, _next_pow2(num_partitions))
    return dict(
        HEAD_DIM=head_dim,
        BLOCK_D=block_d,
        BLOCK_P=block_p,
        USE_SINKS=sinks,
        num_warps=8 if block_p * block_d > 4096 else 4,
    )


def prefill_config(
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    window: int | None,
    softcap: float | None,
    spans: bool = False,
    sinks: bool = False,
) -> dict:
    """The prefill kernel's constexprs and launch options for a layer's shape (`spans`: the
    variant with images' both-ways spans, compiled only for batches that have images; `sinks`:
    with attention sinks)."""
    return dict(
        GROUP=num_heads // num_kv_heads,
        HEAD_DIM=head_dim,
        BLOCK_D=max(16, _next_pow2(head_dim)),
        BLOCK_M=64 if head_dim <= 128 else 32,
        BLOCK_N=64 if head_dim <= 64 else 32,
        USE_SOFTCAP=bool(softcap),
        USE_WINDOW=bool(window),
        USE_SPANS=spans,
        USE_SINKS=sinks,
        DOT_F32=_interpreted(),
        num_warps=4 if head_dim <= 128 else 8,
    )


def _check(q: torch.Tensor, k_cache: torch.Tensor) -> tuple[int, int, int]:
    assert triton is not None, "triton is not installed"
    _, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[1]
    assert k_cache.shape[2] == head_dim and num_heads % num_kv_heads == 0
    assert q.stride(2) == 1 and k_cache.is_contiguous()
    return num_heads, num_kv_heads, head_dim


def _check_sinks(sinks: torch.Tensor | None, num_heads: int) -> None:
    if sinks is not None:
        assert sinks.dtype == torch.float32 and sinks.shape == (num_heads,), sinks
        assert sinks.is_contiguous()


def _sinks_arg(sinks: torch.Tensor | None, unread: torch.Tensor) -> torch.Tensor:
    """The kernels' sinks pointer: without sinks any tensor (the kernel never reads it)."""
    return sinks if sinks is not None else unread


def _without_sinks(config: dict) -> dict:
    """decode_config's constexprs for split-K's stage 1, which takes no USE_SINKS."""
    return {k: v for k, v in config.items() if k != "USE_SINKS"}


# The split-K heuristic's knobs (to tune on the H200: docs/gpu.md).
MIN_PARTITION_TOKENS = 256  # shorter partitions cost more in launch and merge than they save
MAX_PARTITIONS = 64
PROGRAMS_PER_SM = 2  # a second resident program per SM hides the other's load latency


@functools.cache
def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; 0 elsewhere (the interpreter has none to
    fill, so decode there never splits unless a caller asks)."""
    if device.type != "cuda":
        return 0
    return torch.cuda.get_device_properties(device).multi_processor_count


def partition_unit(block_size: int, head_dim: int) -> int:
    """A partition's length granule in tokens: whole KV blocks and whole BLOCK_N tiles."""
    block_n = decode_config(1, 1, head_dim, None, None)["BLOCK_N"]
    return math.lcm(block_size, block_n)


def decode_partitions(
    batch: int,
    num_kv_heads: int,
    max_blocks: int,
    block_size: int,
    head_dim: int,
    window: int | None,
    sms: int,
) -> int:
    """How many partitions split-K decode cuts each row's keys into (1: the one-pass kernel).

    Only host ints known when a CUDA graph is captured: the batch (the graph's bucket, padding
    rows included) and the block table's width (max blocks per sequence of the graph's static
    buffers), never the step's context lengths. A captured graph replays the grid and scratch
    sizes it was captured with, so a count read from the data would be frozen at its capture
    value anyway, and reading it would cost a device-to-host sync per step. Rows shorter than
    the table's width get shorter partitions (each row's range is cut into the same count),
    so a bucket's count fits every step it replays.

    One-pass when the batch's programs (one per row and KV head) already fill the SMs, or when
    the longest attended span (the table's width, or the window for a sliding-window layer)
    has fewer than two partitions of MIN_PARTITION_TOKENS. Otherwise enough partitions for
    PROGRAMS_PER_SM programs per SM, each at least MIN_PARTITION_TOKENS long."""
    programs = batch * num_kv_heads
    if sms <= 0 or programs >= sms:
        return 1
    span = max_blocks * block_size
    if window:
        span = min(span, window + partition_unit(block_size, head_dim))
    wanted = -(-PROGRAMS_PER_SM * sms // programs)
    return max(1, min(wanted, span // MIN_PARTITION_TOKENS, MAX_PARTITIONS))


def paged_decode(
    q: torch.Tensor,  # [S, H, D]: one query row per sequence, at position context_len - 1
    k_cache: torch.Tensor,  # [num_slots, Hkv, D]
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [S, max_blocks] int32
    context_lens: torch.Tensor,  # [S] int32: keys each row sees (0: a padding row, gets zeros)
    block_size: int,
    scale: float,
    window: int | None = None,
    softcap: float | None = None,
    num_partitions: int | None = None,  # None: decode_partitions' choice; 1: one pass
    sinks: torch.Tensor | None = None,  # [H] float32: each query head's sink logit
) -> torch.Tensor:  # [S, H, D] in the cache dtype
    num_heads, num_kv_heads, head_dim = _check(q, k_cache)
    _check_sinks(sinks, num_heads)
    q = q.to(k_cache.dtype)
    out = torch.empty_like(q)
    if num_partitions is None:
        num_partitions = decode_partitions(
            q.shape[0],
            num_kv_heads,
            block_tables.shape[1],
            block_size,
            head_dim,
            window,
            sm_count(q.device),
        )
    assert num_partitions >= 1, num_partitions
    config = decode_config(num_heads, num_kv_heads, head_dim, window, softcap, sinks is not None)
    if num_partitions > 1:
        _split_decode(
            q,
            k_cache,
            v_cache,
            block_tables,
            context_lens,
            out,
            block_size,
            scale,
            window,
            softcap,
            num_partitions,
            config,
            sinks,
        )
        return out
    grid = (q.shape[0], num_kv_heads)
    _decode_kernel[grid](
        q,
        k_cache,
        v_cache,
        block_tables,
        context_lens,
        _sinks_arg(sinks, context_lens),
        out,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        block_tables.stride(0),
        out.stride(0),
        out.stride(1),
        scale,
        float(softcap or 0.0),
        int(window or 0),
        block_size,
        **config,
    )
    return out


def _split_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    out: torch.Tensor,
    block_size: int,
    scale: float,
    window: int | None,
    softcap: float | None,
    num_partitions: int,
    config: dict,
    sinks: torch.Tensor | None = None,
) -> None:
    """Split-K (flash-decoding): stage 1 over (row, KV head, partition) into fp32 scratch,
    stage 2 merges each query head's partitions by their log-sum-exp (and the sinks) into
    `out`. The scratch comes from torch.empty per call: under CUDA graph capture, from the
    graph's pool."""
    part_out, part_lse = _decode_partials(
        q,
        k_cache,
        v_cache,
        block_tables,
        context_lens,
        block_size,
        scale,
        window,
        softcap,
        num_partitions,
        config,
    )
    _merge_partials(part_out, part_lse, out, sinks)


def _decode_partials(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    block_size: int,
    scale: float,
    window: int | None,
    softcap: float | None,
    num_partitions: int,
    config: dict,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stage 1: each partition's normalised output [S, H, P, D] and log-sum-exp [S, H, P]
    (fp32; an empty partition: zeros and -1e30). Without the sinks: they join in stage 2."""
    rows, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[1]
    part_out = torch.empty(
        rows, num_heads, num_partitions, head_dim, dtype=torch.float32, device=q.device
    )
    part_lse = torch.empty(rows, num_heads, num_partitions, dtype=torch.float32, device=q.device)
    _decode_split_kernel[(rows, num_kv_heads, num_partitions)](
        q,
        k_cache,
        v_cache,
        block_tables,
        context_lens,
        part_out,
        part_lse,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        block_tables.stride(0),
        part_out.stride(0),
        part_out.stride(1),
        part_out.stride(2),
        part_lse.stride(0),
        part_lse.stride(1),
        scale,
        float(softcap or 0.0),
        int(window or 0),
        block_size,
        num_partitions,
        partition_unit(block_size, head_dim),
        **_without_sinks(config),  # the partitions have none: they join in the merge
    )
    return part_out, part_lse


def _merge_partials(
    part_out: torch.Tensor,
    part_lse: torch.Tensor,
    out: torch.Tensor,
    sinks: torch.Tensor | None = None,
) -> None:
    """Stage 2: out[s, h] = the partitions' outputs weighted by exp(lse - max lse), the head's
    sink (if any) one more weight without a value."""
    rows, num_heads, num_partitions, head_dim = part_out.shape
    _decode_reduce_kernel[(rows, num_heads)](
        part_out,
        part_lse,
        _sinks_arg(sinks, part_lse),
        out,
        part_out.stride(0),
        part_out.stride(1),
        part_out.stride(2),
        part_lse.stride(0),
        part_lse.stride(1),
        out.stride(0),
        out.stride(1),
        num_partitions,
        **reduce_config(head_dim, num_partitions, sinks is not None),
    )


def paged_prefill(
    q: torch.Tensor,  # [T, H, D]: every sequence's query rows, in sequence order
    k_cache: torch.Tensor,  # [num_slots, Hkv, D]
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [S, max_blocks] int32
    query_start: torch.Tensor,  # [S + 1] int32: sequence i's rows are q[start[i]:start[i+1]]
    context_lens: torch.Tensor,  # [S] int32: cached + new keys of each sequence
    max_query_len: int,
    block_size: int,
    scale: float,
    window: int | None = None,
    softcap: float | None = None,
    # [T] int32 each: every query row's image span [start, end) of positions, (0, 0) for a row
    # outside any image; None: no images in the batch (plain causal)
    spans: tuple[torch.Tensor, torch.Tensor] | None = None,
    sinks: torch.Tensor | None = None,  # [H] float32: each query head's sink logit
) -> torch.Tensor:  # [T, H, D] in the cache dtype
    num_heads, num_kv_heads, head_dim = _check(q, k_cache)
    _check_sinks(sinks, num_heads)
    q = q.to(k_cache.dtype)
    out = torch.empty_like(q)
    config = prefill_config(
        num_heads, num_kv_heads, head_dim, window, softcap, spans is not None, sinks is not None
    )
    span_start, span_end = spans if spans is not None else (context_lens, context_lens)
    grid = (context_lens.shape[0], triton.cdiv(max_query_len, config["BLOCK_M"]), num_heads)
    _prefill_kernel[grid](
        q,
        k_cache,
        v_cache,
        block_tables,
        query_start,
        context_lens,
        span_start,
        span_end,
        _sinks_arg(sinks, context_lens),
        out,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        block_tables.stride(0),
        out.stride(0),
        out.stride(1),
        scale,
        float(softcap or 0.0),
        int(window or 0),
        block_size,
        **config,
    )
    return out


def compile_for_cuda(
    arch: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    window: int | None,
    softcap: float | None,
    dtype: str = "bf16",
    sinks: bool = False,
) -> dict[str, int]:
    """Compile every kernel (decode one pass, split-K's two stages at MAX_PARTITIONS, prefill
    without and with image spans; `sinks`: their attention-sink variants) for a CUDA target (e.g. arch 90: H100/H200) without a GPU, through triton's bundled ptxas,
    as the launchers would for this layer shape. Catches what the interpreter does not check
    (globals, tile shapes, shared memory). Returns each kernel's shared memory in bytes. Needs a
    process without TRITON_INTERPRET."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    types = {"scale": "fp32", "softcap": "fp32"}
    for name in ("q_ptr", "k_ptr", "v_ptr", "out_ptr"):
        types[name] = f"*{dtype}"
    for name in ("bt_ptr", "lens_ptr", "qstart_ptr", "span_start_ptr", "span_end_ptr"):
        types[name] = "*i32"
    for name in ("part_out_ptr", "part_lse_ptr", "sinks_ptr"):
        types[name] = "*fp32"
    decode = decode_config(num_heads, num_kv_heads, head_dim, window, softcap, sinks)
    prefill = functools.partial(
        prefill_config, num_heads, num_kv_heads, head_dim, window, softcap, sinks=sinks
    )
    reduce = reduce_config(head_dim, MAX_PARTITIONS, sinks)
    shared = {}
    for name, kernel, config in (
        ("_decode_kernel", _decode_kernel, decode),
        ("_decode_split_kernel", _decode_split_kernel, _without_sinks(decode)),
        ("_decode_reduce_kernel", _decode_reduce_kernel, reduce),
        ("_prefill_kernel", _prefill_kernel, prefill()),
        ("_prefill_kernel_spans", _prefill_kernel, prefill(spans=True)),
    ):
        config = dict(config, DOT_F32=False) if "DOT_F32" in config else dict(config)
        num_warps = config.pop("num_warps")
        signature = {
            a: "constexpr" if a in config else types.get(a, "i32") for a in kernel.arg_names
        }
        source = ASTSource(kernel, signature, config)
        compiled = triton.compile(
            source, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps}
        )
        assert "cubin" in compiled.asm
        shared[name] = compiled.metadata.shared
    return shared
