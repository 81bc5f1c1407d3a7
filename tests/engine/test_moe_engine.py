"""Mixture-of-experts models (tiny random Qwen3-MoE and Mixtral) through the real engine in
reference mode: greedy generation of several prompts at once, in prefill chunks of 8 tokens,
then again from the prefix cache, equals transformers' greedy `generate`; the routing the engine
reports for every position (router replay) equals transformers' router top-k."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from girandole import LLM, SamplingParams

PROMPTS = [
    "Once upon a time there was a small engine",
    "The quick brown fox jumps over the lazy dog. The quick brown fox",
    "def main():\n    return",
]
MAX_NEW = 8


@pytest.fixture(scope="module", params=["qwen3_moe", "mixtral"])
def moe(request):
    """(LLM, transformers model) of one tiny MoE family (tests/conftest.py's checkpoints)."""
    import transformers as tf

    folder = request.getfixturevalue(f"tiny_{request.param}_dir")
    hf = tf.AutoModelForCausalLM.from_pretrained(folder).float().eval()
    llm = LLM(
        model=str(folder),
        mode="reference",
        device="cpu",
        block_size=4,
        kv_cache_gb=0.01,
        max_num_batched_tokens=8,  # every prompt in several prefill chunks
    )
    return llm, hf


def hf_greedy(hf, ids: list[int]) -> list[int]:
    with torch.no_grad():
        out = hf.generate(
            torch.tensor([ids]), max_new_tokens=MAX_NEW, do_sample=False, eos_token_id=None
        )
    return out[0, len(ids) :].tolist()


def hf_routing(hf, ids: list[int]) -> np.ndarray:
    """transformers' chosen experts [positions, MoE layers, top-k] (its router logits' top-k)."""
    with torch.no_grad():
        logits = hf(torch.tensor([ids]), output_router_logits=True).router_logits
    k = hf.config.num_experts_per_tok
    return torch.stack([rl.softmax(-1).topk(k, dim=-1).indices for rl in logits], dim=1).numpy()


def test_greedy_matches_transformers_with_chunks_and_prefix_cache(moe):
    llm, hf = moe
    params = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True)
    expected = [hf_greedy(hf, llm.tokenizer.encode(p)) for p in PROMPTS]
    first = llm.generate(PROMPTS, params)
    assert [o.token_ids for o in first] == expected
    again = llm.generate(PROMPTS, params)  # the prompts' full blocks now come from the cache
    assert [o.token_ids for o in again] == expected
    assert any(o.num_cached_tokens > 0 for o in again)


def test_routing_matrix_equals_transformers_router(moe):
    llm, hf = moe
    params = SamplingParams(
        temperature=0,
        max_tokens=MAX_NEW,
        ignore_eos=True,
        logprobs=0,
        prompt_logprobs=0,
        routing_matrix=True,
    )
    outs = llm.generate(PROMPTS[:2], params)
    for out in outs:
        full = out.prompt_token_ids + out.token_ids
        routes = hf_routing(hf, full)  # [len(full), layers, k]
        # token j's entry: the experts of position j - 1, which predicted it
        assert out.prompt_logprobs[0] is None
        got = [r.routing for r in out.prompt_logprobs[1:]] + [r.routing for r in out.logprobs]
        assert len(got) == len(full) - 1
        layers = sum(isinstance(m, torch.nn.Module) and "Sparse" in type(m).__name__
                     for m in hf.modules())  # fmt: skip
        assert got[0].shape == (layers, hf.config.num_experts_per_tok)
        assert got[0].dtype == np.int16
        # the same experts in the same order (most probable first) at every position
        np.testing.assert_array_equal(np.stack(got), routes[:-1])


def test_routing_with_a_prediction_equals_routing_without(moe):
    """Proposed tokens (a prediction, verified in the forward) leave the reported routing as it
    is: a rejected proposal's position is recomputed with the right token."""
    llm, _hf = moe
    base = dict(temperature=0, max_tokens=MAX_NEW, ignore_eos=True, logprobs=0, routing_matrix=True)
    plain = llm.generate(PROMPTS[0], SamplingParams(**base))[0]
    guess = plain.token_ids[:3] + [(t + 1) % 200 + 3 for t in plain.token_ids[3:]]
    spec = llm.generate(PROMPTS[0], SamplingParams(**base, speculation=guess))[0]
    assert spec.token_ids == plain.token_ids
    np.testing.assert_array_equal(
        np.stack([r.routing for r in spec.logprobs]), np.stack([r.routing for r in plain.logprobs])
    )
