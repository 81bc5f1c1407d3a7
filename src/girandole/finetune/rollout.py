"""Rollouts of a reinforcement fine-tuning job: N candidate answers to one prompt, sampled from
the policy being trained (the base model plus the adapter as it is now), in the trainer's
reference (float32) model.

The forward is the serving model's own, with a KV cache: every attention layer gets a plain
float32 cache for the rollout (slot `i * L + p` holds candidate i's position p, L = prompt +
max new tokens), the prompt is computed once and its keys and values copied to every
candidate's slots, and each decode step computes one token per unfinished candidate (the
attention's per-sequence path, no native or paged kernel). The caches are unbound afterwards:
the training forward runs without one (plain causal attention, differentiable). All of it
under torch.no_grad.

Sampling: temperature (0: greedy), then top-k, then top-p (nucleus) over the tempered
probabilities, drawn from the job's seeded generator. A candidate stops at an end-of-generation
token (kept: the policy learns to stop) or at `max_tokens`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from girandole.model.attention import Attention
from girandole.model.context import ForwardContext, forward_context
from girandole.model.lora import LoRAAdapter, LoRABatch


@dataclass
class SamplingConfig:
    """Fireworks' inferenceParameters, with this server's defaults."""

    candidates: int = 4  # responseCandidatesCount
    max_tokens: int = 128  # maxOutputTokens
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off


def pick(logits: torch.Tensor, config: SamplingConfig, generator: torch.Generator) -> torch.Tensor:
    """One token id per row of logits [n, V]."""
    if config.temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / config.temperature
    if 0 < config.top_k < logits.shape[-1]:
        kth = logits.topk(config.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if config.top_p < 1:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # keep the smallest prefix whose mass reaches top_p (the first token always)
        drop = sorted_probs.cumsum(dim=-1) - sorted_probs >= config.top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


@contextmanager
def bound_caches(model: nn.Module, slots: int, device: torch.device) -> Iterator[None]:
    """A float32 KV cache of `slots` slots on every attention layer, for the block's duration."""
    layers = [m for m in model.modules() if isinstance(m, Attention)]
    for layer in layers:
        shape = (slots, layer.num_kv_heads, layer.head_dim)
        layer.k_cache = torch.zeros(shape, device=device)
        layer.v_cache = torch.zeros(shape, device=device)
        layer.kv_group = 0
    try:
        yield
    finally:
        for layer in layers:
            layer.k_cache = layer.v_cache = None


@torch.no_grad()
def sample(
    model: nn.Module,
    adapter: LoRAAdapter,
    prompt: list[int],
    config: SamplingConfig,
    eos: set[int],
    generator: torch.Generator,
    device: torch.device,
) -> list[list[int]]:
    """`config.candidates` answers to `prompt` (token ids, each ending at its stop token or at
    `config.max_tokens`)."""
    n, p, new = config.candidates, len(prompt), config.max_tokens
    width = p + new  # slots per candidate
    lora = LoRABatch([(adapter, None)], native=False)
    out: list[list[int]] = [[] for _ in range(n)]
    with bound_caches(model, n * width, device):
        ids = torch.tensor(prompt, dtype=torch.long, device=device)
        positions = torch.arange(p, device=device)
        ctx = ForwardContext(positions, [p], [p], [positions], lora=lora)
        with forward_context(ctx):
            hidden = model(ids, positions)
        logits = model.compute_logits(hidden[-1:]).expand(n, -1)
        for layer in (m for m in model.modules() if isinstance(m, Attention)):
            for cache in (layer.k_cache, layer.v_cache):
                for i in range(1, n):  # the prompt's keys and values, into every candidate's
                    cache[i * width : i * width + p] = cache[:p]
        active = list(range(n))
        while True:
            tokens = pick(logits, config, generator).tolist()
            still = []
            for i, token in zip(active, tokens):
                out[i].append(token)
                if token not in eos and len(out[i]) < new:
                    still.append(i)
            active = still
            if not active:
                return out
            # each unfinished candidate's last token, at its position, into its own slots
            at = [p + len(out[i]) - 1 for i in active]
            ids = torch.tensor([out[i][-1] for i in active], dtype=torch.long, device=device)
            positions = torch.tensor(at, dtype=torch.long, device=device)
            slots = [torch.arange(i * width, i * width + a + 1, device=device) for i, a in zip(active, at)]  # fmt: skip
            slot_mapping = torch.stack([s[-1] for s in slots])
            lens = [a + 1 for a in at]
            ctx = ForwardContext(slot_mapping, [1] * len(active), lens, slots, lora=lora)
            with forward_context(ctx):
                hidden = model(ids, positions)
            logits = model.compute_logits(hidden)
