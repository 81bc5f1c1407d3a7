"""Reasoning ("thinking") in chat: the request fields that control it, the prompt side, and the
split of the output into `reasoning_content` and `content`.

A template can reason when it writes `<think>` or reads `enable_thinking` (Qwen3, DeepSeek-R1
and their fine-tunes). For such a template:

- `reasoning_effort`: `true` is read as `"medium"` and `false` as `"none"` before anything else,
  as Fireworks does. `"none"` turns thinking off; `"low"`, `"medium"`, `"high"`, `"xhigh"`,
  `"max"`, `"adaptive"` turn it on. The template gets `enable_thinking` (Qwen3's switch) and
  `reasoning_effort` (templates such as GPT-OSS's read it). Without the field the template's
  own default holds (Qwen3 thinks). An integer (a hard token cap, which Fireworks applies to
  grammar-based reasoning models) is a 400: these models reason in free text.
- `thinking` (Anthropic's form): `{"type": "enabled", "budget_tokens": N}` turns thinking on
  (N >= 1024, given to the template as `thinking_budget`: a hint, as in Anthropic's API, not a
  cut), `{"type": "disabled"}` off, `{"type": "adaptive"}` leaves it to the model (on);
  `effort` overrides `reasoning_effort` (Fireworks' 2026 rule).
- Turning thinking off in a template that has no switch for it (DeepSeek-R1's): the prompt gets
  an empty `<think>\\n\\n</think>\\n\\n` block after the generation prompt, as Qwen3's template
  writes for `enable_thinking=false`.
- `reasoning_history`: how earlier turns' `reasoning_content` reaches the template.
  `"disabled"`: none (and `<think>` blocks are cut out of assistant content); `"interleaved"`:
  only the turns after the last user message (a tool-calling loop in progress); `"preserved"`:
  every turn's (the template still decides what it shows). Without it, the messages go as sent.
- The output: text up to `</think>` is `reasoning_content` (a leading `<think>` dropped; the
  model's answer starts open when the prompt ends inside a `<think>` block), the rest,
  leading newlines dropped, is `content` (where tool calls are looked for). Streams send
  `delta.reasoning_content` and then `delta.content`. `usage.completion_tokens_details.
  reasoning_tokens` counts the generated tokens up to and including `</think>`.

A harmony template (gpt-oss; api/chat/harmony.py) always reasons: `reasoning_effort` low,
medium or high goes to the template's `reasoning_effort` (its system message), "none" (or
`false`, or `thinking: {"type": "disabled"}`) is a 400, as Fireworks answers for gpt-oss. The
output's analysis channel is `reasoning_content`, its final channel `content`;
reasoning_tokens counts the generated tokens up to and including the analysis's `<|end|>`.

A template that cannot reason: any request that asks for reasoning is a 400 saying so
(`reasoning_effort: "none"`/`false`, `thinking: {"type": "disabled"}` and `reasoning_history`
ask for nothing and are accepted; so is an effort that is only a hint, Anthropic's
`output_config.effort`, which governs all of a response's output and not only thinking).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from girandole.api.chat.harmony import END as HARMONY_END
from girandole.api.chat.harmony import HarmonySplitter, is_harmony
from girandole.api.http.errors import bad_request
from girandole.api.serving.growing_text import append_text

THINK_START = "<think>"
THINK_END = "</think>"
EMPTY_THINKING = "<think>\n\n</think>\n\n"
OFF_EFFORTS = ("none",)
HARMONY_EFFORTS = ("low", "medium", "high")  # what gpt-oss's template knows


def can_reason(template: str) -> bool:
    return THINK_START in template or "enable_thinking" in template or is_harmony(template)


def think_end_token(template: str) -> str:
    """The token that ends the reasoning in this template's output."""
    return HARMONY_END if is_harmony(template) else THINK_END


@dataclass
class ReasoningPlan:
    """What a chat request asks of reasoning, and how its prompt ends."""

    enabled: bool | None = None  # None: the template's default
    effort: str | None = None
    budget: int | None = None  # thinking.budget_tokens
    history: str | None = None
    opens_in_prompt: bool = False  # the prompt ends inside a <think> block
    harmony: bool = False  # gpt-oss's channels (api/chat/harmony.py), not <think> blocks

    def template_kwargs(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.enabled is not None:
            out["enable_thinking"] = self.enabled
        if self.effort is not None:
            out["reasoning_effort"] = self.effort
        if self.budget is not None:
            out["thinking_budget"] = self.budget
        return out

    def prompt_suffix(self, template: str, text: str, continued: bool) -> str:
        """Text to add after the rendered prompt: an empty thinking block where thinking is off
        and the template has no switch for it. Notes whether the answer starts inside <think>."""
        suffix = ""
        if self.harmony:
            return suffix
        if self.enabled is False and "enable_thinking" not in template and not continued:
            if _ends_open(text):
                suffix = "\n" + THINK_END + "\n\n"
            elif not text.rstrip().endswith(THINK_END):
                suffix = EMPTY_THINKING
        self.opens_in_prompt = _ends_open(text + suffix)
        return suffix


def _ends_open(text: str) -> bool:
    return text.rfind(THINK_START) > text.rfind(THINK_END)


def _effort_of(value: Any) -> str | int | None:
    if value is True:
        return "medium"
    if value is False:
        return "none"
    return value


def plan_reasoning(req: Any, template: str) -> ReasoningPlan | None:
    """The request's reasoning plan: None for a template that cannot reason (a 400 if the
    request asks for reasoning there)."""
    effort = _effort_of(req.reasoning_effort)
    thinking = req.thinking
    if thinking is not None and thinking.effort is not None:
        effort = thinking.effort
    if isinstance(effort, int):
        raise bad_request(
            "reasoning_effort as a number of tokens is not supported by this model: it reasons"
            " in free text; use 'none', 'low', 'medium' or 'high'",
            "reasoning_effort",
        )
    enabled: bool | None = None
    if effort is not None:
        enabled = effort not in OFF_EFFORTS
    if thinking is not None and thinking.type != "adaptive":
        enabled = thinking.type == "enabled" if thinking.effort is None else enabled
    if not can_reason(template):
        asked = thinking is not None and thinking.type == "enabled"
        if enabled and (asked or not getattr(req, "effort_is_hint", False)):
            param = "thinking" if asked else "reasoning_effort"
            raise bad_request(
                "This model cannot reason: its chat template has no thinking mode"
                f" (no <think> block, no enable_thinking switch), field: '{param}'",
                param,
            )
        return None
    budget = thinking.budget_tokens if thinking is not None else None
    if is_harmony(template):
        if enabled is False:
            param = "reasoning_effort" if effort in OFF_EFFORTS else "thinking"
            raise bad_request(
                "This model always reasons (gpt-oss): reasoning cannot be turned off; use"
                f" reasoning_effort 'low', 'medium' or 'high', field: '{param}'",
                param,
            )
        if effort is not None and effort not in HARMONY_EFFORTS:
            raise bad_request(
                f"reasoning_effort {effort!r} is not supported by this model (gpt-oss): use"
                " 'low', 'medium' or 'high'",
                "reasoning_effort",
            )
        plan = ReasoningPlan(None, effort, budget, req.reasoning_history, harmony=True)
        return plan
    if effort in OFF_EFFORTS:
        effort = None  # the switch says it
    return ReasoningPlan(enabled, effort, budget, req.reasoning_history)


def cut_think_blocks(text: str) -> str:
    """`text` without its `<think>...</think>` blocks (and the blanks after each). By hand: the
    regex it replaces searched to the end of the text again from every `<think>` with no
    `</think>` after it, quadratic (88 KB of them: 3.6 s, holding the GIL while the prompt
    was built)."""
    parts, pos = [], 0
    while (start := text.find(THINK_START, pos)) >= 0:
        end = text.find(THINK_END, start + len(THINK_START))
        if end < 0:
            break  # no block closes after this one: none after it either
        parts.append(text[pos:start])
        pos = end + len(THINK_END)
        while pos < len(text) and text[pos].isspace():
            pos += 1
    parts.append(text[pos:])
    return "".join(parts)


def apply_history(messages: list[dict[str, Any]], history: str | None) -> list[dict[str, Any]]:
    """Earlier turns' reasoning as `reasoning_history` asks (messages as the template sees them)."""
    if history is None or history == "preserved":
        return messages
    users = [i for i, m in enumerate(messages) if m["role"] == "user"]
    last_user = users[-1] if users else -1
    out = []
    for i, message in enumerate(messages):
        if message["role"] == "assistant" and (history == "disabled" or i < last_user):
            message = {k: v for k, v in message.items() if k != "reasoning_content"}
            if isinstance(message.get("content"), str):
                message["content"] = cut_think_blocks(message["content"])
        out.append(message)
    return out


def _held_tail(text: str, tag: str) -> int:
    """How many characters at the end of `text` could start `tag` (kept back in streams)."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


@dataclass
class ReasoningSplitter:
    """One choice's output, fed as it comes, split into reasoning and content. Newlines right
    after `<think>`, before and after `</think>` belong to neither (held until it is known)."""

    # "start" | "open" (just after <think>) | "reasoning" | "after" (</think> seen) | "content"
    state: str = "start"
    pending: str = ""  # text not given out yet: it may be the start of a tag
    reasoning_text: str = ""
    content_text: str = ""
    ended: bool = False  # </think> was written
    # blanks at the start, set aside while they may precede <think>, and newlines in the
    # reasoning, while they may precede </think>: kept in `pending`, they were stripped again
    # at every token (quadratic: 4 s for 100,000 newline tokens at the start, 37 s within)
    _blanks: list[str] = field(default_factory=list, repr=False)

    @classmethod
    def for_prompt(cls, opens_in_prompt: bool) -> ReasoningSplitter:
        return cls(state="open" if opens_in_prompt else "start")

    def feed(self, text: str, final: bool = False) -> tuple[str, str]:
        """(reasoning, content) that `text` adds; `final`: nothing more will come."""
        self.pending += text
        if final and self._blanks:  # nothing more: the blanks are content, or precede a tag
            self.pending, self._blanks = "".join(self._blanks) + self.pending, []
        reasoning, content = [], []
        while self.pending:
            if self.state == "start":
                stripped = self.pending.lstrip()
                if stripped.startswith(THINK_START):
                    self.pending, self._blanks = stripped[len(THINK_START) :], []
                    self.state = "open"
                elif not final and (not stripped or THINK_START.startswith(stripped)):
                    if not stripped:  # maybe the start of <think>: the blanks set aside
                        self._blanks.append(self.pending)
                        self.pending = ""
                    break
                else:
                    self.pending, self._blanks = "".join(self._blanks) + self.pending, []
                    self.state = "content"
            elif self.state in ("open", "after"):
                self.pending = self.pending.lstrip("\n")
                if self.pending:
                    self.state = "reasoning" if self.state == "open" else "content"
            elif self.state == "reasoning":
                at = self.pending.find(THINK_END)
                if at >= 0:
                    head = self.pending[:at].rstrip("\n")
                    reasoning.append("".join(self._blanks) + head if head else "")
                    self.pending, self._blanks = self.pending[at + len(THINK_END) :], []
                    self.state, self.ended = "after", True
                    continue
                if final:  # (the newlines set aside are in `pending` again)
                    reasoning.append(self.pending)
                    self.pending = ""
                    break
                body = self.pending[: len(self.pending) - _held_tail(self.pending, THINK_END)]
                body = body.rstrip("\n")  # newlines may precede </think>
                if body:
                    reasoning.append("".join(self._blanks) + body)
                    self._blanks = []
                self.pending = self.pending[len(body) :]
                if self.pending and not self.pending.strip("\n"):
                    # newlines only: set aside, not searched and stripped again at every token
                    self._blanks.append(self.pending)
                    self.pending = ""
                break
            else:
                content.append(self.pending)
                self.pending = ""
        r, c = "".join(reasoning), "".join(content)
        append_text(self, "reasoning_text", r)
        append_text(self, "content_text", c)
        return r, c

    def finish(self) -> tuple[str, str]:
        return self.feed("", final=True)

    @property
    def reasoned(self) -> bool:
        return self.state in ("open", "reasoning", "after") or self.ended


def splitter_for(plan: ReasoningPlan | None) -> ReasoningSplitter | HarmonySplitter:
    """A choice's splitter under `plan` (built with the prompt): all of the output is content
    when thinking is off, else it starts as the prompt ends (inside a <think> block or not);
    a harmony template's output is split by its channels."""
    if plan is not None and plan.harmony:
        return HarmonySplitter()
    if plan is not None and plan.enabled is False:
        return ReasoningSplitter(state="content")
    return ReasoningSplitter.for_prompt(plan is not None and plan.opens_in_prompt)


def split_reasoning(text: str, opens_in_prompt: bool) -> tuple[str | None, str]:
    """A whole output as (reasoning_content or None, content)."""
    splitter = ReasoningSplitter.for_prompt(opens_in_prompt)
    splitter.feed(text)
    splitter.finish()
    return (splitter.reasoning_text if splitter.reasoned else None), splitter.content_text


def reasoning_tokens(
    splitter: ReasoningSplitter | HarmonySplitter,
    token_ids: list[int],
    tokenizer: Any,
    think_end_id: int | None,
) -> int:
    """Generated tokens spent reasoning: up to and including </think> (harmony: the analysis
    message's <|end|>, `think_end_id`), or all while open."""
    if not splitter.reasoned:
        return 0
    if not splitter.ended:
        return len(token_ids)
    if think_end_id is not None and think_end_id in token_ids:
        return token_ids.index(think_end_id) + 1
    # </think> spelt in pieces: the token that completes it (each token's bytes searched with
    # the tag's length before them, not the whole output again: that was quadratic)
    end = HARMONY_END if isinstance(splitter, HarmonySplitter) else THINK_END
    tag, written = end.encode(), bytearray()
    for i, token in enumerate(token_ids):
        start = max(0, len(written) - len(tag) + 1)
        written += tokenizer.token_bytes(token)
        if written.find(tag, start) >= 0:
            return i + 1
    return len(token_ids)
