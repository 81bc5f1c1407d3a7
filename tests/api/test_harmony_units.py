"""gpt-oss's harmony output on its own: the channels split into reasoning and content in any
stream cut, the reasoning plan for a harmony template (effort into the template, "none" a 400),
and the tokenizer that keeps the markers as text."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from girandole.api.chat.harmony import HarmonySplitter, is_harmony
from girandole.api.chat.reasoning import plan_reasoning, reasoning_tokens, splitter_for
from girandole.api.chat.schema import ChatCompletionRequest
from girandole.api.http.errors import APIError
from girandole.api.http.validation import validate_model

TEMPLATE = (Path(__file__).parents[1] / "data" / "harmony_chat_template.jinja").read_text()

ANALYSIS = "<|channel|>analysis<|message|>"
FINAL = "<|start|>assistant<|channel|>final<|message|>"
CASES = [
    # (output text, reasoning, content)
    (f"{ANALYSIS}User asks 2+2. Easy: 4.<|end|>{FINAL}2 + 2 = 4.", "User asks 2+2. Easy: 4.",
     "2 + 2 = 4."),
    (f"{ANALYSIS}Check a < b and <|x|> stays.<|end|>{FINAL}a < b <|", "Check a < b and <|x|> stays.",
     "a < b <|"),
    (f"{ANALYSIS}think<|end|><|start|>assistant<|channel|>commentary<|message|>Let me look."
     f"<|end|>{FINAL}Done.", "think", "Let me look.Done."),
    (f"{ANALYSIS}cut off by max_tokens", "cut off by max_tokens", ""),
    ("<|channel|>final<|message|>no reasoning at all", None, "no reasoning at all"),
    ("plain text, no harmony", None, "plain text, no harmony"),
    # tool calls: the recipient in the header, before or after the channel; <|call|> is a stop
    # token, so the output ends with the arguments
    (f'{ANALYSIS}Need weather.<|end|><|start|>assistant<|channel|>commentary '
     'to=functions.get_weather <|constrain|>json<|message|>{"city": "Paris"}', "Need weather.",
     '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'),
    (' to=functions.lookup<|channel|>commentary json<|message|>{"q": "a<|b"}', None,
     '<tool_call>{"name": "lookup", "arguments": {"q": "a<|b"}}</tool_call>'),
    ('<|channel|>commentary to=functions.f <|constrain|>json<|message|>not json', None,
     '<|channel|>commentary to=functions.f <|constrain|>json<|message|>not json'),
]  # fmt: skip


def _split(pieces: list[str]) -> tuple[str | None, str, str, str]:
    splitter = HarmonySplitter()
    streamed_r, streamed_c = [], []
    for i, piece in enumerate(pieces):
        r, c = splitter.feed(piece, final=i == len(pieces) - 1)
        streamed_r.append(r)
        streamed_c.append(c)
    reasoning = splitter.reasoning_text if splitter.reasoned else None
    return reasoning, splitter.content_text, "".join(streamed_r), "".join(streamed_c)


@pytest.mark.parametrize("text, reasoning, content", CASES)
def test_split_whole_and_in_every_cut(text, reasoning, content):
    assert _split([text])[:2] == (reasoning, content)
    rng = random.Random(0)
    cuts = (
        [list(text)]
        + [  # one character at a time, then random pieces
            [text[a:b] for a, b in zip([0, *sorted(c)], [*sorted(c), len(text)])]
            for c in (rng.sample(range(1, len(text)), k=min(6, len(text) - 1)) for _ in range(20))
        ]
    )
    for pieces in cuts:
        r, c, streamed_r, streamed_c = _split(pieces)
        assert (r, c) == (reasoning, content), pieces
        assert (streamed_r, streamed_c) == (reasoning or "", content)


def test_markers_never_leak_mid_stream():
    """A marker cut across pieces is held, not sent as content and then taken back."""
    splitter = HarmonySplitter()
    sent = []
    for piece in [ANALYSIS + "a", "b<|e", "nd|><|sta", "rt|>assistant<|channel|>final<|mess",
                  "age|>x<", "|ret", "urn|>"]:  # fmt: skip
        sent.append(splitter.feed(piece))
    sent.append(splitter.finish())
    assert "".join(r for r, _ in sent) == "ab"
    assert "".join(c for _, c in sent) == "x"
    assert splitter.ended


def req(**fields) -> ChatCompletionRequest:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}
    return validate_model(ChatCompletionRequest, body)


def test_template_is_harmony():
    assert is_harmony(TEMPLATE)


@pytest.mark.parametrize("effort", ["low", "medium", "high"])
def test_effort_goes_into_the_template(effort):
    plan = plan_reasoning(req(reasoning_effort=effort), TEMPLATE)
    assert plan.harmony and plan.template_kwargs() == {"reasoning_effort": effort}
    assert plan.prompt_suffix(TEMPLATE, "<|start|>assistant", continued=False) == ""
    assert isinstance(splitter_for(plan), HarmonySplitter)


def test_no_effort_leaves_the_template_default():
    plan = plan_reasoning(req(), TEMPLATE)
    assert plan.harmony and plan.template_kwargs() == {}


@pytest.mark.parametrize(
    "fields, param",
    [({"reasoning_effort": "none"}, "reasoning_effort"),
     ({"reasoning_effort": False}, "reasoning_effort"),
     ({"thinking": {"type": "disabled"}}, "thinking"),
     ({"reasoning_effort": "xhigh"}, "reasoning_effort"),
     ({"reasoning_effort": 512}, "reasoning_effort")],
)  # fmt: skip
def test_reasoning_cannot_be_turned_off(fields, param):
    with pytest.raises(APIError) as err:
        plan_reasoning(req(**fields), TEMPLATE)
    assert err.value.status_code == 400 and err.value.param == param


def test_reasoning_tokens_count_to_the_analysis_end():
    splitter = HarmonySplitter()
    splitter.feed(f"{ANALYSIS}abc<|end|>{FINAL}x", final=True)
    end_id = 7
    ids = [1, 2, 3, 4, end_id, 8, 9, 10, 11]
    assert reasoning_tokens(splitter, ids, None, end_id) == 5
