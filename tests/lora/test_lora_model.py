"""PEFT LoRA adapters on tiny random checkpoints: reference-mode logits of base + adapter equal
transformers + peft (fp32), rows of a mixed batch (base and several adapters) equal each
sequence alone, a merged adapter equals peft, and adapters that do not fit are refused."""

from __future__ import annotations

import json

import pytest
import torch
from lora_helpers import write_peft_adapter
from model_helpers import PagedRunner, hf_logits, write_tiny_hf

from girandole.model import lora
from girandole.model.loader import load_model
from girandole.model.lora import AdapterError, LoRABatch, read_adapter

KINDS = ["gemma3", "llama", "qwen2", "qwen3"]
PROMPTS = [
    [1, 17, 42, 99, 5, 250, 7, 7, 31, 64, 128, 3],
    [1, 200, 3],
    [1, 9, 8, 7, 6, 5, 4, 3, 2, 10, 11, 12, 13],
]
ATOL = 1e-4


@pytest.fixture(scope="module", params=KINDS)
def tiny(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"lora-{request.param}")
    hf = write_tiny_hf(request.param, folder / "base")
    model, _config = load_model(folder / "base", mode="reference", device="cpu")
    lora.attach(model)
    adapters = {}
    variants = {
        "all": dict(rank=8, alpha=16, seed=1),
        "rslora": dict(rank=16, alpha=8, rslora=True, seed=2),
        "attn": dict(rank=4, alpha=4, targets=["q_proj", "v_proj", "o_proj"], seed=3),
    }
    for name, kw in variants.items():
        peft_model = write_peft_adapter(hf, folder / name, **kw)
        adapters[name] = (peft_model, read_adapter(folder / name, model.spec, name))
    return folder, hf, model, adapters


def _run(model, prompts: dict[int, list[int]], adapters: dict[int, object]) -> torch.Tensor:
    """One prefill step of `prompts`, each sequence with its adapter (None: the base)."""
    rows: dict[int, list[int]] = {}
    offset = 0
    for i, ids in prompts.items():
        if adapters.get(i) is not None:
            rows.setdefault(i, []).extend(range(offset, offset + len(ids)))
        offset += len(ids)
    segments = [(adapters[i], torch.tensor(r)) for i, r in rows.items()]
    runner = PagedRunner(model)
    try:
        return runner.step(prompts, lora=LoRABatch(segments) if segments else None)
    finally:
        runner.close()


@pytest.mark.parametrize("variant", ["all", "rslora", "attn"])
def test_logits_match_peft(tiny, variant):
    _folder, _hf, model, adapters = tiny
    peft_model, adapter = adapters[variant]
    for ids in PROMPTS:
        ours = _run(model, {0: ids}, {0: adapter})
        theirs = hf_logits(peft_model, ids)
        torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)


def test_adapter_changes_the_logits(tiny):
    _folder, hf, model, adapters = tiny
    base = _run(model, {0: PROMPTS[0]}, {})
    torch.testing.assert_close(base, hf_logits(hf, PROMPTS[0]), atol=ATOL, rtol=0)
    with_adapter = _run(model, {0: PROMPTS[0]}, {0: adapters["all"][1]})
    assert (base - with_adapter).abs().max() > 1e-2


def test_mixed_batch_rows_equal_each_alone(tiny):
    """Base, three adapters and the base again in one flattened batch, then decode steps."""
    _folder, _hf, model, adapters = tiny
    order = [None, "all", "rslora", "attn", None]
    prompts = {i: PROMPTS[i % len(PROMPTS)] for i in range(len(order))}
    per_seq = {i: adapters[n][1] if n else None for i, n in enumerate(order)}
    mixed = _run(model, prompts, per_seq)
    row = 0
    for i, ids in prompts.items():
        alone = _run(model, {0: ids}, {0: per_seq[i]})
        torch.testing.assert_close(mixed[row : row + len(ids)], alone, atol=1e-5, rtol=0)
        if per_seq[i] is not None:
            torch.testing.assert_close(
                alone, hf_logits(adapters[order[i]][0], ids), atol=ATOL, rtol=0
            )
        row += len(ids)


def test_merged_adapter_matches_peft(tiny):
    folder, _hf, _model, adapters = tiny
    merged, _ = load_model(folder / "base", mode="reference", merge_adapter=folder / "rslora")
    peft_model = adapters["rslora"][0]
    for ids in PROMPTS[:2]:
        with torch.inference_mode():
            ours = merged.compute_logits(merged(torch.tensor(ids), torch.arange(len(ids))))
        torch.testing.assert_close(ours, hf_logits(peft_model, ids), atol=ATOL, rtol=0)


# ---------------------------------------------------------------------------------------------
# Adapters that do not fit


@pytest.fixture(scope="module")
def llama_and_qwen3(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lora-fit")
    llama = write_tiny_hf("llama", folder / "llama")
    qwen3 = write_tiny_hf("qwen3", folder / "qwen3")
    write_peft_adapter(qwen3, folder / "qwen3-adapter")
    write_peft_adapter(llama, folder / "llama-adapter")
    spec = load_model(folder / "llama", mode="reference")[0].spec
    return folder, llama, spec


def _edit_config(src, dst, **changes):
    import shutil

    shutil.copytree(src, dst)
    cfg = json.loads((dst / "adapter_config.json").read_text())
    cfg.update(changes)
    (dst / "adapter_config.json").write_text(json.dumps(cfg))
    return dst


def test_adapter_of_another_base_is_refused(llama_and_qwen3):
    folder, _llama, spec = llama_and_qwen3
    with pytest.raises(AdapterError, match="trained for another base model"):
        read_adapter(folder / "qwen3-adapter", spec)


def test_unsupported_adapters_are_refused(llama_and_qwen3, tmp_path):
    folder, llama, spec = llama_and_qwen3
    src = folder / "llama-adapter"
    assert read_adapter(src, spec).rank == 8
    cases = {
        "rank": (dict(r=128), "rank r=128"),
        "dora": (dict(use_dora=True), "DoRA"),
        "bias": (dict(bias="all"), "bias"),
        "type": (dict(peft_type="IA3"), "only LORA"),
        "save": (dict(modules_to_save=["lm_head"]), "modules_to_save"),
    }
    for name, (changes, message) in cases.items():
        with pytest.raises(AdapterError, match=message):
            read_adapter(_edit_config(src, tmp_path / name, **changes), spec)
    write_peft_adapter(llama, tmp_path / "embed", targets=["embed_tokens", "q_proj"])
    with pytest.raises(AdapterError, match="embed_tokens"):
        read_adapter(tmp_path / "embed", spec)
    with pytest.raises(AdapterError, match="adapter_config.json is missing"):
        read_adapter(tmp_path, spec)


def test_damaged_adapters_are_refused_naming_the_problem(llama_and_qwen3, tmp_path):
    """Non-finite weights or alpha (every token they touch would be NaN), a .bin that is not a
    torch file of tensors, a config that is not an object: AdapterErrors, never a crash."""
    from safetensors.torch import load_file, save_file

    folder, _llama, spec = llama_and_qwen3
    src = folder / "llama-adapter"
    with pytest.raises(AdapterError, match="lora_alpha=nan"):
        read_adapter(_edit_config(src, tmp_path / "alpha", lora_alpha=float("nan")), spec)
    # finite, but alpha / r times the weights overflows float32: it loaded, and every token
    # it touched was NaN (greedy answers of token 0)
    with pytest.raises(AdapterError, match="lora_alpha=1e\\+300"):
        read_adapter(_edit_config(src, tmp_path / "huge", lora_alpha=1e300), spec)
    # an int alpha past float's range was an OverflowError (a 500); a use_rslora of "no" was
    # taken as true (another scaling)
    with pytest.raises(AdapterError, match="lora_alpha=1000"):
        read_adapter(_edit_config(src, tmp_path / "bigint", lora_alpha=10**400), spec)
    with pytest.raises(AdapterError, match="use_rslora='no'"):
        read_adapter(_edit_config(src, tmp_path / "rs", use_rslora="no"), spec)
    nan = _edit_config(src, tmp_path / "nan")
    tensors = load_file(str(nan / "adapter_model.safetensors"))
    first = sorted(tensors)[0]
    tensors[first] = torch.full_like(tensors[first], float("inf"))
    save_file(tensors, str(nan / "adapter_model.safetensors"))
    with pytest.raises(AdapterError, match="NaN or infinite"):
        read_adapter(nan, spec)
    # a float8_e4m3fn file failed to load with a 500 (torch has no isfinite for it); an integer
    # one loaded
    tensors[first] = torch.full_like(tensors[first], float("nan"))
    for dtype, message in ((torch.float8_e4m3fn, "NaN or infinite"), (torch.int32, "int32")):
        odd = _edit_config(src, tmp_path / str(dtype))
        save_file(
            {k: v.to(dtype) for k, v in tensors.items()}, str(odd / "adapter_model.safetensors")
        )
        with pytest.raises(AdapterError, match=message):
            read_adapter(odd, spec)
    for name, content in (("garbage", b"garbage" * 10), ("list", None)):
        bad = _edit_config(src, tmp_path / name)
        (bad / "adapter_model.safetensors").unlink()
        if content is None:
            torch.save([torch.zeros(2)], bad / "adapter_model.bin")
        else:
            (bad / "adapter_model.bin").write_bytes(content)
        with pytest.raises(AdapterError, match="adapter_model.bin"):
            read_adapter(bad, spec)
    listed = _edit_config(src, tmp_path / "listed")
    (listed / "adapter_config.json").write_text("[1, 2]")
    with pytest.raises(AdapterError, match="not a JSON object"):
        read_adapter(listed, spec)


def test_native_kernel_equals_torch_path(tiny):
    """The native CPU kernel (csrc/lora.c) and torch's gathered matmuls give the same rows."""
    from girandole.model import kernels

    if not kernels.available():
        pytest.skip("native kernels not built on this machine")
    _folder, _hf, model, adapters = tiny
    order = [None, "all", "attn", "rslora", "all"]
    prompts = {i: PROMPTS[i % len(PROMPTS)] for i in range(len(order))}
    per_seq = {i: adapters[n][1] if n else None for i, n in enumerate(order)}
    rows: dict[object, list[int]] = {}
    offset = 0
    for i, ids in prompts.items():
        if per_seq[i] is not None:
            rows.setdefault(order[i], []).extend(range(offset, offset + len(ids)))
        offset += len(ids)
    segments = [(adapters[n][1], torch.tensor(r)) for n, r in rows.items()]
    out = {}
    for native in (True, False):
        runner = PagedRunner(model)
        try:
            out[native] = runner.step(prompts, lora=LoRABatch(segments, native=native))
        finally:
            runner.close()
    torch.testing.assert_close(out[True], out[False], atol=1e-5, rtol=0)


def test_an_adapter_folder_without_weights_is_not_added(llama_and_qwen3, tmp_path):
    """`girandole models add ... --base` checks for the weights file too, as its message says."""
    from girandole.registry.models import check_adapter_source

    folder, _llama, _spec = llama_and_qwen3
    src = folder / "llama-adapter"
    assert check_adapter_source(str(src)) == str(src.resolve())
    bare = _edit_config(src, tmp_path / "bare")
    for weights in bare.glob("adapter_model.*"):
        weights.unlink()
    with pytest.raises(ValueError, match="adapter_model.safetensors"):
        check_adapter_source(str(bare))
