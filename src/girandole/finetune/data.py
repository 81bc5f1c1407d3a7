"""Fireworks' supervised fine-tuning rows: JSONL lines `{"messages": [{"role", "content"}, ...]}`,
rendered with the model's chat template (the one the chat route uses, so the adapter is trained
on the prompts it will be queried with) and tokenized, with the tokens of assistant messages
marked as trained (a message with `"weight": 0` is not trained on, as Fireworks documents).

A row is cut at its assistant messages: the text before each one (the conversation so far with
the generation prompt) and the text through it; those pieces are tokenized one by one, so each
token belongs to exactly one piece. A template that does not render a conversation as a prefix
of its continuation cannot be cut so; the row is refused, naming its line.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from girandole.tokenizer.chat_template import ChatTemplateError, render_chat_for
from girandole.tokenizer.tokenizer import Tokenizer

ROLES = ("system", "user", "assistant")
T = TypeVar("T")


class RowError(ValueError):
    """A dataset row that cannot be trained on; the message names its line."""


@dataclass
class Example:
    """One tokenized row: `ids` [N] and `trained` [N] (whether token i is a training target,
    i.e. its loss, predicted from tokens[..i-1], counts)."""

    ids: list[int]
    trained: list[bool]

    @property
    def num_trained(self) -> int:
        # token 0 is never predicted
        return sum(self.trained[1:])


def read_rows(data: bytes, what: str = "dataset") -> list[list[dict[str, Any]]]:
    """The messages of each non-blank line; RowError names the first bad line."""
    rows = read_jsonl(data, what, check_row)
    if not rows:
        raise RowError(f"{what} has no rows")
    return rows


def read_jsonl(data: bytes, what: str, check: Callable[[Any, str], T]) -> list[T]:
    """`check(row, "{what} line N")` of each non-blank line's JSON value."""
    rows = []
    for number, raw in enumerate(data.decode("utf-8", errors="replace").splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw)
        except ValueError as exc:
            raise RowError(f"{what} line {number} is not valid JSON: {exc}") from None
        rows.append(check(row, f"{what} line {number}"))
    return rows


def check_message(message: Any, i: int, where: str) -> None:
    """RowError unless messages[i] is an object with a known role and string content (every
    fine-tuning row format's messages)."""
    if not isinstance(message, dict):
        raise RowError(f"{where}: messages[{i}] is not an object")
    if message.get("role") not in ROLES:
        raise RowError(f"{where}: messages[{i}].role must be one of {', '.join(ROLES)}")
    if not isinstance(message.get("content"), str):
        raise RowError(f"{where}: messages[{i}].content must be a string")


def check_row(row: Any, where: str) -> list[dict[str, Any]]:
    if not isinstance(row, dict) or not isinstance(row.get("messages"), list):
        raise RowError(
            f'{where}: a row is an object {{"messages": [...]}} (Fireworks\' SFT format)'
        )
    extra = sorted(set(row) - {"messages"})
    if extra:
        raise RowError(f"{where}: unknown field {extra[0]!r}: a row has only messages")
    messages = row["messages"]
    trained = False
    for i, message in enumerate(messages):
        check_message(message, i, where)
        unknown = sorted(set(message) - {"role", "content", "weight"})
        if unknown:
            raise RowError(f"{where}: messages[{i}] has unknown field {unknown[0]!r}")
        weight = message.get("weight", 1)
        if weight not in (0, 1) or isinstance(weight, bool):
            raise RowError(f"{where}: messages[{i}].weight must be 0 or 1")
        trained = trained or (message["role"] == "assistant" and weight == 1)
    if not trained:
        raise RowError(f"{where}: no assistant message to train on (weight 1)")
    return messages


def encode_row(
    tok: Tokenizer,
    template: str | None,
    messages: list[dict[str, Any]],
    max_length: int,
    where: str,
) -> Example:
    """Render and tokenize one checked row, cut to `max_length` tokens."""
    plain = [{"role": m["role"], "content": m["content"]} for m in messages]
    try:
        full = render_chat_for(tok, plain, template, add_generation_prompt=False)
        cuts: list[tuple[int, int, bool]] = []  # (start, end, trained) of each assistant text
        for k, message in enumerate(plain):
            if message["role"] != "assistant":
                continue
            before = render_chat_for(tok, plain[:k], template, add_generation_prompt=True)
            through = render_chat_for(tok, plain[: k + 1], template, add_generation_prompt=False)
            if not (full.startswith(through) and through.startswith(before)):
                raise RowError(
                    f"{where}: the chat template does not render this conversation as a prefix"
                    " of itself, so its assistant messages cannot be found in the prompt"
                )
            cuts.append((len(before), len(through), messages[k].get("weight", 1) == 1))
    except ChatTemplateError as exc:
        raise RowError(f"{where}: {exc}") from None
    ids: list[int] = []
    trained: list[bool] = []
    position = 0
    for start, end, train in [*cuts, (len(full), len(full), False)]:
        for a, b, flag in ((position, start, False), (start, end, train)):
            if b <= a:
                continue
            piece = tok.encode(full[a:b], add_bos=None if a == 0 else False)
            ids.extend(piece)
            trained.extend([flag] * len(piece))
        position = max(position, end)
    return Example(ids[:max_length], trained[:max_length])


def batches(
    examples: list[Any],
    samples: int | None,
    tokens: int | None,
    length: Callable[[Any], int] = lambda example: len(example.ids),
) -> list[list[Any]]:
    """Examples in order, grouped by `samples` per batch, or by up to `tokens` tokens (a longer
    example is a batch alone); one example a batch when neither is set. `length`: an example's
    tokens (a preference pair's are both of its outputs')."""
    out: list[list[Any]] = []
    current: list[Any] = []
    size = 0
    for example in examples:
        full = (samples is not None and len(current) >= samples) or (
            tokens is not None and current and size + length(example) > tokens
        )
        if full or (samples is None and tokens is None and current):
            out.append(current)
            current, size = [], 0
        current.append(example)
        size += length(example)
    if current:
        out.append(current)
    return out


def carve_out(rows: list[Any], fraction: float = 0.1) -> tuple[list[Any], list[Any]]:
    """(training rows, evaluation rows): the last `fraction` of the rows (at least one) held out,
    when there are at least two."""
    if len(rows) < 2:
        return rows, []
    held = max(1, math.floor(len(rows) * fraction))
    return rows[:-held], rows[-held:]
