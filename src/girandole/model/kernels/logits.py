"""Native passes over rows of logits (csrc/logits.c): the LM head's exact refinement of its
coarse logits, each row's argmax and its largest values. Available where the kernels build
(loader.py); elsewhere torch's ops give the same answers."""

from __future__ import annotations

import torch

from girandole.model.kernels import loader

# Below this many logits a pass runs on the calling thread alone: waking the other threads costs
# more than the pass (tiny vocabularies; on a busy host a woken thread waits for a core, and a
# sampler's few calls a step took ~13 ms each instead of microseconds). A row is always computed
# by one thread, so the answers are the same either way.
SERIAL_BELOW = 1 << 16


def _threads(x: torch.Tensor) -> int:
    return 1 if x.numel() < SERIAL_BELOW else torch.get_num_threads()


def refine(
    logits: torch.Tensor,  # float32 [M, V] coarse, contiguous: candidates overwritten in place
    x: torch.Tensor,  # float32 [M, H]
    table_q: torch.Tensor,  # int8 [V, H]
    table_scale: torch.Tensor,  # float32 [V, H / 32]
    margin: float,
    top: int,
) -> None:
    """Recompute exactly each row's best `top` coarse logits within `margin` of its maximum
    (csrc/logits.c)."""
    lib = loader.library()
    assert lib is not None, "native kernels not available"
    assert logits.is_contiguous() and logits.dtype == torch.float32
    x = x.float().contiguous()
    table_q, table_scale = table_q.contiguous(), table_scale.float().contiguous()
    m, v = logits.shape
    lib.lm_head_refine(
        logits.data_ptr(),
        m,
        v,
        x.data_ptr(),
        x.shape[1],
        table_q.data_ptr(),
        table_scale.data_ptr(),
        margin,
        top,
        torch.get_num_threads(),
    )


def argmax_rows(logits: torch.Tensor) -> torch.Tensor:
    """Each row's first index of its maximum, as `logits.argmax(dim=-1)`: natively on CPU
    (torch's CPU argmax is scalar, ~10x slower over a 262k vocabulary)."""
    lib = loader.library() if logits.device.type == "cpu" else None
    if lib is None or logits.dtype != torch.float32 or logits.dim() != 2:
        return logits.argmax(dim=-1)
    logits = logits.contiguous()
    out = torch.empty(logits.shape[0], dtype=torch.long)
    lib.argmax_rows(
        logits.data_ptr(), logits.shape[0], logits.shape[1], out.data_ptr(), _threads(logits)
    )
    return out


def top(x: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's n largest values and their indices, largest first (equal values: the lower
    index first): `x.topk(n, dim=-1)`, natively on CPU in one pass (the top logprobs: 16 rows
    of 262k, ~4 ms in torch)."""
    lib = loader.library() if x.device.type == "cpu" else None
    if lib is None or x.dtype != torch.float32 or x.dim() != 2 or not 1 <= n <= x.shape[1]:
        return x.topk(n, dim=-1)
    x = x.contiguous()
    values = torch.empty(x.shape[0], n, dtype=torch.float32)
    ids = torch.empty(x.shape[0], n, dtype=torch.long)
    lib.top_rows(
        x.data_ptr(),
        x.shape[0],
        x.shape[1],
        n,
        values.data_ptr(),
        ids.data_ptr(),
        _threads(x),
    )
    if bool((ids[:, -1] < 0).any()):  # a row with fewer than n values above -inf
        return x.topk(n, dim=-1)
    return values, ids


def sampling_weights(x: torch.Tensor, temps: torch.Tensor) -> bool:
    """exp(x / t - max(x / t)) per row, in place (a banned -inf token weighs 0), natively on
    CPU in two passes instead of torch's five; False (x untouched) where the kernels cannot run
    it, and the caller uses torch's ops."""
    lib = loader.library() if x.device.type == "cpu" else None
    if lib is None or x.dtype != torch.float32 or x.dim() != 2 or not x.is_contiguous():
        return False
    temps = temps.to(torch.float32).contiguous()
    lib.sampling_weights_rows(x.data_ptr(), temps.data_ptr(), x.shape[0], x.shape[1], _threads(x))
    return True


def top_values(x: torch.Tensor, n: int) -> torch.Tensor:
    """Each row's n largest values, largest first (`x.topk(n, dim=-1).values`; natively on CPU:
    16 rows of 262k, n = 256, ~4 ms in torch, ~0.8 here): the samplers' candidates."""
    return top(x, n)[0]
