"""/completions prompts to token ids.

- A string prompt is tokenized with the model's tokenizer, which prepends BOS as the model's
  metadata says (Fireworks: "most models prepend BOS automatically").
- A token-id prompt is used verbatim: no BOS is added.
"""

from __future__ import annotations

import logging

from girandole.api.http.errors import APIError, bad_request
from girandole.api.serving.prompt import context_exceeded, off_loop_if_long
from girandole.tokenizer.tokenizer import Tokenizer

logger = logging.getLogger("girandole.api")


def _encode_all(tokenizer: Tokenizer, texts: list[str], context: int | None) -> list[list[int]]:
    out = []
    for i, text in enumerate(texts):
        # a text far longer than the context: refused after counting some of it in pieces,
        # not after seconds of tokenizing all of it
        if context is not None and tokenizer.more_tokens_than(text, context):
            raise context_exceeded(
                f"The prompt is too long: far more than {context} tokens"
                + (f" (prompt[{i}])" if len(texts) > 1 else "")
                + f", model maximum context length: {context}",
                "prompt",
            )
        out.append(list(tokenizer.encode(text)))
    return out


async def tokenize_prompts(
    tokenizer: Tokenizer,
    prompts: list[str] | list[list[int]],
    vocab_size: int,
    context: int | None = None,
) -> list[list[int]]:
    """Token ids of each prompt; `context`: the model's context length, to refuse a text far
    longer before tokenizing all of it (None: no such check)."""
    if prompts and isinstance(prompts[0], str):
        texts: list[str] = prompts  # type: ignore[assignment]
        size = sum(len(t) for t in texts)
        try:
            ids = await off_loop_if_long(size, _encode_all, tokenizer, texts, context)
        except APIError:
            raise
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
