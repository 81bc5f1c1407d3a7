"""Reference-mode logits of tiny random HF checkpoints match transformers (fp32)."""

from __future__ import annotations

import pytest
import torch
from model_helpers import (
    check_chunked_paged_logits,
    check_paged_greedy_matches_generate,
    hf_logits,
    write_tiny_hf,
)

from girandole.model.loader import load_model

KINDS = ["gemma3", "llama", "llama3", "mistral", "qwen2", "qwen3", "qwen3_moe", "mixtral"]
PROMPTS = [
    [1, 17, 42, 99, 5, 250, 7, 7, 31, 64, 128, 3],
    [1, 200],
    [1, 9, 8, 7, 6, 5, 4, 3, 2, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19],
]
ATOL = 1e-4


@pytest.fixture(scope="module", params=KINDS)
def tiny(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"tiny-{request.param}")
    hf = write_tiny_hf(request.param, folder)
    model, config = load_model(folder, mode="reference", device="cpu")
    return request.param, folder, hf, model, config


def test_config_fields(tiny):
    kind, _folder, hf, _model, config = tiny
    assert config.architecture == {"llama3": "llama", "mistral": "llama"}.get(kind, kind)
    assert config.vocab_size == hf.config.vocab_size
    assert config.num_layers == hf.config.num_hidden_layers
    assert config.num_kv_heads == hf.config.num_key_value_heads
    assert config.max_position == 256
    assert config.bos_token_id == 1
    assert 2 in config.eos_token_ids


def test_logits_match_transformers_per_sequence(tiny):
    _kind, _folder, hf, model, _config = tiny
    for ids in PROMPTS:
        with torch.inference_mode():
            ours = model.compute_logits(model(torch.tensor(ids), torch.arange(len(ids))))
        torch.testing.assert_close(ours, hf_logits(hf, ids), atol=ATOL, rtol=0)


def test_flattened_batch_over_paged_cache(tiny):
    """Several sequences in one flattened batch, then a chunked continuation and decodes."""
    _kind, _folder, hf, model, _config = tiny
    check_chunked_paged_logits(model, hf, PROMPTS, ATOL)


def test_paged_greedy_matches_transformers_generate(tiny):
    _kind, _folder, hf, model, _config = tiny
    check_paged_greedy_matches_generate(model, hf, PROMPTS, max_new=8)


def test_fast_mode_close_to_reference(tiny):
    _kind, folder, _hf, ref, _config = tiny
    fast, _ = load_model(folder, mode="fast", device="cpu", use_cache=False)
    ids = PROMPTS[0]
    with torch.inference_mode():
        a = ref.compute_logits(ref(torch.tensor(ids), torch.arange(len(ids))))
        b = fast.compute_logits(fast(torch.tensor(ids), torch.arange(len(ids))))
    assert b.dtype == torch.float32
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1)
    assert cos.min() > 0.99
