"""The Triton paged attention kernels (girandole/model/kernels/triton_paged_attention.py) under
Triton's CPU interpreter, against the engine's own attention (Attention._attend_sequence over the
keys gathered through the block table): decode and varlen prefill, head_dim 64/128/256, GQA
groups 1/4/8, sliding window and soft-cap on and off, ragged lengths, scattered blocks."""

from __future__ import annotations

import os

import pytest
import torch

# Read when a kernel is decorated: set before the kernel module is first imported.
os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")

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


# The model shapes of benchmarks/gpu_check.py: Gemma-3-270M (window), Qwen2.5-0.5B (a group of
# 7), Llama-3.2-1B, a soft-capped one, and an fp32 cache.
CUDA_SHAPES = [
    (4, 1, 256, 512, None, "bf16"),
    (14, 2, 64, None, None, "bf16"),
    (32, 8, 64, None, None, "bf16"),
    (8, 4, 128, 4096, 50.0, "bf16"),
    (4, 2, 128, None, None, "fp32"),
]


def test_kernels_compile_for_hopper():
    """What the interpreter does not check (constexpr globals, tile shapes, shared memory):
    both kernels compile to sm_90 cubins for each shape, within its shared memory, in a
    process without TRITON_INTERPRET."""
    import json
    import subprocess
    import sys

    nvidia = pytest.importorskip("triton.backends.nvidia")
    from pathlib import Path

    if not (Path(nvidia.__file__).parent / "bin" / "ptxas").is_file():
        pytest.skip("triton's CUDA backend has no bundled ptxas here")

    script = (
        "import json, sys\n"
        "from girandole.model.kernels import triton_paged_attention as t\n"
        f"shapes = {CUDA_SHAPES!r}\n"
        "print(json.dumps([t.compile_for_cuda(90, *s) for s in shapes]))\n"
    )
    import girandole

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    src = str(Path(girandole.__file__).parents[1])  # this checkout's sources
    env["PYTHONPATH"] = os.pathsep.join([src, env.get("PYTHONPATH", "")])
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    for shared in json.loads(done.stdout.strip().splitlines()[-1]):
        assert set(shared) == {"_decode_kernel", "_prefill_kernel"}
        assert all(0 < b <= 227 * 1024 for b in shared.values())
