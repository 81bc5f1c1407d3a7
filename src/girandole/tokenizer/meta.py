"""Tokenizer metadata that `tokenizer.json` does not carry: BOS/EOS, stop ids, chat template."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# Token texts llama.cpp treats as end-of-generation (llama-vocab.cpp, special_eog_ids) when the
# token is a control/special token. We use the same list for GGUF files and HF folders, so one
# model stops on the same tokens whichever way it is loaded.
EOG_TOKEN_TEXTS = frozenset(
    {
        "<|eot_id|>",
        "<|im_end|>",
        "<|end|>",
        "<|return|>",
        "<|call|>",
        "<end_of_turn>",
        "<|endoftext|>",
        "<|eom_id|>",
        "<EOT>",
        "_<EOT>",
        "<|end_of_text|>",
        "<end_of_utterance>",
        "<｜end▁of▁sentence｜>",
    }
)


def eog_token_ids(special_tokens: Iterable[tuple[int, str]]) -> list[int]:
    """Ids among `(id, text)` special tokens whose text marks the end of generation."""
    return sorted(tid for tid, text in special_tokens if text in EOG_TOKEN_TEXTS)


@dataclass
class TokenizerMeta:
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    bos_token: str | None = None
    eos_token: str | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    add_bos: bool = False
    add_eos: bool = False
    chat_template: str | None = None
    source: str = ""  # "gguf" or "hf"

    def to_json(self) -> str:
        return json.dumps({"version": META_VERSION, **asdict(self)}, ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str) -> TokenizerMeta:
        data = json.loads(text)
        if data.pop("version", None) != META_VERSION:
            raise ValueError("tokenizer metadata version mismatch")
        return cls(**data)


META_VERSION = 1


def _token_content(value: Any) -> str | None:
    """`bos_token` in tokenizer_config.json is a string or an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: Path, strict: bool = True) -> dict[str, Any]:
    """A JSON object file ({} where absent). Not JSON or not an object: a ValueError naming the
    file, or with `strict` off {} (generation_config.json: the model loader warns of it)."""
    from girandole.model.loader.safetensors import read_json_object  # torch: only when needed

    if not path.is_file():
        return {}
    try:
        return read_json_object(path)
    except ValueError:
        if strict:
            raise
        return {}


def _chat_template_of_folder(folder: Path, config: dict[str, Any]) -> str | None:
    """Chat template from chat_template.jinja, chat_template.json or tokenizer_config.json."""
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    template = _read_json(folder / "chat_template.json").get("chat_template")
    if template is None:
        template = config.get("chat_template")
    if isinstance(
        template, list
    ):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    return template if isinstance(template, str) else None


def hf_folder_meta(folder: Path, hf: Any) -> TokenizerMeta:
    """Metadata of a Hugging Face folder: tokenizer_config.json, generation_config.json and the
    tokenizer itself (`hf`, a `tokenizers.Tokenizer`)."""
    config = _read_json(folder / "tokenizer_config.json")
    gen = _read_json(folder / "generation_config.json", strict=False)
    model_config = _read_json(folder / "config.json")

    def tid(text: str | None) -> int | None:
        return hf.token_to_id(text) if text is not None else None

    bos = _token_content(config.get("bos_token"))
    eos = _token_content(config.get("eos_token"))
    bos_id, eos_id = tid(bos), tid(eos)
    if bos_id is None:
        bos_id = gen.get("bos_token_id", model_config.get("bos_token_id"))
        bos_id = bos_id if isinstance(bos_id, int) else None
        bos = hf.id_to_token(bos_id) if bos_id is not None else None

    gen_eos = gen.get("eos_token_id", model_config.get("eos_token_id"))
    gen_eos = [gen_eos] if isinstance(gen_eos, int) else list(gen_eos or [])
    if eos_id is None and gen_eos:
        eos_id = gen_eos[0]
        eos = hf.id_to_token(eos_id)

    if "add_bos_token" in config:
        add_bos = bool(config["add_bos_token"]) and bos_id is not None
    else:
        # no flag: BOS is added exactly when the tokenizer's post-processor adds it (Llama 3)
        with_special = hf.encode("a", add_special_tokens=True).ids
        add_bos = bos_id is not None and bool(with_special) and with_special[0] == bos_id

    stop: list[int] = []
    for t in [eos_id, *gen_eos]:
        if isinstance(t, int) and t not in stop:
            stop.append(t)
    special = [(i, a.content) for i, a in hf.get_added_tokens_decoder().items() if a.special]
    for t in eog_token_ids(special):
        if t not in stop:
            stop.append(t)

    return TokenizerMeta(
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        bos_token=bos,
        eos_token=eos,
        stop_token_ids=stop,
        add_bos=add_bos,
        add_eos=bool(config.get("add_eos_token", False)),
        chat_template=_chat_template_of_folder(folder, config),
        source="hf",
    )
