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

So the build child flushes the written file and drops its pages (`drop`), and a load reads the
file through such a mapping first (`read_huge`), one byte each 2 MiB (a no-op where the pages are
cached already). Measured on AMD EPYC (Zen 4), 2 threads, the same entry as two files in one
process, calls alternating (docs/benchmarks.md, "The packed entry in 2 MiB pages"): one token's
experts over the 4 layers of the Qwen3-30B-A3B-shaped file 3.02 / 3.17 -> 2.90 / 2.88 ms (two
runs), its 12 dense linears at one row 1.41 / 1.50 -> 1.40 / 1.47 ms. The small scattered
matrices gain, the long ones hardly. No memory is added: the pages are the page cache's, shared
by every process that maps the file (a copy of the weights into anonymous huge pages gave the
experts as much, but each process its own copy and 1-2 s more to load).

Elsewhere (another OS, a filesystem without large folios, THP off) both are harmless: the file
is mapped in 4 KiB pages as before.
"""

from __future__ import annotations

import logging
import mmap
import os
from pathlib import Path

log = logging.getLogger(__name__)

HUGE_PAGE = 2 << 20  # x86-64's and arm64's (4 KiB granule) PMD size


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
    2 MiB: the pages read from disk come in 2 MiB folios (pages cached already are left as
    they are)."""
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if advice is None:
        return
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < HUGE_PAGE:
                return
            with mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ) as mm:
                mm.madvise(advice)
                for offset in range(0, size, HUGE_PAGE):
                    mm[offset]  # the fault reads the 2 MiB folio around it
    except (OSError, ValueError) as exc:
        log.debug("could not read %s in 2 MiB folios: %s", path, exc)


def pmd_mapped(path: Path) -> int:
    """Bytes of this process's mappings of `path` mapped in 2 MiB pages (smaps' FilePmdMapped;
    0 off Linux): what `read_huge` is for, read back by its tests and benchmarks/bench_page_cache.py."""
    total, current = 0, False
    try:
        with open("/proc/self/smaps") as f:
            for line in f:
                head = line.split()
                if head and "-" in head[0] and ":" not in head[0]:  # a mapping's first line
                    current = len(head) >= 6 and head[5] == str(path)
                elif current and line.startswith("FilePmdMapped:"):
                    total += int(head[1]) * 1024
    except OSError:
        return 0
    return total
