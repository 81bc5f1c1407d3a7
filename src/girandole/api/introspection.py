"""What a response shows besides the text, shared by /completions and /chat/completions.

- Logprobs (`girandole.api.logprob_formats`): `logprobs: true` (+ `top_logprobs`) the content
  format, an integer N the legacy format with N alternatives (`top_logprobs` overrides N).
- Echo: `echo: true` puts the prompt before the completion, `echo_last: N` only its last N
  tokens. The echoed text is the prompt tokens' bytes, special tokens (BOS, chat markers) left
  out, so `text_offset` indexes it exactly. With logprobs the echoed tokens come first, scored in
  the same prefill; the very first prompt token has no context: its logprob is null in the
  legacy format (OpenAI's convention) and 0.0 in the content format (a number, as Fireworks'
  schema requires; its SDK drops that entry).
- `raw_output`: `prompt_fragments`, `prompt_token_ids`, `completion` (special tokens kept),
  `completion_token_ids` and `completion_logprobs` (content format; with echo both start with the
  echoed prompt, as Fireworks' SDK expects), `grammar` (null without constrained decoding).
- `return_token_ids`: `prompt_token_ids` and `token_ids` (the generated ids, EOS included).
- `perf_metrics` (Fireworks' hyphenated keys, seconds) in the body with
  `perf_metrics_in_response`, and always as `fireworks-<key>` headers on non-stream responses.
- Prompt cache: `prompt_cache_isolation_key` (or the `x-prompt-cache-isolation-key` header; the
  field wins) salts the prefix-cache hashes, so different keys never share blocks;
  `prompt_cache_max_len` caps the reused prefix (0 = no reuse).
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass, field
from typing import Any

from girandole.api.errors import bad_request
from girandole.api.logprob_formats import LogprobsMode, LogprobTracker, content_format
from girandole.sampling.sampler import SampleResult


@dataclass
class OutputOptions:
    logprobs_mode: LogprobsMode | None = None
    num_top: int = 0
    echo: bool = False
    echo_last: int | None = None
    raw_output: bool = False
    return_token_ids: bool = False
    perf_metrics: bool = False

    def echo_count(self, num_prompt_tokens: int) -> int:
        if self.echo_last is not None:
            return min(self.echo_last, num_prompt_tokens)
        return num_prompt_tokens if self.echo else 0

    @property
    def prompt_logprobs(self) -> int | None:
        """SamplingParams.prompt_logprobs: prompt tokens are scored only for echo + logprobs."""
        wants_echo = self.echo or bool(self.echo_last)
        return self.num_top if wants_echo and self.logprobs_mode is not None else None


def output_options(req: Any) -> OutputOptions:
    lp, top = req.logprobs, req.top_logprobs
    if lp is None or lp is False:
        if top:
            raise bad_request("top_logprobs needs logprobs set to true", "top_logprobs")
        mode, num_top = None, 0
    elif lp is True:
        mode, num_top = "content", top or 0
    else:
        mode, num_top = "legacy", top if top is not None else lp
    return OutputOptions(
        logprobs_mode=mode,
        num_top=num_top,
        echo=bool(getattr(req, "echo", None)),
        echo_last=getattr(req, "echo_last", None),
        raw_output=bool(req.raw_output),
        return_token_ids=bool(req.return_token_ids),
        perf_metrics=bool(req.perf_metrics_in_response),
    )


def cache_kwargs(req: Any, headers: Any) -> dict[str, Any]:
    """AsyncEngine.generate's prefix-cache arguments from the request and its headers."""
    salt = req.prompt_cache_isolation_key
    if salt is None and headers is not None:
        salt = headers.get("x-prompt-cache-isolation-key") or None
    out: dict[str, Any] = {}
    if salt is not None:
        out["cache_salt"] = salt
    if req.prompt_cache_max_len is not None:
        out["prefix_cache_max_len"] = req.prompt_cache_max_len
    return out


def plain_text(tokenizer: Any, ids: list[int]) -> str:
    """The text of `ids` as logprob offsets count it: token bytes, special tokens left out."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    parts = [decoder.decode(tokenizer.token_bytes(t)) for t in ids if not tokenizer.is_special(t)]
    return "".join(parts) + decoder.decode(b"", final=True)


def prompt_fragments(tokenizer: Any, ids: list[int]) -> list[str | int]:
    """The fed prompt as Fireworks' `prompt_fragments`: runs of text, and special tokens by id."""
    out: list[str | int] = []
    run: list[int] = []
    for token in ids:
        if tokenizer.is_special(token):
            if run:
                out.append(tokenizer.decode(run, skip_special_tokens=False))
                run = []
            out.append(token)
        else:
            run.append(token)
    if run:
        out.append(tokenizer.decode(run, skip_special_tokens=False))
    return out


@dataclass
class Update:
    """What one engine output adds to a choice."""

    text: str = ""
    entries: list = field(default_factory=list)  # TokenLogprobs
    token_ids: list[int] = field(default_factory=list)
    first: bool = False  # the choice's first update (carries the echo)


class ChoiceOutput:
    """One choice's running output: echo, text, generated ids, logprobs, the last engine output."""

    def __init__(self, tokenizer: Any, options: OutputOptions, prompt_ids: list[int]) -> None:
        self.tokenizer = tokenizer
        self.options = options
        self.prompt_ids = prompt_ids
        count = options.echo_count(len(prompt_ids))
        self.echo_ids = prompt_ids[len(prompt_ids) - count :] if count else []
        self.echo_text = plain_text(tokenizer, self.echo_ids) if count else ""
        self.tracker = LogprobTracker(tokenizer, options.num_top)
        self.text: list[str] = []
        self.text_length = 0
        self.token_ids: list[int] = []  # generated
        self.last: Any = None  # the latest RequestOutput
        self.grammar: str | None = None  # filled by constrained decoding, when it is used

    def add(self, out: Any) -> Update:
        update = Update(first=self.last is None)
        mode = self.options.logprobs_mode
        if update.first and self.echo_ids:
            update.text += self.echo_text
            self.text_length += len(self.echo_text)
            if mode is not None:
                update.entries += self.tracker.add(self._prompt_results(out), self.text_length)
        self.last = out
        update.text += out.new_text
        self.text_length += len(out.new_text)
        self.text.append(update.text)
        update.token_ids = list(out.new_token_ids)
        self.token_ids.extend(out.new_token_ids)
        if mode is not None:
            update.entries += self.tracker.add(out.logprobs, self.text_length)
        return update

    def _prompt_results(self, out: Any) -> list:
        scored = list(out.prompt_logprobs or [])
        if len(scored) != len(self.prompt_ids):
            scored = [None] * len(self.prompt_ids)
        start = len(self.prompt_ids) - len(self.echo_ids)
        results = []
        for token, r in zip(self.echo_ids, scored[start:]):
            results.append(r if r is not None else SampleResult(token, None, None, []))
        return results

    @property
    def full_text(self) -> str:
        return "".join(self.text)

    def logprobs(self, entries: list) -> dict[str, Any] | None:
        mode = self.options.logprobs_mode
        if mode is None:
            return None
        return self.tracker.format(entries, mode)

    def raw_output(self) -> dict[str, Any]:
        tok = self.tokenizer
        ids = self.echo_ids + self.token_ids
        completion_logprobs = None
        if self.options.logprobs_mode is not None:
            completion_logprobs = content_format(tok, self.tracker.entries)
        return {
            "prompt_fragments": prompt_fragments(tok, self.prompt_ids),
            "prompt_token_ids": list(self.prompt_ids),
            "completion": tok.decode(ids, skip_special_tokens=False),
            "completion_token_ids": ids,
            "completion_logprobs": completion_logprobs,
            "grammar": self.grammar,
        }

    def extras(self) -> dict[str, Any]:
        """Fields a non-stream choice adds: raw_output, prompt_token_ids and token_ids."""
        out: dict[str, Any] = {}
        if self.options.raw_output:
            out["raw_output"] = self.raw_output()
        if self.options.return_token_ids:
            out["prompt_token_ids"] = list(self.prompt_ids)
            out["token_ids"] = list(self.token_ids)
        return out


# -- perf metrics ----------------------------------------------------------------------------


def perf_metrics(
    usage: dict[str, Any], outputs: list[Any], received: float, prepared: float
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
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
    metrics: dict[str, Any] = {
        "prompt-tokens": usage["prompt_tokens"],
        "cached-prompt-tokens": cached,
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
    return {k: round(v, 6) if isinstance(v, float) else v for k, v in metrics.items()}


def perf_headers(metrics: dict[str, Any]) -> dict[str, str]:
    return {f"fireworks-{k}": str(v) for k, v in metrics.items()}
