"""The chat prompt: messages through the chat template to token ids (the rules: the Prompt part of
`girandole.api.chat`)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from girandole.api.chat.reasoning import ReasoningPlan, apply_history
from girandole.api.chat.schema import ChatCompletionRequest, ChatMessage
from girandole.api.chat.tools import ToolPlan, prompt_messages
from girandole.api.http.errors import APIError, bad_request
from girandole.api.serving.prompt import off_loop_if_long
from girandole.tokenizer.chat_template import ChatTemplateError, encode_chat, flatten_content
from girandole.tokenizer.tokenizer import Tokenizer

logger = logging.getLogger("girandole.api")

# What rendering one message through the template costs, in characters of text tokenized
# (about 40 us, measured): 16 short turns go off the event loop as 2 KB of text does.
RENDER_CHARS_PER_MESSAGE = 128


@dataclass
class ChatPrompt:
    text: str
    token_ids: list[int]
    num_dropped_messages: int = 0  # by prompt_truncate_len


@dataclass(frozen=True)
class PromptEnd:
    """How the prompt ends when the caller says so (/tokenize's `add_generation_prompt` and
    `continue_final_message`), and template variables of its own (`chat_template_kwargs`).
    Unset (chat's own rule): a final assistant message is continued, else a generation prompt
    is added; one set: the other as vLLM defaults it (generation prompt unless continuing)."""

    add_generation_prompt: bool | None = None
    continue_final_message: bool | None = None
    template_kwargs: dict[str, Any] = field(default_factory=dict)

    def flags(self, final_role: str) -> tuple[bool, bool]:
        """(add_generation_prompt, continue_final_message) for a prompt whose final message
        has `final_role`."""
        generation, cont = self.add_generation_prompt, self.continue_final_message
        if cont is None:
            cont = generation is None and final_role == "assistant"
        if generation is None:
            generation = not cont
        return generation and not cont, cont


def check_parts(messages: list[ChatMessage]) -> None:
    for i, message in enumerate(messages):
        if not isinstance(message.content, list):
            continue
        for j, part in enumerate(message.content):
            where = f"messages.{i}.content.{j}"
            if part.type != "text":
                raise bad_request(
                    f"Content parts of type '{part.type}' are not supported: this model takes"
                    f" text only, field: '{where}'",
                    where,
                )
            if part.text is None:
                raise bad_request(
                    f"A text part needs 'text', field: '{where}.text'", where + ".text"
                )


def template_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """Messages as the template sees them, without system messages whose content is empty."""
    check_parts(messages)
    out = []
    for message in messages:
        if message.role == "system" and flatten_content(message.content_value()) == "":
            continue
        out.append(message.template_dict())
    final = out[-1] if out else None
    if (
        final is not None
        and final["role"] == "assistant"
        and flatten_content(final.get("content")) == ""
        and not final.get("tool_calls")
    ):
        out.pop()  # nothing to continue: an empty answer is a plain generation prompt
    if not out:
        roles = sorted({m.role for m in messages})
        raise bad_request(
            "messages has nothing to send to the model: only "
            + " and ".join(f"{role} messages" for role in roles)
            + " with empty content",
            "messages",
        )
    return out


def _encode(
    tokenizer: Tokenizer,
    messages: list[dict[str, Any]],
    template: str,
    safe: bool,
    tools: list[dict[str, Any]] | None = None,
    reasoning: ReasoningPlan | None = None,
    end: PromptEnd | None = None,
) -> tuple[str, list[int]]:
    end = end or PromptEnd()
    generation, cont = end.flags(messages[-1]["role"])
    # the request's reasoning fields win over its chat_template_kwargs
    variables = end.template_kwargs | (reasoning.template_kwargs() if reasoning is not None else {})
    text, ids = encode_chat(
        tokenizer,
        messages,
        template,
        safe_tokenization=safe,
        add_generation_prompt=generation,
        continue_final_message=cont,
        tools=tools,
        **variables,
    )
    # the empty thinking block goes only after a generation prompt
    suffix = reasoning.prompt_suffix(template, text, not generation) if reasoning else ""
    if suffix:  # thinking off in a template without a switch for it: an empty thinking block
        text, ids = text + suffix, ids + tokenizer.encode(suffix, add_bos=False)
    return text, ids


def _truncate(
    tokenizer: Tokenizer,
    messages: list[dict[str, Any]],
    template: str,
    safe: bool,
    limit: int,
    full: tuple[str, list[int]],
    tools: list[dict[str, Any]] | None = None,
    reasoning: ReasoningPlan | None = None,
    end: PromptEnd | None = None,
) -> ChatPrompt:
    """Drop the oldest turns (then the system prompt) until the prompt has <= limit tokens."""
    system = messages[:1] if messages[0]["role"] == "system" else []
    body = messages[len(system) :]
    # a cut may start only at a user message, never past the last one
    users = [i for i, m in enumerate(body) if m["role"] == "user"]
    last = users[-1] if users else 0
    starts = [i for i in users if 0 < i <= last] or ([last] if last > 0 else [])

    def attempt(keep_system: bool, start: int) -> ChatPrompt | None:
        msgs = (system if keep_system else []) + body[start:]
        text, ids = _encode(tokenizer, msgs, template, safe, tools, reasoning, end)
        if len(ids) > limit:
            return None
        return ChatPrompt(text, ids, len(messages) - len(msgs))

    # binary search: the fewest dropped turns that fit, with the system prompt kept
    lo, hi, best = 0, len(starts) - 1, None
    while lo <= hi:
        mid = (lo + hi) // 2
        found = attempt(True, starts[mid])
        if found is not None:
            best, hi = found, mid - 1
        else:
            lo = mid + 1
    if best is not None:
        return best
    tail = body[starts[-1] if starts else 0 :]
    if system and tail:
        found = attempt(False, starts[-1] if starts else 0)
        if found is not None:
            return found
    kept = len(_encode(tokenizer, tail or system, template, safe, tools, reasoning, end)[1])
    raise bad_request(
        f"prompt_truncate_len is {limit} tokens, but the last turn alone takes {kept}"
        f" (the whole prompt: {len(full[1])})",
        "prompt_truncate_len",
    )


def build_prompt(
    tokenizer: Tokenizer,
    req: ChatCompletionRequest,
    template: str,
    plan: ToolPlan | None = None,
    reasoning: ReasoningPlan | None = None,
    end: PromptEnd | None = None,
) -> ChatPrompt:
    messages = template_messages(req.messages)
    if reasoning is not None:  # earlier turns' reasoning as reasoning_history asks
        messages = apply_history(messages, reasoning.history)
    # tools into the prompt: the template's own way, else a system text (girandole.api.chat.tools)
    messages, tools = prompt_messages(messages, plan, template)
    safe = bool(req.safe_tokenization)
    try:
        text, ids = _encode(tokenizer, messages, template, safe, tools, reasoning, end)
        if req.prompt_truncate_len is not None and len(ids) > req.prompt_truncate_len:
            limit = req.prompt_truncate_len
            return _truncate(
                tokenizer, messages, template, safe, limit, (text, ids), tools, reasoning, end
            )
    except ChatTemplateError as exc:
        raise bad_request(str(exc), "messages") from None
    except APIError:
        raise
    except Exception as exc:  # noqa: BLE001 - a tokenizer bug must not become a 500
        logger.exception("tokenizing a chat prompt failed")
        raise bad_request(f"The chat prompt could not be tokenized: {exc}", "messages") from None
    if not ids:
        raise bad_request("The prompt is empty after applying the chat template", "messages")
    return ChatPrompt(text, ids)


async def chat_prompt(
    tokenizer: Tokenizer,
    req: ChatCompletionRequest,
    template: str,
    plan: ToolPlan | None,
    vocab_size: int,
    reasoning: ReasoningPlan | None = None,
    end: PromptEnd | None = None,
) -> ChatPrompt:
    """The request's prompt (long conversations rendered and tokenized in a thread); `end`:
    how it ends, when the caller says (None: as chat ends it)."""
    size = sum(len(flatten_content(m.content_value())) for m in req.messages if m.content)
    # rendering costs per message too: a conversation of many short turns is long work
    size += RENDER_CHARS_PER_MESSAGE * len(req.messages)
    prompt = await off_loop_if_long(
        size, build_prompt, tokenizer, req, template, plan, reasoning, end
    )
    for token in prompt.token_ids:
        if token >= vocab_size:  # a template writing a token the model lacks
            raise bad_request(f"Token id {token} of the chat prompt is out of range", "messages")
    return prompt
