"""CpuDecodeGraphs: decode steps on the native CPU kernels replayed as recorded lists of calls
(the CPU's counterpart of cuda_graphs.py).

A decode step of the default model is ~350 native kernel calls. Eagerly each goes through
nn.Module calls, context lookups, dtype and shape checks, tensor allocations and ctypes argument
conversion: ~4 ms of an ~18 ms batch-1 step on a 2-core host, more than the attention and the
norms together. A graph here is the step's calls for one row count M recorded once, every
argument fixed (pointers into static buffers: the residual stream, each layer's outputs, the
rotary tables, the cache slots); a step copies its inputs (embedded tokens, rotary tables, cache
slots) into those buffers and calls the list (~1 us a call).

The calls, their order, their kernels and their inputs are the eager forward's, so a step's
numbers are bitwise the eager step's (tests/engine/test_cpu_graphs.py): the graphs change only
what a step costs. They serve decode steps (each sequence's new token, and the tokens proposed
after it when speculating; no LoRA rows) of a model whose layers are the shared blocks
(layers.py: RMSNorm, SelfAttention with native paged attention, attention sinks included,
GatedMLP with native activation, quantized linears on wq_gemm); anything else runs eagerly.
A row is a token at its position with its own slots, so a verify step's rows (several of one
sequence) fit the same graph as a decode step of as many rows.

A mixture-of-experts feed-forward (model/moe.py's SparseMoE: Qwen3-MoE, Mixtral; gpt-oss's
GptOssMoE) whose router and experts all run natively (CPU fast mode without AMX) is three
recorded calls: the router's logits, each row's top-k experts and weights, and every row's
experts in one call (kernels/moe_experts.py), which reads the ids and weights as data: which
experts run is the router's, not the recording's. That took ~0.05 ms of Python and torch
dispatch off each MoE layer of a one-token step (docs/benchmarks.md). Any other block is one
recorded call: its forward on the static input, its output copied into a static buffer (its
kernel calls depend on the routing). Either way the layer's norms, attention and residual adds
around it are recorded as a dense layer's. A block's forward reads the forward context (the
decode row count its experts' kernels choose by, router replay's routing list), so a step's
calls run inside the step's own context, as the eager forward does; a native block appends its
expert ids to router replay's list from a recorded call in the same place.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable

import torch
from torch import nn

from girandole.model import kernels
from girandole.model.attention import Attention
from girandole.model.context import ForwardContext, forward_context, get_context
from girandole.model.kernels import gated_act, moe_experts, paged_attention, rms_norm, wq_gemm
from girandole.model.layers import GatedMLP, RMSNorm, SelfAttention
from girandole.model.lora import LoRALinear
from girandole.model.moe import SparseMoE
from girandole.model.quant import ConcatLinear, PackedLinear

logger = logging.getLogger(__name__)

MAX_ROWS = 256  # steps of more rows run eagerly (their glue is a small share of them)
MAX_GRAPHS = 16  # graphs kept, the least recently used dropped first
# Context slots (all rows together) a graph's buffers hold beyond a step's when it is recorded,
# at least MIN_SLOT_CAPACITY: room to grow before re-recording.
SLOT_HEADROOM = 2048
MIN_SLOT_CAPACITY = 4096


def _base(linear: nn.Module) -> nn.Module:
    """The base linear of a LoRA-wrapped one (graphs run only steps without adapter rows)."""
    return linear.base if isinstance(linear, LoRALinear) else linear


def _native_linear(linear: nn.Module) -> bool:
    linear = _base(linear)
    return isinstance(linear, PackedLinear) and bool(linear.native_bits)


def _native_norm(norm: nn.Module | None) -> bool:
    return norm is None or (isinstance(norm, RMSNorm) and norm.fused)


def _recordable_feed_forward(mlp: nn.Module | None) -> bool:
    """A gated MLP on native kernels (recorded call by call), or a mixture of experts (one
    call: the block's forward, its experts on whatever kernels they have)."""
    if isinstance(mlp, SparseMoE):  # gpt-oss's GptOssMoE too
        return True
    return (
        isinstance(mlp, GatedMLP)
        and mlp.native_act is not None
        and all(_native_linear(x) for x in (mlp.gate_up, mlp.down))
    )


def supported(model: nn.Module) -> bool:
    """Whether every layer of `model` is made of the blocks a graph records, on native kernels."""
    if not kernels.available() or not hasattr(model, "rope_tables"):
        return False
    for layer in getattr(model, "layers", []):
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        if not isinstance(attn, SelfAttention) or not _recordable_feed_forward(mlp):
            return False
        norms = [
            layer.attn_norm,
            layer.ffn_norm,
            getattr(layer, "post_attn_norm", None),
            getattr(layer, "post_ffn_norm", None),
        ]
        if not all(_native_norm(n) for n in norms):
            return False
        if attn.qk_norm_weight is not None and not attn.fused_norm:
            return False
        a = attn.attn
        if a.k_cache is None or not paged_attention.supported(
            a.head_dim, a.k_cache, a.logit_softcap
        ):
            return False
        if not all(_native_linear(x) for x in (attn.qkv, attn.o_proj)):
            return False
    return True


def cache_key(attns: list[Attention]) -> tuple[int, ...]:
    """The identities of the layers' KV caches (unchanged: the recorded graphs point at the live
    caches; the runner binds them once, so this only guards)."""
    return tuple(id(t) for a in attns for t in (a.k_cache, a.v_cache))


class _GroupSlots:
    """One KV cache group's static inputs: where the new tokens' K/V go, and the slots, starts
    and lengths the attention kernel reads."""

    def __init__(self, rows: int, capacity: int) -> None:
        self.slot_mapping = torch.zeros(rows, dtype=torch.long)
        self.slots = torch.zeros(capacity, dtype=torch.long)
        self.starts = torch.zeros(rows, dtype=torch.long)
        self.lens = torch.ones(rows, dtype=torch.long)

    def fill(self, ctx: ForwardContext) -> None:
        n = ctx.native
        self.slot_mapping.copy_(ctx.slot_mapping)
        self.slots[: n.slots.shape[0]].copy_(n.slots)
        self.starts.copy_(n.starts)
        self.lens.copy_(n.lens)


class CpuDecodeGraph:
    """The recorded calls of a decode step of `rows` rows (slot capacity: the most context slots
    of all rows together it can read)."""

    def __init__(self, model: nn.Module, rows: int, capacity: int, num_groups: int) -> None:
        self.model = model
        self.rows = rows
        self.capacity = capacity
        self.threads = torch.get_num_threads()
        self.groups = [_GroupSlots(rows, capacity) for _ in range(num_groups)]
        self.x = torch.zeros(rows, model.layers[0].attn_norm.weight.shape[0])
        # (cos, sin) buffers, keyed by the first layer that uses that rotary table
        self.ropes: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.calls: list[tuple[Callable, tuple]] = []
        # alive while the calls point into them
        self.buffers: dict[tuple, torch.Tensor] = {}
        self._rope_index: list[int] = []  # per layer: which of `ropes`
        self._record()
        logger.debug("recorded a CPU decode graph: %d rows, %d calls", rows, len(self.calls))

    # -- recording ------------------------------------------------------------------------------

    def _buffer(self, tag: str, *shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """A static buffer for call site `tag`, shared by every layer (a layer's intermediates
        are dead once it has run): 18 layers take one layer's memory."""
        key = (tag, shape, dtype)
        if key not in self.buffers:
            self.buffers[key] = torch.empty(*shape, dtype=dtype)
        return self.buffers[key]

    def _call(self, bound: tuple[Callable, tuple]) -> None:
        self.calls.append(bound)

    def _torch(self, fn: Callable, *args) -> None:
        self.calls.append((fn, args))

    def _norm(self, norm: RMSNorm, x: torch.Tensor) -> torch.Tensor:
        out = self._buffer("norm", self.rows, 1, x.shape[1])
        w = norm.weight.view(1, -1)
        self._call(rms_norm.bind(x, w, norm.eps, None, out, threads=self.threads))
        return out.view(self.rows, -1)

    def _linear(self, linear: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """x: float32 or bf16 [M, K]; returns float32 [M, N] as PackedLinear.forward does."""
        linear = _base(linear)
        if x.dtype != torch.bfloat16:
            xb = self._buffer("bf16", self.rows, x.shape[1], dtype=torch.bfloat16)
            self._torch(xb.copy_, x)
            x = xb
        y = self._buffer("linear", self.rows, linear.out_features)
        # a ConcatLinear's parts each write their columns of y
        parts = linear.columns() if isinstance(linear, ConcatLinear) else [(linear, 0, None)]
        for part, start, stop in parts:
            self._call(
                wq_gemm.bind(
                    x,
                    part.native_packed,
                    part.native_params,
                    part.native_bits,
                    y[:, start:stop],
                    threads=self.threads,
                )
            )
        if linear.bias is not None:
            self._torch(y.add_, linear.bias)
        return y

    def _attention(self, attn: SelfAttention, x: torch.Tensor, rope) -> torch.Tensor:
        m = self.rows
        h, hkv, d = attn.num_heads, attn.num_kv_heads, attn.head_dim
        qkv = self._linear(attn.qkv, x)
        qk = self._buffer("qk", m, h + hkv, d)
        weight = attn.qk_norm_weight  # None: rotary alone (the kernel copies, then rotates)
        self._call(
            rms_norm.bind(
                qkv[:, : (h + hkv) * d], weight, attn.eps, rope, qk, heads=h + hkv,
                threads=self.threads,
            )
        )  # fmt: skip
        a: Attention = attn.attn
        g = self.groups[a.kv_group]
        v = qkv[:, (h + hkv) * d :].view(m, hkv, d)
        self._call(
            paged_attention.bind_write_kv(qk[:, h:], v, a.k_cache, a.v_cache, g.slot_mapping)
        )
        q = qk[:, :h]
        if not q.is_contiguous():
            q_buf = self._buffer("q", m, h, d)
            self._torch(q_buf.copy_, q)
            q = q_buf
        out = self._buffer("attention", m, h, d)
        self._call(
            paged_attention.bind(
                q, a.k_cache, a.v_cache, g.slots, g.starts, g.lens, a.sliding_window, a.scale,
                out, threads=self.threads, sinks=a.sinks,
            )
        )  # fmt: skip
        return self._linear(attn.o_proj, out.view(m, h * d))

    def _mlp(self, mlp: GatedMLP, x: torch.Tensor) -> torch.Tensor:
        gu = self._linear(mlp.gate_up, x)
        act = self._buffer("act", self.rows, gu.shape[1] // 2, dtype=torch.bfloat16)
        self._call(gated_act.bind(gu, mlp.native_act, act, threads=self.threads))
        return self._linear(mlp.down, act)

    def _moe(self, moe: SparseMoE, x: torch.Tensor) -> torch.Tensor:
        """A block whose router and experts are all native (CPU fast mode without AMX:
        SparseMoE's own route, moe_experts' tables): three native calls on static buffers, the
        router's logits, each row's top-k and weights, every row's experts; the experts a row
        takes are data the last call reads, not part of the recording. Any other block is one
        call of its forward on the static input, into a static output (its kernel calls
        depend on the routing); that forward reads the step's forward context, which `run`
        sets as the eager step does (decode rows, the routing list of router replay)."""
        out = self._buffer("moe", self.rows, x.shape[1])
        tables = moe.native_experts()
        native = type(moe).route is SparseMoE.route and moe._native_router(x) and tables
        if not native:
            self._torch(_run_block, moe.forward, x, out)
            return out
        m, k = self.rows, moe.top_k
        for j, table in enumerate(tables):  # the experts call reads them: keep them alive
            self.buffers[("experts", id(moe), j)] = table
        logits = self._buffer("router", m, moe.num_experts)
        self._call(moe_experts.bind_router(x, moe.router, logits, threads=self.threads))
        # each layer its own ids: router replay appends them after the layer has run
        ids = self._buffer(f"expert_ids{id(moe)}", m, k, dtype=torch.int64)
        weights = self._buffer("expert_weights", m, k)
        self._call(moe_experts.bind_route(logits, k, moe.norm_topk_prob, ids, weights))
        self._torch(_append_routing, ids)
        xb = self._buffer("bf16", m, x.shape[1], dtype=torch.bfloat16)
        self._torch(xb.copy_, x)
        expert = moe.experts[0]
        self._call(
            moe_experts.bind_experts(
                xb, ids, weights, *tables, expert.intermediate, expert.native_act, out,
                threads=self.threads,
            )
        )  # fmt: skip
        return out

    def _record(self) -> None:
        x, m = self.x, self.rows
        d_rope = [layer.self_attn.head_dim // 2 for layer in self.model.layers]
        # One static (cos, sin) per distinct eager table (Gemma: local and global).
        probe = self.model.rope_tables(torch.zeros(1, dtype=torch.long))
        for layer_idx, table in enumerate(probe):
            key = next((k for k, t in enumerate(probe[:layer_idx]) if t is table), layer_idx)
            if key not in self.ropes:
                shape = (m, d_rope[layer_idx])
                self.ropes[key] = (
                    self._buffer(f"cos{key}", *shape),
                    self._buffer(f"sin{key}", *shape),
                )
            self._rope_index.append(key)
        for layer, key in zip(self.model.layers, self._rope_index):
            t = self._attention(layer.self_attn, self._norm(layer.attn_norm, x), self.ropes[key])
            post = getattr(layer, "post_attn_norm", None)
            self._torch(x.add_, self._norm(post, t) if post is not None else t)
            mlp, h = layer.mlp, self._norm(layer.ffn_norm, x)
            t = self._moe(mlp, h) if isinstance(mlp, SparseMoE) else self._mlp(mlp, h)
            post = getattr(layer, "post_ffn_norm", None)
            self._torch(x.add_, self._norm(post, t) if post is not None else t)

    # -- a step ---------------------------------------------------------------------------------

    def run(self, ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """The hidden states [M, H] (this graph's buffer: valid until its next run)."""
        self.x.copy_(self.model.embed_tokens(ids))
        tables = self.model.rope_tables(positions)
        for key, (cos, sin) in self.ropes.items():
            cos.copy_(tables[key][0])
            sin.copy_(tables[key][1])
        for group, gctx in zip(self.groups, ctx.groups or [ctx]):
            group.fill(gctx)
        # the eager step's context: a mixture-of-experts call reads it (the kernel calls do not)
        with forward_context(ctx):
            for fn, args in self.calls:
                fn(*args)
        return self.x


def _run_block(
    forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, out: torch.Tensor
) -> None:
    """A recorded block's call: its forward on x, the result into the static `out`."""
    out.copy_(forward(x))


def _append_routing(ids: torch.Tensor) -> None:
    """A recorded native block's expert ids [M, k], appended to the step's routing list where
    router replay asks for it (as SparseMoE.forward appends them)."""
    ctx = get_context()
    if ctx is not None and ctx.routing is not None:
        ctx.routing.append(ids.clone())


class CpuDecodeGraphs:
    """The graphs of the (row count, thread count) pairs recently seen, recorded on first use."""

    def __init__(self, model: nn.Module, num_groups: int) -> None:
        self.model = model
        self.num_groups = num_groups
        self.attns = [layer.self_attn.attn for layer in model.layers]
        self.key = cache_key(self.attns)  # the caches the graphs were recorded with
        self.graphs: OrderedDict[tuple[int, int], CpuDecodeGraph] = OrderedDict()

    @classmethod
    def build(cls, model: nn.Module, num_groups: int) -> CpuDecodeGraphs | None:
        """The graphs of `model`, or None where its layers are not all recordable."""
        return cls(model, num_groups) if supported(model) else None

    def can_run(self, ids: torch.Tensor, ctx: ForwardContext) -> bool:
        groups = ctx.groups or [ctx]
        return (
            0 < ids.shape[0] <= MAX_ROWS
            and ctx.lora is None
            # every row a decode token, or a token proposed after one (speculation's verify
            # step): the rows of such steps stay few; prompt chunks run eagerly
            and ctx.num_decode_rows == ids.shape[0]
            and all(g.native is not None for g in groups)
        )

    def run(self, ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        m = ids.shape[0]
        need = max(g.native.slots.shape[0] for g in ctx.groups or [ctx])
        key = cache_key(self.attns)
        if key != self.key:  # the caches were bound anew: every graph points at the old ones
            self.graphs.clear()
            self.key = key
        # kept per thread count too: the recorded kernel calls carry it, and the engine's count
        # follows the machine's load (engine/cpu_threads.py), back and forth
        shape = (m, torch.get_num_threads())
        graph = self.graphs.get(shape)
        if graph is None or graph.capacity < need:
            capacity = max(need + SLOT_HEADROOM, MIN_SLOT_CAPACITY)
            graph = CpuDecodeGraph(self.model, m, capacity, self.num_groups)
            self.graphs[shape] = graph
            while len(self.graphs) > MAX_GRAPHS:
                self.graphs.popitem(last=False)
        self.graphs.move_to_end(shape)
        return graph.run(ids, positions, ctx)
