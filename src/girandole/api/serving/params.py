"""Request fields to SamplingParams: model defaults for omitted fields, per-choice seeds.

Omitted fields take the model's generation config (HF `generation_config.json`: temperature,
top_p, top_k, min_p, typical_p, repetition_penalty), else FALLBACKS. `applied_options` is what
the `fireworks-sampling-options` header reports: the values a request actually ran with.
"""

from __future__ import annotations

from typing import Any

from girandole.api.http.errors import bad_request
from girandole.sampling.params import SamplingParams

# Used where neither the request nor the model's generation config gives a value.
FALLBACKS: dict[str, Any] = {
    "temperature": 1.0,
    "top_p": 1.0,
    "top_k": 0,
    "min_p": 0.0,
    "typical_p": 1.0,
    "repetition_penalty": 1.0,
}
# Fields with fixed defaults (HF generation configs have no such keys).
PENALTY_DEFAULTS: dict[str, Any] = {"frequency_penalty": 0.0, "presence_penalty": 0.0}
MIROSTAT_LR_DEFAULT = 0.1  # Fireworks' docs example

_SEED_MOD = 2**63
_GOLDEN = 0x9E3779B97F4A7C15


def choice_seed(seed: int | None, k: int) -> int | None:
    """Choice 0 keeps the request's seed (so n=1 and n>1 agree on it); the others get distinct,
    deterministic seeds, so a seeded request with n>1 still gives different choices."""
    if seed is None or k == 0:
        return seed
    return (seed + k * _GOLDEN) % _SEED_MOD


def special_stop_ids(stop: list[str], tokenizer: Any) -> list[int]:
    """The ids of the stop strings that are a special token's string ("<start_of_turn>",
    "<|im_end|>"): the text never shows special tokens, so such a stop string could never match
    it; generating the token itself stops the output (as EOS does: counted, no text)."""
    ids = []
    for s in stop:
        token = tokenizer.token_to_id(s)
        if token is not None and tokenizer.is_special(token) and token not in ids:
            ids.append(token)
    return ids


def sampling_defaults(generation_config: dict[str, Any] | None) -> dict[str, Any]:
    config = generation_config or {}
    out = dict(FALLBACKS)
    for name in FALLBACKS:
        value = config.get(name)
        if isinstance(value, int | float) and not isinstance(value, bool):
            out[name] = type(FALLBACKS[name])(value)
    if not 0 < out["typical_p"] <= 1:
        out["typical_p"] = 1.0
    if not 0 < out["repetition_penalty"] <= 2:
        out["repetition_penalty"] = 1.0
    return out


def check_logit_bias_size(raw: Any, vocab_size: int) -> None:
    """Refuse, before it is validated, a `logit_bias` of more keys than the vocabulary has
    tokens: some must name the same token ("7", "07"). A 16 MB body of a million such keys
    held the event loop (every stream) for 10 s, validated and parsed one key at a time."""
    if isinstance(raw, dict) and len(raw) > vocab_size:
        raise bad_request(
            f"logit_bias has {len(raw)} keys, more than the model's {vocab_size} tokens: give"
            " each token id once",
            "logit_bias",
        )


def parse_logit_bias(raw: dict[str, float] | None, vocab_size: int) -> dict[int, float]:
    """`logit_bias` keys are token ids written as strings ("42"); anything else is a 400."""
    out: dict[int, float] = {}
    for key, bias in (raw or {}).items():
        digits = key.lstrip("0") or "0"
        # int() refuses strings of over 4300 digits (a ValueError: a 500); a token id has few
        ok = key.isascii() and key.isdigit() and len(digits) <= len(str(vocab_size))
        token = int(digits) if ok else None
        if token is None or token >= vocab_size:
            raise bad_request(
                f"logit_bias keys must be token ids (decimal strings from 0 to {vocab_size - 1}),"
                f" got {key!r}",
                "logit_bias",
            )
        out[token] = float(bias)
    return out


def build_params(
    fields: dict[str, Any],
    defaults: dict[str, Any],
    *,
    max_tokens: int,
    stop: list[str],
    stop_token_ids: list[int] | None = None,
    seed: int | None,
    logit_bias: dict[int, float] | None = None,
) -> SamplingParams:
    values = {name: fields.get(name) for name in FALLBACKS}
    values = {k: (defaults[k] if v is None else v) for k, v in values.items()}
    if values["top_p"] == 0:
        # nucleus of probability 0 keeps only the most likely token: greedy
        values["top_p"] = 1.0
        values["top_k"] = 1
    penalties = {k: fields.get(k) if fields.get(k) is not None else v
                 for k, v in PENALTY_DEFAULTS.items()}  # fmt: skip
    mirostat_lr = fields.get("mirostat_lr")
    try:
        return SamplingParams(
            temperature=float(values["temperature"]),
            top_p=float(values["top_p"]),
            top_k=int(values["top_k"]),
            min_p=float(values["min_p"]),
            typical_p=float(values["typical_p"]),
            repetition_penalty=float(values["repetition_penalty"]),
            frequency_penalty=float(penalties["frequency_penalty"]),
            presence_penalty=float(penalties["presence_penalty"]),
            mirostat_target=fields.get("mirostat_target"),
            mirostat_lr=float(MIROSTAT_LR_DEFAULT if mirostat_lr is None else mirostat_lr),
            logit_bias=dict(logit_bias or {}),
            max_tokens=max_tokens,
            stop=stop,
            stop_token_ids=list(stop_token_ids or []),
            ignore_eos=bool(fields.get("ignore_eos") or False),
            seed=seed,
        )
    except ValueError as exc:
        message = str(exc)
        param = message.split(" ", 1)[0] if message else None
        raise bad_request(message, param) from None


MAX_LOGIT_BIAS_IN_HEADER = 64  # entries shown in fireworks-sampling-options; above it, a count


def applied_options(params: SamplingParams) -> dict[str, Any]:
    """The sampling values a request ran with, for the `fireworks-sampling-options` header."""
    out: dict[str, Any] = {
        "temperature": params.temperature,
        "top_p": params.top_p,
        "top_k": params.top_k,
        "min_p": params.min_p,
        "typical_p": params.typical_p,
        "frequency_penalty": params.frequency_penalty,
        "presence_penalty": params.presence_penalty,
        "repetition_penalty": params.repetition_penalty,
        "max_tokens": params.max_tokens,
    }
    if params.mirostat_target is not None:
        out["mirostat_target"] = params.mirostat_target
        out["mirostat_lr"] = params.mirostat_lr
    if len(params.logit_bias) > MAX_LOGIT_BIAS_IN_HEADER:
        # a header stays small: HTTP clients (httpx) refuse to read responses with huge ones
        out["logit_bias_count"] = len(params.logit_bias)
    elif params.logit_bias:
        out["logit_bias"] = {str(k): v for k, v in params.logit_bias.items()}
    if params.seed is not None:
        out["seed"] = params.seed
    return out
