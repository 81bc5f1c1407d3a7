"""Fireworks' fine-tuning jobs: supervised (SFT) and DPO (routes)."""

from girandole.api.finetune.route import install_finetune

__all__ = ["install_finetune"]
