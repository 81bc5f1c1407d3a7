"""The training process of a keep-alive RLOR trainer job: `python -m
girandole.finetune.rlor_worker SPEC.json`, alive as long as the job runs.

It loads the base model and the policy (a new LoRA, or the warm start's) once, with its AdamW
state, then runs one optimizer step per command read on stdin, one JSON line each:

    {"step": {"dataset": PATH, "output": FOLDER or null}}

over the rollouts of PATH (finetune/rlor.py: one step over all of its groups), and writes the
policy as it is after the step to FOLDER as a PEFT adapter (null, or a forward-only job: none).
It answers each command with one JSON line on stdout: {"done": {loss, meanReward, ...}} or
{"error": "..."} (a bad row or a prompt too long: the policy is unchanged and the process waits
for the next command). The first line, once the policy is loaded, is {"ready": {...}}. It exits
when stdin closes (the job cancelled or deleted, the server stopped)."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any


def main(argv: list[str]) -> int:
    import torch

    spec = json.loads(open(argv[0]).read())
    torch.set_num_threads(max(1, int(spec.pop("threads", 1))))

    from girandole.finetune.data import RowError
    from girandole.finetune.rlor import RolloutObjective, load_groups
    from girandole.finetune.trainer import Trainable, TrainConfig, optimizer_step
    from girandole.model import lora
    from girandole.model.default import resolve_model_path
    from girandole.model.loader import load_model
    from girandole.model.lora import AdapterError
    from girandole.tokenizer.chat_template import chat_template_for
    from girandole.tokenizer.loader import load_tokenizer

    parent = os.getppid()

    def emit(line: dict) -> None:
        if os.getppid() != parent:  # the server was killed: nobody waits for this job
            raise SystemExit(1)
        print(json.dumps(line), flush=True)

    config = TrainConfig.from_json(spec)
    torch.manual_seed(config.seed)
    device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        path = resolve_model_path(config.base_path)
        tok = load_tokenizer(path)
        template = config.chat_template or chat_template_for(tok)
        model, _ = load_model(path, mode="reference", device=device, use_cache=False)
        lora.attach(model)
        init = lora.read_adapter(config.warm_start_path, model.spec) if config.warm_start_path else None  # fmt: skip
    except (AdapterError, ValueError, OSError) as exc:
        emit({"error": f"the policy does not load: {exc}"})
        return 1
    rank = init.rank if init else config.rank
    trainable = Trainable(model.spec, rank, init.alpha if init else float(rank), init, device)
    objective = RolloutObjective(config.kl_beta, config.token_level)
    optimizer = torch.optim.AdamW(
        trainable.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay
    )
    warmup = config.warmup_steps
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / warmup) if warmup else 1.0
    )
    emit({"ready": {"rank": rank}})
    steps = 0
    for raw in sys.stdin:
        command: dict[str, Any] = json.loads(raw)["step"]
        started = time.monotonic()
        try:
            groups = load_groups(command["dataset"], tok, template, config.max_context_length)
        except (RowError, OSError) as exc:
            emit({"error": str(exc)})
            continue
        loss = optimizer_step(model, trainable, objective, optimizer, schedule, groups, device, config.forward_only)  # fmt: skip
        steps += 1
        if command.get("output") and not config.forward_only:
            trainable.save(Path(command["output"]), config.base_model_name)
        emit({"done": {"step": steps, "loss": loss, **objective.stats(), "elapsedSeconds": round(time.monotonic() - started, 3)}})  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
