"""POST /tokenize and /detokenize (also under /v1 and /inference/v1): vLLM's tokenizer
endpoints, with llama.cpp's forms where they cost little.

/tokenize takes one of three bodies, told apart by their prompt field:
- `messages` (vLLM's chat form): the ids /v1/chat/completions runs for the same messages, tools
  and reasoning fields (its shape and prompt code: template, tool descriptions, truncation).
  `add_generation_prompt`/`continue_final_message` unset: chat's own rule (a final assistant
  message is continued); either set: as vLLM reads them; both true: a 400.
  `chat_template_kwargs`: more template variables (not the ones the server sets).
  A vision model's image_url parts are their image tokens, as chat expands them (the images
  themselves are not read: their tokens do not depend on them).
- `prompt` (vLLM's completion form): the ids /v1/completions runs for that prompt (BOS as the
  model's metadata says); `add_special_tokens: false`: without BOS.
- `content` (llama.cpp's): `add_special` (default false), `parse_special`, `with_pieces`;
  answered as llama.cpp answers, `{"tokens": [...]}`.
vLLM's answer: `{count, max_model_len, tokens, token_strs}`, `token_strs` (the vocabulary
entries) only with `return_token_strs`.

/detokenize: `{tokens}` -> `{prompt, content}` (vLLM's and llama.cpp's field), special tokens
kept as vLLM keeps them; an id past the vocabulary is a 400 naming it.

As on every inference route: the key check, the body limit, the model resolved as completions
resolves it (none named: the server's own; a deployment or LoRA adapter: its base model's
tokenizer; unknown: 404). Nothing runs on the engine: no admission, no usage row.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response

from girandole.api.chat.images import image_parts
from girandole.api.chat.prompt import PromptEnd, chat_prompt
from girandole.api.chat.route import ENDPOINT as CHAT
from girandole.api.chat.schema import ChatCompletionRequest
from girandole.api.http.errors import bad_request
from girandole.api.http.finite_json import FiniteJSONResponse
from girandole.api.http.validation import validate_model
from girandole.api.serving.images import ImageMarkers
from girandole.api.serving.pipeline import post_route, receive
from girandole.api.serving.prompt import off_loop_if_long
from girandole.api.state import AppState
from girandole.api.tokenize.schema import (
    DetokenizeRequest,
    LlamaTokenizeRequest,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
    TokenizeRequest,
)
from girandole.engine.protocol import EngineClient
from girandole.tokenizer.chat_template import flatten_content
from girandole.tokenizer.tokenizer import Tokenizer

ID_PREFIX = "tok-"  # vLLM's
# template variables the server sets itself (or render arguments of the same name)
RESERVED_TEMPLATE_KWARGS = (
    "messages",
    "tools",
    "add_generation_prompt",
    "continue_final_message",
    "bos_token",
    "eos_token",
    "template",
    "family",
    "tok",
    "safe_tokenization",
)
# the chat fields a chat-form body passes on to chat's prompt code
CHAT_FIELDS = [
    n for n in TokenizeChatRequest.model_fields if n in ChatCompletionRequest.model_fields
]


def _schema_of(data: dict[str, Any]) -> type:
    if "messages" in data:
        return TokenizeChatRequest
    if "prompt" in data:
        return TokenizeCompletionRequest
    if "content" in data:
        return LlamaTokenizeRequest
    raise bad_request(
        "Send 'prompt' (a text), 'messages' (a chat) or 'content' (llama.cpp's form)", "prompt"
    )


def _prompt_fields(data: dict[str, Any]) -> dict[str, Any]:
    """The body's prompt text, to refuse a hopelessly long one before tokenizing it (the tools
    are rendered into a chat prompt, unless tool_choice is none)."""
    fields = ("messages", "tools", "tool_choice")
    return {"prompt": data.get("prompt", data.get("content"))} | {
        name: data[name] for name in fields if name in data
    }


async def _encode(tokenizer: Tokenizer, text: str, add_bos: bool | None, parse: bool) -> list[int]:
    """`text`'s ids as /completions encodes a prompt (`add_bos` None: per the model)."""
    try:
        return await off_loop_if_long(len(text), _encode_text, tokenizer, text, add_bos, parse)
    except Exception as exc:  # noqa: BLE001 - a tokenizer bug must not become a 500
        raise bad_request(f"The prompt could not be tokenized: {exc}", "prompt") from None


def _encode_text(tokenizer: Tokenizer, text: str, add_bos: bool | None, parse: bool) -> list[int]:
    return list(tokenizer.encode(text, add_bos, parse_special=parse))


def _prompt_end(req: TokenizeChatRequest) -> PromptEnd:
    generation, cont = req.add_generation_prompt, req.continue_final_message
    if generation and cont:
        raise bad_request(
            "Cannot set both 'continue_final_message' and 'add_generation_prompt' to true",
            "continue_final_message",
        )
    variables = dict(req.chat_template_kwargs or {})
    for name in variables:
        if name in RESERVED_TEMPLATE_KWARGS:
            raise bad_request(
                f"chat_template_kwargs cannot set '{name}': the server sets it (from the"
                " request's field of that name, where there is one)",
                f"chat_template_kwargs.{name}",
            )
    final = req.messages[-1]
    if (
        cont
        and final.role == "assistant"
        and not final.tool_calls
        and flatten_content(final.content_value()) == ""
    ):
        generation, cont = None, None  # as chat reads an empty answer: a generation prompt
    return PromptEnd(generation, cont, variables)


async def _chat_ids(state: AppState, engine: EngineClient, req: TokenizeChatRequest) -> list[int]:
    """The ids chat runs: its shape (template, tool plan, reasoning plan) and prompt code."""
    end = _prompt_end(req)
    chat_req = ChatCompletionRequest.model_construct(**{n: getattr(req, n) for n in CHAT_FIELDS})
    shape = CHAT.shape(state, engine, chat_req)
    tokenizer = engine.tokenizer
    vision = engine.model_config.vision
    markers = None
    if vision is not None and image_parts(chat_req.messages):
        # each image's tokens as chat expands them; the images are not read (their tokens do
        # not depend on them)
        markers = ImageMarkers.of(tokenizer, vision)
    prompt = await chat_prompt(
        tokenizer,
        chat_req,
        shape.template,
        shape.plan,
        engine.model_config.vocab_size,
        shape.reasoning,
        end,
        images=markers,
    )
    ids = list(prompt.token_ids)
    bos = tokenizer.bos_token_id
    if req.add_special_tokens and bos is not None and ids[:1] != [bos]:
        ids.insert(0, bos)  # vLLM adds BOS on top of the template's; never a second one
    return ids


def _piece(tokenizer: Tokenizer, token: int) -> str | list[int]:
    """llama.cpp's piece: the token's text, or its bytes when they are not UTF-8 alone."""
    raw = tokenizer.token_bytes(token)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return list(raw)


async def tokenize(request: Request) -> Response:
    async def parse(state: AppState, data: dict[str, Any]) -> Any:
        return validate_model(_schema_of(data), data)

    got = await receive(request, ID_PREFIX, parse, _prompt_fields)
    req, engine = got.req, got.engine
    tokenizer = engine.tokenizer
    if isinstance(req, LlamaTokenizeRequest):
        add_bos = None if req.add_special else False
        ids = await _encode(tokenizer, req.content, add_bos, req.parse_special)
        if req.with_pieces:
            pieces = [{"id": i, "piece": _piece(tokenizer, i)} for i in ids]
            return FiniteJSONResponse({"tokens": pieces})
        return FiniteJSONResponse({"tokens": ids})
    if isinstance(req, TokenizeChatRequest):
        ids = await _chat_ids(got.state, engine, req)
    else:
        ids = await _encode(tokenizer, req.prompt, None if req.add_special_tokens else False, True)
    strs = [tokenizer.id_to_token(i) or "" for i in ids] if req.return_token_strs else None
    body = {
        "count": len(ids),
        "max_model_len": got.state.context_length_of(engine),
        "tokens": ids,
        "token_strs": strs,
    }
    return FiniteJSONResponse(body)


async def detokenize(request: Request) -> Response:
    async def parse(state: AppState, data: dict[str, Any]) -> Any:
        return validate_model(DetokenizeRequest, data)

    got = await receive(request, ID_PREFIX, parse, lambda data: {})
    tokenizer = got.engine.tokenizer
    ids = got.req.tokens
    # max() in C first: a Python loop over two million ids held the loop for 0.1 s
    bad = ids and max(ids) >= tokenizer.vocab_size
    for i, token in enumerate(ids if bad else ()):
        if token >= tokenizer.vocab_size:
            raise bad_request(
                f"Token id {token} (tokens[{i}]) is out of range: the vocabulary has"
                f" {tokenizer.vocab_size} tokens",
                "tokens",
            )
    try:
        text = await off_loop_if_long(len(ids), tokenizer.decode, ids, False)
    except Exception as exc:  # noqa: BLE001 - a tokenizer bug must not become a 500
        raise bad_request(f"The tokens could not be decoded: {exc}", "tokens") from None
    return FiniteJSONResponse({"prompt": text, "content": text})


TOKENIZE = post_route(tokenize, TokenizeRequest, "/tokenize", "tokenize", "Tokenize a prompt")
DETOKENIZE = post_route(
    detokenize, DetokenizeRequest, "/detokenize", "detokenize", "Detokenize token ids"
)


def install_tokenize(app: FastAPI, prefixes: Sequence[str]) -> None:
    """The routes at vLLM's paths (/tokenize, /detokenize) and under each inference prefix."""
    for prefix in ("", *prefixes):
        for router in (TOKENIZE, DETOKENIZE):
            app.include_router(router, prefix=prefix, tags=["tokenize"])


__all__ = ["install_tokenize"]
