"""Speculative decoding on the default model (Gemma 3 270M), single stream, greedy.

    .venv/bin/python benchmarks/bench_speculation.py            # about 3 minutes on 2 cores
    .venv/bin/python benchmarks/bench_speculation.py --repeats 1 --max-tokens 96 --json out.json

Tasks:
- rewrite: the model copies a ~300-token passage in which 3 small edits were made; with
  `prediction` set to the original passage vs without (target: >= 3x tok/s, the same output);
- quote: the same copying task with n-gram lookup over the prompt and output
  (--ngram-speculation-length) and no prediction (target: >= 1.5x).

Decode tok/s counts output tokens after the first over the time from the first output token to
the last (prefill excluded); each cell is the median of --repeats runs, interleaved. Acceptance:
accepted proposed tokens / proposed tokens; matched: prediction tokens accepted.
"""

from __future__ import annotations

import argparse
import time

from common import dump_json, fmt, log, machine_lines, markdown_table, median

PASSAGE = (
    "The old harbour town woke slowly on winter mornings. Before sunrise the bakers lit their "
    "ovens, and the smell of fresh bread drifted down the narrow streets toward the water. "
    "Fishermen checked their nets by lantern light, calling softly to one another across the "
    "decks, while gulls waited on the posts of the wooden pier. When the first boats left the "
    "harbour, the bells of the church on the hill rang seven times, and the shopkeepers began "
    "to raise their shutters. Children ran to the school by the square, their breath white in "
    "the cold air, and the postman started his round with a heavy bag of letters and parcels. "
    "By nine o'clock the market was full: farmers from the valley sold apples, cheese and eggs, "
    "a woman at the corner stall mended umbrellas, and an old man played the accordion beside "
    "the fountain. Visitors rarely came in winter, so everyone knew everyone else, and news "
    "travelled quickly from the quay to the top of the town. In the afternoon the wind often "
    "rose, the sea turned grey and rough, and the boats hurried home before dark. Then the "
    "lamps were lit one by one, the taverns filled with talk of the day's catch, and the "
    "harbour settled into another long and quiet night under the stars."
)
EDITS = [("winter mornings", "cold mornings"), ("seven times", "eight times"),
         ("apples, cheese", "pears, cheese")]  # fmt: skip


def edited(text: str) -> str:
    for old, new in EDITS:
        assert old in text
        text = text.replace(old, new, 1)
    return text


def copy_prompt(text: str) -> str:
    return f"Copy the text below exactly, word for word.\n\nText:\n{text}\n\nCopy:\n"


def run_one(llm, prompt_ids: list[int], params) -> dict:
    engine = llm.engine
    engine.add_request("bench", prompt_ids, params)
    tokens: list[int] = []
    first = last = None
    spec: dict = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.new_token_ids:
                now = time.perf_counter()
                first = first or now
                last = now
            tokens += out.new_token_ids
            spec = out.speculation
    rate = (len(tokens) - 1) / (last - first) if last and last > first else None
    return {"tokens": tokens, "tok_s": rate, "spec": spec}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--ngram", type=int, default=8, help="--ngram-speculation-length")
    p.add_argument("--max-tokens", type=int, default=None, help="default: the whole passage")
    p.add_argument("--json", default=None)
    args = p.parse_args()

    from girandole import LLM, SamplingParams

    log("loading the default model (plain and n-gram engines)")
    plain = LLM()
    ngram = LLM(ngram_speculation_length=args.ngram)
    tok = plain.tokenizer
    prompt = tok.encode(copy_prompt(edited(PASSAGE)))
    n_passage = len(tok.encode(PASSAGE, add_bos=False, parse_special=False))
    prediction = tok.encode(PASSAGE, add_bos=False, parse_special=False)
    max_tokens = args.max_tokens or n_passage + 8
    greedy = SamplingParams(temperature=0, max_tokens=max_tokens)
    predicted = SamplingParams(temperature=0, max_tokens=max_tokens, speculation=prediction)
    cells = {
        "rewrite, no prediction": (plain, greedy),
        "rewrite, prediction = original": (plain, predicted),
        f"quote, n-gram {args.ngram}": (ngram, greedy),
    }
    results: dict[str, list[dict]] = {name: [] for name in cells}
    run_one(plain, prompt, SamplingParams(temperature=0, max_tokens=4))  # warm up
    run_one(ngram, prompt, SamplingParams(temperature=0, max_tokens=4))
    for r in range(args.repeats):
        for name, (llm, params) in cells.items():
            results[name].append(run_one(llm, prompt, params))
            log(f"repeat {r}: {name}: {fmt(results[name][-1]['tok_s'])} tok/s")

    base = results["rewrite, no prediction"]
    base_rate = median([x["tok_s"] for x in base])
    rows = []
    summary = {}
    for name, runs in results.items():
        rate = median([x["tok_s"] for x in runs])
        spec = runs[-1]["spec"]
        same = all(x["tokens"] == base[0]["tokens"] for x in runs)
        acceptance = spec["accepted"] / spec["proposed"] if spec.get("proposed") else None
        matched = (
            f"{spec['prediction_matched']}/{spec['prediction_tokens']}"
            if "prediction_tokens" in spec
            else "-"
        )
        rows.append([name, str(len(runs[0]["tokens"])), fmt(rate), fmt(rate / base_rate, 2) + "x",
                     fmt(acceptance, 2) if acceptance is not None else "-", matched,
                     "yes" if same else "NO"])  # fmt: skip
        summary[name] = {"tok_s": rate, "speedup": rate / base_rate, "acceptance": acceptance,
                         "spec": spec, "same_output": same}  # fmt: skip
    print("\n".join(machine_lines()))
    print(f"prompt {len(prompt)} tokens, passage {n_passage} tokens, {args.repeats} repeats\n")
    print(markdown_table(["task", "output tokens", "decode tok/s", "vs plain", "acceptance",
                          "prediction matched", "same output"], rows))  # fmt: skip
    text = tok.decode(base[0]["tokens"])
    print(f"\noutput (plain): {text[:200]!r}...")
    dump_json(args.json, summary)


if __name__ == "__main__":
    main()
