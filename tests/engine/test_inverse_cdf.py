"""The samplers' draw (girandole/sampling/sampler.py: chunk_cdf, inverse_cdf, draw_uniforms,
tempered_probs) against a full float64 cumulative sum: the same token at every point but
rounding ties, never a zero-weight token, a row's draw the same alone and in a batch."""

from __future__ import annotations

import pytest
import torch

from girandole.sampling.params import SamplingParams
from girandole.sampling.sampler import (
    DRAW_CHUNK,
    SamplerRow,
    chunk_cdf,
    draw_uniforms,
    inverse_cdf,
    tempered_probs,
)


def _reference(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    cdf = weights.double().cumsum(dim=-1)
    idx = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], side="right")[:, 0]
    return idx.clamp(max=weights.shape[1] - 1)


def _weights(rows: int, vocab: int, seed: int) -> torch.Tensor:
    """Peaked, with whole zero chunks and scattered zeros (as top-k/top-p leave them)."""
    g = torch.Generator().manual_seed(seed)
    w = tempered_probs(torch.randn(rows, vocab, generator=g) * 4, torch.full((rows,), 0.7))
    if vocab > 3 * DRAW_CHUNK:
        w[:, : 2 * DRAW_CHUNK] = 0.0  # leading chunks without weight
    w[torch.rand(rows, vocab, generator=g) < 0.3] = 0.0
    w[:, -1] = 0.5  # the last token can be drawn (tiny weights there are below rounding)
    return w


@pytest.mark.parametrize("vocab", [262144, 3000, 700])  # chunks exact, a tail, one partial chunk
def test_draw_matches_the_full_cumulative_sum(vocab):
    w = _weights(4, vocab, seed=vocab)
    g = torch.Generator().manual_seed(1)
    agree = 0
    for _ in range(50):
        u = torch.rand(4, generator=g, dtype=torch.float64)
        idx, p = inverse_cdf(w, u)
        assert (w.gather(1, idx[:, None]) > 0).all()
        torch.testing.assert_close(p, w.double().gather(1, idx[:, None])[:, 0] / w.double().sum(1))
        agree += int((idx == _reference(w, u)).sum())
    assert agree >= 199  # of 200: a point within rounding of a boundary may fall either side


def test_extreme_points_and_a_single_token():
    w = _weights(2, 5000, seed=3)
    idx, _ = inverse_cdf(w, torch.tensor([1.0 - 2.0**-53, 0.0], dtype=torch.float64))
    assert int(idx[0]) == 4999  # the top of the CDF: its last token
    first = int((w[1] > 0).nonzero()[0])  # the bottom: the first token with weight
    assert int(idx[1]) == first and first >= 2 * DRAW_CHUNK
    one = torch.zeros(1, 5000)
    one[0, 4321] = 0.25
    assert int(inverse_cdf(one, torch.tensor([0.999], dtype=torch.float64))[0][0]) == 4321


def test_a_rows_draw_does_not_depend_on_its_batch():
    w = _weights(16, 262144, seed=5)
    u = torch.rand(16, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    together, p_together = inverse_cdf(w, u)
    cdf = chunk_cdf(w)
    for i in (0, 7, 15):
        alone, p_alone = inverse_cdf(w[i : i + 1].clone(), u[i : i + 1])
        assert int(alone[0]) == int(together[i]) and float(p_alone[0]) == float(p_together[i])
        assert torch.equal(chunk_cdf(w[i : i + 1].clone())[0], cdf[i])


def test_uniforms_in_row_order_from_each_rows_generator():
    seeded = torch.Generator().manual_seed(9)
    rows = [
        SamplerRow(SamplingParams()),
        SamplerRow(SamplingParams(seed=9), generator=seeded),
        SamplerRow(SamplingParams()),
    ]
    shared = torch.Generator().manual_seed(4)
    u = draw_uniforms(rows, shared)
    want_shared = torch.rand(2, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    want_seeded = torch.rand(1, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    assert u.tolist() == [float(want_shared[0]), float(want_seeded[0]), float(want_shared[1])]


def test_tempered_probs_are_softmax_up_to_its_total():
    logits = torch.randn(3, 1000) * 5
    temps = torch.tensor([0.5, 1.0, 2.0])
    want = torch.softmax(logits / temps[:, None], dim=-1)
    w = tempered_probs(logits.clone(), temps)
    assert (w.amax(dim=-1) == 1.0).all()
    torch.testing.assert_close(w / w.sum(dim=-1, keepdim=True), want, rtol=1e-5, atol=1e-7)
