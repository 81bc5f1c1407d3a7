"""The Triton paged attention kernels (girandole/model/kernels/triton_paged_attention.py) under
Triton's CPU interpreter, against the engine's own attention (Attention._attend_sequence over the
keys gathered through the block table): decode (one pass and split-K) and varlen prefill,
head_dim 64/128/256 (and 80 for split-K), GQA groups 1/3/4/8, sliding window and soft-cap on and
off, ragged lengths, scattered blocks; image spans attended both ways in prefill; the split-K
heuristic's partition counts."""

from __future__ import annotations

import os

import pytest
import torch

# Read when a kernel is decorated: set before the kernel module is first imported.
os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")

from model_helpers import compile_for_hopper, sink_attention_reference  # noqa: E402

from girandole.model.attention import Attention  # noqa: E402
from girandole.model.kernels import triton_paged_attention  # noqa: E402

BLOCK_SIZE = 16


@pytest.fixture(scope="module")
def kernels():
    return triton_paged_attention


def _paged(g, context_lens, kv_heads, head_dim):
    """A cache of scattered blocks and each sequence's block table (a random order of blocks)."""
    need = [-(-n // BLOCK_SIZE) for n in context_lens]
    num_blocks = sum(need) + 3
    k_cache = torch.randn(num_blocks * BLOCK_SIZE, kv_heads, head_dim, generator=g)
    v_cache = torch.randn(num_blocks * BLOCK_SIZE, kv_heads, head_dim, generator=g)
    perm = torch.randperm(num_blocks, generator=g).tolist()
    tables = torch.zeros(len(context_lens), max(need), dtype=torch.int32)
    slots = []
    for i, n in enumerate(need):
        blocks = [perm.pop() for _ in range(n)]
        tables[i, :n] = torch.tensor(blocks, dtype=torch.int32)
        table = torch.tensor(blocks)[:, None] * BLOCK_SIZE + torch.arange(BLOCK_SIZE)
        slots.append(table.flatten()[: context_lens[i]])
    return k_cache, v_cache, tables, slots


SHAPES = [  # (kv_heads, group, head_dim)
    (2, 1, 64),
    (1, 4, 256),
    (2, 4, 128),
    (1, 8, 64),
    (2, 8, 256),
]


@pytest.mark.parametrize("kv_heads,group,head_dim", SHAPES)
@pytest.mark.parametrize("window,softcap", [(None, None), (24, None), (None, 30.0), (40, 50.0)])
def test_decode_matches_engine_attention(kernels, kv_heads, group, head_dim, window, softcap):
    g = torch.Generator().manual_seed(kv_heads * 1000 + group * 100 + head_dim + (window or 0))
    context_lens = [1, 17, 70, 33, 5]
    k_cache, v_cache, tables, slots = _paged(g, context_lens, kv_heads, head_dim)
    heads, scale = kv_heads * group, head_dim**-0.5
    layer = Attention(heads, kv_heads, head_dim, scale, window, softcap)
    q = torch.randn(len(context_lens), heads, head_dim, generator=g)
    lens = torch.tensor(context_lens, dtype=torch.int32)

    out = kernels.paged_decode(
        q, k_cache, v_cache, tables, lens, BLOCK_SIZE, scale, window, softcap
    )
    for i, s in enumerate(slots):
        expected = layer._attend_sequence(q[i : i + 1], k_cache[s], v_cache[s])[0]
        torch.testing.assert_close(out[i], expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kv_heads,group,head_dim", SHAPES)
@pytest.mark.parametrize("window,softcap", [(None, None), (24, None), (None, 30.0), (40, 50.0)])
def test_prefill_matches_engine_attention(kernels, kv_heads, group, head_dim, window, softcap):
    g = torch.Generator().manual_seed(kv_heads * 999 + group * 99 + head_dim + (window or 0))
    # (cached tokens, new tokens): a whole prompt, a chunk after a cached prefix, a decode row,
    # and a prompt longer than a query block.
    shapes = [(0, 19), (37, 12), (50, 1), (0, 1), (5, 75)]
    context_lens = [c + n for c, n in shapes]
    k_cache, v_cache, tables, slots = _paged(g, context_lens, kv_heads, head_dim)
    heads, scale = kv_heads * group, head_dim**-0.5
    layer = Attention(heads, kv_heads, head_dim, scale, window, softcap)
    query_lens = [n for _, n in shapes]
    q = torch.randn(sum(query_lens), heads, head_dim, generator=g)
    starts = torch.tensor([0, *torch.tensor(query_lens).cumsum(0).tolist()], dtype=torch.int32)

    out = kernels.paged_prefill(
        q,
        k_cache,
        v_cache,
        tables,
        starts,
        torch.tensor(context_lens, dtype=torch.int32),
        max(query_lens),
        BLOCK_SIZE,
        scale,
        window,
        softcap,
    )
    for i, s in enumerate(slots):
        rows = slice(int(starts[i]), int(starts[i + 1]))
        expected = layer._attend_sequence(q[rows], k_cache[s], v_cache[s])
        torch.testing.assert_close(out[rows], expected, rtol=1e-4, atol=1e-5)


def test_padding_rows_give_zeros_and_leave_others_alone(kernels):
    """A decode row with context_len 0 (a CUDA graph's padding) reads nothing and returns zeros;
    the real rows are what they are without it."""
    g = torch.Generator().manual_seed(3)
    k_cache, v_cache, tables, _ = _paged(g, [20, 9], 1, 64)
    q = torch.randn(3, 4, 64, generator=g)
    tables = torch.cat([tables, torch.zeros(1, tables.shape[1], dtype=torch.int32)])
    lens = torch.tensor([20, 9, 0], dtype=torch.int32)
    out = kernels.paged_decode(q, k_cache, v_cache, tables, lens, BLOCK_SIZE, 0.125)
    alone = kernels.paged_decode(q[:2], k_cache, v_cache, tables[:2], lens[:2], BLOCK_SIZE, 0.125)
    assert torch.equal(out[2], torch.zeros_like(out[2]))
    assert torch.equal(out[:2], alone)


def test_bf16_cache(kernels):
    """The GPU's cache dtype: bf16 keys and values, fp32 accumulation, bf16 out."""
    g = torch.Generator().manual_seed(5)
    k_cache, v_cache, tables, slots = _paged(g, [40], 1, 128)
    q = torch.randn(1, 4, 128, generator=g)
    scale = 128**-0.5
    lens = torch.tensor([40], dtype=torch.int32)
    out = kernels.paged_decode(
        q, k_cache.bfloat16(), v_cache.bfloat16(), tables, lens, BLOCK_SIZE, scale
    )
    assert out.dtype == torch.bfloat16
    layer = Attention(4, 1, 128, scale)
    s = slots[0]
    expected = layer._attend_sequence(
        q.bfloat16().float(), k_cache[s].bfloat16().float(), v_cache[s].bfloat16().float()
    )
    torch.testing.assert_close(out.float(), expected, rtol=2e-2, atol=2e-2)


# -- image spans (Gemma 3 vision) ------------------------------------------------------------

# (cached tokens, new tokens, image spans): an image in a chunk after a cached prefix, a
# sequence without images, and two images in a prompt longer than a query block (64 rows), the
# second across the block's edge, so that block's rows must read keys past its causal bound.
IMAGE_SEQS = [(5, 20, [(9, 17)]), (0, 12, []), (0, 75, [(10, 20), (58, 70)])]


@pytest.mark.parametrize("window,softcap", [(None, None), (8, None), (None, 30.0)])
def test_prefill_with_image_spans_matches_block_mask(kernels, window, softcap):
    """A query row in an image also sees the image's later keys (causal OR same image, then
    the window), as the CPU path's _block_mask; rows outside images stay causal."""
    from girandole.model.attention import _block_mask
    from girandole.model.context import ImageBatch

    g = torch.Generator().manual_seed(127 + (window or 0))
    kv_heads, group, head_dim = 1, 2, 64
    context_lens = [c + n for c, n, _ in IMAGE_SEQS]
    query_lens = [n for _, n, _ in IMAGE_SEQS]
    spans = [sp for _, _, sp in IMAGE_SEQS]
    k_cache, v_cache, tables, slots = _paged(g, context_lens, kv_heads, head_dim)
    heads, scale = kv_heads * group, head_dim**-0.5
    layer = Attention(heads, kv_heads, head_dim, scale, window, softcap)
    q = torch.randn(sum(query_lens), heads, head_dim, generator=g)
    starts = torch.tensor([0, *torch.tensor(query_lens).cumsum(0).tolist()], dtype=torch.int32)
    images = ImageBatch(torch.empty(0, dtype=torch.long), torch.empty(0, 8), spans)
    row_spans = images.row_spans(query_lens, context_lens, torch.device("cpu"))
    assert row_spans[0][5 + 9 - 5].item() == 9 and row_spans[1][25 + 12 + 60].item() == 70
    args = (k_cache, v_cache, tables, starts, torch.tensor(context_lens, dtype=torch.int32))
    args += (max(query_lens), BLOCK_SIZE, scale, window, softcap)

    out = kernels.paged_prefill(q, *args, spans=row_spans)
    causal = kernels.paged_prefill(q, *args)
    for i, s in enumerate(slots):
        rows = slice(int(starts[i]), int(starts[i + 1]))
        k_pos = torch.arange(len(s))
        q_pos = k_pos[len(s) - query_lens[i] :]
        mask = _block_mask(q_pos, k_pos, window, spans[i])
        expected = layer._attend(q[rows], k_cache[s], v_cache[s], q_pos, k_pos, mask)
        torch.testing.assert_close(out[rows], expected, rtol=1e-4, atol=1e-5)
        # an image's rows (all but its last) see later keys: not the causal result
        in_image = (row_spans[1][rows] - 1 > q_pos) & (row_spans[1][rows] > 0)
        assert torch.equal(out[rows][~in_image], causal[rows][~in_image])
        for r in in_image.nonzero().flatten().tolist():
            assert not torch.allclose(out[rows][r], causal[rows][r], atol=1e-3), (i, r)


# -- split-K decode ------------------------------------------------------------------------

SPLIT_SHAPES = [  # (kv_heads, group, head_dim): partition units of 64, 32 and 64 tokens
    (2, 1, 64),
    (1, 4, 256),
    (2, 3, 80),  # a group and a head_dim that are not powers of 2
]
# A padding row, rows shorter than one unit, rows over one to five units (7 partitions: more
# than any row has units).
SPLIT_LENS = [0, 1, 17, 150, 70, 33]


def _attend_range(q, k, v, lo, hi, q_pos, scale, window, softcap):
    """fp64 torch reference of one decode row (q [H, D], k and v [ctx, Hkv, D] by position)
    over the keys at positions [lo, hi) in the window: each query head's normalised output
    [H, D] and log-sum-exp [H]."""
    heads, kv_heads = q.shape[0], k.shape[1]
    pos = torch.arange(lo, hi)
    if window:
        pos = pos[q_pos - pos < window]
    kk = k[pos].double().repeat_interleave(heads // kv_heads, 1)  # [n, H, D]
    vv = v[pos].double().repeat_interleave(heads // kv_heads, 1)
    s = torch.einsum("hd,nhd->hn", q.double(), kk) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    return torch.einsum("hn,nhd->hd", torch.softmax(s, 1), vv), torch.logsumexp(s, 1)


def _partition_ranges(ctx_len, parts, unit, window):
    """The kernel's cut of a row's attended keys: whole units from the window's first unit."""
    lo = max(ctx_len - window, 0) // unit * unit if window else 0
    units = -(-(ctx_len - lo) // unit)
    per = -(-units // parts)
    return [(lo + p * per * unit, min(lo + (p + 1) * per * unit, ctx_len)) for p in range(parts)]


@pytest.mark.parametrize("kv_heads,group,head_dim", SPLIT_SHAPES)
@pytest.mark.parametrize("window,softcap", [(None, None), (24, None), (None, 30.0), (100, 50.0)])
def test_split_decode_matches_engine_attention_and_one_pass(
    kernels, kv_heads, group, head_dim, window, softcap
):
    g = torch.Generator().manual_seed(kv_heads * 77 + group * 7 + head_dim + (window or 0))
    k_cache, v_cache, tables, slots = _paged(g, SPLIT_LENS, kv_heads, head_dim)
    heads, scale = kv_heads * group, head_dim**-0.5
    layer = Attention(heads, kv_heads, head_dim, scale, window, softcap)
    q = torch.randn(len(SPLIT_LENS), heads, head_dim, generator=g)
    lens = torch.tensor(SPLIT_LENS, dtype=torch.int32)
    args = (q, k_cache, v_cache, tables, lens, BLOCK_SIZE, scale, window, softcap)

    one_pass = kernels.paged_decode(*args, num_partitions=1)
    for parts in (2, 3, 7):
        out = kernels.paged_decode(*args, num_partitions=parts)
        assert torch.equal(out[0], torch.zeros_like(out[0]))  # the padding row
        torch.testing.assert_close(out, one_pass, rtol=1e-5, atol=1e-6)
        for i, s in enumerate(slots):
            if len(s):
                expected = layer._attend_sequence(q[i : i + 1], k_cache[s], v_cache[s])[0]
                torch.testing.assert_close(out[i], expected, rtol=1e-4, atol=1e-5)


def test_split_partitions_and_their_merge(kernels):
    """Stage 1 by itself: every partition's output and log-sum-exp equal to torch over that
    partition's keys (units from the window's first unit; empty partitions: zeros, -1e30).
    Then the merge: stage 2 equals the reference, and a wrong weighting would not (each
    partition alone, or their plain average, is far from it on rows over several partitions),
    so the reference comparisons above catch a broken merge."""
    kv_heads, group, head_dim, window, softcap = 2, 2, 64, 100, 30.0
    lens_list = [0, 1, 64, 65, 200, 130]
    parts, unit = 3, kernels.partition_unit(BLOCK_SIZE, head_dim)
    g = torch.Generator().manual_seed(11)
    k_cache, v_cache, tables, slots = _paged(g, lens_list, kv_heads, head_dim)
    heads, scale = kv_heads * group, head_dim**-0.5
    q = torch.randn(len(lens_list), heads, head_dim, generator=g)
    # Sharper scores than unit-variance keys give: partitions' log-sum-exps far apart.
    q = q * 3
    lens = torch.tensor(lens_list, dtype=torch.int32)
    config = kernels.decode_config(heads, kv_heads, head_dim, window, softcap)
    part_out, part_lse = kernels._decode_partials(
        q, k_cache, v_cache, tables, lens, BLOCK_SIZE, scale, window, softcap, parts, config
    )
    merged = torch.empty_like(q)
    kernels._merge_partials(part_out, part_lse, merged)

    spanning = 0
    for i, n in enumerate(lens_list):
        ranges = _partition_ranges(n, parts, unit, window)
        k, v = k_cache[slots[i].long()], v_cache[slots[i].long()]  # by position
        nonempty = []
        for p, (lo, hi) in enumerate(ranges):
            if hi <= lo:  # past the row's keys
                assert torch.equal(part_lse[i, :, p], torch.full((heads,), -1e30))
                assert torch.equal(part_out[i, :, p], torch.zeros(heads, head_dim))
                continue
            nonempty.append(p)
            want_out, want_lse = _attend_range(q[i], k, v, lo, hi, n - 1, scale, window, softcap)
            torch.testing.assert_close(part_out[i, :, p].double(), want_out, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(part_lse[i, :, p].double(), want_lse, rtol=1e-5, atol=1e-5)
        if n == 0:
            assert not nonempty and torch.equal(merged[i], torch.zeros_like(merged[i]))
            continue
        expected, _ = _attend_range(q[i], k, v, 0, n, n - 1, scale, window, softcap)
        torch.testing.assert_close(merged[i].double(), expected, rtol=1e-4, atol=1e-5)
        if len(nonempty) > 1:
            spanning += 1
            for p in nonempty:
                assert (part_out[i, :, p].double() - expected).abs().max() > 1e-2
            average = part_out[i, :, nonempty].double().mean(1)
            assert (average - expected).abs().max() > 1e-2
    assert spanning >= 2  # 130 and 200 keys: a window over two and three units


def test_split_decode_bf16_cache(kernels):
    g = torch.Generator().manual_seed(6)
    k_cache, v_cache, tables, _ = _paged(g, [150, 40], 1, 128)
    q = torch.randn(2, 4, 128, generator=g)
    lens = torch.tensor([150, 40], dtype=torch.int32)
    args = (q, k_cache.bfloat16(), v_cache.bfloat16(), tables, lens, BLOCK_SIZE, 128**-0.5)
    out = kernels.paged_decode(*args, num_partitions=3)
    assert out.dtype == torch.bfloat16
    one_pass = kernels.paged_decode(*args, num_partitions=1)
    torch.testing.assert_close(out.float(), one_pass.float(), rtol=2e-2, atol=2e-2)


def test_decode_partitions_heuristic(kernels):
    parts = kernels.decode_partitions
    limit = kernels.MAX_PARTITIONS
    # No SMs (CPU, the interpreter): one pass, whatever the shape.
    assert parts(1, 1, 2048, 16, 256, None, 0) == 1
    # Programs (rows x KV heads) that fill the SMs: one pass.
    assert parts(132, 1, 2048, 16, 256, None, 132) == 1
    assert parts(66, 2, 2048, 16, 64, None, 132) == 1
    assert parts(300, 8, 2048, 16, 64, None, 132) == 1
    # A table shorter than two partitions of MIN_PARTITION_TOKENS: one pass.
    short = 2 * kernels.MIN_PARTITION_TOKENS // 16 - 1
    assert parts(1, 1, short, 16, 256, None, 132) == 1
    # Batch 1 over 32K keys on an H200: the cap.
    assert parts(1, 1, 2048, 16, 256, None, 132) == limit
    # Enough partitions for PROGRAMS_PER_SM programs an SM, no more.
    n = parts(16, 1, 2048, 16, 256, None, 132)
    assert n == -(-kernels.PROGRAMS_PER_SM * 132 // 16)
    assert 16 * (n - 1) < kernels.PROGRAMS_PER_SM * 132 <= 16 * n
    # Gemma 3's 512-token window: at most its span's worth of MIN_PARTITION_TOKENS partitions.
    unit = kernels.partition_unit(16, 256)
    windowed = parts(1, 1, 2048, 16, 256, 512, 132)
    assert 1 < windowed <= (512 + unit) // kernels.MIN_PARTITION_TOKENS
    assert windowed < parts(1, 1, 2048, 16, 256, None, 132)
    assert parts(1, 1, 2048, 16, 256, 128, 132) == 1
    # Never past the cap, never below 1; more rows never more partitions.
    for sms in (0, 1, 8, 132, 1000):
        counts = [parts(b, 2, 4096, 16, 128, None, sms) for b in (1, 2, 4, 16, 64, 256)]
        assert all(1 <= c <= limit for c in counts)
        assert counts == sorted(counts, reverse=True)


def test_heuristic_count_ignores_context_lens(kernels, monkeypatch):
    """On a (pretend) 8-SM device, paged_decode's own choice splits a batch of 2 over a
    40-block table; the count comes from the shapes only (the same for any step's lengths: a
    CUDA graph replays its captured grid), and the split output is right for short and empty
    rows too."""
    monkeypatch.setattr(kernels, "sm_count", lambda device: 8)
    seen = []
    split = kernels._split_decode

    def spy(*args):
        seen.append(args[10])  # num_partitions
        return split(*args)

    monkeypatch.setattr(kernels, "_split_decode", spy)
    g = torch.Generator().manual_seed(9)
    k_cache, v_cache, tables, slots = _paged(g, [600, 90], 1, 64)
    tables = torch.cat([tables, torch.zeros(2, 40 - tables.shape[1], dtype=torch.int32)], 1)
    q = torch.randn(2, 2, 64, generator=g)
    layer = Attention(2, 1, 64, 0.125)
    want = kernels.decode_partitions(2, 1, 40, BLOCK_SIZE, 64, None, 8)
    assert want > 1
    for step_lens in ([600, 90], [90, 0], [1, 75]):  # each row's first keys of its table
        lens = torch.tensor(step_lens, dtype=torch.int32)
        out = kernels.paged_decode(q, k_cache, v_cache, tables, lens, BLOCK_SIZE, 0.125)
        for i, n in enumerate(step_lens):
            if n == 0:
                assert torch.equal(out[i], torch.zeros_like(out[i]))
                continue
            s = slots[i][:n]
            expected = layer._attend_sequence(q[i : i + 1], k_cache[s], v_cache[s])[0]
            torch.testing.assert_close(out[i], expected, rtol=1e-4, atol=1e-5)
    assert seen == [want] * 3


# -- attention sinks (gpt-oss) -----------------------------------------------------------------


def _sinks(g, heads):
    """Sink logits that move every row: one (8) outweighs a short context's keys entirely."""
    sinks = torch.randn(heads, generator=g) * 3
    sinks[0] = 8.0
    return sinks


@pytest.mark.parametrize("kv_heads,group,head_dim", [(2, 4, 64), (1, 8, 64), (2, 1, 128)])
@pytest.mark.parametrize("window", [None, 24])
def test_sinks_decode_one_pass_and_split_match_float64(kernels, kv_heads, group, head_dim, window):
    """Decode with sinks, one pass and split-K (the sink joins the merge once, however many
    partitions): every row against the float64 reference, the padding row zeros; without the
    sinks the rows differ."""
    g = torch.Generator().manual_seed(kv_heads * 50 + group * 5 + head_dim + (window or 0))
    k_cache, v_cache, tables, slots = _paged(g, SPLIT_LENS, kv_heads, head_dim)
    heads, scale = kv_heads * group, head_dim**-0.5
    sinks = _sinks(g, heads)
    q = torch.randn(len(SPLIT_LENS), heads, head_dim, generator=g)
    lens = torch.tensor(SPLIT_LENS, dtype=torch.int32)
    args = (q, k_cache, v_cache, tables, lens, BLOCK_SIZE, scale, window)

    plain = kernels.paged_decode(*args, num_partitions=1)
    for parts in (1, 2, 3, 7):
        out = kernels.paged_decode(*args, num_partitions=parts, sinks=sinks)
        assert torch.equal(out[0], torch.zeros_like(out[0]))  # the padding row
        for i, s in enumerate(slots):
            if not len(s):
                continue
            at = torch.tensor([len(s) - 1])
            k, v = k_cache[s.long()], v_cache[s.long()]
            expected = sink_attention_reference(q[i : i + 1], k, v, at, scale, window, sinks)[0]
            torch.testing.assert_close(out[i].double(), expected, rtol=1e-4, atol=1e-5)
            assert (out[i] - plain[i]).abs().max() > 1e-3


@pytest.mark.parametrize("kv_heads,group,head_dim", [(2, 4, 64), (1, 8, 64), (2, 1, 128)])
@pytest.mark.parametrize("window", [None, 24])
def test_sinks_prefill_matches_float64(kernels, kv_heads, group, head_dim, window):
    """Varlen prefill with sinks (whole prompts, a chunk after a cached prefix, a decode row,
    a prompt over a query block) against the float64 reference; a decode row through prefill
    equals the decode kernel's to rounding."""
    g = torch.Generator().manual_seed(kv_heads * 60 + group * 6 + head_dim + (window or 0))
    shapes = [(0, 19), (37, 12), (50, 1), (0, 1), (5, 75)]
    context_lens = [c + n for c, n in shapes]
    k_cache, v_cache, tables, slots = _paged(g, context_lens, kv_heads, head_dim)
    heads, scale = kv_heads * group, head_dim**-0.5
    sinks = _sinks(g, heads)
    query_lens = [n for _, n in shapes]
    q = torch.randn(sum(query_lens), heads, head_dim, generator=g)
    starts = torch.tensor([0, *torch.tensor(query_lens).cumsum(0).tolist()], dtype=torch.int32)
    lens = torch.tensor(context_lens, dtype=torch.int32)

    out = kernels.paged_prefill(
        q, k_cache, v_cache, tables, starts, lens, max(query_lens), BLOCK_SIZE, scale, window,
        sinks=sinks,
    )  # fmt: skip
    for i, s in enumerate(slots):
        rows = slice(int(starts[i]), int(starts[i + 1]))
        at = torch.arange(context_lens[i] - query_lens[i], context_lens[i])
        k, v = k_cache[s.long()], v_cache[s.long()]
        expected = sink_attention_reference(q[rows], k, v, at, scale, window, sinks)
        torch.testing.assert_close(out[rows].double(), expected, rtol=1e-4, atol=1e-5)
    row = int(starts[2])  # (50, 1): one decode row
    decode = kernels.paged_decode(
        q[row : row + 1], k_cache, v_cache, tables[2:3], lens[2:3], BLOCK_SIZE, scale, window,
        sinks=sinks,
    )  # fmt: skip
    torch.testing.assert_close(out[row], decode[0], rtol=1e-5, atol=1e-6)


# The model shapes of benchmarks/gpu_check.py: Gemma-3-270M (window), Qwen2.5-0.5B (a group of
# 7), Llama-3.2-1B, a soft-capped one, and an fp32 cache.
CUDA_SHAPES = [
    (4, 1, 256, 512, None, "bf16"),
    (14, 2, 64, None, None, "bf16"),
    (32, 8, 64, None, None, "bf16"),
    (8, 4, 128, 4096, 50.0, "bf16"),
    (4, 2, 128, None, None, "fp32"),
    (64, 8, 64, 128, None, "bf16", True),  # gpt-oss-20b's sliding layers, with sinks
]


def test_kernels_compile_for_hopper():
    """What the interpreter does not check (constexpr globals, tile shapes, shared memory):
    every kernel (decode one pass, split-K's two stages, prefill) compiles to sm_90 cubins for
    each shape, within its shared memory, in a process without TRITON_INTERPRET."""
    compiled = compile_for_hopper(
        "triton_paged_attention", f"[t.compile_for_cuda(90, *s) for s in {CUDA_SHAPES!r}]"
    )
    for shared in compiled:
        assert set(shared) == {
            "_decode_kernel",
            "_decode_split_kernel",
            "_decode_reduce_kernel",
            "_prefill_kernel",
            "_prefill_kernel_spans",
        }
        assert all(0 < b <= 227 * 1024 for b in shared.values())
