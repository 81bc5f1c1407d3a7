"""SamplingParams: how one request picks its tokens, what it reports, and when it stops."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from girandole.sampling.grammar import GrammarSpec

# Temperatures below this sample greedily (vLLM's _SAMPLING_EPS): at 1e-5 the most likely token
# already outweighs one 0.01 logit behind it by e^1000; at ~1e-38 x / t overflows.
GREEDY_BELOW = 1e-5

_MASK32 = 2**32 - 1

SAMPLING_MASK_MODES = ("count", "non_zero_list", "non_zero_buffer")


def generator_seed(seed: int) -> int:
    """The seed a request's torch.Generator gets for `seed`. The CPU generator's Mersenne
    Twister reads only the low 32 bits of its seed, so 5 and 2**32 + 5 drew the same numbers.
    The seed's high 32 bits (as 64 bits: -1 is 2**64 - 1) are mixed (murmur3's fmix32, a
    bijection that keeps 0) into its low ones: seeds below 2**32 are kept as they are, and seeds
    that differ only above bit 31 differ here."""
    h = (seed >> 32) & _MASK32
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & _MASK32
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & _MASK32
    h ^= h >> 16
    return (seed & _MASK32) ^ h


@dataclass
class SamplingParams:
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    min_p: float = 0.0
    typical_p: float = 1.0  # locally typical sampling; 1 = off
    max_tokens: int = 16
    min_tokens: int = 0  # EOS and stop token ids are suppressed until this many tokens exist
    stop: list[str] = field(default_factory=list)  # stop strings, trimmed from the text
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    seed: int | None = None
    # Penalties: presence/frequency (OpenAI semantics, over generated tokens) and repetition
    # (multiplicative, CTRL-style, over prompt and generated tokens).
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    # Mirostat v2: target surprise (tau) and learning rate (eta); None = off.
    mirostat_target: float | None = None
    mirostat_lr: float = 0.1
    # Introspection: top-N alternatives per generated token (None = no logprobs; 0 = only the
    # chosen token's) and per prompt token (echo with logprobs).
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    # With logprobs: also report, per generated token, which tokens the sampling distribution
    # allowed (non-zero probability): "count", "non_zero_list" or "non_zero_buffer".
    sampling_mask: str | None = None
    # With logprobs on a mixture-of-experts model: also report, per token, the experts the
    # router chose at the position that predicted it (router replay; SampleResult.routing).
    routing_matrix: bool = False
    # Constrained decoding (response_format, tools): the output must match this grammar.
    grammar: GrammarSpec | None = None
    # Speculative decoding: token ids of the expected output (`prediction`/`speculation`),
    # proposed to the model and verified; what is generated does not depend on them.
    speculation: list[int] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.stop is not None and not isinstance(self.stop, list | tuple):
            raise ValueError(f"stop must be a string or a list of strings, got {self.stop!r}")
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self.logit_bias = {int(k): float(v) for k, v in (self.logit_bias or {}).items()}
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the field for any value outside its range."""

        def finite(name: str) -> float:
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
            return value

        def integer(name: str, optional: bool = False) -> int | None:
            value = getattr(self, name)
            if optional and value is None:
                return None
            # a bool is an int to Python, never a count or a seed here; a float or a numeric
            # string would reach the engine (2.5 tokens generated 3, a top_k of 1.5 failed the
            # request inside its step)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name} must be an integer, got {value!r}")
            return value

        for name in ("max_tokens", "min_tokens", "top_k"):
            integer(name)
        integer("seed", optional=True)
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, int):  # True: 1, as an int
                raise ValueError(f"{name} must be an integer, got {value!r}")
        if any(isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must be token ids, got {self.stop_token_ids!r}")
        spec = self.speculation
        if spec is not None:
            bad = (
                spec
                if not isinstance(spec, list | tuple)
                else next((t for t in spec if isinstance(t, bool) or not isinstance(t, int)), None)
            )
            if bad is not None:
                raise ValueError(
                    "speculation must be a list of token ids (for text: "
                    f"tokenizer.encode(text, add_bos=False)), got {type(bad).__name__} {bad!r:.40}"
                )
        if self.grammar is not None and not isinstance(self.grammar, GrammarSpec):
            raise ValueError(f"grammar must be a GrammarSpec, got {type(self.grammar).__name__}")
        if self.sampling_mask not in (None, *SAMPLING_MASK_MODES):
            raise ValueError(
                f"sampling_mask must be one of {', '.join(SAMPLING_MASK_MODES)} or None, "
                f"got {self.sampling_mask!r}"
            )
        if not finite("temperature") >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < finite("top_p") <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 <= finite("min_p") <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if not 0 < finite("typical_p") <= 1:
            raise ValueError(f"typical_p must be in (0, 1], got {self.typical_p}")
        if self.max_tokens < 0:
            raise ValueError(f"max_tokens must be >= 0, got {self.max_tokens}")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError(
                f"min_tokens must be from 0 to max_tokens ({self.max_tokens}), got {self.min_tokens}"
            )
        if any(not isinstance(s, str) or s == "" for s in self.stop):
            raise ValueError("stop strings must be non-empty strings")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= finite(name) <= 2:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if not 0 < finite("repetition_penalty") <= 2:
            raise ValueError(f"repetition_penalty must be in (0, 2], got {self.repetition_penalty}")
        for token, bias in self.logit_bias.items():
            if not -100 <= bias <= 100:
                raise ValueError(f"logit_bias for token {token} must be in [-100, 100], got {bias}")
        if self.mirostat_target is not None:
            if not finite("mirostat_target") >= 0:
                raise ValueError(f"mirostat_target must be >= 0, got {self.mirostat_target}")
            if not finite("mirostat_lr") > 0:
                raise ValueError(f"mirostat_lr must be > 0, got {self.mirostat_lr}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= 20:
                raise ValueError(f"{name} must be in [0, 20], got {value}")

    @property
    def greedy(self) -> bool:
        """Temperature 0 (or below GREEDY_BELOW, where x / t overflows float32 for a tiny
        enough t and the distribution is one-hot anyway), or top-k 1."""
        return self.temperature < GREEDY_BELOW or self.top_k == 1

    @property
    def uses_penalties(self) -> bool:
        return bool(
            self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0
        )
