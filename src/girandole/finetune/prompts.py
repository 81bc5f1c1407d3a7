"""Fireworks' reinforcement fine-tuning rows: JSONL lines `{"messages": [system?, user, ...],
"ground_truth": ..., ...}`: the prompt the policy answers, and any other fields (ground_truth
and whatever the evaluator reads), passed through to the evaluator with each answer.

The prompt is rendered with the model's chat template and the generation prompt, as the chat
route renders a request (so the adapter is trained on the prompts it will be queried with).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from girandole.finetune.data import RowError, check_message, read_jsonl
from girandole.tokenizer.chat_template import ChatTemplateError, encode_chat
from girandole.tokenizer.tokenizer import Tokenizer


@dataclass
class Prompt:
    """One row: its prompt's token ids, its messages and its other fields."""

    ids: list[int]
    messages: list[dict[str, Any]]
    fields: dict[str, Any] = field(default_factory=dict)

    def row(self, answer: str) -> dict[str, Any]:
        """The evaluator's row for one answer: the prompt's messages and the answer, and the
        row's other fields."""
        messages = [*self.messages, {"role": "assistant", "content": answer}]
        return {**self.fields, "messages": messages}


def read_prompts(data: bytes, what: str = "dataset") -> list[dict[str, Any]]:
    """The checked rows of each non-blank line; RowError names the first bad line."""
    rows = read_jsonl(data, what, check_prompt)
    if not rows:
        raise RowError(f"{what} has no rows")
    return rows


def check_prompt(row: Any, where: str) -> dict[str, Any]:
    if not isinstance(row, dict) or not isinstance(row.get("messages"), list):
        raise RowError(
            f'{where}: a row is an object {{"messages": [...], "ground_truth": ...}} (Fireworks\''
            " reinforcement fine-tuning format)"
        )
    messages = row["messages"]
    if not messages:
        raise RowError(f"{where}: messages is empty: a row needs the prompt to answer")
    for i, message in enumerate(messages):
        check_message(message, i, where)
    if messages[-1]["role"] == "assistant":
        raise RowError(
            f"{where}: the last message is the assistant's: a row is the prompt, the policy"
            " writes the answer"
        )
    return row


def encode_prompt(
    tok: Tokenizer, template: str | None, row: dict[str, Any], max_length: int, where: str
) -> Prompt:
    """Render and tokenize one checked row; RowError when its prompt leaves no room to answer
    within `max_length` tokens."""
    messages = [{"role": m["role"], "content": m["content"]} for m in row["messages"]]
    try:
        _, ids = encode_chat(tok, messages, template, add_generation_prompt=True)
    except ChatTemplateError as exc:
        raise RowError(f"{where}: {exc}") from None
    if len(ids) >= max_length:
        raise RowError(
            f"{where}: its prompt is {len(ids)} tokens, leaving no room to answer within"
            f" maxContextLength {max_length}"
        )
    fields = {k: v for k, v in row.items() if k != "messages"}
    return Prompt(ids, messages, fields)
