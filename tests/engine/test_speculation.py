"""Speculative decoding on tiny random checkpoints: proposals from a prediction, n-gram lookup or
a draft model never change what is generated (greedy: token for token; sampling: the
distribution), stop conditions hold mid-acceptance, and rejected positions leave no trace in the
KV cache or the prefix cache."""

from __future__ import annotations

import importlib.util
import random
import sys
from pathlib import Path

import pytest
import torch

from girandole import LLM, SamplingParams
from girandole.engine.speculation import (
    NGRAM_MAX,
    NGRAM_MIN,
    PROBE_INTERVAL,
    RESYNC_MAX,
    RESYNC_MIN,
    PairIndex,
    ProposalWindow,
    bigram_index,
    ngram_proposal,
    resync,
)
from girandole.sampling.grammar import GrammarSpec
from girandole.sampling.sampler import Sampler, SamplerRow

sys.path.insert(0, str(Path(__file__).resolve().parent))
from distribution_check import assert_follows  # noqa: E402


def _root_conftest():
    """tests/conftest.py (its tiny-checkpoint writer and training text) by path."""
    spec = importlib.util.spec_from_file_location(
        "_girandole_root_conftest", Path(__file__).resolve().parents[1] / "conftest.py"
    )
    module = importlib.util.module_from_spec(spec)
    module = sys.modules.setdefault(spec.name, module)
    if not hasattr(module, "write_tiny_llama"):
        spec.loader.exec_module(module)
    return module


TRAIN_TEXT = _root_conftest().TRAIN_TEXT

# Prompts of varied length and content: slices of the tiny tokenizer's training text and
# random bytes, so that greedy outputs range from loops to noise.
_rng = random.Random(0)
PROMPTS = [TRAIN_TEXT[a : a + n] for a, n in ((0, 16), (40, 60), (90, 9), (150, 120), (230, 33))]
PROMPTS += ["".join(_rng.choice("abcdefgh ijk.\n") for _ in range(_rng.randint(3, 50)))
            for _ in range(11)]  # fmt: skip


def make_llm(path, **kw) -> LLM:
    kw.setdefault("mode", "reference")
    kw.setdefault("device", "cpu")
    kw.setdefault("block_size", 4)
    kw.setdefault("kv_cache_gb", 0.01)
    return LLM(model=str(path), **kw)


def run(llm: LLM, prompts: list[str], params: list[SamplingParams]) -> list[dict]:
    """Every request through the engine at once; per request its tokens, text, finish reason,
    last speculation counts and, per step that gave it tokens, (tokens before it, tokens
    proposed, accepted)."""
    engine = llm.engine
    results = []
    for i, (prompt, p) in enumerate(zip(prompts, params)):
        engine.add_request(f"r{i}", llm.tokenizer.encode(prompt), p)
        results.append({"tokens": [], "text": "", "finish": None, "spec": {}, "steps": []})
    while engine.has_unfinished_requests():
        for out in engine.step():
            r = results[int(out.request_id[1:])]
            before, now = r["spec"] or {}, out.speculation or {}
            proposed, accepted = (
                now.get(c, 0) - before.get(c, 0) for c in ("proposed", "accepted")
            )
            r["steps"].append((len(r["tokens"]), proposed, accepted))
            r["tokens"] += out.new_token_ids
            r["text"] += out.new_text
            r["spec"] = out.speculation
            if out.finished:
                r["finish"] = out.finish_reason
    assert engine.kv_cache.num_used_blocks == 0  # every block back, rejected positions too
    return results


def edited(tokens: list[int], seed: int) -> list[int]:
    """`tokens` with a few edits: a token changed, one dropped, one inserted."""
    rng = random.Random(seed)
    out = list(tokens)
    for _ in range(3):
        i = rng.randrange(len(out))
        kind = rng.choice("cdi")
        if kind == "c":
            out[i] = (out[i] + 1 + rng.randrange(50)) % 300
        elif kind == "d":
            del out[i]
        else:
            out.insert(i, rng.randrange(300))
    return out


@pytest.fixture(scope="module")
def llm(tiny_llama_dir):
    return make_llm(tiny_llama_dir)


@pytest.fixture(scope="module")
def baseline(llm):
    greedy = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    return run(llm, PROMPTS, [greedy] * len(PROMPTS))


def test_greedy_same_tokens_with_prediction(llm, baseline):
    params = []
    for i, b in enumerate(baseline):
        # even rows: an edited copy of the output; odd rows: no prediction, beside them
        spec = edited(b["tokens"], i) if i % 2 == 0 else None
        params.append(SamplingParams(temperature=0, max_tokens=40, ignore_eos=True,
                                     speculation=spec))  # fmt: skip
    outs = run(llm, PROMPTS, params)
    assert [o["tokens"] for o in outs] == [b["tokens"] for b in baseline]
    assert [o["text"] for o in outs] == [b["text"] for b in baseline]
    for i, o in enumerate(outs):
        if i % 2:
            assert o["spec"] == {}
        else:
            assert o["spec"]["prediction_tokens"] == len(params[i].speculation)
            assert o["spec"]["prediction_matched"] == o["spec"]["accepted"] > 0
    accepted = sum(o["spec"].get("accepted", 0) for o in outs)
    assert accepted >= 0.5 * sum(len(b["tokens"]) for b in baseline[::2])


def after_rejections(outs: list[dict]) -> list[int]:
    """Per row, the length of each proposal that follows one whose every token was rejected."""
    following = []
    for o in outs:
        proposals = [(p, a) for _, p, a in o["steps"] if p]
        following += [p for (_, a), (p, _) in zip(proposals, proposals[1:]) if a == 0]
    return following


@pytest.mark.parametrize("draft_seed", [0, 1])
def test_greedy_same_tokens_with_ngram_and_draft(tiny_llama_dir, tmp_path, baseline, draft_seed):
    """n-gram lookup, and a draft model: the model itself (accepts everything) or a different
    random model with the same tokenizer (accepts little). A proposal of k = 3 tokens all
    rejected shrinks the row's next proposal to 1 token at most (ProposalWindow)."""
    greedy = [SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)] * len(PROMPTS)
    if draft_seed == 0:
        ngram = run(make_llm(tiny_llama_dir, ngram_speculation_length=3), PROMPTS, greedy)
        assert [o["tokens"] for o in ngram] == [b["tokens"] for b in baseline]
        assert sum(o["spec"]["accepted"] for o in ngram) > 0
        shrunk = after_rejections(ngram)
        assert shrunk and max(shrunk) <= 1
        draft_dir = tiny_llama_dir
    else:
        draft_dir = _root_conftest().write_tiny_llama(tmp_path / "draft", seed=draft_seed)
    draft = make_llm(tiny_llama_dir, draft_model=str(draft_dir), draft_token_count=3)
    outs = run(draft, PROMPTS, greedy)
    assert [o["tokens"] for o in outs] == [b["tokens"] for b in baseline]
    proposed = sum(o["spec"]["proposed"] for o in outs)
    accepted = sum(o["spec"]["accepted"] for o in outs)
    assert proposed > 0
    if draft_seed == 0:
        assert accepted == proposed  # the model drafting for itself
        # k tokens every step from the first proposal (a long prompt's draft copy may first
        # catch up), fewer only where max_tokens leaves less room
        for o in outs:
            decode = o["steps"][1:]  # after the prefill's token
            decode = decode[next(i for i, (_, p, _) in enumerate(decode) if p) :]
            assert [p for _, p, _ in decode] == [min(3, 40 - done - 1) for done, _, _ in decode]
    else:
        shrunk = after_rejections(outs)
        assert shrunk and max(shrunk) <= 1
        assert proposed < 3 * sum(len(o["steps"]) - 1 for o in outs) / 2  # backed off
    assert draft.engine.speculator.draft.kv_cache.num_used_blocks == 0


def _probe_draft(engine) -> tuple[list[dict], list[dict]]:
    """Instrumentation of a real engine: every forward of the draft runner (the engine step it
    ran in, its tokens, the requests in it, and whether it only catches up: no logits wanted),
    and per engine step the target's tokens and, for each running request, whether it decodes,
    its draft copy's lag before the step's proposals (tokens not computed) and where its
    proposal came from."""
    calls: list[dict] = []
    steps: list[dict] = []
    speculator, scheduler = engine.speculator, engine.scheduler
    runner = speculator.draft.runner
    execute, propose, schedule = runner.execute, speculator.propose, scheduler.schedule

    def counted(seqs, num_new_tokens, logit_rows, inputs=None):
        calls.append(
            {
                "step": len(steps) - 1,
                "tokens": sum(num_new_tokens),
                "ids": [s.request_id for s in seqs],
                "catch_up": not any(logit_rows),
            }
        )
        return execute(seqs, num_new_tokens, logit_rows, inputs)

    def lag(seq) -> int:
        d = seq.speculation.draft
        return len(seq) - (0 if d is None else min(d.num_computed_tokens, len(seq)))

    def proposed(running):
        rows: dict = {}
        steps.append({"rows": rows, "target": 0})
        before = {s.request_id: lag(s) for s in running}
        propose(running)
        for s in running:
            decodes = s.num_computed_tokens >= s.num_prompt_tokens
            source = s.speculation.source
            rows[s.request_id] = {"decodes": decodes, "lag": before[s.request_id], "source": source}

    def scheduled(*args):
        batch = schedule(*args)
        steps[-1]["target"] = sum(batch.num_new_tokens)
        return batch

    runner.execute, speculator.propose, scheduler.schedule = counted, proposed, scheduled
    return calls, steps


def _staggered(llm: LLM, prompts: list[list[int]], params: list[SamplingParams]) -> list[dict]:
    """The first request alone until it decodes, then the others arrive (a stream running
    when a long prompt comes); per request its tokens and last speculation counts."""
    engine = llm.engine
    results = [{"tokens": [], "spec": {}} for _ in prompts]
    engine.add_request("r0", prompts[0], params[0])
    arrived = 1
    while engine.has_unfinished_requests() or arrived < len(prompts):
        if arrived < len(prompts) and results[0]["tokens"]:
            for i in range(arrived, len(prompts)):
                engine.add_request(f"r{i}", prompts[i], params[i])
            arrived = len(prompts)
        for out in engine.step():
            r = results[int(out.request_id[1:])]
            r["tokens"] += out.new_token_ids
            r["spec"] = out.speculation
    assert engine.kv_cache.num_used_blocks == 0
    return results


@pytest.mark.parametrize("behind", ["prompt", "prediction"])
def test_draft_catches_up_in_chunks_within_the_step_budget(tiny_llama_dir, behind):
    """A long prompt arriving beside a decoding stream. The draft model computes its copy in
    chunks, within what each step's 64-token budget leaves after the target's own tokens (so
    mostly after the target's prefill), never the whole prompt in one forward; the row decodes
    plainly until the copy is caught up, then proposes. "prediction": a request whose
    prediction never matches asks the draft only once it decodes, to the same effect. Greedy
    tokens are plain decoding's."""
    budget, k = 64, 3
    kw = dict(max_num_batched_tokens=budget, max_num_seqs=4, target_itl_ms=None)
    plain_llm = make_llm(tiny_llama_dir, **kw)
    tok = plain_llm.tokenizer
    prompts = [tok.encode(PROMPTS[0]), tok.encode(TRAIN_TEXT)]
    n_long = len(prompts[1])
    assert n_long > 8 * budget
    greedy = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    plain = _staggered(plain_llm, prompts, [greedy, greedy])
    second = greedy
    if behind == "prediction":
        unused = next(t for t in range(5, 300) if t not in plain[1]["tokens"])
        second = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True,
                                speculation=[unused] * 4)  # fmt: skip
    llm = make_llm(tiny_llama_dir, draft_model=str(tiny_llama_dir), draft_token_count=k, **kw)
    calls, steps = _probe_draft(llm.engine)
    outs = _staggered(llm, prompts, [greedy, second])
    assert [o["tokens"] for o in outs] == [p["tokens"] for p in plain]
    assert llm.engine.speculator.draft.kv_cache.num_used_blocks == 0

    # within the step's budget: no forward of the whole prompt (n_long tokens at once)
    assert max(c["tokens"] for c in calls) <= budget
    caught_up = [0] * len(steps)  # per step, the draft's catch-up tokens
    for c in calls:
        caught_up[c["step"]] += c["tokens"] if c["catch_up"] else 0
    assert all(s["target"] + n <= budget for s, n in zip(steps, caught_up))
    # the copy is computed in chunks over several steps, before the row's first proposal
    decoding = [i for i, s in enumerate(steps) if s["rows"].get("r1", {}).get("decodes")]
    first = next(i for i in decoding if steps[i]["rows"]["r1"]["source"] == "draft")
    chunks = [c for c in calls if "r1" in c["ids"] and c["catch_up"]]
    assert all(c["step"] < first for c in chunks)
    assert len(chunks) >= n_long // budget
    assert sum(c["tokens"] for c in chunks) >= n_long - 1 - k  # (proposals compute the rest)
    # no proposal while the copy lags by more than a verify row's 1 + k tokens
    assert all(steps[i]["rows"]["r1"]["source"] is None for i in decoding if i < first)
    assert all(steps[i]["rows"]["r1"]["lag"] > 1 + k for i in decoding if i < first)
    assert steps[first]["rows"]["r1"]["lag"] <= 1 + k
    assert outs[1]["spec"]["accepted"] == outs[1]["spec"]["proposed"] > 0  # drafting for itself
    assert outs[0]["spec"]["proposed"] > 0  # the stream kept speculating meanwhile
    # a short prompt is drafted in its own prefill step: proposals from its first decode step
    r0 = [s["rows"]["r0"] for s in steps if "r0" in s["rows"]]
    assert next(r for r in r0 if r["decodes"])["source"] == "draft"


def test_draft_copy_that_cannot_fit_is_released(tiny_llama_dir, tmp_path):
    """A draft whose cache (the same bytes, 8x the K/V per token) cannot hold the long prompt:
    its copy is released without computing a chunk, the row decodes plainly, the short row
    still speculates, and every draft block comes back."""
    budget = 64
    kw = dict(max_num_batched_tokens=budget, max_num_seqs=4, target_itl_ms=None)
    plain_llm = make_llm(tiny_llama_dir, **kw)
    tok = plain_llm.tokenizer
    prompts = [tok.encode(PROMPTS[0]), tok.encode(TRAIN_TEXT)]
    greedy = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    plain = _staggered(plain_llm, prompts, [greedy, greedy])
    wide = _root_conftest().write_tiny_llama(
        tmp_path / "wide", num_hidden_layers=8, num_key_value_heads=4
    )
    per_token = 8 * 4 * 16 * 2 * 4  # layers x kv heads x head dim x (K, V) x float32
    gb = 300 * per_token / (1 << 30)  # the draft holds ~300 tokens, the model ~2400
    llm = make_llm(tiny_llama_dir, draft_model=str(wide), kv_cache_gb=gb, **kw)
    calls, _ = _probe_draft(llm.engine)
    outs = _staggered(llm, prompts, [greedy, greedy])
    assert [o["tokens"] for o in outs] == [p["tokens"] for p in plain]
    assert outs[1]["spec"]["proposed"] == 0 and outs[0]["spec"]["proposed"] > 0
    assert max(c["tokens"] for c in calls) <= budget
    assert not any("r1" in c["ids"] for c in calls)  # released before computing anything
    assert llm.engine.speculator.draft.kv_cache.num_used_blocks == 0


def test_penalties_bias_and_min_tokens_see_accepted_tokens(llm):
    """Each verified position is processed with the proposals before it as output: penalties,
    logit_bias and min_tokens give what plain decoding gives."""
    kinds = [
        dict(frequency_penalty=1.5),
        dict(presence_penalty=2.0, repetition_penalty=1.4),
        dict(logit_bias={70: 5.0, 101: -100.0}),
        dict(min_tokens=30, stop_token_ids=[70, 101]),
    ]
    for kw in kinds:
        plain = [SamplingParams(temperature=0, max_tokens=30, **kw)] * 6
        base = run(llm, PROMPTS[:6], plain)
        spec = [
            SamplingParams(temperature=0, max_tokens=30, speculation=b["tokens"] + [70] * 8, **kw)
            for b in base
        ]
        outs = run(llm, PROMPTS[:6], spec)
        assert [o["tokens"] for o in outs] == [b["tokens"] for b in base], kw
        assert [o["finish"] for o in outs] == [b["finish"] for b in base], kw
        assert sum(o["spec"]["accepted"] for o in outs) > 0


def test_stop_conditions_mid_acceptance(llm, baseline):
    """A prediction that runs past a stop token, a stop string or max_tokens: nothing is
    emitted past them."""
    for i, b in enumerate(baseline[:8]):
        tokens = b["tokens"]
        cut = 7 + i
        prediction = tokens + tokens  # proposes well past every limit
        cases = [
            dict(max_tokens=cut),
            dict(max_tokens=40, stop_token_ids=[tokens[cut]]),
            dict(max_tokens=40, stop=[llm.tokenizer.decode(tokens[cut : cut + 2])[:3] or "x"]),
        ]
        for kw in cases:
            plain = run(llm, [PROMPTS[i]], [SamplingParams(temperature=0, **kw)])[0]
            spec = run(llm, [PROMPTS[i]], [SamplingParams(temperature=0, speculation=prediction,
                                                          **kw)])[0]  # fmt: skip
            assert spec["tokens"] == plain["tokens"], kw
            assert spec["text"] == plain["text"], kw
            assert spec["finish"] == plain["finish"], kw


def test_preemption_and_prefix_cache_see_only_verified_tokens(tiny_llama_dir, baseline):
    """Room for about 80 tokens: speculating rows get preempted and recomputed; the prefix
    cache's blocks hold only tokens that were generated (never a rejected proposal)."""
    probe = make_llm(tiny_llama_dir)
    per_token = probe.engine.runner.num_blocks * 4 / (0.01 * (1 << 30))
    llm = make_llm(tiny_llama_dir, kv_cache_gb=80 / per_token / (1 << 30))
    # prompts short enough that each request fits alone
    chosen = [i for i, p in enumerate(PROMPTS) if len(llm.tokenizer.encode(p)) <= 30][:6]
    assert len(chosen) == 6
    prompts = [PROMPTS[i] for i in chosen]
    params = [
        SamplingParams(temperature=0, max_tokens=40, ignore_eos=True,
                       speculation=edited(baseline[i]["tokens"], 100 + i))
        for i in chosen
    ]  # fmt: skip
    outs = run(llm, prompts, params)
    assert llm.engine.scheduler.num_preemptions > 0
    assert [o["tokens"] for o in outs] == [baseline[i]["tokens"] for i in chosen]
    # every cached block is a block of some request's real tokens, at its place
    real = set()
    for prompt, o in zip(prompts, outs):
        ids = llm.tokenizer.encode(prompt) + o["tokens"]
        real |= {tuple(ids[j : j + 4]) for j in range(0, len(ids) - 3, 4)}
    cached = [b.token_ids for b in llm.engine.kv_cache.blocks if b.hash is not None]
    assert cached and all(t in real for t in cached)


def test_grammar_rows_do_not_speculate(llm):
    grammar = GrammarSpec("regex", r"[a-z ]{5,20}")
    plain = run(llm, PROMPTS[:2], [SamplingParams(temperature=0, max_tokens=20,
                                                  grammar=grammar)] * 2)  # fmt: skip
    spec = [
        SamplingParams(temperature=0, max_tokens=20, grammar=grammar, speculation=p["tokens"])
        for p in plain
    ]
    outs = run(llm, PROMPTS[:2], spec)
    assert [o["tokens"] for o in outs] == [p["tokens"] for p in plain]
    assert all(o["spec"]["proposed"] == 0 for o in outs)


def test_seeded_sampling_reproducible_and_batch_invariant(llm, baseline):
    seeded = SamplingParams(temperature=0.8, top_p=0.95, max_tokens=30, seed=42, ignore_eos=True,
                            speculation=baseline[1]["tokens"])  # fmt: skip
    alone = run(llm, [PROMPTS[1]], [seeded])[0]
    again = run(llm, [PROMPTS[1]], [seeded])[0]
    assert alone["tokens"] == again["tokens"]
    others = [
        SamplingParams(temperature=0.7, top_k=5, max_tokens=25, ignore_eos=True,
                       speculation=baseline[0]["tokens"]),
        SamplingParams(temperature=0, max_tokens=8),
        SamplingParams(temperature=1.2, max_tokens=20, seed=7, speculation=[70] * 30),
    ]  # fmt: skip
    mixed = run(llm, [PROMPTS[0], PROMPTS[1], PROMPTS[2], PROMPTS[3]],
                [others[0], seeded, others[1], others[2]])  # fmt: skip
    assert mixed[1]["tokens"] == alone["tokens"]
    assert mixed[1]["spec"] == alone["spec"]


def test_seeded_sampling_ignores_how_many_proposals_fit(tiny_llama_dir, baseline):
    """A step's token budget, shared with the rows before it, may cut a row's proposals short
    (so may its free KV blocks, or a full draft cache). A seeded request's tokens must not
    depend on that: each emitted token is its position's own sample, drawn with one uniform as
    without speculation, so they are plain decoding's tokens whatever was proposed."""
    # no step-time target: the same batches every run
    llm = make_llm(tiny_llama_dir, max_num_batched_tokens=40, max_num_seqs=4, target_itl_ms=None)
    kw = dict(temperature=0.15, max_tokens=40, seed=0, ignore_eos=True, logprobs=2)
    plain = run(llm, [PROMPTS[8]], [SamplingParams(**kw)])[0]
    seeded = SamplingParams(speculation=plain["tokens"], **kw)
    alone = run(llm, [PROMPTS[8]], [seeded])[0]
    # two greedy rows admitted first, whose proposals grow as the seeded row's do: when all
    # three propose 16 tokens, the seeded row gets what is left of the step's 40 tokens
    greedy = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True,
                            speculation=baseline[8]["tokens"])  # fmt: skip
    mixed = run(llm, [PROMPTS[8]] * 3, [greedy, greedy, seeded])
    assert mixed[2]["tokens"] == alone["tokens"] == plain["tokens"]
    assert mixed[2]["spec"]["proposed"] < alone["spec"]["proposed"]  # proposals were cut
    assert mixed[0]["tokens"] == mixed[1]["tokens"] == baseline[8]["tokens"]


# -- the distribution of sampled tokens ------------------------------------------------------


@pytest.mark.parametrize("seed", [1, 2026])
@pytest.mark.parametrize(
    "kw",
    [dict(temperature=0.4), dict(temperature=0.5, top_k=20, repetition_penalty=1.3, top_p=0.95)],
)
def test_sampled_tokens_keep_their_distribution(tiny_llama_dir, kw, seed):
    """With the second and third tokens always proposed, each sampled token given the ones
    before it follows the model's distribution (processed as the sampler does without
    speculation): the token after the first (an accept test, or a draw from the residual after
    a rejection) and the one after the first two (the bonus draw after an acceptance).
    Unseeded requests draw from the engine's generator, seeded ones from their own. Without a
    step-time target the batches, and so the draws, repeat from run to run."""
    llm = make_llm(tiny_llama_dir, seed=seed, target_itl_ms=None)
    engine = llm.engine
    # a prompt after which the random model is fairly sure of its next tokens (at these
    # temperatures), so that proposing them is often right and sometimes wrong
    text = PROMPTS[8]
    prompt = llm.tokenizer.encode(text)
    g = run(llm, [text], [SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)])
    g1, g2, g3 = g[0]["tokens"]
    n = 2400
    params = [
        SamplingParams(max_tokens=3, ignore_eos=True, speculation=[g1, g2, g3],
                       seed=seed * n + i if i % 2 else None, **kw)
        for i in range(n)
    ]  # fmt: skip
    outs = run(llm, [text] * n, params)
    assert sum(o["spec"].get("accepted", 0) for o in outs) > n / 10  # proposals were verified

    def exact(context: list[int]) -> dict[int, float]:
        ids = prompt + context
        with torch.inference_mode():
            hidden = engine.model(torch.tensor(ids), torch.arange(len(ids)))
            logits = engine.model.compute_logits(hidden[-1:]).float()
            row = SamplerRow(SamplingParams(**kw), None, ids, len(prompt))
            Sampler._apply_bias_and_penalties(logits, [row])
            probs = Sampler()._probs(logits, [row])[0].double()
        return dict(enumerate((probs / probs.sum()).tolist()))

    # token 2 among the samples whose token 1 was g1; token 3 among those that began g1, g2
    for context in ([g1], [g1, g2]):
        counts: dict[int, int] = {}
        for o in outs:
            if o["tokens"][: len(context)] == context:
                t = o["tokens"][len(context)]
                counts[t] = counts.get(t, 0) + 1
        assert sum(counts.values()) >= 600, (context, counts)
        assert_follows(counts, exact(context), context)


# -- proposers ------------------------------------------------------------------------------


def test_proposal_window_grows_keeps_shrinks_and_probes():
    """One rule for the three sources: doubles when all is accepted (up to cap), stays when at
    least half is, halves otherwise (down to floor); closed (0), a 1-token probe is due after
    PROBE_INTERVAL steps and stays due until one is verified."""
    w = ProposalWindow(4, cap=16)
    for proposed, accepted, size in [(4, 4, 8), (8, 8, 16), (16, 16, 16), (16, 8, 16),
                                     (16, 7, 8), (3, 3, 16), (16, 0, 8), (8, 0, 4), (4, 1, 2),
                                     (2, 0, 1), (1, 0, 1)]:  # fmt: skip
        assert w.size_now() == w.size
        w.update(proposed, accepted)
        assert w.size == size, (proposed, accepted)
    w = ProposalWindow(3, cap=3, floor=0)
    w.update(3, 0)
    w.update(1, 0)
    assert w.size == 0
    assert [w.size_now() for _ in range(PROBE_INTERVAL + 2)] == [0] * PROBE_INTERVAL + [1, 1]
    w.update(1, 0)  # the probe rejected: closed for another interval
    assert [w.size_now() for _ in range(PROBE_INTERVAL + 1)] == [0] * PROBE_INTERVAL + [1]
    w.update(1, 1)  # accepted: open again
    assert w.size_now() == 2
    assert ProposalWindow(0, cap=0).size_now() == 0  # a source turned off never probes


def test_ngram_proposal():
    assert ngram_proposal([1, 2, 3, 4, 5, 1, 2], 3) == [3, 4, 5]
    assert ngram_proposal([1, 2, 3, 1, 2], 5) == [3, 1, 2]  # as much as there is
    assert ngram_proposal([9, 1, 2, 3, 1, 2], 2) == [3, 1]
    assert ngram_proposal([1, 2, 3, 4], 3) == []  # the suffix occurs nowhere else
    # the longest suffix wins: [7, 1, 2] occurred before 8, [1, 2] alone before 5
    assert ngram_proposal([7, 1, 2, 8, 1, 2, 5, 7, 1, 2], 1) == [8]
    # in a repeating stretch, an occurrence with k tokens after it
    assert ngram_proposal([4] * 8, 3) == [4, 4, 4]


def _scan_proposal(tokens: list[int], k: int) -> list[int]:
    """The plain reading of ngram_proposal: every suffix length, every earlier position."""
    size = len(tokens)
    for n in range(min(NGRAM_MAX, size - 1), NGRAM_MIN - 1, -1):
        suffix, partial = tokens[size - n :], None
        for end in range(size - 2, n - 2, -1):
            if tokens[end - n + 1 : end + 1] == suffix:
                if end + k < size:
                    return tokens[end + 1 : end + 1 + k]
                partial = end
        if partial is not None:
            return tokens[partial + 1 : partial + 1 + k]
    return []


def test_ngram_proposal_from_a_growing_index_equals_the_plain_scan():
    """A sequence's PairIndex grows with it (a scan of the whole context at every step cost
    4.4 ms a row at 32k tokens); its proposals are the plain scan's at every length."""
    rng = random.Random(5)
    for vocab in (2, 3, 6, 50):
        tokens, index = [], PairIndex()
        for _ in range(400):
            tokens += [rng.randrange(vocab) for _ in range(rng.randint(1, 3))]
            k = rng.randint(1, 6)
            assert ngram_proposal(tokens, k, index) == _scan_proposal(tokens, k), tokens
        assert len(index.previous) == len(tokens)
        tokens[-1] = (tokens[-1] + 1) % vocab  # a list that changed under it: indexed anew
        assert ngram_proposal(tokens, 3, index) == _scan_proposal(tokens, 3)
        del tokens[-5:]
        assert ngram_proposal(tokens, 3, index) == _scan_proposal(tokens, 3)


def test_resync_finds_where_the_output_continues():
    pred = [10, 11, 12, 13, 14, 15, 16]
    assert resync([], pred, 0) == 0
    assert resync([10, 11, 12], pred, 3) == 3
    assert resync([10], pred, 0) == 1
    assert resync([11], pred, 0) is None  # one token re-syncs only at the start
    assert resync([10, 11, 99, 13, 14], pred, 3) == 5  # an edit: two tokens after it re-sync
    assert resync([10, 11, 99, 13], pred, 3) is None  # one common token is not enough
    assert resync([10, 11, 99], pred, 3) is None
    # the occurrence nearest the cursor
    assert resync([5, 14, 1], [14, 1, 7, 14, 1, 8, 14, 1], 4) == 5


def brute_force_resync(output: list[int], prediction: list[int], cursor: int) -> int | None:
    """`resync` by scanning the whole prediction for each suffix length (what it did before
    it looked suffixes up by their first pair)."""
    if not output:
        return 0
    if len(output) == 1:
        return 1 if prediction[:1] == output else None
    for n in range(min(RESYNC_MAX, len(output)), RESYNC_MIN - 1, -1):
        afters = [s + n for s in range(len(prediction) - n + 1)
                  if prediction[s : s + n] == output[-n:]]  # fmt: skip
        if afters:
            return min(afters, key=lambda a: abs(a - cursor))  # the earliest of ties
    return None


def test_resync_by_index_equals_a_scan_of_the_whole_prediction():
    rng = random.Random(0)
    for _ in range(3000):
        vocab = rng.choice([2, 3, 5, 20])  # small vocabularies: many repeats and ties
        prediction = [rng.randrange(vocab) for _ in range(rng.randrange(0, 40))]
        output = [rng.randrange(vocab) for _ in range(rng.randrange(0, 12))]
        cursor = rng.randrange(0, len(prediction) + 1)
        index = bigram_index(prediction)
        expected = brute_force_resync(output, prediction, cursor)
        assert resync(output, prediction, cursor, index) == expected, (output, prediction, cursor)
