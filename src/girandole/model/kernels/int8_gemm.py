"""Native int8 GEMM (csrc/int8_gemm.c) for the LM head's coarse logits: bitwise the result of
`torch._int_mm(x, w.t()).float() * xs * ws`, faster for a few rows. From AMX_MIN_ROWS rows
on, on the AMX tiles where the CPU has them (csrc/amx.c: the same integers, so the same logits
bitwise). Available where the kernels build (loader.py)."""

from __future__ import annotations

import torch

from girandole.model.kernels import loader

# Rows from which the AMX kernel is faster than the VNNI one (both exact; bench_kernels.py on a
# Xeon with AMX, 262k x 640: 4 rows 6.3 vs 6.2 ms, 8 rows 6.3 vs 8.4, 16 rows 6.6 vs 12.4).
AMX_MIN_ROWS = 8


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
    amx: bool | None = None,  # force AMX (True) or VNNI (False); None: by rows, where AMX runs
) -> torch.Tensor:  # float32 [M, N]
    lib = loader.library()
    assert lib is not None, "native kernels not available"
    xq = xq.contiguous()
    xs = xs.float().reshape(-1).contiguous()
    m, k = xq.shape
    n = ws.shape[0]
    y = torch.empty(m, n, dtype=torch.float32)
    if loader.use_amx(amx, m, AMX_MIN_ROWS) and k % 64 == 0:
        lib.int8_gemm_amx(
            xq.data_ptr(),
            m,
            k,
            packed.data_ptr(),
            xs.data_ptr(),
            ws.data_ptr(),
            n,
            y.data_ptr(),
            torch.get_num_threads(),
        )
        return y
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
