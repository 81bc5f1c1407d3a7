"""Fireworks' fine-tuning jobs: supervised (SFT), DPO and reinforcement (RFT) (routes)."""

from girandole.api.finetune.route import install_finetune

__all__ = ["install_finetune"]
