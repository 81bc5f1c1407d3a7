"""The Ray Serve part of benchmarks/soak.py (`--ray-replicas N`): a deployment of the model on
the server's local Ray cluster, the names requests reach it by, and the checks that hold per
replica afterwards (idle, KV blocks back to zero, RSS flat) and once the server stopped (no Ray
process of its cluster left).

The server starts with `--ray` (a local cluster of its own) and the model is added to its
catalog as `accounts/fireworks/models/soak-model`; the deployment `soak` of it runs N replicas
(or, with `--ray-autoscale`, between 1 and 2 by load, so that replicas start and stop under the
soak). Requests name it in each of Fireworks' forms: the model alone (its default deployment),
`<model>#accounts/fireworks/deployments/soak`, `<model>#fireworks/soak`, and the model with the
`fireworks-deployment` header.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil

ACCOUNT = "fireworks"
MODEL = f"accounts/{ACCOUNT}/models/soak-model"
DEPLOYMENT_ID = "soak"
DEPLOYMENT = f"accounts/{ACCOUNT}/deployments/{DEPLOYMENT_ID}"
APP = f"girandole--{ACCOUNT}--{DEPLOYMENT_ID}"  # its Ray Serve application (ray_backend.py)
# the names of Ray's own processes (a replica or Serve's controller are ray::* workers)
RAY_PROCESS_NAMES = ("raylet", "gcs_server", "ray::", "default_worker", "log_monitor",
                     "dashboard", "monitor.py", "runtime_env_agent")  # fmt: skip
# Serve's autoscaling metrics every half second (the defaults suit minutes-long windows), as
# tests/api/test_ray_deployments.py sets them
FAST_METRICS = {
    "RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5",
    "RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5",
    "RAY_SERVE_REPLICA_AUTOSCALING_METRIC_RECORD_INTERVAL_S": "0.25",
    "RAY_SERVE_HANDLE_AUTOSCALING_METRIC_RECORD_INTERVAL_S": "0.25",
    "RAY_SERVE_AUTOSCALING_METRIC_RECORD_INTERVAL_FACTOR": "0.05",
}


def server_flags(args) -> list[str]:
    """`girandole serve` flags for a local cluster that holds the own model's replica and the
    deployment's N (or 2) on this machine: no per-node limit, a fraction of a Ray CPU each."""
    replicas = 2 if args.ray_autoscale else args.ray_replicas
    cpus = max(psutil.cpu_count() or 1, 1) / (replicas + 2)
    return ["--ray", "--ray-replicas-per-node", "0", "--ray-replica-cpus", f"{cpus:.2f}"]


def add_model(root: Path, data_dir: Path, model: str | None) -> None:
    """The soak's model in the server's catalog, for the deployment to name."""
    if model is None:
        from girandole.model.default import default_model_path

        model = str(default_model_path())
    subprocess.run(
        [sys.executable, "-m", "girandole.cli", "models", "add", "--data-dir", str(data_dir),
         "--account", ACCOUNT, "soak-model", model],
        capture_output=True, text=True, check=True, cwd=root,
    )  # fmt: skip


def create_deployment(url: str, key: str, args) -> None:
    body: dict = {"baseModel": MODEL}
    if args.ray_autoscale:
        body |= {
            "minReplicaCount": 1, "maxReplicaCount": 2,
            "autoscalingPolicy": {"scaleUpWindow": "2s", "scaleDownWindow": "10s",
                                  "loadTargets": {"concurrent_requests": 4}},
        }  # fmt: skip
    else:
        body |= {"minReplicaCount": args.ray_replicas, "maxReplicaCount": args.ray_replicas}
    r = httpx.post(
        f"{url}/v1/accounts/{ACCOUNT}/deployments",
        params={"deploymentId": DEPLOYMENT_ID},
        json=body,
        headers={"Authorization": f"Bearer {key}"},
        timeout=60,
    )
    if r.status_code != 200:
        raise SystemExit(f"creating the deployment: {r.status_code} {r.text}")


def deployment(url: str, key: str) -> dict:
    r = httpx.get(f"{url}/v1/{DEPLOYMENT}", headers={"Authorization": f"Bearer {key}"}, timeout=30)
    r.raise_for_status()
    return r.json()


def wait_replicas(url: str, key: str, ready: int, timeout: float = 900) -> dict:
    """Wait until the deployment is READY with `ready` replicas (or at least one replica per
    replica it should have, when autoscaling)."""
    deadline = time.monotonic() + timeout
    while True:
        d = deployment(url, key)
        if d["state"] == "FAILED":
            raise SystemExit(f"the deployment failed: {d.get('status')}")
        if d["state"] == "READY" and d.get("replicaCount") == ready:
            return d
        if time.monotonic() > deadline:
            raise SystemExit(f"the deployment did not get {ready} replicas: {json.dumps(d)}")
        time.sleep(1)


def target(rng: random.Random) -> tuple[str, dict[str, str]]:
    """A model name (and headers) that reaches the deployment, in one of Fireworks' forms."""
    form = rng.randrange(4)
    if form == 0:
        return MODEL, {}  # its default deployment: the only one of the model
    if form == 1:
        return f"{MODEL}#{DEPLOYMENT}", {}
    if form == 2:
        return f"{MODEL}#{ACCOUNT}/{DEPLOYMENT_ID}", {}
    return MODEL, {"fireworks-deployment": DEPLOYMENT}


def replica_series(metrics: str) -> dict[str, dict[str, float]]:
    """The deployment's per-replica series on /metrics: replica id -> {metric: value}."""
    out: dict[str, dict[str, float]] = {}
    for line in metrics.splitlines():
        if not line.startswith("girandole:") or f'deployment="{DEPLOYMENT}"' not in line:
            continue
        name = line.split("{", 1)[0].removeprefix("girandole:")
        replica = line.split('replica="', 1)[1].split('"', 1)[0]
        out.setdefault(replica, {})[name] = float(line.rsplit(" ", 1)[1])
    return out


def wait_replicas_idle(url: str, expect: int | None, timeout: float = 120):
    """Wait until every replica of the deployment (`expect` of them, if given) runs and queues
    nothing and holds no KV block; (whether it got there, the series per replica)."""
    deadline = time.monotonic() + timeout
    while True:
        series = replica_series(httpx.get(url + "/metrics", timeout=30).text)
        idle = all(
            s.get("num_requests_running", 1) == 0
            and s.get("num_requests_waiting", 1) == 0
            and s.get("kv_cache_usage_perc", 1) == 0
            for s in series.values()
        )
        if series and idle and (expect is None or len(series) == expect):
            return True, series
        if time.monotonic() > deadline:
            return False, series
        time.sleep(0.5)


def replica_processes() -> list[psutil.Process]:
    """The deployment's replica processes (Ray titles them ray::ServeReplica:<app>:...)."""
    out = subprocess.run(["pgrep", "-f", f"ServeReplica:{APP}:"], capture_output=True, text=True)
    procs = []
    for pid in out.stdout.split():
        try:
            procs.append(psutil.Process(int(pid)))
        except psutil.NoSuchProcess:
            pass
    return procs


def replica_rss() -> dict[int, int]:
    """pid -> RSS of each replica process running now."""
    rss = {}
    for proc in replica_processes():
        try:
            rss[proc.pid] = proc.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return rss


@dataclass
class RayProcess:
    pid: int
    created: float
    cmdline: str


def ray_processes(server: psutil.Process) -> list[RayProcess]:
    """Every process of the server's Ray cluster: its descendants (the cluster it started:
    gcs_server, raylet and the workers under it, the dashboard's and monitors)."""
    out = []
    for proc in server.children(recursive=True):
        try:
            out.append(RayProcess(proc.pid, proc.create_time(), " ".join(proc.cmdline())[:160]))
        except psutil.NoSuchProcess:
            pass
    return out


def kinds(procs: list[RayProcess]) -> dict[str, int]:
    """How many of each of Ray's processes `procs` holds (raylet, gcs_server, ray::...): the
    check that nothing survives means something only if the cluster's daemons were seen."""
    out: dict[str, int] = {}
    for p in procs:
        name = next((n for n in RAY_PROCESS_NAMES if n in p.cmdline), "other")
        out[name] = out.get(name, 0) + 1
    return out


def survivors(procs: list[RayProcess], wait: float = 30) -> list[RayProcess]:
    """The processes of `procs` still running (the same pid and start time) after up to `wait`
    seconds: Ray's daemons exit on their own once the server shut its cluster down."""
    deadline = time.monotonic() + wait
    while True:
        alive = []
        for p in procs:
            try:
                proc = psutil.Process(p.pid)
                if proc.create_time() == p.created and proc.status() != psutil.STATUS_ZOMBIE:
                    alive.append(p)
            except psutil.NoSuchProcess:
                pass
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.5)


def ps_ray_lines(pids: set[int]) -> list[str]:
    """`ps`'s lines of the Ray processes among `pids` (the check the brief of this soak asks:
    no raylet, gcs_server or worker of the server's cluster left)."""
    out = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True).stdout
    lines = []
    for line in out.splitlines():
        pid, _, cmd = line.strip().partition(" ")
        if pid.isdigit() and int(pid) in pids and any(n in cmd for n in RAY_PROCESS_NAMES):
            lines.append(line.strip()[:160])
    return lines
