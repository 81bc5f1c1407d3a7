"""Pieces shared by request schemas: strict config, collapsed union errors, common fields."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidatorFunctionWrapHandler,
    WrapValidator,
)
from pydantic_core import PydanticCustomError

# Fireworks rejects unknown fields (additionalProperties: false). Types are strict: "1" is not
# a number and true is not an integer, but an integer is a valid float.
STRICT = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

SEED_MIN = -(2**63)
SEED_MAX = 2**64 - 1


class StrictModel(BaseModel):
    model_config = STRICT


def one_error(kind: str, message: str):
    """A wrap validator that turns every error of a union into one message about the field."""

    def validate(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        try:
            return handler(value)
        except ValidationError as exc:
            # keep errors that already say something specific (too many items, ...)
            for err in exc.errors():
                if err["type"] in ("too_long", "too_short", kind):
                    raise PydanticCustomError(kind, err["msg"]) from None
            raise PydanticCustomError(kind, message) from None

    return WrapValidator(validate)


Stop = Annotated[
    str | Annotated[list[str], Field(max_length=4)] | None,
    one_error("stop_type", "Input should be a string or an array of at most 4 strings"),
]


class StreamOptions(StrictModel):
    include_usage: bool | None = None  # Fireworks' default is on


Temperature = Annotated[float | None, Field(ge=0, le=2)]
TopP = Annotated[float | None, Field(ge=0, le=1)]
TopK = Annotated[int | None, Field(ge=0, le=100)]
MinP = Annotated[float | None, Field(ge=0, le=1)]
MaxTokens = Annotated[int | None, Field(ge=0)]
N = Annotated[int | None, Field(ge=1, le=128)]
Seed = Annotated[int | None, Field(ge=SEED_MIN, le=SEED_MAX)]
