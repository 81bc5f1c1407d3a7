"""Anthropic's rule for tool blocks: each assistant turn's `tool_use` blocks are answered by
`tool_result` blocks in the very next (user) turn, and a `tool_result` answers a `tool_use` of
the turn just before it. Anthropic answers 400 otherwise; without the check a dangling result
reached the model as a `Result of a function` nobody called, and an unanswered call as if it
had been answered."""

from __future__ import annotations

from girandole.api.http.errors import bad_request
from girandole.api.messages.schema import Message


def _turns(messages: list[Message]) -> list[list[tuple[int, Message]]]:
    """Consecutive messages of one role, as Anthropic merges them (original indices kept);
    system messages inside the conversation hold no tool blocks and do not part turns."""
    turns: list[list[tuple[int, Message]]] = []
    for i, message in enumerate(messages):
        if message.role == "system":
            continue
        if turns and turns[-1][0][1].role == message.role:
            turns[-1].append((i, message))
        else:
            turns.append([(i, message)])
    return turns


def check_tool_pairing(messages: list[Message]) -> None:
    """A 400 in Anthropic's words for a `tool_use` id used twice, a `tool_use` not answered in
    the next turn, or a `tool_result` that answers no `tool_use` of the turn before it."""
    seen: set[str] = set()
    calls: dict[str, int] = {}  # the previous turn's tool_use ids -> their message index
    for turn in _turns(messages):
        results: set[str] = set()
        uses: dict[str, int] = {}
        for i, message in turn:
            for j, block in enumerate(message.content):
                if block.type == "tool_use":
                    if block.id in seen:
                        raise bad_request(
                            f"messages.{i}.content.{j}: `tool_use` ids must be unique,"
                            f" found '{block.id}' twice",
                            f"messages.{i}.content.{j}",
                        )
                    seen.add(block.id)
                    uses[block.id] = i
                elif block.type == "tool_result":
                    if block.tool_use_id not in calls:
                        raise bad_request(
                            f"messages.{i}.content.{j}: unexpected `tool_use_id` found in"
                            f" `tool_result` blocks: {block.tool_use_id}. Each `tool_result`"
                            " block must have a corresponding `tool_use` block in the previous"
                            " message.",
                            f"messages.{i}.content.{j}",
                        )
                    results.add(block.tool_use_id)
        missing = [cid for cid in calls if cid not in results]
        if missing:
            where = f"messages.{calls[missing[0]]}"
            raise bad_request(
                f"{where}: `tool_use` ids were found without `tool_result` blocks immediately"
                f" after: {', '.join(missing)}. Each `tool_use` block must have a corresponding"
                " `tool_result` block in the next message.",
                where,
            )
        calls = uses  # a final assistant turn's calls (a prefill continued) need no answer
