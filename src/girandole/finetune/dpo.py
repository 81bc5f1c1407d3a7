"""Direct Preference Optimization (Rafailov et al. 2023) of a LoRA adapter.

Per preference pair, with logp the summed log-probability of an output's trained tokens:

    loss = -log sigmoid(beta * ((logp_pi(chosen) - logp_ref(chosen))
                                - (logp_pi(rejected) - logp_ref(rejected))))

averaged over the pairs of each optimizer step. The reference policy is the model before
training: the base model (a new adapter starts as it: B is zero), or the warm-start adapter as
it was read. Its log-probabilities are computed once, before the first step, under no_grad.
Each step reports the loss, the reward accuracy (the pairs whose implicit reward
beta * (logp_pi - logp_ref) is higher for the chosen output) and the mean reward margin.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from girandole.finetune.preference import Pair, encode_pair, read_pairs
from girandole.finetune.trainer import row_loss
from girandole.model.lora import LoRAAdapter


def load_pairs(path: str, tok, template, max_length: int) -> list[Pair]:
    pairs = [
        encode_pair(tok, template, pair, max_length, f"dataset row {i + 1}")
        for i, pair in enumerate(read_pairs(Path(path).read_bytes(), "dataset"))
    ]
    # a pair whose output was cut away by maxContextLength has nothing to compare
    pairs = [p for p in pairs if p.chosen.num_trained and p.rejected.num_trained]
    if not pairs:
        raise ValueError("no row has output tokens within maxContextLength")
    return pairs


def logp(model: nn.Module, adapter: LoRAAdapter, ex, device: torch.device) -> torch.Tensor:
    """The summed log-probability of the example's trained tokens."""
    return -row_loss(model, adapter, ex, device)


class PairObjective(ABC):
    """A loss over preference pairs, averaged over the pairs of each step; `pair_loss` gives a
    pair's loss and its reward margin (what stats() reports: the share of pairs above 0, the
    mean)."""

    def __init__(self) -> None:
        self._margins: list[float] = []

    @staticmethod
    def length(pair: Pair) -> int:
        return pair.length

    @abstractmethod
    def pair_loss(
        self, model: nn.Module, adapter: LoRAAdapter, pair: Pair, device: torch.device
    ) -> tuple[torch.Tensor, float]:
        """The pair's loss (a graph to backpropagate) and its reward margin: DPO's, ORPO's."""

    def losses(
        self, model: nn.Module, adapter: LoRAAdapter, window: list[Pair], device: torch.device
    ) -> Iterator[torch.Tensor]:
        self._margins = []
        for pair in window:
            loss, margin = self.pair_loss(model, adapter, pair, device)
            self._margins.append(margin)
            yield loss / len(window)

    def stats(self) -> dict[str, float]:
        margins = self._margins or [0.0]
        return {
            "rewardAccuracy": sum(m > 0 for m in margins) / len(margins),
            "rewardMargin": sum(margins) / len(margins),
        }


class DpoObjective(PairObjective):
    def __init__(
        self,
        model: nn.Module,
        reference: LoRAAdapter,
        pairs: list[Pair],
        beta: float,
        device: torch.device,
    ) -> None:
        super().__init__()
        self.beta = beta
        with torch.no_grad():
            self.reference = {
                id(p): (
                    logp(model, reference, p.chosen, device).item(),
                    logp(model, reference, p.rejected, device).item(),
                )
                for p in pairs
            }

    def pair_loss(
        self, model: nn.Module, adapter: LoRAAdapter, pair: Pair, device: torch.device
    ) -> tuple[torch.Tensor, float]:
        ref_chosen, ref_rejected = self.reference[id(pair)]
        chosen = logp(model, adapter, pair.chosen, device) - ref_chosen
        rejected = logp(model, adapter, pair.rejected, device) - ref_rejected
        margin = self.beta * (chosen - rejected)
        return -nn.functional.logsigmoid(margin), margin.item()
