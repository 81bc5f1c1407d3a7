"""Speculative decoding for requests on LoRA adapters: a verify row (the decode token and the
proposals after it) runs its adapter at every position, so a request on an adapter gets, with
a prediction, n-gram lookup or a draft model (which has no adapter: it proposes the base
model's tokens), the tokens and logprobs it gets without speculation, in a step mixed with
base-model rows and rows of another adapter."""

from __future__ import annotations

import random

import pytest

from girandole.engine.engine import EngineConfig, LLMEngine
from girandole.engine.speculation import PROBE_INTERVAL
from girandole.sampling.params import SamplingParams

PROMPTS = ["Once upon a time", "The quick brown fox jumps", "def main():\n    return"]
ADAPTERS = (None, "a1", "a2")
# (prompt, adapter) per request: every prompt on the base model and on two adapters
REQUESTS = [(p, a) for p in PROMPTS for a in ADAPTERS]
MAX_TOKENS = 24


def make_engine(path, adapters: dict, **kw) -> LLMEngine:
    # no step-time target: the same batches every run
    kw = {"mode": "reference", "device": "cpu", "block_size": 4, "kv_cache_gb": 0.01,
          "target_itl_ms": None, **kw}  # fmt: skip
    engine = LLMEngine(EngineConfig(model=str(path), **kw))
    for name in ("a1", "a2"):
        engine.loras.register(engine.loras.read(name, adapters[name]))
    return engine


def run(engine: LLMEngine, params: list[SamplingParams]) -> list[dict]:
    """REQUESTS together, request i with params[i]; per request its tokens, logprobs, last
    speculation counts and, per step that gave it tokens, (tokens before the step, tokens
    proposed, proposals accepted)."""
    results = []
    for i, ((prompt, adapter), p) in enumerate(zip(REQUESTS, params)):
        engine.add_request(f"r{i}", engine.tokenizer.encode(prompt), p, adapter=adapter)
        results.append({"tokens": [], "logprobs": [], "spec": {}, "steps": []})
    while engine.has_unfinished_requests():
        for out in engine.step():
            r = results[int(out.request_id[1:])]
            before = r["spec"] or {"proposed": 0, "accepted": 0}
            spec = out.speculation or before
            r["steps"].append((len(r["tokens"]), spec["proposed"] - before["proposed"],
                               spec["accepted"] - before["accepted"]))  # fmt: skip
            r["tokens"] += out.new_token_ids
            r["logprobs"] += [x.logprob for x in out.logprobs or []]
            r["spec"] = out.speculation
    assert engine.kv_cache.num_used_blocks == 0  # rejected positions' blocks came back too
    return results


def greedy(speculation: list[int] | None = None) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=2,
                          speculation=speculation)  # fmt: skip


def seeded(speculation: list[int] | None = None) -> SamplingParams:
    return SamplingParams(temperature=0.8, seed=7, max_tokens=MAX_TOKENS, ignore_eos=True,
                          speculation=speculation)  # fmt: skip


def edited(tokens: list[int], seed: int) -> list[int]:
    """A prediction that partly matches: `tokens` with one token changed and one dropped."""
    rng = random.Random(seed)
    out = list(tokens)
    i = rng.randrange(4, len(out) // 2)
    out[i] = (out[i] + 1) % 300
    del out[rng.randrange(len(out) // 2, len(out))]
    return out


def assert_same(outs: list[dict], plain: list[dict]) -> None:
    for req, o, p in zip(REQUESTS, outs, plain):
        assert o["tokens"] == p["tokens"], req
        # a verify row computes several positions in one forward: float rounding may differ
        assert o["logprobs"] == pytest.approx(p["logprobs"], abs=1e-4), req


def on_adapter(outs: list[dict]) -> list[dict]:
    return [o for (_, a), o in zip(REQUESTS, outs) if a is not None]


@pytest.fixture(scope="module")
def plain_engine(tiny_llama_dir, llama_adapters):
    return make_engine(tiny_llama_dir, llama_adapters)


@pytest.fixture(scope="module")
def plain(plain_engine):
    """Without speculation: greedy and seeded outputs of REQUESTS."""
    outs = {
        "greedy": run(plain_engine, [greedy()] * len(REQUESTS)),
        "seeded": run(plain_engine, [seeded()] * len(REQUESTS)),
    }
    # the adapters matter: each prompt's three continuations differ
    for i in range(0, len(REQUESTS), len(ADAPTERS)):
        assert len({tuple(o["tokens"]) for o in outs["greedy"][i : i + len(ADAPTERS)]}) == 3
    return outs


def test_prediction(plain_engine, plain):
    """A prediction that partly matches each output: the adapter rows accept their
    prediction's tokens, computed with the adapter at every verified position."""
    base = plain["greedy"]
    outs = run(plain_engine, [greedy(edited(b["tokens"], i)) for i, b in enumerate(base)])
    assert_same(outs, base)
    assert all(o["spec"]["accepted"] >= MAX_TOKENS // 3 for o in on_adapter(outs))
    # seeded sampling: each emitted token is its position's own draw, as without speculation
    sampled = plain["seeded"]
    outs = run(plain_engine, [seeded(edited(s["tokens"], i)) for i, s in enumerate(sampled)])
    assert [o["tokens"] for o in outs] == [s["tokens"] for s in sampled]
    assert all(o["spec"]["accepted"] > 0 for o in on_adapter(outs))


def test_ngram(tiny_llama_dir, llama_adapters, plain):
    engine = make_engine(tiny_llama_dir, llama_adapters, ngram_speculation_length=3)
    assert_same(run(engine, [greedy()] * len(REQUESTS)), plain["greedy"])
    outs = run(engine, [seeded()] * len(REQUESTS))
    assert [o["tokens"] for o in outs] == [s["tokens"] for s in plain["seeded"]]
    greedy_outs = run(engine, [greedy()] * len(REQUESTS))
    # the random model's greedy outputs loop: the adapter rows' own loops are proposed
    assert sum(o["spec"]["accepted"] for o in on_adapter(greedy_outs)) > 0


def test_draft_model(tiny_llama_dir, llama_adapters, plain):
    """The draft is the base model itself: it proposes base-model tokens for every row. The
    base rows accept them all, the adapter rows only those that their adapter would choose too,
    and their output is the adapter's."""
    engine = make_engine(tiny_llama_dir, llama_adapters, draft_model=str(tiny_llama_dir),
                         draft_token_count=3)  # fmt: skip
    outs = run(engine, [greedy()] * len(REQUESTS))
    assert_same(outs, plain["greedy"])
    for (_, adapter), o in zip(REQUESTS, outs):
        assert o["spec"]["proposed"] > 0
        if adapter is None:
            assert o["spec"]["accepted"] == o["spec"]["proposed"]
    adapter_spec = [o["spec"] for o in on_adapter(outs)]
    assert sum(s["accepted"] for s in adapter_spec) < sum(s["proposed"] for s in adapter_spec)
    sampled = run(engine, [seeded()] * len(REQUESTS))
    assert [o["tokens"] for o in sampled] == [s["tokens"] for s in plain["seeded"]]
    assert engine.speculator.draft.kv_cache.num_used_blocks == 0


def zeros_then_proposal(proposed: list[int]) -> list[tuple[int, int]]:
    """(steps without a proposal, the proposal's length) for each proposal after such steps."""
    out, idle = [], 0
    for p in proposed:
        if p and idle:
            out.append((idle, p))
        idle = 0 if p else idle + 1
    return out


def test_draft_backs_off_where_it_disagrees(tiny_llama_dir, llama_adapters, plain):
    """The base model drafting: for the base rows it proposes their own tokens, for the adapter
    rows tokens their adapter almost never keeps. A base row proposes k tokens every step; an
    adapter row's proposals shrink at each rejection down to none, then a 1-token probe after
    PROBE_INTERVAL steps without any (ProposalWindow): far fewer draft forwards and verified
    positions for nothing. The output is plain decoding's either way."""
    k = 3
    engine = make_engine(tiny_llama_dir, llama_adapters, draft_model=str(tiny_llama_dir),
                         draft_token_count=k)  # fmt: skip
    outs = run(engine, [greedy()] * len(REQUESTS))
    assert_same(outs, plain["greedy"])
    probes = []
    for (_, adapter), o in zip(REQUESTS, outs):
        decode = o["steps"][1:]  # after the prefill's token
        proposed = [p for _, p, _ in decode]
        if adapter is None:
            # k a step, fewer only where max_tokens leaves less room, and all accepted
            assert proposed == [min(k, MAX_TOKENS - done - 1) for done, _, _ in decode]
            assert all(a == p for _, p, a in decode)
            continue
        assert proposed[0] == k, proposed  # every row starts at the full length
        assert 0 in proposed and sum(proposed) <= k * len(decode) / 3, proposed
        probes += zeros_then_proposal(proposed)
    # a closed window opens only for a 1-token probe, after PROBE_INTERVAL steps (one more
    # where the draft's copy first catches up on the tokens it missed)
    assert probes and all(p == 1 and idle >= PROBE_INTERVAL for idle, p in probes), probes
    assert engine.speculator.draft.kv_cache.num_used_blocks == 0
