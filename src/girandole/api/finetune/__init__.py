"""Fireworks' supervised fine-tuning jobs (routes)."""

from girandole.api.finetune.route import install_sft

__all__ = ["install_sft"]
