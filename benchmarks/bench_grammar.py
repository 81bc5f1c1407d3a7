"""Per-token overhead of constrained decoding (xgrammar masks) against free decoding.

In-process engine on the default model (or --model). For each batch size, the same prompts run
as decode steps of: free decoding; every row under a JSON schema whose string field never ends
(the mask allows ~255k tokens at each step, the costly case); every row under a GBNF grammar
of words; and a mixed batch (half free, half JSON). Every row runs exactly --tokens steps
(ignore_eos; the grammars never complete), the prefill step is left out, and the table gives the
median decode-step time and its overhead over free decoding at the same batch size.

    .venv/bin/python benchmarks/bench_grammar.py [--batch 1,4,16] [--tokens 48] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import make_text_prompt  # noqa: E402

from girandole import LLM, SamplingParams  # noqa: E402
from girandole.sampling.grammar import GrammarSpec  # noqa: E402

JSON = GrammarSpec.json_schema(
    '{"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}'
)
GBNF = GrammarSpec("gbnf", 'root ::= word (" " word)*\nword ::= [a-zA-Z]+')
MODES = {
    "free": lambda i: None,
    "json schema": lambda i: JSON,
    "gbnf": lambda i: GBNF,
    "mixed (half json)": lambda i: JSON if i % 2 else None,
}


def step_times(llm: LLM, batch: int, tokens: int, grammar_of, key: str) -> list[float]:
    engine = llm.engine
    for i in range(batch):
        params = SamplingParams(
            temperature=1.0, seed=i, max_tokens=tokens, ignore_eos=True, grammar=grammar_of(i)
        )
        engine.add_request(
            f"{key}-{i}", llm.tokenizer.encode(make_text_prompt(16, f"{key}-{i}")), params
        )
    times = []
    first = True
    while engine.has_unfinished_requests():
        start = time.perf_counter()
        outs = engine.step()
        elapsed = time.perf_counter() - start
        if first:  # the prefill step
            first = False
            continue
        if outs:
            times.append(elapsed)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="model path (default: the default model)")
    ap.add_argument("--batch", default="1,4,16")
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    llm = LLM(model=args.model)
    for spec in (JSON, GBNF):  # compile (and build the vocabulary table) outside the timings
        llm.engine.grammars.compile(spec)
    step_times(llm, 2, 4, MODES["mixed (half json)"], "warmup")
    print(f"decode step, median ms (overhead vs free); {args.tokens} tokens a row, "
          f"{args.repeats} repeats")  # fmt: skip
    print(f"| batch | {' | '.join(MODES)} |")
    print("|---|" + "---|" * len(MODES))
    for batch in (int(b) for b in args.batch.split(",")):
        medians = {}
        for name, grammar_of in MODES.items():
            times = []
            for r in range(args.repeats):
                times += step_times(llm, batch, args.tokens, grammar_of, f"{name}-{batch}-{r}")
            medians[name] = statistics.median(times) * 1000
        free = medians["free"]
        cells = [f"{free:.1f}"] + [
            f"{medians[n]:.1f} ({(medians[n] / free - 1) * 100:+.0f}%, "
            f"{(medians[n] - free) / batch:+.2f} ms/token)"
            for n in list(MODES)[1:]
        ]
        print(f"| {batch} | {' | '.join(cells)} |", flush=True)


if __name__ == "__main__":
    main()
