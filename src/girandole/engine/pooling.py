"""Pooling: a request that returns one vector for its prompt instead of generated tokens.

A pooling request is a prefill-only sequence (max_tokens 0). The scheduler batches its prompt
chunks with generation rows under the same token budget; the runner hands each chunk's final
hidden states (after the model's final norm) to `accumulate`, and the finished request reports
`pooled(seq)` as its `RequestOutput.embedding`.

Methods:
- "mean" (the default): the mean of every prompt position's hidden state, BOS included. A
  decoder-only base model is not trained to put a summary into its last position (that position
  predicts the next token); the mean keeps what every token contributed, and does not change
  much when a text gains a word at its end. SGPT and LLM2Vec chose mean pooling for causal
  models not tuned for embeddings. Leaving BOS out (its state is the same for every input)
  ranked no better on the labelled set of tests/api/test_rerank.py.
- "last": the last prompt position, for models trained to embed there (Qwen3-Embedding,
  e5-mistral: their prompt ends with an end-of-text token).

The engine keeps pooling sequences out of the prefix cache: a cached prefix has no hidden states
to pool, and an embedding input is rarely a later prompt's prefix, so its blocks go back to the
front of the free queue instead of evicting cached prefixes of generation requests.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch

if TYPE_CHECKING:
    from girandole.engine.sequence import Sequence

# "cls" (the first position) is an encoder's (engine/encoder.py): the decoder engine refuses it
PoolingMethod = Literal["mean", "last", "cls"]


@dataclass(frozen=True)
class PoolingParams:
    method: PoolingMethod = "mean"

    def validate(self, max_tokens: int) -> None:
        if max_tokens:
            raise ValueError("a pooling request generates nothing: max_tokens must be 0")
        if self.method not in ("mean", "last"):
            raise ValueError(f"unknown pooling method {self.method!r}: 'mean' or 'last'")


@dataclass
class PoolingState:
    """The running sum over the positions seen so far (float32 [hidden]), or the last one."""

    total: torch.Tensor | None = None
    count: int = 0


def accumulate(seq: Sequence, start: int, hidden: torch.Tensor) -> None:
    """Add this step's final hidden states [n, hidden] of `seq` (prompt positions start ..
    start + n - 1). A chunk at position 0 starts over: a preempted sequence is recomputed."""
    params: PoolingParams = seq.pooling
    if start == 0 or seq.pooling_state is None:
        seq.pooling_state = PoolingState()
    state: PoolingState = seq.pooling_state
    rows = hidden.float()
    if params.method == "last":
        if start + rows.shape[0] == seq.num_prompt_tokens:
            state.total, state.count = rows[-1].clone(), 1
        return
    part = rows.sum(dim=0)
    state.total = part if state.total is None else state.total + part
    state.count += rows.shape[0]


def pooled(seq: Sequence) -> list[float] | None:
    """The finished pooling request's vector (not normalised: the API does that), else None."""
    state: PoolingState | None = getattr(seq, "pooling_state", None)
    if seq.pooling is None or state is None or state.total is None or not state.count:
        return None
    return (state.total / state.count).cpu().tolist()
