"""Mixture-of-experts feed-forward block (Qwen3-MoE, Mixtral): a router picks each token's top-k
experts, each a gated MLP; the token's output is their outputs weighted by the router.

Routing, as transformers computes it: router logits in float32 (x @ W_router.T), softmax over
all experts, top-k, and the k weights renormalised to sum to 1 where `norm_topk_prob`
(Qwen3-MoE's setting; Mixtral always renormalises its top-2). In CPU fast mode all of it runs on
native kernels (kernels/moe_experts.router_logits and route: their sums and exponentials round
otherwise than torch's GEMM and softmax, by a few units in the last place), which the recorded
decode steps call as well (engine/cpu_graphs.py).

Dispatch on the CPU path, for the engine's flattened batches (decode rows and prompt chunks of
many sequences in one [T, hidden] tensor): the T x k (token, expert) pairs are sorted by expert,
each active expert runs once on its rows (one gate/up and one down matmul, the same linears as a
dense layer's, quantized in fast mode), and each expert's weighted rows are added back to their
tokens (index_add_, expert by expert: each token's sum in expert order). No per-token Python
loop; the only loop is over the experts a batch activates. The engine's steps put decode tokens
first and tell the linears how many (`num_decode_rows`: fast mode's decode rows take another
kernel); sorting keeps each expert's decode rows first, and each expert runs with its own count
of them, so a token's kernel follows its role, never which other tokens share its expert (batch
invariance, as for a dense layer). A lone token (a sequence decoding alone) skips the sort and
the gathers: its k experts run in ascending order on its row, their weighted outputs added to
zeros, the same calls and sums. Experts of native packed linears (fast mode) are called on
their kernels directly, without the module calls around them: at one row, that glue cost about
as much as the kernels (benchmarks: docs/benchmarks.md, "Mixture-of-experts"). And every row of
theirs, decode or prompt, takes the decode rows' kernel (the int8 one in the VNNI layout): a
short prompt gives an expert a few rows (64 tokens, 128 experts, top-8: ~4), for which the bf16
prompt kernel dequantizes the expert's whole weight; the int8 kernel was faster at every row
count an expert got in a prompt chunk (docs/benchmarks.md, "prompt rows on the int8 kernel"),
and no row's kernel depends on the step's roles or counts at all. Experts on other kernels
(torch's packed forms, biased ones such as gpt-oss's) keep the per-expert decode counts above.

Where every expert is stored in the VNNI layout (CPU fast mode without AMX), the whole dispatch
above is one native call instead (kernels/moe_experts.py, csrc/moe.c): one OpenMP region for
the step's (token, expert) pairs, every row on the int8 kernel, the same floats bitwise (the
same kernel per row, the same sums in expert order); no Python per expert, and no region per
product (a step at 8 concurrent requests made ~390 of them).

On the GPU path (a forward context with paged tables, `ForwardContext.paged`) the experts run
in the fused Triton kernel (kernels/triton_moe.py, vLLM's fused_moe): the ModelRunner stacks a
layer's expert weights once at load (`stack_experts`: [E, 2I, H] gate/up and [E, H, I] down, each
expert's linear then a view of its slice, so one copy), and a forward is the router plus two
grouped-GEMM launches with no host sync, which a CUDA decode graph captures. Experts that are not
dense linears of one dtype (CPU fast mode's packed ones) or an activation the kernel lacks keep
the torch dispatch above, which brings the expert counts to the host once a layer.

Router replay: where the forward context asks for it (`ForwardContext.routing`), each MoE layer
appends its [T, k] chosen expert ids (engine/runner.py hands them to the sequences that asked for
`include_routing_matrix`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from girandole.model import kernels
from girandole.model.context import get_context
from girandole.model.kernels import gated_act, moe_experts
from girandole.model.layers import Builder, DenseLinear, GatedMLP
from girandole.model.quant import PackedLinear, dense_linear


def expert_prefix(layer: int, expert: int) -> str:
    """GGUF-style name prefix of one expert's projections: `blk.{layer}.exp.{expert}`
    (its `.ffn_gate`, `.ffn_up` and `.ffn_down` weights)."""
    return f"blk.{layer}.exp.{expert}"


@dataclass
class StackedExperts:
    """A layer's expert weights stacked for the fused kernel: gate_up [E, 2I, H] (each expert's
    gate rows, then its up rows), down [E, H, I], their biases [E, 2I] / [E, H] or None; the
    activation's name in triton_moe.ACTIVATIONS and its parameters."""

    gate_up: torch.Tensor
    down: torch.Tensor
    gate_up_bias: torch.Tensor | None
    down_bias: torch.Tensor | None
    act: str
    alpha: float = 1.0
    limit: float = float("inf")

    def __call__(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        from girandole.model.kernels import triton_moe  # only the GPU path imports triton

        return triton_moe.fused_moe(
            x,
            self.gate_up,
            self.down,
            ids,
            weights,
            act=self.act,
            gate_up_bias=self.gate_up_bias,
            down_bias=self.down_bias,
            alpha=self.alpha,
            limit=self.limit,
        )


def _stack(linears: list[DenseLinear], name: str) -> torch.Tensor | None:
    """The linears' `name` tensors stacked, each linear's then a view of its slice (one copy)."""
    parts = [getattr(lin, name) for lin in linears]
    if parts[0] is None:
        return None
    stacked = torch.stack([p.data for p in parts])
    for lin, view in zip(linears, stacked):
        setattr(lin, name, nn.Parameter(view, requires_grad=False))
    return stacked


def stack_experts(model: nn.Module) -> bool:
    """Stack every MoE layer's experts for the fused kernel (the GPU path, once at load).
    Whether every MoE layer now runs fused (True for a model without one)."""
    layers = [m for m in model.modules() if isinstance(m, SparseMoE)]
    fused = all([m.stack_experts() for m in layers])
    if hasattr(model, "_fusable"):  # fused_layers' cached verdict reads the stacking
        del model._fusable
    return fused


class SparseMoE(nn.Module):
    """forward(x [T, hidden] float32) -> [T, hidden] float32."""

    def __init__(
        self,
        b: Builder,
        layer: int,
        num_experts: int,
        top_k: int,
        intermediate: int,
        act: str,
        norm_topk_prob: bool,
    ) -> None:
        super().__init__()
        # The router stays float32 in every mode: a rounding change there changes which experts
        # run, not just the last bits of the output.
        router = b.tensor(f"blk.{layer}.ffn_gate_inp.weight").float()
        self.router = nn.Parameter(router, requires_grad=False)  # [E, hidden]
        self.experts = nn.ModuleList(
            GatedMLP(b, expert_prefix(layer, e), intermediate, act) for e in range(num_experts)
        )
        self.num_experts = num_experts
        self.top_k = top_k
        self.norm_topk_prob = norm_topk_prob
        self.stacked: StackedExperts | None = None  # set by stack_experts (the GPU path)
        # moe_experts' weight tables (gate_up, down), or False where it cannot run them: decided
        # at the first CPU forward (native_experts).
        self._native_tables: tuple[torch.Tensor, torch.Tensor] | bool | None = None
        self._native_at = 0  # _first_packed() when the tables were made

    def fused_activation(self) -> dict | None:
        """The experts' activation as the fused kernel names it, with its parameters; None
        where the kernel has none of it."""
        from girandole.model.kernels.triton_moe import ACTIVATIONS

        act = self.experts[0].act_name
        return {"act": act} if act in ACTIVATIONS else None

    def stack_experts(self) -> bool:
        """Stack the experts' weights for the fused kernel (StackedExperts), where every expert
        is a dense linear pair of one dtype with an activation the kernel has; whether it did.
        Each expert's linears keep working, on views of the stacked weights."""
        if self.stacked is not None:
            return True
        act = self.fused_activation()
        gate_up = [e.gate_up for e in self.experts]
        down = [e.down for e in self.experts]
        linears = gate_up + down
        if act is None or not all(type(lin) is DenseLinear for lin in linears):
            return False
        if len({lin.weight.dtype for lin in linears}) != 1:
            return False
        if (
            len({lin.bias is None for lin in gate_up}) != 1
            or len({lin.bias is None for lin in down}) != 1
        ):
            return False
        self.stacked = StackedExperts(
            gate_up=_stack(gate_up, "weight"),
            down=_stack(down, "weight"),
            gate_up_bias=_stack(gate_up, "bias"),
            down_bias=_stack(down, "bias"),
            **act,
        )
        return True

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each token's top-k expert ids [T, k] long and their weights [T, k] float32."""
        if self._native_router(x):  # CPU fast mode: native kernels, row-invariant
            logits = moe_experts.router_logits(x, self.router)
            return moe_experts.route(logits, self.top_k, self.norm_topk_prob)
        # dense_linear: a lone token (a sequence decoding alone) takes the matrix-vector kernel
        # in F.linear, whose sums round otherwise than among other tokens.
        logits = dense_linear(x.float(), self.router)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        weights, ids = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return ids, weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids, weights = self.route(x)
        ctx = get_context()
        if ctx is not None and ctx.routing is not None:
            ctx.routing.append(ids)
        if self.stacked is not None and ctx is not None and ctx.paged is not None:
            return self.stacked(x, ids, weights)  # the GPU path: no host sync
        decode = None if ctx is None else ctx.num_decode_rows
        if isinstance(self.experts[0].gate_up, PackedLinear):
            x = x.to(torch.bfloat16)  # what the packed linears cast to: half the rows' bytes
        tables = self.native_experts() if x.device.type == "cpu" else None
        if tables:  # every expert's products in one native call
            expert = self.experts[0]
            return moe_experts.moe_experts(
                x, ids, weights, *tables, expert.intermediate, expert.native_act
            )
        if x.shape[0] == 1:  # one token (a sequence decoding alone): its k experts in order
            return self._one_token(x, ids[0], weights[0], ctx, decode)
        flat = ids.flatten()  # [T * k]: pair j is token j // k's (j % k)-th choice
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=self.num_experts)
        if decode is None:
            per_expert = [(n, None) for n in counts.tolist()]
        else:  # each expert's decode rows: its pairs from the first `decode` tokens
            first = torch.bincount(flat[: decode * self.top_k], minlength=self.num_experts)
            per_expert = list(zip(*torch.stack([counts, first]).tolist()))
        tokens = order // self.top_k
        rows = x.index_select(0, tokens)  # [T * k, hidden], grouped by expert
        pair_weights = weights.flatten().index_select(0, order)[:, None]
        # Each expert's weighted rows are added to their tokens as they come, in expert order
        # (the order of one index_add_ over the sorted pairs): no [T * k, hidden] concatenation
        # and product, whose fresh pages cost more than the adds in a long prompt.
        y = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        start = 0
        try:
            for e, (n, d) in enumerate(per_expert):
                if n:
                    if ctx is not None:
                        ctx.num_decode_rows = d
                    part = slice(start, start + n)
                    out = self._expert(e, rows[part]).float()
                    y.index_add_(0, tokens[part], out.mul_(pair_weights[part]))
                    start += n
        finally:
            if ctx is not None:
                ctx.num_decode_rows = decode
        return y

    @property
    def thread_invariant(self) -> bool:
        """Whether the router's logits are the same at any thread count (engine/cpu_threads.py):
        on the native kernel, not dense_linear's torch matmul (the experts answer for
        themselves)."""
        return self._native_router(self.router)

    def _native_router(self, x: torch.Tensor) -> bool:
        """Whether the router's logits take the native kernel: where the experts are native
        packed linears (CPU fast mode), for whose one-token steps F.linear over the padded rows
        cost more than reading the router's weights. Other modes keep transformers' F.linear."""
        return (
            _native(self.experts[0].gate_up)
            and moe_experts.router_supported(x, self.router)
            and self.top_k <= min(self.num_experts, moe_experts.MAX_TOP_K)
        )

    def native_experts(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """moe_experts' weight tables of the experts (gate_up, down), where it can run them:
        native packed linears in the VNNI layout (CPU fast mode without AMX), an activation of
        gated_act's. Decided once, and again should the experts' buffers move (the tables hold
        their addresses: a module moved, or unpickled after a forward, must not be read there)."""
        tables = self._native_tables
        if tables and self._native_at != self._first_packed():
            self._native_tables = None
        if self._native_tables is None:
            expert = self.experts[0]
            hidden = self.router.shape[1]
            tables = None
            if moe_experts.supported(hidden, expert.intermediate, expert.native_act, self.top_k):
                gate_up = moe_experts.weight_table([e.gate_up for e in self.experts])
                down = moe_experts.weight_table([e.down for e in self.experts])
                if gate_up is not None and down is not None:
                    tables = (gate_up, down)
            self._native_tables = tables or False
            self._native_at = self._first_packed()
        return self._native_tables or None

    def _first_packed(self) -> int:
        """Where the first expert's packed gate_up weight is (0 without one)."""
        packed = getattr(self.experts[0].gate_up, "native_packed", None)
        return 0 if packed is None else packed.data_ptr()

    def _one_token(
        self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, ctx, decode: int | None
    ) -> torch.Tensor:
        """forward for one token x [1, hidden]: the batched dispatch's calls and sums (its
        experts in ascending order, each on the token's row, weighted and added to zeros)
        without its sort, counts, gathers and scatters, which cost as much as the experts'
        one-row kernels. ids, weights: the token's k choices [k]."""
        picks = ids.tolist()
        y = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        try:
            if ctx is not None and decode is not None:
                ctx.num_decode_rows = min(decode, 1)
            for j in sorted(range(self.top_k), key=picks.__getitem__):
                y.add_(self._expert(picks[j], x).float().mul_(weights[j]))
        finally:
            if ctx is not None:
                ctx.num_decode_rows = decode
        return y

    def _expert(self, e: int, rows: torch.Tensor) -> torch.Tensor:
        """Expert e's output for its rows [n, hidden] (bf16 where the experts are packed).
        Native packed linears (CPU fast mode) are called on their kernels directly, every row
        as a decode row (the module docstring says why): the module calls, reshapes and casts
        around them cost a good share of a one-row product."""
        expert = self.experts[e]
        gate_up, down = expert.gate_up, expert.down
        if not (_native(gate_up) and _native(down)):
            return expert(rows)
        n = rows.shape[0]
        gu = gate_up.native_forward(rows, decode=n)
        if gated_act.supported(gu, expert.native_act):
            hidden = gated_act.gated_act(gu, expert.native_act)
        else:
            gate, up = gu[:, : expert.intermediate], gu[:, expert.intermediate :]
            hidden = (expert.act(gate) * up).to(torch.bfloat16)  # as PackedLinear.forward casts
        return down.native_forward(hidden, decode=n)


def _native(linear: nn.Module) -> bool:
    """Whether PackedLinear.forward would call its native kernel alone (no bias to add)."""
    return (
        isinstance(linear, PackedLinear)
        and bool(linear.native_bits)
        and linear.bias is None
        and kernels.available()
    )
