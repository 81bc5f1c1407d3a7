"""Postprocessing of a step: each sampled token appended to its sequence, checked against EOS,
stop tokens, stop strings, the grammar and the length limits, detokenized, and reported as a
RequestOutput (girandole.engine.outputs). Finished sequences leave the scheduler here."""

from __future__ import annotations

import dataclasses
import logging
import time

from girandole.engine.outputs import FinishReason, RequestOutput
from girandole.engine.pooling import pooled
from girandole.engine.scheduler import ScheduledBatch, Scheduler
from girandole.engine.sequence import Sequence, SequenceStatus
from girandole.engine.speculation import speculation_counts, uncount_dropped
from girandole.sampling.grammar import TOKEN_CPU_LIMIT
from girandole.sampling.sampler import SampleResult

logger = logging.getLogger(__name__)


class Postprocessor:
    def __init__(
        self,
        scheduler: Scheduler,
        seqs: dict[str, Sequence],
        eos_token_ids: set[int],
        max_model_len: int,
    ) -> None:
        self.scheduler = scheduler
        self.seqs = seqs  # the engine's live requests by id: finished ones are dropped
        self.eos_token_ids = eos_token_ids
        self.max_model_len = max_model_len

    def __call__(
        self,
        batch: ScheduledBatch,
        results: list[SampleResult | list[SampleResult] | Exception | None],
    ) -> list[RequestOutput]:
        """Outputs of a computed step; `results[i]`: batch.seqs[i]'s sampled token (tokens, for a
        row that verified proposals), the error that sampling it raised, or None where nothing
        was sampled (a prefill chunk)."""
        outputs: list[RequestOutput] = []
        now = time.monotonic()
        for seq, result in zip(batch.seqs, results):
            if seq.is_finished:  # ended (or aborted) while this step was in flight: dropped
                continue
            if result is None:
                if seq.num_computed_tokens == len(seq) and seq.params.max_tokens == 0:
                    # A scoring or pooling request (max_tokens 0) ends after its prefill.
                    outputs.append(self.finish(seq, "length", []))
                continue
            try:
                if isinstance(result, Exception):
                    raise result
                if isinstance(result, list):
                    out = self.append_tokens(seq, result, now)
                else:
                    out = self.append_token(seq, result, now)
            except Exception as exc:  # one request's failure must not take the batch down
                logger.exception("request %s failed after sampling", seq.request_id)
                out = self.abort(seq)
                out.extra["error"] = f"{type(exc).__name__}: {exc}"
            outputs.append(out)
        return outputs

    def append_tokens(
        self, seq: Sequence, results: list[SampleResult], now: float
    ) -> RequestOutput:
        """Several tokens of one step (accepted proposals and the token after them), checked one
        by one: a stop condition met midway ends the sequence there and drops the rest."""
        outs: list[RequestOutput] = []
        for result in results:
            outs.append(self.append_token(seq, result, now))
            if seq.is_finished:
                break
        if len(outs) < len(results) and seq.speculation is not None:
            # ended on an accepted proposal: the proposals after it were never used, and the
            # step's counts (Speculator.record) must not report them as proposed or accepted
            uncount_dropped(seq.speculation, len(seq.spec_token_ids), len(results), len(outs))
            outs[-1] = dataclasses.replace(outs[-1], speculation=speculation_counts(seq))
        if len(outs) == 1:
            return outs[0]
        logprobs = None
        if seq.params.logprobs is not None:
            logprobs = [lp for o in outs for lp in o.logprobs or []]
        prompt_logprobs = next((o.prompt_logprobs for o in outs if o.prompt_logprobs), None)
        return dataclasses.replace(
            outs[-1],
            new_token_ids=[t for o in outs for t in o.new_token_ids],
            new_text="".join(o.new_text for o in outs),
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
        )

    def append_token(self, seq: Sequence, result: SampleResult, now: float) -> RequestOutput:
        if result.dead_end:  # the grammar allows no token: end rather than emit garbage
            return self.finish(seq, "stop", [], stop_reason="grammar_dead_end", flush=True)
        token = result.token_id
        if seq.grammar is not None and not seq.grammar.accept(token):
            return self.finish(seq, "stop", [], stop_reason="grammar_rejected", flush=True)
        if seq.grammar is not None and seq.grammar.too_slow:
            # a grammar whose work per token grows (an ambiguous one) would stall the batch: the
            # request ends before this token, its text so far kept, as an error
            logger.warning(
                "request %s: its grammar took %.0f ms of CPU for one token; ended",
                seq.request_id, seq.grammar.last_token_cpu * 1000,
            )  # fmt: skip
            out = self.finish(seq, "abort", [], stop_reason="grammar_too_slow", flush=True)
            out.extra["error"] = (
                f"GrammarTooSlow: one token's grammar work took "
                f"{seq.grammar.last_token_cpu * 1000:.0f} ms of CPU (the limit is "
                f"{TOKEN_CPU_LIMIT * 1000:.0f} ms)"
            )
            return out
        if seq.routing is not None:  # the position before the token's predicted it
            result.routing = seq.routing.get(len(seq.token_ids) - 1)
        seq.token_ids.append(token)
        if seq.params.logprobs is not None:
            seq.pending_logprobs.append(result)
        if seq.first_token_time is None:
            seq.first_token_time = now
        if seq.grammar is not None and seq.grammar.is_terminated:
            # the grammar took its stop token: nothing may follow, even with ignore_eos; the
            # token was generated like any EOS, so it is counted and has its logprobs entry
            return self.finish(seq, "stop", [token], stop_reason=token)
        params = seq.params
        if not params.ignore_eos and token in self.eos_token_ids:
            return self.finish(seq, "stop", [token], stop_reason=token)
        if token in params.stop_token_ids:
            return self.finish(seq, "stop", [token], stop_reason=token)

        text = seq.detokenizer.add([token])
        if seq.stop_matcher is not None:
            text, stopped = seq.stop_matcher.feed(text)
            if stopped:
                reason = getattr(seq.stop_matcher, "matched", None)
                return self.finish(seq, "stop", [token], text, stop_reason=reason)
        if seq.num_output_tokens >= params.max_tokens or len(seq) >= self.max_model_len:
            return self.finish(seq, "length", [token], text, flush=True)
        return request_output(seq, [token], text)

    def finish(
        self,
        seq: Sequence,
        reason: FinishReason,
        new_tokens: list[int],
        text: str = "",
        *,
        stop_reason: str | int | None = None,
        flush: bool | None = None,
    ) -> RequestOutput:
        """Finish `seq`; unless a stop string ended it, release the text still held back."""
        if flush is None:
            flush = not isinstance(stop_reason, str)
        if flush:
            tail = seq.detokenizer.flush()
            if seq.stop_matcher is not None:
                tail, stopped = seq.stop_matcher.feed(tail)
                if stopped:
                    stop_reason, reason = getattr(seq.stop_matcher, "matched", None), "stop"
                else:
                    tail += seq.stop_matcher.flush()
            text += tail
        seq.stop_reason = stop_reason
        self.scheduler.remove(seq)
        self.mark_finished(seq, reason)
        return request_output(seq, new_tokens, text)

    def abort(self, seq: Sequence) -> RequestOutput:
        """End `seq` where it stands, without flushing held-back text."""
        self.scheduler.remove(seq)
        self.mark_finished(seq, "abort")
        return request_output(seq, [], "")

    def mark_finished(self, seq: Sequence, reason: FinishReason) -> None:
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        seq.finished_time = time.monotonic()
        self.seqs.pop(seq.request_id, None)


def request_output(seq: Sequence, new_tokens: list[int], text: str) -> RequestOutput:
    """What `seq` reports now: `new_tokens` and `text` since its previous output, the logprobs
    gathered since then, and its prompt logprobs once they are complete."""
    logprobs = None
    if seq.params.logprobs is not None:
        logprobs, seq.pending_logprobs = seq.pending_logprobs, []
    prompt_logprobs = None
    if seq.prompt_logprobs is not None and not seq.prompt_logprobs_sent:
        if seq.is_finished or seq.num_computed_tokens >= seq.num_prompt_tokens:
            prompt_logprobs, seq.prompt_logprobs_sent = seq.prompt_logprobs, True
    return RequestOutput(
        request_id=seq.request_id,
        speculation=speculation_counts(seq),
        new_token_ids=new_tokens,
        new_text=text,
        finished=seq.is_finished,
        finish_reason=seq.finish_reason,
        stop_reason=seq.stop_reason,
        num_prompt_tokens=seq.num_prompt_tokens,
        num_cached_tokens=seq.num_cached_tokens,
        num_output_tokens=seq.num_output_tokens,
        arrival_time=seq.arrival_time,
        first_scheduled_time=seq.first_scheduled_time,
        first_token_time=seq.first_token_time,
        finished_time=seq.finished_time,
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
        embedding=pooled(seq) if seq.is_finished else None,
    )
