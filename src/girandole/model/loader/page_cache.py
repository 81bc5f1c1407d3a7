"""The packed-model cache file in the page cache as 2 MiB folios, so that its mapping takes 2 MiB
pages (Linux transparent huge pages for files).

A decode step streams every weight once: ~160 MB at one token for a 4-layer Qwen3-30B-A3B-shaped
file, hundreds of 4 KiB pages per expert, each its own TLB entry, and the CPUs' prefetchers stop
at every 4 KiB page boundary. The loader maps the cache file (torch.load with mmap), and the
kernel maps a file's page-cache folio with one 2 MiB page table entry where the folio is 2 MiB
and the mapping's address agrees with the file offset modulo 2 MiB (Linux aligns large file
mappings so). Whether the folios are that large depends on how the pages came to be cached:

- written (torch.save in the build child): small folios, and they stay cached so until the
  kernel drops them: the file's mapping then took 4 KiB pages (FilePmdMapped 0 kB in smaps);
- read from disk through a mapping advised MADV_HUGEPAGE: readahead reads 2 MiB folios (on a
  filesystem with large folios: ext4 from Linux 6.16, xfs from 5.18).

- cached in small folios, by a write or by reads of a few pages (a 2 MiB range of which some
  pages are cached, say after memory pressure evicted the rest, is read back around them in
  small folios): they stay so until they are dropped.

So the build child flushes the written file and drops its pages (`drop`), and a load reads the file
through such a mapping first (`read_huge`), one byte each 2 MiB (a no-op where the pages are cached
already). Where that mapping then takes fewer 2 MiB pages than the file has, on a filesystem that
has large folios, the file's pages that no process maps are dropped and read again, once: a page
cache fragmented since the last load heals at the next. Measured on AMD EPYC (Zen 4), 2 threads,
the same entry as two files in one process, calls alternating (docs/benchmarks.md, "The packed
entry in 2 MiB pages"): one token's experts over the 4 layers of the Qwen3-30B-A3B-shaped file 3.02
/ 3.17 -> 2.90 / 2.88 ms (two runs), its 12 dense linears at one row 1.41 / 1.50 -> 1.40 / 1.47 ms.
The small scattered matrices gain, the long ones hardly. No memory is added: the pages are the page
cache's, shared by every process that maps the file (a copy of the weights into anonymous huge
pages gave the experts as much, but each process its own copy and 1-2 s more to load).

Elsewhere (another OS, a filesystem without large folios, THP off) both are harmless: the file
is mapped in 4 KiB pages as before.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import mmap
import os
import sys
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)

HUGE_PAGE = 2 << 20  # x86-64's and arm64's (4 KiB granule) PMD size
TOUCH_WINDOW = 32 * HUGE_PAGE  # read_huge maps the file 64 MiB at a time


def drop(path: Path) -> None:
    """Write `path`'s dirty pages to disk and drop its pages from the page cache (those not
    mapped by a process), so that its next read caches it afresh."""
    if not hasattr(os, "posix_fadvise"):
        return
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)  # dirty pages are not dropped
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    except OSError as exc:
        log.debug("could not drop %s from the page cache: %s", path, exc)
    finally:
        os.close(fd)


def read_huge(path: Path) -> None:
    """Bring `path` into the page cache through a mapping advised MADV_HUGEPAGE, one byte each
    2 MiB: the pages read from disk come in 2 MiB folios. Pages cached already are left as they
    are, unless that mapping took fewer 2 MiB pages than it could where the filesystem has large
    folios: then those no process maps are dropped and read again."""
    if getattr(mmap, "MADV_HUGEPAGE", None) is None:
        return
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < HUGE_PAGE:
                return
            if _touch_huge(f.fileno(), size, path) or not large_folios(path):
                return
            log.info("%s was cached in small pages: dropping and reading it again", path)
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            _touch_huge(f.fileno(), size, path)
    except (OSError, ValueError) as exc:
        log.debug("could not read %s in 2 MiB folios: %s", path, exc)


def _touch_huge(fd: int, size: int, path: Path) -> bool:
    """Fault one byte each 2 MiB through mappings advised MADV_HUGEPAGE, a window of the file at
    a time; whether each window's mapping then took every 2 MiB page it could (True also where
    it cannot tell: the kernel did not align the mapping, so it takes none). A window, not the
    whole file: every page touched is in this process's RSS until it is unmapped, and the whole
    file at once was the start's peak (the default model's 350 MB entry: 523 -> 872 MiB)."""
    whole = True
    for offset in range(0, size, TOUCH_WINDOW):
        whole &= _touch_window(fd, offset, min(TOUCH_WINDOW, size - offset), path)
    return whole


def _touch_window(fd: int, offset: int, length: int, path: Path) -> bool:
    """`_touch_huge` for the `length` bytes from `offset` (a multiple of 2 MiB). libc's mmap,
    for the mapping's address."""
    libc = _libc()
    start = libc.mmap(None, length, mmap.PROT_READ, mmap.MAP_PRIVATE, fd, offset)
    if start in (None, ctypes.c_void_p(-1).value):
        raise OSError(ctypes.get_errno(), f"mmap of {path} failed")
    try:
        libc.madvise(start, length, mmap.MADV_HUGEPAGE)
        for at in range(0, length, HUGE_PAGE):
            ctypes.string_at(start + at, 1)  # the fault reads the 2 MiB folio around it
        if start % HUGE_PAGE:
            return True
        return pmd_mapped(path, start) >= (length // HUGE_PAGE) * HUGE_PAGE
    finally:
        libc.munmap(start, length)


@functools.cache
def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]  # fmt: skip
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc


def large_folios(path: Path) -> bool:
    """Whether files under `path` can be cached in 2 MiB folios and mapped so: Linux with THP
    not off, on a filesystem with large folios (xfs from 5.18, ext4 from 6.16)."""
    if thp_mode() == "never":
        return False
    needs = {"xfs": (5, 18), "ext4": (6, 16)}.get(_filesystem(path))
    return needs is not None and _kernel() >= needs


def thp_mode() -> str:
    """Linux's transparent huge page mode for anonymous and file memory: `always`, `madvise`
    (the usual default: only mappings advised MADV_HUGEPAGE) or `never` (also off Linux)."""
    if sys.platform != "linux":
        return "never"
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return "never"
    return text.split("[")[1].split("]")[0] if "[" in text else "never"


def _kernel() -> tuple[int, int]:
    major, minor = os.uname().release.split(".")[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


def _filesystem(path: Path) -> str:
    """The type of the filesystem holding `path` (the longest mount point above it)."""
    path = Path(path).resolve()
    best, kind = "", ""
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                fields = line.split()
                point = fields[1].rstrip("/") + "/"
                if (path.as_posix() + "/").startswith(point) and len(point) > len(best):
                    best, kind = point, fields[2]
    except OSError:
        return ""
    return kind


def smaps() -> Iterator[tuple[int, int, str, dict[str, str]]]:
    """This process's mappings from /proc/self/smaps: (start, end, path or "", fields such as
    {"Rss": "8192", "THPeligible": "1"}: the first word after each name); none off Linux."""
    try:
        with open("/proc/self/smaps") as f:
            mapping: tuple[int, int, str, dict[str, str]] | None = None
            for line in f:
                head = line.split(maxsplit=5)  # the path whole, spaces and all
                if head and "-" in head[0] and ":" not in head[0]:  # a mapping's first line
                    if mapping is not None:
                        yield mapping
                    lo, hi = (int(x, 16) for x in head[0].split("-"))
                    name = head[5].rstrip("\n") if len(head) == 6 else ""
                    mapping = (lo, hi, name, {})
                elif mapping is not None and head:
                    mapping[3][head[0].rstrip(":")] = head[1] if len(head) > 1 else ""
            if mapping is not None:
                yield mapping
    except OSError:
        return


def pmd_mapped(path: Path, start: int | None = None) -> int:
    """Bytes of this process's mappings of `path` (only the one at address `start`, if given)
    mapped in 2 MiB pages (smaps' FilePmdMapped; 0 off Linux): what `read_huge` is for, read
    back by it, its tests and benchmarks/bench_page_cache.py. With `start`, the mapping is found
    by its address alone; else by `path`, resolved (smaps names a file by its resolved path)."""
    name = str(Path(path).resolve()) if start is None else ""
    return sum(
        int(fields.get("FilePmdMapped", 0)) * 1024
        for lo, _, mapped, fields in smaps()
        if (lo == start if start is not None else mapped == name)
    )
