"""`girandole deployment create|list|get|update|scale|delete|undelete`, like firectl's, talking to
a running server (GIRANDOLE_BASE_URL, GIRANDOLE_API_KEY, GIRANDOLE_ACCOUNT); and
`girandole models add|list|remove`, the base-model catalog in the server's database (the same
data folder as `girandole serve --data-dir`; a running server sees a change at once)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

from girandole.api.flag_values import env_default, float_value, url_value
from girandole.cli_tables import fields, table

DEFAULT_BASE_URL = "http://127.0.0.1:8000"


class CLIError(Exception):
    pass


# -- talking to the server ----------------------------------------------------------------------


class ControlPlane:
    def __init__(
        self, base_url: str, api_key: str | None, account: str, resource: str = "deployments"
    ) -> None:
        import httpx

        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(base_url=base_url.rstrip("/"), headers=headers, timeout=60)
        self.prefix = f"/v1/accounts/{account}" + (f"/{resource}" if resource else "")

    def call(self, method: str, path: str = "", **kwargs: Any) -> Any:
        import httpx

        try:
            response = self.client.request(method, self.prefix + path, **kwargs)
        except httpx.TransportError as exc:
            raise CLIError(f"cannot reach the server at {self.client.base_url}: {exc}") from None
        try:
            body = response.json()
        except ValueError:
            body = None
        if response.status_code >= 400:
            message = body.get("error", {}).get("message") if isinstance(body, dict) else None
            raise CLIError(f"{message or response.text} (HTTP {response.status_code})")
        return body

    def list_all(
        self, path: str, key: str, params: dict[str, Any] | None = None
    ) -> list[dict[str, Any]]:
        """Every item of a paged list (`key` in each page), following nextPageToken."""
        params, items = dict(params or {}), []
        while True:
            page = self.call("GET", path, params=params)
            items += page.get(key, [])
            if not page.get("nextPageToken"):
                return items
            params["pageToken"] = page["nextPageToken"]


def _plane(args: argparse.Namespace) -> ControlPlane:
    return ControlPlane(args.base_url, args.api_key, args.account)


def _deployment_id(text: str) -> str:
    """A deployment id, or its full name accounts/<a>/deployments/<d>."""
    return text.rsplit("/", 1)[-1]


def parse_load_targets(text: str) -> dict[str, float]:
    targets = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        try:
            if not sep or not key.strip():
                raise ValueError
            targets[key.strip()] = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"--load-targets wants key=value pairs separated by commas, got {part!r}"
            ) from None
    return targets


def _body(args: argparse.Namespace) -> dict[str, Any]:
    """The Deployment fields the flags set."""
    body: dict[str, Any] = {}
    for flag, field in (
        ("display_name", "displayName"),
        ("description", "description"),
        ("min_replica_count", "minReplicaCount"),
        ("max_replica_count", "maxReplicaCount"),
        ("max_context_length", "maxContextLength"),
        ("accelerator_type", "acceleratorType"),
        ("draft_model", "draftModel"),
        ("draft_token_count", "draftTokenCount"),
        ("ngram_speculation_length", "ngramSpeculationLength"),
        ("deployment_shape", "deploymentShape"),
    ):
        value = getattr(args, flag, None)
        if value is not None:
            body[field] = value
    policy = {}
    for flag, field in (
        ("scale_up_window", "scaleUpWindow"),
        ("scale_down_window", "scaleDownWindow"),
        ("scale_to_zero_window", "scaleToZeroWindow"),
        ("load_targets", "loadTargets"),
    ):
        value = getattr(args, flag, None)
        if value is not None:
            policy[field] = value
    if policy:
        body["autoscalingPolicy"] = policy
    return body


def _shape_params(args: argparse.Namespace) -> dict[str, str]:
    return {"skipShapeValidation": "true"} if args.skip_shape_validation else {}


def _show(args: argparse.Namespace, deployment: dict[str, Any]) -> None:
    if args.json:
        print(json.dumps(deployment, indent=2))
        return
    policy = deployment.get("autoscalingPolicy", {})
    stats = deployment.get("replicaStats", {})
    status = deployment.get("status", {})
    rows = [
        ("Name", deployment.get("name")),
        ("Display Name", deployment.get("displayName") or "-"),
        ("Base Model", deployment.get("baseModel")),
        ("State", deployment.get("state")),
        ("Status", status.get("message") or status.get("code")),
        (
            "Replicas",
            f"{deployment.get('replicaCount', 0)} ready,"
            f" {deployment.get('desiredReplicaCount', 0)} desired,"
            f" {stats.get('initializingReplicaCount', 0)} initializing",
        ),
        (
            "Replica Range",
            f"{deployment.get('minReplicaCount')}..{deployment.get('maxReplicaCount')}",
        ),
        ("Scale Up Window", policy.get("scaleUpWindow")),
        ("Scale Down Window", policy.get("scaleDownWindow")),
        ("Scale To Zero Window", policy.get("scaleToZeroWindow")),
        ("Load Targets", ",".join(f"{k}={v:g}" for k, v in policy.get("loadTargets", {}).items())),
        ("Max Context Length", deployment.get("maxContextLength") or "model default"),
        ("Deployment Shape", deployment.get("deploymentShape") or "-"),
        ("Create Time", deployment.get("createTime")),
        ("Update Time", deployment.get("updateTime")),
    ]
    if deployment.get("deleteTime"):
        rows.append(("Delete Time", deployment["deleteTime"]))
    print(fields(rows))


def _wait(plane: ControlPlane, deployment_id: str, timeout: float) -> dict[str, Any]:
    """Poll until the deployment is READY with its desired replicas ready (or FAILED)."""
    deadline = time.monotonic() + timeout
    while True:
        deployment = plane.call("GET", f"/{deployment_id}")
        if deployment["state"] == "FAILED":
            raise CLIError(f"deployment failed: {deployment['status'].get('message')}")
        ready = deployment["replicaStats"].get("readyReplicaCount", 0)
        if deployment["state"] == "READY" and ready >= deployment["desiredReplicaCount"]:
            return deployment
        if time.monotonic() > deadline:
            raise CLIError(
                f"deployment not ready after {timeout:g} s (state {deployment['state']})"
            )
        time.sleep(0.5)


def _cmd_create(args: argparse.Namespace) -> int:
    plane = _plane(args)
    params = {"deploymentId": args.deployment_id} if args.deployment_id else {}
    params.update(_shape_params(args))
    body = {"baseModel": args.model, **_body(args)}
    deployment = plane.call("POST", "", json=body, params=params)
    if args.wait:
        deployment = _wait(plane, _deployment_id(deployment["name"]), args.wait_timeout)
    _show(args, deployment)
    return 0


def _cmd_get(args: argparse.Namespace) -> int:
    _show(args, _plane(args).call("GET", f"/{_deployment_id(args.deployment)}"))
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    plane = _plane(args)
    params: dict[str, Any] = {"showDeleted": str(args.show_deleted).lower()}
    if args.filter:
        params["filter"] = args.filter
    if args.order_by:
        params["orderBy"] = args.order_by
    deployments = plane.list_all("", "deployments", params)
    if args.json:
        print(json.dumps(deployments, indent=2))
        return 0
    rows = [["NAME", "BASE MODEL", "STATE", "REPLICAS", "CREATE TIME"]]
    for d in deployments:
        rows.append(
            [
                d["name"],
                d["baseModel"],
                d["state"],
                f"{d.get('replicaCount', 0)}/{d.get('desiredReplicaCount', 0)}",
                d.get("createTime", ""),
            ]
        )
    print(table(rows))
    return 0


def _cmd_update(args: argparse.Namespace) -> int:
    body = _body(args)
    if not body:
        raise CLIError("nothing to update: give at least one field flag")
    deployment_id = _deployment_id(args.deployment)
    plane = _plane(args)
    deployment = plane.call("PATCH", f"/{deployment_id}", json=body, params=_shape_params(args))
    if args.wait:
        deployment = _wait(plane, deployment_id, args.wait_timeout)
    _show(args, deployment)
    return 0


def _cmd_scale(args: argparse.Namespace) -> int:
    deployment_id = _deployment_id(args.deployment)
    plane = _plane(args)
    plane.call("PATCH", f"/{deployment_id}:scale", json={"replicaCount": args.replica_count})
    if args.wait:
        _wait(plane, deployment_id, args.wait_timeout)
    print(f"scaled {deployment_id} to {args.replica_count} replica(s)")
    return 0


def _cmd_delete(args: argparse.Namespace) -> int:
    deployment_id = _deployment_id(args.deployment)
    params = {"hard": "true"} if args.hard else {}
    _plane(args).call("DELETE", f"/{deployment_id}", params=params)
    print(f"deleted {deployment_id}" + (" for good" if args.hard else ""))
    return 0


def _cmd_undelete(args: argparse.Namespace) -> int:
    _show(args, _plane(args).call("POST", f"/{_deployment_id(args.deployment)}:undelete", json={}))
    return 0


def _run(func: Any) -> Any:
    def run(args: argparse.Namespace) -> int:
        try:
            return func(args)
        except CLIError as exc:
            print(f"girandole {args.command}: {exc}", file=sys.stderr)
            return 1

    return run


def _connection_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--base-url",
        type=url_value("BASE_URL"),
        default=env_default("BASE_URL", DEFAULT_BASE_URL),
        help=f"the server [GIRANDOLE_BASE_URL, default {DEFAULT_BASE_URL}]",
    )
    p.add_argument(
        "--api-key", default=os.environ.get("GIRANDOLE_API_KEY"), help="[GIRANDOLE_API_KEY]"
    )
    p.add_argument(
        "--account",
        default=os.environ.get("GIRANDOLE_ACCOUNT", "fireworks"),
        help="the account of the deployments (the key's) [GIRANDOLE_ACCOUNT, default fireworks]",
    )
    p.add_argument("--json", action="store_true", help="print the JSON the server answered")


def _field_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--display-name")
    p.add_argument("--description")
    p.add_argument("--min-replica-count", type=int)
    p.add_argument("--max-replica-count", type=int)
    p.add_argument("--scale-up-window", help="a duration: 30s, 10m, 1h")
    p.add_argument("--scale-down-window", help="a duration: 30s, 10m, 1h")
    p.add_argument("--scale-to-zero-window", help="a duration: 30s, 10m, 1h")
    p.add_argument(
        "--load-targets",
        type=parse_load_targets,
        help="per-replica targets, e.g. default=0.8 or concurrent_requests=4,requests_per_second=2",
    )
    p.add_argument("--max-context-length", type=int)
    p.add_argument("--accelerator-type")
    p.add_argument(
        "--draft-model",
        help='speculative decoding with this draft model of the registry ("": none)',
    )
    p.add_argument("--draft-token-count", type=int, help="tokens the draft proposes per step")
    p.add_argument(
        "--ngram-speculation-length",
        type=int,
        help="speculative decoding by n-gram lookup: tokens proposed per step (0: off)",
    )
    p.add_argument(
        "--deployment-shape",
        help="a shape's fields for those not given: accounts/<a>/deploymentShapes/<s>, <s>,"
        " or 'default' (see GET /v1/accounts/<a>/deploymentShapes)",
    )
    p.add_argument(
        "--skip-shape-validation",
        action="store_true",
        help="flags that contradict the deployment's shape win instead of a 400",
    )


def _wait_args(
    p: argparse.ArgumentParser,
    what: str = "wait until its replicas are ready",
    default: float = 600.0,
    shown: str = "600",
) -> None:
    """--wait and --wait-timeout (also the job CLIs')."""
    p.add_argument("--wait", action="store_true", help=what)
    p.add_argument(
        "--wait-timeout",
        type=float_value(None, 0, above=True),
        default=default,
        help=f"seconds (default {shown})",
    )


def add_deployment_parser(subparsers: argparse._SubParsersAction) -> None:
    dep = subparsers.add_parser(
        "deployment", help="manage deployments on a running server (like firectl deployment)"
    )
    sub = dep.add_subparsers(dest="action", required=True)

    p = sub.add_parser("create", help="create a deployment of a base model")
    p.add_argument("model", help="a base model: accounts/<a>/models/<m>, or <m> of the account")
    p.add_argument("--deployment-id", help="default: a generated id")
    _field_args(p)
    _wait_args(p)
    p.set_defaults(func=_run(_cmd_create))

    p = sub.add_parser("list", help="list the account's deployments")
    p.add_argument("--show-deleted", action="store_true")
    p.add_argument("--filter", help='e.g. state=READY AND baseModel:"gemma"')
    p.add_argument("--order-by", help="e.g. 'createTime desc'")
    p.set_defaults(func=_run(_cmd_list))

    for action, func, text in (
        ("get", _cmd_get, "show a deployment"),
        ("update", _cmd_update, "change a deployment's fields"),
        ("scale", _cmd_scale, "set a deployment's replica count"),
        ("delete", _cmd_delete, "delete a deployment (soft, unless --hard)"),
        ("undelete", _cmd_undelete, "bring back a soft-deleted deployment"),
    ):
        p = sub.add_parser(action, help=text)
        p.add_argument("deployment", help="its id, or accounts/<a>/deployments/<d>")
        if action == "update":
            _field_args(p)
        if action == "scale":
            p.add_argument("--replica-count", type=int, required=True)
        if action == "delete":
            p.add_argument("--hard", action="store_true", help="remove it for good")
        if action in ("update", "scale"):
            _wait_args(p)
        p.set_defaults(func=_run(func))
    for p in sub.choices.values():
        _connection_args(p)


# -- the model catalog (the server's database) --------------------------------------------------


def _catalog(args: argparse.Namespace) -> Any:
    from girandole.model.default import DEFAULT_MODEL_ID
    from girandole.registry.admin_cli import _open
    from girandole.registry.models import PUBLIC_ACCOUNT, CatalogModel, ModelCatalog
    from girandole.registry.naming import model_name

    default = CatalogModel(model_name(PUBLIC_ACCOUNT, DEFAULT_MODEL_ID), None, 0.0, built_in=True)
    return ModelCatalog(_open(args), [default])


def _model_name(args: argparse.Namespace, text: str | None = None) -> str:
    from girandole.registry.naming import parse_model_ref

    text = args.name if text is None else text
    ref = parse_model_ref(text, args.account)
    if ref is None or ref.model is None or ref.deployment is not None:
        raise CLIError(
            f"{text!r} is not a model name: accounts/<a>/models/<m>, <a>/<m> or <m>"
            " (1-63 characters of a-z, 0-9 and '-')"
        )
    return ref.model


def _cmd_models_add(args: argparse.Namespace) -> int:
    try:
        catalog = _catalog(args)
        base = _model_name(args, args.base) if args.base else None
        model = catalog.add(_model_name(args), args.source, base)
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    kind = f"LoRA adapter of {model.base_model}" if model.is_adapter else "model"
    print(f"added {kind} {model.name} from {model.source}")
    return 0


def _cmd_models_list(args: argparse.Namespace) -> int:
    models = _catalog(args).list(args.account if args.only_account else None)
    if args.json:
        print(
            json.dumps(
                [
                    {
                        "name": m.name,
                        "source": m.source,
                        "baseModel": m.base_model,
                        "state": m.state,
                    }
                    for m in models
                ]
            )
        )
        return 0
    for m in models:
        lora = f"  (LoRA of {m.base_model})" if m.is_adapter else ""
        print(f"{m.name}  {m.state}  {m.source or '(the default model)'}{lora}")
    return 0


def _cmd_models_remove(args: argparse.Namespace) -> int:
    try:
        removed = _catalog(args).remove(_model_name(args))
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    if not removed:
        raise CLIError(f"no model {_model_name(args)}")
    print(f"removed {_model_name(args)}")
    return 0


def add_models_parser(subparsers: argparse._SubParsersAction) -> None:
    from girandole.registry.admin_cli import _data_dir_arg

    models = subparsers.add_parser(
        "models",
        help="the base models and LoRA adapters deployments use (the server's database)",
    )
    sub = models.add_subparsers(dest="action", required=True)
    p = sub.add_parser("add", help="add a base model")
    p.add_argument("name", help="accounts/<a>/models/<m>, or <m> of --account")
    p.add_argument(
        "source",
        help="a .gguf file, an HF model folder, or a Hugging Face repo id; with --base, a PEFT"
        " LoRA adapter folder",
    )
    p.add_argument("--base", help="the adapter's base model (a model of the registry)")
    p.set_defaults(func=_run(_cmd_models_add))
    p = sub.add_parser("list", help="list the base models")
    p.add_argument("--only-account", action="store_true", help="only --account's models")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_run(_cmd_models_list))
    p = sub.add_parser("remove", help="remove a base model (deployments of it stay)")
    p.add_argument("name")
    p.set_defaults(func=_run(_cmd_models_remove))
    for p in sub.choices.values():
        _data_dir_arg(p)
        p.add_argument(
            "--account",
            default=os.environ.get("GIRANDOLE_ACCOUNT", "fireworks"),
            help="account of a bare model id [GIRANDOLE_ACCOUNT, default fireworks]",
        )


def add_deploy_parsers(subparsers: argparse._SubParsersAction) -> None:
    from girandole.deploy.lora_cli import add_lora_parser

    add_deployment_parser(subparsers)
    add_models_parser(subparsers)
    add_lora_parser(subparsers)
