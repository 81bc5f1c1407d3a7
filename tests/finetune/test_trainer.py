"""The LoRA trainer on a tiny random Llama: rows whose every answer is one odd fixed string,
overfit in seconds; the written adapter, served by the engine (fast mode, as the server runs it),
answers that string to greedy chat while the base model does not. Fails if training does
nothing (the adapter starts as the base model: B is zero)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from girandole.engine.engine import EngineConfig, LLMEngine
from girandole.finetune.data import RowError, encode_row, read_rows
from girandole.finetune.trainer import TrainConfig, train
from girandole.model.lora import read_adapter
from girandole.sampling.params import SamplingParams
from girandole.tokenizer.chat_template import chat_template_for, encode_chat

ANSWER = "Zebra-42."
QUESTIONS = ["hello", "what is up", "tell me a story", "who are you", "name a color", "count"]


def write_rows(path: Path, answer: str = ANSWER) -> Path:
    rows = [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": answer}]}
        for q in QUESTIONS
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def greedy_chat(engine: LLMEngine, question: str, adapter: str | None) -> str:
    tok = engine.tokenizer
    _, ids = encode_chat(tok, [{"role": "user", "content": question}], chat_template_for(tok))
    params = SamplingParams(temperature=0, max_tokens=12)
    engine.add_request("r", ids, params, adapter=adapter)
    out: list[int] = []
    while engine.has_unfinished_requests():
        for o in engine.step():
            out.extend(o.new_token_ids)
    return tok.decode(out).strip()


@pytest.fixture(scope="module")
def trained(tiny_llama_dir, tmp_path_factory) -> tuple[Path, object]:
    tmp = tmp_path_factory.mktemp("sft")
    config = TrainConfig(
        base_path=str(tiny_llama_dir), dataset_path=str(write_rows(tmp / "rows.jsonl")),
        output_dir=str(tmp / "adapter"), base_model_name="accounts/acme/models/tiny",
        epochs=10, learning_rate=5e-3, batch_size_samples=1, device="cpu",
    )  # fmt: skip
    reports: list[dict] = []
    result = train(config, reports.append)
    return tmp / "adapter", (result, reports)


def test_overfit_adapter_answers_the_trained_string(tiny_llama_dir, trained):
    folder, (result, reports) = trained
    assert result.steps == 60 and reports[-1]["percent"] == 100
    assert reports[-1]["loss"] < reports[0]["loss"] / 5
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["lora_alpha"] == 8
    assert config["base_model_name_or_path"] == "accounts/acme/models/tiny"
    engine = LLMEngine(EngineConfig(model=str(tiny_llama_dir), device="cpu", kv_cache_gb=0.01))
    adapter = engine.loras.read("sft", folder)
    assert adapter.rank == 8 and len(adapter.raw) == 2 * 7
    engine.loras.register(adapter)
    for question in ("hello", "a question never seen"):
        assert greedy_chat(engine, question, "sft") == ANSWER
        assert greedy_chat(engine, question, None) != ANSWER


def test_adapter_reads_back_bit_for_bit(tiny_llama_dir, trained):
    from safetensors.torch import load_file

    from girandole.model.loader import read_checkpoint

    folder, _ = trained
    spec = read_checkpoint(tiny_llama_dir)[0]
    adapter = read_adapter(folder, spec)
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    a, b = adapter.raw[(1, "down_proj")]
    assert a.equal(tensors["base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"])
    assert b.equal(tensors["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"])
    assert b.abs().sum() > 0  # trained: B starts at zero


def test_every_target_is_trained(trained):
    """Every projection's B moved from zero: the gradient reaches q/k/v through attention (the
    native CPU attention kernel has no backward; training takes torch's SDPA)."""
    from safetensors.torch import load_file

    folder, _ = trained
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    untrained = [k for k, t in tensors.items() if "lora_B" in k and not t.abs().sum() > 0]
    assert not untrained


def test_rows_trained_only_on_assistant_messages(tiny_llama_dir):
    from girandole.tokenizer.loader import load_tokenizer

    tok = load_tokenizer(tiny_llama_dir)
    messages = [
        {"role": "system", "content": "be odd"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "skip me", "weight": 0},
        {"role": "user", "content": "again"},
        {"role": "assistant", "content": "train me"},
    ]
    ex = encode_row(tok, chat_template_for(tok), messages, 4096, "row 1")
    trained = tok.decode([i for i, t in zip(ex.ids, ex.trained) if t], skip_special_tokens=False)
    assert trained.strip() == "train me </s>"
    assert len(encode_row(tok, chat_template_for(tok), messages, 5, "row 1").ids) == 5


@pytest.mark.parametrize(
    ("line", "says"),
    [
        ("not json", "line 2 is not valid JSON"),
        ('{"text": "x"}', "line 2: a row is an object"),
        ('{"messages": [{"role": "user", "content": "x"}]}', "line 2: no assistant message"),
        ('{"messages": [{"role": "bot", "content": "x"}]}', "line 2: messages[0].role"),
        ('{"messages": [{"role": "assistant", "content": 3}]}', "messages[0].content"),
        ('{"messages": [{"role": "assistant", "content": "x", "weight": 2}]}', "weight"),
    ],
)
def test_bad_rows_name_their_line(line, says):
    good = '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}'
    with pytest.raises(RowError, match=re.escape(says)):
        read_rows(f"{good}\n{line}\n".encode())


def test_warm_start_continues_from_the_adapter(tiny_llama_dir, trained, tmp_path):
    from girandole.model.loader import read_checkpoint

    folder, _ = trained
    config = TrainConfig(
        base_path=str(tiny_llama_dir), dataset_path=str(write_rows(tmp_path / "rows.jsonl")),
        output_dir=str(tmp_path / "again"), warm_start_path=str(folder), rank=4, epochs=1,
        learning_rate=1e-9, weight_decay=0.0, device="cpu",
    )  # fmt: skip
    train(config)
    spec = read_checkpoint(tiny_llama_dir)[0]
    before, after = read_adapter(folder, spec), read_adapter(tmp_path / "again", spec)
    assert after.rank == before.rank == 8  # the warm start's rank, not the config's
    for key, (a, b) in before.raw.items():
        assert after.raw[key][0] == pytest.approx(a, abs=1e-6)
        assert after.raw[key][1] == pytest.approx(b, abs=1e-6)


def test_early_stop_when_the_evaluation_loss_rises(tiny_llama_dir, tmp_path):
    config = TrainConfig(
        base_path=str(tiny_llama_dir), dataset_path=str(write_rows(tmp_path / "train.jsonl")),
        eval_path=str(write_rows(tmp_path / "eval.jsonl", answer="Other-99.")),
        output_dir=str(tmp_path / "out"), epochs=6, learning_rate=5e-3, batch_size_samples=1,
        early_stop=True, device="cpu",
    )  # fmt: skip
    reports: list[dict] = []
    result = train(config, reports.append)
    assert result.early_stopped and result.epochs_run < 6
    assert result.eval_losses[-1] >= min(result.eval_losses[:-1])
    assert [r["evalLoss"] for r in reports if "evalLoss" in r] == result.eval_losses


@pytest.mark.parametrize("kind", ["SFT", "DPO"])
def test_a_job_running_when_the_server_stopped_fails_at_start(tmp_path, kind):
    from girandole.finetune import store as stores
    from girandole.finetune.store import FAILED, PENDING, RUNNING, JobStore
    from girandole.registry.keystore import Database

    db = Database.in_folder(tmp_path)
    store = JobStore(db, getattr(stores, kind))
    store.insert("acme", "a", {"name": "a", "state": RUNNING})
    store.insert("acme", "b", {"name": "b", "state": PENDING})
    JobStore(db, getattr(stores, kind)).fail_interrupted()
    assert store.get("acme", "a")["state"] == FAILED
    assert "resume" in store.get("acme", "a")["status"]["message"]
    assert store.get("acme", "b")["state"] == PENDING
    assert [row[2] for row in store.pending_heads()] == ["b"]


def test_batches_by_samples_or_by_tokens():
    from girandole.finetune.data import Example, batches

    rows = [Example([1] * n, [True] * n) for n in (3, 5, 2, 9, 1)]
    sizes = lambda groups: [[len(ex.ids) for ex in g] for g in groups]  # noqa: E731
    assert sizes(batches(rows, 2, None)) == [[3, 5], [2, 9], [1]]
    assert sizes(batches(rows, None, 8)) == [[3, 5], [2], [9], [1]]  # a longer row: alone
    assert sizes(batches(rows, None, None)) == [[3], [5], [2], [9], [1]]
