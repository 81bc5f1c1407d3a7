"""Mixture-of-experts GGUF files as llama.cpp writes them: Qwen3-MoE (`qwen3moe`) and Mixtral
(`llama` with an expert count).

llama.cpp stacks a layer's experts into one 3-D tensor per projection, any quant type:
`blk.{i}.ffn_gate_exps.weight`, `ffn_up_exps`, `ffn_down_exps` ([experts, out, in], row-major,
so one expert's rows are one contiguous run of whole quant blocks), next to the router
`blk.{i}.ffn_gate_inp.weight` [experts, hidden]. Mixtral files converted before llama.cpp
stacked them hold one tensor per expert: `blk.{i}.ffn_gate.{e}.weight`.

Each expert's slice becomes a tensor of its own under the name the MoE block reads
(model/moe.py's expert_prefix): a view of the file of the same type, which the dense GGUF path
then reads as it reads any 2-D weight (Q4_K levels packed as int4 in fast mode, other types
dequantized one expert at a time), so no whole stacked tensor is dequantized at once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from girandole.model.loader.gguf_file import Tensor
from girandole.model.moe import expert_prefix
from girandole.model.spec import ArchSpec, expected_shapes

# llama.cpp's architecture names of the MoE models this loader reads, as ours ("llama" with an
# expert count is Mixtral); other MoE architectures are refused by name.
GGUF_MOE_ARCHITECTURES = {"qwen3moe": "qwen3_moe"}
UNSUPPORTED_MOE = ("qwen2moe", "deepseek", "deepseek2", "gpt-oss", "llama4", "dbrx")
PROJECTIONS = ("ffn_gate", "ffn_up", "ffn_down")
SOFTMAX_GATING = 1  # llama.cpp's LLAMA_EXPERT_GATING_FUNC_TYPE_SOFTMAX


def moe_architecture(arch: str, field: Callable[[str], Any], file: str) -> str | None:
    """Our architecture name for a MoE GGUF file of llama.cpp architecture `arch`, None for a
    dense file; ValueError for a MoE architecture that is not read here. `field(key)`: the
    metadata value of `{arch}.{key}` (None where absent)."""
    if arch in GGUF_MOE_ARCHITECTURES:
        return GGUF_MOE_ARCHITECTURES[arch]
    experts = field("expert_count")
    if arch == "llama" and experts:
        return "mixtral"
    if arch in UNSUPPORTED_MOE or experts:
        raise ValueError(
            f"mixture-of-experts architecture {arch!r} in {file} is not supported "
            "(supported MoE GGUF files: qwen3moe, and llama with experts: Mixtral)"
        )
    return None


def read_moe_fields(
    spec: ArchSpec,
    arch: str,
    number: Callable[..., Any],
    field: Callable[[str], Any],
    tensor_names: set[str],
    source: str,
) -> None:
    """Fill `spec`'s MoE fields from the metadata: expert_count, expert_used_count,
    expert_feed_forward_length (Mixtral: feed_forward_length), expert_weights_norm (absent:
    renormalised, as llama.cpp's Qwen3-MoE and Mixtral graphs do). A layer is MoE where the
    file has its router (`blk.{i}.ffn_gate_inp.weight`), else dense. Routing llama.cpp can
    configure otherwise (sigmoid gating, scaled weights, shared experts) is refused by key."""
    spec.num_experts = number("expert_count", int)
    spec.num_experts_per_tok = number("expert_used_count", int)
    spec.moe_intermediate_size = number("expert_feed_forward_length", int, spec.intermediate_size)
    norm = field("expert_weights_norm")
    spec.norm_topk_prob = True if norm is None else bool(norm)
    gating = field("expert_gating_func")
    if gating not in (None, SOFTMAX_GATING):
        raise ValueError(f"{source}: {arch}.expert_gating_func {gating!r} is not supported (1)")
    scale = field("expert_weights_scale")
    if scale not in (None, 1, 1.0):
        raise ValueError(f"{source}: {arch}.expert_weights_scale {scale!r} is not supported (1)")
    shared = field("expert_shared_count")
    if shared:
        raise ValueError(f"{source}: {arch}.expert_shared_count {shared!r}: not supported (0)")
    spec.moe_layers = [
        f"blk.{i}.ffn_gate_inp.weight" in tensor_names for i in range(spec.num_layers)
    ]


def expert_tensors(tensors: dict[str, Tensor], spec: ArchSpec, source: str) -> dict[str, Tensor]:
    """Each MoE layer's experts' projections under model/moe.py's names
    (`blk.{i}.exp.{e}.ffn_gate.weight`, ...): views of the stacked tensors (or the per-expert
    tensors of older Mixtral files). A stacked tensor must be [experts, out, in] as `spec`
    implies: ValueError naming it otherwise, or naming the first missing one."""
    shape_of = expected_shapes(spec)
    out: dict[str, Tensor] = {}
    for i, moe in enumerate(spec.moe_layers):
        if not moe:
            continue
        for proj in PROJECTIONS:
            stacked = tensors.get(f"blk.{i}.{proj}_exps.weight")
            names = [f"{expert_prefix(i, e)}.{proj}.weight" for e in range(spec.num_experts)]
            if stacked is not None:
                expected = (spec.num_experts, *shape_of(names[0]))
                _check_stacked(stacked, expected, source)
                out.update((name, _expert_view(stacked, e, name)) for e, name in enumerate(names))
                continue
            legacy = [tensors.get(f"blk.{i}.{proj}.{e}.weight") for e in range(spec.num_experts)]
            if not all(legacy):
                raise ValueError(f"{source} is missing tensor 'blk.{i}.{proj}_exps.weight'")
            out.update((name, dataclasses.replace(t, name=name)) for name, t in zip(names, legacy))
    return out


def _check_stacked(t: Tensor, expected: tuple[int, ...], source: str) -> None:
    shape = tuple(int(d) for d in reversed(t.shape.tolist()))  # GGUF: [in, out, experts]
    if shape != expected:
        raise ValueError(
            f"{source}: tensor {t.name!r} has shape {list(shape)} ([experts, out, in]), but "
            f"the model's metadata implies {list(expected)}"
        )


def _expert_view(t: Tensor, e: int, name: str) -> Tensor:
    """Expert `e` of stacked tensor `t` as a 2-D tensor of the same type (a view of the file)."""
    n_bytes = t.n_bytes // int(t.shape[2])
    return dataclasses.replace(
        t,
        name=name,
        shape=t.shape[:2],
        n_elements=t.n_elements // int(t.shape[2]),
        n_bytes=n_bytes,
        data_offset=t.data_offset + e * n_bytes,
        data=t.data[e],
    )
