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

DECAY = 0.97  # weight of the fit's past per step: about the last 30 steps count
MIN_STEPS = 8  # steps seen before the fit is trusted


class StepBudget:
    def __init__(self, target_s: float | None, floor: int = 32, decode_ratio: float = 2.0) -> None:
        self.target_s = target_s  # None: no cap
        self.floor = floor
        self.decode_ratio = decode_ratio
        # The fit's normal equations, in Python floats: numpy's small-array calls and its
        # solver took ~0.18 ms of every step inside the engine (1.7 % of a one-row decode step
        # of the default model), these ~0.04.
        self._xtx = [[0.0] * 3 for _ in range(3)]
        self._xty = [0.0] * 3
        self._steps = 0
        self.num_steps = 0  # steps seen, and their seconds (the engine's stats)
        self.seconds = 0.0
        self._coef: list[float] | None = None

    def observe(self, decode_rows: int, prefill_tokens: int, seconds: float) -> None:
        """A step of `decode_rows` decodes and `prefill_tokens` prompt tokens took `seconds`."""
        x = (1.0, float(decode_rows), float(prefill_tokens))
        for i in range(3):
            row = self._xtx[i]
            for j in range(3):
                row[j] = DECAY * row[j] + x[i] * x[j]
            self._xty[i] = DECAY * self._xty[i] + x[i] * seconds
        self._steps += 1
        self.num_steps += 1
        self.seconds += seconds
        if self._steps >= MIN_STEPS:
            # a small ridge keeps the fit defined while one kind of step dominates
            ridged = [[v + (1e-6 if i == j else 0.0) for j, v in enumerate(row)]
                      for i, row in enumerate(self._xtx)]  # fmt: skip
            self._coef = [max(c, 0.0) for c in _solve3(ridged, self._xty)]

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
        fixed, per_row, per_token = self._coef
        return fixed + per_row * decode_rows + per_token * prefill_tokens


def _solve3(a: list[list[float]], b: list[float]) -> list[float]:
    """x with a x = b for a 3 x 3 system: Gaussian elimination with partial pivoting (a and b
    are left as they were)."""
    m = [row[:] + [b[i]] for i, row in enumerate(a)]
    for col in range(3):
        pivot = max(range(col, 3), key=lambda r: abs(m[r][col]))
        m[col], m[pivot] = m[pivot], m[col]
        for r in range(col + 1, 3):
            f = m[r][col] / m[col][col]
            for c in range(col, 4):
                m[r][c] -= f * m[col][c]
    x = [0.0] * 3
    for r in (2, 1, 0):
        x[r] = (m[r][3] - sum(m[r][c] * x[c] for c in range(r + 1, 3))) / m[r][r]
    return x
