"""The native gated activation (girandole/model/kernels/csrc/gated_act.c): act(gate) * up rounded once to
bfloat16, as accurate as torch's float32 ops or better, against a float64 computation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from girandole.model import kernels
from girandole.model.kernels import gated_act

pytestmark = pytest.mark.skipif(
    not kernels.available(),
    reason="native kernels unavailable here (x86 with AVX512 VNNI and BF16, C compiler)",
)


def _exact(act: str, g: torch.Tensor) -> torch.Tensor:
    g = g.double()
    if act == "silu":
        return g * torch.sigmoid(g)
    # 0.5 g (1 + tanh(y)) written as g * sigmoid(2y): no cancellation for very negative g.
    return g * torch.sigmoid(2 * 0.7978845608028654 * (g + 0.044715 * g**3))


@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("rows", [1, 7, 64])
def test_gated_act_against_float64(act, rows):
    g = torch.Generator().manual_seed(rows)
    width = 2048
    gu = torch.randn(rows, 2 * width, generator=g) * 3
    gu[0, :8] = torch.tensor([0.0, -0.0, 1e-30, -100.0, 100.0, 20.0, -20.0, 5.0])
    got = gated_act.gated_act(gu, act)
    assert got.dtype == torch.bfloat16 and got.shape == (rows, width)
    exact = (_exact(act, gu[:, :width]) * gu[:, width:].double()).to(torch.bfloat16)
    torch_ops = (
        (F.silu if act == "silu" else lambda x: F.gelu(x, approximate="tanh"))(gu[:, :width])
        * gu[:, width:]
    ).to(torch.bfloat16)
    # At most one bfloat16 step from the correctly rounded value, and no more often than torch.
    step = exact.float().abs().clamp(min=1e-30) * 2**-7
    assert bool(((got.float() - exact.float()).abs() <= step).all())
    assert (got != exact).float().mean() <= (torch_ops != exact).float().mean() + 1e-3
    # Rows are independent.
    assert torch.equal(gated_act.gated_act(gu[-1:], act), got[-1:])
