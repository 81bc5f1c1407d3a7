"""GpuSampler (girandole/sampling/gpu_sampler.py), the CUDA path's batched sampler, run on CPU
against Sampler: greedy rows identical, seeded rows identical and free of their batch
neighbours, and the distribution it draws from equal to Sampler's (a chi-square test)."""

from __future__ import annotations

import torch

from girandole.sampling.gpu_sampler import GpuSampler
from girandole.sampling.params import SamplingParams
from girandole.sampling.sampler import Sampler, SamplerRow

V = 500


def _logits(seed: int, rows: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, V, generator=g) * 3


def _rows(params: list[SamplingParams]) -> list[SamplerRow]:
    out = []
    for i, p in enumerate(params):
        gen = torch.Generator().manual_seed(p.seed) if p.seed is not None else None
        prompt = [(i * 31 + j * 7) % V for j in range(12)]
        output = [(i * 13 + j * 3) % V for j in range(5)]
        out.append(SamplerRow(p, gen, prompt + output, len(prompt), eos_token_ids=(1, 2)))
    return out


MIXED = [
    SamplingParams(temperature=0),
    SamplingParams(temperature=0, logprobs=3, logit_bias={7: 5.0, 9: -100.0}),
    SamplingParams(temperature=0, repetition_penalty=1.3, frequency_penalty=0.4, logprobs=0),
    SamplingParams(temperature=0.8, top_k=40, logprobs=2, seed=1),
    SamplingParams(temperature=1.2, top_p=0.7, presence_penalty=0.5, seed=2),
    SamplingParams(temperature=0.6, min_p=0.1, min_tokens=50, max_tokens=64, seed=3),
    SamplingParams(top_k=1, logprobs=1),
    SamplingParams(temperature=1.0, top_k=100, top_p=0.9, min_p=0.02, logprobs=5, seed=4),
    SamplingParams(temperature=0.9, logit_bias={3: 2.5}, repetition_penalty=0.8, seed=5),
]


def _same(a, b):
    assert a.token_id == b.token_id
    for x, y in [(a.logprob, b.logprob), (a.sampling_logprob, b.sampling_logprob)]:
        assert (x is None) == (y is None)
        if x is not None:
            assert abs(x - y) < 1e-5
    assert (a.top_logprobs is None) == (b.top_logprobs is None)
    if a.top_logprobs is not None:
        assert [t for t, _ in a.top_logprobs] == [t for t, _ in b.top_logprobs]
        for (_, x), (_, y) in zip(a.top_logprobs, b.top_logprobs):
            assert abs(x - y) < 1e-5


def test_every_row_equals_sampler_over_many_steps():
    """Greedy rows exactly; seeded and sampled rows too, since both draw the same uniforms
    from the same generators; logprobs and top alternatives within float rounding."""
    for step in range(20):
        logits = _logits(step, len(MIXED))
        want = Sampler(seed=step)(logits.clone(), _rows(MIXED))
        got = GpuSampler(seed=step)(logits.clone(), _rows(MIXED))
        for a, b in zip(got, want):
            _same(a, b)


def test_seeded_row_does_not_depend_on_its_batch_neighbours():
    params = SamplingParams(temperature=1.0, top_p=0.95, top_k=200, seed=77)
    alone_sampler, busy_sampler = GpuSampler(seed=1), GpuSampler(seed=2)
    alone_gen = torch.Generator().manual_seed(77)
    busy_gen = torch.Generator().manual_seed(77)
    for step in range(30):
        logits = _logits(100 + step, 6)
        row = _rows([params])[0]
        row.generator = alone_gen
        alone = alone_sampler(logits[2:3].clone(), [row])[0]
        rows = _rows([SamplingParams(temperature=1.3, seed=step)] * 6)
        rows[2] = _rows([params])[0]
        rows[2].generator = busy_gen
        busy = busy_sampler(logits.clone(), rows)[2]
        assert busy.token_id == alone.token_id


def test_seeded_rows_reproduce():
    params = [SamplingParams(temperature=0.9, top_k=50, seed=s) for s in range(4)]
    first = [GpuSampler()(_logits(5, 4), _rows(params))[i].token_id for i in range(4)]
    second = [GpuSampler()(_logits(5, 4), _rows(params))[i].token_id for i in range(4)]
    assert first == second


def test_drawn_distribution_matches_sampler_probabilities():
    """Chi-square goodness of fit of 20,000 unseeded draws against Sampler's filtered
    distribution for the same row (temperature, top-k, top-p, min-p and a penalty)."""
    params = SamplingParams(temperature=0.7, top_k=60, top_p=0.9, min_p=0.01, presence_penalty=1)
    logits = _logits(9, 1) / 2
    tokens = list(range(0, 60, 3))  # the penalised tokens: every row's prompt and output

    def row() -> SamplerRow:
        return SamplerRow(params, None, tokens, 10)

    penalised = logits.clone()
    Sampler._apply_bias_and_penalties(penalised, [row()])
    expected = Sampler()._probs(penalised, [row()])[0].double()
    expected /= expected.sum()
    sampler = GpuSampler(seed=123)
    counts = torch.zeros(V, dtype=torch.float64)
    batch, steps = 2000, 10
    for _ in range(steps):
        results = sampler(logits.repeat(batch, 1), [row() for _ in range(batch)])
        for r in results:
            counts[r.token_id] += 1
    n = batch * steps
    support = expected > 0
    assert counts[~support].sum() == 0  # nothing outside the filtered set
    # Pool the rare tokens (expected count < 5) into one cell, as the test requires.
    e, c = expected[support] * n, counts[support]
    rare = e < 5
    e = torch.cat([e[~rare], e[rare].sum()[None]]) if rare.any() else e
    c = torch.cat([c[~rare], c[rare].sum()[None]]) if rare.any() else c
    chi2 = float(((c - e) ** 2 / e).sum())
    df = len(e) - 1
    p_value = float(torch.special.gammaincc(torch.tensor(df / 2), torch.tensor(chi2 / 2)))
    assert df > 5 and p_value > 1e-3, (chi2, df, p_value)


def test_host_only_features_take_samplers_path():
    """typical-p (and grammars, Mirostat, sampling masks) run Sampler's code, same results."""
    params = [SamplingParams(temperature=0.8, typical_p=0.5, seed=1), SamplingParams(seed=2)]
    logits = _logits(3, 2)
    want = Sampler(seed=0)(logits.clone(), _rows(params))
    got = GpuSampler(seed=0)(logits.clone(), _rows(params))
    assert [r.token_id for r in got] == [r.token_id for r in want]
