"""Native RMSNorm (csrc/rms_norm.c) in one pass, optionally followed by the rotary embedding
(the QK norm of attention reads q and k heads in place from the QKV output). Available where the
kernels build (x86 with AVX512)."""

from __future__ import annotations

import torch

from girandole.model.kernels import loader


def supported(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and x.dtype == torch.float32 and loader.available()


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    rope: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """RMSNorm of float32 x [T, P * D] (rows contiguous, any row stride) as T x P rows of D,
    row p weighted by weight[p] ([P, D]): returns [T, P, D] (P = 1: [T, D]). `rope` = (cos, sin)
    [T, D/2]: then also apply_rope, bitwise."""
    lib = loader.library()
    assert lib is not None, "native kernels not available"
    p, d = weight.shape
    t = x.shape[0]
    assert x.stride(-1) == 1 and x.shape[-1] == p * d
    weight = weight.float().contiguous()
    cos = sin = None
    if rope is not None:
        cos, sin = (r.float().contiguous() for r in rope)
        assert cos.shape == (t, d // 2) and sin.shape == (t, d // 2)
    out = torch.empty(t, p, d, dtype=torch.float32)
    lib.rms_norm(
        x.data_ptr(),
        t,
        p,
        d,
        x.stride(0),
        weight.data_ptr(),
        eps,
        None if cos is None else cos.data_ptr(),
        None if sin is None else sin.data_ptr(),
        out.data_ptr(),
        torch.get_num_threads(),
    )
    return out.view(t, d) if p == 1 else out
