"""A key's role: what it may do besides inference, after Fireworks' user roles.

- `user` (the default, as at Fireworks): inference, and the control plane of its account:
  create, change, scale and delete deployments.
- `inference-user`: inference, and reading deployments and models; nothing that changes them
  (a 403 PERMISSION_DENIED that names the role it lacks).

Keys made before roles existed are `user`s: they managed deployments then and keep doing so.
Keys given with `--api-key` (no database row) are `user`s too. An open server (no keys) has no
roles: every request may do everything.
"""

from __future__ import annotations

USER = "user"
INFERENCE_USER = "inference-user"
ROLES = (USER, INFERENCE_USER)
DEFAULT_ROLE = USER


def check_role(role: str) -> str:
    """`role`, or ValueError naming the roles there are."""
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}: one of {', '.join(ROLES)}")
    return role


def may_change_resources(role: str | None) -> bool:
    """Whether a key of `role` may create, change or delete deployments (None: no key, an open
    server)."""
    return role is None or role == USER
