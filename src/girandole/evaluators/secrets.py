"""The environment an account's evaluator code runs with: the account's secrets."""

from __future__ import annotations

from typing import Any

from girandole.registry.secrets import env_of_account


def secrets_env(state: Any, account: str) -> dict[str, str]:
    """The account's secrets (keyName -> value, Fireworks' `client.secrets`) for its evaluators'
    child processes. `state`: the server's AppState."""
    return env_of_account(state, account)
