"""Mixture-of-experts benchmark: a small random Qwen3-MoE written on the fly (hidden 512, 8
experts of intermediate 512, top-2 renormalised, 4 layers, 8 heads / 4 KV heads of 64, a
byte-level vocabulary of about 1,000 tokens so that the LM head is a small share), girandole's
engine against transformers' `generate` side by side in the same run.

    .venv/bin/python benchmarks/bench_moe.py              # about 3 minutes on 2 cores
    .venv/bin/python benchmarks/bench_moe.py --quick      # one repeat, fewer tokens

Cells (greedy, ignore_eos, random prompt tokens; medians over --repeats, cells interleaved):
- decode tok/s at batch 1 and 8: (batch x N) output tokens / (time of N + 1 tokens - time of 1),
  so the prefill and the first token are left out;
- prefill tok/s: one prompt of --prefill-len tokens and one output token.

girandole runs the engine in-process (LLM) in fast mode (int8/int4 packed expert linears, bf16
activations: the server's default) and in reference mode (float32); transformers runs float32
(the dtype its CPU path is fastest in) with its KV cache.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import fmt, log, machine_lines, markdown_table, median  # noqa: E402

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
        start = time.perf_counter()
        self.llm.generate(prompts, params)
        return time.perf_counter() - start


class Transformers:
    def __init__(self, folder: Path) -> None:
        import transformers as tf

        self.model = tf.AutoModelForCausalLM.from_pretrained(folder).float().eval()
        self.name = "transformers (float32)"

    def run(self, prompts: list[list[int]], new_tokens: int) -> float:
        import torch

        ids = torch.tensor(prompts)  # one length: no padding
        start = time.perf_counter()
        with torch.inference_mode():
            self.model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=0,
            )
        return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--prefill-len", type=int, default=512)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json", help="write the raw figures here")
    args = p.parse_args()
    if args.quick:
        args.repeats, args.decode_tokens, args.prefill_len = 1, 16, 256

    import torch

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
          f"prefill: {args.prefill_len} tokens")  # fmt: skip
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
