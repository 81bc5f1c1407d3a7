"""DPO on a tiny random Llama: rows preferring one answer over another; the trained adapter's
log-probability margin logp(chosen) - logp(rejected), on questions trained and unseen, rises well
above the base model's (fails if training does nothing or the loss has the wrong sign), and the
preference rows' checks name their line."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from girandole.finetune.data import RowError
from girandole.finetune.dpo import load_pairs, logp
from girandole.finetune.preference import read_pairs
from girandole.finetune.trainer import Trainable, TrainConfig, train
from girandole.model import lora

CHOSEN, REJECTED = "Zebra-42.", "Walrus-7."
QUESTIONS = ["hello", "what is up", "tell me a story", "who are you", "name a color", "count"]


def pair_row(question: str, chosen: str = CHOSEN, rejected: str = REJECTED) -> dict:
    return {
        "input": {"messages": [{"role": "user", "content": question}]},
        "preferred_output": [{"role": "assistant", "content": chosen}],
        "non_preferred_output": [{"role": "assistant", "content": rejected}],
    }


def write_pairs(path: Path, questions: list[str] = QUESTIONS) -> Path:
    path.write_text("".join(json.dumps(pair_row(q)) + "\n" for q in questions))
    return path


def margins(model_dir: Path, adapter_dir: Path | None, rows: Path) -> list[float]:
    """logp(chosen) - logp(rejected) of each row, with the adapter (or the base model)."""
    from girandole.model.loader import load_model
    from girandole.tokenizer.chat_template import chat_template_for
    from girandole.tokenizer.loader import load_tokenizer

    tok = load_tokenizer(model_dir)
    pairs = load_pairs(str(rows), tok, chat_template_for(tok), 2048)
    model, _ = load_model(model_dir, mode="reference", device="cpu", use_cache=False)
    lora.attach(model)
    init = lora.read_adapter(adapter_dir, model.spec) if adapter_dir else None
    adapter = Trainable(model.spec, 8, 8.0, init, torch.device("cpu")).adapter()
    with torch.no_grad():
        return [
            (logp(model, adapter, p.chosen, "cpu") - logp(model, adapter, p.rejected, "cpu")).item()
            for p in pairs
        ]


def preference_config(tiny_llama_dir: Path, tmp: Path, method: str, **fields) -> TrainConfig:
    return TrainConfig(
        base_path=str(tiny_llama_dir), dataset_path=str(write_pairs(tmp / "rows.jsonl")),
        output_dir=str(tmp / "out"), method=method, beta=0.1, epochs=4, learning_rate=5e-3,
        batch_size_samples=2, device="cpu", **fields,
    )  # fmt: skip


@pytest.fixture(scope="module")
def dpo_trained(tiny_llama_dir, tmp_path_factory) -> tuple[Path, list[dict]]:
    tmp = tmp_path_factory.mktemp("dpo")
    reports: list[dict] = []
    result = train(preference_config(tiny_llama_dir, tmp, "dpo"), reports.append)
    assert result.steps == 12
    return tmp, reports


def assert_prefers_chosen(tiny_llama_dir: Path, tmp: Path) -> None:
    """The adapter's margin, on the trained questions and unseen ones, well past the base's."""
    unseen = write_pairs(tmp / "unseen.jsonl", ["a question never seen", "why", "and so?"])
    for data in (tmp / "rows.jsonl", unseen):
        base = margins(tiny_llama_dir, None, data)
        tuned = margins(tiny_llama_dir, tmp / "out", data)
        for before, after in zip(base, tuned):
            assert after > before + 20, (base, tuned)  # beta * 20 = 2: well past the base


def test_dpo_raises_the_chosen_answers_margin(tiny_llama_dir, dpo_trained):
    tmp, reports = dpo_trained
    assert reports[-1]["percent"] == 100
    # the first step starts at the reference: margin 0, loss log 2
    assert reports[0]["loss"] == pytest.approx(0.6931, abs=1e-3)
    assert reports[-1]["loss"] < 0.1 and reports[-1]["rewardAccuracy"] == 1.0
    assert reports[-1]["rewardMargin"] > 2
    assert_prefers_chosen(tiny_llama_dir, tmp)


def test_a_warm_start_is_the_reference(tiny_llama_dir, dpo_trained, tmp_path):
    """Continuing a DPO adapter: the reference is that adapter, not the base (whose margin it
    is already far past), so the first step is at margin 0 again."""
    tmp, _ = dpo_trained
    config = preference_config(tiny_llama_dir, tmp_path, "dpo", warm_start_path=str(tmp / "out"))
    config.epochs, config.learning_rate = 1, 1e-9
    reports: list[dict] = []
    train(config, reports.append)
    assert reports[0]["loss"] == pytest.approx(0.6931, abs=1e-3)
    assert reports[0]["rewardMargin"] == pytest.approx(0, abs=1e-3)


def test_orpo_raises_the_chosen_answers_margin(tiny_llama_dir, tmp_path):
    reports: list[dict] = []
    train(preference_config(tiny_llama_dir, tmp_path, "orpo"), reports.append)
    assert reports[-1]["loss"] < reports[0]["loss"] / 3 and reports[-1]["rewardAccuracy"] == 1.0
    assert_prefers_chosen(tiny_llama_dir, tmp_path)


@pytest.mark.parametrize(
    ("line", "says"),
    [
        ("not json", "line 3 is not valid JSON"),
        ('{"messages": []}', "line 3: a row is an object"),
        (
            '{"input": {"messages": []}, "preferred_output": [{"role": "assistant", "content":'
            ' "a"}]}',
            "line 3: non_preferred_output must be a non-empty list",
        ),  # fmt: skip
        (
            '{"input": {"messages": []}, "preferred_output": [{"role": "user", "content": "a"}],'
            ' "non_preferred_output": [{"role": "assistant", "content": "b"}]}',
            "line 3: preferred_output[0] must be an assistant message",
        ),  # fmt: skip
        (
            '{"input": {"messages": [{"role": "bot", "content": "q"}]}, "preferred_output":'
            ' [{"role": "assistant", "content": "a"}], "non_preferred_output": [{"role":'
            ' "assistant", "content": "b"}]}',
            "line 3 (preferred_output): messages[0].role",
        ),  # fmt: skip
        (json.dumps({**pair_row("q"), "extra": 1}), "line 3: unknown field 'extra'"),
    ],
)
def test_bad_preference_rows_name_their_line(line, says):
    good = json.dumps(pair_row("q"))
    with pytest.raises(RowError, match=re.escape(says)):
        read_pairs(f"{good}\n{good}\n{line}\n".encode())


def test_a_preference_dataset_needs_three_rows():
    good = json.dumps(pair_row("q"))
    with pytest.raises(RowError, match="needs at least 3"):
        read_pairs(f"{good}\n{good}\n".encode())
