"""The forward pass's context (nano-vllm's utils/context.py): what the ModelRunner tells every
layer about the flattened batch of T new tokens from S sequences that it is computing.

Attention reads where each token's keys and values live in the paged cache; the quantized
linears read how many leading rows are decode tokens. The runner sets it for the duration of a
forward (`with forward_context(ctx): model(...)`). Without a context (a model run on its own,
as in the reference tests) layers treat their input as one sequence starting at position 0.
"""

from __future__ import annotations

import contextlib
import threading
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from itertools import accumulate
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from girandole.model.lora import LoRABatch


class ContextSlots(Sequence[torch.Tensor]):
    """Per sequence, the cache slots of its positions 0..context_len-1: views of one KV cache
    group's slots of every sequence's blocks, concatenated (`slots`, each sequence's blocks
    `block_size` apart), split on first use and copied to `device` (None: kept on the host).
    Only attention's torch path and the GPU's padded decode read them per sequence; the native
    kernel reads the concatenation, so a CPU decode step no longer splits them (~0.2 ms a step
    for the default model's six groups)."""

    def __init__(
        self,
        slots: torch.Tensor,
        context_lens: list[int],
        block_size: int,
        device: torch.device | None,
    ) -> None:
        self.slots, self.context_lens = slots, context_lens
        self.block_size, self.device = block_size, device
        self._parts: list[torch.Tensor] | None = None

    def _split(self) -> list[torch.Tensor]:
        if self._parts is None:
            sizes = [-(-end // self.block_size) * self.block_size for end in self.context_lens]
            parts = [s[:end] for s, end in zip(self.slots.split(sizes), self.context_lens)]
            if self.device is not None:
                parts = [s.to(self.device) for s in parts]
            self._parts = parts
        return self._parts

    def __getitem__(self, i):  # type: ignore[override]
        return self._split()[i]

    def __len__(self) -> int:
        return len(self.context_lens)

    def __iter__(self) -> Iterator[torch.Tensor]:
        return iter(self._split())


@dataclass
class PaddedDecode:
    """Decode-only batches on GPU (every query_len == 1): one padded gather instead of a loop."""

    slots: torch.Tensor  # [S, L_max] long, padding points at slot 0
    positions: torch.Tensor  # [S] long: position of each query token
    valid: torch.Tensor  # [S, L_max] bool: key index < context_len

    @classmethod
    def build(cls, context_slots: Sequence[torch.Tensor], device: torch.device) -> PaddedDecode:
        lens = [len(s) for s in context_slots]
        padded = torch.zeros(len(lens), max(lens), dtype=torch.long)
        valid = torch.zeros(len(lens), max(lens), dtype=torch.bool)
        for i, s in enumerate(context_slots):
            padded[i, : len(s)] = s
            valid[i, : len(s)] = True
        positions = torch.tensor([n - 1 for n in lens], dtype=torch.long)
        return cls(padded.to(device), positions.to(device), valid.to(device))


@dataclass
class NativeSlots:
    """The native paged attention kernel's view (CPU), per query row: where its sequence's slots
    start in `slots` (every sequence's context slots, concatenated) and how many keys it sees."""

    slots: torch.Tensor  # long: cache slots of every sequence's positions, concatenated
    starts: torch.Tensor  # [T] long
    lens: torch.Tensor  # [T] long: the row's position + 1

    @classmethod
    def build(
        cls, query_lens: list[int], context_slots: list[torch.Tensor], positions: torch.Tensor
    ) -> NativeSlots:
        starts: list[int] = []
        offset = 0
        for n, slots in zip(query_lens, context_slots):
            starts.extend([offset] * n)
            offset += len(slots)
        return cls(torch.cat(context_slots), torch.tensor(starts, dtype=torch.long), positions + 1)


@dataclass
class PagedTables:
    """The Triton kernels' view (the GPU path, model/kernels/triton_paged_attention.py): block
    tables and lengths as int32 device tensors, read in place by the kernels."""

    block_tables: torch.Tensor  # [S, max_blocks] int32; unused entries 0
    context_lens: torch.Tensor  # [S] int32: cached + new tokens of each sequence
    query_start: torch.Tensor  # [S + 1] int32: sequence i's rows are [start[i], start[i+1])
    max_query_len: int
    block_size: int

    @property
    def decode_only(self) -> bool:
        return self.max_query_len == 1

    @classmethod
    def build(
        cls,
        block_tables: list[list[int]],
        query_lens: list[int],
        context_lens: list[int],
        block_size: int,
        device: torch.device,
    ) -> PagedTables:
        """From each sequence's block ids (only those its context uses are kept), in one copy to
        the device."""
        return cls.build_groups([block_tables], query_lens, context_lens, block_size, device)[0]

    @classmethod
    def build_groups(
        cls,
        group_tables: list[list[list[int]]],
        query_lens: list[int],
        context_lens: list[int],
        block_size: int,
        device: torch.device,
    ) -> list[PagedTables]:
        """One PagedTables per KV cache group (engine/kv_groups.py) from each group's block
        tables, sharing the lengths; every group's tables in one copy to the device."""
        s, g = len(query_lens), len(group_tables)
        used = [-(-n // block_size) for n in context_lens]
        width = max(1, *used)
        flat = array("i")  # every group's [S, width] table, then the lengths and starts
        for block_tables in group_tables:
            for table, k in zip(block_tables, used):
                flat.extend(table[:k])
                flat.extend([0] * (width - k))
        flat.extend(context_lens)
        flat.extend(accumulate(query_lens, initial=0))
        size = g * s * width
        # array -> frombuffer: one host tensor without a Python loop over its elements
        dev = to_device(torch.frombuffer(flat, dtype=torch.int32), device)
        lens, starts = dev[size : size + s], dev[size + s :]
        return [
            cls(t, lens, starts, max(query_lens), block_size) for t in dev[:size].view(g, s, width)
        ]


def to_device(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """Host tensor `t` on `device`. To a GPU the copy is asynchronous, from pinned memory: a
    plain copy from pageable memory synchronizes the stream, so the host would wait for the
    step in flight (overlap scheduling, engine/engine.py). On the host: `t` itself."""
    device = torch.device(device)
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


@dataclass
class ForwardContext:
    """The batch of T new tokens from S sequences, in batch order."""

    slot_mapping: torch.Tensor  # [T] long: cache slot that each new token's K/V is written to
    query_lens: list[int]  # new tokens of each sequence (sum = T)
    context_lens: list[int]  # keys each sequence attends to: cached + new tokens
    # Per sequence: [context_len] long, the cache slot of every position 0..context_len-1
    # (a list, or the runner's ContextSlots, split on first use).
    context_slots: Sequence[torch.Tensor]
    # The first this-many tokens of the batch are decode tokens (one generated token of a
    # sequence); linears with two kernels pick theirs by this role, not by the row count.
    num_decode_rows: int | None = None
    # Prompt rows too take the decode rows' int8 kernel where linears have two (CPUs without
    # AMX: EngineConfig.int8_prompts); False: they take the bf16 one.
    int8_prompts: bool = False
    padded_decode: PaddedDecode | None = None  # set for the GPU's padded decode path
    native: NativeSlots | None = None  # set where the native attention kernel may run
    paged: PagedTables | None = None  # set on the GPU path: the Triton kernels run
    lora: LoRABatch | None = None  # rows that run an adapter (model/lora.py); None: base only
    # Router replay: a list that each mixture-of-experts layer appends its chosen expert ids
    # [T, k] to, in layer order (model/moe.py); None: not recorded.
    routing: list[torch.Tensor] | None = None
    # Per KV cache group (engine/kv_groups.py), the context its layers read: the same batch
    # with that group's slots. None: one group, whose slots are the fields above.
    groups: list[ForwardContext] | None = None


@dataclass
class ImageBatch:
    """The images among a forward's new tokens (Gemma 3 vision): their embeddings replace the
    image tokens' embeddings, and the tokens of one image attend to each other both ways."""

    rows: torch.Tensor  # [N] long: the rows of the flattened batch that are image tokens
    embeds: torch.Tensor  # [N, hidden] float32: their embeddings, in row order
    # Per sequence of the batch, in batch order: the [start, end) positions of each image's
    # tokens that this forward's queries may attend to bidirectionally (all in this chunk).
    spans: list[list[tuple[int, int]]]
    # The GPU path's per-row view of `spans`, built once per forward (row_spans)
    _row_spans: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)

    def row_spans(
        self, query_lens: list[int], context_lens: list[int], device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The Triton prefill kernel's view: [T] int32 start and end of the image span each
        query row is in ((0, 0) outside any image), on `device`, in one copy."""
        if self._row_spans is None:
            flat = torch.zeros(2, sum(query_lens), dtype=torch.int32)
            row = 0
            for qlen, ctx_len, spans in zip(query_lens, context_lens, self.spans):
                first = ctx_len - qlen  # the position of the sequence's first query row
                for start, end in spans:
                    lo, hi = row + max(start - first, 0), row + min(end - first, qlen)
                    flat[0, lo:hi], flat[1, lo:hi] = start, end
                row += qlen
            dev = to_device(flat, device)
            self._row_spans = (dev[0], dev[1])
        return self._row_spans


class _Current(threading.local):
    """The context of this thread's forward: each engine steps on a thread of its own, and
    several engines run in one process (the server's model and its deployments). One global
    context was overwritten by another engine's step: its attention wrote keys and values into
    the other's cache slots (an assertion, the requests aborted, then a segfault)."""

    ctx: ForwardContext | None = None
    images: ImageBatch | None = None


_current = _Current()


def get_context() -> ForwardContext | None:
    """The context of the forward being computed, or None outside an engine step."""
    return _current.ctx


def current_decode_rows() -> int | None:
    """Leading decode rows of the batch being computed, or None outside an engine step."""
    ctx = _current.ctx
    return None if ctx is None else ctx.num_decode_rows


def int8_prompt_rows() -> bool:
    """Whether the forward being computed runs its prompt rows on the int8 kernel too."""
    ctx = _current.ctx
    return ctx is not None and ctx.int8_prompts


def get_images() -> ImageBatch | None:
    """The images of the forward being computed (set by the vision model's forward)."""
    return _current.images


@contextlib.contextmanager
def image_context(images: ImageBatch | None) -> Iterator[None]:
    previous, _current.images = _current.images, images
    try:
        yield
    finally:
        _current.images = previous


@contextlib.contextmanager
def forward_context(ctx: ForwardContext | None) -> Iterator[None]:
    previous, _current.ctx = _current.ctx, ctx
    try:
        yield
    finally:
        _current.ctx = previous
