"""LoRA fine-tuning benchmark: girandole's trainer beside transformers + PEFT, default model.

    .venv/bin/python benchmarks/bench_finetune.py                       # 8 rows, 10 steps
    .venv/bin/python benchmarks/bench_finetune.py --rows 8 --steps 6 --threads 2

Both sides train the same LoRA (rank 8, alpha 8, q/k/v/o + gate/up/down, PEFT's init, AdamW
lr 1e-4, weight decay 0.01) on the same rows: short chat rows rendered with the model's chat
template and tokenized once here (girandole's `finetune.data.encode_row`), loss on the assistant
tokens only, averaged over the trained tokens of each step, `--batch` rows per optimizer step
(cycling through the rows).

- girandole: finetune/trainer.py's own pieces (reference-mode model, `Trainable`, the SFT
  objective, `backward(retain_graph=True)` per row, as `train()` runs them);
- transformers: the same GGUF dequantized to fp32 (`from_pretrained(gguf_file=...)`), PEFT's
  `get_peft_model`, `model(input_ids, labels=masked)` + backward per row + `optimizer.step()`.

Each side runs in its own subprocess, so peak RSS is its own (VmHWM, reset after the model is
loaded so the "train peak" is what training adds on the loaded model). Reported: the median
seconds per optimizer step after `--warmup` steps (wall clock, and CPU seconds of the process:
less sensitive to a machine shared with other jobs; the fastest step: a floor that other jobs on
the machine can only raise), trained tokens/s, and the mean loss per trained
token over all rows before and after training (a sanity line: both should fall alike).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import fmt, log, machine_lines, markdown_table, median, rss_mib  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SIDES = ("girandole", "transformers")

_TOPICS = (
    ("tea", "Steep green tea at about 80 degrees for two minutes; boiling water makes it bitter."),
    ("bread", "Knead the dough for ten minutes, let it rise until doubled, then bake it hot."),
    ("bikes", "Check the tyre pressure weekly and oil the chain after riding in the rain."),
    ("plants", "Water most house plants when the top inch of soil is dry, not on a schedule."),
    ("running", "Start slowly, add no more than a tenth to your weekly distance, and rest."),
    ("sleep", "Keep a fixed wake-up time, a dark cool room, and no screens in the last hour."),
    ("coffee", "Grind just before brewing and use about sixty grams of coffee per litre."),
    ("rice", "Rinse the rice, use one and a half cups of water per cup, and let it rest."),
)


def make_rows(n: int) -> list[list[dict[str, str]]]:
    """n short chat rows (system, user, assistant), about 80-110 tokens each."""
    rows = []
    for i in range(n):
        topic, tip = _TOPICS[i % len(_TOPICS)]
        rows.append([
            {"role": "system", "content": "You are a concise assistant who gives practical tips."},
            {"role": "user", "content": f"Give me one good tip about {topic} (row {i})."},
            {"role": "assistant", "content": f"Here is a tip about {topic}: {tip} "
             f"That is the most useful habit to start with; the rest follows from it."},
        ])  # fmt: skip
    return rows


def encode_rows(n: int) -> tuple[str, list[dict]]:
    """The default model's path and the rows as {"ids", "trained"}."""
    from girandole.finetune.data import encode_row
    from girandole.model.default import resolve_model_path
    from girandole.tokenizer.chat_template import chat_template_for
    from girandole.tokenizer.loader import load_tokenizer

    path = resolve_model_path(None)
    tok = load_tokenizer(path)
    template = chat_template_for(tok)
    out = []
    for i, messages in enumerate(make_rows(n)):
        ex = encode_row(tok, template, messages, 2048, f"row {i}")
        out.append({"ids": ex.ids, "trained": ex.trained})
    return str(path), out


def reset_peak_rss() -> bool:
    """Reset this process's VmHWM (Linux: writing 5 to clear_refs), so the peak read later is
    training's own, not the model load's."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


# ---------------------------------------------------------------- the sides (one a subprocess)


def girandole_side(path: str, rows: list[dict], args) -> dict:
    import torch

    from girandole.finetune.data import Example
    from girandole.finetune.trainer import SftObjective, Trainable, row_loss
    from girandole.model import lora
    from girandole.model.loader import load_model

    device = torch.device("cpu")
    examples = [Example(r["ids"], r["trained"]) for r in rows]
    started = time.perf_counter()
    model, _ = load_model(path, mode="reference", device=device, use_cache=False)
    lora.attach(model)
    trainable = Trainable(model.spec, args.rank, float(args.rank), None, device)
    load_s = time.perf_counter() - started
    loaded_rss = rss_mib().get("rss_mib")
    optimizer = torch.optim.AdamW(trainable.parameters(), lr=args.lr, weight_decay=0.01)
    objective = SftObjective()

    def eval_loss() -> float:
        with torch.no_grad():
            adapter = trainable.adapter()
            total = sum(row_loss(model, adapter, ex, device).item() for ex in examples)
        return total / sum(ex.num_trained for ex in examples)

    before = eval_loss()
    reset = reset_peak_rss()
    times, cpu, losses = [], [], []
    for step in range(args.steps):
        window = [examples[(step * args.batch + j) % len(examples)] for j in range(args.batch)]
        t0, c0 = time.perf_counter(), time.process_time()
        optimizer.zero_grad(set_to_none=True)
        adapter = trainable.adapter()
        total = 0.0
        for loss in objective.losses(model, adapter, window, device):
            loss.backward(retain_graph=True)  # as train(): the fused weights' graph is shared
            total += loss.item()
        optimizer.step()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        losses.append(total)
        log(f"girandole step {step + 1}: {times[-1]:.2f} s, loss {total:.3f}")
    return {
        "load_s": load_s, "loaded_rss_mib": loaded_rss, "peak_reset": reset,
        "step_s": times, "step_cpu_s": cpu, "step_loss": losses, "before": before, "after": eval_loss(),
        "peak_rss_mib": rss_mib().get("peak_rss_mib"),
    }  # fmt: skip


def transformers_side(path: str, rows: list[dict], args) -> dict:
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    started = time.perf_counter()
    gguf = Path(path)
    base = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    config = LoraConfig(
        r=args.rank, lora_alpha=args.rank, lora_dropout=0.0, target_modules=TARGETS, bias="none"
    )
    model = get_peft_model(base, config)
    model.train()  # no dropout anywhere in Gemma 3; train() only for the record
    load_s = time.perf_counter() - started
    loaded_rss = rss_mib().get("rss_mib")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)

    def tensors(row: dict) -> tuple[torch.Tensor, torch.Tensor, int]:
        ids = torch.tensor([row["ids"]], dtype=torch.long)
        labels = ids.clone()
        labels[0, ~torch.tensor(row["trained"])] = -100  # HF shifts labels by one itself
        return ids, labels, sum(row["trained"][1:])

    def row_sum_loss(row: dict) -> torch.Tensor:
        ids, labels, n = tensors(row)
        return model(input_ids=ids, labels=labels).loss * n  # the mean back to a sum

    def eval_loss() -> float:
        with torch.no_grad():
            total = sum(row_sum_loss(row).item() for row in rows)
        return total / sum(sum(r["trained"][1:]) for r in rows)

    before = eval_loss()
    reset = reset_peak_rss()
    times, cpu, losses = [], [], []
    for step in range(args.steps):
        window = [rows[(step * args.batch + j) % len(rows)] for j in range(args.batch)]
        tokens = sum(sum(r["trained"][1:]) for r in window)
        t0, c0 = time.perf_counter(), time.process_time()
        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for row in window:
            loss = row_sum_loss(row) / tokens
            loss.backward()
            total += loss.item()
        optimizer.step()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        losses.append(total)
        log(f"transformers step {step + 1}: {times[-1]:.2f} s, loss {total:.3f}")
    return {
        "load_s": load_s, "loaded_rss_mib": loaded_rss, "peak_reset": reset,
        "step_s": times, "step_cpu_s": cpu, "step_loss": losses, "before": before, "after": eval_loss(),
        "peak_rss_mib": rss_mib().get("peak_rss_mib"),
        "attn": getattr(base.config, "_attn_implementation", "?"),
    }  # fmt: skip


def run_side(side: str, args) -> int:
    """Child process: train one side, write its result JSON to --out."""
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    data = json.loads(Path(args.rows_file).read_text())
    fn = girandole_side if side == "girandole" else transformers_side
    result = fn(data["path"], data["rows"], args)
    Path(args.out).write_text(json.dumps(result))
    return 0


# ---------------------------------------------------------------- the parent


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rows", type=int, default=8, help="distinct chat rows (cycled over)")
    p.add_argument("--steps", type=int, default=10, help="optimizer steps per side")
    p.add_argument("--warmup", type=int, default=2, help="first steps left out of the timing")
    p.add_argument("--batch", type=int, default=1, help="rows per optimizer step")
    p.add_argument("--threads", type=int, default=2, help="torch threads of each side")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--sides", default=",".join(SIDES), help="comma-separated subset of sides")
    p.add_argument("--note", default="", help="a line printed under the table (e.g. the load)")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)  # child process
    p.add_argument("--rows-file", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.side:
        return run_side(args.side, args)
    if args.steps <= args.warmup:
        p.error("--steps must be larger than --warmup")

    tmp = Path(tempfile.mkdtemp(prefix="bench-finetune-"))
    log("tokenizing the rows")
    path, rows = encode_rows(args.rows)
    rows_file = tmp / "rows.json"
    rows_file.write_text(json.dumps({"path": path, "rows": rows}))
    results: dict[str, dict] = {}
    for side in args.sides.split(","):
        log(f"{side}: training {args.steps} steps in a subprocess")
        out = tmp / f"{side}.json"
        cmd = [sys.executable, __file__, "--side", side, "--rows-file", str(rows_file),
               "--out", str(out), "--steps", str(args.steps), "--batch", str(args.batch),
               "--threads", str(args.threads), "--rank", str(args.rank), "--lr", str(args.lr)]  # fmt: skip
        subprocess.run(cmd, check=True)
        results[side] = json.loads(out.read_text())

    def step_tokens(step: int) -> int:
        window = [rows[(step * args.batch + j) % len(rows)] for j in range(args.batch)]
        return sum(sum(r["trained"][1:]) for r in window)

    timed = range(args.warmup, args.steps)
    summary = {}
    for side, r in results.items():
        secs = [r["step_s"][i] for i in timed]
        tps = [step_tokens(i) / r["step_s"][i] for i in timed]
        cpu = [r["step_cpu_s"][i] for i in timed]
        summary[side] = {
            "s_step": median(secs),
            "tok_s": median(tps),
            "cpu_s_step": median(cpu),
            "fastest_s_step": min(secs),
        }
    ref = summary.get("transformers", {}).get("s_step")
    ref_cpu = summary.get("transformers", {}).get("cpu_s_step")
    table = []
    for side, r in results.items():
        s = summary[side]
        table.append([
            side if side == "girandole" else f"transformers + PEFT (attn={r.get('attn', '?')})",
            f"{s['s_step']:.2f}", fmt(s["tok_s"]),
            f"{s['s_step'] / ref:.2f}x" if ref else "–",
            f"{s['cpu_s_step']:.2f}",
            f"{s['cpu_s_step'] / ref_cpu:.2f}x" if ref_cpu else "–",
            f"{s['fastest_s_step']:.2f}",
            f"{fmt(r['loaded_rss_mib'], 0)} / {fmt(r['peak_rss_mib'], 0)}"
            + ("" if r["peak_reset"] else " (peak incl. load)"),
            f"{r['load_s']:.1f}",
            f"{r['before']:.3f} -> {r['after']:.3f}",
        ])  # fmt: skip
    lengths = [len(r["ids"]) for r in rows]
    trained = [sum(r["trained"][1:]) for r in rows]
    import torch

    print()
    for line in machine_lines():
        print(line)
    print(
        f"default model {Path(path).name}, fp32 on CPU, torch {torch.__version__}, "
        f"torch threads {args.threads}; {args.rows} rows of {min(lengths)}-{max(lengths)} tokens "
        f"({min(trained)}-{max(trained)} trained), {args.batch} row(s) a step, {args.steps} steps "
        f"({args.warmup} warmup left out of the medians), LoRA rank {args.rank} alpha "
        f"{args.rank} on q/k/v/o/gate/up/down, AdamW lr {args.lr}"
    )
    header = ["side", "s/step (median)", "trained tok/s", "vs transformers", "CPU s/step",
              "vs transformers", "fastest step, s",
              "RSS loaded / train peak, MiB", "load s", "loss before -> after"]  # fmt: skip
    print(markdown_table(header, table))
    for side, r in results.items():
        print(f"{side} step times: " + ", ".join(f"{x:.2f}" for x in r["step_s"]))
    if args.note:
        print(args.note)
    if args.json:
        Path(args.json).write_text(json.dumps({"summary": summary, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
