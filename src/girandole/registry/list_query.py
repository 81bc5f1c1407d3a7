"""Google AIP-style list queries over JSON resources: `filter` (a subset of AIP-160), `orderBy`
(AIP-132) and opaque page tokens, as Fireworks' list methods take them.

The filter language here: comparisons `field OP value` with OP one of `=`, `!=`, `<`, `<=`,
`>`, `>=` and `:` (has: a substring of a string, a key of a map), joined by AND and OR (AND
binds tighter), each optionally preceded by NOT. Fields are camelCase or snake_case, dotted
into objects (`status.code`); values are quoted strings, numbers, true/false or bare words.
"""

from __future__ import annotations

import base64
import math
import re
from dataclasses import dataclass
from typing import Any

MAX_PAGE_SIZE = 200
DEFAULT_PAGE_SIZE = 50

_TOKEN = re.compile(
    r'\s*(?:(?P<str>"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\')|(?P<op><=|>=|!=|=|<|>|:)'
    r"|(?P<word>[A-Za-z0-9_.\-/*]+)|(?P<bad>\S))"
)


class QueryError(ValueError):
    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


def camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(p[:1].upper() + p[1:] for p in rest)


def field_value(resource: dict[str, Any], path: str) -> Any:
    value: Any = resource
    for part in path.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(camel(part))
    return value


@dataclass(frozen=True)
class Comparison:
    path: str
    op: str
    value: Any
    negated: bool = False

    def matches(self, resource: dict[str, Any]) -> bool:
        return self._test(field_value(resource, self.path)) != self.negated

    def _test(self, actual: Any) -> bool:
        if self.op == ":":
            if isinstance(actual, dict):
                return str(self.value) in actual
            if self.value == "*":
                return actual not in (None, "", [], {})
            return actual is not None and str(self.value) in str(actual)
        expected = self.value
        a, e = _number(actual), _number(expected)
        if isinstance(actual, bool) or isinstance(expected, bool):
            actual, expected = str(actual).lower(), str(expected).lower()
        elif (
            a is not None
            and e is not None
            and (
                isinstance(actual, int | float)
                or isinstance(expected, int | float)
                or self.op not in ("=", "!=")
            )
        ):
            actual, expected = a, e  # proto JSON writes int64 as a string: "10" > 5, "10" > "9"
        else:
            actual, expected = ("" if actual is None else str(actual)), str(expected)
        if self.op == "=":
            return actual == expected
        if self.op == "!=":
            return actual != expected
        try:
            return {
                "<": actual < expected,
                "<=": actual <= expected,
                ">": actual > expected,
                ">=": actual >= expected,
            }[self.op]
        except TypeError:
            return False


@dataclass(frozen=True)
class Filter:
    clauses: tuple[tuple[Comparison, ...], ...]  # OR of ANDs

    def matches(self, resource: dict[str, Any]) -> bool:
        return not self.clauses or any(
            all(c.matches(resource) for c in clause) for clause in self.clauses
        )


def _tokens(text: str) -> list[tuple[str, str]]:
    out, pos = [], 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:  # only trailing whitespace is left
            break
        pos = m.end()
        kind = m.lastgroup
        if kind == "bad":
            raise QueryError(f"filter: unexpected character {m.group(kind)!r}", "filter")
        out.append((kind, m.group(kind)))
    return out


def _literal(kind: str, text: str) -> Any:
    if kind == "str":
        return re.sub(r"\\(.)", r"\1", text[1:-1])
    if text in ("true", "false"):
        return text == "true"
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return text


def parse_filter(text: str | None, fields: set[str]) -> Filter:
    """Parse a filter over resources whose top-level camelCase fields are `fields`."""
    if not text or not text.strip():
        return Filter(())
    tokens = _tokens(text)
    clauses: list[tuple[Comparison, ...]] = []
    current: list[Comparison] = []
    i = 0
    while i < len(tokens):
        negated = False
        if tokens[i] == ("word", "NOT"):
            negated, i = True, i + 1
        if i + 3 > len(tokens):
            raise QueryError(
                f"filter {text!r} is not of the form 'field = value [AND|OR ...]'", "filter"
            )
        (fkind, path), (okind, op), (vkind, value) = tokens[i : i + 3]
        if fkind != "word" or okind != "op" or vkind not in ("word", "str"):
            raise QueryError(
                f"filter {text!r} is not of the form 'field = value [AND|OR ...]'", "filter"
            )
        if camel(path.split(".")[0]) not in fields:
            raise QueryError(f"filter: unknown field {path!r}", "filter")
        current.append(Comparison(path, op, _literal(vkind, value), negated))
        i += 3
        if i < len(tokens):
            joiner = tokens[i]
            if joiner == ("word", "AND"):
                pass
            elif joiner == ("word", "OR"):
                clauses.append(tuple(current))
                current = []
            else:
                raise QueryError(
                    f"filter: expected AND or OR after a comparison, got {joiner[1]!r}", "filter"
                )
            i += 1
            if i == len(tokens):
                raise QueryError(f"filter {text!r} ends with {joiner[1]}", "filter")
    clauses.append(tuple(current))
    return Filter(tuple(clauses))


def parse_order_by(text: str | None, fields: set[str]) -> list[tuple[str, bool]]:
    """`"createTime desc, name"` -> [(createTime, descending), (name, ascending)]."""
    order: list[tuple[str, bool]] = []
    for part in (text or "").split(","):
        words = part.split()
        if not words:
            continue
        if len(words) > 2 or (len(words) == 2 and words[1].lower() not in ("asc", "desc")):
            raise QueryError(f"orderBy: {part.strip()!r} is not 'field [asc|desc]'", "orderBy")
        path = words[0]
        if camel(path.split(".")[0]) not in fields:
            raise QueryError(f"orderBy: unknown field {path!r}", "orderBy")
        order.append((path, len(words) == 2 and words[1].lower() == "desc"))
    return order


def sort_resources(resources: list[dict[str, Any]], order: list[tuple[str, bool]]) -> None:
    """Sort in place, the last key first (a stable sort per key gives the combined order)."""
    for path, descending in reversed(order):
        resources.sort(key=lambda r: _sort_key(field_value(r, path)), reverse=descending)


def _number(value: Any) -> int | float | None:
    """A number, or an integer written as a string (proto JSON's int64, as a Dataset's
    exampleCount); else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return value
    if isinstance(value, str) and _INT_TEXT.fullmatch(value):
        return int(value)
    return None


_INT_TEXT = re.compile(r"-?[0-9]{1,19}")


def _sort_key(value: Any) -> tuple[int, Any]:
    if value is None:
        return (0, "")
    number = _number(value)
    if isinstance(value, bool) or number is not None:
        return (1, float(value if number is None else number))
    return (2, str(value))


def page_size_of(value: int | None) -> int:
    if value is None or value == 0:
        return DEFAULT_PAGE_SIZE
    if value < 0:
        raise QueryError(f"pageSize must not be negative, got {value}", "pageSize")
    return min(value, MAX_PAGE_SIZE)


def encode_page_token(offset: int) -> str:
    return base64.urlsafe_b64encode(f"offset:{offset}".encode()).decode().rstrip("=")


def encode_key_token(offset: int, key: tuple[float, str]) -> str:
    """A token of a list paged by key (batch jobs: created, id): the next page starts past
    `key`; `offset` (its place in the list) serves a read that pages by offset (a filter or
    orderBy) as an `offset:` token would."""
    created, name = key
    text = f"key:{offset}:{created!r}:{name}"
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def decode_page_token(token: str | None) -> int:
    """The offset of a page token (a key token's too: a list paged by offset takes it)."""
    return decode_key_token(token)[0]


def decode_key_token(token: str | None) -> tuple[int, tuple[float, str] | None]:
    """(offset, key) of a page token: `offset:N` (every token before keys, still taken: no
    key), or `key:N:created:id`."""
    if not token:
        return 0, None
    try:
        text = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
        kind, _, rest = text.partition(":")
        key: tuple[float, str] | None = None
        if kind == "key":
            rest, _, place = rest.partition(":")
            created, _, name = place.partition(":")
            key = (float(created), name)
            if not name or not math.isfinite(key[0]):
                raise ValueError
        elif kind != "offset":
            raise ValueError
        offset = int(rest)
        if offset < 0:
            raise ValueError
    except ValueError:
        raise QueryError(
            "pageToken is not a token this server gave: pass nextPageToken of the previous page",
            "pageToken",
        ) from None
    return offset, key


def select(
    resources: list[dict[str, Any]],
    fields: set[str],
    filter: str | None,
    order_by: str | None,
    default_order: list[tuple[str, bool]] | None,
    page_size: int | None,
    page_token: str | None,
) -> tuple[list[dict[str, Any]], str, int]:
    """A list method's answer: the page of `resources` that `filter` keeps, ordered by
    `order_by` (else `default_order`), ties by name; the next page's token; how many matched.
    `default_order` None: `resources` come in their default order (a store's oldest first),
    which also breaks an `order_by`'s ties."""
    condition = parse_filter(filter, fields)
    order = parse_order_by(order_by, fields) or default_order or []
    chosen = [r for r in resources if condition.matches(r)]
    sort_resources(chosen, order if default_order is None else [*order, ("name", False)])
    items, next_token = page(chosen, page_size, page_token)
    return items, next_token, len(chosen)


def page(
    resources: list[dict[str, Any]], page_size: int | None, page_token: str | None
) -> tuple[list[dict[str, Any]], str]:
    """One page and the next page's token ("" on the last page)."""
    size = page_size_of(page_size)
    start = decode_page_token(page_token)
    items = resources[start : start + size]
    next_token = encode_page_token(start + size) if start + size < len(resources) else ""
    return items, next_token
