"""Speculative decoding: tokens proposed before a step, verified by the step's one forward.

Before each step the Speculator gives every running sequence that is decoding up to k proposed
tokens (`Sequence.spec_token_ids`). The scheduler gives such a row 1 + k new tokens, the runner
computes logits at all of them and keeps what girandole.sampling.rejection accepts; afterwards
`settle` marks the accepted positions computed and gives back the blocks that only rejected
positions used. Proposed tokens never enter `token_ids` before they are accepted, so the prefix
cache (which hashes `token_ids` up to `num_computed_tokens`) never sees them.

Sources, in order of preference:
- the request's prediction (`prediction` / `speculation`): tokens of the expected output; the
  proposal continues from where the output last matched it (re-found by the output's longest
  suffix that occurs in it after a divergence);
- a draft model with the same tokenizer (`draft_model`), greedy, with its own KV cache;
- n-gram lookup (`ngram_speculation_length`): the tokens that followed the latest earlier
  occurrence of the sequence's last few tokens in its prompt and output.

Each source's proposal length adapts per request (ProposalWindow, one rule for the three):
after a verified proposal it doubles if everything was accepted (up to the configured count:
prediction_token_count, draft_token_count, ngram_length), stays if at least half was, halves
otherwise. A prediction's starts at PREDICTION_WINDOW_START and never drops below 1 (proposing
it costs only verified positions, and it re-syncs after an edit). The draft model's and n-gram
lookup's start at the full count and drop to 0: a row they keep being wrong for (an adapter row
under a base-model draft, a draft that disagrees with the target, text without repetition)
stops paying k draft forwards and k verified positions a step, and proposes one token (a probe)
once PROBE_INTERVAL steps have passed without proposals, to find out whether they agree again.
A copy of the draft that fell behind meanwhile catches up in the probe's first step (as any
lagging copy does, below) and the probe comes a step later. Fewer proposals change no output:
verification emits each position's own sample.

Rows with a grammar or Mirostat do not speculate: their token choice depends on state (the
matcher, Mirostat's mu) that would have to be rolled back per position.

A row on a LoRA adapter speculates as a base row does: its verify row runs the adapter at every
position (`lora_manager.lora_batch` maps all of a row's new tokens), so what it emits is the
adapter's. The draft model has no adapter and proposes the base model's tokens for it: an
adapter is a low-rank change of the base, which often still agrees with it on many tokens, and
where it does not, a rejection costs the draft's forwards and the row's extra verified
positions, never a wrong token, and the row's window soon closes (`speculation-acceptance` shows
how often it agrees).

A draft model's copy of a sequence is computed the way the target prefills, in chunks: after
scheduling, within what the step's budget leaves (`LLMEngine._draft_budget`: the scheduler's
token budget and prompt-token cap less the target's own tokens of the step), first the copies
that lag (a long prompt, a copy released when the draft's cache was full, one left behind while
a prediction proposed or while the row's window was closed), then those of the step's
prefilling rows. A row proposes nothing until its copy is within a verify row (1 + k tokens, k
this step's window) of the end; it decodes plainly meanwhile.
"""

from __future__ import annotations

from array import array
from bisect import bisect_left
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from girandole.engine.kv_cache import KVCacheManager
from girandole.engine.sequence import Sequence

if TYPE_CHECKING:
    from girandole.engine.runner import ModelRunner
    from girandole.engine.scheduler import ScheduledBatch

# Longest / shortest suffix looked up by n-gram proposals and prediction re-synchronisation.
NGRAM_MAX = 4
NGRAM_MIN = 2
RESYNC_MAX = 8
RESYNC_MIN = 2  # one common token (a comma, " the") would re-sync anywhere
# A prediction's proposal length starts here (ProposalWindow: it grows while everything is
# accepted, up to prediction_token_count, and shrinks at rejections): a wrong one costs little.
PREDICTION_WINDOW_START = 4
# A draft model's or n-gram lookup's window that shrank to 0 proposes one token again after
# this many steps without proposals: a row whose proposer starts agreeing gets it back.
PROBE_INTERVAL = 8


@dataclass
class SpeculationConfig:
    ngram_length: int = 0  # tokens proposed by n-gram lookup; 0 = off
    draft_model: str | None = None  # a model with the target's tokenizer; None = off
    draft_token_count: int = 4  # tokens the draft model proposes per step
    prediction_token_count: int = 16  # tokens proposed per step from a request's prediction


@dataclass
class SpeculationState:
    """One sequence's proposer state and counts (reported in perf_metrics)."""

    prediction: list[int] | None = None  # the request's predicted output, tokenized
    cursor: int = 0  # index in `prediction` of the token expected next
    index: dict[tuple[int, int], list[int]] | None = field(default=None, repr=False)  # resync's
    synced_len: int = 0  # len(seq) when `cursor` was last known to be in step with the output
    window: ProposalWindow | None = None  # the prediction's proposal length
    proposer_window: ProposalWindow | None = None  # the draft model's or n-gram lookup's
    source: str | None = None  # where this step's proposal came from
    num_proposed: int = 0
    num_accepted: int = 0
    num_prediction_matched: int = 0  # accepted tokens that came from the prediction
    draft: Sequence | None = field(default=None, repr=False)  # the draft model's copy
    pairs: PairIndex | None = field(default=None, repr=False)  # n-gram lookup's, once used


class Speculator:
    def __init__(
        self, config: SpeculationConfig, max_model_len: int, draft: DraftModel | None = None
    ) -> None:
        self.config = config
        self.max_model_len = max_model_len
        self.draft = draft
        self._drafting: dict[str, Sequence] = {}  # request id -> target, while it has a draft
        self._lagging: list[Sequence] = []  # rows whose draft copy is too far behind to propose

    @property
    def enabled_for_all(self) -> bool:
        return self.config.ngram_length > 0 or self.draft is not None

    def start(self, seq: Sequence) -> None:
        """Attach the state of a new request (its prediction, if any)."""
        prediction = seq.params.speculation
        if prediction or self.enabled_for_all:
            c = self.config
            k = c.draft_token_count if self.draft is not None else c.ngram_length
            seq.speculation = SpeculationState(
                prediction=list(prediction or []) or None,
                window=ProposalWindow(
                    min(PREDICTION_WINDOW_START, c.prediction_token_count),
                    c.prediction_token_count,
                ),
                # a draft or n-gram proposal is expected to agree: it starts at its full length
                proposer_window=ProposalWindow(k, k, floor=0) if k > 0 else None,
            )

    # -- before a step -----------------------------------------------------------------------

    def propose(self, running: list[Sequence]) -> None:
        """Set `spec_token_ids` of every running sequence that decodes and may speculate."""
        self._release_finished()
        wanting_draft: list[tuple[Sequence, int]] = []
        for seq in running:
            seq.spec_token_ids = []
            state = seq.speculation
            if state is None or seq.paused:  # a paused sequence is not scheduled
                continue
            state.source = None
            limit = self._limit(seq)
            if limit <= 0:
                continue
            if state.prediction is not None:
                proposal = self._from_prediction(seq, state, limit)
                if proposal:
                    seq.spec_token_ids, state.source = proposal, "prediction"
                    continue
            if state.proposer_window is None:
                continue
            k = min(limit, state.proposer_window.size_now())
            if k <= 0:  # backed off: this row's proposals were rejected lately
                continue
            if self.draft is not None:
                wanting_draft.append((seq, k))
            else:
                if state.pairs is None:
                    state.pairs = PairIndex()
                proposal = ngram_proposal(seq.token_ids, k, state.pairs)
                if proposal:
                    seq.spec_token_ids, state.source = proposal, "ngram"
        self._lagging = []
        if wanting_draft:
            for (seq, _), proposal in zip(wanting_draft, self.draft.propose(wanting_draft)):
                self._drafting[seq.request_id] = seq
                if proposal:
                    seq.spec_token_ids, seq.speculation.source = proposal, "draft"
                elif self.draft.lags(seq):
                    self._lagging.append(seq)

    def catch_up_drafts(self, batch: ScheduledBatch, budget: int) -> None:
        """After scheduling, at most `budget` tokens in all (one forward): the draft model
        computes the next chunk of the copies too far behind to propose this step, then, with
        what is left, the copies of the step's prefilling rows that will ask it for proposals,
        up to where the target's chunk ends (a prompt that fits beside its own prefill is
        drafted in the same step, and the row proposes from its first decode step)."""
        rows = [(s, len(s)) for s in self._lagging if not s.is_finished]
        self._lagging = []
        if self.draft is None or budget <= 0:
            return
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            if not seq.is_decode(n) and self._drafts_later(seq):
                rows.append((seq, seq.num_computed_tokens + n))
        if rows:
            for seq, _ in rows:
                self._drafting[seq.request_id] = seq
            self.draft.catch_up(rows, budget)

    def _limit(self, seq: Sequence) -> int:
        """How many tokens `seq` may propose now: it must be decoding, and accepting them all
        plus one must stay within max_tokens and the context."""
        if seq.num_uncomputed_tokens != 1 or seq.num_computed_tokens < seq.num_prompt_tokens:
            return 0
        return self._room(seq) - 1

    def _room(self, seq: Sequence) -> int:
        """The tokens `seq` may still produce within max_tokens and the context; 0 where it
        never speculates (a grammar, Mirostat)."""
        p = seq.params
        if seq.grammar is not None or p.mirostat_target is not None:
            return 0
        return min(p.max_tokens - seq.num_output_tokens, self.max_model_len - len(seq))

    def _drafts_later(self, seq: Sequence) -> bool:
        """Whether `seq`, prefilling, will ask the draft model for proposals once it decodes
        (not with a prediction, which goes first: its draft starts when needed)."""
        state = seq.speculation
        if state is None or state.prediction is not None:
            return False
        return self._room(seq) > 2  # `_limit` once the prefill's token is out

    def _from_prediction(self, seq: Sequence, state: SpeculationState, limit: int) -> list[int]:
        pred = state.prediction
        new = seq.token_ids[max(state.synced_len, seq.num_prompt_tokens) :]
        if state.synced_len and pred[state.cursor : state.cursor + len(new)] == new:
            state.cursor += len(new)
        else:
            output = seq.output_token_ids
            if state.index is None and len(output) > 1:
                state.index = bigram_index(pred)  # once: each later re-sync looks pairs up
            found = resync(output, pred, state.cursor, state.index)
            if found is None:
                state.synced_len = 0  # out of step: look again after the next token
                return []
            state.cursor = found
        state.synced_len = len(seq)
        return pred[state.cursor : state.cursor + min(limit, state.window.size_now())]

    # -- after a step ------------------------------------------------------------------------

    def record(self, batch: ScheduledBatch, results: list) -> None:
        """Count, per speculating row, what was proposed and accepted."""
        for seq, result in zip(batch.seqs, results):
            if not seq.spec_token_ids or not isinstance(result, list):
                continue
            state = seq.speculation
            accepted = len(result) - 1
            proposed = len(seq.spec_token_ids)
            state.num_proposed += proposed
            state.num_accepted += accepted
            if state.source == "prediction":
                state.num_prediction_matched += accepted
                state.window.update(proposed, accepted)
            else:
                state.proposer_window.update(proposed, accepted)

    def settle(self, batch: ScheduledBatch, kv_cache: KVCacheManager) -> None:
        """Accepted proposals are tokens now: their K/V positions count as computed; blocks that
        only rejected positions used go back."""
        for seq in batch.seqs:
            if seq.is_finished:
                self.release(seq)
            if not seq.spec_token_ids:
                continue
            seq.spec_token_ids = []
            if seq.is_finished:
                continue
            seq.num_computed_tokens = len(seq) - 1  # all but the token sampled last
            kv_cache.trim(seq, len(seq))
            kv_cache.register_full_blocks(seq)

    def release(self, seq: Sequence) -> None:
        """A finished (or aborted) sequence gives back its draft model's KV blocks."""
        if self._drafting.pop(seq.request_id, None) is not None:
            self.draft.release(seq)

    def _release_finished(self) -> None:
        for seq in [s for s in self._drafting.values() if s.is_finished]:
            self.release(seq)


@dataclass
class ProposalWindow:
    """How many tokens one request's proposer offers per step, from how many of its last
    proposals were accepted: a row whose proposals are rejected stops paying for them (a draft
    model's forwards, verified positions that are thrown away), one whose proposals are
    accepted gets its full length. The rule, shared by the three sources: after a verified
    proposal, the window doubles if all of it was accepted (up to `cap`), stays if at least half
    was, halves otherwise (down to `floor`). A window of 0 proposes nothing, except one token
    (a probe) once PROBE_INTERVAL steps have passed without proposals; the probe accepted, the
    window is 2 again. A proposal cut short (the step's budget, max_tokens, the end of a
    prediction or of an n-gram match) is judged by what it offered."""

    size: int
    cap: int
    floor: int = 1
    idle: int = 0  # steps asked for a proposal while closed (size 0)

    def size_now(self) -> int:
        """The tokens to propose this step (call once per step the row may propose)."""
        if self.size > 0 or self.cap == 0:
            return self.size
        self.idle += 1
        # a probe stays due until one is verified (an n-gram may find nothing, a draft copy
        # that fell behind while closed first catches up)
        return 1 if self.idle > PROBE_INTERVAL else 0

    def update(self, proposed: int, accepted: int) -> None:
        """After a step that verified `proposed` tokens of this window and kept `accepted`."""
        if accepted == proposed:
            self.size = min(self.cap, 2 * max(self.size, 1))
        elif 2 * accepted < proposed:
            self.size = max(self.floor, self.size // 2)
        self.idle = 0


class PairIndex:
    """Where each pair of adjacent tokens ends in a growing token list, kept up to date a step
    at a time: an n-gram lookup reads only the occurrences of its suffix's last pair (a scan of
    the whole context cost 3-4 ms per row and step at 32k tokens, on the engine thread). Four
    bytes a token: each position links to the pair's occurrence before it."""

    __slots__ = ("latest", "previous", "last")

    def __init__(self) -> None:
        self.latest: dict[int, int] = {}  # pair key -> the last position where it ends
        self.previous = array("i")  # per position: where its pair ended before (-1: nowhere)
        self.last = -1  # the last token indexed (a list that changed is indexed anew)

    def update(self, tokens: list[int]) -> None:
        size, length = len(tokens), len(self.previous)
        if size < length or (length and tokens[length - 1] != self.last):
            self.latest.clear()
            del self.previous[:]
            length = 0
        latest, previous = self.latest, self.previous
        if length == 0 and size:
            previous.append(-1)  # the first token ends no pair
            length = 1
        for p in range(length, size):
            key = tokens[p - 1] << 32 | tokens[p]
            previous.append(latest.get(key, -1))
            latest[key] = p
        self.last = tokens[-1] if tokens else -1

    def ends(self, first: int, second: int) -> Iterator[int]:
        """Where the pair (first, second) ends, latest first."""
        p = self.latest.get(first << 32 | second, -1)
        while p >= 0:
            yield p
            p = self.previous[p]


def ngram_proposal(tokens: list[int], k: int, index: PairIndex | None = None) -> list[int]:
    """The k tokens that followed an earlier occurrence of the longest suffix of `tokens`
    (NGRAM_MAX down to NGRAM_MIN tokens long); [] if none occurs. The latest occurrence with k
    tokens after it is preferred (in a repeating stretch the latest one runs into the end).
    `index`: the sequence's PairIndex, brought up to date here (None: one made for this call)."""
    size = len(tokens)
    if size < NGRAM_MIN + 1:
        return []
    if index is None:
        index = PairIndex()
    index.update(tokens)
    for n in range(min(NGRAM_MAX, size - 1), NGRAM_MIN - 1, -1):
        suffix = tokens[size - n :]
        partial: int | None = None
        # `end`: where an occurrence ends; it must end before the suffix itself does. Every
        # suffix looked up ends with the last pair: only where that pair ends can it occur
        for end in index.ends(tokens[-2], tokens[-1]):
            if end > size - 2:
                continue
            if end < n - 1:
                break
            if tokens[end - n + 1 : end + 1] == suffix:
                if end + k < size:
                    return tokens[end + 1 : end + 1 + k]
                partial = end
        if partial is not None:
            return tokens[partial + 1 : partial + 1 + k]
    return []


def bigram_index(prediction: list[int]) -> dict[tuple[int, int], list[int]]:
    """Where each pair of adjacent tokens starts in `prediction`, in ascending order: `resync`
    looks a suffix up by its first two tokens instead of scanning the whole prediction each
    step (a long prediction the output has left would otherwise slow every step)."""
    index: dict[tuple[int, int], list[int]] = {}
    for i, pair in enumerate(zip(prediction, prediction[1:])):
        index.setdefault(pair, []).append(i)
    return index


def resync(
    output: list[int],
    prediction: list[int],
    cursor: int,
    index: dict[tuple[int, int], list[int]] | None = None,
) -> int | None:
    """Where in `prediction` the output continues: just after the longest suffix of `output`
    (RESYNC_MAX tokens at most) found in it, the occurrence nearest `cursor` preferred (the
    earlier one of two as near). None if not RESYNC_MIN tokens occur (but a 1-token output may
    match the prediction's start). An empty output continues at the start. `index`: the
    prediction's `bigram_index` (made here when not given)."""
    if not output:
        return 0
    if len(output) == 1:
        return 1 if prediction[:1] == output else None
    if index is None:
        index = bigram_index(prediction)
    for n in range(min(RESYNC_MAX, len(output)), RESYNC_MIN - 1, -1):
        suffix = output[-n:]
        starts = index.get((suffix[0], suffix[1]))
        if starts:
            start = _nearest_occurrence(prediction, suffix, starts, cursor - n)
            if start is not None:
                return start + n
    return None


def _nearest_occurrence(
    prediction: list[int], suffix: list[int], starts: list[int], target: int
) -> int | None:
    """The start nearest `target` among `starts` (ascending) where `suffix` occurs: candidates
    are tried outward from `target`, so the first that matches is the nearest."""
    hi = bisect_left(starts, target)
    lo = hi - 1
    n = len(suffix)
    while lo >= 0 or hi < len(starts):
        if hi == len(starts) or (lo >= 0 and target - starts[lo] <= starts[hi] - target):
            start, lo = starts[lo], lo - 1
        else:
            start, hi = starts[hi], hi + 1
        if prediction[start : start + n] == suffix:
            return start
    return None


class DraftModel:
    """A smaller model with the same tokenizer that proposes tokens greedily; its own runner and
    KV cache. Its copy of each sequence keeps the K/V of the tokens it has seen; after a step
    the positions past the first token that differs from the target's are recomputed."""

    def __init__(self, runner: ModelRunner, kv_cache: KVCacheManager) -> None:
        self.runner = runner
        self.kv_cache = kv_cache

    @classmethod
    def load(
        cls,
        path: str,
        mode: str,
        device: torch.device,
        block_size: int,
        kv_bytes: int,
        vocab: int,
        decode_graphs_max_batch: int = 0,
        kv_dtype_setting: str = "auto",
        int8_prompts: bool = False,
    ) -> DraftModel:
        """`decode_graphs_max_batch`: as ModelRunner's (the draft's proposals after the first
        are decode steps of one token per sequence: on CPU, replayed graphs)."""
        from girandole.engine.runner import ModelRunner
        from girandole.model.loader import load_model

        model, config = load_model(path, mode=mode, device=device)
        if config.vocab_size != vocab:
            raise ValueError(
                f"draft model {path} has a vocabulary of {config.vocab_size} tokens, the model "
                f"{vocab}: a draft model must share the model's tokenizer"
            )
        # Every position kept: a step may take back the draft's last proposals (_sync), whose
        # queries read keys that a sliding window would already have released.
        runner = ModelRunner(
            model,
            config,
            device,
            block_size,
            kv_bytes,
            decode_graphs_max_batch=decode_graphs_max_batch,
            sliding_window_cache=False,
            mode=mode,
            kv_dtype_setting=kv_dtype_setting,
            int8_prompts=int8_prompts,
        )
        return cls(runner, KVCacheManager(runner.num_blocks, block_size))

    def release(self, seq: Sequence) -> None:
        state = seq.speculation
        if state is not None and state.draft is not None:
            self.kv_cache.free(state.draft)
            state.draft = None

    @torch.inference_mode()
    def propose(self, wanted: list[tuple[Sequence, int]]) -> list[list[int]]:
        """Up to k greedy tokens for each (sequence, k); [] where the draft's copy lags more
        than a verify row's 1 + k tokens (`catch_up` computes it in chunks) or its cache is
        full."""
        drafts = [self._sync(seq) for seq, _ in wanted]
        ready = [len(d) - d.num_computed_tokens <= 1 + k for d, (_, k) in zip(drafts, wanted)]
        proposals: list[list[int]] = [[] for _ in wanted]
        for step in range(max(k for _, k in wanted)):
            active = [i for i, (_, k) in enumerate(wanted) if ready[i] and step < k]
            seqs, counts = [], []
            for i in active:
                d = drafts[i]
                n = len(d) - d.num_computed_tokens
                if not self.kv_cache.allocate(d, n):
                    self.release(wanted[i][0])
                    ready[i] = False
                    continue
                seqs.append(d)
                counts.append(n)
            if not seqs:
                break
            hidden = self.runner.execute(seqs, counts, [[n - 1] for n in counts])
            tokens = self.runner.compute_logits(hidden).argmax(dim=-1).tolist()
            for d, n, t in zip(seqs, counts, tokens):
                d.num_computed_tokens += n
                d.token_ids.append(t)
            for i in active:
                if ready[i]:
                    proposals[i].append(drafts[i].token_ids[-1])
        return proposals

    def lags(self, seq: Sequence) -> bool:
        """Whether the draft's copy of `seq` has tokens it has not computed (besides the last,
        which a proposal computes)."""
        d = seq.speculation.draft
        return d is None or d.num_computed_tokens < len(seq) - 1

    @torch.inference_mode()
    def catch_up(self, goals: list[tuple[Sequence, int]], budget: int) -> None:
        """One forward, without logits, of at most `budget` tokens: for each (sequence, goal)
        in order, the copy computes its next tokens up to position `goal`. A copy whose whole
        lag does not fit in the draft's free blocks is released instead (its row decodes
        plainly; it starts again when blocks are free)."""
        rows, counts = [], []
        for seq, goal in goals:
            if budget <= 0:
                break
            d = self._sync(seq, keep_last=True)
            if goal <= d.num_computed_tokens:
                continue
            if not self.kv_cache.can_allocate(d, len(d) - d.num_computed_tokens):
                self.release(seq)
                continue
            n = min(goal - d.num_computed_tokens, budget)
            self.kv_cache.allocate(d, n)
            rows.append(d)
            counts.append(n)
            budget -= n
        if rows:
            self.runner.execute(rows, counts, [[] for _ in counts])
            for d, n in zip(rows, counts):
                d.num_computed_tokens += n

    def _sync(self, seq: Sequence, keep_last: bool = False) -> Sequence:
        """The draft's copy of `seq`, holding `seq`'s tokens, with K/V kept up to the first
        position where its previous tokens (its own proposals) and the target's differ, and
        short of `seq`'s last token (the first proposal needs its logits) unless `keep_last`
        (a copy catching up: every token it has is the sequence's)."""
        state = seq.speculation
        d = state.draft
        if d is None:
            d = state.draft = Sequence(seq.request_id, seq.token_ids, seq.params)
            return d
        same = min(d.num_computed_tokens, len(seq) if keep_last else len(seq) - 1)
        for i in range(seq.num_prompt_tokens, same):
            if d.token_ids[i] != seq.token_ids[i]:
                same = i
                break
        d.token_ids = list(seq.token_ids)
        d.num_computed_tokens = same
        self.kv_cache.trim(d, same)
        return d


def uncount_dropped(state: SpeculationState, proposed: int, emitted: int, kept: int) -> None:
    """A stop condition (EOS, a stop token or string) ended a row on its accepted proposal
    number `kept` of the `emitted` tokens its step verified from `proposed` proposals: only the
    `kept` proposals were used, so the step counts that many proposed and accepted (the
    prediction's matched tokens never exceed the output)."""
    state.num_proposed -= proposed - kept
    dropped = emitted - 1 - kept
    state.num_accepted -= dropped
    if state.source == "prediction":
        state.num_prediction_matched -= dropped


def speculation_counts(seq: Sequence) -> dict[str, int]:
    """What a RequestOutput reports about a sequence's speculation (empty without any)."""
    state = seq.speculation
    if state is None:
        return {}
    counts = {"proposed": state.num_proposed, "accepted": state.num_accepted}
    if state.prediction is not None:
        counts["prediction_tokens"] = len(state.prediction)
        counts["prediction_matched"] = state.num_prediction_matched
    return counts
