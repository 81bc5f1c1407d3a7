"""`response_format` to the engine's GrammarSpec, and the checks that make bad input a 400.

- `text` (or none): free decoding.
- `json_object`: any JSON object; with the legacy `schema` field, that schema.
- `json_schema`: `json_schema.schema` (no schema: any JSON object). `strict` is accepted; the
  output always follows the schema (there is no lenient mode).
- `grammar`: a GBNF grammar (llama.cpp's dialect, as xgrammar reads it; the start rule is `root`).

The JSON the engine writes is compact (`{"a": 1, "b": [1, 2]}`: one space after `:` and `,`, no
other whitespace), with the properties in the schema's order.

Schemas: xgrammar enforces types, properties/required/additionalProperties, items/prefixItems,
min/maxItems, enum/const, anyOf/oneOf (read as anyOf), $ref/$defs, numeric ranges and
multipleOf, string lengths, patterns and the common formats. Keywords it would silently ignore
(`not`, `if`/`then`/`else`, `allOf` with more than one schema, `uniqueItems: true`,
`dependentRequired`, `dependentSchemas`, `dependencies`, `minContains`/`maxContains`, unknown
`format`s) are a 400: the output could not be trusted to validate. Annotations (`title`,
`description`, `default`, `examples`, ...) are fine.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from girandole.api.http.errors import bad_request, unavailable
from girandole.api.http.schema import ResponseFormat
from girandole.engine.protocol import EngineClient
from girandole.sampling.compile_pool import CompileBusy
from girandole.sampling.grammar import GrammarError, GrammarSpec
from girandole.sampling.grammar_limits import (
    DEFAULT_LIMITS,
    SCHEMA_LISTS,
    SCHEMA_MAPS,
    SCHEMA_VALUED,
)

# Validation keywords the grammar engine would not enforce.
UNSUPPORTED_KEYWORDS = {
    "not",
    "if",
    "then",
    "else",
    "dependentRequired",
    "dependentSchemas",
    "dependencies",
    "minContains",
    "maxContains",
    "$dynamicRef",
    "$recursiveRef",
}
SUPPORTED_FORMATS = {
    "email",
    "date",
    "time",
    "date-time",
    "duration",
    "ipv4",
    "ipv6",
    "hostname",
    "uuid",
    "uri",
    "uri-reference",
    "uri-template",
    "json-pointer",
    "relative-json-pointer",
}
MAX_SCHEMA_DEPTH = 64  # nested subschemas; deeper is a 400 (the grammar compiler recurses)
# objects and arrays inside a schema, subschemas or not (two levels a subschema: "properties",
# then the property); deeper is a 400: pydantic's serializer, which writes a tool's parameters
# for the prompt, fails past 255 levels (a 500)
MAX_SCHEMA_JSON_DEPTH = 2 * MAX_SCHEMA_DEPTH + 16
# Keywords that may stand beside "$ref": annotations and definitions. The grammar engine drops
# any other sibling of a $ref (draft 2019-09 applies them), so those are a 400.
REF_SIBLINGS = {
    "$ref", "$defs", "definitions", "$id", "$schema", "$anchor", "$comment", "title",
    "description", "default", "examples", "deprecated", "readOnly", "writeOnly",
}  # fmt: skip
COUNT_KEYWORDS = (
    "minLength", "maxLength", "minItems", "maxItems", "minProperties", "maxProperties",
)  # fmt: skip
MAX_EXACT_INT = 2**53  # the grammar engine reads JSON numbers as doubles


def check_schema_size(schema: Any, param: str, max_bytes: int | None = None) -> None:
    """Raise a 400 naming the field for a schema whose JSON text is surely longer than the
    grammar engine compiles (`GrammarLimits.max_bytes`): the engine would refuse it, but only
    after the walks and the json.dumps of all of it, which hold the GIL (a 6 MB schema stopped
    the event loop for 1 s). The walk adds up a lower bound of the text's length and stops as
    soon as it passes the limit, so its cost is bounded by the limit, not by the schema. It
    also refuses objects and arrays nested past MAX_SCHEMA_JSON_DEPTH anywhere in it."""
    limit = DEFAULT_LIMITS.max_bytes if max_bytes is None else max_bytes
    size, stack = 0, [(schema, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict | list) and depth > MAX_SCHEMA_JSON_DEPTH:
            raise bad_request(
                f"The JSON schema nests deeper than {MAX_SCHEMA_JSON_DEPTH} levels of objects"
                f" and arrays, field: '{param}'",
                param,
            )
        if isinstance(node, dict):
            size += 2 * len(node) + 2  # braces, and ": " or ", " per member at the least
            for key, value in node.items():
                # tuple_items writes "additionalItems" as "items" (its "items" as "prefixItems")
                size += len(key) + 2 - (4 if key == "additionalItems" else 0)
                stack.append((value, depth + 1))
        elif isinstance(node, list):
            size += 2 * len(node)  # brackets and ", " between items
            stack.extend((item, depth + 1) for item in node)
        elif isinstance(node, str):
            size += len(node) + 2
        else:
            size += 1
        if size > limit:
            raise bad_request(
                f"the JSON schema is more than {limit:,} bytes; the most this server compiles"
                f" is {limit:,} bytes, field: '{param}'",
                param,
            )


def check_schema(schema: Any, param: str, where: str = "") -> None:
    """Raise a 400 naming the field for a schema that is not an object or boolean, that nests
    too deeply, or that uses a keyword the grammar engine cannot enforce."""
    if isinstance(schema, bool):
        return
    if not where:
        check_schema_size(schema, param)
    if where.count("/") > 2 * MAX_SCHEMA_DEPTH:
        raise bad_request(
            f"The JSON schema nests deeper than {MAX_SCHEMA_DEPTH} levels, field: '{param}'",
            param,
        )
    if not isinstance(schema, dict):
        raise bad_request(
            f"Invalid JSON schema at '{where or '#'}': a schema must be an object or a boolean,"
            f" field: '{param}'",
            param,
        )
    _check_node(schema, param, where)
    for key, value in schema.items():
        here = f"{where}/{key}"
        if key in UNSUPPORTED_KEYWORDS:
            raise _unsupported(key, here, param)
        if key == "contains" and value not in (True, {}):
            raise _unsupported(key, here, param)
        if key == "uniqueItems" and value is True:
            raise _unsupported(key, here, param)
        if key == "allOf" and isinstance(value, list) and len(value) > 1:
            raise _unsupported("allOf (with more than one schema)", here, param)
        if key == "format" and isinstance(value, str) and value not in SUPPORTED_FORMATS:
            raise _unsupported(f"format '{value}'", here, param)
        if key in SCHEMA_VALUED and isinstance(value, (dict, bool)):
            check_schema(value, param, here)
        elif key == "items" and isinstance(value, list):  # draft-7 tuple form
            for i, sub in enumerate(value):
                check_schema(sub, param, f"{here}/{i}")
        elif key in SCHEMA_LISTS:
            if not isinstance(value, list):
                raise bad_request(
                    f"Invalid JSON schema at '{here}': '{key}' must be an array of schemas,"
                    f" field: '{param}'",
                    param,
                )
            if not value and key in ("anyOf", "oneOf"):  # matches nothing
                raise bad_request(
                    f"Invalid JSON schema at '{here}': '{key}' must list at least one schema,"
                    f" field: '{param}'",
                    param,
                )
            for i, sub in enumerate(value):
                check_schema(sub, param, f"{here}/{i}")
        elif key in SCHEMA_MAPS:
            if not isinstance(value, dict):
                raise bad_request(
                    f"Invalid JSON schema at '{here}': '{key}' must be an object of schemas,"
                    f" field: '{param}'",
                    param,
                )
            for name, sub in value.items():
                check_schema(sub, param, f"{here}/{name}")


def _check_node(schema: dict[str, Any], param: str, where: str) -> None:
    """What the grammar engine would accept yet not enforce, in one schema object: keywords
    beside a $ref, `required` names no property defines, integers beyond 2**53 in enum/const
    (read as doubles), and counts or types that no value can meet."""
    at = where or "#"
    if "$ref" in schema:
        extra = sorted(set(schema) - REF_SIBLINGS)
        if extra:
            raise _unsupported(f"{extra[0]} beside $ref", f"{where}/{extra[0]}", param)
    required, properties = schema.get("required"), schema.get("properties")
    elsewhere = ("patternProperties", "allOf", "anyOf", "oneOf", "$ref")  # may define them
    if isinstance(required, list) and not any(k in schema for k in elsewhere):
        defined = properties if isinstance(properties, dict) else {}
        missing = [name for name in required if name not in defined]
        if missing:
            raise _unsupported(
                f"required {missing[0]!r} (a name 'properties' does not define)",
                f"{where}/required",
                param,
            )
    for key in ("enum", "const"):
        values = schema.get(key) if key == "enum" else [schema.get(key)]
        for value in values if isinstance(values, list) else []:
            if isinstance(value, int) and not isinstance(value, bool):
                if abs(value) > MAX_EXACT_INT:
                    raise bad_request(
                        f"Invalid JSON schema at '{at}/{key}': the integer {value} is beyond"
                        f" 2**53, which constrained decoding cannot write exactly,"
                        f" field: '{param}'",
                        param,
                    )
    for key in COUNT_KEYWORDS:
        value = schema.get(key)
        if key in schema and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise bad_request(
                f"Invalid JSON schema at '{where}/{key}': it must be a non-negative integer,"
                f" got {value!r}, field: '{param}'",
                param,
            )
    if schema.get("type") == []:
        raise bad_request(
            f"Invalid JSON schema at '{where}/type': a list of types must not be empty,"
            f" field: '{param}'",
            param,
        )


def tuple_items(schema: Any) -> Any:
    """`schema` with draft-7's tuple form (`items` a list of schemas, `additionalItems` for the
    rest, as pydantic v1 and zod-to-json-schema write a tuple) in the 2020-12 form the grammar
    engine reads (`prefixItems`, `items`); it refused the list ("items must be a boolean or an
    object")."""
    if not isinstance(schema, dict):
        return schema
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key in SCHEMA_MAPS and isinstance(value, dict):
            out[key] = {name: tuple_items(sub) for name, sub in value.items()}
        elif (key in SCHEMA_LISTS or key == "items") and isinstance(value, list):
            out[key] = [tuple_items(sub) for sub in value]
        elif key in SCHEMA_VALUED:
            out[key] = tuple_items(value)
        else:
            out[key] = value
    if isinstance(out.get("items"), list) and "prefixItems" not in out:
        out["prefixItems"] = out.pop("items")
        out["items"] = out.pop("additionalItems", True)
    return out


def _unsupported(what: str, where: str, param: str) -> Exception:
    return bad_request(
        f"Unsupported JSON schema keyword {what} at '{where}': constrained decoding cannot"
        f" enforce it, field: '{param}'",
        param,
    )


def response_format_grammar(rf: ResponseFormat | None) -> GrammarSpec | None:
    """The grammar a `response_format` asks for (None: free text). Raises a 400 for bad input."""
    if rf is None or rf.type == "text":
        return None
    if rf.type == "grammar":
        if not rf.grammar or not rf.grammar.strip():
            raise bad_request(
                "response_format of type 'grammar' needs a non-empty 'grammar' (GBNF)",
                "response_format.grammar",
            )
        return GrammarSpec("gbnf", rf.grammar)
    if rf.type == "json_schema":
        if rf.json_schema is None:
            raise bad_request(
                "response_format of type 'json_schema' needs 'json_schema'",
                "response_format.json_schema",
            )
        schema, param = rf.json_schema.schema_, "response_format.json_schema.schema"
    else:
        schema, param = rf.schema_, "response_format.schema"
    if schema is None:
        return GrammarSpec("json_object")
    check_schema(schema, param)
    return schema_spec(schema)


def schema_spec(schema: dict[str, Any]) -> GrammarSpec:
    """The grammar of a JSON schema as a request wrote it (its property order kept: it is the
    order the properties are written in), draft-7 tuples read as the grammar engine reads them."""
    return GrammarSpec.json_schema(json.dumps(tuple_items(schema), ensure_ascii=False))


@dataclass
class ToolsCheck:
    """A request's tool schemas, compiled to check them whatever `tool_choice` says (a schema
    the grammar engine rejects is a 400 under `auto` too, not only once a call is forced)."""

    grammar: GrammarSpec  # a call to any of the tools: one compile (cached) checks them all
    # each tool's parameters schema and its field: compiled alone only when `grammar` fails
    parts: list[tuple[dict[str, Any], str]] = field(default_factory=list)


async def request_grammar(
    engine: EngineClient,
    rf: ResponseFormat | None,
    forced: GrammarSpec | None = None,
    tools: ToolsCheck | None = None,
) -> GrammarSpec | None:
    """The one place a request's output constraint is decided: its `response_format`, or
    `forced` (chat's grammar for a forced tool call), never both. The grammar is compiled now
    (off the event loop; the engine caches it, so its own compile is then a cache hit), so an
    invalid schema or grammar is a 400 naming its field before any engine request starts. The
    message is the grammar engine's. `tools`: the request's tool schemas, checked the same way
    (the error names the tool's `parameters`). A compile that waited too long behind others
    (CompileBusy) is a 503: the grammar was not at fault."""
    try:
        return await _request_grammar(engine, rf, forced, tools)
    except CompileBusy as exc:
        raise unavailable(str(exc)) from None


async def _request_grammar(
    engine: EngineClient,
    rf: ResponseFormat | None,
    forced: GrammarSpec | None,
    tools: ToolsCheck | None,
) -> GrammarSpec | None:
    if tools is not None:
        try:
            await engine.compile_grammar(tools.grammar)
        except GrammarError as exc:
            error, param = exc, "tools"
            for schema, where in tools.parts:  # which tool: compiled alone
                try:
                    await engine.compile_grammar(schema_spec(schema))
                except GrammarError as part_error:
                    error, param = part_error, where
                    break
            raise bad_request(f"{_clean(str(error))}, field: '{param}'", param) from None
    grammar, param = response_format_grammar(rf), "response_format"
    if forced is not None:
        if grammar is not None:
            raise bad_request(
                "response_format cannot be combined with a forced tool call (tool_choice"
                " 'required' or a named function)",
                "response_format",
            )
        grammar, param = forced, "tools"
    if grammar is not None:
        try:
            await engine.compile_grammar(grammar)
        except GrammarError as exc:
            raise bad_request(f"{_clean(str(exc))}, field: '{param}'", param) from None
    return grammar


def _clean(message: str) -> str:
    # xgrammar's messages carry a time and a C++ source location: "[08:45:08] /x/y.cc:820: "
    return " ".join(re.sub(r"\[\d\d:\d\d:\d\d\] \S+:\d+: ", "", message).split())
