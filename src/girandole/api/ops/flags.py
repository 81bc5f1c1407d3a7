"""`girandole serve` flags for the operational side (keys database, limits, queue, logs,
draining) and the uvicorn server that drains on SIGTERM.

On SIGTERM (or Ctrl-C) the server stops accepting connections, `/ready` answers 503, requests in
flight run to their end for up to `--drain-seconds`, those still running then are cut off (and
accounted as aborted), usage rows are written, and the process exits 0 (uvicorn alone would
re-raise the signal: exit 143).
"""

from __future__ import annotations

import argparse
import os
import signal
from types import FrameType
from typing import Any

import uvicorn

from girandole.api.flag_values import (
    ENV_PREFIX,
    env_default,
    float_value,
    folder_value,
    int_value,
)
from girandole.api.settings import ServerSettings
from girandole.registry.keystore import parse_limit

DEFAULTS = ServerSettings()  # the one set of defaults


def _env(name: str) -> str | None:
    return os.environ.get(ENV_PREFIX + name)


def add_ops_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data-dir",
        type=folder_value("DATA_DIR"),
        default=env_default("DATA_DIR"),
        help="folder of girandole.db (API keys, usage); default: the cache folder"
        " [GIRANDOLE_DATA_DIR]",
    )
    p.add_argument(
        "--rate-limit-rpm",
        type=parse_limit,
        default=_env("RATE_LIMIT_RPM"),  # argparse checks a string default with parse_limit
        help="requests per minute per key, unless the key has its own; default: no limit"
        " [GIRANDOLE_RATE_LIMIT_RPM]",
    )
    p.add_argument(
        "--rate-limit-tpm",
        type=parse_limit,
        default=_env("RATE_LIMIT_TPM"),
        help="tokens (prompt + completion) per minute per key, unless the key has its own;"
        " default: no limit [GIRANDOLE_RATE_LIMIT_TPM]",
    )
    p.add_argument(
        "--max-keys-per-user",
        type=int_value("MAX_KEYS_PER_USER", 0),
        default=env_default("MAX_KEYS_PER_USER", str(DEFAULTS.max_keys_per_user)),
        help="live (unrevoked, unexpired) API keys a user of an account may hold; rate limits"
        " are per key, so more would multiply a user's allowance; 0: no cap"
        " [GIRANDOLE_MAX_KEYS_PER_USER]",
    )
    p.add_argument(
        "--max-pending-finetune-jobs",
        type=int_value("MAX_PENDING_FINETUNE_JOBS", 0),
        default=env_default("MAX_PENDING_FINETUNE_JOBS", str(DEFAULTS.max_pending_finetune_jobs)),
        help="fine-tuning jobs (SFT, DPO and every other kind together) an account may have"
        " waiting (PENDING) at once; one more is a 429; 0: no cap"
        " [GIRANDOLE_MAX_PENDING_FINETUNE_JOBS]",
    )
    p.add_argument(
        "--evaluator-timeout",
        type=float_value("EVALUATOR_TIMEOUT", 0, above=True),
        default=env_default("EVALUATOR_TIMEOUT", str(DEFAULTS.evaluator_timeout)),
        help="seconds an evaluator may take to score one row (evaluation jobs, builds, RFT"
        " rollouts); then the row fails and its process restarts [GIRANDOLE_EVALUATOR_TIMEOUT]",
    )
    p.add_argument(
        "--evaluator-memory",
        type=int_value("EVALUATOR_MEMORY", 128),
        default=env_default("EVALUATOR_MEMORY", str(DEFAULTS.evaluator_memory)),
        help="MiB of address space an evaluator's process may map (RLIMIT_AS; at least 128)"
        " [GIRANDOLE_EVALUATOR_MEMORY]",
    )
    p.add_argument(
        "--max-evaluator-processes",
        type=int_value("MAX_EVALUATOR_PROCESSES", 1),
        default=env_default("MAX_EVALUATOR_PROCESSES", str(DEFAULTS.max_evaluator_processes)),
        help="evaluator processes the server runs at once (each build and evaluation job has"
        " one; more wait) [GIRANDOLE_MAX_EVALUATOR_PROCESSES]",
    )
    p.add_argument(
        "--max-rlor-trainers",
        type=int_value("MAX_RLOR_TRAINERS", 1),
        default=env_default("MAX_RLOR_TRAINERS", str(DEFAULTS.max_rlor_trainers)),
        help="keep-alive RLOR trainer jobs running at once (each a process holding a float32"
        " copy of its base model); creating one more is a 429 [GIRANDOLE_MAX_RLOR_TRAINERS]",
    )
    p.add_argument(
        "--max-concurrent-requests",
        type=int_value("MAX_CONCURRENT_REQUESTS", 1),
        default=env_default("MAX_CONCURRENT_REQUESTS", str(DEFAULTS.max_concurrent_requests)),
        help="choices at the engine at once: a request of P prompts with n choices counts"
        " P x n (capped at this); more wait in the queue [GIRANDOLE_MAX_CONCURRENT_REQUESTS]",
    )
    p.add_argument(
        "--batch-max-in-flight",
        type=int_value("BATCH_MAX_IN_FLIGHT", 1),
        default=env_default("BATCH_MAX_IN_FLIGHT", str(DEFAULTS.batch_max_in_flight)),
        help="batch job lines at the engine at once, fewer while interactive requests run"
        " (together they stay within it) [GIRANDOLE_BATCH_MAX_IN_FLIGHT]",
    )
    p.add_argument(
        "--max-choices-per-request",
        type=int_value("MAX_CHOICES_PER_REQUEST", 1),
        default=env_default("MAX_CHOICES_PER_REQUEST", str(DEFAULTS.max_choices_per_request)),
        help="prompts x n of one request; more is a 400 [GIRANDOLE_MAX_CHOICES_PER_REQUEST]",
    )
    p.add_argument(
        "--max-queued-requests",
        type=int_value("MAX_QUEUED_REQUESTS", 0),
        default=env_default("MAX_QUEUED_REQUESTS", str(DEFAULTS.max_queued_requests)),
        help="more wait in a queue, up to this many (then 429) [GIRANDOLE_MAX_QUEUED_REQUESTS]",
    )
    p.add_argument(
        "--queue-timeout",
        type=float_value("QUEUE_TIMEOUT", 0, above=True),
        default=env_default("QUEUE_TIMEOUT", str(DEFAULTS.queue_timeout)),
        help="seconds a request may wait in the queue, and with --ray for a replica to accept it"
        " (then 503) [GIRANDOLE_QUEUE_TIMEOUT]",
    )
    p.add_argument(
        "--max-prompt-tokens",
        type=int_value("MAX_PROMPT_TOKENS", 1),
        default=env_default("MAX_PROMPT_TOKENS"),
        help="longer prompts get 400; default: the context length [GIRANDOLE_MAX_PROMPT_TOKENS]",
    )
    p.add_argument(
        "--metrics-scrapes-per-minute",
        type=int_value("METRICS_SCRAPES_PER_MINUTE", 0),
        default=env_default("METRICS_SCRAPES_PER_MINUTE", str(DEFAULTS.metrics_scrapes_per_minute)),
        help="reads of GET /v1/accounts/{account}/metrics per account a minute, as Fireworks"
        " allows (more get 429); 0: no limit [GIRANDOLE_METRICS_SCRAPES_PER_MINUTE]",
    )
    p.add_argument(
        "--drain-seconds",
        type=float_value("DRAIN_SECONDS", 0),
        default=env_default("DRAIN_SECONDS", str(DEFAULTS.drain_seconds)),
        help="on SIGTERM, let requests in flight finish for up to this long, then exit 0"
        " [GIRANDOLE_DRAIN_SECONDS]",
    )
    add_connection_arguments(p)
    p.add_argument(
        "--log-format",
        choices=["auto", "json", "text"],
        default=_env("LOG_FORMAT") or "auto",
        help="json: one object a line, with request ids; text: readable lines; auto (default):"
        " text when stderr is a terminal, else json [GIRANDOLE_LOG_FORMAT]",
    )


def add_connection_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--max-connections",
        type=int_value("MAX_CONNECTIONS", 1),
        default=env_default("MAX_CONNECTIONS"),
        help="connections held at once; above it the longest-idle one is closed; default: from"
        " the open-file limit (raised to its hard limit at start-up) [GIRANDOLE_MAX_CONNECTIONS]",
    )
    p.add_argument(
        "--request-read-timeout",
        type=float_value("REQUEST_READ_TIMEOUT", 0, above=True),
        default=env_default("REQUEST_READ_TIMEOUT", str(DEFAULTS.request_read_timeout)),
        help="seconds a connection has to send a whole request (head and body), then it is"
        " closed [GIRANDOLE_REQUEST_READ_TIMEOUT]",
    )
    p.add_argument(
        "--keep-alive-timeout",
        type=int_value("KEEP_ALIVE_TIMEOUT", 0),
        default=env_default("KEEP_ALIVE_TIMEOUT", str(DEFAULTS.keep_alive_timeout)),
        help="seconds an idle kept-alive connection stays open; longer than the clients' own"
        " pool expiry (5 s in httpx) so that a client never sends on a connection the server is"
        " closing [GIRANDOLE_KEEP_ALIVE_TIMEOUT]",
    )
    p.add_argument(
        "--response-write-timeout",
        type=float_value("RESPONSE_WRITE_TIMEOUT", 0),
        default=env_default("RESPONSE_WRITE_TIMEOUT", str(DEFAULTS.response_write_timeout)),
        help="seconds a client may leave its response unread (the socket's buffers full), then"
        " its connection is closed and its request cancelled; 0: never"
        " [GIRANDOLE_RESPONSE_WRITE_TIMEOUT]",
    )
    p.add_argument(
        "--grammar-compile-timeout",
        type=float_value("GRAMMAR_COMPILE_TIMEOUT", 0, above=True),
        default=env_default("GRAMMAR_COMPILE_TIMEOUT", str(DEFAULTS.grammar_compile_timeout)),
        help="a response_format schema, tools or grammar whose compile has used this many"
        " seconds of CPU gets 400 [GIRANDOLE_GRAMMAR_COMPILE_TIMEOUT]",
    )
    p.add_argument(
        "--engine-stall-seconds",
        type=float_value("ENGINE_STALL_SECONDS", 0, above=True),
        default=env_default("ENGINE_STALL_SECONDS", str(DEFAULTS.engine_stall_seconds)),
        help="/health answers 503 (and a Ray replica fails its health check, so Ray replaces"
        " it) when work waits and no engine step has ended for this long"
        " [GIRANDOLE_ENGINE_STALL_SECONDS]",
    )


def ops_settings(args: argparse.Namespace) -> dict[str, Any]:
    data_dir = args.data_dir
    if not data_dir:
        from girandole.model.default import cache_dir

        data_dir = str(cache_dir())
    return {
        "data_dir": data_dir,
        "rate_limit_rpm": args.rate_limit_rpm,
        "rate_limit_tpm": args.rate_limit_tpm,
        "max_keys_per_user": args.max_keys_per_user,
        "max_pending_finetune_jobs": args.max_pending_finetune_jobs,
        "evaluator_timeout": args.evaluator_timeout,
        "evaluator_memory": args.evaluator_memory,
        "max_evaluator_processes": args.max_evaluator_processes,
        "max_rlor_trainers": args.max_rlor_trainers,
        "max_concurrent_requests": args.max_concurrent_requests,
        "max_queued_requests": args.max_queued_requests,
        "queue_timeout": args.queue_timeout,
        "batch_max_in_flight": args.batch_max_in_flight,
        "max_prompt_tokens": args.max_prompt_tokens,
        "drain_seconds": args.drain_seconds,
        "metrics_scrapes_per_minute": args.metrics_scrapes_per_minute,
        "log_format": args.log_format,
        "max_choices_per_request": args.max_choices_per_request,
        "max_connections": args.max_connections,
        "request_read_timeout": args.request_read_timeout,
        "keep_alive_timeout": args.keep_alive_timeout,
        "response_write_timeout": args.response_write_timeout,
        "engine_stall_seconds": args.engine_stall_seconds,
        "grammar_compile_timeout": args.grammar_compile_timeout,
    }


class DrainingServer(uvicorn.Server):
    """uvicorn's server, but a SIGTERM/SIGINT drains (/ready 503 at once) and ends with exit 0."""

    def __init__(self, config: uvicorn.Config, state: Any) -> None:
        super().__init__(config)
        self.girandole_state = state

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.girandole_state.ops.start_draining()
        forced = self.force_exit
        super().handle_exit(sig, frame)
        if self.force_exit and not forced:  # a second Ctrl-C: uvicorn stops without waiting,
            # and what still ran was cut with the connections (a bare 500, a stream without end)
            self.girandole_state.ops.cut_now()
        # uvicorn re-raises captured signals once it has shut down (exit 143 for SIGTERM):
        # a drained server has stopped cleanly, so it exits 0 instead.
        if sig in (signal.SIGTERM, signal.SIGINT) and sig in self._captured_signals:
            self._captured_signals.remove(sig)
