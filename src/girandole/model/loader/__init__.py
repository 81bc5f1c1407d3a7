"""load_model: a GGUF file or Hugging Face folder -> (model, ModelConfig), in one of two modes.

- "reference": float32 weights (dequantized), float32 compute: matches transformers.
- "fast" (default): on CPU, weight-only int8/int4 packed linears with bf16 activations and an
  int8 embedding table (see model/quant.py); on CUDA, bf16 weights and plain F.linear.

Fast-mode CPU models are cached (pickled module, memory-mapped on load) in
`cache_dir()/packed`, keyed by the source file, the model code and whether the native kernels run
(where they do, packed linears store only their layout), so a second load of the
default model takes about a second instead of a GGUF parse and requantization. A missing entry
is built in a child process, so the serving process never holds the build's transient memory,
and there each finished layer's tensors go to a scratch file (loader/spill.py), so the build
holds about one layer in memory rather than the model. The entry is read into the page cache in
2 MiB folios, which its mapping then takes as 2 MiB pages (loader/page_cache.py: a MoE token's
experts 4-9 % faster).
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

from girandole.model import kernels
from girandole.model.config import ModelConfig
from girandole.model.default import cache_dir, remove_dead_partials, resolve_model_path
from girandole.model.kernels import wq_gemm
from girandole.model.layers import MODES, Builder
from girandole.model.loader import page_cache
from girandole.model.loader.spill import SpillArena
from girandole.model.spec import ArchSpec

log = logging.getLogger(__name__)

CACHE_FORMAT = 1
# Only checkpoints at least this big get a packed-model cache entry (small ones build in
# well under a second), and entries unused this long are pruned.
CACHE_MIN_BYTES = 32 << 20
CACHE_MAX_AGE_S = 3 * 24 * 3600


def _model_class(arch: str) -> type[nn.Module]:
    if arch == "gemma3":
        from girandole.model.gemma3 import Gemma3ForCausalLM

        return Gemma3ForCausalLM
    if arch == "llama":
        from girandole.model.llama import LlamaForCausalLM

        return LlamaForCausalLM
    if arch == "qwen2":
        from girandole.model.qwen import Qwen2ForCausalLM

        return Qwen2ForCausalLM
    if arch == "qwen3":
        from girandole.model.qwen import Qwen3ForCausalLM

        return Qwen3ForCausalLM
    if arch == "qwen3_moe":
        from girandole.model.qwen import Qwen3MoeForCausalLM

        return Qwen3MoeForCausalLM
    if arch == "mixtral":
        from girandole.model.llama import MixtralForCausalLM

        return MixtralForCausalLM
    if arch == "gpt_oss":
        from girandole.model.gpt_oss import GptOssForCausalLM

        return GptOssForCausalLM
    raise ValueError(f"unsupported model architecture: {arch!r}")


def read_checkpoint(path: Path):
    """(ArchSpec, ModelConfig, weights) of a GGUF file or HF folder."""
    if path.is_dir():
        from girandole.model.loader.safetensors import read_safetensors

        return read_safetensors(path)
    from girandole.model.loader.gguf import read_gguf

    return read_gguf(path)


def build_model(
    spec: ArchSpec,
    weights,
    mode: str,
    device: torch.device,
    source: str | None = None,
    spill: SpillArena | None = None,
) -> nn.Module:
    """Build the network in CPU memory, in the form `mode` takes on `device` (packed
    quantized linears for fast mode on CPU, bf16 dense weights for fast mode elsewhere);
    the caller moves it to `device`. Each tensor must have the shape `spec` implies and
    finite values; `source` (the checkpoint's path) names it in the errors. `spill`: where
    each finished layer's tensors go (a cache build: loader/spill.py)."""
    builder = Builder(weights, mode, device, spec, source)
    builder.spill = spill
    with torch.no_grad():
        model = _model_class(spec.architecture)(spec, builder)
    return model.eval().requires_grad_(False)


def _code_hash() -> str:
    folder = Path(__file__).resolve().parent.parent
    h = hashlib.sha256()
    # The Python that builds the packed tensors, and the native kernels' headers that define
    # how they are read (kernels/csrc/wq_panel.h: a layout change there alone must repack).
    for p in sorted([*folder.rglob("*.py"), *folder.rglob("*.h")]):
        h.update(p.name.encode())
        h.update(p.read_bytes())
    h.update(torch.__version__.encode())
    h.update(str(CACHE_FORMAT).encode())
    # Where the native kernels run, packed linears store only their layout (quant.py's
    # torch_forms_needed): an entry built with them cannot serve a process without them.
    h.update(b"native" if kernels.available() else b"torch")
    # ... and the linears' layout is the AMX/bf16 one or the VNNI one (wq_gemm.vnni_default).
    h.update(b"vnni" if wq_gemm.vnni_default() else b"panel")
    return h.hexdigest()[:16]


def _source_bytes(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.glob("*.safetensors"))
    return path.stat().st_size


def _prune_cache(keep: Path) -> None:
    """Drop older entries for the same checkpoint and entries unused for CACHE_MAX_AGE_S
    (unlinking a file another process has mapped is safe: the mapping keeps it alive)."""
    prefix = keep.name.rsplit("-", 1)[0] + "-"
    now = time.time()
    for other in keep.parent.glob("*.pt"):
        if other == keep:
            continue
        try:
            if other.name.startswith(prefix) or now - other.stat().st_atime > CACHE_MAX_AGE_S:
                other.unlink()
        except OSError:
            pass


def _cache_path(path: Path) -> Path:
    if path.is_dir():
        st = max((p.stat() for p in path.iterdir() if p.is_file()), key=lambda s: s.st_mtime_ns)
        key = hashlib.sha256(f"{path.resolve()}-{st.st_mtime_ns}".encode()).hexdigest()[:16]
        key = f"{path.name}-{key}"
    else:
        from girandole.model.loader.gguf_file import file_key

        key = file_key(path)
    return cache_dir() / "packed" / f"{key}-{_code_hash()}.pt"


def load_model(
    path: str | os.PathLike | None = None,
    mode: str = "fast",
    device: str | torch.device | None = None,
    use_cache: bool = True,
    merge_adapter: str | os.PathLike | None = None,
) -> tuple[nn.Module, ModelConfig]:
    """Load a model for inference. `path` None is the default model (Gemma 3 270M Q4_K_M).
    `merge_adapter`: a PEFT LoRA folder whose weights are merged in before the model is built
    (and quantized), so it runs at the base model's speed."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    path = resolve_model_path(path)

    cached = use_cache and merge_adapter is None and mode == "fast" and device.type == "cpu"
    cache_file = _ensure_cache(path) if cached else None
    if cache_file is not None and cache_file.exists():
        page_cache.read_huge(cache_file)  # mapped in 2 MiB pages where the kernel can
        try:
            blob = torch.load(cache_file, mmap=True, weights_only=False)
            return blob["model"], blob["config"]
        except Exception as exc:  # a damaged cache file is rebuilt
            log.warning("ignoring unreadable model cache %s: %s", cache_file, exc)

    spec, config, weights = read_checkpoint(path)
    if merge_adapter is not None:
        from girandole.model.lora import MergedWeights, read_adapter

        weights = MergedWeights(weights, read_adapter(merge_adapter, spec))
    model = build_model(spec, weights, mode, device, str(path))
    _attach_vision(model, config, path)
    if device.type != "cpu":
        model = model.to(device)

    if cache_file is not None:
        _save_cache(model, config, cache_file)
    return model, config


def _ensure_cache(path: Path) -> Path | None:
    """The packed-model cache entry of checkpoint `path` (CPU fast mode), built first where there
    is none (it may still be missing after: the build failed); None for a checkpoint too small
    to get one."""
    if _source_bytes(path) < CACHE_MIN_BYTES:
        return None
    cache_file = _cache_path(path)
    if cache_file.parent.is_dir():
        remove_dead_partials(cache_file.parent, "*.tmp*")  # _save_cache's, its writer killed
    if not cache_file.exists():
        _build_cache_in_child(path, cache_file)
    return cache_file


def prepare_cache(path: str | os.PathLike | None) -> Path | None:
    """Build the packed-model cache entry that a CPU fast-mode load of `path` would map, ahead of
    that load (a model's `:prepare`); the entry, or None where such a load takes none (a small
    checkpoint) or the build failed."""
    cache_file = _ensure_cache(resolve_model_path(path))
    return cache_file if cache_file is not None and cache_file.exists() else None


def _attach_vision(model: nn.Module, config: ModelConfig, path: Path) -> None:
    """A vision checkpoint's image encoder (float32, model/gemma3_vision.py) as `model.vision`;
    models without one have no such attribute."""
    if config.vision is not None:
        from girandole.model.gemma3_vision import load_vision_encoder

        model.vision = load_vision_encoder(path, config.vision)


def _save_cache(model: nn.Module, config: ModelConfig, cache_file: Path) -> None:
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache_file.with_suffix(f".tmp{os.getpid()}")
    try:
        torch.save({"model": model, "config": config}, tmp)
        page_cache.drop(tmp)  # written pages are cached in small folios: read it back in 2 MiB
        os.replace(tmp, cache_file)
        _prune_cache(cache_file)
    except OSError as exc:
        log.warning("could not write model cache %s: %s", cache_file, exc)
        tmp.unlink(missing_ok=True)


def build_cache_entry(path: str, cache_file: str) -> None:
    """Entry point of the child process that builds a packed-model cache entry."""
    torch.set_num_threads(_build_threads(torch.get_num_threads()))
    spec, config, weights = read_checkpoint(Path(path))
    # "<entry>.spill.tmp<pid>": removed as a dead partial should this process be killed
    scratch = Path(cache_file).with_suffix(f".spill.tmp{os.getpid()}")
    # the first entry of a fresh cache folder: the scratch file goes there before the entry does
    scratch.parent.mkdir(parents=True, exist_ok=True)
    try:
        spill = SpillArena(scratch)
        model = build_model(spec, weights, "fast", torch.device("cpu"), path, spill)
        _attach_vision(model, config, Path(path))
        spill.take(model)  # the embeddings, the head and the final norm
        spill.finish()
        _save_cache(model, config, Path(cache_file))
    finally:
        scratch.unlink(missing_ok=True)


def _build_threads(cores: int) -> int:
    """Threads for a build: the cores other work leaves free now, at least one. A build is
    thousands of short tensor ops whose threads wait for each other: on an idle host two threads
    build the default model in 3.9-5.7 s (one: 7.4-8.1 s), but while other work held the cores
    two took 35-74 s and one 15 s. "Now": the threads runnable at this moment (/proc/loadavg's
    fourth field, the median of a few looks, less this one); the load average lags by a minute
    and counts the server's own start-up (importing, compiling kernels) just before."""
    looks = []
    for _ in range(5):
        try:
            running = Path("/proc/loadavg").read_text().split()[3].split("/")[0]
        except (OSError, IndexError):  # not Linux: every core
            return cores
        looks.append(int(running) - 1)
        time.sleep(0.02)
    others = sorted(looks)[len(looks) // 2]
    return max(1, min(cores, cores - others))


def _build_cache_in_child(path: Path, cache_file: Path) -> None:
    """Build the packed model in a child process that saves it to `cache_file`: the build's
    transient memory (about 1.6 GiB for the default model, which glibc keeps mapped after it is
    freed) never lands in the serving process, which then maps the file. On failure the caller
    builds in-process."""
    code = "import sys; from girandole.model.loader import build_cache_entry as b; b(*sys.argv[1:])"
    log.info("building the packed model cache for %s (once per model and version)", path.name)
    try:
        done = subprocess.run(
            [sys.executable, "-c", code, str(path), str(cache_file)],
            capture_output=True,
            text=True,
            timeout=3600,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("building the model cache in a child process failed: %s", exc)
        return
    if done.returncode != 0:
        log.warning("building the model cache in a child process failed: %s", done.stderr[-2000:])


__all__ = ["load_model", "build_model", "read_checkpoint"]
