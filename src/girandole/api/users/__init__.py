"""Fireworks' account users and their API keys over REST (route.py, schema.py); wired into the
app by `install_users`."""

from girandole.api.users.route import install_users

__all__ = ["install_users"]
