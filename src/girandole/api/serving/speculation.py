"""`prediction` and `speculation`: the expected output, as token ids for the engine's proposer
(girandole.engine.speculation). Fireworks turns `prediction` (OpenAI's predicted outputs) into
`speculation`; a request gives one or the other. Text is tokenized once, without BOS or special
tokens (a prediction is output text, never control tokens); token ids must be in the vocabulary.
"""

from __future__ import annotations

from girandole.api.http.errors import bad_request
from girandole.api.http.schema import Prediction, RequestFields
from girandole.api.serving.prompt import MAX_CHARS_PER_TOKEN
from girandole.tokenizer.tokenizer import Tokenizer


def prediction_text(prediction: Prediction | str) -> str:
    if isinstance(prediction, str):
        return prediction
    content = prediction.content
    if isinstance(content, str):
        return content
    return "".join(part.text for part in content)


def speculation_chars(req: RequestFields) -> int:
    """How much the request's prediction holds (characters, or ids): what tokenizing it costs."""
    if req.prediction is not None:
        return len(prediction_text(req.prediction))
    return len(req.speculation or ())


def speculation_tokens(
    req: RequestFields, tokenizer: Tokenizer, vocab_size: int, context_length: int
) -> list[int] | None:
    """The request's expected output as token ids, its first `context_length` (no output is
    longer; the engine indexes what it keeps); None without one. 400 for a bad one."""
    ids = _speculation_tokens(req, tokenizer, vocab_size, context_length * MAX_CHARS_PER_TOKEN)
    return ids[:context_length] if ids else None


def _speculation_tokens(
    req: RequestFields, tokenizer: Tokenizer, vocab_size: int, max_chars: int
) -> list[int] | None:
    if req.prediction is not None and req.speculation is not None:
        raise bad_request(
            "give either 'prediction' or 'speculation' (its native form), not both", "prediction"
        )
    if req.prediction is not None:
        text = prediction_text(req.prediction)
    elif isinstance(req.speculation, str):
        text = req.speculation
    else:
        return _checked_ids(req.speculation, vocab_size)
    # what lies past `max_chars` lies past the context's tokens: not worth seconds of tokenizing
    return tokenizer.encode(text[:max_chars], add_bos=False, parse_special=False) or None


def _checked_ids(spec: list[int] | None, vocab_size: int) -> list[int] | None:
    if spec is None:
        return None
    for t in spec:
        if not 0 <= t < vocab_size:
            raise bad_request(
                f"speculation token id {t} is out of range [0, {vocab_size})", "speculation"
            )
    return list(spec) or None
