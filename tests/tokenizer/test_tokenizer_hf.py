"""Hugging Face folders: byte-level BPE (Llama 3 / Qwen style) and sentencepiece-style BPE
(Llama 2 style, byte fallback, prefix space), built by the tests."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from girandole.tokenizer import IncrementalDetokenizer, load_tokenizer

CORPUS = [
    "Once upon a time there was a small engine that served many requests at once.",
    "def main():\n    return 42\n",
    "The quick brown fox jumps over the lazy dog. 0123456789",
] * 8
UNICODE_TEXT = "héllo wörld — 你好 🌁 done"


def _byte_level(folder: Path, specials: list[str], post_bos: str | None) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer)
    if post_bos is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{post_bos} $A", special_tokens=[(post_bos, tok.token_to_id(post_bos))]
        )
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    return tok


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("qwen-like")
    tok = _byte_level(folder, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], None)
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "bos_token": None,
                "eos_token": "<|im_end|>",
                "pad_token": "<|endoftext|>",
                "chat_template": "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}",
            }
        )
    )
    (folder / "generation_config.json").write_text(
        json.dumps(
            {"eos_token_id": [tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")]}
        )
    )
    return folder


@pytest.fixture(scope="module")
def llama3_dir(tmp_path_factory) -> Path:
    """No add_bos_token flag: BOS comes from the post-processor, as in Llama 3's folders."""
    folder = tmp_path_factory.mktemp("llama3-like")
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<|start_header_id|>"]
    _byte_level(folder, specials, "<|begin_of_text|>")
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"})
    )
    (folder / "chat_template.jinja").write_text("{{ bos_token }}{{ messages[0].content }}")
    return folder


@pytest.fixture(scope="module")
def spm_dir(tmp_path_factory) -> Path:
    """Llama 2 style: BPE with byte fallback, '▁' metaspace with a prefix space, Strip decoder."""
    folder = tmp_path_factory.mktemp("spm-like")
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"])
    tok.train_from_iterator(CORPUS, trainer)
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    tok = Tokenizer.from_str(json.dumps(spec))
    tok.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in ("<unk>", "<s>", "</s>")]
    )
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True})
    )
    return folder


def _stream(tok, ids, prompt=None) -> str:
    det = IncrementalDetokenizer(tok, prompt)
    return "".join(det.add([i]) for i in ids) + det.flush()


def test_tiny_llama_folder(tiny_llama_dir):
    """The folder the engine tests use (byte-level BPE, <s>/</s>, add_bos_token)."""
    tok = load_tokenizer(tiny_llama_dir)
    bos, eos = tok.token_to_id("<s>"), tok.token_to_id("</s>")
    assert (tok.bos_token_id, tok.eos_token_id, tok.add_bos) == (bos, eos, True)
    assert tok.stop_token_ids == [eos]
    ids = tok.encode("Once upon a time")
    assert ids[0] == bos and ids.count(bos) == 1
    assert tok.encode("<s>Once upon a time") == ids
    assert tok.decode(ids) == "Once upon a time"
    assert tok.is_special(bos) and not tok.is_special(ids[1])


def test_byte_level_bytes_and_detok(qwen_dir):
    tok = load_tokenizer(qwen_dir)
    ids = tok.encode(UNICODE_TEXT)
    assert b"".join(tok.token_bytes(i) for i in ids) == UNICODE_TEXT.encode()
    partial = [i for i in ids if tok.token_str(i).startswith("bytes:")]
    assert partial  # the tiny vocabulary splits non-ASCII characters into bytes
    assert all(
        tok.token_str(i) == "bytes:" + "".join(f"\\x{b:02x}" for b in tok.token_bytes(i))
        for i in partial
    )
    assert _stream(tok, ids) == tok.decode(ids) == UNICODE_TEXT
    prompt = tok.encode("Once upon a time")
    assert _stream(tok, ids, prompt) == UNICODE_TEXT


def test_qwen_like_metadata(qwen_dir):
    tok = load_tokenizer(qwen_dir)
    im_end, eot = tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")
    assert tok.bos_token_id is None and tok.add_bos is False
    assert tok.eos_token_id == im_end
    assert tok.stop_token_ids == [im_end, eot]
    assert tok.chat_template.startswith("{% for m in messages %}")
    ids = tok.encode("<|im_start|>user\nhi<|im_end|>\n")
    assert ids[0] == tok.token_to_id("<|im_start|>") and im_end in ids
    assert tok.decode(ids) == "user\nhi\n"
    assert tok.token_bytes(im_end) == b"<|im_end|>"


def test_llama3_like_bos_from_post_processor(llama3_dir):
    tok = load_tokenizer(llama3_dir / "tokenizer.json")  # the file itself is accepted too
    bos = tok.token_to_id("<|begin_of_text|>")
    assert tok.add_bos is True and tok.bos_token_id == bos
    assert tok.encode("hello")[0] == bos
    assert tok.encode("<|begin_of_text|>hello") == tok.encode("hello")
    eot, end = tok.token_to_id("<|eot_id|>"), tok.token_to_id("<|end_of_text|>")
    assert tok.stop_token_ids == [eot, end]
    assert tok.chat_template == "{{ bos_token }}{{ messages[0].content }}"


def test_sentencepiece_style_folder(spm_dir):
    tok = load_tokenizer(spm_dir)
    text = "Once upon a time — 你好 🌁"
    ids = tok.encode(text)
    assert ids[0] == tok.bos_token_id == tok.token_to_id("<s>")
    assert tok.decode(ids) == text
    body = ids[1:]
    # the prefix space is in the first piece's bytes ('▁Once'); the decoder strips it
    assert b"".join(tok.token_bytes(i) for i in body) == b" " + text.encode()
    assert tok.token_bytes(tok.token_to_id("<0xE4>")) == b"\xe4"
    assert tok.token_str(tok.token_to_id("<0xE4>")) == "bytes:\\xe4"
    assert _stream(tok, body) == text
    prompt = tok.encode("The quick brown fox")
    assert _stream(tok, body, prompt) == tok.decode(prompt + body)[len(tok.decode(prompt)) :]


def test_cache_write_is_atomic_under_races(tmp_path, qwen_dir):
    """Many writers of one cache entry: every reader sees a whole entry, no temp folders stay."""
    import threading

    from girandole.tokenizer.loader import _read_cached, _write_cache

    tok = load_tokenizer(qwen_dir)
    entry = tmp_path / "tokenizers" / "v1-x"
    errors = []

    def write():
        try:
            _write_cache(entry, tok.hf, tok.meta)
            assert _read_cached(entry) is not None
        except Exception as exc:  # noqa: BLE001 - collected for the assert below
            errors.append(exc)

    threads = [threading.Thread(target=write) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    hf, meta = _read_cached(entry)
    assert meta == tok.meta and hf.get_vocab_size() == tok.vocab_size
    assert sorted(p.name for p in entry.parent.iterdir()) == ["v1-x"]


def test_config_files_that_are_not_objects(tmp_path, qwen_dir):
    """A tokenizer_config.json that is not a JSON object is an error naming it; a bad
    generation_config.json is ignored (the model loader warns of it), the tokenizer loads."""
    import shutil

    bad_gen = tmp_path / "gen"
    shutil.copytree(qwen_dir, bad_gen)
    (bad_gen / "generation_config.json").write_text("[1, 2]")
    tok = load_tokenizer(str(bad_gen))
    assert tok.encode("Once upon a time") == load_tokenizer(str(qwen_dir)).encode(
        "Once upon a time"
    )
    for content in ("[1, 2]", "{not json"):
        bad = tmp_path / f"config-{len(content)}"
        shutil.copytree(qwen_dir, bad)
        (bad / "tokenizer_config.json").write_text(content)
        with pytest.raises(ValueError, match="tokenizer_config.json"):
            load_tokenizer(str(bad))
