"""StepBudget: how many prefill tokens a step may carry beside running decodes, so streams stay
smooth (inter-token latency) while long prompts still make progress.

A step's time is close to linear in what it computes: t = fixed + per_row * decode_rows +
per_token * prefill_tokens. The budget fits that line online (least squares over recent steps,
older ones decaying), and when decodes run it caps the step's prefill tokens to what fits in
`target_s` after the decodes' own share, never below `floor` (a prompt always advances: TTFT
holds). Steps without decodes take the scheduler's whole token budget: nobody waits on them.
Until enough steps were seen the cap is off, as before.

The target is absolute while decodes are cheap and relative once they are not: a step may take
max(target_s, decode_ratio x the decode-only step). A fixed 100 ms alone left a 64-row batch
(~90 ms of decode on two cores) only the floor, and its new prompts waited 3.5x longer (TTFT
p50 0.95 -> 3.3 s); with the ratio a token's gap stays within twice the typical one there.
"""

from __future__ import annotations

import numpy as np

DECAY = 0.97  # weight of the fit's past per step: about the last 30 steps count
MIN_STEPS = 8  # steps seen before the fit is trusted


class StepBudget:
    def __init__(self, target_s: float | None, floor: int = 32, decode_ratio: float = 2.0) -> None:
        self.target_s = target_s  # None: no cap
        self.floor = floor
        self.decode_ratio = decode_ratio
        self._xtx = np.zeros((3, 3))
        self._xty = np.zeros(3)
        self._steps = 0
        self.num_steps = 0  # steps seen, and their seconds (the engine's stats)
        self.seconds = 0.0
        self._coef: np.ndarray | None = None

    def observe(self, decode_rows: int, prefill_tokens: int, seconds: float) -> None:
        """A step of `decode_rows` decodes and `prefill_tokens` prompt tokens took `seconds`."""
        x = np.array([1.0, float(decode_rows), float(prefill_tokens)])
        self._xtx = DECAY * self._xtx + np.outer(x, x)
        self._xty = DECAY * self._xty + x * seconds
        self._steps += 1
        self.num_steps += 1
        self.seconds += seconds
        if self._steps >= MIN_STEPS:
            # a small ridge keeps the fit defined while one kind of step dominates
            coef = np.linalg.solve(self._xtx + 1e-6 * np.eye(3), self._xty)
            self._coef = np.maximum(coef, 0.0)

    def prefill_cap(self, decode_rows: int) -> int | None:
        """The most prompt tokens a step with `decode_rows` decodes should carry (None: any)."""
        if self.target_s is None or decode_rows == 0 or self._coef is None:
            return None
        fixed, per_row, per_token = self._coef
        if per_token <= 0:
            return None
        decode_s = fixed + per_row * decode_rows
        spare = max(self.target_s, self.decode_ratio * decode_s) - decode_s
        return max(self.floor, int(spare / per_token))

    def predicted_seconds(self, decode_rows: int, prefill_tokens: int) -> float | None:
        if self._coef is None:
            return None
        return float(self._coef @ np.array([1.0, decode_rows, prefill_tokens]))
