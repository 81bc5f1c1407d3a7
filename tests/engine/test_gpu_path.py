"""The engine's GPU path (EngineConfig.gpu_path: Triton paged attention over block tables and
GpuSampler), run on CPU under Triton's interpreter, against the CPU path on the same weights:
greedy and seeded outputs equal through batched and chunked prefills, prefix-cache hits,
decode steps, sliding windows and images (Gemma 3 vision)."""

from __future__ import annotations

import os

import pytest

os.environ["TRITON_INTERPRET"] = "1"  # read when the kernels are first imported
pytest.importorskip("triton")

from girandole import LLM, SamplingParams  # noqa: E402
from girandole.sampling.gpu_sampler import GpuSampler  # noqa: E402

PREFIX = [5 + (i * 7) % 200 for i in range(21)]
PROMPTS = [
    PREFIX + [11, 12, 13],
    PREFIX + [40],
    [3, 9, 27, 81, 243 % 250],
    [(i * 13) % 250 + 3 for i in range(37)],
]


def _outputs(llm: LLM, params: SamplingParams) -> list[list[int]]:
    return [o.token_ids for o in llm.generate(PROMPTS, params)]


def _pair(model_dir, **kwargs):
    common = dict(mode="reference", device="cpu", block_size=4, kv_cache_gb=0.01, **kwargs)
    return LLM(model=str(model_dir), **common), LLM(model=str(model_dir), gpu_path=True, **common)


@pytest.fixture(scope="module")
def llama_pair(tinier_llama_dir):
    # 16 tokens a step: the 37-token prompt is prefilled in chunks over a cached part.
    return _pair(tinier_llama_dir, max_num_batched_tokens=16, max_num_seqs=4)


def test_gpu_path_uses_the_gpu_pieces(llama_pair):
    cpu, gpu = llama_pair
    assert gpu.engine.runner.gpu_path and isinstance(gpu.engine.runner.sampler, GpuSampler)
    assert not cpu.engine.runner.gpu_path and not isinstance(cpu.engine.runner.sampler, GpuSampler)


def test_greedy_equals_cpu_path(llama_pair):
    cpu, gpu = llama_pair
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    want = _outputs(cpu, params)
    assert _outputs(gpu, params) == want
    # again: the shared prefix now comes from the prefix cache
    assert _outputs(gpu, params) == want


def test_seeded_sampling_equals_cpu_path(llama_pair):
    cpu, gpu = llama_pair
    params = SamplingParams(
        temperature=0.9, top_k=40, top_p=0.95, max_tokens=10, seed=11, ignore_eos=True, logprobs=2
    )
    want = cpu.generate(PROMPTS, params)
    got = gpu.generate(PROMPTS, params)
    for a, b in zip(got, want):
        assert a.token_ids == b.token_ids


def test_sliding_window_model_equals_cpu_path(tmp_path, tinier_llama_dir):
    """Gemma 3 in small: local layers with a window of 5 keys around a global one, head_dim 32,
    one KV head for four."""
    import shutil

    import torch
    import transformers as tf

    config = tf.Gemma3TextConfig(
        vocab_size=320,
        hidden_size=64,
        intermediate_size=96,
        # local, global, local: each reads its own group's block table (the interpreter's time
        # goes with layers: Gemma 3's own pattern would take 7 for this)
        num_hidden_layers=3,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=32,
        sliding_window=5,
        query_pre_attn_scalar=24,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    tf.Gemma3ForCausalLM(config).save_pretrained(tmp_path)
    for f in tinier_llama_dir.iterdir():  # the tiny tokenizer
        if f.name.startswith("tokenizer"):
            shutil.copy(f, tmp_path / f.name)
    cpu, gpu = _pair(tmp_path, max_num_batched_tokens=16)
    assert gpu.engine.runner.kv_windows == [None, 5, 5]  # a group per layer, the global first
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    assert _outputs(gpu, params) == _outputs(cpu, params)


def test_vision_model_with_images_equals_cpu_path(tiny_vision):
    """Gemma 3 vision (a sliding layer of window 5 and a global one; 4 tokens an image): an
    image's tokens attend to each other both ways in the Triton prefill kernel as in the CPU
    path's mask. One request with two images beside one without, in one batch, 12 tokens a
    step: the second image comes in a chunk after the first one's, read from the cache."""
    import torch

    from girandole.engine.engine import EngineConfig, LLMEngine
    from girandole.engine.images import PromptImage

    folder, _ = tiny_vision

    def run(budget: int, gpu_path: bool) -> dict[str, tuple[list[int], float]]:
        config = EngineConfig(
            model=str(folder),
            mode="reference",
            device="cpu",
            block_size=4,
            kv_cache_gb=0.01,
            max_num_batched_tokens=budget,
            gpu_path=gpu_path,
        )
        engine = LLMEngine(config)
        v = engine.model_config.vision
        image = [v.boi_token_id, *[v.image_token_id] * v.mm_tokens_per_image, v.eoi_token_id]
        ids = [engine.model_config.bos_token_id, 40, 41, *image, 60, 61, *image, 62]
        g = torch.Generator().manual_seed(7)
        pixels = [torch.rand(3, 32, 32, generator=g) * 2 - 1 for _ in range(2)]
        params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=0)
        engine.add_request("img", ids, params, images=[PromptImage.from_pixels(p) for p in pixels])
        engine.add_request("txt", [1, 40, 41, 42, 43], params)
        out: dict[str, tuple[list[int], float]] = {"img": ([], 0.0), "txt": ([], 0.0)}
        while engine.has_unfinished_requests():
            for o in engine.step():
                tokens, first = out[o.request_id]
                if not tokens and o.logprobs:
                    first = o.logprobs[0].logprob
                out[o.request_id] = (tokens + o.new_token_ids, first)
        return out

    want, got = run(12, False), run(12, True)
    for rid in want:
        assert got[rid][0] == want[rid][0], rid
        assert got[rid][1] == pytest.approx(want[rid][1], abs=1e-4), rid
