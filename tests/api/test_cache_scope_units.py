"""The prefix cache's scopes (girandole.api.serving.cache_scope): which requests' salts match."""

from __future__ import annotations

import itertools

from girandole.api.ops.server_ops import OPEN
from girandole.api.ops.tracking import Principal
from girandole.api.serving.cache_scope import cache_salt, scope_of

ALICE = Principal("acme", "key-a")
ALICE_2 = Principal("acme", "key-b")
BOB = Principal("bobco", "key-c")


def salt(principal: Principal | None, scope: str, isolation_key: str | None = None) -> str | None:
    return cache_salt(scope_of(principal, scope), isolation_key)  # type: ignore[arg-type]


def test_account_scope_shares_within_an_account_only():
    assert salt(ALICE, "account") == salt(ALICE_2, "account")
    assert salt(ALICE, "account") != salt(BOB, "account")
    assert salt(ALICE, "account", "t") != salt(BOB, "account", "t")
    assert salt(ALICE, "account", "t") != salt(ALICE_2, "account", "u")


def test_key_scope_shares_within_a_key_only():
    assert salt(ALICE, "key") == salt(ALICE, "key")
    assert salt(ALICE, "key") != salt(ALICE_2, "key")
    assert salt(ALICE, "key", "t") != salt(ALICE_2, "key", "t")


def test_server_scope_and_an_open_server_share_as_before_scopes():
    for principal, scope in [(ALICE, "server"), (BOB, "server"), (OPEN, "account"), (OPEN, "key")]:
        assert salt(principal, scope) is None
        assert salt(principal, scope, "t") == "t"
    assert salt(None, "account") is None  # no key known


def test_no_isolation_key_spells_another_scope():
    """An isolation key is always inside the scope's array: a key of one account written to
    look like another's salt still hashes apart from it."""
    forged = salt(ALICE, "account")
    assert forged is not None
    salts = [
        salt(p, s, k)
        for p, s, k in itertools.product(
            [ALICE, BOB], ["account", "key"], [None, forged, '"account:acme"', "account:acme"]
        )
    ]
    assert len(set(salts)) == len(salts)  # a key's account and key scopes differ too
