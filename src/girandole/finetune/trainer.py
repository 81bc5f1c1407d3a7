"""LoRA supervised fine-tuning with girandole's own model code.

The base model is loaded in `reference` mode (float32, dequantized: the fast mode's packed
int4/int8 kernels do not backpropagate to their input) and frozen; every decoder layer's
q/k/v/o and gate/up/down projections get a LoRA (model/lora.py's LoRALinear, attached as for
serving). The trainable A [r, in] and B [out, r] of each projection are fused at every step by
the serving code's own `lora.fuse` (differentiable), and the forward is the plain one
(`hidden = model(ids, positions)`, no KV cache, plain causal attention) with the adapter on
every row. So what is trained is what is served, to the rounding.

- init: A kaiming-uniform (PEFT's), B zeros: the adapter starts as the base model.
- lora_alpha = rank (scaling 1); a warm start keeps its adapter's rank and alpha.
- loss: cross-entropy on the trained tokens (assistant messages) only, averaged over the trained
  tokens of each optimizer step.
- AdamW (betas 0.9/0.999), linear warmup over learningRateWarmupSteps optimizer steps, then a
  constant learning rate.
- one row per forward (no padding, no cross-row attention), gradients summed over the rows of
  a batch and over gradientAccumulationSteps batches.
- early stop: after each epoch with an evaluation set, training stops when the evaluation loss
  did not improve on the best so far; the best epoch's weights are written.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from girandole.finetune.data import Example, batches, carve_out, encode_row, read_rows
from girandole.model import lora
from girandole.model.context import ForwardContext, forward_context
from girandole.model.lora import LoRAAdapter, LoRABatch

# PEFT's module path of each target, under `base_model.model.model.layers.{i}.`
MODULE_OF = {
    "q_proj": "self_attn",
    "k_proj": "self_attn",
    "v_proj": "self_attn",
    "o_proj": "self_attn",
    "gate_proj": "mlp",
    "up_proj": "mlp",
    "down_proj": "mlp",
}

Report = Callable[[dict[str, Any]], None]


@dataclass
class TrainConfig:
    """What one job trains (the REST job's fields, with defaults applied)."""

    base_path: str | None  # a .gguf file or HF folder; None: the default model
    dataset_path: str
    output_dir: str
    base_model_name: str = ""  # written to adapter_config.json's base_model_name_or_path
    eval_path: str | None = None
    eval_carveout: bool = False
    warm_start_path: str | None = None
    rank: int = 8
    epochs: int = 1
    learning_rate: float = 1e-4
    batch_size_tokens: int | None = None
    batch_size_samples: int | None = None
    gradient_accumulation_steps: int = 1
    warmup_steps: int = 0
    weight_decay: float = 0.01
    max_context_length: int = 2048
    early_stop: bool = False
    seed: int = 0
    device: str | None = None  # None: cuda when available, else cpu
    chat_template: str | None = None  # None: the one the chat route uses for the model
    # or "dpo", "orpo": preference rows (finetune/preference.py), finetune/dpo.py, orpo.py;
    # "grpo", "dapo": prompts, rollouts and rewards (finetune/prompts.py, grpo.py); "rlor":
    # rollouts scored by the user (finetune/rlor.py)
    method: str = "sft"
    beta: float = 0.1  # DPO's temperature, ORPO's weight of the odds ratio term
    kl_beta: float = 0.0  # GRPO's and DAPO's weight of the KL to the base model
    token_level: bool = False  # rlor: DAPO's normalisation (every token of a step) over GRPO's
    forward_only: bool = False  # the loss only: no backward, no update, no adapter written
    # a reinforcement job's rollouts (Fireworks' inferenceParameters): rollout.SamplingConfig
    sampling: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> TrainConfig:
        return cls(**body)


@dataclass
class TrainResult:
    steps: int
    epochs_run: int
    train_loss: float
    eval_losses: list[float] = field(default_factory=list)
    early_stopped: bool = False


class Trainable(nn.Module):
    """The trainable A and B of every (layer, target), read into a LoRAAdapter for the forward."""

    def __init__(
        self, spec: Any, rank: int, alpha: float, init: LoRAAdapter | None, device: torch.device
    ) -> None:
        super().__init__()
        shapes = lora.module_shapes(spec)
        self.spec, self.rank, self.alpha = spec, rank, alpha
        self.a = nn.ParameterDict()
        self.b = nn.ParameterDict()
        for layer in range(spec.num_layers):
            for target, (out, inp) in shapes.items():
                key = f"{layer}_{target}"
                if init is not None and (layer, target) in init.raw:
                    a, b = (t.clone() for t in init.raw[(layer, target)])
                else:
                    a = torch.empty(rank, inp)
                    nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # PEFT's init of lora_A
                    b = torch.zeros(out, rank)
                self.a[key] = nn.Parameter(a.to(device))
                self.b[key] = nn.Parameter(b.to(device))

    def adapter(self) -> LoRAAdapter:
        raw = {}
        for key, a in self.a.items():
            layer, target = key.split("_", 1)
            raw[(int(layer), target)] = (a, self.b[key])
        adapter = LoRAAdapter("training", "", self.rank, self.alpha, False, sorted(MODULE_OF), raw)
        adapter.fused = lora.fuse(adapter, self.spec)
        return adapter

    def save(self, folder: Path, base_model_name: str) -> None:
        """A PEFT adapter folder: adapter_config.json and adapter_model.safetensors."""
        from safetensors.torch import save_file

        folder.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for key, a in self.a.items():
            layer, target = key.split("_", 1)
            prefix = f"base_model.model.model.layers.{layer}.{MODULE_OF[target]}.{target}"
            tensors[f"{prefix}.lora_A.weight"] = a.detach().float().cpu().contiguous()
            tensors[f"{prefix}.lora_B.weight"] = self.b[key].detach().float().cpu().contiguous()
        save_file(tensors, str(folder / "adapter_model.safetensors"))
        config = {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "r": self.rank,
            "lora_alpha": self.alpha,
            "lora_dropout": 0.0,
            "bias": "none",
            "use_rslora": False,
            "target_modules": sorted(MODULE_OF),
            "base_model_name_or_path": base_model_name,
        }
        (folder / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")


def _context(length: int, adapter: LoRAAdapter) -> ForwardContext:
    """A forward context that only carries the adapter: no cache is bound, so attention is the
    plain causal one over the row."""
    empty = torch.empty(0, dtype=torch.long)
    batch = LoRABatch([(adapter, None)], native=False)  # torch ops: they backpropagate
    return ForwardContext(empty, [length], [length], [], lora=batch)


def row_loss(model: nn.Module, adapter: LoRAAdapter, ex: Example, device: torch.device):
    """Summed cross-entropy of the row's trained tokens."""
    ids = torch.tensor(ex.ids, dtype=torch.long, device=device)
    positions = torch.arange(len(ex.ids), device=device)
    with forward_context(_context(len(ex.ids), adapter)):
        hidden = model(ids, positions)
    mask = torch.tensor(ex.trained[1:], dtype=torch.bool, device=device)
    logits = model.compute_logits(hidden[:-1][mask])  # the LM head only where a loss counts
    return nn.functional.cross_entropy(logits.float(), ids[1:][mask], reduction="sum")


def load_examples(path: str, tok, template, max_length: int, what: str) -> list[Example]:
    rows = read_rows(Path(path).read_bytes(), what)
    return [
        encode_row(tok, template, messages, max_length, f"{what} row {i + 1}")
        for i, messages in enumerate(rows)
    ]


class SftObjective:
    """Cross-entropy of the trained tokens, averaged over the trained tokens of each step."""

    @staticmethod
    def length(example: Example) -> int:
        return len(example.ids)

    def losses(self, model: nn.Module, adapter: LoRAAdapter, window: list[Example], device):
        tokens = sum(ex.num_trained for ex in window)
        for ex in window:
            yield row_loss(model, adapter, ex, device) / tokens

    def stats(self) -> dict[str, float]:
        return {}


def train(
    config: TrainConfig, report: Report = lambda _: None, reward: Callable | None = None
) -> TrainResult:
    """Train the adapter and write it to `config.output_dir`; `report` gets progress dicts
    (epoch, step, totalSteps, percent, loss, evalLoss; a DPO job's reward accuracy and
    margin; a GRPO job's mean reward, and evalReward with held-out prompts). `reward`: a GRPO or DAPO job's (grpo.Reward)."""
    from girandole.model.default import resolve_model_path
    from girandole.model.loader import load_model
    from girandole.tokenizer.chat_template import chat_template_for
    from girandole.tokenizer.loader import load_tokenizer

    torch.manual_seed(config.seed)
    device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    path = resolve_model_path(config.base_path)
    tok = load_tokenizer(path)
    template = config.chat_template or chat_template_for(tok)
    # rows are checked before the model is loaded: a bad line fails in a second
    eval_rows: list[Example] = []
    if config.method in ("dpo", "orpo"):
        from girandole.finetune.dpo import load_pairs

        train_rows: list[Any] = load_pairs(config.dataset_path, tok, template, config.max_context_length)  # fmt: skip
    elif config.method in ("grpo", "dapo"):
        from girandole.finetune.grpo import load_prompts

        if reward is None:
            raise ValueError(f"{config.method} trains on rewards: give a reward function")
        train_rows = load_prompts(config.dataset_path, tok, template, config.max_context_length)  # fmt: skip
        if config.eval_path:  # held-out prompts, rolled out greedily at each epoch's end
            eval_rows = load_prompts(config.eval_path, tok, template, config.max_context_length, "evaluationDataset")  # fmt: skip
        elif config.eval_carveout:
            train_rows, eval_rows = carve_out(train_rows)
    elif config.method == "rlor":
        from girandole.finetune.rlor import load_groups

        train_rows = load_groups(config.dataset_path, tok, template, config.max_context_length)
    else:
        train_rows = load_examples(config.dataset_path, tok, template, config.max_context_length, "dataset")  # fmt: skip
        if config.eval_path:
            eval_rows = load_examples(config.eval_path, tok, template, config.max_context_length, "evaluationDataset")  # fmt: skip
        elif config.eval_carveout:
            train_rows, eval_rows = carve_out(train_rows)
        train_rows = [ex for ex in train_rows if ex.num_trained > 0]  # cut away by max length
        if not train_rows:
            raise ValueError("no row has an assistant token within maxContextLength")

    model, model_config = load_model(path, mode="reference", device=device, use_cache=False)
    lora.attach(model)
    spec = model.spec
    init = lora.read_adapter(config.warm_start_path, spec) if config.warm_start_path else None
    rank = init.rank if init else config.rank
    alpha = init.alpha if init else float(config.rank)
    trainable = Trainable(spec, rank, alpha, init, device)
    objective: Any = SftObjective()
    if config.method == "dpo":
        from girandole.finetune.dpo import DpoObjective

        # the reference policy: the adapter before training (the base, or the warm start),
        # read once (its log-probabilities are cached): no graph back to the parameters
        with torch.no_grad():
            reference = trainable.adapter()
        objective = DpoObjective(model, reference, train_rows, config.beta, device)
    elif config.method == "orpo":
        from girandole.finetune.orpo import OrpoObjective

        objective = OrpoObjective(config.beta)
    elif config.method in ("grpo", "dapo"):
        from girandole.finetune.grpo import GrpoObjective
        from girandole.finetune.rollout import SamplingConfig

        eos = set(model_config.eos_token_ids) | set(tok.stop_token_ids)
        objective = GrpoObjective(
            tok, reward, SamplingConfig(**config.sampling), config.kl_beta,
            config.method == "dapo", eos, config.max_context_length, config.seed, device,
        )  # fmt: skip
    elif config.method == "rlor":
        from girandole.finetune.rlor import RolloutObjective

        objective = RolloutObjective(config.kl_beta, config.token_level)
    optimizer = torch.optim.AdamW(
        trainable.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay
    )
    warmup = config.warmup_steps
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / warmup) if warmup else 1.0
    )

    samples = config.batch_size_samples
    if config.method == "rlor" and samples is None and config.batch_size_tokens is None:
        samples = len(train_rows)  # one step over the whole dataset, as :executeTrainStep's

    def epoch_batches(epoch: int) -> list[list[Any]]:
        """The epoch's rows in its own seeded order, in batches (the same at each call)."""
        rows = list(train_rows)
        random.Random(config.seed * 100_003 + epoch).shuffle(rows)
        return batches(rows, samples, config.batch_size_tokens, objective.length)

    accumulate = config.gradient_accumulation_steps
    epochs = range(1, config.epochs + 1)
    # counted over every epoch's own order: token-budget batches group each order differently
    total_steps = sum(math.ceil(len(epoch_batches(e)) / accumulate) for e in epochs)
    step, result = 0, TrainResult(0, 0, float("nan"))
    best: tuple[float, dict[str, torch.Tensor]] | None = None
    started = time.monotonic()
    for epoch in epochs:
        groups = epoch_batches(epoch)
        for start in range(0, len(groups), accumulate):
            window = [row for group in groups[start : start + accumulate] for row in group]
            total = optimizer_step(model, trainable, objective, optimizer, schedule, window, device, config.forward_only)  # fmt: skip
            step += 1
            result.train_loss = total
            report({
                "epoch": epoch, "step": step, "totalSteps": total_steps,
                "percent": round(100 * step / total_steps), "loss": total,
                **objective.stats(), "elapsedSeconds": round(time.monotonic() - started, 3),
            })  # fmt: skip
        result.epochs_run = epoch
        if hasattr(objective, "end_epoch"):  # GRPO: an epoch whose evaluations all failed
            objective.end_epoch(epoch)
        if eval_rows and hasattr(objective, "evaluate"):  # GRPO: the held-out prompts' reward
            with torch.no_grad():
                rewards = objective.evaluate(model, trainable.adapter(), eval_rows, device)
            report({"epoch": epoch, "step": step, "totalSteps": total_steps,
                    "percent": round(100 * step / total_steps), **rewards})  # fmt: skip
        elif eval_rows:
            eval_loss = evaluate(model, trainable, eval_rows, device)
            result.eval_losses.append(eval_loss)
            report({"epoch": epoch, "step": step, "totalSteps": total_steps,
                    "percent": round(100 * step / total_steps), "evalLoss": eval_loss})  # fmt: skip
            if best is None or eval_loss < best[0]:
                best = (
                    eval_loss,
                    {k: v.detach().clone() for k, v in trainable.state_dict().items()},
                )
            elif config.early_stop:
                result.early_stopped = True
                break
    if config.early_stop and best is not None:
        trainable.load_state_dict(best[1])
    result.steps = step
    if not config.forward_only:
        trainable.save(Path(config.output_dir), config.base_model_name)
    return result


def optimizer_step(
    model: nn.Module,
    trainable: Trainable,
    objective: Any,
    optimizer: torch.optim.Optimizer,
    schedule: Any,
    window: list[Any],
    device: torch.device,
    forward_only: bool = False,
) -> float:
    """One optimizer step over the window's rows; the step's loss. `forward_only`: the loss
    only (no gradients, no update)."""
    if forward_only:
        with torch.no_grad():
            adapter = trainable.adapter()
            return sum(loss.item() for loss in objective.losses(model, adapter, window, device))
    optimizer.zero_grad(set_to_none=True)
    adapter = trainable.adapter()
    total = 0.0
    for loss in objective.losses(model, adapter, window, device):
        # the fused weights are rebuilt each step: keep their graph for every row
        loss.backward(retain_graph=True)
        total += loss.item()
    optimizer.step()
    schedule.step()
    return total


def evaluate(model: nn.Module, trainable: Trainable, rows: list[Example], device) -> float:
    """Mean cross-entropy per trained token of `rows`."""
    with torch.no_grad():
        adapter = trainable.adapter()
        total = sum(row_loss(model, adapter, ex, device).item() for ex in rows)
    return total / max(1, sum(ex.num_trained for ex in rows))
