"""A key's role: what it may do besides inference, after Fireworks' user roles.

- `admin`: everything a `user` may, and managing its account's users and every key of its
  users over REST (api/users/route.py).
- `user` (the default, as at Fireworks): inference, and the control plane of its account:
  create, change, scale and delete deployments.
- `inference-user`: inference, and reading deployments and models; nothing that changes them
  (a 403 PERMISSION_DENIED that names the role it lacks).

Fireworks' fourth role, `contributor` (its own resources only), needs per-resource ownership,
which girandole does not track: it is refused (a 400), never treated as another role.

A key of a user (made over REST) has its user's role at each request; a key of no user (made
by `girandole keys`) has its own. Keys made before roles existed are `user`s: they managed
deployments then and keep doing so. Keys given with `--api-key` (no database row) are the
operator's: `admin`s of `--account`. An open server (no keys) has no roles: every request may
do everything but manage users and keys (those routes refuse until the server has a key).
"""

from __future__ import annotations

ADMIN = "admin"
USER = "user"
INFERENCE_USER = "inference-user"
CONTRIBUTOR = "contributor"  # Fireworks' role, refused: see above
ROLES = (ADMIN, USER, INFERENCE_USER)
DEFAULT_ROLE = USER


def check_role(role: str) -> str:
    """`role`, or ValueError naming the roles there are."""
    if role == CONTRIBUTOR:
        raise ValueError(
            f"role {CONTRIBUTOR!r} is not supported: it limits a user to the resources it"
            " created, and girandole does not track who created a resource; one of"
            f" {', '.join(ROLES)}"
        )
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}: one of {', '.join(ROLES)}")
    return role


def may_change_resources(role: str | None) -> bool:
    """Whether a key of `role` may create, change or delete deployments (None: no key, an open
    server)."""
    return role is None or role in (USER, ADMIN)


def may_manage_users(role: str | None) -> bool:
    """Whether a key of `role` may create, change and delete its account's users and manage
    the keys of users other than its own (never on an open server: None)."""
    return role == ADMIN
