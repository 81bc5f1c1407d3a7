"""Whether a sample of discrete outcomes follows their exact probabilities: the check of the
distribution tests of speculative decoding (test_rejection.py, test_speculation.py).

Three checks: no outcome of probability 0 occurs; Pearson's chi-square over the outcomes expected
at least MIN_EXPECTED times (the rarer ones pooled into one bin) stays below its 1 - 1e-5
quantile; no bin is off by BIN_SD standard deviations or more. The thresholds are strict
because the tests are deterministic (seeded draws): a false alarm would not go away on a rerun.
Simulated with multinomial draws from the tests' own distributions, a check of a correct
sampler fails with probability 3e-5 to 1.5e-4 (the per-bin test of the skewed small bins
dominates), about 1e-3 for the 9 tests together; the rejection-sampling bugs the tests are
meant to catch (docs/speculation.md) move whole bins by tens of standard deviations.
"""

from __future__ import annotations

import math
from collections.abc import Hashable

Z = 4.265  # the normal quantile of 1 - 1e-5
MIN_EXPECTED = 10  # below this, expected counts make chi-square's tail heavier than its law
BIN_SD = 5


def chi_square_critical(df: int, z: float = Z) -> float:
    """The chi-square quantile matching the normal quantile z (Wilson-Hilferty)."""
    a = 2.0 / (9.0 * df)
    return df * (1 - a + z * math.sqrt(a)) ** 3


def bins(counts: dict[Hashable, int], probs: dict[Hashable, float]) -> list[tuple[int, float]]:
    """(observed, expected) per outcome expected at least MIN_EXPECTED times, the rest pooled."""
    n = sum(counts.values())
    out: list[tuple[int, float]] = []
    rest_obs, rest_exp = 0, 0.0
    for outcome, p in probs.items():
        if n * p >= MIN_EXPECTED:
            out.append((counts.get(outcome, 0), n * p))
        else:
            rest_obs += counts.get(outcome, 0)
            rest_exp += n * p
    if rest_exp > 0:
        out.append((rest_obs, rest_exp))
    return out


def assert_follows(counts: dict[Hashable, int], probs: dict[Hashable, float], what: object) -> None:
    """Fail (naming `what`) unless `counts` (outcome -> times seen) looks drawn from `probs`
    (outcome -> exact probability; outcomes not in it have probability 0)."""
    impossible = {o: c for o, c in counts.items() if probs.get(o, 0.0) <= 0.0}
    assert not impossible, (what, "outcomes of probability 0 occurred", impossible)
    n = sum(counts.values())
    observed = bins(counts, probs)
    assert len(observed) >= 2, (what, "too few samples to compare", n)
    stat = sum((o - e) ** 2 / e for o, e in observed)
    critical = chi_square_critical(len(observed) - 1)
    assert stat < critical, (what, "chi-square", round(stat, 1), round(critical, 1), observed)
    for o, e in observed:
        sd = math.sqrt(e * (1 - e / n))
        assert abs(o - e) < BIN_SD * sd, (what, f"a bin off by {(o - e) / sd:.1f} sd", o, e)
