"""The gated MLP's activation fused natively (csrc/gated_act.c): act(gate) * up from the fused
gate_up output, written as the bfloat16 input of the down projection in one pass."""

from __future__ import annotations

from collections.abc import Callable

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
    gu = gu.contiguous()
    out = torch.empty(gu.shape[0], gu.shape[1] // 2, dtype=torch.bfloat16)
    fn, args = bind(gu, act, out)
    fn(*args)
    return out


def bind(
    gu: torch.Tensor, act: str, out: torch.Tensor, threads: int | None = None
) -> tuple[Callable, tuple]:
    """The native call writing bf16 `out` [T, I] from float32 gu [T, 2I] (both contiguous): the
    function and its arguments, to call now or replay (engine/cpu_graphs.py)."""
    lib = loader.library()
    assert lib is not None, "native kernels not available"
    assert gu.is_contiguous() and out.is_contiguous() and out.dtype == torch.bfloat16
    t, i = gu.shape[0], gu.shape[1] // 2
    threads = torch.get_num_threads() if threads is None else threads
    return lib.gated_act, (gu.data_ptr(), t, i, ACTS[act], out.data_ptr(), threads)
