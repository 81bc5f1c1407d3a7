"""`load_tokenizer(path)`: a `Tokenizer` from a GGUF file or a Hugging Face folder.

GGUF: the first load parses the file and converts its vocabulary (about 9 s parse + 2.5 s build
for Gemma), then caches `tokenizer.json` and `meta.json` under
`cache_dir()/tokenizers/v{N}-{file_key}/`; later loads read only those (under a second, with
`tokenizers` alone). The cache entry is written to a temporary folder and renamed into place, so
concurrent loaders never see a half-written entry.

HF folder: `tokenizer.json` (required), `tokenizer_config.json` (bos/eos, add_bos_token,
chat_template), `chat_template.jinja`, `generation_config.json` (eos ids); nothing is cached.

Loaded tokenizers are also kept per process (the same path returns the same object).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer

from girandole.engine.heap import release_free_heap
from girandole.tokenizer.harmony import keep_harmony_markers
from girandole.tokenizer.meta import TokenizerMeta, hf_folder_meta
from girandole.tokenizer.tokenizer import Tokenizer

CACHE_VERSION = 1

_lock = threading.Lock()
_loaded: dict[tuple[str, str], Tokenizer] = {}


def gguf_cache_path(path: str | os.PathLike) -> Path:
    """Folder that holds (or will hold) the converted tokenizer of a GGUF file."""
    from girandole.model.default import cache_dir
    from girandole.model.loader.gguf_file import file_key

    return cache_dir() / "tokenizers" / f"v{CACHE_VERSION}-{file_key(path)}"


def _read_cached(entry: Path) -> tuple[HFTokenizer, TokenizerMeta] | None:
    tok_file, meta_file = entry / "tokenizer.json", entry / "meta.json"
    if not (tok_file.is_file() and meta_file.is_file()):
        return None
    try:
        meta = TokenizerMeta.from_json(meta_file.read_text(encoding="utf-8"))
        return HFTokenizer.from_file(str(tok_file)), meta
    except Exception:  # a damaged or foreign entry: rebuild it
        return None


def _write_cache(entry: Path, hf: HFTokenizer, meta: TokenizerMeta) -> None:
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=entry.parent))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache may be shared
        hf.save(str(tmp / "tokenizer.json"))
        (tmp / "meta.json").write_text(meta.to_json(), encoding="utf-8")
        if entry.exists():  # a damaged entry, or another process just won the race
            if _read_cached(entry) is not None:
                return
            shutil.rmtree(entry, ignore_errors=True)
        try:
            os.rename(tmp, entry)
        except OSError:  # another process renamed its copy first
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_gguf_tokenizer(path: str | os.PathLike, use_cache: bool = True) -> Tokenizer:
    """Tokenizer of a GGUF file, converted once and cached (see the module docstring)."""
    path = Path(path)
    entry = gguf_cache_path(path)
    cached = _read_cached(entry) if use_cache else None
    if cached is None:
        from girandole.tokenizer.gguf_convert import convert_gguf

        hf, meta = convert_gguf(path)
        if not use_cache:
            return Tokenizer(hf, meta, name=path.name)
        _write_cache(entry, hf, meta)
    else:
        hf, meta = cached
    # `hf` as written (by this process or another); Tokenizer ignores a file that is not there
    return Tokenizer(hf, meta, name=path.name, source=entry / "tokenizer.json")


def load_hf_tokenizer(folder: str | os.PathLike) -> Tokenizer:
    """Tokenizer of a Hugging Face folder (needs tokenizer.json)."""
    folder = Path(folder)
    tok_file = folder / "tokenizer.json"
    if not tok_file.is_file():
        raise FileNotFoundError(f"no tokenizer.json in {folder}")
    hf = HFTokenizer.from_file(str(tok_file))
    # tokenizer.json may carry a truncation (all-MiniLM: 128 tokens) or padding setting: a
    # prompt too long for the model is the server's 400, never a silent cut
    hf.no_truncation()
    hf.no_padding()
    hf = keep_harmony_markers(hf)  # gpt-oss: its message markers decode as text
    return Tokenizer(hf, hf_folder_meta(folder, hf), name=folder.name, source=tok_file)


def load_tokenizer(path: str | os.PathLike | None = None, *, use_cache: bool = True) -> Tokenizer:
    """The tokenizer of a model: `path` is a .gguf file, a Hugging Face folder (tokenizer.json
    [+ tokenizer_config.json, generation_config.json]), or None for the default model.

    Returns the same object for the same (unchanged) path within a process.
    """
    if path is None:
        from girandole.model.default import resolve_model_path

        path = resolve_model_path(None)
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"tokenizer path does not exist: {p}")
    if p.is_dir() and not (p / "tokenizer.json").is_file():
        raise FileNotFoundError(f"no tokenizer.json in {p}")
    st = (p / "tokenizer.json").stat() if p.is_dir() else p.stat()
    key = (str(p.resolve()), f"{st.st_size}-{st.st_mtime_ns}-{use_cache}")
    with _lock:
        tok = _loaded.get(key)
        if tok is not None:
            return tok
        if p.is_dir():
            tok = load_hf_tokenizer(p)
        elif p.suffix == ".gguf":
            tok = load_gguf_tokenizer(p, use_cache=use_cache)
        elif p.name == "tokenizer.json":
            tok = load_hf_tokenizer(p.parent)
        else:
            raise ValueError(f"not a .gguf file or a folder with tokenizer.json: {p}")
        # the parse's garbage (~200 MiB for the default model's) handed back now, not after
        # the model's load, whose own transient memory would come on top of it
        release_free_heap()
        _loaded[key] = tok
        return tok
