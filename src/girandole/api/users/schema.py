"""Request bodies of the users and API keys routes, in Fireworks' camelCase (`User`, `APIKey`
of the Gateway REST API, as the fireworks-ai SDK sends them). Types are checked here; who may
do what in route.py."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

STRICT = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class UserBody(BaseModel):
    """A user to create (role required there) or the fields of one to change."""

    model_config = STRICT
    role: str | None = None
    displayName: str | None = None
    email: str | None = None
    serviceAccount: bool | None = None


class ApiKeyBody(BaseModel):
    model_config = STRICT
    displayName: str | None = None
    expireTime: str | None = None  # RFC 3339; None: the key never expires


class CreateApiKeyBody(BaseModel):
    model_config = STRICT
    apiKey: ApiKeyBody = ApiKeyBody()


class DeleteApiKeyBody(BaseModel):
    model_config = STRICT
    keyId: str
