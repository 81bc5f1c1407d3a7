"""RLOR rollout rows (finetune/rlor.py) with the tiny tokenizer: a raw row trains the
completion's tokens only; a multi-turn chat row trains its last answer only (the prompt's own
assistant turn is prompt); rows group by prompt; a group of equal rewards is skipped."""

from __future__ import annotations

import json

import pytest

from girandole.finetune.data import RowError
from girandole.finetune.rlor import (
    Group,
    RolloutObjective,
    encode_rollout,
    load_groups,
    read_rollouts,
)
from girandole.tokenizer.chat_template import chat_template_for


def lines(*rows: dict) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def test_trained_tokens_are_the_answers(tiny_llama_dir):
    from girandole.tokenizer.loader import load_tokenizer

    tok = load_tokenizer(tiny_llama_dir)
    template = chat_template_for(tok)
    raw, chat = read_rollouts(lines(
        {"prompt": "hello", "completion": " there", "reward": 1},
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "first"},
                      {"role": "user", "content": "b"}, {"role": "assistant", "content": "second"}],
         "evaluation_result": {"score": 0.5}, "ground_truth": "x"},
    ))  # fmt: skip
    ex = encode_rollout(tok, template, raw, 64, "line 1")
    answer = [i for i, t in zip(ex.ids, ex.trained) if t]
    assert answer == tok.encode(" there", add_bos=False) and ex.ids[: -len(answer)] == tok.encode("hello")  # fmt: skip
    ex = encode_rollout(tok, template, chat, 256, "line 2")
    trained = tok.decode([i for i, t in zip(ex.ids, ex.trained) if t])
    assert "second" in trained and "first" not in trained, trained
    assert chat.reward == 0.5
    with pytest.raises(RowError, match="line 1: its prompt is .* leaving none of the answer"):
        encode_rollout(tok, template, raw, 2, "line 1")


def test_rows_group_by_prompt_and_equal_groups_teach_nothing(tiny_llama_dir, tmp_path):
    import torch

    from girandole.tokenizer.loader import load_tokenizer

    tok = load_tokenizer(tiny_llama_dir)
    path = tmp_path / "rows.jsonl"
    path.write_bytes(lines(
        {"prompt": "p", "completion": " a", "reward": 1}, {"prompt": "q", "completion": " a", "reward": 2},
        {"prompt": "p", "completion": " b", "reward": 0}, {"prompt": "q", "completion": " b", "reward": 2},
    ))  # fmt: skip
    groups = load_groups(path, tok, None, 64)
    assert [g.rewards for g in groups] == [[1.0, 0.0], [2.0, 2.0]]
    objective = RolloutObjective(kl_beta=0.0, token_level=False)
    equal = Group(groups[1].examples, groups[1].rewards)
    assert list(objective.losses(torch.nn.Identity(), None, [equal], torch.device("cpu"))) == []
    assert objective.stats() == {"meanReward": 2.0, "rollouts": 2, "groups": 1, "stepSkippedGroups": 1, "skippedGroups": 1}  # fmt: skip
