"""Verification of proposed tokens (speculative decoding): which of them the model keeps.

The forward computed logits at the k + 1 positions of a row that proposed k tokens: position j
(0-based) predicts the token after the first j proposals. Every position is sampled by the
Sampler exactly as a lone row of plain decoding would be (logit bias, min-tokens, penalties over
the tokens before it, temperature and the filters, then the draw with one uniform), and the
proposals are kept while they equal what was sampled; the first position whose sample differs
emits that sample instead (all kept: the last position's sample is added).

- greedy: the argmax at each position, so the same tokens as without speculation.
- sampling: exact-match verification. Proposals are deterministic (a prediction, an n-gram, a
  greedy draft model), so q is one-hot and proposal x is accepted with probability p(x), as
  standard rejection sampling accepts it; but where rejection sampling draws the replacement
  from the residual with a fresh uniform, here the token is the position's own sample. Each
  emitted token is distributed as p exactly given the tokens before it, and it consumes one
  uniform, as in plain decoding.

That last point is what makes a seeded request reproducible whatever shares its batch: how many
of a row's proposals a step verifies depends on its neighbours (the step's token budget and free
KV blocks cut proposals short, a draft model's cache may be full). Rejection sampling spends a
uniform per accept test plus one per draw, so a cut moved every later draw. Here the emitted
tokens are those of plain decoding with the request's generator, whatever was proposed.
"""

from __future__ import annotations

import torch

from girandole.sampling.sampler import Sampler, SampleResult, SamplerRow


def verify(
    sampler: Sampler, logits: torch.Tensor, rows: list[SamplerRow], proposal: list[int]
) -> list[SampleResult]:
    """Tokens to emit for one sequence: the accepted proposals and one more.

    logits: float32 [k + 1, V] (modified in place); rows[j]: the sequence with the first j
    proposals appended (its penalties and min-tokens see them); proposal: the k proposed ids.
    Rows with a grammar or Mirostat do not speculate (the engine never proposes for them).
    """
    k = len(proposal)
    assert logits.shape[0] == len(rows) == k + 1
    greedy = rows[0].params.greedy
    generator = rows[0].generator or sampler.generator
    state = None if greedy else generator.get_state()
    # One sampler call over every position: the Sampler is row-invariant, and it draws one
    # uniform per sampled row in row order, as plain decoding draws them step by step.
    results = sampler(logits, rows)
    emitted = next((j + 1 for j in range(k) if results[j].token_id != proposal[j]), k + 1)
    if state is not None and emitted < k + 1:
        # Positions after the first mismatch are discarded: give their uniforms back, so the
        # next step draws the one that plain decoding would draw next (one call per uniform,
        # as the Sampler draws a seeded row's).
        generator.set_state(state)
        for _ in range(emitted):
            torch.rand(1, generator=generator, dtype=torch.float64)
    return results[:emitted]
