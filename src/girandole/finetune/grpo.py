"""Group Relative Policy Optimization (Shao et al. 2024, DeepSeekMath) of a LoRA adapter, and
DAPO's token-level variant (Yu et al. 2025): reinforcement fine-tuning with rewards from an
evaluator.

Per prompt of a step: the policy (base + the adapter as it is now) samples N candidates
(finetune/rollout.py), the reward function scores each (the evaluator: a score, or None when it
failed on that answer, which drops the candidate), and each candidate's advantage is its reward
against its group's:

    A_i = (r_i - mean(r)) / (std(r) + EPS)          (std over the group: the population's)

A group whose rewards are all equal (or with fewer than two scored candidates) teaches nothing:
it is skipped and counted. The loss of a candidate's sampled tokens o_i,t:

    l_i,t = -A_i * log pi(o_i,t | prompt, o_i,<t) + klBeta * KL_t

One optimizer step follows each step's rollouts (fully on-policy), so the clipped importance
ratio pi/pi_old of PPO-style objectives is 1 and its clip never binds (DAPO's asymmetric clip
included); the gradient is the policy gradient above. KL_t is the k3 estimator of the KL to the
base model (the LoRA-disabled forward), exp(ref - logp) - (ref - logp) - 1; klBeta 0 skips the
base model's forward. Normalisation: GRPO averages each candidate's tokens, then the step's
candidates; DAPO sums every token of the step and divides by their number (a long answer's
tokens weigh as much as a short one's).

Each step reports the loss, the mean reward of its scored candidates, and, over the job so far,
the groups skipped and the candidates whose score was None. An epoch in which no candidate was
scored (the evaluator failed on every one) fails the job, naming the evaluator's first error:
training on would learn nothing. With an evaluation set, each epoch ends with one greedy answer
per held-out prompt, scored: their mean is `evalReward`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from girandole.finetune.prompts import Prompt, encode_prompt, read_prompts
from girandole.finetune.rollout import SamplingConfig, sample
from girandole.finetune.trainer import _context
from girandole.model.context import ForwardContext, forward_context
from girandole.model.lora import LoRAAdapter
from girandole.tokenizer.tokenizer import Tokenizer

EPS = 1e-4
# rows (each: the prompt's messages + the answer, and the row's other fields) -> their scores:
# a number, None (that evaluation failed) or an evaluator's Score (its error when it failed)
Reward = Callable[[list[dict[str, Any]]], list[Any]]


class EvaluationsFailed(ValueError):
    """The evaluator failed on every candidate of an epoch (or of the evaluation set)."""


def score_of(result: Any) -> tuple[float | None, str]:
    """(the score, or None; the error) of one of a Reward's results."""
    score, error = result, "the evaluator gave no score"
    if hasattr(result, "score"):  # an evaluator's Score
        score, error = result.score, getattr(result, "error", "") or error
    if isinstance(score, (int, float)) and not isinstance(score, bool) and math.isfinite(score):
        return float(score), ""
    return (
        None,
        error if score is None else f"the evaluator's score {score!r} is not a finite number",
    )


def advantages(rewards: list[float | None]) -> list[float | None] | None:
    """Each scored candidate's advantage in its group (None where its score is None); None when
    the group teaches nothing (fewer than two scores, or all equal)."""
    scored = [r for r in rewards if r is not None]
    if len(scored) < 2 or max(scored) == min(scored):
        return None
    mean = sum(scored) / len(scored)
    std = math.sqrt(sum((r - mean) ** 2 for r in scored) / len(scored))
    return [None if r is None else (r - mean) / (std + EPS) for r in rewards]


def token_losses(
    model: nn.Module,
    adapter: LoRAAdapter | None,
    ids: list[int],
    start: int,
    advantage: float,
    kl_beta: float,
    kls: list[float],
    device: torch.device,
) -> torch.Tensor:
    """The policy-gradient loss of each token of ids[start:] (its advantage times its
    log-probability, negated), plus kl_beta times the k3 estimate of the KL to the frozen base
    (the mean of which is appended to `kls`)."""
    logp = token_logps(model, adapter, ids, start, device)
    per_token = -advantage * logp
    if kl_beta:
        with torch.no_grad():
            ref = token_logps(model, None, ids, start, device)
        delta = ref - logp
        kl = torch.exp(delta) - delta - 1
        kls.append(kl.mean().item())
        per_token = per_token + kl_beta * kl
    return per_token


def load_prompts(
    path: str, tok: Tokenizer, template: str | None, max_length: int, what: str = "dataset"
) -> list[Prompt]:
    rows = read_prompts(Path(path).read_bytes(), what)
    return [
        encode_prompt(tok, template, row, max_length, f"{what} row {i + 1}")
        for i, row in enumerate(rows)
    ]


def token_logps(
    model: nn.Module, adapter: LoRAAdapter | None, ids: list[int], start: int, device
) -> torch.Tensor:
    """log pi(ids[t] | ids[:t]) for t >= start: [len(ids) - start]; `adapter` None: the base."""
    tokens = torch.tensor(ids, dtype=torch.long, device=device)
    positions = torch.arange(len(ids), device=device)
    ctx = (
        _context(len(ids), adapter)
        if adapter is not None
        else ForwardContext(torch.empty(0, dtype=torch.long), [len(ids)], [len(ids)], [])
    )
    with forward_context(ctx):
        hidden = model(tokens, positions)
    logits = model.compute_logits(hidden[start - 1 : -1]).float()
    return torch.log_softmax(logits, dim=-1).gather(1, tokens[start:, None])[:, 0]


class GrpoObjective:
    """The trainer's objective (trainer.SftObjective's interface) of a GRPO or DAPO job."""

    def __init__(
        self,
        tok: Tokenizer,
        reward: Reward,
        sampling: SamplingConfig,
        kl_beta: float,
        token_level: bool,
        eos: set[int],
        max_length: int,
        seed: int,
        device: torch.device,
    ) -> None:
        self.tok, self.reward, self.sampling = tok, reward, sampling
        self.max_length = max_length  # maxContextLength: the prompt and its answer
        self.kl_beta, self.token_level, self.eos = kl_beta, token_level, eos
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)
        self.skipped_groups = 0
        self.dropped = 0  # candidates whose score was None
        self.first_error = ""  # the evaluator's first failure, for a job that fails of them
        self._epoch_scored = self._epoch_failed = 0
        self._criteria: dict[str, list[float]] = {}  # the step's scores of each criterion
        self._step: dict[str, Any] = {}

    def length(self, prompt: Prompt) -> int:
        return (len(prompt.ids) + self.sampling.max_tokens) * self.sampling.candidates

    def scores(self, prompt: Prompt, candidates: list[list[int]]) -> list[float | None]:
        answers = [self.tok.decode(c) for c in candidates]
        results = list(self.reward([prompt.row(a) for a in answers]))
        if len(results) != len(candidates):
            raise ValueError(f"the evaluator gave {len(results)} scores for {len(candidates)} answers")  # fmt: skip
        out: list[float | None] = []
        for result in results:
            score, error = score_of(result)
            if score is None and not self.first_error:
                self.first_error = error
            out.append(score)
            for name, value in (getattr(result, "criteria", None) or {}).items():
                self._criteria.setdefault(name, []).append(value)  # an evaluator's criteria
        return out

    def losses(
        self, model: nn.Module, adapter: LoRAAdapter, window: list[Prompt], device
    ) -> Iterator[torch.Tensor]:
        kept: list[tuple[Prompt, list[int], float]] = []  # the candidates that teach something
        scored: list[float] = []
        self._criteria = {}
        for prompt in window:
            limit = min(self.sampling.max_tokens, self.max_length - len(prompt.ids))
            config = SamplingConfig(**{**vars(self.sampling), "max_tokens": limit})
            candidates = sample(model, adapter, prompt.ids, config, self.eos, self.generator, device)  # fmt: skip
            rewards = self.scores(prompt, candidates)
            self.dropped += sum(r is None for r in rewards)
            self._epoch_failed += sum(r is None for r in rewards)
            self._epoch_scored += sum(r is not None for r in rewards)
            scored += [r for r in rewards if r is not None]
            adv = advantages(rewards)
            if adv is None:
                self.skipped_groups += 1
                continue
            kept += [(prompt, c, a) for c, a in zip(candidates, adv) if a is not None]
        self._step = {"meanReward": sum(scored) / len(scored)} if scored else {}
        if self._criteria:  # several criteria: the step's mean reward of each
            self._step["criteriaRewards"] = {k: sum(v) / len(v) for k, v in self._criteria.items()}  # fmt: skip
        tokens = sum(len(c) for _, c, _ in kept)
        kls: list[float] = []
        for prompt, candidate, advantage in kept:
            ids = prompt.ids + candidate
            per_token = token_losses(model, adapter, ids, len(prompt.ids), advantage, self.kl_beta, kls, device)  # fmt: skip
            if self.token_level:
                yield per_token.sum() / tokens
            else:
                yield per_token.mean() / len(kept)
        if kls:
            self._step["kl"] = sum(kls) / len(kls)

    def end_epoch(self, epoch: int) -> None:
        """EvaluationsFailed when the evaluator failed on every candidate of the epoch."""
        scored, failed = self._epoch_scored, self._epoch_failed
        self._epoch_scored = self._epoch_failed = 0
        if failed and not scored:
            raise EvaluationsFailed(
                f"the evaluator failed on all {failed} rollouts of epoch {epoch}, so nothing"
                f" was learnt; its first error: {self.first_error}"
            )

    @torch.no_grad()
    def evaluate(
        self, model: nn.Module, adapter: LoRAAdapter, rows: list[Prompt], device
    ) -> dict[str, float]:
        """The policy on held-out prompts: one greedy answer each (deterministic, so epochs
        compare), scored; {evalReward: their mean, evalFailedRollouts}."""
        scores: list[float] = []
        self.first_error = ""  # the evaluation set's own
        for prompt in rows:
            limit = min(self.sampling.max_tokens, self.max_length - len(prompt.ids))
            greedy = SamplingConfig(candidates=1, max_tokens=limit, temperature=0)
            (answer,) = sample(model, adapter, prompt.ids, greedy, self.eos, self.generator, device)  # fmt: skip
            scores += [s for s in self.scores(prompt, [answer]) if s is not None]
        if not scores:
            raise EvaluationsFailed(
                f"the evaluator failed on all {len(rows)} answers to the evaluation set's"
                f" prompts; its first error: {self.first_error}"
            )
        return {"evalReward": sum(scores) / len(scores), "evalFailedRollouts": len(rows) - len(scores)}  # fmt: skip

    def stats(self) -> dict[str, Any]:
        return {
            **self._step,
            "skippedGroups": self.skipped_groups,
            "droppedRollouts": self.dropped,
        }
