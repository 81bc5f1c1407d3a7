"""Per-token overhead of constrained decoding (xgrammar masks) against free decoding.

In-process engine on the default model (or --model). For each batch size, the same prompts run
as decode steps of: free decoding; every row under a JSON schema whose string field never ends
(the mask allows ~255k tokens at each step, the costly case); every row under a GBNF grammar
of words; and a mixed batch (half free, half JSON). Every row runs exactly --tokens steps
(ignore_eos; the grammars never complete), the prefill step is left out, and the table gives the
median decode-step time and its overhead over free decoding at the same batch size.

Step times swing with machine load, so a second table times the grammar work alone, as the
engine does it each step: fill every constrained row's bitmask, apply the masks to the
[batch, vocab] logits, and let each row's matcher take its next token, the rows writing a long
JSON string (the widest masks) or GBNF words. It counts CPU time on one torch thread: that cost
is the per-token overhead, whatever the model and the machine's load cost. The first table
times compiling: the token table (once per tokenizer), then each grammar up to its first mask.

--compare FILE runs the grammar-work and compile tables with another implementation of
girandole.sampling.grammar as well (the same interface), interleaved in the same process, then
the decode-step table under it: how the grammar engine was chosen (docs/benchmarks.md), e.g.
llguidance's (`pip install llguidance` first):

    .venv/bin/python benchmarks/bench_grammar.py --compare benchmarks/grammar_llguidance.py

    .venv/bin/python benchmarks/bench_grammar.py [--batch 1,4,16] [--tokens 48] [--repeats 3]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path
from types import ModuleType

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from common import make_text_prompt  # noqa: E402

import girandole.engine.engine as engine_module  # noqa: E402
import girandole.sampling.grammar as grammar_module  # noqa: E402
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
# A tool call's schema (two functions, as api/tools.py builds it; properties in this order).
TOOLS = GrammarSpec.json_schema(
    json.dumps(
        {
            "anyOf": [
                {
                    "type": "object",
                    "properties": {
                        "name": {"const": name},
                        "arguments": {
                            "type": "object",
                            "properties": {
                                "city": {"type": "string"},
                                "unit": {"enum": ["celsius", "fahrenheit"]},
                                "days": {"type": "integer", "minimum": 1, "maximum": 14},
                            },
                            "required": ["city"],
                        },
                    },
                    "required": ["name", "arguments"],
                }
                for name in ("get_weather", "get_forecast")
            ]
        }
    )
)


TEXT = (Path(__file__).resolve().parents[1] / "tests/data/pride_and_prejudice_ch1.txt").read_text()


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


def text_tokens(llm: LLM) -> dict[str, list[int]]:
    """What each grammar's rows write in the grammar-work table: a long JSON string (inside it
    the mask allows almost every token) and words (a GBNF rule llguidance and xgrammar both
    walk at each step)."""
    words = " ".join(
        w for w in ("".join(c for c in word if c.isalpha()) for word in TEXT.split()) if w
    )
    encode = llm.tokenizer.encode
    return {
        "json": encode('{"text": "' + words, add_bos=False),
        "gbnf": encode(words, add_bos=False),
    }


def mask_times(g: ModuleType, cache, batch: int, spec: GrammarSpec, tokens: list[int],
               steps: int) -> list[float]:  # fmt: skip
    """CPU ms of each step's grammar work at `batch`, with the grammar module `g`: fill every
    row's bitmask, apply the masks to the logits, and each row takes its next token of
    `tokens` (the rows start 7 tokens apart, so their masks differ)."""
    compiled = cache.compile(spec)
    rows = []
    for b in range(batch):
        row = g.SequenceGrammar(compiled, spec)
        for token in tokens[: b * 7]:  # the rows at different places
            assert row.accept(token)
        rows.append((row, iter(tokens[b * 7 :])))
    bitmask = g.allocate_bitmask(batch, cache.vocab_size)
    logits = torch.randn(batch, cache.vocab_size)
    times = []
    for _ in range(steps):
        step_logits = logits.clone()
        start = time.process_time()
        for i, (row, _) in enumerate(rows):
            row.fill_bitmask(bitmask, i)
        g.apply_bitmask(step_logits, bitmask, list(range(batch)))
        for row, rest in rows:
            assert row.accept(next(rest))
        times.append((time.process_time() - start) * 1000)
    return times


def compile_times(llm: LLM, g: ModuleType) -> list[float]:
    """ms to build the token table (a new GrammarCache's first compile, of a one-letter regex),
    then for each grammar: compile it and fill its first mask (llguidance builds its lexer
    lazily, so compiling alone would leave work for the first step)."""
    cache = g.GrammarCache(llm.tokenizer, llm.engine.model_config.vocab_size)
    start = time.perf_counter()
    cache.compile(GrammarSpec("regex", "a"))
    out = [(time.perf_counter() - start) * 1000]
    bitmask = g.allocate_bitmask(1, cache.vocab_size)
    for spec in (JSON, TOOLS, GBNF):
        start = time.perf_counter()
        g.SequenceGrammar(cache.compile(spec), spec).fill_bitmask(bitmask, 0)
        out.append((time.perf_counter() - start) * 1000)
    return out


def load_module(path: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location("grammar_compared", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def engine_grammar(llm: LLM, g: ModuleType):
    """Run the engine with the grammar module `g` instead of girandole's own."""
    saved = (llm.engine.grammars, engine_module.SequenceGrammar)
    names = ("allocate_bitmask", "apply_bitmask")  # the Sampler imports these at each step
    saved_fns = [getattr(grammar_module, n) for n in names]
    llm.engine.grammars = g.GrammarCache(llm.tokenizer, llm.engine.model_config.vocab_size)
    engine_module.SequenceGrammar = g.SequenceGrammar
    for n in names:
        setattr(grammar_module, n, getattr(g, n))
    try:
        yield
    finally:
        llm.engine.grammars, engine_module.SequenceGrammar = saved
        for n, fn in zip(names, saved_fns):
            setattr(grammar_module, n, fn)


def decode_table(llm: LLM, args) -> None:
    for spec in (JSON, GBNF):  # compile (and build the vocabulary table) outside the timings
        llm.engine.grammars.compile(spec)
    step_times(llm, 2, 4, MODES["mixed (half json)"], "warmup")
    print(f"decode step, median ms (overhead vs free); {args.tokens} tokens a row, "
          f"{args.repeats} repeats")  # fmt: skip
    print(f"| batch | {' | '.join(MODES)} |")
    print("|---|" + "---|" * len(MODES))
    for batch in args.batches:
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="model path (default: the default model)")
    ap.add_argument("--batch", default="1,4,16")
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--compare", default=None, help="another grammar.py, timed beside ours")
    args = ap.parse_args()
    args.batches = [int(b) for b in args.batch.split(",")]
    llm = LLM(model=args.model)
    impls = {"xgrammar (girandole.sampling.grammar)": grammar_module}
    if args.compare:
        impls[args.compare] = load_module(args.compare)

    print("compile, median ms of 3: token table | json schema | tool call | gbnf (to 1st mask)")
    print("| grammar module | token table | json schema | tool call | gbnf |")
    print("|---|---|---|---|---|")
    runs: dict[str, list[list[float]]] = {name: [] for name in impls}
    for _ in range(3):  # interleaved: machine load drifts alike for both
        for name, g in impls.items():
            runs[name].append(compile_times(llm, g))
    for name, rows in runs.items():
        cells = [f"{statistics.median(col):.1f}" for col in zip(*rows)]
        print(f"| {name} | {' | '.join(cells)} |", flush=True)
    print()

    print("grammar work per decode step alone (fill, apply, accept), CPU ms on one thread,")
    print("median and mean of 200 steps (per row)")
    print("| grammar module | batch | json, in a long string | gbnf, words |")
    print("|---|---|---|---|")
    caches = {
        name: g.GrammarCache(llm.tokenizer, llm.engine.model_config.vocab_size)
        for name, g in impls.items()
    }
    texts = text_tokens(llm)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # CPU time is then the work's, not the thread pool's waiting
    for batch in args.batches:
        work: dict[tuple[str, int], list[float]] = {}
        for _ in range(4):  # interleaved, 50 steps at a time
            for name, g in impls.items():
                for k, (spec, key) in enumerate(((JSON, "json"), (GBNF, "gbnf"))):
                    work.setdefault((name, k), []).extend(
                        mask_times(g, caches[name], batch, spec, texts[key], 50)
                    )
        for name in impls:
            cells = []
            for k in range(2):
                med, mean = statistics.median(work[(name, k)]), statistics.mean(work[(name, k)])
                cells.append(f"{med:.3f}, {mean:.3f} ({med / batch:.3f}, {mean / batch:.3f})")
            print(f"| {name} | {batch} | {' | '.join(cells)} |", flush=True)
    torch.set_num_threads(threads)
    print()

    for name, g in impls.items():
        print(f"## {name}")
        with engine_grammar(llm, g) if g is not grammar_module else contextlib.nullcontext():
            decode_table(llm, args)


if __name__ == "__main__":
    main()
