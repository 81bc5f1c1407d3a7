"""RLOR trainer jobs' training data: rollouts the user sampled and scored in their own loop (through
this server's inference API, with their own reward code), and the policy-gradient objective over
them (GRPO-style, as finetune/grpo.py, without the sampling and the evaluator).

A row (JSONL line) is one scored rollout, in one of two shapes:

    {"messages": [...the prompt..., {"role": "assistant", "content": "..."}], "reward": 0.7}
    {"prompt": "raw text", "completion": "raw text", "reward": 0.7}

The reward may instead be `evaluation_result: {"score": 0.7}` (eval-protocol's rows); other
fields are allowed and ignored. A chat row is rendered with the model's chat template, as the
chat route renders it, and its last (assistant) message's tokens through the template's end of
turn are the rollout's (finetune/data.py encode_row); a raw row is the prompt's tokens, as the
completions route encodes them, then the completion's.

Rows with the same prompt (the same messages before the answer, or the same prompt text) form
a group; each rollout's advantage is its reward against its group's (grpo.advantages: reward
minus the group's mean, divided by its std). A group of one rollout, or of equal rewards, teaches
nothing and is skipped (and counted). The rollouts are taken as the policy's own (on-policy: the
importance ratio is 1), so the loss of a rollout's tokens is grpo.py's:

    l_i,t = -A_i * log pi(o_i,t | prompt, o_i,<t) + klBeta * KL_t   (k3 estimator, to the base)

averaged per rollout then over the step's rollouts (GRPO), or over every token of the step
(DAPO).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from girandole.finetune.data import Example, RowError, check_message, encode_row, read_jsonl
from girandole.finetune.grpo import advantages, token_losses
from girandole.model.lora import LoRAAdapter
from girandole.tokenizer.tokenizer import Tokenizer

ROW_SHAPES = (
    '{"messages": [..., {"role": "assistant", "content": ...}], "reward": R} or'
    ' {"prompt": ..., "completion": ..., "reward": R}'
)


@dataclass
class Rollout:
    """One checked row: its prompt (messages or text), its answer, its reward."""

    prompt: list[dict[str, Any]] | str
    completion: str
    reward: float

    @property
    def key(self) -> str:
        """What rollouts of one group share."""
        return json.dumps(self.prompt, sort_keys=True)


@dataclass
class Group:
    """The rollouts of one prompt: each one's tokens (`trained`: the answer's) and reward."""

    examples: list[Example]
    rewards: list[float]

    @property
    def length(self) -> int:
        return sum(len(ex.ids) for ex in self.examples)


def read_rollouts(data: bytes, what: str = "dataset") -> list[Rollout]:
    """The checked rows of each non-blank line; RowError names the first bad line and field."""
    rows = read_jsonl(data, what, check_rollout)
    if not rows:
        raise RowError(f"{what} has no rows")
    return rows


def _reward(row: dict[str, Any], where: str) -> float:
    has_reward, result = "reward" in row, row.get("evaluation_result")
    if has_reward == (result is not None):
        raise RowError(
            f"{where}: give the rollout's score as reward (a number) or evaluation_result.score,"
            " exactly one"
        )
    if has_reward:
        field, value = "reward", row["reward"]
    elif not isinstance(result, dict) or "score" not in result:
        raise RowError(f"{where}: evaluation_result must be an object with a score")
    else:
        field, value = "evaluation_result.score", result["score"]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RowError(f"{where}: {field} must be a finite number, got {json.dumps(value)[:40]}")
    return float(value)


def check_rollout(row: Any, where: str) -> Rollout:
    if not isinstance(row, dict) or not ("messages" in row or "prompt" in row):
        raise RowError(f"{where}: a row is a scored rollout, {ROW_SHAPES}")
    if "messages" in row and "prompt" in row:
        raise RowError(f"{where}: a row has messages or prompt and completion, not both")
    reward = _reward(row, where)
    if "prompt" in row:
        for field in ("prompt", "completion"):
            if not isinstance(row.get(field), str):
                raise RowError(f"{where}: {field} must be a string")
        if not row["completion"]:
            raise RowError(f"{where}: completion is empty: there is no answer to score")
        return Rollout(row["prompt"], row["completion"], reward)
    messages = row["messages"]
    if not isinstance(messages, list) or len(messages) < 2:
        raise RowError(
            f"{where}: messages must be a list of the prompt's messages and then the"
            " assistant's answer"
        )
    for i, message in enumerate(messages):
        check_message(message, i, where)
    last = len(messages) - 1
    if messages[last]["role"] != "assistant":
        raise RowError(
            f"{where}: messages[{last}].role must be assistant: the last message is the rollout's"
            " answer"
        )
    plain = [{"role": m["role"], "content": m["content"]} for m in messages]
    return Rollout(plain[:-1], plain[-1]["content"], reward)


def encode_rollout(
    tok: Tokenizer, template: str | None, rollout: Rollout, max_length: int, where: str
) -> Example:
    """The rollout's tokens, its answer's marked trained, cut to `max_length`; RowError when
    no answer token is left."""
    if isinstance(rollout.prompt, str):
        prompt = tok.encode(rollout.prompt)
        answer = tok.encode(rollout.completion, add_bos=False)
        ex = Example((prompt + answer)[:max_length], ([False] * len(prompt) + [True] * len(answer))[:max_length])  # fmt: skip
    else:
        # the prompt's own assistant turns (a multi-turn prompt) are not the rollout's
        prompt = [{**m, "weight": 0} if m["role"] == "assistant" else m for m in rollout.prompt]
        messages = [*prompt, {"role": "assistant", "content": rollout.completion}]
        ex = encode_row(tok, template, messages, max_length, where)
    if ex.num_trained == 0:
        raise RowError(
            f"{where}: its prompt is {len(ex.ids)} tokens or more, leaving none of the answer"
            f" within maxContextLength {max_length}"
        )
    return ex


def load_groups(
    path: str | Path, tok: Tokenizer, template: str | None, max_length: int
) -> list[Group]:
    """The dataset's rollouts, encoded and grouped by prompt (in the order prompts first come)."""
    groups: dict[str, Group] = {}
    for i, rollout in enumerate(read_rollouts(Path(path).read_bytes(), "dataset")):
        ex = encode_rollout(tok, template, rollout, max_length, f"dataset line {i + 1}")
        group = groups.setdefault(rollout.key, Group([], []))
        group.examples.append(ex)
        group.rewards.append(rollout.reward)
    return list(groups.values())


class RolloutObjective:
    """The trainer's objective (trainer.SftObjective's interface) over groups of scored
    rollouts."""

    def __init__(self, kl_beta: float, token_level: bool) -> None:
        self.kl_beta, self.token_level = kl_beta, token_level
        self.skipped_groups = 0  # over the job so far
        self._step: dict[str, float] = {}

    @staticmethod
    def length(group: Group) -> int:
        return group.length

    def losses(
        self, model: nn.Module, adapter: LoRAAdapter, window: list[Group], device
    ) -> Iterator[torch.Tensor]:
        kept: list[tuple[Example, float]] = []
        rewards = [r for group in window for r in group.rewards]
        skipped = 0
        for group in window:
            adv = advantages(list(group.rewards))
            if adv is None:
                skipped += 1
                continue
            kept += list(zip(group.examples, adv))
        self.skipped_groups += skipped
        self._step = {
            "meanReward": sum(rewards) / len(rewards),
            "rollouts": len(rewards),
            "groups": len(window),
            "stepSkippedGroups": skipped,
        }
        tokens = sum(ex.num_trained for ex, _ in kept)
        kls: list[float] = []
        for ex, advantage in kept:
            start = max(1, ex.trained.index(True))  # token 0 is never predicted
            end = len(ex.trained) - ex.trained[::-1].index(True)
            per_token = token_losses(model, adapter, ex.ids[:end], start, advantage, self.kl_beta, kls, device)  # fmt: skip
            if self.token_level:
                yield per_token.sum() / tokens
            else:
                yield per_token.mean() / len(kept)
        if kls:
            self._step["kl"] = sum(kls) / len(kls)

    def stats(self) -> dict[str, float]:
        return {**self._step, "skippedGroups": self.skipped_groups}
