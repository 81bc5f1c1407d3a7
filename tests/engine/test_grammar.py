"""Constrained decoding in the engine: grammars hold on a random model, beside free requests."""

from __future__ import annotations

import json
import re

import pytest

from girandole import LLM, SamplingParams
from girandole.sampling.grammar import GrammarError, GrammarSpec


@pytest.fixture(scope="module")
def llm(tiny_llama_dir):
    return LLM(
        model=str(tiny_llama_dir), mode="reference", device="cpu", block_size=4, kv_cache_gb=0.01
    )


def test_fixed_answers_gbnf(llm):
    spec = GrammarSpec("gbnf", 'root ::= "yes" | "no" | "maybe " [0-9]+')
    for seed in range(6):
        out = llm.generate(
            "Answer:", SamplingParams(temperature=1.0, seed=seed, max_tokens=20, grammar=spec)
        )[0]
        assert re.fullmatch(r"yes|no|maybe [0-9]+", out.text), out.text
        if out.text in ("yes", "no"):
            assert out.finish_reason == "stop"


def test_json_schema_on_random_model(llm):
    schema = {
        "type": "object",
        "properties": {"answer": {"type": "string", "enum": ["a", "b"]}, "n": {"type": "boolean"}},
        "required": ["answer", "n"],
        "additionalProperties": False,
    }
    out = llm.generate(
        "JSON:",
        SamplingParams(
            temperature=0.7, seed=1, max_tokens=60, grammar=GrammarSpec.json_schema(schema)
        ),
    )[0]
    assert out.finish_reason == "stop", out.text
    value = json.loads(out.text)
    assert value["answer"] in ("a", "b") and isinstance(value["n"], bool)


def test_mixed_batch_constrained_and_free(llm):
    spec = GrammarSpec("regex", "[0-9]{3}-[a-c]{2}")
    params = [
        SamplingParams(
            temperature=1.0,
            seed=i,
            max_tokens=20,
            grammar=spec if i % 2 else None,
            ignore_eos=not i % 2,
        )
        for i in range(8)
    ]
    free_alone = llm.generate("Once upon", params[0])[0].token_ids
    outs = llm.generate(["Once upon"] * 8, params)
    for i, out in enumerate(outs):
        if i % 2:
            assert re.fullmatch("[0-9]{3}-[a-c]{2}", out.text), out.text
        else:
            assert len(out.token_ids) == 20
    assert outs[0].token_ids == free_alone


@pytest.mark.parametrize(
    "spec, message",
    [
        (GrammarSpec("gbnf", "root ::= ("), "gbnf"),
        (GrammarSpec("json_schema", "{not json"), "not valid JSON"),
        (GrammarSpec("regex", "(unclosed"), "regex"),
    ],
)
def test_bad_grammars_raise_before_generation(llm, spec, message):
    with pytest.raises(GrammarError, match=message):
        llm.generate("x", SamplingParams(max_tokens=5, grammar=spec))
    assert not llm.engine.has_unfinished_requests()


def test_length_bounded_strings_hold_no_control_characters():
    """xgrammar wrote a string with maxLength as characters that let a raw tab in: a forced tool
    call's arguments came out as {"task": "<tab>"}, which no JSON parser reads. The schema's
    grammar now refuses control characters in bounded strings as in unbounded ones."""
    from xgrammar.testing import _is_grammar_accept_string as accepts

    from girandole.sampling.grammar import schema_grammar

    schema = {"type": "object", "properties": {"task": {"type": "string", "maxLength": 20},
              "d": {"type": "string", "minLength": 2}}, "required": ["task", "d"],
              "additionalProperties": False}  # fmt: skip
    grammar = schema_grammar(json.dumps(schema))
    assert accepts(grammar, '{"task": "a b", "d": "xy"}')
    for bad in ('{"task": "a\tb", "d": "xy"}', '{"task": "ab", "d": "x\x01y"}',
                '{"task": "' + "a" * 21 + '", "d": "xy"}'):  # fmt: skip
        assert not accepts(grammar, bad), bad


def test_grammar_caches_stay_bounded_over_many_distinct_schemas():
    """Every request's distinct schema once stayed in xgrammar's compiler cache for good (no
    limit by default): ~180 KB each with Gemma's vocabulary, 1 GB of RSS after 5,000 schemas.
    Both caches are bounded: xgrammar's in bytes, the LRU in entries and bytes."""
    from girandole.sampling.grammar import COMPILER_CACHE_BYTES, GrammarCache
    from girandole.tokenizer.loader import load_tokenizer

    tokenizer = load_tokenizer()  # the default model's: its masks are what a server holds
    cache = GrammarCache(tokenizer, tokenizer.vocab_size, max_entries=8, max_bytes=1 << 20)
    for i in range(450):  # ~80 MB of compiled grammars in all, past the compiler's limit
        properties = {
            f"field_{i}_{j}": {"type": "string" if j % 2 else "integer"} for j in range(4)
        }
        cache.compile(GrammarSpec.json_schema({"type": "object", "properties": properties}))
    held = cache._compiler.get_cache_size_bytes()
    assert 0 < held <= COMPILER_CACHE_BYTES * 1.1, held
    assert len(cache) <= 8 and cache.num_bytes <= 1 << 20, (len(cache), cache.num_bytes)
