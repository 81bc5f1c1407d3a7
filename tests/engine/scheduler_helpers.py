"""Driving a Scheduler without a model (tests/engine/test_scheduler*.py): a real
KVCacheManager, steps that compute what was scheduled and "sample" a fixed token."""

from __future__ import annotations

from collections.abc import Callable

from girandole.engine.kv_cache import KVCacheManager
from girandole.engine.scheduler import ScheduledBatch, Scheduler, SchedulerConfig

BS = 4  # tokens per block
SAMPLED = 7  # the token every completed sequence "samples" in these tests


def make(num_blocks: int = 64, budget: int = 16, max_seqs: int = 8) -> Scheduler:
    config = SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=budget)
    return Scheduler(config, KVCacheManager(num_blocks, BS))


def step(sched: Scheduler, cap: Callable[[int], int | None] | None = None) -> ScheduledBatch:
    """One engine step without a model: schedule (with the prefill cap `cap`), compute, sample
    for completed sequences."""
    batch = sched.schedule(cap)
    sched.mark_computed(batch)
    for s in batch.seqs:
        if s.num_computed_tokens == len(s):
            s.token_ids.append(SAMPLED)
    return batch


def scheduled(batch: ScheduledBatch) -> list[tuple[str, int]]:
    return [(s.request_id, n) for s, n in zip(batch.seqs, batch.num_new_tokens)]
