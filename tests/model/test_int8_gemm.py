"""The native int8 GEMM of the LM head (girandole/model/kernels/csrc/int8_gemm.c, and its AMX twin
in amx.c where the CPU has AMX) gives bitwise the coarse logits of torch._int_mm, for any number
of rows."""

from __future__ import annotations

import pytest
import torch

from girandole.model import kernels
from girandole.model.kernels import int8_gemm, loader, logits

pytestmark = pytest.mark.skipif(
    not kernels.available(),
    reason="native kernels unavailable here (x86 with AVX512 VNNI and BF16, C compiler)",
)


# Both kernels on a CPU with AMX; the VNNI one alone elsewhere.
PATHS = [
    pytest.param(False, id="vnni"),
    pytest.param(True, id="amx", marks=pytest.mark.skipif(not loader.amx(), reason="no AMX here")),
]


@pytest.mark.parametrize("amx", PATHS)
@pytest.mark.parametrize("n,k", [(4096, 640), (80, 64), (16, 4)])
@pytest.mark.parametrize("rows", [1, 3, 4, 16, 17, 40])
def test_bitwise_equal_to_torch_int_mm(n, k, rows, amx):
    g = torch.Generator().manual_seed(n + k + rows)
    w = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    ws = torch.rand(n, generator=g) * 0.01
    x = torch.randn(rows, k, generator=g) * 3
    sx = (x.abs().amax(dim=-1, keepdim=True) / 127.0).clamp(min=1e-12)
    xq = torch.round(x / sx).clamp(-127, 127).to(torch.int8)
    packed, wsum = int8_gemm.pack(w)
    got = int8_gemm.int8_gemm(xq, sx, packed, wsum, ws, amx=amx)  # (K % 64: VNNI)
    expected = torch._int_mm(xq, w.t()).float().mul_(sx).mul_(ws)
    assert torch.equal(got, expected)


def _torch_refine(logits, x, table, margin, top):
    """QuantLMHead's refinement in torch ops (its fallback path), equal values ranked by the
    lower token id (as the native kernel ranks them; topk's order among ties is unspecified)."""
    vals, idx = logits.sort(dim=-1, descending=True, stable=True)
    vals, idx = vals[:, :top], idx[:, :top]
    keep = vals >= vals[:, :1] - margin
    rows = torch.arange(logits.shape[0]).unsqueeze(1).expand_as(idx)[keep]
    cols = idx[keep]
    out = logits.clone()
    out[rows, cols] = (table.rows(cols) * x[rows]).sum(dim=-1)
    return out


@pytest.mark.parametrize("rows", [1, 5, 16])
# Most of the vocabulary within the margin (the candidates narrowed by a threshold first), or
# few; and coarse logits on a grid of 1/8: many ties at whatever threshold the narrowing stops.
@pytest.mark.parametrize("spread,grid", [(0.5, None), (20.0, None), (0.5, 8)])
def test_refine_matches_the_torch_refinement(rows, spread, grid):
    from girandole.model.layers import Int8Embedding

    g = torch.Generator().manual_seed(rows)
    vocab, hidden, margin, top = 4099, 64, 8.0, 128
    table = Int8Embedding(torch.randn(vocab, hidden, generator=g) * 0.1)
    x = torch.randn(rows, hidden, generator=g)
    coarse = torch.randn(rows, vocab, generator=g) * spread
    if grid is not None:
        coarse = torch.round(coarse * grid) / grid
    coarse[0, :40] = coarse[0].max()  # ties at the top: the lower token ids win
    expected = _torch_refine(coarse, x, table, margin, top)
    got = coarse.clone()
    logits.refine(got, x, table.qweight, table.scale, margin, top)
    changed_got = got != coarse
    changed_expected = expected != coarse
    assert torch.equal(changed_got, changed_expected)  # the same candidates
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    # A row's result does not depend on the rows beside it.
    alone = coarse[-1:].clone()
    logits.refine(alone, x[-1:], table.qweight, table.scale, margin, top)
    assert torch.equal(alone, got[-1:])


def test_native_argmax_is_torchs():
    from girandole.model.kernels.logits import argmax_rows

    g = torch.Generator().manual_seed(0)
    for vocab in (5, 16, 17, 1000, 262144):
        x = torch.randn(4, vocab, generator=g)
        x[0, vocab // 2] = x.max() + 1
        x[1, -1] = float("nan")  # torch: the first NaN
        x[2] = float("-inf")
        x[3] = torch.randint(0, 3, (vocab,), generator=g).float()  # ties: the first maximum
        assert torch.equal(argmax_rows(x), x.argmax(dim=-1))


def test_native_top_values_are_torchs():
    """Each row's n largest values, largest first, as torch.topk's values: ties, zeros, rows
    with fewer finite values than n (-inf, as torch), a vocabulary not a multiple of 16, and
    n from 1 to the whole row (the buffer cut back many times or never)."""
    from girandole.model.kernels.logits import top_values

    g = torch.Generator().manual_seed(0)
    for vocab, n in ((37, 5), (37, 37), (1000, 1), (5003, 256), (262144, 40), (262144, 4096)):
        x = torch.softmax(torch.randn(4, vocab, generator=g) * 3, dim=-1)
        x[:, ::7] = 0.0  # what top-k / top-p masks leave
        x[1, 10:] = float("-inf")
        x[2] = torch.randint(0, 3, (vocab,), generator=g).float()  # ties everywhere
        x[3, : vocab // 2] = x[3].max()  # ties at the top
        assert torch.equal(top_values(x, n), x.topk(n, dim=-1).values)


def test_native_sampling_weights_are_torchs():
    """exp(x / t - max(x / t)) per row in place, within float32 rounding of torch's ops; exactly
    0 for -inf (banned) tokens and at or below the floor, exactly 1 at the maximum; the same
    non-zero set as tempered_probs' torch path."""
    from girandole.model.kernels.logits import sampling_weights
    from girandole.sampling.sampler import WEIGHT_FLOOR, tempered_probs

    g = torch.Generator().manual_seed(0)
    temps = torch.tensor([0.5, 1.0, 0.8, 2.0, 1e-3])
    for vocab in (5, 37, 1000, 262144):
        x = torch.randn(5, vocab, generator=g) * 4
        x[:, ::5] = float("-inf")
        d = x / temps[:, None] - (x / temps[:, None]).amax(dim=-1, keepdim=True)
        want = torch.where(d > WEIGHT_FLOOR, d.exp(), 0.0)
        got = x.clone()
        assert sampling_weights(got, temps)
        assert torch.equal(got > 0, want > 0)
        torch.testing.assert_close(got, want, rtol=3e-7, atol=0)
        assert (got.amax(dim=-1) == 1.0).all() and (got[:, ::5] == 0).all()
        torch_path = tempered_probs(x.clone().to(torch.float64), temps.double()).float()
        assert torch.equal(torch_path > 0, got > 0)


def test_native_top_is_torchs_with_ties_by_index():
    """Each row's n largest values and their indices, equal values in index order (torch's
    stable descending sort's first n); a row with fewer than n values above -inf is torch's."""
    from girandole.model.kernels.logits import top

    g = torch.Generator().manual_seed(1)
    for vocab, n in ((37, 5), (37, 37), (1000, 1), (5003, 20), (262144, 5)):
        x = torch.log_softmax(torch.randn(4, vocab, generator=g) * 3, dim=-1)
        x[2] = torch.randint(0, 3, (vocab,), generator=g).float()  # ties everywhere
        x[3, : vocab // 2] = x[3].max()  # ties at the top
        values, ids = top(x, n)
        want = x.sort(dim=-1, descending=True, stable=True)
        assert torch.equal(values, want.values[:, :n]) and torch.equal(ids, want.indices[:, :n])
    x = torch.zeros(2, 40)
    x[0, 3:] = float("-inf")
    values, ids = top(x, 5)
    assert torch.equal(values, x.topk(5, dim=-1).values)
