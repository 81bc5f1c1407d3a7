"""Gemma 3 (text): sliding-window local layers and global layers with two rope bases, QK norm,
(1 + w) RMSNorm (the +1 folded into the stored weights), embeddings scaled by sqrt(hidden),
GELU-tanh MLP, norms before and after both attention and MLP."""

from __future__ import annotations

import math

import torch
from torch import nn

from girandole.model import fused_layers
from girandole.model.context import ImageBatch
from girandole.model.layers import (
    Builder,
    GatedMLP,
    Rotary,
    SelfAttention,
    rope_attention_factor,
    rope_inv_freq,
)
from girandole.model.spec import ArchSpec

# Not stored in GGUF files: llama.cpp and transformers hard-code these for Gemma 3.
SLIDING_WINDOW_PATTERN = 6  # every 6th layer is global
LOCAL_ROPE_THETA = 10000.0


def default_sliding_windows(num_layers: int, window: int) -> list[int | None]:
    return [None if (i + 1) % SLIDING_WINDOW_PATTERN == 0 else window for i in range(num_layers)]


class Gemma3Layer(nn.Module):
    def __init__(self, b: Builder, spec: ArchSpec, i: int) -> None:
        super().__init__()
        p = f"blk.{i}"
        eps = spec.rms_norm_eps
        self.is_local = spec.sliding_windows[i] is not None
        scalar = spec.query_pre_attn_scalar or spec.head_dim
        self.attn_norm = b.norm(f"{p}.attn_norm.weight", eps)
        self.self_attn = SelfAttention(
            b,
            p,
            spec.num_heads,
            spec.num_kv_heads,
            spec.head_dim,
            eps,
            scale=scalar**-0.5,
            qk_norm=True,
            sliding_window=spec.sliding_windows[i],
            logit_softcap=spec.attn_logit_softcap,
        )
        self.post_attn_norm = b.norm(f"{p}.post_attention_norm.weight", eps)
        self.ffn_norm = b.norm(f"{p}.ffn_norm.weight", eps)
        self.mlp = GatedMLP(b, p, spec.intermediate_size, spec.hidden_act)
        self.post_ffn_norm = b.norm(f"{p}.post_ffw_norm.weight", eps)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x = x + self.post_attn_norm(self.self_attn(self.attn_norm(x), *rope))
        return x + self.post_ffn_norm(self.mlp(self.ffn_norm(x)))


class Gemma3ForCausalLM(nn.Module):
    """forward(input_ids [T], positions [T]) -> hidden [T, H] before the final norm;
    compute_logits(hidden rows [N, H]) -> float32 logits [N, V] (applies the final norm)."""

    def __init__(self, spec: ArchSpec, b: Builder) -> None:
        super().__init__()
        self.spec = spec
        self.embed, self.lm_head = b.embedding_and_head(tie=spec.tie_embeddings)
        # transformers multiplies by the normalizer cast to the weights' dtype (fp32 here).
        self.embed_scale = float(torch.tensor(math.sqrt(spec.hidden_size), dtype=torch.float32))
        self.layers = nn.ModuleList(
            b.finished(Gemma3Layer(b, spec, i)) for i in range(spec.num_layers)
        )
        self.norm = b.norm("output_norm.weight", spec.rms_norm_eps)
        self.rotary_global = Rotary(
            rope_inv_freq(spec.head_dim, spec.rope_theta, spec.rope_scaling),
            rope_attention_factor(spec.rope_scaling),
        )
        self.rotary_local = Rotary(rope_inv_freq(spec.head_dim, spec.rope_local_theta))
        self.final_logit_softcap = spec.final_logit_softcap

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, images: ImageBatch | None = None
    ) -> torch.Tensor:
        return fused_layers.decoder_forward(self, input_ids, positions, images)

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed(input_ids) * self.embed_scale

    def rope_tables(self, positions: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each layer's rotary (cos, sin) at `positions`: local layers share one, global ones
        the other."""
        rope_global = self.rotary_global(positions)
        rope_local = self.rotary_local(positions)
        return [rope_local if layer.is_local else rope_global for layer in self.layers]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(self.norm(hidden))
        if self.final_logit_softcap:
            cap = self.final_logit_softcap
            logits = torch.tanh(logits / cap) * cap
        return logits
