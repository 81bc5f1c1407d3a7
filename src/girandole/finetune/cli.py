"""`girandole sftj|dpoj|rftj create|get|list|cancel|resume|delete`, like firectl's commands of
the same names (and `girandole rlorj`'s shared commands: finetune/rlor_cli.py), talking to a running server (GIRANDOLE_BASE_URL, GIRANDOLE_API_KEY,
GIRANDOLE_ACCOUNT) through the deployment CLI's client.

    girandole sftj create --dataset rows.jsonl --base-model accounts/fireworks/models/gemma-3-270m \
        --output-model my-sft --epochs 3 --wait

A --dataset that is a local file is uploaded as a new dataset first; --wait shows the job's
progress (percent, epoch, loss) until it ends, and exits 1 when it FAILED or was CANCELLED.
"""

from __future__ import annotations

import argparse
import json
import sys
import uuid
from pathlib import Path
from typing import Any

from girandole.batch.cli import add_job_commands, add_wait_args, wait_for_job
from girandole.cli_datasets import upload_dataset
from girandole.cli_tables import fields, table
from girandole.deploy.cli import ControlPlane, _run
from girandole.finetune.store import COMPLETED, DPO, RFT, RLOR, SFT, JobKind

# the command, its kind of job (its REST collection, the id's query parameter and prefix)
KINDS = {"sftj": SFT, "dpoj": DPO, "rftj": RFT}
# rftj's rollout flags: its inferenceParameters
ROLLOUT_FLAGS = (
    ("max_output_tokens", "maxOutputTokens"),
    ("response_candidates_count", "responseCandidatesCount"),
    ("temperature", "temperature"),
    ("top_p", "topP"),
    ("top_k", "topK"),
)
TRAINING_FLAGS = (
    ("base_model", "baseModel"),
    ("warm_start_from", "warmStartFrom"),
    ("output_model", "outputModel"),
    ("epochs", "epochs"),
    ("learning_rate", "learningRate"),
    ("lora_rank", "loraRank"),
    ("max_context_length", "maxContextLength"),
    ("batch_size", "batchSize"),
)


def _kind(args: argparse.Namespace) -> JobKind:
    return RLOR if args.command == "rlorj" else KINDS[args.command]


def _plane(args: argparse.Namespace) -> ControlPlane:
    return ControlPlane(args.base_url, args.api_key, args.account, resource="")


def _path(args: argparse.Namespace, job_id: str = "") -> str:
    return f"/{_kind(args).collection}" + (f"/{job_id.rsplit('/', 1)[-1]}" if job_id else "")


def _training(job: dict[str, Any]) -> dict[str, Any]:
    """A job's training fields, where its kind keeps them."""
    return {**job, **(job.get("trainingConfig") or {})}


def progress_line(job: dict[str, Any]) -> str:
    """`37%  epoch 1  loss 0.5312  RUNNING` (and `reward 0.25` of a reinforcement job;
    `step 3  loss ...` of a keep-alive RLOR trainer job, whose steps have no end to count to)."""
    progress = job.get("jobProgress") or {}
    if job.get("keepAlive"):
        line = f"step {progress.get('step', 0)}"
    else:
        line = f"{progress.get('percent', 0):>3}%  epoch {progress.get('epoch', 0)}"
    if progress.get("loss") is not None:
        line += f"  loss {progress['loss']:.4f}"
    if progress.get("meanReward") is not None:  # a reinforcement fine-tuning job's
        line += f"  reward {progress['meanReward']:.4f}"
    return line + "  " + str(job.get("state", "")).removeprefix("JOB_STATE_")


def _show(args: argparse.Namespace, job: dict[str, Any]) -> None:
    if args.json:
        print(json.dumps(job, indent=2))
        return
    train, status = _training(job), job.get("status") or {}
    rows = [
        ("Name", job.get("name")),
        ("Display Name", job.get("displayName")),
        ("State", job.get("state")),
        ("Status", status.get("message") or status.get("code")),
        ("Dataset", job.get("dataset")),
        ("Base Model", train.get("baseModel") or f"(warm start from {train.get('warmStartFrom')})"),
        ("Output Model", train.get("outputModel")),
        ("Epochs", train.get("epochs")),
        ("Learning Rate", train.get("learningRate")),
        ("LoRA Rank", train.get("loraRank")),
        ("Progress", progress_line(job)),
    ]
    loss = job.get("lossConfig")
    if loss and "klBeta" in loss:  # a reinforcement fine-tuning job's, an RLOR trainer job's
        rows.append(("Loss", f"{loss.get('method')} (klBeta {loss['klBeta']})"))
        if "evaluator" in job:
            rows.append(("Evaluator", job["evaluator"]))
    elif loss:
        rows.append(("Loss", f"{loss.get('method')} (beta {loss.get('dpo', {}).get('beta')})"))
    if "keepAlive" in job:  # an RLOR trainer job's
        rows.append(("Keep Alive", job["keepAlive"]))
        rows.append(("Forward Only", job.get("forwardOnly")))
        if job.get("hotLoadDeploymentId"):
            rows.append(("Hot-Load Deployment", job["hotLoadDeploymentId"]))
        if job.get("latestOutputModel"):
            rows.append(("Latest Output Model", job["latestOutputModel"]))
        hot_load = job.get("hotLoadStatus")
        if hot_load:
            rows.append(("Hot Load", f"{hot_load.get('code')}: {hot_load.get('message')}"))
    if job.get("evaluationDataset"):
        rows.append(("Evaluation Dataset", job["evaluationDataset"]))
    rows += [("Create Time", job.get("createTime")), ("Update Time", job.get("updateTime"))]
    if job.get("completedTime"):
        rows.append(("Completed Time", job["completedTime"]))
    print(fields(rows))


def _dataset(args: argparse.Namespace, plane: ControlPlane, text: str, dataset_id: str) -> str:
    """`text` as the job names it: a local file is uploaded as dataset `dataset_id` first."""
    path = Path(text)
    if path.suffix == ".jsonl" or path.is_file():
        return upload_dataset(plane, args.account, path, dataset_id)
    return text


def _body(args: argparse.Namespace, plane: ControlPlane, job_id: str) -> dict[str, Any]:
    training = {
        field: getattr(args, flag)
        for flag, field in TRAINING_FLAGS
        if getattr(args, flag) is not None
    }
    body: dict[str, Any] = {"dataset": _dataset(args, plane, args.dataset, f"{job_id[:56]}-train")}
    if args.display_name:
        body["displayName"] = args.display_name
    if _kind(args) is SFT:  # a DPO job's training fields are its trainingConfig
        body.update(training)
        if args.evaluation_dataset:
            eval_id = f"{job_id[:57]}-eval"
            body["evaluationDataset"] = _dataset(args, plane, args.evaluation_dataset, eval_id)
        if args.early_stop:
            body["earlyStop"] = True
        return body
    body["trainingConfig"] = training
    loss: dict[str, Any] = {}
    if args.method:
        loss["method"] = args.method
    if _kind(args) is RFT:
        body["evaluator"] = args.evaluator
        if args.evaluation_dataset:
            eval_id = f"{job_id[:57]}-eval"
            body["evaluationDataset"] = _dataset(args, plane, args.evaluation_dataset, eval_id)
        rollouts = {field: getattr(args, flag) for flag, field in ROLLOUT_FLAGS if getattr(args, flag) is not None}  # fmt: skip
        if rollouts:
            body["inferenceParameters"] = rollouts
        if args.kl_beta is not None:
            loss["klBeta"] = args.kl_beta
    elif args.beta is not None:
        loss["dpo"] = {"beta": args.beta}
    if loss:
        body["lossConfig"] = loss
    return body


def _cmd_create(args: argparse.Namespace) -> int:
    kind, plane = _kind(args), _plane(args)
    job_id = args.job_id or kind.id_prefix + uuid.uuid4().hex[:12]
    body = _body(args, plane, job_id)
    job = plane.call("POST", _path(args), json=body, params={kind.id_param: job_id})
    if not args.wait:
        _show(args, job)
        return 0
    job = wait_for_job(plane, _path(args, job_id), args.wait_timeout, progress_line)
    _show(args, job)
    if job["state"] == COMPLETED:
        return 0
    message = (job.get("status") or {}).get("message") or ""
    print(f"girandole {args.command}: {job['name']} is {job['state']}: {message}", file=sys.stderr)
    return 1


def _cmd_get(args: argparse.Namespace) -> int:
    _show(args, _plane(args).call("GET", _path(args, args.job)))
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    kind = _kind(args)
    jobs = _plane(args).list_all(_path(args), kind.collection)
    if args.json:
        print(json.dumps(jobs, indent=2))
        return 0
    if jobs:
        rows = [["ID", "PROGRESS", "BASE MODEL", "OUTPUT MODEL"]]
        for job in jobs:
            train = _training(job)
            base = train.get("baseModel") or train.get("warmStartFrom")
            output = train.get("outputModel") or job.get(
                "latestOutputModel"
            )  # a keep-alive job's last step's
            rows.append([job["name"].rsplit("/", 1)[-1], progress_line(job), base, output])
        print(table(rows))
    return 0


def _cmd_cancel(args: argparse.Namespace) -> int:
    _show(args, _plane(args).call("POST", _path(args, args.job) + ":cancel"))
    return 0


def _cmd_resume(args: argparse.Namespace) -> int:
    _show(args, _plane(args).call("POST", _path(args, args.job) + ":resume"))
    return 0


def _cmd_delete(args: argparse.Namespace) -> int:
    _plane(args).call("DELETE", _path(args, args.job))
    print(f"deleted {args.job.rsplit('/', 1)[-1]}")
    return 0


def _create_parser(sub: argparse._SubParsersAction, kind: JobKind) -> None:
    p = sub.add_parser("create", help="create a job (a local .jsonl --dataset is uploaded first)")
    rows = {SFT: "chat rows", DPO: "preference rows"}.get(kind, "prompt rows")
    p.add_argument("--dataset", required=True, help=f"a dataset id or name, or a local .jsonl of {rows}")  # fmt: skip
    start = p.add_mutually_exclusive_group(required=True)
    start.add_argument("--base-model", help="train a new adapter of this model")
    start.add_argument("--warm-start-from", help="continue training this LoRA adapter")
    p.add_argument("--output-model", help="the adapter's model id (default: the job's id)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--learning-rate", type=float)
    p.add_argument("--lora-rank", type=int)
    p.add_argument("--max-context-length", type=int)
    p.add_argument("--batch-size", type=int, help="tokens a step")
    if kind is not DPO:  # held-out rows: SFT's evalLoss, RFT's evalReward
        p.add_argument("--evaluation-dataset", help="a dataset id or name, or a local .jsonl")
    if kind is SFT:
        p.add_argument("--early-stop", action="store_true", help="stop when the eval loss rises")
    elif kind is DPO:
        p.add_argument("--beta", type=float, help="the loss's beta (default 0.1)")
        p.add_argument("--method", choices=("DPO", "ORPO"), help="the loss (default DPO)")
    else:
        p.add_argument("--evaluator", required=True, help="the evaluator scoring the rollouts")
        p.add_argument("--method", choices=("GRPO", "DAPO"), help="the loss (default GRPO)")
        p.add_argument("--kl-beta", type=float, help="weight of the KL to the base (default 0)")
        p.add_argument("--max-output-tokens", type=int, help="a rollout's tokens (default 128)")
        p.add_argument("--response-candidates-count", type=int, help="rollouts a prompt (default 4)")  # fmt: skip
        p.add_argument("--temperature", type=float)
        p.add_argument("--top-p", type=float)
        p.add_argument("--top-k", type=int)
    p.add_argument("--display-name")
    p.add_argument("--job-id", help=f"the job's id (default: {kind.id_prefix}<random>)")
    add_wait_args(p)
    p.set_defaults(func=_run(_cmd_create))


COMMANDS = (
    ("get", _cmd_get, "show a job"),
    ("cancel", _cmd_cancel, "stop a job"),
    ("resume", _cmd_resume, "run a CANCELLED or FAILED job again"),
    ("delete", _cmd_delete, "delete a job (its output model stays)"),
)


def add_finetune_parsers(subparsers: argparse._SubParsersAction) -> None:
    for command, kind in KINDS.items():
        parser = subparsers.add_parser(
            command, help=f"{kind.noun}s on a running server (like firectl {command})"
        )
        sub = parser.add_subparsers(dest="action", required=True)
        _create_parser(sub, kind)
        add_job_commands(sub, COMMANDS, _cmd_list)
