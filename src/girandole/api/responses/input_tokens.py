"""POST /v1/responses/input_tokens (also under /inference/v1): OpenAI's input token count of a
Responses request, what `client.responses.input_tokens.count(...)` calls.

The body is a Responses request without its sampling fields (`model` optional: the server's
own); the answer is `{"object": "response.input_tokens", "input_tokens": N}`, the prompt tokens
the same request sent to /v1/responses is fed first (its `usage.input_tokens` when it runs one
round): instructions, earlier turns (`previous_response_id`, `conversation`), the chat
template, tool descriptions and `truncation` included. MCP servers' tools are listed (they are
part of the prompt); calls the client approved are not run, so their results are not counted.
Nothing runs on the engine: no usage row.
"""

from __future__ import annotations

from typing import Any

from fastapi import Request
from fastapi.responses import Response
from pydantic import create_model

from girandole.api.http.finite_json import FiniteJSONResponse
from girandole.api.http.schema import StrictModel
from girandole.api.http.validation import validate_model
from girandole.api.responses.schema import ResponsesRequest
from girandole.api.serving.pipeline import receive
from girandole.api.state import AppState

# the fields of a Responses request that make its prompt (OpenAI's count request)
COUNT_FIELDS = ("input", "instructions", "previous_response_id", "conversation", "tools",
                "tool_choice", "parallel_tool_calls", "reasoning", "text", "truncation")  # fmt: skip

InputTokensRequest = create_model(
    "InputTokensRequest",
    __base__=StrictModel,
    model=(str | None, None),
    **{  # type: ignore[call-overload]
        name: (ResponsesRequest.model_fields[name].annotation, ResponsesRequest.model_fields[name])
        for name in COUNT_FIELDS
    },
)


async def count_input_tokens(request: Request, endpoint: Any) -> Response:
    """The input tokens of a Responses request, its prompt built as `endpoint` (Responses)
    builds it."""

    async def parse(state: AppState, data: dict[str, Any]) -> Any:
        counted = validate_model(InputTokensRequest, data)
        fields = {name: getattr(counted, name) for name in COUNT_FIELDS}
        model = counted.model or state.served.name  # type: ignore[attr-defined]
        source = ResponsesRequest.model_construct(model=model, **fields)
        return await endpoint.translate(request, state, source, run_approved=False)

    got = await receive(request, endpoint.id_prefix, parse)
    shape = endpoint.shape(got.state, got.engine, got.req)
    (prompt,) = await endpoint.prompts(got.engine, got.req, shape)
    return FiniteJSONResponse({"object": "response.input_tokens", "input_tokens": len(prompt)})
