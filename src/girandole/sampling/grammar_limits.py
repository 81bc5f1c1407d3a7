"""Size limits on what a request may ask the grammar engine to compile.

Grammar compilation costs grow with the schema (a 100,000-value enum or 5,000 properties took
tens of minutes): a request past a limit is refused before anything compiles, with a message
that names the limit. The defaults are far above what real schemas use (OpenAI's structured
outputs allow 5,000 properties, 1,000 enum values and 120,000 characters of names and values
in all; a GBNF grammar of 64 KiB is a large one) and keep the worst case within seconds.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from girandole.sampling.grammar import GrammarError, GrammarSpec


class GrammarTooLarge(GrammarError):
    """The grammar is valid but larger than a limit allows."""


@dataclass(frozen=True)
class GrammarLimits:
    max_bytes: int = 256 * 1024  # the schema's JSON text, the GBNF grammar or the regex
    max_properties: int = 2_000  # object properties, counted over the whole schema
    max_enum_values: int = 2_000  # enum and const values, counted over the whole schema
    max_literal_chars: int = 16_384  # one string in an enum, a const or a pattern
    max_total_literal_chars: int = 120_000  # all property names, enum/const strings, patterns


DEFAULT_LIMITS = GrammarLimits()


def check_grammar_size(spec: GrammarSpec, limits: GrammarLimits = DEFAULT_LIMITS) -> None:
    """Raise GrammarTooLarge naming the limit; GrammarError for a remote $ref."""
    size = len(spec.text.encode("utf-8", "surrogatepass"))
    if size > limits.max_bytes:
        raise GrammarTooLarge(
            f"the {_what(spec)} is {size:,} bytes; the most this server compiles is"
            f" {limits.max_bytes:,} bytes"
        )
    if spec.kind != "json_schema":
        return
    try:
        schema = json.loads(spec.text)
    except json.JSONDecodeError:
        return  # the compiler reports invalid JSON with its own message
    counts = _Counts()
    counts.walk(schema, limits)
    if counts.properties > limits.max_properties:
        raise GrammarTooLarge(
            f"the JSON schema declares {counts.properties:,} object properties; the most this"
            f" server compiles is {limits.max_properties:,}"
        )
    if counts.enum_values > limits.max_enum_values:
        raise GrammarTooLarge(
            f"the JSON schema has {counts.enum_values:,} enum/const values; the most this"
            f" server compiles is {limits.max_enum_values:,}"
        )
    if counts.literal_chars > limits.max_total_literal_chars:
        raise GrammarTooLarge(
            f"the JSON schema's property names, enum/const strings and patterns total"
            f" {counts.literal_chars:,} characters; the most this server compiles is"
            f" {limits.max_total_literal_chars:,}"
        )


def _what(spec: GrammarSpec) -> str:
    return {"json_schema": "JSON schema", "gbnf": "grammar", "regex": "regex"}.get(
        spec.kind, "grammar"
    )


class _Counts:
    def __init__(self) -> None:
        self.properties = 0
        self.enum_values = 0
        self.literal_chars = 0

    def literal(self, value: Any, limits: GrammarLimits, where: str) -> None:
        if isinstance(value, str):
            if len(value) > limits.max_literal_chars:
                raise GrammarTooLarge(
                    f"a string in the JSON schema's {where} has {len(value):,} characters; the"
                    f" most this server compiles is {limits.max_literal_chars:,}"
                )
            self.literal_chars += len(value)
        elif isinstance(value, list | dict):
            # a const/enum value that is itself JSON: its strings count as literals too
            for item in value.values() if isinstance(value, dict) else value:
                self.literal(item, limits, where)

    def walk(self, schema: Any, limits: GrammarLimits) -> None:
        # iterative: a deep schema must not recurse here (the depth limit is checked elsewhere)
        stack = [schema]
        while stack:
            node = stack.pop()
            if not isinstance(node, dict):
                continue
            ref = node.get("$ref")
            if isinstance(ref, str) and not ref.startswith("#"):
                raise GrammarError(
                    f"the JSON schema's $ref {ref[:200]!r} is not local: only references into"
                    " the schema itself ('#/...') are resolved; this server fetches nothing"
                )
            if isinstance(ref, str) and ref != "#" and not ref.startswith("#/"):
                raise GrammarError(  # the grammar engine would quietly leave it unconstrained
                    f"the JSON schema's $ref {ref[:200]!r} names an anchor: only JSON pointers"
                    " ('#/$defs/name') are resolved"
                )
            for key, value in node.items():
                if key in SCHEMA_MAPS and isinstance(value, dict):
                    if key == "properties":
                        self.properties += len(value)
                        self.literal(list(value), limits, "property names")
                    stack.extend(value.values())
                elif key in SCHEMA_LISTS and isinstance(value, list):
                    stack.extend(value)
                elif key in SCHEMA_VALUED:
                    stack.extend(value if isinstance(value, list) else [value])
                elif key == "enum" and isinstance(value, list):
                    self.enum_values += len(value)
                    self.literal(value, limits, "enum")
                elif key == "const":
                    self.enum_values += 1
                    self.literal(value, limits, "const")
                elif key == "pattern":
                    self.literal(value, limits, "pattern")


# Keywords whose values are subschemas: a single one (or a list, for old-style `items`), a list
# of them, or a map of names to them. Everything else (default, examples, ...) is data.
SCHEMA_VALUED = {
    "items",
    "additionalProperties",
    "unevaluatedProperties",
    "unevaluatedItems",
    "propertyNames",
    "contains",
    "additionalItems",
    "not",
    "if",
    "then",
    "else",
}
SCHEMA_LISTS = {"anyOf", "oneOf", "allOf", "prefixItems"}
SCHEMA_MAPS = {"properties", "patternProperties", "$defs", "definitions", "dependentSchemas"}
