"""POST /v1/messages/count_tokens (also under /inference/v1): Anthropic's token count of a
Messages request, what `client.messages.count_tokens(...)` calls.

The body is a Messages request without its sampling fields (`CountTokensRequest`: model,
messages, system, tools, tool_choice, thinking, output_config); the answer is
`{"input_tokens": N}`, the prompt tokens the same request sent to /v1/messages is fed (its
`usage.input_tokens`): the chat template, tool descriptions and the forced-call preamble
included. Nothing runs on the engine, so no usage row is written (Anthropic does not bill it
either). Errors have Anthropic's shape, as on /v1/messages.
"""

from __future__ import annotations

from typing import Any

from fastapi import Request
from fastapi.responses import Response

from girandole.api.http.finite_json import FiniteJSONResponse
from girandole.api.http.unsupported import strip_unsupported
from girandole.api.http.validation import validate_model
from girandole.api.messages.convert import to_chat_request
from girandole.api.messages.schema import CountTokensRequest, MessagesRequest
from girandole.api.messages.shape import MessagesShape
from girandole.api.messages.translated import TranslatedEndpoint
from girandole.api.serving.pipeline import receive
from girandole.api.state import AppState


async def count_tokens(request: Request, endpoint: TranslatedEndpoint) -> Response:
    """The prompt tokens of a Messages request, built as `endpoint` builds its prompt."""

    async def parse(state: AppState, data: dict[str, Any]) -> Any:
        strip_unsupported(data, endpoint.unsupported)
        counted = validate_model(CountTokensRequest, data)
        fields = {name: getattr(counted, name) for name in CountTokensRequest.model_fields}
        # a whole Messages request (max_tokens is no part of the prompt), translated as one
        return to_chat_request(MessagesRequest.model_construct(**fields, max_tokens=1))

    got = await receive(request, endpoint.id_prefix, parse)
    shape = endpoint.shape(got.state, got.engine, got.req)
    (prompt,) = await endpoint.prompts(got.engine, got.req, shape)
    body: dict[str, Any] = {"input_tokens": len(prompt)}
    if isinstance(shape, MessagesShape) and shape.context_management is not None:
        assert shape.edits is not None  # context edits: the count before them too
        original = len(prompt) + shape.edits.cleared_tokens()
        body["context_management"] = {"original_input_tokens": original}
    return FiniteJSONResponse(body)
