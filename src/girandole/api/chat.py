"""The chat completions service: messages through the chat template to engine requests, and back.

It reuses the completions service (`girandole.api.completions`) for everything but the prompt and
the response shapes: per-choice SamplingParams, the context-length rules, usage counting,
starting and aborting the engine requests.

Prompt:
- The template is `--chat-template` if given, else the model's own (tokenizer_config.json or the
  GGUF's `tokenizer.chat_template`), else the built-in one of the model's family (Gemma,
  Llama 3, Llama 2, ChatML) found from its turn-marker tokens. A model with none of these has no
  chat (`supports_chat: false` in /models, 400 here).
- A system message with empty content is left out ("to completely omit the system prompt, set
  its content to an empty string").
- A final assistant message is continued: rendered open, without a generation prompt (an empty
  one is dropped instead, which leaves the generation prompt).
- BOS is not doubled: templates that write it get no second one from the tokenizer.
- `prompt_truncate_len`: while the prompt has more tokens than that, the oldest turns go (a turn
  starts at a user message, so roles still alternate); the system prompt and the last user turn
  stay. If that is still too long, the system prompt goes too; if even the last turn alone is too
  long, 400.
- The template's end-of-turn token (`<end_of_turn>`, `<|eot_id|>`, `<|im_end|>`...) is one of the
  tokenizer's stop tokens, so it ends generation, like EOS, and counts as a completion token.

Responses: `max_tokens` defaults to 2048 (Fireworks' chat guide); usage as /completions (template
tokens and BOS in `prompt_tokens`). Logprobs: `logprobs: true` (+ `top_logprobs`) gives the
content format, an integer the legacy format (`girandole.api.logprob_formats`). `raw_output`
gives `choices[].raw_output` with `prompt_fragments` (the fed prompt as text pieces and the ids
of special tokens, BOS included), `prompt_token_ids`, `completion` and `completion_token_ids`.

Streaming: per choice a role chunk (`delta: {"role": "assistant"}`), sent first for every choice,
then content chunks (each with its tokens' logprobs when asked), then a `delta: {}` chunk with
`finish_reason` (and `raw_output`); choices interleave, each chunk carries one choice's `index`.
Usage is placed as in /completions (`--stream-usage`), then `data: [DONE]`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from girandole.api import completions
from girandole.api.completions import ChoiceState, CompletionJob, _engine_error, _record, _usage
from girandole.api.errors import APIError, bad_request
from girandole.api.fanout import ChoiceFanout, ChoiceRequest
from girandole.api.logprob_formats import LogprobsMode, LogprobTracker
from girandole.api.prompts import fit_max_tokens
from girandole.api.sampling import sampling_defaults
from girandole.api.schemas.chat import ChatCompletionRequest, ChatMessage
from girandole.api.sse import DONE, sse_event
from girandole.tokenizer.chat_template import (
    ChatTemplateError,
    builtin_template,
    encode_chat,
    flatten_content,
    guess_family,
)

logger = logging.getLogger("girandole.api")

DEFAULT_MAX_TOKENS = 2048
# Conversations with more characters than this are rendered and tokenized in a thread.
_INLINE_CHARS = 2048


# -- the template ----------------------------------------------------------------------------


def model_family(tokenizer: Any) -> str | None:
    """The built-in template family of a tokenizer, or None when its vocabulary has no chat
    markers (guess_family's ChatML fallback is not taken for a tokenizer without <|im_start|>)."""
    family = guess_family(tokenizer)
    if family == "chatml" and tokenizer.token_to_id("<|im_start|>") is None:
        return None
    return family


def chat_template_for(tokenizer: Any, override: str | None = None) -> str | None:
    """The template chat requests are rendered with: `--chat-template`, the model's, or the
    built-in one of its family; None when there is none."""
    if override:
        return override
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.chat_template
    family = model_family(tokenizer)
    return builtin_template(family) if family else None


# -- the prompt --------------------------------------------------------------------------------


@dataclass
class ChatPrompt:
    text: str
    token_ids: list[int]
    num_dropped_messages: int = 0  # by prompt_truncate_len


def _check_parts(messages: list[ChatMessage]) -> None:
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
    _check_parts(messages)
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
        raise bad_request(
            "messages has nothing to send to the model: only system messages with empty content",
            "messages",
        )
    return out


def _encode(
    tokenizer: Any, messages: list[dict[str, Any]], template: str, safe: bool
) -> tuple[str, list[int]]:
    cont = messages[-1]["role"] == "assistant"
    return encode_chat(
        tokenizer,
        messages,
        template,
        safe_tokenization=safe,
        add_generation_prompt=not cont,
        continue_final_message=cont,
    )


def _truncate(
    tokenizer: Any,
    messages: list[dict[str, Any]],
    template: str,
    safe: bool,
    limit: int,
    full: tuple[str, list[int]],
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
        text, ids = _encode(tokenizer, msgs, template, safe)
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
    kept = len(_encode(tokenizer, tail or system, template, safe)[1])
    raise bad_request(
        f"prompt_truncate_len is {limit} tokens, but the last turn alone takes {kept}"
        f" (the whole prompt: {len(full[1])})",
        "prompt_truncate_len",
    )


def build_prompt(
    tokenizer: Any,
    req: ChatCompletionRequest,
    template: str,
) -> ChatPrompt:
    messages = template_messages(req.messages)
    safe = bool(req.safe_tokenization)
    try:
        text, ids = _encode(tokenizer, messages, template, safe)
        if req.prompt_truncate_len is not None and len(ids) > req.prompt_truncate_len:
            return _truncate(
                tokenizer, messages, template, safe, req.prompt_truncate_len, (text, ids)
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


def prompt_fragments(tokenizer: Any, ids: list[int]) -> list[str | int]:
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


# -- the job -----------------------------------------------------------------------------------


@dataclass
class ChatJob:
    job: CompletionJob  # what the completions service runs and counts
    prompt: ChatPrompt
    tokenizer: Any
    logprobs_mode: LogprobsMode | None = None
    num_top_logprobs: int = 0
    raw_output: bool = False


def new_chat_id() -> str:
    return "chatcmpl-" + uuid.uuid4().hex


def _logprobs_request(req: ChatCompletionRequest) -> tuple[LogprobsMode | None, int]:
    lp = req.logprobs
    if lp is None or lp is False:
        if req.top_logprobs:
            raise bad_request("top_logprobs needs logprobs set to true", "top_logprobs")
        return None, 0
    if lp is True:
        return "content", req.top_logprobs or 0
    return "legacy", req.top_logprobs if req.top_logprobs is not None else lp


async def prepare(
    engine: Any,
    req: ChatCompletionRequest,
    request_id: str,
    model: str,
    context_length: int,
    template: str | None,
) -> ChatJob:
    tokenizer = engine.tokenizer
    if template is None:
        raise bad_request(
            "This model has no chat template (none in its files and no built-in one for its"
            " family): use /completions, or start the server with --chat-template",
            "messages",
        )
    _check_parts(req.messages)
    size = sum(len(flatten_content(m.content_value())) for m in req.messages if m.content)
    if size < _INLINE_CHARS:
        prompt = build_prompt(tokenizer, req, template)
    else:
        prompt = await asyncio.to_thread(build_prompt, tokenizer, req, template)
    vocab = engine.model_config.vocab_size
    for token in prompt.token_ids:
        if token >= vocab:  # a template writing a token the model lacks
            raise bad_request(f"Token id {token} of the chat prompt is out of range", "messages")
    mode, num_top = _logprobs_request(req)
    requested = req.max_tokens if req.max_tokens is not None else req.max_completion_tokens
    if requested is None:
        requested = DEFAULT_MAX_TOKENS
    behavior = req.context_length_exceeded_behavior or "truncate"
    max_tokens = fit_max_tokens(len(prompt.token_ids), requested, context_length, behavior)
    defaults = sampling_defaults(getattr(engine.model_config, "generation_config", None))
    n = req.n or 1
    choices = []
    for k in range(n):
        params = completions.choice_params(req, defaults, max_tokens, k)
        params = dataclasses.replace(params, logprobs=num_top if mode else None)
        choices.append(ChoiceRequest(k, 0, prompt.token_ids, params, f"{request_id}-{k}"))
    include_usage = not (req.stream_options and req.stream_options.include_usage is False)
    job = CompletionJob(
        id=request_id,
        created=int(time.time()),
        model=model,
        n=n,
        prompt_token_ids=[prompt.token_ids],
        choices=choices,
        stream=bool(req.stream),
        include_usage=include_usage,
    )
    return ChatJob(job, prompt, tokenizer, mode, num_top, bool(req.raw_output))


# -- responses ---------------------------------------------------------------------------------


@dataclass
class _Choice:
    state: ChoiceState
    tracker: LogprobTracker
    token_ids: list[int] = field(default_factory=list)
    text_length: int = 0  # characters of content so far


def _choices(cj: ChatJob) -> dict[int, _Choice]:
    return {
        c.index: _Choice(ChoiceState(), LogprobTracker(cj.tokenizer, cj.num_top_logprobs))
        for c in cj.job.choices
    }


def _add(cj: ChatJob, choice: _Choice, out: Any) -> list:
    _record(choice.state, out)
    choice.token_ids.extend(out.new_token_ids)
    choice.text_length += len(out.new_text)
    if cj.logprobs_mode is None:
        return []
    return choice.tracker.add(out.logprobs, choice.text_length)


def _raw_output(cj: ChatJob, choice: _Choice) -> dict[str, Any]:
    return {
        "prompt_fragments": prompt_fragments(cj.tokenizer, cj.prompt.token_ids),
        "prompt_token_ids": list(cj.prompt.token_ids),
        "completion": cj.tokenizer.decode(choice.token_ids, skip_special_tokens=False),
        "completion_token_ids": list(choice.token_ids),
    }


async def collect(cj: ChatJob, fanout: ChoiceFanout) -> dict[str, Any]:
    """The whole (non-streamed) response body."""
    job = cj.job
    choices = _choices(cj)
    try:
        async for index, out in fanout.events():
            _add(cj, choices[index], out)
    except Exception as exc:  # noqa: BLE001
        raise _engine_error(exc) from None
    finally:
        fanout.close()
    body = []
    for index in sorted(choices):
        c = choices[index]
        entry: dict[str, Any] = {
            "index": index,
            "message": {"role": "assistant", "content": "".join(c.state.text)},
            "logprobs": None,
            "finish_reason": c.state.finish_reason,
        }
        if cj.logprobs_mode is not None:
            entry["logprobs"] = c.tracker.format(c.tracker.entries, cj.logprobs_mode)
        if cj.raw_output:
            entry["raw_output"] = _raw_output(cj, c)
        body.append(entry)
    states = {i: c.state for i, c in choices.items()}
    return {
        "id": job.id,
        "object": "chat.completion",
        "created": job.created,
        "model": job.model,
        "choices": body,
        "usage": _usage(job, states),
    }


def _chunk(job: CompletionJob, choices: list[dict[str, Any]], usage: Any = None) -> bytes:
    return sse_event(
        {
            "id": job.id,
            "object": "chat.completion.chunk",
            "created": job.created,
            "model": job.model,
            "choices": choices,
            "usage": usage,
        }
    )


def _delta(
    index: int, delta: dict[str, Any], finish_reason: str | None = None, logprobs: Any = None
) -> dict[str, Any]:
    return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}


async def stream(
    cj: ChatJob, fanout: ChoiceFanout, usage_placement: str = "separate"
) -> AsyncIterator[bytes]:
    """The SSE body. Closing it (client gone) aborts the engine requests."""
    job = cj.job
    choices = _choices(cj)
    states = {i: c.state for i, c in choices.items()}
    try:
        for index in sorted(choices):
            yield _chunk(job, [_delta(index, {"role": "assistant"})])
        async for index, out in fanout.events():
            choice = choices[index]
            entries = _add(cj, choice, out)
            if out.new_text or entries:
                logprobs = None
                if cj.logprobs_mode is not None:
                    logprobs = choice.tracker.format(entries, cj.logprobs_mode)
                delta = {"content": out.new_text}
                yield _chunk(job, [_delta(index, delta, logprobs=logprobs)])
            if out.finished:
                usage = None
                if job.include_usage and usage_placement == "finish":
                    usage = _usage(job, states)
                final = _delta(index, {}, choice.state.finish_reason)
                if cj.raw_output:
                    final["raw_output"] = _raw_output(cj, choice)
                yield _chunk(job, [final], usage)
        if job.include_usage and usage_placement != "finish":
            yield _chunk(job, [], _usage(job, states))
        yield DONE
    except Exception as exc:  # noqa: BLE001 - the status line is gone: report in the stream
        error = _engine_error(exc)
        yield sse_event({"error": error.body(job.id)["error"]})
    finally:
        fanout.close()


start = completions.start
