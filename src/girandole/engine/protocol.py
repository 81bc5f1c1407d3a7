"""The engine as the API server sees it (vLLM's `EngineClient` idea): what `girandole.api` may
call, and nothing else. `AsyncEngine` is the implementation."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Protocol

from girandole.engine.outputs import RequestOutput
from girandole.model.config import ModelConfig
from girandole.sampling.grammar import GrammarSpec
from girandole.sampling.params import SamplingParams
from girandole.tokenizer.tokenizer import Tokenizer


class AdapterNotLoadedError(ValueError):
    """A request names a LoRA adapter this engine does not hold (never loaded, or unloaded
    while the request was on its way): the API's 404 for an unknown model."""


class EngineClient(Protocol):
    @property
    def model_config(self) -> ModelConfig: ...

    @property
    def tokenizer(self) -> Tokenizer: ...

    @property
    def max_model_len(self) -> int: ...

    def generate(
        self,
        prompt_token_ids: list[int],
        params: SamplingParams,
        request_id: str | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[RequestOutput]:
        """Stream a request's outputs; ValueError before the first output for bad input.
        `kwargs` go to LLMEngine.add_request: cache_salt, prefix_cache_max_len,
        compiled_grammar, pooling (a prefill-only request returning its pooled hidden state),
        prompt_logprobs_last."""
        ...

    def abort(self, request_id: str) -> None: ...

    async def compile_grammar(self, spec: GrammarSpec) -> Any:
        """Compile (or find cached) the grammar of `spec`; GrammarError for a bad or oversized
        one (CompileTimeout past the server's deadline)."""
        ...

    def stats(self) -> dict[str, float]: ...

    def seconds_stalled(self) -> float:
        """How long work has waited with no engine step finishing (0 when idle or moving)."""
        ...

    def shutdown(self) -> None: ...


def stall_error(engine: EngineClient, limit_s: float) -> str | None:
    """Why an engine is not serving (its loop died, or work has waited `limit_s` with no step
    finishing), or None: what /health reports and what a Ray replica's health check raises (so
    Ray Serve replaces a replica whose loop is stuck, not only one whose loop died)."""
    stalled = engine.seconds_stalled()
    if stalled == float("inf"):
        return "the engine loop is not running"
    if stalled > limit_s:
        return f"the engine has not finished a step for {stalled:.0f} s"
    return None
