"""The OpenAPI document: request bodies are validated by hand (to answer Fireworks' 400s), so
their schemas come from `openapi_extra`; this hoists their `$defs` into `components.schemas`
so every `$ref` resolves (schemathesis and code generators read the document as a whole)."""

from __future__ import annotations

import json
from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel


def hoist_defs(doc: dict[str, Any]) -> dict[str, Any]:
    components = doc.setdefault("components", {}).setdefault("schemas", {})
    for operations in doc.get("paths", {}).values():
        for operation in operations.values():
            if not isinstance(operation, dict):
                continue
            content = operation.get("requestBody", {}).get("content", {})
            schema = content.get("application/json", {}).get("schema")
            if isinstance(schema, dict) and "$defs" in schema:
                components.update(schema.pop("$defs"))
    return json.loads(json.dumps(doc).replace('"#/$defs/', '"#/components/schemas/'))


def install_openapi(app: FastAPI) -> None:
    original = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = hoist_defs(original())
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


# Fireworks' error body, as every 4xx and 5xx of the API answers it (girandole.api.http.errors)
ERROR_BODY = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type"],
            "properties": {
                "object": {"type": "string", "const": "error"},
                "type": {"type": "string"},
                "code": {"type": ["string", "null"]},
                "message": {"type": "string"},
                "param": {"type": ["string", "null"]},
            },
        },
        "request_id": {"type": "string"},
    },
}
ERRORS = {
    "400": "Invalid request: the message names the field",
    "401": "Missing or invalid API key",
    "404": "Model not found, inaccessible, and/or not deployed",
    "413": "Request body larger than the server's limit",
    "415": "Content-Type is not application/json",
    "429": "Rate limit or admission queue full (Retry-After)",
    "500": "Server fault (a bug)",
    "503": "Model loading, engine not running, queue timeout, or shutting down (Retry-After)",
}


def error_responses() -> dict[str, Any]:
    return {
        code: {"description": text, "content": {"application/json": {"schema": ERROR_BODY}}}
        for code, text in ERRORS.items()
    }


def body_doc(schema: type[BaseModel]) -> dict[str, Any]:
    """A route's `openapi_extra`: its JSON request body, validated by hand in the route, and the
    error responses every inference route can give."""
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": schema.model_json_schema()}},
        },
        "responses": error_responses(),
    }
