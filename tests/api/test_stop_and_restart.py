"""Servers stopped (SIGTERM, SIGINT, SIGKILL) with work in flight, and started again on the same
--data-dir; a tiny model (no real one needed): a second server on a folder in use is refused,
while a restart after a kill is not."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import httpx
from conftest import ROOT, start_server, stop_server, write_eos_model
from loopback import free_port


def test_a_second_server_on_a_data_dir_in_use_is_refused(tmp_path):
    """Two servers on one folder: the second's start-up took the first's running background
    responses for a dead server's and failed them (and its batch runner ran the first's jobs
    again). It now stops at once naming --data-dir and the holder; once the holder is killed
    (SIGKILL: no clean-up) the folder is free again."""
    model = write_eos_model(tmp_path / "eos")
    data = tmp_path / "data"
    args = ("--model", str(model), "--model-id", "tiny-eos", "--kv-cache-gb", "0.01",
            "--data-dir", str(data))  # fmt: skip
    first = start_server(tmp_path, *args, api_key=None)
    try:
        cmd = [sys.executable, "-m", "girandole.cli", "serve", "--port", str(free_port()), *args]
        try:  # the old code served (no exit): the timeout only ends that
            second = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
        except subprocess.TimeoutExpired:
            raise AssertionError("a second server started on a --data-dir in use") from None
        assert second.returncode == 2, second.stderr[-2000:]
        assert "--data-dir" in second.stderr and "in use" in second.stderr, second.stderr
        assert f"pid {first.process.pid}" in second.stderr, second.stderr
        assert first.health()["status"] == "ready"  # the first one is untouched
        os.kill(first.process.pid, signal.SIGKILL)
        first.process.wait(10)
        again = start_server(tmp_path, *args, api_key=None)  # the lock died with its holder
        try:
            r = httpx.post(
                again.url + "/v1/completions",
                json={"model": "tiny-eos", "prompt": "hi", "max_tokens": 2},
                timeout=60,
            )
            assert r.status_code == 200, r.text
        finally:
            stop_server(again)
    finally:
        if first.process.poll() is None:
            stop_server(first)
