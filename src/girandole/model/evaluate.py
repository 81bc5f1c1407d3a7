"""Teacher-forced evaluation of a model on token sequences: per-token negative log-likelihood
and top-1 predictions, for comparing the fast and reference modes (benchmarks/model_accuracy.py
and tests/model)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class TeacherForced:
    nll: torch.Tensor  # [N] float64: -log p(token[i+1] | tokens[..i]) over all documents
    top1: torch.Tensor  # [N] long: the model's argmax at each of those positions

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll.mean().item())


def teacher_forced(model, documents: Sequence[Sequence[int]], chunk: int = 256) -> TeacherForced:
    """Run each document as one sequence (no KV cache: plain causal attention)."""
    nlls, tops = [], []
    with torch.inference_mode():
        for doc in documents:
            ids = torch.tensor(list(doc), dtype=torch.long)
            hidden = model(ids, torch.arange(len(ids)))
            for start in range(0, len(ids) - 1, chunk):
                stop = min(start + chunk, len(ids) - 1)
                logits = model.compute_logits(hidden[start:stop]).double()
                logp = torch.log_softmax(logits, dim=-1)
                target = ids[start + 1 : stop + 1]
                nlls.append(-logp.gather(1, target[:, None])[:, 0])
                tops.append(logits.argmax(dim=-1))
    return TeacherForced(torch.cat(nlls), torch.cat(tops))


def compare(reference: TeacherForced, candidate: TeacherForced) -> dict[str, float]:
    """Top-1 agreement and perplexities of a candidate against the reference run."""
    agree = (reference.top1 == candidate.top1).double().mean().item()
    ppl_ref, ppl_cand = reference.perplexity, candidate.perplexity
    return {
        "tokens": float(len(reference.nll)),
        "top1_agreement": agree,
        "ppl_reference": ppl_ref,
        "ppl_candidate": ppl_cand,
        "ppl_rel_diff": ppl_cand / ppl_ref - 1.0,
    }
