"""Fireworks' secrets of an account over REST (route.py); wired into the app by
`install_secrets`."""

from girandole.api.secrets.route import install_secrets

__all__ = ["install_secrets"]
