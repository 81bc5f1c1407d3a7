"""The real openai and fireworks-ai Python clients against the real server and default model."""

from __future__ import annotations

import asyncio

import fireworks
import httpx
import openai
import pytest
from api_helpers import API_KEY, DEPLOYMENT, MODEL, assert_default_length

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def oai(server) -> openai.OpenAI:
    return openai.OpenAI(api_key=API_KEY, base_url=server.url + "/inference/v1", max_retries=0)


@pytest.fixture(scope="module")
def fw(server) -> fireworks.Fireworks:
    # base_url without /inference: the SDK posts to {base_url}/v1/completions
    return fireworks.Fireworks(api_key=API_KEY, base_url=server.url, max_retries=0)


def test_openai_basic(oai, tokenizer):
    r = oai.completions.create(model=MODEL, prompt="Once upon a time")
    assert r.object == "text_completion" and r.model == MODEL and r.id
    assert len(r.choices) == 1 and r.choices[0].index == 0
    # text, unless the model sampled its end of text first (the default temperature is 1)
    assert r.choices[0].text or r.choices[0].finish_reason == "stop"
    assert_default_length(r.choices[0].finish_reason, r.usage.completion_tokens)
    assert r.usage.prompt_tokens == len(tokenizer.encode("Once upon a time"))
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.usage.prompt_tokens_details.cached_tokens >= 0


def test_prompt_tokens_include_bos(oai, tokenizer):
    ids = tokenizer.encode("Hello there")
    assert ids[0] == tokenizer.bos_token_id
    r = oai.completions.create(model=MODEL, prompt="Hello there", max_tokens=1)
    assert r.usage.prompt_tokens == len(ids)
    # a token-id prompt is used verbatim: the same ids give the same count
    r = oai.completions.create(model=MODEL, prompt=ids, max_tokens=1)
    assert r.usage.prompt_tokens == len(ids)
    r = oai.completions.create(model=MODEL, prompt=ids[1:], max_tokens=1)
    assert r.usage.prompt_tokens == len(ids) - 1


def test_fireworks_sdk_both_base_urls(server, fw):
    r = fw.completions.create(model=MODEL, prompt="Say hi", max_tokens=3, temperature=0)
    assert r.choices[0].text and r.usage.completion_tokens == 3
    fw2 = fireworks.Fireworks(api_key=API_KEY, base_url=server.url + "/inference", max_retries=0)
    r2 = fw2.completions.create(model=MODEL, prompt="Say hi", max_tokens=3, temperature=0)
    assert r2.choices[0].text == r.choices[0].text
    log = server.log()
    assert '"message": "POST /v1/completions 200"' in log  # girandole.access JSON lines
    assert '"message": "POST /inference/v1/completions 200"' in log


def test_greedy_is_repeatable_and_seed_reproduces(oai):
    kw = dict(model=MODEL, prompt="The weather today is", max_tokens=6)
    a = oai.completions.create(temperature=0, **kw).choices[0].text
    b = oai.completions.create(temperature=0, **kw).choices[0].text
    assert a == b
    s1 = oai.completions.create(temperature=1.0, seed=1234, **kw).choices[0].text
    s2 = oai.completions.create(temperature=1.0, seed=1234, **kw).choices[0].text
    assert s1 == s2


def test_n_and_several_prompts_are_prompt_major(oai):
    prompts = ["1, 2, 3, 4, 5,", "The capital of France is"]
    r = oai.completions.create(model=MODEL, prompt=prompts, n=2, max_tokens=3, temperature=0)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    texts = [c.text for c in r.choices]
    assert texts[0] == texts[1] and texts[2] == texts[3] and texts[0] != texts[2]
    assert texts[0].strip().startswith("6")
    alone = oai.completions.create(model=MODEL, prompt=prompts[1], max_tokens=3, temperature=0)
    assert alone.choices[0].text == texts[2]
    assert r.usage.completion_tokens == 4 * 3
    # prompt tokens count each prompt once, however many samples it has
    one = oai.completions.create(model=MODEL, prompt=prompts, max_tokens=1, temperature=0)
    assert r.usage.prompt_tokens == one.usage.prompt_tokens


def test_seeded_n_gives_different_choices(oai):
    kw = dict(model=MODEL, prompt="My favourite animal is", max_tokens=8, temperature=1.0)
    r = oai.completions.create(n=4, seed=7, **kw)
    texts = [c.text for c in r.choices]
    assert len(set(texts)) > 1
    again = oai.completions.create(n=4, seed=7, **kw)
    assert [c.text for c in again.choices] == texts


def test_token_id_prompts(oai, tokenizer):
    a = tokenizer.encode("The sky is")
    b = tokenizer.encode("Grass is")
    r = oai.completions.create(model=MODEL, prompt=[a, b], max_tokens=2, temperature=0)
    assert [c.index for c in r.choices] == [0, 1]
    assert r.usage.prompt_tokens == len(a) + len(b)
    s = oai.completions.create(model=MODEL, prompt="The sky is", max_tokens=2, temperature=0)
    assert s.choices[0].text == r.choices[0].text


def test_stop_strings_are_trimmed(oai):
    kw = dict(model=MODEL, prompt="1, 2, 3, 4, 5,", max_tokens=12, temperature=0)
    full = oai.completions.create(**kw).choices[0].text
    assert " 8," in full
    r = oai.completions.create(stop=" 8", **kw)
    assert r.choices[0].text == full[: full.index(" 8")]
    assert r.choices[0].finish_reason == "stop"
    r = oai.completions.create(stop=["zzz", "7,"], **kw)
    assert r.choices[0].text == full[: full.index("7,")]


def test_openai_streaming(oai, tokenizer):
    prompt = "Once upon a time"
    chunks = list(
        oai.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0, stream=True)
    )
    text_chunks = [c for c in chunks if c.choices and c.choices[0].text]
    finish = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finish) == 1 and finish[0].choices[0].text == ""
    assert finish[0].choices[0].finish_reason == "length"
    last = chunks[-1]
    assert last.choices == [] and last.usage.completion_tokens == 8
    assert last.usage.prompt_tokens == len(tokenizer.encode(prompt))
    streamed = "".join(c.choices[0].text for c in text_chunks)
    whole = oai.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0)
    assert streamed == whole.choices[0].text
    assert len({c.id for c in chunks}) == 1


def test_openai_stream_options_no_usage(oai):
    chunks = list(
        oai.completions.create(
            model=MODEL, prompt="Hi", max_tokens=2, temperature=0, stream=True,
            stream_options={"include_usage": False},
        )
    )  # fmt: skip
    assert all(c.usage is None for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "length"


def test_fireworks_streaming(fw):
    stream = fw.completions.create(
        model=MODEL, prompt="Once upon a time", max_tokens=6, temperature=0, stream=True
    )
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text
    assert any(c.choices and c.choices[0].finish_reason == "length" for c in chunks)
    assert chunks[-1].usage.completion_tokens == 6


def test_deployment_style_model_names(oai, fw):
    for model in [DEPLOYMENT, f"{MODEL}#{DEPLOYMENT}", "fireworks/gemma-3-270m", "gemma-3-270m"]:
        r = oai.completions.create(model=model, prompt="Hi", max_tokens=1)
        assert r.model == model  # echoed as requested
    r = fw.completions.create(
        model=MODEL, prompt="Hi", max_tokens=1, extra_headers={"fireworks-deployment": DEPLOYMENT}
    )
    assert r.usage.completion_tokens == 1


def test_sdk_errors_map_to_their_exceptions(server, oai, fw):
    with pytest.raises(openai.BadRequestError) as info:
        oai.completions.create(model=MODEL, prompt="x", temperature=5)
    assert "temperature" in info.value.message
    with pytest.raises(openai.BadRequestError, match="Extra inputs are not permitted"):
        oai.completions.create(model=MODEL, prompt="x", extra_body={"bogus": 1})
    with pytest.raises(openai.NotFoundError, match="Model not found"):
        oai.completions.create(model="accounts/fireworks/models/nope", prompt="x")
    bad = openai.OpenAI(api_key="wrong", base_url=server.url + "/inference/v1", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.completions.create(model=MODEL, prompt="x")
    with pytest.raises(fireworks.BadRequestError, match="not supported"):
        fw.completions.create(model=MODEL, prompt="x", extra_body={"include_routing_matrix": True})
    with pytest.raises(fireworks.NotFoundError):
        fw.completions.create(model="accounts/fireworks/models/nope", prompt="x")


def test_models_list(server, oai):
    for prefix in ("/inference/v1", "/v1"):
        body = httpx.get(server.url + prefix + "/models", headers=server.headers).json()
        assert body["object"] == "list"
        (entry,) = body["data"]
        assert entry["id"] == MODEL and entry["object"] == "model"
        assert entry["owned_by"] == "fireworks" and entry["kind"] == "HF_BASE_MODEL"
        assert isinstance(entry["context_length"], int) and entry["context_length"] > 1000
        assert entry["supports_chat"] in (True, False)
    models = oai.models.list()
    assert [m.id for m in models] == [MODEL]
    assert oai.models.retrieve(MODEL).id == MODEL


def test_prefix_cache_hits_are_reported(oai):
    prompt = "A long shared prefix. " * 8
    oai.completions.create(model=MODEL, prompt=prompt, max_tokens=1)
    r = oai.completions.create(model=MODEL, prompt=prompt + "And then", max_tokens=1)
    cached = r.usage.prompt_tokens_details.cached_tokens
    assert 0 < cached < r.usage.prompt_tokens


# Sampled at the default temperature, a request may stop on an EOS before max_tokens: these
# tests count tokens, not stops
UNTIL_MAX = {"ignore_eos": True}


def test_async_clients_concurrently(server):
    async def run() -> list:
        client = openai.AsyncOpenAI(
            api_key=API_KEY, base_url=server.url + "/inference/v1", max_retries=0
        )
        async with client:
            return await asyncio.gather(
                *[
                    client.completions.create(
                        model=MODEL, prompt=f"Item {i}:", max_tokens=3, extra_body=UNTIL_MAX
                    )
                    for i in range(4)
                ]
            )

    results = asyncio.run(run())
    assert all(r.usage.completion_tokens == 3 for r in results)


def test_async_fireworks_stream_and_request_id(server):
    async def run() -> list:
        client = fireworks.AsyncFireworks(api_key=API_KEY, base_url=server.url, max_retries=0)
        stream = await client.completions.create(
            model=MODEL, prompt="Hello", max_tokens=3, stream=True, extra_body=UNTIL_MAX
        )
        return [chunk async for chunk in stream]

    chunks = asyncio.run(run())
    assert chunks[-1].usage.completion_tokens == 3
    r = httpx.post(
        server.url + "/v1/completions",
        json={"model": MODEL, "prompt": "x", "max_tokens": 1},
        headers={**server.headers, "x-request-id": "trace-123"},
    )
    assert r.headers["x-request-id"] == "trace-123"
    assert r.json()["id"].startswith("cmpl-")
