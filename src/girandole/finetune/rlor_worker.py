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
when stdin closes (the job cancelled or deleted, the server stopped).

After each step that writes the policy it also writes a checkpoint to the spec's checkpoint_dir:
the adapter, and trainer.pt (AdamW's and the schedule's state, the step count); a spec with
`resume` true loads the policy from there instead of the base (or warm start), so that a resumed
job's next step is the one it would have run had it not stopped. A forward-only job's policy
never changes: its checkpoint is trainer.pt alone (the step count), and a resumed one loads its
policy from the base (or warm start) again."""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any


def main(argv: list[str]) -> int:
    import torch

    spec = json.loads(open(argv[0]).read())
    torch.set_num_threads(max(1, int(spec.pop("threads", 1))))
    checkpoint = Path(spec.pop("checkpoint_dir")) if spec.get("checkpoint_dir") else None
    resume = bool(spec.pop("resume", False)) and checkpoint is not None

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
        # a forward-only job's checkpoint holds no adapter: its policy is where it started
        trained = resume and (checkpoint / "adapter_config.json").is_file()
        start = str(checkpoint) if trained else config.warm_start_path
        init = lora.read_adapter(start, model.spec) if start else None
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
    steps = 0
    if resume:
        state = torch.load(checkpoint / TRAINER_STATE, map_location=device)
        if "optimizer" in state:  # a forward-only job's has none: nothing was trained
            optimizer.load_state_dict(state["optimizer"])
            schedule.load_state_dict(state["schedule"])
        steps, objective.skipped_groups = state["steps"], state["skippedGroups"]
    emit({"ready": {"rank": rank, "step": steps}})
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
        state = {"steps": steps, "skippedGroups": objective.skipped_groups}
        if config.forward_only:
            if checkpoint is not None:  # the step count goes on after a resume
                save_checkpoint(checkpoint, None, state)
        elif command.get("output"):
            trainable.save(Path(command["output"]), config.base_model_name)
            if checkpoint is not None:
                state.update(optimizer=optimizer.state_dict(), schedule=schedule.state_dict())
                save_checkpoint(checkpoint, Path(command["output"]), state)
        emit({"done": {"step": steps, "loss": loss, **objective.stats(), "elapsedSeconds": round(time.monotonic() - started, 3)}})  # fmt: skip
    return 0


TRAINER_STATE = "trainer.pt"


def save_checkpoint(folder: Path, adapter: Path | None, state: dict[str, Any]) -> None:
    """The step's adapter folder (None: a forward-only job's, none) and the trainer's `state` as
    `folder`, replaced whole (a process killed meanwhile leaves the last checkpoint, or none at
    worst: never half of one)."""
    import torch

    staged, old = folder.with_name(folder.name + ".new"), folder.with_name(folder.name + ".old")
    for path in (staged, old):
        shutil.rmtree(path, ignore_errors=True)
    if adapter is not None:
        shutil.copytree(adapter, staged)
    else:
        staged.mkdir(parents=True)
    torch.save(state, staged / TRAINER_STATE)
    if folder.exists():
        folder.rename(old)
    staged.rename(folder)
    shutil.rmtree(old, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
