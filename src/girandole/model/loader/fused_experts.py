"""gpt-oss's expert tensors: one tensor per layer and projection holding every expert, split here
into model/moe.py's per-expert names (`blk.{i}.exp.{e}.ffn_gate.weight`, ...), each read as the
slice of its expert only.

Two forms, per layer (transformers' GptOssExperts; the released checkpoints ship the second):
- dense: `mlp.experts.gate_up_proj` [E, hidden, 2I] (input-major: x @ W), `down_proj`
  [E, I, hidden], biases `gate_up_proj_bias` [E, 2I] and `down_proj_bias` [E, hidden];
- MXFP4: `gate_up_proj_blocks` [E, 2I, hidden/32, 16] uint8 (two 4-bit E2M1 values a byte, the
  low nibble first) with `gate_up_proj_scales` [E, 2I, hidden/32] uint8 (a power-of-two
  exponent per 32 values, biased by 127), likewise `down_proj_blocks` / `down_proj_scales`
  ([E, hidden, I/32, 16]); rows in Linear layout [out, in]. The biases stay float.
In both, gate and up are interleaved along the 2I outputs: gate even, up odd.
MXFP4 values are dequantized to float32 as they are read (transformers' integrations/mxfp4.py
convert_moe_packed_tensors, which this matches exactly); fast mode then quantizes them as any
float weight (model/quant.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch

# E2M1: the 16 values a 4-bit code stands for (sign bit, then exponent and mantissa).
FP4_VALUES = (
    0.0,
    0.5,
    1.0,
    1.5,
    2.0,
    3.0,
    4.0,
    6.0,
    -0.0,
    -0.5,
    -1.0,
    -1.5,
    -2.0,
    -3.0,
    -4.0,
    -6.0,
)
MXFP4_BLOCK = 32  # values sharing one scale
MXFP4_QTYPE = "MXFP4"

FUSED_EXPERTS = re.compile(
    r"(?:model\.)?layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)(_bias|_blocks|_scales)?"
)
_PARTS = {"gate_up_proj": ("ffn_gate", "ffn_up"), "down_proj": ("ffn_down",)}


@dataclass(frozen=True)
class ExpertSlice:
    """Where one expert's projection (or bias) lives in a fused tensor."""

    handle: Any  # safetensors safe_open handle holding `hf_name`
    hf_name: str
    expert: int
    rows: slice  # gate ::2, up 1::2, down all
    bias: bool
    scales: tuple[Any, str] | None = None  # MXFP4: the handle and name of the scales

    @property
    def qtype(self) -> str:
        if self.scales is not None:
            return MXFP4_QTYPE
        return self.handle.get_slice(self.hf_name).get_dtype()

    def shape(self) -> tuple[int, ...]:
        full = self.handle.get_slice(self.hf_name).get_shape()
        if self.bias:
            return (len(range(full[1])[self.rows]),)
        if self.scales is not None:  # [E, out, in/32, 16]
            return (len(range(full[1])[self.rows]), full[2] * full[3] * 2)
        # dense: [E, in, out]
        return (len(range(full[2])[self.rows]), full[1])

    def get(self) -> torch.Tensor:
        """float32: the projection in Linear layout [out, in], or the bias [out]."""
        t = self.handle.get_slice(self.hf_name)[self.expert]
        if self.bias:
            return t.float()[self.rows]
        if self.scales is None:
            return t.float().t()[self.rows].contiguous()
        handle, name = self.scales
        scales = handle.get_slice(name)[self.expert]
        return dequantize_mxfp4(t[self.rows], scales[self.rows])


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """blocks [..., G, 16] uint8 and scales [..., G] uint8 -> float32 [..., G * 32]."""
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise ValueError(
            f"MXFP4 blocks and scales must be uint8, got {blocks.dtype} and {scales.dtype}"
        )
    if blocks.shape[:-1] != scales.shape or blocks.shape[-1] != MXFP4_BLOCK // 2:
        raise ValueError(
            f"MXFP4 blocks {list(blocks.shape)} do not fit scales {list(scales.shape)} "
            f"(blocks must be [..., G, {MXFP4_BLOCK // 2}], scales [..., G])"
        )
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32)
    codes = torch.stack([blocks & 0x0F, blocks >> 4], dim=-1).long()  # low nibble first
    values = lut[codes].flatten(-2)  # [..., G, 32]
    exponents = (scales.to(torch.int32) - 127)[..., None]
    return torch.ldexp(values, exponents).flatten(-2)


def split_fused_experts(tensors: dict[str, Any], source: str) -> dict[str, ExpertSlice]:
    """Per-expert GGUF-style names for every fused expert tensor of `tensors` (HF name ->
    safetensors handle, only the names FUSED_EXPERTS matches)."""
    out: dict[str, ExpertSlice] = {}
    for hf_name, handle in tensors.items():
        m = FUSED_EXPERTS.fullmatch(hf_name)
        layer, proj, kind = m.groups()
        if kind == "_scales":
            continue  # read with its blocks
        scales = None
        if kind == "_blocks":
            scales_name = hf_name[: -len("_blocks")] + "_scales"
            if scales_name not in tensors:
                raise ValueError(f"{source}: {hf_name} has no {scales_name} beside it")
            scales = (tensors[scales_name], scales_name)
        shape = handle.get_slice(hf_name).get_shape()
        parts = _PARTS[proj]
        for e in range(shape[0]):
            for j, part in enumerate(parts):
                rows = slice(j, None, 2) if len(parts) == 2 else slice(None)
                suffix = "bias" if kind == "_bias" else "weight"
                name = f"blk.{layer}.exp.{e}.{part}.{suffix}"
                out[name] = ExpertSlice(handle, hf_name, e, rows, kind == "_bias", scales)
    return out
