"""Qwen 2 (bias on the Q/K/V projections) and Qwen 3 (per-head QK RMSNorm, no bias): the
Llama layer structure with those two switches, set from the architecture in the spec. Qwen3-MoE
is Qwen 3 with mixture-of-experts feed-forwards (model/moe.py) in the layers the spec marks."""

from __future__ import annotations

from girandole.model.layers import Builder
from girandole.model.llama import LlamaForCausalLM
from girandole.model.spec import ArchSpec


class Qwen2ForCausalLM(LlamaForCausalLM):
    def __init__(self, spec: ArchSpec, b: Builder) -> None:
        spec.qkv_bias = True
        spec.qk_norm = False
        super().__init__(spec, b)


class Qwen3ForCausalLM(LlamaForCausalLM):
    def __init__(self, spec: ArchSpec, b: Builder) -> None:
        spec.qk_norm = True
        super().__init__(spec, b)


class Qwen3MoeForCausalLM(Qwen3ForCausalLM):
    pass
