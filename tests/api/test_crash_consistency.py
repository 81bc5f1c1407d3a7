"""What a server killed (SIGKILL: no clean-up) in the middle of storing something leaves for the
next start on the same --data-dir: each upload, dataset or conversation turn is there whole or
not at all. A tiny model (nothing here runs it) behind an open server of account `testing`."""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from conftest import start_server, stop_server, write_eos_model

ACCOUNT = "testing"


@pytest.fixture(scope="module")
def eos_model(tmp_path_factory) -> Path:
    return write_eos_model(tmp_path_factory.mktemp("eos") / "model")


def _serve(tmp_path: Path, model: Path):
    return start_server(
        tmp_path, "--model", str(model), "--model-id", "tiny-eos", "--account", ACCOUNT,
        "--kv-cache-gb", "0.01", "--data-dir", str(tmp_path / "data"), api_key=None,
    )  # fmt: skip


def _kill(server) -> None:
    os.kill(server.process.pid, signal.SIGKILL)
    server.process.wait(30)


def _form(name: str, data: bytes, boundary: str = "b0undary") -> tuple[dict[str, str], bytes]:
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    body = head + data + f"\r\n--{boundary}--\r\n".encode()
    return {"Content-Type": f"multipart/form-data; boundary={boundary}"}, body


def _upload_traces(data_dir: Path) -> bool:
    """Whether the upload has left any trace in the store yet: a dataset's row or folder."""
    folder = data_dir / "datasets" / ACCOUNT
    if folder.is_dir() and any(folder.iterdir()):
        return True
    with sqlite3.connect(data_dir / "girandole.db", timeout=10) as db:
        return bool(db.execute("SELECT 1 FROM datasets").fetchall())


def _check_all_or_nothing(server, data_dir: Path, data: bytes) -> None:
    """Every dataset READY and every file listed whole; no dataset folder, no temporary file
    that nothing names."""
    datasets = httpx.get(f"{server.url}/v1/accounts/{ACCOUNT}/datasets").json()["datasets"]
    assert [d["state"] for d in datasets] == ["READY"] * len(datasets), datasets
    files = httpx.get(server.url + "/v1/files").json()["data"]
    assert sorted(f["id"] for f in files) == sorted(d["name"].rsplit("/")[-1] for d in datasets)
    for f in files:
        content = httpx.get(f"{server.url}/v1/files/{f['id']}/content", timeout=60)
        assert content.content == data and f["bytes"] == len(data)
    folders = sorted(p.name for p in (data_dir / "datasets" / ACCOUNT).glob("*"))
    assert folders == sorted(f["id"] for f in files), (folders, files)
    assert list((data_dir / "datasets" / ".partial").glob("*")) == []


def _kill_when(server, headers: dict, sent: bytes, length: int, seen: Callable[[], bool],
               timeout: float) -> None:  # fmt: skip
    """POST /v1/files with `sent` (the first bytes of a `length`-byte body) on a raw socket, and
    kill -9 the server the moment `seen()` says the upload has reached the point under test."""
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        head = (
            "POST /v1/files HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Content-Type: {headers['Content-Type']}\r\nContent-Length: {length}\r\n\r\n"
        ).encode()
        sock.sendall(head + sent)
        deadline = time.monotonic() + timeout
        while not seen():
            assert time.monotonic() < deadline and server.process.poll() is None
            time.sleep(0.002)
        _kill(server)


def _upload_still_works(server) -> None:
    headers, body = _form("after.jsonl", b'{"a": 1}\n')
    r = httpx.post(server.url + "/v1/files", headers=headers, content=body, timeout=60)
    assert r.status_code == 200, r.text
    got = httpx.get(f"{server.url}/v1/files/{r.json()['id']}/content")
    assert got.content == b'{"a": 1}\n'


def test_a_file_upload_killed_as_it_is_stored_is_there_whole_or_not_at_all(tmp_path, eos_model):
    """kill -9 the moment a `POST /v1/files` leaves its first trace in the store (its dataset's
    row or folder): the dataset was inserted UPLOADING, then its file placed and its lines
    counted (most of a second for this 2 MB file of 1 M lines), and the file named last, so
    the kill left a dataset UPLOADING for good, no file naming it, its bytes on disk. The next
    start must show the upload complete (READY, listed, its bytes whole) or not at all."""
    data = b"x\n" * 1024 * 1024
    headers, body = _form("big.jsonl", data)
    data_dir = tmp_path / "data"
    server = _serve(tmp_path, eos_model)
    try:
        _kill_when(server, headers, body, len(body), lambda: _upload_traces(data_dir), 120)
        server = _serve(tmp_path, eos_model)
        _check_all_or_nothing(server, data_dir, data)
        _upload_still_works(server)
    finally:
        if server.process.poll() is None:
            stop_server(server)


def test_a_file_upload_killed_while_its_body_arrives_leaves_nothing(tmp_path, eos_model):
    """kill -9 with half of an upload's body received (its bytes in a temporary file): the next
    start lists no file or dataset and has no bytes of it on disk; an upload then works."""
    headers, body = _form("cut.jsonl", b'{"line": 1}\n' * 100_000)
    data_dir = tmp_path / "data"
    server = _serve(tmp_path, eos_model)
    try:
        partial = data_dir / "datasets" / ".partial"
        half = body[: len(body) // 2]

        def started() -> bool:  # the body's first bytes are in its temporary file
            return any(p.stat().st_size > 0 for p in partial.glob("*"))

        _kill_when(server, headers, half, len(body), started, 60)
        server = _serve(tmp_path, eos_model)
        _check_all_or_nothing(server, data_dir, b"")
        assert httpx.get(server.url + "/v1/files").json()["data"] == []
        _upload_still_works(server)
    finally:
        if server.process.poll() is None:
            stop_server(server)


def _dataset_traces(data_dir: Path, dataset_id: str) -> bool:
    """Whether the dataset has a row or a folder yet."""
    if (data_dir / "datasets" / ACCOUNT / dataset_id).exists():
        return True
    with sqlite3.connect(data_dir / "girandole.db", timeout=10) as db:
        query = "SELECT 1 FROM datasets WHERE dataset_id = ?"
        return bool(db.execute(query, (dataset_id,)).fetchall())


def test_a_dataset_copy_killed_as_it_is_made_is_there_whole_or_not_at_all(tmp_path, eos_model):
    """kill -9 the moment a dataset created from `sourceDatasetId` leaves its first trace: it
    was inserted UPLOADING, then the source's files copied and counted, so the kill left it
    UPLOADING with part of them, and the client's retry was a 409 ALREADY_EXISTS. The next
    start must show it READY with all the source's bytes, or not at all (a retry makes it)."""
    data = b"x\n" * 1024 * 1024
    data_dir = tmp_path / "data"
    datasets = f"/v1/accounts/{ACCOUNT}/datasets"
    server = _serve(tmp_path, eos_model)
    try:
        r = httpx.post(server.url + datasets, json={"datasetId": "source", "dataset": {}})
        assert r.status_code == 200, r.text
        files = {"file": ("big.jsonl", data)}
        r = httpx.post(f"{server.url}{datasets}/source:upload", files=files, timeout=120)
        assert r.status_code == 200, r.text
        create = json.dumps({"datasetId": "copy", "dataset": {},
                             "sourceDatasetId": f"accounts/{ACCOUNT}/datasets/source"})  # fmt: skip
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            sock.sendall(
                f"POST {datasets} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json"
                f"\r\nContent-Length: {len(create)}\r\n\r\n{create}".encode()
            )
            deadline = time.monotonic() + 120
            while not _dataset_traces(data_dir, "copy"):
                assert time.monotonic() < deadline and server.process.poll() is None
                time.sleep(0.002)
            _kill(server)
        server = _serve(tmp_path, eos_model)
        r = httpx.get(f"{server.url}{datasets}/copy")
        copy = data_dir / "datasets" / ACCOUNT / "copy"
        if r.status_code == 404:  # not made: no bytes of it left; the retry makes it
            assert not copy.exists()
            r = httpx.post(server.url + datasets, content=create, timeout=120,
                           headers={"Content-Type": "application/json"})  # fmt: skip
            assert r.status_code == 200, r.text
        assert r.json()["state"] == "READY", r.text
        assert r.json()["exampleCount"] == str(1024 * 1024)
        assert (copy / "big.jsonl").read_bytes() == data
        assert list((data_dir / "datasets" / ".partial").glob("*")) == []
        r = httpx.post(server.url + datasets, content=create, timeout=120,
                       headers={"Content-Type": "application/json"})  # fmt: skip
        assert r.status_code == 409 and r.json()["error"]["code"] == "ALREADY_EXISTS", r.text
        missing = {"datasetId": "other", "dataset": {}, "sourceDatasetId": "nope"}
        r = httpx.post(server.url + datasets, json=missing)
        assert r.status_code == 400 and r.json()["error"]["param"] == "sourceDatasetId", r.text
        assert list((data_dir / "datasets" / ".partial").glob("*")) == []
    finally:
        if server.process.poll() is None:
            stop_server(server)
