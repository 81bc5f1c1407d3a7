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
tokens and BOS in `prompt_tokens`). Logprobs, echo (the templated prompt's text before the
answer), raw_output, return_token_ids, perf metrics and prompt-cache keys work as on
/completions (`girandole.api.introspection`, one formatter for both endpoints).

Streaming: per choice a role chunk (`delta: {"role": "assistant"}`), sent first for every choice,
then content chunks (each with its tokens' logprobs and `token_ids` when asked), then a
`delta: {}` chunk with `finish_reason` (and `raw_output`); choices interleave, each chunk carries one choice's `index`.
Usage is placed as in /completions (`--stream-usage`), then `data: [DONE]`.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from girandole.api import completions, structured
from girandole.api import tools as tools_api
from girandole.api.completions import ChoiceState, CompletionJob, _engine_error, _record, _usage
from girandole.api.errors import APIError, bad_request
from girandole.api.fanout import ChoiceFanout, ChoiceRequest
from girandole.api.introspection import (  # noqa: F401 - prompt_fragments re-exported
    OutputOptions,
    cache_kwargs,
    output_options,
    prompt_fragments,
)
from girandole.api.prompts import fit_max_tokens
from girandole.api.sampling import applied_options, parse_logit_bias, sampling_defaults
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
    tokenizer: Any,
    messages: list[dict[str, Any]],
    template: str,
    safe: bool,
    tools: list[dict[str, Any]] | None = None,
) -> tuple[str, list[int]]:
    cont = messages[-1]["role"] == "assistant"
    return encode_chat(
        tokenizer,
        messages,
        template,
        safe_tokenization=safe,
        add_generation_prompt=not cont,
        continue_final_message=cont,
        tools=tools,
    )


def _truncate(
    tokenizer: Any,
    messages: list[dict[str, Any]],
    template: str,
    safe: bool,
    limit: int,
    full: tuple[str, list[int]],
    tools: list[dict[str, Any]] | None = None,
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
        text, ids = _encode(tokenizer, msgs, template, safe, tools)
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
    kept = len(_encode(tokenizer, tail or system, template, safe, tools)[1])
    raise bad_request(
        f"prompt_truncate_len is {limit} tokens, but the last turn alone takes {kept}"
        f" (the whole prompt: {len(full[1])})",
        "prompt_truncate_len",
    )


def build_prompt(
    tokenizer: Any,
    req: ChatCompletionRequest,
    template: str,
    plan: tools_api.ToolPlan | None = None,
) -> ChatPrompt:
    messages = template_messages(req.messages)
    # tools into the prompt: the template's own way, else a system text (girandole.api.tools)
    messages, tools = tools_api.prompt_messages(messages, plan, template)
    safe = bool(req.safe_tokenization)
    try:
        text, ids = _encode(tokenizer, messages, template, safe, tools)
        if req.prompt_truncate_len is not None and len(ids) > req.prompt_truncate_len:
            return _truncate(
                tokenizer, messages, template, safe, req.prompt_truncate_len, (text, ids), tools
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


# -- the job -----------------------------------------------------------------------------------


@dataclass
class ChatJob:
    job: CompletionJob  # what the completions service runs and counts
    prompt: ChatPrompt
    tokenizer: Any
    tools: tools_api.ToolPlan | None = None  # declared tools: calls are looked for in the output

    @property
    def options(self) -> OutputOptions:
        return self.job.options


def new_chat_id() -> str:
    return "chatcmpl-" + uuid.uuid4().hex


async def prepare(
    engine: Any,
    req: ChatCompletionRequest,
    request_id: str,
    model: str,
    context_length: int,
    template: str | None,
    headers: Any = None,
) -> ChatJob:
    tokenizer = engine.tokenizer
    if template is None:
        raise bad_request(
            "This model has no chat template (none in its files and no built-in one for its"
            " family): use /completions, or start the server with --chat-template",
            "messages",
        )
    _check_parts(req.messages)
    plan = tools_api.plan_tools(req, template)
    grammar = structured.response_format_grammar(req.response_format)
    grammar_param = "response_format"
    if plan is not None and plan.grammar is not None:
        if grammar is not None:
            raise bad_request(
                "response_format cannot be combined with a forced tool call (tool_choice"
                " 'required' or a named function)",
                "response_format",
            )
        grammar, grammar_param = plan.grammar, "tools"
    await structured.check_grammar(engine, grammar, grammar_param)
    size = sum(len(flatten_content(m.content_value())) for m in req.messages if m.content)
    if size < _INLINE_CHARS:
        prompt = build_prompt(tokenizer, req, template, plan)
    else:
        prompt = await asyncio.to_thread(build_prompt, tokenizer, req, template, plan)
    vocab = engine.model_config.vocab_size
    for token in prompt.token_ids:
        if token >= vocab:  # a template writing a token the model lacks
            raise bad_request(f"Token id {token} of the chat prompt is out of range", "messages")
    options = output_options(req)
    logit_bias = parse_logit_bias(req.logit_bias, vocab)
    engine_kwargs = cache_kwargs(req, headers)
    requested = req.max_tokens if req.max_tokens is not None else req.max_completion_tokens
    if requested is None:
        requested = DEFAULT_MAX_TOKENS
    behavior = req.context_length_exceeded_behavior or "truncate"
    max_tokens = fit_max_tokens(len(prompt.token_ids), requested, context_length, behavior)
    defaults = sampling_defaults(getattr(engine.model_config, "generation_config", None))
    n = req.n or 1
    choices = []
    for k in range(n):
        params = completions.choice_params(
            req, defaults, max_tokens, k, logit_bias=logit_bias, options=options
        )
        params.grammar = grammar
        choices.append(
            ChoiceRequest(k, 0, prompt.token_ids, params, f"{request_id}-{k}", engine_kwargs)
        )
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
        tokenizer=tokenizer,
        options=options,
        sampling_options=applied_options(choices[0].params),
    )
    return ChatJob(job, prompt, tokenizer, plan)


# -- responses ---------------------------------------------------------------------------------


async def collect(cj: ChatJob, fanout: ChoiceFanout) -> dict[str, Any]:
    """The whole (non-streamed) response body."""
    job = cj.job
    states = {c.index: ChoiceState() for c in job.choices}
    outputs = completions.new_outputs(job)
    try:
        async for index, out in fanout.events():
            _record(states[index], out)
            outputs[index].add(out)
    except Exception as exc:  # noqa: BLE001
        raise _engine_error(exc) from None
    finally:
        fanout.close()
    body = []
    for index in sorted(states):
        o = outputs[index]
        message, finish_reason = tools_api.finish_message(
            cj.tools, o.full_text, states[index].finish_reason
        )
        body.append(
            {
                "index": index,
                "message": message,
                "logprobs": o.logprobs(o.tracker.entries),
                "finish_reason": finish_reason,
                **o.extras(),
            }
        )
    usage = completions.finish_metrics(job, states, outputs)
    perf = job.perf_metrics if cj.options.perf_metrics else None
    return completions.envelope(job, "chat.completion", body, usage, perf)


def _chunk(
    job: CompletionJob, choices: list[dict[str, Any]], usage: Any = None, perf: Any = None
) -> bytes:
    return sse_event(completions.envelope(job, "chat.completion.chunk", choices, usage, perf))


def _delta(
    index: int, delta: dict[str, Any], finish_reason: str | None = None, logprobs: Any = None
) -> dict[str, Any]:
    return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}


async def stream(
    cj: ChatJob, fanout: ChoiceFanout, usage_placement: str = "separate"
) -> AsyncIterator[bytes]:
    """The SSE body. Closing it (client gone) aborts the engine requests."""
    job = cj.job
    opts = cj.options
    states = {c.index: ChoiceState() for c in job.choices}
    outputs = completions.new_outputs(job)
    calls = {i: tools_api.ToolStream(cj.tools) for i in states}  # content or tool-call deltas
    unfinished = len(states)
    separate = job.include_usage and usage_placement != "finish"
    try:
        for index in sorted(states):
            first = _delta(index, {"role": "assistant"})
            if opts.return_token_ids:
                first["prompt_token_ids"] = list(outputs[index].prompt_ids)
            yield _chunk(job, [first])
        async for index, out in fanout.events():
            state, o = states[index], outputs[index]
            _record(state, out)
            update = o.add(out)
            extras = opts.return_token_ids and bool(update.token_ids)
            deltas = calls[index].feed(update.text)
            if out.finished:
                tail, state.finish_reason = calls[index].finish(state.finish_reason)
                deltas += tail
            if deltas or update.entries or extras:
                for j, delta in enumerate(deltas or [{"content": update.text}]):
                    if j > 0:
                        yield _chunk(job, [_delta(index, delta)])
                        continue
                    c = _delta(index, delta, logprobs=o.logprobs(update.entries))
                    if opts.return_token_ids:
                        c["token_ids"] = update.token_ids
                    yield _chunk(job, [c])
            if out.finished:
                unfinished -= 1
                usage = perf = None
                if unfinished == 0:
                    finish_usage = completions.finish_metrics(job, states, outputs)
                    if opts.perf_metrics and not separate:
                        perf = job.perf_metrics
                if job.include_usage and usage_placement == "finish":
                    usage = finish_usage if unfinished == 0 else _usage(job, states)
                final = _delta(index, {}, state.finish_reason)
                if opts.raw_output:
                    final["raw_output"] = o.raw_output()
                yield _chunk(job, [final], usage, perf)
        if separate:
            perf = job.perf_metrics if opts.perf_metrics else None
            yield _chunk(job, [], completions.finish_metrics(job, states, outputs), perf)
        yield DONE
    except Exception as exc:  # noqa: BLE001 - the status line is gone: report in the stream
        error = _engine_error(exc)
        yield sse_event({"error": error.body(job.id)["error"]})
    finally:
        fanout.close()


start = completions.start
