"""Checkpoint details: sharded safetensors, HF folder metadata, the fast-mode model cache."""

from __future__ import annotations

import json
import os

import torch
from model_helpers import hf_logits, write_tiny_gguf, write_tiny_hf

from girandole.model.loader import load_model

IDS = [1, 17, 42, 99, 5, 250, 7, 7, 31]


def _logits(model, ids=IDS):
    with torch.inference_mode():
        return model.compute_logits(model(torch.tensor(ids), torch.arange(len(ids))))


def test_sharded_safetensors_and_folder_metadata(tmp_path):
    hf = write_tiny_hf("qwen2", tmp_path / "one")
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    folder = tmp_path / "sharded"
    assert (folder / "model.safetensors.index.json").exists()
    assert len(list(folder.glob("*.safetensors"))) > 1
    (folder / "generation_config.json").write_text(
        json.dumps({"eos_token_id": [2, 7], "temperature": 0.7, "top_p": 0.8})
    )
    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": template, "add_bos_token": False})
    )
    model, config = load_model(folder, mode="reference", device="cpu")
    torch.testing.assert_close(_logits(model), hf_logits(hf, IDS), atol=1e-4, rtol=0)
    assert config.generation_config["temperature"] == 0.7
    assert config.eos_token_ids == [2, 7]
    assert config.chat_template == template
    assert config.add_bos_token is False
    assert config.name == "sharded"


def test_fast_model_cache_round_trip(tmp_path, monkeypatch):
    import girandole.model.loader as loader

    monkeypatch.setenv("GIRANDOLE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(loader, "CACHE_MIN_BYTES", 0)
    hf = write_tiny_hf("gemma3", tmp_path / "hf", seed=2)
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(hf, "gemma3", path, {"attn_q": "Q8_0", "ffn_up": "Q4_0"})
    first, config1 = load_model(path, mode="fast", device="cpu")
    cached = list((tmp_path / "cache" / "packed").glob("*.pt"))
    assert len(cached) == 1
    ref = _logits(first)
    second, config2 = load_model(path, mode="fast", device="cpu")
    assert second is not first
    assert config2 == config1
    torch.testing.assert_close(_logits(second), ref, atol=0, rtol=0)
    # A damaged cache file is rebuilt, not fatal. (Swapped in whole, as the cache itself writes:
    # truncating a file in place would pull the pages from under the models mapping it.)
    bad = cached[0].with_suffix(".bad")
    bad.write_bytes(b"garbage")
    os.replace(bad, cached[0])
    third, _ = load_model(path, mode="fast", device="cpu")
    torch.testing.assert_close(_logits(third), ref, atol=0, rtol=0)
    # An entry for older model code is replaced, not kept beside the new one.
    stale = cached[0].with_name(cached[0].name.rsplit("-", 1)[0] + "-0123456789abcdef.pt")
    cached[0].rename(stale)
    load_model(path, mode="fast", device="cpu")
    assert [p.name for p in (tmp_path / "cache" / "packed").glob("*.pt")] == [cached[0].name]


def test_a_cache_build_takes_the_cores_other_work_leaves(tmp_path):
    """The build child's threads: the cores not held by threads runnable now (two took 2-5x
    longer than one while other work held the cores), at least one; all of them when idle."""
    import subprocess
    import sys
    import time

    from girandole.model.loader import _build_threads

    spin = [sys.executable, "-c", "while True: pass"]
    spinners = [subprocess.Popen(spin) for _ in range(3)]
    try:
        time.sleep(0.5)
        assert _build_threads(64) <= 61  # three spinning processes hold three cores
        assert _build_threads(1) == 1
    finally:
        for p in spinners:
            p.kill()
            p.wait()
