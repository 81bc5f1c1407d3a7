"""The Scheduler with LoRA slots (the real LoRAManager's admission, on a model without layers):
a request waiting for a slot does not block the base-model requests behind it, requests for
resident adapters pass it a bounded number of times, and it gets the first slot that frees."""

from __future__ import annotations

import torch
from torch import nn

from girandole import SamplingParams
from girandole.engine.kv_cache import KVCacheManager
from girandole.engine.lora_manager import LoRAManager
from girandole.engine.scheduler import MAX_LORA_PASSES, Scheduler, SchedulerConfig
from girandole.engine.sequence import Sequence, SequenceStatus
from girandole.model.lora import LoRAAdapter


class NoLayers(nn.Module):
    """A model with no linears to wrap: the manager's slot bookkeeping alone."""

    spec = None
    layers: list = []


def make(max_loras: int = 1, max_seqs: int = 64) -> tuple[Scheduler, LoRAManager]:
    config = SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=512)
    sched = Scheduler(config, KVCacheManager(1024, 4))
    loras = LoRAManager(NoLayers(), torch.device("cpu"), max_loras=max_loras)
    sched.admit = loras.admit
    return sched, loras


def adapter(loras: LoRAManager, name: str) -> LoRAAdapter:
    a = LoRAAdapter(name, f"/{name}", rank=4, alpha=8.0, rslora=False, targets=[], raw={})
    loras.register(a)
    return a


def seq(rid: str, lora: LoRAAdapter | None = None) -> Sequence:
    return Sequence(rid, [1, 2, 3, 4], SamplingParams(max_tokens=100), lora=lora)


def started(sched: Scheduler) -> list[str]:
    """One step without a model: the requests that started in it."""
    batch = sched.schedule()
    new = [s.request_id for s in batch.seqs if s.num_computed_tokens == 0]
    sched.mark_computed(batch)
    for s in batch.seqs:
        if s.num_computed_tokens == len(s):
            s.token_ids.append(7)  # "sampled"
    return new


def finish(sched: Scheduler, rid: str) -> None:
    sched.remove(next(s for s in sched.running if s.request_id == rid))


def test_base_requests_pass_a_request_waiting_for_a_slot():
    sched, loras = make(max_loras=1)
    a, b = adapter(loras, "a"), adapter(loras, "b")
    for s in (seq("a1", a), seq("b1", b), seq("base1"), seq("base2")):
        sched.add(s)
    # a holds the only slot; b1 waits for it, the base requests behind it start at once
    assert started(sched) == ["a1", "base1", "base2"]
    waiting = sched.waiting[0]
    assert waiting.request_id == "b1" and waiting.status is SequenceStatus.WAITING
    finish(sched, "a1")  # a's slot frees: b1 takes it
    assert started(sched) == ["b1"]
    assert [a.name for a in loras.resident.values()] == ["b"]


def test_resident_adapter_requests_pass_only_so_often():
    sched, loras = make(max_loras=1)
    a, b = adapter(loras, "a"), adapter(loras, "b")
    sched.add(seq("a0", a))
    assert started(sched) == ["a0"]
    sched.add(seq("b1", b))  # blocked: a is in use
    n = MAX_LORA_PASSES + 4
    for i in range(n):  # a steady stream of requests for the resident adapter
        sched.add(seq(f"a{i + 1}", a))
    passed = []
    for _ in range(n):
        passed += started(sched)
    assert passed == [f"a{i + 1}" for i in range(MAX_LORA_PASSES)]  # then they wait behind b1
    assert sched.waiting[0].request_id == "b1"
    for s in list(sched.running):  # the resident adapter drains
        sched.remove(s)
    assert started(sched)[0] == "b1"  # b1 was not starved


def test_without_adapters_admission_stays_first_come_first_served():
    sched, loras = make(max_loras=1, max_seqs=2)
    a = adapter(loras, "a")
    for s in (seq("a1", a), seq("base1"), seq("base2")):
        sched.add(s)
    assert started(sched) == ["a1", "base1"]  # the sequence cap, not a slot, holds base2
    assert sched.waiting[0].request_id == "base2"


def test_a_paused_request_gives_up_its_adapters_slot():
    # backpressure (engine/backpressure.py): a request whose client stopped reading must not
    # hold the only slot while another adapter's request waits
    sched, loras = make(max_loras=1)
    a, b = adapter(loras, "a"), adapter(loras, "b")
    a1 = seq("a1", a)
    sched.add(a1)
    assert started(sched) == ["a1"]
    sched.pause(a1)
    sched.add(seq("b1", b))
    assert started(sched) == ["b1"]
    assert a1.status is SequenceStatus.PARKED and [x.name for x in loras.resident.values()] == ["b"]
    finish(sched, "b1")
    sched.resume(a1)  # back at the head of its tier: a's slot again, recomputed
    batch = sched.schedule()
    assert batch.seqs == [a1] and a1.lora is not None and a1.lora.name == "a"
