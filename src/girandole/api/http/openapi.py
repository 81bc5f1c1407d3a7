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


def body_doc(schema: type[BaseModel]) -> dict[str, Any]:
    """A route's `openapi_extra`: its JSON request body, validated by hand in the route."""
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": schema.model_json_schema()}},
        }
    }
