"""Native RMSNorm (csrc/rms_norm.c) in one pass, optionally followed by the rotary embedding
(the QK norm of attention reads q and k heads in place from the QKV output). Available where the
kernels build (loader.py)."""

from __future__ import annotations

from collections.abc import Callable

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
    p, d = weight.shape
    t = x.shape[0]
    weight = weight.float().contiguous()
    if rope is not None:
        rope = tuple(r.float().contiguous() for r in rope)
    out = torch.empty(t, p, d, dtype=torch.float32)
    fn, args = bind(x, weight, eps, rope, out)
    fn(*args)
    return out.view(t, d) if p == 1 else out


def bind(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    eps: float,
    rope: tuple[torch.Tensor, torch.Tensor] | None,
    out: torch.Tensor,
    heads: int = 1,
    threads: int | None = None,
) -> tuple[Callable, tuple]:
    """The native call writing `out` [T, P, D] (contiguous) from x [T, P * D]: normed by
    `weight` [P, D] (float32, contiguous; None: not normed, `heads` gives P), then rotated by
    `rope` (contiguous float32 [T, D/2] each) where given. The function and its arguments, to
    call now or replay (engine/cpu_graphs.py)."""
    lib = loader.library()
    assert lib is not None, "native kernels not available"
    p, d = weight.shape if weight is not None else (heads, x.shape[-1] // heads)
    t = x.shape[0]
    assert x.stride(-1) == 1 and x.shape[-1] == p * d and out.is_contiguous()
    assert weight is None or (weight.dtype == torch.float32 and weight.is_contiguous())
    cos = sin = None
    if rope is not None:
        cos, sin = rope
        assert cos.shape == (t, d // 2) and sin.shape == (t, d // 2)
        assert cos.is_contiguous() and sin.is_contiguous() and cos.dtype == torch.float32
    threads = torch.get_num_threads() if threads is None else threads
    return lib.rms_norm, (
        x.data_ptr(), t, p, d, x.stride(0), None if weight is None else weight.data_ptr(), eps,
        None if cos is None else cos.data_ptr(), None if sin is None else sin.data_ptr(),
        out.data_ptr(), threads,
    )  # fmt: skip
