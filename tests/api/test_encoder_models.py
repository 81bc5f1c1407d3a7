"""Embedding and reranker models, served as a server's own model and on deployments: tiny random
BERT (sentence-transformers CLS pooling + Normalize), XLM-RoBERTa (no sentence-transformers
files: mean pooling, not normalised) and a BERT cross-encoder, each written here with a WordPiece
tokenizer; their vectors and scores through the real server (openai client, httpx) against
transformers' own forward pooled as sentence-transformers pools it."""

from __future__ import annotations

import json
import math
from pathlib import Path

import httpx
import openai
import pytest
import torch
from api_helpers import API_KEY, ROOT, api_conftest


def _root_conftest():
    import importlib.util
    import sys

    name = "_girandole_root_conftest"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "tests/conftest.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


TRAIN_TEXT = _root_conftest().TRAIN_TEXT
ACCOUNT = "fireworks"
OWN = f"accounts/{ACCOUNT}/models/tiny-bert"
XLMR = f"accounts/{ACCOUNT}/models/tiny-xlmr"
RERANKER = f"accounts/{ACCOUNT}/models/tiny-reranker"
QWEN3_EMBEDDING = f"accounts/{ACCOUNT}/models/tiny-qwen3-embedding"
QWEN3_RERANKER = f"accounts/{ACCOUNT}/models/tiny-qwen3-reranker"
MAX_POSITIONS = 48
TEXTS = ["the quick brown fox", "a small engine served many requests", "def main return 42"]
QUERY = "which engine served requests"
DOCS = ["the quick brown fox jumps", "a small engine served many requests at once", "0123456789"]


def write_wordpiece(folder: Path, specials: list[str], single: str, pair: str) -> None:
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )

    unk = next(s for s in specials if "unk" in s.lower())
    tok = Tokenizer(models.WordPiece(unk_token=unk))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(
        [TRAIN_TEXT], trainers.WordPieceTrainer(vocab_size=200, special_tokens=specials)
    )
    ids = [(s, tok.token_to_id(s)) for s in specials]
    tok.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=ids)
    tok.enable_truncation(24)  # as all-MiniLM's tokenizer.json: the server must not cut inputs
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "BertTokenizer"}))


def write_bert(folder: Path, kind: str) -> Path:
    """kind: "bert" (BertModel, CLS + Normalize), "xlmr" (XLMRobertaModel, no modules.json),
    "reranker" (BertForSequenceClassification, one label)."""
    import transformers as tf

    if kind == "xlmr":
        write_wordpiece(
            folder, ["<s>", "<pad>", "</s>", "<unk>"], "<s> $A </s>", "<s> $A </s> </s> $B </s>"
        )
        config = tf.XLMRobertaConfig(pad_token_id=1, type_vocab_size=1)
    else:
        write_wordpiece(
            folder,
            ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"],
            "[CLS] $A [SEP]",
            "[CLS] $A [SEP] $B:1 [SEP]:1",
        )
        config = tf.BertConfig(num_labels=1) if kind == "reranker" else tf.BertConfig()
    for key, value in dict(
        vocab_size=200,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=MAX_POSITIONS + (2 if kind == "xlmr" else 0),
        initializer_range=0.2,  # 0.02 makes every input's states nearly alike
    ).items():
        setattr(config, key, value)
    model_cls = {
        "bert": tf.BertModel,
        "xlmr": tf.XLMRobertaModel,
        "reranker": tf.BertForSequenceClassification,
    }[kind]
    torch.manual_seed(len(kind))
    model = model_cls(config)
    if kind == "reranker":
        with torch.no_grad():  # spread the scores (a random head gives logits near 0)
            model.classifier.weight.mul_(4.0)
    model.save_pretrained(folder, safe_serialization=True)
    if kind == "bert":
        write_sentence_transformers(folder, "pooling_mode_cls_token")
    return folder


def write_qwen3_embedding(folder: Path) -> Path:
    """The tiny Qwen3 as Qwen3-Embedding ships: its tokenizer appends <|endoftext|>, and its
    sentence-transformers files say last-token pooling and Normalize."""
    from tokenizers import Tokenizer, processors

    _root_conftest().write_tiny_qwen3(folder)
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    end = ("<|endoftext|>", tok.token_to_id("<|endoftext|>"))
    tok.post_processor = processors.TemplateProcessing(
        single="$A <|endoftext|>",
        pair="$A <|endoftext|> $B:1 <|endoftext|>:1",
        special_tokens=[end],
    )
    tok.save(str(folder / "tokenizer.json"))
    write_sentence_transformers(folder, "pooling_mode_lasttoken")
    return folder


def write_qwen3_reranker(folder: Path) -> Path:
    """The tiny Qwen3 in a folder named as Qwen3-Reranker's repo, with "yes" and "no" single
    tokens (as in Qwen's vocabulary) whose LM-head rows are drawn anew."""
    from tokenizers import AddedToken, Tokenizer
    from transformers import Qwen3ForCausalLM

    _root_conftest().write_tiny_qwen3(folder)
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tok.add_tokens([AddedToken("yes", special=False), AddedToken("no", special=False)])
    tok.save(str(folder / "tokenizer.json"))
    model = Qwen3ForCausalLM.from_pretrained(folder)
    model.resize_token_embeddings(tok.get_vocab_size())
    torch.manual_seed(3)
    with torch.no_grad():
        for word in ("yes", "no"):
            model.lm_head.weight[tok.token_to_id(word)].normal_(0.0, 1.0)
            model.model.embed_tokens.weight[tok.token_to_id(word)].normal_(0.0, 0.02)
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def write_sentence_transformers(folder: Path, mode: str) -> None:
    """modules.json (Transformer, Pooling by `mode`, Normalize) and 1_Pooling/config.json."""
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ]  # fmt: skip
    (folder / "modules.json").write_text(json.dumps(modules))
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(
        json.dumps({"pooling_mode_cls_token": False, "pooling_mode_mean_tokens": False, mode: True})
    )


def reference(folder: Path, kind: str, texts: list, pooling: str = "mean", normalize=False):
    """transformers' forward of each text (or pair), pooled as sentence-transformers pools."""
    import transformers as tf
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    cls = {"bert": tf.BertModel, "xlmr": tf.XLMRobertaModel}.get(
        kind, tf.BertForSequenceClassification
    )
    model = cls.from_pretrained(folder).eval()
    out = []
    for text in texts:
        enc = tok.encode(*text) if isinstance(text, tuple) else tok.encode(text)
        with torch.no_grad():
            result = model(
                input_ids=torch.tensor([enc.ids]), token_type_ids=torch.tensor([enc.type_ids])
            )
        if kind == "reranker":
            out.append(torch.sigmoid(result.logits[0, 0]).item())
            continue
        states = result.last_hidden_state[0]
        vector = states[0] if pooling == "cls" else states.mean(0)
        if normalize:
            vector = vector / vector.norm()
        out.append(vector.tolist())
    return out


def close(a: list[float], b: list[float], tol: float = 1e-4) -> bool:
    return len(a) == len(b) and max(abs(x - y) for x, y in zip(a, b)) <= tol


class Served:
    def __init__(self, tmp: Path) -> None:
        from girandole.registry.keystore import Database
        from girandole.registry.models import ModelCatalog

        self.dirs = {kind: write_bert(tmp / kind, kind) for kind in ("bert", "xlmr", "reranker")}
        data = tmp / "data"
        db = Database.in_folder(data)
        catalog = ModelCatalog(db, [])
        catalog.add(XLMR, str(self.dirs["xlmr"]))
        catalog.add(RERANKER, str(self.dirs["reranker"]))
        self.dirs["qwen3"] = write_qwen3_embedding(tmp / "qwen3-embedding")
        catalog.add(QWEN3_EMBEDDING, str(self.dirs["qwen3"]))
        self.dirs["qwen3-reranker"] = write_qwen3_reranker(tmp / "Qwen3-Reranker-tiny")
        catalog.add(QWEN3_RERANKER, str(self.dirs["qwen3-reranker"]))
        db.close()
        self.server = api_conftest().start_server(
            tmp, "--model", str(self.dirs["bert"]), "--model-id", "tiny-bert",
            "--data-dir", str(data), "--api-key", API_KEY, "--kv-cache-gb", "0.02",
            api_key=API_KEY,
        )  # fmt: skip
        self.client = openai.OpenAI(
            api_key=API_KEY, base_url=self.server.url + "/inference/v1", max_retries=0
        )

    def post(self, path: str, body: dict) -> httpx.Response:
        return httpx.post(
            self.server.url + path, json=body, headers=self.server.headers, timeout=60
        )

    def deploy(self, deployment_id: str, model: str) -> None:
        r = self.post(
            f"/v1/accounts/{ACCOUNT}/deployments?deploymentId={deployment_id}",
            {"baseModel": model},
        )
        assert r.status_code == 200, r.text
        url = f"{self.server.url}/v1/accounts/{ACCOUNT}/deployments/{deployment_id}"
        for _ in range(600):
            d = httpx.get(url, headers=self.server.headers, timeout=10).json()
            assert d["state"] != "FAILED", d
            if d["state"] == "READY" and d["replicaCount"] == 1:
                return
            __import__("time").sleep(0.1)
        raise AssertionError(f"deployment {deployment_id} not ready: {d}")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    s = Served(tmp_path_factory.mktemp("encoders"))
    try:
        s.deploy("xlmr", XLMR)
        s.deploy("reranker", RERANKER)
        s.deploy("qwen3-embedding", QWEN3_EMBEDDING)
        s.deploy("qwen3-reranker", QWEN3_RERANKER)
        yield s
    finally:
        api_conftest().stop_server(s.server)


def test_bert_embeddings_equal_transformers_cls_pooled_and_normalised(served):
    expected = reference(served.dirs["bert"], "bert", TEXTS, "cls", normalize=True)
    floats = served.client.embeddings.create(model=OWN, input=TEXTS, encoding_format="float")
    assert [d.index for d in floats.data] == [0, 1, 2]
    for got, want in zip(floats.data, expected):
        assert close(got.embedding, want)
    assert abs(math.hypot(*floats.data[0].embedding) - 1) < 1e-5  # its Normalize module
    # the SDK's base64, one input at a time (another batch): the same vectors
    for text, want in zip(TEXTS, expected):
        assert close(served.client.embeddings.create(model=OWN, input=text).data[0].embedding, want)
    # usage counts the special tokens the model reads
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(served.dirs["bert"] / "tokenizer.json"))
    assert floats.usage.prompt_tokens == sum(len(tok.encode(t).ids) for t in TEXTS)


def test_dimensions_and_normalize_false(served):
    raw = reference(served.dirs["bert"], "bert", TEXTS[:1], "cls")[0]
    got = served.post("/v1/embeddings", {"model": OWN, "input": TEXTS[0], "normalize": False})
    assert got.status_code == 200, got.text
    assert close(got.json()["data"][0]["embedding"], raw)
    cut = served.client.embeddings.create(model=OWN, input=TEXTS[0], dimensions=8)
    want = torch.nn.functional.normalize(torch.tensor(raw[:8]), dim=0).tolist()
    assert close(cut.data[0].embedding, want)


def test_xlm_roberta_deployment_mean_pooled_not_normalised(served):
    expected = reference(served.dirs["xlmr"], "xlmr", TEXTS)
    got = served.client.embeddings.create(model=XLMR, input=TEXTS, encoding_format="float")
    for a, b in zip(got.data, expected):
        assert close(a.embedding, b)
    assert abs(math.hypot(*got.data[0].embedding) - 1) > 0.01


def test_token_ids_are_framed_as_text_is(served):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(served.dirs["bert"] / "tokenizer.json"))
    plain = tok.encode(TEXTS[1], add_special_tokens=False).ids
    framed = tok.encode(TEXTS[1]).ids
    by_text = served.client.embeddings.create(model=OWN, input=TEXTS[1], encoding_format="float")
    for ids in (plain, framed):
        by_ids = served.client.embeddings.create(model=OWN, input=ids, encoding_format="float")
        assert close(by_ids.data[0].embedding, by_text.data[0].embedding, 1e-6)


def test_cross_encoder_rerank_equals_transformers(served):
    expected = reference(served.dirs["reranker"], "reranker", [(QUERY, d) for d in DOCS])
    r = served.post("/v1/rerank", {"model": RERANKER, "query": QUERY, "documents": DOCS})
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    # The scores differ (the order means something). The tiny vocabulary is trained afresh, and
    # the trainer breaks frequency ties differently from process to process, so the scores are
    # not the same in every run; two may be close, hence the order is checked up to 2e-5.
    assert max(expected) - min(expected) > 1e-3, expected
    assert sorted(d["index"] for d in data) == list(range(len(DOCS)))
    for a, b in zip(data, data[1:]):
        assert expected[a["index"]] >= expected[b["index"]] - 2e-5, (data, expected)
    for d in data:
        assert abs(d["relevance_score"] - expected[d["index"]]) < 1e-5
        assert d["document"] == DOCS[d["index"]]
    cohere = served.post(
        "/v2/rerank", {"model": RERANKER, "query": QUERY, "documents": DOCS, "top_n": 1}
    ).json()
    assert len(cohere["results"]) == 1
    assert expected[cohere["results"][0]["index"]] >= max(expected) - 2e-5


def test_models_list_embedding_kind(served):
    listed = {m.id: m for m in served.client.models.list().data}
    for name in (OWN, XLMR, RERANKER):
        entry = listed[name].model_dump()
        assert entry["kind"] == "EMBEDDING_MODEL" and entry["supports_chat"] is False, entry
        assert entry["context_length"] == MAX_POSITIONS


@pytest.mark.parametrize(
    "path, body, field, words",
    [
        ("/v1/completions", {"model": OWN, "prompt": "hi"}, "model", "embedding-only"),
        (
            "/v1/chat/completions",
            {"model": XLMR, "messages": [{"role": "user", "content": "hi"}]},
            "model",
            "embedding-only",
        ),
        ("/v1/embeddings", {"model": OWN, "input": "fox " * MAX_POSITIONS}, "input", "at most 48"),
        ("/v1/embeddings", {"model": RERANKER, "input": "fox"}, "model", "/v1/rerank"),
        ("/v1/rerank", {"model": OWN, "query": "q", "documents": ["d"]}, "model", "reranker"),
        (
            "/v1/rerank",
            {"model": RERANKER, "query": "fox", "documents": ["ok", "fox " * MAX_POSITIONS]},
            "documents",
            "documents[1]",
        ),
        ("/v1/embeddings", {"model": OWN, "input": [[5, 99999]]}, "input", "out of range"),
    ],
)
def test_bad_input_is_400(served, path, body, field, words):
    r = served.post(path, body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert words in error["message"], error
    assert error.get("param", field) == field, error


def test_longest_input_fits(served):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(served.dirs["bert"] / "tokenizer.json"))
    word = tok.token_to_id("fox")
    ids = [word] * (MAX_POSITIONS - 2)  # with [CLS] and [SEP]: every position
    r = served.post("/v1/embeddings", {"model": OWN, "input": ids})
    assert r.status_code == 200, r.text
    r = served.post("/v1/embeddings", {"model": OWN, "input": [*ids, word]})
    assert r.status_code == 400, r.text


def test_qwen3_embedding_last_token_pooled_on_the_decoder_engine(served):
    """Qwen3-Embedding runs on the decoder engine (int8 linears and bf16 activations on CPU: a
    cosine tolerance), pooled at its appended <|endoftext|> and normalised, as its
    sentence-transformers config says; it still generates."""
    from tokenizers import Tokenizer
    from transformers import Qwen3Model

    folder = served.dirs["qwen3"]
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    model = Qwen3Model.from_pretrained(folder).eval()
    got = served.client.embeddings.create(
        model=QWEN3_EMBEDDING, input=TEXTS, encoding_format="float"
    )
    for text, item in zip(TEXTS, got.data):
        with torch.no_grad():
            states = model(input_ids=torch.tensor([tok.encode(text).ids])).last_hidden_state[0]
        want = torch.nn.functional.normalize(states[-1], dim=0)
        mean = torch.nn.functional.normalize(states.mean(0), dim=0)
        vector = torch.tensor(item.embedding)
        assert abs(vector.norm().item() - 1) < 1e-5
        assert torch.dot(vector, want).item() > 0.999, torch.dot(vector, want)
        assert torch.dot(vector, mean).item() < 0.99  # not the plain LLM's mean
    assert got.usage.prompt_tokens == sum(len(tok.encode(t).ids) for t in TEXTS)
    done = served.client.completions.create(model=QWEN3_EMBEDDING, prompt="the", max_tokens=2)
    assert done.usage.completion_tokens == 2


def test_qwen3_reranker_scores_yes_against_no(served):
    """Qwen3-Reranker's score is the model card's: softmax over (no, yes) at the last position
    of its prompt, against transformers on the same tokens (the CPU's int8 path: 0.02)."""
    from tokenizers import Tokenizer
    from transformers import Qwen3ForCausalLM

    folder = served.dirs["qwen3-reranker"]
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    model = Qwen3ForCausalLM.from_pretrained(folder).eval()
    task = "Given a web search query, retrieve relevant passages that answer the query"
    prefix = (
        "<|im_start|>system\nJudge whether the Document meets the requirements based on the"
        ' Query and the Instruct provided. Note that the answer can only be "yes" or "no".'
        "<|im_end|>\n<|im_start|>user\n"
    )
    suffix = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    expected = []
    for doc in DOCS:
        body = f"<Instruct>: {task}\n<Query>: {QUERY}\n<Document>: {doc}"
        ids = [tok.encode(x, add_special_tokens=False).ids for x in (prefix, body, suffix)]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([sum(ids, [])])).logits[0, -1]
        pair = logits[[tok.token_to_id("no"), tok.token_to_id("yes")]]
        expected.append(torch.softmax(pair, 0)[1].item())
    r = served.post("/v1/rerank", {"model": QWEN3_RERANKER, "query": QUERY, "documents": DOCS})
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    assert min(abs(a - b) for a in expected for b in expected if a != b) > 0.03, expected
    assert [d["index"] for d in data] == sorted(range(len(DOCS)), key=lambda i: -expected[i])
    for d in data:
        assert abs(d["relevance_score"] - expected[d["index"]]) < 0.02, (d, expected)
