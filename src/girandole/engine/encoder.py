"""EncoderEngine: an encoder model (BERT, XLM-RoBERTa; bare or a cross-encoder) behind the
engine interface the embeddings and rerank routes use (engine/protocol.py).

An encoder attends both ways and keeps no KV cache, so it has none of the decoder engine's
paging, chunking or decoding: a loop thread takes every input waiting, sorts them by length,
cuts them into batches of at most `max_batch_tokens` padded tokens, runs one forward a batch,
and answers each input with one finished RequestOutput: its pooled vector (`embedding`), or for
a cross-encoder its relevance logit (`embedding == [logit]`). An input is the framed token ids
the route built (girandole.tokenizer.framing), with its token types for a pair.

Generation is refused (`max_tokens` must be 0): the routes answer completions and chat on an
embedding-only model with a 400 before they get here (api/serving/pipeline.py).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from girandole.engine.outputs import RequestOutput
from girandole.model.bert import load_encoder, read_encoder_spec
from girandole.model.config import EmbeddingModel, ModelConfig
from girandole.model.pooling_config import DEFAULT_POOLING, read_pooling_config
from girandole.sampling.params import SamplingParams
from girandole.tokenizer import load_tokenizer
from girandole.tokenizer.framing import single_frame

logger = logging.getLogger(__name__)
_ids = itertools.count()
DEFAULT_MAX_BATCH_TOKENS = 16384  # padded tokens a forward: bounds its activations
STOPPED_MESSAGE = "the model's engine was stopped before the request finished; send it again"


class EncoderStoppedError(RuntimeError):
    pass


@dataclass(eq=False)
class _Pending:
    request_id: str
    ids: list[int]
    type_ids: list[int]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    arrival: float = field(default_factory=time.monotonic)


class EncoderEngine:
    def __init__(
        self,
        path: str | Path,
        device: str | None = None,
        max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
        threads: int | None = None,
    ) -> None:
        path = Path(path)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if threads and self.device.type == "cpu":
            torch.set_num_threads(threads)
        spec = read_encoder_spec(path)
        self.spec = spec
        pooling = read_pooling_config(path) or DEFAULT_POOLING
        self._tokenizer = load_tokenizer(path)
        prefix, suffix = single_frame(self._tokenizer.hf)  # (no truncation: tokenizer/loader.py)
        self.model = load_encoder(path, self.device)
        self.max_batch_tokens = max_batch_tokens
        head_dim = spec.hidden_size // spec.num_heads
        self._config = ModelConfig(
            architecture=spec.architecture,
            vocab_size=spec.vocab_size,
            hidden_size=spec.hidden_size,
            num_layers=spec.num_layers,
            num_heads=spec.num_heads,
            num_kv_heads=spec.num_heads,
            head_dim=head_dim,
            max_position=spec.max_positions,
            bos_token_id=None,
            eos_token_ids=[],
            add_bos_token=False,
            name=path.name,
            embedding=EmbeddingModel(
                task="cross-encoder" if spec.head else "embed",
                pooling=pooling.method,
                normalize=pooling.normalize,
                prefix_ids=prefix,
                suffix_ids=suffix,
                generates=False,
            ),
        )
        self._pending: list[_Pending] = []
        self._aborted: set[str] = set()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopped = False
        self._error: BaseException | None = None
        self._busy_since: float | None = None  # a forward running since
        self.num_forwards = 0
        self.num_requests = 0
        self.forward_seconds = 0.0
        self._thread = threading.Thread(target=self._loop, name="girandole-encoder", daemon=True)
        self._thread.start()

    # -- what the API reads (engine/protocol.py) ---------------------------------------------

    @property
    def model_config(self) -> ModelConfig:
        return self._config

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    @property
    def max_model_len(self) -> int:
        return self.spec.max_positions

    def stats(self) -> dict[str, float]:
        with self._lock:
            waiting = len(self._pending)
        return {
            "num_running": 1 if self._busy_since is not None else 0,
            "num_waiting": waiting,
            "num_requests": self.num_requests,
            "num_steps": self.num_forwards,
            "step_seconds": self.forward_seconds,
        }

    def seconds_stalled(self) -> float:
        if not self._thread.is_alive():
            return float("inf")
        since = self._busy_since
        return 0.0 if since is None else max(0.0, time.monotonic() - since)

    async def compile_grammar(self, spec: Any) -> Any:
        raise ValueError(f"{self._config.name} is an embedding model: it generates no text")

    def lora_names(self) -> list[str]:
        return []

    async def load_lora(self, name: str, path: str) -> None:
        from girandole.model.lora import AdapterError

        raise AdapterError(f"{self._config.name} is an embedding model: it takes no LoRA adapters")

    def unload_lora(self, name: str) -> bool:
        return False

    # -- requests ------------------------------------------------------------------------------

    async def generate(
        self,
        prompt_token_ids: list[int],
        params: SamplingParams,
        request_id: str | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[RequestOutput]:
        """One finished output: the input's vector (or a pair's relevance logit). ValueError
        for what an encoder cannot do (generate, an input longer than its positions)."""
        if self._error is not None:
            raise RuntimeError(f"encoder loop died: {self._error!r}")
        if self._stopped:
            raise EncoderStoppedError(STOPPED_MESSAGE)
        if params.max_tokens:
            raise ValueError(f"{self._config.name} is an embedding model: it generates no text")
        ids = list(prompt_token_ids)
        self._check(ids)
        type_ids = list(kwargs.get("token_type_ids") or [0] * len(ids))
        if len(type_ids) != len(ids) or any(
            not 0 <= t < self.spec.type_vocab_size for t in type_ids
        ):
            raise ValueError("token_type_ids must give a valid type for each token")
        request_id = request_id or f"enc-{next(_ids)}"
        loop = asyncio.get_running_loop()
        pending = _Pending(request_id, ids, type_ids, loop, loop.create_future())
        with self._lock:
            self._pending.append(pending)
        self.num_requests += 1
        self._wake.set()
        try:
            vector = await pending.future
        except asyncio.CancelledError:
            self.abort(request_id)
            raise
        yield RequestOutput(
            request_id,
            [],
            "",
            finished=True,
            finish_reason="stop",
            num_prompt_tokens=len(ids),
            arrival_time=pending.arrival,
            finished_time=time.monotonic(),
            embedding=vector,
        )

    def _check(self, ids: list[int]) -> None:
        if not ids:
            raise ValueError("the input is empty")
        if len(ids) > self.spec.max_positions:
            raise ValueError(
                f"the input is too long: {len(ids)} tokens, the model reads at most"
                f" {self.spec.max_positions}"
            )
        if max(ids) >= self.spec.vocab_size or min(ids) < 0:
            raise ValueError(f"token ids must be in [0, {self.spec.vocab_size})")

    def abort(self, request_id: str) -> None:
        with self._lock:
            kept = [p for p in self._pending if p.request_id != request_id]
            if len(kept) == len(self._pending):
                self._aborted.add(request_id)  # in a forward now: its answer is dropped
            self._pending = kept

    def shutdown(self, timeout: float = 5.0) -> None:
        self._stopped = True
        self._wake.set()
        self._thread.join(timeout)
        with self._lock:
            left, self._pending = self._pending, []
        for p in left:
            _resolve(p, EncoderStoppedError(STOPPED_MESSAGE))

    # -- the loop ------------------------------------------------------------------------------

    def _loop(self) -> None:
        with torch.inference_mode():
            while not self._stopped:
                self._wake.wait(0.5)
                self._wake.clear()
                with self._lock:
                    work, self._pending = self._pending, []
                    self._aborted.clear()
                if not work:
                    continue
                for batch in self._batches(work):
                    self._busy_since = time.monotonic()
                    try:
                        results: list[Any] = self._forward(batch)
                    except Exception as exc:  # noqa: BLE001 - fails this batch, not the loop
                        logger.exception("encoder forward failed")
                        results = [RuntimeError(f"encoder forward failed: {exc}")] * len(batch)
                    self.forward_seconds += time.monotonic() - self._busy_since
                    self._busy_since = None
                    self.num_forwards += 1
                    for p, result in zip(batch, results):
                        if p.request_id not in self._aborted:
                            _resolve(p, result)

    def _batches(self, work: list[_Pending]) -> list[list[_Pending]]:
        """Inputs of similar length together (little padding), each batch's padded size at
        most max_batch_tokens (one input alone may reach it)."""
        work.sort(key=lambda p: len(p.ids))
        batches: list[list[_Pending]] = []
        for p in work:
            if batches and len(p.ids) * (len(batches[-1]) + 1) <= self.max_batch_tokens:
                batches[-1].append(p)
            else:
                batches.append([p])
        return batches

    def _forward(self, batch: list[_Pending]) -> list[list[float]]:
        width = max(len(p.ids) for p in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        types = torch.zeros(len(batch), width, dtype=torch.long)
        for row, p in enumerate(batch):
            ids[row, : len(p.ids)] = torch.tensor(p.ids)
            types[row, : len(p.ids)] = torch.tensor(p.type_ids)
        lengths = torch.tensor([len(p.ids) for p in batch])
        ids, types, lengths = ids.to(self.device), types.to(self.device), lengths.to(self.device)
        hidden = self.model(ids, types, lengths)  # [batch, width, hidden]
        if self.spec.head is not None:
            return self.model.classify(hidden).float().cpu().tolist()
        return pool(hidden, lengths, self._config.embedding.pooling).float().cpu().tolist()


def pool(hidden: torch.Tensor, lengths: torch.Tensor, method: str) -> torch.Tensor:
    """[batch, hidden] vectors of right-padded states: the first token's (CLS), the last
    real token's, or the mean over real tokens (special tokens included, as
    sentence-transformers averages every token its attention mask keeps)."""
    if method == "cls":
        return hidden[:, 0]
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    if method == "last":
        return hidden[rows, lengths - 1]
    mask = (torch.arange(hidden.shape[1], device=hidden.device)[None] < lengths[:, None]).float()
    return (hidden * mask[..., None]).sum(1) / lengths[:, None].float()


def _resolve(p: _Pending, result: Any) -> None:
    def set_result() -> None:
        if p.future.done():
            return
        if isinstance(result, BaseException):
            p.future.set_exception(result)
        else:
            p.future.set_result(result)

    try:
        p.loop.call_soon_threadsafe(set_result)
    except RuntimeError:  # the caller's loop is closed
        pass


def is_encoder_model(path: Path) -> bool:
    from girandole.model.bert import encoder_architecture

    return path.is_dir() and encoder_architecture(path) is not None
