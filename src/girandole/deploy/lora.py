"""DeployedModelManager: LoRA adapters of the model registry loaded onto deployments of their
base model (Fireworks' deployedModels), and which adapter a request's model string runs where.

Loading checks the adapter against the deployment's model on each running replica (a 400 naming
what does not fit) and registers it there; the record is then DEPLOYED. On a deployment with no
replica running (scaled to zero, still loading) it is DEPLOYED too, as an adapter loaded before
a scale to zero stays: each replica loads the adapter on the first request for it, so replicas
started later (a scale from zero, a restart of the server) serve it. Unloading stops new
requests at once; requests already running on the adapter finish.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import secrets
import string
import time
import weakref
from collections.abc import Callable
from typing import Any

from girandole.deploy.manager import DeploymentManager, check_ready
from girandole.registry import list_query
from girandole.registry.deployed_models import DeployedModelRecord, DeployedModelStore
from girandole.registry.deployments import DeploymentError, invalid
from girandole.registry.deployments import not_found as deployment_not_found
from girandole.registry.models import CatalogModel
from girandole.registry.naming import deployment_name, is_valid_id, parse_deployment_header

logger = logging.getLogger("girandole.deploy")

LIST_FIELDS = {
    "name",
    "displayName",
    "description",
    "model",
    "deployment",
    "default",
    "public",
    "serverless",
    "state",
    "createTime",
    "updateTime",
}
UPDATABLE = {"displayName", "description", "default", "public"}
IGNORED_ON_WRITE = {"name", "state", "status", "createTime", "updateTime", "serverless"}


def not_found(name: str) -> DeploymentError:
    return DeploymentError(404, f"DeployedModel {name} not found", code="NOT_FOUND", type="error")


class DeployedModelManager:
    def __init__(
        self,
        store: DeployedModelStore,
        deployments: DeploymentManager,
        own_deployment: str,
        own_model: str,
        own_engine: Callable[[], Any],
    ) -> None:
        self.store = store
        self.deployments = deployments
        self.catalog = deployments.catalog
        self.own_deployment = own_deployment  # the server's own deployment (its own engine)
        self.own_model = own_model
        self._own_engine = own_engine
        # (id(engine), adapter) -> (the folder being read, the load)
        self._loading: dict[tuple[int, str], tuple[str, asyncio.Future]] = {}
        # engine -> {adapter: the folder it holds}; weak: an entry goes with its replica (keyed
        # by id(engine), the entries of every replica ever stopped stayed, and a new engine at
        # a reused address inherited a stopped one's)
        self._sources: weakref.WeakKeyDictionary[Any, dict[str, str]] = weakref.WeakKeyDictionary()
        self._pending: set[tuple[str, str, str]] = set()  # (account, adapter, deployment) loading
        deployments.removal_listeners.append(self._deployment_removed)

    # -- the control plane -----------------------------------------------------------------

    async def load(self, account: str, body: dict[str, Any]) -> dict[str, Any]:
        _check_fields(body, creating=True)
        adapter = self._adapter(account, body.get("model"))
        deployment = self._deployment(account, body.get("deployment"))
        self._check_base(adapter, deployment)
        existing = [r for r in self.store.list(account) if r.model == adapter.name]
        key = (account, adapter.name, deployment)
        # A load in progress counts: two concurrent loads must not both store a record.
        if key in self._pending or any(r.deployment == deployment for r in existing):
            raise DeploymentError(
                409,
                f"{adapter.name} is already loaded on {deployment}",
                code="ALREADY_EXISTS",
                type="error",
            )
        self._pending.add(key)
        try:
            return await self._load(account, body, adapter, deployment, existing)
        finally:
            self._pending.discard(key)

    async def _load(
        self,
        account: str,
        body: dict[str, Any],
        adapter: CatalogModel,
        deployment: str,
        existing: list[DeployedModelRecord],
    ) -> dict[str, Any]:
        record = DeployedModelRecord(
            account,
            _new_id(adapter.name.rsplit("/", 1)[1]),
            adapter.name,
            deployment,
            display_name=body.get("displayName") or "",
            description=body.get("description") or "",
            default=bool(body.get("default")) or not existing,
            public=bool(body.get("public")),
        )
        engines = self.engines_of(deployment)
        for engine in engines:  # a bad adapter is a 400 before anything is stored
            await self._load_on(engine, adapter)
        if engines:
            # The deployment may have gone while the replica read the adapter: a hard delete
            # removes its DeployedModels, and a record stored after it ran the adapter on a
            # new deployment of the same id (404 now, as for a load that came after it).
            self._check_base(adapter, self._deployment(account, deployment))
        # With no replica running it was DEPLOYING until a request for the adapter itself came
        # (the deployment up and READY meanwhile), beside adapters DEPLOYED before a scale to
        # zero: the adapter is the deployment's now, read by each replica on first use.
        record.state = "DEPLOYED"
        if not record.default:
            # Read again: the model's other DeployedModels may have been unloaded while the
            # replicas read the adapter, and the first one left is the default.
            record.default = not any(r.model == adapter.name for r in self.store.list(account))
        if record.default:
            self._clear_default(account, adapter.name, keep=record.id)
        self.store.save(record)
        logger.info("LoRA %s loaded on %s (%s)", adapter.name, deployment, record.state)
        return self._view(record)

    def get(self, account: str, deployed_model_id: str) -> dict[str, Any]:
        return self._view(self._record(account, deployed_model_id))

    def list(
        self,
        account: str,
        *,
        page_size: int | None = None,
        page_token: str | None = None,
        filter: str | None = None,
        order_by: str | None = None,
    ) -> dict[str, Any]:
        serving: dict[str, DeployedModelRecord | None] = {}  # model -> its bare name's record
        views = [self._view(r, serving) for r in self.store.list(account) if self._shown(r)]
        try:
            items, next_token, total = list_query.select(
                views, LIST_FIELDS, filter, order_by, [], page_size, page_token
            )
        except list_query.QueryError as exc:
            raise invalid(str(exc), exc.param) from None
        return {"deployedModels": items, "nextPageToken": next_token, "totalSize": total}

    def update(self, account: str, deployed_model_id: str, body: dict[str, Any]) -> dict[str, Any]:
        _check_fields(body, creating=False)
        record = self._record(account, deployed_model_id)
        for key, current in (("model", record.model), ("deployment", record.deployment)):
            if key in body and body[key] not in (None, "", current):
                raise invalid(
                    f"{key} of a DeployedModel cannot be changed (it is {current}); unload it"
                    " and load the adapter again",
                    key,
                )
        if body.get("displayName") is not None:
            record.display_name = body["displayName"]
        if body.get("description") is not None:
            record.description = body["description"]
        if body.get("public") is not None:
            record.public = bool(body["public"])
        if body.get("default") is not None:
            record.default = bool(body["default"])
            if record.default:
                self._clear_default(account, record.model, keep=record.id)
        record.update_time = time.time()
        self.store.save(record)
        if not record.default:
            self._ensure_a_default(account, record.model)
            record = self._record(account, deployed_model_id)
        return self._view(record)

    def unload(self, account: str, deployed_model_id: str) -> None:
        record = self._record(account, deployed_model_id)
        record.state, record.update_time = "UNDEPLOYING", time.time()
        self.store.save(record)
        for engine in self.engines_of(record.deployment, ready=False):
            unload = getattr(engine, "unload_lora", None)
            if unload is not None:
                unload(record.model)
                # A replica still reading the adapter for a request registers it after this:
                # drop it once read (before, it stayed there for good, for a DeployedModel
                # that no longer exists; the request gets the 404 of any after the unload).
                entry = self._loading.get((id(engine), record.model))
                if entry is not None:
                    entry[1].add_done_callback(
                        functools.partial(_unload_after, unload, record.model)
                    )
            self._sources.get(engine, {}).pop(record.model, None)
        self.store.remove(account, deployed_model_id)
        if record.default:
            self._ensure_a_default(account, record.model)
        logger.info("LoRA %s unloaded from %s", record.model, record.deployment)

    # -- the data path ---------------------------------------------------------------------

    def is_adapter(self, model: str | None) -> bool:
        found = self.catalog.get(model or "")
        return found is not None and found.is_adapter

    def find(
        self, model: str, deployment: str | None, account: str | None
    ) -> DeployedModelRecord | None:
        """The DeployedModel a request for adapter `model` (on `deployment`, else the default
        one) goes to, among `account`'s (None: every account's)."""
        records = [
            r
            for r in self.store.list(account)
            if r.model == model and r.state != "UNDEPLOYING"
            and (deployment is None or r.deployment == deployment) and self._live(r)
        ]  # fmt: skip
        if deployment is None:
            records.sort(key=lambda r: (not r.default, r.create_time))
        return records[0] if records else None

    def reachable(self, account: str | None) -> list[DeployedModelRecord]:
        records = [
            r for r in self.store.list(account) if r.state != "UNDEPLOYING" and self._live(r)
        ]
        return sorted(records, key=lambda r: (r.create_time, r.name))

    async def ensure_loaded(self, engine: Any, model: str) -> None:
        """Load adapter `model` on `engine` if that replica does not hold it yet."""
        names = getattr(engine, "lora_names", None)
        if names is None:
            return
        adapter = self.catalog.get(model)
        if adapter is None or not adapter.is_adapter:
            raise invalid(f"{model} is no longer a LoRA adapter of the model registry", "model")
        held = self._sources.get(engine, {}).get(model, adapter.source)
        if model in names() and held == adapter.source:
            return  # else: added to the registry again from another folder, read that one
        await self._load_on(engine, adapter)
        for record in self.store.list():  # stored DEPLOYING by an older server
            if record.model == model and record.state == "DEPLOYING":
                if engine in self.engines_of(record.deployment):
                    record.state, record.update_time = "DEPLOYED", time.time()
                    self.store.save(record)

    def engines_of(self, deployment: str, ready: bool = True) -> list[Any]:
        """The engines of the deployment's ready replicas (ready=False: every engine, as an
        unload needs)."""
        if deployment == self.own_deployment:
            engine = self._own_engine()
            return [] if engine is None else [engine]
        backend = self.deployments.backend
        return list(backend.engines(deployment) if ready else backend.all_engines(deployment))

    # -- helpers ---------------------------------------------------------------------------

    def _shown(self, record: DeployedModelRecord) -> bool:
        """Whether list and get show the record: not while its deployment is soft-deleted (it
        serves nothing there; an undelete brings it back, a hard delete removes it), as a
        deleted deployment leaves its account's list. One whose deployment does not exist
        (the server's own, renamed since) is shown, its status saying so, to be unloaded."""
        if record.deployment == self.own_deployment:
            return True
        _, account, _, deployment_id = record.deployment.split("/")
        found = self.deployments.store.get(account, deployment_id)
        return found is None or not found.deleted

    def _view(
        self,
        record: DeployedModelRecord,
        serving: dict[str, DeployedModelRecord | None] | None = None,
    ) -> dict[str, Any]:
        """The DeployedModel as requests see it: `default` is the one the adapter's bare name
        runs on (the stored default may be on a deleted deployment: the next one serves).
        `serving`: what find answered for each model so far (a list asks once a model)."""
        serving = {} if serving is None else serving
        if record.model not in serving:
            serving[record.model] = self.find(record.model, None, record.account)
        runs = serving[record.model]
        return record.to_json(
            default=None if runs is None else runs.id == record.id, status=self._status(record)
        )

    def _status(self, record: DeployedModelRecord) -> dict[str, str]:
        """Why a shown DeployedModel serves nothing (requests for it are 404s), as `_live`
        decides; OK when it serves."""
        if record.deployment != self.own_deployment and not self.deployments.find(
            record.deployment
        ):
            return {
                "code": "NOT_FOUND",
                "message": f"Deployment {record.deployment} does not exist (the server serves"
                f" its own model as {self.own_deployment}): requests for this DeployedModel"
                " are answered 404; unload it, and load the adapter on a deployment",
            }
        adapter = self.catalog.get(record.model)
        if adapter is None or not adapter.is_adapter:
            return {
                "code": "NOT_FOUND",
                "message": f"LoRA adapter {record.model} is no longer in the model registry:"
                " requests for it are answered 404 until it is added again",
            }
        if self._served_base(adapter, record.deployment) is None:
            return {
                "code": "FAILED_PRECONDITION",
                "message": f"LoRA adapter {record.model} is now for base model"
                f" {adapter.base_model}, which deployment {record.deployment} does not serve:"
                " requests for it there are answered 404; unload it, and load it on a"
                " deployment of its base model",
            }
        return {"code": "OK", "message": ""}

    def _live(self, record: DeployedModelRecord) -> bool:
        """Whether the record's deployment serves requests (not a soft-deleted one: its
        DeployedModels come back with an undelete) on the adapter's base model (the registry
        may have changed the adapter's base since it was loaded, or a record may predate
        hard deletes removing their DeployedModels: never run an adapter on another base), and
        the adapter is still one of the registry (a request for a removed one is a 404: /v1/models
        must not list it)."""
        adapter = self.catalog.get(record.model)
        if adapter is None or not adapter.is_adapter:
            return False
        return self._served_base(adapter, record.deployment) is not None

    def _served_base(self, adapter: CatalogModel, deployment: str) -> str | None:
        """The model the live `deployment` serves, when the adapter fits it; else None."""
        if deployment == self.own_deployment:
            served = self.own_model
        else:
            found = self.deployments.find(deployment)
            if found is None:
                return None
            served = found.base_model
        if served == adapter.base_model:
            return served
        a, b = self.catalog.get(adapter.base_model), self.catalog.get(served)
        if a is not None and b is not None and a.source == b.source and not b.is_adapter:
            return served  # two names of the same weights
        return None

    def _deployment_removed(self, deployment: str) -> None:
        """A deployment was deleted for good: its DeployedModels go with it (a new deployment
        of the same id, perhaps of another base model, must not run them)."""
        account = deployment.split("/")[1]
        for record in self.store.list(account):
            if record.deployment == deployment:
                self.store.remove(account, record.id)
                if record.default:
                    self._ensure_a_default(account, record.model)
                logger.info("LoRA %s unloaded from %s (deleted)", record.model, deployment)

    async def _load_on(self, engine: Any, adapter: CatalogModel) -> None:
        """Register `adapter` on one replica (once, however many requests ask at the same time);
        400 when it does not fit the replica's model."""
        load = getattr(engine, "load_lora", None)
        if load is None:
            raise invalid("this deployment's replicas cannot load LoRA adapters", "deployment")
        key = (id(engine), adapter.name)
        # A load of the same name from another folder (the registry changed the adapter while
        # it was read) is let finish first: joining it registered the old folder's weights
        # under the name while _sources recorded the new folder, so every later request ran
        # the old weights; and started side by side, the older read could land last.
        while (entry := self._loading.get(key)) is not None and entry[0] != adapter.source:
            await asyncio.wait([entry[1]])
            if self._loading.get(key) is entry:  # its done callback has not run yet
                del self._loading[key]
        if entry is None:
            entry = (adapter.source, asyncio.ensure_future(load(adapter.name, adapter.source)))
            self._loading[key] = entry
            mine = entry

            def done(_: asyncio.Future) -> None:
                if self._loading.get(key) is mine:
                    del self._loading[key]

            entry[1].add_done_callback(done)
        try:
            await asyncio.shield(entry[1])
        except ValueError as exc:  # AdapterError: it does not fit this base model
            raise invalid(f"LoRA adapter {adapter.name} cannot be loaded: {exc}", "model") from None
        self._sources.setdefault(engine, {})[adapter.name] = adapter.source

    def _adapter(self, account: str, text: Any) -> CatalogModel:
        if not text or not isinstance(text, str):
            raise invalid("model is required: the LoRA adapter to load", "model")
        model = self.deployments.registry_model(account, text)
        if model is None:
            raise invalid(
                f"model {text!r} is not a model of this server's registry (add an adapter with"
                " `girandole models add NAME ADAPTER-FOLDER --base MODEL`)",
                "model",
            )
        if not model.is_adapter:
            raise invalid(
                f"model {model.name} is a base model, not a LoRA adapter: deploy it with"
                " POST /v1/accounts/{a}/deployments",
                "model",
            )
        check_ready(model, "model")
        return model

    def _deployment(self, account: str, text: Any) -> str:
        if not text or not isinstance(text, str):
            raise invalid("deployment is required: the deployment of the base model", "deployment")
        name = parse_deployment_header(text)
        if name is None and is_valid_id(text):
            name = deployment_name(account, text)
        if name is None:
            raise invalid(
                f"deployment {text!r} is not a deployment name (accounts/<a>/deployments/<d>)",
                "deployment",
            )
        if name.split("/")[1] != account:
            raise invalid(f"deployment {name} is not one of account {account}'s", "deployment")
        if name != self.own_deployment and self.deployments.find(name) is None:
            raise deployment_not_found(name)
        return name

    def _check_base(self, adapter: CatalogModel, deployment: str) -> None:
        if self._served_base(adapter, deployment) is not None:
            return
        served = (
            self.own_model
            if deployment == self.own_deployment
            else self.deployments.find(deployment).base_model
        )
        raise invalid(
            f"LoRA adapter {adapter.name} is for base model {adapter.base_model}, but"
            f" deployment {deployment} serves {served}",
            "deployment",
        )

    def _record(self, account: str, deployed_model_id: str) -> DeployedModelRecord:
        record = self.store.get(account, deployed_model_id)
        if record is None or not self._shown(record):
            raise not_found(f"accounts/{account}/deployedModels/{deployed_model_id}")
        return record

    def _clear_default(self, account: str, model: str, keep: str) -> None:
        for other in self.store.list(account):
            if other.model == model and other.id != keep and other.default:
                other.default, other.update_time = False, time.time()
                self.store.save(other)

    def _ensure_a_default(self, account: str, model: str) -> None:
        """A model loaded somewhere keeps a default DeployedModel: the oldest one."""
        records = sorted(
            (r for r in self.store.list(account) if r.model == model), key=lambda r: r.create_time
        )
        if records and not any(r.default for r in records):
            records[0].default, records[0].update_time = True, time.time()
            self.store.save(records[0])


def _unload_after(unload: Callable[[str], Any], name: str, _: asyncio.Future) -> None:
    unload(name)


def _check_fields(body: dict[str, Any], creating: bool) -> None:
    allowed = UPDATABLE | IGNORED_ON_WRITE | {"model", "deployment"}
    for key, value in body.items():
        if key not in allowed:
            raise invalid(f"Unknown field {key}", key)
        if key == "serverless" and value:
            raise invalid("serverless: a LoRA addon runs on a dedicated deployment", key)
        if key in ("displayName", "description", "model", "deployment") and value is not None:
            if not isinstance(value, str):
                raise invalid(f"{key} must be a string", key)
        if key in ("default", "public") and value is not None and not isinstance(value, bool):
            raise invalid(f"{key} must be true or false", key)
    if len(body.get("displayName") or "") >= 64:
        raise invalid("displayName must be shorter than 64 characters", "displayName")


def _new_id(model_id: str) -> str:
    alphabet = string.ascii_lowercase + string.digits
    suffix = "".join(secrets.choice(alphabet) for _ in range(8))
    return f"{model_id[:54]}-{suffix}"
