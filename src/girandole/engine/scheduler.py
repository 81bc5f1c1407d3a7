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

Batch-job lines (`BATCH_TIER`, any priority below 0) take only what interactive sequences (the
other tiers) leave: interactive work is scheduled and admitted first, and no line is admitted
while an interactive sequence waits; a step that carries an interactive prefill carries no batch
rows at all (the newcomer's first token comes as fast as on an idle engine; the batch rows keep
their blocks and go on next step); an interactive newcomer that finds no free block or sequence
slot preempts running batch rows, and batch rows are the first victims when running sequences
need blocks. Without interactive work, batch rows run as any others.

A request whose LoRA adapter cannot be made resident (every `--max-loras` slot is in use) does
not hold up the requests behind it: base-model requests pass it, and requests for resident
adapters pass it a bounded number of times, so it is never starved (`_may_pass`).

A paused sequence (`pause`: its client has not read what it already made, see
engine/async_engine.py) is not scheduled. It keeps its blocks while nobody needs them, and it is
the first victim when running sequences or a newcomer need blocks, a seat or a LoRA slot: it is
then parked, in no queue, and `resume` puts it back at the head of its tier, to be recomputed
from its tokens.
A client that stops reading thus stops its own generation without holding back anyone else's.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from girandole.engine.images import fit_chunk
from girandole.engine.kv_cache import KVCacheManager
from girandole.engine.sequence import Sequence, SequenceStatus

PRIORITY_SHARE = 4  # priority admissions per default-tier admission while both tiers wait
# A waiting request whose LoRA adapter has no slot lets the requests behind it start: base-model
# requests always, requests for resident adapters this many times (then it gets the next slot).
MAX_LORA_PASSES = 16
PASS_SCAN_DEPTH = 256  # how far behind a blocked head the scheduler looks
BATCH_TIER = -1  # Sequence.priority of batch-job lines: below every interactive tier


def is_batch(seq: Sequence) -> bool:
    return seq.priority < 0


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

    def has_prefill(self) -> bool:
        return any(not s.is_decode(n) for s, n in zip(self.seqs, self.num_new_tokens))


@dataclass
class _Step:
    """What is left of one step while it is being scheduled."""

    budget: int  # tokens
    prefill_left: int  # prompt tokens
    # Running sequences in scheduling order, interactive first: those before `cursor` are
    # scheduled (or passed over), the rest are not yet, and preemption victims come from the end.
    order: list[Sequence]
    cursor: int = 0
    preempted: bool = False
    # Paused running sequences: never scheduled, the first preemption victims (from the end).
    paused: list[Sequence] = field(default_factory=list)


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv_cache: KVCacheManager) -> None:
        self.config = config
        self.kv_cache = kv_cache
        self.waiting: deque[Sequence] = deque()  # the default tier
        self.priority_waiting: deque[Sequence] = deque()  # service_tier "priority"
        self.batch_waiting: deque[Sequence] = deque()  # batch-job lines
        self.running: list[Sequence] = []  # paused ones included (they hold blocks)
        self.parked: set[Sequence] = set()  # paused and preempted: in no queue
        # finished sequences still in a waiting queue, dropped lazily
        self._num_removed_waiting = 0
        self._priority_streak = 0  # priority admissions since the default tier's last one
        self.num_preemptions = 0
        self.num_batch_yields = 0  # steps that left running batch rows out for a newcomer
        # Whether a waiting sequence may start beside `running` (the LoRA manager's resident
        # adapter slots); None: always.
        self.admit: Callable[[Sequence, list[Sequence]], bool] | None = None
        self._blocked: Sequence | None = None  # the head waiting for a LoRA slot
        self._num_passed = 0  # adapter requests admitted past it

    def _queue_of(self, seq: Sequence) -> deque[Sequence]:
        if seq.priority > 0:
            return self.priority_waiting
        return self.batch_waiting if is_batch(seq) else self.waiting

    def _queues(self) -> tuple[deque[Sequence], ...]:
        return (self.priority_waiting, self.waiting, self.batch_waiting)

    def add(self, seq: Sequence) -> None:
        self._queue_of(seq).append(seq)

    @property
    def num_waiting(self) -> int:
        return sum(len(q) for q in self._queues()) - self._num_removed_waiting

    def has_work(self) -> bool:
        """Whether a step would find anything to do (paused sequences wait for their client)."""
        return bool(self.num_waiting or any(not s.paused for s in self.running))

    @property
    def num_paused(self) -> int:
        return sum(s.paused for s in self.running) + len(self.parked)

    def pause(self, seq: Sequence) -> None:
        """Stop scheduling `seq` until `resume`: its client lags behind what it made."""
        if seq.is_finished or seq.paused:
            return
        seq.paused = True
        if seq.status is SequenceStatus.WAITING:  # preempted earlier: not admitted until resumed
            self._queue_of(seq).remove(seq)
            seq.status = SequenceStatus.PARKED
            self.parked.add(seq)

    def resume(self, seq: Sequence) -> None:
        """Schedule `seq` again; a parked one goes back to the head of its tier."""
        if not seq.paused:
            return
        seq.paused = False
        if seq.status is SequenceStatus.PARKED:
            self.parked.discard(seq)
            seq.status = SequenceStatus.WAITING
            self._queue_of(seq).appendleft(seq)

    def remove(self, seq: Sequence) -> None:
        """Take a sequence out of the queues and free its blocks (finish or abort).

        O(1) for a waiting sequence: it is marked finished and dropped when the queue reaches
        it (or at the next compaction), so aborting many queued requests stays linear.
        """
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)  # at most max_num_seqs long
        elif seq.status is SequenceStatus.PARKED:
            self.parked.discard(seq)
        elif seq.status is SequenceStatus.WAITING:
            self._num_removed_waiting += 1
            queued = sum(len(q) for q in self._queues())
            if self._num_removed_waiting > 64 and 2 * self._num_removed_waiting > queued:
                self._compact_waiting(seq)
        seq.status = SequenceStatus.FINISHED
        self.kv_cache.free(seq)

    def _compact_waiting(self, removed: Sequence) -> None:
        def kept(queue: deque[Sequence]) -> deque[Sequence]:
            return deque(s for s in queue if not s.is_finished and s is not removed)

        self.waiting = kept(self.waiting)
        self.priority_waiting = kept(self.priority_waiting)
        self.batch_waiting = kept(self.batch_waiting)
        self._num_removed_waiting = 0

    def _next_queue(self, batch_tier: bool) -> deque[Sequence] | None:
        """The queue whose head is admitted next (finished heads dropped), None when it is
        empty. Interactive: the priority tier, unless the default tier waits and its turn has
        come. Batch: the batch tier's own queue."""
        for queue in self._queues():
            while queue and queue[0].is_finished:  # removed while waiting
                queue.popleft()
                self._num_removed_waiting -= 1
        if batch_tier:
            return self.batch_waiting or None
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
        elif queue is not self.batch_waiting:
            self._priority_streak = 0

    def _preempt(self, seq: Sequence, step: _Step | None = None) -> None:
        """Free a running sequence's blocks and queue it again at the head of its tier (it is
        recomputed from its tokens), or park it if paused; `step`: the step being scheduled,
        which it leaves."""
        self.running.remove(seq)
        if step is not None:
            # never one already scheduled: victims come after `cursor`, or are paused
            (step.paused if seq.paused else step.order).remove(seq)
        seq.spec_token_ids = []
        self.kv_cache.free(seq)
        seq.num_preemptions += 1
        self.num_preemptions += 1
        if seq.paused:
            seq.status = SequenceStatus.PARKED
            self.parked.add(seq)
        else:
            seq.status = SequenceStatus.WAITING
            self._queue_of(seq).appendleft(seq)

    @staticmethod
    def _victim(step: _Step) -> Sequence:
        """The next sequence to preempt for blocks: a paused one, else the last in order."""
        return step.paused[-1] if step.paused else step.order[-1]

    def schedule(self, prefill_cap: Callable[[int], int | None] | None = None) -> ScheduledBatch:
        """The next step's work. `prefill_cap(decode_rows)`: the most prompt tokens a step that
        carries that many decodes may take (None: the token budget alone)."""
        batch = ScheduledBatch()
        # stable: interactive first, so batch rows are scheduled last and preempted first;
        # a sequence whose in-flight token is its last sits out (overlap scheduling)
        live = [s for s in self.running if not s.ends_pending]
        order = sorted((s for s in live if not s.paused), key=is_batch)
        interactive = [s for s in order if not is_batch(s)]
        budget = self.config.max_num_batched_tokens
        step = _Step(budget, self._prefill_left(prefill_cap, interactive, budget), order)
        step.paused = [s for s in live if s.paused]

        self._schedule_running(batch, step, batch_tier=False)
        self._admit_waiting(batch, step, batch_tier=False)
        if batch.has_prefill():
            # an interactive prefill: batch rows sit this step out, so its first token comes
            # as soon as on an idle engine
            if any(is_batch(s) for s in step.order[step.cursor :]):
                self.num_batch_yields += 1
            batch.order_decode_first()
            return batch
        # no prompt tokens so far: the cap counts every decode that may run
        step.prefill_left = self._prefill_left(prefill_cap, step.order, step.budget)
        self._schedule_running(batch, step, batch_tier=True)
        if self._next_queue(batch_tier=False) is None:  # a line never takes a newcomer's blocks
            self._admit_waiting(batch, step, batch_tier=True)
        batch.order_decode_first()
        return batch

    @staticmethod
    def _prefill_left(
        prefill_cap: Callable[[int], int | None] | None, running: list[Sequence], budget: int
    ) -> int:
        """The prompt tokens a step may carry beside the decodes of `running`."""
        if prefill_cap is None:
            return budget
        decode_rows = sum(
            1 for s in running if s.is_decode(s.num_uncomputed_tokens + len(s.spec_token_ids))
        )
        cap = prefill_cap(decode_rows)
        return budget if cap is None else cap

    def _schedule_running(self, batch: ScheduledBatch, step: _Step, batch_tier: bool) -> None:
        """Running sequences of one side (interactive, or batch rows) into the step, in order,
        while the budget lasts."""
        while step.cursor < len(step.order) and step.budget > 0:
            seq = step.order[step.cursor]
            if is_batch(seq) != batch_tier:
                return  # the interactive side ends where the batch rows begin
            n = min(seq.num_uncomputed_tokens + len(seq.spec_token_ids), step.budget)
            # proposals beyond the budget wait for a later step
            del seq.spec_token_ids[max(0, n - seq.num_uncomputed_tokens) :]
            decode = seq.is_decode(n)
            if not decode:
                n = min(n, step.prefill_left)
                if seq.images and n > 0:  # an image's tokens go in one chunk
                    n = fit_chunk(seq, n, step.budget)
                if n <= 0:  # a prefill chunk waits for the next step; decodes go on
                    step.cursor += 1
                    continue
            while not self.kv_cache.allocate(seq, n):
                if seq.spec_token_ids:  # proposals never cost a sequence its place
                    seq.spec_token_ids = []
                    n = min(seq.num_uncomputed_tokens, step.budget)
                    continue
                victim = self._victim(step)
                if victim is seq:
                    if len(self.running) == 1 and not batch.seqs:
                        batch.out_of_blocks.append(seq)
                        step.cursor += 1
                    else:
                        self._preempt(seq, step)
                    return
                self._preempt(victim, step)
                step.preempted = True
            batch.seqs.append(seq)
            batch.num_new_tokens.append(n)
            step.budget -= n
            if not decode:
                step.prefill_left -= n
            step.cursor += 1

    def _admit_waiting(self, batch: ScheduledBatch, step: _Step, batch_tier: bool) -> None:
        """Waiting sequences of one side into the step, in their tiers' order. Admit new work
        only when nothing had to be preempted: it would just thrash."""
        while (
            not step.preempted
            and not batch.out_of_blocks
            and step.budget > 0
            and step.prefill_left > 0
        ):
            queue = self._next_queue(batch_tier)
            if queue is None:
                return
            index = 0
            if (
                self.admit is not None
                and not self.admit(queue[0], self.running)
                and not (self._park_adapter_users(step) and self.admit(queue[0], self.running))
            ):
                found = self._may_pass(queue)
                if found is None:
                    return
                index = found
            seq = queue[index]
            if len(self.running) >= self.config.max_num_seqs and not self._make_room(seq, step):
                return
            if not seq.block_table:
                self.kv_cache.match_prefix(seq, seq.prefix_cache_max_len)
            n = min(seq.num_uncomputed_tokens, step.budget, step.prefill_left)
            if seq.images:  # an image's tokens go in one chunk
                n = fit_chunk(seq, n, step.budget)
                if n <= 0:  # waits for a step with room for the whole image
                    self.kv_cache.free(seq)  # release prefix hits; try again next step
                    return
            while not self.kv_cache.allocate(seq, n):
                if not self._make_room(seq, step):
                    self.kv_cache.free(seq)  # release prefix hits; try again next step
                    return
            self._admitted(queue, index)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            batch.seqs.append(seq)
            batch.num_new_tokens.append(n)
            step.budget -= n
            step.prefill_left -= n

    def _park_adapter_users(self, step: _Step) -> bool:
        """Park the paused sequences that run a LoRA adapter: a newcomer waits for a slot, and
        slots that only paused sequences use may go to it. False when there were none."""
        users = [s for s in step.paused if s.lora_source is not None]
        for seq in users:
            self._preempt(seq, step)
        return bool(users)

    def _make_room(self, newcomer: Sequence, step: _Step) -> bool:
        """Preempt for a newcomer: a paused sequence, else (for an interactive newcomer) the
        most recently admitted running batch row not yet in this step; False when none."""
        if step.paused:
            self._preempt(step.paused[-1], step)
            return True
        victim = step.order[-1] if step.order else None
        if is_batch(newcomer) or victim is None or not is_batch(victim):
            return False
        if step.order.index(victim) < step.cursor:
            return False  # already scheduled this step
        self._preempt(victim, step)
        return True

    def mark_computed(self, batch: ScheduledBatch) -> None:
        """The batch's tokens are in the KV cache: advance each sequence, and offer its blocks
        that became full to the prefix cache. Proposed tokens are not counted: the speculation
        step (girandole.engine.speculation) counts those it accepts once they are tokens."""
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            seq.num_computed_tokens += n - len(seq.spec_token_ids)
            self.kv_cache.register_full_blocks(seq)
