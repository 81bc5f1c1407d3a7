"""AdapterEngine: an engine seen through one LoRA adapter. Every request it starts runs that
adapter (the engine's `adapter=` argument, which a router may also read), after loading it on
the replica if this replica does not hold it yet (one started after the adapter was loaded)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from girandole.api.http.errors import deployment_error
from girandole.engine.outputs import RequestOutput
from girandole.engine.protocol import AdapterNotLoadedError
from girandole.registry.deployments import DeploymentError
from girandole.sampling.params import SamplingParams

if TYPE_CHECKING:
    from girandole.deploy.lora import DeployedModelManager


class AdapterEngine:
    def __init__(
        self, engine: Any, adapter: str, lora: DeployedModelManager, deployment: str
    ) -> None:
        self.engine = engine
        self.adapter = adapter  # accounts/<a>/models/<adapter>
        self.lora = lora
        self.deployment = deployment  # the deployment whose replica `engine` is

    def __getattr__(self, name: str) -> Any:  # everything else is the engine's
        return getattr(self.engine, name)

    async def generate(
        self,
        prompt_token_ids: list[int],
        params: SamplingParams,
        request_id: str | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[RequestOutput]:
        account = self.deployment.split("/")[1]  # a DeployedModel is its deployment's account's
        if self.lora.find(self.adapter, self.deployment, account) is not None:
            try:
                await self.lora.ensure_loaded(self.engine, self.adapter)
            except DeploymentError as exc:
                raise deployment_error(exc) from None
        elif self.deployment == self.lora.own_deployment or self.lora.deployments.find(
            self.deployment
        ):
            # Unloaded since the request found it: loading it here again ran it, and left it
            # registered on the replica for good, for a DeployedModel that no longer existed.
            raise AdapterNotLoadedError(
                f"LoRA adapter {self.adapter!r} is not loaded on {self.deployment}"
            )
        # else the deployment went (deleted): its stopped engine says so (a 503), as for a
        # request of its base model
        async for out in self.engine.generate(
            prompt_token_ids, params, request_id, adapter=self.adapter, **kwargs
        ):
            yield out
