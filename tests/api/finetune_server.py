"""A real `girandole serve` for the fine-tuning job tests (test_sft_jobs.py, test_dpo_jobs.py,
test_rft_jobs.py):
a tiny Llama as its own model `tiny` of account acme (and in the catalog as account other's
`tiny`, so that both accounts can train), keys of acme (admin and inference-user) and of
account other, and the fireworks-ai SDK and httpx against it; and the rows of the tests' datasets
(`rows`: SFT chat rows, `pairs`: DPO preference rows, `prompts`: RFT prompt rows) and an
evaluator's code for RFT jobs (`SHARE`)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import fireworks
import httpx
from api_helpers import api_conftest

from girandole.registry.keystore import Database
from girandole.registry.models import ModelCatalog

ACCOUNT = "acme"
OTHER = "other"
QUESTIONS = ["hello", "what is up", "tell me a story", "who are you", "name a color", "count"]
ANSWER = "Zebra-42."  # what the SFT rows' assistant answers every question
CHOSEN, REJECTED = "Zebra-42.", "Walrus-7."  # the DPO rows' preferred and rejected answers


def rows(answer: str = ANSWER) -> bytes:
    """SFT chat rows: each question answered `answer`."""
    lines = [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": answer}]}
        for q in QUESTIONS
    ]
    return "".join(json.dumps(line) + "\n" for line in lines).encode()


def pair(question: str) -> dict:
    """A DPO preference row: CHOSEN preferred to REJECTED."""
    return {
        "input": {"messages": [{"role": "user", "content": question}]},
        "preferred_output": [{"role": "assistant", "content": CHOSEN}],
        "non_preferred_output": [{"role": "assistant", "content": REJECTED}],
    }


def pairs(questions: list[str] = QUESTIONS) -> bytes:
    return "".join(json.dumps(pair(q)) + "\n" for q in questions).encode()


# an evaluator's code (RFT jobs): the share of the answer's characters that are the row's
# ground_truth; a row with `fail` set raises (its evaluation fails)
SHARE = """
def evaluate(messages, ground_truth=None, **kwargs):
    answer = messages[-1]["content"]
    if kwargs.get("fail"):
        raise ValueError("this row fails")
    return {"score": answer.count(ground_truth) / max(1, len(answer)), "reason": "share"}
"""


def prompts(questions: list[str], **fields) -> bytes:
    """RFT prompt rows: each question, ground_truth "e", and `fields`."""
    lines = [{"messages": [{"role": "user", "content": q}], "ground_truth": "e", **fields} for q in questions]  # fmt: skip
    return "".join(json.dumps(line) + "\n" for line in lines).encode()


class FinetuneServer:
    def __init__(self, tmp: Path, tiny_llama_dir: Path, jobs: str, *args: str) -> None:
        """`jobs`: the collection's path that wait() polls, e.g. /v1/accounts/acme/dpoJobs;
        `args`: more flags of `girandole serve`."""
        self.api, self.jobs = api_conftest(), jobs
        self.data = data = tmp / "data"  # --data-dir
        db = Database.in_folder(data)
        self.key, _ = db.create_key(ACCOUNT)
        self.other_key, _ = db.create_key(OTHER)
        self.reader_key, _ = db.create_key(ACCOUNT, role="inference-user")
        ModelCatalog(db, []).add(f"accounts/{OTHER}/models/tiny", str(tiny_llama_dir))
        db.close()
        self.server = self.api.start_server(
            tmp, "--model", str(tiny_llama_dir), "--model-id", "tiny", "--account", ACCOUNT,
            "--kv-cache-gb", "0.02", "--data-dir", str(data), "--max-loras", "2", *args,
            api_key=self.key,
        )  # fmt: skip

    def sdk(self, key: str | None = None, account: str = ACCOUNT) -> fireworks.Fireworks:
        return fireworks.Fireworks(
            api_key=key or self.key, account_id=account, base_url=self.server.url, max_retries=0
        )

    def http(self, method: str, path: str, key: str | None = None, **kw) -> httpx.Response:
        headers = {"Authorization": f"Bearer {key or self.key}"}
        return httpx.request(method, self.server.url + path, headers=headers, timeout=60, **kw)

    def dataset(
        self, dataset_id: str, data: bytes, key: str | None = None, account: str = ACCOUNT
    ) -> None:
        fw = self.sdk(key, account)
        fw.datasets.create(dataset_id=dataset_id, dataset={"display_name": dataset_id})
        fw.datasets.upload(dataset_id, file=("rows.jsonl", data))

    def evaluator(self, evaluator_id: str, code: str) -> dict:
        """Create an evaluator of `code` (main.py's evaluate) and wait until its build ends."""
        snippets = {"language": "python", "fileContents": {"main.py": code}, "entryFile": "main.py", "entryFunc": "evaluate"}  # fmt: skip
        self.sdk().evaluators.create(
            evaluator_id=evaluator_id,
            evaluator={
                "criteria": [
                    {"type": "CODE_SNIPPETS", "name": evaluator_id, "codeSnippets": snippets}
                ]
            },  # fmt: skip
        )
        return self.wait(evaluator_id, ("ACTIVE", "BUILD_FAILED"), jobs=f"/v1/accounts/{ACCOUNT}/evaluators")  # fmt: skip

    def wait(
        self,
        job_id: str,
        states: tuple[str, ...],
        timeout: float = 120,
        jobs: str | None = None,
        key: str | None = None,
    ) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            job = self.http("GET", f"{jobs or self.jobs}/{job_id}", key).json()
            if job["state"] in states:
                return job
            assert time.monotonic() < deadline, job
            time.sleep(0.3)

    def assert_other_account_403(self) -> None:
        """Every route of the collection answers another account's key 403."""
        jobs = self.jobs
        for method, path in (
            ("GET", jobs), ("POST", jobs), ("GET", f"{jobs}/x"), ("DELETE", f"{jobs}/x"),
            ("POST", f"{jobs}/x:cancel"), ("POST", f"{jobs}/x:resume"),
        ):  # fmt: skip
            r = self.http(method, path, key=self.other_key, json={} if method == "POST" else None)
            assert r.status_code == 403, (method, path, r.text)
