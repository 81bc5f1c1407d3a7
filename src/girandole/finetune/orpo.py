"""Odds Ratio Preference Optimization (Hong et al. 2024) of a LoRA adapter: no reference model.

Per preference pair, with m(y) the mean log-probability per trained token of output y and
log odds(y) = m(y) - log(1 - exp(m(y))):

    loss = -m(chosen) + beta * -log sigmoid(log odds(chosen) - log odds(rejected))

averaged over the pairs of each optimizer step: the SFT loss of the chosen output plus the odds
ratio term, weighted by beta (the paper's lambda; TRL's ORPO calls it beta too, default 0.1).
Each step reports the loss, the reward accuracy (the pairs whose chosen output has the higher
odds) and the mean of beta * (log odds(chosen) - log odds(rejected)).
"""

from __future__ import annotations

import torch
from torch import nn

from girandole.finetune.dpo import PairObjective, logp
from girandole.finetune.preference import Pair
from girandole.model.lora import LoRAAdapter


def log_odds(mean_logp: torch.Tensor) -> torch.Tensor:
    # p -> 1 sends log(1 - p) to -inf: keep p just below 1
    mean_logp = mean_logp.clamp(max=-1e-6)
    return mean_logp - torch.log(-torch.expm1(mean_logp))


class OrpoObjective(PairObjective):
    def __init__(self, beta: float) -> None:
        super().__init__()
        self.beta = beta

    def pair_loss(
        self, model: nn.Module, adapter: LoRAAdapter, pair: Pair, device: torch.device
    ) -> tuple[torch.Tensor, float]:
        chosen = logp(model, adapter, pair.chosen, device) / pair.chosen.num_trained
        rejected = logp(model, adapter, pair.rejected, device) / pair.rejected.num_trained
        ratio = log_odds(chosen) - log_odds(rejected)
        loss = -chosen - self.beta * nn.functional.logsigmoid(ratio)
        return loss, self.beta * ratio.item()
