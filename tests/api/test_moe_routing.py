"""`include_routing_matrix` on a mixture-of-experts model (a tiny random Qwen3-MoE served in fast
mode), through /v1/completions with the openai client: with echo and logprobs, each
`logprobs.content[]` entry's `routing_matrix` decodes (base64, int16 [MoE layers, top-k]) to the
experts transformers' router picks at the position before that token. The dense model's 400 is
tested with the other unsupported fields (test_api_errors, test_api_clients)."""

from __future__ import annotations

import base64
import sys
from pathlib import Path

import numpy as np
import openai
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from api_helpers import api_conftest  # noqa: E402

MODEL = "accounts/testing/models/tiny-moe"
# fast mode's quantized linears move the router's logits a little: positions whose k-th and
# (k+1)-th router logits are closer than this in transformers are not compared
MARGIN = 0.5


@pytest.fixture(scope="module")
def moe_server(tmp_path_factory, tiny_qwen3_moe_dir):
    tmp = tmp_path_factory.mktemp("moe-server")
    conftest = api_conftest()
    srv = conftest.start_server(
        tmp, "--model", str(tiny_qwen3_moe_dir), "--model-id", "tiny-moe",
        "--account", "testing", "--kv-cache-gb", "0.01", api_key=None,
    )  # fmt: skip
    yield srv
    conftest.stop_server(srv)


@pytest.fixture(scope="module")
def client(moe_server):
    return openai.OpenAI(api_key="x", base_url=moe_server.url + "/inference/v1", max_retries=0)


def decode(entry: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(entry), dtype="<i2")


def test_routing_matrix_is_the_routers_top_k(client, tiny_qwen3_moe_dir):
    import transformers as tf

    hf = tf.AutoModelForCausalLM.from_pretrained(tiny_qwen3_moe_dir).float().eval()
    k, layers = hf.config.num_experts_per_tok, hf.config.num_hidden_layers
    out = client.completions.create(
        model=MODEL,
        prompt="The quick brown fox jumps over the lazy dog. 0123",
        max_tokens=6,
        temperature=0,
        echo=True,
        logprobs=True,
        extra_body={"include_routing_matrix": True},
    )
    content = out.choices[0].logprobs.model_dump()["content"]
    ids = [e["token_id"] for e in content]
    assert out.usage.completion_tokens == 6 and len(ids) == out.usage.prompt_tokens + 6
    assert content[0]["routing_matrix"] == ""  # nothing predicts the first token
    got = np.stack([decode(e["routing_matrix"]).reshape(layers, k) for e in content[1:]])
    with torch.no_grad():
        logits = hf(torch.tensor([ids]), output_router_logits=True).router_logits
    compared = 0
    for layer, rl in enumerate(logits):
        top = rl.topk(k + 1, dim=-1)
        clear = (top.values[:, k - 1] - top.values[:, k] > MARGIN)[:-1]  # the last predicts none
        expected = top.indices[:-1, :k].numpy()
        np.testing.assert_array_equal(got[clear.numpy(), layer], expected[clear.numpy()])
        compared += int(clear.sum())
    assert compared >= len(got)  # most positions are compared (2 layers a position)


def test_routing_matrix_needs_content_logprobs(client):
    for extra in ({}, {"logprobs": 2}):
        with pytest.raises(openai.BadRequestError, match="include_routing_matrix") as info:
            client.completions.create(
                model=MODEL, prompt="x", max_tokens=1,
                extra_body={"include_routing_matrix": True, **extra},
            )  # fmt: skip
        assert info.value.body["param"] == "include_routing_matrix"


def test_routing_matrix_without_echo_covers_generated_tokens(client):
    """Without echo: one entry a generated token; again with the prompt's blocks from the prefix
    cache, the same entries (the last prompt position is always computed)."""
    prompt = "Once upon a time there was a small engine that served many requests. " * 3
    runs = []
    for _ in range(2):
        out = client.completions.create(
            model=MODEL, prompt=prompt, max_tokens=4, temperature=0, logprobs=True,
            extra_body={"include_routing_matrix": True},
        )  # fmt: skip
        runs.append([e["routing_matrix"] for e in out.choices[0].logprobs.model_dump()["content"]])
    assert out.usage.prompt_tokens_details.cached_tokens > 0
    assert runs[0] == runs[1]
    assert len(runs[0]) == 4 and all(decode(r).shape == (2 * 2,) for r in runs[0])


def test_streamed_routing_matrix_equals_the_whole_body(client):
    body = dict(
        model=MODEL, prompt="def main():\n    return", max_tokens=5, temperature=0, echo=True,
        logprobs=True, extra_body={"include_routing_matrix": True},
    )  # fmt: skip
    whole = client.completions.create(**body).choices[0].logprobs.model_dump()["content"]
    streamed = []
    for chunk in client.completions.create(**body, stream=True):
        if chunk.choices and chunk.choices[0].logprobs is not None:
            streamed += chunk.choices[0].logprobs.model_dump()["content"]
    assert [e["routing_matrix"] for e in streamed] == [e["routing_matrix"] for e in whole]
