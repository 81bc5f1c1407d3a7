"""Sequence: one request's tokens, KV blocks and progress inside the engine."""

from __future__ import annotations

import enum
import json
import time
from typing import TYPE_CHECKING

import numpy as np
import torch

from girandole.sampling.params import SamplingParams, generator_seed

if TYPE_CHECKING:
    from girandole.engine.images import SeqImage
    from girandole.engine.outputs import FinishReason
    from girandole.model.lora import LoRAAdapter
    from girandole.tokenizer import IncrementalDetokenizer, StopStringMatcher


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"
    # Paused (its client does not read) and preempted: in no queue until it is resumed.
    PARKED = "parked"


class Sequence:
    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        cache_salt: str | None = None,
        prefix_cache_max_len: int | None = None,
        priority: int = 0,
        lora: LoRAAdapter | None = None,
    ) -> None:
        self.request_id = request_id
        self.params = params
        self.token_ids: list[int] = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        # Tokens whose K/V are in the cache (prefix hits included); the rest still need a forward.
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0  # prompt tokens served by the prefix cache (reported in usage)
        self.block_tables: list[list[int]] = [[]]  # one per KV cache group (engine/kv_cache.py)
        self.num_hashed_blocks = 0  # leading full blocks already registered in the prefix cache
        self.last_block_hash: bytes | None = None  # chain hash of the last of those blocks
        self.cache_salt = cache_salt  # prefix-cache isolation key: different salts never share
        self.prefix_cache_max_len = prefix_cache_max_len  # cap on reused prompt tokens (0 = off)
        # scheduling tier: 1 for service_tier "priority", -1 for batch-job lines, else 0
        self.priority = priority
        self.lora_source = lora  # the LoRA adapter the request runs (None: the base model)
        self.lora: LoRAAdapter | None = None  # its resident copy, set at admission
        # Its prompt's images (a vision model; engine/images.py), in prompt order.
        self.images: list[SeqImage] = []
        self.status = SequenceStatus.WAITING
        self.finish_reason: FinishReason | None = None
        self.stop_reason: str | int | None = None
        self.num_preemptions = 0
        # Its client has not read the outputs already made (Scheduler.pause): not scheduled,
        # and the first to give up its blocks.
        self.paused = False
        # Seeded requests draw from their own generator, so batch neighbours cannot change them.
        self.generator: torch.Generator | None = None
        if params.seed is not None:
            self.generator = torch.Generator().manual_seed(generator_seed(params.seed))
        self.detokenizer: IncrementalDetokenizer | None = None
        self.stop_matcher: StopStringMatcher | None = None
        self.sampler_state: dict = {}  # per-request sampler state (Mirostat's mu)
        # Echo with logprobs: entry i is prompt token i's logprob (None for the first token).
        self.prompt_logprobs: list | None = None if params.prompt_logprobs is None else [None]
        self.prompt_logprobs_sent = False
        self.pending_logprobs: list = []  # logprobs of sampled tokens not yet reported
        # params.routing_matrix on an MoE model: position -> the experts its forward chose,
        # int16 [MoE layers, top-k] (engine/runner.py; a recomputed position overwrites its own)
        self.routing: dict[int, np.ndarray] | None = {} if params.routing_matrix else None
        self.grammar = None  # SequenceGrammar when the output is constrained
        self.pooling = None  # PoolingParams of an embedding request (girandole.engine.pooling)
        self.pooling_state = None  # its running sum over the prompt's hidden states
        # Speculative decoding (girandole.engine.speculation): tokens proposed for this step,
        # verified by the forward that computes them; never part of token_ids until accepted.
        self.spec_token_ids: list[int] = []
        self.speculation = None  # SpeculationState: the request's proposer state and counts
        # Overlap scheduling (engine/engine.py): the last token is a placeholder while the step
        # that sampled it is in flight (its id is on the device); `ends_pending`: that token
        # is its last (max_tokens or the context reached), so it is not scheduled again.
        self.num_pending_tokens = 0
        self.ends_pending = False
        self.arrival_time = time.monotonic()
        self.first_scheduled_time: float | None = None
        self.first_token_time: float | None = None
        self.finished_time: float | None = None

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def block_table(self) -> list[int]:
        """The first KV cache group's block table (a model without sliding-window layers has
        only that group)."""
        return self.block_tables[0]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    def is_decode(self, num_new_tokens: int) -> bool:
        """Whether this step's `num_new_tokens` of the sequence are one generated token (decode)
        and the tokens proposed after it, as opposed to prompt tokens (prefill)."""
        return (
            num_new_tokens == 1 + len(self.spec_token_ids)
            and self.num_computed_tokens >= self.num_prompt_tokens
        )

    @property
    def adapter(self) -> str | None:
        """The LoRA adapter's name (None: the base model)."""
        return None if self.lora_source is None else self.lora_source.name

    @property
    def prefix_salt(self) -> bytes:
        """What the first block's prefix-cache hash is salted with: adapters never share."""
        uid = None if self.lora_source is None else self.lora_source.uid
        return json.dumps([self.cache_salt, uid]).encode()

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED
