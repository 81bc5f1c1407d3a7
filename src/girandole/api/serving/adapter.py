"""AdapterEngine: an engine seen through one LoRA adapter. Every request it starts runs that
adapter (the engine's `adapter=` argument, which a router may also read), after loading it on
the replica if this replica does not hold it yet (one started after the adapter was loaded)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from girandole.api.http.errors import deployment_error
from girandole.engine.outputs import RequestOutput
from girandole.registry.deployments import DeploymentError
from girandole.sampling.params import SamplingParams

if TYPE_CHECKING:
    from girandole.deploy.lora import DeployedModelManager


class AdapterEngine:
    def __init__(self, engine: Any, adapter: str, lora: DeployedModelManager) -> None:
        self.engine = engine
        self.adapter = adapter  # accounts/<a>/models/<adapter>
        self.lora = lora

    def __getattr__(self, name: str) -> Any:  # everything else is the engine's
        return getattr(self.engine, name)

    async def generate(
        self,
        prompt_token_ids: list[int],
        params: SamplingParams,
        request_id: str | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[RequestOutput]:
        try:
            await self.lora.ensure_loaded(self.engine, self.adapter)
        except DeploymentError as exc:
            raise deployment_error(exc) from None
        async for out in self.engine.generate(
            prompt_token_ids, params, request_id, adapter=self.adapter, **kwargs
        ):
            yield out
