"""Adapters on a mixture-of-experts model (the tiny Qwen3-MoE): one on the attention projections
runs in the engine as transformers + peft run it; one on the experts is refused naming them."""

from __future__ import annotations

import json

import pytest
import torch
from lora_helpers import write_peft_adapter
from safetensors.torch import save_file

from girandole.engine.engine import EngineConfig, LLMEngine
from girandole.model.lora import AdapterError
from girandole.sampling.params import SamplingParams

PROMPTS = ["Once upon a time", "The quick brown fox jumps over the lazy dog."]


def test_attention_adapter_matches_peft(tiny_qwen3_moe_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny_qwen3_moe_dir).float().eval()
    peft_model = write_peft_adapter(
        hf, tmp_path / "attn", rank=4, alpha=8, targets=["q_proj", "v_proj", "o_proj"], std=0.3
    )
    engine = LLMEngine(
        EngineConfig(
            model=str(tiny_qwen3_moe_dir), mode="reference", device="cpu", block_size=4,
            kv_cache_gb=0.01,
        )
    )  # fmt: skip
    engine.loras.register(engine.loras.read("attn", tmp_path / "attn"))
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    got: dict[str, list[int]] = {}
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(str(i), engine.tokenizer.encode(prompt), params, adapter="attn")
        got[str(i)] = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            got[out.request_id].extend(out.new_token_ids)
    changed = False
    for i, prompt in enumerate(PROMPTS):
        ids = torch.tensor([engine.tokenizer.encode(prompt)])
        greedy = dict(max_new_tokens=6, do_sample=False, eos_token_id=None)
        with torch.no_grad():
            ref = peft_model.generate(input_ids=ids, **greedy)[0, ids.shape[1] :].tolist()
            base = hf.generate(ids, **greedy)[0, ids.shape[1] :].tolist()
        assert got[str(i)] == ref
        changed |= ref != base
    assert changed  # the adapter changes what is generated


@pytest.mark.parametrize(
    "key",
    [
        "model.layers.0.mlp.experts.3.gate_proj",
        "model.layers.1.mlp.gate",
        "model.layers.0.mlp.up_proj",
    ],
)
def test_adapter_on_the_experts_is_refused(tiny_qwen3_moe_dir, tmp_path, key):
    from girandole.model.loader import read_checkpoint

    spec, _config, _weights = read_checkpoint(tiny_qwen3_moe_dir)
    (tmp_path / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["x"]})
    )
    save_file(
        {
            f"base_model.model.{key}.lora_A.weight": torch.ones(2, 64),
            f"base_model.model.{key}.lora_B.weight": torch.ones(32, 2),
        },
        str(tmp_path / "adapter_model.safetensors"),
    )
    from girandole.model.lora import read_adapter

    with pytest.raises(AdapterError, match="mixture-of-experts"):
        read_adapter(tmp_path, spec)
