"""Fast mode vs reference mode on public-domain prose (tests/data), teacher-forced, and the
bare forward timings of both modes.

    .venv/bin/python benchmarks/model_accuracy.py [--model PATH] [--speed] [--threads 2]

Prints top-1 agreement of fast with reference, both perplexities, and (with --speed) the median
time of model forward + logits of the last row at T=1 and T=512 tokens. The engine rows run the
texts through the fast engine (prompt logprobs: 512-token chunks whose queries read the earlier
chunks' keys from the paged KV cache), with each KV cache element type, and with the prompt
rows on the int8 kernel (--int8-prompts; the same as the default where one kernel takes every
row: AMX, GIRANDOLE_VNNI=0).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from girandole.model import quant
from girandole.model.evaluate import compare, teacher_forced
from girandole.model.loader import load_model

DATA = Path(__file__).resolve().parent.parent / "tests" / "data"
DENSE_MIN_ROWS = quant.DENSE_MIN_ROWS
TEXTS = ("pride_and_prejudice_ch1.txt", "declaration_of_independence.txt")


def documents(model_path) -> list[list[int]]:
    from girandole.tokenizer import load_tokenizer

    tok = load_tokenizer(model_path)
    return [tok.encode((DATA / name).read_text()) for name in TEXTS]


def engine_teacher_forced(
    model_path, docs: list[list[int]], kv_cache_dtype: str, int8_prompts: bool = False
):
    """teacher_forced through the fast engine: each document's prompt logprobs."""
    from girandole import LLM, SamplingParams
    from girandole.model.evaluate import TeacherForced

    llm = LLM(
        model=model_path,
        kv_cache_dtype=kv_cache_dtype,
        max_model_len=4096,
        int8_prompts=int8_prompts,
    )
    outs = llm.generate(docs, SamplingParams(max_tokens=1, prompt_logprobs=1, temperature=0))
    nll, top1 = [], []
    for out in outs:
        for r in out.prompt_logprobs[1:]:  # the first token has no context
            nll.append(-r.logprob)
            top1.append(r.top_logprobs[0][0])
    return TeacherForced(torch.tensor(nll, dtype=torch.float64), torch.tensor(top1))


def time_forward(model, ids: list[int], repeats: int) -> tuple[float, float]:
    """Median and best wall time (ms) of forward over `ids` + logits of the last row."""
    ids_t = torch.tensor(ids)
    pos = torch.arange(len(ids))
    times = []
    with torch.inference_mode():
        for i in range(repeats + 2):
            start = time.perf_counter()
            model.compute_logits(model(ids_t, pos)[-1:])
            if i >= 2:
                times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3, min(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default=None, help="GGUF file or HF folder (default model if unset)")
    ap.add_argument("--speed", action="store_true", help="also time the forward at T=1 and 512")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-accuracy", action="store_true", help="timings only")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    ref, _ = load_model(args.model, mode="reference", device="cpu")
    t1 = time.perf_counter()
    fast, config = load_model(args.model, mode="fast", device="cpu")
    t2 = time.perf_counter()
    print(f"model: {config.name}  load reference {t1 - t0:.1f} s, fast {t2 - t1:.1f} s")

    if not args.no_accuracy:
        docs = documents(args.model)
        r = teacher_forced(ref, docs)
        prefill = compare(r, teacher_forced(fast, docs))
        quant.DENSE_MIN_ROWS = 1 << 30  # the packed kernels the decode steps use, for every row
        decode = compare(r, teacher_forced(fast, docs, chunk=16))
        quant.DENSE_MIN_ROWS = DENSE_MIN_ROWS
        print(f"texts: {', '.join(TEXTS)} ({int(prefill['tokens'])} predicted tokens)")
        print(f"perplexity, reference mode: {prefill['ppl_reference']:.3f}")
        print("| fast-mode path | top-1 agreement with reference | perplexity | vs reference |")
        print("|---|---|---|---|")
        engine = {
            dt: compare(r, engine_teacher_forced(args.model, docs, dt))
            for dt in ("float32", "float16")
        }
        int8 = compare(r, engine_teacher_forced(args.model, docs, "float16", int8_prompts=True))
        for name, st in (
            ("prefill (bf16 matmuls)", prefill),
            ("decode (packed kernels)", decode),
            ("engine, float32 KV cache", engine["float32"]),
            ("engine, float16 KV cache (default)", engine["float16"]),
            ("engine, float16 KV cache, --int8-prompts", int8),
        ):
            print(
                f"| {name} | {st['top1_agreement'] * 100:.2f} % | {st['ppl_candidate']:.3f} "
                f"| {st['ppl_rel_diff'] * 100:+.2f} % |"
            )
    if args.speed:
        text = documents(args.model)[0]
        print(f"threads: {args.threads}; wall ms, median (best)")
        print("| mode | T=1 forward+logits | T=512 forward+last logits |")
        print("|---|---|---|")
        for name, model in (("fast", fast), ("reference", ref)):
            a = time_forward(model, text[500:501], 30)
            b = time_forward(model, text[:512], 3)
            print(f"| {name} | {a[0]:.1f} ({a[1]:.1f}) | {b[0]:.0f} ({b[1]:.0f}) |")


if __name__ == "__main__":
    main()
