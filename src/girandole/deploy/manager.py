"""DeploymentManager: the control plane's operations (create, get, list, update, scale, delete,
undelete) on the deployments table, carried out by a backend, and the autoscaler that keeps
each deployment within its policy (at least `minReplicaCount`; to zero after
`scaleToZeroWindow` without requests when the minimum is 0); it also replaces a replica whose
engine died or stalled (as Ray Serve's health check does).

A new (or undeleted) deployment starts with one replica unless `disableAutoDeploy` or a
`maxReplicaCount` of 0 says otherwise. Its state: CREATING until a replica is ready, then READY;
UPDATING while a changed `maxContextLength` or speculation field (`ngramSpeculationLength`,
`draftModel`, `draftTokenCount`: deploy/speculation.py) restarts it or a dead replica is
replaced; FAILED (with `status`) when a replica cannot start; DELETED after a soft delete.
`desiredReplicaCount` is stored, so a restarted server brings back the replicas it ran.
"""

from __future__ import annotations

import logging
import secrets
import string
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

from girandole.deploy.backend import (
    DEFAULT_ENGINE_OPTIONS,
    Backend,
    EngineOptions,
    ReplicaSpec,
)
from girandole.deploy.holds import Holds
from girandole.deploy.shapes import ShapeCatalog, shaped_body
from girandole.deploy.speculation import check_vocab, replica_options, speculation_off
from girandole.registry import list_query
from girandole.registry.deployments import (
    DEPLOYMENT_ID_RE,
    DeploymentError,
    DeploymentRecord,
    DeploymentStore,
    apply_fields,
    invalid,
    not_found,
)
from girandole.registry.models import PUBLIC_ACCOUNT, READY, CatalogModel, ModelCatalog
from girandole.registry.naming import parse_model_ref

logger = logging.getLogger("girandole.deploy")

SCALING_UP_MESSAGE = (
    "Deployment is currently scaled to zero and is scaling up. Please retry your request in a"
    " few minutes."
)
AUTOSCALE_PERIOD_S = 1.0

# The top-level fields a list filter or orderBy may name.
LIST_FIELDS = {
    "name",
    "displayName",
    "description",
    "baseModel",
    "state",
    "status",
    "minReplicaCount",
    "maxReplicaCount",
    "replicaCount",
    "desiredReplicaCount",
    "autoscalingPolicy",
    "maxContextLength",
    "ngramSpeculationLength",
    "draftModel",
    "draftTokenCount",
    "deploymentShape",
    "createTime",
    "updateTime",
    "deleteTime",
    "annotations",
}


def scaling_up() -> DeploymentError:
    """Fireworks' answer to a request for a deployment at zero replicas (not queued)."""
    return DeploymentError(
        503,
        SCALING_UP_MESSAGE,
        code="DEPLOYMENT_SCALING_UP",
        type="error",
        headers={"Retry-After": "5"},
    )


def new_deployment_id() -> str:
    alphabet = string.ascii_lowercase + string.digits
    return secrets.choice(string.ascii_lowercase) + "".join(
        secrets.choice(alphabet) for _ in range(7)
    )


def check_ready(model: CatalogModel, param: str) -> None:
    """A 400 for a model created over REST whose files are not validated yet: nothing may
    deploy or load it before (its folder may hold half of them)."""
    if model.state != READY:
        raise invalid(
            f"Model {model.name} is {model.state}: upload its files (:getUploadEndpoint) and"
            " validate them (:validateUpload) before deploying or loading it",
            param,
        )


class DeploymentManager:
    def __init__(
        self,
        store: DeploymentStore,
        catalog: ModelCatalog,
        backend: Backend,
        *,
        kv_cache_gb: float,
        max_model_len: int | None = None,
        options: EngineOptions = DEFAULT_ENGINE_OPTIONS,
        reserved: set[str] = frozenset(),
        engine_stall_seconds: float = 60.0,
    ) -> None:
        self.store = store
        self.catalog = catalog
        self.backend = backend
        self.kv_cache_gb = kv_cache_gb
        self.max_model_len = max_model_len  # the server's cap, when maxContextLength is 0
        self.options = options  # the server's engine flags, for every replica
        self.reserved = set(reserved)  # deployment names the server itself serves
        self.engine_stall_seconds = engine_stall_seconds  # a replica stuck this long is replaced
        self.shapes = ShapeCatalog(catalog, backend.hardware)  # deploy/shapes.py
        backend.listener = self._on_replica
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._autoscaler: threading.Thread | None = None
        self._holds = Holds(on_release=backend.touch)
        # called with a deployment's name once it is deleted for good (hard=true): what refers
        # to it (its LoRA DeployedModels) goes too, so a new deployment of that id starts clean
        self.removal_listeners: list[Callable[[str], None]] = []

    # -- life ------------------------------------------------------------------------------

    def start(self) -> None:
        """Bring back the replicas of the stored deployments, and start the autoscaler."""
        for record in self.store.list():
            if record.deleted or record.desired_replica_count == 0:
                continue
            count = record.desired_replica_count
            try:
                self._scale(record, count if self.backend.autoscales else min(count, 1))
            except DeploymentError as exc:
                self._set_failed(record, exc.message)
        self._autoscaler = threading.Thread(
            target=self._autoscale_loop, name="girandole-autoscaler", daemon=True
        )
        self._autoscaler.start()

    def shutdown(self) -> None:
        self._stop.set()
        if self._autoscaler is not None:
            self._autoscaler.join(5)
        self.backend.shutdown()

    # -- the control plane -----------------------------------------------------------------

    def create(
        self,
        account: str,
        body: dict[str, Any],
        deployment_id: str | None = None,
        *,
        validate_only: bool = False,
        disable_auto_deploy: bool = False,
        disable_speculative_decoding: bool = False,
        skip_shape_validation: bool = False,
    ) -> dict[str, Any]:
        if deployment_id is None or deployment_id == "":
            deployment_id = new_deployment_id()
        elif not DEPLOYMENT_ID_RE.match(deployment_id):
            raise invalid(
                f"deploymentId {deployment_id!r} is not valid: 1-63 characters of a-z, 0-9 and"
                " '-', not starting or ending with '-'",
                "deploymentId",
            )
        base_model = body.get("baseModel")
        if not base_model or not isinstance(base_model, str):
            raise invalid("baseModel is required: the model to deploy", "baseModel")
        model = self._base_model(account, base_model)
        record = DeploymentRecord(account, deployment_id, model.name)
        body = self._shaped(record, body, skip_shape_validation, creating=True)
        record = apply_fields(record, body, self.backend.hardware, creating=True)
        self._check_counts(record)
        if disable_speculative_decoding:  # not the server's flags: off
            record = speculation_off(record)
        self._check_draft(record)
        record.desired_replica_count = self._initial_replicas(record, disable_auto_deploy)
        record.state = "CREATING" if record.desired_replica_count else "READY"
        if record.name in self.reserved:
            raise _exists(record.name, "it is the server's own deployment")
        with self._lock:
            # validateOnly answers what the create would: a taken id is a 409 there too
            self._check_free(account, deployment_id, record.name)
            if validate_only:
                return self.view(record)
            if record.desired_replica_count:
                self._scale(record, record.desired_replica_count)
            if not self.store.insert(record):
                raise _exists(record.name, "choose another deploymentId")
        logger.info("deployment %s created (%s)", record.name, record.base_model)
        return self.view(record)

    def get(self, account: str, deployment_id: str) -> dict[str, Any]:
        return self.view(self._record(account, deployment_id, deleted_ok=True))

    def list(
        self,
        account: str,
        *,
        page_size: int | None = None,
        page_token: str | None = None,
        filter: str | None = None,
        order_by: str | None = None,
        show_deleted: bool = False,
    ) -> dict[str, Any]:
        views = [self.view(r) for r in self.store.list(account) if show_deleted or not r.deleted]
        try:
            items, next_token, total = list_query.select(
                views, LIST_FIELDS, filter, order_by, [("createTime", False)], page_size, page_token
            )
        except list_query.QueryError as exc:
            raise invalid(str(exc), exc.param) from None
        return {"deployments": items, "nextPageToken": next_token, "totalSize": total}

    def update(
        self,
        account: str,
        deployment_id: str,
        body: dict[str, Any],
        *,
        skip_shape_validation: bool = False,
    ) -> dict[str, Any]:
        with self._lock:
            record = self._record(account, deployment_id)
            body = self._shaped(record, body, skip_shape_validation, creating=False)
            updated = apply_fields(record, body, self.backend.hardware, creating=False)
            self._check_counts(updated)
            if updated.draft_model != record.draft_model:
                self._check_draft(updated)
            desired = min(
                max(updated.desired_replica_count, updated.min_replica_count),
                updated.max_replica_count,
            )
            stats = self.backend.stats(updated.name)
            # a replica runs its spec: a new context length or speculation means a new engine
            restart = (
                stats.ready + stats.initializing > 0
                and desired > 0
                and _engine_fields(updated) != _engine_fields(record)
            )
            # the range and the policy are Ray's autoscaling config: a change of them alone
            # must reach the backend too (before, only a changed replica count did: a lowered
            # minReplicaCount or a new scaleToZeroWindow never took effect on Ray)
            policy_changed = (
                updated.min_replica_count,
                updated.max_replica_count,
                updated.autoscaling_policy,
            ) != (record.min_replica_count, record.max_replica_count, record.autoscaling_policy)
            if desired != record.desired_replica_count or restart or policy_changed:
                self._scale(updated, desired, manual=False)
                if restart:
                    updated.state = "UPDATING"
            updated.desired_replica_count = desired
            updated.update_time = time.time()
            self.store.save(updated)
        return self.view(updated)

    def scale(self, account: str, deployment_id: str, replica_count: Any) -> None:
        if (
            isinstance(replica_count, bool)
            or not isinstance(replica_count, int)
            or replica_count < 0
        ):
            raise invalid(
                f"replicaCount must be a non-negative integer, got {replica_count!r}",
                "replicaCount",
            )
        with self._lock:
            record = self._record(account, deployment_id)
            self.backend.check_replica_count(replica_count, "replicaCount")
            if replica_count > record.max_replica_count:
                raise invalid(
                    f"replicaCount {replica_count} is above the deployment's maxReplicaCount"
                    f" ({record.max_replica_count}); raise maxReplicaCount first",
                    "replicaCount",
                )
            if replica_count < record.min_replica_count:
                raise invalid(
                    f"replicaCount {replica_count} is below the deployment's minReplicaCount"
                    f" ({record.min_replica_count}); lower minReplicaCount first",
                    "replicaCount",
                )
            self._scale(record, replica_count)
            record.desired_replica_count = replica_count
            if replica_count and record.state == "FAILED":
                record.state, record.status_code, record.status_message = "UPDATING", "OK", ""
            record.update_time = time.time()
            self.store.save(record)
        logger.info("deployment %s scaled to %d", record.name, replica_count)

    def delete(self, account: str, deployment_id: str, *, hard: bool = False) -> None:
        with self._lock:
            record = self._record(account, deployment_id, deleted_ok=hard)
            self._scale(record, 0)
            if hard:
                self.store.remove(account, deployment_id)
                for listener in self.removal_listeners:
                    listener(record.name)
            else:
                record.state = "DELETED"
                record.delete_time = record.update_time = time.time()
                self.store.save(record)
        logger.info("deployment %s deleted%s", record.name, " (hard)" if hard else "")

    def undelete(self, account: str, deployment_id: str) -> dict[str, Any]:
        with self._lock:
            record = self._record(account, deployment_id, deleted_ok=True)
            if not record.deleted:
                raise DeploymentError(
                    400,
                    f"Deployment {record.name} is not deleted",
                    code="FAILED_PRECONDITION",
                )
            record.desired_replica_count = self._initial_replicas(record, False)
            if record.desired_replica_count:
                self._scale(record, record.desired_replica_count)
            record.state = "CREATING" if record.desired_replica_count else "READY"
            record.status_code, record.status_message = "OK", ""
            record.delete_time = None
            record.update_time = time.time()
            self.store.save(record)
        return self.view(record)

    # -- the data path ---------------------------------------------------------------------

    def engine_for(self, name: str) -> Any:
        """The engine that serves a request for deployment `name` (accounts/<a>/deployments/<d>).
        A deployment at zero replicas answers Fireworks' 503 DEPLOYMENT_SCALING_UP and starts a
        replica; the request is not queued (clients retry)."""
        parts = name.split("/")
        if len(parts) != 4 or parts[0] != "accounts" or parts[2] != "deployments":
            raise not_found(name)
        self._record(parts[1], parts[3])
        engines = self.backend.engines(name)
        if engines:
            self.backend.touch(name)
            return engines[0]
        with self._lock:
            # The record is read again under the lock: one read before it may be stale (a
            # delete or the autoscaler's scale to zero ran on another thread in between), and
            # saving it back with a replica undid the delete (the deployment READY again).
            record = self._record(parts[1], parts[3])
            engines = self.backend.engines(name)
            if engines:  # a replica became ready meanwhile
                self.backend.touch(name)
                return engines[0]
            if record.state == "FAILED":
                raise DeploymentError(
                    503,
                    f"Deployment {name} failed: {record.status_message}",
                    code="UNAVAILABLE",
                    type="service_unavailable",
                )
            if record.max_replica_count == 0:
                raise DeploymentError(
                    503,
                    f"Deployment {name} is scaled down (maxReplicaCount is 0); raise its"
                    " maxReplicaCount to serve it",
                    code="UNAVAILABLE",
                    type="service_unavailable",
                )
            if record.desired_replica_count == 0:
                try:
                    self._scale(record, 1)
                except DeploymentError as exc:
                    raise DeploymentError(
                        503, exc.message, code="UNAVAILABLE", type="service_unavailable"
                    ) from None
                record.desired_replica_count = 1
                record.update_time = time.time()
                self.store.save(record)
            else:
                self.backend.wake(name)
        raise scaling_up()

    def serve_own(self, spec: ReplicaSpec, timeout: float = 1800.0) -> Any:
        """Run the server's own model as one replica of this backend (Ray) and wait for it: the
        engine of the server's own deployment."""
        self.backend.scale(spec, 1)
        return self.backend.wait_ready(spec.deployment, timeout)

    def find(self, name: str) -> DeploymentRecord | None:
        """The live (not deleted) deployment named accounts/<a>/deployments/<d>, or None."""
        parts = name.split("/")
        if len(parts) != 4 or parts[0] != "accounts" or parts[2] != "deployments":
            return None
        record = self.store.get(parts[1], parts[3])
        return None if record is None or record.deleted else record

    def default_deployment(self, model: str, account: str | None) -> DeploymentRecord | None:
        """The deployment a request naming only `model` goes to: the first one created of that
        model among `account`'s live deployments (None: every account's)."""
        records = [r for r in self.store.list(account) if not r.deleted and r.base_model == model]
        return min(records, key=lambda r: (r.create_time, r.name), default=None)

    def reachable(self, account: str | None) -> list[DeploymentRecord]:
        """The live deployments of `account` (None: all), oldest first."""
        records = [r for r in self.store.list(account) if not r.deleted]
        return sorted(records, key=lambda r: (r.create_time, r.name))

    def hold(self, name: str) -> AbstractContextManager[None]:
        """While a request of deployment `name` waits for admission and starts on its engine:
        the deployment is not idle (no scale to zero); its clock starts over when it ends."""
        return self._holds.hold(name)

    # -- views and helpers -----------------------------------------------------------------

    def view(self, record: DeploymentRecord) -> dict[str, Any]:
        """The Deployment as the API shows it: stored fields plus the replicas' state."""
        body = record.to_json()
        stats = self.backend.stats(record.name)
        body["replicaCount"] = stats.ready
        body["replicaStats"] = stats.to_json()
        desired = self.backend.desired(record.name)
        if desired is not None and not record.deleted:  # Ray's autoscaler's, not the stored one
            body["desiredReplicaCount"] = desired
        return body

    def _scale(self, record: DeploymentRecord, n: int, *, manual: bool = True) -> None:
        """Ask the backend for n replicas (stopping needs no base model: it may be gone);
        `manual` False: an update of the record's range or policy, not a `:scale`."""
        if n == 0:
            spec = ReplicaSpec(record.name, None, self.kv_cache_gb, None)
            self.backend.scale(spec, 0, record, manual=manual)
            if record.state in ("CREATING", "UPDATING"):
                # No replica is coming to make it READY: at zero it is READY, as a deployment
                # created at zero is (it stayed CREATING or UPDATING until a replica started).
                record.state = "READY"
        else:
            self.backend.scale(self._spec(record), n, record, manual=manual)

    def registry_model(self, account: str, text: str) -> Any:
        """The model of the registry that `text` (accounts/<a>/models/<m>, or <m> of `account`)
        names, if `account` may use it (its own, or the public catalog's); else None."""
        ref = parse_model_ref(text, account)
        model = None
        if ref is not None and ref.model is not None and ref.deployment is None:
            model = self.catalog.get(ref.model)
        if model is None or model.account not in (account, PUBLIC_ACCOUNT):
            return None
        return model

    def _base_model(self, account: str, text: str) -> Any:
        model = self.registry_model(account, text)
        if model is None:
            raise invalid(
                f"baseModel {text!r} is not a model of this server's registry (see GET"
                f" /v1/accounts/{account}/models; add one with `girandole models add`)",
                "baseModel",
            )
        check_ready(model, "baseModel")
        return model

    def _draft(self, account: str, text: str) -> tuple[str, str]:
        """The name to store of a deployment's draftModel, and where its files are; a 400 for
        anything but a registry model the account may use or the server's own --draft-model
        (deploy/speculation.py says why)."""
        if self.options.draft_model is not None and text == self.options.draft_model:
            return text, text
        model = self.registry_model(account, text)
        if model is None:
            raise invalid(
                f"draftModel {text!r} is not a model of this server's registry that account"
                f" {account} may use (see GET /v1/accounts/{account}/models; add one with"
                " `girandole models add`)",
                "draftModel",
            )
        check_ready(model, "draftModel")
        if model.is_adapter:
            raise invalid(
                f"draftModel {model.name} is a LoRA adapter: a draft model is a base model with"
                " the base model's tokenizer",
                "draftModel",
            )
        if model.source is None:  # the default model
            from girandole.model.default import default_model_path

            return model.name, str(default_model_path())
        return model.name, model.source

    def _check_draft(self, record: DeploymentRecord) -> None:
        """Resolve a new draftModel (stored by its full name) and check its vocabulary."""
        if not record.draft_model:
            return
        record.draft_model, path = self._draft(record.account, record.draft_model)
        base_source, _ = self._model_source(record)
        check_vocab(record.draft_model, path, base_source)

    def _shaped(
        self, record: DeploymentRecord, body: dict[str, Any], skip: bool, *, creating: bool
    ) -> dict[str, Any]:
        """`body` on the deployment's shape (deploy/shapes.py): a new `deploymentShape` fills
        the fields the body leaves unset (on an update: replaces the record's); the body's own
        fields are checked against the new shape, or the stored one, unless `skip`
        (skipShapeValidation); on an update only those it changes. A stored shape no longer in
        the catalog checks nothing."""
        text = body.get("deploymentShape")
        if text:
            shape = self.shapes.resolve(text, record.account, record.base_model)
            fill = creating or shape.version_name != record.deployment_shape
        elif record.deployment_shape:
            try:
                shape = self.shapes.resolve(
                    record.deployment_shape, record.account, record.base_model
                )
            except DeploymentError:
                return body
            fill = False
        else:
            return body
        if not creating:  # what a PATCH echoes from a GET is no new contradiction (a shape
            # it moves to takes those fields over)
            current = record.to_json()
            body = {k: v for k, v in body.items() if k not in shape.fields or current.get(k) != v}
        return shaped_body(body, shape, skip_validation=skip, fill=fill)

    def _record(
        self, account: str, deployment_id: str, *, deleted_ok: bool = False
    ) -> DeploymentRecord:
        record = self.store.get(account, deployment_id)
        name = f"accounts/{account}/deployments/{deployment_id}"
        if record is None or (record.deleted and not deleted_ok):
            raise not_found(name)
        return record

    def _check_free(self, account: str, deployment_id: str, name: str) -> None:
        existing = self.store.get(account, deployment_id)
        if existing is not None:
            raise _exists(
                name,
                "it is deleted: undelete it, or delete it with hard=true first"
                if existing.deleted
                else "choose another deploymentId",
            )

    def _check_counts(self, record: DeploymentRecord) -> None:
        self.backend.check_replica_count(record.min_replica_count, "minReplicaCount")
        self.backend.check_replica_count(record.max_replica_count, "maxReplicaCount")

    @staticmethod
    def _initial_replicas(record: DeploymentRecord, disable_auto_deploy: bool) -> int:
        if disable_auto_deploy:
            return record.min_replica_count
        return max(record.min_replica_count, min(record.max_replica_count, 1))

    def _spec(self, record: DeploymentRecord) -> ReplicaSpec:
        source, merge_lora = self._model_source(record)
        draft_path = (
            self._draft(record.account, record.draft_model)[1] if record.draft_model else None
        )
        return ReplicaSpec(
            deployment=record.name,
            model=source,
            kv_cache_gb=self.kv_cache_gb,
            max_model_len=record.max_context_length or self.max_model_len,
            merge_lora=merge_lora,
            options=replica_options(self.options, record, draft_path),
        )

    def _model_source(self, record: DeploymentRecord) -> tuple[str | None, str | None]:
        """What a replica loads: the base model's source, and an adapter merged into it."""
        model = self.catalog.get(record.base_model)
        if model is None:
            raise invalid(
                f"The base model {record.base_model} of {record.name} is no longer in the model"
                " registry: add it again with `girandole models add`",
                "baseModel",
            )
        check_ready(model, "baseModel")  # deleted and created again under its name since
        merge_lora = None
        if model.is_adapter:  # a deployment of an adapter: merged into its base at load
            merge_lora, model = model.source, self.catalog.get(model.base_model)
            if model is None:
                raise invalid(
                    f"The base model of {record.base_model} is no longer in the model registry",
                    "baseModel",
                )
        return model.source, merge_lora

    def _on_replica(self, name: str, error: str | None) -> None:
        _, account, _, deployment_id = name.split("/")
        with self._lock:
            record = self.store.get(account, deployment_id)
            if record is None or record.deleted:
                return
            if error is not None:
                self._set_failed(record, error)
            elif record.state in ("CREATING", "UPDATING", "FAILED"):
                record.state, record.status_code, record.status_message = "READY", "OK", ""
                record.update_time = time.time()
                self.store.save(record)
                logger.info("deployment %s ready", name)

    def _set_failed(self, record: DeploymentRecord, message: str) -> None:
        record.state, record.status_code = "FAILED", "INTERNAL"
        record.status_message = f"A replica failed to start: {message}"
        record.update_time = time.time()
        self.store.save(record)

    def _autoscale_loop(self) -> None:
        while not self._stop.wait(AUTOSCALE_PERIOD_S):
            try:
                self.replace_stalled()
                self.backend.keep_up(self._holds.names())
                self.autoscale_once(time.time())
            except Exception:  # noqa: BLE001 - the next period tries again
                logger.exception("autoscaling failed")

    def replace_stalled(self) -> None:
        """Replace the replicas whose engine died or stalled past `engine_stall_seconds` (as Ray
        Serve's health check does): the deployment is UPDATING until the new one is ready, and
        new requests get the 503 DEPLOYMENT_SCALING_UP meanwhile, as during a scale-up."""
        with self._lock:  # held until the state is saved: the new replica's ready comes after
            replaced = self.backend.replace_stalled(self.engine_stall_seconds)
            for name, why in replaced.items():
                logger.warning("deployment %s: replacing its replica: %s", name, why)
                record = self.find(name)
                if record is not None and record.state == "READY":
                    record.state = "UPDATING"
                    record.update_time = time.time()
                    self.store.save(record)

    def autoscale_once(self, now: float) -> None:
        """Scale idle deployments with minReplicaCount 0 to zero after their scaleToZeroWindow
        (a backend that autoscales, Ray Serve, does it itself)."""
        if self.backend.autoscales:
            return
        for record in self.store.list():
            if record.deleted or record.desired_replica_count == 0 or record.min_replica_count:
                continue
            since = self.backend.idle_since(record.name)
            if since is None:
                continue
            if self._active(record.name):
                self.backend.touch(record.name)
                continue
            if now - since >= record.autoscaling_policy.scale_to_zero_window:
                with self._lock:
                    current = self.store.get(record.account, record.deployment_id)
                    if current is None or current.deleted or current.desired_replica_count == 0:
                        continue
                    if self._active(record.name):  # a request came meanwhile
                        continue
                    self._scale(current, 0)
                    current.desired_replica_count = 0
                    current.update_time = time.time()
                    self.store.save(current)
                logger.info(
                    "deployment %s scaled to zero after %.0f s idle", record.name, now - since
                )

    def _active(self, name: str) -> bool:
        """Requests wait for admission, or run or wait on the deployment's engine."""
        return self._holds.held(name) or any(_busy(e) for e in self.backend.engines(name))


def _engine_fields(record: DeploymentRecord) -> tuple:
    """The fields of a deployment that its replicas' engines are built from."""
    return (
        record.max_context_length,
        record.ngram_speculation_length,
        record.draft_model,
        record.draft_token_count,
    )


def _busy(engine: Any) -> bool:
    stats = engine.stats()
    return bool(stats.get("num_running") or stats.get("num_waiting"))


def _exists(name: str, hint: str) -> DeploymentError:
    return DeploymentError(
        409, f"Deployment {name} already exists: {hint}", code="ALREADY_EXISTS", type="error"
    )


__all__ = ["DeploymentManager", "SCALING_UP_MESSAGE", "scaling_up"]
