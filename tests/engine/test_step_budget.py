"""StepBudget: the fit of a step's time, and the prefill cap it gives while decodes run."""

from __future__ import annotations

import random

from girandole.engine.step_budget import MIN_STEPS, StepBudget


def test_the_fit_recovers_a_linear_step_time():
    budget = StepBudget(target_s=0.25, floor=16)
    rng = random.Random(0)
    for _ in range(60):
        rows, tokens = rng.randint(0, 16), rng.choice([0, 0, 64, 256, 512])
        budget.observe(rows, tokens, 0.02 + 0.004 * rows + 0.0015 * tokens)
    assert abs(budget.predicted_seconds(8, 100) - (0.02 + 0.032 + 0.15)) < 1e-3
    # with 10 decodes: (0.25 - 0.02 - 0.04) / 0.0015 = 126 prompt tokens
    assert budget.prefill_cap(10) == 126
    assert budget.prefill_cap(0) is None  # nobody waits on a step without decodes
    assert budget.prefill_cap(60) == 16  # over the target already: the floor still advances


def test_no_cap_until_trusted_or_when_off():
    budget = StepBudget(target_s=0.25)
    for _ in range(MIN_STEPS - 1):
        budget.observe(4, 100, 0.2)
    assert budget.prefill_cap(4) is None
    off = StepBudget(target_s=None)
    for _ in range(20):
        off.observe(4, 100, 0.2)
    assert off.prefill_cap(4) is None
