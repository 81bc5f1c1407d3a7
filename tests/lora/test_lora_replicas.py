"""Adapters on a deployment of several replicas, without Ray: two ReplicaServers around real
engines and a RemoteEngine leasing them (the Ray backend's token path). Loading checks the
adapter on one replica; a replica that does not hold it reads it on the first request for it and
answers what the engine answers locally; unloading drops it from every replica; an adapter that
does not fit is a ValueError; an adapter reloaded from another folder is read again."""

from __future__ import annotations

import asyncio
import json
import shutil
from dataclasses import dataclass

import pytest

from girandole.deploy.remote_engine import RemoteEngine
from girandole.deploy.replica_server import ReplicaServer
from girandole.engine.async_engine import AsyncEngine, EngineConfig
from girandole.sampling.params import SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
PROMPT = "Once upon a time"


@dataclass
class Lease:
    host: str
    port: int
    token: str
    replica_id: str

    def release(self) -> None:
        pass


class Replicas:
    """Two replicas; `route` says which one the next lease goes to (the router's decision)."""

    def __init__(self, model_dir) -> None:
        config = EngineConfig(
            model=str(model_dir), mode="reference", device="cpu", block_size=4, kv_cache_gb=0.01
        )
        self.engines = [AsyncEngine(config), AsyncEngine(config)]
        self.servers = [ReplicaServer(e).start() for e in self.engines]
        self.route = 0
        self.routed: list[tuple[int, str | None]] = []  # (replica, adapter) of each lease

    def remote(self) -> RemoteEngine:
        async def acquire(prompt, request_id, kwargs):
            server = self.servers[self.route]
            self.routed.append((self.route, kwargs.get("adapter")))
            return Lease(server.host, server.port, server.token, f"r{self.route}")

        e = self.engines[0]
        return RemoteEngine(e.model_config, e.tokenizer, e.max_model_len, acquire)

    def held(self) -> list[list[str]]:
        return [e.lora_names() for e in self.engines]

    def close(self) -> None:
        for server, engine in zip(self.servers, self.engines):
            server.stop()
            engine.shutdown()


@pytest.fixture(scope="module")
def replicas(tiny_llama_dir):
    r = Replicas(tiny_llama_dir)
    yield r
    r.close()


async def tokens(engine, prompt: list[int], adapter: str | None) -> list[int]:
    out = []
    async for o in engine.generate(prompt, GREEDY, adapter=adapter):
        out.extend(o.new_token_ids)
    return out


async def until(check, timeout: float = 10.0) -> None:
    for _ in range(int(timeout / 0.02)):
        if check():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("timed out")


def test_every_replica_serves_the_adapter_and_unload_drops_it(replicas, llama_adapters):
    remote = replicas.remote()
    prompt = replicas.engines[0].tokenizer.encode(PROMPT)

    async def main():
        replicas.route = 0
        await remote.load_lora("a1", str(llama_adapters["a1"]))
        assert remote.lora_names() == ["a1"]
        assert replicas.held() == [["a1"], []]  # checked on one replica only
        local = await tokens(replicas.engines[0], prompt, "a1")  # the engine, no port
        base = await tokens(replicas.engines[0], prompt, None)
        assert local != base
        replicas.route = 1  # a replica without it reads it for the request
        assert await tokens(remote, prompt, "a1") == local
        assert replicas.held() == [["a1"], ["a1"]]
        replicas.route = 0
        assert await tokens(remote, prompt, "a1") == local
        assert await tokens(remote, prompt, None) == base

        assert remote.unload_lora("a1") and not remote.unload_lora("a1")
        await until(lambda: replicas.held() == [[], []])
        with pytest.raises(ValueError, match="not loaded"):
            await tokens(remote, prompt, "a1")
        assert replicas.engines[1].stats()["lora_adapters"] == 0

    asyncio.run(main())
    assert (1, "a1") in replicas.routed  # the router is told the adapter of each request
    remote.shutdown()


def test_an_adapter_that_does_not_fit_is_a_value_error(replicas, llama_adapters, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(llama_adapters["a2"], bad)
    config = json.loads((bad / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**config, "r": 128}))
    remote = replicas.remote()

    async def main():
        with pytest.raises(ValueError, match="rank"):
            await remote.load_lora("bad", str(bad))

    asyncio.run(main())
    assert remote.lora_names() == [] and "bad" not in sum(replicas.held(), [])
    remote.shutdown()


def test_a_reloaded_name_is_read_from_its_new_folder(replicas, llama_adapters):
    remote = replicas.remote()
    prompt = replicas.engines[0].tokenizer.encode(PROMPT)

    async def main():
        replicas.route = 1
        await remote.load_lora("x", str(llama_adapters["a1"]))
        first = await tokens(remote, prompt, "x")
        remote.unload_lora("x")
        await remote.load_lora("x", str(llama_adapters["a3"]))
        again = await tokens(remote, prompt, "x")
        await replicas.engines[0].load_lora("a3", str(llama_adapters["a3"]))
        assert again == await tokens(replicas.engines[0], prompt, "a3") != first
        replicas.engines[0].unload_lora("a3")
        remote.unload_lora("x")

    asyncio.run(main())
    remote.shutdown()
