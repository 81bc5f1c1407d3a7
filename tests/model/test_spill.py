"""A packed-model cache build moves each finished layer's tensors to a scratch file
(model/loader/spill.py), so its memory is one layer's rather than the whole model's; the entry it
writes holds the same tensors as a build in memory."""

from __future__ import annotations

import pytest
import torch
from model_helpers import write_tiny_gguf, write_tiny_hf
from torch import nn

from girandole.model.loader import build_cache_entry, load_model
from girandole.model.loader.spill import ALIGN, SpillArena

# block-quantized types of a row this narrow (llama.cpp's K-quants need 256 columns)
QTYPES = {
    "attn_q": "Q5_0",
    "attn_k": "Q8_0",
    "attn_v": "Q8_0",
    "ffn_down": "Q4_0",
    "ffn_up": "Q8_0",
}


def _module() -> nn.Module:
    torch.manual_seed(0)
    m = nn.Module()
    m.norm = nn.Parameter(torch.randn(33))
    m.register_buffer("levels", torch.randint(-128, 127, (70, 31), dtype=torch.int8))
    m.register_buffer("scales", torch.randn(5, 7).to(torch.bfloat16))
    m.register_buffer("big", torch.randn(3000))  # 12,000 bytes: larger than a chunk
    m.register_buffer("absent", None)
    inner = nn.Module()
    inner.register_buffer("ids", torch.arange(100, dtype=torch.int64))
    inner.register_buffer("more", torch.randint(-128, 127, (40,), dtype=torch.int8))
    m.inner = inner
    return m


def test_the_arena_holds_the_same_tensors_and_saves_no_slack(tmp_path):
    m = _module()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    arena = SpillArena(tmp_path / "scratch", chunk_bytes=4096)
    arena.take(m.inner)  # a layer first, then the rest (inner's tensors are not moved twice)
    arena.take(m)
    arena.finish()

    assert isinstance(m.norm, nn.Parameter) and m.absent is None
    for key, value in m.state_dict().items():
        assert torch.equal(value, before[key]), key
        assert value.data_ptr() % ALIGN == 0, key
        assert arena._holds(value), key
    # a chunk holds one dtype, and every chunk is cut to what it holds
    storages = {t.untyped_storage().data_ptr(): t for t in m.state_dict().values()}
    assert len(storages) < len(before)
    padded = sum(-(-t.nbytes // ALIGN) * ALIGN for t in before.values())
    held = sum(t.untyped_storage().nbytes() for t in storages.values())
    assert held <= padded

    torch.save(m, tmp_path / "entry.pt")
    back = torch.load(tmp_path / "entry.pt", mmap=True, weights_only=False)
    for key, value in back.state_dict().items():
        assert torch.equal(value, before[key]), key
        assert value.data_ptr() % ALIGN == 0, key
    assert (tmp_path / "entry.pt").stat().st_size < padded + (64 << 10)


@pytest.mark.parametrize("kind", ["llama", "gemma3", "qwen3"])
def test_a_cache_entry_built_through_the_arena_is_the_model_built_in_memory(tmp_path, kind):
    hf = write_tiny_hf(kind, tmp_path / "hf", seed=3)
    path = tmp_path / f"tiny-{kind}.gguf"
    write_tiny_gguf(hf, kind, path, QTYPES)
    entry = tmp_path / "entry.pt"
    build_cache_entry(str(path), str(entry))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["entry.pt", "hf", path.name]

    spilled = torch.load(entry, mmap=True, weights_only=False)["model"]
    built, _ = load_model(path, mode="fast", device="cpu", use_cache=False)
    a, b = spilled.state_dict(), built.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
    # the layers' tensors share a few file-backed chunks, where a build in memory has one
    # storage a tensor
    assert len({t.untyped_storage().data_ptr() for t in a.values()}) < len(a) // 4
    ids = torch.tensor([1, 17, 42, 99, 5, 250, 7])
    with torch.inference_mode():
        x = spilled.compute_logits(spilled(ids, torch.arange(len(ids))))
        y = built.compute_logits(built(ids, torch.arange(len(ids))))
    assert torch.equal(x, y)


def test_the_child_builds_the_first_entry_of_a_fresh_cache_folder(tmp_path, caplog):
    # a first start on a new machine: no packed/ folder yet. The scratch file goes there before
    # the entry: the child failed (FileNotFoundError) and the server built in its own memory.
    from girandole.model.loader import _build_cache_in_child

    hf = write_tiny_hf("llama", tmp_path / "hf", seed=3)
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(hf, "llama", path, QTYPES)
    entry = tmp_path / "cache" / "packed" / "tiny.pt"
    with caplog.at_level("WARNING", logger="girandole.model.loader"):
        _build_cache_in_child(path, entry)
    assert not caplog.records, caplog.text
    assert sorted(p.name for p in entry.parent.iterdir()) == ["tiny.pt"]
