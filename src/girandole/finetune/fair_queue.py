"""Which waiting fine-tuning job the runner starts next, fair across accounts: the oldest
PENDING job (of any kind) of the account that started a job least recently. An account that has
not started one since the server started goes first; among such accounts (and at a tie), the
account whose oldest waiting job is older. So an account that queued 50 jobs runs one, then
every other account with a job waiting runs one, then its second, and so on: no account waits
behind another's whole queue. The record of starts lives in memory (a restarted server begins
again from creation order).

The number of jobs an account may have waiting is capped at creation (and :resume) by
`--max-pending-finetune-jobs` (api/finetune/jobs.py's insert_job)."""

from __future__ import annotations

import itertools
from typing import Any, TypeVar

# one waiting job, as JobStore.pending_heads gives it: (created, account, job id, body)
Row = tuple[float, str, str, dict[str, Any]]
S = TypeVar("S")  # the store the row came from, carried through


class FairQueue:
    def __init__(self) -> None:
        self._starts = itertools.count()
        self.last_started: dict[str, int] = {}  # account -> the order of its latest start

    def pick(self, waiting: list[tuple[Row, S]]) -> tuple[Row, S]:
        """The next job of `waiting` (each store's oldest PENDING job of each account, with its
        store), recorded as started. `waiting` must not be empty."""

        def turn(item: tuple[Row, S]) -> tuple[int, float, str, str]:
            (created, account, job_id, _), _store = item
            return (self.last_started.get(account, -1), created, account, job_id)

        chosen = min(waiting, key=turn)
        self.last_started[chosen[0][1]] = next(self._starts)
        return chosen
