"""One choice of a request, from its engine request to what its response shows.

`Choice` is the one per-choice state: the engine request (prompt, SamplingParams, request id),
how far the engine has got (`generated`, fed by the fan-out: accounting and metrics read it),
how far the response has got (`sent`), and the output the response shows: text, token ids,
logprobs, echo, raw_output. Shared by /completions and /chat/completions:

- Logprobs (`girandole.api.serving.logprobs`): `logprobs: true` (+ `top_logprobs`) the content
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

from girandole.api.http.errors import bad_request
from girandole.api.http.schema import RequestFields
from girandole.api.serving.logprobs import (
    TOKEN_ID_JSON_BYTES,
    LogprobsMode,
    LogprobTracker,
    TokenLogprob,
    content_format,
)
from girandole.engine.outputs import RequestOutput
from girandole.sampling.params import SamplingParams
from girandole.sampling.sampler import SampleResult
from girandole.tokenizer.tokenizer import Tokenizer

# the engine's finish reasons as the API names them
FINISH_REASONS = {"stop": "stop", "length": "length", "abort": "error"}


@dataclass
class OutputOptions:
    logprobs_mode: LogprobsMode | None = None
    num_top: int = 0
    echo: bool = False
    echo_last: int | None = None
    raw_output: bool = False
    return_token_ids: bool = False
    perf_metrics: bool = False
    sampling_mask: str | None = None  # "count", "non_zero_list" or "non_zero_buffer"
    routing_matrix: bool = False  # include_routing_matrix (an MoE model's router replay)

    def echo_count(self, num_prompt_tokens: int) -> int:
        if self.echo_last is not None:
            return min(self.echo_last, num_prompt_tokens)
        return num_prompt_tokens if self.echo else 0

    @property
    def prompt_logprobs(self) -> int | None:
        """SamplingParams.prompt_logprobs: prompt tokens are scored only for echo + logprobs
        (`echo_last: 0` echoes nothing, so it scores nothing either)."""
        wants_echo = self.echo_last > 0 if self.echo_last is not None else self.echo
        return self.num_top if wants_echo and self.logprobs_mode is not None else None


def output_options(req: RequestFields) -> OutputOptions:
    lp, top = req.logprobs, req.top_logprobs
    if lp is None or lp is False:
        if top:
            raise bad_request("top_logprobs needs logprobs set to true", "top_logprobs")
        mode, num_top = None, 0
    elif lp is True:
        mode, num_top = "content", top or 0
    else:
        mode, num_top = "legacy", top if top is not None else lp
    if req.sampling_mask is not None and mode != "content":
        raise bad_request(
            "sampling_mask is reported in the content logprobs format: set logprobs to true",
            "sampling_mask",
        )
    if req.include_routing_matrix and mode != "content":
        raise bad_request(
            "include_routing_matrix is reported in the content logprobs format: set logprobs "
            "to true",
            "include_routing_matrix",
        )
    return OutputOptions(
        logprobs_mode=mode,
        num_top=num_top,
        echo=bool(req.echo),
        echo_last=req.echo_last,
        raw_output=bool(req.raw_output),
        return_token_ids=bool(req.return_token_ids),
        perf_metrics=bool(req.perf_metrics_in_response),
        sampling_mask=req.sampling_mask,
        routing_matrix=bool(req.include_routing_matrix),
    )


def plain_text(tokenizer: Tokenizer, ids: list[int]) -> str:
    """The text of `ids` as logprob offsets count it: token bytes, special tokens left out."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    parts = [decoder.decode(tokenizer.token_bytes(t)) for t in ids if not tokenizer.is_special(t)]
    return "".join(parts) + decoder.decode(b"", final=True)


def prompt_fragments(tokenizer: Tokenizer, ids: list[int]) -> list[str | int]:
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
class Progress:
    """How far a choice has got: whether its engine request was sent (a prefill-only request's
    later inputs wait for a window), tokens sampled (EOS included), prompt tokens served from
    the prefix cache, and whether it finished."""

    started: bool = False
    num_output_tokens: int = 0
    num_cached_tokens: int = 0
    finished: bool = False

    def advance(self, out: RequestOutput) -> None:
        self.num_output_tokens = max(self.num_output_tokens, out.num_output_tokens)
        self.num_cached_tokens = max(self.num_cached_tokens, out.num_cached_tokens)
        self.finished = self.finished or out.finished


@dataclass
class Update:
    """What one engine output adds to a choice's response."""

    text: str = ""
    entries: list = field(default_factory=list)  # TokenLogprobs
    token_ids: list[int] = field(default_factory=list)


class Choice:
    """One choice: its engine request, its progress, and its output (echo, text, generated ids,
    logprobs, the last engine output)."""

    def __init__(
        self,
        index: int,
        prompt_index: int,
        prompt_token_ids: list[int],
        params: SamplingParams,
        request_id: str,
        tokenizer: Tokenizer,
        options: OutputOptions,
        engine_kwargs: dict[str, Any] | None = None,
    ) -> None:
        self.index = index  # in the response: prompt_index * n + k
        self.prompt_index = prompt_index
        self.prompt_token_ids = prompt_token_ids
        self.params = params
        self.request_id = request_id
        # AsyncEngine.generate keyword arguments: cache_salt, prefix_cache_max_len
        self.engine_kwargs = engine_kwargs or {}
        self.tokenizer = tokenizer
        self.options = options
        self.generated = Progress()  # as the engine produced it (the fan-out)
        self.sent = Progress()  # as the response has shown it
        self.last_token_time: float | None = None  # inter-token latency (metrics)
        self.finish_reason: str | None = None
        count = options.echo_count(len(prompt_token_ids))
        self.echo_ids = prompt_token_ids[len(prompt_token_ids) - count :] if count else []
        # the first bytes of a character the prompt does not finish are the generated text's
        # (the detokenizer's): the echo leaves them out, so the text shows that character once
        cut = min(tokenizer.incomplete_tail(prompt_token_ids), count) if count else 0
        self.echo_text = plain_text(tokenizer, self.echo_ids[: count - cut]) if count else ""
        self.tracker = LogprobTracker(
            tokenizer, options.num_top, options.sampling_mask, options.routing_matrix
        )
        self.text: list[str] = []
        self.text_length = 0
        self.token_ids: list[int] = []  # generated
        self.last: RequestOutput | None = None  # the latest engine output the response read
        self.reasoning_tokens: int | None = None  # set by a shape that splits out reasoning
        self.json_size = 0  # about how many bytes the choice's whole body takes so far

    def _grow(self, text: str, entries: list[TokenLogprob], token_ids: list[int]) -> None:
        """Count what an output adds to the whole body's size: its text, its logprobs (again
        in raw_output's completion_logprobs), its token ids (in raw_output's and in
        return_token_ids' lists)."""
        copies = 1 + self.options.raw_output
        id_lists = self.options.raw_output + self.options.return_token_ids
        self.json_size += len(text) + copies * sum(e.json_size() for e in entries)
        self.json_size += id_lists * TOKEN_ID_JSON_BYTES * len(token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    def add(self, out: RequestOutput) -> Update:
        """Read one engine output into the response."""
        update = Update()
        mode = self.options.logprobs_mode
        if self.last is None and self.echo_ids:
            update.text += self.echo_text
            self.text_length += len(self.echo_text)
            if mode is not None:
                update.entries += self.tracker.add(self._prompt_results(out), self.text_length)
        self.last = out
        self.sent.advance(out)
        if out.finished:
            self.finish_reason = FINISH_REASONS.get(out.finish_reason or "", "stop")
        update.text += out.new_text
        self.text_length += len(out.new_text)
        self.text.append(update.text)
        update.token_ids = list(out.new_token_ids)
        self.token_ids.extend(out.new_token_ids)
        if mode is not None:
            update.entries += self.tracker.add(out.logprobs, self.text_length)
        self._grow(update.text, update.entries, update.token_ids)
        return update

    def _prompt_results(self, out: RequestOutput) -> list:
        prompt_ids = self.prompt_token_ids
        scored = list(out.prompt_logprobs or [])
        if len(scored) != len(prompt_ids):
            scored = [None] * len(prompt_ids)
        start = len(prompt_ids) - len(self.echo_ids)
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
        grammar = self.params.grammar  # the grammar constrained decoding used
        return {
            "prompt_fragments": prompt_fragments(tok, self.prompt_token_ids),
            "prompt_token_ids": list(self.prompt_token_ids),
            "completion": tok.decode(ids, skip_special_tokens=False),
            "completion_token_ids": ids,
            "completion_logprobs": completion_logprobs,
            "grammar": grammar.describe() if grammar is not None else None,
        }

    def extras(self) -> dict[str, Any]:
        """Fields a non-stream choice adds: raw_output, prompt_token_ids and token_ids."""
        out: dict[str, Any] = {}
        if self.options.raw_output:
            out["raw_output"] = self.raw_output()
        if self.options.return_token_ids:
            out["prompt_token_ids"] = list(self.prompt_token_ids)
            out["token_ids"] = list(self.token_ids)
        return out
