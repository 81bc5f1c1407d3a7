"""OpenAI's Conversations API, as the openai SDK's `client.conversations` calls it (also under
/inference/v1), over `registry/conversations.py`:

    POST   /v1/conversations                         create: items (at most 20), metadata
    GET    /v1/conversations/{id}
    POST   /v1/conversations/{id}                    update its metadata
    DELETE /v1/conversations/{id}                    and its items
    POST   /v1/conversations/{id}/items              append items (at most 20 at once)
    GET    /v1/conversations/{id}/items              limit (1-100, 20), after, order (desc)
    GET    /v1/conversations/{id}/items/{item_id}
    DELETE /v1/conversations/{id}/items/{item_id}    answers the conversation

Items are Responses input items (messages, function calls and outputs, reasoning, MCP items),
stored as a Responses request's input is (an id each, text parts). A Responses request with
`conversation` runs on the conversation's items, and its input and output items are appended
when it ends (`api/responses/route.py`); a stored one refers to the items it read, which get a
frozen copy before any of them is deleted (registry/conversation_refs.py). A key sees its own
account's conversations.
"""

from __future__ import annotations

from functools import partial
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from pydantic import Field

from girandole.api.deployments.route import read_json
from girandole.api.http.auth import require_api_key
from girandole.api.http.errors import APIError
from girandole.api.http.pages import list_page
from girandole.api.http.schema import StrictModel
from girandole.api.responses.convert import check_unique_ids, stored_items
from girandole.api.responses.route import INCLUDE, account_of, conversations_of, store_of
from girandole.api.responses.schema import Item, MetadataKey, MetadataValue

MAX_ITEMS = 20  # items in one create or append (OpenAI's limit)
MAX_LIST = 100

Metadata = Annotated[dict[MetadataKey, MetadataValue], Field(max_length=16)]


class CreateConversation(StrictModel):
    items: Annotated[list[Item], Field(max_length=MAX_ITEMS)] | None = None
    metadata: Metadata | None = None


class UpdateConversation(StrictModel):
    metadata: Metadata | None


class AddItems(StrictModel):
    items: Annotated[list[Item], Field(min_length=1, max_length=MAX_ITEMS)]


router = APIRouter(dependencies=[Depends(require_api_key)], tags=["conversations"])


def not_found(conversation_id: str) -> APIError:
    return APIError(404, f"Conversation with id '{conversation_id}' not found.", code="NOT_FOUND")


def conversation_of(request: Request, conversation_id: str) -> dict[str, Any]:
    """The account's conversation, or a 404."""
    found = conversations_of(request).get(account_of(request), conversation_id)
    if found is None:
        raise not_found(conversation_id)
    return found


@router.post("/conversations", summary="Create a conversation")
async def create_conversation(request: Request) -> Any:
    body = await read_json(request, CreateConversation)
    items = stored_items(body.items or [], "items")
    check_unique_ids(items, [], "items")
    return conversations_of(request).create(account_of(request), body.metadata or {}, items)


@router.get("/conversations/{conversation_id}", summary="A conversation")
async def get_conversation(request: Request, conversation_id: str) -> Any:
    return conversation_of(request, conversation_id)


@router.post("/conversations/{conversation_id}", summary="Update a conversation's metadata")
async def update_conversation(request: Request, conversation_id: str) -> Any:
    conversation_of(request, conversation_id)
    body = await read_json(request, UpdateConversation)
    updated = conversations_of(request).update(
        account_of(request), conversation_id, body.metadata or {}
    )
    if updated is None:  # deleted while the body arrived
        raise not_found(conversation_id)
    return updated


@router.delete("/conversations/{conversation_id}", summary="Delete a conversation")
async def delete_conversation(request: Request, conversation_id: str) -> Any:
    conversation_of(request, conversation_id)
    # the stored responses that refer to its items get a copy of them first, in the same
    # transaction as the delete
    freeze = partial(store_of(request).freeze, conversation_id=conversation_id)
    if not conversations_of(request).delete(account_of(request), conversation_id, freeze):
        raise not_found(conversation_id)
    return {"id": conversation_id, "object": "conversation.deleted", "deleted": True}


@router.post("/conversations/{conversation_id}/items", summary="Append items", dependencies=INCLUDE)
async def add_items(request: Request, conversation_id: str) -> Any:
    conversation_of(request, conversation_id)
    body = await read_json(request, AddItems)
    items = stored_items(body.items, "items")
    store = conversations_of(request)
    check_unique_ids(items, store.item_ids(conversation_id), "items")
    if not store.add_items(conversation_id, items):  # deleted while the body arrived
        raise not_found(conversation_id)
    return list_page(items, len(items))


@router.get(
    "/conversations/{conversation_id}/items", summary="A conversation's items", dependencies=INCLUDE
)
async def list_items(
    request: Request,
    conversation_id: str,
    limit: Annotated[int, Query(ge=1, le=MAX_LIST)] = 20,
    after: str | None = None,
    order: Literal["asc", "desc"] = "desc",
) -> Any:
    conversation_of(request, conversation_id)
    items = conversations_of(request).items(conversation_id)
    return list_page(items[::-1] if order == "desc" else items, limit, after)


@router.get(
    "/conversations/{conversation_id}/items/{item_id}", summary="One item", dependencies=INCLUDE
)
async def get_item(request: Request, conversation_id: str, item_id: str) -> Any:
    conversation_of(request, conversation_id)
    item = conversations_of(request).item(conversation_id, item_id)
    if item is None:
        raise APIError(404, f"Item with id '{item_id}' not found.", code="NOT_FOUND")
    return item


@router.delete("/conversations/{conversation_id}/items/{item_id}", summary="Delete an item")
async def delete_item(request: Request, conversation_id: str, item_id: str) -> Any:
    conversation = conversation_of(request, conversation_id)
    # as for the whole conversation
    freeze = partial(store_of(request).freeze, conversation_id=conversation_id, item_id=item_id)
    if not conversations_of(request).delete_item(conversation_id, item_id, freeze):
        raise APIError(404, f"Item with id '{item_id}' not found.", code="NOT_FOUND")
    return conversation
