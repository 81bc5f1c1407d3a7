"""StepBudget: the fit of a step's time, and the prefill cap it gives while decodes run."""

from __future__ import annotations

import random

from girandole.engine.step_budget import MIN_STEPS, StepBudget


def test_the_fit_recovers_a_linear_step_time():
    budget = StepBudget(target_s=0.25, floor=16, decode_ratio=0.0)  # the absolute target only
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


def test_a_costly_decode_batch_gets_a_relative_target():
    """Past target / ratio of decode time, a step may take ratio x its decode-only time."""
    budget = StepBudget(target_s=0.1, floor=16, decode_ratio=2.0)
    for rows in range(40):
        for tokens in (0, 128, 512):
            budget.observe(rows, tokens, 0.01 + 0.002 * rows + 0.001 * tokens)
    # 10 decodes take 30 ms: the absolute 100 ms holds, 70 ms of prompt tokens
    assert budget.prefill_cap(10) == 70
    # 60 decodes take 130 ms, over the 100 ms target: the step may take 260 ms, 130 of prompt
    assert budget.prefill_cap(60) == 130
    absolute = StepBudget(target_s=0.1, floor=16, decode_ratio=0.0)
    absolute._coef, absolute._steps = budget._coef, budget._steps
    assert absolute.prefill_cap(60) == 16  # the absolute target alone: only the floor
