"""A Ray replica puts every thread of its process back at the normal priority (Ray starts
workers niced; the replica's Ray threads are on each request's path)."""

from __future__ import annotations

import os
import threading

import pytest

pytest.importorskip("ray")

from girandole.deploy.ray_replica import _renice_threads  # noqa: E402


def test_renice_reaches_threads_started_before():
    niced, release = threading.Event(), threading.Event()
    tid: list[int] = []

    def worker():
        tid.append(threading.get_native_id())
        os.setpriority(os.PRIO_PROCESS, 0, 10)  # this thread only, as Ray's are
        niced.set()
        release.wait(10)

    t = threading.Thread(target=worker)
    t.start()
    try:
        assert niced.wait(10)
        assert os.getpriority(os.PRIO_PROCESS, tid[0]) == 10
        mine = os.getpriority(os.PRIO_PROCESS, 0)
        _renice_threads(mine)
        if os.getpriority(os.PRIO_PROCESS, tid[0]) == 10:
            pytest.skip("lowering a nice value needs CAP_SYS_NICE here")
        assert os.getpriority(os.PRIO_PROCESS, tid[0]) == mine
    finally:
        release.set()
        t.join()
