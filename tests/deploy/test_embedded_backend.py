"""The deployment manager over the embedded backend, in-process, with real engines of real tiny
checkpoints: two models side by side, each deployment's engine generating; scale from zero
(Fireworks' 503 DEPLOYMENT_SCALING_UP, then a replica); scale to zero after the window; the
memory budget; a replica that cannot start."""

from __future__ import annotations

import asyncio
import importlib.util
import linecache
import sys
import threading
import time
from pathlib import Path

import pytest

from girandole import SamplingParams
from girandole.deploy.backend import EngineOptions, ReplicaSpec
from girandole.deploy.embedded import EmbeddedBackend, replica_bytes
from girandole.deploy.manager import SCALING_UP_MESSAGE, DeploymentManager
from girandole.registry.deployments import DeploymentError, DeploymentStore, Hardware
from girandole.registry.keystore import Database
from girandole.registry.models import ModelCatalog

CPU = Hardware(None, 0, "CPU only")
KV_GB = 0.01


def _write_tiny_llama(folder: Path, seed: int) -> Path:
    spec = importlib.util.spec_from_file_location(
        "_girandole_root_conftest", Path(__file__).resolve().parents[1] / "conftest.py"
    )
    helpers = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, helpers)
    spec.loader.exec_module(helpers)
    return helpers.write_tiny_llama(folder, seed=seed)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("deploy-models")
    return {"a": _write_tiny_llama(tmp / "a", 0), "b": _write_tiny_llama(tmp / "b", 1)}


def make_manager(
    models: dict[str, Path], budget: int = 1 << 40, options: EngineOptions | None = None
) -> DeploymentManager:
    db = Database(None)
    catalog = ModelCatalog(db, [])
    for key, path in models.items():
        catalog.add(f"accounts/t/models/{key}", str(path))
    backend = EmbeddedBackend(CPU, budget)
    extra = {"options": options} if options is not None else {}
    return DeploymentManager(DeploymentStore(db), catalog, backend, kv_cache_gb=KV_GB, **extra)


def wait_ready(manager: DeploymentManager, deployment_id: str, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        d = manager.get("t", deployment_id)
        if d["state"] == "READY" and d["replicaCount"] == d["desiredReplicaCount"]:
            return d
        assert d["state"] != "FAILED", d["status"]
        assert time.monotonic() < deadline, d
        time.sleep(0.05)


def generate(engine, text: str, n: int) -> list[int]:
    async def run() -> list[int]:
        prompt = engine.tokenizer.encode(text)
        params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
        tokens: list[int] = []
        async for out in engine.generate(prompt, params):
            tokens += out.new_token_ids
        return tokens

    return asyncio.run(run())


def test_two_models_side_by_side(models):
    manager = make_manager(models)
    try:
        for key in "ab":
            created = manager.create("t", {"baseModel": f"accounts/t/models/{key}"}, f"dep-{key}")
            assert created["state"] == "CREATING"
            assert created["replicaStats"]["initializingReplicaCount"] == 1
        a, b = (wait_ready(manager, f"dep-{k}") for k in "ab")
        assert a["replicaStats"]["readyReplicaCount"] == b["replicaStats"]["readyReplicaCount"] == 1
        engine_a = manager.engine_for("accounts/t/deployments/dep-a")
        engine_b = manager.engine_for("accounts/t/deployments/dep-b")
        assert engine_a is not engine_b
        assert Path(engine_a.engine.model_path) == models["a"]
        assert Path(engine_b.engine.model_path) == models["b"]
        out_a = generate(engine_a, "Once upon a time", 8)
        out_b = generate(engine_b, "Once upon a time", 8)
        assert len(out_a) == len(out_b) == 8
        assert out_a != out_b  # two different random checkpoints
    finally:
        manager.shutdown()


def test_the_servers_engine_flags_reach_every_deployment(models):
    """`girandole serve --target-itl-ms/--ngram-speculation-length/--max-loras ...` hold for the
    engines of deployments too, not only for the server's own model."""
    settings = type(
        "Settings",
        (),
        dict(
            target_itl_ms=0,
            ngram_speculation_length=3,
            draft_model=None,
            draft_token_count=5,
            max_loras=2,
            max_num_seqs=5,
            enforce_eager=True,
            int8_prompts=True,
            grammar_compile_timeout=4.0,
        ),
    )()
    options = EngineOptions.from_settings(settings)
    assert options.target_itl_ms is None  # 0: the step budget off
    manager = make_manager(models, options=options)
    try:
        manager.create("t", {"baseModel": "accounts/t/models/a"}, "flags")
        wait_ready(manager, "flags")
        engine = manager.engine_for("accounts/t/deployments/flags")
        config = engine.engine.config
        assert config.target_itl_ms is None
        assert config.ngram_speculation_length == 3
        assert config.draft_token_count == 5
        assert config.max_loras == 2
        assert config.max_num_seqs == 5 and config.enforce_eager
        assert config.int8_prompts and engine.engine.runner.int8_prompts
        assert engine.grammar_pool.timeout == 4.0
        assert config.kv_cache_gb == KV_GB
        # a deployment's own speculation fields (deploy/speculation.py): draftTokenCount alone
        # keeps the server's n-gram lookup; ngramSpeculationLength 0 turns it off; a draftModel
        # takes none of the server's speculation (its count defaults to 4, not the server's 5)
        bodies = {
            "count": ({"draftTokenCount": 2}, (3, None, 2)),
            "off": ({"ngramSpeculationLength": 0}, (0, None, 4)),
            "draft": ({"draftModel": "a"}, (0, str(models["a"]), 4)),
        }
        for deployment_id, (body, _) in bodies.items():
            manager.create("t", {"baseModel": "accounts/t/models/b", **body}, deployment_id)
        for deployment_id, (_, expected) in bodies.items():
            wait_ready(manager, deployment_id)
            engine = manager.engine_for(f"accounts/t/deployments/{deployment_id}")
            config = engine.engine.config
            got = (config.ngram_speculation_length, config.draft_model, config.draft_token_count)
            assert got == expected, deployment_id
        assert manager.get("t", "draft")["draftModel"] == "accounts/t/models/a"
    finally:
        manager.shutdown()


def test_scale_from_zero_answers_503_then_serves(models):
    manager = make_manager(models)
    name = "accounts/t/deployments/z"
    try:
        manager.create("t", {"baseModel": "accounts/t/models/a"}, "z")
        wait_ready(manager, "z")
        manager.scale("t", "z", 0)
        assert manager.get("t", "z")["replicaCount"] == 0
        with pytest.raises(DeploymentError) as info:
            manager.engine_for(name)
        error = info.value
        assert (error.status, error.code, error.type) == (503, "DEPLOYMENT_SCALING_UP", "error")
        assert error.message == SCALING_UP_MESSAGE
        assert manager.get("t", "z")["desiredReplicaCount"] == 1  # the request started one
        ready = wait_ready(manager, "z")
        assert ready["replicaCount"] == 1
        assert len(generate(manager.engine_for(name), "Hello", 4)) == 4
    finally:
        manager.shutdown()


def test_scale_to_zero_after_the_window(models):
    manager = make_manager(models)
    try:
        policy = {"scaleToZeroWindow": "30s"}
        manager.create(
            "t", {"baseModel": "accounts/t/models/a", "autoscalingPolicy": policy}, "idle"
        )
        manager.create(
            "t",
            {"baseModel": "accounts/t/models/b", "minReplicaCount": 1, "autoscalingPolicy": policy},
            "kept",
        )
        wait_ready(manager, "idle")
        wait_ready(manager, "kept")
        manager.autoscale_once(time.time() + 10)  # within the window: nothing changes
        assert manager.get("t", "idle")["replicaCount"] == 1
        with manager.hold("accounts/t/deployments/idle"):  # a request waits for admission
            manager.autoscale_once(time.time() + 31)
            assert manager.get("t", "idle")["replicaCount"] == 1
        manager.autoscale_once(time.time() + 10)  # the hold's end started the clock over
        assert manager.get("t", "idle")["replicaCount"] == 1
        manager.autoscale_once(time.time() + 31)
        idle = manager.get("t", "idle")
        assert idle["desiredReplicaCount"] == 0 and idle["replicaCount"] == 0
        kept = manager.get("t", "kept")  # minReplicaCount 1 keeps its replica
        assert kept["desiredReplicaCount"] == 1 and kept["replicaCount"] == 1
    finally:
        manager.shutdown()


def test_memory_budget(models):
    one = replica_bytes(ReplicaSpec("", str(models["a"]), KV_GB, None))
    manager = make_manager(models, budget=one + one // 2)
    try:
        manager.create("t", {"baseModel": "accounts/t/models/a"}, "first")
        with pytest.raises(DeploymentError) as info:
            manager.create("t", {"baseModel": "accounts/t/models/b"}, "second")
        assert info.value.status == 400 and info.value.code == "RESOURCE_EXHAUSTED"
        assert "accounts/t/deployments/first" in info.value.message
        with pytest.raises(DeploymentError):
            manager.get("t", "second")  # nothing was created
        manager.create(
            "t", {"baseModel": "accounts/t/models/b"}, "second", disable_auto_deploy=True
        )
        wait_ready(manager, "first")
        manager.scale("t", "first", 0)  # frees its share of the budget
        manager.scale("t", "second", 1)
        assert wait_ready(manager, "second")["replicaCount"] == 1
    finally:
        manager.shutdown()


def test_a_replica_that_cannot_start(models, tmp_path):
    (tmp_path / "empty").mkdir()
    manager = make_manager({**models, "broken": tmp_path / "empty"})
    try:
        manager.create("t", {"baseModel": "accounts/t/models/broken"}, "broken")
        deadline = time.monotonic() + 30
        while (d := manager.get("t", "broken"))["state"] != "FAILED":
            assert time.monotonic() < deadline, d
            time.sleep(0.05)
        assert d["status"]["code"] == "INTERNAL"
        assert "failed to start" in d["status"]["message"] and d["replicaCount"] == 0
        with pytest.raises(DeploymentError) as info:
            manager.engine_for("accounts/t/deployments/broken")
        assert info.value.status == 503 and "failed" in info.value.message
    finally:
        manager.shutdown()


def test_update_restarts_on_a_new_context_length(models):
    manager = make_manager(models)
    name = "accounts/t/deployments/ctx"
    try:
        manager.create("t", {"baseModel": "accounts/t/models/a", "maxContextLength": 128}, "ctx")
        wait_ready(manager, "ctx")
        assert manager.engine_for(name).max_model_len == 128
        updated = manager.update("t", "ctx", {"maxContextLength": 64, "description": "shorter"})
        assert updated["state"] == "UPDATING"
        assert wait_ready(manager, "ctx")["maxContextLength"] == 64
        assert manager.engine_for(name).max_model_len == 64
        same = manager.update("t", "ctx", {"description": "no restart"})
        assert same["state"] == "READY" and same["replicaCount"] == 1
    finally:
        manager.shutdown()


def test_a_removed_base_model(models):
    manager = make_manager(models)
    try:
        manager.create(
            "t", {"baseModel": "accounts/t/models/b"}, "orphan", disable_auto_deploy=True
        )
        assert manager.catalog.remove("accounts/t/models/b")
        with pytest.raises(DeploymentError) as info:
            manager.scale("t", "orphan", 1)
        assert info.value.status == 400 and "no longer in the model registry" in info.value.message
        manager.delete("t", "orphan")  # stopping and deleting need no model
        assert manager.get("t", "orphan")["state"] == "DELETED"
    finally:
        manager.shutdown()


def _wait_for_the_lock(thread: threading.Thread, function: str, timeout: float = 30) -> None:
    """Until `thread` waits on the manager's lock in `function` (its frame's line takes it)."""
    deadline = time.monotonic() + timeout
    while True:
        frame = sys._current_frames().get(thread.ident)
        if frame is not None and frame.f_code.co_name == function:
            line = linecache.getline(frame.f_code.co_filename, frame.f_lineno)
            if "with self._lock" in line:
                return
        assert thread.is_alive() and time.monotonic() < deadline, "it never reached the lock"
        time.sleep(0.01)


def test_a_request_racing_a_delete_does_not_bring_the_deployment_back(models):
    """A request for a deployment at zero read its record, then waited for the manager's lock
    while another thread deleted the deployment; it then saved its stale record with a replica
    started: the deleted deployment was READY again, its replica running. Now it is a 404 and
    the deployment stays deleted."""
    manager = make_manager(models)
    name = "accounts/t/deployments/racing"
    outcome: list[object] = []

    def request() -> None:
        try:
            outcome.append(manager.engine_for(name))
        except DeploymentError as exc:
            outcome.append(exc)

    try:
        manager.create("t", {"baseModel": "accounts/t/models/a"}, "racing")
        wait_ready(manager, "racing")
        manager.scale("t", "racing", 0)
        with manager._lock:  # the request reads the record, then waits here
            thread = threading.Thread(target=request)
            thread.start()
            _wait_for_the_lock(thread, "engine_for")
            manager.delete("t", "racing")
        thread.join(30)
        (error,) = outcome
        assert isinstance(error, DeploymentError) and error.status == 404, error
        gone = manager.get("t", "racing")
        assert gone["state"] == "DELETED" and gone["desiredReplicaCount"] == 0
        assert gone["replicaStats"]["initializingReplicaCount"] == 0
        assert gone["replicaCount"] == 0
    finally:
        manager.shutdown()


def test_a_deployment_scaled_to_zero_before_its_replica_is_ready_is_ready(models):
    """Scaled to zero while its replica still loaded (after a create, or a restart for a new
    context length), or given maxReplicaCount 0, a deployment stayed CREATING or UPDATING at
    zero replicas until a replica next started: a client waiting for READY waited for ever.
    At zero it is READY, as a deployment created at zero is."""
    manager = make_manager(models)
    try:
        manager.create("t", {"baseModel": "accounts/t/models/a"}, "created")
        manager.scale("t", "created", 0)
        manager.create("t", {"baseModel": "accounts/t/models/a"}, "capped")
        manager.update("t", "capped", {"maxReplicaCount": 0})
        manager.create("t", {"baseModel": "accounts/t/models/a", "maxContextLength": 128}, "ctx")
        wait_ready(manager, "ctx")
        assert manager.update("t", "ctx", {"maxContextLength": 64})["state"] == "UPDATING"
        manager.scale("t", "ctx", 0)
        for deployment_id in ("created", "capped", "ctx"):
            d = manager.get("t", deployment_id)
            assert (d["state"], d["desiredReplicaCount"]) == ("READY", 0), (deployment_id, d)
        manager.scale("t", "ctx", 1)  # and back: READY once its replica is
        assert wait_ready(manager, "ctx")["maxContextLength"] == 64
    finally:
        manager.shutdown()


def test_a_replica_whose_engine_dies_is_replaced(models):
    """A replica's engine loop ended (its thread stopped: seconds_stalled() is inf) and the
    deployment stayed READY with one replica while every request to it failed: nothing checked
    on the embedded backend. The manager's tick replaces it, as Ray Serve's health check does;
    meanwhile requests get the 503 of a scale-up and the deployment is UPDATING."""
    manager = make_manager(models)
    name = "accounts/t/deployments/dies"
    try:
        manager.start()  # the autoscaler's tick, every second
        manager.create("t", {"baseModel": "accounts/t/models/a"}, "dies")
        wait_ready(manager, "dies")
        dead = manager.engine_for(name)
        dead.shutdown()
        assert dead.seconds_stalled() == float("inf")
        states = set()
        deadline = time.monotonic() + 60
        while True:
            states.add(manager.get("t", "dies")["state"])
            try:
                engine = manager.engine_for(name)
            except DeploymentError as exc:
                assert (exc.status, exc.code) == (503, "DEPLOYMENT_SCALING_UP"), exc.message
                engine = None
            if engine is not None and engine is not dead:
                break
            assert time.monotonic() < deadline, manager.get("t", "dies")
            time.sleep(0.05)
        assert states <= {"READY", "UPDATING"}, states
        assert len(generate(engine, "Hello", 4)) == 4
        assert wait_ready(manager, "dies")["replicaCount"] == 1
        assert manager.backend.engines(name) == [engine]  # the dead one is gone
    finally:
        manager.shutdown()
