"""The fine-tuning runner's choice of the next job (finetune/fair_queue.py), on the real job
stores of both kinds in a SQLite database: accounts take turns, whatever each has queued."""

from __future__ import annotations

from girandole.finetune.fair_queue import FairQueue
from girandole.finetune.store import DPO, PENDING, RUNNING, SFT, JobStore
from girandole.registry.keystore import Database


def run_all(stores: list[JobStore], queue: FairQueue) -> list[str]:
    """The order the runner would start every waiting job in (each runs as soon as picked)."""
    order = []
    while waiting := [(row, store) for store in stores for row in store.pending_heads()]:
        (_, account, job_id, body), store = queue.pick(waiting)
        body["state"] = RUNNING
        assert store.save(account, job_id, body, when=PENDING)
        order.append(job_id)
    return order


def test_accounts_take_turns_across_job_kinds(tmp_path):
    db = Database.in_folder(tmp_path)
    sft, dpo = JobStore(db, SFT), JobStore(db, DPO)
    for store, account, job_id in (
        (sft, "a", "a1"), (dpo, "a", "a2"), (sft, "a", "a3"), (sft, "a", "a4"),
        (dpo, "b", "b1"), (sft, "b", "b2"), (sft, "c", "c1"),
    ):  # fmt: skip  # in creation order
        store.insert(account, job_id, {"name": job_id, "state": PENDING})
    assert sft.count_pending("a") == 3 and dpo.count_pending("a") == 1
    queue = FairQueue()
    assert run_all([sft, dpo], queue) == ["a1", "b1", "c1", "a2", "b2", "a3", "a4"]
    # the account that started a job longer ago goes first, whatever its job's age
    sft.insert("a", "a5", {"name": "a5", "state": PENDING})
    sft.insert("c", "c2", {"name": "c2", "state": PENDING})
    assert run_all([sft, dpo], queue) == ["c2", "a5"]  # a started a4 last, c c1 before it
    db.close()
