"""What the running server holds: settings, registry, keys, and the engine once it is loaded."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Literal

from girandole.api.http.errors import APIError, unavailable
from girandole.api.ops.server_ops import ServerOps
from girandole.api.settings import ServerSettings
from girandole.engine.protocol import EngineClient, stall_error
from girandole.registry.keys import ApiKeyStore, read_keys_file
from girandole.registry.models import ModelRegistry, ServedModel
from girandole.registry.naming import deployment_name, is_valid_id, model_name
from girandole.tokenizer.chat_template import chat_template_for, load_chat_template

logger = logging.getLogger("girandole.api")

Status = Literal["loading", "ready", "failed"]


def mark_embedding_model(served: ServedModel, engine: EngineClient) -> None:
    """/v1/models shows a model trained to embed or score as Fireworks' EMBEDDING_MODEL kind,
    and an embedding-only one (an encoder) without chat."""
    embedding = engine.model_config.embedding
    if embedding is not None:
        served.kind = "EMBEDDING_MODEL"
        served.supports_chat = served.supports_chat and embedding.generates


class AppState:
    def __init__(self, settings: ServerSettings, engine: EngineClient | None = None) -> None:
        for what, value in (
            ("account", settings.account),
            ("model id", settings.model_id),
            ("deployment id", settings.deployment_id),
        ):
            if value is not None and not is_valid_id(value):
                raise ValueError(
                    f"{what} {value!r} is not a valid Fireworks id: 1-63 characters of a-z, 0-9"
                    " and '-', starting with a letter, not ending with '-'"
                )
        self.settings = settings
        self.started = time.time()  # an account with no record in the keys database dates from it
        keys = list(settings.api_keys)
        if settings.api_keys_file:
            keys += read_keys_file(settings.api_keys_file)
        self.keys = ApiKeyStore(keys)
        self.registry = ModelRegistry(settings.account)
        self.served = ServedModel(
            name=model_name(settings.account, settings.model_id), owned_by=settings.account
        )
        # the server's own deployment: accounts/<a>/deployments/<deployment id or model id>
        self.deployment = deployment_name(
            settings.account, settings.deployment_id or settings.model_id
        )
        self.registry.add_model(self.served, self.deployment)
        self.chat_template: str | None = None  # --chat-template, loaded (fails start-up if bad)
        if settings.chat_template:
            self.chat_template = load_chat_template(settings.chat_template)
        self.engine: EngineClient | None = None
        # Builds the engine of the server's own model; None: an AsyncEngine in this process
        self.engine_factory: Callable[[], EngineClient] | None = None
        self.status: Status = "loading"
        self.error: str | None = None
        self.load_seconds: float | None = None
        self.num_aborted_requests = 0  # engine requests aborted because their client went away
        self._lock = threading.Lock()
        self.loader: threading.Thread | None = None  # the thread of `load`, when one runs it
        self._stopped = False  # shut down: an engine that loads now is stopped, not served
        # keys database, limits, queue, usage, metrics, draining
        self.ops = ServerOps(
            settings, self.keys, self.registry, self.served, lambda: (self.status, self.engine)
        )
        if engine is not None:
            self.attach_engine(engine)

    def attach_engine(self, engine: EngineClient) -> None:
        self.served.context_length = self.context_length_of(engine)
        self.served.supports_chat = bool(
            engine.model_config.chat_template
            or chat_template_for(engine.tokenizer, self.chat_template)
        )
        self.served.supports_image_input = engine.model_config.vision is not None
        mark_embedding_model(self.served, engine)
        self.served.created = int(time.time())
        with self._lock:
            stopped = self._stopped
            if not stopped:
                self.engine = engine
                self.status = "ready"
        if stopped:  # loaded after the server stopped: nothing would ever stop its loop
            engine.shutdown()

    @staticmethod
    def context_length_of(engine: EngineClient) -> int:
        return int(engine.max_model_len or engine.model_config.max_position)

    @property
    def context_length(self) -> int:
        return self.context_length_of(self.require_engine())

    def require_engine(self) -> EngineClient:
        engine = self.engine
        if engine is None:
            if self.status == "failed":
                raise APIError(
                    503,
                    f"The model failed to load: {self.error}",
                    type="service_unavailable",
                    code="UNAVAILABLE",
                )
            raise unavailable("The model is still loading; retry shortly")
        return engine

    def load(self) -> None:
        """Build the engine (blocking; run it in a thread). Records failure instead of raising."""

        start = time.monotonic()
        try:
            if self.engine_factory is not None:
                engine = self.engine_factory()
            else:
                from girandole.deploy.setup import own_spec

                engine = own_spec(self.settings).start_engine()
            engine.tokenizer.prepare_plain()
        except BaseException as exc:  # noqa: BLE001 - reported through /health and the log
            self.error = f"{type(exc).__name__}: {exc}"
            self.status = "failed"
            logger.exception("loading the model failed")
            return
        self.load_seconds = time.monotonic() - start
        self.attach_engine(engine)

    def count_aborted(self, n: int) -> None:
        self.num_aborted_requests += n

    def health(self) -> dict[str, Any]:
        body: dict[str, Any] = {"status": self.status, "model": self.served.name}
        if self.status == "failed":
            body["error"] = self.error
        engine = self.engine
        if engine is not None:
            body["engine"] = dict(engine.stats())
            body["num_aborted_requests"] = self.num_aborted_requests
            error = stall_error(engine, self.settings.engine_stall_seconds)
            if self.status == "ready" and error is not None:
                # work waits but no step has finished for long: not serving, whatever loaded
                body["status"] = "stalled"
                body["error"] = error
        return body

    def shutdown(self) -> None:
        with self._lock:
            self._stopped = True
            engine, self.engine = self.engine, None
        if engine is not None:
            try:
                engine.shutdown()
            except Exception:  # noqa: BLE001
                logger.exception("engine shutdown failed")
        self.ops.close()
