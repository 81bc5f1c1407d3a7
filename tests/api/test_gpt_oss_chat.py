"""gpt-oss through a real server and the openai client: a tiny random GptOss checkpoint with a
harmony tokenizer (the markers special tokens, as in o200k_harmony) and a harmony chat template.
A grammar makes the model write a harmony answer (analysis, then final); the analysis comes back
as `reasoning_content`, the final channel as `content`, whole and streamed; reasoning_effort
reaches the template; "none" is a 400."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import openai
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from api_helpers import API_KEY, ROOT, api_conftest  # noqa: E402

MODEL = "accounts/fireworks/models/tiny-gpt-oss"
TEMPLATE = ROOT / "tests" / "data" / "harmony_chat_template.jinja"
SPECIALS = [
    "<|endoftext|>", "<|start|>", "<|end|>", "<|message|>", "<|channel|>", "<|constrain|>",
    "<|return|>", "<|call|>",
]  # fmt: skip
THOUGHT = "The user says hi."
ANSWER = "Hello there."
HARMONY_ANSWER = {
    "type": "grammar",
    "grammar": 'root ::= "<|channel|>analysis<|message|>' + THOUGHT
    + '<|end|><|start|>assistant<|channel|>final<|message|>' + ANSWER + '"',
}  # fmt: skip
HI = [{"role": "user", "content": "hi"}]
# the random model spells the grammar's markers in byte tokens, not as the marker tokens
MAX_TOKENS = 256


def write_tiny_gpt_oss(folder: Path) -> Path:
    import torch
    import transformers as tf
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import TRAIN_TEXT

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([TRAIN_TEXT + " assistant analysis final"], trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"eos_token": "<|return|>", "pad_token": "<|endoftext|>",
                    "add_bos_token": False, "tokenizer_class": "PreTrainedTokenizerFast"})
    )  # fmt: skip
    (folder / "chat_template.jinja").write_text(TEMPLATE.read_text())
    eos = [tok.token_to_id(t) for t in ("<|return|>", "<|endoftext|>", "<|call|>")]
    torch.manual_seed(0)
    config = tf.GptOssConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=32,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        num_local_experts=4, num_experts_per_tok=2, sliding_window=8,
        max_position_embeddings=2048, eos_token_id=eos, pad_token_id=eos[1],
    )  # fmt: skip
    model = tf.AutoModelForCausalLM.from_config(config).float()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("sinks"):
                p.normal_(0, 1.0)
    model.save_pretrained(folder)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": eos}))
    return folder


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gpt-oss")
    model = write_tiny_gpt_oss(tmp / "tiny-gpt-oss")
    srv = api_conftest().start_server(
        tmp, "--model", str(model), "--model-id", "tiny-gpt-oss", "--api-key", API_KEY,
        "--kv-cache-gb", "0.02", "--max-model-len", "2048", api_key=API_KEY,
    )  # fmt: skip
    yield srv
    api_conftest().stop_server(srv)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/inference/v1", api_key=API_KEY)


def test_the_tokenizer_keeps_harmony_markers_as_text(server):
    from girandole.tokenizer.loader import load_tokenizer

    tok = load_tokenizer(Path(server.log_path).parent / "tiny-gpt-oss")
    text = "<|channel|>final<|message|>hi<|end|>"
    ids = tok.encode(text, add_bos=False)
    assert tok.token_to_id("<|channel|>") in ids  # one token each, as before
    assert tok.decode(ids) == text
    end, ret = tok.token_to_id("<|end|>"), tok.token_to_id("<|return|>")
    assert ret in tok.stop_token_ids and end not in tok.stop_token_ids
    assert tok.decode([ret]) == ""
    # safe tokenization reads a user's marker as text, as it reads any special string
    assert "<|end|>" in tok.special_tokens
    assert end not in tok.encode("a <|end|> b", add_bos=False, parse_special=False)
    assert end in tok.encode("a <|end|> b", add_bos=False)


def test_analysis_is_reasoning_and_final_is_content(client):
    out = client.chat.completions.create(
        model=MODEL, messages=HI, max_tokens=MAX_TOKENS, temperature=0,
        extra_body={"response_format": HARMONY_ANSWER, "reasoning_effort": "low"},
    )  # fmt: skip
    message = out.choices[0].message
    assert message.content == ANSWER
    assert message.model_extra["reasoning_content"] == THOUGHT
    assert out.choices[0].finish_reason == "stop"
    details = out.usage.completion_tokens_details
    assert 0 < details.reasoning_tokens < out.usage.completion_tokens


def test_streamed_the_same(client):
    stream = client.chat.completions.create(
        model=MODEL, messages=HI, max_tokens=MAX_TOKENS, temperature=0, stream=True,
        extra_body={"response_format": HARMONY_ANSWER},
    )  # fmt: skip
    reasoning, content = [], []
    for chunk in stream:
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        reasoning.append((delta.model_extra or {}).get("reasoning_content") or "")
        content.append(delta.content or "")
        assert "<|" not in content[-1] and "<|" not in reasoning[-1]
    assert "".join(reasoning) == THOUGHT
    assert "".join(content) == ANSWER


@pytest.mark.parametrize("effort", ["low", "high"])
def test_reasoning_effort_reaches_the_template(client, effort):
    out = client.chat.completions.create(
        model=MODEL, messages=HI, max_tokens=1, reasoning_effort=effort,
        extra_body={"raw_output": True},
    )  # fmt: skip
    raw = out.choices[0].model_extra["raw_output"]
    prompt = "".join(raw["prompt_fragments"])
    assert f"Reasoning: {effort}" in prompt
    assert prompt.endswith("<|start|>assistant")


def test_earlier_reasoning_reaches_the_template_as_thinking(client):
    messages = [
        *HI,
        {"role": "assistant", "content": "Hello.", "reasoning_content": "Greet back."},
        {"role": "user", "content": "again"},
    ]
    out = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=1, extra_body={"raw_output": True}
    )
    prompt = "".join(out.choices[0].model_extra["raw_output"]["prompt_fragments"])
    assert "<|channel|>analysis<|message|>Greet back.<|end|>" in prompt


def test_reasoning_effort_none_is_a_400(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(
            model=MODEL, messages=HI, max_tokens=4, reasoning_effort="none"
        )
    assert "reasoning_effort" in str(err.value) and "always reasons" in str(err.value)


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}
HARMONY_CALL = {
    "type": "grammar",
    "grammar": 'root ::= "<|channel|>analysis<|message|>Need weather.<|end|><|start|>assistant'
    "<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>"
    '{\\"city\\": \\"Paris\\"}"',
}


@pytest.mark.parametrize("stream", [False, True])
def test_harmony_tool_call_is_a_tool_call(client, stream):
    body = dict(
        model=MODEL, messages=HI, max_tokens=MAX_TOKENS, temperature=0, tools=[WEATHER],
        extra_body={"response_format": HARMONY_CALL},
    )  # fmt: skip
    if not stream:
        out = client.chat.completions.create(**body)
        choice = out.choices[0]
        message = choice.message
        assert message.model_extra["reasoning_content"] == "Need weather."
        calls, content, finish = message.tool_calls, message.content, choice.finish_reason
        name, args = calls[0].function.name, calls[0].function.arguments
    else:
        name, args, content, finish = None, "", "", None
        for chunk in client.chat.completions.create(**body, stream=True):
            if not chunk.choices:
                continue
            delta = chunk.choices[0].delta
            content += delta.content or ""
            for call in delta.tool_calls or []:
                name = call.function.name or name
                args += call.function.arguments or ""
            finish = chunk.choices[0].finish_reason or finish
    assert name == "get_weather" and json.loads(args) == {"city": "Paris"}
    assert not content and finish == "tool_calls"
