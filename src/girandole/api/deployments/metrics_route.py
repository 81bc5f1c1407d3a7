"""GET /v1/accounts/{a}/metrics (and under /inference/v1): Prometheus text of the account's
deployments, as Fireworks serves it (girandole.api.ops.account_metrics). A key reads its own
account's only (403 for another's, as every control-plane path); every role may read it."""

from __future__ import annotations

from collections.abc import Iterator

from fastapi import APIRouter, Request
from fastapi.responses import Response

from girandole.api.deployments.route import Account, manager_of
from girandole.api.ops.account_metrics import DeploymentLoad
from girandole.api.ops.metrics import CONTENT_TYPE
from girandole.api.ops.replica_gauges import replica_loads
from girandole.api.state import AppState

router = APIRouter(tags=["deployments"])


@router.get("/accounts/{account}/metrics", summary="Metrics of the account's deployments")
async def account_metrics(request: Request, account: str = Account) -> Response:
    state: AppState = request.app.state.girandole
    state.ops.account_metrics.admit_scrape(account)
    page = state.ops.account_metrics.render(_deployments(request, state, account))
    return Response(page, media_type=CONTENT_TYPE)


def _deployments(request: Request, state: AppState, account: str) -> Iterator[DeploymentLoad]:
    """The account's live deployments, with their replicas' stats: the server's own when the
    server's account is `account`, then the managed ones, oldest first."""
    if state.settings.account == account:
        engines = [(state.deployment, "0", state.engine)] if state.engine is not None else []
        yield DeploymentLoad(state.deployment, state.served.name, replica_loads(engines))
    manager = manager_of(request)
    for record in manager.reachable(account):
        engines = manager.backend.engines(record.name)
        named = [(record.name, str(i), engine) for i, engine in enumerate(engines)]
        yield DeploymentLoad(record.name, record.base_model, replica_loads(named))
