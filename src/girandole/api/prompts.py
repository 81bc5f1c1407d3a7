"""Prompt forms to token ids, and the context-length rules.

- A string prompt is tokenized with the model's tokenizer, which prepends BOS as the model's
  metadata says (Fireworks: "most models prepend BOS automatically").
- A token-id prompt is used verbatim: no BOS is added.
- `context_length_exceeded_behavior`: `truncate` (default) lowers max_tokens to
  `context - prompt`; `error` answers 400 when prompt + max_tokens exceeds the context. A prompt
  that alone fills the context (or more) is a 400 either way.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from girandole.api.errors import bad_request

logger = logging.getLogger("girandole.api")

# Prompts shorter than this are tokenized on the event loop; longer ones in a thread.
_INLINE_CHARS = 2048


def _encode_all(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    return [list(tokenizer.encode(text)) for text in texts]


async def tokenize_prompts(
    tokenizer: Any, prompts: list[str] | list[list[int]], vocab_size: int
) -> list[list[int]]:
    if prompts and isinstance(prompts[0], str):
        texts: list[str] = prompts  # type: ignore[assignment]
        try:
            if sum(len(t) for t in texts) < _INLINE_CHARS:
                ids = _encode_all(tokenizer, texts)
            else:
                ids = await asyncio.to_thread(_encode_all, tokenizer, texts)
        except Exception as exc:  # noqa: BLE001 - a tokenizer bug must not become a 500
            logger.exception("tokenizing a prompt failed")
            raise bad_request(f"The prompt could not be tokenized: {exc}", "prompt") from None
        for i, seq in enumerate(ids):
            if not seq:
                where = "prompt" if len(ids) == 1 else f"prompt[{i}]"
                raise bad_request(f"The prompt is empty after tokenization ({where})", "prompt")
        return ids
    token_prompts: list[list[int]] = prompts  # type: ignore[assignment]
    for seq in token_prompts:
        for token in seq:
            if token >= vocab_size:
                raise bad_request(
                    f"Token id {token} in the prompt is out of range: the vocabulary has"
                    f" {vocab_size} tokens",
                    "prompt",
                )
    return [list(seq) for seq in token_prompts]


def fit_max_tokens(
    num_prompt_tokens: int, max_tokens: int, context_length: int, behavior: str
) -> int:
    """The max_tokens to run with, or a 400 per `context_length_exceeded_behavior`."""
    if num_prompt_tokens >= context_length:
        raise bad_request(
            f"The prompt is too long: {num_prompt_tokens}, model maximum context length:"
            f" {context_length}",
            "prompt",
        )
    room = context_length - num_prompt_tokens
    if max_tokens <= room:
        return max_tokens
    if behavior == "error":
        raise bad_request(
            f"This model's maximum context length is {context_length} tokens, but the prompt"
            f" ({num_prompt_tokens} tokens) plus max_tokens ({max_tokens}) needs"
            f" {num_prompt_tokens + max_tokens}. Lower max_tokens, or set"
            " context_length_exceeded_behavior to 'truncate'",
            "max_tokens",
        )
    return room
