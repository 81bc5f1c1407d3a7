"""Reading an evaluator's uploaded source archive: zip and tar, what is left out, the limits."""

from __future__ import annotations

import io
import tarfile
import zipfile
from pathlib import Path

import pytest

from girandole.evaluators import archive
from girandole.evaluators.archive import ArchiveError, parse_entry_point, read_sources


def test_a_zip_and_a_tar_with_a_link_and_binary_files(tmp_path: Path) -> None:
    zipped = tmp_path / "src.zip"
    with zipfile.ZipFile(zipped, "w") as z:
        z.writestr("main.py", "def evaluate(**kw):\n    return 1\n")
        z.writestr("data/", "")
        z.writestr("data/table.bin", b"\xff\xfe\x00")
        z.writestr(".git/HEAD", "ref")
    tarred = tmp_path / "more.tar"
    with tarfile.open(tarred, "w") as t:
        info = tarfile.TarInfo("helpers.py")
        info.size = 4
        t.addfile(info, io.BytesIO(b"x=1\n"))
        link = tarfile.TarInfo("secret.py")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        t.addfile(link)
    files, skipped = read_sources([zipped, tarred])
    assert files == {"main.py": "def evaluate(**kw):\n    return 1\n", "helpers.py": "x=1\n"}
    assert skipped == ["data/table.bin"]


def test_limits_and_bad_archives(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    big = tmp_path / "big.zip"
    with zipfile.ZipFile(big, "w") as z:
        z.writestr("a.py", "x" * 2000)
    monkeypatch.setattr(archive, "MAX_SOURCE_BYTES", 1000)
    with pytest.raises(ArchiveError, match="more than 1000 bytes"):
        read_sources([big])
    empty = tmp_path / "empty.zip"
    zipfile.ZipFile(empty, "w").close()
    with pytest.raises(ArchiveError, match="no text file"):
        read_sources([empty])
    (tmp_path / "x.tar.gz").write_bytes(b"garbage")
    with pytest.raises(ArchiveError, match="not a readable archive"):
        read_sources([tmp_path / "x.tar.gz"])


def test_entry_points() -> None:
    assert parse_entry_point("pkg/test_x.py::test_score") == ("pkg/test_x.py", "test_score")
    assert parse_entry_point("main.py") == ("main.py", "evaluate")
    for bad in ("main", "main.py::not a name", "x.js::f"):
        with pytest.raises(ValueError, match="is not `file.py::function`"):
            parse_entry_point(bad)
