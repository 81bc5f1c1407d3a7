"""Mixture-of-experts feed-forward block (Qwen3-MoE, Mixtral): a router picks each token's top-k
experts, each a gated MLP; the token's output is their outputs weighted by the router.

Routing, as transformers computes it: router logits in float32 (x @ W_router.T), softmax over
all experts, top-k, and the k weights renormalised to sum to 1 where `norm_topk_prob` (Qwen3-MoE's
setting; Mixtral always renormalises its top-2).

Dispatch for the engine's flattened batches (decode rows and prompt chunks of many sequences in
one [T, hidden] tensor): the T x k (token, expert) pairs are sorted by expert, each active expert
runs once on its rows (one gate/up and one down matmul, the same linears as a dense layer's,
quantized in fast mode), and the weighted rows are added back to their tokens with one
index_add_. No per-token Python loop; the only loop is over the experts a batch activates. The
same torch ops run on CUDA (the expert counts come to the host once a layer); a fused MoE
kernel (vLLM's fused_moe) is future work there.

Router replay: where the forward context asks for it (`ForwardContext.routing`), each MoE layer
appends its [T, k] chosen expert ids (engine/runner.py hands them to the sequences that asked for
`include_routing_matrix`).
"""

from __future__ import annotations

import torch
from torch import nn

from girandole.model.context import get_context
from girandole.model.layers import Builder, GatedMLP


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
        logits = torch.nn.functional.linear(x.float(), self.router)
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
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()
        tokens = order // self.top_k
        rows = x.index_select(0, tokens)  # [T * k, hidden], grouped by expert
        outs = []
        start = 0
        for e, n in enumerate(counts):
            if n:
                outs.append(self.experts[e](rows[start : start + n]))
                start += n
        y = torch.cat(outs) * weights.flatten().index_select(0, order)[:, None]
        return torch.zeros_like(x, dtype=torch.float32).index_add_(0, tokens, y)
