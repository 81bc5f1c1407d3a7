"""The native RMSNorm (girandole/model/kernels/csrc/rms_norm.c) against torch's, plain and per head
(the QK norm reading q and k heads in place from the fused QKV output)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from girandole.model import kernels
from girandole.model.kernels.rms_norm import rms_norm as fused_rms_norm
from girandole.model.layers import RMSNorm

pytestmark = pytest.mark.skipif(
    not kernels.available(),
    reason="native kernels unavailable here (x86 with AVX512 VNNI and BF16, C compiler)",
)


@pytest.mark.parametrize("rows", [1, 5, 64])
def test_plain_norm_matches_torch(rows):
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 640, generator=g) * 5
    w = torch.randn(640, generator=g)
    fused = RMSNorm(w, 1e-6, fused=True)
    expected = F.rms_norm(x, (640,), w, 1e-6)
    torch.testing.assert_close(fused(x), expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(fused(x[-1:]), fused(x)[-1:])  # rows are independent


@pytest.mark.parametrize("dim", [256, 40])  # 40: a tail shorter than a vector
def test_per_head_norm_reads_heads_in_place(dim):
    g = torch.Generator().manual_seed(dim)
    heads, kv_heads, rows = 4, 1, 9
    qkv = torch.randn(rows, (heads + 2 * kv_heads) * dim, generator=g) * 3
    w = torch.randn(heads + kv_heads, dim, generator=g)
    qk = qkv[:, : (heads + kv_heads) * dim]  # a strided view: rows are not contiguous
    got = fused_rms_norm(qk, w, 1e-6)
    expected = F.rms_norm(qk.reshape(rows, heads + kv_heads, dim), (dim,), None, 1e-6) * w
    assert got.shape == (rows, heads + kv_heads, dim)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dim", [256, 40])
def test_norm_with_rotary_is_bitwise_norm_then_apply_rope(dim):
    from girandole.model.layers import Rotary, apply_rope, rope_inv_freq

    g = torch.Generator().manual_seed(dim + 1)
    rows, heads = 7, 5
    qkv = torch.randn(rows, (heads + 1) * dim, generator=g) * 3
    w = torch.randn(heads, dim, generator=g)
    cos, sin = Rotary(rope_inv_freq(dim, 10000.0))(torch.arange(100, 100 + rows))
    qk = qkv[:, : heads * dim]
    fused = fused_rms_norm(qk, w, 1e-6, (cos, sin))
    assert torch.equal(fused, apply_rope(fused_rms_norm(qk, w, 1e-6), cos, sin))
