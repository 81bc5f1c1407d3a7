"""Who shares the prefix cache: the salt that keeps one tenant's cached prompts from another's.

A prompt whose leading blocks another request already computed reuses them, and the response
says so (`usage.prompt_tokens_details.cached_tokens`, and a shorter time to first token). Across
tenants that is an oracle: one account could learn, token block by block, what another account's
prompts began with. So the engine's block hashes start from a salt (`Sequence.cache_salt`), and
requests share cached blocks only when their salts are equal:

- `--prompt-cache-scope account` (the default): the keys of one account share, different
  accounts never do (as OpenAI and Anthropic keep caches per organization). A server whose keys
  all belong to one account (`--api-key`) shares among all of them; an open server (no keys)
  has no accounts and shares everything.
- `key`: each key alone (the `--api-key` keys each count as one).
- `server`: every request shares, whoever sent it (the behaviour before scopes).

`prompt_cache_isolation_key` (or `x-prompt-cache-isolation-key`) divides a scope further, as
Fireworks documents it; it never reaches across one, since the scope is always part of the salt.
"""

from __future__ import annotations

import json

from girandole.api.ops.tracking import Principal
from girandole.api.settings import PromptCacheScope


def scope_of(principal: Principal | None, scope: PromptCacheScope) -> str | None:
    """The part of the salt the server sets: the account or the key; None shares."""
    if principal is None or scope == "server":
        return None
    name = principal.key_id if scope == "key" else principal.account
    return None if name is None else f"{scope}:{name}"


def cache_salt(scope: str | None, isolation_key: str | None) -> str | None:
    """The engine's salt. Without a scope, the request's key alone (hashes as before scopes);
    with one, both in one JSON array, which no key of another scope can spell."""
    if scope is None:
        return isolation_key
    return json.dumps([scope, isolation_key])
