"""`girandole batch create|get|list|cancel`, like firectl's batch-inference-job commands, talking
to a running server (GIRANDOLE_BASE_URL, GIRANDOLE_API_KEY, GIRANDOLE_ACCOUNT) through the
deployment CLI's client.

    girandole batch create requests.jsonl --model accounts/fireworks/models/gemma-3-270m --wait

uploads the file as a dataset, creates the job, and with --wait shows its progress (a bar on a
terminal) until it ends; --output FILE then saves the results (and FILE's errors beside it).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from girandole.cli_datasets import upload_dataset
from girandole.cli_tables import fields, table
from girandole.deploy.cli import CLIError, ControlPlane, _connection_args, _run, _wait_args

FINAL = ("JOB_STATE_COMPLETED", "JOB_STATE_FAILED", "JOB_STATE_CANCELLED", "JOB_STATE_EXPIRED")
BAR_WIDTH = 30


def _plane(args: argparse.Namespace) -> ControlPlane:
    return ControlPlane(args.base_url, args.api_key, args.account, resource="")


def _job_id(text: str) -> str:
    """A job id, or its full name accounts/<a>/batchInferenceJobs/<j>."""
    return text.rsplit("/", 1)[-1]


def _parameters(args: argparse.Namespace) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for flag, field in (
        ("max_tokens", "maxTokens"),
        ("temperature", "temperature"),
        ("top_p", "topP"),
        ("top_k", "topK"),
        ("n", "n"),
        ("extra_body", "extraBody"),
    ):
        value = getattr(args, flag)
        if value is not None:
            params[field] = value
    return params


def progress_line(job: dict[str, Any]) -> str:
    """`[#######.......]  120/500  24%  RUNNING`."""
    progress = job.get("jobProgress") or {}
    total = int(progress.get("totalInputRequests") or 0)
    done = int(progress.get("totalProcessedRequests") or 0)
    filled = BAR_WIDTH * done // total if total else 0
    bar = "#" * filled + "." * (BAR_WIDTH - filled)
    failed = int(progress.get("failedRequests") or 0)
    state = str(job.get("state", "")).removeprefix("JOB_STATE_")
    tail = f"  {failed} failed" if failed else ""
    return (
        f"[{bar}] {done:>{len(str(total))}}/{total} {progress.get('percent', 0):>3}%  {state}{tail}"
    )


def _show(args: argparse.Namespace, job: dict[str, Any]) -> None:
    if args.json:
        print(json.dumps(job, indent=2))
        return
    progress = job.get("jobProgress") or {}
    status = job.get("status") or {}
    rows = [
        ("Name", job.get("name")),
        ("Display Name", job.get("displayName")),
        ("Model", job.get("model")),
        ("State", job.get("state")),
        ("Status", status.get("message") or status.get("code")),
        ("Input Dataset", job.get("inputDatasetId")),
        ("Output Dataset", job.get("outputDatasetId")),
        (
            "Progress",
            f"{progress.get('totalProcessedRequests', 0)}/{progress.get('totalInputRequests', 0)}"
            f" ({progress.get('successfullyProcessedRequests', 0)} succeeded,"
            f" {progress.get('failedRequests', 0)} failed)",
        ),
        ("Tokens", f"{progress.get('inputTokens', 0)} in, {progress.get('outputTokens', 0)} out"),
        ("Create Time", job.get("createTime")),
        ("Update Time", job.get("updateTime")),
    ]
    print(fields(rows))


def wait_for_job(
    plane: ControlPlane,
    path: str,
    timeout: float,
    line_of: Callable[[dict[str, Any]], str],
    until: tuple[str, ...] = FINAL,
) -> dict[str, Any]:
    """Poll the job at `path` until it ends (or reaches another of the states `until`), showing
    `line_of(job)` on stderr: redrawn in place on a terminal, a line each time it changes
    otherwise (also girandole.finetune.cli's)."""
    tty = sys.stderr.isatty()
    deadline, shown = time.monotonic() + timeout, ""
    while True:
        job = plane.call("GET", path)
        line = line_of(job)
        if line != shown:
            sys.stderr.write(("\r" if tty else "") + line + ("" if tty else "\n"))
            sys.stderr.flush()
            shown = line
        if job["state"] in until:
            if tty:
                sys.stderr.write("\n")
            return job
        if time.monotonic() > deadline:
            raise CLIError(f"job not done after {timeout:g} s (state {job['state']})")
        time.sleep(0.5)


def _download(plane: ControlPlane, dataset: str, output: Path) -> None:
    """Save the output dataset's results to `output` and its errors beside it."""
    dataset_id = dataset.rsplit("/", 1)[-1]
    urls = plane.call("GET", f"/datasets/{dataset_id}:getDownloadEndpoint")
    for name, url in (urls.get("filenameToSignedUrls") or {}).items():
        response = plane.client.get(url)
        if response.status_code >= 400:
            raise CLIError(f"downloading {name} failed (HTTP {response.status_code})")
        target = output if name == "results.jsonl" else output.with_name(f"{output.stem}.{name}")
        target.write_bytes(response.content)
        print(f"{name} -> {target}", file=sys.stderr)


def _cmd_create(args: argparse.Namespace) -> int:
    plane = _plane(args)
    job_id = args.job_id or "batch-" + uuid.uuid4().hex[:12]
    dataset = upload_dataset(plane, args.account, Path(args.file), f"{job_id[:57]}-input")
    body: dict[str, Any] = {
        "model": args.model,
        "inputDatasetId": dataset,
        "inferenceParameters": _parameters(args),
    }
    if args.display_name:
        body["displayName"] = args.display_name
    if args.output_dataset:
        body["outputDatasetId"] = args.output_dataset
    job = plane.call(
        "POST", "/batchInferenceJobs", json=body, params={"batchInferenceJobId": job_id}
    )
    if args.wait:
        job = wait_for_job(plane, f"/batchInferenceJobs/{job_id}", args.wait_timeout, progress_line)
        if args.output:
            _download(plane, job["outputDatasetId"], Path(args.output))
    _show(args, job)
    return 0 if job["state"] != "JOB_STATE_FAILED" else 1


def _cmd_get(args: argparse.Namespace) -> int:
    _show(args, _plane(args).call("GET", f"/batchInferenceJobs/{_job_id(args.job)}"))
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    jobs = _plane(args).list_all("/batchInferenceJobs", "batchInferenceJobs")
    if args.json:
        print(json.dumps(jobs, indent=2))
        return 0
    if jobs:
        rows = [["ID", "PROGRESS", "MODEL"]]
        rows += [[_job_id(job["name"]), progress_line(job), job["model"]] for job in jobs]
        print(table(rows))
    return 0


def _cmd_cancel(args: argparse.Namespace) -> int:
    _show(args, _plane(args).call("POST", f"/batchInferenceJobs/{_job_id(args.job)}:cancel"))
    return 0


def add_wait_args(p: argparse.ArgumentParser) -> None:
    """A job CLI's create's --wait and --wait-timeout (also girandole.finetune.cli's)."""
    _wait_args(p, "show its progress until it ends", 86400.0, "1 day")


def add_job_commands(
    sub: argparse._SubParsersAction,
    commands: tuple[tuple[str, Callable[[argparse.Namespace], int], str], ...],
    list_func: Callable[[argparse.Namespace], int],
) -> None:
    """A job CLI's (name, function, help) commands of one job (its id or name), its `list`, and
    every command's connection flags (after its own create was added)."""
    for name, func, text in commands:
        p = sub.add_parser(name, help=text)
        p.add_argument("job", help="its id or name")
        p.set_defaults(func=_run(func))
    p = sub.add_parser("list", help="list the account's jobs")
    p.set_defaults(func=_run(list_func))
    for p in sub.choices.values():
        _connection_args(p)


def add_batch_parser(subparsers: argparse._SubParsersAction) -> None:
    batch = subparsers.add_parser(
        "batch", help="batch inference jobs on a running server (like firectl batch-inference-job)"
    )
    sub = batch.add_subparsers(dest="action", required=True)

    p = sub.add_parser("create", help="upload a JSONL file of requests and run it as a job")
    p.add_argument("file", help='JSONL, one {"custom_id": ..., "body": {...}} a line')
    p.add_argument("--model", required=True, help="accounts/<a>/models/<m>")
    p.add_argument("--job-id", help="the job's id (default: batch-<random>)")
    p.add_argument("--display-name")
    p.add_argument("--output-dataset", help="the output dataset's id (default: <job>-output)")
    p.add_argument("--max-tokens", type=int)
    p.add_argument("--temperature", type=float)
    p.add_argument("--top-p", type=float)
    p.add_argument("--top-k", type=int)
    p.add_argument("--n", type=int)
    p.add_argument("--extra-body", help='more request fields as JSON, e.g. \'{"stop": ["\\n"]}\'')
    add_wait_args(p)
    p.add_argument("--output", help="with --wait: save the results here (errors beside it)")
    p.set_defaults(func=_run(_cmd_create))

    commands = (
        ("get", _cmd_get, "show a job"),
        ("cancel", _cmd_cancel, "cancel a job (what is done stays in its output dataset)"),
    )
    add_job_commands(sub, commands, _cmd_list)
