"""Webhooks: the server tells the operator's endpoints (`--webhook-url`) when background work
ends, as OpenAI's webhooks do: `response.completed | incomplete | failed | cancelled` for a
background response, `batch.completed | failed | cancelled` for a batch made through OpenAI's
Batch API. One event per delivery:

    {"object": "event", "id": "evt_<hex>", "type": "response.completed",
     "created_at": <unix seconds>, "data": {"id": "resp_<hex>"}}

signed as Standard Webhooks (and OpenAI) sign them: headers `webhook-id` (the event's id),
`webhook-timestamp`, `webhook-signature: v1,<base64 HMAC-SHA256 of "id.timestamp.body">` with
the key of `--webhook-secret` (`whsec_<base64>`), so `client.webhooks.unwrap(body, headers)` of
the openai SDK checks them. An endpoint that does not answer 2xx within 10 s is tried again
after 1, 5, 30, 120 and 600 s, then given up (logged). Deliveries waiting are in memory: a
restart loses them. The URLs are the operator's: no host policy applies to them.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import httpx

logger = logging.getLogger("girandole.webhooks")

RETRY_DELAYS = (1.0, 5.0, 30.0, 120.0, 600.0)  # seconds before each retry
TIMEOUT_S = 10.0
PREFIX = "whsec_"


def secret_key(secret: str) -> bytes:
    """The HMAC key of a `whsec_<base64>` secret (ValueError for anything else)."""
    if not secret.startswith(PREFIX):
        raise ValueError("a webhook secret is 'whsec_' followed by base64 (whsec_...)")
    try:
        key = base64.b64decode(secret[len(PREFIX) :], validate=True)
    except ValueError:
        raise ValueError("a webhook secret is 'whsec_' followed by base64 (whsec_...)") from None
    if len(key) < 16:
        raise ValueError("a webhook secret's key must be at least 16 bytes")
    return key


def check_url(url: str) -> None:
    """ValueError unless `url` is an http(s) URL with a host: one httpx cannot even parse (a
    bad port, an open bracket) would fail every delivery, found only when work ends."""
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as exc:
        raise ValueError(f"--webhook-url {url!r}: not a valid URL ({exc})") from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ValueError(f"--webhook-url {url!r}: an http:// or https:// URL with a host")


def sign(key: bytes, event_id: str, timestamp: int, body: bytes) -> str:
    """Standard Webhooks' `webhook-signature` value."""
    signed = f"{event_id}.{timestamp}.".encode() + body
    digest = hmac.new(key, signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


@dataclass
class Delivery:
    url: str
    event: dict[str, Any]
    attempts: int = 0
    body: bytes = field(init=False)

    def __post_init__(self) -> None:
        self.body = json.dumps(self.event, separators=(",", ":")).encode()


class Webhooks:
    """Sends events to every configured URL, each in a task of its own with its retries."""

    def __init__(self, urls: list[str], secret: str | None) -> None:
        self.urls = urls
        self.key = secret_key(secret) if urls and secret is not None else None
        if urls and self.key is None:
            raise ValueError("--webhook-url needs --webhook-secret (whsec_...) to sign events")
        self._tasks: set[asyncio.Task[None]] = set()
        self._client: httpx.AsyncClient | None = None
        self.num_delivered = 0
        self.num_failed = 0

    def send(self, kind: str, object_id: str) -> None:
        """Queue the event `kind` about `object_id` for every URL (nothing without URLs)."""
        if not self.urls:
            return
        event = {"object": "event", "id": f"evt_{uuid.uuid4().hex}", "type": kind,
                 "created_at": int(time.time()), "data": {"id": object_id}}  # fmt: skip
        for url in self.urls:
            task = asyncio.get_running_loop().create_task(self._deliver(Delivery(url, event)))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _deliver(self, delivery: Delivery) -> None:
        for delay in (0.0, *RETRY_DELAYS):
            await asyncio.sleep(delay)
            delivery.attempts += 1
            why = await self._post(delivery)
            if why is None:
                self.num_delivered += 1
                return
            logger.warning(
                "webhook %s to %s: attempt %d failed (%s)",
                delivery.event["type"], delivery.url, delivery.attempts, why,
            )  # fmt: skip
        self.num_failed += 1
        logger.error("webhook %s to %s: given up", delivery.event["type"], delivery.url)

    async def _post(self, delivery: Delivery) -> str | None:
        """One attempt: None when delivered, else why not."""
        assert self.key is not None
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=TIMEOUT_S, follow_redirects=False)
        event_id = delivery.event["id"]
        timestamp = int(time.time())
        headers = {
            "content-type": "application/json",
            "user-agent": "girandole-webhooks",
            "webhook-id": event_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": sign(self.key, event_id, timestamp, delivery.body),
        }
        try:
            response = await self._client.post(delivery.url, content=delivery.body, headers=headers)
        except httpx.HTTPError as exc:
            return type(exc).__name__
        return None if response.is_success else f"HTTP {response.status_code}"

    async def close(self, grace_s: float = 5.0) -> None:
        """Stop: deliveries under way get `grace_s` (the events of work the stop itself
        ended among them); those still waiting then are dropped (logged)."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=grace_s)
        if self._tasks:
            logger.warning("stopping with %d webhook deliveries not done", len(self._tasks))
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._client is not None:
            await self._client.aclose()
