"""Requests that hold a deployment before its engine has them: waiting in the server's
admission queue, or starting on the engine. The engine's own counts (running, waiting) say
nothing of them, and the autoscaler took such a deployment for idle: a request queued behind
others for longer than the scaleToZeroWindow found its replica stopped once admitted (503).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager


class Holds:
    """How many requests hold each deployment now; `on_release` (its scale-to-zero clock
    starting over) runs as each hold ends."""

    def __init__(self, on_release: Callable[[str], None] = lambda name: None) -> None:
        self._counts: dict[str, int] = {}
        self._lock = threading.Lock()  # taken by the event loop and the autoscaler's thread
        self._on_release = on_release

    @contextmanager
    def hold(self, name: str) -> Iterator[None]:
        with self._lock:
            self._counts[name] = self._counts.get(name, 0) + 1
        try:
            yield
        finally:
            with self._lock:
                left = self._counts[name] - 1
                if left:
                    self._counts[name] = left
                else:
                    del self._counts[name]
            self._on_release(name)

    def held(self, name: str) -> bool:
        return name in self._counts

    def names(self) -> set[str]:
        """The deployments held now."""
        with self._lock:
            return set(self._counts)


__all__ = ["Holds"]
