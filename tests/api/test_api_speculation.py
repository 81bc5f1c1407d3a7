"""Speculative decoding through the API with real clients: `prediction` and `speculation` on the
default model never change a greedy answer and are reported in perf_metrics; servers started
with --ngram-speculation-length or --draft-model answer as a plain engine does; bad values are
400s naming the field."""

from __future__ import annotations

import httpx
import openai
import pytest
from api_helpers import API_KEY, MODEL, api_conftest, post, sse_events

from girandole import LLM, SamplingParams

PASSAGE = (
    "The lighthouse keeper climbed the spiral stairs every evening at dusk. He wound the clock, "
    "trimmed the wick and polished the great lens until it shone. Ships passing the rocky cape "
    "watched for the beam, and sailors told stories about the keeper who never missed a night."
)
EDITED = PASSAGE.replace("every evening", "each evening").replace("rocky", "stony")


@pytest.fixture(scope="module")
def oai(server) -> openai.OpenAI:
    return openai.OpenAI(api_key=API_KEY, base_url=server.url + "/inference/v1", max_retries=0)


def rewrite_prompt(text: str) -> str:
    return f"Repeat this text exactly.\n\nText: {text}\n\nRepeated text:"


def test_prediction_keeps_greedy_output_completions(oai, tokenizer):
    """A prediction the output mostly repeats, one with edits, one that has nothing to do with
    the output: the same answer each time, and the counts in perf_metrics."""
    cases = [
        (rewrite_prompt(PASSAGE), PASSAGE),
        (rewrite_prompt(PASSAGE), {"type": "content", "content": EDITED}),
        ("Count from one to twenty: one, two, three,", EDITED),
    ]
    plain: dict[str, str] = {}
    for prompt, prediction in cases:
        if prompt not in plain:
            out = oai.completions.create(model=MODEL, prompt=prompt, max_tokens=32, temperature=0)
            plain[prompt] = out.choices[0].text
        spec = oai.completions.create(
            model=MODEL, prompt=prompt, max_tokens=32, temperature=0,
            extra_body={"prediction": prediction, "perf_metrics_in_response": True},
        )  # fmt: skip
        assert spec.choices[0].text == plain[prompt]
        perf = spec.model_extra["perf_metrics"]
        text = prediction if isinstance(prediction, str) else prediction["content"]
        n_pred = len(tokenizer.encode(text, add_bos=False, parse_special=False))
        assert perf["speculation-prompt-tokens"] == n_pred
        assert 0 <= perf["speculation-prompt-matched-tokens"] <= n_pred
        assert 0 <= perf.get("speculation-acceptance", 0) <= 1
        if prediction is PASSAGE:  # the model repeats the passage: most proposals accepted
            assert perf["speculation-prompt-matched-tokens"] >= 16


def test_stop_inside_accepted_prediction_counts_only_kept_tokens(oai):
    """A stop string met on an accepted proposal ends the output there: the tokens accepted
    after it are dropped and are not counted as matched (matched never exceeds the output)."""
    prompt = rewrite_prompt(PASSAGE)
    kw = dict(model=MODEL, prompt=prompt, max_tokens=40, temperature=0)
    plain = oai.completions.create(**kw, stop=["every"])
    assert plain.choices[0].finish_reason == "stop"
    spec = oai.completions.create(
        **kw,
        stop=["every"],
        extra_body={"prediction": " " + PASSAGE, "perf_metrics_in_response": True},
    )
    assert spec.choices[0].text == plain.choices[0].text
    assert spec.usage.completion_tokens == plain.usage.completion_tokens
    perf = spec.model_extra["perf_metrics"]
    # the first token comes from the prefill, every later one from the prediction
    assert 0 < perf["speculation-prompt-matched-tokens"] < spec.usage.completion_tokens
    assert perf["speculation-acceptance"] == 1.0


def test_prediction_on_chat_streaming_and_token_ids(server, oai, tokenizer):
    messages = [{"role": "user", "content": rewrite_prompt(PASSAGE)}]
    plain = oai.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=24, temperature=0
    )
    parts = {"type": "content", "content": [{"type": "text", "text": PASSAGE[:90]},
                                            {"type": "text", "text": PASSAGE[90:]}]}  # fmt: skip
    spec = oai.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=24,
        temperature=0,
        extra_body={"prediction": parts},
    )
    assert spec.choices[0].message.content == plain.choices[0].message.content
    # streamed, with `speculation` as token ids (Fireworks' native field); one longer than the
    # context is cut to it (no output is longer)
    ids = tokenizer.encode(PASSAGE, add_bos=False, parse_special=False)
    context = oai.models.retrieve(MODEL).model_extra["context_length"]
    long_ids = (ids * (context // len(ids) + 2))[: context + 500]
    for speculation, kept in ((ids, len(ids)), (long_ids, context)):
        events = sse_events(server, {"messages": messages, "max_tokens": 24, "temperature": 0,
                                     "speculation": speculation, "perf_metrics_in_response": True},
                            path="/v1/chat/completions")  # fmt: skip
        chunks = [e for e in events if e != "[DONE]"]
        text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks
                       if c["choices"])  # fmt: skip
        assert text == plain.choices[0].message.content
        perf = next(c["perf_metrics"] for c in chunks if c.get("perf_metrics"))
        assert perf["speculation-prompt-tokens"] == kept
    # n > 1 with a seed: each choice as without the prediction
    kw = dict(model=MODEL, prompt=rewrite_prompt(PASSAGE), max_tokens=12, n=2, seed=5)
    sampled = oai.completions.create(**kw, temperature=0.7, extra_body={"prediction": PASSAGE})
    again = oai.completions.create(**kw, temperature=0.7, extra_body={"prediction": PASSAGE})
    assert [c.text for c in sampled.choices] == [c.text for c in again.choices]


@pytest.mark.parametrize(
    "body, param",
    [
        ({"prediction": {"type": "text", "content": "x"}}, "prediction"),
        ({"prediction": {"type": "content"}}, "prediction"),
        ({"prediction": 5}, "prediction"),
        ({"prediction": {"type": "content", "content": [{"type": "image_url"}]}}, "prediction"),
        ({"speculation": [1, -2]}, "speculation"),
        ({"speculation": {"a": 1}}, "speculation"),
        ({"speculation": [10**9]}, "speculation"),
        ({"prediction": "a", "speculation": "a"}, "prediction"),
    ],
)
def test_bad_predictions_are_400(server, body, param):
    r = post(server, {"prompt": "x", "max_tokens": 1, **body})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"].split(".")[0] == param
    assert param in error["message"] or error["type"] == "invalid_request_error"


# -- server-wide proposers on a tiny model ---------------------------------------------------

PROMPTS = [
    "Once upon a time there was a small engine",
    "The quick brown fox jumps over the lazy dog. The quick brown fox",
    "def main():\n    return 42\ndef main():\n",
    "0123456789 0123456789 01234",
]


@pytest.fixture(scope="module")
def tiny_reference(tiny_llama_dir) -> list[str]:
    """Greedy answers of the tiny model from a plain engine in this process (fast mode, as
    `girandole serve` loads it)."""
    llm = LLM(model=str(tiny_llama_dir), kv_cache_gb=0.01)
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    return [o.text for o in llm.generate(PROMPTS, params)]


@pytest.mark.parametrize("flags", [("--ngram-speculation-length", "4"), ("--draft-model",)])
def test_server_wide_speculation(tmp_path, tiny_llama_dir, tiny_reference, flags):
    conftest = api_conftest()
    if flags == ("--draft-model",):
        flags = ("--draft-model", str(tiny_llama_dir), "--draft-token-count", "3")
    server = conftest.start_server(
        tmp_path, "--model", str(tiny_llama_dir), "--model-id", "tiny", "--kv-cache-gb", "0.01",
        *flags, api_key=None,
    )  # fmt: skip
    try:
        client = openai.OpenAI(api_key="x", base_url=server.url + "/v1", max_retries=0)
        accepted = 0.0
        for prompt, expected in zip(PROMPTS, tiny_reference):
            out = client.completions.create(
                model="accounts/fireworks/models/tiny", prompt=prompt, max_tokens=32,
                temperature=0, extra_body={"ignore_eos": True, "perf_metrics_in_response": True},
            )  # fmt: skip
            assert out.choices[0].text == expected
            accepted += out.model_extra["perf_metrics"].get("speculation-acceptance", 0)
        assert accepted > 0
        if "--draft-model" in flags:
            # a deployment may name the operator's --draft-model as its draftModel, no other path
            url = server.url + "/v1/accounts/fireworks/deployments?validateOnly=true"
            body = {"baseModel": "accounts/fireworks/models/tiny"}
            ok = httpx.post(url, json=body | {"draftModel": str(tiny_llama_dir.resolve())})
            assert ok.status_code == 200, ok.text
            bad = httpx.post(url, json=body | {"draftModel": str(tmp_path)})
            assert bad.status_code == 400 and bad.json()["error"]["param"] == "draftModel"
        server.wait_idle()
    finally:
        conftest.stop_server(server)
