"""The FastAPI application factory."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from girandole import __version__
from girandole.api.accounts import install_accounts
from girandole.api.batch import install_batch
from girandole.api.chat import route as chat
from girandole.api.completions import route as completions
from girandole.api.conversations import route as conversations
from girandole.api.deployments import install_deployments
from girandole.api.embeddings import route as embeddings
from girandole.api.evaluators import install_evaluators
from girandole.api.finetune import install_finetune
from girandole.api.http.cors import FireworksCORS
from girandole.api.http.errors import UnhandledErrors, install_error_handlers
from girandole.api.http.openapi import install_openapi
from girandole.api.http.paths import MethodFallbacks, TrailingSlashes
from girandole.api.lora import install_lora
from girandole.api.messages import batches as message_batches
from girandole.api.messages import route as messages
from girandole.api.models import route as models
from girandole.api.openai_batch import install_openai_batch
from girandole.api.ops import routes as ops
from girandole.api.ops.drain_cut import DrainCut
from girandole.api.ops.tracking import RequestTracker
from girandole.api.ops.webhooks import Webhooks
from girandole.api.playground import route as playground
from girandole.api.rerank import route as rerank
from girandole.api.responses import route as responses
from girandole.api.secrets import install_secrets
from girandole.api.state import AppState
from girandole.api.tokenize import install_tokenize
from girandole.api.users import install_users

INFERENCE_PREFIXES = ("/inference/v1", "/v1")


def create_app(state: AppState, *, load_in_background: bool = False) -> FastAPI:
    """Build the app around `state`. With `load_in_background`, the model is loaded in a thread
    started at start-up, while the server already answers (/health says 503 until ready)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if load_in_background and state.engine is None:
            state.loader = threading.Thread(target=state.load, name="girandole-load", daemon=True)
            state.loader.start()
        app.state.deployments.start()
        app.state.batch.start()
        app.state.sft.start()
        app.state.evaluators.start()
        try:
            # background responses: failed at start-up if a stopped server left them, and when
            # it stops
            async with responses.background_responses(app):
                yield
            await app.state.webhooks.close()  # after the background work's last events
        finally:
            try:
                await app.state.batch.shutdown()  # before the engines stop: its lines run again
                # the training child ended (the job FAILS at the next start)
                await asyncio.to_thread(app.state.sft.shutdown)
                await app.state.evaluators.shutdown()  # its children killed
                # the usage rows of every request served, in the database before the backends
                # stop (Ray's teardown takes seconds, and a backend may fail to stop)
                state.ops.usage.flush()
                app.state.deployments.shutdown()
            finally:
                state.shutdown()

    app = FastAPI(
        title="girandole",
        version=__version__,
        description="Fireworks AI-compatible inference API",
        lifespan=lifespan,
        redirect_slashes=False,  # no 307: TrailingSlashes serves `/x/` as `/x` (http/paths.py)
    )
    app.state.girandole = state
    app.state.webhooks = Webhooks(state.settings.webhook_urls, state.settings.webhook_secret)
    install_error_handlers(app)
    for prefix in INFERENCE_PREFIXES:
        app.include_router(completions.router, prefix=prefix, tags=["inference"])
        app.include_router(chat.router, prefix=prefix, tags=["inference"])
        app.include_router(messages.router, prefix=prefix, tags=["inference"])
        app.include_router(responses.router, prefix=prefix, tags=["inference"])
        app.include_router(responses.input_tokens, prefix=prefix, tags=["inference"])
        app.include_router(responses.stored, prefix=prefix, tags=["responses"])
        app.include_router(conversations.router, prefix=prefix)
        app.include_router(models.router, prefix=prefix, tags=["models"])
        app.include_router(embeddings.router, prefix=prefix, tags=["inference"])
        app.include_router(rerank.router, prefix=prefix, tags=["inference"])
    app.include_router(rerank.cohere_router, tags=["inference"])
    install_deployments(app, state, INFERENCE_PREFIXES)
    install_users(app, INFERENCE_PREFIXES)
    install_accounts(app, INFERENCE_PREFIXES)
    install_secrets(app, INFERENCE_PREFIXES)
    install_batch(app, state, INFERENCE_PREFIXES)
    install_openai_batch(app, INFERENCE_PREFIXES)
    install_finetune(app, state, INFERENCE_PREFIXES)
    install_evaluators(app, state, INFERENCE_PREFIXES)
    for prefix in INFERENCE_PREFIXES:  # Anthropic's Message Batches: on the same store, runner
        app.include_router(message_batches.router, prefix=prefix)
    install_lora(app, state, INFERENCE_PREFIXES)
    install_tokenize(app, INFERENCE_PREFIXES)  # also at vLLM's /tokenize, /detokenize
    app.include_router(ops.router)
    app.include_router(playground.router)  # the page at / and /playground
    # Middleware, innermost first (each added one wraps the ones before it):
    app.add_middleware(DrainCut, ops=state.ops)  # a request cut by the drain: 503, tracked
    app.add_middleware(UnhandledErrors)  # inside the tracker: its 500s are tracked too
    app.add_middleware(MethodFallbacks, router=app.router)  # HEAD, OPTIONS, 405's Allow
    app.add_middleware(RequestTracker, ops=state.ops)
    # outside the tracker, which labels metrics and usage rows by the path without the slash
    app.add_middleware(TrailingSlashes, router=app.router)
    settings = state.settings
    if settings.allowed_origins:  # outermost: every response, the 500s and errors too
        app.add_middleware(
            FireworksCORS,
            origins=settings.allowed_origins,
            credentials=settings.allowed_credentials,
            methods=settings.allowed_methods,
            headers=settings.allowed_headers,
        )
    install_openapi(app)
    return app
