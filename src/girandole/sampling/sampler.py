"""Sampler: turns a batch of logits into next tokens, each row with its own parameters.

Every filter runs as one tensor operation over the rows that use it. Sampling is inverse-CDF
with one uniform draw per row: a seeded row draws from its own generator, so what else is in the
batch never changes its choice.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from girandole.sampling.params import SamplingParams

# Top-p is exact: the nucleus is looked for among the top candidates first and the full vocabulary
# is sorted only for rows whose nucleus is wider than that.
_TOP_P_CANDIDATES = 256


@dataclass
class SamplerRow:
    params: SamplingParams
    generator: torch.Generator | None


class Sampler:
    def __init__(self, seed: int | None = None) -> None:
        self.generator = torch.Generator()
        if seed is not None:
            self.generator.manual_seed(seed)
        else:
            self.generator.seed()

    def __call__(self, logits: torch.Tensor, rows: list[SamplerRow]) -> list[int]:
        """logits: float32 [B, V] (modified in place). Returns one token id per row."""
        B = logits.shape[0]
        out = torch.empty(B, dtype=torch.long)
        greedy = [i for i, r in enumerate(rows) if r.params.greedy]
        if greedy:
            idx = torch.tensor(greedy)
            out[idx] = logits.index_select(0, idx.to(logits.device)).argmax(dim=-1).cpu()
        sampled = [i for i, r in enumerate(rows) if not r.params.greedy]
        if sampled:
            idx = torch.tensor(sampled)
            probs = self._probs(
                logits.index_select(0, idx.to(logits.device)), [rows[i] for i in sampled]
            )
            out[idx] = self._draw(probs, [rows[i] for i in sampled])
        return out.tolist()

    def _probs(self, logits: torch.Tensor, rows: list[SamplerRow]) -> torch.Tensor:
        dev = logits.device
        temps = torch.tensor([r.params.temperature for r in rows], device=dev)
        logits = logits / temps[:, None]
        probs = torch.softmax(logits, dim=-1)

        top_ks = [r.params.top_k for r in rows]
        if any(k > 0 for k in top_ks):
            kmax = max(top_ks)
            values = probs.topk(min(kmax, probs.shape[-1]), dim=-1).values
            k_idx = torch.tensor([max(k, 1) - 1 for k in top_ks], device=dev)
            kth = values.gather(1, k_idx[:, None])
            kth[torch.tensor(top_ks, device=dev) == 0] = 0.0
            probs = probs.masked_fill(probs < kth, 0.0)

        top_ps = torch.tensor([r.params.top_p for r in rows], device=dev)
        if bool((top_ps < 1.0).any()):
            probs = self._top_p(probs, top_ps)

        min_ps = torch.tensor([r.params.min_p for r in rows], device=dev)
        if bool((min_ps > 0).any()):
            threshold = probs.max(dim=-1, keepdim=True).values * min_ps[:, None]
            probs = probs.masked_fill(probs < threshold, 0.0)
        return probs

    @staticmethod
    def _top_p(probs: torch.Tensor, top_ps: torch.Tensor) -> torch.Tensor:
        """Keep the smallest set of most likely tokens whose mass reaches top_p (ties kept)."""
        total = probs.sum(dim=-1)
        k = min(_TOP_P_CANDIDATES, probs.shape[-1])
        values = probs.topk(k, dim=-1).values  # sorted descending
        mass = values.cumsum(dim=-1)
        target = top_ps * total
        cutoff = torch.zeros_like(total)
        for i in range(probs.shape[0]):
            if top_ps[i] >= 1.0:
                continue
            row_values, row_mass = values[i], mass[i]
            if row_mass[-1] < target[i]:  # nucleus wider than the candidates: sort everything
                row_values = probs[i].sort(descending=True).values
                row_mass = row_values.cumsum(dim=0)
            j = int(torch.searchsorted(row_mass, target[i]).clamp(max=len(row_values) - 1))
            cutoff[i] = row_values[j]
        return probs.masked_fill(probs < cutoff[:, None], 0.0)

    def _draw(self, probs: torch.Tensor, rows: list[SamplerRow]) -> torch.Tensor:
        u = torch.empty(len(rows), dtype=torch.float64)
        for i, r in enumerate(rows):
            u[i] = torch.rand(1, generator=r.generator or self.generator, dtype=torch.float64)
        cdf = probs.double().cumsum(dim=-1).cpu()
        point = u * cdf[:, -1]
        # side="right": the first token whose cumulative mass exceeds the point never has p = 0.
        idx = torch.searchsorted(cdf, point[:, None], side="right")[:, 0]
        return idx.clamp(max=probs.shape[-1] - 1)
