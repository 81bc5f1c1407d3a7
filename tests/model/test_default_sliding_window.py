"""The real default model (Gemma 3 270M: 15 sliding layers of window 512, 3 global) through the
engine's runner, scheduler and KV cache: a greedy continuation of prompts longer than the window
is the same token for token whether its sliding layers keep only their window or every
position, through chunked prefill and a prefix-cache hit."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from girandole.engine.kv_cache import NULL_BLOCK, KVCacheManager
from girandole.engine.runner import ModelRunner
from girandole.engine.scheduler import Scheduler, SchedulerConfig
from girandole.engine.sequence import Sequence
from girandole.sampling.params import SamplingParams

pytestmark = pytest.mark.slow

DATA = Path(__file__).resolve().parent.parent / "data"
BS = 16
NEW_TOKENS = 16


def greedy_runs(model, config, windowed: bool, prompts: list[list[int]]) -> tuple[list, dict]:
    """Each prompt after the previous one finished (the second may hit the first's prefix),
    prefilled in chunks of 256 tokens; their greedy tokens, and what the cache held."""
    runner = ModelRunner(
        model, config, torch.device("cpu"), BS, 64 << 20, sliding_window_cache=windowed
    )
    kv = KVCacheManager(runner.num_blocks, BS, runner.kv_windows)
    scheduler = Scheduler(SchedulerConfig(max_num_batched_tokens=256), kv)
    outs = []
    seen = {"nulls": 0, "hits": 0, "groups": len(runner.kv_groups)}
    try:
        for i, ids in enumerate(prompts):
            params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
            seq = Sequence(f"r{i}", ids, params)
            scheduler.add(seq)
            while seq.num_output_tokens < NEW_TOKENS:
                batch = scheduler.schedule()
                results = runner.run(batch)
                scheduler.mark_computed(batch)
                if results[0] is not None:
                    seq.token_ids.append(results[0].token_id)
            if kv.num_reserved:  # the null block exists only beside a sliding-window group
                nulls = max(t.count(NULL_BLOCK) for t in seq.block_tables)
                seen["nulls"] = max(seen["nulls"], nulls)
            outs.append(seq.output_token_ids)
            scheduler.remove(seq)
        seen["hits"] = kv.num_prefix_hits
        assert kv.num_used_blocks == 0
    finally:
        for layer in runner.attn_layers:
            layer.k_cache = layer.v_cache = None
    return outs, seen


def test_greedy_same_with_window_only_cache(default_fast):
    from girandole.tokenizer import load_tokenizer

    model, config = default_fast
    ids = load_tokenizer(None).encode((DATA / "pride_and_prejudice_ch1.txt").read_text())
    assert len(ids) > 900
    prompts = [ids[:700], ids[:900]]
    kept, kept_seen = greedy_runs(model, config, False, prompts)
    windowed, seen = greedy_runs(model, config, True, prompts)
    assert windowed == kept
    assert kept_seen["groups"] == 1 and seen["groups"] == 6
    assert seen["nulls"] >= (900 - 512 - 256) // BS
    assert seen["hits"] >= 700 - BS and kept_seen["hits"] >= 700 - BS
