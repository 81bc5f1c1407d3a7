"""Routes of Fireworks' evaluators API, as the fireworks-ai SDK's `client.evaluators` calls them:

    POST   /v1/accounts/{a}/evaluatorsV2                 create {evaluatorId, evaluator{...}}
                                                         (also at /evaluators)
    GET    /v1/accounts/{a}/evaluators                   list (pageSize, pageToken, filter,
                                                         orderBy, readMask)
    GET    /v1/accounts/{a}/evaluators/{e}               get
    PATCH  /v1/accounts/{a}/evaluators/{e}               update; new criteria or requirements
                                                         build it again
    DELETE /v1/accounts/{a}/evaluators/{e}               delete
    GET    /v1/accounts/{a}/evaluators/{e}:getBuildLogEndpoint      {buildLogSignedUri}
    GET    /v1/accounts/{a}/evaluators/{e}:getSourceCodeSignedUrl   {filenameToSignedUrls}: the
                                                         files as source.tar.gz
    POST   /v1/accounts/{a}/evaluators/{e}:getUploadEndpoint, :validateUpload   the source as
                                                         an archive instead (upload_route.py)

also under /inference/v1. The code is a criterion of type CODE_SNIPPETS (its fileContents, entryFile
and entryFunc); a create answers BUILDING while a child process loads it (girandole.evaluators.build),
then the evaluator is ACTIVE or BUILD_FAILED (status.message says why, the build log more).
"""

from __future__ import annotations

import io
import tarfile
import time
from typing import Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response
from pydantic import BaseModel

from girandole.api.datasets.route import STRICT, created_by, own_id
from girandole.api.deployments.route import Account, read_json
from girandole.api.evaluators.runtime import BUILD_LOG, SOURCE_ARCHIVE, EvaluatorRuntime
from girandole.api.finetune.jobs import get_or_404, job_exists, new_job_id, stores_of
from girandole.api.http.errors import APIError, bad_request
from girandole.api.http.list_params import ListParams, ListQuery, list_page, read_masked
from girandole.api.http.openapi import body_doc
from girandole.api.http.opened_file import opened_file_response
from girandole.api.http.signed_upload import check_signature, signed_url
from girandole.batch.store import now_text
from girandole.evaluators.archive import parse_entry_point
from girandole.evaluators.build import BUILDING
from girandole.evaluators.runner import check_file_name
from girandole.evaluators.store import CREATING, EVALUATION_JOBS, EVALUATORS, RUNNING, JobStore

_SOURCE_TYPES = ("TYPE_UNSPECIFIED", "TYPE_UPLOAD", "TYPE_TEMPORARY")


class CodeSnippets(BaseModel):
    model_config = STRICT

    entryFile: str | None = None
    entryFunc: str | None = None
    fileContents: dict[str, str] | None = None
    language: str | None = None


class Criterion(BaseModel):
    model_config = STRICT

    type: str | None = None
    name: str | None = None
    description: str | None = None
    codeSnippets: CodeSnippets | None = None


class Source(BaseModel):
    model_config = STRICT

    type: str | None = None
    githubRepositoryName: str | None = None


class EvaluatorFields(BaseModel):
    model_config = STRICT

    displayName: str | None = None
    description: str | None = None
    criteria: list[Criterion] | None = None
    requirements: str | None = None
    entryPoint: str | None = None
    defaultDataset: str | None = None
    commitHash: str | None = None
    source: Source | None = None


class CreateEvaluatorBody(BaseModel):
    model_config = STRICT

    evaluator: EvaluatorFields
    evaluatorId: str | None = None


class UpdateEvaluatorBody(EvaluatorFields):
    """A PATCH's body: the Evaluator, which may be one a GET returned (its output-only fields
    are ignored)."""

    name: str | None = None
    createTime: str | None = None
    updateTime: str | None = None
    createdBy: str | None = None
    state: str | None = None
    status: dict[str, Any] | None = None


OUTPUT_ONLY = {"name", "createTime", "updateTime", "createdBy", "state", "status"}
EVALUATOR_FIELDS = set(EvaluatorFields.model_fields) | OUTPUT_ONLY
REBUILDS = ("criteria", "requirements")  # a change of these builds the evaluator again
AWAITING_UPLOAD = "waiting for the source: :getUploadEndpoint, PUT the archive, :validateUpload"

router = APIRouter(tags=["evaluators"])


def store_of(request: Request) -> JobStore:
    return request.app.state.evaluator_stores[EVALUATORS.collection]


def runtime_of(request: Request) -> EvaluatorRuntime:
    return request.app.state.evaluators


def code_allowed(request: Request) -> None:
    """403 when the server runs no evaluator code (--no-evaluator-code)."""
    if not request.app.state.girandole.settings.evaluator_code:
        raise APIError(
            403,
            "evaluators with Python code are turned off on this server (--no-evaluator-code)",
            code="PERMISSION_DENIED",
        )


def check_criteria(criteria: list[Criterion] | None, prefix: str) -> list[dict[str, Any]]:
    """The criteria as stored (entryFile and entryFunc filled in); a 400 naming the field. Each
    is a CODE_SNIPPETS criterion (its own files and function); several score a row with the
    mean of their scores (girandole.evaluators.criteria), so their names must differ."""
    if not criteria:
        raise bad_request(
            f"{prefix}criteria: an evaluator needs one criterion of type CODE_SNIPPETS (its"
            " codeSnippets: fileContents, entryFile, entryFunc), or an entryPoint and its source"
            " uploaded (:getUploadEndpoint)",
            f"{prefix}criteria",
        )
    stored = [check_criterion(c, f"{prefix}criteria[{i}]") for i, c in enumerate(criteria)]
    names = [c.name or f"criteria[{i}]" for i, c in enumerate(criteria)]
    for i, name in enumerate(names):
        if name in names[:i]:
            at = f"{prefix}criteria[{i}].name"
            raise bad_request(f"{at} {name!r} is another criterion's name too: give each its own", at)  # fmt: skip
    return stored


def check_criterion(criterion: Criterion, at: str) -> dict[str, Any]:
    if criterion.type != "CODE_SNIPPETS":
        raise bad_request(f"{at}.type must be CODE_SNIPPETS, got {criterion.type!r}", f"{at}.type")
    snippets = criterion.codeSnippets
    if snippets is None:
        raise bad_request(f"{at}.codeSnippets is required", f"{at}.codeSnippets")
    at += ".codeSnippets"
    if (snippets.language or "python").lower() != "python":
        raise bad_request(
            f"{at}.language must be python, got {snippets.language!r}", f"{at}.language"
        )
    files = snippets.fileContents or {}
    if not files:
        raise bad_request(f"{at}.fileContents: no files", f"{at}.fileContents")
    for name in files:
        if error := check_file_name(name):
            raise bad_request(f"{at}.fileContents: {error}", f"{at}.fileContents")
    entry_file = snippets.entryFile
    if not entry_file:  # the one file there is, else main.py
        entry_file = next(iter(files)) if len(files) == 1 else "main.py"
    if entry_file not in files:
        raise bad_request(
            f"{at}.entryFile {entry_file!r} is not in fileContents ({', '.join(sorted(files))})",
            f"{at}.entryFile",
        )
    entry_func = snippets.entryFunc or "evaluate"
    if not entry_func.isidentifier():
        raise bad_request(
            f"{at}.entryFunc {entry_func!r} is not a Python function name", f"{at}.entryFunc"
        )
    stored = criterion.model_dump(exclude_none=True)
    stored["codeSnippets"] = {
        "language": "python",
        "fileContents": files,
        "entryFile": entry_file,
        "entryFunc": entry_func,
    }
    return stored


def check_fields(request: Request, account: str, fields: EvaluatorFields, prefix: str) -> dict[str, Any]:  # fmt: skip
    """The fields set, checked (400s naming `<prefix><field>`)."""
    checked = fields.model_dump(exclude_none=True, include=set(EvaluatorFields.model_fields))
    if fields.criteria is not None:
        code_allowed(request)
        checked["criteria"] = check_criteria(fields.criteria, prefix)
    if (
        fields.source is not None
        and (fields.source.type or "TYPE_UNSPECIFIED") not in _SOURCE_TYPES
    ):
        raise bad_request(
            f"{prefix}source.type {fields.source.type!r} is not supported by this server (give"
            " the code in criteria[].codeSnippets, or upload it)",
            f"{prefix}source.type",
        )
    if fields.entryPoint:
        try:
            parse_entry_point(fields.entryPoint)
        except ValueError as exc:
            raise bad_request(f"{prefix}{exc}", f"{prefix}entryPoint") from None
    if fields.defaultDataset:
        dataset_id = own_id(account, fields.defaultDataset, "datasets", f"{prefix}defaultDataset")
        checked["defaultDataset"] = f"accounts/{account}/datasets/{dataset_id}"
    return checked


def source_archive(evaluator: dict[str, Any]) -> bytes:
    """The evaluator's files as a tar.gz (what a Fireworks upload holds; several criteria's in a
    folder each)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        criteria = evaluator.get("criteria") or []
        for i, criterion in enumerate(criteria):
            # several criteria: each one's files in a folder of its name (they may share names)
            folder = f"{criterion.get('name') or f'criteria[{i}]'}/" if len(criteria) > 1 else ""
            for name, text in criterion["codeSnippets"]["fileContents"].items():
                data = text.encode("utf-8")
                info = tarfile.TarInfo(folder + name)
                info.size, info.mtime = len(data), int(time.time())
                archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


# -- ':verb' routes first (the plain `{evaluator_id}` pattern would take them) -----------------


@router.get(
    "/accounts/{account}/evaluators/{evaluator_id}:getBuildLogEndpoint",
    summary="A signed URL of an evaluator's build log",
)
async def get_build_log_endpoint(
    evaluator_id: str,
    request: Request,
    account: str = Account,
    read_mask: str | None = Query(default=None, alias="readMask"),
) -> dict:
    store = store_of(request)
    get_or_404(store, account, evaluator_id)
    if not (runtime_of(request).evaluator_dir(account, evaluator_id) / BUILD_LOG).is_file():
        return {}  # still building: no log yet (Fireworks' answer has no URL then)
    url = signed_url(request, "GET", store.name(account, evaluator_id), BUILD_LOG)
    return {"buildLogSignedUri": url}


async def get_source_code_endpoint(
    evaluator_id: str,
    request: Request,
    account: str = Account,
    read_mask: str | None = Query(default=None, alias="readMask"),
) -> dict:
    store = store_of(request)
    get_or_404(store, account, evaluator_id)
    url = signed_url(request, "GET", store.name(account, evaluator_id), SOURCE_ARCHIVE)
    return {"filenameToSignedUrls": {SOURCE_ARCHIVE: url}}


for _verb in ("getSourceCodeSignedUrl", "getSourceCodeEndpoint"):
    router.add_api_route(
        f"/accounts/{{account}}/evaluators/{{evaluator_id}}:{_verb}",
        get_source_code_endpoint,
        methods=["GET"],
        summary="A signed URL of an evaluator's source as a tar.gz",
        include_in_schema=_verb == "getSourceCodeSignedUrl",
    )


@router.get("/accounts/{account}/evaluators/{evaluator_id}/files/{filename}", include_in_schema=False)  # fmt: skip
async def get_file(
    account: str, evaluator_id: str, filename: str, request: Request, expires: int, signature: str
) -> Response:
    store = store_of(request)
    check_signature("GET", store.name(account, evaluator_id), filename, expires, signature)
    evaluator = store.get(account, evaluator_id)
    if evaluator is not None and filename == SOURCE_ARCHIVE:
        return Response(source_archive(evaluator), media_type="application/gzip")
    path = runtime_of(request).evaluator_dir(account, evaluator_id) / BUILD_LOG
    found = opened_file_response(path, "text/plain") if evaluator and filename == BUILD_LOG else None  # fmt: skip
    if found is None:
        raise APIError(404, f"No file {filename!r} of that evaluator", type="error", code="NOT_FOUND")  # fmt: skip
    return found


async def create_evaluator(
    request: Request,
    account: str = Account,
    evaluator_id_query: str | None = Query(default=None, alias="evaluatorId"),
) -> dict:
    code_allowed(request)
    body = await read_json(request, CreateEvaluatorBody)
    store = store_of(request)
    evaluator_id = new_job_id(EVALUATORS, body.evaluatorId or evaluator_id_query)
    fields = check_fields(request, account, body.evaluator, "evaluator.")
    if "criteria" not in fields and "entryPoint" not in fields:
        check_criteria(None, "evaluator.")  # the 400: neither the code nor an upload to come
    now = now_text()
    evaluator = {
        "name": store.name(account, evaluator_id),
        "displayName": fields.pop("displayName", None) or evaluator_id,
        **fields,
        "state": BUILDING,
        "status": {"code": "OK", "message": "" if "criteria" in fields else AWAITING_UPLOAD},
        "createTime": now,
        "updateTime": now,
        "createdBy": created_by(request),
    }
    if not store.insert(account, evaluator_id, evaluator):
        raise job_exists(store, account, evaluator_id)
    if "criteria" in fields:
        runtime_of(request).build_later(account, evaluator_id)
    return evaluator


for _path in ("evaluatorsV2", "evaluators"):
    router.add_api_route(
        f"/accounts/{{account}}/{_path}",
        create_evaluator,
        methods=["POST"],
        summary="Create an evaluator",
        openapi_extra=body_doc(CreateEvaluatorBody),
        include_in_schema=_path == "evaluatorsV2",
    )


@router.get("/accounts/{account}/evaluators", summary="List evaluators")
async def list_evaluators(request: Request, account: str = Account, query: ListParams = ListQuery) -> dict:  # fmt: skip
    evaluators = store_of(request).list(account)
    return list_page(evaluators, "evaluators", query, EVALUATOR_FIELDS | {f for e in evaluators for f in e})  # fmt: skip


@router.get("/accounts/{account}/evaluators/{evaluator_id}", summary="Get an evaluator")
async def get_evaluator(
    evaluator_id: str,
    request: Request,
    account: str = Account,
    read_mask: str | None = Query(default=None, alias="readMask"),
) -> dict:
    found = get_or_404(store_of(request), account, evaluator_id)
    return read_masked(found, read_mask, EVALUATOR_FIELDS)


@router.patch(
    "/accounts/{account}/evaluators/{evaluator_id}",
    summary="Update an evaluator (new criteria or requirements build it again)",
    openapi_extra=body_doc(UpdateEvaluatorBody),
)
async def update_evaluator(
    evaluator_id: str,
    request: Request,
    account: str = Account,
    prepare_code_upload: bool = Query(default=False, alias="prepareCodeUpload"),
) -> dict:
    store = store_of(request)
    current = get_or_404(store, account, evaluator_id)
    fields = check_fields(request, account, await read_json(request, UpdateEvaluatorBody), "")
    rebuild = any(k in fields and fields[k] != current.get(k) for k in REBUILDS)
    current.update(fields)
    if prepare_code_upload:  # BUILDING until :validateUpload; a build in flight is dropped
        code_allowed(request)
        current["state"] = BUILDING
        current["status"] = {"code": "OK", "message": AWAITING_UPLOAD}
        runtime_of(request).supersede(account, evaluator_id)
    elif rebuild:
        current["state"] = BUILDING
        current["status"] = {"code": "OK", "message": ""}
    if not store.save(account, evaluator_id, current):
        get_or_404(store, account, evaluator_id)  # deleted meanwhile: a 404
    if rebuild and not prepare_code_upload:
        runtime_of(request).build_later(account, evaluator_id)
    return current


def not_used_by_a_job(request: Request, account: str, name: str) -> None:
    """A 400 when a job that has not ended scores with the evaluator `name`: an evaluation job
    (CREATING or RUNNING), or a reinforcement fine-tuning job (a PENDING one reads the code when
    it starts; a RUNNING one already has it, and is named too, so that its rollouts' scores stay
    the evaluator's the job was created with)."""
    jobs: JobStore = request.app.state.evaluator_stores[EVALUATION_JOBS.collection]
    waiting = [(jobs.naming(account, name, ("evaluator",), (CREATING, RUNNING)), "evaluation job", "delete")]  # fmt: skip
    for store in stores_of(request).values():
        waiting.append((store.naming(account, name, ("evaluator",)), store.kind.noun_inside, "cancel"))  # fmt: skip
    for job, noun, verb in waiting:
        if job is not None:
            raise APIError(
                400,
                f"Evaluator {name} is used by {noun} {job['name']}, which has not ended"
                f" ({job['state']}): {verb} the job or wait for it first",
                code="FAILED_PRECONDITION",
            )


@router.delete("/accounts/{account}/evaluators/{evaluator_id}", summary="Delete an evaluator")
async def delete_evaluator(evaluator_id: str, request: Request, account: str = Account) -> dict:
    store = store_of(request)
    evaluator = get_or_404(store, account, evaluator_id)
    not_used_by_a_job(request, account, evaluator["name"])
    store.delete(account, evaluator_id)
    runtime_of(request).forget(account, evaluator_id)
    return {}
