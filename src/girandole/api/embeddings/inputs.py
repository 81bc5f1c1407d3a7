"""Embedding inputs to token ids.

- A string is tokenized with the model's tokenizer (BOS as the model's metadata says), as a
  /completions prompt is.
- A token-id list is used verbatim.
- A model trained to embed (model_config.embedding: an encoder, Qwen3-Embedding) reads each
  input between its tokenizer's special tokens (`[CLS] ... [SEP]`; `... <|endoftext|>`), text
  and token ids alike, unless the ids already start (end) with them
  (girandole.tokenizer.framing).
- An object fills `prompt_template`'s `{field}` slots with its fields (`{{` and `}}` stand for
  braces); the text is then tokenized as a string. Anything else in braces is a 400. A
  string field goes in as it is; any other value as its JSON (`true`, `null`, `[1, 2]`, not
  Python's `True`, `None`): the body is JSON, so its values read back as the client wrote them.
"""

from __future__ import annotations

import json
import re
from typing import Any

from girandole.api.completions.prompt import tokenize_prompts
from girandole.api.http.errors import APIError, bad_request
from girandole.engine.protocol import EngineClient

_SLOT = re.compile(r"\{\{|\}\}|\{([^{}]*)\}|[{}]")


def fill_template(template: str, fields: dict[str, Any], index: int) -> str:
    def slot(match: re.Match) -> str:
        token = match.group(0)
        if token in ("{{", "}}"):
            return token[0]
        name = match.group(1)
        if name is None or not name.isidentifier():
            raise bad_request(
                f"prompt_template: {token!r} is not a {{field}} slot (use {{{{ and }}}} for"
                " literal braces)",
                "prompt_template",
            )
        if name not in fields:
            raise bad_request(
                f"input[{index}] has no field '{name}', which prompt_template uses", "input"
            )
        value = fields[name]
        return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)

    return _SLOT.sub(slot, template)


async def input_token_ids(
    engine: EngineClient, inputs: list, template: str | None
) -> list[list[int]]:
    """Each input's token ids; 400s name `input` or `prompt_template`."""
    if isinstance(inputs[0], dict):
        if template is None:
            raise bad_request("Input objects need a prompt_template to fill", "input")
        inputs = [fill_template(template, fields, i) for i, fields in enumerate(inputs)]
    elif template is not None:
        raise bad_request(
            "prompt_template is filled from input objects: send input as an object or an"
            " array of objects",
            "prompt_template",
        )
    try:
        ids = await tokenize_prompts(engine.tokenizer, inputs, engine.model_config.vocab_size)
    except APIError as exc:  # the completions wording names `prompt`: say `input`
        raise bad_request(exc.message.replace("prompt", "input"), "input") from None
    embedding = engine.model_config.embedding
    if embedding is not None:
        ids = [frame(seq, embedding.prefix_ids, embedding.suffix_ids) for seq in ids]
    limit = engine.max_model_len
    encoder = embedding is not None and not embedding.generates
    for i, seq in enumerate(ids):
        if encoder and len(seq) > limit:  # an encoder reads up to its positions, no more
            raise bad_request(
                f"input[{i}] is too long: {len(seq)} tokens with the model's special tokens,"
                f" this model reads at most {limit} (max_position_embeddings)",
                "input",
            )
        if not encoder and len(seq) >= limit:
            raise bad_request(
                f"input[{i}] is too long: {len(seq)} tokens, model maximum context length: {limit}",
                "input",
            )
    return ids


def frame(ids: list[int], prefix: tuple[int, ...], suffix: tuple[int, ...]) -> list[int]:
    """`ids` between the model's special tokens, each side unless already there."""
    head = [] if prefix and tuple(ids[: len(prefix)]) == prefix else list(prefix)
    tail = [] if suffix and tuple(ids[-len(suffix) :]) == suffix else list(suffix)
    return [*head, *ids, *tail]
