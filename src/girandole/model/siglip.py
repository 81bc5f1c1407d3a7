"""SigLIP's vision transformer (the image encoder of Gemma 3's vision models), float32, without
the pooling head (Gemma 3 reads every patch's last hidden state).

pixel values [B, 3, S, S] -> patch embeddings (a stride-`patch` convolution) + learned position
embeddings -> pre-LayerNorm encoder layers (bidirectional attention with biases, GELU-tanh MLP)
-> post LayerNorm -> [B, (S / patch)^2, hidden].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class SiglipSpec:
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    image_size: int
    patch_size: int
    layer_norm_eps: float = 1e-6
    num_channels: int = 3

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size


class SiglipAttention(nn.Module):
    def __init__(self, spec: SiglipSpec) -> None:
        super().__init__()
        h = spec.hidden_size
        self.num_heads = spec.num_heads
        self.head_dim = h // spec.num_heads
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(h, h), nn.Linear(h, h), nn.Linear(h, h)
        self.out_proj = nn.Linear(h, h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape

        def heads(y: torch.Tensor) -> torch.Tensor:  # [B, T, H*D] -> [B, H, T, D]
            return y.view(b, t, self.num_heads, self.head_dim).transpose(1, 2)

        q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
        out = F.scaled_dot_product_attention(q, k, v, scale=self.head_dim**-0.5)
        return self.out_proj(out.transpose(1, 2).reshape(b, t, -1))


class SiglipLayer(nn.Module):
    def __init__(self, spec: SiglipSpec) -> None:
        super().__init__()
        h, eps = spec.hidden_size, spec.layer_norm_eps
        self.layer_norm1 = nn.LayerNorm(h, eps=eps)
        self.self_attn = SiglipAttention(spec)
        self.layer_norm2 = nn.LayerNorm(h, eps=eps)
        self.fc1 = nn.Linear(h, spec.intermediate_size)
        self.fc2 = nn.Linear(spec.intermediate_size, h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.fc2(F.gelu(self.fc1(self.layer_norm2(x)), approximate="tanh"))


class SiglipVisionModel(nn.Module):
    def __init__(self, spec: SiglipSpec) -> None:
        super().__init__()
        self.spec = spec
        h, p = spec.hidden_size, spec.patch_size
        self.patch_embedding = nn.Conv2d(spec.num_channels, h, kernel_size=p, stride=p)
        self.position_embedding = nn.Parameter(torch.zeros(spec.patches_per_side**2, h))
        self.layers = nn.ModuleList(SiglipLayer(spec) for _ in range(spec.num_layers))
        self.post_layernorm = nn.LayerNorm(h, eps=spec.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel values [B, 3, S, S] (normalised) -> last hidden states [B, patches, hidden]."""
        x = self.patch_embedding(pixel_values).flatten(2).transpose(1, 2)
        x = x + self.position_embedding
        for layer in self.layers:
            x = layer(x)
        return self.post_layernorm(x)

    def load(self, get) -> None:
        """Copy the weights from `get(name)` (names relative to the vision tower, as
        transformers' SiglipVisionTransformer names them, `vision_model.` stripped)."""
        own = {
            "patch_embedding.weight": "embeddings.patch_embedding.weight",
            "patch_embedding.bias": "embeddings.patch_embedding.bias",
            "position_embedding": "embeddings.position_embedding.weight",
            "post_layernorm.weight": "post_layernorm.weight",
            "post_layernorm.bias": "post_layernorm.bias",
        }
        for i in range(self.spec.num_layers):
            for ours, theirs in (
                ("layer_norm1", "layer_norm1"),
                ("layer_norm2", "layer_norm2"),
                ("self_attn.q_proj", "self_attn.q_proj"),
                ("self_attn.k_proj", "self_attn.k_proj"),
                ("self_attn.v_proj", "self_attn.v_proj"),
                ("self_attn.out_proj", "self_attn.out_proj"),
                ("fc1", "mlp.fc1"),
                ("fc2", "mlp.fc2"),
            ):
                for kind in ("weight", "bias"):
                    own[f"layers.{i}.{ours}.{kind}"] = f"encoder.layers.{i}.{theirs}.{kind}"
        params = dict(self.named_parameters())
        for ours, theirs in own.items():
            t = get(theirs)
            if tuple(t.shape) != tuple(params[ours].shape):
                raise ValueError(
                    f"vision tower tensor {theirs}: shape {tuple(t.shape)}, "
                    f"expected {tuple(params[ours].shape)}"
                )
            with torch.no_grad():
                params[ours].copy_(t)
