"""POST /tokenize and /detokenize (vLLM's, llama.cpp's forms too) on the real default-model
server: the ids are the ones /v1/completions and /v1/chat/completions run (their
`prompt_token_ids` with `return_token_ids`), the round trip through /detokenize gives the text
back, and the inference routes' rules hold (key, model, Fireworks' 400s, no usage row)."""

from __future__ import annotations

import sys
from pathlib import Path

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from api_helpers import DEPLOYMENT, MODEL, WEATHER_PARAMETERS, post, usage_row  # noqa: E402

ASK = [
    {"role": "system", "content": "Be terse."},
    {"role": "user", "content": "What is the capital of France?"},
]
TOOLS = [
    {
        "type": "function",
        "function": {"name": "get_weather", "description": "The weather in a city",
                     "parameters": WEATHER_PARAMETERS},
    }
]  # fmt: skip


def tokenize(server, body: dict | bytes, path: str = "/tokenize", headers=None) -> httpx.Response:
    """A tokenizer route, `model` left out unless the body names one."""
    headers = {**server.headers, **(headers or {})}
    if isinstance(body, bytes):
        return httpx.post(server.url + path, content=body, headers=headers, timeout=60)
    return httpx.post(server.url + path, json=body, headers=headers, timeout=60)


def run_ids(server, body: dict, path: str) -> list[int]:
    """The prompt ids a real inference request runs (`return_token_ids`)."""
    r = post(server, {**body, "max_tokens": 1, "temperature": 0, "return_token_ids": True}, path)
    assert r.status_code == 200, r.text
    ids = r.json()["choices"][0]["prompt_token_ids"]
    assert r.json()["usage"]["prompt_tokens"] == len(ids)
    return ids


def check_error(r: httpx.Response, status: int, words: str, param: str | None = None) -> None:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["object"] == "error" and words in error["message"], error
    if param is not None:
        assert error["param"] == param, error


@pytest.mark.parametrize("prompt", ["Hello world", "<start_of_turn>user\nhi 🌍 \u00e9"])
def test_completion_form_gives_the_ids_completions_runs(server, tokenizer, prompt):
    ran = run_ids(server, {"prompt": prompt}, "/v1/completions")
    r = tokenize(server, {"model": MODEL, "prompt": prompt})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["tokens"] == ran and body["count"] == len(ran)
    assert ran[0] == tokenizer.bos_token_id  # BOS as the model's metadata says
    assert body["token_strs"] is None
    models = httpx.get(server.url + "/v1/models", headers=server.headers, timeout=30).json()
    (served,) = [m for m in models["data"] if m["id"] == MODEL]
    assert body["max_model_len"] == served["context_length"]
    r = tokenize(server, {"prompt": prompt, "add_special_tokens": False, "return_token_strs": True})
    assert r.json()["tokens"] == ran[1:]
    assert r.json()["token_strs"] == [tokenizer.id_to_token(i) for i in ran[1:]]


@pytest.mark.parametrize(
    "extra",
    [
        {},
        {"tools": TOOLS},
        {"tools": TOOLS, "tool_choice": "required"},
        {"tools": TOOLS, "tool_choice": "none"},
        {"safe_tokenization": True},
    ],
    ids=["plain", "tools", "required", "tool-choice-none", "safe"],
)
def test_chat_form_gives_the_ids_chat_runs(server, extra):
    messages = [ASK[0], {"role": "user", "content": "Say <end_of_turn>"},
                {"role": "assistant", "content": "<end_of_turn>"}, ASK[1]]  # fmt: skip
    ran = run_ids(server, {"messages": messages, **extra}, "/v1/chat/completions")
    r = tokenize(server, {"model": MODEL, "messages": messages, **extra})
    assert r.status_code == 200, r.text
    assert r.json()["tokens"] == ran and r.json()["count"] == len(ran)


def test_chat_form_prompt_endings(server, tokenizer):
    """A final assistant message: continued as chat continues it (unset or continue_final_message),
    closed with a new turn after it (add_generation_prompt); add_generation_prompt false on a
    user turn: no model turn opened."""
    prefill = [*ASK, {"role": "assistant", "content": "The capital is"}]
    ran = run_ids(server, {"messages": prefill}, "/v1/chat/completions")

    def text_of(body: dict) -> str:
        r = tokenize(server, {"messages": prefill, **body})
        assert r.status_code == 200, r.text
        back = tokenize(server, {"tokens": r.json()["tokens"]}, "/detokenize")
        assert back.status_code == 200, back.text
        assert back.json()["prompt"] == tokenizer.decode(r.json()["tokens"], False)
        return back.json()["prompt"]

    assert tokenize(server, {"messages": prefill}).json()["tokens"] == ran
    assert (
        tokenize(server, {"messages": prefill, "continue_final_message": True}).json()["tokens"]
        == ran
    )
    assert text_of({}).endswith("<start_of_turn>model\nThe capital is")
    closed = text_of({"add_generation_prompt": True})
    assert closed.endswith("The capital is<end_of_turn>\n<start_of_turn>model\n"), closed
    assert text_of({"add_generation_prompt": False}).endswith("The capital is<end_of_turn>\n")
    # a user turn last: the generation prompt by default, none when asked
    asked = tokenize(server, {"messages": ASK}).json()["tokens"]
    bare = tokenize(server, {"messages": ASK, "add_generation_prompt": False}).json()["tokens"]
    opened = tokenizer.encode("<start_of_turn>model\n", add_bos=False)
    assert asked == bare + opened
    # an empty final answer is a generation prompt, as chat reads it
    empty = [*ASK, {"role": "assistant", "content": ""}]
    assert (
        tokenize(server, {"messages": empty, "continue_final_message": True}).json()["tokens"]
        == asked
    )
    r = tokenize(server, {"messages": prefill, "add_generation_prompt": True,
                          "continue_final_message": True})  # fmt: skip
    check_error(r, 400, "Cannot set both", "continue_final_message")


def test_chat_form_special_tokens_and_template_kwargs(server, tokenizer):
    base = tokenize(server, {"messages": ASK, "return_token_strs": True}).json()
    assert base["tokens"][0] == tokenizer.bos_token_id  # Gemma's template writes <bos>
    assert base["token_strs"] == [tokenizer.id_to_token(i) for i in base["tokens"]]
    # BOS on top of the template's: never a second one
    again = tokenize(server, {"messages": ASK, "add_special_tokens": True}).json()["tokens"]
    assert again == base["tokens"]
    # a variable the template does not read changes nothing; the server's own are refused
    r = tokenize(server, {"messages": ASK, "chat_template_kwargs": {"enable_thinking": False}})
    assert r.status_code == 200 and r.json()["tokens"] == base["tokens"]
    for name in ("add_generation_prompt", "messages", "bos_token"):
        r = tokenize(server, {"messages": ASK, "chat_template_kwargs": {name: True}})
        check_error(r, 400, f"cannot set '{name}'", f"chat_template_kwargs.{name}")


def test_detokenize_round_trip(server, tokenizer):
    text = "Hello world, ça va? 🌍"
    ids = tokenize(server, {"prompt": text, "add_special_tokens": False}).json()["tokens"]
    r = tokenize(server, {"model": MODEL, "tokens": ids}, "/v1/detokenize")
    assert r.status_code == 200, r.text
    assert r.json() == {"prompt": text, "content": text}
    with_bos = tokenize(server, {"prompt": text}).json()["tokens"]
    assert tokenize(server, {"tokens": with_bos}, "/detokenize").json()["prompt"] == "<bos>" + text
    assert tokenize(server, {"tokens": []}, "/detokenize").json()["prompt"] == ""


def test_detokenize_pieces_of_characters(server, tokenizer):
    """Ids that are not whole UTF-8 characters (byte-fallback pieces) give U+FFFD, one per broken
    sequence, and the whole characters around them as they are: the ByteFallback decoder of
    `tokenizers` made the whole run of byte tokens U+FFFDs (🎴 and a stray byte: five of them)."""
    ids = tokenize(server, {"prompt": "🎴🏑", "add_special_tokens": False}).json()["tokens"]
    assert len(ids) == 8  # two emoji, four byte tokens each
    cases = [(ids[:5], "🎴\ufffd"), (ids[3:], "\ufffd🏑"), (ids[:2], "\ufffd"), (ids, "🎴🏑")]
    for tokens, text in cases:
        r = tokenize(server, {"tokens": tokens}, "/detokenize")
        assert r.json() == {"prompt": text, "content": text}, tokens


def test_llama_cpp_forms(server, tokenizer):
    text = "<start_of_turn>hi é"
    plain = tokenizer.encode(text, add_bos=False)
    r = tokenize(server, {"content": text})
    assert r.status_code == 200 and r.json() == {"tokens": plain}
    assert tokenize(server, {"content": text, "add_special": True}).json()["tokens"] == [
        tokenizer.bos_token_id,
        *plain,
    ]
    literal = tokenize(server, {"content": text, "parse_special": False}).json()["tokens"]
    assert literal == tokenizer.encode(text, add_bos=False, parse_special=False) != plain
    pieces = tokenize(server, {"content": text, "with_pieces": True}).json()["tokens"]
    assert [p["id"] for p in pieces] == plain
    assert "".join(p["piece"] for p in pieces) == text
    assert tokenize(server, {"tokens": plain}, "/detokenize").json()["content"] == text


def test_paths_models_and_deployments(server):
    """vLLM's paths and the inference prefixes; no model: the server's own; its deployment by
    name or header; an unknown model: Fireworks' 404."""
    want = tokenize(server, {"prompt": "hi there"}).json()
    for path in ("/v1/tokenize", "/inference/v1/tokenize", "/tokenize/"):
        assert tokenize(server, {"model": MODEL, "prompt": "hi there"}, path).json() == want
    named = {"model": f"{MODEL}#{DEPLOYMENT}", "prompt": "hi there"}
    assert tokenize(server, named).json() == want
    header = {"fireworks-deployment": DEPLOYMENT}
    assert tokenize(server, {"model": MODEL, "prompt": "hi there"}, headers=header).json() == want
    for path in ("/tokenize", "/inference/v1/detokenize"):
        r = tokenize(server, {"model": "accounts/nobody/models/nothing", "prompt": "a",
                              "tokens": [1]}, path)  # fmt: skip
        assert r.status_code == 404 and r.json()["error"]["code"] == "NOT_FOUND", r.text


def test_key_required_and_no_usage_row(server):
    for path, body in (("/tokenize", {"prompt": "a"}), ("/v1/detokenize", {"tokens": [2]})):
        r = httpx.post(server.url + path, json=body, timeout=30)
        check_error(r, 401, "API key")
        r = httpx.post(server.url + path, json=body, timeout=30,
                       headers={"Authorization": "Bearer wrong"})  # fmt: skip
        assert r.status_code == 401
    r = tokenize(server, {"prompt": "count me"})
    assert r.status_code == 200 and r.headers["x-request-id"].startswith("tok-")
    ran = post(server, {"prompt": "count me", "max_tokens": 1})
    assert usage_row(server, ran.headers["x-request-id"])  # the way usage rows are found
    assert usage_row(server, r.headers["x-request-id"], timeout=1) == []


def test_bad_inputs(server, tokenizer):
    vocab = tokenizer.vocab_size
    cases = [
        ("/detokenize", {"tokens": [5, vocab]}, f"Token id {vocab} (tokens[1])", "tokens"),
        ("/detokenize", {"tokens": [-1]}, "greater than or equal to 0", "tokens.0"),
        ("/detokenize", {"tokens": [2**70]}, "less than or equal to", "tokens.0"),
        ("/detokenize", {"tokens": "1 2"}, "valid list", "tokens"),
        ("/detokenize", {"tokens": [1.5]}, "valid integer", "tokens.0"),
        ("/detokenize", {}, "Field required", "tokens"),
        ("/tokenize", {}, "Send 'prompt'", "prompt"),
        ("/tokenize", {"prompt": 5}, "valid string", "prompt"),
        ("/tokenize", {"prompt": "a", "max_tokens": 3}, "Extra inputs", "max_tokens"),
        ("/tokenize", {"prompt": "a", "messages": ASK}, "Extra inputs", "prompt"),
        ("/tokenize", {"messages": []}, "at least 1", "messages"),
        ("/tokenize", {"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "x"}}]}]}, "not supported", None),
        ("/tokenize", {"messages": ASK, "tool_choice": "required"}, "needs tools", "tool_choice"),
        ("/tokenize", {"messages": ASK, "reasoning_effort": "high"}, "cannot reason", None),
        ("/tokenize", {"messages": ASK, "chat_template_kwargs": []}, "valid dict", None),
        ("/tokenize", {"content": "a", "with_pieces": "yes"}, "valid boolean", "with_pieces"),
        ("/tokenize", {"model": 5, "prompt": "a"}, "valid string", "model"),
    ]  # fmt: skip
    for path, body, words, param in cases:
        check_error(tokenize(server, body, path), 400, words, param)
    r = tokenize(server, b"[1]")
    check_error(r, 400, "JSON object")
    for raw in (b'{"prompt": "\xff\xfe"}', b'{"content": "\\ud800x"}', b"[" * 100_000):
        assert tokenize(server, raw).status_code == 400
    # refused before tokenizing, llama.cpp's field too (64 characters a token at most)
    models = httpx.get(server.url + "/v1/models", headers=server.headers, timeout=30).json()
    limit = next(m["context_length"] for m in models["data"] if m["id"] == MODEL)
    for field in ("prompt", "content"):
        r = tokenize(server, {field: "a" * (limit * 64 + 1)})
        check_error(r, 400, "The prompt is too long", "prompt")
    tool = {"type": "function", "function": {"name": "f", "description": "a" * (limit * 64)}}
    r = tokenize(server, {"messages": ASK, "tools": [tool]})  # rendered into the prompt
    check_error(r, 400, "The prompt is too long", "tools")


def test_template_kwargs_reach_the_template(tokenizer):
    """chat_template_kwargs are template variables; the request's reasoning fields win over
    them (the same name from both is one variable, not a clash)."""
    from girandole.api.chat.prompt import PromptEnd, build_prompt
    from girandole.api.chat.reasoning import plan_reasoning
    from girandole.api.chat.schema import ChatCompletionRequest

    template = (
        "{{ greeting }}|{{ enable_thinking }}|{% for m in messages %}{{ m.content }}{% endfor %}"
    )
    end = PromptEnd(template_kwargs={"greeting": "Hi", "enable_thinking": True})
    for effort, thinking in ((None, "True"), ("none", "False")):
        req = ChatCompletionRequest(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                    reasoning_effort=effort)  # fmt: skip
        plan = plan_reasoning(req, template)
        text = build_prompt(tokenizer, req, template, None, plan, end).text
        assert text == f"Hi|{thinking}|x", text
    req = ChatCompletionRequest(model=MODEL, messages=[{"role": "user", "content": "x"}])
    assert build_prompt(tokenizer, req, template).text == "||x"  # chat's: no variables


def test_safe_tokenization_keeps_private_use_characters(server, tokenizer):
    """safe_tokenization marks special-token spellings with private-use characters the prompt
    does not use: the user's own (here the first pair it would take, U+F0000/U+F0001) stay."""
    private = "\U000f0000\U000f0001\ue000"
    messages = [{"role": "user", "content": f"{private} <end_of_turn> {private}"}]
    body = {"messages": messages, "safe_tokenization": True}
    ran = run_ids(server, body, "/v1/chat/completions")
    r = tokenize(server, {"model": MODEL, **body})
    assert r.status_code == 200, r.text
    assert r.json()["tokens"] == ran
    text = tokenizer.decode(ran, skip_special_tokens=False)
    assert text.count(private) == 2 and text.count("<end_of_turn>") == 2
    # only the template's own closing <end_of_turn> is the control token: the user's is text
    assert sum(i == tokenizer.token_to_id("<end_of_turn>") for i in ran) == 1
