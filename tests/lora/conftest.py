"""Fixtures for the LoRA tests: a tiny Llama (with tokenizer) and PEFT adapters of it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# pytest runs with --import-mode=importlib: make the helpers importable by the tests here.
sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent / "model"))

ADAPTERS = ("a1", "a2", "a3", "a4")


@pytest.fixture(scope="session")
def llama_adapters(tiny_llama_dir, tmp_path_factory) -> dict[str, Path]:
    """Four random adapters of the tiny Llama (ranks 4..16, all targets), written by peft."""
    from lora_helpers import write_peft_adapter
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).float().eval()
    root = tmp_path_factory.mktemp("llama-adapters")
    out = {}
    for i, name in enumerate(ADAPTERS):
        rank = (4, 8, 16, 8)[i]
        write_peft_adapter(hf, root / name, rank=rank, alpha=2 * rank, seed=10 + i, std=0.3)
        out[name] = root / name
    return out
