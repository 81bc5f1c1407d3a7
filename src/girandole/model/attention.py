"""Paged attention over a flat KV cache, for one flattened batch of many sequences.

Every `Attention` layer reads the forward's context (girandole.model.context), which the
ModelRunner sets for the duration of a forward pass. Without a context (a model run on its own,
as in the reference tests) a layer does plain causal attention over the tokens it is given,
treated as one sequence starting at position 0.

KV cache layout, per layer: `k_cache`, `v_cache` of shape [num_slots, num_kv_heads, head_dim]
where num_slots = num_blocks * block_size; a token's slot is block_id * block_size + offset.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from girandole.model.context import (
    ForwardContext,
    PaddedDecode,
    PagedTables,
    get_context,
    get_images,
)
from girandole.model.kernels import paged_attention

# torch's CPU SDPA kernel computes a query block of fewer than 4 rows along another path whose
# rounding differs; padding every sequence's (folded) query rows to this many keeps each row's
# result the same whether it is computed in decode or inside a prefill chunk of any size.
MIN_FOLDED_ROWS = 4


def _window_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """Causal (and optionally sliding-window) mask: [len(q_pos), len(k_pos)] bool, True = attend."""
    diff = q_pos[:, None] - k_pos[None, :]
    mask = diff >= 0
    if window is not None:
        mask &= diff < window
    return mask


def _block_mask(
    q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None, spans: list[tuple[int, int]]
) -> torch.Tensor:
    """Gemma 3's mask with images (transformers' create_masks_for_vision_model): causal, or
    both tokens in the same image's span; then within the sliding window, if any."""
    diff = q_pos[:, None] - k_pos[None, :]
    mask = diff >= 0
    for start, end in spans:
        q_in = (q_pos >= start) & (q_pos < end)
        k_in = (k_pos >= start) & (k_pos < end)
        mask |= q_in[:, None] & k_in[None, :]
    if window is not None:
        mask &= diff < window
    return mask


class Attention(nn.Module):
    """Scaled dot-product attention with grouped KV heads, reading and writing the paged cache.

    Inputs are already projected, normed and rotated: q [T, H, D], k and v [T, Hkv, D].
    Returns [T, H * D] in q's dtype. Math runs in the cache dtype (bf16 on GPU), or in fp32 for
    a CPU cache (fp32, or fp16 storage widened as it is read: bf16 SDPA is about 10x slower
    there).
    """

    def __init__(
        self,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        scale: float,
        sliding_window: int | None = None,
        logit_softcap: float | None = None,
        sinks: torch.Tensor | None = None,
    ) -> None:
        """`sinks`: gpt-oss's learned per-head logit [H], a column every query row's softmax
        also normalises over (attention to nothing); None for every other model."""
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.sliding_window = sliding_window
        self.logit_softcap = logit_softcap
        self.register_buffer("sinks", None if sinks is None else sinks.float().contiguous())
        self.k_cache: torch.Tensor | None = None  # bound by the ModelRunner
        self.v_cache: torch.Tensor | None = None
        self.kv_group = 0  # which of the forward context's groups holds this layer's slots

    @property
    def thread_invariant(self) -> bool:
        """Whether its numbers are the same at any thread count (engine/cpu_threads.py): on the
        native paged kernel; soft-capped scores or a head size it does not take run torch's
        SDPA or matmuls, which make no such promise."""
        return paged_attention.takes(self.head_dim, self.logit_softcap)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        ctx = get_context()
        images = get_images()
        spans = images.spans if images is not None and any(images.spans) else None
        if ctx is None or self.k_cache is None:
            if spans is not None:  # one sequence from position 0
                pos = torch.arange(q.shape[0], device=q.device)
                mask = _block_mask(pos, pos, self.sliding_window, spans[0])
                out = self._attend(q.float(), k.float(), v.float(), pos, pos, mask)
            else:
                out = self._attend_alone(q.float(), k.float(), v.float())
            return out.to(q.dtype).reshape(q.shape[0], -1)
        if ctx.groups is not None:
            ctx = ctx.groups[self.kv_group]
        cache_dtype = self.k_cache.dtype
        if ctx.native is not None and paged_attention.write_kv_supported(k, v, self.k_cache):
            paged_attention.write_kv(k, v, self.k_cache, self.v_cache, ctx.slot_mapping)
        else:
            # index_copy_: 2-D advanced indexing of a large cache is ~1000x slower on CPU.
            self.k_cache.index_copy_(0, ctx.slot_mapping, k.to(cache_dtype))
            self.v_cache.index_copy_(0, ctx.slot_mapping, v.to(cache_dtype))
        # a float16 cache is CPU storage only: it is read in float32 (the native kernel widens it)
        qc = q.to(torch.float32 if cache_dtype == torch.float16 else cache_dtype)
        if ctx.paged is not None:
            row_spans = None
            if spans is not None:  # images: the prefill kernel's both-ways spans, per row
                row_spans = images.row_spans(ctx.query_lens, ctx.context_lens, q.device)
            out = self._attend_paged(qc, ctx.paged, row_spans)
        elif spans is not None:
            out = self._attend_each_sequence(qc, ctx, spans)
        elif ctx.padded_decode is not None:
            out = self._attend_decode(qc, ctx.padded_decode)
        elif ctx.native is not None and paged_attention.supported(
            self.head_dim, self.k_cache, self.logit_softcap
        ):
            # Every row, decode or prefill, through one kernel that reads the cache in place.
            n = ctx.native
            out = self._native(qc, self.k_cache, self.v_cache, n.slots, n.starts, n.lens)
        else:
            out = self._attend_each_sequence(qc, ctx)
        return out.to(q.dtype).reshape(out.shape[0], -1)

    def attend_written(
        self,
        q: torch.Tensor,
        t: PagedTables,
        row_spans: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """The GPU path once this step's k and v are in the cache (model/fused_layers.py):
        q [T, H, D] in the cache's dtype -> [T, H * D] in it; `row_spans` as _attend_paged's."""
        out = self._attend_paged(q, t, row_spans)
        return out.reshape(out.shape[0], -1)

    def _attend_paged(
        self,
        q: torch.Tensor,
        t: PagedTables,
        row_spans: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """The GPU path: Triton kernels reading the cache in place through block tables.
        `row_spans`: each query row's image span (ImageBatch.row_spans), None without images."""
        from girandole.model.kernels import triton_paged_attention as kernels

        softcap = self.logit_softcap if self._scores_softcap() else None
        if t.decode_only and row_spans is None:
            return kernels.paged_decode(
                q,
                self.k_cache,
                self.v_cache,
                t.block_tables,
                t.context_lens,
                t.block_size,
                self.scale,
                self.sliding_window,
                softcap,
                sinks=self.sinks,
            )
        return kernels.paged_prefill(
            q,
            self.k_cache,
            self.v_cache,
            t.block_tables,
            t.query_start,
            t.context_lens,
            t.max_query_len,
            t.block_size,
            self.scale,
            self.sliding_window,
            softcap,
            row_spans,
            sinks=self.sinks,
        )

    def _attend_alone(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """No cache: q, k, v are one sequence from position 0, through the engine's kernels.
        With a gradient to compute (the fine-tuning trainer) torch's SDPA: the native kernel has
        no backward, so q/k/v (and their LoRA) would get no gradient."""
        grads = q.requires_grad or k.requires_grad or v.requires_grad
        differentiable = torch.is_grad_enabled() and grads
        native = paged_attention.supported(self.head_dim, k, self.logit_softcap)
        if differentiable or not native:
            return self._attend_sequence(q, k, v)
        t = q.shape[0]  # k, v as a cache of their own, slot i holding position i
        lens = torch.arange(1, t + 1)
        return self._native(
            q, k.contiguous(), v.contiguous(), torch.arange(t), torch.zeros_like(lens), lens
        )

    def _native(self, q, k_cache, v_cache, slots, starts, lens) -> torch.Tensor:
        return paged_attention.paged_attention(
            q, k_cache, v_cache, slots, starts, lens, self.sliding_window, self.scale, self.sinks
        )

    def _attend_each_sequence(
        self,
        q: torch.Tensor,
        ctx: ForwardContext,
        spans: list[list[tuple[int, int]]] | None = None,
    ) -> torch.Tensor:
        """One sequence at a time: a row's result then depends only on its own sequence, never
        on what else shares the step (batch invariance: a seeded request samples the same
        tokens alone or in a busy batch). `spans`: each sequence's image spans (bidirectional
        blocks), whose tokens are all in this step's chunk."""
        outs = []
        start = 0
        for i, (qlen, slots) in enumerate(zip(ctx.query_lens, ctx.context_slots)):
            qi = q[start : start + qlen]
            start += qlen
            slots = slots.to(q.device)  # the GPU path's are host tensors
            ki = self.k_cache.index_select(0, slots).to(q.dtype)
            vi = self.v_cache.index_select(0, slots).to(q.dtype)
            if spans is not None and spans[i]:
                k_pos = torch.arange(len(slots), device=q.device)
                q_pos = k_pos[len(slots) - qlen :]
                mask = _block_mask(q_pos, k_pos, self.sliding_window, spans[i])
                outs.append(self._attend(qi, ki, vi, q_pos, k_pos, mask))
            else:
                outs.append(self._attend_sequence(qi, ki, vi))
        return torch.cat(outs, dim=0)

    def _attend_sequence(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The last len(q) positions of one sequence whose keys are k, v [ctx, Hkv, D].

        The query heads that share a KV head are folded into the query rows ([1, Hkv, rep * qlen,
        D] against [1, Hkv, ctx, D]): SDPA then takes torch's fused CPU kernel instead of the
        generic path that GQA (enable_gqa) falls back to, about 6x faster per call. A lone
        decode row needs no mask at all.
        """
        qlen, ctx = q.shape[0], k.shape[0]
        # GPUs: GQA kernels of their own; softcap and sinks: the manual softmax
        generic = self._manual_scores() or q.device.type != "cpu"
        masked = qlen > 1 or (self.sliding_window is not None and ctx > self.sliding_window)
        if generic or masked:
            k_pos = torch.arange(ctx, device=q.device)
            q_pos = k_pos[ctx - qlen :]
        if generic:
            return self._attend(q, k, v, q_pos, k_pos)
        rep = self.num_heads // self.num_kv_heads
        rows = max(qlen, -(-MIN_FOLDED_ROWS // rep))  # pad: too few rows take another path
        if rows > qlen:  # padding rows repeat the last query, at its position
            q = torch.cat([q, q[-1:].expand(rows - qlen, -1, -1)])
        mask = None
        if masked:
            mask = _window_mask(q_pos, k_pos, self.sliding_window)
            mask = torch.cat([mask, mask[-1:].expand(rows - qlen, -1)]).repeat(rep, 1)
        # 4-D inputs: torch's fused (flash) CPU kernel takes only those.
        qf = q.transpose(0, 1).reshape(1, self.num_kv_heads, rep * rows, self.head_dim)
        kf, vf = k.transpose(0, 1)[None], v.transpose(0, 1)[None]
        out = F.scaled_dot_product_attention(qf, kf, vf, attn_mask=mask, scale=self.scale)
        return out.reshape(self.num_heads, rows, self.head_dim)[:, :qlen].transpose(0, 1)

    def _scores_softcap(self) -> bool:
        return self.logit_softcap is not None and self.logit_softcap > 0

    def _manual_scores(self) -> bool:
        """Whether the scores need _manual (SDPA has neither soft-capping nor sinks)."""
        return self._scores_softcap() or self.sinks is not None

    def _attend(
        self,
        q: torch.Tensor,  # [Tq, H, D]
        k: torch.Tensor,  # [Tk, Hkv, D]
        v: torch.Tensor,
        q_pos: torch.Tensor,  # [Tq]
        k_pos: torch.Tensor,  # [Tk]
        mask: torch.Tensor | None = None,  # [Tq, Tk] bool; None: causal (and the window)
    ) -> torch.Tensor:  # [Tq, H, D]
        if mask is None:
            mask = _window_mask(q_pos, k_pos, self.sliding_window)
        qh, kh, vh = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
        if self._manual_scores():
            out = self._manual(qh, kh, vh, mask)
        else:
            out = F.scaled_dot_product_attention(
                qh,
                kh,
                vh,
                attn_mask=mask,
                scale=self.scale,
                enable_gqa=self.num_heads != self.num_kv_heads,
            )
        return out.transpose(0, 1)

    def _attend_decode(self, q: torch.Tensor, decode: PaddedDecode) -> torch.Tensor:
        # q [S, H, D] (one token per sequence); keys gathered into [S, L, Hkv, D].
        S, L = decode.slots.shape
        flat = decode.slots.reshape(-1)
        k = self.k_cache.index_select(0, flat).view(S, L, self.num_kv_heads, self.head_dim)
        v = self.v_cache.index_select(0, flat).view(S, L, self.num_kv_heads, self.head_dim)
        k, v = k.to(q.dtype), v.to(q.dtype)
        k, v = k.transpose(1, 2), v.transpose(1, 2)  # [S, Hkv, L, D]
        mask = decode.valid
        if self.sliding_window is not None:
            k_idx = torch.arange(mask.shape[1], device=q.device)
            mask = mask & (decode.positions[:, None] - k_idx[None, :] < self.sliding_window)
        mask = mask[:, None, None, :]  # [S, 1, 1, L]
        qh = q[:, :, None, :]  # [S, H, 1, D]
        if self._manual_scores():
            out = self._manual(qh, k, v, mask)
        else:
            out = F.scaled_dot_product_attention(
                qh,
                k,
                v,
                attn_mask=mask,
                scale=self.scale,
                enable_gqa=self.num_heads != self.num_kv_heads,
            )
        return out[:, :, 0, :]  # [S, H, D]

    def _manual(self, q, k, v, mask):
        """Softmax attention with tanh soft-capping of the scores (Gemma 2 style) and/or
        attention sinks (gpt-oss: each head's sink logit joins the softmax, its weight
        dropped after, as transformers' eager_attention_forward). q [..., H, Tq, D]."""
        rep = self.num_heads // self.num_kv_heads
        if rep > 1:
            k = k.repeat_interleave(rep, dim=-3)
            v = v.repeat_interleave(rep, dim=-3)
        scores = (q @ k.transpose(-1, -2)) * self.scale
        if self._scores_softcap():
            cap = self.logit_softcap
            scores = torch.tanh(scores / cap) * cap
        scores = scores.masked_fill(~mask, float("-inf"))
        if self.sinks is None:
            return torch.softmax(scores, dim=-1) @ v
        sinks = self.sinks.to(scores.dtype).view(-1, 1, 1).expand(*scores.shape[:-1], 1)
        probs = torch.softmax(torch.cat([scores, sinks], dim=-1), dim=-1)
        return probs[..., :-1] @ v
