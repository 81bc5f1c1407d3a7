"""Verification of proposed tokens (speculative decoding): which of them the model keeps.

The forward computed logits at the k + 1 positions of a row that proposed k tokens: position j
(0-based) predicts the token after the first j proposals. Each position is processed exactly as
the Sampler processes a lone row (logit bias, min-tokens, penalties over the tokens before it,
temperature and the filters), so what is accepted is what plain decoding would have produced:

- greedy: the proposals that equal the argmax are kept, then the argmax at the first mismatch
  (or, all kept, at the last position) is added: the same tokens as without speculation.
- sampling: standard rejection sampling. Proposals are deterministic (a prediction, an n-gram, a
  greedy draft model), so q is one-hot: proposal x is accepted with probability p(x); at the
  first rejection a token is drawn from the residual (p - q)+, normalised, which is p without
  x; with every proposal accepted a bonus token is drawn from the last position's p. Each
  emitted token is distributed as p exactly, given the tokens before it.

Uniforms come from the request's own generator (seeded requests) or the sampler's, one per
accept test and one per draw, in position order: a seeded request repeats itself.
"""

from __future__ import annotations

import torch

from girandole.model.kernels.logits import argmax_rows
from girandole.sampling.sampler import (
    Sampler,
    SampleResult,
    SamplerRow,
    inverse_cdf,
    top_logprobs,
)


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
    params = rows[0].params
    raw_lp = torch.log_softmax(logits, dim=-1) if params.logprobs is not None else None
    sampler._apply_bias_and_penalties(logits, rows)

    chosen: list[int] = []
    chosen_p: list[float] = []  # probability of each chosen token after processing
    if params.greedy:
        ids = argmax_rows(logits).tolist()
        for j in range(k + 1):
            chosen.append(ids[j])
            if j == k or ids[j] != proposal[j]:
                break
        if raw_lp is not None:
            lp = torch.log_softmax(logits[: len(chosen)], dim=-1)
            chosen_p = lp.gather(1, torch.tensor(chosen)[:, None])[:, 0].exp().tolist()
    else:
        probs = sampler._probs(logits, rows).double()
        probs = probs / probs.sum(dim=-1, keepdim=True)
        generator = rows[0].generator or sampler.generator
        for j in range(k + 1):
            p = probs[j]
            if j < k:
                x = proposal[j]
                u = float(torch.rand(1, generator=generator, dtype=torch.float64))
                if u < float(p[x]):
                    chosen.append(x)
                    chosen_p.append(float(p[x]))
                    continue
                residual = p.clone()
                residual[x] = 0.0
                if float(residual.sum()) > 0:
                    p = residual / residual.sum()
            token = _draw(p, generator)
            chosen.append(token)
            chosen_p.append(float(probs[j, token]))
            break

    results = [SampleResult(t) for t in chosen]
    if raw_lp is not None:
        for j, res in enumerate(results):
            res.logprob = float(raw_lp[j, res.token_id])
            res.sampling_logprob = float(torch.tensor(chosen_p[j], dtype=torch.float64).log())
            res.top_logprobs = top_logprobs(raw_lp[j : j + 1], params.logprobs)[0]
    return results


def _draw(p: torch.Tensor, generator: torch.Generator) -> int:
    """Inverse-CDF draw of one token from the float64 distribution `p`."""
    u = torch.rand(1, generator=generator, dtype=torch.float64).to(p.device)
    return int(inverse_cdf(p[None], u)[0][0])
