"""Usage accounting: one row per inference request, written to the database by a thread of its
own so that the event loop never waits on SQLite. `close()` writes whatever is still queued:
nothing is lost on a clean shutdown."""

from __future__ import annotations

import logging
import queue
import threading

from girandole.registry.keystore import Database

logger = logging.getLogger("girandole.usage")

_STOP = object()


class UsageRecorder:
    def __init__(self, db: Database) -> None:
        self.db = db
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._closed = False
        self._pending = 0
        self._idle = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="girandole-usage", daemon=True)
        self._thread.start()

    def record(self, row: dict) -> None:
        if self._closed:  # after close: write at once, in the caller's thread
            self._write([row])
            return
        with self._idle:
            self._pending += 1
        self._queue.put(row)

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every row recorded so far is in the database."""
        with self._idle:
            return self._idle.wait_for(lambda: self._pending == 0, timeout)

    def close(self, timeout: float = 30.0) -> None:
        if self._closed:
            return
        self._closed = True
        self._queue.put(_STOP)
        self._thread.join(timeout)

    def _write(self, rows: list[dict]) -> None:
        try:
            self.db.insert_usage(rows)
        except Exception:  # noqa: BLE001 - a full disk must not fail requests
            logger.exception("could not record usage of %d request(s)", len(rows))

    def _run(self) -> None:
        stop = False
        while not stop:
            rows = []
            item = self._queue.get()
            while True:
                if item is _STOP:
                    stop = True
                else:
                    rows.append(item)
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
            self._write(rows)
            with self._idle:
                self._pending -= len(rows)
                self._idle.notify_all()
