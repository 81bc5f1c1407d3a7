"""A batch job's input: JSONL lines `{"custom_id": "...", "body": {...}}` (OpenAI's batch line
shape; `url` and `method` may be given too). The body is a chat completions request (with
`messages`), a completions request (with `prompt`), or, named by `url`, an embeddings or a
Responses request (with `input`) or an Anthropic Messages request; `url` picks the endpoint
when several could apply. The file is checked whole when the job is created (a 400 names the first bad line); what
only the endpoint can judge (a bad temperature, an unknown field) becomes that line's error in
the error file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
EMBEDDINGS = "/v1/embeddings"
RESPONSES = "/v1/responses"
MESSAGES = "/v1/messages"  # Anthropic's (girandole.api.message_batches)
URLS = (CHAT, COMPLETIONS, EMBEDDINGS, RESPONSES, MESSAGES)  # the endpoints a line may run
GENERATING = (CHAT, COMPLETIONS)  # whose lines the job's inferenceParameters fill in
# every way of writing each: /v1/x, /x, /inference/v1/x
URL_FORMS = {
    form: url for url in URLS for form in (url, url.removeprefix("/v1"), "/inference" + url)
}
MAX_CUSTOM_ID = 512

# inferenceParameters -> the request field each fills in a body that does not set it
_PARAMETERS = {
    "maxTokens": "max_tokens",
    "temperature": "temperature",
    "topP": "top_p",
    "topK": "top_k",
    "n": "n",
}


class InputError(ValueError):
    pass


@dataclass(frozen=True)
class InputLine:
    line: int  # its index among the file's non-empty lines
    custom_id: str
    url: str  # one of URLS
    body: dict[str, Any]


def read_input(data: bytes, max_lines: int) -> list[InputLine]:
    """The file's lines, checked: JSON objects with a unique string `custom_id` and an object
    `body` holding `messages` or `prompt`."""
    try:
        # utf-8-sig: a leading byte order mark (Notepad's, PowerShell's) is not line 1's text
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        if data.startswith((b"\xff\xfe", b"\xfe\xff")):  # PowerShell 5's `>` writes this
            raise InputError(
                "the input is UTF-16 text (it starts with UTF-16's byte order mark): save it as"
                " UTF-8"
            ) from None
        raise InputError(f"the input is not UTF-8 text: {exc}") from None
    lines: list[InputLine] = []
    seen: dict[str, int] = {}
    # Lines end at "\n" only: str.splitlines would also cut at U+2028, U+0085 and others,
    # which JSON strings may hold unescaped.
    for number, raw in enumerate(text.split("\n"), start=1):
        if not raw.strip():
            continue
        if len(lines) >= max_lines:
            raise InputError(f"the input has more than {max_lines} lines, this server's limit")
        item = _parse_line(number, raw)
        custom_id = item["custom_id"]
        if custom_id in seen:
            raise InputError(
                f"line {number}: custom_id {custom_id!r} is used again (first on line"
                f" {seen[custom_id]}); each line needs its own"
            )
        seen[custom_id] = number
        lines.append(InputLine(len(lines), custom_id, _url_of(number, item), item["body"]))
    if not lines:
        raise InputError("the input has no lines: one JSON object per line is expected")
    return lines


def _parse_line(number: int, raw: str) -> dict[str, Any]:
    item = _loads(raw, f"line {number}")
    if not isinstance(item, dict):
        raise InputError(f"line {number}: expected a JSON object with custom_id and body")
    custom_id = item.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id or len(custom_id) > MAX_CUSTOM_ID:
        raise InputError(
            f"line {number}: custom_id must be a non-empty string of at most {MAX_CUSTOM_ID}"
            " characters"
        )
    if not _is_text(custom_id):
        raise InputError(
            f"line {number}: custom_id {custom_id!r} holds an unpaired UTF-16 surrogate (a lone"
            " \\ud800-\\udfff escape), which is not text: use characters that UTF-8 can hold"
        )
    if not isinstance(item.get("body"), dict):
        raise InputError(f"line {number}: body must be a JSON object (the request)")
    method = item.get("method", "POST")
    if method != "POST":
        raise InputError(f"line {number}: method must be POST, got {method!r}")
    return item


def _is_text(value: str) -> bool:
    """Whether `value` holds no unpaired surrogate (JSON's "\\ud800" escapes one), which
    could not be stored or written out as UTF-8."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _loads(text: str, what: str) -> Any:
    """JSON text, or an InputError saying what is wrong with it (nesting too deep for the
    parser and integers of thousands of digits included)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"{what} is not valid JSON: {exc.msg}") from None
    except RecursionError:
        raise InputError(f"{what} is not valid JSON: it is nested too deeply") from None
    except ValueError as exc:
        raise InputError(f"{what} is not valid JSON: {exc}") from None


def _url_of(number: int, item: dict[str, Any]) -> str:
    url = item.get("url")
    if url is not None:
        if not isinstance(url, str) or url not in URL_FORMS:
            raise InputError(
                f"line {number}: url {str(url)[:100]!r} is not one a batch job runs:"
                f" {', '.join(URLS)}"
            )
        return URL_FORMS[url]
    body = item["body"]
    if "messages" in body:
        return CHAT
    if "prompt" in body:
        return COMPLETIONS
    if "input" in body:
        raise InputError(
            f"line {number}: a body with input needs a url: {EMBEDDINGS} or {RESPONSES}"
        )
    raise InputError(
        f"line {number}: body has neither messages (a chat completion) nor prompt (a completion)"
    )


def parse_parameters(parameters: dict[str, Any] | None) -> dict[str, Any]:
    """The request fields a job's `inferenceParameters` fill in (extraBody: a JSON object as a
    string, merged too)."""
    fields: dict[str, Any] = {}
    for key, value in (parameters or {}).items():
        if key == "extraBody":
            if value in (None, ""):
                continue
            extra = (
                _loads(value, "inferenceParameters.extraBody") if isinstance(value, str) else None
            )
            if not isinstance(extra, dict):
                raise InputError(
                    "inferenceParameters.extraBody must be a JSON object written as a string,"
                    ' e.g. "{\\"stop\\": [\\"\\\\n\\"]}"'
                )
            fields.update(extra)
        elif key in _PARAMETERS:
            if value is not None:
                fields[_PARAMETERS[key]] = value
        else:
            known = ", ".join([*_PARAMETERS, "extraBody"])
            raise InputError(f"inferenceParameters.{key} is not a parameter (known: {known})")
    return fields


def request_body(line: InputLine, model: str, parameters: dict[str, Any]) -> dict[str, Any]:
    """The request a line runs: its body, the job's model (none: the line's own, as in a
    message batch); a generating line (chat, completions) with the job's parameters where the
    body sets none; never streamed."""
    generating = line.url in GENERATING
    body = {**parameters, **line.body} if generating else dict(line.body)
    if model:
        body["model"] = model
    if line.url != EMBEDDINGS:
        body["stream"] = False
    return body
