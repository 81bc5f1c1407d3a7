"""Deployments on Ray Serve: `girandole serve --ray ADDRESS` against a Ray cluster of two
simulated nodes (ray.cluster_utils.Cluster), with tiny models, the real fireworks-ai and openai
clients and the CLI. The server's own model runs as a Ray replica too; deployments of a second
model scale to two replicas (one per node), route by name and by #deployment, autoscale up
under load and down to zero (503 DEPLOYMENT_SCALING_UP, then ready), survive a replica killed
under load, and send a shared prefix to the replica that has it cached. A LoRA adapter loaded
with the SDK's `client.lora.load` onto the two-replica deployment answers as on the embedded
server, its requests go to the replica that holds it, and unloading drops it from both."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import fireworks
import httpx
import openai
import pytest
from conftest import start_server, stop_server, write_eos_model, write_tiny_llama_for_ops
from prometheus_client.parser import text_string_to_metric_families

from girandole.deploy.ray_backend import app_name_of
from girandole.registry.keystore import Database

ray = pytest.importorskip("ray", reason="the Ray backend needs ray[serve]")
from ray.cluster_utils import Cluster  # noqa: E402

ACCOUNT = "acme"
MODEL = f"accounts/{ACCOUNT}/models/tiny-llama"
PAIR = f"accounts/{ACCOUNT}/deployments/pair"
LONG = {"max_tokens": 4000, "ignore_eos": True, "temperature": 0}

# Serve's autoscaling metrics every half second (the defaults suit minutes-long windows: Ray 2.60
# reads the push interval from AutoscalingConfig.metrics_interval_s, which the server sets from
# these, and the look-back may then be 1.5 s, not 11 s at least); the cluster's workers start
# unniced and its unhealthy replicas are not drained, as docs/deployments.md says to start a
# cluster for girandole
FAST_METRICS = {
    "RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5",
    "RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5",
    "RAY_SERVE_REPLICA_AUTOSCALING_METRIC_RECORD_INTERVAL_S": "0.25",
    "RAY_SERVE_HANDLE_AUTOSCALING_METRIC_RECORD_INTERVAL_S": "0.25",
    "RAY_SERVE_AUTOSCALING_METRIC_RECORD_INTERVAL_FACTOR": "0.05",  # Ray >= 2.5x: of look-back
    "RAY_worker_niceness": "0",
    "RAY_SERVE_FORCE_STOP_UNHEALTHY_REPLICAS": "1",
}


def girandole(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "girandole.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


class RayPlane:
    def __init__(self, tmp: Path) -> None:
        os.environ.update(FAST_METRICS)
        # two nodes of 3 Ray CPUs each: the own model, two deployments of two replicas
        self.cluster = Cluster(
            initialize_head=True,
            connect=False,
            head_node_args={"num_cpus": 3, "include_dashboard": False},
        )
        self.cluster.add_node(num_cpus=3)
        self.data = tmp / "data"
        db = Database.in_folder(self.data)
        self.key, _ = db.create_key(ACCOUNT)
        db.close()
        self.tmp = tmp
        self.tiny = write_tiny_llama_for_ops(tmp / "tiny-llama")
        added = girandole(
            "models", "add", "--data-dir", str(self.data), "--account", ACCOUNT,
            "tiny-llama", str(self.tiny),
        )  # fmt: skip
        assert added.returncode == 0, added.stderr
        eos = write_eos_model(tmp / "eos")
        self.server = start_server(
            tmp, "--ray", self.cluster.address, "--model", str(eos), "--model-id", "tiny-eos",
            "--account", ACCOUNT, "--kv-cache-gb", "0.02", "--data-dir", str(self.data),
            api_key=self.key, timeout=600,
        )  # fmt: skip

    def fw(self) -> fireworks.Fireworks:
        return fireworks.Fireworks(
            api_key=self.key, account_id=ACCOUNT, base_url=self.server.url, max_retries=0
        )

    def oai(self) -> openai.OpenAI:
        return openai.OpenAI(api_key=self.key, base_url=self.server.url + "/v1", max_retries=0)

    def http(self, method: str, path: str, headers: dict | None = None, **kw) -> httpx.Response:
        headers = {"Authorization": f"Bearer {self.key}", **(headers or {})}
        return httpx.request(method, self.server.url + path, headers=headers, timeout=120, **kw)

    def get(self, deployment_id: str):
        return self.fw().deployments.get(deployment_id)

    def wait(self, deployment_id: str, ready: int, timeout: float = 300):
        deadline = time.monotonic() + timeout
        while True:
            d = self.get(deployment_id)
            if d.state == "READY" and d.replica_count == ready:
                return d
            assert d.state != "FAILED", d.status
            assert time.monotonic() < deadline, d
            time.sleep(0.3)

    def complete(self, model: str, prompt: str, **extra):
        return self.http(
            "POST", "/v1/completions", json={"model": model, "prompt": prompt, **extra}
        )

    def close(self) -> None:
        try:
            stop_server(self.server)  # SIGTERM
        finally:
            self.cluster.shutdown()
            for name in FAST_METRICS:
                os.environ.pop(name, None)
        # a server on a cluster of others drains and exits 0 too (not 134: see
        # test_a_local_ray_server_starts_a_cluster_of_its_own_beside_another)
        assert self.server.process.returncode == 0, self.server.log()[-3000:]


@pytest.fixture(scope="module")
def plane(tmp_path_factory):
    p = RayPlane(tmp_path_factory.mktemp("ray"))
    yield p
    p.close()


@pytest.fixture
def pair(plane) -> str:
    """Deployment `pair` of two replicas (one per node), both ready; its name. Made by the first
    test that asks for it and kept for the next ones (a module's worth of starts saved), made
    again after a test deleted it: each test runs alone as well as in the module."""
    fw = plane.fw()
    try:
        if fw.deployments.get("pair").state == "DELETED":
            fw.deployments.undelete("pair", body={})
    except fireworks.NotFoundError:
        fw.deployments.create(
            base_model=MODEL, deployment_id="pair", min_replica_count=2, max_replica_count=2
        )
    plane.wait("pair", 2)
    return PAIR


def replica_pids(app: str) -> list[int]:
    """The processes of an application's replicas (Ray titles them ray::ServeReplica:<app>)."""
    out = subprocess.run(["pgrep", "-f", f"ServeReplica:{app}:"], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def test_own_model_runs_on_a_replica(plane):
    # before any request: the replica's engine as it is (before: `engine` was {} until the own
    # model had served a request, its stats summed over connected replicas only)
    health = plane.http("GET", "/health").json()
    assert health["status"] == "ready" and health["engine"].get("num_running") == 0, health
    out = plane.oai().completions.create(
        model=f"accounts/{ACCOUNT}/models/tiny-eos", prompt="Hello", max_tokens=4, temperature=0
    )
    assert out.choices[0].finish_reason == "stop" and out.usage.prompt_tokens > 0
    assert replica_pids(f"girandole--{ACCOUNT}--tiny-eos")  # not in the server's process
    health = plane.http("GET", "/health").json()
    assert health["status"] == "ready" and "num_running" in health["engine"]


def test_two_replicas_one_per_node_and_routing(plane, pair):
    d = plane.get("pair")
    assert d.replica_stats.ready_replica_count == 2
    pids = replica_pids(f"girandole--{ACCOUNT}--pair")
    assert len(pids) == 2
    # one per node: the two simulated nodes' raylets are their parents' parents, different
    nodes = {_node_of(pid) for pid in pids}
    assert len(nodes) == 2, nodes

    by_model = plane.complete(MODEL, "Once upon", max_tokens=5, temperature=0)
    by_name = plane.complete(f"{MODEL}#{pair}", "Once upon", max_tokens=5, temperature=0)
    by_header = plane.http(
        "POST", "/v1/completions",
        json={"model": MODEL, "prompt": "Once upon", "max_tokens": 5, "temperature": 0},
        headers={"fireworks-deployment": pair},
    )  # fmt: skip
    texts = {r.json()["choices"][0]["text"] for r in (by_model, by_name, by_header)}
    assert [r.status_code for r in (by_model, by_name, by_header)] == [200, 200, 200]
    assert len(texts) == 1  # greedy: every replica answers the same
    listed = {m.id for m in plane.oai().models.list()}
    assert f"{MODEL}#{pair}" in listed

    cli = girandole("deployment", "list", "--base-url", plane.server.url,
                    "--api-key", plane.key, "--account", ACCOUNT)  # fmt: skip
    assert cli.returncode == 0 and "pair" in cli.stdout, cli.stderr

    # Fireworks' account metrics, through the Ray replicas: the three requests of the last
    # minute at least, and the replicas' gauges
    page = plane.http("GET", f"/v1/accounts/{ACCOUNT}/metrics")
    assert page.status_code == 200, page.text
    series = {
        s.name: s.value
        for family in text_string_to_metric_families(page.text)
        for s in family.samples
        if s.labels.get("deployment") == pair and s.labels.get("le", "+Inf") == "+Inf"
    }
    assert series["request_counter_total:sum_by_deployment"] * 60 >= 3, series
    assert series["latency_to_first_token_ms_bucket:sum_by_deployment"] * 60 >= 3, series
    # the replicas' stats reached the page (their forward time once a report follows a step)
    assert 0 <= series["generator_kv_blocks_fraction:avg_by_deployment"] <= 1, series


def _node_of(pid: int) -> int:
    """The raylet a worker hangs under (worker -> raylet)."""
    ppid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    return ppid


def test_prefix_goes_to_the_replica_that_cached_it(plane, pair):
    shared = " ".join(f"w{i}" for i in range(120))
    cached = []
    for suffix in ("alpha", "beta", "gamma", "delta"):
        r = plane.complete(f"{MODEL}#{pair}", f"{shared} {suffix}", max_tokens=2)
        assert r.status_code == 200, r.text
        cached.append(r.json()["usage"]["prompt_tokens_details"]["cached_tokens"])
    assert cached[0] == 0 and all(c >= 64 for c in cached[1:]), cached


def _replica_series(plane, metric: str, deployment: str) -> dict[str, float]:
    """`metric`'s value for each replica of `deployment` on /metrics (replica id -> value)."""
    out = {}
    for line in plane.http("GET", "/metrics").text.splitlines():
        if line.startswith(metric + "{") and f'deployment="{deployment}"' in line:
            replica = line.split('replica="', 1)[1].split('"', 1)[0]
            out[replica] = float(line.rsplit(" ", 1)[1])
    return out


def test_each_replica_counts_the_requests_it_took(plane, pair):
    # how the load spread over the replicas, for an operator (and benchmarks/soak.py's
    # per-replica report): before, /metrics had each replica's load now, not what it served
    assert plane.complete(f"{MODEL}#{pair}", "warm", max_tokens=1).status_code == 200
    metric = "girandole:requests_total"
    deadline = time.monotonic() + 30
    while len(before := _replica_series(plane, metric, pair)) < 2:
        assert plane.complete(f"{MODEL}#{pair}", "more", max_tokens=1).status_code == 200
        assert time.monotonic() < deadline, before
        time.sleep(0.5)
    while True:  # the last request counted: the same totals over more than a report period
        time.sleep(1.5)
        if (again := _replica_series(plane, metric, pair)) == before:
            break
        before = again
    for i in range(4):  # short prompts, no shared prefix: by load, over both replicas
        assert plane.complete(f"{MODEL}#{pair}", f"count {i}", max_tokens=2).status_code == 200
    deadline = time.monotonic() + 30
    while True:  # replicas report every second
        after = _replica_series(plane, metric, pair)
        if sum(after.values()) - sum(before.values()) == 4:
            break
        assert time.monotonic() < deadline, (before, after)
        time.sleep(0.3)
    assert set(after) == set(before) and all(after[r] >= before[r] for r in after)


def _adapter_gauges(plane, deployment: str) -> dict[str, float]:
    """girandole:lora_adapters of each replica of `deployment` (replica id -> adapters held)."""
    text = plane.http("GET", "/metrics").text
    out = {}
    for line in text.splitlines():
        if line.startswith("girandole:lora_adapters{") and f'deployment="{deployment}"' in line:
            replica = line.split('replica="', 1)[1].split('"', 1)[0]
            out[replica] = float(line.rsplit(" ", 1)[1])
    return out


def _wait_gauges(plane, deployment: str, check) -> dict[str, float]:
    deadline = time.monotonic() + 30
    while True:  # replicas report their stats every second
        gauges = _adapter_gauges(plane, deployment)
        if check(gauges):
            return gauges
        assert time.monotonic() < deadline, f"{gauges}\n{_server_warnings(plane)}"
        time.sleep(0.3)


def _server_warnings(plane) -> str:
    """The server log's last warnings and errors (Ray's routing and replica deaths among them),
    for a failing assertion's message."""
    lines = [
        line[:400] for line in plane.server.log().splitlines()
        if "WARNING" in line or "ERROR" in line or '"warning"' in line or "died" in line
    ]  # fmt: skip
    return "\n".join(lines[-25:])


def test_lora_adapter_on_two_replicas(plane, pair):
    import importlib.util

    from transformers import AutoModelForCausalLM

    spec = importlib.util.spec_from_file_location(
        "_girandole_lora_helpers", Path(__file__).parents[1] / "lora" / "lora_helpers.py"
    )
    helpers = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(helpers)
    folder = plane.tmp / "lora-ray"
    hf = AutoModelForCausalLM.from_pretrained(plane.tiny).float().eval()
    helpers.write_peft_adapter(hf, folder, rank=8, alpha=16, seed=3, std=0.3)
    adapter = f"accounts/{ACCOUNT}/models/lora-ray"
    embedded_data = plane.tmp / "embedded-data"
    for data in (plane.data, embedded_data):
        added = girandole("models", "add", "--data-dir", str(data), "--account", ACCOUNT,
                          "lora-ray", str(folder), "--base", MODEL)  # fmt: skip
        assert added.returncode == 0, added.stderr
    # the same adapter and greedy requests on an embedded server of the same model
    embedded = start_server(
        plane.tmp, "--model", str(plane.tiny), "--model-id", "tiny-llama", "--account", ACCOUNT,
        "--kv-cache-gb", "0.02", "--data-dir", str(embedded_data), api_key=None,
    )  # fmt: skip
    prompts = [f"Tell me story number {i}" for i in range(4)]
    greedy = {"max_tokens": 8, "temperature": 0, "ignore_eos": True}
    try:
        loaded = httpx.post(
            embedded.url + f"/v1/accounts/{ACCOUNT}/deployedModels",
            json={"model": adapter, "deployment": f"accounts/{ACCOUNT}/deployments/tiny-llama"},
            timeout=60,
        )
        assert loaded.status_code == 200, loaded.text
        want = []
        for prompt in prompts:
            r = httpx.post(embedded.url + "/v1/completions", timeout=60,
                           json={"model": adapter, "prompt": prompt, **greedy})  # fmt: skip
            assert r.status_code == 200, r.text
            want.append(r.json()["choices"][0]["text"])
    finally:
        stop_server(embedded)

    base_model = f"{MODEL}#{pair}"
    for i in range(4):  # short prompts, no shared prefix: by load, so both replicas are connected
        assert plane.complete(base_model, f"base {i}", max_tokens=2).status_code == 200
    _wait_gauges(plane, pair, lambda g: len(g) == 2)
    fw = plane.fw()
    dm = fw.lora.load(model=adapter, deployment=pair)
    assert dm.state == "DEPLOYED" and dm.default is True
    got = []
    for prompt in prompts:
        r = plane.complete(adapter, prompt, **greedy)
        assert r.status_code == 200, r.text
        got.append(r.json()["choices"][0]["text"])
    assert got == want  # the adapter's output, as the embedded server gives it
    assert plane.complete(base_model, prompts[0], **greedy).json()["choices"][0]["text"] != want[0]
    # every request for it went to the replica that read it at the load: only it holds it
    gauges = _wait_gauges(plane, pair, lambda g: len(g) == 2 and sum(g.values()) >= 1)
    assert sorted(gauges.values()) == [0.0, 1.0], gauges
    ids = [m.id for m in plane.oai().models.list()]
    assert adapter in ids and f"{adapter}#{pair}" in ids

    assert fw.lora.unload(dm.name.rsplit("/", 1)[1]) == {}
    _wait_gauges(plane, pair, lambda g: len(g) == 2 and sum(g.values()) == 0)
    gone = plane.complete(adapter, prompts[0], max_tokens=2)
    assert gone.status_code == 404, gone.text


def test_replica_killed_under_load(plane, pair):
    name = f"{MODEL}#{pair}"
    before = _usage_rows(plane)
    started: list[int] = []  # streams that have their first token

    async def stream(i: int):
        body = {"model": name, "prompt": f"story {i}", "stream": True, "ignore_eos": True,
                "max_tokens": 4000, "temperature": 0}  # fmt: skip
        headers = {"Authorization": f"Bearer {plane.key}"}
        async with httpx.AsyncClient(timeout=120) as http:
            url = plane.server.url + "/v1/completions"
            async with http.stream("POST", url, json=body, headers=headers) as r:
                if r.status_code != 200:
                    return ("error", (await r.aread()).decode())
                n = 0
                async for line in r.aiter_lines():
                    if line.startswith('data: {"error"'):
                        return ("error", line)  # the stream's error event
                    n += line.startswith("data: {")
                    if n == 1:
                        started.append(i)
                return ("done", n)

    gauges: list[float] = []

    async def run():
        tasks = []
        for i in range(6):  # one at a time: each is counted in flight before the next is routed
            tasks.append(asyncio.create_task(stream(i)))
            while len(started) <= i and not tasks[-1].done():
                await asyncio.sleep(0.02)
        await asyncio.sleep(1.5)  # a replica reports its stats each second
        async with httpx.AsyncClient(timeout=30) as http:  # each replica's gauges, under load
            text = (await http.get(plane.server.url + "/metrics")).text
        gauges.extend(
            float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line.startswith("girandole:num_requests_running")
            and f'deployment="{pair}"' in line
        )  # fmt: skip
        # the replica generating the most: the one with streams to cut off, wherever Ray sent them
        # (before: the first pid, which on a loaded host was once the replica with none)
        pids = replica_pids(f"girandole--{ACCOUNT}--pair")
        used = await asyncio.to_thread(_cpu_ticks_over, pids, 0.5)  # the streams read meanwhile
        victim = max(pids, key=used.__getitem__)
        assert not any(t.done() for t in tasks), [t.result() for t in tasks if t.done()]
        os.kill(victim, signal.SIGKILL)
        return await asyncio.gather(*tasks)

    results = asyncio.run(run())
    # one series per replica, the load on them
    assert len(gauges) == 2, f"{gauges}\n{_server_warnings(plane)}"
    assert sum(gauges) >= 1, gauges
    errors = [r for r in results if r[0] == "error"]
    done = [r for r in results if r[0] == "done"]
    assert errors, results  # the killed replica's streams end...
    assert all("replica" in message for _, message in errors), errors
    if min(gauges) > 0:  # ...and, where Ray spread them, the other replica's finish
        assert done, (gauges, results)
    # a new request is served while Ray replaces the replica
    assert plane.complete(name, "after", max_tokens=3).status_code == 200
    d = plane.wait("pair", 2)  # replaced
    assert d.replica_stats.ready_replica_count == 2
    deadline = time.monotonic() + 30  # rows are written after each stream ends
    while _usage_rows(plane) - before < len(results) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _usage_rows(plane) - before >= len(results)  # every request has its usage row


def _cpu_ticks_over(pids: list[int], seconds: float) -> dict[int, int]:
    """CPU ticks (user + system) each process used over the next `seconds`."""

    def ticks(pid: int) -> int:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return 0
        return int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)

    first = {pid: ticks(pid) for pid in pids}
    time.sleep(seconds)
    return {pid: ticks(pid) - first[pid] for pid in pids}


def _usage_rows(plane) -> int:
    db = Database.in_folder(plane.data)
    try:
        return db.count_usage()
    finally:
        db.close()


def test_autoscale_up_under_load_and_down_to_zero(plane):
    fw = plane.fw()
    fw.deployments.create(
        base_model=MODEL, deployment_id="elastic", min_replica_count=0, max_replica_count=2,
        autoscaling_policy={"scale_up_window": "1s", "scale_down_window": "2s",
                            "scale_to_zero_window": "4s",
                            "load_targets": {"concurrent_requests": 1}},
    )  # fmt: skip
    plane.wait("elastic", 1)
    name = f"{MODEL}#accounts/{ACCOUNT}/deployments/elastic"
    client = openai.AsyncOpenAI(api_key=plane.key, base_url=plane.server.url + "/v1",
                                max_retries=0)  # fmt: skip

    errors: list[str] = []

    async def load():
        async def one(i):
            while True:  # busy until the replicas are counted, whatever one request answers
                try:
                    await client.completions.create(
                        model=name, prompt=f"load {i}", max_tokens=3000,
                        extra_body={"ignore_eos": True},
                    )  # fmt: skip
                except openai.APIError as e:
                    errors.append(repr(e))
                    await asyncio.sleep(0.5)

        tasks = [asyncio.create_task(one(i)) for i in range(6)]
        peak, seen = 0, None
        # a second replica starts a Ray worker and loads the model beside the busy first one:
        # seconds when idle, much longer on a loaded 2-CPU machine
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and peak < 2:
            await asyncio.sleep(0.5)
            seen = await asyncio.to_thread(plane.get, "elastic")
            peak = max(peak, seen.replica_count or 0)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return peak, seen

    peak, seen = asyncio.run(load())
    assert peak == 2, (seen, errors[-5:], plane.server.log()[-3000:])  # scaled up under load
    # desiredReplicaCount is the autoscaler's (before: the stored 1, whatever Ray ran)
    assert seen.desired_replica_count == 2, seen
    assert plane.wait("elastic", 0, timeout=120).desired_replica_count == 0  # idle: to zero
    r = plane.complete(name, "wake up", max_tokens=2)
    assert r.status_code == 503, r.text
    assert r.json()["error"]["code"] == "DEPLOYMENT_SCALING_UP"
    deadline = time.monotonic() + 120
    while True:  # the 503 started a replica: retries get through
        time.sleep(1)
        r = plane.complete(name, "wake up", max_tokens=2)
        if r.status_code == 200:
            break
        assert r.status_code == 503 and time.monotonic() < deadline, r.text
    fw.deployments.delete("elastic")


def test_a_request_waiting_for_admission_keeps_its_deployment_up(plane):
    # before: Ray's autoscaler saw only the requests at replicas, and took a deployment whose
    # request waited in the ingress's admission queue (every slot taken) for idle: past its
    # scaleToZeroWindow the request found it at zero and waited for a cold start
    fw = plane.fw()
    fw.deployments.create(
        base_model=MODEL, deployment_id="queued", min_replica_count=0, max_replica_count=1,
        autoscaling_policy={"scale_up_window": "1s", "scale_down_window": "1s",
                            "scale_to_zero_window": "8s"},
    )  # fmt: skip
    plane.wait("queued", 1)
    # Serve takes an idle new replica to zero some 2 s + the window after it is ready, its load
    # pushed each half second (FAST_METRICS) and averaged over the 1.5 s look-back (measured
    # here: 10 s with an 8 s window; 28 s when metrics came every 10 s over 11 s at least): the
    # request comes well before that, and is watched till well past it
    time.sleep(2)
    assert plane.get("queued").replica_count == 1
    url = plane.server.url + "/v1/completions"
    # every admission slot, held while its own replica is stopped (SIGSTOP): it waits for one
    hog = {"model": f"accounts/{ACCOUNT}/models/tiny-eos", "prompt": "hog", "n": 64,
           "max_tokens": 2}  # fmt: skip
    queued = {"model": f"{MODEL}#accounts/{ACCOUNT}/deployments/queued", "prompt": "queued",
              "max_tokens": 2}  # fmt: skip
    own = replica_pids(f"girandole--{ACCOUNT}--tiny-eos")

    async def run():
        headers = {"Authorization": f"Bearer {plane.key}"}
        async with httpx.AsyncClient(timeout=120, headers=headers) as http:
            for pid in own:
                os.kill(pid, signal.SIGSTOP)
            try:
                hogging = asyncio.create_task(http.post(url, json=hog))
                await asyncio.sleep(1)
                waiting = asyncio.create_task(http.post(url, json=queued))
                counts, start = [], time.monotonic()
                while time.monotonic() - start < 16:  # till past when Serve scaled it to 0
                    await asyncio.sleep(0.5)
                    counts.append((await asyncio.to_thread(plane.get, "queued")).replica_count)
                assert not waiting.done(), ("the request was let in early", counts)
            finally:
                for pid in own:
                    os.kill(pid, signal.SIGCONT)
            assert (await hogging).status_code == 200
            return counts, await waiting  # the hog's slots are free

    counts, answer = asyncio.run(run())
    assert answer.status_code == 200, answer.text
    assert min(counts) == 1, counts  # never at zero while the request waited
    fw.deployments.delete("queued")


def test_manual_scale(plane):
    fw = plane.fw()
    fw.deployments.create(  # a rate target: our own policy on Ray's controller
        base_model=MODEL, deployment_id="manual", max_replica_count=2,
        autoscaling_policy={"load_targets": {"tokens_generated_per_second": 100000}},
        ngram_speculation_length=4,  # the replica's engine speculates (the server does not)
    )  # fmt: skip
    plane.wait("manual", 1)
    first = replica_pids(app_name_of(f"accounts/{ACCOUNT}/deployments/manual"))
    name = f"{MODEL}#accounts/{ACCOUNT}/deployments/manual"
    # the tiny model repeats itself after this prompt: the n-gram lookup proposes
    r = plane.complete(name, "The quick brown fox jumps over the lazy dog. The quick brown fox",
                       max_tokens=16, ignore_eos=True, temperature=0,
                       perf_metrics_in_response=True)  # fmt: skip
    assert r.status_code == 200 and "speculation-acceptance" in r.json()["perf_metrics"], r.text
    assert fw.deployments.scale("manual", replica_count=2) == {}
    assert plane.wait("manual", 2).desired_replica_count == 2
    # the replica that ran goes on running: before, each deploy was a new version to Serve,
    # which replaced every replica (their streams cut after its 10 s grace period)
    assert len(first) == 1
    for _ in range(10):  # Serve stopped the outdated one once the new ones were ready
        after = replica_pids(app_name_of(f"accounts/{ACCOUNT}/deployments/manual"))
        assert first[0] in after, (first, after)
        time.sleep(0.5)
    fw.deployments.scale("manual", replica_count=1)
    plane.wait("manual", 1)
    fw.deployments.delete("manual")


def test_an_update_of_the_range_or_policy_reaches_ray(plane):
    # before: an update reached Ray only when it changed desiredReplicaCount; a lowered
    # minReplicaCount with a short scaleToZeroWindow was stored and shown, and the replica ran on
    # (Ray kept the old min_replicas) for as long as the deployment lived
    fw = plane.fw()
    fw.deployments.create(base_model=MODEL, deployment_id="relax", min_replica_count=1)
    plane.wait("relax", 1)
    updated = fw.deployments.update(
        "relax", base_model=MODEL, min_replica_count=0,
        autoscaling_policy={"scale_up_window": "1s", "scale_down_window": "1s",
                            "scale_to_zero_window": "2s"},
    )  # fmt: skip
    assert updated.min_replica_count == 0
    # idle: Ray takes it to zero, as the new policy says (its load averaged over the scale-up
    # window, 1.5 s at least here: a few seconds after the update, not 30 s with the default)
    plane.wait("relax", 0, timeout=90)
    fw.deployments.delete("relax")


def test_ids_with_double_hyphens_are_applications_of_their_own(plane):
    # before: acme--x/y and acme/x--y were both Ray Serve's application girandole--acme--x--y: the
    # second create took over the first's replica, and deleting either left the other READY
    # with no replica, answering 503 DEPLOYMENT_SCALING_UP to every request
    db = Database.in_folder(plane.data)
    try:
        key, _ = db.create_key("acme--x")
    finally:
        db.close()
    added = girandole(
        "models", "add", "--data-dir", str(plane.data), "--account", "acme--x",
        "tiny-llama", str(plane.tiny),
    )  # fmt: skip
    assert added.returncode == 0, added.stderr
    other = fireworks.Fireworks(
        api_key=key, account_id="acme--x", base_url=plane.server.url, max_retries=0
    )
    other.deployments.create(base_model="accounts/acme--x/models/tiny-llama", deployment_id="y")
    fw = plane.fw()
    fw.deployments.create(base_model=MODEL, deployment_id="x--y")
    plane.wait("x--y", 1)
    deadline = time.monotonic() + 300
    while other.deployments.get("y").replica_count != 1:
        assert time.monotonic() < deadline
        time.sleep(0.5)
    fw.deployments.delete("x--y")
    deadline = time.monotonic() + 60
    while replica_pids(app_name_of(f"accounts/{ACCOUNT}/deployments/x--y")):
        assert time.monotonic() < deadline  # the deleted one's replica stops
        time.sleep(0.5)
    time.sleep(2)  # Serve's status read again: the other's replica runs on
    assert other.deployments.get("y").replica_count == 1
    r = httpx.post(
        plane.server.url + "/v1/completions",
        json={"model": "accounts/acme--x/models/tiny-llama", "prompt": "hi", "max_tokens": 2},
        headers={"Authorization": f"Bearer {key}"},
        timeout=120,
    )
    assert r.status_code == 200, r.text
    other.deployments.delete("y")


def test_a_replica_that_cannot_start_names_its_error(plane, tmp_path):
    # before: status.message (and every request's 503) was Ray Serve's whole DEPLOY_FAILED text,
    # the replica's traceback nested twice with terminal colour codes (about 3,000 characters);
    # now the error itself, as the embedded backend reports it
    broken = tmp_path / "no-tokenizer"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "llama"}')
    added = girandole(
        "models", "add", "--data-dir", str(plane.data), "--account", ACCOUNT,
        "no-tokenizer", str(broken),
    )  # fmt: skip
    assert added.returncode == 0, added.stderr
    fw = plane.fw()
    fw.deployments.create(base_model=f"accounts/{ACCOUNT}/models/no-tokenizer",
                          deployment_id="broken")  # fmt: skip
    deadline = time.monotonic() + 120
    while (d := plane.get("broken")).state != "FAILED":
        assert time.monotonic() < deadline, d
        time.sleep(0.5)
    message = d.status.message
    assert message.startswith("A replica failed to start: FileNotFoundError: no tokenizer.json")
    assert "Traceback" not in message and "\x1b" not in message and len(message) < 300, message
    r = plane.complete(f"accounts/{ACCOUNT}/models/no-tokenizer", "hi", max_tokens=2)
    assert r.status_code == 503 and "FileNotFoundError" in r.json()["error"]["message"], r.text
    fw.deployments.delete("broken")


def test_a_local_ray_server_starts_a_cluster_of_its_own_beside_another(plane, tmp_path):
    # before: `--ray` without an address joined the cluster last started on this machine (the
    # plane's), put its applications there, and on stopping shut Ray Serve down there: every
    # deployment of the plane's server lost its replicas
    eos = write_eos_model(tmp_path / "eos")
    data = tmp_path / "lone-data"
    other = start_server(
        tmp_path, "--ray", "--model", str(eos), "--model-id", "lone", "--account", "solo",
        "--kv-cache-gb", "0.01", "--data-dir", str(data), api_key=None, timeout=600,
    )  # fmt: skip
    try:
        r = httpx.post(
            other.url + "/v1/completions",
            json={"model": "accounts/solo/models/lone", "prompt": "hi", "max_tokens": 1},
            timeout=60,
        )
        assert r.status_code == 200, r.text
        # the local cluster starts its workers unniced (a replica starting beside busy ones was
        # starved): both clusters' Serve controllers run at 0 (the plane's as its env says)
        out = subprocess.run(["pgrep", "-f", "ServeController"], capture_output=True, text=True)
        controllers = [int(p) for p in out.stdout.split()]
        assert len(controllers) == 2, out
        assert [os.getpriority(os.PRIO_PROCESS, p) for p in controllers] == [0, 0]
    finally:
        # SIGTERM: before, Ray's failure signal handler in the server (its driver) armed a 3 s
        # alarm that aborted it (exit 134) in the middle of its shutdown, before it wrote the
        # last usage rows; now it drains, stops its cluster, writes them and exits 0
        start = time.monotonic()
        stop_server(other)
    assert other.process.returncode == 0, other.log()[-3000:]
    assert time.monotonic() - start < 30
    assert "SIGTERM received" not in other.log()
    db = Database.in_folder(data)
    try:
        assert db.count_usage() == 1  # the request just before the SIGTERM
    finally:
        db.close()
    # the plane's own model (a replica on its cluster) still answers
    r = plane.complete(f"accounts/{ACCOUNT}/models/tiny-eos", "still here", max_tokens=2)
    assert r.status_code == 200, r.text


def test_delete_takes_the_replicas_away(plane, pair):
    # streams running when the deployment is deleted end with the embedded backend's 503, which
    # says why; before: "replica ... stopped (the ingress closed the connection): ... retry it
    # (another replica serves it)", while a retry got 404
    client = openai.OpenAI(api_key=plane.key, base_url=plane.server.url + "/v1", max_retries=0)
    stream = client.completions.create(
        model=f"{MODEL}#{pair}", prompt="a long story", stream=True,
        max_tokens=4000, temperature=0, extra_body={"ignore_eos": True},
    )  # fmt: skip
    next(iter(stream))
    plane.fw().deployments.delete("pair")
    with pytest.raises(openai.APIError) as info:
        for _ in stream:
            pass
    assert "its deployment was deleted" in str(info.value), info.value
    deadline = time.monotonic() + 60
    while replica_pids(f"girandole--{ACCOUNT}--pair"):
        assert time.monotonic() < deadline
        time.sleep(0.5)


async def _long_stream(plane, model: str, prompt: str) -> tuple[str, object]:
    """("done", seconds) for a stream that ended in [DONE], else ("error", what it said)."""
    body = {"model": model, "prompt": prompt, "stream": True, "ignore_eos": True,
            "max_tokens": 1500, "temperature": 0}  # fmt: skip
    headers = {"Authorization": f"Bearer {plane.key}"}
    start = time.monotonic()
    async with httpx.AsyncClient(timeout=300) as http:
        url = plane.server.url + "/v1/completions"
        async with http.stream("POST", url, json=body, headers=headers) as r:
            if r.status_code != 200:
                return ("error", (await r.aread()).decode())
            async for line in r.aiter_lines():
                if line.startswith('data: {"error"'):
                    return ("error", line)
                if line == "data: [DONE]":
                    return ("done", round(time.monotonic() - start, 1))
    return ("error", "no [DONE]")


def test_a_scale_down_lets_the_streams_of_the_replica_it_stops_finish(plane):
    # before: Serve killed the replica it stopped 10 s after the scale (its graceful shutdown
    # timeout), and its longer streams, accepted requests, ended with a 503 "replica ...
    # stopped" (6 streams of 4000 tokens: 3 cut)
    fw = plane.fw()
    fw.deployments.create(base_model=MODEL, deployment_id="drain", max_replica_count=2)
    plane.wait("drain", 1)
    fw.deployments.scale("drain", replica_count=2)
    plane.wait("drain", 2)
    name = f"{MODEL}#accounts/{ACCOUNT}/deployments/drain"

    async def run():
        tasks = [asyncio.create_task(_long_stream(plane, name, f"tale {i}")) for i in range(4)]
        await asyncio.sleep(3)
        await asyncio.to_thread(fw.deployments.scale, "drain", replica_count=1)
        return await asyncio.gather(*tasks)

    results = asyncio.run(run())
    assert all(r[0] == "done" for r in results), results
    fw.deployments.delete("drain")
