"""Native decode attention (girandole/model/csrc/decode_attention.c) against the torch path it
replaces for decode rows on CPU, with scattered cache slots, sliding windows and several query
heads per KV head; and a sequence's result alone equals its result in a batch."""

from __future__ import annotations

import pytest
import torch

from girandole.model import decode_attention
from girandole.model.attention import Attention

pytestmark = pytest.mark.skipif(
    not decode_attention.supported(16, torch.zeros(1), None),
    reason="native kernels unavailable here (x86 with AVX512 VNNI and BF16, C compiler)",
)

# Context lengths around the kernel's 128-key chunks, and one longer than a window.
CONTEXTS = [1, 5, 127, 128, 129, 300, 700]


@pytest.mark.parametrize("heads,kv_heads,head_dim", [(4, 1, 256), (8, 2, 64), (6, 2, 48)])
@pytest.mark.parametrize("window", [None, 100])
def test_matches_torch_attention(heads, kv_heads, head_dim, window):
    g = torch.Generator().manual_seed(heads * head_dim + (window or 0))
    num_slots = 4096
    k_cache = torch.randn(num_slots, kv_heads, head_dim, generator=g)
    v_cache = torch.randn(num_slots, kv_heads, head_dim, generator=g)
    scale = head_dim**-0.5
    layer = Attention(heads, kv_heads, head_dim, scale, window)
    perm = torch.randperm(num_slots, generator=g)
    slots = list(torch.split(perm[: sum(CONTEXTS)], CONTEXTS))
    offsets = torch.tensor([0] + CONTEXTS).cumsum(0)
    q = torch.randn(len(CONTEXTS), heads, head_dim, generator=g)

    out = decode_attention.decode_attention(
        q, k_cache, v_cache, torch.cat(slots), offsets, window, scale
    )
    for i, ctx in enumerate(CONTEXTS):
        expected = layer._attend_sequence(q[i : i + 1], k_cache[slots[i]], v_cache[slots[i]])[0]
        torch.testing.assert_close(out[i], expected, rtol=1e-5, atol=2e-6)
        alone = decode_attention.decode_attention(
            q[i : i + 1], k_cache, v_cache, slots[i], torch.tensor([0, ctx]), window, scale
        )
        assert torch.equal(alone[0], out[i])
