"""Native paged attention (girandole/model/kernels/csrc/paged_attention.c) against the torch path it
replaces on CPU, with scattered cache slots, sliding windows and several query heads per KV
head; and a row's result is the same alone, in a batch, or as any row of a prefill chunk."""

from __future__ import annotations

import pytest
import torch
from model_helpers import sink_attention_reference

from girandole.model.attention import Attention
from girandole.model.kernels import available as kernels_available
from girandole.model.kernels import paged_attention

pytestmark = pytest.mark.skipif(
    not paged_attention.supported(16, torch.zeros(1), None),
    reason="native kernels unavailable here (x86 with AVX512 VNNI and BF16, C compiler)",
)

# Context lengths around the kernel's 128-key chunks, and one longer than a window.
CONTEXTS = [1, 5, 127, 128, 129, 300, 700]


def _cache(g, kv_heads, head_dim, num_slots=4096):
    k_cache = torch.randn(num_slots, kv_heads, head_dim, generator=g)
    v_cache = torch.randn(num_slots, kv_heads, head_dim, generator=g)
    return k_cache, v_cache


@pytest.mark.parametrize("heads,kv_heads,head_dim", [(4, 1, 256), (8, 2, 64), (6, 2, 48)])
@pytest.mark.parametrize("window", [None, 100])
def test_decode_rows_match_torch_attention(heads, kv_heads, head_dim, window):
    g = torch.Generator().manual_seed(heads * head_dim + (window or 0))
    k_cache, v_cache = _cache(g, kv_heads, head_dim)
    scale = head_dim**-0.5
    layer = Attention(heads, kv_heads, head_dim, scale, window)
    perm = torch.randperm(len(k_cache), generator=g)
    slots = list(torch.split(perm[: sum(CONTEXTS)], CONTEXTS))
    lens = torch.tensor(CONTEXTS)
    starts = lens.cumsum(0) - lens
    q = torch.randn(len(CONTEXTS), heads, head_dim, generator=g)

    out = paged_attention.paged_attention(
        q, k_cache, v_cache, torch.cat(slots), starts, lens, window, scale
    )
    for i in range(len(CONTEXTS)):
        expected = layer._attend_sequence(q[i : i + 1], k_cache[slots[i]], v_cache[slots[i]])[0]
        torch.testing.assert_close(out[i], expected, rtol=1e-5, atol=2e-6)
        alone = paged_attention.paged_attention(
            q[i : i + 1], k_cache, v_cache, slots[i], starts[:1] * 0, lens[i : i + 1], window, scale
        )
        assert torch.equal(alone[0], out[i])


@pytest.mark.parametrize("window", [None, 64])
def test_prefill_rows_are_causal_and_chunking_free(window):
    g = torch.Generator().manual_seed(7)
    heads, kv_heads, head_dim, n = 4, 1, 64, 300
    k_cache, v_cache = _cache(g, kv_heads, head_dim)
    slots = torch.randperm(len(k_cache), generator=g)[:n]
    q = torch.randn(n, heads, head_dim, generator=g)
    scale = head_dim**-0.5
    layer = Attention(heads, kv_heads, head_dim, scale, window)

    def rows(lo: int, hi: int) -> torch.Tensor:  # positions lo..hi-1 as one chunk
        lens = torch.arange(lo + 1, hi + 1)
        return paged_attention.paged_attention(
            q[lo:hi], k_cache, v_cache, slots, torch.zeros_like(lens), lens, window, scale
        )

    whole = rows(0, n)
    expected = layer._attend_sequence(q, k_cache[slots], v_cache[slots])
    torch.testing.assert_close(whole, expected, rtol=1e-5, atol=2e-6)
    assert torch.equal(torch.cat([rows(0, 97), rows(97, 250), rows(250, n)]), whole)
    assert torch.equal(rows(n - 1, n), whole[-1:])  # the last row as a decode token


@pytest.mark.parametrize("heads,kv_heads,head_dim", [(8, 2, 64), (6, 2, 48)])
@pytest.mark.parametrize("window", [None, 100])
@pytest.mark.parametrize("with_sinks", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_tiled_prompt_rows_are_the_rows_alone(heads, kv_heads, head_dim, window, with_sinks, dtype):
    """A prompt's consecutive rows share their keys in tiles (each key read once for several
    rows); every row's numbers are still its own: bitwise the row alone (one row a call, as a
    decode row), the rows in other chunkings (tiles that start elsewhere), and the rows in a
    batch beside another sequence's rows. With a window each row of a tile sees other keys
    (row i's window starts at i - window + 1): a row that took a neighbour's window, or chunk
    boundaries, would differ from itself alone. Near a float64 reference too."""
    g = torch.Generator().manual_seed(heads * 7 + head_dim + (window or 0) + with_sinks)
    k_cache, v_cache = (c.to(dtype) for c in _cache(g, kv_heads, head_dim))
    scale = head_dim**-0.5
    sinks = torch.randn(heads, generator=g) * 3 if with_sinks else None
    n = 300  # windows start moving at 100; chunks of 128 keys inside them
    slots = torch.randperm(len(k_cache), generator=g)[:n]
    q = torch.randn(n, heads, head_dim, generator=g)

    def rows(lo: int, hi: int) -> torch.Tensor:  # positions lo..hi-1 as one chunk
        lens = torch.arange(lo + 1, hi + 1)
        return paged_attention.paged_attention(
            q[lo:hi], k_cache, v_cache, slots, torch.zeros_like(lens), lens, window, scale, sinks
        )

    whole = rows(0, n)
    alone = torch.cat([rows(i, i + 1) for i in range(n)])
    assert torch.equal(whole, alone)
    bounds = [0, 1, 8, 13, 100, 101, 129, 200, 263, n]  # tiles starting off the 8-row grid
    assert torch.equal(torch.cat([rows(a, b) for a, b in zip(bounds, bounds[1:])]), whole)

    # Rows 150..299 beside another sequence's prompt rows and a decode row, in one batch.
    other = torch.randperm(len(k_cache), generator=g)[:40]
    q_other = torch.randn(41, heads, head_dim, generator=g)
    lens = torch.cat([torch.arange(1, 21), torch.arange(151, n + 1), torch.tensor([40])])
    starts = torch.cat(
        [torch.full((20,), n), torch.zeros(n - 150, dtype=torch.long), torch.tensor([n])]
    )
    batch = paged_attention.paged_attention(
        torch.cat([q_other[:20], q[150:], q_other[40:]]), k_cache, v_cache,
        torch.cat([slots, other]), starts, lens, window, scale, sinks,
    )  # fmt: skip
    assert torch.equal(batch[20:-1], whole[150:])

    k32, v32 = k_cache.float()[slots], v_cache.float()[slots]
    no_sinks = torch.full((heads,), -1e9)
    expected = sink_attention_reference(
        q, k32, v32, torch.arange(n), scale, window, no_sinks if sinks is None else sinks
    )
    torch.testing.assert_close(whole.double(), expected, rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("kv_heads,window", [(1, None), (2, 100)])
def test_the_threads_tasks_do_not_change_the_numbers(kv_heads, window):
    """The kernel gives the threads (tile, KV head) tasks that run a tile's chunks in turn where
    the largest is at most a quarter of a thread's share, else one chunk a task: a prompt's rows
    beside decode rows at 1, 2 and 3 threads (whole-tile tasks) and 64 (chunk tasks), and the
    decode rows alone (chunk tasks), are the same bits."""
    g = torch.Generator().manual_seed(kv_heads)
    k_cache, v_cache = (c.half() for c in _cache(g, kv_heads, 64))
    heads, n = 4 * kv_heads, 600
    slots = torch.randperm(len(k_cache), generator=g)[: n + 300]
    # A 300-row chunk of a 600-key prompt beside two decode rows of another sequence (300 keys).
    lens = torch.cat([torch.arange(301, n + 1), torch.tensor([299, 300])])
    starts = torch.cat([torch.zeros(300, dtype=torch.long), torch.full((2,), n)])
    q = torch.randn(len(lens), heads, 64, generator=g)
    outs = []
    for threads in (1, 2, 3, 64):
        out = torch.empty_like(q)
        fn, args = paged_attention.bind(
            q, k_cache, v_cache, slots, starts, lens, window, 0.125, out, threads=threads
        )
        fn(*args)
        outs.append(out)
    assert all(torch.equal(outs[0], o) for o in outs[1:])
    decode = paged_attention.paged_attention(
        q[-2:], k_cache, v_cache, slots, starts[-2:], lens[-2:], window, 0.125
    )
    assert torch.equal(decode, outs[0][-2:])


@pytest.mark.parametrize("heads,kv_heads,head_dim", [(8, 2, 64), (4, 4, 64), (6, 2, 48)])
@pytest.mark.parametrize("window", [None, 100])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_sinks_decode_and_prefill_rows_match_float64(heads, kv_heads, head_dim, window, dtype):
    """gpt-oss's attention sinks: decode rows (contexts around the 128-key chunks) and a prefill
    chunk against a float64 reference; the sinks are large enough to move every row (up to
    the whole softmax: a sink of 8 outweighs a 1-key context), and without them the kernel's
    rows are the plain softmax's."""
    g = torch.Generator().manual_seed(heads * 31 + head_dim + (window or 0))
    k_cache, v_cache = (c.to(dtype) for c in _cache(g, kv_heads, head_dim))
    scale = head_dim**-0.5
    sinks = torch.randn(heads, generator=g) * 3
    sinks[0] = 8.0
    perm = torch.randperm(len(k_cache), generator=g)
    slots = list(torch.split(perm[: sum(CONTEXTS)], CONTEXTS))
    lens = torch.tensor(CONTEXTS)
    starts = lens.cumsum(0) - lens
    q = torch.randn(len(CONTEXTS), heads, head_dim, generator=g)
    k32, v32 = k_cache.float(), v_cache.float()

    out = paged_attention.paged_attention(
        q, k_cache, v_cache, torch.cat(slots), starts, lens, window, scale, sinks
    )
    plain = paged_attention.paged_attention(
        q, k_cache, v_cache, torch.cat(slots), starts, lens, window, scale
    )
    for i, n in enumerate(CONTEXTS):
        at = torch.tensor([n - 1])
        k, v = k32[slots[i]], v32[slots[i]]
        expected = sink_attention_reference(q[i : i + 1], k, v, at, scale, window, sinks)[0]
        torch.testing.assert_close(out[i].double(), expected, rtol=1e-5, atol=2e-6)
        assert (out[i] - plain[i]).abs().max() > 1e-3  # the sinks changed the row
        no_sink = sink_attention_reference(
            q[i : i + 1], k, v, at, scale, window, torch.full((heads,), -1e9)
        )
        torch.testing.assert_close(plain[i].double(), no_sink[0], rtol=1e-5, atol=2e-6)

    # A prefill chunk: positions 250..299 of the 300-token sequence, each row its own causal
    # (windowed) keys; the last row equals that position's decode row bitwise.
    seq = CONTEXTS.index(300)
    chunk = torch.arange(250, 300)
    rows = torch.randn(len(chunk), heads, head_dim, generator=g)
    rows[-1] = q[seq]
    at = torch.full_like(chunk, int(starts[seq]))
    prefill = paged_attention.paged_attention(
        rows, k_cache, v_cache, torch.cat(slots), at, chunk + 1, window, scale, sinks
    )
    expected = sink_attention_reference(
        rows, k32[slots[seq]], v32[slots[seq]], chunk, scale, window, sinks
    )
    torch.testing.assert_close(prefill.double(), expected, rtol=1e-5, atol=2e-6)
    assert torch.equal(prefill[-1], out[seq])


@pytest.mark.parametrize("head_dim", [256, 64])
def test_four_head_fast_path_is_the_generic_path(head_dim):
    """Four query heads per KV head take a register-blocked path; each head's numbers are
    bitwise those of the generic path (one query head per KV head)."""
    g = torch.Generator().manual_seed(head_dim)
    k_cache, v_cache = _cache(g, 1, head_dim)
    slots = torch.randperm(len(k_cache), generator=g)[:300]
    lens = torch.tensor([1, 130, 300])
    starts = torch.zeros(3, dtype=torch.long)
    q = torch.randn(3, 4, head_dim, generator=g)
    scale = head_dim**-0.5
    grouped = paged_attention.paged_attention(q, k_cache, v_cache, slots, starts, lens, None, scale)
    for h in range(4):
        single = paged_attention.paged_attention(
            q[:, h : h + 1].contiguous(), k_cache, v_cache, slots, starts, lens, None, scale
        )
        assert torch.equal(single[:, 0], grouped[:, h])


@pytest.mark.skipif(not kernels_available(), reason="native kernels unavailable here")
def test_native_kv_write_is_index_copy():
    """The native write of a step's keys and values (rows read at any row stride, as the QKV
    output's views are) puts the same floats in the same slots as index_copy_, nothing else."""
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(5, 6, 32, generator=g)  # 4 query heads, then 1 key and 1 value head
    k, v = qkv[:, 4:5], qkv[:, 5:6]
    slots = torch.tensor([7, 0, 31, 12, 3])
    caches = [torch.randn(40, 1, 32, generator=g) for _ in range(2)]
    expected = [c.clone() for c in caches]
    expected[0].index_copy_(0, slots, k)
    expected[1].index_copy_(0, slots, v)
    paged_attention.write_kv(k, v, caches[0], caches[1], slots)
    assert torch.equal(caches[0], expected[0]) and torch.equal(caches[1], expected[1])


@pytest.mark.parametrize("heads,kv_heads,head_dim", [(4, 1, 256), (16, 8, 128), (6, 2, 48)])
@pytest.mark.parametrize("window", [None, 100])
def test_float16_cache_is_the_float32_kernel_on_the_widened_cache(
    heads, kv_heads, head_dim, window
):
    """Over a float16 cache the kernel widens each value as it loads it: bitwise the float32
    kernel's output on the same cache widened to float32 (decode rows and a prefill chunk)."""
    g = torch.Generator().manual_seed(heads + head_dim)
    k16, v16 = (c.half() for c in _cache(g, kv_heads, head_dim))
    k32, v32 = k16.float(), v16.float()
    scale = head_dim**-0.5
    perm = torch.randperm(len(k16), generator=g)
    slots = torch.cat(list(torch.split(perm[: sum(CONTEXTS)], CONTEXTS)))
    lens = torch.tensor(CONTEXTS)
    starts = lens.cumsum(0) - lens
    q = torch.randn(len(CONTEXTS), heads, head_dim, generator=g)
    half = paged_attention.paged_attention(q, k16, v16, slots, starts, lens, window, scale)
    full = paged_attention.paged_attention(q, k32, v32, slots, starts, lens, window, scale)
    assert torch.equal(half, full)
    chunk = torch.arange(250, 301)  # positions 250..300 of the 300-token sequence
    prefill = torch.randn(len(chunk), heads, head_dim, generator=g)
    at = torch.full_like(chunk, int(starts[5]))
    assert torch.equal(
        paged_attention.paged_attention(prefill, k16, v16, slots, at, chunk, window, scale),
        paged_attention.paged_attention(prefill, k32, v32, slots, at, chunk, window, scale),
    )


@pytest.mark.skipif(not kernels_available(), reason="native kernels unavailable here")
def test_native_kv_write_into_float16_rounds_as_torch():
    """Into a float16 cache each value is rounded to the nearest half as torch's .half() does
    (width not a multiple of 16 included); beyond the half range it is clamped to +-65504."""
    g = torch.Generator().manual_seed(1)
    qkv = torch.randn(5, 6, 24, generator=g) * 3
    qkv[0, 4, :3] = torch.tensor([1e6, -1e6, 65519.0])
    k, v = qkv[:, 4:5], qkv[:, 5:6]
    slots = torch.tensor([7, 0, 31, 12, 3])
    caches = [torch.randn(40, 1, 24, generator=g).half() for _ in range(2)]
    expected = [c.clone() for c in caches]
    expected[0].index_copy_(0, slots, k.clamp(-65504, 65504).half())
    expected[1].index_copy_(0, slots, v.clamp(-65504, 65504).half())
    paged_attention.write_kv(k, v, caches[0], caches[1], slots)
    assert torch.equal(caches[0], expected[0]) and torch.equal(caches[1], expected[1])
    assert caches[0][7, 0, :3].tolist() == [65504.0, -65504.0, 65504.0]
