"""GGUF files other than Gemma (tiny ones written by the tests): a Qwen-style byte-level BPE
(`tokenizer.ggml.model='gpt2'`) and a Llama-style sentencepiece vocabulary ('llama')."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from girandole.tokenizer import IncrementalDetokenizer
from girandole.tokenizer.gguf_convert import _auto_tokenizer_class, convert_gguf
from girandole.tokenizer.loader import load_gguf_tokenizer

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")  # the reference (and today's converter)

CORPUS = [
    "Once upon a time there was a small engine that served many requests at once.",
    "def main():\n    return 42\n",
    "The quick brown fox jumps over the lazy dog. 0123456789",
] * 8
TEXTS = [
    "Once upon a time",
    "  two spaces, a tab\tand\nnewlines\n\n",
    "héllo wörld — 你好 🌁",
    "<|im_start|>user\nhi<|im_end|>\n",
    "<s>[INST] hello [/INST]",
]
CONTROL, NORMAL, BYTE = 3, 1, 6


def _finish(w) -> None:
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def write_qwen_gguf(path: Path) -> None:
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer)
    spec = json.loads(tok.to_str())
    tokens = [t for t, _ in sorted(spec["model"]["vocab"].items(), key=lambda kv: kv[1])]
    w = gguf.GGUFWriter(str(path), "qwen2")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types([CONTROL if t in specials else NORMAL for t in tokens])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]])
    w.add_eos_token_id(tokens.index("<|endoftext|>"))
    w.add_bos_token_id(tokens.index("<|endoftext|>"))
    w.add_add_bos_token(False)
    w.add_chat_template(
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    )
    _finish(w)


def write_llama_gguf(path: Path) -> None:
    tok = HFTokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"])
    tok.train_from_iterator(CORPUS, trainer)
    vocab = json.loads(tok.to_str())["model"]["vocab"]
    learned = [
        t
        for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])
        if t not in ("<unk>", "<s>", "</s>")
    ]
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *learned]
    types = [2, CONTROL, CONTROL, *([BYTE] * 256), *([NORMAL] * len(learned))]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores([0.0, 0.0, 0.0, *([0.0] * 256), *(-float(i) for i in range(len(learned)))])
    w.add_token_types(types)
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(True)
    _finish(w)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-gguf")
    write_qwen_gguf(folder / "tiny-qwen.gguf")
    write_llama_gguf(folder / "tiny-llama.gguf")
    return folder


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GIRANDOLE_CACHE_DIR", str(tmp_path))
    return tmp_path


@pytest.mark.parametrize("name", ["tiny-qwen.gguf", "tiny-llama.gguf"])
def test_matches_transformers(files, cache, name):
    tok = load_gguf_tokenizer(files / name)
    ref = transformers.AutoTokenizer.from_pretrained(str(files), gguf_file=name)
    for text in TEXTS:
        ids = tok.encode(text, add_bos=False)
        assert ids == ref(text, add_special_tokens=False).input_ids, text
        assert tok.decode(ids) == ref.decode(ids, skip_special_tokens=True)
        det = IncrementalDetokenizer(tok)
        assert "".join(det.add([i]) for i in ids) + det.flush() == tok.decode(ids)
    # the whole tokenizer.json is transformers' (its class picked without parsing the file)
    converted, _ = convert_gguf(files / name)
    assert json.loads(converted.to_str()) == json.loads(ref.backend_tokenizer.to_str())
    # the cached copy gives the same tokenizer
    again = load_gguf_tokenizer(files / name)
    assert json.loads(again.hf.to_str()) == json.loads(tok.hf.to_str())
    assert again.meta == tok.meta


def test_qwen_metadata(files, cache):
    tok = load_gguf_tokenizer(files / "tiny-qwen.gguf")
    eot, im_end = tok.token_to_id("<|endoftext|>"), tok.token_to_id("<|im_end|>")
    assert tok.add_bos is False and tok.eos_token_id == eot
    assert tok.stop_token_ids == [eot, im_end]  # <|im_end|> ends generation, as in llama.cpp
    assert tok.chat_template.startswith("{% for m in messages %}")
    assert tok.encode("hi") == tok.encode("hi", add_bos=False)
    text = "héllo 🌁"
    ids = tok.encode(text)
    assert b"".join(tok.token_bytes(i) for i in ids) == text.encode()


def test_llama_metadata(files, cache):
    tok = load_gguf_tokenizer(files / "tiny-llama.gguf")
    assert (tok.bos_token_id, tok.eos_token_id, tok.add_bos) == (1, 2, True)
    assert tok.stop_token_ids == [2]
    assert tok.encode("Once upon")[0] == 1
    assert tok.token_bytes(tok.token_to_id("<0xE4>")) == b"\xe4"


def test_the_tokenizer_class_is_known_without_parsing_the_file():
    """AutoTokenizer parses a whole GGUF with gguf's reader for the model type alone (~10 s of a
    first start for a 150k-token vocabulary); convert_gguf names the class it would pick."""
    assert _auto_tokenizer_class("qwen2", None).__name__ == "Qwen2Tokenizer"
    assert _auto_tokenizer_class("qwen3moe", None).__name__ == "Qwen2Tokenizer"
    assert _auto_tokenizer_class("llama", "Llama 3.2 1B").__name__ == "TokenizersBackend"
    assert _auto_tokenizer_class("llama", "Mistral 7B") is None  # AutoTokenizer's own way
