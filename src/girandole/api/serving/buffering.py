"""Stream chunk coalescing: `stream_options.buffer_tokens`, `buffer_ms` and `buffer_mode`.

Without them a stream sends a chunk per new piece of text. With them, each choice's output is
held and sent as one chunk once the held output reaches `buffer_tokens` tokens and/or has been
held `buffer_ms` milliseconds: `buffer_mode: "any"` (the default) sends when either limit that
is set is reached, `"all"` only when every limit that is set is. A choice's finish sends what is
held at once. The time is checked as the engine's outputs arrive (one per generated token), so
a chunk can be up to one token's time later than `buffer_ms`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from girandole.api.serving.choice import Update
from girandole.api.serving.growing_text import append_text


@dataclass
class _Held:
    update: Update = field(default_factory=Update)
    num_tokens: int = 0
    since: float | None = None  # when the first held output arrived


@dataclass
class StreamBuffer:
    buffer_tokens: int | None = None
    buffer_ms: float | None = None
    mode: str = "any"  # "any" | "all"
    _held: dict[int, _Held] = field(default_factory=dict)  # per choice index

    @classmethod
    def of(cls, options) -> StreamBuffer | None:
        """The buffer a request's `stream_options` ask for, None when they ask for none."""
        if options is None or (options.buffer_tokens is None and options.buffer_ms is None):
            return None
        return cls(options.buffer_tokens, options.buffer_ms, options.buffer_mode or "any")

    def push(self, index: int, update: Update, finished: bool) -> Update | None:
        """Hold `update` of choice `index`; what to send now (everything held), or None."""
        held = self._held.setdefault(index, _Held())
        now = time.monotonic()
        if held.since is None:
            held.since = now
        merged = held.update
        append_text(merged, "text", update.text)
        merged.entries += update.entries
        merged.token_ids += update.token_ids
        held.num_tokens += len(update.token_ids)
        if not (finished or self._due(held, now)):
            return None
        del self._held[index]
        return merged

    def _due(self, held: _Held, now: float) -> bool:
        reached = []
        if self.buffer_tokens is not None:
            reached.append(held.num_tokens >= self.buffer_tokens)
        if self.buffer_ms is not None:
            reached.append((now - (held.since or now)) * 1000 >= self.buffer_ms)
        return all(reached) if self.mode == "all" else any(reached)
