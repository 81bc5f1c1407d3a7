"""The environment an account's evaluator code runs with: the account's secrets."""

from __future__ import annotations

from typing import Any


def secrets_env(state: Any, account: str) -> dict[str, str]:
    """The account's secrets (keyName -> value) for its evaluators' child processes.

    Fireworks' secrets resource is not in girandole yet: none, until it lands (then this
    returns what it stores for `account`)."""
    return {}
