"""An evaluator's source uploaded as an archive, Fireworks' upload flow:

    POST  /v1/accounts/{a}/evaluators/{e}:getUploadEndpoint  {filenameToSize} -> signed PUT URLs
                                                             (.tar.gz, .tgz, .tar or .zip)
    PUT   /v1/accounts/{a}/evaluators/{e}/files/{name}?expires=&size=&signature=   the archive
    POST  /v1/accounts/{a}/evaluators/{e}:validateUpload     its text files become the
                                                             evaluator's criterion; it builds

also under /inference/v1. The entry function is `entryPoint` (`file.py::function`), else the
criterion's entryFile and entryFunc, else main.py's `evaluate`; a requirements.txt in the archive
is the evaluator's `requirements` when it has none.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import uuid
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import BaseModel

from girandole.api.datasets.route import STRICT
from girandole.api.deployments.route import Account, read_json
from girandole.api.evaluators.route import code_allowed, runtime_of, store_of
from girandole.api.finetune.jobs import get_or_404
from girandole.api.http.errors import APIError, bad_request
from girandole.api.http.openapi import body_doc
from girandole.api.http.signed_upload import (
    check_content_length,
    check_filename,
    check_signature,
    check_sizes,
    receive_body,
    signed_url,
)  # fmt: skip
from girandole.evaluators.archive import (
    ARCHIVE_SUFFIXES,
    MAX_SOURCE_BYTES,
    ArchiveError,
    parse_entry_point,
    read_sources,
)  # fmt: skip
from girandole.evaluators.build import BUILDING

UPLOADS = "uploads"  # the archives PUT, in the evaluator's folder until :validateUpload


class UploadEndpointBody(BaseModel):
    model_config = STRICT

    filenameToSize: dict[str, str | int]
    readMask: str | None = None


router = APIRouter(tags=["evaluators"])


@router.post(
    "/accounts/{account}/evaluators/{evaluator_id}:getUploadEndpoint",
    summary="Signed URLs to PUT an evaluator's source archive to",
    openapi_extra=body_doc(UploadEndpointBody),
)
async def get_upload_endpoint(evaluator_id: str, request: Request, account: str = Account) -> dict:
    code_allowed(request)
    store = store_of(request)
    get_or_404(store, account, evaluator_id)
    body = await read_json(request, UploadEndpointBody)
    sizes = check_sizes(body.filenameToSize, MAX_SOURCE_BYTES)
    for name in sizes:
        if not name.endswith(ARCHIVE_SUFFIXES):
            raise bad_request(
                f"filenameToSize: {name!r} is not an archive ({', '.join(ARCHIVE_SUFFIXES)})",
                "filenameToSize",
            )
    resource = store.name(account, evaluator_id)
    urls = {name: signed_url(request, "PUT", resource, name, size) for name, size in sizes.items()}
    return {"filenameToSignedUrls": urls}


@router.put("/accounts/{account}/evaluators/{evaluator_id}/files/{filename}", include_in_schema=False)  # fmt: skip
async def put_archive(
    account: str, evaluator_id: str, filename: str, request: Request, expires: int, signature: str,
    size: int | None = None,
) -> Response:  # fmt: skip
    store = store_of(request)
    check_signature("PUT", store.name(account, evaluator_id), filename, expires, signature, size)
    check_filename(filename)
    get_or_404(store, account, evaluator_id)
    check_content_length(request, filename, size)
    folder = runtime_of(request).evaluator_dir(account, evaluator_id)
    folder.mkdir(parents=True, exist_ok=True)
    partial = folder / f".partial-{uuid.uuid4().hex}"
    try:
        await receive_body(request, partial, filename, MAX_SOURCE_BYTES, size)
        (folder / UPLOADS).mkdir(exist_ok=True)
        os.replace(partial, folder / UPLOADS / filename)
    finally:
        partial.unlink(missing_ok=True)
    return Response(status_code=200)


def entry_of(evaluator: dict[str, Any]) -> tuple[str, str]:
    if evaluator.get("entryPoint"):
        return parse_entry_point(evaluator["entryPoint"])
    for criterion in evaluator.get("criteria") or []:
        snippets = criterion["codeSnippets"]
        return snippets["entryFile"], snippets["entryFunc"]
    return "main.py", "evaluate"


@router.post(
    "/accounts/{account}/evaluators/{evaluator_id}:validateUpload",
    summary="Build an evaluator from the source archive PUT to its upload URLs",
)
async def validate_upload(evaluator_id: str, request: Request, account: str = Account) -> dict:
    code_allowed(request)
    store, runtime = store_of(request), runtime_of(request)
    evaluator = get_or_404(store, account, evaluator_id)
    uploads = runtime.evaluator_dir(account, evaluator_id) / UPLOADS
    archives = sorted(uploads.iterdir()) if uploads.is_dir() else []
    if not archives:
        raise APIError(
            400,
            f"Evaluator {evaluator['name']} has no archive yet: PUT it to a URL of"
            " :getUploadEndpoint",
            code="FAILED_PRECONDITION",
        )
    try:
        files, skipped = await asyncio.to_thread(read_sources, archives)
    except ArchiveError as exc:
        raise bad_request(f"the uploaded source: {exc}", "filenameToSize") from None
    entry_file, entry_func = entry_of(evaluator)
    if entry_file not in files:
        raise bad_request(
            f"entryPoint: the entry file {entry_file!r} is not in the uploaded archive (it holds"
            f" {', '.join(sorted(files)[:20])})",
            "entryPoint",
        )
    snippets = {"language": "python", "fileContents": files, "entryFile": entry_file, "entryFunc": entry_func}  # fmt: skip
    evaluator["criteria"] = [{"type": "CODE_SNIPPETS", "name": "upload", "codeSnippets": snippets}]
    if not evaluator.get("requirements") and "requirements.txt" in files:
        evaluator["requirements"] = files["requirements.txt"]
    evaluator["source"] = {"type": "TYPE_UPLOAD"}
    evaluator["state"] = BUILDING
    message = f"left out (not UTF-8 text): {', '.join(skipped)}" if skipped else ""
    evaluator["status"] = {"code": "OK", "message": message}
    if not store.save(account, evaluator_id, evaluator):
        get_or_404(store, account, evaluator_id)  # deleted meanwhile: a 404
    shutil.rmtree(uploads, ignore_errors=True)
    runtime.build_later(account, evaluator_id)
    return {}
