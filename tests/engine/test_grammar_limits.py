"""Grammar size limits: a request past one is refused before anything compiles, naming it."""

from __future__ import annotations

import json

import pytest

from girandole.sampling.grammar import GrammarError, GrammarSpec
from girandole.sampling.grammar_limits import GrammarLimits, GrammarTooLarge, check_grammar_size


def schema_spec(schema) -> GrammarSpec:
    return GrammarSpec.json_schema(schema)


def test_ordinary_schemas_pass():
    check_grammar_size(schema_spec({
        "type": "object",
        "properties": {"name": {"type": "string", "pattern": "^[a-z]+$"},
                       "kind": {"enum": ["a", "b", "c"]}, "const": {"const": 3},
                       "default": {"type": "integer", "default": {"enum": list(range(5000))}}},
        "$defs": {"x": {"type": "array", "items": {"$ref": "#/$defs/x"}}},
    }))  # fmt: skip
    check_grammar_size(GrammarSpec("gbnf", 'root ::= "a"'))
    check_grammar_size(GrammarSpec("json_object"))


@pytest.mark.parametrize(
    "schema, words",
    [
        ({"enum": [f"v{i}" for i in range(100_000)]}, "bytes"),  # also over the byte limit
        ({"enum": list(range(5000))}, "enum/const values"),
        ({"type": "object", "properties": {f"p{i}": {} for i in range(5000)}}, "object properties"),
        ({"anyOf": [{"const": "a" * 100_000}]}, "characters"),
        ({"properties": {"a": {"pattern": "x" * 20_000}}}, "pattern"),
        ({"items": [{"enum": ["x" * 10_000] * 13}]}, "total"),
    ],
)
def test_large_schemas_are_refused_naming_the_limit(schema, words):
    with pytest.raises(GrammarTooLarge) as info:
        check_grammar_size(schema_spec(schema))
    assert words in str(info.value) and "the most this server compiles" in str(info.value)


def test_byte_limit_applies_to_grammars_and_regexes():
    limits = GrammarLimits(max_bytes=100)
    with pytest.raises(GrammarTooLarge, match="grammar is 2,000 bytes"):
        check_grammar_size(GrammarSpec("gbnf", "x" * 2000), limits)
    with pytest.raises(GrammarTooLarge, match="regex"):
        check_grammar_size(GrammarSpec("regex", "a" * 101), limits)


@pytest.mark.parametrize("ref", ["http://example.com/s.json", "other.json#/a", "//host/x"])
def test_remote_refs_are_refused(ref):
    spec = schema_spec({"type": "object", "properties": {"a": {"$ref": ref}}})
    with pytest.raises(GrammarError, match="not local"):
        check_grammar_size(spec)


def test_anchor_refs_are_refused_and_pointers_kept():
    """ "#foo" (an $anchor) is not resolved by the grammar engine, which then leaves the value
    unconstrained: a 400 instead. "#" and "#/..." pointers are fine."""
    defs = {"a": {"$anchor": "foo", "type": "integer"}}
    with pytest.raises(GrammarError, match="anchor"):
        check_grammar_size(schema_spec({"$defs": defs, "$ref": "#foo"}))
    check_grammar_size(schema_spec({"$defs": defs, "$ref": "#/$defs/a"}))
    check_grammar_size(schema_spec({"properties": {"self": {"$ref": "#"}}}))


def test_a_deep_schema_does_not_recurse():
    schema: dict = {"type": "string"}
    for _ in range(400):
        schema = {"type": "array", "items": schema}
    check_grammar_size(GrammarSpec("json_schema", json.dumps(schema)))
