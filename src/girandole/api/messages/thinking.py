"""What Anthropic refuses with thinking on, each a 400 in its words.

Anthropic's extended-thinking guide, "Feature compatibility"
(https://platform.claude.com/docs/en/build-with-claude/extended-thinking#feature-compatibility):
"Thinking isn't compatible with temperature or top_k modifications as well as forced tool
use", top_p may be set "between 1 and 0.95", and "You cannot pre-fill responses when thinking
is enabled". The messages are the ones its API answers, as client code and issues quote them:
- "`temperature` may only be set to 1 when thinking is enabled or in adaptive mode",
  "`top_k` must be unset when thinking is enabled or in adaptive mode", "`top_p` must be
  greater than or equal to 0.95 or unset when thinking is enabled or in adaptive mode": the
  sampling rules hold for `adaptive` thinking too;
- a text prefill under `enabled` thinking (Aider-AI/aider#3820): "messages.3.content.0.type:
  Expected `thinking` or `redacted_thinking`, but found `text`. When `thinking` is enabled, a
  final `assistant` message must start with a thinking block. ..." (`adaptive` thinking may
  answer without thinking, so it cannot ask a thinking block of the turn it continues: a
  prefill is continued there, as without thinking);
- "Thinking may not be enabled when tool_choice forces tool use" (`convert.check_forced_output`).
"""

from __future__ import annotations

from typing import Any

from girandole.api.http.errors import bad_request
from girandole.api.messages.schema import (
    CountTokensRequest,
    MessagesRequest,
    ThinkingAdaptive,
    ThinkingEnabled,
)

# the floor Anthropic sets on top_p with thinking on (the ceiling, 1, is the schema's)
MIN_TOP_P = 0.95
THINKING_BLOCKS = ("thinking", "redacted_thinking")


def check_thinking_budget(req: MessagesRequest) -> None:
    """Anthropic's 400 for an `enabled` thinking budget that leaves no room to answer (thinking
    counts toward max_tokens); `adaptive` and `disabled` take no budget, so nothing to check."""
    thinking = req.thinking
    if not isinstance(thinking, ThinkingEnabled):
        return
    if req.max_tokens <= thinking.budget_tokens:
        raise bad_request(
            f"`max_tokens` must be greater than `thinking.budget_tokens`, field:"
            f" 'thinking.budget_tokens' (max_tokens {req.max_tokens}, budget_tokens"
            f" {thinking.budget_tokens})",
            "thinking.budget_tokens",
        )


def check_thinking_sampling(req: MessagesRequest) -> None:
    """Anthropic's 400s for sampling fields thinking does not take (`enabled` or `adaptive`):
    a temperature other than 1, any top_k, a top_p under 0.95. Unset (null) is always fine."""
    if not isinstance(req.thinking, ThinkingEnabled | ThinkingAdaptive):
        return
    mode = "when thinking is enabled or in adaptive mode"
    if req.temperature is not None and req.temperature != 1:
        raise bad_request(
            f"`temperature` may only be set to 1 {mode} (temperature {req.temperature}),"
            " field: 'temperature'",
            "temperature",
        )
    if req.top_k is not None:
        raise bad_request(
            f"`top_k` must be unset {mode} (top_k {req.top_k}), field: 'top_k'", "top_k"
        )
    if req.top_p is not None and req.top_p < MIN_TOP_P:
        raise bad_request(
            f"`top_p` must be greater than or equal to {MIN_TOP_P} or unset {mode}"
            f" (top_p {req.top_p}), field: 'top_p'",
            "top_p",
        )


def check_thinking_prefill(req: CountTokensRequest, messages: list[dict[str, Any]]) -> None:
    """Anthropic's 400 for a prefill under `enabled` thinking: the answer would continue the
    final assistant turn's text, where the model must think first. `messages`: the chat
    messages (a prefill is what chat continues: a final assistant message, so not an empty
    turn, nor one of thinking blocks only, nor one a later system message follows)."""
    if not isinstance(req.thinking, ThinkingEnabled):
        return
    if not messages or messages[-1]["role"] != "assistant":
        return
    # the final turn as Anthropic reads it: the trailing assistant messages, merged
    first = len(req.messages) - 1
    while first > 0 and req.messages[first - 1].role == "assistant":
        first -= 1
    blocks = [(i, block) for i in range(first, len(req.messages))
              for block in req.messages[i].content]  # fmt: skip
    i, block = blocks[0]
    if block.type not in THINKING_BLOCKS:
        at = f"messages.{i}.content.0.type"
        raise bad_request(
            f"{at}: Expected `thinking` or `redacted_thinking`, but found `{block.type}`. When"
            " `thinking` is enabled, a final `assistant` message must start with a thinking"
            " block. We recommend you include thinking blocks from previous turns. To avoid"
            " this requirement, disable `thinking`.",
            at,
        )
    # thinking blocks, then text: still text to continue, which no thinking can precede now
    at = f"messages.{len(req.messages) - 1}"
    raise bad_request(
        f"{at}: You cannot pre-fill responses when thinking is enabled: the final `assistant`"
        " message's text would be continued, with no thinking before it. To avoid this"
        " requirement, disable `thinking`.",
        at,
    )
