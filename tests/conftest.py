"""Fixtures shared by every test area: tiny random checkpoints written by the tests."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

TRAIN_TEXT = (
    "Once upon a time there was a small engine that served many requests at once. "
    "It kept its keys and values in pages, shared prefixes between prompts, and never "
    "dropped a request. The quick brown fox jumps over the lazy dog. 0123456789 "
    "def main():\n    return 42\n"
) * 4


def write_tiny_tokenizer(
    folder: Path,
    vocab_size: int = 320,
    special_tokens: list[str] | None = None,
    text: str = TRAIN_TEXT,
    **config: object,
):
    """A byte-level BPE tokenizer with <s>/</s> (or `special_tokens`, <pad> and <s> first),
    trained on a few sentences, as an HF folder; `config`: tokenizer_config.json entries added
    or replaced. Returns the tokenizers.Tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens or ["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([text], trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    tokenizer_config = {
        "bos_token": "<s>",
        "eos_token": "</s>",
        "pad_token": "<pad>",
        "add_bos_token": True,
        "tokenizer_class": "PreTrainedTokenizerFast",
        **config,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return tok


def write_tiny_llama(folder: Path, seed: int = 0, family: str = "llama", **overrides) -> Path:
    """A random 2-layer Llama with the tiny tokenizer, saved as safetensors. `family="qwen2"`:
    the same as a Qwen2 (biases on Q, K and V, drawn non-zero); "qwen3_moe": a Qwen3-MoE (8
    experts, top 2 renormalised); "mixtral": a Mixtral (4 experts, top 2). The MoE routers'
    weights are scaled up so that a token's top-k experts are rarely a near tie."""
    import torch
    import transformers as tf
    from tokenizers import Tokenizer

    config_cls, model_cls = {
        "llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
        "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
        "qwen3_moe": (tf.Qwen3MoeConfig, tf.Qwen3MoeForCausalLM),
        "mixtral": (tf.MixtralConfig, tf.MixtralForCausalLM),
    }[family]
    write_tiny_tokenizer(folder)
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    cfg = dict(
        vocab_size=tok.get_vocab_size(),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=tok.token_to_id("<s>"),
        eos_token_id=tok.token_to_id("</s>"),
        pad_token_id=0,
        tie_word_embeddings=False,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
    )
    if family == "qwen3_moe":
        cfg.update(
            head_dim=16, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2,
            norm_topk_prob=True,
        )  # fmt: skip
    elif family == "mixtral":
        cfg.update(intermediate_size=48, num_local_experts=4, num_experts_per_tok=2)
    cfg.update(overrides)
    torch.manual_seed(seed)
    model = model_cls(config_cls(**cfg))
    with torch.no_grad():
        if family == "qwen2":
            for layer in model.model.layers:
                attn = layer.self_attn
                for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
                    proj.bias.normal_(0.0, 0.5)
        # Spread the logits so that greedy choices are not decided by rounding noise.
        model.lm_head.weight.mul_(8.0)
        for name, p in model.named_parameters():
            if name.endswith(".gate.weight"):  # an MoE router
                p.mul_(30.0)
    model.save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_qwen3_moe_dir(tmp_path_factory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("tiny-qwen3-moe"), family="qwen3_moe")


@pytest.fixture(scope="session")
def tiny_wide_qwen3_moe_dir(tmp_path_factory) -> Path:
    """The tiny Qwen3-MoE with experts 64 wide: wide enough for the native layout, so in CPU
    fast mode its experts and router run on the native kernels (32 are too narrow)."""
    folder = tmp_path_factory.mktemp("tiny-qwen3-moe-64")
    return write_tiny_llama(folder, family="qwen3_moe", moe_intermediate_size=64)


@pytest.fixture(scope="session")
def tiny_mixtral_dir(tmp_path_factory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("tiny-mixtral"), family="mixtral")


@pytest.fixture(scope="session")
def tiny_gpt_oss_dir(tmp_path_factory) -> Path:
    """tests/model/model_helpers.py's tiny gpt-oss (3 layers: sliding, full, sliding; sinks,
    biases, YaRN) with the tiny tokenizer, for the engine."""
    sys.path.insert(0, str(Path(__file__).parent / "model"))
    from model_helpers import write_tiny_gpt_oss

    folder = tmp_path_factory.mktemp("tiny-gpt-oss")
    hf = write_tiny_gpt_oss(folder)
    write_tiny_tokenizer(folder, vocab_size=hf.config.vocab_size)
    return folder


@pytest.fixture(scope="session")
def tinier_llama_dir(tmp_path_factory) -> Path:
    """The tiny Llama made smaller for the GPU-path tests, which run Triton's kernels under its
    interpreter (their time goes with program instances: tokens x heads, per layer): one layer,
    two query heads on one KV head (still GQA), head_dim 16. Layers of more than one are
    checked on the GPU path by the Gemma 3 of test_gpu_path and test_sliding_window_cache."""
    return write_tiny_llama(
        tmp_path_factory.mktemp("tinier-llama"),
        num_hidden_layers=1,
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=2,
        num_key_value_heads=1,
    )


# ---------------------------------------------------------------------------------------------
# A Hugging Face hub cache laid out as huggingface_hub writes it (no network in the tests):
#   models--<org>--<name>/blobs/<etag>               the file's bytes (sha256 for LFS files,
#                                                     the git blob sha1 for small text files)
#   models--<org>--<name>/snapshots/<commit>/<file>  relative links to the blobs
#   models--<org>--<name>/refs/<branch or tag>       the commit hash


def write_hub_snapshot(
    cache: Path, repo_id: str, files: dict[str, Path], refs: tuple[str, ...] = ("main",)
) -> str:
    """Add one commit of `repo_id` holding `files` (repo path -> local file); returns its hash."""
    import hashlib
    import os

    repo = cache / ("models--" + repo_id.replace("/", "--"))
    commit = hashlib.sha1(repr((repo_id, sorted(files))).encode() + os.urandom(8)).hexdigest()
    for name, source in files.items():
        data = source.read_bytes()
        if name.endswith((".safetensors", ".gguf")):
            etag = hashlib.sha256(data).hexdigest()
        else:
            etag = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        blob = repo / "blobs" / etag
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = repo / "snapshots" / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    for ref in refs:
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return commit


@dataclass
class HubCache:
    """The cache folder, and for each model laid out there, its local twin to compare with."""

    path: Path
    commits: dict[str, str] = field(default_factory=dict)  # "<repo>@<ref>" -> commit
    sources: dict[str, Path] = field(default_factory=dict)  # "<repo>@<ref>" -> local folder

    def add(self, repo_id: str, files: dict[str, Path], ref: str = "main") -> str:
        commit = write_hub_snapshot(self.path, repo_id, files, (ref,))
        self.commits[f"{repo_id}@{ref}"] = commit
        return commit

    def env(self, **extra: str) -> dict[str, str]:
        """A subprocess environment that reads this cache, offline."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
        return {**env, "HF_HUB_CACHE": str(self.path), "HF_HUB_OFFLINE": "1", **extra}


@pytest.fixture(scope="session")
def hub_cache(tmp_path_factory) -> HubCache:
    """`tiny-org/tiny-llama` (main: the tiny Llama of seed 0; tag v1: seed 1) and
    `tiny-org/no-weights` (a README only)."""
    root = tmp_path_factory.mktemp("hub")
    hub = HubCache(root / "hub")
    for ref, seed in (("main", 0), ("v1", 1)):
        folder = write_tiny_llama(root / f"llama-seed{seed}", seed=seed)
        files = {p.name: p for p in folder.iterdir() if p.is_file()}
        hub.add("tiny-org/tiny-llama", files, ref)
        hub.sources[f"tiny-org/tiny-llama@{ref}"] = folder
    readme = root / "README.md"
    readme.write_text("# no weights here\n")
    hub.add("tiny-org/no-weights", {"README.md": readme})
    return hub


QWEN3_TEMPLATE = Path(__file__).parent / "data" / "qwen3_chat_template.jinja"


def write_tiny_qwen3(folder: Path, seed: int = 0) -> Path:
    """A random 2-layer Qwen3 with a byte-level BPE tokenizer holding Qwen's chat tokens
    (`<|im_start|>`, `<|im_end|>` (EOS), `<|endoftext|>`; `<think>`/`</think>` as plain added
    tokens, as Qwen3's are) and Qwen3's chat template (thinking on unless
    `enable_thinking=false`), saved as safetensors."""
    import torch
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([TRAIN_TEXT], trainer)
    tok.add_tokens([AddedToken("<think>", special=False), AddedToken("</think>", special=False)])
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "bos_token": None,
                "eos_token": "<|im_end|>",
                "pad_token": "<|endoftext|>",
                "add_bos_token": False,
                "tokenizer_class": "Qwen2Tokenizer",
                "chat_template": QWEN3_TEMPLATE.read_text(),
            }
        )
    )
    torch.manual_seed(seed)
    config = Qwen3Config(
        vocab_size=tok.get_vocab_size(),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=2048,
        eos_token_id=tok.token_to_id("<|im_end|>"),
        pad_token_id=tok.token_to_id("<|endoftext|>"),
        tie_word_embeddings=False,
    )
    model = Qwen3ForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    model.save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="session")
def tiny_qwen3_dir(tmp_path_factory) -> Path:
    return write_tiny_qwen3(tmp_path_factory.mktemp("tiny-qwen3"))


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("tiny-qwen2"), family="qwen2")


GEMMA3_VISION_SPECIALS = [
    "<pad>",
    "<s>",
    "</s>",
    "<start_of_turn>",
    "<end_of_turn>",
    "<start_of_image>",
    "<end_of_image>",
    "<image_soft_token>",
]
TINY_IMAGE_SIZE = 32
TINY_TOKENS_PER_IMAGE = 4


def write_tiny_gemma3_vision(folder: Path, seed: int = 0):
    """A random Gemma3ForConditionalGeneration (Gemma 3 4B's layout, tiny): 2 text layers (a
    sliding one, window 5, and a global one) and a 2-layer SigLIP over 32x32 images in 8x8
    patches, 4 tokens an image; a byte-level BPE tokenizer with Gemma's turn and image tokens
    and Gemma 3's chat template. Returns the transformers model."""
    import torch
    import transformers as tf

    from girandole.tokenizer.chat_template import GEMMA_TEMPLATE

    tok = write_tiny_tokenizer(
        folder,
        special_tokens=GEMMA3_VISION_SPECIALS,
        text=TRAIN_TEXT + "\n\n\n\n\n" * 4,
        eos_token="<end_of_turn>",
        chat_template=GEMMA_TEMPLATE,
        extra_special_tokens={
            "boi_token": "<start_of_image>",
            "eoi_token": "<end_of_image>",
            "image_token": "<image_soft_token>",
        },
    )
    text = tf.Gemma3TextConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=32,
        max_position_embeddings=512,
        sliding_window=5,
        layer_types=["sliding_attention", "full_attention"],
        query_pre_attn_scalar=24,
        bos_token_id=tok.token_to_id("<s>"),
        eos_token_id=tok.token_to_id("<end_of_turn>"),
        pad_token_id=0,
    )
    vision = tf.SiglipVisionConfig(
        hidden_size=48,
        intermediate_size=80,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=TINY_IMAGE_SIZE,
        patch_size=8,
        vision_use_head=False,
    )
    config = tf.Gemma3Config(
        text_config=text,
        vision_config=vision,
        mm_tokens_per_image=TINY_TOKENS_PER_IMAGE,
        boi_token_index=tok.token_to_id("<start_of_image>"),
        eoi_token_index=tok.token_to_id("<end_of_image>"),
        image_token_index=tok.token_to_id("<image_soft_token>"),
    )
    torch.manual_seed(seed)
    model = tf.Gemma3ForConditionalGeneration(config).float().eval()
    with torch.no_grad():  # random init leaves norms and the projector at 0/identity
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
            elif "mm_input_projection" in name:
                p.normal_(0, 0.5)
        # Spread the logits so that greedy choices are not decided by rounding noise.
        model.model.language_model.embed_tokens.weight.mul_(4.0)
    model.save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(
        json.dumps(
            {
                "image_processor_type": "Gemma3ImageProcessor",
                "image_mean": [0.5, 0.5, 0.5],
                "image_std": [0.5, 0.5, 0.5],
                "rescale_factor": 1 / 255,
                "size": {"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE},
            }
        )
    )
    return model


@pytest.fixture(scope="session")
def tiny_vision(tmp_path_factory):
    """(folder, transformers model) of the tiny Gemma 3 vision checkpoint."""
    folder = tmp_path_factory.mktemp("tiny-gemma3-vision")
    return folder, write_tiny_gemma3_vision(folder)
