"""The tools built on the OpenAI/Fireworks clients, driven for real against the real server:
litellm (its `openai/` and `fireworks_ai/` providers), LangChain (`langchain-openai`: ChatOpenAI,
the completions LLM, embeddings), the OpenAI Agents SDK (an agent with a function tool over the
Responses API) and lm-evaluation-harness (its `lm_eval run` command line on tasks of local files,
and its `local-completions` / `local-chat-completions` models in process).

A team points these at girandole with a base URL and a model name; each test checks that what
they return agrees with a direct openai SDK call for the same request at temperature 0 (text,
usage, tool calls, structured output), so a field they send that the server mishandles, or a
response field they need that it leaves out, shows up here.

Nothing here touches the internet: litellm reads its bundled model-cost map
(LITELLM_LOCAL_MODEL_COST_MAP) and nothing calls tiktoken (LangChain's embeddings are built with
`check_embedding_ctx_length=False`, which skips it); lm-eval's tasks read JSON Lines files written
here (HF_DATASETS_OFFLINE).
"""

from __future__ import annotations

import asyncio
import enum
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Literal

import fireworks
import jsonschema
import openai
import pytest
from api_helpers import API_KEY, MODEL, MODEL_ID, WEATHER_PARAMETERS
from pydantic import BaseModel, Field

# litellm fetches its model-cost map from GitHub at import unless told to read its bundled copy
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import litellm  # noqa: E402
from langchain_core.exceptions import ContextOverflowError  # noqa: E402
from langchain_core.messages import HumanMessage, SystemMessage, ToolMessage  # noqa: E402
from langchain_core.tools import tool  # noqa: E402
from langchain_core.utils.function_calling import convert_to_openai_tool  # noqa: E402
from langchain_openai import ChatOpenAI, OpenAI, OpenAIEmbeddings  # noqa: E402

pytestmark = pytest.mark.slow

litellm.suppress_debug_info = True  # no "Provider List: ..." banner for a model it has no price for

PROMPT = "Name a colour."
TEXT_PROMPT = "Once upon a time"
WEATHER = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": WEATHER_PARAMETERS}}]  # fmt: skip


class Colour(BaseModel):
    """A colour."""

    colour: str = Field(max_length=10)


class Shade(enum.Enum):
    RED = "red"
    BLUE = "blue"


class Pet(BaseModel):
    """A pet."""

    kind: Literal["cat", "dog"] = Field(description="its kind")


class Person(BaseModel):
    """A person: nested model, enum, bounded integer and an optional field ($defs, $ref and
    anyOf in its JSON schema, as pydantic writes it), kept short to generate."""

    age: int = Field(ge=0, le=99)
    shade: Shade
    pet: Pet = Field(description="the pet")
    nick: str | None = Field(default=None, max_length=4)


@pytest.fixture(scope="module")
def base_url(server) -> str:
    return server.url + "/inference/v1"


@pytest.fixture(scope="module")
def oai(base_url) -> openai.OpenAI:
    return openai.OpenAI(api_key=API_KEY, base_url=base_url, max_retries=0)


@pytest.fixture(scope="module")
def reference(oai) -> openai.types.chat.ChatCompletion:
    """The direct SDK answer every chat tool must reproduce: greedy, 8 tokens."""
    return oai.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": PROMPT}], temperature=0, max_tokens=8
    )


def chat(base_url: str, **kw) -> ChatOpenAI:
    return ChatOpenAI(model=MODEL, base_url=base_url, api_key=API_KEY, max_retries=0, **kw)


def ll(provider: str, base_url: str, **kw):
    """litellm.completion against the server; `provider` is "openai" or "fireworks_ai"."""
    return litellm.completion(
        model=f"{provider}/{MODEL}", api_base=base_url, api_key=API_KEY, num_retries=0, **kw
    )


def assert_weather_call(name: str, arguments: str | dict) -> dict:
    args = json.loads(arguments) if isinstance(arguments, str) else arguments
    assert name == "get_weather"
    jsonschema.validate(args, WEATHER_PARAMETERS)
    return args


# -- litellm ------------------------------------------------------------------------------------


@pytest.mark.parametrize("provider", ["openai", "fireworks_ai"])
def test_litellm_completion_matches_the_sdk(base_url, reference, provider):
    r = ll(provider, base_url, messages=[{"role": "user", "content": PROMPT}], temperature=0,
           max_tokens=8)  # fmt: skip
    want = reference.choices[0]
    assert r.choices[0].message.content == want.message.content and want.message.content
    assert r.choices[0].finish_reason == want.finish_reason == "length"
    assert r.usage.prompt_tokens == reference.usage.prompt_tokens
    assert r.usage.completion_tokens == reference.usage.completion_tokens == 8
    assert r.usage.total_tokens == reference.usage.total_tokens
    assert r.id.startswith("chatcmpl-")
    # litellm prefixes the provider it used to the model the server names
    assert r.model in (MODEL, f"fireworks_ai/{MODEL}")


def test_litellm_fireworks_short_name_and_environment(base_url, reference, monkeypatch):
    """The fireworks_ai provider's own setup: the short model name (litellm expands it to
    accounts/fireworks/models/<name>) and the base URL and key from its environment variables."""
    monkeypatch.setenv("FIREWORKS_API_BASE", base_url)
    monkeypatch.setenv("FIREWORKS_AI_API_KEY", API_KEY)
    r = litellm.completion(
        model=f"fireworks_ai/{MODEL_ID}", messages=[{"role": "user", "content": PROMPT}],
        temperature=0, max_tokens=8, num_retries=0,
    )  # fmt: skip
    assert r.choices[0].message.content == reference.choices[0].message.content


def test_litellm_streams_sync_and_async(base_url, reference):
    messages = [{"role": "user", "content": PROMPT}]
    want = reference.choices[0].message.content
    chunks = list(ll("openai", base_url, messages=messages, temperature=0, max_tokens=8,
                     stream=True, stream_options={"include_usage": True}))  # fmt: skip
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    built = litellm.stream_chunk_builder(chunks, messages=messages)
    assert built.choices[0].message.content == want
    assert built.choices[0].finish_reason == "length"
    assert built.usage.prompt_tokens == reference.usage.prompt_tokens
    assert built.usage.completion_tokens == 8

    async def fireworks_stream() -> list:
        # the fireworks_ai provider asks for usage itself (stream_options.include_usage)
        stream = await litellm.acompletion(
            model=f"fireworks_ai/{MODEL}", api_base=base_url, api_key=API_KEY, num_retries=0,
            messages=messages, temperature=0, max_tokens=8, stream=True,
        )  # fmt: skip
        return [c async for c in stream]

    async def plain() -> litellm.ModelResponse:
        return await litellm.acompletion(
            model=f"fireworks_ai/{MODEL}", api_base=base_url, api_key=API_KEY, num_retries=0,
            messages=messages, temperature=0, max_tokens=8,
        )  # fmt: skip

    async def both() -> tuple:
        return await asyncio.gather(fireworks_stream(), plain())

    achunks, aplain = asyncio.run(both())
    assert "".join(c.choices[0].delta.content or "" for c in achunks if c.choices) == want
    assert aplain.choices[0].message.content == want
    assert litellm.stream_chunk_builder(achunks).usage.completion_tokens == 8


@pytest.mark.parametrize("provider", ["openai", "fireworks_ai"])
def test_litellm_text_completion_matches_the_sdk(oai, base_url, tokenizer, provider):
    want = oai.completions.create(model=MODEL, prompt=TEXT_PROMPT, temperature=0, max_tokens=8)
    r = litellm.text_completion(
        model=f"{provider}/{MODEL}", api_base=base_url, api_key=API_KEY, prompt=TEXT_PROMPT,
        temperature=0, max_tokens=8,
    )  # fmt: skip
    assert r.choices[0].text == want.choices[0].text and r.choices[0].text.strip()
    assert r.usage.prompt_tokens == len(tokenizer.encode(TEXT_PROMPT))
    assert r.usage.completion_tokens == 8
    streamed = litellm.text_completion(
        model=f"{provider}/{MODEL}", api_base=base_url, api_key=API_KEY, prompt=TEXT_PROMPT,
        temperature=0, max_tokens=8, stream=True,
    )  # fmt: skip
    assert "".join(c.choices[0].text or "" for c in streamed if c.choices) == want.choices[0].text


def test_litellm_tool_calls_and_round_trip(oai, base_url):
    """A forced call through both providers (fireworks_ai sends `required` as `any`, and needs
    `allowed_openai_params` for a model litellm's price list does not know), streamed and
    rebuilt, then the tool's result sent back."""
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    want = oai.chat.completions.create(model=MODEL, messages=messages, tools=WEATHER,
                                       tool_choice="required", temperature=0)  # fmt: skip
    want_args = assert_weather_call(want.choices[0].message.tool_calls[0].function.name,
                                    want.choices[0].message.tool_calls[0].function.arguments)  # fmt: skip
    r = ll("fireworks_ai", base_url, messages=messages, tools=WEATHER, tool_choice="required",
           temperature=0, allowed_openai_params=["tools", "tool_choice"])  # fmt: skip
    assert r.choices[0].finish_reason == "tool_calls" and r.choices[0].message.content is None
    (call,) = r.choices[0].message.tool_calls
    assert assert_weather_call(call.function.name, call.function.arguments) == want_args
    assert call.id.startswith("call_") and call.type == "function"
    assert r.usage.completion_tokens == want.usage.completion_tokens

    chunks = list(ll("openai", base_url, messages=messages, tools=WEATHER,
                     tool_choice="required", temperature=0, stream=True))  # fmt: skip
    built = litellm.stream_chunk_builder(chunks, messages=messages)
    (scall,) = built.choices[0].message.tool_calls
    assert assert_weather_call(scall.function.name, scall.function.arguments) == want_args
    assert built.choices[0].finish_reason == "tool_calls"

    follow = [*messages, r.choices[0].message.model_dump(exclude_none=True),
              {"role": "tool", "tool_call_id": call.id, "content": "Sunny, 21 C"}]  # fmt: skip
    answer = ll("fireworks_ai", base_url, messages=follow, tools=WEATHER, temperature=0,
                max_tokens=6, allowed_openai_params=["tools"])  # fmt: skip
    direct = oai.chat.completions.create(model=MODEL, messages=follow, tools=WEATHER,
                                         temperature=0, max_tokens=6)  # fmt: skip
    assert answer.choices[0].message.content == direct.choices[0].message.content
    assert answer.usage.prompt_tokens == direct.usage.prompt_tokens > r.usage.prompt_tokens


def test_litellm_response_format(oai, base_url):
    """A pydantic class as response_format (litellm sends it as a strict json_schema with $defs)
    gives JSON that validates, identical to the SDK's for the same schema; a plain json_schema
    dict through the openai provider too."""
    messages = [{"role": "user", "content": "Describe a person."}]
    r = ll("fireworks_ai", base_url, messages=messages, response_format=Person, temperature=0,
           max_tokens=100)  # fmt: skip
    assert r.choices[0].finish_reason == "stop"
    person = Person.model_validate_json(r.choices[0].message.content)
    want = oai.chat.completions.parse(model=MODEL, messages=messages, response_format=Person,
                                      temperature=0, max_tokens=100)  # fmt: skip
    assert person == want.choices[0].message.parsed
    assert r.usage.completion_tokens == want.usage.completion_tokens

    schema = {"type": "json_schema", "json_schema": {
        "name": "colour", "schema": Colour.model_json_schema()}}  # fmt: skip
    colour = ll("openai", base_url, messages=[{"role": "user", "content": PROMPT}],
                response_format=schema, temperature=0, max_tokens=50)  # fmt: skip
    direct = oai.chat.completions.create(model=MODEL, response_format=schema, temperature=0,
                                         messages=[{"role": "user", "content": PROMPT}],
                                         max_tokens=50)  # fmt: skip
    assert colour.choices[0].message.content == direct.choices[0].message.content
    Colour.model_validate_json(colour.choices[0].message.content)


def test_litellm_fireworks_guided_choice_becomes_a_schema(base_url):
    """litellm's fireworks_ai provider turns vLLM's `guided_choice` into a json_schema."""
    r = ll("fireworks_ai", base_url, messages=[{"role": "user", "content": "Yes or no?"}],
           temperature=0, extra_body={"guided_choice": ["yes", "no"]})  # fmt: skip
    assert json.loads(r.choices[0].message.content) in ("yes", "no")


def test_litellm_fireworks_introspection_fields(server, base_url):
    """litellm's fireworks_ai provider lifts Fireworks' extras into `_hidden_params`: the
    body's `prompt_token_ids` (chat puts them on the body, not the choice), `perf_metrics`,
    and each choice's `raw_output` and `token_ids`. The fireworks SDK reads the same places."""
    messages = [{"role": "user", "content": PROMPT}]
    r = ll("fireworks_ai", base_url, messages=messages, temperature=0, max_tokens=4,
           return_token_ids=True, raw_output=True, perf_metrics_in_response=True)  # fmt: skip
    hidden = r._hidden_params
    raw = hidden["fireworks_raw_outputs"][0]
    assert hidden["fireworks_prompt_token_ids"] == raw["prompt_token_ids"]
    assert len(raw["prompt_token_ids"]) == r.usage.prompt_tokens
    assert hidden["fireworks_token_ids"] == [raw["completion_token_ids"]]
    assert hidden["fireworks_perf_metrics"]["prompt-tokens"] == r.usage.prompt_tokens

    fw = fireworks.Fireworks(api_key=API_KEY, base_url=server.url, max_retries=0)
    whole = fw.chat.completions.create(model=MODEL, messages=messages, max_tokens=2,
                                       return_token_ids=True)  # fmt: skip
    assert whole.prompt_token_ids == raw["prompt_token_ids"]
    chunks = list(fw.chat.completions.create(model=MODEL, messages=messages, max_tokens=2,
                                             return_token_ids=True, stream=True))  # fmt: skip
    assert chunks[0].prompt_token_ids == raw["prompt_token_ids"]  # the first chunk only
    assert all(c.prompt_token_ids is None for c in chunks[1:])


def test_litellm_maps_our_errors_to_its_exceptions(base_url):
    messages = [{"role": "user", "content": PROMPT}]
    with pytest.raises(litellm.BadRequestError, match="field: 'temperature'"):
        ll("openai", base_url, messages=messages, temperature=5, max_tokens=2)
    with pytest.raises(litellm.AuthenticationError):
        litellm.completion(model=f"fireworks_ai/{MODEL}", api_base=base_url, api_key="wrong",
                           messages=messages, max_tokens=2, num_retries=0)  # fmt: skip
    with pytest.raises(litellm.NotFoundError):
        litellm.completion(model="fireworks_ai/accounts/nobody/models/nothing",
                           api_base=base_url, api_key=API_KEY, messages=messages,
                           max_tokens=2, num_retries=0)  # fmt: skip
    # litellm's context-window fallbacks rely on this class, found from our message's wording
    long = [{"role": "user", "content": "hello " * 33_000}]  # > 32768 tokens
    for provider in ("openai", "fireworks_ai"):
        with pytest.raises(litellm.ContextWindowExceededError):
            ll(provider, base_url, messages=long, max_tokens=2)


def test_litellm_embedding_matches_the_sdk(oai, base_url):
    want = oai.embeddings.create(model=MODEL, input=["a cat", "a dog"]).data
    for provider in ("openai", "fireworks_ai"):
        r = litellm.embedding(model=f"{provider}/{MODEL}", api_base=base_url, api_key=API_KEY,
                              input=["a cat", "a dog"])  # fmt: skip
        got = [d["embedding"] for d in r.data]
        assert got[0] == pytest.approx(want[0].embedding, abs=1e-5)
        assert got[1] == pytest.approx(want[1].embedding, abs=1e-5)
        assert r.usage.prompt_tokens > 0


# -- LangChain ----------------------------------------------------------------------------------


def test_langchain_invoke_matches_the_sdk(base_url, reference):
    m = chat(base_url, temperature=0, max_tokens=8).invoke(PROMPT)
    assert m.content == reference.choices[0].message.content
    assert m.response_metadata["finish_reason"] == "length"
    assert m.response_metadata["model_name"] == MODEL
    assert m.usage_metadata["input_tokens"] == reference.usage.prompt_tokens
    assert m.usage_metadata["output_tokens"] == 8
    assert m.usage_metadata["total_tokens"] == reference.usage.total_tokens
    # a system message and content parts reach the same template as the SDK's
    parts = chat(base_url, temperature=0, max_tokens=8).invoke(
        [SystemMessage("Be brief."), HumanMessage([{"type": "text", "text": PROMPT}])]
    )
    assert parts.content and parts.usage_metadata["input_tokens"] > m.usage_metadata["input_tokens"]


def test_langchain_stream_batch_and_async(base_url, reference):
    want = reference.choices[0].message.content
    llm = chat(base_url, temperature=0, max_tokens=8, stream_usage=True)
    chunks = list(llm.stream(PROMPT))
    assert "".join(c.content for c in chunks) == want
    total = chunks[0]
    for c in chunks[1:]:
        total = total + c
    assert total.usage_metadata["input_tokens"] == reference.usage.prompt_tokens
    assert total.usage_metadata["output_tokens"] == 8
    assert total.response_metadata["finish_reason"] == "length"

    other = "Name a fruit."
    alone = llm.invoke(other).content
    batch = llm.batch([PROMPT, other])
    assert [m.content for m in batch] == [want, alone]
    abatch = asyncio.run(llm.abatch([PROMPT, other]))
    assert [m.content for m in abatch] == [want, alone]


def test_langchain_structured_output(base_url, oai):
    """with_structured_output: json_schema (response_format) and function_calling (a forced
    tool call), strict or not, plain and nested schemas; include_raw keeps the message."""
    llm = chat(base_url, temperature=0, max_tokens=100)
    colour = llm.with_structured_output(Colour, method="json_schema").invoke(PROMPT)
    assert isinstance(colour, Colour) and colour.colour
    want = oai.chat.completions.parse(model=MODEL, messages=[{"role": "user", "content": PROMPT}],
                                      response_format=Colour, temperature=0)  # fmt: skip
    assert colour == want.choices[0].message.parsed

    raw = llm.with_structured_output(Colour, method="json_schema", include_raw=True).invoke(PROMPT)
    assert raw["parsing_error"] is None and raw["parsed"] == colour
    assert raw["raw"].response_metadata["finish_reason"] == "stop"

    # a forced call of a function named after the schema, then nested schemas both ways
    called = llm.with_structured_output(Colour, method="function_calling").invoke(PROMPT)
    assert isinstance(called, Colour) and called.colour
    for method in ("json_schema", "function_calling"):
        person = llm.with_structured_output(Person, method=method, strict=True).invoke(
            "Describe a person."
        )
        assert isinstance(person, Person), method
        assert isinstance(person.pet, Pet) and isinstance(person.shade, Shade)

    digit = llm.with_structured_output(
        {"title": "Digit", "type": "object", "required": ["n"],
         "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}}},
        method="json_schema",
    ).invoke("A digit.")  # fmt: skip
    assert isinstance(digit, dict) and 0 <= digit["n"] <= 9


@tool
def get_weather(city: str, unit: Literal["celsius", "fahrenheit"]) -> str:
    """The weather in a city."""
    return f"Sunny, 21 degrees {unit} in {city}"


@tool
def now() -> str:
    """The time now."""
    return "noon"


def test_langchain_bind_tools_round_trip(base_url, oai):
    llm = chat(base_url, temperature=0, max_tokens=40)  # a forced call ends on its own
    question = HumanMessage("What is the weather in Paris?")
    ai = llm.bind_tools([get_weather, now], tool_choice="get_weather").invoke([question])
    (call,) = ai.tool_calls
    assert call["name"] == "get_weather" and set(call["args"]) == {"city", "unit"}
    assert call["args"]["unit"] in ("celsius", "fahrenheit") and call["args"]["city"]
    assert ai.response_metadata["finish_reason"] == "tool_calls" and not ai.invalid_tool_calls

    # streamed: the header chunk and argument fragments add up to the same call
    chunks = list(llm.bind_tools([get_weather, now], tool_choice="get_weather").stream([question]))
    total = chunks[0]
    for c in chunks[1:]:
        total = total + c
    assert [(c["name"], c["args"]) for c in total.tool_calls] == [(call["name"], call["args"])]

    # `any` and a function without parameters
    (tick,) = llm.bind_tools([now], tool_choice="any").invoke("What time is it?").tool_calls
    assert tick["name"] == "now" and tick["args"] == {}

    # the tool's result goes back: the assistant turn with tool_calls, then a tool message
    history = [question, ai, ToolMessage(get_weather.invoke(call["args"]), tool_call_id=call["id"])]
    answer = chat(base_url, temperature=0, max_tokens=6).bind_tools([get_weather]).invoke(history)
    assert (
        answer.content and answer.usage_metadata["input_tokens"] > ai.usage_metadata["input_tokens"]
    )
    direct = oai.chat.completions.create(
        model=MODEL, temperature=0, max_tokens=6,
        tools=[convert_to_openai_tool(get_weather)],
        messages=[{"role": "user", "content": question.content},
                  {"role": "assistant", "content": None, "tool_calls": [{
                      "id": call["id"], "type": "function", "function": {
                          "name": "get_weather", "arguments": json.dumps(call["args"])}}]},
                  {"role": "tool", "tool_call_id": call["id"],
                   "content": get_weather.invoke(call["args"])}],
    )  # fmt: skip
    assert answer.content == direct.choices[0].message.content
    assert answer.usage_metadata["input_tokens"] == direct.usage.prompt_tokens


def test_langchain_completions_llm(base_url, oai, tokenizer):
    """The completions LLM (`langchain_openai.OpenAI`): invoke, several prompts in one request,
    streaming, logprobs."""
    want = oai.completions.create(model=MODEL, prompt=TEXT_PROMPT, temperature=0, max_tokens=8)
    llm = OpenAI(model=MODEL, base_url=base_url, api_key=API_KEY, temperature=0, max_tokens=8,
                 max_retries=0)  # fmt: skip
    assert llm.invoke(TEXT_PROMPT) == want.choices[0].text
    assert "".join(llm.stream(TEXT_PROMPT)) == want.choices[0].text

    second = "1, 2, 3, 4,"
    second_alone = llm.invoke(second)
    result = llm.generate([TEXT_PROMPT, second])  # one request, prompt: [a, b]
    assert [g[0].text for g in result.generations] == [want.choices[0].text, second_alone]
    usage = result.llm_output["token_usage"]
    assert usage["completion_tokens"] == 16
    assert usage["prompt_tokens"] == len(tokenizer.encode(TEXT_PROMPT)) + len(
        tokenizer.encode(second)
    )

    scored = OpenAI(model=MODEL, base_url=base_url, api_key=API_KEY, temperature=0,
                    max_tokens=3, logprobs=2, max_retries=0).generate([TEXT_PROMPT])  # fmt: skip
    lp = scored.generations[0][0].generation_info["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == 3
    for token, logprob, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]):
        assert logprob == max(top.values()) and top[token] == logprob  # greedy: the top one


def test_langchain_embeddings_match_the_sdk(base_url, oai):
    want = oai.embeddings.create(model=MODEL, input=["a cat", "a dog"]).data
    emb = OpenAIEmbeddings(model=MODEL, base_url=base_url, api_key=API_KEY,
                           check_embedding_ctx_length=False, max_retries=0)  # fmt: skip
    docs = emb.embed_documents(["a cat", "a dog"])
    assert docs[0] == pytest.approx(want[0].embedding, abs=1e-5)
    assert docs[1] == pytest.approx(want[1].embedding, abs=1e-5)
    assert emb.embed_query("a cat") == pytest.approx(want[0].embedding, abs=1e-5)


def test_langchain_errors(base_url):
    llm = chat(base_url, max_tokens=2)
    # LangChain's context-overflow class (summarising middleware catches it) from our wording
    with pytest.raises(ContextOverflowError):
        llm.invoke("hello " * 33_000)
    # Fireworks' message schema has no `name`: a named message is a 400 that says so
    with pytest.raises(openai.BadRequestError, match="field: 'messages.0.name'"):
        llm.invoke([HumanMessage("Hi", name="bob")])
    with pytest.raises(openai.AuthenticationError):
        ChatOpenAI(model=MODEL, base_url=base_url, api_key="wrong", max_retries=0).invoke("Hi")


# -- lm-evaluation-harness -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_tokenizer_dir(tokenizer, tmp_path_factory) -> Path:
    """The default model's tokenizer as a transformers folder: lm-eval counts context tokens
    with it (its `auto` backend may fall back to the Hub, which this machine cannot reach)."""
    folder = tmp_path_factory.mktemp("hf-tokenizer")
    tokenizer.hf.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": tokenizer.bos_token,
        "eos_token": tokenizer.eos_token}))  # fmt: skip
    return folder


CAPITALS = [  # a multiple-choice task: lm-eval scores each choice by loglikelihood
    {"question": "The capital of France is", "choices": ["Paris", "Berlin", "banana"], "answer": 0},
    {"question": "The capital of Germany is", "choices": ["Madrid", "Berlin", "soup"], "answer": 1},
    {"question": "One, two, three,", "choices": ["four", "seven", "cat"], "answer": 0},
]
COUNTING = [{"prompt": "1, 2, 3, 4,"}, {"prompt": TEXT_PROMPT}]  # generate_until, greedy


def _write_tasks(folder: Path) -> None:
    """Two lm-eval tasks over JSON Lines files, the way a team adds its own evaluation."""
    for name, rows, spec in [
        ("girandole_mc", CAPITALS, "output_type: multiple_choice\ndoc_to_text: '{{question}}'\n"
         "doc_to_choice: '{{choices}}'\ndoc_to_target: '{{answer}}'\nmetric_list:\n"
         "  - metric: acc\n"),
        ("girandole_gen", COUNTING, "output_type: generate_until\ndoc_to_text: '{{prompt}}'\n"
         "doc_to_target: ''\ngeneration_kwargs:\n  until: ['\\n', '.']\n"
         "  max_gen_toks: 8\n  do_sample: false\n  temperature: 0\nmetric_list:\n"
         "  - metric: bypass\n"),
    ]:  # fmt: skip
        data = folder / f"{name}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        (folder / f"{name}.yaml").write_text(
            f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
            f"    test: {data}\ntest_split: test\n{spec}"
        )


def test_lm_eval_command_line_runs_local_tasks(server, oai, tokenizer, hf_tokenizer_dir,
                                               tmp_path):  # fmt: skip
    """`lm_eval run --model local-completions` as a team runs it: every loglikelihood it scored
    equals the direct echo+logprobs call for the same tokens, its accuracy follows from them, and
    its generations equal direct greedy completions."""
    tasks, out = tmp_path / "tasks", tmp_path / "out"
    tasks.mkdir()
    _write_tasks(tasks)
    model_args = ",".join([
        f"model={MODEL}", f"base_url={server.url}/inference/v1/completions",
        f"tokenizer={hf_tokenizer_dir}", "tokenizer_backend=huggingface", "add_bos_token=True",
        "num_concurrent=2", "max_retries=1",
    ])  # fmt: skip
    env = {**os.environ, "OPENAI_API_KEY": API_KEY, "HF_DATASETS_OFFLINE": "1",
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp_path / "datasets")}  # fmt: skip
    run = subprocess.run(
        [sys.executable, "-m", "lm_eval", "run", "--model", "local-completions", "--model_args",
         model_args, "--tasks", "girandole_mc,girandole_gen", "--include_path", str(tasks),
         "--output_path", str(out), "--log_samples"],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]

    def samples(task: str) -> list[dict]:
        (path,) = out.rglob(f"samples_{task}_*.jsonl")
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        return sorted(rows, key=lambda r: r["doc_id"])

    accs = []
    for row, doc in zip(samples("girandole_mc"), CAPITALS, strict=True):
        ctxlen = len(tokenizer.encode(doc["question"]))
        want = []
        for choice in doc["choices"]:  # lm-eval joins them with its target delimiter, " "
            r = oai.completions.create(model=MODEL, prompt=tokenizer.encode(
                f"{doc['question']} {choice}"), echo=True, logprobs=1, max_tokens=0)  # fmt: skip
            want.append(sum(r.choices[0].logprobs.token_logprobs[ctxlen:]))
        got = [float(score) for score, _greedy in row["filtered_resps"]]
        assert got == pytest.approx(want, abs=1e-3)
        accs.append(float(max(range(len(want)), key=want.__getitem__) == doc["answer"]))
        assert row["acc"] == accs[-1]
    (results,) = out.rglob("results_*.json")
    acc = json.loads(results.read_text())["results"]["girandole_mc"]["acc,none"]
    assert acc == pytest.approx(sum(accs) / len(accs)) and acc > 0

    for row, doc in zip(samples("girandole_gen"), COUNTING, strict=True):
        want = oai.completions.create(model=MODEL, prompt=tokenizer.encode(doc["prompt"]),
                                      max_tokens=8, temperature=0, stop=["\n", "."])  # fmt: skip
        assert row["filtered_resps"] == [want.choices[0].text] and want.choices[0].text.strip()


def test_lm_eval_local_completions(server, oai, tokenizer, hf_tokenizer_dir):
    from lm_eval.api.instance import Instance
    from lm_eval.models import openai_completions as models

    kw = dict(base_url=server.url + "/inference/v1/completions", model=MODEL,
              tokenizer=str(hf_tokenizer_dir), tokenizer_backend="huggingface", max_retries=1,
              header={"Authorization": f"Bearer {API_KEY}"})  # fmt: skip
    lm = models.LocalCompletionsAPI(add_bos_token=True, **kw)
    context = "The capital of France is"
    # loglikelihood: echo + logprobs=1 + max_tokens=1, prompts as token ids
    got = lm.loglikelihood([Instance("loglikelihood", {}, (context, " Paris"), 0),
                            Instance("loglikelihood", {}, (context, " banana"), 1)])  # fmt: skip
    for (score, greedy), cont in zip(got, [" Paris", " banana"]):
        ids = tokenizer.encode(context + cont)
        ctxlen = len(tokenizer.encode(context))
        r = oai.completions.create(model=MODEL, prompt=ids, echo=True, logprobs=1, max_tokens=0,
                                   temperature=0)  # fmt: skip
        lp = r.choices[0].logprobs
        assert score == pytest.approx(sum(lp.token_logprobs[ctxlen:]), abs=1e-4)
        want_greedy = all(
            tokens_lp == max(top.values())
            for tokens_lp, top in zip(lp.token_logprobs[ctxlen:], lp.top_logprobs[ctxlen:])
        )
        assert greedy == want_greedy
    assert got[0][0] > got[1][0]  # " Paris" is far likelier than " banana"

    # generate_until, through the concurrent (aiohttp) path
    lm2 = models.LocalCompletionsAPI(add_bos_token=True, num_concurrent=2, **kw)
    gen = lm2.generate_until([
        Instance("generate_until", {}, ("1, 2, 3, 4,", {"until": ["\n"], "max_gen_toks": 8}), 0),
        Instance("generate_until", {}, (TEXT_PROMPT, {"until": ["."], "max_gen_toks": 8}), 1),
    ])  # fmt: skip
    for text, (prompt, stop) in zip(gen, [("1, 2, 3, 4,", "\n"), (TEXT_PROMPT, ".")]):
        want = oai.completions.create(model=MODEL, prompt=tokenizer.encode(prompt), max_tokens=8,
                                      temperature=0, stop=[stop])  # fmt: skip
        assert text == want.choices[0].text and text.strip()

    # loglikelihood_rolling: BOS (lm-eval's prefix token) + the text, scored whole
    text = "The quick brown fox jumps over the lazy dog."
    plain = models.LocalCompletionsAPI(add_bos_token=False, **kw)
    (rolling,) = plain.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    r = oai.completions.create(model=MODEL, prompt=tokenizer.encode(text), echo=True, logprobs=1,
                               max_tokens=0, temperature=0)  # fmt: skip
    assert rolling == pytest.approx(sum(r.choices[0].logprobs.token_logprobs[1:]), abs=1e-3)


def test_lm_eval_local_chat_completions(server, oai):
    from lm_eval.api.instance import Instance
    from lm_eval.models import openai_completions as models

    lm = models.LocalChatCompletion(
        base_url=server.url + "/inference/v1/chat/completions", model=MODEL, max_retries=1,
        header={"Authorization": f"Bearer {API_KEY}"},
    )  # fmt: skip
    messages = [{"role": "user", "content": "Count: 1, 2, 3"}]
    (text,) = lm.generate_until([Instance("generate_until", {}, (
        lm.apply_chat_template(messages), {"until": ["\n"], "max_gen_toks": 8}), 0)])  # fmt: skip
    want = oai.chat.completions.create(model=MODEL, messages=messages, max_tokens=8,
                                       temperature=0, stop=["\n"])  # fmt: skip
    assert text == want.choices[0].message.content and text


def test_openai_agents_sdk_runs_a_function_tool(base_url):
    """The OpenAI Agents SDK's agent loop over /v1/responses: the model calls the function
    (forced), the SDK runs it; whole and streamed. The base model would ramble after the
    result, so the run stops at the first tool's output (`stop_on_first_tool`)."""
    from agents import (
        Agent,
        ModelSettings,
        OpenAIResponsesModel,
        Runner,
        function_tool,
        set_tracing_disabled,
    )

    set_tracing_disabled(True)  # no traces sent to OpenAI
    cities: list[str] = []

    @function_tool
    def get_weather(city: str) -> str:
        """The current weather of a city."""
        cities.append(city)
        return f"Sunny in {city}"

    async def main():  # one event loop: the client's connections belong to it
        client = openai.AsyncOpenAI(base_url=base_url, api_key=API_KEY, max_retries=0)
        agent = Agent(
            name="weather", instructions="Answer briefly.", tools=[get_weather],
            model=OpenAIResponsesModel(model=MODEL, openai_client=client),
            tool_use_behavior="stop_on_first_tool",
            model_settings=ModelSettings(tool_choice="required", max_tokens=60, temperature=0),
        )  # fmt: skip
        whole = await Runner.run(agent, "What is the weather in Paris?")
        run = Runner.run_streamed(agent, "What is the weather in Paris?")
        kinds = {event.type async for event in run.stream_events()}
        return whole, run.final_output, kinds

    whole, streamed, kinds = asyncio.run(main())
    assert len(cities) == 2 and cities[0] == cities[1]
    assert whole.final_output == streamed == f"Sunny in {cities[0]}"
    assert [type(i).__name__ for i in whole.new_items] == ["ToolCallItem", "ToolCallOutputItem"]
    assert {"raw_response_event", "run_item_stream_event"} <= kinds
