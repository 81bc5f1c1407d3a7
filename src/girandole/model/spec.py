"""What the model code needs to know to build a network, whichever file format it came from.

Weights are named in GGUF style for every format (`token_embd.weight`, `blk.3.attn_q.weight`,
...): the safetensors loader maps Hugging Face names onto these. Conventions of the stored
values (also for both formats):
- 2-D weights are in nn.Linear layout [out, in];
- Gemma norm weights already include the +1 of Gemma's (1 + w) RMSNorm (as llama.cpp stores them);
- Llama Q/K projections are in Hugging Face's (rotate-half) order, not llama.cpp's permuted one.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NoReturn, Protocol

import torch

SUPPORTED_ARCHITECTURES = (
    "gemma3",
    "llama",
    "qwen2",
    "qwen3",
    "qwen3_moe",
    "mixtral",
    "gpt_oss",
)


@dataclass
class ArchSpec:
    architecture: str  # one of SUPPORTED_ARCHITECTURES
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position: int
    rope_scaling: dict[str, Any] | None = None  # HF rope_scaling dict ("linear", "llama3", ...)
    tie_embeddings: bool = False
    qkv_bias: bool = False
    qk_norm: bool = False
    # Per layer: None for global attention, else the sliding window in tokens.
    sliding_windows: list[int | None] = field(default_factory=list)
    # Gemma 3 only:
    rope_local_theta: float = 10000.0
    query_pre_attn_scalar: float | None = None
    final_logit_softcap: float | None = None
    attn_logit_softcap: float | None = None
    hidden_act: str = "silu"
    # Mixture-of-experts models (qwen3_moe, mixtral; model/moe.py): experts per MoE layer, how
    # many each token runs, each expert's intermediate size, whether the top-k router weights
    # are renormalised, and per layer whether its feed-forward is the MoE block (else dense).
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True
    moe_layers: list[bool] = field(default_factory=list)
    # gpt-oss only (model/gpt_oss.py): a learned per-head attention sink logit in every layer,
    # and the experts' clamped SwiGLU (gate clamped above, up both ways, at this limit).
    attn_sinks: bool = False
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0

    @property
    def num_moe_layers(self) -> int:
        return sum(self.moe_layers)


class Weights(Protocol):
    """A checkpoint's tensors under GGUF-style names."""

    def __contains__(self, name: str) -> bool: ...

    def qtype(self, name: str) -> str:
        """Storage type: "F32", "F16", "BF16", "Q8_0", "Q4_K", ..."""
        ...

    def get(self, name: str) -> torch.Tensor:
        """The tensor as float32 (dequantized), Linear layout for 2-D weights."""
        ...


ROPE_TYPES = ("default", "linear", "llama3", "yarn")  # what layers.rope_inv_freq computes
ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "gelu_pytorch_tanh")  # what layers.GatedMLP runs


def validate_spec(
    spec: ArchSpec, source: str, keys: dict[str, str], *, derived_head_dim: bool = False
) -> None:
    """Raise ValueError for values no network can be built from (caught at load, not as a 500
    on every request). `source` names the file; `keys` maps ArchSpec fields to the file's own
    key names; `derived_head_dim`: head_dim came from hidden_size / num_heads."""

    def key(name: str) -> str:
        return keys.get(name, name)

    def fail(message: str) -> NoReturn:
        raise ValueError(f"{source}: {message}")

    for name in (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_layers",
        "num_heads",
        "num_kv_heads",
        "head_dim",
        "max_position",
    ):
        value = getattr(spec, name)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            fail(f"{key(name)} must be a positive integer, got {value!r}")
    if spec.num_heads % spec.num_kv_heads:
        fail(
            f"{key('num_heads')} ({spec.num_heads}) must be a multiple of "
            f"{key('num_kv_heads')} ({spec.num_kv_heads})"
        )
    if derived_head_dim and spec.hidden_size % spec.num_heads:
        fail(
            f"{key('hidden_size')} ({spec.hidden_size}) must be a multiple of "
            f"{key('num_heads')} ({spec.num_heads})"
        )
    if spec.head_dim % 2:  # rotary embeddings rotate pairs of dimensions
        fail(f"{key('head_dim')} must be even, got {spec.head_dim}")
    for name in ("rope_theta", "rope_local_theta"):
        value = getattr(spec, name)
        if not (_real(value) and value > 0):
            fail(f"{key(name)} must be a positive number, got {value!r}")
    if not (_real(spec.rms_norm_eps) and spec.rms_norm_eps >= 0):
        fail(f"{key('rms_norm_eps')} must be a number >= 0, got {spec.rms_norm_eps!r}")
    for name in ("query_pre_attn_scalar", "final_logit_softcap", "attn_logit_softcap"):
        value = getattr(spec, name)  # None or 0: off (the softcaps)
        if value is not None and not (_real(value) and value >= 0):
            fail(f"{key(name)} must be a number >= 0, got {value!r}")
    if spec.query_pre_attn_scalar == 0:
        fail(f"{key('query_pre_attn_scalar')} must be > 0, got 0")
    if spec.hidden_act not in ACTIVATIONS:
        fail(
            f"unsupported {key('hidden_act')} {spec.hidden_act!r} "
            f"(supported: {', '.join(ACTIVATIONS)})"
        )
    if len(spec.sliding_windows) != spec.num_layers:
        fail(
            f"{key('sliding_windows')} lists {len(spec.sliding_windows)} layers, "
            f"the model has {spec.num_layers}"
        )
    for window in spec.sliding_windows:
        if window is not None and (isinstance(window, bool) or not isinstance(window, int)):
            fail(f"{key('sliding_window')} must be an integer, got {window!r}")
        if window is not None and window <= 0:
            fail(f"{key('sliding_window')} must be a positive integer, got {window!r}")
    _validate_rope_scaling(spec.rope_scaling, fail, key("rope_scaling"))
    if spec.num_experts:
        _validate_moe(spec, fail, key)


def _validate_moe(spec: ArchSpec, fail: Callable[[str], NoReturn], key: Callable) -> None:
    for name in ("num_experts", "num_experts_per_tok", "moe_intermediate_size"):
        value = getattr(spec, name)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            fail(f"{key(name)} must be a positive integer, got {value!r}")
    if spec.num_experts_per_tok > spec.num_experts:
        fail(
            f"{key('num_experts_per_tok')} ({spec.num_experts_per_tok}) must be at most "
            f"{key('num_experts')} ({spec.num_experts})"
        )
    if len(spec.moe_layers) != spec.num_layers:
        fail(f"the MoE layers list {len(spec.moe_layers)} layers, the model has {spec.num_layers}")


def _validate_rope_scaling(scaling: Any, fail: Callable[[str], NoReturn], key: str) -> None:
    if scaling is None:
        return
    if not isinstance(scaling, dict):
        fail(f"{key} must be an object, got {scaling!r}")
    rope_type = scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type not in ROPE_TYPES:
        fail(f"unsupported {key} type {rope_type!r} (supported: {', '.join(ROPE_TYPES)})")
    needed = {
        "default": (),
        "linear": ("factor",),
        "yarn": ("factor", "original_max_position_embeddings"),
    }.get(
        rope_type,
        ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    )
    for name in needed:
        value = scaling.get(name)
        if not (_real(value) and value > 0):
            fail(f"{key}.{name} must be a positive number, got {value!r}")
    if rope_type == "yarn":
        for name in ("beta_fast", "beta_slow", "attention_factor", "mscale", "mscale_all_dim"):
            value = scaling.get(name)
            if value is not None and not (_real(value) and value > 0):
                fail(f"{key}.{name} must be a positive number, got {value!r}")
    if rope_type == "llama3" and scaling["high_freq_factor"] == scaling["low_freq_factor"]:
        fail(f"{key}.high_freq_factor must differ from low_freq_factor")


def _real(value: Any) -> bool:
    """A finite int or float (not a bool, not a string)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


REQUIRED = object()  # config_number's default for a value that must be there


def config_number(value: Any, kind: type, where: str, default: Any = REQUIRED) -> Any:
    """A config or metadata value as `kind` (int or float): `default` where it is absent (None),
    else ValueError naming `where` ("<file>: <key>"). An integral float is an int (some configs
    write 2048.0); a bool or a string is neither."""
    what = "an integer" if kind is int else "a number"
    if value is None:
        if default is REQUIRED:
            raise ValueError(f"{where} must be {what}, got None")
        return default
    if kind is int and isinstance(value, float) and value.is_integer():
        value = int(value)
    ok = isinstance(value, int) if kind is int else isinstance(value, int | float)
    if isinstance(value, bool) or not ok:
        raise ValueError(f"{where} must be {what}, got {value!r}")
    return kind(value)


def check_token_id(value: Any, vocab_size: int, source: str, key: str) -> int:
    """`value` as a token id in [0, vocab_size), else ValueError naming `source` and `key`."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < vocab_size:
        raise ValueError(
            f"{source}: {key} must be a token id in [0, {vocab_size}) (the vocabulary), "
            f"got {value!r}"
        )
    return value


# GGUF suffix of each projection -> its module_shapes key (model/lora.py).
_PROJECTIONS = {
    "attn_q": "q_proj",
    "attn_k": "k_proj",
    "attn_v": "v_proj",
    "attn_output": "o_proj",
    "ffn_gate": "gate_proj",
    "ffn_up": "up_proj",
    "ffn_down": "down_proj",
}
# An expert's projection (model/moe.py's expert_prefix) and the router.
_EXPERT_TENSOR = re.compile(r"blk\.\d+\.exp\.\d+\.(ffn_gate|ffn_up|ffn_down)\.(weight|bias)")
_NORMS = ("attn_norm", "ffn_norm", "post_attention_norm", "post_ffw_norm")
_LAYER_TENSOR = re.compile(r"blk\.\d+\.(\w+)\.(weight|bias)")


def expected_shapes(spec: ArchSpec) -> Callable[[str], tuple[int, ...] | None]:
    """A function from a GGUF-style tensor name to the shape `spec` implies for it (None for a
    name it does not know: such a tensor is not checked)."""
    from girandole.model.lora import module_shapes  # lora imports this module

    projections = module_shapes(spec)
    h, v, d = spec.hidden_size, spec.vocab_size, spec.head_dim
    fixed = {
        "token_embd.weight": (v, h),
        "output.weight": (v, h),
        "output_norm.weight": (h,),
        "rope_freqs.weight": (d // 2,),
    }

    def shape(name: str) -> tuple[int, ...] | None:
        if name in fixed:
            return fixed[name]
        expert = _EXPERT_TENSOR.fullmatch(name)
        if expert is not None:
            i = spec.moe_intermediate_size
            shape = (h, i) if expert.group(1) == "ffn_down" else (i, h)
            return shape if expert.group(2) == "weight" else shape[:1]
        m = _LAYER_TENSOR.fullmatch(name)
        if m is None:
            return None
        part, kind = m.groups()
        if part in _PROJECTIONS:
            out_in = projections[_PROJECTIONS[part]]
            return out_in if kind == "weight" else out_in[:1]
        if kind == "weight" and part in _NORMS:
            return (h,)
        if kind == "weight" and part in ("attn_q_norm", "attn_k_norm"):
            return (d,)
        if kind == "weight" and part == "ffn_gate_inp":
            return (spec.num_experts, h)
        if kind == "bias" and part == "ffn_gate_inp":
            return (spec.num_experts,)
        if kind == "weight" and part == "attn_sinks":
            return (spec.num_heads,)
        return None

    return shape
