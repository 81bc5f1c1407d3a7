"""Scheduler: picks, every step, which sequences run and how many tokens each computes.

Running sequences go first (one decode token each, or the next chunk of a prefill), then waiting
ones are admitted while the token budget, the sequence cap and the free KV blocks allow. Decode
tokens and prefill chunks share one step, decode tokens first. When a running sequence cannot
get a block, the most recently admitted one is preempted (its blocks freed, recomputed later
from its tokens). While decodes run, the prompt tokens of a step may be capped further
(`prefill_cap`, from engine/step_budget.py) so that a long prefill chunk never stalls streams.

Waiting sequences queue per tier (`Sequence.priority`: Fireworks' `service_tier: "priority"`
is 1, the default tier 0), first come first served within a tier. The priority tier goes first,
but while both tiers wait, one admission in every `PRIORITY_SHARE + 1` goes to the default tier,
so a steady stream of priority requests slows the default tier and never starves it.

A request whose LoRA adapter cannot be made resident (every `--max-loras` slot is in use) does
not hold up the requests behind it: base-model requests pass it, and requests for resident
adapters pass it a bounded number of times, so it is never starved (`_may_pass`).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from girandole.engine.kv_cache import KVCacheManager
from girandole.engine.sequence import Sequence, SequenceStatus

PRIORITY_SHARE = 4  # priority admissions per default-tier admission while both tiers wait
# A waiting request whose LoRA adapter has no slot lets the requests behind it start: base-model
# requests always, requests for resident adapters this many times (then it gets the next slot).
MAX_LORA_PASSES = 16
PASS_SCAN_DEPTH = 256  # how far behind a blocked head the scheduler looks


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
        self.waiting: deque[Sequence] = deque()  # the default tier
        self.priority_waiting: deque[Sequence] = deque()  # service_tier "priority"
        self.running: list[Sequence] = []
        # finished sequences still in a waiting queue, dropped lazily
        self._num_removed_waiting = 0
        self._priority_streak = 0  # priority admissions since the default tier's last one
        self.num_preemptions = 0
        # Whether a waiting sequence may start beside `running` (the LoRA manager's resident
        # adapter slots); None: always.
        self.admit: Callable[[Sequence, list[Sequence]], bool] | None = None
        self._blocked: Sequence | None = None  # the head waiting for a LoRA slot
        self._num_passed = 0  # adapter requests admitted past it

    def _queue_of(self, seq: Sequence) -> deque[Sequence]:
        return self.priority_waiting if seq.priority > 0 else self.waiting

    def add(self, seq: Sequence) -> None:
        self._queue_of(seq).append(seq)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting) + len(self.priority_waiting) - self._num_removed_waiting

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
            queued = len(self.waiting) + len(self.priority_waiting)
            if self._num_removed_waiting > 64 and 2 * self._num_removed_waiting > queued:
                self._compact_waiting(seq)
        seq.status = SequenceStatus.FINISHED
        self.kv_cache.free(seq)

    def _compact_waiting(self, removed: Sequence) -> None:
        def kept(queue: deque[Sequence]) -> deque[Sequence]:
            return deque(s for s in queue if not s.is_finished and s is not removed)

        self.waiting = kept(self.waiting)
        self.priority_waiting = kept(self.priority_waiting)
        self._num_removed_waiting = 0

    def _next_queue(self) -> deque[Sequence] | None:
        """The queue whose head is admitted next (finished heads dropped), None when both are
        empty: the priority tier, unless the default tier waits and its turn has come."""
        for queue in (self.priority_waiting, self.waiting):
            while queue and queue[0].is_finished:  # removed while waiting
                queue.popleft()
                self._num_removed_waiting -= 1
        if self.priority_waiting and not (self.waiting and self._priority_streak >= PRIORITY_SHARE):
            return self.priority_waiting
        return self.waiting or None

    def _may_pass(self, queue: deque[Sequence]) -> int | None:
        """The head of `queue` waits for a LoRA slot (every resident adapter is in use): the
        index of the first sequence behind it that may start instead, None if none may.

        A base-model request never takes a slot, so it always passes. A request for a resident
        adapter keeps that adapter in use, so it passes only `MAX_LORA_PASSES` times per
        blocked head; then the resident adapters drain and the head gets its slot."""
        head = queue[0]
        if self._blocked is not head:
            self._blocked, self._num_passed = head, 0
        for i in range(1, min(len(queue), PASS_SCAN_DEPTH)):
            seq = queue[i]
            if seq.is_finished:
                continue
            if seq.lora_source is None:
                return i
            if self._num_passed < MAX_LORA_PASSES and self.admit(seq, self.running):
                self._num_passed += 1
                return i
        return None

    def _admitted(self, queue: deque[Sequence], index: int = 0) -> None:
        if index:
            del queue[index]
            return  # passing a blocked head is not a tier's turn
        queue.popleft()
        if queue is self.priority_waiting and self.waiting:
            self._priority_streak += 1
        else:
            self._priority_streak = 0

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        seq.spec_token_ids = []
        self.kv_cache.free(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self._queue_of(seq).appendleft(seq)

    def schedule(self, prefill_cap: Callable[[int], int | None] | None = None) -> ScheduledBatch:
        """The next step's work. `prefill_cap(decode_rows)`: the most prompt tokens a step that
        carries that many decodes may take (None: the token budget alone)."""
        batch = ScheduledBatch()
        budget = self.config.max_num_batched_tokens
        preempted = False
        prefill_left = budget
        if prefill_cap is not None:
            decode_rows = sum(
                1
                for s in self.running
                if s.is_decode(s.num_uncomputed_tokens + len(s.spec_token_ids))
            )
            cap = prefill_cap(decode_rows)
            if cap is not None:
                prefill_left = cap

        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_uncomputed_tokens + len(seq.spec_token_ids), budget)
            # proposals beyond the budget wait for a later step
            del seq.spec_token_ids[max(0, n - seq.num_uncomputed_tokens) :]
            decode = seq.is_decode(n)
            if not decode:
                n = min(n, prefill_left)
                if n <= 0:  # a prefill chunk waits for the next step; decodes go on
                    i += 1
                    continue
            while not self.kv_cache.allocate(seq, n):
                if seq.spec_token_ids:  # proposals never cost a sequence its place
                    seq.spec_token_ids = []
                    n = min(seq.num_uncomputed_tokens, budget)
                    continue
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
            if not decode:
                prefill_left -= n
            i += 1

        # Admit new work only when nothing had to be preempted: it would just thrash.
        while (
            not preempted
            and not batch.out_of_blocks
            and budget > 0
            and prefill_left > 0
            and len(self.running) < self.config.max_num_seqs
        ):
            queue = self._next_queue()
            if queue is None:
                break
            index = 0
            if self.admit is not None and not self.admit(queue[0], self.running):
                found = self._may_pass(queue)
                if found is None:
                    break
                index = found
            seq = queue[index]
            if not seq.block_table:
                self.kv_cache.match_prefix(seq, seq.prefix_cache_max_len)
            n = min(seq.num_uncomputed_tokens, budget, prefill_left)
            if not self.kv_cache.allocate(seq, n):
                self.kv_cache.free(seq)  # release prefix hits; try again next step
                break
            self._admitted(queue, index)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            batch.seqs.append(seq)
            batch.num_new_tokens.append(n)
            budget -= n
            prefill_left -= n
        batch.order_decode_first()
        return batch

    def mark_computed(self, batch: ScheduledBatch) -> None:
        """The batch's tokens are in the KV cache: advance each sequence, and offer its blocks
        that became full to the prefix cache. Proposed tokens are not counted: the speculation
        step (girandole.engine.speculation) counts those it accepts once they are tokens."""
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            seq.num_computed_tokens += n - len(seq.spec_token_ids)
            self.kv_cache.register_full_blocks(seq)
