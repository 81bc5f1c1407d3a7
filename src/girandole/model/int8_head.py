"""Native int8 GEMM (csrc/int8_gemm.c) for the LM head's coarse logits: bitwise the result of
`torch._int_mm(x, w.t()).float() * xs * ws`, faster for a few rows. Available where
girandole.model.native builds (x86 with AVX512-VNNI and a C compiler)."""

from __future__ import annotations

import torch

from girandole.model import native


def supports(n: int, k: int) -> bool:
    return n % 16 == 0 and k % 4 == 0


def pack(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 weight [N, K] -> (kernel layout [N/16][K/4][16][4] int8, per-row sums int32)."""
    n, k = w.shape
    packed = w.reshape(n // 16, 16, k // 4, 4).permute(0, 2, 1, 3).contiguous().reshape(-1)
    return packed, w.sum(dim=1, dtype=torch.int32)


def int8_gemm(
    xq: torch.Tensor,  # int8 [M, K]
    xs: torch.Tensor,  # float32 [M] (or [M, 1]): row scales of x
    packed: torch.Tensor,
    wsum: torch.Tensor,
    ws: torch.Tensor,  # float32 [N]: row scales of w
) -> torch.Tensor:  # float32 [M, N]
    lib = native.library()
    assert lib is not None, "native kernels not available"
    xq = xq.contiguous()
    xs = xs.float().reshape(-1).contiguous()
    m, k = xq.shape
    n = ws.shape[0]
    y = torch.empty(m, n, dtype=torch.float32)
    lib.int8_gemm(
        xq.data_ptr(),
        m,
        k,
        packed.data_ptr(),
        wsum.data_ptr(),
        xs.data_ptr(),
        ws.data_ptr(),
        n,
        y.data_ptr(),
        torch.get_num_threads(),
    )
    return y


def refine(
    logits: torch.Tensor,  # float32 [M, V] coarse, contiguous: candidates overwritten in place
    x: torch.Tensor,  # float32 [M, H]
    table_q: torch.Tensor,  # int8 [V, H]
    table_scale: torch.Tensor,  # float32 [V, H / 32]
    margin: float,
    top: int,
) -> None:
    """Recompute exactly each row's best `top` coarse logits within `margin` of its maximum
    (csrc/logits.c)."""
    lib = native.library()
    assert lib is not None, "native kernels not available"
    assert logits.is_contiguous() and logits.dtype == torch.float32
    x = x.float().contiguous()
    table_q, table_scale = table_q.contiguous(), table_scale.float().contiguous()
    m, v = logits.shape
    lib.lm_head_refine(
        logits.data_ptr(),
        m,
        v,
        x.data_ptr(),
        x.shape[1],
        table_q.data_ptr(),
        table_scale.data_ptr(),
        margin,
        top,
        torch.get_num_threads(),
    )
