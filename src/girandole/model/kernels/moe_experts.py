"""A mixture-of-experts block's experts in one native call (csrc/moe.c): every (token, expert)
pair's gate_up product, activation and down product, and each token's weighted sum, in one
OpenMP region, for experts stored in the VNNI layout (CPU fast mode without AMX: kernels/wq_gemm.py).
Every row, decode or prompt, on the int8 kernel (wq_vnni.c), as model/moe.py's per-expert
dispatch runs an expert's rows: bitwise that dispatch (the same kernel per row, the same sums in
ascending expert order). And the router's float32 logits and each row's top-k experts and
weights from them (csrc/moe_router.c), a row's the same whatever rows share the call.

Each call also comes bound (`bind_*`: the function and its fixed arguments), for the recorded
decode steps (engine/cpu_graphs.py), which run a block as these three calls on static buffers."""

from __future__ import annotations

from collections.abc import Callable

import torch

from girandole.model.kernels import gated_act, loader, wq_gemm
from girandole.model.quant import ConcatLinear, PackedLinear

MAX_TOP_K = 64  # moe.c's per-token buffer


def weight_table(linears: list[PackedLinear]) -> torch.Tensor | None:
    """int64 [E, 3]: each linear's native levels pointer, params pointer and bits, as moe.c reads
    them; None unless every linear is stored alone (no ConcatLinear parts) in the VNNI layout
    with no bias. The table points into the linears' buffers: keep them alive and in place."""
    rows = []
    for lin in linears:
        if not isinstance(lin, PackedLinear) or isinstance(lin, ConcatLinear):
            return None
        if not lin.native_bits & wq_gemm.VNNI or lin.bias is not None:
            return None
        rows.append([lin.native_packed.data_ptr(), lin.native_params.data_ptr(), lin.native_bits])
    return torch.tensor(rows, dtype=torch.int64)


def supported(hidden: int, intermediate: int, act: str | None, top_k: int) -> bool:
    return (
        loader.available()
        and act in gated_act.ACTS
        and hidden % 32 == 0
        and intermediate % 32 == 0
        and 0 < top_k <= MAX_TOP_K
    )


def moe_experts(
    x: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    intermediate: int,
    act: str,
) -> torch.Tensor:
    """float32 [T, H]: each token's k experts' outputs, weighted and summed in ascending expert
    order, every row on the int8 kernel (prompt rows too: a token's output never depends on
    how many rows its experts get). x: bf16 [T, H]; ids: int64 [T, k]; weights: float32 [T, k];
    gate_up, down: weight_table's of the experts' linears."""
    x, ids, weights = x.contiguous(), ids.contiguous(), weights.contiguous()
    y = torch.empty(x.shape, dtype=torch.float32)
    if x.shape[0]:
        fn, args = bind_experts(x, ids, weights, gate_up, down, intermediate, act, y)
        fn(*args)
    return y


def bind_experts(
    x: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    intermediate: int,
    act: str,
    y: torch.Tensor,
    threads: int | None = None,
) -> tuple[Callable, tuple]:
    """moe_experts' native call writing `y` (float32 [T, H], contiguous), bound."""
    lib = loader.library()
    assert lib is not None, "native kernels not available"
    assert x.dtype == torch.bfloat16 and ids.dtype == torch.int64 and weights.dtype == torch.float32
    assert ids.shape[1] <= MAX_TOP_K and ids.shape == weights.shape
    assert all(t.is_contiguous() for t in (x, ids, weights, y)) and y.shape == x.shape
    t, h = x.shape
    threads = torch.get_num_threads() if threads is None else threads
    return lib.moe_experts, (
        x.data_ptr(), t, h, intermediate, gate_up.shape[0], ids.data_ptr(), weights.data_ptr(),
        ids.shape[1], gate_up.data_ptr(), down.data_ptr(), gated_act.ACTS[act], y.data_ptr(),
        threads,
    )  # fmt: skip


def router_supported(x: torch.Tensor, router: torch.Tensor) -> bool:
    return (
        loader.available()
        and x.device.type == "cpu"
        and router.dtype == torch.float32
        and router.shape[1] % 16 == 0
    )


def router_logits(x: torch.Tensor, router: torch.Tensor) -> torch.Tensor:
    """float32 [T, E] = x [T, H] @ router [E, H].T, each output one float32 chain over the
    inputs in order (then a fixed tree over 16 lanes): a row's logits never depend on the
    other rows."""
    x = x.float().contiguous()
    logits = torch.empty(x.shape[0], router.shape[0], dtype=torch.float32)
    fn, args = bind_router(x, router, logits)
    fn(*args)
    return logits


def bind_router(
    x: torch.Tensor, router: torch.Tensor, logits: torch.Tensor, threads: int | None = None
) -> tuple[Callable, tuple]:
    """router_logits' native call on float32 x [T, H] into `logits` [T, E], bound."""
    lib = loader.library()
    assert lib is not None, "native kernels not available"
    assert x.dtype == router.dtype == logits.dtype == torch.float32
    assert all(t.is_contiguous() for t in (x, router, logits))
    t, h = x.shape
    threads = torch.get_num_threads() if threads is None else threads
    return lib.moe_router, (
        x.data_ptr(), t, h, router.data_ptr(), router.shape[0], logits.data_ptr(), threads
    )  # fmt: skip


def route(logits: torch.Tensor, top_k: int, norm: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's top-k expert ids [T, k] (int64, largest first) and weights [T, k] (float32)
    from float32 logits [T, E]: softmax over all E, the k largest, renormalised to sum to 1
    where `norm` (csrc/moe_router.c's moe_route; a row's result its own)."""
    logits = logits.contiguous()
    ids = torch.empty(logits.shape[0], top_k, dtype=torch.int64)
    weights = torch.empty(logits.shape[0], top_k, dtype=torch.float32)
    fn, args = bind_route(logits, top_k, norm, ids, weights)
    fn(*args)
    return ids, weights


def bind_route(
    logits: torch.Tensor, top_k: int, norm: bool, ids: torch.Tensor, weights: torch.Tensor
) -> tuple[Callable, tuple]:
    """route's native call into `ids` and `weights`, bound."""
    lib = loader.library()
    assert lib is not None, "native kernels not available"
    t, e = logits.shape
    assert logits.dtype == weights.dtype == torch.float32 and ids.dtype == torch.int64
    assert 0 < top_k <= min(e, MAX_TOP_K) and ids.shape == weights.shape == (t, top_k)
    assert all(x.is_contiguous() for x in (logits, ids, weights))
    return lib.moe_route, (
        logits.data_ptr(), t, e, top_k, int(norm), ids.data_ptr(), weights.data_ptr()
    )  # fmt: skip
