"""Each sampling parameter checked numerically against a direct computation on the logits."""

from __future__ import annotations

import json
import math

import pytest
import torch

from girandole import LLM, SamplingParams
from girandole.sampling.sampler import Sampler, SamplerRow


@pytest.fixture(scope="module")
def llm(tiny_llama_dir):
    return LLM(
        model=str(tiny_llama_dir), mode="reference", device="cpu", block_size=4, kv_cache_gb=0.01
    )


def full_logits(llm: LLM, ids: list[int]) -> torch.Tensor:
    """Logits at every position from one plain forward, no cache: [len(ids), V]."""
    with torch.inference_mode():
        model = llm.engine.model
        return model.compute_logits(model(torch.tensor(ids), torch.arange(len(ids)))).float()


def test_logit_bias_forces_token(llm):
    target = 42
    out = llm.generate(
        "Once upon a time",
        SamplingParams(temperature=1.0, max_tokens=6, logit_bias={target: 100}, ignore_eos=True),
    )[0]
    assert out.token_ids == [target] * 6


def test_min_tokens_suppresses_eos(llm):
    eos = llm.engine.model_config.eos_token_ids[0]
    params = SamplingParams(temperature=0, max_tokens=20, min_tokens=5, logit_bias={eos: 100})
    out = llm.generate("Once upon a time", params)[0]
    assert len(out.token_ids) == 6 and out.token_ids[-1] == eos
    assert out.finish_reason == "stop"


def test_penalties_change_exactly_the_penalised_logits():
    V = 10
    logits = torch.linspace(-2.0, 2.5, V)[None, :].repeat(1, 1)
    prompt, output = [1, 7], [3, 3, 8]
    params = SamplingParams(
        temperature=0, repetition_penalty=1.5, frequency_penalty=0.5, presence_penalty=0.25
    )
    row = SamplerRow(params, None, prompt + output, len(prompt))
    got = logits.clone()
    Sampler._apply_bias_and_penalties(got, [row])
    want = logits.clone()[0]
    for t in set(prompt + output):
        want[t] = want[t] / 1.5 if want[t] > 0 else want[t] * 1.5
    for t in set(output):
        want[t] -= 0.5 * output.count(t) + 0.25
    assert torch.allclose(got[0], want)
    untouched = [t for t in range(V) if t not in prompt + output]
    assert torch.equal(got[0, untouched], logits[0, untouched])


def test_sparse_penalties_equal_the_dense_formula_bit_for_bit():
    """Penalties touch only the tokens a row has seen (a pass over the whole vocabulary per
    row cost most of a decode step); the result is the dense formula's, to the bit."""
    import random

    rng = random.Random(2)
    for _ in range(100):
        V, n = rng.choice([10, 300]), rng.randint(1, 4)
        rows = []
        for _ in range(n):
            params = SamplingParams(
                repetition_penalty=rng.choice([1.0, 1.3, 0.8]),
                frequency_penalty=rng.choice([0.0, rng.uniform(-2, 2)]),
                presence_penalty=rng.choice([0.0, rng.uniform(-2, 2)]),
            )
            prompt = rng.randint(0, 20)
            ids = [rng.randrange(V) for _ in range(prompt + rng.randint(0, 20))]
            rows.append(SamplerRow(params, None, ids, prompt))
        logits = torch.randn(n, V) * 3
        got = logits.clone()
        Sampler._apply_bias_and_penalties(got, rows)
        for i, r in enumerate(rows):  # the dense formula, row by row
            counts = torch.zeros(V).index_add_(
                0, torch.tensor(r.token_ids[r.num_prompt_tokens :], dtype=torch.long),
                torch.ones(len(r.token_ids) - r.num_prompt_tokens))  # fmt: skip
            seen = counts > 0
            seen[torch.tensor(r.token_ids[: r.num_prompt_tokens], dtype=torch.long)] = True
            p, x = r.params, logits[i]
            rep = torch.tensor(p.repetition_penalty)
            x = torch.where(seen, torch.where(x > 0, x / rep, x * rep), x)
            x = x - (torch.tensor(p.frequency_penalty) * counts
                     + torch.tensor(p.presence_penalty) * (counts > 0).float())  # fmt: skip
            if p.uses_penalties:
                assert torch.equal(got[i], x), (r, got[i] - x)
            else:
                assert torch.equal(got[i], logits[i])


def test_typical_p_keeps_what_a_full_sort_keeps():
    """Typical-p reads candidates by distance from the entropy, more while their mass falls
    short (an argsort of the vocabulary per row cost 25 ms a row); the kept tokens are the
    full sort's, for peaked, flat and already-filtered rows."""
    g = torch.Generator().manual_seed(0)
    for V in (50, 3000, 262144):
        for kind in ("peaked", "flat", "filtered"):
            for mass in (0.2, 0.9, 0.99):
                x = torch.randn(V, generator=g) * 3
                if kind == "peaked":
                    x[torch.randint(0, V, (5,), generator=g)] += 20
                p = torch.softmax(x, 0)
                if kind == "filtered":
                    p[p < p.topk(40).values[-1]] = 0
                q = p / p.sum()  # the plain reading: sort everything by the distance
                logq = torch.log(q.clamp_min(1e-30))
                order = (-logq + (q * logq).sum()).abs().argsort()
                last = int(torch.searchsorted(q[order].cumsum(0), torch.tensor(mass)))
                want = torch.zeros(V, dtype=torch.bool)
                want[order[: last + 1]] = True
                got = Sampler._typical(p, mass)
                assert torch.equal(got > 0, want & (p > 0)), (V, kind, mass)


def test_logit_bias_tensors_are_made_once_per_request():
    """A request's logit_bias becomes tensors at its first step and is kept in its sampler
    state (rebuilt from the dict every step, 200,000 entries cost 100 ms a step); ids past the
    vocabulary are left out."""
    V = 10
    row = SamplerRow(SamplingParams(logit_bias={2: 1.5, 7: -3.0, 12: 5.0}), None, [1], 1)
    for step in range(2):
        logits = torch.zeros(1, V)
        Sampler._apply_bias_and_penalties(logits, [row])
        want = torch.zeros(V)
        want[2], want[7] = 1.5, -3.0
        assert torch.equal(logits[0], want)
        if step == 0:
            made = row.state["logit_bias"]
    assert row.state["logit_bias"] is made


def test_choices_of_one_request_share_their_logit_bias_tensors():
    """The n choices of a request hold copies of one SamplingParams, so one logit_bias dict: it
    becomes tensors once for all of them (a vocabulary-wide bias took ~0.1 s of the engine
    thread per choice). A different dict, even an equal one, is converted on its own."""
    import copy

    from girandole.sampling.sampler import logit_bias_of

    params = SamplingParams(logit_bias={2: 1.5, 7: -3.0, 12: 5.0})
    rows = [SamplerRow(copy.copy(params), None, [1], 1) for _ in range(3)]
    made = [logit_bias_of(row, 10) for row in rows]
    assert all(m[0] is made[0][0] and m[1] is made[0][1] for m in made)
    assert made[0][0].tolist() == [2, 7] and made[0][1].tolist() == [1.5, -3.0]
    other = logit_bias_of(SamplerRow(SamplingParams(logit_bias={2: 1.5, 7: -3.0, 12: 5.0})), 10)
    assert other[0] is not made[0][0] and other[0].tolist() == [2, 7]
    wider = logit_bias_of(SamplerRow(copy.copy(params)), 16)  # another vocabulary: its own
    assert wider[0].tolist() == [2, 7, 12]


def test_sampling_masks_are_arrays_of_the_allowed_ids():
    """A row's sampling mask is an array of the ids its distribution allowed, ascending (a
    Python list of up to the whole vocabulary cost ~9 ms a row on the engine thread), and the
    response's fields read from it as from a list."""
    from girandole.api.http.finite_json import compact
    from girandole.api.serving.logprobs import mask_fields

    logits = torch.tensor([[0.0, 3.0, 1.0, 2.5, -1.0], [0.0, 3.0, 1.0, 2.5, -1.0]])
    rows = [SamplerRow(SamplingParams(temperature=1.0, top_k=3, sampling_mask="count", seed=1)),
            SamplerRow(SamplingParams(temperature=0.0, sampling_mask="count"))]  # fmt: skip
    sampled, greedy = Sampler(seed=0)(logits, rows)
    assert sampled.sampling_mask.tolist() == [1, 2, 3] and greedy.sampling_mask.tolist() == [1]
    assert mask_fields("count", sampled.sampling_mask) == {"sampling_mask_count": 3}
    listed = mask_fields("non_zero_list", sampled.sampling_mask)
    assert listed["sampling_mask_count"] == 3 and listed["sampling_mask"].tolist() == [1, 2, 3]
    # kept as the array until the response is written (as a list: a whole vocabulary of
    # Python ints is 9.4 MB a token), which JSON writes as a list of ints
    assert json.loads(compact(listed))["sampling_mask"] == [1, 2, 3]
    buffer = mask_fields("non_zero_buffer", sampled.sampling_mask)
    assert buffer["sampling_mask"] == "Dg=="  # bits 1, 2, 3 of one byte
    assert mask_fields("non_zero_buffer", sampled.sampling_mask[:0])["sampling_mask"] == ""


def test_greedy_logprobs_match_reference_forward(llm):
    prompt = llm.tokenizer.encode("The quick brown fox")
    out = llm.generate(
        [prompt], SamplingParams(temperature=0, max_tokens=5, logprobs=3, ignore_eos=True)
    )[0]
    ids = prompt + out.token_ids
    ref = torch.log_softmax(full_logits(llm, ids), dim=-1)
    for i, (tok, res) in enumerate(zip(out.token_ids, out.logprobs)):
        row = ref[len(prompt) - 1 + i]
        assert res.token_id == tok
        assert res.logprob == pytest.approx(float(row[tok]), abs=1e-4)
        top_ids = [t for t, _ in res.top_logprobs]
        assert top_ids == row.topk(3).indices.tolist()


def test_echo_prompt_logprobs_equal_one_reference_forward(llm):
    prompt = llm.tokenizer.encode("It kept its keys and values in pages, shared prefixes")
    # Warm the prefix cache with the same prompt: scored positions must still be computed.
    llm.generate([prompt], SamplingParams(temperature=0, max_tokens=1))
    out = llm.generate([prompt], SamplingParams(max_tokens=0, prompt_logprobs=1))[0]
    assert out.token_ids == [] and out.finish_reason == "length"
    ref = torch.log_softmax(full_logits(llm, prompt), dim=-1)
    want = [float(ref[i, prompt[i + 1]]) for i in range(len(prompt) - 1)]
    got = [r.logprob for r in out.prompt_logprobs[1:]]
    assert out.prompt_logprobs[0] is None
    assert got == pytest.approx(want, abs=1e-4)
    assert sum(got) == pytest.approx(sum(want), abs=1e-3)


def test_echo_logprobs_with_chunked_prefill(tiny_llama_dir):
    llm = LLM(
        model=str(tiny_llama_dir),
        mode="reference",
        device="cpu",
        block_size=4,
        kv_cache_gb=0.01,
        max_num_batched_tokens=8,
        max_num_seqs=2,
    )
    prompt = llm.tokenizer.encode("It kept its keys and values in pages, shared prefixes")
    out = llm.generate([prompt], SamplingParams(max_tokens=0, prompt_logprobs=0))[0]
    ref = torch.log_softmax(full_logits(llm, prompt), dim=-1)
    want = [float(ref[i, prompt[i + 1]]) for i in range(len(prompt) - 1)]
    assert [r.logprob for r in out.prompt_logprobs[1:]] == pytest.approx(want, abs=1e-4)


def test_top_p_and_top_k_keep_the_right_sets():
    probs = torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]])
    logits = probs.log()
    sampler = Sampler(seed=0)
    p = sampler._probs(logits.clone(), [SamplerRow(SamplingParams(top_p=0.8))])
    assert (p[0] > 0).tolist() == [True, True, True, False, False]
    p = sampler._probs(logits.clone(), [SamplerRow(SamplingParams(top_k=2))])
    assert (p[0] > 0).tolist() == [True, True, False, False, False]
    # 0.29, not 0.3: 0.15 would sit exactly on the threshold, where rounding decides
    p = sampler._probs(logits.clone(), [SamplerRow(SamplingParams(min_p=0.29))])
    assert (p[0] > 0).tolist() == [True, True, True, False, False]


def test_typical_p_keeps_tokens_nearest_the_entropy():
    probs = torch.tensor([0.4, 0.3, 0.2, 0.1])
    entropy = -(probs * probs.log()).sum()
    order = ((-probs.log()) - entropy).abs().argsort().tolist()
    kept = Sampler._typical(probs.clone(), 0.5)
    cum, want = 0.0, set()
    for t in order:
        want.add(t)
        cum += float(probs[t])
        if cum >= 0.5:
            break
    assert {i for i in range(4) if kept[i] > 0} == want


def test_mirostat_updates_mu_and_truncates(llm):
    row = SamplerRow(SamplingParams(temperature=1.0, mirostat_target=1.0, mirostat_lr=0.5))
    logits = torch.tensor([[4.0, 3.0, 0.0, -1.0, -3.0]])
    sampler = Sampler(seed=1)
    p = sampler._probs(logits.clone(), [row])
    q = torch.softmax(logits[0], -1)
    allowed = (-torch.log2(q) <= 2.0).tolist()
    assert ((p[0] > 0).tolist()) == [a or i == 0 for i, a in enumerate(allowed)]
    result = sampler(logits.clone(), [row])[0]
    assert row.state["mirostat_mu"] != 2.0 and math.isfinite(row.state["mirostat_mu"])
    assert 0 <= result.token_id < 5


def test_sampling_logprob_reflects_temperature(llm):
    out = llm.generate(
        "Once", SamplingParams(temperature=0.5, top_k=3, max_tokens=3, seed=3, logprobs=0)
    )[0]
    for res in out.logprobs:
        assert res.sampling_logprob >= res.logprob - 1e-6  # sharper and truncated
        assert res.top_logprobs == []


def test_determinism_in_a_mixed_busy_batch(llm):
    target = SamplingParams(
        temperature=0.9,
        top_p=0.95,
        repetition_penalty=1.2,
        max_tokens=12,
        seed=99,
        logprobs=2,
        ignore_eos=True,
    )
    alone = llm.generate("The quick brown fox", target)[0]
    others = []
    for i in range(30):
        others.append(
            SamplingParams(
                temperature=0.3 + 0.05 * i,
                top_k=i % 7,
                presence_penalty=0.1 * (i % 3),
                max_tokens=4 + i % 9,
                seed=None if i % 2 else i,
                ignore_eos=True,
            )
        )
    prompts = ["Once upon a time"] * 15 + ["def main():"] * 15 + ["The quick brown fox"]
    outs = llm.generate(prompts, others + [target])
    assert outs[-1].token_ids == alone.token_ids
    assert [r.logprob for r in outs[-1].logprobs] == pytest.approx(
        [r.logprob for r in alone.logprobs], abs=1e-5
    )


def test_tiny_temperatures_sample_greedily(llm):
    """Temperatures the API accepts down to float's smallest (where logits / t overflow) give
    the greedy tokens, with finite logprobs."""
    prompt = llm.tokenizer.encode("The quick brown fox")
    greedy = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=6, logprobs=1))[0]
    for t in (1e-45, 1e-30, 1e-6):
        params = SamplingParams(temperature=t, max_tokens=6, logprobs=1, seed=3)
        out = llm.generate([prompt], params)[0]
        assert out.token_ids == greedy.token_ids
        assert all(math.isfinite(lp.logprob) for lp in out.logprobs)


def test_greedy_sampling_logprob_with_and_without_processors():
    """A greedy row whose logits nothing changed reports its raw logprob as its sampling
    logprob; beside a row with a logit bias (the batch computes both), each still gets its own;
    top logprobs of mixed widths come from one batched top-n."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 50, generator=g)
    raw = torch.log_softmax(logits, dim=-1)
    plain = SamplerRow(SamplingParams(temperature=0, logprobs=3))
    biased = SamplerRow(SamplingParams(temperature=0, logprobs=1, logit_bias={7: 5.0}))
    wide = SamplerRow(SamplingParams(temperature=0, logprobs=5))
    for rows in ([plain, wide, plain], [plain, biased, wide]):
        results = Sampler(seed=0)(logits.clone(), rows)
        for i, (res, row) in enumerate(zip(results, rows)):
            assert res.logprob == pytest.approx(float(raw[i, res.token_id]), abs=1e-6)
            n = row.params.logprobs
            values, ids = raw[i].topk(n)
            assert res.top_logprobs == list(zip(ids.tolist(), values.tolist()))
            if row is biased:
                biased_logits = logits[i].clone()
                biased_logits[7] += 5.0
                want = torch.log_softmax(biased_logits, dim=-1)[res.token_id]
                assert res.sampling_logprob == pytest.approx(float(want), abs=1e-6)
                assert res.sampling_logprob != pytest.approx(res.logprob, abs=1e-3)
            else:
                assert res.sampling_logprob == pytest.approx(res.logprob, abs=1e-6)


def test_one_rows_logprobs_and_filters_do_not_pass_over_the_others():
    """logprobs, top_k, top_p and min_p run over the rows that ask for them: one such row among
    16 made a [16, V] log-softmax and filter passes that every row waited for (16 rows of 262k:
    3.3 -> 11 ms a step). The ops are recorded as dispatched; the asking row's numbers are the
    plain formulas'."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Shapes(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.rows: dict[str, int] = {}

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            x = args[0]
            if name in ("_log_softmax", "lt", "topk") and x.ndim == 2 and x.shape[1] == V:
                self.rows[name] = max(self.rows.get(name, 0), x.shape[0])
            return func(*args, **(kwargs or {}))

    B, V = 16, 4096
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, V, generator=g) * 3
    plain = [SamplerRow(SamplingParams(temperature=t)) for t in [0.0] * 8 + [1.0] * 7]
    asking = SamplingParams(temperature=1.0, logprobs=5, top_k=40, top_p=0.9, min_p=0.05)
    rows = [*plain, SamplerRow(asking, torch.Generator().manual_seed(3))]
    with Shapes() as seen:
        results = Sampler(seed=0)(x.clone(), rows)
    assert seen.rows and max(seen.rows.values()) == 1, seen.rows

    lp = torch.log_softmax(x[-1], dim=-1)
    got = results[-1]
    assert got.logprob == lp[got.token_id].item()
    values, ids = lp.topk(5)
    assert got.top_logprobs == list(zip(ids.tolist(), values.tolist()))
    p = torch.softmax(x[-1], dim=-1)  # top-k 40, then the 0.9 nucleus, then min-p 0.05
    kept = p.topk(40).values
    kept = kept[: int(torch.searchsorted(kept.cumsum(0), 0.9 * p.sum())) + 1]
    assert p[got.token_id] >= max(kept[-1], 0.05 * kept[0])
    for r in results[:-1]:
        assert r.logprob is None and r.top_logprobs is None
