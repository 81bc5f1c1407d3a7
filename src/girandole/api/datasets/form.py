"""A multipart/form-data upload read as it arrives: its file part straight to disk.

An upload (`POST /v1/files`, a dataset's `:upload`) used to be read whole into memory and then
parsed by the email package, which copies it several times over: a 100 MB file took the server
from 478 to 1,331 MB RSS, so a few uploads at the 500 MB limit at once exhausted the machine.
Here python-multipart (Starlette's own form parser) splits the body as it arrives; the file
part's bytes go to a temporary file in the batch store, the few other parts (`purpose`) stay in
memory, each capped. Memory stays flat whatever the file's size.
"""

from __future__ import annotations

import email.parser
import email.policy
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, MultipartState, parse_options_header
from starlette.requests import ClientDisconnect, Request

from girandole.api.http.disconnect import ClientDisconnected
from girandole.api.http.errors import APIError, bad_request

MAX_FIELD_BYTES = 64 * 1024  # a form part other than the file (`purpose`: a word)
MAX_PARTS = 16  # a form has `file` and `purpose`: a few more are named in a 400, not kept
MAX_PART_HEAD_BYTES = 16 * 1024  # one part's headers


@dataclass
class UploadedForm:
    """The parts of a form by name (the first of each name); the file part's bytes on disk."""

    names: list[str] = field(default_factory=list)  # every part's name, in order, once each
    fields: dict[str, bytes] = field(default_factory=dict)  # the parts other than the file
    file_name: str | None = None  # the file part's file name (None: the part gave none)
    file_size: int = 0
    has_file: bool = False


def _part_head(raw: bytes) -> tuple[str | None, str | None]:
    """(name, file name) of a part from its raw headers, read as the email package reads them
    (RFC 2231 `filename*=` included), as uploads were read before."""
    head = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(raw + b"\r\n")
    cte = str(head.get("content-transfer-encoding", "")).strip().lower()
    if cte not in ("", "binary", "8bit", "7bit"):
        raise bad_request(
            f"A form part's Content-Transfer-Encoding {cte[:32]!r} is not supported: send the"
            " bytes as they are (RFC 7578)",
            "file",
        )
    name = head.get_param("name", header="content-disposition")
    return (name if isinstance(name, str) else None), head.get_filename()


class _FormReader:
    """python-multipart's callbacks: the file part's bytes to `out`, other parts to memory."""

    def __init__(self, out: BinaryIO, file_part: str) -> None:
        self.out = out
        self.file_part = file_part
        self.form = UploadedForm()
        self.head = bytearray()  # the current part's raw headers
        self.header_field = bytearray()
        self.header_value = bytearray()
        self.name: str | None = None  # the current part's
        self.sink: BinaryIO | bytearray | None = None  # where its bytes go (None: nowhere)
        self.fields: dict[str, bytearray] = {}

    def callbacks(self) -> dict:
        return {
            "on_part_begin": self.on_part_begin,
            "on_header_field": self.on_header_field,
            "on_header_value": self.on_header_value,
            "on_header_end": self.on_header_end,
            "on_headers_finished": self.on_headers_finished,
            "on_part_data": self.on_part_data,
            "on_part_end": self.on_part_end,
        }

    def on_part_begin(self) -> None:
        self.head.clear()
        if len(self.form.names) >= MAX_PARTS:
            raise bad_request(f"The form has more than {MAX_PARTS} parts", self.file_part)

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self.header_field.extend(data[start:end])
        self._check_head()

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self.header_value.extend(data[start:end])
        self._check_head()

    def _check_head(self) -> None:
        if len(self.head) + len(self.header_field) + len(self.header_value) > MAX_PART_HEAD_BYTES:
            raise bad_request(
                f"A form part's headers are larger than {MAX_PART_HEAD_BYTES} bytes",
                self.file_part,
            )

    def on_header_end(self) -> None:
        self.head.extend(bytes(self.header_field) + b": " + bytes(self.header_value) + b"\r\n")
        self.header_field.clear()
        self.header_value.clear()

    def on_headers_finished(self) -> None:
        name, filename = _part_head(bytes(self.head))
        self.name, self.sink = name, None
        if name is None or name in self.form.names:  # unnamed or a repeat: as before, not kept
            return
        self.form.names.append(name)
        if name == self.file_part:
            self.form.has_file, self.form.file_name = True, filename
            self.sink = self.out
        else:
            self.sink = self.fields.setdefault(name, bytearray())

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self.sink is None:
            return
        if self.sink is self.out:
            self.out.write(data[start:end])
            self.form.file_size += end - start
            return
        assert isinstance(self.sink, bytearray)
        self.sink.extend(data[start:end])
        if len(self.sink) > MAX_FIELD_BYTES:
            name = (self.name or "")[:64]
            raise bad_request(
                f"The form part '{name}' is larger than {MAX_FIELD_BYTES} bytes", name
            )

    def on_part_end(self) -> None:
        self.sink = None


async def receive_form(
    request: Request, partial: Path, limit: int, too_large: APIError, file_part: str = "file"
) -> UploadedForm:
    """Read a multipart/form-data body: the first part named `file_part` is written to
    `partial` (created here; the caller removes it, and syncs it with `sync_file`), the other
    parts kept (up to MAX_FIELD_BYTES each). 415 for another Content-Type, `too_large` once the
    body passes `limit` bytes, 400 for a malformed form, ClientDisconnected when the client
    leaves."""
    media, params = parse_options_header(request.headers.get("content-type", ""))
    if media != b"multipart/form-data":
        raise APIError(
            415,
            f"Send the file as multipart/form-data with a part named '{file_part}'",
            code="UNSUPPORTED_MEDIA_TYPE",
        )
    boundary = params.get(b"boundary")
    if not boundary:
        raise bad_request("The multipart/form-data Content-Type names no boundary", file_part)
    declared = request.headers.get("content-length", "")
    if declared.isdecimal() and int(declared) > limit:
        raise too_large
    size = 0
    with open(partial, "wb") as out:
        reader = _FormReader(out, file_part)
        parser = MultipartParser(boundary, reader.callbacks())
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise too_large
                parser.write(chunk)
        except ClientDisconnect:
            raise ClientDisconnected() from None
        except MultipartParseError as exc:
            raise bad_request(
                f"The multipart/form-data body is malformed: {exc}", file_part
            ) from None
        if parser.state != MultipartState.END:
            raise bad_request(
                "The multipart/form-data body ends before its closing boundary", file_part
            )
    form = reader.form
    form.fields = {k: bytes(v) for k, v in reader.fields.items()}
    return form


def sync_file(path: Path) -> None:
    """fsync a file written by receive_form (seconds for hundreds of MB: call it off the event
    loop), so a dataset never holds a file a crash cut short."""
    with open(path, "rb+") as f:
        os.fsync(f.fileno())
