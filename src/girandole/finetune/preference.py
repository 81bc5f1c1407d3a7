"""Fireworks' preference rows (DPO jobs): JSONL lines
`{"input": {"messages": [...]}, "preferred_output": [{"role": "assistant", "content": ...}],
"non_preferred_output": [{"role": "assistant", "content": ...}]}`.

Each output is rendered after the input with the chat template, as an SFT row is
(data.encode_row): the input's messages are context (an assistant message there is not trained
on), the output's assistant messages are the tokens the loss counts. Fireworks asks for at least
MIN_ROWS rows; so does this server.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from girandole.finetune.data import Example, RowError, check_row, encode_row, read_jsonl
from girandole.tokenizer.tokenizer import Tokenizer

MIN_ROWS = 3
OUTPUTS = ("preferred_output", "non_preferred_output")


@dataclass
class Pair:
    """One preference row, tokenized: the input with its preferred (chosen) and its
    non-preferred (rejected) output."""

    chosen: Example
    rejected: Example

    @property
    def length(self) -> int:
        return len(self.chosen.ids) + len(self.rejected.ids)


Conversations = tuple[list[dict[str, Any]], list[dict[str, Any]]]


def read_pairs(data: bytes, what: str = "dataset") -> list[Conversations]:
    """(chosen messages, rejected messages) of each non-blank line, the input's assistant
    messages at weight 0; RowError names the first bad line."""
    pairs = read_jsonl(data, what, check_pair)
    if len(pairs) < MIN_ROWS:
        raise RowError(
            f"{what} has {len(pairs)} rows: a DPO dataset needs at least {MIN_ROWS} (as Fireworks'"
            " does)"
        )
    return pairs


def check_pair(row: Any, where: str) -> Conversations:
    shape = (
        f'{where}: a row is an object {{"input": {{"messages": [...]}}, "preferred_output":'
        ' [...], "non_preferred_output": [...]} (Fireworks\' DPO format)'
    )
    if not isinstance(row, dict) or not isinstance(row.get("input"), dict):
        raise RowError(shape)
    extra = sorted(set(row) - {"input", *OUTPUTS})
    if extra:
        raise RowError(f"{where}: unknown field {extra[0]!r}: a row has only input and {' and '.join(OUTPUTS)}")  # fmt: skip
    source = row["input"]
    if not isinstance(source.get("messages"), list) or set(source) != {"messages"}:
        raise RowError(f'{where}: input is an object {{"messages": [...]}}')
    context = []
    for i, message in enumerate(source["messages"]):
        if not isinstance(message, dict):
            raise RowError(f"{where}: input.messages[{i}] is not an object")
        # the input is context: its assistant messages are not trained on
        context.append({**message, "weight": 0})
    out = []
    for field in OUTPUTS:
        output = row.get(field)
        if not isinstance(output, list) or not output:
            raise RowError(f"{where}: {field} must be a non-empty list of assistant messages")
        for i, message in enumerate(output):
            if not isinstance(message, dict) or message.get("role") != "assistant":
                raise RowError(f"{where}: {field}[{i}] must be an assistant message")
        out.append(check_row({"messages": context + output}, f"{where} ({field})"))
    return out[0], out[1]


def encode_pair(
    tok: Tokenizer, template: str | None, pair: Conversations, max_length: int, where: str
) -> Pair:
    chosen, rejected = pair
    return Pair(
        encode_row(tok, template, chosen, max_length, f"{where} (preferred_output)"),
        encode_row(tok, template, rejected, max_length, f"{where} (non_preferred_output)"),
    )
