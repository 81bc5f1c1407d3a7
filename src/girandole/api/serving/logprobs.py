"""Logprobs in the response formats of Fireworks' API, from the engine's `SampleResult`s.

- Content format (`logprobs: true`, OpenAI's chat format, Fireworks' `NewLogProbs`):
  `{"content": [{"token", "logprob", "sampling_logprob", "bytes", "token_id", "text_offset",
  "top_logprobs": [{"token", "logprob", "token_id", "bytes"}]}]}` with exactly `top_logprobs`
  alternatives per position (the model's raw top-k, most likely first).
- Legacy format (an integer `logprobs: N`): `{"tokens", "token_logprobs", "top_logprobs",
  "text_offset", "token_ids"}`; each `top_logprobs` map holds the top N and always the sampled
  token (so up to N + 1 entries).

`routing_matrix` (include_routing_matrix, mixture-of-experts models; content format): each entry
carries the experts the router chose at the position that predicted its token (the forward that
computed its logprob; prompt position p for prompt token p + 1, the last prompt position for the
first generated token), as base64 of a little-endian int16 array [MoE layers, top-k] in layer
order, each layer's experts most probable first (vLLM's routed_experts dtype and layout); "" for
an echoed first prompt token (nothing predicts it). Fireworks' RL SDK treats these strings as
opaque and aligns them to the trainer's input positions (one per token but the last).

With echo, the echoed prompt tokens come first (see `girandole.api.serving.choice`); the first
prompt token has no context: null `token_logprobs`/`top_logprobs` in the legacy format, 0.0 in
the content format.

Every sampled token gets an entry, the end-of-turn/EOS token included (it is counted in
`completion_tokens` too; its `token` is its special string, e.g. "<end_of_turn>", and it adds no
text). `text_offset` is the character offset in the returned text where the token's text starts:
tokens are decoded one after another (special tokens add nothing), and an offset never points
past the text returned so far (text held back for a possible stop string, or trimmed stop
strings, put the offset at the end of the text).

Use one `LogprobTracker` per choice: feed it each engine output's `logprobs` together with the
length of the choice's text after that output.
"""

from __future__ import annotations

import base64
import codecs
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

LogprobsMode = Literal["content", "legacy"]

# Estimated JSON bytes of a position's entry, of each of its alternatives, and of each token id
# in a list (a listed sampling mask, raw_output's and return_token_ids': six digits and a comma
# at the Gemma vocabulary's size)
ENTRY_JSON_BYTES = 120
TOP_JSON_BYTES = 90
TOKEN_ID_JSON_BYTES = 7


@dataclass
class TokenLogprob:
    token_id: int
    token: str
    bytes: list[int]
    logprob: float | None
    sampling_logprob: float | None
    text_offset: int
    top: list[tuple[int, float]]  # (token id, logprob), most likely first
    # sampling_mask's fields (content format); a "non_zero_list" is kept as the sampler's int32
    # array, even in the formatted body, until JSON writes it (girandole.api.http.finite_json):
    # as a Python list a whole vocabulary (262,144 ids) is 9.4 MB a token, against 1 MB (and
    # 1.8 MB of JSON)
    mask: dict[str, Any] | None = None
    routing: str | None = None  # routing_matrix (base64), when asked for

    def json_size(self) -> int:
        """About how many bytes this entry takes in a response body (either format)."""
        size = ENTRY_JSON_BYTES + TOP_JSON_BYTES * len(self.top)
        if self.mask is not None:
            listed = self.mask.get("sampling_mask")
            if isinstance(listed, np.ndarray):
                size += TOKEN_ID_JSON_BYTES * len(listed)
            elif isinstance(listed, str):
                size += len(listed)
        if self.routing is not None:
            size += len(self.routing) + 20
        return size


class LogprobTracker:
    """Turns one choice's SampleResults into TokenLogprobs with text offsets."""

    def __init__(
        self,
        tokenizer: Any,
        num_top: int,
        mask_mode: str | None = None,
        routing: bool = False,
    ) -> None:
        self.tokenizer = tokenizer
        self.num_top = num_top
        self.mask_mode = mask_mode  # sampling_mask
        self.routing = routing  # include_routing_matrix
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._chars = 0  # characters the tokens so far decode to
        self.entries: list[TokenLogprob] = []

    def add(self, results: list[Any] | None, text_length: int) -> list[TokenLogprob]:
        """The entries for `results` (one engine output's), given the choice's text length
        after that output. Also kept in `self.entries`."""
        new: list[TokenLogprob] = []
        for r in results or []:
            tok = self.tokenizer
            offset = min(self._chars, text_length)
            if not tok.is_special(r.token_id):
                raw = tok.token_bytes(r.token_id)
                # bytes of an unfinished character that this token does not continue are a
                # U+FFFD before its text: the token's text starts after it
                offset = min(self._chars + self._breaks_pending(raw), text_length)
                self._chars += len(self._decoder.decode(raw))
            top = list(r.top_logprobs or [])[: self.num_top]
            new.append(
                TokenLogprob(
                    token_id=r.token_id,
                    token=tok.token_str(r.token_id),
                    bytes=list(tok.token_bytes(r.token_id)),
                    logprob=r.logprob,
                    sampling_logprob=r.sampling_logprob,
                    text_offset=offset,
                    top=top,
                    mask=mask_fields(self.mask_mode, getattr(r, "sampling_mask", None)),
                    routing=routing_field(getattr(r, "routing", None)) if self.routing else None,
                )
            )
        self.entries.extend(new)
        return new

    def _breaks_pending(self, raw: bytes) -> int:
        """1 when the decoder holds the first bytes of a character and `raw` does not go on
        with it (they become one U+FFFD), else 0."""
        pending = self._decoder.getstate()[0]
        if not pending or not raw:
            return 0
        try:
            (pending + raw[:1]).decode("utf-8")
        except UnicodeDecodeError as exc:
            return 0 if exc.reason == "unexpected end of data" else 1
        return 0

    def format(self, entries: list[TokenLogprob], mode: LogprobsMode) -> dict[str, Any]:
        return (
            content_format(self.tokenizer, entries)
            if mode == "content"
            else legacy_format(self.tokenizer, entries)
        )


def routing_field(experts: np.ndarray | None) -> str:
    """A content entry's `routing_matrix`: base64 of the int16 [layers, top-k] expert ids
    (little-endian); "" where no position predicted the token."""
    if experts is None:
        return ""
    return base64.b64encode(np.asarray(experts, dtype="<i2").tobytes()).decode("ascii")


def mask_fields(mode: str | None, allowed: np.ndarray | None) -> dict[str, Any] | None:
    """A content entry's `sampling_mask` fields: `sampling_mask_count` (how many tokens the
    sampling distribution allowed) always; `sampling_mask` the allowed ids ("non_zero_list") or
    a bitmask of them, base64, bit i of byte i // 8 (least significant first) for token i
    ("non_zero_buffer"). None for prompt tokens (echo): nothing was sampled there."""
    if mode is None or allowed is None:
        return None
    allowed = np.asarray(allowed, dtype=np.int32)
    out: dict[str, Any] = {"sampling_mask_count": len(allowed)}
    if mode == "non_zero_list":
        out["sampling_mask"] = allowed  # written as a list by finite_json, one at a time
    elif mode == "non_zero_buffer":
        flags = np.zeros(int(allowed.max()) + 1 if len(allowed) else 0, dtype=np.uint8)
        flags[allowed] = 1
        bits = np.packbits(flags, bitorder="little").tobytes()
        out["sampling_mask"] = base64.b64encode(bits).decode("ascii")
    return out


def content_format(tokenizer: Any, entries: list[TokenLogprob]) -> dict[str, Any]:
    return {
        "content": [
            {
                "token": e.token,
                # null only for an echoed first prompt token (no context): a number here
                "logprob": 0.0 if e.logprob is None else e.logprob,
                "sampling_logprob": 0.0 if e.sampling_logprob is None else e.sampling_logprob,
                "bytes": e.bytes,
                "token_id": e.token_id,
                "text_offset": e.text_offset,
                "top_logprobs": [
                    {
                        "token": tokenizer.token_str(tid),
                        "logprob": lp,
                        "token_id": tid,
                        "bytes": list(tokenizer.token_bytes(tid)),
                    }
                    for tid, lp in e.top
                ],
                **(e.mask or {}),  # a listed mask stays an array: JSON writes it
                **({"routing_matrix": e.routing} if e.routing is not None else {}),
            }
            for e in entries
        ]
    }


def legacy_format(tokenizer: Any, entries: list[TokenLogprob]) -> dict[str, Any]:
    tops: list[dict[str, float] | None] = []
    for e in entries:
        if e.logprob is None and not e.top:
            tops.append(None)  # an echoed first prompt token: nothing predicts it
            continue
        top: dict[str, float] = {}
        for tid, lp in [*e.top, (e.token_id, e.logprob)]:
            if lp is None:
                continue
            key = tokenizer.token_str(tid)
            top[key] = max(lp, top.get(key, lp))
        tops.append(top)
    return {
        "tokens": [e.token for e in entries],
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": tops,
        "text_offset": [e.text_offset for e in entries],
        "token_ids": [e.token_id for e in entries],
    }
