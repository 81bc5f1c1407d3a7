"""The training process of one job: `python -m girandole.finetune.worker SPEC.json`.

Training runs out of the server's process: torch's thread count is process-wide (the engine's
must not change), and a crash or an out-of-memory kill of training must not take the server
down. The spec is a TrainConfig's fields plus `threads` and, for a reinforcement fine-tuning
job, `evaluator` (finetune/rft.py: the code scoring its rollouts, run in a child of this
process). Each progress report is one JSON line on stdout; the last line is {"done": {...}} or
{"error": "..."} (exit status 0 or 1)."""

from __future__ import annotations

import json
import os
import signal
import sys


def main(argv: list[str]) -> int:
    import torch

    spec = json.loads(open(argv[0]).read())
    torch.set_num_threads(max(1, int(spec.pop("threads", 1))))

    from girandole.evaluators.runner import EvaluatorLoadError
    from girandole.finetune.data import RowError
    from girandole.finetune.rft import evaluator_reward
    from girandole.finetune.trainer import TrainConfig, train
    from girandole.model.lora import AdapterError

    parent = os.getppid()

    def emit(line: dict) -> None:
        if os.getppid() != parent:  # the server was killed: nobody waits for this job
            raise SystemExit(1)
        print(json.dumps(line), flush=True)

    evaluator = spec.pop("evaluator", None)
    runner = reward = None
    if evaluator is not None:
        # cancel terminates this process: exit through `finally`, which ends the evaluator's
        # child and removes its folder (the default SIGTERM skips both)
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    try:
        if evaluator is not None:
            runner, reward = evaluator_reward(evaluator)
        result = train(TrainConfig.from_json(spec), lambda p: emit({"progress": p}), reward)
    except EvaluatorLoadError as exc:
        emit({"error": f"the evaluator does not load: {exc}"})
        return 1
    except (RowError, AdapterError, ValueError, OSError) as exc:
        emit({"error": str(exc)})
        return 1
    finally:
        if runner is not None:
            runner.close()
    emit({"done": {"steps": result.steps, "epochs": result.epochs_run,
                   "earlyStopped": result.early_stopped, "evalLosses": result.eval_losses}})  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
