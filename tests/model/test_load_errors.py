"""Bad model inputs give a clear exception naming the problem (never a hang)."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
from model_helpers import write_tiny_gguf, write_tiny_hf

from girandole.model.loader import load_model


def test_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "nope.gguf")


def test_bad_mode():
    with pytest.raises(ValueError, match="mode"):
        load_model(None, mode="turbo")


def test_not_a_gguf(tmp_path):
    path = tmp_path / "junk.gguf"
    path.write_bytes(b"this is not a gguf file at all" * 100)
    with pytest.raises(ValueError, match="GGUF"):
        load_model(path, mode="reference")


def test_truncated_gguf(tmp_path):
    hf = write_tiny_hf("llama", tmp_path / "hf")
    full = tmp_path / "full.gguf"
    write_tiny_gguf(hf, "llama", full, {"attn_q": "Q8_0"})
    data = full.read_bytes()
    for cut in (len(data) // 2, 200, len(data) - 100):
        path = tmp_path / f"cut{cut}.gguf"
        path.write_bytes(data[:cut])
        with pytest.raises(ValueError):
            load_model(path, mode="reference")


def test_unsupported_gguf_architecture(tmp_path):
    path = tmp_path / "gpt2.gguf"
    w = gguf.GGUFWriter(str(path), "gpt2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match="unsupported model architecture 'gpt2'"):
        load_model(path, mode="reference")


def test_unsupported_hf_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 8}))
    with pytest.raises(ValueError, match="unsupported model_type 'bert'"):
        load_model(tmp_path, mode="reference")


def test_hf_folder_without_weights(tmp_path):
    write_tiny_hf("llama", tmp_path)
    for f in tmp_path.glob("*.safetensors"):
        f.unlink()
    with pytest.raises(ValueError, match="safetensors"):
        load_model(tmp_path, mode="reference")


def test_hf_folder_without_config(tmp_path):
    with pytest.raises(ValueError, match="config.json"):
        load_model(tmp_path, mode="reference")


def test_missing_tensor_is_named(tmp_path):
    hf = write_tiny_hf("qwen3", tmp_path)
    from safetensors.torch import load_file, save_file

    f = tmp_path / "model.safetensors"
    state = load_file(f)
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, f, metadata={"format": "pt"})
    del hf
    with pytest.raises(ValueError, match="blk.1.ffn_up.weight"):
        load_model(tmp_path, mode="reference")
