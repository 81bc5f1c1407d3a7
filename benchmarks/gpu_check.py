"""One-shot GPU check (run on a lent H100/H200): model correctness on CUDA and an engine
throughput table, side by side with transformers on the same GPU.

The default GGUF (253 MB) cannot travel to the GPU machine, so part B uses a random-weight model
with exactly Gemma 3 270M's shapes and the real Gemma tokenizer (carried as tokenizer.json).

    python benchmarks/gpu_check.py --tokenizer DIR_WITH_tokenizer.json --out OUT_DIR
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests" / "model"))

results: dict = {}
DEV = "cuda"


def section(name):
    def wrap(fn):
        def run(*a, **k):
            t = time.time()
            try:
                results[name] = fn(*a, **k)
            except Exception:
                results[name] = {"error": traceback.format_exc()}
            print(
                f"== {name} ({time.time() - t:.1f} s)\n{json.dumps(results[name], indent=1)}",
                flush=True,
            )

        return run

    return wrap


@section("A. tiny checkpoints: our CUDA logits vs transformers on CUDA")
def correctness(tmp: Path):
    from model_helpers import write_tiny_hf

    from girandole.model.loader import load_model

    out = {}
    prompts = [[1, 5, 9, 23, 44, 71, 100, 3, 8], [1, 200, 201, 17, 5, 5, 5, 90, 12, 13, 14, 15]]
    for kind in ["llama", "llama3", "mistral", "qwen2", "qwen3", "gemma3"]:
        folder = tmp / kind
        hf = write_tiny_hf(kind, folder).to(DEV)
        row = {}
        for mode in ["reference", "fast"]:
            model, _ = load_model(folder, mode=mode, device=DEV)
            diffs, agree, total = [], 0, 0
            for ids in prompts:
                with torch.inference_mode():
                    want = hf(torch.tensor([ids], device=DEV)).logits[0].float()
                    t = torch.tensor(ids, device=DEV)
                    got = model.compute_logits(model(t, torch.arange(len(ids), device=DEV)))
                diffs.append(float((got.float() - want).abs().max()))
                agree += int((got.argmax(-1) == want.argmax(-1)).sum())
                total += len(ids)
            row[mode] = {"max_abs_diff": max(diffs), "top1_agreement": agree / total}
        out[kind] = row
    return out


def sync() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()


def write_gemma_270m_shaped(folder: Path, tokenizer_dir: Path) -> None:
    import shutil

    import transformers as tf

    cfg = tf.Gemma3TextConfig(
        vocab_size=262144,
        hidden_size=640,
        intermediate_size=2048,
        num_hidden_layers=18,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=256,
        sliding_window=512,
        query_pre_attn_scalar=256,
        rope_theta=1_000_000.0,
        rope_local_base_freq=10_000.0,
        max_position_embeddings=32768,
        bos_token_id=2,
        eos_token_id=1,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    model = tf.Gemma3ForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(folder)
    shutil.copy(tokenizer_dir / "tokenizer.json", folder / "tokenizer.json")
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "bos_token": "<bos>",
                "eos_token": "<eos>",
                "pad_token": "<pad>",
                "add_bos_token": True,
            }
        )
    )


@section("B1. Gemma-3-270M shapes, fp32: engine greedy on CUDA vs transformers generate")
def engine_vs_hf(folder: Path):
    import transformers as tf

    from girandole import LLM, SamplingParams

    llm = LLM(model=str(folder), mode="reference", device=DEV, kv_cache_gb=2)
    hf = tf.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(DEV)
    prompts = ["Once upon a time", "The capital of France is", "def fib(n):", "1, 2, 3, 4,"]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))
    same = []
    for o in outs:
        ids = torch.tensor([o.prompt_token_ids], device=DEV)
        g = hf.generate(ids, max_new_tokens=24, do_sample=False, min_new_tokens=24)
        same.append(g[0, ids.shape[1] :].tolist() == o.token_ids)
    return {"identical_greedy_24_tokens": same}


@section("B2. Gemma-3-270M shapes, bf16: throughput (girandole engine vs transformers)")
def throughput(folder: Path, quick: bool = False):
    import transformers as tf

    from girandole import LLM, SamplingParams

    table = {}
    concs, hf_concs, n_out = ([1, 4], [1], 8) if quick else ([1, 16, 64, 256], [1, 16, 64], 128)
    llm = LLM(
        model=str(folder),
        device=DEV,
        kv_cache_gb=1 if quick else 16,
        max_num_seqs=256,
        max_num_batched_tokens=8192,
    )
    tok = llm.tokenizer
    base = tok.encode("The quick brown fox jumps over the lazy dog. " * 40)
    prompt = base[:256]
    eng = llm.engine
    llm.generate([prompt], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))  # warm
    # single-stream decode: steps after the first token
    eng.add_request("d", prompt, SamplingParams(temperature=0, max_tokens=129, ignore_eos=True))
    eng.step()
    sync()
    t = time.perf_counter()
    while eng.has_unfinished_requests():
        eng.step()
    table["girandole decode tok/s (1 stream)"] = 128 / (time.perf_counter() - t)
    p512 = base[:512]
    t = time.perf_counter()
    llm.generate([p512], SamplingParams(temperature=0, max_tokens=1))
    table["girandole prefill tok/s (512)"] = 512 / (time.perf_counter() - t)
    for conc in concs:
        prompts = [[2] + [(i * 7919 + j) % 200000 + 1000 for j in range(255)] for i in range(conc)]
        t = time.perf_counter()
        outs = llm.generate(
            prompts, SamplingParams(temperature=0.8, max_tokens=n_out, ignore_eos=True)
        )
        dt = time.perf_counter() - t
        table[f"girandole total out tok/s @{conc}"] = sum(len(o.token_ids) for o in outs) / dt
    del llm
    if DEV == "cuda":
        torch.cuda.empty_cache()

    hf = tf.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).to(DEV)
    for conc in hf_concs:
        ids = torch.tensor(
            [[2] + [(i * 7919 + j) % 200000 + 1000 for j in range(255)] for i in range(conc)],
            device=DEV,
        )
        hf.generate(ids[:, :16], max_new_tokens=4, do_sample=False)
        sync()
        t = time.perf_counter()
        hf.generate(ids, max_new_tokens=n_out, min_new_tokens=n_out, do_sample=False)
        sync()
        table[f"transformers total out tok/s @{conc}"] = conc * n_out / (time.perf_counter() - t)
    return {k: round(v, 1) for k, v in table.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", type=Path, required=True)
    ap.add_argument("--out", type=Path, default=Path("."))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--skip-throughput", action="store_true")
    ap.add_argument("--quick", action="store_true", help="tiny throughput run (CPU smoke test)")
    ap.add_argument("--only-throughput", action="store_true")
    args = ap.parse_args()
    global DEV
    DEV = args.device
    print(
        torch.__version__, DEV, torch.cuda.get_device_name(0) if DEV == "cuda" else "", flush=True
    )
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        if not args.only_throughput:
            correctness(tmp)
        folder = tmp / "gemma-270m-shaped"
        write_gemma_270m_shaped(folder, args.tokenizer)
        if not args.only_throughput:
            engine_vs_hf(folder)
        if not args.skip_throughput:
            throughput(folder, args.quick)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_check.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
