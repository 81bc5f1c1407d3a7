"""Weight-only quantized linear layers and embeddings for CPU inference.

torch's packed kernels (`_weight_int8pack_mm`, `_weight_int4pack_mm_for_cpu`) are fast only
with bf16 activations (see shared/reference/deps.md section 5), so these layers take any
activation dtype, run the matmul in bf16 and return float32. For many rows (prefill) a plain
bf16 `F.linear` beats both kernels; a layer that keeps a bf16 copy of its weight uses it above
`dense_min_rows` rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

INT4_GROUP = 32
# Above this many rows a bf16 F.linear beats the packed kernels (measured on the 2-core CPU).
DENSE_MIN_ROWS = 16


def quantize_int8_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: w ~ q * scale[:, None]. Returns (int8 [N, K], float32 [N])."""
    w = w.float()
    scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def quantize_int4_groups(
    w: torch.Tensor, group: int = INT4_GROUP
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric int4 per group of `group` inputs (min/max grid, exact for Q4_K/Q4_1 groups
    that use the whole 0..15 range). Returns (q int32 [N, K] in 0..15, scale [N, K/g],
    zero [N, K/g]) with w ~ (q - 8) * scale + zero (torch's int4pack convention)."""
    n, k = w.shape
    wg = w.float().reshape(n, k // group, group)
    lo = wg.amin(dim=-1, keepdim=True)
    hi = wg.amax(dim=-1, keepdim=True)
    scale = ((hi - lo) / 15.0).clamp(min=1e-12)
    q = torch.round((wg - lo) / scale).clamp(0, 15).to(torch.int32).reshape(n, k)
    zero = lo + 8.0 * scale
    return q, scale.squeeze(-1), zero.squeeze(-1)


class Int8Linear(nn.Module):
    """y = x @ (q * scale).T + b with int8 per-output-channel weights (bf16 activations)."""

    def __init__(
        self, weight: torch.Tensor, bias: torch.Tensor | None = None, keep_dense: bool = True
    ) -> None:
        super().__init__()
        q, scale = quantize_int8_rows(weight)
        self.out_features, self.in_features = weight.shape
        self.register_buffer("qweight", q)
        self.register_buffer("scale", scale.to(torch.bfloat16))
        self.register_buffer("bias", None if bias is None else bias.float())
        dense = (q.float() * scale[:, None]).to(torch.bfloat16) if keep_dense else None
        self.register_buffer("dense", dense)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).to(torch.bfloat16)
        if self.dense is not None and x2.shape[0] >= DENSE_MIN_ROWS:
            y = F.linear(x2, self.dense)
        else:
            y = torch.ops.aten._weight_int8pack_mm(x2, self.qweight, self.scale)
        y = y.float()
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape, self.out_features)


class Int4Linear(nn.Module):
    """Weight-only int4 (group 32, asymmetric) linear on torch's CPU int4pack kernel."""

    def __init__(
        self,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None = None,
        keep_dense: bool = True,
        groups: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        """From a float weight [N, K] (requantized on a min/max grid), or from `groups`:
        the exact (q [N, K] in 0..15, scale [N, K/32], zero [N, K/32]) of a 4-bit file type."""
        super().__init__()
        q, scale, zero = groups if groups is not None else quantize_int4_groups(weight)
        self.out_features, self.in_features = q.shape
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2)
        sz = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous()  # [K/g, N, 2]
        self.register_buffer("packed", packed)
        self.register_buffer("scale_zeros", sz.to(torch.bfloat16))
        self.register_buffer("bias", None if bias is None else bias.float())
        if keep_dense:
            g = INT4_GROUP
            n, k = q.shape
            deq = (q.reshape(n, k // g, g) - 8).float() * scale[..., None] + zero[..., None]
            self.register_buffer("dense", deq.reshape(n, k).to(torch.bfloat16))
        else:
            self.register_buffer("dense", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).to(torch.bfloat16)
        if self.dense is not None and x2.shape[0] >= DENSE_MIN_ROWS:
            y = F.linear(x2, self.dense)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(
                x2, self.packed, INT4_GROUP, self.scale_zeros
            )
        y = y.float()
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape, self.out_features)


def int4_supported(weight: torch.Tensor) -> bool:
    n, k = weight.shape
    return k % INT4_GROUP == 0 and k % 64 == 0 and n % 8 == 0
