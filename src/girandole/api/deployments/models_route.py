"""Routes of Fireworks' models API, as the fireworks-ai SDK's `client.models` (and `firectl
create model`) call them: the catalog a deployment or a LoRA DeployedModel is made from, and the
upload of a model's files.

    POST   /v1/accounts/{a}/models                        create {modelId, model{kind, ...}}:
                                                          UPLOADING
    GET    /v1/accounts/{a}/models                        list (pageSize, pageToken, filter,
                                                          orderBy, readMask)
    GET    /v1/accounts/{a}/models/{m}                    get
    PATCH  /v1/accounts/{a}/models/{m}                    update displayName, description
    DELETE /v1/accounts/{a}/models/{m}                    delete, with its uploaded files
    POST   /v1/accounts/{a}/models/{m}:getUploadEndpoint  {filenameToSize} -> signed PUT URLs
    GET    /v1/accounts/{a}/models/{m}:validateUpload     the files checked: READY (POST too)
    GET    /v1/accounts/{a}/models/{m}:getDownloadEndpoint  signed GET URLs of its files
    POST   /v1/accounts/{a}/models/{m}:prepare            {precision unset}: its first load
                                                          readied in the background
                                                          (deploy/prepare.py)
    PUT|GET /v1/accounts/{a}/models/{m}/files/{name}?expires=&signature=  the signed URLs

also under /inference/v1. A model is HF_BASE_MODEL (config.json and *.safetensors, or one .gguf)
or HF_PEFT_ADDON (a PEFT LoRA adapter of `peftDetails.baseModel`: a READY base model of the
account's own, of the public `fireworks` catalog, or the server's own model). Until
`:validateUpload` finds the files its kind needs it is UPLOADING: no deployment or DeployedModel
can be made from it. The files go to `<data_dir>/model-uploads/<account>/<model_id>/`
(registry/model_files.py) through URLs of this server itself (api/http/signed_upload.py).
"""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI, Query, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict

from girandole.api.deployments.route import (
    Account,
    authenticate,
    authorize_account,
    check_may_change,
    manager_of,
    read_json,
)
from girandole.api.http.errors import APIError, bad_request
from girandole.api.http.list_params import ListParams, ListQuery, list_page
from girandole.api.http.list_params import read_masked as masked_fields
from girandole.api.http.openapi import body_doc
from girandole.api.http.opened_file import opened_file_response
from girandole.api.http.signed_upload import (
    check_content_length,
    check_filename,
    check_signature,
    check_sizes,
    receive_body,
    signed_url,
)
from girandole.batch.store import is_valid_filename
from girandole.deploy.prepare import ModelPreparer
from girandole.registry.model_files import ModelFiles
from girandole.registry.models import (
    PUBLIC_ACCOUNT,
    READY,
    UPLOADING,
    CatalogModel,
    ModelCatalog,
    check_uploaded_files,
)
from girandole.registry.naming import is_valid_id, model_name

MAX_FILE_BYTES = 1 << 40  # a model's file (a shard, a .gguf): the disk is the real limit
KINDS = ("HF_BASE_MODEL", "HF_PEFT_ADDON")
OCTETS = "application/octet-stream"
# The fields of a Model (registry/models.py CatalogModel.to_json) a filter, orderBy or readMask
# may name.
MODEL_FIELDS = {
    "name",
    "displayName",
    "description",
    "kind",
    "state",
    "public",
    "createTime",
    "peftDetails",
}
FORBID = ConfigDict(extra="forbid")


class PeftDetails(BaseModel):
    model_config = FORBID

    baseModel: str
    r: int | None = None
    targetModules: list[str] | None = None
    baseModelType: str | None = None
    mergeAddonModelName: str | None = None


class ModelFields(BaseModel):
    """A Model as the SDK sends it (ModelParam), and the output fields of one read back (a
    PATCH may send the whole Model). Only displayName, description, kind and peftDetails mean
    something here; the others are accepted on a create and left unused."""

    model_config = FORBID

    displayName: str | None = None
    description: str | None = None
    kind: str | None = None
    peftDetails: PeftDetails | None = None
    baseModelDetails: dict[str, Any] | None = None
    contextLength: int | None = None
    conversationConfig: dict[str, Any] | None = None
    defaultDraftModel: str | None = None
    defaultDraftTokenCount: int | None = None
    deprecationDate: dict[str, Any] | None = None
    githubUrl: str | None = None
    huggingFaceUrl: str | None = None
    public: bool | None = None
    snapshotType: str | None = None
    supportsImageInput: bool | None = None
    supportsLora: bool | None = None
    supportsTools: bool | None = None
    teftDetails: Any = None
    trainingContextLength: int | None = None
    useHfApplyChatTemplate: bool | None = None
    # output only: ignored
    name: str | None = None
    state: str | None = None
    status: Any = None
    createTime: str | None = None
    updateTime: str | None = None


class CreateModelBody(BaseModel):
    model_config = FORBID

    modelId: str
    model: ModelFields | None = None
    cluster: str | None = None


class UploadEndpointBody(BaseModel):
    model_config = FORBID

    filenameToSize: dict[str, str | int]
    enableResumableUpload: bool | None = None
    readMask: str | None = None


class PrepareBody(BaseModel):
    model_config = FORBID

    precision: str | None = None
    readMask: str | None = None


router = APIRouter(tags=["models"])


def catalog_of(request: Request) -> ModelCatalog:
    return manager_of(request).catalog


def files_of(request: Request) -> ModelFiles:
    return request.app.state.model_files


def not_found(account: str, model_id: str) -> APIError:
    name = model_name(account, model_id)
    return APIError(404, f"Model {name} not found", type="error", code="NOT_FOUND")


def get_or_404(request: Request, account: str, model_id: str) -> CatalogModel:
    found = catalog_of(request).get(model_name(account, model_id))
    if found is None:
        raise not_found(account, model_id)
    return found


def failed_precondition(message: str) -> APIError:
    return APIError(400, message, code="FAILED_PRECONDITION")


def still_uploading(model: CatalogModel) -> None:
    """Files join an UPLOADING model only: a READY one may be deployed, its files read."""
    if model.state != UPLOADING:
        raise failed_precondition(
            f"Model {model.name} is {model.state}: its files cannot change (create a model of"
            " another id for new files)"
        )


async def _readable_account(request: Request, account: str) -> str:
    """Every key may read the public catalog (account `fireworks`); other accounts' models
    only their own keys."""
    if account == PUBLIC_ACCOUNT:
        authenticate(request)
        return account
    return await authorize_account(request, account)


def _check_texts(fields: ModelFields, prefix: str) -> None:
    if fields.displayName is not None and len(fields.displayName) >= 64:
        raise bad_request(f"{prefix}displayName must be fewer than 64 characters long",
                          f"{prefix}displayName")  # fmt: skip
    if fields.description is not None and len(fields.description) >= 1000:
        raise bad_request(f"{prefix}description must be fewer than 1000 characters long",
                          f"{prefix}description")  # fmt: skip


def _adapter_base(request: Request, account: str, text: str) -> str:
    """The base model an HF_PEFT_ADDON names, if the account can reach it and it is a READY
    base model; else a 400 naming peftDetails.baseModel."""
    param = "model.peftDetails.baseModel"
    base = manager_of(request).registry_model(account, text)
    if base is None:
        raise bad_request(
            f"{param} {text!r} is not a model this account can use (its own, the public"
            f" catalog's {PUBLIC_ACCOUNT}, or the server's own: see GET"
            f" /v1/accounts/{account}/models)",
            param,
        )
    if base.is_adapter:
        raise bad_request(f"{param} {base.name} is itself a LoRA adapter (HF_PEFT_ADDON)", param)
    if base.state != READY:
        raise bad_request(f"{param} {base.name} is {base.state}: validate it first", param)
    return base.name


# -- routes: ':verb' ones first (the plain `{model_id}` pattern would take them) --------------


@router.post(
    "/accounts/{account}/models/{model_id}:getUploadEndpoint",
    summary="Signed URLs to PUT a model's files to",
    openapi_extra=body_doc(UploadEndpointBody),
)
async def get_upload_endpoint(model_id: str, request: Request, account: str = Account) -> dict:
    model = get_or_404(request, account, model_id)
    body = await read_json(request, UploadEndpointBody)
    if body.enableResumableUpload:
        raise bad_request(
            "enableResumableUpload is not supported by this server: PUT each file whole",
            "enableResumableUpload",
        )
    still_uploading(model)
    sizes = check_sizes(body.filenameToSize, MAX_FILE_BYTES)
    urls = {name: signed_url(request, "PUT", model.name, name, n) for name, n in sizes.items()}
    return {"filenameToSignedUrls": urls}


@router.get(  # the SDK's method; POST too (two routes: each its own OpenAPI operation)
    "/accounts/{account}/models/{model_id}:validateUpload",
    summary="Check a model's uploaded files and mark it READY",
)
@router.post(
    "/accounts/{account}/models/{model_id}:validateUpload",
    summary="Check a model's uploaded files and mark it READY",
)
async def validate_upload(
    model_id: str,
    request: Request,
    account: str = Account,
    config_only: bool = Query(default=False, alias="configOnly"),
    skip_hf_config_validation: bool = Query(default=False, alias="skipHfConfigValidation"),
    trust_remote_code: bool = Query(default=False, alias="trustRemoteCode"),
) -> dict:
    check_may_change(request, request.state.principal)  # a GET that changes the model
    model = get_or_404(request, account, model_id)
    if model.state == READY:
        return {}
    files, catalog = files_of(request), catalog_of(request)
    folder = files.model_dir(account, model_id)

    def validate() -> None:  # under the lock: no file joins or goes while it is read
        with files.lock:
            try:
                source = check_uploaded_files(folder, model.is_adapter)
            except ValueError as exc:
                raise failed_precondition(
                    f"Model {model.name} is not complete: {exc}. PUT the missing files to URLs"
                    " of :getUploadEndpoint, then validate again"
                ) from None
            if not catalog.mark_ready(model.name, source):
                raise not_found(account, model_id)  # deleted meanwhile

    await asyncio.to_thread(validate)
    return {}


@router.post(
    "/accounts/{account}/models/{model_id}:prepare",
    summary="Ready a model's first load on this server (its precision is its weights')",
    openapi_extra=body_doc(PrepareBody),
)
async def prepare_model(model_id: str, request: Request, account: str = Account) -> dict:
    model = get_or_404(request, account, model_id)
    body = await read_json(request, PrepareBody)
    if body.precision not in (None, "", "PRECISION_UNSPECIFIED"):
        raise bad_request(
            f"precision {body.precision!r} is not supported by this server: every model runs in"
            " the precision of its own weights, so precision must be unset",
            "precision",
        )
    if model.state != READY:
        raise failed_precondition(
            f"Model {model.name} is {model.state}: upload its files and :validateUpload first"
        )
    if not model.is_adapter:  # an adapter is read as it loads: nothing to ready
        preparer = getattr(request.app.state, "model_preparer", None)
        if preparer is None:
            preparer = request.app.state.model_preparer = ModelPreparer()
        preparer.start(model.name, model.source)
    return {}


@router.get(
    "/accounts/{account}/models/{model_id}:getDownloadEndpoint",
    summary="Signed URLs to GET an uploaded model's files from",
)
async def get_download_endpoint(
    model_id: str,
    request: Request,
    account: str = Account,
    read_mask: str | None = Query(default=None, alias="readMask"),
) -> dict:
    model = get_or_404(request, account, model_id)
    files = files_of(request)
    if not files.holds(model.source, account, model_id):
        raise failed_precondition(
            f"Model {model.name} was not uploaded to this server (it is built in, or added with"
            " `girandole models add` from a folder of the server's): it has no files to download"
        )
    folder = files.model_dir(account, model_id)
    names = sorted(p.name for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []
    return {"filenameToSignedUrls": {n: signed_url(request, "GET", model.name, n) for n in names}}


@router.get("/accounts/{account}/models/{model_id}/files/{filename}", include_in_schema=False)
async def get_file(
    account: str, model_id: str, filename: str, request: Request, expires: int, signature: str
) -> Response:
    check_signature("GET", model_name(account, model_id), filename, expires, signature)
    path = files_of(request).model_dir(account, model_id) / filename
    # opened now: the model deleted while the file is sent cuts nothing
    found = opened_file_response(path, OCTETS) if is_valid_filename(filename) else None
    if found is None:
        raise APIError(404, f"No file {filename!r} in that model", type="error", code="NOT_FOUND")
    return found


@router.put("/accounts/{account}/models/{model_id}/files/{filename}", include_in_schema=False)
async def put_file(
    account: str, model_id: str, filename: str, request: Request, expires: int, signature: str,
    size: int | None = None,
) -> Response:  # fmt: skip
    name = model_name(account, model_id)
    check_signature("PUT", name, filename, expires, signature, size)
    check_filename(filename)
    model = get_or_404(request, account, model_id)
    still_uploading(model)
    check_content_length(request, filename, size)
    files, catalog = files_of(request), catalog_of(request)

    def check() -> None:  # again as the file joins: deleted or validated while it arrived
        now = catalog.get(name)
        if now is None or now.created != model.created:
            raise not_found(account, model_id)
        still_uploading(now)

    partial = files.partial_path()
    try:
        await receive_body(request, partial, filename, MAX_FILE_BYTES, size)
        await asyncio.to_thread(files.place, account, model_id, filename, partial, check)
    finally:
        partial.unlink(missing_ok=True)
    return Response(status_code=200)


@router.post(
    "/accounts/{account}/models",
    summary="Create a model (then upload its files)",
    openapi_extra=body_doc(CreateModelBody),
)
async def create_model(request: Request, account: str = Account) -> dict:
    body = await read_json(request, CreateModelBody)
    if not is_valid_id(body.modelId):
        raise bad_request(
            f"modelId {body.modelId!r} is not a valid id: 1-63 characters of a-z, 0-9 and '-',"
            " starting with a letter",
            "modelId",
        )
    if body.cluster:
        raise bad_request("cluster (a BYOC cluster) is not supported by this server", "cluster")
    fields = body.model or ModelFields()
    _check_texts(fields, "model.")
    kind = fields.kind or ("HF_PEFT_ADDON" if fields.peftDetails else "HF_BASE_MODEL")
    if kind not in KINDS:
        raise bad_request(
            f"model.kind {kind!r} is not supported by this server: {' or '.join(KINDS)}",
            "model.kind",
        )
    base = None
    if kind == "HF_PEFT_ADDON":
        if fields.peftDetails is None:
            raise bad_request(
                "model.peftDetails.baseModel is required for an HF_PEFT_ADDON: the model the"
                " adapter was trained on",
                "model.peftDetails.baseModel",
            )
        base = _adapter_base(request, account, fields.peftDetails.baseModel)
    elif fields.peftDetails is not None:
        raise bad_request("model.peftDetails is only for kind HF_PEFT_ADDON", "model.peftDetails")
    name = model_name(account, body.modelId)
    files = files_of(request)
    folder = files.model_dir(account, body.modelId)
    model = catalog_of(request).create_upload(
        name, str(folder), base, fields.displayName, fields.description
    )
    if model is None:
        raise APIError(409, f"Model {name} already exists", type="error", code="ALREADY_EXISTS")

    def start_empty() -> None:  # files a model of this name left (removed by the CLI) go
        with files.lock:
            files.remove(account, body.modelId)

    await asyncio.to_thread(start_empty)
    return model.to_json()


@router.get("/accounts/{account}/models", summary="List the models of an account")
async def list_models(account: str, request: Request, query: ListParams = ListQuery) -> dict:
    account = await _readable_account(request, account)
    models = [m.to_json() for m in catalog_of(request).list(account)]
    return list_page(models, "models", query, MODEL_FIELDS, [])  # by name, as at Fireworks


@router.get("/accounts/{account}/models/{model_id}", summary="Get a model")
async def get_model(
    account: str,
    model_id: str,
    request: Request,
    read_mask: str | None = Query(default=None, alias="readMask"),
) -> dict:
    account = await _readable_account(request, account)
    model = get_or_404(request, account, model_id)
    return masked_fields(model.to_json(), read_mask, MODEL_FIELDS)


@router.patch(
    "/accounts/{account}/models/{model_id}",
    summary="Update a model's displayName and description",
    openapi_extra=body_doc(ModelFields),
)
async def update_model(model_id: str, request: Request, account: str = Account) -> dict:
    model = get_or_404(request, account, model_id)
    fields = await read_json(request, ModelFields)
    _check_texts(fields, "")
    current = model.to_json()
    output_only = {"name", "state", "status", "createTime", "updateTime", "public"}
    for key, value in fields.model_dump(exclude_none=True).items():
        if key in ("displayName", "description") or key in output_only:
            continue
        if current.get(key) != value:
            raise bad_request(
                f"{key} of a model cannot be changed (only displayName and description can):"
                " create a model of another id",
                key,
            )
    if model.built_in:
        raise bad_request(
            f"Model {model.name} is built in (the server's own or default model): it cannot be"
            " changed",
            "name",
        )
    changed = catalog_of(request).describe(model.name, fields.displayName, fields.description)
    if changed is None:  # deleted meanwhile
        raise not_found(account, model_id)
    return changed.to_json()


@router.delete("/accounts/{account}/models/{model_id}", summary="Delete a model")
async def delete_model(model_id: str, request: Request, account: str = Account) -> dict:
    model = get_or_404(request, account, model_id)
    if model.built_in:
        raise bad_request(
            f"Model {model.name} is built in (the server's own or default model): it cannot be"
            " deleted",
            "name",
        )
    users = _users_of(request, model)
    if users:
        raise failed_precondition(
            f"Model {model.name} is in use by {', '.join(users)}: delete or unload them first"
        )
    files, catalog = files_of(request), catalog_of(request)

    def remove() -> None:
        with files.lock:  # no upload joins the folder after it is gone
            catalog.remove(model.name)
            if files.holds(model.source, account, model_id):
                files.remove(account, model_id)

    await asyncio.to_thread(remove)
    return {}


def _users_of(request: Request, model: CatalogModel) -> list[str]:
    """What still needs the model: deployments made from it, its DeployedModels, and adapters
    trained on it."""
    users = [
        f"deployment {r.name}"
        for r in manager_of(request).store.list()
        if r.base_model == model.name and not r.deleted
    ]
    lora = getattr(request.app.state, "lora", None)
    if lora is not None:
        users += [f"DeployedModel {r.name}" for r in lora.store.list() if r.model == model.name]
    users += [
        f"LoRA adapter {m.name}" for m in catalog_of(request).list() if m.base_model == model.name
    ]
    return users


def install_model_files(app: FastAPI, state: Any) -> ModelFiles:
    """Where uploaded models' files go: `<data_dir>/model-uploads`, or a folder that dies with
    the app when it has no data folder (an in-memory database)."""
    settings = state.settings
    if settings.data_dir:
        folder = Path(settings.data_dir) / "model-uploads"
    else:
        scratch = tempfile.TemporaryDirectory(prefix="girandole-model-uploads-")
        app.state.model_uploads_scratch = scratch
        folder = Path(scratch.name)
    catalog = app.state.deployments.catalog
    files = ModelFiles(folder, lambda a, m: catalog.get(model_name(a, m)) is not None)
    app.state.model_files = files
    return files
