"""gpt-oss (OpenAI's gpt-oss-20b / -120b, transformers' GptOssForCausalLM): the Llama layer
structure with
- attention sinks: a learned logit per head that joins every query row's softmax (attention.py);
- Q/K/V and output projection biases;
- alternating sliding-window (128) and full attention layers (`layer_types`);
- YaRN rope scaling (layers.rope_inv_freq, its cos/sin multiplied by the attention factor);
- a mixture of experts in every layer whose router has a bias and takes the softmax of the top-k
  logits only, and whose experts (with biases) run a clamped SwiGLU:
  (clamp(up, -limit, limit) + 1) * gate * sigmoid(alpha * gate), gate clamped above at limit.

The checkpoint stores the experts of a layer as one tensor per projection, gate and up
interleaved (gate rows even, up rows odd), as MXFP4 blocks and scales in the released models;
the safetensors loader splits them into model/moe.py's per-expert names
(loader/safetensors_experts.py), so each expert is a pair of ordinary linears here (quantized in
fast mode as any other) whose gate_up output is the gate half, then the up half. On the GPU path
the experts run in the fused Triton kernel (kernels/triton_moe.py, its "swiglu_clamped"
activation with both biases), as SparseMoE's do.
"""

from __future__ import annotations

import torch
from torch import nn

from girandole.model.layers import Builder
from girandole.model.llama import LlamaForCausalLM
from girandole.model.moe import SparseMoE, expert_prefix
from girandole.model.quant import dense_linear
from girandole.model.spec import ArchSpec


class ClampedSwiGLUExpert(nn.Module):
    """One gpt-oss expert: down(swiglu(gate_up(x))) with the biases the checkpoint has."""

    def __init__(
        self, b: Builder, prefix: str, intermediate: int, alpha: float, limit: float
    ) -> None:
        super().__init__()
        self.gate_up = b.linear([f"{prefix}.ffn_gate", f"{prefix}.ffn_up"], bias=True)
        self.down = b.linear([f"{prefix}.ffn_down"], bias=True)
        self.intermediate = intermediate
        self.alpha = alpha
        self.limit = limit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gu = self.gate_up(x)
        gate, up = gu[..., : self.intermediate], gu[..., self.intermediate :]
        gate = gate.clamp(max=self.limit)
        up = up.clamp(min=-self.limit, max=self.limit)
        return self.down((up + 1) * (gate * torch.sigmoid(gate * self.alpha)))


class GptOssMoE(SparseMoE):
    """SparseMoE's dispatch with gpt-oss's router (bias; softmax over the top-k logits) and
    experts. forward(x [T, hidden] float32) -> [T, hidden] float32."""

    def __init__(self, b: Builder, spec: ArchSpec, layer: int) -> None:
        nn.Module.__init__(self)
        # float32 in every mode, as SparseMoE's router: rounding there changes which experts run
        router = b.tensor(f"blk.{layer}.ffn_gate_inp.weight").float()
        bias = b.tensor(f"blk.{layer}.ffn_gate_inp.bias").float()
        self.router = nn.Parameter(router, requires_grad=False)  # [E, hidden]
        self.router_bias = nn.Parameter(bias, requires_grad=False)  # [E]
        self.experts = nn.ModuleList(
            ClampedSwiGLUExpert(
                b,
                expert_prefix(layer, e),
                spec.moe_intermediate_size,
                spec.swiglu_alpha,
                spec.swiglu_limit,
            )
            for e in range(spec.num_experts)
        )
        self.num_experts = spec.num_experts
        self.top_k = spec.num_experts_per_tok
        self.norm_topk_prob = True
        self.stacked = None  # set by stack_experts (the GPU path)

    def fused_activation(self) -> dict:
        e = self.experts[0]
        return {"act": "swiglu_clamped", "alpha": e.alpha, "limit": e.limit}

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = dense_linear(x.float(), self.router, self.router_bias)  # as SparseMoE's
        top, ids = torch.topk(logits, self.top_k, dim=-1)
        return ids, torch.softmax(top, dim=-1, dtype=torch.float32)

    def native_experts(self) -> None:
        """None: moe_experts' native call has neither the experts' biases nor the clamped
        SwiGLU, so they keep SparseMoE's per-expert dispatch."""
        return None


class GptOssForCausalLM(LlamaForCausalLM):
    """Llama's model with sinks in every attention layer and GptOssMoE feed-forwards
    (llama.feed_forward and LlamaLayer read the spec's architecture and attn_sinks)."""

    def __init__(self, spec: ArchSpec, b: Builder) -> None:
        spec.attn_sinks = True
        super().__init__(spec, b)
