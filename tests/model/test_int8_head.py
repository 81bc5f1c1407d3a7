"""The native int8 GEMM of the LM head (girandole/model/csrc/int8_gemm.c) gives bitwise the
coarse logits of torch._int_mm, for any number of rows."""

from __future__ import annotations

import pytest
import torch

from girandole.model import int8_head, native

pytestmark = pytest.mark.skipif(
    not native.available(),
    reason="native kernels unavailable here (x86 with AVX512 VNNI and BF16, C compiler)",
)


@pytest.mark.parametrize("n,k", [(4096, 640), (80, 64), (16, 4)])
@pytest.mark.parametrize("rows", [1, 3, 4, 16, 17])
def test_bitwise_equal_to_torch_int_mm(n, k, rows):
    g = torch.Generator().manual_seed(n + k + rows)
    w = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    ws = torch.rand(n, generator=g) * 0.01
    x = torch.randn(rows, k, generator=g) * 3
    sx = (x.abs().amax(dim=-1, keepdim=True) / 127.0).clamp(min=1e-12)
    xq = torch.round(x / sx).clamp(-127, 127).to(torch.int8)
    packed, wsum = int8_head.pack(w)
    got = int8_head.int8_gemm(xq, sx, packed, wsum, ws)
    expected = torch._int_mm(xq, w.t()).float().mul_(sx).mul_(ws)
    assert torch.equal(got, expected)
