"""The reasoning pieces on their own: the plan a request's fields make (and the 400s), earlier
turns' reasoning per reasoning_history, and the output split, streamed in any cut."""

from __future__ import annotations

import random

import pytest

from girandole.api.chat.reasoning import (
    EMPTY_THINKING,
    ReasoningSplitter,
    apply_history,
    plan_reasoning,
    reasoning_tokens,
    split_reasoning,
)
from girandole.api.chat.schema import ChatCompletionRequest
from girandole.api.http.errors import APIError
from girandole.api.http.validation import validate_model
from girandole.tokenizer.chat_template import CHATML_TEMPLATE

QWEN3 = "{%- if enable_thinking is defined and enable_thinking is false %}<think>{% endif %}"
R1 = "{{ '<|Assistant|><think>\\n' }}"  # DeepSeek-R1's generation prompt opens the block


def req(**fields) -> ChatCompletionRequest:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}
    return validate_model(ChatCompletionRequest, body)


@pytest.mark.parametrize(
    "fields, enabled, effort",
    [({}, None, None), ({"reasoning_effort": True}, True, "medium"),
     ({"reasoning_effort": False}, False, None), ({"reasoning_effort": "low"}, True, "low"),
     ({"thinking": {"type": "disabled"}}, False, None),
     ({"thinking": {"type": "enabled", "budget_tokens": 4096}}, True, None),
     ({"thinking": {"type": "adaptive"}}, None, None),
     ({"reasoning_effort": "none", "thinking": {"type": "enabled", "effort": "high"}}, True, "high")],
)  # fmt: skip
def test_plans(fields, enabled, effort):
    plan = plan_reasoning(req(**fields), QWEN3)
    assert (plan.enabled, plan.effort) == (enabled, effort)


def test_a_template_that_cannot_reason():
    with pytest.raises(APIError) as err:
        plan_reasoning(req(reasoning_effort="high"), CHATML_TEMPLATE)
    assert err.value.status_code == 400 and "cannot reason" in err.value.message
    with pytest.raises(APIError):
        plan_reasoning(req(thinking={"type": "enabled", "budget_tokens": 1024}), CHATML_TEMPLATE)
    for asks_nothing in ({}, {"reasoning_effort": "none"}, {"reasoning_effort": False},
                         {"thinking": {"type": "disabled"}}, {"reasoning_history": "preserved"}):  # fmt: skip
        assert plan_reasoning(req(**asks_nothing), CHATML_TEMPLATE) is None


def test_thinking_off_without_a_switch_closes_the_block():
    plan = plan_reasoning(req(reasoning_effort="none"), R1)
    assert plan.prompt_suffix(R1, "<|Assistant|><think>\n", continued=False) == "\n</think>\n\n"
    assert not plan.opens_in_prompt
    assert plan.prompt_suffix(R1, "<|Assistant|>", continued=False) == EMPTY_THINKING
    on = plan_reasoning(req(), R1)
    assert on.prompt_suffix(R1, "<|Assistant|><think>\n", continued=False) == ""
    assert on.opens_in_prompt


def test_history():
    messages = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "<think>x</think>A", "reasoning_content": "old"},
        {"role": "user", "content": "b"},
        {"role": "assistant", "content": "", "reasoning_content": "new", "tool_calls": []},
        {"role": "tool", "content": "1"},
    ]
    kept = lambda ms: [m.get("reasoning_content") for m in ms if m["role"] == "assistant"]  # noqa: E731
    assert kept(apply_history(messages, None)) == ["old", "new"]
    assert kept(apply_history(messages, "preserved")) == ["old", "new"]
    assert kept(apply_history(messages, "interleaved")) == [None, "new"]
    disabled = apply_history(messages, "disabled")
    assert kept(disabled) == [None, None] and disabled[1]["content"] == "A"


CASES = [
    ("<think>\nhmm\nyes\n</think>\n\nAnswer.", False, ("hmm\nyes", "Answer.")),
    ("hmm</think>\n\nAns", True, ("hmm", "Ans")),
    ("\nAns <think>x", False, (None, "\nAns <think>x")),
    ("<think>\nstill thinking", False, ("still thinking", "")),
    ("<thi", False, (None, "<thi")),
]


@pytest.mark.parametrize("text, opens, expected", CASES)
def test_split_whole_and_streamed_in_any_cut(text, opens, expected):
    assert split_reasoning(text, opens) == expected
    rng = random.Random(0)
    for _ in range(100):
        splitter = ReasoningSplitter.for_prompt(opens)
        reasoning = content = ""
        i = 0
        while i < len(text):
            j = i + rng.randint(1, 4)
            r, c = splitter.feed(text[i:j])
            reasoning, content, i = reasoning + r, content + c, j
        r, c = splitter.finish()
        reasoning, content = reasoning + r, content + c
        assert (reasoning if splitter.reasoned else None, content) == expected


def test_reasoning_tokens_when_the_tag_is_spelt_in_pieces(tokenizer):
    """The default tokenizer has no </think> token: the reasoning ends at the token that
    completes the tag's bytes, wherever the tokens cut it (each token's bytes are searched
    with the tag's length before them; searching the whole output again at each token took
    14 s of the event loop for 80,000 tokens)."""
    tag = b"</think>"
    rng = random.Random(3)
    for _ in range(200):
        words = [rng.choice(["a", "</", "think", ">", "</think>", "x y", "\n", "é"])
                 for _ in range(rng.randint(1, 40))]  # fmt: skip
        ids = tokenizer.encode("".join(words), add_bos=False)
        want, written = len(ids), b""
        for i, token in enumerate(ids):  # the plain reading: the first prefix holding the tag
            written += tokenizer.token_bytes(token)
            if tag in written:
                want = i + 1
                break
        ended = ReasoningSplitter(state="reasoning", ended=True)
        assert reasoning_tokens(ended, ids, tokenizer, None) == want
    assert reasoning_tokens(ReasoningSplitter(state="reasoning"), ids, tokenizer, None) == len(ids)
    assert reasoning_tokens(ReasoningSplitter(state="content"), ids, tokenizer, None) == 0


@pytest.mark.parametrize("after", ["<think>plan</think>answer", "answer", ""])
def test_leading_blanks_cost_each_token_the_same(after):
    """Blanks at the start may precede <think>: they are set aside, not stripped again at every
    token (300,000 newline tokens took 23-28 s of the event loop; now 0.15 s), and
    the split is the plain one of the whole text."""

    blanks = ["\n"] * 300_000
    splitter = ReasoningSplitter.for_prompt(False)
    reasoning = content = ""
    for piece in [*blanks, after]:
        r, c = splitter.feed(piece)
        reasoning, content = reasoning + r, content + c
    r, c = splitter.finish()
    want = split_reasoning("".join(blanks) + after, False)
    assert (reasoning + r if splitter.reasoned else None, content + c) == want


@pytest.mark.parametrize("opens", [True, False])
def test_the_split_costs_each_token_the_same(opens):
    """The reasoning and content so far grow in place: `+=` on the attributes copied the whole
    output at every token (100,000 tokens of 8 characters: the last ones cost 30-400 us each,
    the first ones 2 us). The test pins the split on 100,000 tokens."""

    splitter = ReasoningSplitter.for_prompt(opens)  # reasoning, or content, all along
    for piece in ["abcdefgh"] * 100_000:
        splitter.feed(piece)
    splitter.finish()
    assert (splitter.reasoning_text + splitter.content_text) == "abcdefgh" * 100_000


def test_think_blocks_are_cut_in_one_pass():
    """reasoning_history "disabled" cuts <think> blocks out of earlier assistant turns by hand:
    the regex it replaces searched to the end again from every <think> with no </think> after
    it, quadratic (88 KB of them: 3.6 s holding the GIL). The result is the regex's (the plain
    reference) on random texts."""
    import re

    regex = re.compile(r"<think>.*?</think>\s*", re.S)
    atoms = ["<think>", "</think>", "<think", ">", "</", "think>", " ", "\n", "\u2003", "a", "\x85"]
    rng = random.Random(4)

    def cut(content: str) -> str:
        turns = [{"role": "assistant", "content": content}, {"role": "user", "content": "hi"}]
        return apply_history(turns, "disabled")[0]["content"]

    for _ in range(20_000):
        text = "".join(rng.choice(atoms) for _ in range(rng.randint(0, 14)))
        assert cut(text) == regex.sub("", text), repr(text)
    unclosed = "<think>abc " * 10_000
    assert cut(unclosed) == unclosed
    assert cut(unclosed + "</think>\n b") == "b"  # the first <think> to the first </think>


@pytest.mark.parametrize("after", ["</think>answer", "more</think>answer", "more", ""])
def test_newlines_in_the_reasoning_cost_each_token_the_same(after):
    """Newlines in the reasoning may precede </think>: they are set aside, not searched and
    stripped again at every token (30,000 newline tokens took 3.4 s of the event loop,
    100,000 37 s; now 0.06 s and 0.18 s), and the split is the plain one of the whole text."""

    pieces = ["<think>", "plan", *["\n"] * 30_000, after]
    splitter = ReasoningSplitter.for_prompt(False)
    reasoning = content = ""
    for piece in pieces:
        r, c = splitter.feed(piece)
        reasoning, content = reasoning + r, content + c
    r, c = splitter.finish()
    assert (reasoning + r, content + c) == split_reasoning("".join(pieces), False)
