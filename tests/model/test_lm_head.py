"""QuantLMHead without the native kernels (ARM, CPUs without AVX512, GIRANDOLE_NATIVE_KERNELS=0):
the coarse logits come from torch's int4 packed kernel (torch._int_mm takes a naive path on such
CPUs, seconds a step), with the exact refinement of each row's best candidates on top."""

from __future__ import annotations

import pytest
import torch

from girandole.model import kernels
from girandole.model.layers import Int8Embedding, QuantLMHead


@pytest.fixture
def torch_kernels(monkeypatch):
    """The head built and run as where the native kernels are not built."""
    monkeypatch.setattr(kernels, "available", lambda: False)


# A vocabulary and hidden size torch's int4 kernel takes as they are, and ones it needs padded.
@pytest.mark.parametrize("vocab,hidden", [(4096, 128), (4099, 96), (37, 32)])
def test_torch_head_refines_exactly_and_is_row_invariant(torch_kernels, vocab, hidden):
    g = torch.Generator().manual_seed(vocab + hidden)
    table = Int8Embedding(torch.randn(vocab, hidden, generator=g) * 0.05)
    head = QuantLMHead(table)
    assert head.qweight is None and head.native4_packed is None  # no int8 copy: 4 bits
    assert head.torch4_packed.numel() == head.padded[0] * head.padded[1] // 2
    x = torch.randn(19, hidden, generator=g) * 4
    exact = x @ table.rows(torch.arange(vocab)).t()
    got = head(x)
    assert got.shape == (19, vocab) and got.dtype == torch.float32
    assert torch.equal(got.argmax(-1), exact.argmax(-1))
    top = exact.topk(min(20, vocab), dim=-1).indices
    assert torch.allclose(got.gather(1, top), exact.gather(1, top), atol=1e-4, rtol=1e-5)
    # The coarse logits (the tail) are close to the exact ones: well within the margin.
    assert (head.torch_coarse(x) - exact).abs().max() < QuantLMHead.REFINE_MARGIN / 4
    # A row's logits do not depend on the other rows of the call, whatever their number.
    for rows in (slice(3, 4), slice(0, 2), slice(5, 8), slice(1, 18)):
        assert torch.equal(head(x[rows]), got[rows])
    assert head(x[:0]).shape == (0, vocab)
