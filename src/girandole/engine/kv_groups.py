"""KV cache groups: how the attention layers share the paged KV cache (vLLM's hybrid layout).

Layers of one kind (full attention, or one sliding window) are cut into groups of `group_size`
layers; the j-th layer of every group writes to the same pair of cache tensors, so one block id
names `block_size` tokens' K/V in each of its group's layers, and every group draws its blocks
from one pool. The cache budget is then never split ahead of use: a short sequence holds a block
per group for each of its blocks (as many bytes as with one table), and a long sequence's
sliding-window groups hold only the blocks of their window (engine/kv_cache.py), whatever mix
of short and long sequences runs. A static split into a full and a sliding pool would have to
guess that mix and would strand whichever pool the traffic does not fill.

Gemma 3 270M (3 global, 15 sliding layers): 6 groups of 3 layers, one global and five sliding.
A model without sliding layers, or whose layers differ in KV shape, has one group of all its
layers, each with its own tensors: the layout before groups.

The cache's element type (`kv_cache_dtype`): on a GPU the model's bf16; on CPU float16 in fast
mode where the native attention kernel reads every layer (it widens each value to float32 as it
loads it), else float32. A batched decode step of a model with many KV heads reads mostly its
KV cache: float16 halves those bytes (Qwen3-0.6B shapes, 16 rows of ~300 tokens: 229 KB a
token, 1 GB a step in float32) and holds twice the tokens in the same memory, as llama.cpp's
default f16 cache does.
"""

from __future__ import annotations

import ctypes
import logging
import math
import mmap
from dataclasses import dataclass

import torch

from girandole.env_switches import env_switch
from girandole.model.attention import Attention
from girandole.model.kernels import paged_attention
from girandole.model.loader.page_cache import HUGE_PAGE

logger = logging.getLogger(__name__)

KV_CACHE_DTYPES = {"auto": None, "float32": torch.float32, "float16": torch.float16}


def kv_cache_dtype(
    setting: str, device: torch.device, mode: str, layers: list[Attention], gpu_path: bool
) -> torch.dtype:
    """The KV cache's element type for `setting` ("auto", "float32" or "float16"; the latter
    two for a CPU cache only: the GPU path keeps bf16)."""
    if setting not in KV_CACHE_DTYPES:
        raise ValueError(
            f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, not {setting!r}"
        )
    if device.type != "cpu":
        if setting != "auto":
            raise ValueError("kv_cache_dtype float32 or float16 is for a CPU cache; use auto")
        return torch.bfloat16
    if setting != "auto":
        if gpu_path and setting == "float16":
            raise ValueError("kv_cache_dtype float16 is for the CPU path (not gpu_path)")
        return KV_CACHE_DTYPES[setting]
    native = all(paged_attention.takes(a.head_dim, a.logit_softcap) for a in layers)
    return torch.float16 if mode == "fast" and not gpu_path and native else torch.float32


@dataclass
class KVCacheGroup:
    window: int | None  # the layers' sliding window; None: full attention
    layers: list[Attention]


def group_layers(layers: list[Attention], windowed: bool = True) -> list[KVCacheGroup]:
    """The layers' KV cache groups, full-attention groups first (one group unless `windowed`
    and some layers slide)."""
    kinds: dict[int | None, list[Attention]] = {}
    for layer in layers:
        kinds.setdefault(layer.sliding_window, []).append(layer)
    shapes = {(a.num_kv_heads, a.head_dim) for a in layers}
    if not windowed or set(kinds) == {None} or len(shapes) > 1:
        return [KVCacheGroup(None, list(layers))]
    size = min(len(group) for group in kinds.values())
    order = sorted(kinds, key=lambda w: (w is not None, w or 0))
    return [
        KVCacheGroup(w, kinds[w][i : i + size])
        for w in order
        for i in range(0, len(kinds[w]), size)
    ]


def bind_kv_cache(
    groups: list[KVCacheGroup],
    num_blocks: int,
    block_size: int,
    dtype: torch.dtype,
    device,
    extra_blocks: int = 0,
) -> None:
    """Give every layer its cache tensors [(num_blocks + extra_blocks) * block_size, Hkv, D]
    and its group. `extra_blocks` lie past the pool's ids (the CUDA graphs' scratch slot)."""
    num_slots = (num_blocks + extra_blocks) * block_size
    width = max(len(g.layers) for g in groups)
    check_host_memory(
        bytes_per_block(groups, block_size, dtype) * (num_blocks + extra_blocks), device
    )
    tensors = []
    for j in range(width):
        first = next(g.layers[j] for g in groups if j < len(g.layers))
        shape = (num_slots, first.num_kv_heads, first.head_dim)
        tensors.append((cache_zeros(shape, dtype, device), cache_zeros(shape, dtype, device)))
    for g, group in enumerate(groups):
        for j, layer in enumerate(group.layers):
            layer.k_cache, layer.v_cache = tensors[j]
            layer.kv_group = g


def cache_zeros(
    shape: tuple[int, ...], dtype: torch.dtype, device, huge_pages: bool | None = None
) -> torch.Tensor:
    """A zeroed cache tensor. On CPU an anonymous private mapping: the kernel gives zeroed pages
    on first write, so memory grows as blocks are used, not at start (torch.zeros writes every
    page: a 1 GiB cache was resident from the first second, the default model's RSS 1.6 GiB
    after load where 0.6 GiB is in use).

    The mapping starts at a 2 MiB boundary and is advised MADV_HUGEPAGE (`huge_pages`; None:
    GIRANDOLE_KV_HUGE_PAGES, on unless off): it grows in 2 MiB pages where Linux has transparent
    huge pages (not off). A decode step reads each sequence's pages of every layer, scattered
    through the pool: in 4 KiB pages each 16-slot page of a Qwen3-0.6B-shaped layer (32 KiB of
    keys) took 8 TLB entries, and the prefetchers stopped at every boundary. Zen 4, 2 threads:
    decode attention from memory 1.02-1.36x faster for 16 rows (bench_decode_attention.py), the
    engine's decode at a 4,096-token context 1.15x (docs/benchmarks.md, session 55)."""
    if torch.device(device).type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    count = math.prod(shape)
    nbytes = count * dtype.itemsize
    if nbytes == 0:
        return torch.zeros(shape, dtype=dtype)
    if huge_pages is None:
        huge_pages = env_switch("KV_HUGE_PAGES")
    advise = getattr(mmap, "MADV_HUGEPAGE", None) if huge_pages else None
    pad = HUGE_PAGE if advise is not None and nbytes >= HUGE_PAGE else 0
    buf = mmap.mmap(-1, nbytes + pad, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    offset = 0
    if pad:
        view = ctypes.c_char.from_buffer(buf)
        offset = -ctypes.addressof(view) % HUGE_PAGE
        del view  # an exported buffer would keep the mapping from being closed
        try:
            buf.madvise(advise)
        except OSError as exc:  # a kernel built without THP: EINVAL; 4 KiB pages then
            logger.debug("the KV cache stays in 4 KiB pages: madvise: %s", exc)
    # frombuffer holds a reference to the mapping: it is unmapped with the last tensor viewing it
    return torch.frombuffer(buf, dtype=dtype, count=count, offset=offset).view(shape)


def check_host_memory(nbytes: int, device: torch.device | str) -> None:
    """A CPU cache's pages are mapped lazily (cache_zeros): one larger than the machine's memory
    failed in the allocator with a message about alloc_cpu.cpp, or started and was killed for
    memory once it filled. Refuse one larger than the machine, naming the setting; warn of one
    larger than the memory free now."""
    if torch.device(device).type != "cpu":
        return  # a GPU allocates at once and says so
    total, available = _meminfo("MemTotal"), _meminfo("MemAvailable")
    gib = 1 << 30
    if total is not None and nbytes > total:
        raise ValueError(
            f"the KV cache needs {nbytes / gib:.1f} GiB (--kv-cache-gb), more than this"
            f" machine's {total / gib:.1f} GiB of memory: lower --kv-cache-gb"
        )
    if available is not None and nbytes > available:
        logger.warning(
            "the KV cache (%.1f GiB, --kv-cache-gb) is larger than the memory free now"
            " (%.1f GiB): the server may be killed for memory as the cache fills",
            nbytes / gib,
            available / gib,
        )


def _meminfo(name: str) -> int | None:
    """A /proc/meminfo value in bytes (None: not Linux, or not listed)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key == name:
                    return int(value.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def bytes_per_block(groups: list[KVCacheGroup], block_size: int, dtype: torch.dtype) -> int:
    """Bytes of one block id: its tokens' K and V in one layer of each tensor pair."""
    width = max(len(g.layers) for g in groups)
    per_token = 0
    for j in range(width):
        layer = next(g.layers[j] for g in groups if j < len(g.layers))
        per_token += 2 * layer.num_kv_heads * layer.head_dim
    return per_token * block_size * dtype.itemsize
