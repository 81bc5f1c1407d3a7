"""The deployed-models manager remembers, per replica engine, the folder of each adapter it
holds (to read an adapter again when the registry points its name at another folder). That
memory goes with the replica: a deployment scaled to zero and back, in-process over the embedded
backend with real engines, leaves no entry of its stopped engine, and its new replica reads the
adapter on the first request for it."""

from __future__ import annotations

import asyncio
import gc
import time

from girandole.api.serving.adapter import AdapterEngine
from girandole.deploy.embedded import EmbeddedBackend
from girandole.deploy.lora import DeployedModelManager
from girandole.deploy.manager import DeploymentManager
from girandole.registry.deployed_models import DeployedModelStore
from girandole.registry.deployments import DeploymentStore, Hardware
from girandole.registry.keystore import Database
from girandole.registry.models import ModelCatalog
from girandole.sampling.params import SamplingParams

BASE, ADAPTER = "accounts/t/models/base", "accounts/t/models/a1"
DEPLOYMENT = "accounts/t/deployments/d"


def _ready_engine(manager: DeploymentManager):
    deadline = time.monotonic() + 60
    while True:
        d = manager.get("t", "d")
        if d["state"] == "READY" and d["replicaCount"] == 1:
            return manager.backend.engines(DEPLOYMENT)[0]
        assert d["state"] != "FAILED" and time.monotonic() < deadline, d
        time.sleep(0.05)


def _generate(engine, lora: DeployedModelManager) -> list[int]:
    async def run() -> list[int]:
        params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
        tokens: list[int] = []
        prompt = engine.tokenizer.encode("Once upon a time")
        async for out in AdapterEngine(engine, ADAPTER, lora, DEPLOYMENT).generate(prompt, params):
            tokens += out.new_token_ids
        return tokens

    return asyncio.run(run())


def test_a_stopped_replicas_adapters_are_forgotten(tiny_llama_dir, llama_adapters):
    db = Database(None)
    catalog = ModelCatalog(db, [])
    catalog.add(BASE, str(tiny_llama_dir))
    catalog.add(ADAPTER, str(llama_adapters["a1"]), base=BASE)
    backend = EmbeddedBackend(Hardware(None, 0, "CPU only"), 1 << 40)
    manager = DeploymentManager(DeploymentStore(db), catalog, backend, kv_cache_gb=0.01)
    lora = DeployedModelManager(
        DeployedModelStore(db), manager, own_deployment="accounts/t/deployments/own",
        own_model="accounts/t/models/own", own_engine=lambda: None,
    )  # fmt: skip
    try:
        manager.create("t", {"baseModel": BASE}, "d")
        engine = _ready_engine(manager)
        loaded = asyncio.run(lora.load("t", {"model": ADAPTER, "deployment": DEPLOYMENT}))
        assert loaded["state"] == "DEPLOYED"
        want = _generate(engine, lora)
        assert engine.lora_names() == [ADAPTER] and len(lora._sources) == 1

        manager.scale("t", "d", 0)
        del engine
        # the stopped engine's entry goes with it, once the thread that stops it
        # (EmbeddedBackend._stop) has let it go
        deadline = time.monotonic() + 30
        gc.collect()
        while lora._sources and time.monotonic() < deadline:
            time.sleep(0.05)
            gc.collect()
        assert len(lora._sources) == 0

        manager.scale("t", "d", 1)
        engine = _ready_engine(manager)
        assert engine.lora_names() == []
        assert _generate(engine, lora) == want  # read again on the first request for it
        assert engine.lora_names() == [ADAPTER] and len(lora._sources) == 1
    finally:
        manager.shutdown()
