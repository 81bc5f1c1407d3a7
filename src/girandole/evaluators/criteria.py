"""An evaluator of several criteria: each CODE_SNIPPETS criterion is its own code (files, entry
file and function), run in its own child process (runner.EvaluatorRunner), and a row's score is
the mean of its criteria's scores.

Fireworks documents no rule for combining criteria; the mean keeps a score in the range of its
criteria's (0 to 1 for most reward functions). A row whose evaluation fails under any criterion
fails (its error names the criterion): a mean of the others would be a different score. The
criteria score a row one after another, never two children at once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from girandole.evaluators.runner import (
    ChildLimits,
    EvaluatorCode,
    EvaluatorLoadError,
    EvaluatorRunner,
    Score,
)  # fmt: skip


@dataclass(frozen=True)
class Criterion:
    name: str  # criteria[i].name, or `criteria[i]` when it has none
    code: EvaluatorCode


def criteria_of(evaluator: dict[str, Any]) -> list[Criterion]:
    """The code of each criterion of a stored evaluator (one waiting for its upload has none:
    KeyError)."""
    out = []
    for i, criterion in enumerate(evaluator["criteria"]):
        snippets = criterion["codeSnippets"]
        code = EvaluatorCode(snippets["fileContents"], snippets["entryFile"], snippets["entryFunc"])  # fmt: skip
        out.append(Criterion(criterion.get("name") or f"criteria[{i}]", code))
    return out


def to_json(criteria: list[Criterion]) -> list[dict[str, Any]]:
    """As a training process's spec holds them (finetune/rft.py)."""
    return [
        {
            "name": c.name,
            "files": c.code.files,
            "entryFile": c.code.entry_file,
            "entryFunc": c.code.entry_func,
        }  # fmt: skip
        for c in criteria
    ]


def from_json(data: list[dict[str, Any]]) -> list[Criterion]:
    return [Criterion(d["name"], EvaluatorCode(d["files"], d["entryFile"], d["entryFunc"])) for d in data]  # fmt: skip


def combine(criteria: list[Criterion], scores: list[Score]) -> Score:
    """One row's Score from its criteria's (in the same order)."""
    if len(criteria) == 1:
        return scores[0]
    for criterion, score in zip(criteria, scores):
        if score.score is None:
            return Score(None, error=f"criterion {criterion.name}: {score.error}")
    metrics: dict[str, float] = {}
    for score in scores:
        metrics.update(score.metrics)
    reasons = [f"{c.name}: {s.reason}" for c, s in zip(criteria, scores) if s.reason]
    return Score(
        score=math.fsum(s.score for s in scores) / len(scores),  # type: ignore[misc]
        reason="; ".join(reasons),
        metrics=metrics,
        criteria={c.name: s.score for c, s in zip(criteria, scores)},  # type: ignore[misc]
    )


class CriteriaRunner:
    """EvaluatorRunner's interface over one runner per criterion."""

    def __init__(self, criteria: list[Criterion], env: dict[str, str], limits: ChildLimits) -> None:  # fmt: skip
        self.criteria = criteria
        self.runners: list[EvaluatorRunner] = []
        try:
            for criterion in criteria:
                self.runners.append(limits.runner(criterion.code, env))
        except BaseException:
            self.close()
            raise

    def start(self) -> None:
        """Start every criterion's child; EvaluatorLoadError names the one that does not load."""
        for criterion, runner in zip(self.criteria, self.runners):
            try:
                runner.start()
            except EvaluatorLoadError as exc:
                if len(self.runners) == 1:
                    raise
                raise EvaluatorLoadError(f"criterion {criterion.name}: {exc}") from None

    def score(self, rows: list[dict]) -> list[Score]:
        per_criterion = [runner.score(rows) for runner in self.runners]
        return [combine(self.criteria, list(scores)) for scores in zip(*per_criterion)]

    def log(self) -> str:
        if len(self.runners) == 1:
            return self.runners[0].log()
        return "".join(f"[{c.name}]\n{r.log()}" for c, r in zip(self.criteria, self.runners) if r.log())  # fmt: skip

    def close(self) -> None:
        for runner in self.runners:
            runner.close()

    def __enter__(self) -> CriteriaRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
