"""`girandole keys create|list|update|revoke` and `girandole usage`: manage the keys database and
read the usage rows, in the same data folder as `girandole serve --data-dir` (default: the cache
folder). They work while a server runs: a revoked key is refused from its next request, and a
changed role applies from it too."""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable

from girandole.api.flag_values import env_default, folder_value
from girandole.cli_tables import table
from girandole.registry.keystore import Database, check_key_name, parse_limit
from girandole.registry.naming import is_valid_id
from girandole.registry.roles import DEFAULT_ROLE, ROLES


def _data_dir_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data-dir",
        type=folder_value("DATA_DIR"),
        default=env_default("DATA_DIR"),
        help="folder of girandole.db; default: the cache folder [GIRANDOLE_DATA_DIR]",
    )


def _open(args: argparse.Namespace) -> Database:
    folder = args.data_dir
    if not folder:
        from girandole.model.default import cache_dir

        folder = str(cache_dir())
    return Database.in_folder(folder)


def _when(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "-"


def _printable(text: str) -> str:
    """`text` with unprintable characters escaped: a name stored before they were refused, or
    a request's metadata, must not send terminal escape sequences or line breaks to a table."""
    if text.isprintable():
        return text
    return "".join(
        c if c.isprintable() else c.encode("unicode_escape", "backslashreplace").decode("ascii")
        for c in text
    )


def _not_utf8(args: argparse.Namespace) -> str | None:
    """The first argument that is not valid UTF-8 (bytes the shell passed on as surrogates),
    named; SQLite cannot take one, and would fail with a traceback."""
    for name, value in vars(args).items():
        if name == "data_dir":  # a path: the file system takes any bytes
            continue
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, str) and not item.isascii():
                try:
                    item.encode("utf-8")
                except UnicodeEncodeError:
                    flag = "KEY_ID" if name.startswith("key_id") else "--" + name.replace("_", "-")
                    return f"{flag} is not valid UTF-8: {item!r}"
    return None


def _utf8_args(func: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """`func`, refusing first an argument that is not valid UTF-8."""

    def checked(args: argparse.Namespace) -> int:
        problem = _not_utf8(args)
        if problem:
            print(f"girandole: {problem}", file=sys.stderr)
            return 2
        return func(args)

    return checked


def _key_name(text: str) -> str:
    """argparse type of --name: a label printed by `keys list`, so printable characters only."""
    try:
        return check_key_name(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _hours(text: str) -> float:
    """argparse type of --hours: a finite number above 0 (nan would match no row, inf all)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number above 0, got {text.strip()}")
    return value


def _cmd_keys_create(args: argparse.Namespace) -> int:
    if not is_valid_id(args.account):
        print(f"girandole keys: {args.account!r} is not a valid account id", file=sys.stderr)
        return 2
    db = _open(args)
    try:
        key, info = db.create_key(args.account, args.name or "", args.rpm, args.tpm, args.role)
    except ValueError as exc:  # the flags' types check the same; this covers what they miss
        print(f"girandole keys: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"key": key, "id": info.id, "account": info.account, "role": info.role}))
    else:
        print(
            f"created key {info.id} ({info.role}) for account {info.account}; it is shown only now:"
        )
        print(key)
    return 0


def _cmd_keys_list(args: argparse.Namespace) -> int:
    keys = _open(args).list_keys(args.account)
    if args.json:
        print(json.dumps([k.__dict__ for k in keys]))
        return 0
    rows = [["ID", "ACCOUNT", "ROLE", "NAME", "CREATED", "REVOKED", "RPM", "TPM"]]
    for k in keys:
        rows.append(
            [
                k.id,
                _printable(k.account),
                k.role,
                _printable(k.name) or "-",
                _when(k.created),
                _when(k.revoked),
                str(k.rpm or "-"),
                str(k.tpm or "-"),
            ]
        )
    print(table(rows))
    return 0


def _cmd_keys_update(args: argparse.Namespace) -> int:
    try:
        changed = _open(args).set_role(args.key_id, args.role)
    except ValueError as exc:  # a key of a user has its user's role
        print(f"girandole keys: {exc}", file=sys.stderr)
        return 2
    if not changed:
        print(f"girandole keys: no live key with id {args.key_id!r}", file=sys.stderr)
        return 1
    print(f"key {args.key_id} now has role {args.role}")
    return 0


def _cmd_keys_revoke(args: argparse.Namespace) -> int:
    db = _open(args)
    failed = 0
    for key_id in args.key_ids:
        if db.revoke_key(key_id):
            print(f"revoked {key_id}")
        else:
            print(f"girandole keys: no live key with id {key_id!r}", file=sys.stderr)
            failed = 1
    return failed


def _cmd_usage(args: argparse.Namespace) -> int:
    since = time.time() - args.hours * 3600 if args.hours is not None else None
    metadata = {}
    for pair in args.metadata:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            print(f"girandole usage: --metadata takes KEY=VALUE, got {pair!r}", file=sys.stderr)
            return 2
        metadata[key] = value
    try:
        rows = _open(args).usage_summary(args.by, args.account, since, metadata)
    except ValueError as exc:
        print(f"girandole usage: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(rows))
        return 0
    by = _printable(args.by.upper())  # --by may name a metadata key with any characters
    summary = [[by, "REQUESTS", "ABORTED", "ERRORS", "PROMPT", "CACHED", "COMPLETION",
              "AVG TTFT s", "AVG TIME s"]]  # fmt: skip
    for r in rows:
        summary.append(
            [
                _printable(str(r[args.by])) if r[args.by] is not None else "-",
                r["requests"],
                r["aborted"],
                r["errors"],
                r["prompt_tokens"],
                r["cached_tokens"],
                r["completion_tokens"],
                f"{r['avg_ttft_s']:.3f}" if r["avg_ttft_s"] is not None else "-",
                f"{r['avg_duration_s']:.3f}" if r["avg_duration_s"] is not None else "-",
            ]
        )
    print(table(summary))
    return 0


_ROLE_HELP = (
    "user (default): inference and managing the account's deployments; inference-user:"
    " inference and reading deployments and models only; admin: what a user may, and managing"
    " the account's users and their API keys over REST"
)


def add_admin_parsers(sub: argparse._SubParsersAction) -> None:
    keys = sub.add_parser("keys", help="manage API keys (stored hashed in girandole.db)")
    ksub = keys.add_subparsers(dest="keys_command", required=True)
    create = ksub.add_parser("create", help="create a key for an account and print it once")
    create.add_argument("--account", required=True, help="the account the key belongs to")
    create.add_argument(
        "--name", type=_key_name, default="", help="a label to tell keys apart (printable)"
    )
    create.add_argument(
        "--rpm",
        type=parse_limit,
        default=None,
        help="requests per minute for it; 0: no limit; default: the server's",
    )
    create.add_argument(
        "--tpm",
        type=parse_limit,
        default=None,
        help="tokens per minute for it; 0: no limit; default: the server's",
    )
    create.add_argument("--role", choices=ROLES, default=DEFAULT_ROLE, help=_ROLE_HELP)
    create.add_argument("--json", action="store_true")
    _data_dir_arg(create)
    create.set_defaults(func=_utf8_args(_cmd_keys_create))
    lst = ksub.add_parser("list", help="list keys (never the keys themselves)")
    lst.add_argument("--account", default=None)
    lst.add_argument("--json", action="store_true")
    _data_dir_arg(lst)
    lst.set_defaults(func=_utf8_args(_cmd_keys_list))
    update = ksub.add_parser("update", help="change a key's role (from its next request)")
    update.add_argument("key_id", metavar="KEY_ID")
    update.add_argument("--role", choices=ROLES, required=True, help=_ROLE_HELP)
    _data_dir_arg(update)
    update.set_defaults(func=_utf8_args(_cmd_keys_update))
    revoke = ksub.add_parser("revoke", help="revoke keys by id (takes effect at once)")
    revoke.add_argument("key_ids", nargs="+", metavar="KEY_ID")
    _data_dir_arg(revoke)
    revoke.set_defaults(func=_utf8_args(_cmd_keys_revoke))

    usage = sub.add_parser("usage", help="summarize usage: requests and tokens")
    usage.add_argument(
        "--by",
        default="account",
        help="account (default), key_id, model, endpoint, status, or metadata.KEY (a key of the"
        " requests' `metadata`)",
    )
    usage.add_argument(
        "--metadata",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="only requests whose metadata has KEY=VALUE (repeatable: all of them)",
    )
    usage.add_argument("--account", default=None, help="only this account")
    usage.add_argument(
        "--hours", type=_hours, default=None, help="only the last N hours (a number above 0)"
    )
    usage.add_argument("--json", action="store_true")
    _data_dir_arg(usage)
    usage.set_defaults(func=_utf8_args(_cmd_usage))
