"""Fields of Fireworks' request schema that this server cannot honour: what a text-only model
cannot do (images), reasoning on /completions (its
prompt is raw text: no template to turn thinking on or off), and fields not implemented yet.

A request that uses one gets a 400 naming it and saying why (`REASONS`), never a silent no-op. A
value that asks for exactly what the server does anyway (null, `images: []`, ...) is accepted, so
clients that send every field with its default keep working.

When a later piece of work implements a field: delete its entry here and add it to the schema.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from girandole.api.http.errors import APIError, bad_request


def _is(*values: Any) -> Callable[[Any], bool]:
    # `type(v) is type(x)`: True must not pass for 1, nor 0 for False
    return lambda v: any(v == x and type(v) is type(x) for x in values)


def _zero(v: Any) -> bool:
    return type(v) in (int, float) and v == 0


def _one(v: Any) -> bool:
    return type(v) in (int, float) and v == 1


def _empty(v: Any) -> bool:
    return v in ({}, [])


_never: Callable[[Any], bool] = lambda v: False  # noqa: E731

# field -> which non-null values are no-ops (null is always one). Dotted names are nested.
# Fields neither endpoint implements yet.
COMMON_UNSUPPORTED: dict[str, Callable[[Any], bool]] = {}
COMPLETIONS_UNSUPPORTED: dict[str, Callable[[Any], bool]] = {
    "images": _empty,
    # reasoning asks for nothing when it turns thinking off (false is read as "none")
    "reasoning_effort": _is("none", False),
    "reasoning_history": _is("disabled", "interleaved", "preserved"),
    "thinking": lambda v: isinstance(v, dict) and v.get("type") == "disabled",
    **COMMON_UNSUPPORTED,
}
_CHAT_ONLY = (
    "only on /v1/chat/completions: a /completions prompt is raw text, with no chat template"
)
REASONS: dict[str, str] = {
    "images": "this model takes text only",
    # a dense model's answer (girandole.api.serving.job; MoE models report it)
    "include_routing_matrix": "this model has no mixture-of-experts router",
    "reasoning_effort": "reasoning is controlled " + _CHAT_ONLY,
    "thinking": "reasoning is controlled " + _CHAT_ONLY,
    "reasoning_history": "reasoning is controlled " + _CHAT_ONLY,
}
# /chat/completions: chat implements logprobs, top_logprobs and raw_output, and has no `images`
# (an extra input). Its own table, so that when /completions implements a common field, chat
# still rejects it until the chat schema gains it too.
CHAT_UNSUPPORTED: dict[str, Callable[[Any], bool]] = {**COMMON_UNSUPPORTED}


def strip_unsupported(body: dict[str, Any], table: dict[str, Callable[[Any], bool]]) -> None:
    """Remove no-op uses of unsupported fields from `body`; raise a 400 for any real use."""
    for name, is_noop in table.items():
        parent: Any = body
        *path, leaf = name.split(".")
        for part in path:
            parent = parent.get(part) if isinstance(parent, dict) else None
        if not isinstance(parent, dict) or leaf not in parent:
            continue
        value = parent[leaf]
        if value is None or is_noop(value):
            del parent[leaf]
            continue
        raise unsupported_field(name)


def unsupported_field(name: str) -> APIError:
    reason = REASONS.get(name)
    if reason is None:
        return bad_request(f"Field '{name}' is not supported by this server yet", param=name)
    return bad_request(f"Field '{name}' is not supported here: {reason}", param=name)
