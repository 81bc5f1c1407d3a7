"""Helpers for the LoRA tests: PEFT adapters with random (non-zero) weights written by peft."""

from __future__ import annotations

from pathlib import Path

import torch

ALL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def write_peft_adapter(
    hf_model,
    folder: Path,
    *,
    rank: int = 8,
    alpha: float = 16,
    targets: list[str] | None = None,
    rslora: bool = False,
    seed: int = 1,
    std: float = 0.1,
):
    """Wrap `hf_model` in a peft LoRA (random A and B: peft starts B at zero), save the adapter
    to `folder`, and return the peft model (the transformers + peft reference)."""
    import copy

    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=targets or ALL_TARGETS,
        use_rslora=rslora,
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(copy.deepcopy(hf_model), config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    peft_model.eval()
    peft_model.save_pretrained(folder)
    return peft_model
