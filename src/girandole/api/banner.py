"""The start-up banner of `girandole serve`: where it listens, what it serves, whether keys are
required, and one curl line to try. It is printed once the socket is open; the model may still be
loading then (in the background), and the banner says so: a log line follows when it is ready.

At a terminal (text logs) it is a block of lines; in JSON logs, one line whose fields hold the
same facts (`url`, `model`, `deployment`, `source`, `keys_required`, `status`, `curl`).
"""

from __future__ import annotations

import ipaddress
import json
import logging
import shlex
from dataclasses import asdict, dataclass
from typing import Any, TextIO

from girandole import __version__

logger = logging.getLogger("girandole.api")

TRY_PROMPT = "Once upon a time"


@dataclass(frozen=True)
class Banner:
    url: str  # the base URL a client on this machine reaches the server at
    model: str  # accounts/<a>/models/<m>
    deployment: str  # accounts/<a>/deployments/<d>
    source: str  # where the weights come from: the default model, a path, a repo id
    keys_required: bool
    status: str  # "loading", "ready" or "failed"
    bind: str = "127.0.0.1"  # the address it listens on (--host)

    def curl(self) -> str:
        body = json.dumps({"model": self.model, "prompt": TRY_PROMPT, "max_tokens": 32})
        parts = [f"curl {self.url}/inference/v1/completions"]
        if self.keys_required:
            parts.append('-H "Authorization: Bearer $API_KEY"')  # the key itself is never logged
        parts += ["-H 'Content-Type: application/json'", f"-d {shlex.quote(body)}"]
        return " ".join(parts)

    def status_line(self) -> str:
        if self.status == "ready":
            return "ready"
        if self.status == "failed":
            return "the model failed to load (see the error above)"
        return (
            "loading the model in the background: requests get 503 until it is ready;"
            " a line says when"
        )

    def text(self) -> str:
        keys = (
            'required: send "Authorization: Bearer <key>"'
            if self.keys_required
            else f"none: the server is open to {_who_reaches(self.bind)}"
        )
        rows = [
            ("model", self.model),
            ("", self.source),
            ("deployment", self.deployment),
            ("API keys", keys),
            ("status", self.status_line()),
            ("try", self.curl()),
        ]
        if self.keys_required:
            rows.append(("", "with API_KEY set to one of the keys"))
        lines = [f"girandole {__version__} listening on {self.url}"]
        lines += [f"  {name:<11} {value}" for name, value in rows]
        return "\n".join(lines)

    def announce(self, fmt: str, stream: TextIO) -> None:
        """Print the block (text logs) or log one line with the banner's fields (JSON logs)."""
        if fmt == "text":
            stream.write(self.text() + "\n")
            stream.flush()
        else:
            fields = {**asdict(self), "curl": self.curl()}
            logger.info("listening on %s", self.url, extra={"fields": fields})


def banner_of(state: Any, port: int, source: str) -> Banner:
    """The banner of a server holding `state` (an AppState) and listening on `port`."""
    name = state.served.name
    return Banner(
        url=client_url(state.settings.host, port),
        model=name,
        deployment=next(d.name for d in state.registry.deployments() if d.model == name),
        source=source,
        keys_required=not state.ops.open,
        status=state.status,
        bind=state.settings.host,
    )


def _who_reaches(host: str) -> str:
    """Who can send requests to a server bound to `host`."""
    if host in ("", "0.0.0.0", "::"):
        return "anyone who can reach this machine (it listens on every interface)"
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name
        loopback = False
    return "anyone on this machine" if loopback else f"anyone who can reach {host}"


def bound_port(server: Any, default: int) -> int:
    """The port a started uvicorn server listens on (with --port 0, the one it was given)."""
    for listener in getattr(server, "servers", None) or []:
        for sock in listener.sockets:
            return sock.getsockname()[1]
    return default


def client_url(host: str, port: int) -> str:
    """The URL a client on this machine uses for a server bound to `host` (a wildcard address
    is reached through loopback)."""
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    try:
        if ipaddress.ip_address(host).version == 6:
            host = f"[{host}]"
    except ValueError:  # a host name
        pass
    return f"http://{host}:{port}"


def describe_source(model: str | None, revision: str | None) -> str:
    """Where the weights come from, as the user named them."""
    if model is None:
        return "Gemma 3 270M base, Q4_K_M GGUF (the default model)"
    from pathlib import Path

    if Path(model).expanduser().exists():
        return f"from {model}"
    at = f" at revision {revision}" if revision else ""
    return f"{model}{at}, from the Hugging Face cache"
