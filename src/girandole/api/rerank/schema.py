"""Rerank request bodies: Fireworks' `RerankRequestBody`, and Cohere's v2 rerank."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from girandole.api.http.schema import StrictModel

MAX_DOCUMENTS = 1024

Text = Annotated[str, Field(min_length=1)]
Documents = Annotated[list[Text], Field(min_length=1, max_length=MAX_DOCUMENTS)]


class RerankRequest(StrictModel):
    model: str | None = None  # null: the server's own model
    query: Text
    documents: Documents
    top_n: Annotated[int | None, Field(ge=1)] = None  # null: every document
    return_documents: bool | None = None  # null: true
    task: Annotated[str | None, Field(min_length=1)] = None


class CohereRerankRequest(StrictModel):
    model: str | None = None
    query: Text
    documents: Documents
    top_n: Annotated[int | None, Field(ge=1)] = None
    return_documents: bool | None = None  # Cohere's default: false
    max_tokens_per_doc: Annotated[int | None, Field(ge=1)] = None
