"""`girandole rlorj create|get|list|cancel|resume|delete|step`: RLOR trainer jobs on a running
server (GIRANDOLE_BASE_URL, GIRANDOLE_API_KEY, GIRANDOLE_ACCOUNT), as finetune/cli.py's other
job kinds, plus `step` (:executeTrainStep).

    girandole rlorj create --keep-alive --base-model accounts/fireworks/models/gemma-3-270m \
        --hot-load-deployment-id gemma-3-270m --job-id loop --wait
    girandole rlorj step loop --dataset scored.jsonl --output-model loop-1 --wait

A keep-alive job never ends on its own: create's --wait waits until it is RUNNING (its policy
loaded: ready for steps) or ends (FAILED, CANCELLED); a job over a --dataset, until it ends.
`step` answers when the step is done (its model written and hot-loaded); its --wait first waits
for a job still loading its policy (just created or resumed) to be RUNNING. A --dataset that is a
local file is uploaded as a new dataset first.
"""

from __future__ import annotations

import argparse
import sys
import uuid
from typing import Any

from girandole.batch.cli import FINAL, add_job_commands, add_wait_args, wait_for_job
from girandole.deploy.cli import _run, _wait_args
from girandole.finetune.cli import (
    COMMANDS,
    TRAINING_FLAGS,
    _cmd_list,
    _dataset,
    _path,
    _plane,
    _show,
    progress_line,
)  # fmt: skip
from girandole.finetune.store import COMPLETED, RLOR, RUNNING

# what `create --wait` of a keep-alive job waits for: ready for steps, or ended
READY = (RUNNING, *FINAL)


def _body(args: argparse.Namespace, plane: Any, job_id: str) -> dict[str, Any]:
    training = {field: getattr(args, flag) for flag, field in TRAINING_FLAGS if getattr(args, flag) is not None}  # fmt: skip
    body: dict[str, Any] = {"trainingConfig": training}
    if args.dataset:
        body["dataset"] = _dataset(args, plane, args.dataset, f"{job_id[:56]}-train")
    loss = {field: value for field, value in (("method", args.method), ("klBeta", args.kl_beta)) if value is not None}  # fmt: skip
    if loss:
        body["lossConfig"] = loss
    for flag, field in (
        ("keep_alive", "keepAlive"), ("forward_only", "forwardOnly"),
        ("hot_load_deployment_id", "hotLoadDeploymentId"), ("display_name", "displayName"),
    ):  # fmt: skip
        if getattr(args, flag):
            body[field] = getattr(args, flag)
    return body


def _ended(args: argparse.Namespace, job: dict[str, Any]) -> int:
    """Exit 1 (saying why on stderr) for a job that FAILED or was CANCELLED."""
    if job["state"] not in FINAL or job["state"] == COMPLETED:
        return 0
    message = (job.get("status") or {}).get("message") or ""
    print(f"girandole rlorj: {job['name']} is {job['state']}: {message}", file=sys.stderr)
    return 1


def _cmd_create(args: argparse.Namespace) -> int:
    plane = _plane(args)
    job_id = args.job_id or RLOR.id_prefix + uuid.uuid4().hex[:12]
    job = plane.call("POST", _path(args), json=_body(args, plane, job_id), params={RLOR.id_param: job_id})  # fmt: skip
    if args.wait:
        until = READY if job.get("keepAlive") else FINAL
        job = wait_for_job(plane, _path(args, job_id), args.wait_timeout, progress_line, until)
    _show(args, job)
    return _ended(args, job) if args.wait else 0


def _cmd_step(args: argparse.Namespace) -> int:
    plane = _plane(args)
    job_id = args.job.rsplit("/", 1)[-1]
    if args.wait:  # a job just created or resumed loads its policy first
        job = wait_for_job(plane, _path(args, job_id), args.wait_timeout, progress_line, READY)
        if job["state"] != RUNNING:
            _show(args, job)
            return _ended(args, job) or 1
    dataset = _dataset(args, plane, args.dataset, f"{job_id[:44]}-step-{uuid.uuid4().hex[:8]}")
    body = {"dataset": dataset, "outputModel": args.output_model}
    # the call answers when the step is done: as long as the step takes
    job = plane.call("POST", _path(args, job_id) + ":executeTrainStep", json=body, timeout=args.wait_timeout)  # fmt: skip
    print(progress_line(job), file=sys.stderr)
    _show(args, job)
    hot_load = job.get("hotLoadStatus") or {}
    if hot_load.get("code", "OK") != "OK":  # the step stands: a warning
        print(f"girandole rlorj: warning: outputModel {hot_load['message']}", file=sys.stderr)
    return 0


def _create_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("create", help="create a job (a local .jsonl --dataset is uploaded first)")
    p.add_argument("--keep-alive", action="store_true", help="a trainer driven by `rlorj step`, running until cancelled")  # fmt: skip
    p.add_argument("--dataset", help="scored rollouts to train over (not with --keep-alive): a dataset id or name, or a local .jsonl")  # fmt: skip
    start = p.add_mutually_exclusive_group(required=True)
    start.add_argument("--base-model", help="train a new adapter of this model")
    start.add_argument("--warm-start-from", help="continue training this LoRA adapter")
    p.add_argument("--output-model", help="the adapter's model id (not with --keep-alive: each step names its own; default: the job's id)")  # fmt: skip
    p.add_argument("--epochs", type=int)
    p.add_argument("--learning-rate", type=float)
    p.add_argument("--lora-rank", type=int)
    p.add_argument("--max-context-length", type=int)
    p.add_argument("--batch-size", type=int, help="tokens a step")
    p.add_argument("--method", choices=("GRPO", "DAPO"), help="the loss (default GRPO)")
    p.add_argument("--kl-beta", type=float, help="weight of the KL to the base (default 0)")
    p.add_argument("--forward-only", action="store_true", help="compute the loss only: no update, no model written")  # fmt: skip
    p.add_argument("--hot-load-deployment-id", help="load each step's adapter onto this deployment (keep-alive)")  # fmt: skip
    p.add_argument("--display-name")
    p.add_argument("--job-id", help=f"the job's id (default: {RLOR.id_prefix}<random>)")
    add_wait_args(p)
    p.set_defaults(func=_run(_cmd_create))


def _step_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("step", help="run one training step of a keep-alive job (:executeTrainStep)")
    p.add_argument("job", help="its id or name")
    p.add_argument("--dataset", required=True, help="the step's scored rollouts: a dataset id or name, or a local .jsonl")  # fmt: skip
    p.add_argument("--output-model", required=True, help="the model the step writes")
    _wait_args(p, "first wait for a job loading its policy to be RUNNING", 86400.0, "1 day")
    p.set_defaults(func=_run(_cmd_step))


def add_rlor_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("rlorj", help=f"{RLOR.noun}s on a running server (keep-alive trainers and their steps)")  # fmt: skip
    sub = parser.add_subparsers(dest="action", required=True)
    _create_parser(sub)
    _step_parser(sub)
    add_job_commands(sub, COMMANDS, _cmd_list)
