"""The deployments control plane: `/v1/accounts/{a}/deployments[/{d}]` and the base models
`/v1/accounts/{a}/models`, in Fireworks' shapes (route.py, schema.py); wired into the app by
`install_deployments`."""

from girandole.api.deployments.route import install_deployments

__all__ = ["install_deployments"]
