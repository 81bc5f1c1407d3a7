"""Speculative decoding per deployment: Fireworks' `ngramSpeculationLength`, `draftModel` and
`draftTokenCount` over the server's `--ngram-speculation-length`, `--draft-model` and
`--draft-token-count` (engine/speculation.py does the speculating).

Precedence: a deployment that sets neither `ngramSpeculationLength` nor `draftModel` runs with
the server's flags (the server's own deployment always does), its `draftTokenCount` if set
replacing the server's count. A deployment that sets either takes none of the server's
speculation: `ngramSpeculationLength` 0 and `draftModel` "" turn it off, and `draftTokenCount`
defaults to 4 (Fireworks' default), not to the server's. `disableSpeculativeDecoding=true` at
create sets both off.

What `draftModel` may name: a model of the registry that the deployment's account may use (its
own or the public catalog's, as `baseModel`), ready and not a LoRA adapter; or the server's own
`--draft-model` exactly as the operator gave it (its resolved path). Never any other path or repo
id: a tenant must not make the server read or download what the operator did not put there.
A draft must share the base model's tokenizer: where both are HF folders their config.json
vocabularies are compared at create and update (a 400); otherwise (a GGUF file) the replica's
engine checks it when it loads the draft, and the deployment is FAILED with that message.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from girandole.deploy.backend import EngineOptions
from girandole.registry.deployments import DeploymentRecord, invalid

DEFAULT_DRAFT_TOKEN_COUNT = 4  # Fireworks' default when draftModel is set


def own_speculation(record: DeploymentRecord) -> bool:
    """The deployment chose its speculation itself (else: the server's flags)."""
    return record.ngram_speculation_length is not None or record.draft_model is not None


def speculation_off(record: DeploymentRecord) -> DeploymentRecord:
    """The record with speculation off (`disableSpeculativeDecoding` at create): what its body
    left unset is 0 or "", and a body that turned speculation on is a 400."""
    if record.ngram_speculation_length or record.draft_model:
        param = "ngramSpeculationLength" if record.ngram_speculation_length else "draftModel"
        raise invalid(
            f"disableSpeculativeDecoding is true but {param} turns speculation on: drop one",
            "disableSpeculativeDecoding",
        )
    return replace(record, ngram_speculation_length=0, draft_model="")


def replica_options(
    server: EngineOptions, record: DeploymentRecord, draft_path: str | None
) -> EngineOptions:
    """The engine options of the deployment's replicas: the server's, with the deployment's
    speculation (`draft_path`: where its draft model's files are, None without one)."""
    if not own_speculation(record):
        if record.draft_token_count is None:
            return server
        return replace(server, draft_token_count=record.draft_token_count)
    return replace(
        server,
        ngram_speculation_length=record.ngram_speculation_length or 0,
        draft_model=draft_path,
        draft_token_count=record.draft_token_count or DEFAULT_DRAFT_TOKEN_COUNT,
    )


def vocab_size(source: str | None) -> int | None:
    """The vocabulary of an HF model folder, from its config.json; None where it cannot be read
    cheaply (a GGUF file parses its whole vocabulary to say: the engine checks it at load)."""
    if source is None:
        return None
    config = Path(source) / "config.json"
    try:
        data: Any = json.loads(config.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    size = data.get("vocab_size")
    if size is None and isinstance(data.get("text_config"), dict):  # multimodal configs
        size = data["text_config"].get("vocab_size")
    return size if isinstance(size, int) and not isinstance(size, bool) else None


def check_vocab(draft_name: str, draft_source: str | None, base_source: str | None) -> None:
    """A 400 when the draft's vocabulary is known to differ from the base model's."""
    draft, base = vocab_size(draft_source), vocab_size(base_source)
    if draft is not None and base is not None and draft != base:
        raise invalid(
            f"draftModel {draft_name} has a vocabulary of {draft} tokens, the base model"
            f" {base}: a draft model must share the base model's tokenizer",
            "draftModel",
        )
