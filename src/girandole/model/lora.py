"""PEFT LoRA adapters: reading and checking them against a base model, applying them per row of
a batch (several adapters and the base in one forward), and merging one into the weights.

An adapter folder holds `adapter_config.json` and `adapter_model.safetensors` as peft writes
them. Its A [r, in] and B [out, r] matrices target the attention (q/k/v/o_proj) and MLP
(gate/up/down_proj) projections. The model fuses q/k/v and gate/up into one linear each, so an
adapter's matrices are fused the same way: A stacked [k*r, in], B block-diagonal [sum out, k*r],
the scaling (lora_alpha / r, or / sqrt(r) with rsLoRA) folded into B. A missing member of a fused
group contributes zero rows.

In a forward, `LoRALinear` wraps a base linear and reads the batch's `LoRABatch` from the
forward context: for each adapter present, its rows are gathered, multiplied by A then B, and
added back (the segmented matmul of punica / S-LoRA; on CPU one native call per linear,
kernels/csrc/lora.c). Rows of the base model cost nothing.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from girandole.model.context import get_context
from girandole.model.kernels import lora as lora_kernel
from girandole.model.spec import ArchSpec

MAX_RANK = 64

# peft module name -> (the model's fused linear, position in it)
TARGETS: dict[str, tuple[str, int]] = {
    "q_proj": ("qkv", 0),
    "k_proj": ("qkv", 1),
    "v_proj": ("qkv", 2),
    "o_proj": ("o_proj", 0),
    "gate_proj": ("gate_up", 0),
    "up_proj": ("gate_up", 1),
    "down_proj": ("down", 0),
}
_MEMBERS = {
    "qkv": ("q_proj", "k_proj", "v_proj"),
    "o_proj": ("o_proj",),
    "gate_up": ("gate_proj", "up_proj"),
    "down": ("down_proj",),
}
# peft's state-dict key of one matrix, once `base_model.model.` is stripped.
_KEY = re.compile(
    r"(?:model\.language_model\.|language_model\.model\.|model\.)?layers\.(\d+)\."
    r"(?:self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.default)?\.weight"
)
# GGUF-style tensor suffix of each target (for merging into the checkpoint's weights).
GGUF_SUFFIX = {
    "q_proj": "attn_q",
    "k_proj": "attn_k",
    "v_proj": "attn_v",
    "o_proj": "attn_output",
    "gate_proj": "ffn_gate",
    "up_proj": "ffn_up",
    "down_proj": "ffn_down",
}


class AdapterError(ValueError):
    """An adapter that cannot be read or does not fit its base model (the message says why)."""


def module_shapes(spec: ArchSpec) -> dict[str, tuple[int, int]]:
    """(out, in) of each target projection of the base model."""
    q = spec.num_heads * spec.head_dim
    kv = spec.num_kv_heads * spec.head_dim
    h, i = spec.hidden_size, spec.intermediate_size
    return {
        "q_proj": (q, h),
        "k_proj": (kv, h),
        "v_proj": (kv, h),
        "o_proj": (h, q),
        "gate_proj": (i, h),
        "up_proj": (i, h),
        "down_proj": (h, i),
    }


@dataclass
class LoRAWeights:
    """One fused linear's adapter: delta(x) = (x @ a.T) @ bt, the scaling already in bt."""

    a: torch.Tensor  # [R, in]
    bt: torch.Tensor  # [R, out]: B transposed (rows of the native kernel's axpy)


@dataclass
class LoRAAdapter:
    name: str
    path: str
    rank: int
    alpha: float
    rslora: bool
    targets: list[str]  # peft module names present, sorted
    # Per target member: (A [r, in], B [out, r]) per layer, unscaled, as in the file.
    raw: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = field(repr=False)
    # Per (layer, fused linear): the weights a forward applies.
    fused: dict[tuple[int, str], LoRAWeights] = field(default_factory=dict, repr=False)
    uid: int = 0  # set when registered on an engine: a reloaded name is another adapter

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    def nbytes(self) -> int:
        return sum(w.a.nbytes + w.bt.nbytes for w in self.fused.values())

    def to(self, device: torch.device, dtype: torch.dtype = torch.float32) -> LoRAAdapter:
        """Place the fused weights on `device` (in place); returns self."""
        for key, w in self.fused.items():
            self.fused[key] = LoRAWeights(
                w.a.to(device, dtype).contiguous(), w.bt.to(device, dtype).contiguous()
            )
        return self

    def delta(self, layer: int, target: str) -> torch.Tensor | None:
        """scaling * B @ A [out, in] of one target projection (for merging), or None."""
        pair = self.raw.get((layer, target))
        if pair is None:
            return None
        a, b = pair
        return (b.double() @ a.double()).mul_(self.scaling).float()


def read_adapter(path: str | Path, spec: ArchSpec, name: str | None = None) -> LoRAAdapter:
    """Read a PEFT LoRA folder and check it against `spec`; AdapterError names what is wrong."""
    folder = Path(path)
    config_file = folder / "adapter_config.json"
    if not config_file.is_file():
        raise AdapterError(f"{folder} is not a PEFT adapter folder: adapter_config.json is missing")
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError, RecursionError) as exc:
        raise AdapterError(f"adapter_config.json of {folder} is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise AdapterError(f"adapter_config.json of {folder} is not a JSON object")
    rank, alpha, rslora = _check_config(config)
    tensors = _read_tensors(folder)
    raw = _collect(tensors, spec, rank)
    adapter = LoRAAdapter(
        name=name or folder.name,
        path=str(folder),
        rank=rank,
        alpha=alpha,
        rslora=rslora,
        targets=sorted({t for _, t in raw}),
        raw=raw,
    )
    adapter.fused = _fuse(adapter, spec)
    return adapter


def _check_config(config: dict) -> tuple[int, float, bool]:
    peft_type = config.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise AdapterError(f"adapter peft_type is {peft_type!r}: only LORA adapters are supported")
    rank = config.get("r")
    if not isinstance(rank, int) or isinstance(rank, bool) or not 1 <= rank <= MAX_RANK:
        raise AdapterError(f"adapter rank r={rank!r} is not supported: it must be 1..{MAX_RANK}")
    alpha = config.get("lora_alpha", rank)
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not _finite(alpha):
        raise AdapterError(f"adapter lora_alpha={alpha!r:.80} is not a finite number")
    rslora = config.get("use_rslora", False)
    if not isinstance(rslora, bool):
        raise AdapterError(f"adapter use_rslora={rslora!r:.80} is not true or false")
    unsupported = {
        "use_dora": "DoRA adapters",
        "fan_in_fan_out": "fan_in_fan_out (Conv1D) adapters",
        "modules_to_save": "modules_to_save (fully trained extra modules)",
        "rank_pattern": "rank_pattern (a rank per module)",
        "alpha_pattern": "alpha_pattern (an alpha per module)",
        "trainable_token_indices": "trainable tokens",
    }
    for key, what in unsupported.items():
        if config.get(key):
            raise AdapterError(f"adapter sets {key}: {what} are not supported")
    if config.get("bias", "none") != "none":
        raise AdapterError(f"adapter bias={config['bias']!r} is not supported: only 'none'")
    return rank, float(alpha), rslora


def _finite(value: int | float) -> bool:
    """Whether `value` is a finite float (an int past float's range is not)."""
    try:
        return math.isfinite(value)
    except OverflowError:  # an int of more than 308 digits
        return False


def _read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    st = folder / "adapter_model.safetensors"
    if st.is_file():
        from safetensors.torch import load_file

        try:
            return load_file(str(st))
        except Exception as exc:  # noqa: BLE001 - a damaged file is the caller's error
            raise AdapterError(f"cannot read {st}: {exc}") from None
    pt = folder / "adapter_model.bin"
    if pt.is_file():
        try:
            tensors = torch.load(pt, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - a damaged file is the caller's error
            raise AdapterError(f"cannot read {pt}: {exc}") from None
        if not isinstance(tensors, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in tensors.items()
        ):
            raise AdapterError(f"{pt} does not hold a dict of named tensors")
        return tensors
    raise AdapterError(f"{folder} has no adapter_model.safetensors")


def _collect(
    tensors: dict[str, torch.Tensor], spec: ArchSpec, rank: int
) -> dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]:
    shapes = module_shapes(spec)
    halves: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        short = key.removeprefix("base_model.model.")
        m = _KEY.fullmatch(short)
        if (
            m is None
            and spec.num_experts
            and re.search(r"\.(experts|gate|block_sparse_moe)\.", short)
        ):
            raise AdapterError(
                f"adapter tensor {key!r} targets the mixture-of-experts block (experts or "
                "router): adapters on MoE models may target the attention projections only"
            )
        if m is None:
            raise AdapterError(
                f"adapter tensor {key!r} is not supported: only LoRA A/B matrices of "
                f"{', '.join(TARGETS)} in the decoder layers are"
            )
        layer, target, half = int(m.group(1)), m.group(2), m.group(3)
        if _moe_target(spec, layer, target):
            raise AdapterError(
                f"adapter targets {target!r} of layer {layer}, a mixture-of-experts layer: "
                "adapters on MoE models may target the attention projections only"
            )
        if target not in TARGETS:
            raise AdapterError(
                f"adapter targets {target!r}: supported targets are {', '.join(TARGETS)}"
            )
        if layer >= spec.num_layers:
            raise AdapterError(
                f"adapter has layer {layer} but the base model has {spec.num_layers} layers"
            )
        if not t.is_floating_point():
            raise AdapterError(
                f"adapter tensor {key!r} is {str(t.dtype).removeprefix('torch.')}: LoRA weights"
                " must be real floating point numbers"
            )
        t = t.float()  # first: isfinite has no kernel for every dtype (float8_e4m3fn)
        if not bool(torch.isfinite(t).all()):  # NaN/inf would poison every token it touches
            raise AdapterError(f"adapter tensor {key!r} holds NaN or infinite values")
        halves.setdefault((layer, target), {})[half] = t
    if not halves:
        raise AdapterError("adapter has no LoRA weights")
    raw = {}
    for (layer, target), pair in sorted(halves.items()):
        if set(pair) != {"A", "B"}:
            raise AdapterError(f"adapter layer {layer} {target} lacks its lora_A or lora_B")
        a, b = pair["A"], pair["B"]
        out, inp = shapes[target]
        if a.shape != (rank, inp) or b.shape != (out, rank):
            raise AdapterError(
                f"adapter layer {layer} {target} has A {tuple(a.shape)} and B {tuple(b.shape)}, "
                f"but the base model ({spec.architecture}) needs A ({rank}, {inp}) and "
                f"B ({out}, {rank}): the adapter was trained for another base model"
            )
        raw[(layer, target)] = (a, b)
    return raw


def _moe_target(spec: ArchSpec, layer: int, target: str) -> bool:
    """Whether `target` of `layer` is in a mixture-of-experts block (its router "gate", or an
    MLP projection of an MoE layer)."""
    moe_layer = 0 <= layer < len(spec.moe_layers) and spec.moe_layers[layer]
    return moe_layer and target not in _MEMBERS["qkv"] + _MEMBERS["o_proj"]


def _fuse(adapter: LoRAAdapter, spec: ArchSpec) -> dict[tuple[int, str], LoRAWeights]:
    """The fused weights a forward applies, from `adapter.raw`. Differentiable: the fine-tuning
    trainer (girandole.finetune.trainer) fuses its trainable A/B this way at every step, so
    training and serving share one LoRA computation."""
    shapes = module_shapes(spec)
    r, s = adapter.rank, adapter.scaling
    fused = {}
    for layer in range(spec.num_layers):
        for linear, members in _MEMBERS.items():
            present = [m for m in members if (layer, m) in adapter.raw]
            if not present:
                continue
            outs = [shapes[m][0] for m in members]
            a = torch.cat([adapter.raw[(layer, m)][0] for m in present])
            b = torch.zeros(sum(outs), r * len(present))
            for j, m in enumerate(present):
                row = sum(outs[: members.index(m)])
                b[row : row + shapes[m][0], j * r : (j + 1) * r] = adapter.raw[(layer, m)][1] * s
            if not bool(torch.isfinite(b).all()):  # a huge lora_alpha: NaN for every token
                raise AdapterError(
                    f"adapter lora_alpha={adapter.alpha:g} (scaling {s:g}) takes its weights past"
                    " float32's range: every token it touches would be NaN"
                )
            fused[(layer, linear)] = LoRAWeights(a.contiguous(), b.t().contiguous())
    return fused


# the trainer's and the fine-tuning route's names for them (girandole.finetune)
fuse = _fuse
check_adapter_config = _check_config


# ---------------------------------------------------------------------------------------------
# Applying adapters in a forward


@dataclass
class LoRABatch:
    """Which rows of the forward's T tokens run which adapter; rows of no segment run the base.
    `rows` None: every row. `slots` int32 [T]: each row's segment index, -1 for the base (the
    native kernel's view of the same thing; built from the segments when not given)."""

    segments: list[tuple[LoRAAdapter, torch.Tensor | None]]
    slots: torch.Tensor | None = None
    native: bool = True  # use the native kernel where it is built (CPU)

    def apply(self, layer: int, linear: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        weights = [a.fused.get((layer, linear)) for a, _ in self.segments]
        if self.native and lora_kernel.supported(x, y):
            pairs = [None if w is None else (w.a, w.bt) for w in weights]
            lora_kernel.lora_apply(x, y, self._slots(x.shape[0]), pairs)
            return y
        for (_, rows), w in zip(self.segments, weights):
            if w is None:
                continue
            if rows is None:
                y += (x.to(w.a.dtype) @ w.a.t()) @ w.bt
            else:
                xs = x.index_select(0, rows).to(w.a.dtype)
                y.index_add_(0, rows, ((xs @ w.a.t()) @ w.bt).to(y.dtype))
        return y

    def _slots(self, num_rows: int) -> torch.Tensor:
        if self.slots is None:
            slots = torch.full((num_rows,), -1, dtype=torch.int32)
            for s, (_, rows) in enumerate(self.segments):
                slots[slice(None) if rows is None else rows.cpu()] = s
            self.slots = slots
        return self.slots


class LoRALinear(nn.Module):
    """A base linear plus the adapters of the forward context's LoRABatch (none: the base)."""

    def __init__(self, base: nn.Module, layer: int, linear: str) -> None:
        super().__init__()
        self.base = base
        self.layer = layer
        self.linear = linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        ctx = get_context()
        lora = None if ctx is None else ctx.lora
        if lora is None:
            return y
        return lora.apply(self.layer, self.linear, x.reshape(-1, x.shape[-1]), y)


def attach(model: nn.Module) -> None:
    """Wrap the model's target linears in LoRALinear (once; wrapped ones are left alone)."""
    for i, layer in enumerate(model.layers):
        attn, mlp = layer.self_attn, layer.mlp
        targets = [(attn, "qkv", "qkv"), (attn, "o_proj", "o_proj")]
        if hasattr(mlp, "gate_up"):  # a dense MLP (a mixture of experts takes no adapter)
            targets += [(mlp, "gate_up", "gate_up"), (mlp, "down", "down")]
        for owner, attr, linear in targets:
            base = getattr(owner, attr)
            if not isinstance(base, LoRALinear):
                setattr(owner, attr, LoRALinear(base, i, linear))


# ---------------------------------------------------------------------------------------------
# Merging one adapter into the checkpoint's weights (a deployment created from an adapter)


class MergedWeights:
    """A checkpoint's weights with an adapter's scaling * B @ A added to the targeted
    projections, before the model is built (and quantized): the base model's speed."""

    def __init__(self, weights, adapter: LoRAAdapter) -> None:
        self.weights = weights
        self.deltas: dict[str, tuple[int, str]] = {
            f"blk.{layer}.{GGUF_SUFFIX[target]}.weight": (layer, target)
            for layer, target in adapter.raw
        }
        self.adapter = adapter

    def __contains__(self, name: str) -> bool:
        return name in self.weights

    def qtype(self, name: str) -> str:
        return self.weights.qtype(name)

    def get(self, name: str) -> torch.Tensor:
        w = self.weights.get(name)
        if name in self.deltas:
            w = w.float() + self.adapter.delta(*self.deltas[name])
        return w

    def int_groups(self, name: str):
        """The file's exact integer levels, except for merged tensors (requantized)."""
        if name in self.deltas:
            return None
        exact = getattr(self.weights, "int_groups", None)
        return None if exact is None else exact(name)

    def int8_groups(self, name: str):
        direct = getattr(self.weights, "int8_groups", None)
        return None if direct is None else direct(name)
