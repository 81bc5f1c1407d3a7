"""GRPO on a tiny random Llama, with a Python reward (the share of an answer's characters that
are "e"): a few steps of rollouts and policy gradient raise the mean reward of the rollouts,
and that of answers the written adapter samples, on a prompt trained and an unseen one (fails if training does nothing or the advantage has the wrong sign); the advantage
maths; the KV-cache rollout is the plain forward's greedy answer; RFT rows' checks name their
line."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from girandole.finetune.data import RowError
from girandole.finetune.grpo import advantages
from girandole.finetune.prompts import read_prompts
from girandole.finetune.rollout import SamplingConfig, sample
from girandole.finetune.trainer import Trainable, TrainConfig, _context, train
from girandole.model import lora
from girandole.model.context import forward_context
from girandole.tokenizer.chat_template import chat_template_for, encode_chat

QUESTIONS = ["hello", "what is up", "tell me a story", "who are you"]


def share_of_e(rows: list[dict]) -> list[float | None]:
    out = []
    for row in rows:
        answer = row["messages"][-1]["content"]
        out.append(answer.count(row["ground_truth"]) / max(1, len(answer)))
    return out


def write_prompts(path: Path) -> Path:
    rows = [{"messages": [{"role": "user", "content": q}], "ground_truth": "e"} for q in QUESTIONS]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_advantages():
    assert advantages([1.0, 1.0, 1.0]) is None  # equal rewards: nothing to learn
    assert advantages([1.0, None]) is None  # one scored candidate: no group
    adv = advantages([0.0, 1.0, None, 2.0])
    assert adv[2] is None
    assert sum(a for a in adv if a is not None) == pytest.approx(0, abs=1e-9)
    # (r - mean) / population std: -1.2247, 0, 1.2247 (less the eps)
    assert adv[0] == pytest.approx(-1.22474, rel=1e-3) and adv[1] == 0
    assert advantages([3.0, 5.0]) == pytest.approx([-1, 1], rel=1e-3)


def load(tiny_llama_dir: Path, adapter_dir: Path | None = None):
    from girandole.model.loader import load_model
    from girandole.tokenizer.loader import load_tokenizer

    tok = load_tokenizer(tiny_llama_dir)
    model, config = load_model(tiny_llama_dir, mode="reference", device="cpu", use_cache=False)
    lora.attach(model)
    init = lora.read_adapter(adapter_dir, model.spec) if adapter_dir else None
    trainable = Trainable(model.spec, 8, 8.0, init, torch.device("cpu"))
    return tok, model, config, trainable


def test_kv_cache_rollout_is_the_plain_forwards_greedy_answer(tiny_llama_dir):
    tok, model, config, trainable = load(tiny_llama_dir)
    torch.nn.init.normal_(trainable.b["0_q_proj"], std=0.1)  # an adapter that changes things
    adapter = trainable.adapter()
    _, prompt = encode_chat(tok, [{"role": "user", "content": "hello"}], chat_template_for(tok))
    greedy = SamplingConfig(candidates=2, max_tokens=10, temperature=0)
    got = sample(model, adapter, prompt, greedy, set(), torch.Generator(), torch.device("cpu"))
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(10):  # the plain forward (no cache) over the whole row, each token
            with forward_context(_context(len(ids), adapter)):
                hidden = model(torch.tensor(ids), torch.arange(len(ids)))
            ids.append(model.compute_logits(hidden[-1:]).argmax().item())
    assert got == [ids[len(prompt) :]] * 2


def sampled_reward(tiny_llama_dir: Path, adapter_dir: Path | None, question: str) -> float:
    """The mean reward of 16 answers sampled (seeded) with the adapter, or the base model."""
    tok, model, config, trainable = load(tiny_llama_dir, adapter_dir)
    _, prompt = encode_chat(tok, [{"role": "user", "content": question}], chat_template_for(tok))
    generator = torch.Generator().manual_seed(0)
    sampling = SamplingConfig(candidates=16, max_tokens=8)
    eos = set(config.eos_token_ids)
    answers = sample(model, trainable.adapter(), prompt, sampling, eos, generator, torch.device("cpu"))  # fmt: skip
    rows = [{"messages": [{"role": "assistant", "content": tok.decode(a)}], "ground_truth": "e"} for a in answers]  # fmt: skip
    return sum(share_of_e(rows)) / len(rows)


@pytest.mark.parametrize("method", ["grpo", "dapo"])
def test_grpo_raises_the_reward(tiny_llama_dir, tmp_path, method):
    config = TrainConfig(
        base_path=str(tiny_llama_dir), dataset_path=str(write_prompts(tmp_path / "rows.jsonl")),
        output_dir=str(tmp_path / "out"), method=method, epochs=2, learning_rate=2e-2,
        device="cpu", sampling={"candidates": 4, "max_tokens": 8},
        kl_beta=0.01 if method == "grpo" else 0.0,
    )  # fmt: skip
    reports: list[dict] = []
    result = train(config, reports.append, reward=share_of_e)
    assert result.steps == 8 and reports[-1]["percent"] == 100
    rewards = [r["meanReward"] for r in reports]
    assert sum(rewards[-2:]) / 2 > 2 * sum(rewards[:2]) / 2, rewards
    assert ("kl" in reports[-1]) == (method == "grpo")
    # the written adapter, on a trained prompt and an unseen one: about 0.04 before, 0.3 after
    for question in ("hello", "a question never seen"):
        base = sampled_reward(tiny_llama_dir, None, question)
        tuned = sampled_reward(tiny_llama_dir, tmp_path / "out", question)
        assert tuned > base + 0.15, (question, base, tuned)


def test_failed_scores_are_dropped_and_equal_groups_skipped(tiny_llama_dir, tmp_path):
    def reward(rows):  # the first candidate's evaluation fails; the others all score 1
        return [None] + [1.0] * (len(rows) - 1)

    config = TrainConfig(
        base_path=str(tiny_llama_dir), dataset_path=str(write_prompts(tmp_path / "rows.jsonl")),
        output_dir=str(tmp_path / "out"), method="grpo", device="cpu",
        sampling={"candidates": 3, "max_tokens": 4},
    )  # fmt: skip
    reports: list[dict] = []
    train(config, reports.append, reward=reward)
    assert reports[-1]["skippedGroups"] == 4 and reports[-1]["droppedRollouts"] == 4
    assert all(r["loss"] == 0 and r["meanReward"] == 1 for r in reports)


def test_carved_out_prompts_are_scored_each_epoch(tiny_llama_dir, tmp_path):
    """evalAutoCarveout: the last prompt (10%, at least one) is held out, answered greedily and
    scored at each epoch's end (evalReward); the other three train."""
    seen: list[str] = []

    def reward(rows):
        seen.extend(row["messages"][0]["content"] for row in rows)
        return share_of_e(rows)

    config = TrainConfig(
        base_path=str(tiny_llama_dir), dataset_path=str(write_prompts(tmp_path / "rows.jsonl")),
        output_dir=str(tmp_path / "out"), method="grpo", device="cpu", epochs=2,
        eval_carveout=True, sampling={"candidates": 2, "max_tokens": 4},
    )  # fmt: skip
    reports: list[dict] = []
    result = train(config, reports.append, reward=reward)
    assert result.steps == 6  # 3 prompts a epoch
    evals = [r for r in reports if "evalReward" in r]
    assert [r["epoch"] for r in evals] == [1, 2] and evals[0]["evalFailedRollouts"] == 0, evals
    assert all(0 <= r["evalReward"] <= 1 for r in evals)
    # the held-out prompt: one greedy answer an epoch, never a training rollout
    assert seen.count(QUESTIONS[-1]) == 2 and seen.count(QUESTIONS[0]) == 4, seen


def test_each_criterions_reward_is_reported(tiny_llama_dir, tmp_path):
    """An evaluator of several criteria: each step's mean score of each (criteriaRewards)."""
    from girandole.evaluators.runner import Score

    def reward(rows):
        return [Score(0.5, criteria={"a": 1.0, "b": 0.0})] * len(rows)

    config = TrainConfig(
        base_path=str(tiny_llama_dir), dataset_path=str(write_prompts(tmp_path / "rows.jsonl")),
        output_dir=str(tmp_path / "out"), method="grpo", device="cpu",
        batch_size_samples=4, sampling={"candidates": 2, "max_tokens": 2},
    )  # fmt: skip
    reports: list[dict] = []
    train(config, reports.append, reward=reward)
    assert reports[-1]["criteriaRewards"] == {"a": 1.0, "b": 0.0} and reports[-1]["meanReward"] == 0.5  # fmt: skip


def test_an_epoch_whose_evaluations_all_fail_stops_the_job(tiny_llama_dir, tmp_path):
    from girandole.evaluators.runner import Score
    from girandole.finetune.grpo import EvaluationsFailed

    calls: list[int] = []

    def reward(rows):  # the evaluator's own failure (a Score with its error)
        calls.append(len(rows))
        return [Score(None, error="KeyError: 'answer'")] * len(rows)

    config = TrainConfig(
        base_path=str(tiny_llama_dir), dataset_path=str(write_prompts(tmp_path / "rows.jsonl")),
        output_dir=str(tmp_path / "out"), method="dapo", device="cpu", epochs=5,
        sampling={"candidates": 2, "max_tokens": 2},
    )  # fmt: skip
    with pytest.raises(EvaluationsFailed, match=re.escape("all 8 rollouts of epoch 1, so nothing was learnt; its first error: KeyError: 'answer'")):  # fmt: skip
        train(config, lambda _: None, reward=reward)
    assert len(calls) == 4  # the first epoch only
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("line", "says"),
    [
        ("not json", "line 2 is not valid JSON"),
        ('{"prompt": "x"}', "line 2: a row is an object"),
        ('{"messages": []}', "line 2: messages is empty"),
        ('{"messages": [{"role": "bot", "content": "q"}]}', "line 2: messages[0].role"),
        ('{"messages": [{"role": "user", "content": 1}]}', "messages[0].content must be a string"),
        (
            '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content":'
            ' "a"}]}',
            "line 2: the last message is the assistant's",
        ),  # fmt: skip
    ],
)
def test_bad_rows_name_their_line(line, says):
    good = '{"messages": [{"role": "user", "content": "q"}], "ground_truth": 3}'
    assert read_prompts(f"{good}\n".encode())[0]["ground_truth"] == 3
    with pytest.raises(RowError, match=re.escape(says)):
        read_prompts(f"{good}\n{line}\n".encode())


def test_a_terminated_worker_ends_its_evaluator(tiny_llama_dir, tmp_path):
    """Cancel terminates the training process (SIGTERM): its evaluator's child process and
    folder go with it (the folder is made under the worker's TMPDIR)."""
    import os
    import signal
    import subprocess
    import sys

    spec = {
        "base_path": str(tiny_llama_dir), "dataset_path": str(write_prompts(tmp_path / "rows.jsonl")),
        "output_dir": str(tmp_path / "out"), "method": "grpo", "epochs": 1000, "device": "cpu",
        "sampling": {"candidates": 2, "max_tokens": 4},
        "evaluator": {"files": {"main.py": "def evaluate(messages, **kw):\n    return len(messages[-1]['content'])\n"}, "entryFile": "main.py", "entryFunc": "evaluate"},
    }  # fmt: skip
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    worker = subprocess.Popen(
        [sys.executable, "-m", "girandole.finetune.worker", str(tmp_path / "spec.json")],
        stdout=subprocess.PIPE, env={**os.environ, "TMPDIR": str(scratch)},
    )  # fmt: skip
    try:
        first = json.loads(worker.stdout.readline())
        assert first["progress"]["step"] == 1, first
        assert [p.name[:20] for p in scratch.iterdir()] == ["girandole-evaluator-"]
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=30) == 1
    finally:
        worker.kill()
        worker.stdout.close()
    assert list(scratch.iterdir()) == []
