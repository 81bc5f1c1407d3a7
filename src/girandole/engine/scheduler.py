"""Scheduler: picks, every step, which sequences run and how many tokens each computes.

Running sequences go first (one decode token each, or the next chunk of a prefill), then waiting
ones are admitted while the token budget, the sequence cap and the free KV blocks allow. Decode
tokens and prefill chunks share one step, decode tokens first. When a running sequence cannot
get a block, the most recently admitted one is preempted (its blocks freed, recomputed later
from its tokens).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from girandole.engine.kv_cache import KVCacheManager
from girandole.engine.sequence import Sequence, SequenceStatus


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512  # token budget of one step (decode tokens + prefill chunks)
    max_model_len: int = 4096


@dataclass
class ScheduledBatch:
    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    # Sequences that cannot grow even with everything else preempted: they end with "length".
    out_of_blocks: list[Sequence] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.seqs)

    def order_decode_first(self) -> None:
        """Decode tokens first: linears choose their kernel by a token's role (decode or
        prefill), which the runner tells them as a count of leading rows."""
        order = sorted(
            range(len(self.seqs)), key=lambda i: not self.seqs[i].is_decode(self.num_new_tokens[i])
        )
        self.seqs = [self.seqs[i] for i in order]
        self.num_new_tokens = [self.num_new_tokens[i] for i in order]


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv_cache: KVCacheManager) -> None:
        self.config = config
        self.kv_cache = kv_cache
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._num_removed_waiting = 0  # finished sequences still in `waiting`, dropped lazily
        self.num_preemptions = 0
        # Whether a waiting sequence may start beside `running` (the LoRA manager's resident
        # adapter slots); None: always.
        self.admit: Callable[[Sequence, list[Sequence]], bool] | None = None

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting) - self._num_removed_waiting

    def has_work(self) -> bool:
        return bool(self.num_waiting or self.running)

    def remove(self, seq: Sequence) -> None:
        """Take a sequence out of the queues and free its blocks (finish or abort).

        O(1) for a waiting sequence: it is marked finished and dropped when the queue reaches
        it (or at the next compaction), so aborting many queued requests stays linear.
        """
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)  # at most max_num_seqs long
        elif seq.status is SequenceStatus.WAITING:
            self._num_removed_waiting += 1
            if self._num_removed_waiting > 64 and 2 * self._num_removed_waiting > len(self.waiting):
                self._compact_waiting(seq)
        seq.status = SequenceStatus.FINISHED
        self.kv_cache.free(seq)

    def _compact_waiting(self, removed: Sequence) -> None:
        self.waiting = deque(s for s in self.waiting if not s.is_finished and s is not removed)
        self._num_removed_waiting = 0

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.kv_cache.free(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.config.max_num_batched_tokens
        preempted = False

        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_uncomputed_tokens, budget)
            while not self.kv_cache.allocate(seq, n):
                victim = self.running[-1]
                if victim is seq:
                    if len(self.running) == 1 and not batch.seqs:
                        batch.out_of_blocks.append(seq)
                    else:
                        self._preempt(seq)
                    seq = None
                    break
                self._preempt(victim)
                preempted = True
            if seq is None:
                break
            batch.seqs.append(seq)
            batch.num_new_tokens.append(n)
            budget -= n
            i += 1

        # Admit new work only when nothing had to be preempted: it would just thrash.
        while (
            not preempted
            and not batch.out_of_blocks
            and self.waiting
            and budget > 0
            and len(self.running) < self.config.max_num_seqs
        ):
            seq = self.waiting[0]
            if seq.is_finished:  # removed while waiting
                self.waiting.popleft()
                self._num_removed_waiting -= 1
                continue
            if self.admit is not None and not self.admit(seq, self.running):
                break
            if not seq.block_table:
                self.kv_cache.match_prefix(seq, seq.prefix_cache_max_len)
            n = min(seq.num_uncomputed_tokens, budget)
            if not self.kv_cache.allocate(seq, n):
                self.kv_cache.free(seq)  # release prefix hits; try again next step
                break
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            batch.seqs.append(seq)
            batch.num_new_tokens.append(n)
            budget -= n
        batch.order_decode_first()
        return batch

    def mark_computed(self, batch: ScheduledBatch) -> None:
        """The batch's tokens are in the KV cache: advance each sequence, and offer its blocks
        that became full to the prefix cache."""
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            seq.num_computed_tokens += n
            self.kv_cache.register_full_blocks(seq)
