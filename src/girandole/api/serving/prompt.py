"""What every prompt form shares once it is token ids: the context-length rules, and work on
long prompts kept off the event loop.

`context_length_exceeded_behavior`: `truncate` (default) lowers max_tokens to
`context - prompt`; `error` answers 400 when prompt + max_tokens exceeds the context, naming the
field the request set (`max_tokens` or `max_completion_tokens`). A request that sets neither
asked for no particular length: the endpoint's default is lowered as with `truncate` (OpenAI
only refuses a length the client asked for). A prompt that alone fills the context (or more) is a
400 either way.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TypeVar

from girandole.api.http.errors import APIError

CONTEXT_LENGTH_EXCEEDED = "context_length_exceeded"  # OpenAI's error code

T = TypeVar("T")

# How many characters one token of a prompt may stand for at most, to refuse a prompt that
# cannot fit the context before spending seconds tokenizing it (10 MB: about 10 s of a core).
MAX_CHARS_PER_TOKEN = 64

# Prompts (or conversations) of fewer characters than this are tokenized on the event loop;
# longer ones in a thread.
INLINE_CHARS = 2048


async def off_loop_if_long(num_chars: int, fn: Callable[..., T], *args: object) -> T:
    """`fn(*args)`, in a thread when the text it works on is long."""
    if num_chars < INLINE_CHARS:
        return fn(*args)
    return await asyncio.to_thread(fn, *args)


def context_exceeded(message: str, param: str) -> APIError:
    """A 400 with OpenAI's code for it (`context_length_exceeded`), which clients may key their
    context-overflow errors on."""
    return APIError(400, message, param=param, code=CONTEXT_LENGTH_EXCEEDED)


def fit_max_tokens(
    num_prompt_tokens: int,
    max_tokens: int,
    context_length: int,
    behavior: str,
    prompt_param: str = "prompt",
    tokens_param: str | None = "max_tokens",
) -> int:
    """The max_tokens to run with, or a 400 per `context_length_exceeded_behavior`.
    `prompt_param`: the field the prompt came in (chat: messages); `tokens_param`: the field
    max_tokens came in (None: the endpoint's default, lowered to fit whatever the behavior)."""
    if num_prompt_tokens >= context_length:
        raise context_exceeded(
            f"The prompt is too long: {num_prompt_tokens}, model maximum context length:"
            f" {context_length}",
            prompt_param,
        )
    room = context_length - num_prompt_tokens
    if max_tokens <= room:
        return max_tokens
    if behavior == "error" and tokens_param is not None:
        raise context_exceeded(
            f"This model's maximum context length is {context_length} tokens, but the prompt"
            f" ({num_prompt_tokens} tokens) plus {tokens_param} ({max_tokens}) needs"
            f" {num_prompt_tokens + max_tokens}. Lower {tokens_param}, or set"
            " context_length_exceeded_behavior to 'truncate'",
            tokens_param,
        )
    return room
