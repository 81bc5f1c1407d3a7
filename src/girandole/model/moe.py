"""Mixture-of-experts feed-forward block (Qwen3-MoE, Mixtral): a router picks each token's top-k
experts, each a gated MLP; the token's output is their outputs weighted by the router.

Routing, as transformers computes it: router logits in float32 (x @ W_router.T), softmax over
all experts, top-k, and the k weights renormalised to sum to 1 where `norm_topk_prob` (Qwen3-MoE's
setting; Mixtral always renormalises its top-2).

Dispatch for the engine's flattened batches (decode rows and prompt chunks of many sequences in one
[T, hidden] tensor): the T x k (token, expert) pairs are sorted by expert, each active expert runs
once on its rows (one gate/up and one down matmul, the same linears as a dense layer's, quantized
in fast mode), and each expert's weighted rows are added back to their tokens (index_add_, expert
by expert: each token's sum in expert order). No per-token Python loop; the only loop is over the
experts a batch activates. The engine's steps put decode tokens first and tell the linears how many
(`num_decode_rows`: fast mode's decode rows take another kernel); sorting keeps each expert's
decode rows first, and each expert runs with its own count of them, so a token's kernel follows its
role, never which other tokens share its expert (batch invariance, as for a dense layer). The same
torch ops run on CUDA (the expert counts come to the host once a layer); a fused MoE kernel (vLLM's
fused_moe) is future work there.

Router replay: where the forward context asks for it (`ForwardContext.routing`), each MoE layer
appends its [T, k] chosen expert ids (engine/runner.py hands them to the sequences that asked for
`include_routing_matrix`).
"""

from __future__ import annotations

import torch
from torch import nn

from girandole.model.context import get_context
from girandole.model.layers import Builder, GatedMLP
from girandole.model.quant import PackedLinear, dense_linear


def expert_prefix(layer: int, expert: int) -> str:
    """GGUF-style name prefix of one expert's projections: `blk.{layer}.exp.{expert}`
    (its `.ffn_gate`, `.ffn_up` and `.ffn_down` weights)."""
    return f"blk.{layer}.exp.{expert}"


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
        self.router = nn.Parameter(router.to(b.device), requires_grad=False)  # [E, hidden]
        self.experts = nn.ModuleList(
            GatedMLP(b, expert_prefix(layer, e), intermediate, act) for e in range(num_experts)
        )
        self.num_experts = num_experts
        self.top_k = top_k
        self.norm_topk_prob = norm_topk_prob

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each token's top-k expert ids [T, k] long and their weights [T, k] float32."""
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
        flat = ids.flatten()  # [T * k]: pair j is token j // k's (j % k)-th choice
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=self.num_experts)
        decode = None if ctx is None else ctx.num_decode_rows
        if decode is None:
            per_expert = [(n, None) for n in counts.tolist()]
        else:  # each expert's decode rows: its pairs from the first `decode` tokens
            first = torch.bincount(flat[: decode * self.top_k], minlength=self.num_experts)
            per_expert = list(zip(*torch.stack([counts, first]).tolist()))
        tokens = order // self.top_k
        if isinstance(self.experts[0].gate_up, PackedLinear):
            x = x.to(torch.bfloat16)  # what the packed linears cast to: half the rows' bytes
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
                    out = self.experts[e](rows[part]).float()
                    y.index_add_(0, tokens[part], out.mul_(pair_weights[part]))
                    start += n
        finally:
            if ctx is not None:
                ctx.num_decode_rows = decode
        return y
