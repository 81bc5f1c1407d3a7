"""Native LoRA deltas of a mixed batch (csrc/lora.c): one call per linear adds, to every row
that runs an adapter, (A x) projected back through B, whatever mix of adapters the rows run.
Available where the kernels build (loader.py)."""

from __future__ import annotations

import ctypes

import torch

from girandole.model.kernels import loader

MAX_RANK = 192  # csrc/lora.c's: three fused projections of rank 64


def supported(x: torch.Tensor, y: torch.Tensor) -> bool:
    return (
        x.device.type == "cpu"
        and y.dtype == torch.float32
        and y.is_contiguous()
        and loader.available()
    )


def lora_apply(
    x: torch.Tensor,
    y: torch.Tensor,
    slots: torch.Tensor,
    weights: list[tuple[torch.Tensor, torch.Tensor] | None],
) -> None:
    """y [T, N] += per row t with slots[t] = s >= 0: (x_t @ a_s.T) @ bt_s, in place.
    x [T, K]; slots int32 [T] (-1: the base model); weights[s] = (a [R, K], bt [R, N]) float32
    contiguous, or None (the adapter does not target this linear)."""
    lib = loader.library()
    assert lib is not None, "native kernels not available"
    x = x.float().contiguous()
    t, k = x.shape
    n = y.shape[1]
    count = len(weights)
    a = (ctypes.c_int64 * count)()
    bt = (ctypes.c_int64 * count)()
    rank = (ctypes.c_int64 * count)()
    for s, w in enumerate(weights):
        if w is not None:
            assert w[0].shape[0] <= MAX_RANK and w[0].shape[1] == k and w[1].shape[1] == n
            a[s], bt[s], rank[s] = w[0].data_ptr(), w[1].data_ptr(), w[0].shape[0]
    lib.lora_apply(
        x.data_ptr(),
        t,
        k,
        slots.data_ptr(),
        ctypes.addressof(a),
        ctypes.addressof(bt),
        ctypes.addressof(rank),
        n,
        y.data_ptr(),
        torch.get_num_threads(),
    )
