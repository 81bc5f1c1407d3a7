"""Per-key rate limits: requests per minute and tokens (prompt + completion) per minute.

Each key has two token buckets that refill continuously (limit / 60 per second, holding at most
one minute's worth). A request needs one whole request token and a token bucket that is not in
debt; its prompt tokens (every choice's) are debited when it is admitted and its completion
tokens when it ends, so a large request pushes the bucket below zero at once and the next ones
wait until it refills. Over a limit: 429 with `Retry-After` (and
`retry-after-ms`, which both Fireworks SDKs honour). Every answer carries Fireworks'
`x-ratelimit-limit-requests`, `x-ratelimit-remaining-requests` and, near capacity,
`x-ratelimit-over-limit: yes`, plus the same pair for tokens.
"""

from __future__ import annotations

import math
import threading
import time

from girandole.api.http.errors import too_many_requests

NEAR_CAPACITY = 0.1  # remaining below this share of the limit: x-ratelimit-over-limit: yes


class Bucket:
    def __init__(self, per_minute: int) -> None:
        self.limit = per_minute
        self.rate = per_minute / 60.0
        self.level = float(per_minute)
        self.updated = time.monotonic()

    def refill(self, now: float) -> None:
        elapsed = max(0.0, now - self.updated)
        self.level = min(float(self.limit), self.level + elapsed * self.rate)
        self.updated = max(now, self.updated)

    def seconds_until(self, level: float) -> float:
        return max(0.0, (level - self.level) / self.rate)


class RateLimiter:
    def __init__(self, default_rpm: int | None = None, default_tpm: int | None = None) -> None:
        self.default_rpm = default_rpm or None
        self.default_tpm = default_tpm or None
        self._buckets: dict[tuple[str, str], Bucket] = {}
        self._lock = threading.Lock()
        self.num_limited = 0

    def _bucket(self, key: str, kind: str, limit: int | None) -> Bucket | None:
        # 0: no limit; a negative one (a key stored before limits were checked) would refuse
        # every request with Retry-After 1 forever, so it is no limit too
        if not limit or limit < 0:
            return None
        bucket = self._buckets.get((key, kind))
        if bucket is None or bucket.limit != limit:
            bucket = self._buckets[(key, kind)] = Bucket(limit)
        return bucket

    def admit(self, key: str, rpm: int | None = None, tpm: int | None = None) -> dict[str, str]:
        """Take one request from `key`'s allowance; the headers to answer with. Raises the 429."""
        rpm = rpm if rpm is not None else self.default_rpm
        tpm = tpm if tpm is not None else self.default_tpm
        now = time.monotonic()
        with self._lock:
            requests = self._bucket(key, "requests", rpm)
            tokens = self._bucket(key, "tokens", tpm)
            wait, what = 0.0, ""
            if requests is not None:
                requests.refill(now)
                if requests.level < 1.0:
                    wait, what = requests.seconds_until(1.0), f"{requests.limit} requests"
            if tokens is not None:
                tokens.refill(now)
                if tokens.level <= 0.0:
                    token_wait = tokens.seconds_until(1.0)
                    if token_wait > wait:
                        wait, what = token_wait, f"{tokens.limit} tokens"
            if what:
                self.num_limited += 1
            elif requests is not None:
                requests.level -= 1.0
            headers = self._headers(requests, tokens)
        if what:
            retry = max(1, math.ceil(wait))
            error = too_many_requests(
                f"Rate limit exceeded for this API key: {what} per minute. Retry after {retry} s."
            )
            error.headers.update(headers)
            error.headers["Retry-After"] = str(retry)
            error.headers["retry-after-ms"] = str(max(1, math.ceil(wait * 1000)))
            raise error
        return headers

    def debit(self, key: str, num_tokens: int, tpm: int | None = None) -> None:
        """Charge tokens: a request's prompts when it is admitted, the rest when it ends."""
        tpm = tpm if tpm is not None else self.default_tpm
        with self._lock:
            bucket = self._bucket(key, "tokens", tpm)
            if bucket is not None:
                bucket.refill(time.monotonic())
                bucket.level = min(float(bucket.limit), bucket.level - num_tokens)  # < 0: refund

    @staticmethod
    def _headers(requests: Bucket | None, tokens: Bucket | None) -> dict[str, str]:
        headers: dict[str, str] = {}
        near = False
        for name, bucket in (("requests", requests), ("tokens", tokens)):
            if bucket is None:
                continue
            remaining = max(0, math.floor(bucket.level + 1e-6))
            headers[f"x-ratelimit-limit-{name}"] = str(bucket.limit)
            headers[f"x-ratelimit-remaining-{name}"] = str(remaining)
            near |= remaining < NEAR_CAPACITY * bucket.limit
        if near:
            headers["x-ratelimit-over-limit"] = "yes"
        return headers
