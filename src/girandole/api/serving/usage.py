"""Usage and perf metrics, counted here once for responses and for accounting alike (the rules:
`girandole.api.completions`). A response counts its choices as it has shown them
(`Choice.sent`); accounting (usage rows, metrics, token rate limits) as the engine produced them
(`Choice.generated`): the same once the response has ended, and also right for a response its
client cut off."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

from girandole.api.serving.choice import Choice


@dataclass
class Usage:
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    reasoning_tokens: int | None = None  # a model that reasons: its completion tokens spent so

    def body(self) -> dict[str, Any]:
        """The `usage` object of a response."""
        body: dict[str, Any] = {
            "prompt_tokens": self.prompt_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "completion_tokens": self.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens},
        }
        if self.reasoning_tokens is not None:
            body["completion_tokens_details"] = {"reasoning_tokens": self.reasoning_tokens}
        return body


def count_usage(
    choices: Iterable[Choice], progress: Literal["sent", "generated"] = "sent"
) -> Usage:
    """The usage of a request's choices, as its response showed them or as the engine made them.
    As the engine made them, a choice whose engine request was never sent (a cancelled
    prefill-only request's inputs still waiting for their window) costs nothing."""
    prompts: dict[int, int] = {}
    cached: dict[int, int] = {}
    completion = 0
    reasoning: int | None = None
    for choice in choices:
        if choice.reasoning_tokens is not None:
            reasoning = (reasoning or 0) + choice.reasoning_tokens
        done = getattr(choice, progress)
        if progress == "generated" and not done.started:
            continue
        p = choice.prompt_index
        prompts[p] = choice.num_prompt_tokens
        cached[p] = min(cached.get(p, done.num_cached_tokens), done.num_cached_tokens)
        completion += done.num_output_tokens
    return Usage(sum(prompts.values()), sum(cached.values()), completion, reasoning)


def sum_usage(usages: Iterable[Usage]) -> Usage:
    """The usage of several engine rounds of one request (a Responses MCP tool loop)."""
    total = Usage()
    for usage in usages:
        total.prompt_tokens += usage.prompt_tokens
        total.cached_tokens += usage.cached_tokens
        total.completion_tokens += usage.completion_tokens
        if usage.reasoning_tokens is not None:
            total.reasoning_tokens = (total.reasoning_tokens or 0) + usage.reasoning_tokens
    return total


def perf_metrics(
    usage: Usage, outputs: list[Any], received: float, prepared: float
) -> dict[str, Any]:
    """Fireworks' `perf_metrics` (seconds) from the choices' last engine outputs. `received`:
    when the server got the request; `prepared`: when it was tokenized (time.monotonic)."""
    outs = [o for o in outputs if o is not None]

    def first(name: str) -> float | None:
        values = [getattr(o, name) for o in outs if getattr(o, name, None) is not None]
        return min(values) if values else None

    arrival = first("arrival_time") or prepared
    scheduled = first("first_scheduled_time")
    finished_values = [o.finished_time for o in outs if o.finished_time is not None]
    finished = max(finished_values) if finished_values else None
    first_token = first("first_token_time") or finished
    metrics: dict[str, Any] = {
        "prompt-tokens": usage.prompt_tokens,
        "cached-prompt-tokens": usage.cached_tokens,
        "tokenizer-duration": prepared - received,
    }
    if first_token is not None:
        metrics["server-time-to-first-token"] = first_token - received
    if finished is not None:
        metrics["server-processing-time"] = finished - received
    if scheduled is not None:
        metrics["prefill-queue-duration"] = scheduled - arrival
        if first_token is not None:
            metrics["prefill-duration"] = first_token - scheduled
    if first_token is not None and finished is not None:
        metrics["generation-duration"] = finished - first_token
    metrics.update(speculation_metrics([getattr(o, "speculation", None) or {} for o in outs]))
    return {k: round(v, 6) if isinstance(v, float) else v for k, v in metrics.items()}


def speculation_metrics(counts: list[dict[str, int]]) -> dict[str, Any]:
    """Speculative decoding's perf metrics over the choices' counts (RequestOutput.speculation):
    the prediction's tokens and how many of them were accepted, and the fraction of all
    proposed tokens (prediction, n-gram or draft model) that were accepted."""
    counts = [c for c in counts if c]
    metrics: dict[str, Any] = {}
    with_prediction = [c for c in counts if "prediction_tokens" in c]
    if with_prediction:
        metrics["speculation-prompt-tokens"] = sum(c["prediction_tokens"] for c in with_prediction)
        metrics["speculation-prompt-matched-tokens"] = sum(
            c["prediction_matched"] for c in with_prediction
        )
    proposed = sum(c["proposed"] for c in counts)
    if proposed:
        metrics["speculation-acceptance"] = sum(c["accepted"] for c in counts) / proposed
    return metrics


def perf_headers(metrics: dict[str, Any]) -> dict[str, str]:
    return {f"fireworks-{k}": str(v) for k, v in metrics.items()}
