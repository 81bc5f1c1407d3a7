"""The one GPU check (run on a lent H100/H200; within 8 minutes on an H200): correctness per
architecture and a throughput table, side by side with transformers on the same GPU.

A. logits: our CUDA forward vs transformers on tiny random checkpoints, fp32 and bf16.
B. engine: greedy continuations (reference mode, fp32) equal to transformers `generate` per
   architecture; fast-mode (bf16) logprobs of the same tokens within tolerance of reference mode.
C. throughput, bf16, random weights with the shapes of Gemma-3-270M, Qwen2.5-0.5B and
   Llama-3.2-1B (256-token prompts, 128 output tokens): total output tok/s at 1 / 16 / 64 / 256
   concurrent requests, transformers `generate` (dynamic cache) and transformers with a static
   cache and `torch.compile` in the same run, batch-1 decode as a share of the HBM roofline.
   The first model also runs with --enforce-eager, --no-overlap-scheduling and unfused layers
   (GIRANDOLE_FUSED_LAYERS=0, model/fused_layers.py) at 1 and 16 requests; its default engine
   is profiled (torch.profiler) over 8 decode steps of 1 and 256 streams: wall vs device-busy
   ms a step, the top ops in decode_profile.txt (--no-variants: none of these extra rows).
A2. the fused MoE kernel (model/kernels/triton_moe.py) against torch at Qwen3-30B-A3B's and
   gpt-oss-20b's MoE shapes, random bf16 weights and routing, 1 / 8 / 300 tokens: max abs and
   relative error, host syncs of a call (expected 0), a CUDA graph of it replayed = eager and
   its microseconds (at 8 and 300 tokens: the alignment's one-program kernel, then its torch
   ops; a layer's experts, for the decode step's share, not a throughput row). Run after C,
   within the budget that C leaves: C's rows come first.
D. split-K decode kernel (run before C: seconds): paged_decode split vs one pass vs torch at
   Gemma-3-270M's attention shapes, batch 1 / 16 / 64 at contexts 512 / 4K / 16K: max abs
   error, microseconds per call (CUDA events, median of 20, replaying a CUDA graph of the call
   and eager), the heuristic's partition count.
Writes gpu_check.json and gpu_check.md (markdown tables) to --out after every section, so a run
cut off by its time limit leaves what it did; an engine that fails leaves the other rows. Work
past --budget-s is skipped and marked so in the tables.

    python benchmarks/gpu_check.py [--tokenizer DIR_WITH_GEMMA_tokenizer.json] --out OUT_DIR
    python benchmarks/gpu_check.py --smoke --out /tmp/x   # CPU: tiny shapes, TRITON_INTERPRET
    bash benchmarks/gpu_run.sh OUT TOKENIZER_DIR          # the device call: two processes
"""

from __future__ import annotations

import argparse
import json
import os
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
OUT: Path | None = None  # where save() writes the report (--out)
DEV = "cuda"
SMOKE = False
DEADLINE = float("inf")  # time.monotonic() after which remaining work is skipped
VARIANTS = True  # the first model's extra rows (eager, no overlap, unfused, compiled, profile)
ARCHS = ["llama", "llama3", "mistral", "qwen2", "qwen3", "gemma3"]
HBM_GBPS = {"H200": 4800.0, "H100": 3350.0, "A100": 2039.0}  # for the roofline


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
            save()

        return run

    return wrap


def save() -> None:
    """Write the report so far: a run cut off by its time limit still leaves its tables."""
    if OUT is None:
        return
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "gpu_check.json").write_text(json.dumps(results, indent=1))
    (OUT / "gpu_check.md").write_text(markdown())


def isolated(fn, *args, **kwargs) -> dict:
    """fn's row, or its error: one engine that fails leaves the others' rows (and frees what
    it held on the GPU before the next one loads)."""
    try:
        return fn(*args, **kwargs)
    except Exception:
        return {"error": traceback.format_exc()[-3000:]}
    finally:
        import gc

        gc.collect()
        if DEV == "cuda":
            torch.cuda.empty_cache()


def sync() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()


def out_of_time() -> bool:
    return time.monotonic() > DEADLINE


def engine_kwargs(**extra) -> dict:
    """The LLM's settings here: on CPU (--smoke) the GPU path runs under the interpreter."""
    kw = dict(device=DEV, **extra)
    if DEV != "cuda":
        kw["gpu_path"] = True
    return kw


def write_wordlevel_tokenizer(folder: Path, vocab_size: int, bos: int = 1, eos: int = 2) -> None:
    """A tokenizer of `vocab_size` word tokens (t0, t1, ...) for random-weight models whose real
    tokenizer is not at hand: prompts here are token ids, the tokenizer only has to load."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"t{i}": i for i in range(vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": f"t{bos}", "eos_token": f"t{eos}", "add_bos_token": False})
    )


@section("A. tiny checkpoints: our logits vs transformers")
def correctness(tmp: Path):
    from model_helpers import write_tiny_hf

    from girandole.model.loader import load_model

    out = {}
    prompts = [[1, 5, 9, 23, 44, 71, 100, 3, 8], [1, 200, 201, 17, 5, 5, 5, 90, 12, 13, 14, 15]]
    for kind in ARCHS:
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


@section("B. engine per architecture: greedy vs transformers, fast vs reference logprobs")
def engine_per_arch(tmp: Path):
    import transformers as tf
    from model_helpers import VOCAB

    from girandole import LLM, SamplingParams

    out = {}
    prompts = [[1, 5, 9, 23, 44, 71, 100, 3, 8], [1, 200, 201, 17] + [5] * 30, [1, 7]]
    n_new = 16
    for kind in ARCHS:
        folder = tmp / kind  # written by part A
        write_wordlevel_tokenizer(folder, VOCAB)
        hf = tf.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(DEV)
        ref = LLM(model=str(folder), **engine_kwargs(mode="reference", kv_cache_gb=0.05))
        greedy = SamplingParams(temperature=0, max_tokens=n_new, ignore_eos=True)
        outs = ref.generate(prompts, greedy)
        same = []
        for p, o in zip(prompts, outs):
            ids = torch.tensor([p], device=DEV)
            g = hf.generate(
                ids, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False, pad_token_id=0
            )
            same.append(g[0, len(p) :].tolist() == o.token_ids)
        # Both modes score the same token sequences (prompt + reference continuation).
        seqs = [p + o.token_ids for p, o in zip(prompts, outs)]
        echo = SamplingParams(max_tokens=1, prompt_logprobs=0)
        ref_lp = [[r.logprob for r in o.prompt_logprobs[1:]] for o in ref.generate(seqs, echo)]
        del ref
        fast = LLM(model=str(folder), **engine_kwargs(mode="fast", kv_cache_gb=0.05))
        fast_lp = [[r.logprob for r in o.prompt_logprobs[1:]] for o in fast.generate(seqs, echo)]
        del fast
        diff = max(abs(a - b) for x, y in zip(ref_lp, fast_lp) for a, b in zip(x, y))
        out[kind] = {"greedy_equal_transformers": same, "fast_vs_reference_logprob_max_diff": diff}
    return out


# -- part A2: the fused MoE kernel -------------------------------------------------------------

MOE_SECTION = "A2. fused MoE kernel vs torch (bf16 weights, real models' MoE shapes)"
# (hidden, intermediate, experts, top-k, activation)
MOE_SHAPES = {
    "Qwen3-30B-A3B": (2048, 768, 128, 8, "silu"),
    "gpt-oss-20b": (2880, 2880, 32, 4, "swiglu_clamped"),
}


def _moe_torch(x, w_gu, w_down, ids, weights, act, gate_up_bias, down_bias, alpha, limit):
    """The MoE block with torch ops, expert by expert, float32 from the bf16 weights, the
    intermediate rounded to bf16 as the kernel stores it."""
    inter = w_down.shape[2]
    y = torch.zeros(x.shape[0], w_down.shape[1], device=x.device)
    xb = x.bfloat16().float()
    for e in ids.unique().tolist():
        tok, j = (ids == e).nonzero(as_tuple=True)
        gu = xb[tok] @ w_gu[e].float().T + (0 if gate_up_bias is None else gate_up_bias[e].float())
        gate, up = gu[:, :inter], gu[:, inter:]
        if act == "silu":
            a = torch.nn.functional.silu(gate) * up
        else:
            gate, up = gate.clamp(max=limit), up.clamp(-limit, limit)
            a = (up + 1) * gate * torch.sigmoid(alpha * gate)
        out = a.bfloat16().float() @ w_down[e].float().T
        out = out + (0 if down_bias is None else down_bias[e].float())
        y.index_add_(0, tok, out * weights[tok, j][:, None])
    return y


@section(MOE_SECTION)
def fused_moe_check():
    """model/kernels/triton_moe.py against torch at T = 1, 8, 300 tokens of random routing:
    max abs and relative (norm) error; on CUDA, at 8 and 300 tokens (the alignment's one-program
    kernel, then torch's ops), also a CUDA graph of the call replayed against the eager call,
    and the host syncs of an eager call (expected 0)."""
    import warnings

    from girandole.model.kernels import triton_moe

    shapes = MOE_SHAPES
    if SMOKE:
        shapes = {
            "smoke-silu": (48, 40, 8, 2, "silu"),
            "smoke-swiglu": (48, 40, 8, 2, "swiglu_clamped"),
        }
    out = {}
    for name, (h, inter, e, k, act) in shapes.items():
        if out_of_time():
            out[name] = {"skipped": "time budget"}
            continue
        g = torch.Generator(device=DEV).manual_seed(0)

        def randn(*shape, scale=1.0, g=g):
            return torch.randn(*shape, device=DEV, generator=g) * scale

        w_gu = randn(e, 2 * inter, h, scale=h**-0.5).bfloat16()
        w_down = randn(e, h, inter, scale=inter**-0.5).bfloat16()
        b_gu = b_down = None
        if act == "swiglu_clamped":
            b_gu, b_down = randn(e, 2 * inter, scale=0.1).bfloat16(), randn(e, h).bfloat16() * 0.1
        kw = dict(act=act, gate_up_bias=b_gu, down_bias=b_down, alpha=1.702, limit=7.0)
        row = {}
        for t in (1, 5) if SMOKE else (1, 8, 300):
            x = randn(t, h)
            top, ids = randn(t, e).topk(k, dim=-1)
            weights = top.softmax(dim=-1)
            got = triton_moe.fused_moe(x, w_gu, w_down, ids, weights, **kw)
            want = _moe_torch(x, w_gu, w_down, ids, weights, **kw)
            cell = {
                "max_abs": float((got - want).abs().max()),
                "rel": float((got - want).norm() / want.norm()),
            }
            if DEV == "cuda" and t > 1:  # the alignment's kernel (8 tokens), torch's ops (300)
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    torch.cuda.set_sync_debug_mode("warn")
                    try:
                        triton_moe.fused_moe(x, w_gu, w_down, ids, weights, **kw)
                    finally:
                        torch.cuda.set_sync_debug_mode("default")
                cell["host_syncs"] = len(caught)
                sync()
                try:
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph):
                        static = triton_moe.fused_moe(x, w_gu, w_down, ids, weights, **kw)
                    graph.replay()
                    sync()
                    cell["graph_equal_eager"] = bool(torch.equal(static, got))
                    cell["graph_us"] = _time_us(graph.replay, 20)
                except Exception as exc:  # noqa: BLE001 - the capture's failure is the result
                    cell["graph_equal_eager"] = f"capture failed: {type(exc).__name__}: {exc}"[:300]
            row[f"T={t}"] = cell
        out[name] = row
        del w_gu, w_down
    return out


def _moe_markdown(d) -> list[str]:
    if not d:
        return []
    if "error" in d:
        return ["", "Fused MoE check failed (gpu_check.json)."]
    lines = [
        "",
        "Fused MoE kernel vs torch (bf16 weights, random routing):",
        "",
        "| shape | tokens | max abs | rel | host syncs | graph = eager | graph replay us |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, row in d.items():
        if "skipped" in row:
            lines.append(f"| {name} | skipped: {row['skipped']} | | | | | |")
            continue
        for t, c in row.items():
            lines.append(
                f"| {name} | {t} | {c['max_abs']:.2g} | {c['rel']:.2g} | "
                f"{c.get('host_syncs', '-')} | {c.get('graph_equal_eager', '-')} | "
                f"{_fmt_us(c.get('graph_us'))} |"
            )
    return lines


# -- part D: the split-K decode kernel --------------------------------------------------------


def _time_us(fn, iters: int) -> float:
    """Median microseconds of fn() (CUDA events on the GPU, a clock elsewhere)."""
    times = []
    for _ in range(iters):
        if DEV == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1000)
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e6)
    return sorted(times)[len(times) // 2]


def _decode_reference(q, k_cache, v_cache, tables, ctx: int, block: int, scale: float):
    """fp32 torch attention of each row over its first ctx keys, gathered by block table."""
    batch, heads, head_dim = q.shape
    kv_heads = k_cache.shape[1]
    offs = torch.arange(block, device=q.device)
    slots = (tables.long()[:, :, None] * block + offs).reshape(batch, -1)[:, :ctx]
    k, v = k_cache[slots].float(), v_cache[slots].float()  # [B, ctx, Hkv, D]
    qg = q.float().reshape(batch, kv_heads, heads // kv_heads, head_dim)
    p = torch.softmax(torch.einsum("bkgd,bnkd->bkgn", qg, k) * scale, -1)
    return torch.einsum("bkgn,bnkd->bkgd", p, v).reshape(batch, heads, head_dim)


SPLIT_SECTION = "D. split-K decode kernel: split vs one pass vs torch (Gemma-3-270M attention)"


@section(SPLIT_SECTION)
def split_decode():
    """Global-attention layers of Gemma-3-270M (4 query heads, 1 KV head, head_dim 256) over a
    cache of scattered 16-token blocks; every row at the same context. Times are the kernel
    call alone: replayed from a CUDA graph of it (as the engine's decode graphs run it), and
    eager (Python launch overhead included). Under --smoke: tiny shapes, the interpreter."""
    from girandole.model.kernels import triton_paged_attention as kernels

    cfg = shape_config("gemma-3-270m")
    heads, kv_heads, head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    scale = cfg.query_pre_attn_scalar**-0.5
    block = 16
    cuda = DEV == "cuda"
    batches, contexts = ([1, 16, 64], [512, 4096, 16384]) if not SMOKE else ([1, 2], [40, 100])
    fixed = [4, 16, 64] if not SMOKE else [2, 3]
    iters = 20 if cuda else 2
    dtype = torch.bfloat16 if cuda else torch.float32
    sms = kernels.sm_count(torch.device(DEV))
    out: dict = {"shape": dict(heads=heads, kv_heads=kv_heads, head_dim=head_dim, block=block)}
    out.update(sms=sms, dtype=str(dtype), iters=iters, rows={})
    g = torch.Generator(device=DEV).manual_seed(0)
    for batch in batches:
        for ctx in contexts:
            key = f"batch {batch}, context {ctx}"
            if out_of_time():
                out["rows"][key] = None
                continue
            width = -(-ctx // block)
            n_blocks = batch * width

            def randn(*shape):
                return torch.randn(*shape, generator=g, device=DEV).to(dtype)

            k_cache = randn(n_blocks * block, kv_heads, head_dim)
            v_cache = randn(n_blocks * block, kv_heads, head_dim)
            tables = torch.randperm(n_blocks, generator=g, device=DEV).int().view(batch, width)
            lens = torch.full((batch,), ctx, dtype=torch.int32, device=DEV)
            q = randn(batch, heads, head_dim)
            want = _decode_reference(q, k_cache, v_cache, tables, ctx, block, scale)
            auto = kernels.decode_partitions(batch, kv_heads, width, block, head_dim, None, sms)
            row: dict = {"heuristic_partitions": auto}
            args = (q, k_cache, v_cache, tables, lens, block, scale)
            for parts in dict.fromkeys([1, auto, *fixed]):

                def call(parts=parts, args=args):
                    return kernels.paged_decode(*args, num_partitions=parts)

                got = call()  # compiles
                cell = {"max_abs_err": float((got.float() - want).abs().max())}
                cell["eager_us"] = _time_us(call, iters)
                if cuda:
                    try:
                        graph = torch.cuda.CUDAGraph()
                        with torch.cuda.graph(graph):
                            static = call()
                        graph.replay()
                        torch.cuda.synchronize()
                        cell["graph_equals_eager"] = bool(torch.equal(static, got))
                        cell["graph_us"] = _time_us(graph.replay, iters)
                        del graph, static
                    except Exception as e:  # noqa: BLE001 - recorded, the others still run
                        cell["graph_error"] = repr(e)[:300]
                row[f"P={parts}"] = cell
            out["rows"][key] = row
            del args, k_cache, v_cache, tables, want  # before the next shape's
    return out


# -- part C: model shapes with random weights ---------------------------------------------------


def shape_config(name: str):
    """transformers config with the shapes of a real model (tiny stand-ins under --smoke)."""
    import transformers as tf

    if SMOKE:
        small = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, vocab_size=512)
        small.update(max_position_embeddings=4096, bos_token_id=1, eos_token_id=2, pad_token_id=0)
        if name == "gemma-3-270m":
            return tf.Gemma3TextConfig(
                **small,
                num_attention_heads=4,
                num_key_value_heads=1,
                head_dim=64,
                sliding_window=32,
            )
        return tf.LlamaConfig(**small, num_attention_heads=4, num_key_value_heads=2)
    from model_shapes import shape_config as real_shapes

    return real_shapes(name)


def write_shaped(name: str, folder: Path, tokenizer_dir: Path | None) -> int:
    """Random bf16 weights with `name`'s shapes; returns the parameter count."""
    import shutil

    import transformers as tf

    cfg = shape_config(name)
    torch.manual_seed(0)
    cls = tf.Gemma3ForCausalLM if name.startswith("gemma") else tf.AutoModelForCausalLM
    with torch.device(DEV):
        model = cls(cfg) if cls is tf.Gemma3ForCausalLM else cls.from_config(cfg)
    model = model.to(torch.bfloat16)
    n_params = sum(p.numel() for p in model.parameters())  # tied embeddings counted once
    model.save_pretrained(folder)
    del model
    if tokenizer_dir is not None and name.startswith("gemma") and not SMOKE:
        shutil.copy(tokenizer_dir / "tokenizer.json", folder / "tokenizer.json")
        (folder / "tokenizer_config.json").write_text(
            json.dumps({"bos_token": "<bos>", "eos_token": "<eos>", "add_bos_token": True})
        )
    else:
        write_wordlevel_tokenizer(folder, cfg.vocab_size, cfg.bos_token_id, cfg.eos_token_id)
    return n_params


def prompts_for(conc: int, length: int, vocab: int) -> list[list[int]]:
    return [
        [(i * 7919 + j * 104729) % (vocab - 10) + 5 for j in range(length)] for i in range(conc)
    ]


def hbm_gbps() -> float | None:
    if DEV != "cuda":
        return None
    name = torch.cuda.get_device_name(0)
    return next((v for k, v in HBM_GBPS.items() if k in name), None)


def engine_throughput(*args, fused: bool = True, **kwargs) -> dict:
    """_engine_throughput's row with the fused layers on or off (read by every forward, the
    graphs' capture included), back on afterwards whatever happens."""
    from girandole.model import fused_layers

    fused_layers.ENABLED = fused
    try:
        return _engine_throughput(*args, **kwargs)
    finally:
        fused_layers.ENABLED = True


def _engine_throughput(
    folder: Path,
    vocab: int,
    concs,
    n_out: int,
    p_len: int,
    eager: bool = False,
    overlap: bool | None = None,
    profile_as: str | None = None,
) -> dict:
    from girandole import LLM, SamplingParams

    row: dict = {}
    t = time.perf_counter()
    llm = LLM(
        model=str(folder),
        **engine_kwargs(kv_cache_gb=0.2 if SMOKE else 16, max_num_seqs=256),
        max_num_batched_tokens=8192,
        enforce_eager=eager,
        # None: on for CUDA; under --smoke (CPU) the default rows run it too
        overlap_scheduling=overlap if overlap is not None else (True if SMOKE else None),
    )
    row["overlap_scheduling"] = llm.engine.overlap
    row["load_and_capture_s"] = time.perf_counter() - t
    graphs = llm.engine.runner.graphs
    row["graph_buckets"] = sorted(graphs.graphs) if graphs is not None else []
    eng = llm.engine
    prompt = prompts_for(1, p_len, vocab)[0]
    llm.generate([prompt], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))  # warm
    eng.add_request(
        "d", prompt, SamplingParams(temperature=0, max_tokens=n_out + 1, ignore_eos=True)
    )
    eng.step()  # the prompt and the first token
    sync()
    t = time.perf_counter()
    while eng.has_unfinished_requests():
        eng.step()
    sync()
    row["decode_1_stream"] = n_out / (time.perf_counter() - t)
    if DEV == "cuda" and eng.overlap:
        row["syncs_in_overlapped_steps"] = sync_probe(eng, vocab, p_len)
    if profile_as is not None:
        row["decode_profile"] = {
            str(n): isolated(profile_decode, eng, vocab, p_len, n, f"{profile_as}, {n} streams")
            for n in ([1, 4] if SMOKE else [1, 256])
        }
    long = prompts_for(1, 2 * p_len, vocab)
    t = time.perf_counter()
    llm.generate(long, SamplingParams(temperature=0, max_tokens=1))
    row["prefill"] = 2 * p_len / (time.perf_counter() - t)
    for conc in concs:
        if out_of_time():
            row[f"@{conc}"] = None
            continue
        params = SamplingParams(temperature=0.8, max_tokens=n_out, ignore_eos=True)
        t = time.perf_counter()
        outs = llm.generate(prompts_for(conc, p_len, vocab), params)
        row[f"@{conc}"] = sum(len(o.token_ids) for o in outs) / (time.perf_counter() - t)
    del llm, eng
    if DEV == "cuda":
        torch.cuda.empty_cache()
    return row


def sync_probe(eng, vocab: int, p_len: int) -> dict:
    """Host syncs while an overlapped engine decodes 4 streams for 8 steps (torch's sync debug
    mode; CUDA only): each one makes the host wait for the step in flight, which undoes the
    overlap. Expected: none (the wait for a step's ids is an event, not flagged)."""
    import warnings

    from girandole import SamplingParams

    params = SamplingParams(temperature=0.8, max_tokens=32, ignore_eos=True)
    for i, prompt in enumerate(prompts_for(4, p_len, vocab)):
        eng.add_request(f"sync-probe-{i}", prompt, params)
    for _ in range(4):  # the prefills, and decoding under way
        eng.step()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(8):
                eng.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    while eng.has_unfinished_requests():
        eng.step()
    where = sorted({f"{Path(w.filename).name}:{w.lineno}" for w in caught})
    return {"count": len(caught), "where": where[:8]}


PROFILE_FILE = "decode_profile.txt"


def profile_decode(eng, vocab: int, p_len: int, streams: int, title: str, steps: int = 8) -> dict:
    """Where a decode step's time goes, with `streams` sequences decoding: torch.profiler over
    `steps` engine steps. Wall ms per step against the device's busy ms per step (the sum of
    its kernels' times) says whether the step is bound by the host (Python, launches) or by
    the GPU; the top ops by device and by host time go to OUT/decode_profile.txt."""
    from torch.profiler import ProfilerActivity, profile

    from girandole import SamplingParams

    params = SamplingParams(temperature=0.8, max_tokens=steps + 24, ignore_eos=True)
    for i, prompt in enumerate(prompts_for(streams, p_len, vocab)):
        eng.add_request(f"profile-{streams}-{i}", prompt, params)

    def decoding() -> bool:  # every stream past its prompt
        running = eng.scheduler.running
        return len(running) == streams and all(
            s.num_computed_tokens >= s.num_prompt_tokens for s in running
        )

    for _ in range(64):  # the prefills, then every stream decoding
        eng.step()
        if decoding():
            break
    for _ in range(2):
        eng.step()
    ready = decoding()  # else the profile holds prefill steps too
    sync()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEV == "cuda" else [])
    with profile(activities=activities) as prof:
        t = time.perf_counter()
        for _ in range(steps):
            eng.step()
        sync()
        wall = time.perf_counter() - t
    while eng.has_unfinished_requests():
        eng.step()
    events = prof.key_averages()
    row: dict = {"wall_ms_per_step": 1e3 * wall / steps, "all_decoding": ready}
    if DEV == "cuda":

        def device_us(e) -> float:
            return getattr(e, "self_device_time_total", None) or getattr(
                e, "self_cuda_time_total", 0.0
            )

        row["device_busy_ms_per_step"] = sum(device_us(e) for e in events) / 1e3 / steps
        row["kernels_per_step"] = sum(e.count for e in events if device_us(e) > 0) / steps
        by_device = events.table(sort_by="self_device_time_total", row_limit=25)
    else:
        by_device = ""
    by_host = events.table(sort_by="self_cpu_time_total", row_limit=25)
    if OUT is not None:
        OUT.mkdir(parents=True, exist_ok=True)
        with open(OUT / PROFILE_FILE, "a") as f:
            f.write(f"# {title}: {json.dumps(row)}\n\n{by_device}\n{by_host}\n\n")
    return row


def hf_throughput(folder: Path, vocab: int, concs, n_out: int, p_len: int, compiled: bool):
    """transformers generate, greedy: dynamic cache, or a static cache and torch.compile."""
    import transformers as tf

    hf = tf.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).to(DEV)
    extra = {}
    if compiled:
        extra["cache_implementation"] = "static"
        # Inductor's CUDA graphs on the GPU; under --smoke only the wiring is exercised.
        backend = "inductor" if DEV == "cuda" else "eager"
        mode = "reduce-overhead" if DEV == "cuda" else None
        hf.forward = torch.compile(hf.forward, backend=backend, mode=mode)
    row: dict = {}
    for conc in concs:
        if out_of_time():
            row[f"@{conc}"] = None
            continue
        ids = torch.tensor(prompts_for(conc, p_len, vocab), device=DEV)
        kw = dict(do_sample=False, pad_token_id=0, **extra)
        warm = n_out if compiled else 4  # a static cache compiles for its full length
        hf.generate(ids, max_new_tokens=warm, min_new_tokens=warm, **kw)
        sync()
        t = time.perf_counter()
        hf.generate(ids, max_new_tokens=n_out, min_new_tokens=n_out, **kw)
        sync()
        row[f"@{conc}"] = conc * n_out / (time.perf_counter() - t)
    del hf
    if DEV == "cuda":
        torch.cuda.empty_cache()
    return row


THROUGHPUT_SECTION = "C. throughput, bf16, random weights with real models' shapes"


@section(THROUGHPUT_SECTION)
def throughput(tmp: Path, tokenizer_dir: Path | None, models: list[str]):
    """girandole for every model first, then transformers, then transformers compiled (the
    slowest to set up): what the budget cuts is the comparison, not our own rows."""
    concs = [1, 4] if SMOKE else [1, 16, 64, 256]
    n_out, p_len = (4, 16) if SMOKE else (128, 256)
    out: dict = {}
    results[THROUGHPUT_SECTION] = out  # saved as it fills
    for name in models:
        if out_of_time():
            out[name] = {"skipped": "time budget"}
            continue
        folder = tmp / name
        n_params = write_shaped(name, folder, tokenizer_dir)
        vocab = shape_config(name).vocab_size
        row: dict = {"params": n_params, "vocab": vocab}
        out[name] = row
        first = name == models[0] and VARIANTS
        row["girandole"] = isolated(
            engine_throughput,
            folder,
            vocab,
            concs,
            n_out,
            p_len,
            profile_as=name if first else None,
        )
        save()
        if first:  # what the decode graphs and overlap scheduling bring
            row["girandole --enforce-eager"] = isolated(
                engine_throughput, folder, vocab, concs[:2], n_out, p_len, eager=True
            )
            if not out_of_time():
                row["girandole --no-overlap-scheduling"] = isolated(
                    engine_throughput, folder, vocab, concs[:2], n_out, p_len, overlap=False
                )
            if not out_of_time():
                row["girandole, unfused layers"] = isolated(
                    engine_throughput, folder, vocab, concs[:2], n_out, p_len, fused=False
                )
            save()
        bw = hbm_gbps()
        if bw is not None and "decode_1_stream" in row["girandole"]:
            roofline = bw * 1e9 / (2 * n_params)  # every bf16 weight read once per token
            row["roofline_tok_s"] = roofline
            row["decode_share_of_roofline"] = row["girandole"]["decode_1_stream"] / roofline
    written = [n for n in models if "girandole" in out[n]]
    for name in written:
        hf_concs = [c for c in concs if c <= 64]
        row = out[name]
        row["transformers"] = isolated(
            hf_throughput, tmp / name, row["vocab"], hf_concs, n_out, p_len, False
        )
        save()
    for name in written[: 1 if VARIANTS else 0]:  # compile time: the first model only
        row = out[name]
        row["transformers static+compile"] = isolated(
            hf_throughput,
            tmp / name,
            row["vocab"],
            concs[:1] if SMOKE else [1, 16],
            n_out,
            p_len,
            True,
        )
    return out


# -- the markdown report ----------------------------------------------------------------------


def _fmt(v) -> str:
    if v is None:
        return "skipped"
    if isinstance(v, float):
        return f"{v:,.0f}" if v >= 100 else f"{v:.3g}"
    return str(v)


def _split_markdown(d) -> list[str]:
    if not d or "error" in d:
        return []
    rows = d["rows"]
    counts = list(dict.fromkeys(k for r in rows.values() if r for k in r if k.startswith("P=")))
    counts = sorted(counts, key=lambda k: int(k[2:]))
    shape = d["shape"]
    lines = [
        "",
        f"Split-K decode ({shape['heads']} q heads, {shape['kv_heads']} KV head, head_dim "
        f"{shape['head_dim']}, block {shape['block']}, {d['dtype']}, {d['sms']} SMs): "
        f"microseconds per call, CUDA graph replay / eager (median of {d['iters']}), at P "
        "partitions (P=1: the one-pass kernel); max abs error against fp32 torch:",
        "",
        "| batch, context | heuristic P | " + " | ".join(counts) + " | max abs err (all P) |",
        "|---|---|" + "---|" * len(counts) + "---|",
    ]
    for key, row in rows.items():
        if row is None:
            lines.append(f"| {key} | skipped |" + " |" * (len(counts) + 1))
            continue
        cells = []
        for c in counts:
            cell = row.get(c)
            if cell is None:
                cells.append("-")
                continue
            graph = cell.get("graph_us")
            graph = "graph failed" if "graph_error" in cell else _fmt_us(graph)
            differs = " (graph != eager)" if cell.get("graph_equals_eager") is False else ""
            cells.append(f"{graph} / {_fmt_us(cell['eager_us'])}{differs}")
        err = max(row[c]["max_abs_err"] for c in counts if c in row)
        lines.append(
            f"| {key} | {row['heuristic_partitions']} | " + " | ".join(cells) + f" | {err:.2g} |"
        )
    return lines


def _fmt_us(v) -> str:
    return "-" if v is None else f"{v:.1f}" if v < 100 else f"{v:,.0f}"


def markdown() -> str:
    lines = [f"# gpu_check ({DEV}, torch {torch.__version__})", ""]
    a = results.get("A. tiny checkpoints: our logits vs transformers", {})
    b = results.get(
        "B. engine per architecture: greedy vs transformers, fast vs reference logprobs"
    )
    if a and "error" not in a:
        lines += [
            "| architecture | reference max abs diff | fast max abs diff | fast top-1 | "
            "greedy = transformers | fast vs reference logprob max diff |",
            "|---|---|---|---|---|---|",
        ]
        for kind, row in a.items():
            e = (b or {}).get(kind, {})
            lines.append(
                f"| {kind} | {row['reference']['max_abs_diff']:.2g} | "
                f"{row['fast']['max_abs_diff']:.2g} | {row['fast']['top1_agreement']:.2f} | "
                f"{e.get('greedy_equal_transformers', '-')} | "
                f"{_fmt(e.get('fast_vs_reference_logprob_max_diff', '-'))} |"
            )
        lines.append("")
    c = results.get(THROUGHPUT_SECTION, {})
    if c and "error" not in c:
        concs = [1, 4] if SMOKE else [1, 16, 64, 256]
        lines += [
            "Total output tok/s at N concurrent requests:",
            "",
            "| model shape | engine | " + " | ".join(str(n) for n in concs) + " |",
            "|---|---|" + "---|" * len(concs),
        ]
        for name, row in c.items():
            systems = (
                "girandole",
                "girandole --enforce-eager",
                "girandole --no-overlap-scheduling",
                "girandole, unfused layers",
                "transformers",
            )
            for system in (*systems, "transformers static+compile"):
                if system in row and "error" in row[system]:
                    lines.append(f"| {name} | {system} | failed (gpu_check.json) |")
                elif system in row:
                    cells = [_fmt(row[system].get(f"@{n}", "-")) for n in concs]
                    lines.append(f"| {name} | {system} | " + " | ".join(cells) + " |")
        lines += [
            "",
            "| model shape | params | batch-1 decode tok/s | HBM roofline tok/s | share | "
            "prefill tok/s |",
            "|---|---|---|---|---|---|",
        ]
        for name, row in c.items():
            if "decode_1_stream" not in row.get("girandole", {}):
                continue
            share = row.get("decode_share_of_roofline")
            lines.append(
                f"| {name} | {row['params'] / 1e6:.4g} M | "
                f"{_fmt(row['girandole']['decode_1_stream'])} | "
                f"{_fmt(row.get('roofline_tok_s', '-'))} | "
                f"{'-' if share is None else f'{share:.1%}'} | "
                f"{_fmt(row['girandole']['prefill'])} |"
            )
        for name, row in c.items():
            for n, p in row.get("girandole", {}).get("decode_profile", {}).items():
                if "error" in p:
                    lines += ["", f"{name}: the profile of {n} streams failed (gpu_check.json)"]
                    continue
                busy = p.get("device_busy_ms_per_step")
                where = (
                    f", device busy {busy:.2f} ms of it, {p['kernels_per_step']:.0f} kernels"
                    if busy is not None
                    else ""
                )
                lines += [
                    "",
                    f"{name}, {n} streams decoding: {p['wall_ms_per_step']:.2f} ms a step"
                    f"{where} ({PROFILE_FILE})",
                ]
        for name, row in c.items():
            probe = row.get("girandole", {}).get("syncs_in_overlapped_steps")
            if probe is not None:
                where = f" ({', '.join(probe['where'])})" if probe["where"] else ""
                lines += [
                    "",
                    f"{name}: host syncs in 8 overlapped decode steps: {probe['count']}{where}",
                ]
    lines += _moe_markdown(results.get(MOE_SECTION))
    lines += _split_markdown(results.get(SPLIT_SECTION))
    errors = [k for k, v in results.items() if isinstance(v, dict) and "error" in v]
    if errors:
        lines += ["", "Sections that failed (see gpu_check.json): " + ", ".join(errors)]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", type=Path, help="folder with Gemma's tokenizer.json")
    ap.add_argument("--out", type=Path, default=Path("."))
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, TRITON_INTERPRET=1")
    ap.add_argument(
        "--budget-s", type=float, help="skip work past this (default 450 s; none with --smoke)"
    )
    ap.add_argument("--models", default="gemma-3-270m,qwen2.5-0.5b,llama-3.2-1b")
    ap.add_argument("--skip-correctness", action="store_true")
    ap.add_argument(
        "--no-variants",
        action="store_true",
        help="no extra rows for the first model (eager, no overlap, unfused, compiled, profile)",
    )
    args = ap.parse_args()
    global DEV, SMOKE, DEADLINE, OUT, VARIANTS
    SMOKE = args.smoke
    VARIANTS = not args.no_variants
    OUT = args.out
    (OUT / PROFILE_FILE).unlink(missing_ok=True)
    if SMOKE:
        DEV = "cpu"
        os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are imported
    budget = args.budget_s if args.budget_s is not None else (None if SMOKE else 450.0)
    DEADLINE = time.monotonic() + budget if budget is not None else float("inf")
    print(torch.__version__, DEV, torch.cuda.get_device_name(0) if DEV == "cuda" else "")
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        if not args.skip_correctness:
            correctness(tmp)
            engine_per_arch(tmp)
        split_decode()
        throughput(tmp, args.tokenizer, args.models.split(","))
        if not args.skip_correctness:
            # last: the throughput rows are the issue's proof, and a failed graph capture here
            # could leave the process's CUDA context unusable for what would follow
            fused_moe_check()
    save()
    print(markdown())
    failed = [k for k, v in results.items() if isinstance(v, dict) and "error" in v]
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
