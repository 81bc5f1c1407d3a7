"""What the model code needs to know to build a network, whichever file format it came from.

Weights are named in GGUF style for every format (`token_embd.weight`, `blk.3.attn_q.weight`,
...): the safetensors loader maps Hugging Face names onto these. Conventions of the stored
values (also for both formats):
- 2-D weights are in nn.Linear layout [out, in];
- Gemma norm weights already include the +1 of Gemma's (1 + w) RMSNorm (as llama.cpp stores them);
- Llama Q/K projections are in Hugging Face's (rotate-half) order, not llama.cpp's permuted one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

SUPPORTED_ARCHITECTURES = ("gemma3", "llama", "qwen2", "qwen3")


@dataclass
class ArchSpec:
    architecture: str  # one of SUPPORTED_ARCHITECTURES
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position: int
    rope_scaling: dict[str, Any] | None = None  # HF rope_scaling dict ("linear", "llama3", ...)
    tie_embeddings: bool = False
    qkv_bias: bool = False
    qk_norm: bool = False
    # Per layer: None for global attention, else the sliding window in tokens.
    sliding_windows: list[int | None] = field(default_factory=list)
    # Gemma 3 only:
    rope_local_theta: float = 10000.0
    query_pre_attn_scalar: float | None = None
    final_logit_softcap: float | None = None
    attn_logit_softcap: float | None = None
    hidden_act: str = "silu"


class Weights(Protocol):
    """A checkpoint's tensors under GGUF-style names."""

    def __contains__(self, name: str) -> bool: ...

    def qtype(self, name: str) -> str:
        """Storage type: "F32", "F16", "BF16", "Q8_0", "Q4_K", ..."""
        ...

    def get(self, name: str) -> torch.Tensor:
        """The tensor as float32 (dequantized), Linear layout for 2-D weights."""
        ...
