"""Fireworks' accounts (`client.accounts.list / get`): route.py; wired into the app by
`install_accounts`."""

from girandole.api.accounts.route import install_accounts

__all__ = ["install_accounts"]
