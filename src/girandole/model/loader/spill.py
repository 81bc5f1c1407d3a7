"""SpillArena: file-backed memory for a packed-model build's finished tensors.

A packed-model cache entry (model/loader/__init__.py) is built in a child process that holds the
whole packed model until `torch.save` writes it: peak anonymous memory was ~1.5x the entry (2.75
GiB for a 1.85 GB entry of four Qwen3-30B-A3B layers), so a 17 GB Qwen3-30B-A3B file, which
llama.cpp maps in 24 GiB, could not be packed on such a machine. As each decoder layer is built its
tensors are moved here instead: chunks of a scratch file mapped shared, whose pages the kernel
writes back and drops under pressure, so the build's anonymous memory is one layer's (and the
embeddings') whatever the model's depth. `torch.save` then writes the chunks as the entry's
storages (each tensor a view at a 64-byte-aligned offset; the last chunk cut to what it holds), and
`torch.load(mmap=True)` maps them as before.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch import nn

from girandole.engine.heap import release_free_heap

CHUNK_BYTES = 64 << 20  # a tensor larger than this gets a chunk of its own size
ALIGN = 64  # the native kernels' loads: every tensor starts on a cache line


class SpillArena:
    def __init__(self, path: Path, chunk_bytes: int = CHUNK_BYTES) -> None:
        """`path`: the scratch file (created; the caller removes it once the model is saved)."""
        self.path = path
        self.chunk_bytes = chunk_bytes
        self.file_bytes = 0  # the scratch file's length: every chunk so far
        path.write_bytes(b"")
        # torch.save refuses a storage viewed as two dtypes: a chunk holds tensors of one dtype
        self._chunks: dict[torch.dtype, _Chunk] = {}
        self._owned: set[int] = set()  # data_ptr of every chunk

    @torch.no_grad()
    def take(self, module: nn.Module) -> nn.Module:
        """Move `module`'s parameters and buffers (contiguous CPU tensors not yet here) into the
        arena, in place; give the C heap's freed pages back. Returns `module`."""
        for mod in module.modules():
            for store in (mod._parameters, mod._buffers):
                for key, t in list(store.items()):
                    if t is None or t.device.type != "cpu" or t.nbytes == 0:
                        continue
                    if not t.is_contiguous() or self._holds(t):
                        continue
                    store[key] = self._place(store, key, t)
        release_free_heap()
        return module

    def finish(self) -> None:
        """Cut each dtype's last chunk to what it holds (torch.save writes a storage whole)."""
        for chunk in self._chunks.values():
            self._cut(chunk)

    def _cut(self, chunk: _Chunk) -> None:
        """Map just the used part of `chunk`'s file region anew (the same pages: nothing is
        copied) and point its tensors there; the full-size mapping goes with its last view."""
        if chunk.used == chunk.data.numel():
            return
        chunk.data = self._map(chunk.file_offset, chunk.data.dtype, chunk.used)
        for store, key, offset, shape in chunk.placed:
            store[key] = _view(chunk.data, store[key], offset, shape)

    def _holds(self, t: torch.Tensor) -> bool:
        return t.untyped_storage().data_ptr() in self._owned

    def _place(self, store: dict, key: str, t: torch.Tensor) -> torch.Tensor:
        """A copy of `t` in its dtype's chunk; a new chunk where `t` does not fit (the full one
        cut to what it holds)."""
        step = max(1, ALIGN // t.element_size())
        size = -(-t.numel() // step) * step
        chunk = self._chunks.get(t.dtype)
        if chunk is None or chunk.used + size > chunk.data.numel():
            if chunk is not None:
                self._cut(chunk)
            elements = max(self.chunk_bytes // t.element_size(), size)
            nbytes = -(-elements * t.element_size() // ALIGN) * ALIGN
            chunk = _Chunk(self._map(self.file_bytes, t.dtype, elements), self.file_bytes)
            self.file_bytes += nbytes
            self._chunks[t.dtype] = chunk
        offset = chunk.used
        chunk.used += size
        chunk.placed.append((store, key, offset, t.shape))
        out = _view(chunk.data, t, offset, t.shape)
        out.copy_(t)
        return out

    def _map(self, file_offset: int, dtype: torch.dtype, elements: int) -> torch.Tensor:
        """`elements` of `dtype` at `file_offset` of the scratch file, mapped shared (np.memmap
        maps from the page boundary below an offset not on one, and grows the file to reach)."""
        nbytes = elements * dtype.itemsize
        mapped = np.memmap(
            self.path, dtype=np.uint8, mode="r+", offset=file_offset, shape=(nbytes,)
        )
        raw = torch.from_numpy(mapped)  # holds the mapping while any view of it lives
        self._owned.add(raw.untyped_storage().data_ptr())
        return raw.view(dtype)


class _Chunk:
    def __init__(self, data: torch.Tensor, file_offset: int) -> None:
        self.data = data  # [elements] of the chunk's dtype
        self.file_offset = file_offset  # a multiple of ALIGN
        self.used = 0  # elements given out
        self.placed: list[tuple[dict, str, int, torch.Size]] = []  # (store, key, offset, shape)


def _view(data: torch.Tensor, like: torch.Tensor, offset: int, shape) -> torch.Tensor:
    """`data`'s elements at `offset` in `shape`, of `like`'s kind (a Parameter stays one)."""
    t = data[offset : offset + math.prod(shape)].view(shape)
    if isinstance(like, nn.Parameter):
        return nn.Parameter(t, requires_grad=like.requires_grad)
    return t
