"""The LoRA adapters in `GET /v1/models`: each loaded adapter by its model name (its default
DeployedModel) and as `<model>#<deployment>`, like the deployments' models."""

from __future__ import annotations

from typing import Any

from girandole.registry.models import ServedModel
from girandole.tokenizer.chat_template import chat_template_for


def adapter_entries(request: Any, account: str | None, listed: set[str]) -> list[dict]:
    """Entries for the adapters loaded on deployments of `account` (None: every account's)
    whose ids are not in `listed` (which this extends)."""
    lora = getattr(request.app.state, "lora", None)
    if lora is None:
        return []
    entries = []
    for record in lora.reachable(account):
        served = ServedModel(
            name=record.model,
            owned_by=record.account,
            created=int(record.create_time),
            kind="HF_PEFT_ADDON",
        )
        for engine in lora.engines_of(record.deployment)[:1]:
            served.context_length = int(engine.max_model_len or engine.model_config.max_position)
            served.supports_chat = bool(chat_template_for(engine.tokenizer))
            served.supports_image_input = engine.model_config.vision is not None
        for name in (record.model, f"{record.model}#{record.deployment}"):
            if name not in listed:
                listed.add(name)
                served.name = name
                entries.append(served.to_list_entry())
    return entries
