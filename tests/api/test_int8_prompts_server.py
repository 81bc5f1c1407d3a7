"""`girandole serve --int8-prompts` over HTTP, as lm-evaluation-harness reads it: a completion
generated with logprobs, sent back as a token prompt with echo and max_tokens 0, scores its
tokens with the generation's logprobs exactly (on a CPU without AMX prompt rows otherwise run
bf16 where decode rows run int8: close, not equal). The engine's side:
tests/engine/test_int8_prompts.py."""

from __future__ import annotations

import httpx
import pytest
from conftest import start_server, stop_server

from girandole.model.kernels import wq_gemm

pytestmark = pytest.mark.skipif(
    not wq_gemm.vnni_default(),
    reason="one kernel for every row here (AMX, GIRANDOLE_VNNI=0 or no native kernels)",
)

ACCOUNT = "acme"
MODEL = f"accounts/{ACCOUNT}/models/tiny"
KEY = "sk-int8"


def completions(server, body: dict) -> dict:
    r = httpx.post(
        server.url + "/v1/completions", json={"model": MODEL, **body}, headers=server.headers,
        timeout=60,
    )  # fmt: skip
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]


@pytest.mark.parametrize("int8_prompts", [True, False])
def test_echo_scores_a_generation_with_its_own_logprobs(tmp_path, tiny_llama_dir, int8_prompts):
    flags = ["--int8-prompts"] if int8_prompts else []
    server = start_server(
        tmp_path, "--model", str(tiny_llama_dir), "--model-id", "tiny", "--account", ACCOUNT,
        "--kv-cache-gb", "0.05", "--api-key", KEY, *flags, api_key=KEY,
    )  # fmt: skip
    try:
        prompt = list(range(5, 40))
        gen = completions(server, {"prompt": prompt, "max_tokens": 12, "temperature": 0,
                                   "ignore_eos": True, "logprobs": 1, "return_token_ids": True})  # fmt: skip
        tokens = gen["token_ids"]
        scored = completions(server, {"prompt": prompt + tokens, "echo": True, "logprobs": 1,
                                      "max_tokens": 0, "temperature": 0})  # fmt: skip
        echoed = scored["logprobs"]["token_logprobs"][-len(tokens) :]
        generated = gen["logprobs"]["token_logprobs"]
        assert len(generated) == len(tokens) == 12
        if int8_prompts:
            assert echoed == generated
        else:
            assert echoed != generated
            assert echoed == pytest.approx(generated, abs=0.5)
    finally:
        stop_server(server)
