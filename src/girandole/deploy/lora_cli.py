"""`girandole lora load|unload|list|get`, like firectl's load-lora / unload-lora, talking to a
running server's deployedModels routes (GIRANDOLE_BASE_URL, GIRANDOLE_API_KEY,
GIRANDOLE_ACCOUNT)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from girandole.cli_tables import fields, table
from girandole.deploy.cli import CLIError, ControlPlane, _connection_args, _run
from girandole.registry.naming import (
    deployment_name,
    is_valid_id,
    parse_deployment_header,
    parse_model_ref,
)


def _plane(args: argparse.Namespace) -> ControlPlane:
    plane = ControlPlane(args.base_url, args.api_key, args.account)
    plane.prefix = f"/v1/accounts/{args.account}/deployedModels"
    return plane


def _model(args: argparse.Namespace) -> str:
    """accounts/<a>/models/<m>, <a>/<m> or <m> (of --account) as its full name."""
    ref = parse_model_ref(args.model, args.account)
    if ref is None or ref.model is None or ref.deployment is not None:
        raise CLIError(
            f"{args.model!r} is not a model name: accounts/<a>/models/<m>, <a>/<m> or <m>"
        )
    return ref.model


def _deployment(args: argparse.Namespace, text: str) -> str:
    """accounts/<a>/deployments/<d>, <a>/<d> or <d> (of --account) as its full name."""
    name = parse_deployment_header(text)
    if name is None and is_valid_id(text):
        name = deployment_name(args.account, text)
    if name is None:
        raise CLIError(
            f"{text!r} is not a deployment name: accounts/<a>/deployments/<d>, <a>/<d> or <d>"
        )
    return name


def _deployed_model_id(args: argparse.Namespace, text: str) -> str:
    """A DeployedModel id of --account, from itself or its name accounts/<a>/deployedModels/<id>."""
    found = text.removeprefix(f"accounts/{args.account}/deployedModels/")
    if not is_valid_id(found):
        raise CLIError(
            f"{text!r} is not a DeployedModel id of account {args.account}: <id> or"
            f" accounts/{args.account}/deployedModels/<id>"
        )
    return found


def _show(args: argparse.Namespace, record: dict[str, Any]) -> None:
    if args.json:
        print(json.dumps(record, indent=2))
        return
    rows = [
        ("Name", record["name"]),
        ("Model", record["model"]),
        ("Deployment", record["deployment"]),
        ("State", record["state"]),
        ("Default", "yes" if record.get("default") else "no"),
    ]
    if record.get("displayName"):
        rows.append(("Display Name", record["displayName"]))
    print(fields(rows))


def _cmd_load(args: argparse.Namespace) -> int:
    body = {"model": _model(args), "deployment": _deployment(args, args.deployment)}
    if args.default:
        body["default"] = True
    if args.display_name:
        body["displayName"] = args.display_name
    _show(args, _plane(args).call("POST", json=body))
    return 0


def _all(args: argparse.Namespace) -> list[dict[str, Any]]:
    return _plane(args).list_all("", "deployedModels", {"pageSize": 200})


def _cmd_unload(args: argparse.Namespace) -> int:
    model = _model(args)
    matches = [
        r
        for r in _all(args)
        if r["model"] == model
        and (args.deployment is None or r["deployment"] == _deployment(args, args.deployment))
    ]
    if not matches:
        where = f" on {_deployment(args, args.deployment)}" if args.deployment else ""
        raise CLIError(f"{model} is not loaded{where}")
    if len(matches) > 1:
        raise CLIError(
            f"{model} is loaded on {len(matches)} deployments: name one with --deployment"
        )
    _plane(args).call("DELETE", "/" + matches[0]["name"].rsplit("/", 1)[1])
    print(f"unloaded {model} from {matches[0]['deployment']}")
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    items = _all(args)
    if args.json:
        print(json.dumps(items, indent=2))
        return 0
    if items:
        rows = [["NAME", "MODEL", "DEPLOYMENT", "STATE", "DEFAULT"]]
        for r in items:
            default = "yes" if r.get("default") else ""
            rows.append([r["name"], r["model"], r["deployment"], r["state"], default])
        print(table(rows))
    return 0


def _cmd_get(args: argparse.Namespace) -> int:
    _show(args, _plane(args).call("GET", "/" + _deployed_model_id(args, args.id)))
    return 0


def add_lora_parser(subparsers: argparse._SubParsersAction) -> None:
    lora = subparsers.add_parser(
        "lora", help="load LoRA adapters onto deployments of a running server (deployedModels)"
    )
    sub = lora.add_subparsers(dest="action", required=True)
    p = sub.add_parser("load", help="load an adapter of the model registry onto a deployment")
    p.add_argument("model", help="the adapter: accounts/<a>/models/<m>, or <m> of --account")
    p.add_argument("--deployment", required=True, help="its id or accounts/<a>/deployments/<d>")
    p.add_argument("--default", action="store_true", help="requests without '#' go here")
    p.add_argument("--display-name")
    p.set_defaults(func=_run(_cmd_load))
    p = sub.add_parser("unload", help="unload an adapter from a deployment")
    p.add_argument("model")
    p.add_argument("--deployment", help="needed when the adapter is on several deployments")
    p.set_defaults(func=_run(_cmd_unload))
    p = sub.add_parser("list", help="list the adapters loaded on the account's deployments")
    p.set_defaults(func=_run(_cmd_list))
    p = sub.add_parser("get", help="show one DeployedModel")
    p.add_argument("id", help="its id or accounts/<a>/deployedModels/<id>")
    p.set_defaults(func=_run(_cmd_get))
    for p in sub.choices.values():
        _connection_args(p)
