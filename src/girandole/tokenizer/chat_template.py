"""Chat templates: render a list of messages to the prompt text a chat model expects.

Rendering runs the model's Jinja template in a sandbox set up like transformers'
`apply_chat_template` (`ImmutableSandboxedEnvironment`, trim_blocks/lstrip_blocks, loop controls,
`raise_exception`, `strftime_now`, a `tojson` that does not escape HTML, `{% generation %}`), so a
template from a model gives the same text here as there. Models whose files carry no template
(the default Gemma 3 270M GGUF) get a built-in one for their family: "gemma" (Gemma 2/3), "llama3",
"llama2", "chatml" (Qwen and most ChatML fine-tunes); these are the official templates.

BOS: templates such as Gemma's and Llama's write `bos_token` themselves, so the rendered text
starts with the BOS string; `Tokenizer.encode` then adds no second BOS (it skips BOS when the text
already starts with it). For a template that writes no BOS, `encode` adds one if the model's
metadata asks for it, as llama.cpp does.

Typical use from the API:

    text = render_chat_for(tok, messages, template=override, add_generation_prompt=True)
    prompt_ids = tok.encode(text)
    # or both at once, optionally with Fireworks' safe_tokenization:
    text, prompt_ids = encode_chat(tok, messages, override, safe_tokenization=True)
"""

from __future__ import annotations

import copy
import json
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment

from girandole.tokenizer.marks import DEFAULT_MARKS, Marks, MarksExhausted

if TYPE_CHECKING:
    from girandole.tokenizer.tokenizer import Tokenizer


class ChatTemplateError(ValueError):
    """The template could not render these messages (bad roles, invalid template...): a 400."""


# -- built-in templates (the official ones of each family) --------------------------------------

# google/gemma-3-*-it tokenizer_config.json (also right for Gemma 2, which folds no system turn but
# has the same turn markers): the system message is folded into the first user turn.
GEMMA_TEMPLATE = r"""{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '

' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '

' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '
' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>
' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model
'}}
{%- endif -%}
"""

# meta-llama/Meta-Llama-3-8B-Instruct (no "Cutting Knowledge Date" block, as Fireworks serves it)
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)

# meta-llama/Llama-2-7b-chat-hf (no generation prompt: the text ends with " [/INST]")
LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}"
    "{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}"
    "{% endif %}{% endfor %}"
)

# ChatML as in transformers' chat-templating docs (Qwen's role markers, no default system prompt)
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

BUILTIN_TEMPLATES: dict[str, str] = {
    "gemma": GEMMA_TEMPLATE,
    "llama3": LLAMA3_TEMPLATE,
    "llama2": LLAMA2_TEMPLATE,
    "chatml": CHATML_TEMPLATE,
}
FAMILY_ALIASES: dict[str, str] = {
    "gemma2": "gemma",
    "gemma3": "gemma",
    "gemma3_text": "gemma",
    "llama-3": "llama3",
    "llama-2": "llama2",
    "qwen": "chatml",
    "qwen2": "chatml",
    "qwen3": "chatml",
}


def builtin_template(family: str) -> str:
    """The built-in template of a family ("gemma", "llama3", "llama2", "chatml" or an alias)."""
    name = FAMILY_ALIASES.get(family.lower(), family.lower())
    try:
        return BUILTIN_TEMPLATES[name]
    except KeyError:
        raise ChatTemplateError(
            f"no built-in chat template for family {family!r}; known: {sorted(BUILTIN_TEMPLATES)}"
        ) from None


def guess_family(tok: Tokenizer) -> str:
    """The built-in family that fits a tokenizer, from the turn-marker tokens in its vocabulary."""
    if tok.token_to_id("<start_of_turn>") is not None:
        return "gemma"
    if tok.token_to_id("<|start_header_id|>") is not None:
        return "llama3"
    if tok.token_to_id("<|im_start|>") is not None:
        return "chatml"
    if tok.bos_token == "<s>" and tok.eos_token == "</s>":
        return "llama2"
    return "chatml"


def model_family(tok: Tokenizer) -> str | None:
    """The built-in template family of a tokenizer, or None when its vocabulary has no chat
    markers (guess_family's ChatML fallback is not taken for a tokenizer without <|im_start|>)."""
    family = guess_family(tok)
    if family == "chatml" and tok.token_to_id("<|im_start|>") is None:
        return None
    return family


def chat_template_for(tok: Tokenizer, override: str | None = None) -> str | None:
    """The template chat requests are rendered with: `--chat-template`, the model's, or the
    built-in one of its family; None when there is none."""
    if override:
        return override
    if tok.chat_template:
        return tok.chat_template
    family = model_family(tok)
    return builtin_template(family) if family else None


# -- the sandbox -------------------------------------------------------------------------------


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (transformers' assistant-mask marker): renders its
    body unchanged."""

    tags = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


class _TemplateDict:
    """`dict(...)` in templates, without attribute access to the real type."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


class _Namespace(jinja2.utils.Namespace):
    """`namespace()` that refuses underscore names (no reaching CPython internals)."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 - Jinja's signature trick
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} not allowed")


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    x: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: Any = None,
    sort_keys: bool = False,
) -> str:
    return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=32)
def compile_template(template: str) -> jinja2.Template:
    """Compile a chat template in the sandbox (cached per template string)."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[_GenerationTag, jinja2.ext.loopcontrols],
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _Namespace
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as exc:
        raise ChatTemplateError(
            f"invalid chat template (line {exc.lineno}): {exc.message}"
        ) from exc


# -- rendering ---------------------------------------------------------------------------------


def flatten_content(content: Any) -> str:
    """Message content as one string: a string as is, None as '', a list of parts as the
    concatenation of its `{"type": "text", "text": ...}` parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence):
        texts = []
        for part in content:
            if isinstance(part, str):
                texts.append(part)
            elif isinstance(part, Mapping):
                kind = part.get("type", "text")
                if kind != "text":
                    raise ChatTemplateError(f"unsupported content part type {kind!r} (text only)")
                texts.append(str(part.get("text") or ""))
            else:
                raise ChatTemplateError(f"invalid content part: {part!r}")
        return "".join(texts)
    raise ChatTemplateError(f"invalid message content: {content!r}")


def _has_images(content: Any) -> bool:
    """Whether `content` is a list of parts holding an `{"type": "image"}` one (chat's image_url
    parts for a vision model, girandole.api.chat.prompt), which stays a list for the template."""
    return isinstance(content, list) and any(
        isinstance(part, Mapping) and part.get("type") == "image" for part in content
    )


_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "


def render_chat(
    messages: Sequence[Mapping[str, Any]],
    template: str | None = None,
    family: str = "chatml",
    *,
    add_generation_prompt: bool = True,
    continue_final_message: bool = False,
    tools: list[dict] | None = None,
    documents: list[dict] | None = None,
    bos_token: str | None = None,
    eos_token: str | None = None,
    **template_kwargs: Any,
) -> str:
    """Render `messages` with `template` (or the built-in template of `family` when None).

    Messages are dicts with `role` and `content`; content may be a string, None, or a list of
    `{"type": "text", "text": ...}` parts, which is flattened to one string before rendering
    (unless it holds `{"type": "image"}` parts: a vision model's template writes their markers).
    Other keys (`tool_calls`, `tool_call_id`, `reasoning_content`...) are passed through.
    `continue_final_message=True` leaves the last (assistant) message open so the model continues
    it, and implies no generation prompt (same cut as transformers). `tools` and `documents` and
    any extra keyword arguments reach the template as variables. `bos_token`/`eos_token` are the
    model's strings (`render_chat_for` fills them from a `Tokenizer`); None renders as ''.

    The text starts with the BOS string when the template writes it, and `Tokenizer.encode` then
    adds no second BOS. Raises `ChatTemplateError` (a ValueError) for messages the template
    rejects (e.g. Gemma: roles must alternate) or a broken template.
    """
    if template is None:
        template = builtin_template(family)
    chat = []
    for message in messages:
        if not isinstance(message, Mapping) or "role" not in message:
            raise ChatTemplateError(f"each message must be an object with a role: {message!r}")
        m = copy.deepcopy(dict(message))
        if not _has_images(m.get("content")):  # a vision model's template reads the parts
            m["content"] = flatten_content(m.get("content"))
        chat.append(m)
    if continue_final_message:
        if not chat:
            raise ChatTemplateError("continue_final_message is set but there are no messages")
        add_generation_prompt = False
        final = chat[-1]["content"]
        chat[-1]["content"] = final + _CONTINUE_TAG
    compiled = compile_template(template)
    try:
        text = compiled.render(
            messages=chat,
            tools=tools,
            documents=documents,
            add_generation_prompt=add_generation_prompt,
            bos_token=bos_token or "",
            eos_token=eos_token or "",
            **template_kwargs,
        )
    except jinja2.exceptions.TemplateError as exc:
        raise ChatTemplateError(f"chat template error: {exc}") from exc
    except (TypeError, AttributeError, KeyError, IndexError) as exc:
        raise ChatTemplateError(f"chat template failed on these messages: {exc}") from exc
    if continue_final_message:
        tag = _CONTINUE_TAG.strip()
        if final.strip() not in text or tag not in text:
            raise ChatTemplateError(
                "continue_final_message is set but the template drops the final message's text"
            )
        loc = text.rindex(tag)
        # a template that trims the message also cut our tag's trailing space: trim to match
        text = (
            text[:loc]
            if text[loc : loc + len(_CONTINUE_TAG)] == _CONTINUE_TAG
            else text[:loc].rstrip()
        )
    return text


def render_chat_for(
    tok: Tokenizer,
    messages: Sequence[Mapping[str, Any]],
    template: str | None = None,
    **kwargs: Any,
) -> str:
    """`render_chat` with the model's template (or the built-in one for its family) and its
    BOS/EOS strings. `template` overrides the model's (e.g. from `--chat-template`)."""
    if template is None:
        template = tok.chat_template
    family = kwargs.pop("family", None) or guess_family(tok)
    kwargs.setdefault("bos_token", tok.bos_token)
    kwargs.setdefault("eos_token", tok.eos_token)
    return render_chat(messages, template, family, **kwargs)


_special_res: dict[int, tuple[Tokenizer, re.Pattern[str]]] = {}


def _special_re(tok: Tokenizer) -> re.Pattern[str]:
    hit = _special_res.get(id(tok))
    if hit is None or hit[0] is not tok:
        words = sorted(tok.special_tokens, key=len, reverse=True)
        pattern = re.compile("|".join(re.escape(w) for w in words)) if words else re.compile("(?!)")
        hit = _special_res[id(tok)] = (tok, pattern)
    return hit[1]


def _mark(obj: Any, pattern: re.Pattern[str], marks: Marks) -> Any:
    """Wrap special-token strings inside user-supplied strings in `marks` (values, not keys)."""
    if isinstance(obj, str):
        return marks.wrap(obj, pattern)
    if isinstance(obj, Mapping):
        return {k: _mark(v, pattern, marks) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_mark(v, pattern, marks) for v in obj]
    return obj


def _strings(obj: Any) -> Iterator[str]:
    """Every string in `obj`, keys too (a template may print a key)."""
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, Mapping):
        for k, v in obj.items():
            yield from _strings(k)
            yield from _strings(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _strings(v)


@dataclass(frozen=True)
class RenderedChat:
    """A chat through its template, before tokenizing: `text`, and with safe tokenization the
    same text with user strings' special-token spellings between `marks`, to be read as plain
    text."""

    text: str
    marked: str | None = None
    marks: Marks = DEFAULT_MARKS

    def encode(self, tok: Tokenizer) -> list[int]:
        if self.marked is None:
            return tok.encode(self.text)
        return tok.encode_marked(self.marked, marks=self.marks)


def render_chat_prompt(
    tok: Tokenizer,
    messages: Sequence[Mapping[str, Any]],
    template: str | None = None,
    *,
    safe_tokenization: bool = False,
    **kwargs: Any,
) -> RenderedChat:
    """The first half of `encode_chat`: the rendered prompt, so that a caller can look at its
    length before paying for tokenizing it."""
    if not safe_tokenization:
        return RenderedChat(render_chat_for(tok, messages, template, **kwargs))
    # marks that neither the user's strings nor the template use, so that every character of
    # theirs reaches the prompt as it was
    try:
        marks = Marks.avoiding(_strings([messages, kwargs, template or tok.chat_template or ""]))
    except MarksExhausted as exc:
        raise ChatTemplateError(str(exc)) from exc
    pattern = _special_re(tok)
    marked_messages = _mark(list(messages), pattern, marks)
    if kwargs.get("tools") is not None:
        kwargs["tools"] = _mark(kwargs["tools"], pattern, marks)
    marked = render_chat_for(tok, marked_messages, template, **kwargs)
    return RenderedChat(marks.strip(marked), marked, marks)


def encode_chat(
    tok: Tokenizer,
    messages: Sequence[Mapping[str, Any]],
    template: str | None = None,
    *,
    safe_tokenization: bool = False,
    **kwargs: Any,
) -> tuple[str, list[int]]:
    """Render and tokenize a chat: `(prompt_text, prompt_ids)`.

    The text is `render_chat_for(tok, messages, template, **kwargs)`; the ids are its `encode`
    (BOS added per metadata unless the template wrote it). With `safe_tokenization` (Fireworks'
    chat field), special-token strings inside the messages and tools are read as plain text, so
    a user cannot inject `<end_of_turn>` or `<|im_start|>`; the template's own markers stay
    special.
    """
    rendered = render_chat_prompt(
        tok, messages, template, safe_tokenization=safe_tokenization, **kwargs
    )
    return rendered.text, rendered.encode(tok)


def load_chat_template(value: str | os.PathLike) -> str:
    """A chat template from `--chat-template VALUE`: a Jinja file, a JSON file holding
    `chat_template` (a tokenizer_config.json), a built-in family name, or the template itself."""
    text = str(value)
    path = Path(text).expanduser()
    if path.is_file():
        raw = path.read_text(encoding="utf-8")
        if path.suffix == ".json":
            data = json.loads(raw)
            template = data.get("chat_template") if isinstance(data, dict) else None
            if isinstance(template, list):
                named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
                template = named.get("default") or next(iter(named.values()), None)
            if not isinstance(template, str):
                raise ChatTemplateError(f"no chat_template string in {path}")
            raw = template
        compile_template(raw)
        return raw
    name = FAMILY_ALIASES.get(text.lower(), text.lower())
    if name in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[name]
    if "{{" in text or "{%" in text:
        compile_template(text)
        return text
    raise FileNotFoundError(f"chat template file not found (and not a template or family): {text}")
