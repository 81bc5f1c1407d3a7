"""The engine against a plain full-recompute greedy loop on the same model: paging, chunked
prefill, preemption, prefix caching and seeded sampling must not change what is generated."""

from __future__ import annotations

import pytest
import torch

from girandole import LLM, SamplingParams
from girandole.engine.engine import EngineConfig, LLMEngine

PROMPTS = [
    "Once upon a time",
    "The quick brown fox jumps over the lazy dog. The quick brown fox",
    "def main():\n    return",
    "It kept its keys and values in pages, shared prefixes between prompts, and never dropped",
    "0123456789 0123",
]


def naive_greedy(model, prompt_ids: list[int], n: int) -> list[int]:
    """Greedy decoding by recomputing the whole sequence every token, with no KV cache."""
    ids = list(prompt_ids)
    with torch.inference_mode():
        for _ in range(n):
            t = torch.tensor(ids)
            hidden = model(t, torch.arange(len(ids)))
            logits = model.compute_logits(hidden[-1:])
            ids.append(int(logits.argmax(-1)))
    return ids[len(prompt_ids) :]


def make_llm(path, **kw) -> LLM:
    kw.setdefault("mode", "reference")
    kw.setdefault("device", "cpu")
    return LLM(model=str(path), **kw)


@pytest.fixture(scope="module")
def llm(tiny_llama_dir):
    return make_llm(tiny_llama_dir, block_size=4, kv_cache_gb=0.01)


def expected(llm: LLM, n: int) -> list[list[int]]:
    return [naive_greedy(llm.engine.model, llm.tokenizer.encode(p), n) for p in PROMPTS]


def test_batched_greedy_matches_full_recompute(llm):
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    outs = llm.generate(PROMPTS, params)
    assert [o.token_ids for o in outs] == expected(llm, 12)
    assert all(o.finish_reason == "length" for o in outs)


def test_chunked_prefill_and_tiny_budget(tiny_llama_dir):
    llm = make_llm(
        tiny_llama_dir, block_size=4, kv_cache_gb=0.01, max_num_batched_tokens=8, max_num_seqs=3
    )
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    outs = llm.generate(PROMPTS, params)
    assert [o.token_ids for o in outs] == expected(llm, 10)


def test_preemption_when_blocks_run_out(tiny_llama_dir):
    # Room for about 80 tokens: five prompts growing by 20 tokens each cannot all fit.
    probe = make_llm(tiny_llama_dir, block_size=4, kv_cache_gb=0.01)
    per_token = probe.engine.runner.num_blocks * 4 / (0.01 * (1 << 30))
    llm = make_llm(tiny_llama_dir, block_size=4, kv_cache_gb=80 / per_token / (1 << 30))
    assert llm.engine.kv_cache.num_blocks <= 20
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    outs = llm.generate(PROMPTS, params)
    assert llm.engine.scheduler.num_preemptions > 0
    assert [o.token_ids for o in outs] == expected(llm, 20)
    assert llm.engine.kv_cache.num_used_blocks == 0


def test_prefix_cache_reuses_blocks(llm):
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    prompt = PROMPTS[3]
    first = llm.generate(prompt, params)[0]
    second = llm.generate(prompt, params)[0]
    n_prompt = len(llm.tokenizer.encode(prompt))
    assert second.num_cached_tokens > 0
    assert second.num_cached_tokens == (n_prompt - 1) // 4 * 4
    assert second.token_ids == first.token_ids
    # A different cache salt never shares.
    rid = "salted"
    llm.engine.add_request(rid, llm.tokenizer.encode(prompt), params, cache_salt="other")
    outs = []
    while llm.engine.has_unfinished_requests():
        outs += [o for o in llm.engine.step() if o.request_id == rid]
    assert outs[-1].num_cached_tokens == 0


def test_seeded_sampling_is_batch_independent(llm):
    seeded = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=16, seed=1234, ignore_eos=True)
    alone = llm.generate(PROMPTS[0], seeded)[0].token_ids
    others = [
        SamplingParams(temperature=0.7, top_k=5, max_tokens=20, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=8),
        SamplingParams(temperature=1.3, min_p=0.1, max_tokens=12, seed=7),
    ]
    outs = llm.generate(PROMPTS[:4], [seeded] + others)
    assert outs[0].token_ids == alone
    again = llm.generate([PROMPTS[1], PROMPTS[0]], [others[0], seeded])
    assert again[1].token_ids == alone


def test_logprobs_are_batch_independent(llm):
    """A request's first token's logprobs (the chosen token's and the top alternatives') are
    the same alone and with 1, 2, 15 and 19 other rows sampling in its step: the float LM
    head's rows must not round differently with how many rows share its call. (Reference
    mode's decode steps are not batch-invariant yet: its float linears and attention round a
    row by how many share the call; the first token comes from one prefill chunk either way.)"""
    greedy = SamplingParams(temperature=0, max_tokens=1, logprobs=5, ignore_eos=True)
    seeded = SamplingParams(temperature=1.0, seed=5, max_tokens=1, logprobs=5, ignore_eos=True)
    other = SamplingParams(temperature=0.8, max_tokens=1, ignore_eos=True)

    def generate(prompts, params):
        # every prompt computed whole, in one chunk, as the first time (no prefix-cache hits)
        llm.engine.kv_cache.reset_prefix_cache()
        outs = llm.generate(prompts, params)
        return [[(lp.token_id, lp.logprob, lp.sampling_logprob, lp.top_logprobs)
                 for lp in o.logprobs] for o in outs[:2]]  # fmt: skip

    alone = generate([PROMPTS[2]], [greedy]) + generate([PROMPTS[4]], [seeded])
    for n in (1, 2, 15, 19):
        others = [PROMPTS[(0, 1, 3)[i % 3]] for i in range(n)]
        assert generate([PROMPTS[2], PROMPTS[4], *others], [greedy, seeded] + [other] * n) == alone


def test_top_k_one_is_greedy(llm):
    greedy = llm.generate(PROMPTS[1], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    topk1 = llm.generate(
        PROMPTS[1], SamplingParams(temperature=1.5, top_k=1, max_tokens=8, ignore_eos=True)
    )
    assert greedy[0].token_ids == topk1[0].token_ids


@pytest.mark.parametrize(
    "prompt, params, message",
    [
        ([], SamplingParams(), "empty"),
        ([10**9], SamplingParams(), "out of range"),
        ([1] * 5000, SamplingParams(), "too long"),
        # a bias on no token was dropped silently
        ([1], SamplingParams(logit_bias={-3: 5.0}), "logit_bias token id -3 is out of range"),
        ([1], SamplingParams(logit_bias={10**6: 5.0}), "logit_bias token id 1000000 is out"),
    ],
)
def test_bad_requests_are_rejected(llm, prompt, params, message):
    with pytest.raises(ValueError, match=message):
        llm.engine.add_request("bad", prompt, params)
    # The engine keeps working afterwards.
    assert llm.generate("Once", SamplingParams(temperature=0, max_tokens=2))[0].token_ids


@pytest.mark.parametrize("method", ["generate", "embed"])
def test_rejected_prompt_leaves_no_request_behind(llm, method):
    """A later prompt rejected by add_request raises, and the prompts queued before it do not
    stay in the engine (running on the next call's steps, holding blocks)."""
    with pytest.raises(ValueError, match="out of range"):
        getattr(llm, method)(["Once upon a time", [10**9]])
    assert not llm.engine.has_unfinished_requests()
    assert llm.engine.kv_cache.num_used_blocks == 0
    out = llm.generate("Once", SamplingParams(temperature=0, max_tokens=2))
    assert len(out) == 1 and len(out[0].token_ids) == 2


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(max_tokens=-1), "max_tokens"),
        (dict(temperature=-0.5), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        # wrong types: a float count was rounded up or failed the request inside its step
        (dict(max_tokens=2.5), "max_tokens"),
        (dict(max_tokens=None), "max_tokens"),
        (dict(top_k=1.5), "top_k"),
        (dict(min_tokens="3"), "min_tokens"),
        (dict(seed="7"), "seed"),
        (dict(logprobs=1.5), "logprobs"),
        (dict(stop=5), "stop"),
        (dict(stop_token_ids=["a"]), "stop_token_ids"),
        (dict(stop_token_ids=[5, -1]), "stop_token_ids"),
        (dict(min_tokens=9, max_tokens=8), "min_tokens"),  # as vLLM: more than it may make
        (dict(speculation="some text"), "speculation"),
        (dict(speculation=[1, 2.0]), "speculation"),
        (dict(speculation=7), "speculation"),
        (dict(sampling_mask="all"), "sampling_mask"),
        (dict(grammar="json"), "grammar"),
    ],
)
def test_bad_sampling_params(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_unknown_model_path():
    with pytest.raises(FileNotFoundError, match="does not exist"):
        LLMEngine(EngineConfig(model="/nonexistent/model.gguf"))
