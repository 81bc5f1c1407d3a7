"""Native paged attention on CPU (csrc/paged_attention.c): query rows against the keys they
see, read in place from the paged KV cache (no gather), parallel over rows, KV heads and chunks
of keys. A row's result depends only on its own query and keys: not on its batch neighbours,
on how its prompt was chunked, or on being a decode or a prefill token.
Available where the kernels build (x86 with AVX512 and a C compiler)."""

from __future__ import annotations

import torch

from girandole.model.kernels import loader


def supported(head_dim: int, cache: torch.Tensor, softcap: float | None) -> bool:
    return (
        loader.available()
        and cache.device.type == "cpu"
        and cache.dtype == torch.float32
        and head_dim % 16 == 0
        and not softcap
    )


def paged_attention(
    q: torch.Tensor,  # [S, H, D] float32: S query rows
    k_cache: torch.Tensor,  # [slots, Hkv, D] float32
    v_cache: torch.Tensor,
    slots: torch.Tensor,  # int64: cache slots of the rows' sequences' positions, concatenated
    starts: torch.Tensor,  # int64 [S]: where row i's sequence starts in `slots`
    lens: torch.Tensor,  # int64 [S]: keys row i sees (its position + 1)
    window: int | None,
    scale: float,
) -> torch.Tensor:  # [S, H, D]
    lib = loader.library()
    assert lib is not None, "native kernels not available"
    q = q.float().contiguous()
    s, h, d = q.shape
    out = torch.empty_like(q)
    lib.paged_attention(
        q.data_ptr(),
        k_cache.data_ptr(),
        v_cache.data_ptr(),
        slots.data_ptr(),
        starts.data_ptr(),
        lens.data_ptr(),
        s,
        h,
        k_cache.shape[1],
        d,
        window or 0,
        scale,
        out.data_ptr(),
        torch.get_num_threads(),
    )
    return out
