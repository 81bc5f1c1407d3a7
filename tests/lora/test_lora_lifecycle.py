"""Adapters changing while requests use them, on a real engine of the tiny Llama with real PEFT
adapters: the registry naming another folder for an adapter while a replica still reads the
old one."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from girandole.deploy.embedded import EmbeddedBackend
from girandole.deploy.lora import DeployedModelManager
from girandole.deploy.manager import DeploymentManager
from girandole.engine.async_engine import AsyncEngine, EngineConfig
from girandole.engine.protocol import AdapterNotLoadedError
from girandole.registry.deployed_models import DeployedModelStore
from girandole.registry.deployments import DeploymentError, DeploymentStore, Hardware
from girandole.registry.keystore import Database
from girandole.registry.models import ModelCatalog
from girandole.sampling.params import SamplingParams

BASE = "accounts/t/models/base"
OWN = "accounts/t/deployments/own"
ADAPTER = "accounts/t/models/x"
GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module")
def engine(tiny_llama_dir):
    engine = AsyncEngine(EngineConfig(model=str(tiny_llama_dir), kv_cache_gb=0.01))
    yield engine
    engine.shutdown()


def lora_manager(
    engine: AsyncEngine | None, catalog: ModelCatalog, db: Database
) -> DeployedModelManager:
    """The server's DeployedModelManager over `engine` as its own deployment's replica."""
    deployments = DeploymentManager(
        DeploymentStore(db),
        catalog,
        EmbeddedBackend(Hardware(None, 0, "CPU"), 1 << 40),
        kv_cache_gb=0.01,
    )
    return DeployedModelManager(DeployedModelStore(db), deployments, OWN, BASE, lambda: engine)


def adapter_manager(
    engine: AsyncEngine | None, tiny_llama_dir: Path, llama_adapters: dict[str, Path]
) -> DeployedModelManager:
    """`lora_manager` over a catalog of the tiny base model and ADAPTER (folder a1)."""
    db = Database(None)
    catalog = ModelCatalog(db, [])
    catalog.add(BASE, str(tiny_llama_dir))
    catalog.add(ADAPTER, str(llama_adapters["a1"]), base=BASE)
    return lora_manager(engine, catalog, db)


async def tokens(engine: AsyncEngine, adapter: str) -> list[int]:
    prompt = engine.tokenizer.encode("Once upon a time")
    out: list[int] = []
    async for piece in engine.generate(prompt, GREEDY, adapter=adapter):
        out += piece.new_token_ids
    return out


def test_a_name_added_again_while_its_old_folder_is_read_runs_the_new_weights(
    engine, tiny_llama_dir, llama_adapters
):
    """A request for adapter x starts reading x's folder (a1) on the replica; meanwhile x is
    removed from the registry and added again from a2, and a request for x comes. The second
    load joined the first (keyed by name only): the replica registered a1 under x while the
    manager recorded a2, so every later request for x ran a1's weights, silently. Now the
    second waits for the first and reads a2."""
    lora = adapter_manager(engine, tiny_llama_dir, llama_adapters)

    async def run() -> tuple[list[int], list[int], list[int]]:
        first = asyncio.create_task(lora.ensure_loaded(engine, ADAPTER))
        await asyncio.sleep(0)  # its read of a1 is under way on a thread
        lora.catalog.remove(ADAPTER)
        lora.catalog.add(ADAPTER, str(llama_adapters["a2"]), base=BASE)
        await asyncio.gather(first, lora.ensure_loaded(engine, ADAPTER))
        await lora.ensure_loaded(engine, ADAPTER)  # the next request's check
        await engine.load_lora("ref-a1", str(llama_adapters["a1"]))
        await engine.load_lora("ref-a2", str(llama_adapters["a2"]))
        return (
            await tokens(engine, ADAPTER),
            await tokens(engine, "ref-a1"),
            await tokens(engine, "ref-a2"),
        )

    try:
        got, a1, a2 = asyncio.run(asyncio.wait_for(run(), 120))
        assert a1 != a2  # the two adapters answer differently
        assert got == a2
        held = Path(engine.engine.loras.get(ADAPTER).path)
        assert held.resolve() == llama_adapters["a2"].resolve()
    finally:
        for name in (ADAPTER, "ref-a1", "ref-a2"):
            engine.unload_lora(name)


def test_a_deployment_deleted_while_an_adapter_loads_onto_it_keeps_no_record(
    tiny_llama_dir, llama_adapters
):
    """POST deployedModels reads the adapter on the deployment's replica; a hard delete of the
    deployment meanwhile removed its DeployedModels, and then the load stored its record: an
    orphan that a new deployment of the same id ran without anyone loading it there (the
    mistake hard deletes remove DeployedModels to avoid). The load now ends in a 404."""
    lora = adapter_manager(None, tiny_llama_dir, llama_adapters)
    deployments = lora.deployments
    deployments.create("t", {"baseModel": BASE}, "side")
    side = "accounts/t/deployments/side"

    async def run() -> None:
        while not deployments.backend.engines(side):  # its replica loads on a thread
            await asyncio.sleep(0.05)
        load = asyncio.create_task(lora.load("t", {"model": ADAPTER, "deployment": side}))
        await asyncio.sleep(0)  # its read of the adapter is under way on the replica
        deployments.delete("t", "side", hard=True)
        with pytest.raises(DeploymentError) as info:
            await load
        assert info.value.status == 404, info.value.message

    try:
        asyncio.run(asyncio.wait_for(run(), 120))
        assert lora.store.list("t") == []
        # a new deployment of that id (no replica: one loading at exit aborts the process)
        deployments.create("t", {"baseModel": BASE}, "side", disable_auto_deploy=True)
        assert lora.find(ADAPTER, side, "t") is None
    finally:
        deployments.shutdown()


def test_an_adapter_loaded_at_zero_is_deployed(tiny_llama_dir, llama_adapters):
    """Before: loaded on a deployment with no replica, the DeployedModel stayed DEPLOYING until
    a request for the adapter itself (the deployment up and READY for its base model meanwhile),
    while one loaded before a scale to zero stays DEPLOYED through it. It is the adapter
    registered on the deployment: DEPLOYED whatever the replica count, each replica reading it
    on its first request for it (as one started after the load always did)."""
    lora = adapter_manager(None, tiny_llama_dir, llama_adapters)
    deployments = lora.deployments
    side = "accounts/t/deployments/side"
    deployments.create("t", {"baseModel": BASE}, "side", disable_auto_deploy=True)

    async def run() -> None:
        loaded = await lora.load("t", {"model": ADAPTER, "deployment": side})
        assert loaded["state"] == "DEPLOYED"
        deployments.scale("t", "side", 1)
        while not deployments.backend.engines(side):  # its replica loads on a thread
            await asyncio.sleep(0.05)
        assert lora.get("t", loaded["name"].rsplit("/", 1)[1])["state"] == "DEPLOYED"
        engine = deployments.backend.engines(side)[0]
        await lora.ensure_loaded(engine, ADAPTER)  # what its first request does
        assert len(await tokens(engine, ADAPTER)) == GREEDY.max_tokens

    try:
        asyncio.run(asyncio.wait_for(run(), 120))
    finally:
        deployments.shutdown()


def test_an_adapter_unloaded_while_a_replica_reads_it_is_not_left_there(
    tiny_llama_dir, llama_adapters
):
    """A replica started after the adapter's load reads it on the first request for it; an
    unload meanwhile found nothing to drop there, and the read then registered the adapter on
    the replica for good (its weights held, counted in /metrics, for a DeployedModel that no
    longer exists). Now the replica drops it once read, and the request that was on its way
    gets the 404 of any request after the unload."""
    lora = adapter_manager(None, tiny_llama_dir, llama_adapters)
    deployments = lora.deployments
    side = "accounts/t/deployments/side"
    deployments.create("t", {"baseModel": BASE}, "side", disable_auto_deploy=True)

    async def run() -> None:
        loaded = await lora.load("t", {"model": ADAPTER, "deployment": side})
        assert loaded["state"] == "DEPLOYED"  # no replica yet: each reads it on first use
        deployments.scale("t", "side", 1)
        while not deployments.backend.engines(side):  # its replica loads on a thread
            await asyncio.sleep(0.05)
        engine = deployments.backend.engines(side)[0]
        request = asyncio.create_task(lora.ensure_loaded(engine, ADAPTER))
        await asyncio.sleep(0)  # the replica reads the adapter for the request
        lora.unload("t", loaded["name"].rsplit("/", 1)[1])
        await request
        assert ADAPTER not in engine.lora_names()
        with pytest.raises(AdapterNotLoadedError):
            await tokens(engine, ADAPTER)

    try:
        asyncio.run(asyncio.wait_for(run(), 120))
        assert lora.store.list("t") == []
    finally:
        deployments.shutdown()


def test_a_request_that_found_its_adapter_before_an_unload_does_not_load_it_again(
    engine, tiny_llama_dir, llama_adapters
):
    """A request resolves its adapter's DeployedModel, then waits (for admission, say) while
    the adapter is unloaded. It then loaded the adapter onto the replica again, ran it (200 on
    a server with --max-concurrent-requests 1, the request queued behind a stream) and left it
    registered there for good. Now it is the 404 of any request after the unload."""
    from girandole.api.serving.adapter import AdapterEngine

    lora = adapter_manager(engine, tiny_llama_dir, llama_adapters)

    async def run() -> None:
        loaded = await lora.load("t", {"model": ADAPTER, "deployment": OWN})
        assert loaded["state"] == "DEPLOYED" and ADAPTER in engine.lora_names()
        waiting = AdapterEngine(engine, ADAPTER, lora, OWN)  # the request found it
        lora.unload("t", loaded["name"].rsplit("/", 1)[1])
        prompt = engine.tokenizer.encode("Once upon a time")
        with pytest.raises(AdapterNotLoadedError):
            async for _ in waiting.generate(prompt, GREEDY):
                pass
        assert ADAPTER not in engine.lora_names()

    try:
        asyncio.run(asyncio.wait_for(run(), 120))
    finally:
        engine.unload_lora(ADAPTER)


def test_a_request_whose_deployment_is_deleted_while_it_waits_is_told_so(
    tiny_llama_dir, llama_adapters
):
    """The same wait, but the adapter's deployment is deleted: the stopped engine's 503 (send
    the request again), as for a request of the deployment's base model, not a 404."""
    from girandole.api.serving.adapter import AdapterEngine
    from girandole.engine.async_engine import EngineStoppedError

    lora = adapter_manager(None, tiny_llama_dir, llama_adapters)
    deployments = lora.deployments
    side = "accounts/t/deployments/side"
    deployments.create("t", {"baseModel": BASE}, "side")

    async def run() -> None:
        while not deployments.backend.engines(side):  # its replica loads on a thread
            await asyncio.sleep(0.05)
        engine = deployments.backend.engines(side)[0]
        await lora.load("t", {"model": ADAPTER, "deployment": side})
        waiting = AdapterEngine(engine, ADAPTER, lora, side)  # the request found it
        deployments.delete("t", "side")
        prompt = engine.tokenizer.encode("Once upon a time")
        params = SamplingParams(temperature=0, max_tokens=5000, ignore_eos=True)
        with pytest.raises(EngineStoppedError):
            async for _ in waiting.generate(prompt, params):
                pass

    try:
        asyncio.run(asyncio.wait_for(run(), 120))
    finally:
        deployments.shutdown()


def test_an_adapter_whose_default_is_unloaded_while_it_loads_elsewhere_keeps_a_default(
    engine, tiny_llama_dir, llama_adapters
):
    """x is loaded on a deployment (its default DeployedModel) and being loaded on the server's
    own one, which read whether x was loaded anywhere before its replica read the adapter. The
    default was unloaded meanwhile (no other record to make the default then), and the new
    record was stored as not the default: x's only DeployedModel had default false. The first
    DeployedModel of a model is its default (docs/lora.md)."""
    lora = adapter_manager(engine, tiny_llama_dir, llama_adapters)
    deployments = lora.deployments
    deployments.create("t", {"baseModel": BASE}, "side", disable_auto_deploy=True)

    async def run() -> dict:
        first = await lora.load("t", {"model": ADAPTER, "deployment": "side"})
        assert first["default"]
        engine.unload_lora(ADAPTER)  # the own replica reads it for the second load
        second = asyncio.create_task(lora.load("t", {"model": ADAPTER, "deployment": OWN}))
        await asyncio.sleep(0)  # its replica reads the adapter
        lora.unload("t", first["name"].rsplit("/", 1)[1])
        return await second

    try:
        second = asyncio.run(asyncio.wait_for(run(), 120))
        assert second["default"], second
        assert [r.default for r in lora.store.list("t")] == [True]
    finally:
        engine.unload_lora(ADAPTER)
        deployments.shutdown()


def test_a_deployed_model_whose_deployment_no_longer_exists_says_so(
    engine, tiny_llama_dir, llama_adapters
):
    """An adapter loaded on the server's own deployment, and the server started again under
    another name (--model-id): its DeployedModel served nothing (404s) but was shown DEPLOYED
    with status OK. It is shown with status NOT_FOUND naming the deployment, and can be
    unloaded."""
    lora = adapter_manager(engine, tiny_llama_dir, llama_adapters)
    try:
        loaded = asyncio.run(lora.load("t", {"model": ADAPTER, "deployment": OWN}))
        assert loaded["status"]["code"] == "OK"
        renamed = DeployedModelManager(
            lora.store, lora.deployments, "accounts/t/deployments/renamed", BASE, lambda: engine
        )
        deployed_id = loaded["name"].rsplit("/", 1)[1]
        shown = renamed.get("t", deployed_id)
        assert shown["status"]["code"] == "NOT_FOUND", shown["status"]
        assert OWN in shown["status"]["message"]
        assert renamed.list("t")["deployedModels"] == [shown]
        assert renamed.find(ADAPTER, None, "t") is None  # it serves nothing
        renamed.unload("t", deployed_id)
        assert renamed.list("t")["deployedModels"] == []
    finally:
        engine.unload_lora(ADAPTER)
        lora.deployments.shutdown()


def test_a_load_beside_a_deleted_default_answers_the_default_it_is(
    engine, tiny_llama_dir, llama_adapters
):
    """The stored default of an adapter on a soft-deleted deployment: a load of the adapter
    elsewhere answered `default: false`, though the adapter's bare name runs there (as get
    and list say)."""
    lora = adapter_manager(engine, tiny_llama_dir, llama_adapters)
    deployments = lora.deployments
    try:
        deployments.create("t", {"baseModel": BASE}, "side", disable_auto_deploy=True)
        side = "accounts/t/deployments/side"
        on_side = asyncio.run(lora.load("t", {"model": ADAPTER, "deployment": side}))
        assert on_side["default"] and on_side["state"] == "DEPLOYED"
        deployments.delete("t", "side")
        on_own = asyncio.run(lora.load("t", {"model": ADAPTER, "deployment": OWN}))
        assert lora.find(ADAPTER, None, "t").name == on_own["name"]
        assert on_own["default"] is True
        assert on_own == lora.get("t", on_own["name"].rsplit("/", 1)[1])
    finally:
        engine.unload_lora(ADAPTER)
        deployments.shutdown()
