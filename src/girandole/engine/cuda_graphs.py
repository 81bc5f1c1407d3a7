"""DecodeGraphs: CUDA graphs for decode steps (nano-vllm's capture_cudagraph, vLLM's buckets).

A decode step (every sequence one new token, no LoRA) runs as the replay of a graph captured at
start-up for the smallest batch-size bucket that holds it. Each graph reads static buffers
(token ids, positions, cache slots, block tables, context lengths) and writes a static output:
a step copies its inputs into the first rows, pads the rest of the bucket, replays, and reads
its rows back. A padding row has context length 0 (the decode kernel returns zeros for it)
and writes its K/V to a scratch slot past the cache's last block, so it touches nothing real.
Prefill and mixed steps run eagerly, and so do decode steps that record the MoE layers' routing
(router replay, `ForwardContext.routing`): a graph appends nothing to that list.

Only capture and replay need CUDA. Elsewhere (the GPU path on CPU, in the tests) `run` puts
the same padded static buffers through the eager model, so the bucket choice, padding and
buffer bookkeeping are exercised and must give what the unpadded step gives.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from girandole.model.context import ForwardContext, PagedTables, forward_context

logger = logging.getLogger(__name__)

# Memory the captured graphs may hold (their private pool) before larger buckets are dropped.
DEFAULT_MEMORY_BUDGET_BYTES = 1 << 30


def batch_buckets(max_batch_size: int) -> list[int]:
    """1, 2, 4, 8, then every 8 (16, 24, 32, ...) up to max_batch_size, which is always one."""
    buckets = [b for b in (1, 2, 4, 8) if b < max_batch_size]
    buckets += list(range(16, max_batch_size, 8))
    return [*buckets, max_batch_size]


def bucket_for(n: int, buckets: list[int]) -> int | None:
    """The smallest bucket holding n rows (None: more rows than the largest)."""
    return next((b for b in buckets if b >= n), None)


class StaticBuffers:
    """The graphs' inputs, sized for the largest bucket; bucket b uses the first b rows. Cache
    slots and block tables per KV cache group (engine/kv_groups.py)."""

    def __init__(
        self,
        max_batch_size: int,
        max_blocks_per_seq: int,
        scratch_slot: int,
        device,
        num_kv_groups: int = 1,
    ) -> None:
        self.scratch_slot = scratch_slot
        self.input_ids = torch.zeros(max_batch_size, dtype=torch.long, device=device)
        self.positions = torch.zeros(max_batch_size, dtype=torch.long, device=device)
        self.slot_mapping = torch.full(
            (num_kv_groups, max_batch_size), scratch_slot, dtype=torch.long, device=device
        )
        self.block_tables = torch.zeros(
            num_kv_groups, max_batch_size, max_blocks_per_seq, dtype=torch.int32, device=device
        )
        self.context_lens = torch.zeros(max_batch_size, dtype=torch.int32, device=device)
        # every row is one query token: row i's queries are [i, i + 1)
        self.query_start = torch.arange(max_batch_size + 1, dtype=torch.int32, device=device)

    def fill(self, ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext, bucket: int):
        """Copy a decode step's n rows into the first n entries; rows n..bucket-1 are padding."""
        n = ids.shape[0]
        self.input_ids[:n].copy_(ids)
        self.positions[:n].copy_(positions)
        for g, group in enumerate(ctx.groups or [ctx]):
            t = group.paged
            self.slot_mapping[g, :n].copy_(group.slot_mapping)
            self.block_tables[g, :n, : t.block_tables.shape[1]].copy_(t.block_tables)
        self.context_lens[:n].copy_(ctx.paged.context_lens)
        if bucket > n:
            self.input_ids[n:bucket].zero_()
            self.positions[n:bucket].zero_()
            self.slot_mapping[:, n:bucket].fill_(self.scratch_slot)
            self.context_lens[n:bucket].zero_()

    def context(self, bucket: int, block_size: int) -> ForwardContext:
        """The forward context that a bucket's graph is captured (and replayed) with."""
        groups = [
            ForwardContext(
                slot_mapping=self.slot_mapping[g, :bucket],
                query_lens=[1] * bucket,
                context_lens=[],
                context_slots=[],
                num_decode_rows=bucket,
                paged=PagedTables(
                    self.block_tables[g, :bucket],
                    self.context_lens[:bucket],
                    self.query_start[: bucket + 1],
                    max_query_len=1,
                    block_size=block_size,
                ),
            )
            for g in range(self.block_tables.shape[0])
        ]
        if len(groups) > 1:
            groups[0].groups = groups
        return groups[0]


class DecodeGraphs:
    def __init__(
        self,
        model: nn.Module,
        device: torch.device,
        block_size: int,
        max_batch_size: int,
        max_blocks_per_seq: int,
        scratch_slot: int,
        memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES,
        num_kv_groups: int = 1,
    ) -> None:
        self.model = model
        self.device = device
        self.block_size = block_size
        self.buckets = batch_buckets(max_batch_size)
        self.buffers = StaticBuffers(
            max_batch_size, max_blocks_per_seq, scratch_slot, device, num_kv_groups
        )
        self.memory_budget_bytes = memory_budget_bytes
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: torch.Tensor | None = None  # [max_batch_size, hidden], graphs write here
        self.max_blocks_per_seq = max_blocks_per_seq

    def can_run(self, ctx: ForwardContext) -> bool:
        """A decode step that a graph (or, off CUDA, the padded stand-in) can compute."""
        t = ctx.paged
        if t is None or not t.decode_only or ctx.lora is not None:
            return False
        if ctx.routing is not None:  # router replay: the graphs keep no MoE layer's expert ids
            return False
        if t.block_tables.shape[1] > self.max_blocks_per_seq:
            return False
        bucket = bucket_for(len(ctx.query_lens), self.buckets)
        if bucket is None:
            return False
        return self.device.type != "cuda" or bucket in self.graphs

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture one graph per bucket, largest first (they share one memory pool), dropping
        buckets whose capture would take the pool past the budget. A capture that fails leaves
        the engine eager for that bucket and smaller ones, with a warning."""
        if self.device.type != "cuda":
            return
        pool = torch.cuda.graph_pool_handle()
        start = torch.cuda.memory_reserved(self.device)
        for bucket in reversed(self.buckets):
            ctx = self.buffers.context(bucket, self.block_size)
            ids, pos = self.buffers.input_ids[:bucket], self.buffers.positions[:bucket]
            try:
                with forward_context(ctx):
                    warm = self.model(ids, pos)  # compiles the kernels outside the capture
                    if self.outputs is None:
                        shape = (len(self.buffers.input_ids), warm.shape[-1])
                        self.outputs = torch.zeros(shape, dtype=warm.dtype, device=self.device)
                    torch.cuda.synchronize(self.device)
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, pool=pool):
                        self.outputs[:bucket].copy_(self.model(ids, pos))
                torch.cuda.synchronize(self.device)
            except Exception:  # noqa: BLE001 - the engine stays correct, only slower
                logger.warning(
                    "capturing the decode graph of %d rows failed", bucket, exc_info=True
                )
                break
            used = torch.cuda.memory_reserved(self.device) - start
            if used > self.memory_budget_bytes:
                logger.info("decode graph of %d rows is over the memory budget: eager", bucket)
                del graph
                continue
            self.graphs[bucket] = graph
        logger.info("captured decode graphs for batch sizes %s", sorted(self.graphs))

    @torch.inference_mode()
    def run(self, ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """The decode step's hidden states [n, hidden] (a view of the static output on CUDA:
        read it before the next step)."""
        n = ids.shape[0]
        bucket = bucket_for(n, self.buckets)
        self.buffers.fill(ids, positions, ctx, bucket)
        if self.device.type == "cuda":
            self.graphs[bucket].replay()
            return self.outputs[:n]
        with forward_context(self.buffers.context(bucket, self.block_size)):
            out = self.model(self.buffers.input_ids[:bucket], self.buffers.positions[:bucket])
        return out[:n]
