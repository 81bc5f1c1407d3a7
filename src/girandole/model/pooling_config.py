"""How a model's embedding is pooled, from sentence-transformers' files in its folder.

sentence-transformers saves a pipeline as `modules.json` (Transformer -> Pooling [-> Normalize]),
with the Pooling module's `config.json` in its own folder (`1_Pooling/config.json`): one of
`pooling_mode_cls_token`, `pooling_mode_mean_tokens` or `pooling_mode_lasttoken` true. bge uses
CLS, gte, e5 and all-MiniLM mean, Qwen3-Embedding the last token; a `Normalize` module scales
the vector to unit length (all-MiniLM, Qwen3-Embedding).

Without `modules.json` an encoder is pooled as sentence-transformers pools a plain transformers
model: the mean over every token (special tokens included), not normalised. Modules that change
the vector otherwise (Dense projections, max pooling) are refused at load, naming them: serving
a vector other than the one the model was trained to give would be silently wrong.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from girandole.model.config import EmbeddingModel

EncoderPooling = Literal["cls", "mean", "last"]

# Pooling's config keys -> our method; any other mode that is true is refused
_MODES: dict[str, EncoderPooling] = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_lasttoken": "last",
}
_OTHER_MODES = (
    "pooling_mode_max_tokens",
    "pooling_mode_mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens",
)
_TRANSFORMER = "sentence_transformers.models.Transformer"
_POOLING = "sentence_transformers.models.Pooling"
_NORMALIZE = "sentence_transformers.models.Normalize"


@dataclass(frozen=True)
class PoolingConfig:
    method: EncoderPooling
    normalize: bool
    from_sentence_transformers: bool  # False: the default (no modules.json)


DEFAULT_POOLING = PoolingConfig("mean", False, False)


def read_pooling_config(folder: Path) -> PoolingConfig | None:
    """The folder's sentence-transformers pooling, or None when it has no modules.json.
    ValueError naming the file for a pipeline this server cannot reproduce."""
    modules_path = folder / "modules.json"
    if not modules_path.is_file():
        return None
    modules = _read_json(modules_path)
    if not isinstance(modules, list) or not all(isinstance(m, dict) for m in modules):
        raise ValueError(f"{modules_path}: must hold a list of module objects")
    method: EncoderPooling | None = None
    normalize = False
    for module in modules:
        kind = module.get("type")
        if kind == _TRANSFORMER:
            continue
        if kind == _POOLING:
            path = folder / str(module.get("path") or "1_Pooling") / "config.json"
            method = _pooling_method(path)
        elif kind == _NORMALIZE:
            normalize = True
        else:
            raise ValueError(
                f"{modules_path}: module {kind!r} is not supported (supported: Transformer,"
                " Pooling with CLS, mean or last-token pooling, Normalize)"
            )
    if method is None:
        raise ValueError(f"{modules_path}: no {_POOLING} module")
    return PoolingConfig(method, normalize, True)


def _pooling_method(path: Path) -> EncoderPooling:
    config = _read_json(path)
    if not isinstance(config, dict):
        raise ValueError(f"{path}: must hold a JSON object")
    on = [key for key in (*_MODES, *_OTHER_MODES) if config.get(key) is True]
    if len(on) != 1 or on[0] not in _MODES:
        raise ValueError(
            f"{path}: pooling {', '.join(on) or 'none'} is not supported: exactly one of"
            f" {', '.join(_MODES)} must be true"
        )
    return _MODES[on[0]]


def _read_json(path: Path) -> object:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{path}: missing (modules.json names it)") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None


# Qwen3-Reranker ships as a plain Qwen3ForCausalLM: only its name says what it is (vLLM asks
# for an architecture override instead). The folder's path holds the hub repo's name
# (models--Qwen--Qwen3-Reranker-0.6B/snapshots/...), or config.json's _name_or_path may.
_YES_NO_RERANKER = re.compile(r"qwen3[-_]?reranker", re.IGNORECASE)


def decoder_embedding(
    folder: Path, arch: str, name_or_path: object = None
) -> EmbeddingModel | None:
    """A decoder checkpoint's embedding or rerank setup: Qwen3-Embedding (last-token pooling,
    Normalize, its tokenizer appending <|endoftext|>) from its sentence-transformers files;
    Qwen3-Reranker from its name; None for a plain LLM (mean pooling: girandole.engine.pooling,
    rerank by query likelihood)."""
    from tokenizers import Tokenizer

    from girandole.model.config import EmbeddingModel
    from girandole.tokenizer.framing import single_frame

    names = f"{folder.resolve()} {name_or_path if isinstance(name_or_path, str) else ''}"
    if arch == "qwen3" and _YES_NO_RERANKER.search(names):
        return EmbeddingModel("yes-no", "last", False)
    pooling = read_pooling_config(folder)
    if pooling is None:
        return None
    if pooling.method == "cls":  # a decoder's first position has seen only itself
        raise ValueError(f"{folder / 'modules.json'}: CLS pooling needs an encoder model")
    prefix: tuple[int, ...] = ()
    suffix: tuple[int, ...] = ()
    if (folder / "tokenizer.json").is_file():
        prefix, suffix = single_frame(Tokenizer.from_file(str(folder / "tokenizer.json")))
    return EmbeddingModel("embed", pooling.method, pooling.normalize, prefix, suffix)
