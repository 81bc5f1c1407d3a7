"""The chat prompt: messages through the chat template to token ids (the rules: the Prompt part of
`girandole.api.chat`)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from girandole.api.chat.reasoning import ReasoningPlan, apply_history
from girandole.api.chat.schema import ChatCompletionRequest, ChatMessage
from girandole.api.chat.tools import ToolPlan, prompt_messages
from girandole.api.http.errors import APIError, bad_request
from girandole.api.serving.images import ImageMarkers
from girandole.api.serving.prompt import MAX_CHARS_PER_TOKEN, context_exceeded, off_loop_if_long
from girandole.tokenizer.chat_template import (
    ChatTemplateError,
    RenderedChat,
    flatten_content,
    render_chat_prompt,
)
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


def check_parts(messages: list[ChatMessage], vision: bool = False) -> None:
    """Every content part is text, or (`vision`: the model takes images) an image_url part of a
    user message; a 400 naming the first that is not."""
    for i, message in enumerate(messages):
        if not isinstance(message.content, list):
            continue
        for j, part in enumerate(message.content):
            where = f"messages.{i}.content.{j}"
            if part.type == "image_url" and vision:
                if message.role != "user":
                    raise bad_request(
                        f"Images go in user messages only, not in a {message.role} message,"
                        f" field: '{where}'",
                        where,
                    )
                if part.image_url is None:
                    raise bad_request(
                        f"An image_url part needs 'image_url', field: '{where}.image_url'",
                        where + ".image_url",
                    )
                continue
            if part.type != "text":
                raise bad_request(
                    f"Content parts of type '{part.type}' are not supported: this model takes"
                    f" {'text and images' if vision else 'text only'}, field: '{where}'",
                    where,
                )
            if part.text is None:
                raise bad_request(
                    f"A text part needs 'text', field: '{where}.text'", where + ".text"
                )


def template_messages(messages: list[ChatMessage], vision: bool = False) -> list[dict[str, Any]]:
    """Messages as the template sees them, without system messages whose content is empty;
    `vision`: image_url parts are allowed, as the `{"type": "image"}` parts that chat templates
    of vision models (Gemma 3's) write an image marker for."""
    check_parts(messages, vision)
    out = []
    for message in messages:
        if message.role == "system" and flatten_content(message.content_value()) == "":
            continue
        entry = message.template_dict()
        if vision and isinstance(entry["content"], list):
            entry["content"] = [
                {"type": "image"} if part.get("type") == "image_url" else part
                for part in entry["content"]
            ]
        out.append(entry)
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


@dataclass(frozen=True)
class ChatRender:
    """How one request's messages become its prompt: everything but the messages, which
    truncation varies."""

    tokenizer: Tokenizer
    template: str
    safe: bool
    tools: list[dict[str, Any]] | None = None
    reasoning: ReasoningPlan | None = None
    end: PromptEnd = field(default_factory=PromptEnd)
    context: int | None = None  # the model's context length: a prompt surely longer is refused
    images: ImageMarkers | None = None  # a vision model's: image markers become image tokens

    def encode_within(
        self, messages: list[dict[str, Any]], limit: int | None
    ) -> tuple[str, list[int]] | None:
        """(text, ids); None, without tokenizing, when the text has more characters than
        `limit` tokens can spell (seconds of CPU for a long conversation, to learn only that
        it does not fit)."""
        generation, cont = self.end.flags(messages[-1]["role"])
        # the request's reasoning fields win over its chat_template_kwargs
        variables = self.end.template_kwargs | (
            self.reasoning.template_kwargs() if self.reasoning is not None else {}
        )
        rendered = render_chat_prompt(
            self.tokenizer,
            messages,
            self.template,
            safe_tokenization=self.safe,
            add_generation_prompt=generation,
            continue_final_message=cont,
            tools=self.tools,
            **variables,
        )
        # the empty thinking block goes only after a generation prompt
        suffix = (
            self.reasoning.prompt_suffix(self.template, rendered.text, not generation)
            if self.reasoning
            else ""
        )
        if self.images is not None:
            marked = rendered.marked
            rendered = RenderedChat(
                self.images.expand(rendered.text),
                None if marked is None else self.images.expand(marked, rendered.marks.start),
                rendered.marks,
            )
        text = rendered.text + suffix
        if limit is not None and len(text) > limit * MAX_CHARS_PER_TOKEN:
            return None
        bound = limit if limit is not None else self.context
        if bound is not None and self.tokenizer.more_tokens_than(text, bound):
            return None  # counted in pieces: seconds of tokenizing spared
        ids = rendered.encode(self.tokenizer)
        if suffix:  # thinking off in a template without a switch for it: an empty thinking block
            ids = ids + self.tokenizer.encode(suffix, add_bos=False)
        return text, ids


def _truncate(
    render: ChatRender,
    messages: list[dict[str, Any]],
    limit: int,
    full: tuple[str, list[int]] | None,
) -> ChatPrompt:
    """Drop the oldest turns (then the system prompt) until the prompt has <= limit tokens;
    `full`: the whole prompt, if it was short enough to tokenize."""
    system = messages[:1] if messages[0]["role"] == "system" else []
    body = messages[len(system) :]
    # a cut may start only at a user message, never past the last one
    users = [i for i, m in enumerate(body) if m["role"] == "user"]
    last = users[-1] if users else 0
    starts = [i for i in users if 0 < i <= last] or ([last] if last > 0 else [])

    def attempt(keep_system: bool, start: int) -> ChatPrompt | None:
        msgs = (system if keep_system else []) + body[start:]
        found = render.encode_within(msgs, limit)
        if found is None or len(found[1]) > limit:
            return None
        return ChatPrompt(found[0], found[1], len(messages) - len(msgs))

    best = _fewest_dropped(len(starts), lambda j: attempt(True, starts[j]))
    if best is not None:
        return best
    tail = body[starts[-1] if starts else 0 :]
    if system and tail:
        found = attempt(False, starts[-1] if starts else 0)
        if found is not None:
            return found
    alone = render.encode_within(tail or system, limit)
    kept = str(len(alone[1])) if alone is not None else f"far more than {limit}"
    whole = f" (the whole prompt: {len(full[1])})" if full is not None else ""
    raise bad_request(
        f"prompt_truncate_len is {limit} tokens, but the last turn alone takes {kept}{whole}",
        "prompt_truncate_len",
    )


def _fewest_dropped(n: int, attempt: Callable[[int], ChatPrompt | None]) -> ChatPrompt | None:
    """The prompt from the earliest of n cut points (0 = oldest) whose tail fits, or None.

    Tails that fit are short (at most the limit) and cheap to render; one that does not can be
    the whole conversation. So the search gallops from the newest cut (tails of 1, 2, 4...
    turns), then bisects between the last tail that fit and the first that did not: no tail
    tried is more than twice the turns of the answer. A binary search from the oldest end
    rendered and tokenized the whole conversation (up to ~2M characters per turn) once per step:
    72 s of CPU for a 28 MB Responses conversation under truncation 'auto'."""
    if n == 0:
        return None
    best: tuple[int, ChatPrompt] | None = None
    too_long = -1  # the latest cut known not to fit
    span = 1
    while True:
        j = max(n - span, 0)
        found = attempt(j)
        if found is None:
            too_long = j
            break
        best = (j, found)
        if j == 0:
            return found
        span *= 2
    if best is None:
        return None
    lo, hi = too_long + 1, best[0] - 1
    while lo <= hi:
        mid = (lo + hi) // 2
        found = attempt(mid)
        if found is not None:
            best, hi = (mid, found), mid - 1
        else:
            lo = mid + 1
    return best[1]


def _with_thinking(message: dict[str, Any]) -> dict[str, Any]:
    """An assistant message's `reasoning_content` also as `thinking`, the field gpt-oss's
    harmony template renders as the turn's analysis message (kept in a tool-calling loop)."""
    if message.get("role") != "assistant" or "thinking" in message:
        return message
    reasoning = message.get("reasoning_content")
    return message if not reasoning else {**message, "thinking": reasoning}


def build_prompt(
    tokenizer: Tokenizer,
    req: ChatCompletionRequest,
    template: str,
    plan: ToolPlan | None = None,
    reasoning: ReasoningPlan | None = None,
    end: PromptEnd | None = None,
    context: int | None = None,
    images: ImageMarkers | None = None,
) -> ChatPrompt:
    """`context`: the model's context length, to refuse a prompt far longer before tokenizing
    all of it (None: no such check); `images`: a vision model's image markers (its image_url
    parts are allowed then)."""
    messages = template_messages(req.messages, images is not None)
    if reasoning is not None:  # earlier turns' reasoning as reasoning_history asks
        messages = apply_history(messages, reasoning.history)
        if reasoning.harmony:  # gpt-oss's template reads an earlier turn's reasoning as this
            messages = [_with_thinking(m) for m in messages]
    # tools into the prompt: the template's own way, else a system text (girandole.api.chat.tools)
    messages, tools = prompt_messages(messages, plan, template)
    render = ChatRender(tokenizer, template, bool(req.safe_tokenization), tools, reasoning,
                        end or PromptEnd(), context, images)  # fmt: skip
    try:
        limit = req.prompt_truncate_len
        full = render.encode_within(messages, limit)  # None: too long even to tokenize
        if limit is not None and (full is None or len(full[1]) > limit):
            return _truncate(render, messages, limit, full)
        if full is None:
            raise context_exceeded(
                f"The prompt is too long: far more than {context} tokens, model maximum"
                f" context length: {context}",
                "messages",
            )
        text, ids = full
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
    context: int | None = None,
    images: ImageMarkers | None = None,
) -> ChatPrompt:
    """The request's prompt (long conversations rendered and tokenized in a thread); `end`:
    how it ends, when the caller says (None: as chat ends it); `context`, `images`:
    build_prompt's."""
    size = sum(m.num_chars() for m in req.messages)
    # rendering costs per message too: a conversation of many short turns is long work
    size += RENDER_CHARS_PER_MESSAGE * len(req.messages)
    if plan is not None:  # the tools are rendered into the prompt too (128 may be megabytes)
        size += sum(len(tool.model_dump_json(exclude_none=True)) for tool in plan.tools)
    prompt = await off_loop_if_long(
        size, build_prompt, tokenizer, req, template, plan, reasoning, end, context, images
    )
    for token in prompt.token_ids:
        if token >= vocab_size:  # a template writing a token the model lacks
            raise bad_request(f"Token id {token} of the chat prompt is out of range", "messages")
    return prompt
