"""Fixtures for the LoRA tests: a tiny Llama (with tokenizer) and PEFT adapters of it."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

# pytest runs with --import-mode=importlib: make the helpers importable by the tests here
# (appended, so that other test folders' `import conftest` still finds their own), and
# tests/model/model_helpers.py under its own name.
sys.path.append(str(Path(__file__).parent))
if "model_helpers" not in sys.modules:
    _spec = importlib.util.spec_from_file_location(
        "model_helpers", Path(__file__).parent.parent / "model" / "model_helpers.py"
    )
    _module = importlib.util.module_from_spec(_spec)
    sys.modules["model_helpers"] = _module
    _spec.loader.exec_module(_module)

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
