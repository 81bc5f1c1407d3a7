"""The models and deployments this server serves, how a request's model string finds one, and the
catalog of base models that deployments are created from."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from girandole.registry.naming import ModelRef, parse_model_ref, parse_request_model


@dataclass
class Deployment:
    name: str  # accounts/<a>/deployments/<d>
    model: str  # the model name it serves
    default: bool = True  # the deployment a request without a '#' suffix goes to


@dataclass
class ServedModel:
    name: str  # accounts/<a>/models/<m>
    owned_by: str  # the account
    created: int = field(default_factory=lambda: int(time.time()))
    kind: str = "HF_BASE_MODEL"
    context_length: int | None = None  # known once the model is loaded
    supports_chat: bool = False
    supports_image_input: bool = False
    supports_tools: bool = False

    def to_list_entry(self) -> dict:
        """One entry of `GET /v1/models`, in Fireworks' shape."""
        entry = {
            "id": self.name,
            "object": "model",
            "created": self.created,
            "owned_by": self.owned_by,
            "kind": self.kind,
            "supports_chat": self.supports_chat,
            "supports_image_input": self.supports_image_input,
            "supports_tools": self.supports_tools,
        }
        if self.context_length is not None:
            entry["context_length"] = self.context_length
        return entry


@dataclass(frozen=True)
class Resolved:
    model: ServedModel
    deployment: Deployment


class ModelRegistry:
    def __init__(self, default_account: str) -> None:
        self.default_account = default_account
        self._models: dict[str, ServedModel] = {}
        self._deployments: dict[str, Deployment] = {}

    def add_model(self, model: ServedModel, deployment_name: str) -> None:
        self._models[model.name] = model
        is_default = not any(d.model == model.name for d in self._deployments.values())
        self._deployments[deployment_name] = Deployment(deployment_name, model.name, is_default)

    def models(self) -> list[ServedModel]:
        return list(self._models.values())

    def deployments(self) -> list[Deployment]:
        return list(self._deployments.values())

    def get(self, name: str) -> ServedModel | None:
        ref = parse_model_ref(name, self.default_account)
        if ref is None or ref.model is None or ref.deployment is not None:
            return None
        return self._models.get(ref.model)

    def resolve(self, model: str, deployment_header: str | None = None) -> Resolved | None:
        """Find what serves `model` (plus the `fireworks-deployment` header); None means 404."""
        ref = parse_request_model(model, deployment_header, self.default_account)
        if ref is None:
            return None
        return self._resolve_ref(ref)

    def _resolve_ref(self, ref: ModelRef) -> Resolved | None:
        if ref.deployment is not None:
            deployment = self._deployments.get(ref.deployment)
            if deployment is None:
                return None
            if ref.model is not None and ref.model != deployment.model:
                return None
            return Resolved(self._models[deployment.model], deployment)
        served = self._models.get(ref.model or "")
        if served is None:
            return None
        for deployment in self._deployments.values():
            if deployment.model == served.name and deployment.default:
                return Resolved(served, deployment)
        return None


# -- base models: what a deployment can be created from -------------------------------------

PUBLIC_ACCOUNT = "fireworks"  # its models are every account's to deploy, as Fireworks' catalog
_REPO_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(?::[\w./-]+)?$")

_CATALOG_SCHEMA = """CREATE TABLE IF NOT EXISTS models (
    name TEXT PRIMARY KEY,
    source TEXT NOT NULL,
    created REAL NOT NULL,
    base TEXT,
    state TEXT,
    display_name TEXT,
    description TEXT
)"""
# Columns added after the first release, by ALTER TABLE on older databases: a row without a
# state (NULL) was added whole by `girandole models add`, and is READY.
_ADDED_COLUMNS = ("base", "state", "display_name", "description")
_COLUMNS = "name, source, created, base, state, display_name, description"
UPLOADING, READY = "UPLOADING", "READY"


@dataclass(frozen=True)
class CatalogModel:
    """A model of the catalog: `name` accounts/<a>/models/<m>, loaded from `source` (a .gguf
    file, an HF folder or a Hugging Face repo id; None: the default model)."""

    name: str
    source: str | None
    created: float
    base_model: str | None = None  # a LoRA adapter's base model (source: its PEFT folder)
    built_in: bool = False  # the default model and the server's own: not removable
    state: str = READY  # UPLOADING: created over REST, its files not validated yet
    display_name: str | None = None
    description: str | None = None

    @classmethod
    def from_row(cls, row: tuple) -> CatalogModel:
        name, source, created, base, state, display_name, description = row
        return cls(name, source, created, base, False, state or READY, display_name, description)

    @property
    def is_adapter(self) -> bool:
        return self.base_model is not None

    @property
    def account(self) -> str:
        return self.name.split("/")[1]

    def to_json(self) -> dict:
        """Fireworks' `Model` shape (the fields this server knows)."""
        body = {
            "name": self.name,
            "displayName": self.display_name or self.name.rsplit("/", 1)[1],
            "description": self.description or "",
            "kind": "HF_PEFT_ADDON" if self.is_adapter else "HF_BASE_MODEL",
            "state": self.state,
            "public": self.account == PUBLIC_ACCOUNT,
            "createTime": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.created)),
        }
        if self.is_adapter:
            body["peftDetails"] = {"baseModel": self.base_model}
        return body


def check_model_source(source: str) -> str:
    """An existing .gguf file or model folder (made absolute), or a repo id; else ValueError."""
    path = Path(source).expanduser()
    if path.exists():
        return str(path.resolve())
    if _REPO_ID_RE.match(source):
        return source
    raise ValueError(
        f"{source!r} is neither an existing .gguf file or model folder nor a Hugging Face repo"
        " id (org/name, or org/name:file.gguf)"
    )


def check_adapter_source(source: str) -> str:
    """An existing PEFT LoRA folder (made absolute); else ValueError."""
    path = Path(source).expanduser()
    weights = ("adapter_model.safetensors", "adapter_model.bin")
    if not (path / "adapter_config.json").is_file() or not any(
        (path / name).is_file() for name in weights
    ):
        raise ValueError(
            f"{source!r} is not a PEFT LoRA adapter folder (adapter_config.json and"
            " adapter_model.safetensors)"
        )
    return str(path.resolve())


def check_uploaded_files(folder: Path, adapter: bool) -> str:
    """The source an uploaded model loads from, once its files are what its kind needs: for an
    adapter check_adapter_source's (adapter_config.json and its weights: the folder); for a base
    model one .gguf file (that file) or config.json and *.safetensors weights (the folder).
    ValueError names what is missing."""
    names = {p.name for p in folder.iterdir() if p.is_file()} if folder.is_dir() else set()
    if adapter:
        missing = [] if "adapter_config.json" in names else ["adapter_config.json"]
        if not names & {"adapter_model.safetensors", "adapter_model.bin"}:
            missing.append("adapter_model.safetensors (or adapter_model.bin)")
        if missing:
            raise ValueError(f"a PEFT LoRA adapter needs {' and '.join(missing)}")
        return check_adapter_source(str(folder))
    ggufs = sorted(n for n in names if n.endswith(".gguf"))
    if len(ggufs) > 1:
        raise ValueError(f"a model is one .gguf file; these were uploaded: {', '.join(ggufs)}")
    if ggufs:
        return str((folder / ggufs[0]).resolve())
    missing = [] if "config.json" in names else ["config.json"]
    if not any(n.endswith(".safetensors") for n in names):
        missing.append("its weights (*.safetensors)")
    if missing:
        hint = ""
        if "adapter_config.json" in names:
            hint = ": these are a LoRA adapter's files, create the model with kind HF_PEFT_ADDON"
        raise ValueError(f"a model needs {' and '.join(missing)}, or one .gguf file instead{hint}")
    return str(folder.resolve())


class ModelCatalog:
    """The base models of the server's database, with the built-in ones (the default model and
    the model the server serves) always present. Read from the database at each call, so a
    `girandole models add` is seen by a running server at once."""

    def __init__(self, db: Any, built_in: list[CatalogModel]) -> None:
        self.db = db
        self.built_in = {m.name: m for m in built_in}
        db.execute(_CATALOG_SCHEMA)
        columns = {row[1] for row in db.execute("PRAGMA table_info(models)")}
        for column in _ADDED_COLUMNS:  # a database written before LoRA adapters, or uploads
            if column not in columns:
                db.execute(f"ALTER TABLE models ADD COLUMN {column} TEXT")

    def add(self, name: str, source: str, base: str | None = None) -> CatalogModel:
        """Add a base model, or with `base` a PEFT LoRA adapter folder of that base model."""
        if name in self.built_in or self.get(name) is not None:
            raise ValueError(f"model {name} already exists")
        if base is not None:
            # A base not stored here may be a server's own model (`--model`, not in the
            # database): loading the adapter onto a deployment checks it against that model.
            base_model = self.get(base)
            if base_model is not None and base_model.is_adapter:
                raise ValueError(f"base model {base} is itself a LoRA adapter")
            if base_model is not None and base_model.state != READY:
                raise ValueError(f"base model {base} is {base_model.state}: validate it first")
            source = check_adapter_source(source)
        else:
            source = check_model_source(source)
            folder = Path(source)
            if (folder / "adapter_config.json").is_file() and not (folder / "config.json").exists():
                # it would be deployed as a model and fail to load: say what it is instead
                raise ValueError(
                    f"{source!r} is a PEFT LoRA adapter folder, not a model: add it with --base"
                    " BASE_MODEL (the model it was trained on)"
                )
        model = CatalogModel(name, source, time.time(), base)
        self.db.execute(
            "INSERT INTO models (name, source, created, base, state) VALUES (?, ?, ?, ?, ?)",
            (model.name, model.source, model.created, model.base_model, READY),
        )
        return model

    def create_upload(
        self,
        name: str,
        folder: str,
        base: str | None = None,
        display_name: str | None = None,
        description: str | None = None,
    ) -> CatalogModel | None:
        """A model created over REST, UPLOADING until its files in `folder` are validated
        (mark_ready); None when the name is taken."""
        if name in self.built_in:
            return None
        model = CatalogModel(
            name, folder, time.time(), base, state=UPLOADING, display_name=display_name,
            description=description,
        )  # fmt: skip
        rows = self.db.execute(
            f"INSERT INTO models ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (name) DO NOTHING RETURNING name",
            (name, folder, model.created, base, UPLOADING, display_name, description),
        )
        return model if rows else None

    def mark_ready(self, name: str, source: str) -> bool:
        """An uploaded model validated: READY, loaded from `source` (its folder or .gguf)."""
        rows = self.db.execute(
            "UPDATE models SET state = ?, source = ? WHERE name = ? RETURNING name",
            (READY, source, name),
        )
        return bool(rows)

    def describe(
        self, name: str, display_name: str | None, description: str | None
    ) -> CatalogModel | None:
        """Set a stored model's displayName and description (None: unchanged)."""
        rows = self.db.execute(
            "UPDATE models SET display_name = COALESCE(?, display_name),"
            " description = COALESCE(?, description) WHERE name = ? RETURNING name",
            (display_name, description, name),
        )
        return self.get(name) if rows else None

    def remove(self, name: str) -> bool:
        if name in self.built_in:
            raise ValueError(f"model {name} is built in and cannot be removed")
        rows = self.db.execute("DELETE FROM models WHERE name = ? RETURNING name", (name,))
        return bool(rows)

    def get(self, name: str) -> CatalogModel | None:
        if name in self.built_in:
            return self.built_in[name]
        rows = self.db.execute(f"SELECT {_COLUMNS} FROM models WHERE name = ?", (name,))
        return CatalogModel.from_row(rows[0]) if rows else None

    def list(self, account: str | None = None) -> list[CatalogModel]:
        rows = self.db.execute(f"SELECT {_COLUMNS} FROM models")
        stored = [CatalogModel.from_row(row) for row in rows]
        models = sorted(self.built_in.values(), key=lambda m: m.name) + sorted(
            stored, key=lambda m: m.name
        )
        return [m for m in models if account is None or m.account == account]
