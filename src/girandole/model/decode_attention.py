"""Native decode attention on CPU (csrc/decode_attention.c): one query token per sequence
against its keys, read in place from the paged KV cache (no gather), parallel over sequences,
KV heads and chunks of keys. A sequence's result does not depend on its batch neighbours.
Available where girandole.model.native builds (x86 with AVX512 and a C compiler)."""

from __future__ import annotations

import torch

from girandole.model import native


def supported(head_dim: int, cache: torch.Tensor, softcap: float | None) -> bool:
    return (
        native.library() is not None
        and cache.device.type == "cpu"
        and cache.dtype == torch.float32
        and head_dim % 16 == 0
        and not softcap
    )


def decode_attention(
    q: torch.Tensor,  # [S, H, D] float32, one query per sequence
    k_cache: torch.Tensor,  # [slots, Hkv, D] float32
    v_cache: torch.Tensor,
    slots: torch.Tensor,  # int64: every sequence's key slots, concatenated
    offsets: torch.Tensor,  # int64 [S + 1]: sequence i's slots are slots[offsets[i]:offsets[i+1]]
    window: int | None,
    scale: float,
) -> torch.Tensor:  # [S, H, D]
    lib = native.library()
    assert lib is not None, "native kernels not available"
    q = q.float().contiguous()
    s, h, d = q.shape
    out = torch.empty_like(q)
    lib.decode_attention(
        q.data_ptr(),
        k_cache.data_ptr(),
        v_cache.data_ptr(),
        slots.data_ptr(),
        offsets.data_ptr(),
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
