"""ModelPreparer: Fireworks' `POST /v1/accounts/{a}/models/{m}:prepare` (the SDK's
`client.models.prepare`) as this server can mean it.

At Fireworks it readies a model for a precision (FP8, FP4, ...) before a deployment asks for
it. Here every model runs in its own weights' precision (docs/deployments.md), so the precision
must be unset; what can be readied is what a model's first replica would otherwise do as it
starts: a Hugging Face repo id fetched into the cache, and on a CPU server the fast-mode packed
model built into the packed-model cache (model/loader: ~30-40 s for a 1.5 GB mixture of
experts), so a deployment of the model then starts by mapping that file. It runs in the
background, one at a time per model; the call answers at once. A replica on another machine of
a Ray cluster builds its own cache as before.
"""

from __future__ import annotations

import logging
import threading

log = logging.getLogger(__name__)


def prepare_source(source: str | None) -> str:
    """Ready checkpoint `source` (a file, folder or repo id; None: the default model) for its
    first load on this machine; what was done, for the log."""
    import torch

    from girandole.engine.encoder import is_encoder_model
    from girandole.model.default import resolve_model_path
    from girandole.model.loader import prepare_cache

    path = resolve_model_path(source)  # a repo id: fetched into the cache here
    if torch.cuda.is_available() or is_encoder_model(path):
        return f"{path} is at hand (no packed cache on this device)"
    cache = prepare_cache(path)
    return f"{path}: packed cache {cache}" if cache else f"{path} needs no packed cache"


class ModelPreparer:
    """The models being prepared, by name; a second `:prepare` while one runs joins it. Each runs
    on a daemon thread, not the event loop's executor, whose threads a stopping server waits
    for: a stop in the middle of a build does not wait for it (the build's child process
    finishes writing its cache entry on its own)."""

    def __init__(self) -> None:
        self._running: set[str] = set()
        self._lock = threading.Lock()

    def start(self, name: str, source: str | None) -> None:
        with self._lock:
            if name in self._running:
                return
            self._running.add(name)
        thread = threading.Thread(
            target=self._prepare, args=(name, source), name=f"prepare {name}", daemon=True
        )
        thread.start()

    def _prepare(self, name: str, source: str | None) -> None:
        try:
            log.info("prepared model %s: %s", name, prepare_source(source))
        except Exception as exc:  # the model stays as it was; its first replica tries again
            log.warning("preparing model %s failed: %s", name, exc)
        finally:
            with self._lock:
                self._running.discard(name)
