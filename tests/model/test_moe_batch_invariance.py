"""A mixture-of-experts layer in fast mode is batch-invariant: a token's output is the same
whichever other tokens share the step, as the engine's flattened batches mix them (decode tokens
first, then prompt tokens; `ForwardContext.num_decode_rows` says how many). Fast mode runs decode
rows and prompt rows on different kernels, and an expert's rows are a mix of both: each expert
must run with its own count of decode rows, not the step's. The router too: a lone token takes
the same float32 sums as a token among others."""

from __future__ import annotations

import pytest
import torch

from girandole.model.context import ForwardContext, forward_context
from girandole.model.loader import load_model
from girandole.model.moe import SparseMoE


def step(decode_rows: int) -> ForwardContext:
    """An engine step's context as the MoE layer reads it: only the decode-row count."""
    empty = torch.zeros(0, dtype=torch.long)
    return ForwardContext(empty, [], [], [], num_decode_rows=decode_rows)


@pytest.fixture(scope="module")
def moe(tiny_qwen3_moe_dir) -> SparseMoE:
    model, _ = load_model(tiny_qwen3_moe_dir, mode="fast", device="cpu", use_cache=False)
    layer = model.layers[0].mlp
    assert isinstance(layer, SparseMoE)
    return layer


@pytest.mark.parametrize("decode", [1, 2, 5])
def test_a_tokens_output_does_not_depend_on_the_others_in_its_step(moe, decode):
    g = torch.Generator().manual_seed(decode)
    x = torch.randn(24, moe.router.shape[1], generator=g)
    with forward_context(step(decode)):
        mixed = moe(x)
    with forward_context(step(decode)):
        decode_alone = moe(x[:decode])
    with forward_context(step(0)):
        prompt_alone = moe(x[decode:])
    assert torch.equal(mixed[:decode], decode_alone)
    assert torch.equal(mixed[decode:], prompt_alone)
    with forward_context(step(1)):
        for t in range(decode):  # each decode token alone in its step
            assert torch.equal(moe(x[t : t + 1]), mixed[t : t + 1])


def test_router_weights_of_a_lone_token_equal_its_weights_among_others(moe):
    x = torch.randn(8, moe.router.shape[1], generator=torch.Generator().manual_seed(0))
    ids, weights = moe.route(x)
    for t in range(3):
        one_ids, one_weights = moe.route(x[t : t + 1])
        assert torch.equal(one_ids, ids[t : t + 1])
        assert torch.equal(one_weights, weights[t : t + 1])


def test_a_lone_prompt_token_equals_its_row_among_other_prompt_tokens(moe):
    x = torch.randn(6, moe.router.shape[1], generator=torch.Generator().manual_seed(1))
    with forward_context(step(0)):
        together = moe(x)
        for t in range(6):
            assert torch.equal(moe(x[t : t + 1]), together[t : t + 1])
