"""A real server on a loopback port for the evaluator tests (test_evaluators.py,
test_evaluation_jobs.py): the app `girandole serve` builds, without a model (these routes need
none), keys of account acme (admin, inference-user) and of another account in its database, and
the fireworks-ai SDK and httpx against it."""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import fireworks
import httpx
from loopback import serve_in_thread

from girandole.registry.keystore import Database

ACCOUNT = "acme"
EVALUATORS = f"/v1/accounts/{ACCOUNT}/evaluators"

MAIN = """
import time
from helpers import normalize


def evaluate(messages, ground_truth=None, **kwargs):
    answer = messages[-1]["content"]
    if answer == "boom":
        raise ValueError("cannot score boom")
    if answer == "slow":
        time.sleep(60)
    same = normalize(answer) == normalize(ground_truth)
    return {"score": 1.0 if same else 0.0, "reason": "exact" if same else "differs",
            "metrics": {"length": len(answer)}}
"""
HELPERS = "def normalize(text):\n    return str(text).strip().lower()\n"


def criteria(files: dict[str, str] | None = None, entry_file: str = "main.py",
             entry_func: str = "evaluate") -> list[dict]:  # fmt: skip
    snippets = {
        "language": "python",
        "fileContents": files if files is not None else {"main.py": MAIN, "helpers.py": HELPERS},
        "entryFile": entry_file,
        "entryFunc": entry_func,
    }
    return [{"type": "CODE_SNIPPETS", "name": "exact", "codeSnippets": snippets}]


class EvaluatorServer:
    def __init__(self, url: str, key: str, other_key: str, reader_key: str, data: Path) -> None:
        self.url, self.key, self.other_key, self.reader_key = url, key, other_key, reader_key
        self.data = data  # the server's --data-dir

    def sdk(self, key: str | None = None) -> fireworks.Fireworks:
        return fireworks.Fireworks(
            api_key=key or self.key, account_id=ACCOUNT, base_url=self.url, max_retries=0
        )

    def http(self, method: str, path: str, key: str | None = None, **kw) -> httpx.Response:
        headers = {"Authorization": f"Bearer {key or self.key}", **kw.pop("headers", {})}
        return httpx.request(method, self.url + path, headers=headers, timeout=60, **kw)

    def wait(self, path: str, states: tuple[str, ...], timeout: float = 60) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            body = self.http("GET", path).json()
            if body.get("state") in states:
                return body
            assert time.monotonic() < deadline, body
            time.sleep(0.1)

    def evaluator(self, evaluator_id: str, **fields) -> dict:
        """Create an evaluator (the exact-match code unless `criteria` is given), wait until
        its build ends, return it."""
        fields.setdefault("criteria", criteria())
        r = self.http("POST", f"/v1/accounts/{ACCOUNT}/evaluatorsV2",
                      json={"evaluatorId": evaluator_id, "evaluator": fields})  # fmt: skip
        assert r.status_code == 200, r.text
        return self.wait(f"{EVALUATORS}/{evaluator_id}", ("ACTIVE", "BUILD_FAILED"))

    def dataset(self, dataset_id: str, data: bytes) -> None:
        fw = self.sdk()
        fw.datasets.create(dataset_id=dataset_id, dataset={"display_name": dataset_id})
        fw.datasets.upload(dataset_id, file=("rows.jsonl", data))


@contextmanager
def evaluator_server(tmp: Path, *flags: str) -> Iterator[EvaluatorServer]:
    from girandole.api.app import create_app
    from girandole.api.server import add_serve_parser, settings_from_args
    from girandole.api.state import AppState

    data = tmp / "data"
    db = Database.in_folder(data)
    key, _ = db.create_key(ACCOUNT)
    other_key, _ = db.create_key("other")
    reader_key, _ = db.create_key(ACCOUNT, role="inference-user")
    db.close()
    parser = argparse.ArgumentParser()
    add_serve_parser(parser.add_subparsers())
    args = ["serve", "--data-dir", str(data), "--account", ACCOUNT, *flags]
    app = create_app(AppState(settings_from_args(parser.parse_args(args))))
    server, thread, url = serve_in_thread(app, log_level="critical")
    try:
        yield EvaluatorServer(url, key, other_key, reader_key, data)
    finally:
        server.should_exit = True
        thread.join(30)
