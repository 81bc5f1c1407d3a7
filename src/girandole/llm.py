"""LLM: the synchronous interface for scripts. `LLM().generate(prompts, params)`."""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator, Sequence

from girandole.engine.engine import EngineConfig, LLMEngine
from girandole.engine.outputs import CompletionOutput
from girandole.engine.pooling import PoolingParams
from girandole.sampling.params import SamplingParams

Prompt = str | list[int]


class LLM:
    def __init__(
        self, model: str | None = None, revision: str | None = None, **engine_kwargs
    ) -> None:
        """`model`: a .gguf file, an HF folder, a Hugging Face repo id (`org/name`, or
        `org/name:file.gguf`, fetched at `revision` into huggingface_hub's cache), or None for
        the default model."""
        if model is not None:
            from girandole.model.default import resolve_model_path

            model = str(resolve_model_path(model, revision))
        self.engine = LLMEngine(EngineConfig(model=model, **engine_kwargs))
        self.tokenizer = self.engine.tokenizer
        self._ids = itertools.count()

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[CompletionOutput]:
        """Run every prompt to completion in one continuous batch; results in prompt order."""
        if isinstance(prompts, str) or (
            isinstance(prompts, list) and prompts and isinstance(prompts[0], int)
        ):
            prompts = [prompts]
        if params is None or isinstance(params, SamplingParams):
            params = [params or SamplingParams()] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError("give one SamplingParams, or one per prompt")

        ids: list[str] = []
        prompt_ids: dict[str, list[int]] = {}
        params_of: dict[str, SamplingParams] = {}
        results: dict[str, CompletionOutput] = {}
        with self._abort_unfinished_on_error(ids):
            for prompt, p in zip(prompts, params):
                tokens = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
                rid = f"llm-{next(self._ids)}"
                self.engine.add_request(rid, tokens, p)
                ids.append(rid)
                prompt_ids[rid] = tokens
                params_of[rid] = p

            tokens_out: dict[str, list[int]] = {rid: [] for rid in ids}
            text_out: dict[str, list[str]] = {rid: [] for rid in ids}
            logprobs_out: dict[str, list] = {rid: [] for rid in ids}
            prompt_logprobs_out: dict[str, list | None] = {}
            while len(results) < len(ids):
                self._check_unfinished(ids, results)
                for out in self.engine.step():
                    if out.request_id not in tokens_out:
                        continue
                    tokens_out[out.request_id].extend(out.new_token_ids)
                    text_out[out.request_id].append(out.new_text)
                    if out.logprobs:
                        logprobs_out[out.request_id].extend(out.logprobs)
                    if out.prompt_logprobs is not None:
                        prompt_logprobs_out[out.request_id] = out.prompt_logprobs
                    if out.finished:
                        results[out.request_id] = CompletionOutput(
                            prompt_token_ids=prompt_ids[out.request_id],
                            token_ids=tokens_out[out.request_id],
                            text="".join(text_out[out.request_id]),
                            finish_reason=out.finish_reason,
                            num_cached_tokens=out.num_cached_tokens,
                            logprobs=logprobs_out[out.request_id]
                            if params_of[out.request_id].logprobs is not None
                            else None,
                            prompt_logprobs=prompt_logprobs_out.get(out.request_id),
                            error=out.extra.get("error"),
                        )
        return [results[rid] for rid in ids]

    def embed(
        self, prompts: Prompt | Sequence[Prompt], pooling: PoolingParams | None = None
    ) -> list[list[float]]:
        """Each prompt's pooled final hidden state (girandole.engine.pooling; not normalised),
        in prompt order, all prompts in one continuous batch. Strings get BOS as in `generate`."""
        if isinstance(prompts, str) or (
            isinstance(prompts, list) and prompts and isinstance(prompts[0], int)
        ):
            prompts = [prompts]
        ids: list[str] = []
        results: dict[str, list[float]] = {}
        with self._abort_unfinished_on_error(ids):
            for prompt in prompts:
                tokens = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
                rid = f"llm-{next(self._ids)}"
                self.engine.add_request(
                    rid, tokens, SamplingParams(max_tokens=0), pooling=pooling or PoolingParams()
                )
                ids.append(rid)
            while len(results) < len(ids):
                self._check_unfinished(ids, results)
                for out in self.engine.step():
                    if not out.finished or out.request_id not in ids:
                        continue
                    if out.embedding is None or out.finish_reason == "abort":
                        # failed inside the engine: no vector (or only its first chunks')
                        why = out.extra.get("error") or "it was aborted"
                        raise RuntimeError(f"prompt {ids.index(out.request_id)}: {why}")
                    results[out.request_id] = out.embedding
        return [results[rid] for rid in ids]

    def _check_unfinished(self, ids: list[str], results: dict) -> None:
        """A request of `ids` without a result while the engine has nothing left to run ended
        outside these steps (`engine.abort` from another thread): raise rather than wait."""
        if not self.engine.has_unfinished_requests():
            missing = next(i for i, rid in enumerate(ids) if rid not in results)
            raise RuntimeError(f"prompt {missing} ended without a result (it was aborted)")

    @contextlib.contextmanager
    def _abort_unfinished_on_error(self, ids: list[str]) -> Iterator[None]:
        """If the body raises (a later prompt rejected by add_request, an interrupt while
        stepping), the requests it already queued (`ids`) are aborted: none keeps running in
        the engine, holding KV blocks and computed by the next call's steps."""
        try:
            yield
        except BaseException:
            for rid in ids:
                self.engine.abort(rid)  # None for one already finished
            raise
