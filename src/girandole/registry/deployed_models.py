"""DeployedModel records: a LoRA adapter of the model registry loaded onto a deployment of its
base model (Fireworks' `accounts/<a>/deployedModels/<id>`), kept in the server's database so
that replicas (re)started later load the adapter again."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

_SCHEMA = """CREATE TABLE IF NOT EXISTS deployed_models (
    account TEXT NOT NULL,
    id TEXT NOT NULL,
    model TEXT NOT NULL,
    deployment TEXT NOT NULL,
    display_name TEXT NOT NULL DEFAULT '',
    description TEXT NOT NULL DEFAULT '',
    is_default INTEGER NOT NULL DEFAULT 0,
    public INTEGER NOT NULL DEFAULT 0,
    state TEXT NOT NULL,
    create_time REAL NOT NULL,
    update_time REAL NOT NULL,
    PRIMARY KEY (account, id)
)"""
_COLUMNS = (
    "account, id, model, deployment, display_name, description, is_default, public, state,"
    " create_time, update_time"
)
STATES = ("DEPLOYING", "DEPLOYED", "UNDEPLOYING", "UPDATING")


def _timestamp(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}Z"


@dataclass
class DeployedModelRecord:
    account: str
    id: str
    model: str  # accounts/<a>/models/<adapter>
    deployment: str  # accounts/<a>/deployments/<d>
    display_name: str = ""
    description: str = ""
    default: bool = False  # the target of a request naming the model without '#<deployment>'
    public: bool = False
    state: str = "DEPLOYING"
    create_time: float = field(default_factory=time.time)
    update_time: float = field(default_factory=time.time)

    @property
    def name(self) -> str:
        return f"accounts/{self.account}/deployedModels/{self.id}"

    def to_json(
        self, default: bool | None = None, status: dict[str, str] | None = None
    ) -> dict[str, Any]:
        """Fireworks' `DeployedModel`; `default` and `status` as requests see them, when the
        stored ones are not (the stored default's deployment deleted, the adapter gone)."""
        return {
            "name": self.name,
            "displayName": self.display_name,
            "description": self.description,
            "model": self.model,
            "deployment": self.deployment,
            "default": self.default if default is None else default,
            "public": self.public,
            "serverless": False,
            "state": self.state,
            "status": status or {"code": "OK", "message": ""},
            "createTime": _timestamp(self.create_time),
            "updateTime": _timestamp(self.update_time),
        }


class DeployedModelStore:
    def __init__(self, db: Any) -> None:
        self.db = db
        db.execute(_SCHEMA)

    def _rows(self, where: str = "", params: tuple = ()) -> list[DeployedModelRecord]:
        rows = self.db.execute(f"SELECT {_COLUMNS} FROM deployed_models {where}", params)
        return [
            DeployedModelRecord(
                a, i, m, d, dn, desc, bool(dflt), bool(pub), st, ct, ut
            )  # fmt: skip
            for a, i, m, d, dn, desc, dflt, pub, st, ct, ut in rows
        ]

    def get(self, account: str, deployed_model_id: str) -> DeployedModelRecord | None:
        rows = self._rows("WHERE account = ? AND id = ?", (account, deployed_model_id))
        return rows[0] if rows else None

    def list(self, account: str | None = None) -> list[DeployedModelRecord]:
        if account is None:
            return self._rows()
        return self._rows("WHERE account = ?", (account,))

    def save(self, r: DeployedModelRecord) -> None:
        self.db.execute(
            f"INSERT OR REPLACE INTO deployed_models ({_COLUMNS})"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                r.account,
                r.id,
                r.model,
                r.deployment,
                r.display_name,
                r.description,
                int(r.default),
                int(r.public),
                r.state,
                r.create_time,
                r.update_time,
            ),
        )

    def remove(self, account: str, deployed_model_id: str) -> None:
        self.db.execute(
            "DELETE FROM deployed_models WHERE account = ? AND id = ?", (account, deployed_model_id)
        )
