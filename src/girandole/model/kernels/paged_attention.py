"""Native paged attention on CPU (csrc/paged_attention.c): query rows against the keys they
see, read through the paged KV cache's slots (no gather), parallel over tiles of rows (up to 8
consecutive rows of a prompt, which read each key once for all of them), KV heads and chunks of
keys. A row's result depends only on its own query and keys: not on its batch neighbours or
tile, on how its prompt was chunked, or on being a decode or a prefill token.
Available where the kernels build (loader.py: x86 with AVX512 or AVX2, and a C compiler).

The cache is float32 or float16 (CACHE_DTYPES; the engine's default on CPU is float16: half the
bytes, `kv_cache_dtype`); queries, outputs and all arithmetic are float32 either way.

`sinks` (gpt-oss's attention sinks): a float32 logit per query head [H] that joins every row's
softmax as a column without a value (model/attention.py `_manual`); None: no sinks."""

from __future__ import annotations

from collections.abc import Callable

import torch

from girandole.model.kernels import loader

CACHE_DTYPES = (torch.float32, torch.float16)


def takes(head_dim: int, softcap: float | None) -> bool:
    """Whether the kernel runs attention of this head size and scores here (on a CPU cache of
    either of CACHE_DTYPES)."""
    return loader.available() and head_dim % 16 == 0 and not softcap


def supported(head_dim: int, cache: torch.Tensor, softcap: float | None) -> bool:
    return takes(head_dim, softcap) and cache.device.type == "cpu" and cache.dtype in CACHE_DTYPES


def paged_attention(
    q: torch.Tensor,  # [S, H, D] float32: S query rows
    k_cache: torch.Tensor,  # [slots, Hkv, D] float32
    v_cache: torch.Tensor,
    slots: torch.Tensor,  # int64: cache slots of the rows' sequences' positions, concatenated
    starts: torch.Tensor,  # int64 [S]: where row i's sequence starts in `slots`
    lens: torch.Tensor,  # int64 [S]: keys row i sees (its position + 1)
    window: int | None,
    scale: float,
    sinks: torch.Tensor | None = None,  # [H] float32, or None
) -> torch.Tensor:  # [S, H, D]
    q = q.float().contiguous()
    out = torch.empty_like(q)
    fn, args = bind(q, k_cache, v_cache, slots, starts, lens, window, scale, out, sinks=sinks)
    fn(*args)
    return out


def bind(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    starts: torch.Tensor,
    lens: torch.Tensor,
    window: int | None,
    scale: float,
    out: torch.Tensor,
    threads: int | None = None,
    sinks: torch.Tensor | None = None,
) -> tuple[Callable, tuple]:
    """The native call writing `out` [S, H, D] from q [S, H, D] (both contiguous float32); the
    kernel reads `slots` as far as `starts` and `lens` say, and `sinks` (contiguous float32 [H])
    if given. The function and its arguments, to call now or replay (engine/cpu_graphs.py)."""
    lib = loader.library()
    assert lib is not None, "native kernels not available"
    assert q.is_contiguous() and out.is_contiguous() and q.dtype == torch.float32
    assert k_cache.dtype == v_cache.dtype and k_cache.dtype in CACHE_DTYPES
    s, h, d = q.shape
    if sinks is not None:
        assert sinks.dtype == torch.float32 and sinks.is_contiguous() and sinks.shape == (h,)
    threads = torch.get_num_threads() if threads is None else threads
    fn = lib.paged_attention_f16 if k_cache.dtype == torch.float16 else lib.paged_attention
    return fn, (
        q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), slots.data_ptr(),
        starts.data_ptr(), lens.data_ptr(), s, h, k_cache.shape[1], d, window or 0, scale,
        None if sinks is None else sinks.data_ptr(), out.data_ptr(), threads,
    )  # fmt: skip


def write_kv(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots
) -> None:
    """k_cache[slots[i]] = k[i] and v_cache[slots[i]] = v[i] (as index_copy_ does)."""
    fn, args = bind_write_kv(k, v, k_cache, v_cache, slots)
    fn(*args)


def rows_contiguous(t: torch.Tensor) -> bool:
    """Whether each row of t [T, Hkv, D] is one contiguous run of Hkv * D floats."""
    return t.dtype == torch.float32 and t.stride(2) == 1 and t.stride(1) == t.shape[2]


def write_kv_supported(k: torch.Tensor, v: torch.Tensor, cache: torch.Tensor) -> bool:
    """Whether `write_kv` takes these keys and values into this (CPU, float32 or float16) cache."""
    return (
        cache.dtype in CACHE_DTYPES
        and cache.device.type == "cpu"
        and rows_contiguous(k)
        and rows_contiguous(v)
        and loader.available()
    )


def bind_write_kv(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots
) -> tuple[Callable, tuple]:
    """The native call of `write_kv`: k, v [T, Hkv, D] float32 with contiguous rows (any row
    stride), caches [slots, Hkv, D] contiguous (float32, or float16: rounded to nearest, beyond
    the half range clamped to +-65504), slots [T] int64. The function and its arguments, to
    call now or replay (engine/cpu_graphs.py)."""
    lib = loader.library()
    assert lib is not None, "native kernels not available"
    assert rows_contiguous(k) and rows_contiguous(v) and k.shape == v.shape
    assert k_cache.is_contiguous() and v_cache.is_contiguous()
    assert slots.dtype == torch.long and slots.is_contiguous()
    assert k_cache.dtype == v_cache.dtype and k_cache.dtype in CACHE_DTYPES
    width = k.shape[1] * k.shape[2]
    assert k_cache.shape[1] * k_cache.shape[2] == width and slots.shape[0] == k.shape[0]
    fn = lib.kv_cache_write_f16 if k_cache.dtype == torch.float16 else lib.kv_cache_write
    return fn, (
        k.data_ptr(), v.data_ptr(), k.stride(0), v.stride(0), slots.data_ptr(), k.shape[0],
        width, k_cache.data_ptr(), v_cache.data_ptr(),
    )  # fmt: skip
