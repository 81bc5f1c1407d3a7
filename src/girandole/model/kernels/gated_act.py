"""The gated MLP's activation fused natively (csrc/gated_act.c): act(gate) * up from the fused
gate_up output, written as the bfloat16 input of the down projection in one pass."""

from __future__ import annotations

import torch

from girandole.model.kernels import loader

ACTS = {"silu": 0, "gelu_tanh": 1}


def supported(gu: torch.Tensor, act: str | None) -> bool:
    return (
        act in ACTS
        and gu.device.type == "cpu"
        and gu.dtype == torch.float32
        and gu.dim() == 2
        and gu.shape[1] % 32 == 0
        and loader.available()
    )


def gated_act(gu: torch.Tensor, act: str) -> torch.Tensor:
    """bfloat16 [T, I] = act(gu[:, :I]) * gu[:, I:] for float32 gu [T, 2I]."""
    lib = loader.library()
    assert lib is not None, "native kernels not available"
    gu = gu.contiguous()
    t, i = gu.shape[0], gu.shape[1] // 2
    out = torch.empty(t, i, dtype=torch.bfloat16)
    lib.gated_act(gu.data_ptr(), t, i, ACTS[act], out.data_ptr(), torch.get_num_threads())
    return out
