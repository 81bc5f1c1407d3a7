"""The packed-model entry mapped in 4 KiB pages against 2 MiB pages (model/loader/page_cache.py),
in one process with the calls alternating, so that the host's drift falls on both alike.

    .venv/bin/python benchmarks/bench_page_cache.py [MODEL] [--rounds 10] [--threads 2]

MODEL: a GGUF file or Hugging Face folder (default: the default model). Its entry (built first
where missing) is copied twice: one copy keeps the small folios its writing cached (what the
loader mapped before: 4 KiB pages), the other is dropped from the page cache and read back in
2 MiB folios (what the loader does now). Both are mapped as the loader maps them (torch.load with
mmap), and each round times, on each copy, one token through every mixture-of-experts layer's
experts (moe_experts, random top-k picks) and one row through every other native packed linear.
Prints the medians, and how much of each copy smaps shows mapped in 2 MiB pages (FilePmdMapped).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from girandole.model import moe as moe_mod
from girandole.model.default import resolve_model_path
from girandole.model.kernels import moe_experts
from girandole.model.loader import _ensure_cache, page_cache
from girandole.model.quant import PackedLinear

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_lines, markdown_table  # noqa: E402


class Timed:
    """One mapped copy's calls: every MoE layer's experts at one token, every other native
    packed linear at one row."""

    def __init__(self, model: torch.nn.Module, seed: int) -> None:
        self.moes = [m for m in model.modules() if isinstance(m, moe_mod.SparseMoE)]
        self.tables = [m.native_experts() for m in self.moes]
        experts = {id(lin) for m in self.moes for e in m.experts for lin in (e.gate_up, e.down)}
        self.linears = [
            m
            for m in model.modules()
            if isinstance(m, PackedLinear)
            and m.native_bits
            and m.bias is None
            and id(m) not in experts
        ]
        self.rows = [torch.randn(1, lin.in_features).bfloat16() for lin in self.linears]
        self.gen = torch.Generator().manual_seed(seed)

    def experts_ms(self, reps: int) -> float | None:
        if not self.moes or not all(self.tables):
            return None
        x = torch.randn(1, self.moes[0].router.shape[1]).bfloat16()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            for m, tables in zip(self.moes, self.tables):
                ids = torch.randperm(m.num_experts, generator=self.gen)[: m.top_k].sort().values
                w = torch.rand(1, m.top_k, generator=self.gen)
                e = m.experts[0]
                moe_experts.moe_experts(x, ids[None], w, *tables, e.intermediate, e.native_act)
            times.append(time.perf_counter() - t0)
        return statistics.median(times) * 1e3

    def linears_ms(self, reps: int) -> float:
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            for lin, x in zip(self.linears, self.rows):
                lin.native_forward(x, decode=1)
            times.append(time.perf_counter() - t0)
        return statistics.median(times) * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("model", nargs="?", default=None)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    entry = _ensure_cache(resolve_model_path(args.model))
    if entry is None or not entry.exists():
        sys.exit("no packed entry for this model (too small for one, or its build failed)")
    with tempfile.TemporaryDirectory(prefix="bench-page-cache-", dir=entry.parent) as tmp:
        copies = {"4 KiB pages": Path(tmp) / "small.pt", "2 MiB pages": Path(tmp) / "huge.pt"}
        for path in copies.values():
            shutil.copyfile(entry, path)  # written: cached in small folios
        page_cache.drop(copies["2 MiB pages"])
        page_cache.read_huge(copies["2 MiB pages"])
        timed = {
            name: Timed(torch.load(path, mmap=True, weights_only=False)["model"], seed=0)
            for name, path in copies.items()
        }
        experts: dict[str, list[float]] = {name: [] for name in copies}
        linears: dict[str, list[float]] = {name: [] for name in copies}
        for _ in range(args.rounds):
            for name, t in timed.items():
                e = t.experts_ms(reps=60)
                if e is not None:
                    experts[name].append(e)
                linears[name].append(t.linears_ms(reps=20))
        rows = []
        for name, path in copies.items():
            n = len(timed[name].linears)
            e = f"{statistics.median(experts[name]):.3f}" if experts[name] else "-"
            rows.append(
                [
                    name,
                    f"{page_cache.pmd_mapped(path) >> 20:,} of {path.stat().st_size >> 20:,}",
                    e,
                    f"{statistics.median(linears[name]):.3f} ({n})",
                ]
            )
    print(f"model: {resolve_model_path(args.model).name}; {args.rounds} rounds, alternating")
    print(
        markdown_table(
            ["entry mapped in", "FilePmdMapped MiB", "experts, 1 token, ms", "linears, 1 row, ms"],
            rows,
        )
    )
    for line in machine_lines():
        print(line)


if __name__ == "__main__":
    main()
