"""The Ray Serve backend: each deployment is a Ray Serve application of GirandoleReplica replicas,
placed anywhere in the cluster, scaled by Ray Serve's autoscaler from the deployment's policy.

- Placement, health checks, restarts and scaling are Ray Serve's; the routing decision is its
  request router's (ray_router.py: prefix-aware by default). Tokens go from the replica's own port
  to this process (remote_engine.py), never through Ray's proxy (none is started).
- Fireworks' autoscalingPolicy maps onto Serve's AutoscalingConfig one to one: min/max replicas,
  `scaleUpWindow` -> upscale_delay_s, `scaleDownWindow` -> downscale_delay_s,
  `scaleToZeroWindow` -> downscale_to_zero_delay_s, `loadTargets.concurrent_requests` (or
  `default`, a fraction of a replica's batch slots) -> target_ongoing_requests; the rate targets
  (`requests_per_second`, `tokens_generated_per_second`, `prompt_tokens_per_second`) through a
  policy of ours on the replicas' reported rates (ray_policy.py).
- A `:scale N` is carried out at once and held for a window, after which Ray's autoscaler decides
  again: up to N, a floor of N (min_replicas) for `scaleDownWindow`; down to N, a cap of N
  (max_replicas) for `scaleUpWindow`; to 0, the application is deleted.
- Every call into Ray's control plane runs on one thread of its own; a poller reads Serve's
  status each second, so the API's event loop never waits on Ray. Both threads build Serve's
  config models, which pickle our router and policy by value: ray_pickling.py makes that safe.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import os
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from girandole.deploy.backend import Backend, ReplicaListener, ReplicaSpec, ReplicaStats
from girandole.deploy.remote_engine import RemoteEngine, ReplicaLost
from girandole.registry.deployments import Hardware

logger = logging.getLogger("girandole.deploy")

REPLICA_BATCH_SLOTS = 64  # EngineConfig.max_num_seqs: what loadTargets.default is a fraction of
STATUS_PERIOD_S = 1.0
# Serve's replicas and handles push their autoscaling metrics every
# AutoscalingConfig.metrics_interval_s (10 s by default): Ray 2.60 reads neither of the variables
# that field's deprecation note names instead. Where they are set (a test cluster, a soak run),
# the shorter is passed as the field, so Serve decides on the load a second old, not up to 10 s,
# and the look-back, which Serve wants longer than the interval, may be as short.
SERVE_METRICS_INTERVAL_S = 10.0
PUSH_INTERVAL_VARS = (
    "RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S",
    "RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S",
)
SESSION_DRAIN_TIMEOUT_S = 30.0
# Ray starts its workers niced (15) and a replica renices itself to 0 once it runs
# (ray_replica.py): a new replica, started beside busy ones on the same node (a scale-up under
# load), was starved while it imported torch and the engine: 48 s instead of 9 s to start
# initializing on 2 busy cores. A cluster of our own starts workers at 0; a cluster of yours
# does with `RAY_worker_niceness=0 ray start ...` (docs/deployments.md).
LOCAL_CLUSTER_CONFIG = {"worker_niceness": 0}
# The least a request waits for a replica to accept it (RayOptions.acquire_timeout, the server's
# --queue-timeout, may be set lower): Ray's router probes replicas and backs off for up to a second
# or two under load before it places a request.
MIN_ACQUIRE_TIMEOUT_S = 5.0
# How long a replica that Serve stops (a scale down, by `:scale` or by load) waits for its
# requests to end before it is killed (Serve's graceful_shutdown_timeout_s). It was 10 s: a
# `:scale 1` of two replicas under streaming load cut every stream of the replica it stopped
# that ran longer (503 "replica ... stopped"), requests the server had accepted. A replica
# that fails its health check is not waited for (FORCE_STOP_UNHEALTHY below). A delete, a
# restart or the server's stop end the requests at the ingress first, so no wait there.
DRAIN_TIMEOUT_S = 600.0
# Serve stops an unhealthy replica gracefully too: a hung one (a stopped process) would hold
# its resources, and its replacement, for the whole DRAIN_TIMEOUT_S. Read by Serve's controller
# from its environment: set for the local cluster the server starts; a cluster of yours is
# started with it (docs/deployments.md).
FORCE_STOP_UNHEALTHY = {"RAY_SERVE_FORCE_STOP_UNHEALTHY_REPLICAS": "1"}
# A deployment's `keep` call is renewed this often while it has requests waiting for admission
# (the replica ends one after ray_replica.KEEP_S, twice this)
KEEP_RENEW_S = 30.0


@dataclass
class RayOptions:
    address: str | None = None  # None: start a local cluster for the server's lifetime
    router: str = "prefix"  # prefix, round_robin, least_loaded (Ray's power of two choices)
    replica_cpus: float = 1.0  # Ray CPUs each replica reserves
    replicas_per_node: int | None = 1  # None: no limit
    replica_threads: int | None = None  # torch threads of a replica; None: its node's cores
    grammar_compile_timeout: float = 10.0
    engine_stall_seconds: float = 60.0  # a replica's engine stuck this long: Ray replaces it
    max_ongoing_requests: int = 1024  # per replica; the engine queues what it cannot batch
    # seconds a request may wait for a replica to accept it (the server's --queue-timeout), then
    # 503: a replica that hangs (a stopped process) holds new requests no longer (acquirer)
    acquire_timeout: float = 30.0


@dataclass
class ScalingPolicy:
    """The part of a deployment record that becomes Ray Serve's autoscaling config."""

    min_replicas: int = 1
    max_replicas: int = 1
    scale_up_window: float = 30.0
    scale_down_window: float = 600.0
    scale_to_zero_window: float = 3600.0
    load_targets: dict[str, float] = field(default_factory=lambda: {"default": 0.8})

    @classmethod
    def of(cls, record: Any) -> ScalingPolicy:
        policy = record.autoscaling_policy
        return cls(
            min_replicas=record.min_replica_count,
            max_replicas=max(record.max_replica_count, 1),
            scale_up_window=policy.scale_up_window,
            scale_down_window=policy.scale_down_window,
            scale_to_zero_window=policy.scale_to_zero_window,
            load_targets=dict(policy.load_targets),
        )

    def target_ongoing_requests(self) -> float:
        if "concurrent_requests" in self.load_targets:
            return max(float(self.load_targets["concurrent_requests"]), 0.1)
        return max(1.0, float(self.load_targets.get("default", 0.8)) * REPLICA_BATCH_SLOTS)


def metrics_interval() -> float | None:
    """The shorter of PUSH_INTERVAL_VARS that is set to a number above 0; None: Serve's own."""
    values = []
    for name in PUSH_INTERVAL_VARS:
        with contextlib.suppress(KeyError, ValueError):
            values.append(float(os.environ[name]))
    values = [v for v in values if v > 0]
    return min(values) if values else None


def autoscaling_config(
    policy: ScalingPolicy, initial: int, floor: int | None = None, cap: int | None = None
) -> dict[str, Any]:
    """Serve's AutoscalingConfig for `policy`, starting at `initial` replicas, with a manual
    scale's floor or cap while it holds."""
    from girandole.deploy.ray_policy import RATE_TARGETS, FireworksLoadPolicy

    low, high = policy.min_replicas, policy.max_replicas
    if floor is not None:
        low, high = max(low, floor), max(high, floor)
    if cap is not None:
        high = max(1, min(high, cap))
        low = min(low, high)
    config: dict[str, Any] = {
        "min_replicas": low,
        "max_replicas": high,
        "initial_replicas": min(max(initial, low), high),
        "target_ongoing_requests": policy.target_ongoing_requests(),
        "upscale_delay_s": policy.scale_up_window,
        "downscale_delay_s": policy.scale_down_window,
        "downscale_to_zero_delay_s": policy.scale_to_zero_window,
    }
    interval = min(metrics_interval() or SERVE_METRICS_INTERVAL_S, SERVE_METRICS_INTERVAL_S)
    if interval != SERVE_METRICS_INTERVAL_S:
        config["metrics_interval_s"] = interval
    # the windows are the delays; the load is averaged over the scale-up window, within what
    # Serve allows (a second more than its metrics interval: 11 s by default) and its 30 s default
    config["look_back_period_s"] = max(interval + 1.0, min(30.0, policy.scale_up_window))
    rates = {k: v for k, v in policy.load_targets.items() if k in RATE_TARGETS}
    if rates:  # rates per replica too: a policy of ours over the replicas' reported rates
        config["policy"] = {
            "policy_function": f"{FireworksLoadPolicy.__module__}:FireworksLoadPolicy",
            "policy_kwargs": {
                "targets": rates,
                "target_ongoing_requests": config["target_ongoing_requests"],
            },
        }
    return config


def replica_options(
    options: RayOptions,
    policy: ScalingPolicy,
    initial: int,
    floor: int | None = None,
    cap: int | None = None,
) -> dict[str, Any]:
    """The options of a deployment's Serve deployment (`serve.deployment(...).options(**it)`):
    its autoscaling config (autoscaling_config above), router, health checks and drain."""
    from girandole.deploy.ray_router import ROUTERS

    out: dict[str, Any] = {
        "name": "replica",
        "max_ongoing_requests": options.max_ongoing_requests,
        "autoscaling_config": autoscaling_config(policy, initial, floor, cap),
        "ray_actor_options": {"num_cpus": options.replica_cpus},
        "health_check_period_s": 2,
        "health_check_timeout_s": 30,
        "graceful_shutdown_timeout_s": DRAIN_TIMEOUT_S,
    }
    if options.replicas_per_node:
        out["max_replicas_per_node"] = options.replicas_per_node
    router = ROUTERS.get(options.router)
    if router is not None:
        out["request_router_config"] = {
            "request_router_class": f"{router.__module__}:{router.__name__}",
            "request_routing_stats_period_s": 1,
        }
    return out


_ANSI_RE = re.compile(r"\x1b\[[0-9;]*m")
# the line that starts an exception's message in a traceback: `ValueError: ...`,
# `pydantic_core._pydantic_core.ValidationError: 1 validation error for ...`,
# `ray.exceptions.RayTaskError(ValueError): ...`
_EXCEPTION_RE = re.compile(r"[A-Za-z_][\w.]*(\([\w.]*\))?: \S")
_PYDANTIC_URL = "For further information visit"
MAX_ERROR_CHARS = 2000


def _one_line(lines: list[str]) -> str:
    """An error's lines as one (a status message, a 503's message), pydantic's link left out."""
    kept = [line.strip() for line in lines if line.strip() and _PYDANTIC_URL not in line]
    text = " / ".join(kept)
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 3] + "..."


def error_text(exc: BaseException) -> str:
    """`Type: message` on one line, the whole message: a pydantic ValidationError (a config Ray
    Serve refused) says which field, why and the value (its first line alone named none)."""
    return _one_line(f"{type(exc).__name__}: {exc}".splitlines())


def failure_of(message: str) -> str:
    """The error a replica failed to start with, out of Ray Serve's DEPLOY_FAILED message: that
    message holds the replica's whole traceback, twice nested, with terminal colour codes (some
    3,000 characters in `status.message` and in every request's 503); the embedded backend says
    `FileNotFoundError: ...`. The error (the innermost exception's whole message: a
    ValidationError's field and value are on the lines after its first), then how often Ray
    tried (the traceback is logged)."""
    text = _ANSI_RE.sub("", message).strip()
    if "Traceback" not in text:
        return text
    lines = text.splitlines()
    starts = [i for i, line in enumerate(lines) if _EXCEPTION_RE.match(line)]
    error = _one_line(lines[starts[-1] :] if starts else lines[-1:])
    tries = re.match(r"The deployment failed to start (\d+) times in a row", text)
    return f"{error} ({tries.group(1)} tries)" if tries else error


def app_name_of(deployment: str) -> str:
    """Serve's application name of accounts/<a>/deployments/<d>: `girandole--<a>--<d>`, or
    `girandole_<a>_<d>` when an id holds "--" itself (ids may: acme--x/y and acme/x--y were both
    girandole--acme--x--y, one application, so deleting either took the other's replicas away;
    "_" is in no id, and the usual names stay those of the applications already running)."""
    _, account, _, deployment_id = deployment.split("/")
    if "--" in account or "--" in deployment_id:
        return f"girandole_{account}_{deployment_id}"
    return f"girandole--{account}--{deployment_id}"


PACKAGE_ROOT = Path(__file__).resolve().parents[1]


@functools.cache
def code_version(root: Path = PACKAGE_ROOT) -> str:
    """A digest of girandole's own source (the package at `root`), as this process runs it: part
    of the version a deployment's replicas carry, so replicas started by other code are
    replaced, never kept."""
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


@dataclass
class _App:
    spec: ReplicaSpec
    policy: ScalingPolicy
    initial: int
    floor: int | None = None
    cap: int | None = None
    hold_until: float = 0.0
    handle: Any = None
    engine: RemoteEngine | None = None
    stats: ReplicaStats = field(default_factory=ReplicaStats)
    state: str = "deploying"  # deploying, ready, failed
    error: str | None = None
    last_used: float = field(default_factory=time.time)
    generation: int = 0  # bumped by each (re)deploy, so a stale describe is dropped
    target: int | None = None  # replicas Serve keeps or starts (not stopping), once observed
    keeper: Any = None  # the open `keep` call while requests wait for admission (keep_up)
    keeper_since: float = 0.0


def _cancel(call: Any) -> None:
    if call is not None:
        with contextlib.suppress(Exception):  # a replica gone: nothing left to cancel
            call.cancel()


def acquirer(name: str, app: _App, timeout: float):
    """The `acquire` of deployment `name`'s RemoteEngine: a `session` call through its Serve
    handle, whose first item is where to send the request (ray_replica.py).

    Ray's router holds the call until a replica accepts it, with no limit of its own: a replica
    that hangs (a stopped process, a wedged accelerator) stays RUNNING for Ray until its health
    checks give up (about 100 s), and when its stopping never ends no replacement is started.
    New requests waited all that time, forever in the last case. A request waits at most
    `timeout` seconds (the server's --queue-timeout, as in its admission queue; at least
    MIN_ACQUIRE_TIMEOUT_S), then the call is cancelled and the request answered 503 UNAVAILABLE
    (the call of a request whose client left while it waited is cancelled too). The limit holds
    with no replica ready too: the deployment manager sends requests here only while a replica
    is ready (at zero it answers 503 DEPLOYMENT_SCALING_UP at once and wakes the
    deployment), so the only waits for a replica to start are a request that raced a scale to
    zero, or one sent while Ray replaces a lost replica: a clear 503 after `timeout`, while the
    replica keeps starting, rather than an unbounded wait.
    """
    from girandole.deploy.ray_router import RouteKey, prefix_hashes

    async def acquire(prompt: list[int], request_id: str, kwargs: dict) -> RayLease:
        adapter = kwargs.get("adapter")
        # salted as the engine's prefix cache is: an adapter's blocks are its own
        salt = kwargs.get("cache_salt") if adapter is None else (kwargs.get("cache_salt"), adapter)
        key = RouteKey(request_id, prefix_hashes(prompt, salt), adapter)
        session = app.handle.options(stream=True).session.remote(key)
        try:
            async with asyncio.timeout(timeout):
                where = await session.__anext__()
        except BaseException as exc:
            with contextlib.suppress(Exception):  # nobody waits for this call any more
                session.cancel()
            if isinstance(exc, TimeoutError):
                stats = app.stats
                raise ReplicaLost(
                    f"no replica of deployment {name} accepted the request within {timeout:g} s"
                    f" ({stats.ready} ready, {stats.initializing} starting): a replica is hung"
                    " or being replaced; retry the request"
                ) from None
            if not isinstance(exc, Exception):  # the client left (cancelled)
                raise
            # a replica gone between routing and call
            raise ReplicaLost(f"no replica of {name} took the request: {exc}") from None
        app.last_used = time.time()
        return RayLease(session=session, **where)

    return acquire


@dataclass
class RayLease:
    host: str
    port: int
    token: str
    replica_id: str
    session: Any = None

    def release(self) -> None:
        session = self.session
        if session is None:
            return
        self.session = None

        async def drain() -> None:
            # the replica ends the session once the request ends on its port
            try:
                async with asyncio.timeout(SESSION_DRAIN_TIMEOUT_S):
                    async for _ in session:
                        pass
            except BaseException:  # noqa: BLE001 - a replica gone: nothing left to release
                with contextlib.suppress(Exception):
                    session.cancel()

        with contextlib.suppress(RuntimeError):
            asyncio.get_running_loop().create_task(drain())


def keep_sigterm_for_python() -> None:
    """Keep Ray's failure signal handler out of this process (the driver), before `ray.init`.

    Ray's core worker installs absl's failure signal handler in its driver, SIGTERM included: on
    a SIGTERM it prints "*** SIGTERM received ***", arms a 3 s alarm whose handler aborts, and
    passes the signal on to the handler before it (uvicorn's graceful shutdown, Python's). Nothing
    cancels the alarm: 3 s after a SIGTERM the server died of SIGABRT (exit 134) wherever its
    shutdown was (draining, Ray's teardown, before the last usage rows were written). Python's
    handler alone drains and exits 0. The switch is Ray's (RAY_DISABLE_FAILURE_SIGNAL_HANDLER,
    read when the core worker starts), set here for this process only: the replicas and Ray's
    own processes keep the handler; this one loses Ray's C++ stack trace on a crash (SIGSEGV).
    """
    with contextlib.suppress(Exception):  # a Ray without the switch: nothing to turn off
        from ray._private import ray_constants

        ray_constants.RAY_DISABLE_FAILURE_SIGNAL_HANDLER = True


class RayBackend(Backend):
    name = "ray"
    autoscales = True

    def __init__(
        self, hardware: Hardware, options: RayOptions, listener: ReplicaListener | None = None
    ) -> None:
        self.hardware = hardware
        self.options = options
        self.listener = listener
        self._apps: dict[str, _App] = {}
        self._lock = threading.RLock()
        self._control = ThreadPoolExecutor(1, thread_name_prefix="girandole-ray")
        self._started_ray = False
        self._ray_error: str | None = None
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None
        self._tokenizers: dict[str | None, Any] = {}
        self._control.submit(self._connect)

    # -- Ray's control plane (the control thread) -------------------------------------------

    def _connect(self) -> None:
        import ray
        from ray import serve

        from girandole.deploy import ray_pickling

        ray_pickling.install()  # before the first Serve config is built (ray_pickling.py)
        try:
            if not ray.is_initialized():
                keep_sigterm_for_python()
                if self.options.address:
                    ray.init(address=self.options.address, namespace="girandole")
                else:
                    # "local": a new cluster of this server's own. Without an address Ray joins
                    # the cluster of RAY_ADDRESS or the one last started on this machine (another
                    # server's, a test's), and stopping then shut down Serve there: its apps too.
                    for key, value in FORCE_STOP_UNHEALTHY.items():  # inherited by the cluster
                        os.environ.setdefault(key, value)
                    ray.init(
                        address="local",
                        namespace="girandole",
                        include_dashboard=False,
                        _system_config=LOCAL_CLUSTER_CONFIG,
                    )
                    self._started_ray = True
            serve.start(proxy_location="Disabled")
        except Exception as exc:  # noqa: BLE001 - every deployment reports it
            logger.exception("connecting to Ray failed")
            self._ray_error = f"{type(exc).__name__}: {exc}"
            return
        logger.info(
            "Ray Serve ready (%s cluster, %s routing)",
            "local" if self._started_ray else self.options.address,
            self.options.router,
        )
        self._poller = threading.Thread(target=self._poll, name="girandole-ray-status", daemon=True)
        self._poller.start()

    def _deploy(self, name: str, app: _App) -> None:
        from ray import serve

        from girandole.deploy.ray_replica import GirandoleReplica

        if self._ray_error is not None:
            self._failed(name, app, f"Ray is not available: {self._ray_error}")
            return
        options = replica_options(self.options, app.policy, app.initial, app.floor, app.cap)
        config = {
            "spec": app.spec,
            "threads": self.options.replica_threads,
            "stall_s": self.options.engine_stall_seconds,
        }
        # a version of what the replicas run: without one Serve takes each deploy (a :scale, an
        # update of the policy, a hold's end) for new code and replaces every replica, cutting
        # their requests after the grace period; with it, only a new spec or new code (a server
        # restarted after an upgrade, on a cluster that outlives it) restarts them
        described = repr(sorted(config.items())) + code_version()
        version = hashlib.sha256(described.encode()).hexdigest()[:16]
        try:
            deployment = serve.deployment(GirandoleReplica).options(**options)
            target = deployment.options(version=version, _internal=True).bind(config)
            serve._run(target, _blocking=False, name=app_name_of(name), route_prefix=None)
            app.handle = serve.get_deployment_handle("replica", app_name_of(name))
        except Exception as exc:  # noqa: BLE001 - the deployment's status reports it
            logger.exception("deploying %s on Ray Serve failed", name)
            self._failed(name, app, error_text(exc))

    def _delete(self, name: str, engine: RemoteEngine | None) -> None:
        from ray import serve

        if engine is not None:
            engine.shutdown()
        if self._ray_error is None:
            with contextlib.suppress(Exception):
                serve.delete(app_name_of(name), _blocking=False)

    def _poll(self) -> None:
        from ray import serve

        while not self._stop.wait(STATUS_PERIOD_S):
            try:
                status = serve.status()
            except Exception:  # noqa: BLE001 - Ray restarting: try again
                logger.debug("serve.status failed", exc_info=True)
                continue
            with self._lock:
                apps = list(self._apps.items())
            for name, app in apps:
                self._observe(name, app, status.applications.get(app_name_of(name)))
            self._expire_holds(time.time())

    def _observe(self, name: str, app: _App, overview: Any) -> None:
        if overview is None:
            return
        dep = overview.deployments.get("replica")
        states = {
            str(getattr(k, "value", k)): v for k, v in (dep.replica_states if dep else {}).items()
        }
        running = states.get("RUNNING", 0)
        app.target = sum(n for state, n in states.items() if state not in ("STOPPING", "STOPPED"))
        app.stats = ReplicaStats(
            initializing=states.get("STARTING", 0) + states.get("RECOVERING", 0),
            ready=running,
        )
        if dep is not None and str(getattr(dep.status, "value", dep.status)) == "DEPLOY_FAILED":
            if app.state != "failed":
                logger.warning("the replicas of %s failed to start: %s", name, dep.message)
                self._failed(name, app, failure_of(dep.message or "the replicas failed to start"))
            return
        if running and app.engine is None and app.handle is not None:
            self._attach_engine(name, app)

    def _attach_engine(self, name: str, app: _App) -> None:
        generation = app.generation
        try:
            info = app.handle.describe.remote().result(timeout_s=120)
            tokenizer = self._tokenizer(app.spec.model)
        except Exception as exc:  # noqa: BLE001 - the next poll tries again
            logger.warning("describing a replica of %s failed: %s", name, exc)
            return
        engine = RemoteEngine(
            info["model_config"],
            tokenizer,
            info["max_model_len"],
            self._acquirer(name, app),
            self.options.grammar_compile_timeout,
            name=name,
            described=info,
        )
        with self._lock:
            if self._apps.get(name) is not app or app.generation != generation:
                engine.shutdown()
                return
            app.engine, app.state, app.error = engine, "ready", None
            app.last_used = time.time()
        logger.info("deployment %s has a ready replica on Ray Serve", name)
        if self.listener is not None:
            self.listener(name, None)

    def _tokenizer(self, model: str | None) -> Any:
        if model not in self._tokenizers:
            from girandole.model.default import resolve_model_path
            from girandole.tokenizer import load_tokenizer

            self._tokenizers[model] = load_tokenizer(resolve_model_path(model))
        return self._tokenizers[model]

    def _acquirer(self, name: str, app: _App):
        return acquirer(name, app, max(self.options.acquire_timeout, MIN_ACQUIRE_TIMEOUT_S))

    def _failed(self, name: str, app: _App, message: str) -> None:
        app.state, app.error = "failed", message
        if self.listener is not None:
            self.listener(name, message)

    def _expire_holds(self, now: float) -> None:
        """A manual scale's floor or cap ends after its window: Ray's autoscaler decides again."""
        with self._lock:
            expired = [
                (n, a)
                for n, a in self._apps.items()
                if (a.floor is not None or a.cap is not None) and now >= a.hold_until
            ]
            for _, app in expired:
                app.floor = app.cap = None
        for name, app in expired:
            self._control.submit(self._deploy, name, app)

    # -- the Backend interface --------------------------------------------------------------

    def check_replica_count(self, n: int, param: str) -> None:
        return None  # Ray places as many as the cluster holds; the rest wait for resources

    def scale(self, spec: ReplicaSpec, n: int, record: Any = None, *, manual: bool = True) -> None:
        """A `:scale` (manual) holds a floor or cap of n for a window; an update of the record
        (manual False) hands Ray the new range and policy at once, ending any hold."""
        name = spec.deployment
        policy = ScalingPolicy.of(record) if record is not None else ScalingPolicy(n, max(n, 1))
        with self._lock:
            app = self._apps.get(name)
            if n == 0:
                if app is not None:
                    del self._apps[name]
                    _cancel(app.keeper)
                    self._control.submit(self._delete, name, app.engine)
                return
            if app is None or app.spec != spec or app.state == "failed":
                old = app.engine if app is not None else None
                if app is not None:
                    _cancel(app.keeper)
                app = _App(spec, policy, n)
                if old is not None:
                    old.shutdown()
                self._apps[name] = app
            else:
                app.policy = policy
                running = app.stats.ready + app.stats.initializing
                now = time.time()
                app.floor = app.cap = None
                if manual and n > running:
                    app.floor, app.hold_until = n, now + policy.scale_down_window
                elif manual and n < running:
                    app.cap, app.hold_until = n, now + policy.scale_up_window
            app.generation += 1
        self._control.submit(self._deploy, name, app)

    def wake(self, deployment: str) -> None:
        """A request found no replica: a ping through Serve makes its autoscaler start one
        (the request itself was answered 503, as Fireworks answers it)."""
        app = self._apps.get(deployment)
        if app is None or app.handle is None:
            return
        with contextlib.suppress(Exception):
            app.handle.ping.remote()

    def keep_up(self, deployments: set[str]) -> None:
        """Serve's autoscaler counts the requests at replicas and at the ingress's handle, not
        those waiting in the server's admission queue: a deployment whose request waited there
        past its scaleToZeroWindow was scaled to zero under it (the request then waited for a
        cold start, or got a 503 after the acquire timeout). While requests wait for a
        deployment, one `keep` call through its handle stays open: an ongoing request to Serve,
        so no scale to zero (and, at zero, a scale from it). Renewed every KEEP_RENEW_S,
        cancelled once none waits."""
        now = time.monotonic()
        with self._lock:  # as scale() and shutdown() cancel: none is opened for an app gone
            for name, app in self._apps.items():
                if name in deployments and app.handle is not None and app.state != "failed":
                    if app.keeper is None or now - app.keeper_since >= KEEP_RENEW_S:
                        old = app.keeper
                        try:
                            app.keeper, app.keeper_since = app.handle.keep.remote(), now
                        except Exception:  # noqa: BLE001 - Ray restarting: the next second tries
                            logger.debug("keeping %s up failed", name, exc_info=True)
                        if app.keeper is not old:
                            _cancel(old)
                elif app.keeper is not None:
                    old, app.keeper = app.keeper, None
                    _cancel(old)

    def stats(self, deployment: str) -> ReplicaStats:
        app = self._apps.get(deployment)
        if app is None or app.state == "failed":
            return ReplicaStats()
        if app.stats.ready == 0 and app.stats.initializing == 0 and app.engine is None:
            return ReplicaStats(pending_scheduling=1)
        return app.stats

    def desired(self, deployment: str) -> int | None:
        """Serve's autoscaler decides the count between min and max: what it keeps or starts."""
        app = self._apps.get(deployment)
        return None if app is None or app.state == "failed" else app.target

    def engines(self, deployment: str) -> list[Any]:
        app = self._apps.get(deployment)
        if app is None or app.engine is None or app.stats.ready == 0:
            return []
        return [app.engine]

    def all_engines(self, deployment: str) -> list[Any]:
        app = self._apps.get(deployment)
        return [] if app is None or app.engine is None else [app.engine]

    def idle_since(self, deployment: str) -> float | None:
        app = self._apps.get(deployment)
        return app.last_used if app is not None and app.engine is not None else None

    def touch(self, deployment: str) -> None:
        app = self._apps.get(deployment)
        if app is not None:
            app.last_used = time.time()

    def wait_ready(self, deployment: str, timeout: float) -> RemoteEngine:
        """Block until the deployment has a ready replica (the server's own model at start-up)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            app = self._apps.get(deployment)
            if app is None:
                raise RuntimeError(f"{deployment} is not deployed")
            if app.state == "failed":
                raise RuntimeError(app.error or "the replica failed to start")
            if app.engine is not None and app.stats.ready:
                return app.engine
            if self._ray_error is not None:
                raise RuntimeError(f"Ray is not available: {self._ray_error}")
            time.sleep(0.2)
        raise TimeoutError(f"no replica of {deployment} became ready in {timeout:.0f} s")

    def shutdown(self) -> None:
        self._stop.set()
        with self._lock:
            apps, self._apps = list(self._apps.items()), {}
        for _, app in apps:
            _cancel(app.keeper)  # an open `keep` call would hold its replica's stop
            app.keeper = None
            if app.engine is not None:
                app.engine.shutdown()
        self._control.submit(self._stop_ray, [name for name, _ in apps]).result(timeout=120)
        self._control.shutdown(wait=False)

    def _stop_ray(self, names: list[str]) -> None:
        import ray
        from ray import serve

        if self._ray_error is not None or not ray.is_initialized():
            return
        try:
            if self._started_ray:
                serve.shutdown()
                ray.shutdown()
            else:  # a cluster of others: take only our applications away
                for name in names:
                    serve.delete(app_name_of(name))
        except Exception:  # noqa: BLE001 - stopping anyway
            logger.exception("stopping Ray Serve failed")
