"""LoRAManager: the adapters an engine can run, and which of them are resident on its device.

Adapters are registered by name (read and checked against the base model, kept in CPU memory);
any number may be registered. At most `max_loras` are resident (their fused weights on the
device) at once: a request for another one waits for admission until the least recently used
resident adapter that no running sequence uses is evicted. A sequence holds the adapter object
it runs, so unloading an adapter never ends a request that was already accepted: the name stops
taking new requests at once, and the weights go once the last request using them finishes.
"""

from __future__ import annotations

import itertools
import threading
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

from girandole.engine.protocol import AdapterNotLoadedError
from girandole.engine.sequence import Sequence
from girandole.model import lora
from girandole.model.context import to_device
from girandole.model.lora import LoRAAdapter, LoRABatch

_uids = itertools.count(1)


class LoRAManager:
    def __init__(self, model: nn.Module, device: torch.device, max_loras: int = 8) -> None:
        if max_loras < 1:
            raise ValueError(f"max_loras must be at least 1, got {max_loras}")
        self.model = model
        self.spec = model.spec
        self.device = device
        self.max_loras = max_loras
        self._lock = threading.Lock()  # registration happens on API threads
        self.registered: dict[str, LoRAAdapter] = {}
        # Owned by the engine thread: uid -> the adapter on the device, least recent first.
        self.resident: OrderedDict[int, LoRAAdapter] = OrderedDict()
        self._attached = False
        self.num_loads = 0  # adapters made resident (evictions force reloads)

    # -- registration (any thread) -------------------------------------------------------------

    def read(self, name: str, path: str | Path) -> LoRAAdapter:
        """Read and check an adapter for this base model (AdapterError names the problem)."""
        return lora.read_adapter(path, self.spec, name)

    def register(self, adapter: LoRAAdapter) -> None:
        """Make `adapter` runnable by its name (replacing one of the same name)."""
        adapter.uid = next(_uids)
        with self._lock:
            self.registered[adapter.name] = adapter

    def unregister(self, name: str) -> bool:
        """Stop taking requests for `name`; False if it was not registered."""
        with self._lock:
            return self.registered.pop(name, None) is not None

    def get(self, name: str) -> LoRAAdapter:
        with self._lock:
            adapter = self.registered.get(name)
        if adapter is None:
            raise AdapterNotLoadedError(f"LoRA adapter {name!r} is not loaded on this deployment")
        return adapter

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self.registered)

    # -- residency (the engine thread) -----------------------------------------------------------

    def admit(self, seq: Sequence, running: list[Sequence]) -> bool:
        """Make seq's adapter resident (evicting the least recently used one that no running
        sequence uses); False when every resident slot is in use."""
        source = seq.lora_source
        if source is None:
            return True
        if not self._attached:
            lora.attach(self.model)
            self._attached = True
        held = self.resident.get(source.uid)
        if held is None:
            in_use = {s.lora_source.uid for s in running if s.lora_source is not None}
            registered = {a.uid for a in self.registered.values()}
            # Unloaded adapters no request uses go first, then the least recently used.
            idle = [u for u in self.resident if u not in in_use]
            idle.sort(key=lambda u: u in registered)
            while len(self.resident) >= self.max_loras:
                if not idle:
                    return False
                del self.resident[idle.pop(0)]
            held = self._to_device(source)
            self.resident[source.uid] = held
            self.num_loads += 1
        self.resident.move_to_end(source.uid)
        seq.lora = held
        return True

    def _to_device(self, source: LoRAAdapter) -> LoRAAdapter:
        if self.device.type == "cpu":
            return source
        copy = LoRAAdapter(
            source.name, source.path, source.rank, source.alpha, source.rslora,
            source.targets, source.raw, dict(source.fused),
        )  # fmt: skip
        copy.uid = source.uid
        dtype = torch.float32
        return copy.to(self.device, dtype)


def lora_batch(
    seqs: list[Sequence], num_new_tokens: list[int], device: torch.device
) -> LoRABatch | None:
    """The forward's rows per adapter (None when every row runs the base model)."""
    rows: dict[int, list[int]] = {}
    adapters: dict[int, LoRAAdapter] = {}
    offset = 0
    for seq, n in zip(seqs, num_new_tokens):
        if seq.lora is not None:
            # every new token: a prefill chunk, or a decode token and the proposals after it
            uid = seq.lora.uid
            adapters[uid] = seq.lora
            rows.setdefault(uid, []).extend(range(offset, offset + n))
        offset += n
    if not rows:
        return None
    segments = []
    for uid, r in rows.items():
        index = None if len(r) == offset else to_device(torch.tensor(r, dtype=torch.long), device)
        segments.append((adapters[uid], index))
    return LoRABatch(segments)
