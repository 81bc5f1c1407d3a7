"""Mixture-of-experts benchmark: a small random Qwen3-MoE written on the fly (hidden 512, 8
experts of intermediate 512, top-2 renormalised, 4 layers, 8 heads / 4 KV heads of 64, a
byte-level BPE vocabulary trained on a short text: 315 tokens, so that the LM head is a small
share), girandole's engine against transformers' `generate` side by side in the same run.

    .venv/bin/python benchmarks/bench_moe.py              # about 3 minutes on 2 cores
    .venv/bin/python benchmarks/bench_moe.py --quick      # one repeat, fewer tokens
    .venv/bin/python benchmarks/bench_moe.py --threads 1 --clock cpu   # on a shared host

Cells (greedy, ignore_eos, random prompt tokens; medians over --repeats, cells interleaved):
- decode tok/s at batch 1 and 8: (batch x N) output tokens / (time of N + 1 tokens - time of 1),
  so the prefill and the first token are left out;
- prefill tok/s: one prompt of --prefill-len tokens and one output token.
`--clock cpu` times the process's CPU seconds (time.process_time) instead of wall seconds: on a
host whose cores other jobs share, the wall clock measures the other jobs as much as the
engines. `--threads N` fixes torch's (and girandole's engine's) thread count.

girandole runs the engine in-process (LLM) in fast mode (int8/int4 packed expert linears, bf16
activations: the server's default) and in reference mode (float32); transformers runs float32
(the dtype its CPU path is fastest in) with its KV cache.

Last runs (docs/benchmarks.md, "Mixture-of-experts"; AVX2 host shared with a CI run, `--threads
1 --clock cpu`, medians of 3; tok/s, decode b1 / b8 / prefill 512, one of three runs each):

    girandole (fast), before (407a4a1)   143.3 / 462.7 / 1,916   transformers  91.6 / 305.0 / 2,523
    girandole (fast), after              173.0 / 638.0 / 2,242   transformers 109.1 / 344.7 / 2,659

Against transformers over the three runs: decode 1.59x and 1.74x (were 1.42x, 1.27x), prefill
0.84x (was 0.76x): the bf16 expert GEMMs and the per-row attention kernel (see there).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import fmt, log, machine_lines, markdown_table, median  # noqa: E402

CLOCK = [time.perf_counter]  # --clock cpu: time.process_time
TEXT = "The quick brown fox jumps over the lazy dog. Once upon a time, 0123456789. " * 20


def write_model(folder: Path) -> Path:
    import torch
    import transformers as tf
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1024,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([TEXT], trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "add_bos_token": False}
        )
    )
    config = tf.Qwen3MoeConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=512,
        intermediate_size=1024,
        moe_intermediate_size=512,
        num_experts=8,
        num_experts_per_tok=2,
        norm_topk_prob=True,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=64,
        max_position_embeddings=4096,
        eos_token_id=tok.token_to_id("<|im_end|>"),
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = tf.Qwen3MoeForCausalLM(config).float().eval()
    model.save_pretrained(folder)
    return folder


def random_prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    import torch

    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (length,), generator=gen).tolist() for _ in range(n)]


class Girandole:
    def __init__(self, folder: Path, mode: str) -> None:
        from girandole import LLM

        self.llm = LLM(model=str(folder), mode=mode, device="cpu", kv_cache_gb=0.5)
        self.name = f"girandole ({mode})"

    def run(self, prompts: list[list[int]], new_tokens: int) -> float:
        from girandole import SamplingParams

        params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
        self.llm.engine.kv_cache.reset_prefix_cache()  # every cell computes its prompts
        start = CLOCK[0]()
        self.llm.generate(prompts, params)
        return CLOCK[0]() - start


class Transformers:
    def __init__(self, folder: Path) -> None:
        import transformers as tf

        self.model = tf.AutoModelForCausalLM.from_pretrained(folder).float().eval()
        self.name = "transformers (float32)"

    def run(self, prompts: list[list[int]], new_tokens: int) -> float:
        import torch

        ids = torch.tensor(prompts)  # one length: no padding
        start = CLOCK[0]()
        with torch.inference_mode():
            self.model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=0,
            )
        return CLOCK[0]() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--prefill-len", type=int, default=512)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json", help="write the raw figures here")
    p.add_argument("--threads", type=int, help="torch and engine threads (default: the engine's)")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall")
    args = p.parse_args()
    if args.quick:
        args.repeats, args.decode_tokens, args.prefill_len = 1, 16, 256
    if args.clock == "cpu":
        CLOCK[0] = time.process_time

    import torch

    if args.threads:
        os.environ["GIRANDOLE_THREADS"] = str(args.threads)  # the engine's governor: fixed
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        folder = write_model(Path(tmp) / "qwen3-moe")
        vocab = json.loads((folder / "config.json").read_text())["vocab_size"]
        engines = [Girandole(folder, "fast"), Girandole(folder, "reference"), Transformers(folder)]
        cells = {"decode b1": 1, "decode b8": 8, "prefill": 1}
        figures: dict[str, dict[str, list[float]]] = {
            e.name: {c: [] for c in cells} for e in engines
        }
        for engine in engines:  # warm-up: kernels, allocations
            engine.run(random_prompts(1, args.prompt_len, vocab, 99), 2)
        for r in range(args.repeats):
            for engine in engines:
                for cell, batch in cells.items():
                    if cell == "prefill":
                        prompts = random_prompts(1, args.prefill_len, vocab, r)
                        t = engine.run(prompts, 1)
                        figures[engine.name][cell].append(args.prefill_len / t)
                    else:
                        prompts = random_prompts(batch, args.prompt_len, vocab, r)
                        t1 = engine.run(prompts, 1)
                        tn = engine.run(prompts, args.decode_tokens + 1)
                        rate = batch * args.decode_tokens / max(tn - t1, 1e-9)
                        figures[engine.name][cell].append(rate)
                log(r, engine.name, {c: fmt(v[-1]) for c, v in figures[engine.name].items()})
    print("\n".join(machine_lines()))
    print(f"torch threads: {torch.get_num_threads()}; repeats: {args.repeats}; "
          f"decode: {args.decode_tokens} tokens after {args.prompt_len}-token prompts; "
          f"prefill: {args.prefill_len} tokens; clock: {args.clock}")  # fmt: skip
    header = ["engine", "decode tok/s, batch 1", "decode tok/s, batch 8", "prefill tok/s"]
    rows = [
        [name, *(fmt(median(cell_figures)) for cell_figures in by_cell.values())]
        for name, by_cell in figures.items()
    ]
    print(markdown_table(header, rows))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
