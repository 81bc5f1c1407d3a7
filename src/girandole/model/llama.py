"""Llama family (Llama 2/3 incl. "llama3" rope scaling, Mistral, SmolLM, TinyLlama): pre-norm
decoder layers with SiLU gated MLP; the same module serves Qwen 2/3 through flags
(QKV bias, QK norm; see qwen.py), and Mixtral and Qwen3-MoE, whose layers' feed-forward is a
mixture of experts (model/moe.py) where `spec.moe_layers` says so."""

from __future__ import annotations

import torch
from torch import nn

from girandole.model import fused_layers
from girandole.model.layers import (
    Builder,
    GatedMLP,
    Rotary,
    SelfAttention,
    rope_attention_factor,
    rope_inv_freq,
)
from girandole.model.moe import SparseMoE
from girandole.model.spec import ArchSpec


def feed_forward(b: Builder, spec: ArchSpec, i: int) -> nn.Module:
    """Layer i's feed-forward: the MoE block where the spec makes it one, else the dense MLP."""
    if spec.architecture == "gpt_oss":
        from girandole.model.gpt_oss import GptOssMoE  # gpt_oss imports this module

        return GptOssMoE(b, spec, i)
    if spec.moe_layers and spec.moe_layers[i]:
        return SparseMoE(
            b,
            i,
            spec.num_experts,
            spec.num_experts_per_tok,
            spec.moe_intermediate_size,
            spec.hidden_act,
            spec.norm_topk_prob,
        )
    return GatedMLP(b, f"blk.{i}", spec.intermediate_size, spec.hidden_act)


class LlamaLayer(nn.Module):
    def __init__(self, b: Builder, spec: ArchSpec, i: int) -> None:
        super().__init__()
        p = f"blk.{i}"
        eps = spec.rms_norm_eps
        window = spec.sliding_windows[i] if spec.sliding_windows else None
        self.attn_norm = b.norm(f"{p}.attn_norm.weight", eps)
        self.self_attn = SelfAttention(
            b,
            p,
            spec.num_heads,
            spec.num_kv_heads,
            spec.head_dim,
            eps,
            scale=spec.head_dim**-0.5,
            qk_norm=spec.qk_norm,
            sliding_window=window,
            sinks=spec.attn_sinks,
        )
        self.ffn_norm = b.norm(f"{p}.ffn_norm.weight", eps)
        self.mlp = feed_forward(b, spec, i)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x = x + self.self_attn(self.attn_norm(x), *rope)
        return x + self.mlp(self.ffn_norm(x))


class LlamaForCausalLM(nn.Module):
    """forward(input_ids [T], positions [T]) -> hidden [T, H] before the final norm;
    compute_logits(hidden rows [N, H]) -> float32 logits [N, V] (applies the final norm)."""

    def __init__(self, spec: ArchSpec, b: Builder) -> None:
        super().__init__()
        self.spec = spec
        self.embed, self.lm_head = b.embedding_and_head(tie=spec.tie_embeddings)
        self.layers = nn.ModuleList(
            b.finished(LlamaLayer(b, spec, i)) for i in range(spec.num_layers)
        )
        self.norm = b.norm("output_norm.weight", spec.rms_norm_eps)
        freq_factors = b.tensor("rope_freqs.weight") if b.has("rope_freqs.weight") else None
        inv_freq = rope_inv_freq(spec.head_dim, spec.rope_theta, spec.rope_scaling, freq_factors)
        self.rotary = Rotary(inv_freq, rope_attention_factor(spec.rope_scaling))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return fused_layers.decoder_forward(self, input_ids, positions)

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed(input_ids)

    def rope_tables(self, positions: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each layer's rotary (cos, sin) at `positions`: one for all."""
        return [self.rotary(positions)] * len(self.layers)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(hidden))


class MixtralForCausalLM(LlamaForCausalLM):
    """Mistral's attention (sliding window where the config sets one) with a top-2 MoE."""

    def __init__(self, spec: ArchSpec, b: Builder) -> None:
        spec.norm_topk_prob = True  # Mixtral always renormalises its top-k weights
        super().__init__(spec, b)
