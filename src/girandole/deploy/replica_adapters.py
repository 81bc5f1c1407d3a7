"""ReplicaAdapters: the LoRA adapters of one Ray replica, loaded on the first request that names
them.

Lazy on purpose: a Ray Serve handle call reaches one replica (Serve has no broadcast), and
replicas come and go (autoscaling, a scale from zero, a replaced replica). The ingress keeps a
deployment's adapters (name -> folder) and sends the folder with every request for one, so any
replica, however it started, serves every adapter of its deployment; the router prefers a
replica that holds the adapter (ray_router.py), so each replica that needs one reads it once.
The folder must be readable on every node (a shared filesystem, or the same path everywhere).
Which registered adapters are resident stays the engine's `--max-loras` LRU.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

logger = logging.getLogger("girandole.deploy")


class ReplicaAdapters:
    def __init__(self, engine: Any) -> None:
        self.engine = engine  # AsyncEngine: load_lora, unload_lora, lora_names
        self.paths: dict[str, str] = {}  # name -> the folder it was read from
        self._loading: dict[tuple[str, str], asyncio.Future] = {}

    async def ensure(self, name: str, path: str) -> None:
        """Register adapter `name` from `path` unless this replica holds it from that folder
        (once, however many requests ask at the same time); ValueError when it does not fit."""
        if self.paths.get(name) == path and name in self.engine.lora_names():
            return
        key = (name, path)
        pending = self._loading.get(key)
        if pending is None:
            pending = asyncio.ensure_future(self._load(name, path))
            self._loading[key] = pending
            pending.add_done_callback(lambda f: self._done(key, f))
        await asyncio.shield(pending)

    async def _load(self, name: str, path: str) -> None:
        await self.engine.load_lora(name, path)
        self.paths[name] = path
        logger.info("LoRA %s loaded on this replica from %s", name, path)

    def _done(self, key: tuple[str, str], future: asyncio.Future) -> None:
        self._loading.pop(key, None)
        if not future.cancelled():
            future.exception()  # retrieved: its waiters report it

    def unload(self, name: str) -> bool:
        self.paths.pop(name, None)
        return self.engine.unload_lora(name)
