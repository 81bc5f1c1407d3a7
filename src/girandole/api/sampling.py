"""Request fields to SamplingParams: model defaults for omitted fields, per-choice seeds."""

from __future__ import annotations

from typing import Any

from girandole.api.errors import bad_request
from girandole.sampling.params import SamplingParams

# Used where neither the request nor the model's generation config gives a value.
FALLBACKS = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0}

_SEED_MOD = 2**63
_GOLDEN = 0x9E3779B97F4A7C15


def choice_seed(seed: int | None, k: int) -> int | None:
    """Choice 0 keeps the request's seed (so n=1 and n>1 agree on it); the others get distinct,
    deterministic seeds, so a seeded request with n>1 still gives different choices."""
    if seed is None or k == 0:
        return seed
    return (seed + k * _GOLDEN) % _SEED_MOD


def sampling_defaults(generation_config: dict[str, Any] | None) -> dict[str, Any]:
    config = generation_config or {}
    out = dict(FALLBACKS)
    for name in FALLBACKS:
        value = config.get(name)
        if isinstance(value, int | float) and not isinstance(value, bool):
            out[name] = type(FALLBACKS[name])(value)
    return out


def build_params(
    fields: dict[str, Any],
    defaults: dict[str, Any],
    *,
    max_tokens: int,
    stop: list[str],
    stop_token_ids: list[int] | None = None,
    seed: int | None,
) -> SamplingParams:
    values = {name: fields.get(name) for name in FALLBACKS}
    values = {k: (defaults[k] if v is None else v) for k, v in values.items()}
    if values["top_p"] == 0:
        # nucleus of probability 0 keeps only the most likely token: greedy
        values["top_p"] = 1.0
        values["top_k"] = 1
    try:
        return SamplingParams(
            temperature=float(values["temperature"]),
            top_p=float(values["top_p"]),
            top_k=int(values["top_k"]),
            min_p=float(values["min_p"]),
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
