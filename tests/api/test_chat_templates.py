"""/chat/completions feeds exactly transformers' apply_chat_template for each built-in family
(Gemma is checked on the default model in test_chat.py): tiny random models served over real
HTTP, one per family, whose tokenizers carry that family's special tokens.

- llama3: the template comes from the model's own tokenizer_config.json;
- chatml: the server is started with `--chat-template FILE` (Qwen2's template, which adds a
  default system prompt that the built-in ChatML lacks);
- llama2: no template anywhere: the built-in one, found from the model's <s>/</s>.

The tiny models' final norm is zeroed, so every logit is 0 and greedy decoding picks token 0,
which is the family's end-of-turn token here (not EOS): generation ends at once on it.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from api_helpers import ROOT

from girandole.tokenizer.chat_template import BUILTIN_TEMPLATES

_spec = importlib.util.spec_from_file_location(
    "_girandole_api_conftest", Path(__file__).with_name("conftest.py")
)
_servers = sys.modules.get(_spec.name) or importlib.util.module_from_spec(_spec)
if _spec.name not in sys.modules:  # start_server/stop_server of tests/api/conftest.py
    sys.modules[_spec.name] = _servers
    _spec.loader.exec_module(_servers)

SYSTEM = {"role": "system", "content": "You are a terse assistant. Answer in one line."}
U1 = {"role": "user", "content": "  What is 2+2? 🌁  "}
A1 = {"role": "assistant", "content": "4."}
U2 = {"role": "user", "content": "And 中文 3*3?\nThink step by step."}
CONVERSATIONS = {
    "single": [U1],
    "system": [SYSTEM, U1],
    "multi": [U1, A1, U2],
    "system-multi": [SYSTEM, U1, A1, U2],
    "continue": [SYSTEM, U1, {"role": "assistant", "content": "Sure: the answer"}],
    "tool": [
        U1,
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "add", "arguments": "{}"}}]},
        {"role": "tool", "content": "4", "tool_call_id": "c1"},
    ],
}  # fmt: skip

# Qwen2's template: ChatML with a default system prompt; served through --chat-template, it
# shows the flag overrides the built-in ChatML template.
QWEN2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
TEMPLATES = {
    "llama3": BUILTIN_TEMPLATES["llama3"],
    "chatml": QWEN2_TEMPLATE,
    "llama2": BUILTIN_TEMPLATES["llama2"],
}

# family -> (special tokens, id 0 first = the end-of-turn token; bos; eos)
FAMILIES = {
    "llama3": (
        ["<|eot_id|>", "<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
         "<|end_header_id|>"],
        "<|begin_of_text|>",
        "<|end_of_text|>",
    ),
    "chatml": (["<|im_end|>", "<|endoftext|>", "<|im_start|>"], None, "<|endoftext|>"),
    "llama2": (["</s>", "<s>", "<unk>"], "<s>", "</s>"),
}  # fmt: skip


def write_family_model(folder: Path, family: str) -> Path:
    """A tiny Llama whose tokenizer has `family`'s special tokens; every logit is 0."""
    import torch
    from safetensors.torch import load_file, save_file
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM

    specials, bos, eos = FAMILIES[family]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    corpus = [m["content"] for msgs in CONVERSATIONS.values() for m in msgs] * 4
    tok.train_from_iterator(corpus, trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    config = {"bos_token": bos, "eos_token": eos, "add_bos_token": bos is not None}
    if family == "llama3":  # the model's own template
        config["chat_template"] = BUILTIN_TEMPLATES["llama3"]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=tok.get_vocab_size(),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=1024,
            bos_token_id=tok.token_to_id(bos) if bos else None,
            eos_token_id=tok.token_to_id(eos),
            tie_word_embeddings=False,
        )
    )
    model.save_pretrained(folder, safe_serialization=True)
    path = folder / "model.safetensors"
    tensors = load_file(str(path))
    tensors["model.norm.weight"].zero_()
    save_file(tensors, str(path), metadata={"format": "pt"})
    return folder


@pytest.fixture(scope="module", params=["llama3", "chatml", "llama2"])
def family_server(request, tmp_path_factory):
    """(family, server, transformers tokenizer over the same tokenizer.json)."""
    transformers = pytest.importorskip("transformers")
    family = request.param
    tmp = tmp_path_factory.mktemp(f"chat-{family}")
    folder = write_family_model(tmp / "model", family)
    args = ["--model", str(folder), "--model-id", f"tiny-{family}", "--account", "testing",
            "--kv-cache-gb", "0.01"]  # fmt: skip
    if family == "chatml":
        template = tmp / "chatml.jinja"
        template.write_text(QWEN2_TEMPLATE)
        args += ["--chat-template", str(template)]
    if family == "llama2":  # the 2025 placement of streamed usage: on each finish chunk
        args += ["--stream-usage", "finish"]
    server = _servers.start_server(tmp, *args, api_key=None)
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    ref = transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(folder / "tokenizer.json"),
        bos_token=cfg.get("bos_token"),
        eos_token=cfg.get("eos_token"),
    )
    yield family, server, ref
    _servers.stop_server(server)


def model_of(server) -> str:
    return httpx.get(server.url + "/v1/models").json()["data"][0]["id"]


def ref_ids(ref, family, messages) -> list[int]:
    cont = messages[-1]["role"] == "assistant"
    out = ref.apply_chat_template(
        messages,
        chat_template=TEMPLATES[family],
        tokenize=True,
        add_generation_prompt=not cont,
        continue_final_message=cont,
    )
    return list(out["input_ids"]) if hasattr(out, "keys") else list(out)


def test_prompt_matches_transformers(family_server):
    family, server, ref = family_server
    model = model_of(server)
    for name, messages in CONVERSATIONS.items():
        if name == "tool" and family == "llama2":
            continue  # Llama 2's template has no tool role (roles must alternate)
        r = httpx.post(
            server.url + "/v1/chat/completions",
            json={"model": model, "messages": messages, "max_tokens": 1, "temperature": 0,
                  "raw_output": True},
            timeout=60,
        )  # fmt: skip
        assert r.status_code == 200, (name, r.text)
        body = r.json()
        expected = ref_ids(ref, family, messages)
        assert body["choices"][0]["raw_output"]["prompt_token_ids"] == expected, name
        assert body["usage"]["prompt_tokens"] == len(expected)
        if ref.bos_token_id is not None:  # BOS is never doubled
            assert expected[0] == ref.bos_token_id and expected[1] != ref.bos_token_id


def test_end_of_turn_ends_generation_and_supports_chat(family_server):
    family, server, ref = family_server
    entry = httpx.get(server.url + "/v1/models").json()["data"][0]
    assert entry["supports_chat"] is True
    r = httpx.post(
        server.url + "/inference/v1/chat/completions",
        json={"model": entry["id"], "messages": [U1], "max_tokens": 5, "temperature": 0,
              "logprobs": True},
        timeout=60,
    )  # fmt: skip
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    # token 0 (<|eot_id|>, <|im_end|>; Llama 2 ends turns with EOS </s>) ends the turn at once
    assert choice["finish_reason"] == "stop" and choice["message"]["content"] == ""
    assert r.json()["usage"]["completion_tokens"] == 1
    (entry0,) = choice["logprobs"]["content"]
    assert entry0["token_id"] == 0 and entry0["text_offset"] == 0
    assert entry0["token"] == FAMILIES[family][0][0]


def test_an_omitted_length_runs_to_the_context(family_server):
    """Chat's default length is 2048 (Fireworks' chat guide), above these models' 1,024-token
    context: a request that sets none runs to the context, even under
    context_length_exceeded_behavior "error", which refuses only a length the client asked for."""
    family, server, ref = family_server
    body = {
        "model": model_of(server),
        "messages": [U1],
        "context_length_exceeded_behavior": "error",
        "ignore_eos": True,
        "temperature": 0,
    }
    r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    usage = r.json()["usage"]
    assert r.json()["choices"][0]["finish_reason"] == "length"
    assert usage["prompt_tokens"] + usage["completion_tokens"] == 1024
    r = httpx.post(
        server.url + "/v1/chat/completions", json={**body, "max_tokens": 2048}, timeout=60
    )
    assert r.status_code == 400 and "max_tokens (2048)" in r.json()["error"]["message"]


def test_stream_usage_placement(family_server):
    family, server, ref = family_server
    body = {"model": model_of(server), "messages": [U1], "n": 2, "temperature": 0, "stream": True}
    r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)
    blocks = [b[len("data: ") :] for b in r.text.split("\n\n") if b]
    assert blocks[-1] == "[DONE]"
    chunks = [json.loads(b) for b in blocks[:-1]]
    finishes = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert [c["choices"][0]["finish_reason"] for c in finishes] == ["stop", "stop"]
    if family == "llama2":  # --stream-usage finish: a running total on each finish chunk
        assert [c["usage"]["completion_tokens"] for c in finishes] == [1, 2]
        assert all(c["choices"] for c in chunks)
    else:
        assert all(c["usage"] is None for c in finishes)
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 2


def test_client_disconnect_aborts(family_server):
    family, server, ref = family_server
    # temperature 1 on all-zero logits: uniform over the vocabulary, so mostly visible text
    body = {"model": model_of(server), "messages": [U1], "max_tokens": 1000, "ignore_eos": True,
            "temperature": 1.0, "stream": True}  # fmt: skip
    before = server.health()["num_aborted_requests"]
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as r:
        for line in r.iter_lines():
            if '"content"' in line:
                break  # hang up after the first content chunk
    server.wait_idle()
    assert server.health()["num_aborted_requests"] == before + 1


def test_bad_chat_template_stops_serve(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "girandole.cli", "serve", "--chat-template",
         str(tmp_path / "missing.jinja"), "--port", "0"],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "chat template file not found" in proc.stderr
