"""The LM head's 4-bit coarse copy (girandole/model/kernels/csrc/int4_head.c): its coarse logits
against a float64 product with the same dequantized weights, row invariance, and QuantLMHead on
it: the greedy token and the top candidates exact (as the float32 table gives them)."""

from __future__ import annotations

import pytest
import torch

from girandole.model import kernels
from girandole.model.kernels import int4_head, loader
from girandole.model.layers import Int8Embedding, QuantLMHead

pytestmark = pytest.mark.skipif(
    not kernels.available(),
    reason="native kernels unavailable here (x86 with AVX512 VNNI and BF16, C compiler)",
)


def _int8_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    sx = (x.abs().amax(dim=-1, keepdim=True) / 127.0).clamp(min=1e-12)
    return torch.round(x / sx).clamp(-127, 127).to(torch.int8), sx


def test_quantize_within_half_a_step():
    w = torch.randn(64, 96, generator=torch.Generator().manual_seed(0)) * 0.05
    q, scale, minimum = int4_head.quantize(w)
    assert q.dtype == torch.uint8 and int(q.max()) <= 15
    err = (int4_head.dequantize(q, scale, minimum) - w).abs().reshape(64, 3, 32)
    assert (err <= scale.float()[..., None] * 0.5 + 1e-6).all()


# N = 80: five blocks, so the last task holds one; 4 and 37 rows: whole and partial row tiles.
@pytest.mark.parametrize("n,k", [(4096, 640), (80, 96), (16, 32)])
@pytest.mark.parametrize("rows", [1, 4, 37])
def test_matches_float64_product(n, k, rows):
    g = torch.Generator().manual_seed(n + k + rows)
    w = torch.randn(n, k, generator=g) * 0.05
    q, scale, minimum = int4_head.quantize(w)
    packed = int4_head.pack(q, scale, minimum)
    assert packed.numel() == n * k * 5 // 8  # 5 bits a weight
    xq, sx = _int8_rows(torch.randn(rows, k, generator=g) * 3)
    got = int4_head.gemm(xq, sx, packed, n)
    expected = xq.double() @ int4_head.dequantize(q, scale, minimum).double().t() * sx.double()
    err = (got.double() - expected).abs().max() / expected.abs().max()
    assert err < 1e-5, f"relative error {err:.2e}"
    for r in (slice(0, 1), slice(rows - 1, rows), slice(1, rows)):
        if r.start < r.stop:
            assert torch.equal(int4_head.gemm(xq[r], sx[r], packed, n), got[r])


@pytest.mark.skipif(not loader.amx(), reason="no AMX here")
@pytest.mark.parametrize("n,k", [(4096, 640), (80, 96), (272, 64)])
@pytest.mark.parametrize("rows", [1, 4, 16, 17, 37])
def test_amx_kernel_gives_the_same_bits(n, k, rows):
    """The AMX kernel sums each group's integers on the tiles and then takes the VNNI kernel's
    float steps in its order: the same logits bitwise, so the head may switch by row count."""
    g = torch.Generator().manual_seed(n + rows)
    packed = int4_head.pack(*int4_head.quantize(torch.randn(n, k, generator=g) * 0.05))
    xq, sx = _int8_rows(torch.randn(rows, k, generator=g) * 3)
    amx = int4_head.gemm(xq, sx, packed, n, amx=True)
    assert torch.equal(amx, int4_head.gemm(xq, sx, packed, n, amx=False))


# A vocabulary of whole 16-row blocks, and ones the native copy pads with zero rows.
@pytest.mark.parametrize("vocab", [4096, 4099, 37])
def test_head_refines_the_top_candidates_exactly(vocab):
    """QuantLMHead on the 4-bit copy: each row's greedy token and best candidates carry the
    float32 table's logits, whatever the coarse copy's error."""
    g = torch.Generator().manual_seed(7)
    hidden = 128
    table = Int8Embedding(torch.randn(vocab, hidden, generator=g) * 0.05)
    head = QuantLMHead(table)
    assert head.native4_packed is not None and head.native_packed is None
    assert head.qweight is None  # the per-row int8 copy only serves torch's fallback
    x = torch.randn(9, hidden, generator=g) * 4
    exact = x @ table.rows(torch.arange(vocab)).t()
    got = head(x)
    assert got.shape == (9, vocab) and got.is_contiguous()
    assert torch.equal(got.argmax(-1), exact.argmax(-1))
    top = exact.topk(20, dim=-1).indices
    assert torch.allclose(got.gather(1, top), exact.gather(1, top), atol=1e-4, rtol=1e-5)
    # A row's logits do not depend on the other rows of the call.
    assert torch.equal(head(x[3:4]), got[3:4])
