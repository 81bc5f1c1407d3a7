"""Architecture-independent facts about a loaded model, as the engine and server need them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class ModelConfig:
    architecture: str  # "gemma3", "llama", "qwen2", "qwen3"
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position: int  # context window in tokens
    bos_token_id: int | None
    eos_token_ids: list[int]
    add_bos_token: bool = True
    name: str = ""
    # Sampling defaults from the checkpoint (HF generation_config.json); empty for GGUF.
    generation_config: dict[str, Any] = field(default_factory=dict)
    chat_template: str | None = None
