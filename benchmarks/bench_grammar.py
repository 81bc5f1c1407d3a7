"""Per-token overhead of constrained decoding (xgrammar masks) against free decoding.

In-process engine on the default model (or --model). For each batch size, the same prompts run
as decode steps of: free decoding; every row under a JSON schema whose string field never ends
(the mask allows ~255k tokens at each step, the costly case); every row under a GBNF grammar
of words; and a mixed batch (half free, half JSON). Every row runs exactly --tokens steps
(ignore_eos; the grammars never complete), the prefill step is left out, and the table gives the
median decode-step time and its overhead over free decoding at the same batch size.

Step times swing with machine load, so a second table times the grammar work alone, as the
engine does it each step: filling every constrained row's bitmask (xgrammar) and applying the
masks to the [batch, vocab] logits, with each row's matcher inside a JSON string (the widest
mask) or between GBNF words. That cost is the per-token overhead, whatever the model costs.

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
from girandole.sampling.grammar import (  # noqa: E402
    GrammarSpec,
    SequenceGrammar,
    allocate_bitmask,
    apply_bitmask,
)

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


def mask_times(llm: LLM, batch: int, spec: GrammarSpec, prefix: str, repeats: int) -> float:
    """Median ms of one step's grammar work (fill each row's bitmask, apply them) at `batch`."""
    import torch

    compiled = llm.engine.grammars.compile(spec)
    vocab = llm.engine.model_config.vocab_size
    rows = []
    for _ in range(batch):
        g = SequenceGrammar(compiled, spec)
        for token in llm.tokenizer.encode(prefix, add_bos=False):
            assert g.accept(token), (prefix, token)
        rows.append(g)
    bitmask = allocate_bitmask(batch, vocab)
    logits = torch.randn(batch, vocab)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for i, g in enumerate(rows):
            g.fill_bitmask(bitmask, i)
        apply_bitmask(logits, bitmask, list(range(batch)))
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


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
    print()
    print("grammar work per decode step alone, median ms (per row)")
    print("| batch | json, inside a string | gbnf, after a word |")
    print("|---|---|---|")
    for batch in (int(b) for b in args.batch.split(",")):
        cells = []
        for spec, prefix in ((JSON, '{"text": "The'), (GBNF, "Once upon")):
            ms = mask_times(llm, batch, spec, prefix, 50)
            cells.append(f"{ms:.3f} ({ms / batch:.3f})")
        print(f"| {batch} | {' | '.join(cells)} |", flush=True)


if __name__ == "__main__":
    main()
