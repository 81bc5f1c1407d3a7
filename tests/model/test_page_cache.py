"""The packed-model cache is mapped in 2 MiB pages (model/loader/page_cache.py): its file is
dropped from the page cache once written and read back through a mapping advised
MADV_HUGEPAGE, so its folios are 2 MiB and the loader's mapping takes them whole (smaps'
FilePmdMapped). Where the kernel or the filesystem cannot (another OS, THP off, a filesystem
without large folios) the tests are skipped: the loader maps 4 KiB pages there, as before."""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import pytest
import torch
from torch import nn

from girandole.model.default import cache_dir
from girandole.model.loader import _save_cache, page_cache

MIB = 1 << 20


def test_a_written_file_dropped_and_read_huge_is_mapped_in_2_mib_pages(tmp_path):
    if not page_cache.large_folios(tmp_path):
        pytest.skip("no 2 MiB file folios here (not Linux, THP off, or the filesystem)")
    path = tmp_path / "weights.bin"
    data = os.urandom(12 * MIB + 12345)
    with open(path, "wb") as f:  # in small writes, as torch.save writes: small folios
        for start in range(0, len(data), 1 << 16):
            f.write(data[start : start + (1 << 16)])
    page_cache.drop(path)
    page_cache.read_huge(path)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE) as mm:
        view = torch.frombuffer(mm, dtype=torch.uint8)
        assert bytes(mm[: 1 << 16]) == data[: 1 << 16]
        assert int(view[::4096].sum()) == sum(data[::4096])  # every page touched
        # the mapping starts 2 MiB-aligned: all 6 whole 2 MiB pages of the file
        assert page_cache.pmd_mapped(path) == 12 * MIB
        del view


def test_read_huge_maps_a_window_of_the_file_at_a_time(tmp_path, monkeypatch):
    # before: the whole file at once, every 2 MiB page of it in the process's RSS until the
    # read ended (the default model's start: 523 -> 872 MiB for its 350 MB entry)
    if not page_cache.large_folios(tmp_path):
        pytest.skip("no 2 MiB file folios here (not Linux, THP off, or the filesystem)")
    path = tmp_path / "weights.bin"
    data = os.urandom(13 * MIB + 5)
    path.write_bytes(data)
    monkeypatch.setattr(page_cache, "TOUCH_WINDOW", 4 * MIB)
    mapped_then = []  # bytes of the file mapped in 2 MiB pages as each window is checked
    check = page_cache.pmd_mapped

    def counting(p, start=None):
        mapped_then.append(check(p))
        return check(p, start)

    monkeypatch.setattr(page_cache, "pmd_mapped", counting)
    page_cache.drop(path)
    page_cache.read_huge(path)
    monkeypatch.setattr(page_cache, "pmd_mapped", check)
    # three whole windows checked (the last, 1 MiB, holds no 2 MiB page)
    assert mapped_then == [4 * MIB] * 3
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE) as mm:
        view = torch.frombuffer(mm, dtype=torch.uint8)
        assert int(view[::4096].sum()) == sum(data[::4096])
        assert page_cache.pmd_mapped(path) == 12 * MIB  # every whole 2 MiB page: one folio
        del view


def test_a_file_cached_in_small_pages_is_read_again_in_2_mib_pages(tmp_path):
    if not page_cache.large_folios(tmp_path):
        pytest.skip("no 2 MiB file folios here (not Linux, THP off, or the filesystem)")
    path = tmp_path / "weights.bin"
    data = os.urandom(16 * MIB)
    path.write_bytes(data)
    page_cache.drop(path)
    fd = os.open(path, os.O_RDONLY)
    try:  # a page of each 4 MiB read alone (as after memory pressure evicted the rest)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        for offset in range(0, 16 * MIB, 4 * MIB):
            os.pread(fd, 4096, offset + 8192)
    finally:
        os.close(fd)
    page_cache.read_huge(path)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE) as mm:
        view = torch.frombuffer(mm, dtype=torch.uint8)
        assert int(view[::4096].sum()) == sum(data[::4096])
        assert page_cache.pmd_mapped(path) == 16 * MIB  # before: 0 (every range fragmented)
        del view


def test_a_file_through_a_symlinked_folder_is_read_once(tmp_path, caplog):
    """smaps names the resolved path: read_huge must find its mapping all the same, and not take
    the file for fragmented (and read it again) at every load."""
    if not page_cache.large_folios(tmp_path):
        pytest.skip("no 2 MiB file folios here (not Linux, THP off, or the filesystem)")
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    path = tmp_path / "link" / "a file.bin"
    path.write_bytes(os.urandom(8 * MIB))
    page_cache.drop(path)
    page_cache.read_huge(path)
    with caplog.at_level("INFO", logger=page_cache.log.name):
        page_cache.read_huge(path)
    assert "small pages" not in caplog.text
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE) as mm:
        view = torch.frombuffer(mm, dtype=torch.uint8)
        view[::4096].sum()
        assert page_cache.pmd_mapped(path) == 8 * MIB
        del view


def test_a_saved_cache_entry_maps_in_2_mib_pages_and_reads_the_same(tmp_path):
    if not page_cache.large_folios(tmp_path):
        pytest.skip("no 2 MiB file folios here (not Linux, THP off, or the filesystem)")
    module = nn.Module()
    for i in range(256):  # 16 MiB in 64 KiB tensors, as a model's layers
        module.register_buffer(f"w{i}", torch.randint(0, 255, (1 << 16,), dtype=torch.uint8))
    entry = tmp_path / "packed" / "entry.pt"
    _save_cache(module, None, entry)
    page_cache.read_huge(entry)
    back = torch.load(entry, mmap=True, weights_only=False)["model"]
    for name, tensor in module.named_buffers():  # reads every page
        assert torch.equal(getattr(back, name), tensor), name
    assert page_cache.pmd_mapped(entry) >= 14 * MIB


def test_the_default_models_packed_weights_are_mapped_in_2_mib_pages(default_fast):
    folder = cache_dir() / "packed"
    if not page_cache.large_folios(folder):
        pytest.skip("no 2 MiB file folios here (not Linux, THP off, or the filesystem)")
    model, _ = default_fast
    storages = {
        t.untyped_storage().data_ptr(): t.untyped_storage() for t in model.state_dict().values()
    }
    for storage in storages.values():  # every page of the weights touched
        torch.empty(0, dtype=torch.uint8).set_(storage)[::4096].sum()
    entries = [Path(p) for p in folder.glob("gemma-3-270m-*.pt")]
    size = {p: p.stat().st_size for p in entries}
    pmd = {p: page_cache.pmd_mapped(p) for p in entries}
    entry = max(pmd, key=pmd.get)
    assert pmd[entry] >= 0.9 * size[entry], (pmd, size)
