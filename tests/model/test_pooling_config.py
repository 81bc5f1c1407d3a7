"""sentence-transformers' pooling files as the server reads them, and what it refuses at load."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from girandole.model.bert import read_encoder_spec
from girandole.model.pooling_config import PoolingConfig, decoder_embedding, read_pooling_config

TRANSFORMER = {"path": "", "type": "sentence_transformers.models.Transformer"}
POOLING = {"path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}
NORMALIZE = {"path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}


def write(folder: Path, modules: list, **pooling: bool) -> Path:
    (folder / "modules.json").write_text(json.dumps(modules))
    (folder / "1_Pooling").mkdir(exist_ok=True)
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    return folder


def test_no_modules_json_is_none(tmp_path):
    assert read_pooling_config(tmp_path) is None
    assert decoder_embedding(tmp_path, "qwen3") is None


@pytest.mark.parametrize(
    "key, method", [("pooling_mode_cls_token", "cls"), ("pooling_mode_mean_tokens", "mean"),
                    ("pooling_mode_lasttoken", "last")],
)  # fmt: skip
def test_methods_and_normalize(tmp_path, key, method):
    write(tmp_path, [TRANSFORMER, POOLING, NORMALIZE], **{key: True})
    assert read_pooling_config(tmp_path) == PoolingConfig(method, True, True)
    write(tmp_path, [TRANSFORMER, POOLING], **{key: True, "pooling_mode_max_tokens": False})
    assert read_pooling_config(tmp_path) == PoolingConfig(method, False, True)


@pytest.mark.parametrize(
    "modules, pooling, words",
    [
        ([TRANSFORMER, POOLING, {"path": "2_Dense", "type": "sentence_transformers.models.Dense"}],
         {"pooling_mode_mean_tokens": True}, "sentence_transformers.models.Dense"),
        ([TRANSFORMER, POOLING], {"pooling_mode_max_tokens": True}, "pooling_mode_max_tokens"),
        ([TRANSFORMER, POOLING], {"pooling_mode_cls_token": True,
                                  "pooling_mode_mean_tokens": True}, "exactly one"),
        ([TRANSFORMER], {}, "no sentence_transformers.models.Pooling"),
        ({"not": "a list"}, {}, "list of module objects"),
    ],
)  # fmt: skip
def test_pipelines_it_cannot_reproduce_are_refused(tmp_path, modules, pooling, words):
    write(tmp_path, modules, **pooling)
    with pytest.raises(ValueError, match=words):
        read_pooling_config(tmp_path)


def test_cls_pooling_on_a_decoder_is_refused(tmp_path):
    write(tmp_path, [TRANSFORMER, POOLING], pooling_mode_cls_token=True)
    with pytest.raises(ValueError, match="CLS pooling needs an encoder"):
        decoder_embedding(tmp_path, "qwen3")


def test_qwen3_reranker_by_name(tmp_path):
    folder = tmp_path / "models--Qwen--Qwen3-Reranker-0.6B" / "snapshots" / "abc"
    folder.mkdir(parents=True)
    assert decoder_embedding(folder, "qwen3").task == "yes-no"
    assert decoder_embedding(folder, "llama") is None  # only Qwen3's prompt is known
    assert decoder_embedding(tmp_path, "qwen3", "Qwen/Qwen3-Reranker-4B").task == "yes-no"


def test_a_reranker_with_two_labels_is_refused(tmp_path):
    config = {"architectures": ["BertForSequenceClassification"], "vocab_size": 10,
              "hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2,
              "intermediate_size": 16, "max_position_embeddings": 16,
              "id2label": {"0": "no", "1": "yes"}}  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="one label"):
        read_encoder_spec(tmp_path)
