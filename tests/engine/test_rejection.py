"""girandole.sampling.rejection.verify on fixed logits: the tokens it emits for k proposals follow
the distribution plain decoding gives, position by position (a proposal kept while it equals its
position's sample, the first differing sample emitted in its place, the last position's sample
after k kept), with penalties and filters applied per position.

No model: the logits of the k + 1 positions are fixed, so the probability of every possible
output (the accepted proposals, then one token) is computed exactly and compared with the
outputs of thousands of calls (a seeded sampler: the same draws every run)."""

from __future__ import annotations

import math
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from girandole import SamplingParams
from girandole.sampling.rejection import verify
from girandole.sampling.sampler import Sampler, SamplerRow

sys.path.insert(0, str(Path(__file__).resolve().parent))
from distribution_check import MIN_EXPECTED, assert_follows  # noqa: E402

V = 10
PROMPT = [0, 1]
OUTPUT = [2]  # tokens generated before the step
PROPOSAL = [3, 4, 3]  # 3 twice: its penalty at position 2 counts the accepted one before it
# Each position's logits: the proposed token likely but not certain, so every position sees
# acceptances and rejections.
LOGITS = torch.tensor(
    [
        [0.3, -0.5, 1.0, 2.4, 0.8, 0.2, -1.0, 0.6, -0.2, 0.0],
        [0.1, 0.4, -0.3, 1.5, 2.2, 0.9, 0.2, -0.6, 0.5, -1.2],
        [-0.4, 0.2, 0.7, 2.6, 1.1, 0.0, 0.9, 0.3, -0.8, 0.4],
        [0.5, 0.0, 1.3, 0.2, -0.3, 1.6, 0.8, -1.1, 1.0, 0.6],
    ]
)
PARAMS = [
    dict(temperature=1.0),
    dict(
        temperature=0.9,
        top_k=7,
        top_p=0.9,
        repetition_penalty=1.3,
        frequency_penalty=0.4,
        presence_penalty=0.3,
    ),
    dict(temperature=1.2, min_p=0.05, logit_bias={5: -1.0, 7: 1.5}, frequency_penalty=-0.5),
]
N = 6000


def rows_for(params: SamplingParams) -> list[SamplerRow]:
    """Position j's row: the output so far and the first j proposals (as the runner builds)."""
    return [
        SamplerRow(params, None, PROMPT + OUTPUT + PROPOSAL[:j], len(PROMPT))
        for j in range(len(PROPOSAL) + 1)
    ]


def lone_row_probs(params: SamplingParams) -> list[torch.Tensor]:
    """Each position's distribution as the Sampler gives it to a lone row in plain decoding."""
    out = []
    for j, row in enumerate(rows_for(params)):
        logits = LOGITS[j : j + 1].clone()
        Sampler._apply_bias_and_penalties(logits, [row])
        p = Sampler()._probs(logits, [row])[0].double()
        out.append(p / p.sum())
    return out


def exact_outcomes(probs: list[torch.Tensor]) -> dict[tuple[int, ...], float]:
    """The probability of every output: the first j proposals accepted, then token t (t not
    the j-th proposal; after all k, any t)."""
    k = len(PROPOSAL)
    outcomes: dict[tuple[int, ...], float] = {}
    prefix = 1.0
    for j in range(k + 1):
        for t in range(V):
            if (j == k or t != PROPOSAL[j]) and float(probs[j][t]) > 0:
                outcomes[tuple(PROPOSAL[:j]) + (t,)] = prefix * float(probs[j][t])
        if j < k:
            prefix *= float(probs[j][PROPOSAL[j]])
    return outcomes


@pytest.mark.parametrize("kw", PARAMS)
def test_verify_emits_what_plain_decoding_would(kw):
    params = SamplingParams(**kw)
    exact = exact_outcomes(lone_row_probs(params))
    assert math.isclose(sum(exact.values()), 1.0, rel_tol=1e-9)
    sampler = Sampler(seed=7)
    rows = rows_for(params)
    counts = Counter(
        tuple(r.token_id for r in verify(sampler, LOGITS.clone(), rows, PROPOSAL)) for _ in range(N)
    )
    # every position (each proposal kept or replaced, the last position's sample) has outcomes of
    # its own in the check
    for j in range(len(PROPOSAL) + 1):
        assert any(len(o) == j + 1 and N * p >= MIN_EXPECTED for o, p in exact.items()), j
    assert_follows(counts, exact, kw)
