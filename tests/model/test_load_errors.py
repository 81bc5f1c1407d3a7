"""Bad model inputs give a clear exception naming the problem (never a hang)."""

from __future__ import annotations

import copy
import json
import shutil

import gguf
import numpy as np
import pytest
import torch
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


# ---------------------------------------------------------------------------------------------
# Checkpoints whose config contradicts their tensors, or makes no sense, fail at load with the
# file, field and value named (not a model that answers 500 to every request).


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """A tiny HF llama folder and its transformers model (written once; copy before editing)."""
    folder = tmp_path_factory.mktemp("tiny_llama")
    return folder, write_tiny_hf("llama", folder)


def _hf_copy(tiny_llama, tmp_path, **config):
    """A copy of the tiny folder with `config` merged into its config.json (None deletes)."""
    folder = tmp_path / "hf"
    shutil.copytree(tiny_llama[0], folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(config)
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def _gguf_with(tiny_llama, tmp_path, monkeypatch, qtypes=None, **metadata):
    """The tiny model as a llama GGUF, with metadata keys ending in a `metadata` key (dots
    spelled "__") overridden."""
    overrides = {k.replace("__", "."): v for k, v in metadata.items()}
    original = gguf.GGUFWriter.add_key_value

    def add_key_value(self, key, val, vtype, sub_type=None):
        for suffix, value in overrides.items():
            if key.endswith(suffix):
                val = value
        return original(self, key, val, vtype, sub_type)

    monkeypatch.setattr(gguf.GGUFWriter, "add_key_value", add_key_value)
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(copy.deepcopy(tiny_llama[1]), "llama", path, qtypes or {})
    monkeypatch.undo()
    return path


@pytest.mark.parametrize("mode", ["reference", "fast"])
def test_hf_tensor_shape_contradicting_config_is_named(tiny_llama, tmp_path, mode):
    from safetensors.torch import load_file, save_file

    folder = _hf_copy(tiny_llama, tmp_path)
    f = folder / "model.safetensors"
    state = load_file(f)
    name = "model.layers.1.self_attn.q_proj.weight"
    state[name] = state[name][:32].contiguous()
    save_file(state, f, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"blk\.1\.attn_q\.weight.*\[32, 64\].*\[64, 64\]"):
        load_model(folder, mode=mode, use_cache=False)


def test_hf_config_size_contradicting_tensors_is_named(tiny_llama, tmp_path):
    folder = _hf_copy(tiny_llama, tmp_path, intermediate_size=999)
    with pytest.raises(ValueError, match=r"blk\.0\.ffn_gate\.weight.*\[96, 64\].*\[999, 64\]"):
        load_model(folder, mode="reference")
    folder = _hf_copy(tiny_llama, tmp_path / "vocab", vocab_size=1000)
    with pytest.raises(ValueError, match=r"token_embd\.weight.*\[300, 64\].*\[1000, 64\]"):
        load_model(folder, mode="reference")


@pytest.mark.parametrize("mode", ["reference", "fast"])
def test_gguf_head_count_contradicting_tensors_is_named(tiny_llama, tmp_path, monkeypatch, mode):
    # 4 heads over 1 KV head divide, but the K projection holds 2 heads' rows: caught before
    # the rows are un-permuted per head (a reshape that fails or silently mixes heads).
    path = _gguf_with(
        tiny_llama, tmp_path, monkeypatch, {"attn_k": "Q8_0"}, attention__head_count_kv=1
    )
    with pytest.raises(ValueError, match=r"blk\.0\.attn_k\.weight.*\[32, 64\].*\[16, 64\]"):
        load_model(path, mode=mode, use_cache=False)


@pytest.mark.parametrize(
    ("config", "match"),
    [
        ({"max_position_embeddings": 0}, "max_position_embeddings must be a positive .* got 0"),
        ({"max_position_embeddings": -5}, "max_position_embeddings must be a positive .* -5"),
        ({"num_attention_heads": 0}, "num_attention_heads must be a positive integer, got 0"),
        ({"num_key_value_heads": 0}, "num_key_value_heads must be a positive integer, got 0"),
        ({"num_attention_heads": 3}, r"num_attention_heads \(3\) must be a multiple of"),
        ({"head_dim": None, "hidden_size": 66}, r"hidden_size \(66\) must be a multiple of"),
        ({"head_dim": 0}, "head_dim must be a positive integer, got 0"),
        ({"hidden_size": None}, "hidden_size must be an integer, got None"),
        ({"hidden_size": "64"}, "hidden_size must be an integer, got '64'"),
        ({"vocab_size": 0}, "vocab_size must be a positive integer, got 0"),
        ({"rms_norm_eps": "x"}, "rms_norm_eps must be a number, got 'x'"),
        ({"rope_parameters": {"rope_theta": 0.0}}, "rope_theta must be a positive number"),
        ({"rope_parameters": {"rope_theta": 1e4, "rope_type": "longrope"}}, "unsupported rope"),
        (
            {"rope_parameters": {"rope_theta": 1e4, "rope_type": "yarn"}},
            "factor must be a positive",
        ),
        ({"eos_token_id": 10**6}, r"eos_token_id must be a token id in \[0, 300\).*1000000"),
        ({"eos_token_id": [2, 300]}, r"eos_token_id must be a token id .* got 300"),
        ({"bos_token_id": -1}, r"bos_token_id must be a token id .* got -1"),
    ],
)
def test_hf_nonsense_config_is_named(tiny_llama, tmp_path, config, match):
    folder = _hf_copy(tiny_llama, tmp_path, **config)
    with pytest.raises(ValueError, match=match) as info:
        load_model(folder, mode="reference")
    assert "config.json" in str(info.value)


@pytest.mark.parametrize(
    ("text", "match"), [("[]", "must hold a JSON object"), ("{oops", "not valid JSON")]
)
@pytest.mark.parametrize("file", ["config.json", "tokenizer_config.json"])
def test_hf_config_file_not_a_json_object_is_named(tiny_llama, tmp_path, file, text, match):
    folder = _hf_copy(tiny_llama, tmp_path)
    (folder / file).write_text(text)
    with pytest.raises(ValueError, match=rf"{file}: {match}"):
        load_model(folder, mode="reference")


@pytest.mark.parametrize(
    ("metadata", "match"),
    [
        ({"context_length": 0}, "llama.context_length must be a positive integer, got 0"),
        ({"attention__head_count": 0}, "llama.attention.head_count must be a positive"),
        ({"attention__head_count_kv": 0}, "llama.attention.head_count_kv must be a positive"),
        ({"attention__head_count_kv": 3}, r"head_count \(4\) must be a multiple of .*kv \(3\)"),
        ({"attention__key_length": 0}, "llama.attention.key_length must be a positive"),
        ({"rope__freq_base": 0.0}, "llama.rope.freq_base must be a positive number, got 0.0"),
        ({"bos_token_id": 10**6}, r"tokenizer.ggml.bos_token_id must be a token id .*1000000"),
        ({"eos_token_id": 300}, r"tokenizer.ggml.eos_token_id must be a token id .* got 300"),
    ],
)
def test_gguf_nonsense_metadata_is_named(tiny_llama, tmp_path, monkeypatch, metadata, match):
    path = _gguf_with(tiny_llama, tmp_path, monkeypatch, **metadata)
    with pytest.raises(ValueError, match=match) as info:
        load_model(path, mode="reference")
    assert "tiny.gguf" in str(info.value)


# ---------------------------------------------------------------------------------------------
# generation_config.json: defaults no request could use are dropped with a warning (the model
# still serves) instead of making every request a 400 about a field the client never sent.


@pytest.mark.parametrize(
    ("text", "kept", "dropped"),
    [
        (
            '{"temperature": "hot", "top_k": -3, "top_p": 0.9}',
            {"top_p": 0.9},
            ["temperature", "top_k"],
        ),
        (
            '{"temperature": NaN, "top_p": 5, "min_p": 0.1}',
            {"min_p": 0.1},
            ["temperature", "top_p"],
        ),
        (
            '{"top_k": 2.5, "typical_p": 0, "repetition_penalty": 1.1}',
            {"repetition_penalty": 1.1},
            ["top_k", "typical_p"],
        ),
        (
            '{"top_k": 40, "top_p": 0, "eos_token_id": [2, 999]}',
            {"top_k": 40, "top_p": 0},  # top_p 0: greedy, as in a request
            ["eos_token_id"],
        ),
    ],
)
def test_bad_generation_config_defaults_are_dropped(
    tiny_llama, tmp_path, caplog, text, kept, dropped
):
    from girandole.model.loader.safetensors import SAMPLING_KEYS
    from girandole.sampling.params import SamplingParams

    folder = _hf_copy(tiny_llama, tmp_path)
    (folder / "generation_config.json").write_text(text)
    with caplog.at_level("WARNING"):
        _, config = load_model(folder, mode="reference")
    gen = config.generation_config
    assert {k: gen.get(k) for k in kept} == kept
    for key in dropped:
        assert key not in gen
        assert f"ignoring {key} in {folder / 'generation_config.json'}" in caplog.text
    defaults = {k: gen[k] for k in SAMPLING_KEYS if k in gen and k != "top_p"}
    SamplingParams(**defaults)  # what is left is valid
    assert config.eos_token_ids == [2]


def test_generation_config_not_an_object_is_ignored(tiny_llama, tmp_path, caplog):
    folder = _hf_copy(tiny_llama, tmp_path)
    (folder / "generation_config.json").write_text("[1, 2]")
    with caplog.at_level("WARNING"):
        _, config = load_model(folder, mode="reference")
    assert config.generation_config == {}
    assert "generation_config.json" in caplog.text


# ---------------------------------------------------------------------------------------------
# NaN weights would make every logprob NaN: refused at load, the tensor named.


@pytest.mark.parametrize("mode", ["reference", "fast"])
def test_hf_nan_weight_is_named(tiny_llama, tmp_path, mode):
    from safetensors.torch import load_file, save_file

    folder = _hf_copy(tiny_llama, tmp_path)
    f = folder / "model.safetensors"
    state = load_file(f)
    state["model.layers.2.mlp.up_proj.weight"][3, 5] = float("nan")
    save_file(state, f, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"blk\.2\.ffn_up\.weight.*NaN"):
        load_model(folder, mode=mode, use_cache=False)


@pytest.mark.parametrize("mode", ["reference", "fast"])
def test_gguf_nan_in_quantized_weight_is_named(tiny_llama, tmp_path, monkeypatch, mode):
    # Fast mode reads Q8_0 levels and scales without dequantizing: the scale carries the NaN.
    hf = copy.deepcopy(tiny_llama[1])
    with torch.no_grad():
        hf.model.layers[1].self_attn.q_proj.weight[0, 0] = float("inf")
    path = tmp_path / "nan.gguf"
    with np.errstate(all="ignore"):
        write_tiny_gguf(hf, "llama", path, {"attn_q": "Q8_0"})
    with pytest.raises(ValueError, match=r"blk\.1\.attn_q\.weight.*NaN or infinite"):
        load_model(path, mode=mode, use_cache=False)


def test_unsupported_moe_gguf_is_refused_naming_the_architecture(tmp_path):
    """MoE GGUF architectures other than qwen3moe and llama with experts (Mixtral), and a dense
    architecture given an expert count, are refused by name (tests/model/test_moe_gguf.py loads
    the supported ones)."""
    for arch, expert_count in (("qwen2moe", None), ("deepseek2", 64), ("qwen3", 8)):
        path = tmp_path / f"{arch}.gguf"
        w = gguf.GGUFWriter(str(path), arch)
        w.add_block_count(1)
        if expert_count:
            w.add_expert_count(expert_count)
        w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        with pytest.raises(ValueError, match=f"mixture-of-experts architecture '{arch}'"):
            load_model(path, mode="reference")


@pytest.mark.parametrize(
    "change, message",
    [
        ({"num_experts_per_tok": 9}, "num_experts_per_tok \\(9\\) must be at most"),
        ({"moe_intermediate_size": 0}, "moe_intermediate_size must be a positive integer"),
        ({"mlp_only_layers": "all"}, "mlp_only_layers must be a list"),
        ({"decoder_sparse_step": 0}, "decoder_sparse_step must be a positive integer"),
    ],
)
def test_bad_moe_config_names_the_key(tmp_path, change, message):
    write_tiny_hf("qwen3_moe", tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config.update(change)
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message):
        load_model(tmp_path, mode="reference")


def test_moe_expert_of_the_wrong_shape_is_named(tmp_path):
    from safetensors.torch import load_file, save_file

    write_tiny_hf("qwen3_moe", tmp_path)
    path = tmp_path / "model.safetensors"
    tensors = load_file(str(path))
    name = "model.layers.0.mlp.experts.5.up_proj.weight"
    tensors[name] = tensors[name][:-1]
    save_file(tensors, str(path), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="blk.0.exp.5.ffn_up.weight.*has shape"):
        load_model(tmp_path, mode="reference")
