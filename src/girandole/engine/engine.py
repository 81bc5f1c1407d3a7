"""LLMEngine: the synchronous core. add_request / step / abort, one model forward per step."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from girandole.engine.kv_cache import KVCacheManager
from girandole.engine.outputs import FinishReason, RequestOutput
from girandole.engine.runner import ModelRunner
from girandole.engine.scheduler import Scheduler, SchedulerConfig
from girandole.engine.sequence import Sequence, SequenceStatus
from girandole.sampling.grammar import GrammarCache, SequenceGrammar
from girandole.sampling.params import SamplingParams
from girandole.sampling.sampler import Sampler, SamplerRow

logger = logging.getLogger(__name__)


@dataclass
class EngineConfig:
    model: str | None = None  # a .gguf file or HF folder; None = the default Gemma 3 270M
    mode: str = "fast"  # "fast" (quantized linears on CPU) or "reference" (float32)
    device: str | None = None  # None: cuda if available, else cpu
    kv_cache_gb: float = 1.0
    block_size: int = 16
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    max_model_len: int | None = None  # None: the model's context, capped by the KV cache size
    seed: int | None = None  # seed of the generator that unseeded requests draw from


class LLMEngine:
    def __init__(self, config: EngineConfig | None = None) -> None:
        from girandole.model.default import resolve_model_path
        from girandole.model.loader import load_model
        from girandole.tokenizer import load_tokenizer

        self.config = config = config or EngineConfig()
        path = resolve_model_path(config.model)
        self.model_path = path
        device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.device = device
        self.tokenizer = load_tokenizer(path)
        self.model, self.model_config = load_model(path, mode=config.mode, device=device)
        self.runner = ModelRunner(
            self.model,
            self.model_config,
            device,
            config.block_size,
            int(config.kv_cache_gb * (1 << 30)),
        )
        self.kv_cache = KVCacheManager(self.runner.num_blocks, config.block_size)
        capacity = self.runner.num_blocks * config.block_size
        self.max_model_len = min(
            self.model_config.max_position, config.max_model_len or capacity, capacity
        )
        self.scheduler = Scheduler(
            SchedulerConfig(
                max_num_seqs=config.max_num_seqs,
                max_num_batched_tokens=max(config.max_num_batched_tokens, config.max_num_seqs),
                max_model_len=self.max_model_len,
            ),
            self.kv_cache,
        )
        self.sampler = Sampler(config.seed)
        self.eos_token_ids = set(self.model_config.eos_token_ids) | set(
            self.tokenizer.stop_token_ids
        )
        self._eos_tuple = tuple(sorted(self.eos_token_ids))
        self.grammars = GrammarCache(self.tokenizer, self.model_config.vocab_size)
        self.seqs: dict[str, Sequence] = {}
        self._finished_early: list[RequestOutput] = []

    # -- requests ----------------------------------------------------------------------------

    def check_request(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raise ValueError naming the problem; safe to call from any thread."""
        params.validate()
        if not prompt_token_ids:
            raise ValueError("prompt is empty: at least one token is required")
        vocab = self.model_config.vocab_size
        for t in prompt_token_ids:
            if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab:
                raise ValueError(f"prompt token id {t!r} is out of range [0, {vocab})")
        if len(prompt_token_ids) >= self.max_model_len:
            raise ValueError(
                f"The prompt is too long: {len(prompt_token_ids)}, model maximum context length: "
                f"{self.max_model_len}"
            )

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        *,
        cache_salt: str | None = None,
        prefix_cache_max_len: int | None = None,
        compiled_grammar=None,
    ) -> None:
        """Queue a request. `compiled_grammar`: params.grammar compiled ahead (off this thread);
        compiled here if not given."""
        from girandole.tokenizer import IncrementalDetokenizer, StopStringMatcher

        if request_id in self.seqs:
            raise ValueError(f"request id already in use: {request_id}")
        self.check_request(prompt_token_ids, params)
        if params.prompt_logprobs is not None:
            # Cached prompt positions have no logits to score: recompute the whole prompt.
            prefix_cache_max_len = 0
        seq = Sequence(request_id, prompt_token_ids, params, cache_salt, prefix_cache_max_len)
        seq.detokenizer = IncrementalDetokenizer(self.tokenizer, prompt_token_ids)
        if params.stop:
            seq.stop_matcher = StopStringMatcher(params.stop)
        if params.grammar is not None:
            compiled = compiled_grammar or self.grammars.compile(params.grammar)
            seq.grammar = SequenceGrammar(compiled, params.grammar)
        self.seqs[request_id] = seq
        if params.max_tokens == 0 and params.prompt_logprobs is None:  # nothing to compute
            self._finish(seq, "length")
            self._finished_early.append(self._output(seq, [], ""))
            return
        self.scheduler.add(seq)

    def abort(self, request_id: str) -> RequestOutput | None:
        seq = self.seqs.get(request_id)
        if seq is None or seq.is_finished:
            return None
        self.scheduler.remove(seq)
        self._finish(seq, "abort")
        return self._output(seq, [], "")

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_work() or bool(self._finished_early)

    # -- stepping ----------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        outputs, self._finished_early = self._finished_early, []
        batch = self.scheduler.schedule()
        for seq in batch.out_of_blocks:
            self.scheduler.remove(seq)
            outputs.append(self._finish_with_text(seq, "length", []))
        if not batch.seqs:
            return outputs

        # Decode tokens first: linears choose their kernel by a token's role (decode or
        # prefill), which the runner tells them as a count of leading rows.
        order = sorted(
            range(len(batch.seqs)),
            key=lambda i: not batch.seqs[i].is_decode(batch.num_new_tokens[i]),
        )
        batch.seqs = [batch.seqs[i] for i in order]
        batch.num_new_tokens = [batch.num_new_tokens[i] for i in order]

        now = time.monotonic()
        logit_rows: list[list[int]] = []
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            if seq.first_scheduled_time is None:
                seq.first_scheduled_time = now
            logit_rows.append(self._logit_rows(seq, n))

        hidden = self.runner.execute(batch.seqs, batch.num_new_tokens, logit_rows)

        sampling_seqs: list[Sequence] = []
        sample_hidden: list[int] = []  # row of each sampling sequence in `hidden`
        row = 0
        for seq, n, rows in zip(batch.seqs, batch.num_new_tokens, logit_rows):
            start = seq.num_computed_tokens
            if seq.prompt_logprobs is not None and rows:
                self._collect_prompt_logprobs(seq, start, rows, hidden[row : row + len(rows)])
            seq.num_computed_tokens += n
            self.kv_cache.register_full_blocks(seq)
            if seq.num_computed_tokens == len(seq) and seq.params.max_tokens == 0:
                # A scoring request (echo + logprobs, max_tokens 0) ends after its prefill.
                outputs.append(self._finish_with_text(seq, "length", []))
            elif rows and rows[-1] == n - 1 and seq.num_computed_tokens == len(seq):
                sampling_seqs.append(seq)
                sample_hidden.append(row + len(rows) - 1)
            row += len(rows)
        if not sampling_seqs:
            return outputs

        logits = self.runner.compute_logits(hidden[torch.tensor(sample_hidden)])
        rows_in = [
            SamplerRow(
                s.params,
                s.generator,
                s.token_ids,
                s.num_prompt_tokens,
                self._eos_tuple,
                s.sampler_state,
                s.grammar,
            )
            for s in sampling_seqs
        ]
        results = self._sample(logits, rows_in, hidden, sample_hidden)
        now = time.monotonic()
        for seq, result in zip(sampling_seqs, results):
            try:
                if isinstance(result, Exception):
                    raise result
                out = self._append_token(seq, result, now)
            except Exception as exc:  # one request's failure must not take the batch down
                logger.exception("request %s failed after sampling", seq.request_id)
                self.scheduler.remove(seq)
                self._finish(seq, "abort")
                out = self._output(seq, [], "")
                out.extra["error"] = f"{type(exc).__name__}: {exc}"
            outputs.append(out)
        return outputs

    def _sample(
        self,
        logits: torch.Tensor,
        rows: list[SamplerRow],
        hidden: torch.Tensor,
        sample_hidden: list[int],
    ) -> list:
        """Sample every row at once; if that raises, each row alone, so that one request's
        failure (a grammar matcher that throws, say) ends that request only. The others get what
        they would have got: the sampler and the LM head are batch-invariant, and seeded
        generators are rewound first. Returns a SampleResult or the exception, per row."""
        states = [r.generator.get_state() if r.generator is not None else None for r in rows]
        try:
            return self.sampler(logits, rows)
        except Exception as exc:  # noqa: BLE001 - find the culprit below
            if len(rows) == 1:
                return [exc]
            logger.exception("sampling %d rows failed; sampling each alone", len(rows))
        results: list = []
        for row, state, h in zip(rows, states, sample_hidden):
            if state is not None:
                row.generator.set_state(state)
            try:
                alone = self.runner.compute_logits(hidden[h : h + 1])
                results.append(self.sampler(alone, [row])[0])
            except Exception as exc:  # noqa: BLE001 - reported on that request
                results.append(exc)
        return results

    @staticmethod
    def _logit_rows(seq: Sequence, n: int) -> list[int]:
        """Which of this step's new tokens of `seq` need logits."""
        start = seq.num_computed_tokens
        rows = []
        if seq.prompt_logprobs is not None:
            # Position p predicts prompt token p + 1; skip what a preempted run already has.
            first = max(start, len(seq.prompt_logprobs) - 1)
            rows = list(range(first - start, min(start + n, seq.num_prompt_tokens - 1) - start))
        wants_sample = seq.params.max_tokens > 0
        if wants_sample and start + n == len(seq) and (not rows or rows[-1] != n - 1):
            rows.append(n - 1)
        return rows

    _PROMPT_LOGITS_CHUNK = 32  # rows per LM-head call: a row of logits is 1 MiB for Gemma

    def _collect_prompt_logprobs(
        self, seq: Sequence, start: int, rows: list[int], hidden: torch.Tensor
    ) -> None:
        from girandole.sampling.sampler import SampleResult, top_logprobs

        n_top = seq.params.prompt_logprobs
        for c in range(0, len(rows), self._PROMPT_LOGITS_CHUNK):
            chunk = rows[c : c + self._PROMPT_LOGITS_CHUNK]
            positions = [start + r for r in chunk]
            keep = [i for i, p in enumerate(positions) if p + 1 < seq.num_prompt_tokens]
            if not keep:
                continue
            logits = self.runner.compute_logits(
                hidden[c : c + len(chunk)][torch.tensor(keep)], batch_invariant=False
            )
            lp = torch.log_softmax(logits, dim=-1)
            targets = torch.tensor(
                [seq.token_ids[positions[i] + 1] for i in keep], device=logits.device
            )
            chosen = lp.gather(1, targets[:, None])[:, 0].tolist()
            tops = top_logprobs(lp, n_top)
            for t, v, top in zip(targets.tolist(), chosen, tops):
                seq.prompt_logprobs.append(SampleResult(t, v, v, top))

    def _append_token(self, seq: Sequence, result, now: float) -> RequestOutput:
        if result.dead_end:  # the grammar allows no token: end rather than emit garbage
            return self._finish_with_text(
                seq, "stop", [], stop_reason="grammar_dead_end", flush=True
            )
        token = result.token_id
        if seq.grammar is not None and not seq.grammar.accept(token):
            return self._finish_with_text(
                seq, "stop", [], stop_reason="grammar_rejected", flush=True
            )
        if seq.grammar is not None and seq.grammar.is_terminated:
            # the grammar took its stop token: nothing may follow, even with ignore_eos
            return self._finish_with_text(seq, "stop", [token], stop_reason=token)
        seq.token_ids.append(token)
        if seq.params.logprobs is not None:
            seq.pending_logprobs.append(result)
        if seq.first_token_time is None:
            seq.first_token_time = now
        params = seq.params
        if not params.ignore_eos and token in self.eos_token_ids:
            return self._finish_with_text(seq, "stop", [token], stop_reason=token)
        if token in params.stop_token_ids:
            return self._finish_with_text(seq, "stop", [token], stop_reason=token)

        text = seq.detokenizer.add([token])
        if seq.stop_matcher is not None:
            text, stopped = seq.stop_matcher.feed(text)
            if stopped:
                reason = getattr(seq.stop_matcher, "matched", None)
                return self._finish_with_text(seq, "stop", [token], text, stop_reason=reason)
        if seq.num_output_tokens >= params.max_tokens or len(seq) >= self.max_model_len:
            return self._finish_with_text(seq, "length", [token], text, flush=True)
        return self._output(seq, [token], text)

    def _finish_with_text(
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
        self._finish(seq, reason)
        return self._output(seq, new_tokens, text)

    def _finish(self, seq: Sequence, reason: FinishReason) -> None:
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        seq.finished_time = time.monotonic()
        self.seqs.pop(seq.request_id, None)

    def _output(self, seq: Sequence, new_tokens: list[int], text: str) -> RequestOutput:
        logprobs = None
        if seq.params.logprobs is not None:
            logprobs, seq.pending_logprobs = seq.pending_logprobs, []
        prompt_logprobs = None
        if seq.prompt_logprobs is not None and not seq.prompt_logprobs_sent:
            if seq.is_finished or seq.num_computed_tokens >= seq.num_prompt_tokens:
                prompt_logprobs, seq.prompt_logprobs_sent = seq.prompt_logprobs, True
        return RequestOutput(
            request_id=seq.request_id,
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
        )

    # -- introspection -----------------------------------------------------------------------

    def stats(self) -> dict[str, float]:
        kv = self.kv_cache
        return {
            "num_running": len(self.scheduler.running),
            "num_waiting": self.scheduler.num_waiting,
            "kv_blocks_total": kv.num_blocks,
            "kv_blocks_used": kv.num_used_blocks,
            "num_preemptions": self.scheduler.num_preemptions,
            "prefix_cache_queries": kv.num_prefix_queries,
            "prefix_cache_hits": kv.num_prefix_hits,
        }
